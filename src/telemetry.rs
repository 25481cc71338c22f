//! Log setup through tracing-subscriber. `RUST_LOG` overrides the default `info` filter.
//!
//! Lines are formatted on the thread that logs them and written to stderr by a background
//! thread (tracing-appender's non-blocking writer), so an attach or detach never waits on a
//! `write(2)`; the writer thread batches what is queued into one write. Nothing is dropped:
//! when the queue is full (128k lines behind) a logging thread waits instead. The returned
//! [`LogGuard`] must live until the process ends: dropping it writes out what is queued, so
//! `main` holds it and drops it last, after a SIGTERM shutdown too. A SIGKILL, or an abort,
//! loses what was still queued.

use std::io::{BufWriter, IsTerminal};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Keeps the log writer thread running; dropping it flushes the queued lines and stops it.
#[must_use = "dropping the guard stops logging"]
pub struct LogGuard {
    _worker: WorkerGuard,
}

/// What the writer thread may gather into one `write(2)`.
const WRITE_BUFFER: usize = 64 * 1024;

pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("rds-csi-log")
        .finish(BufWriter::with_capacity(WRITE_BUFFER, std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    LogGuard { _worker: guard }
}
