//! Log setup through tracing-subscriber. `RUST_LOG` overrides the default `info` filter.
//!
//! Lines are formatted on the thread that logs them and appended to a shared buffer; a
//! background thread writes what gathered to stderr in one `write(2)` every
//! [`FLUSH_INTERVAL`], or as soon as [`WAKE_AT`] bytes are waiting. So an attach or detach never
//! waits on a `write(2)`, and logging a line wakes no thread: the writer is not woken per line
//! (a channel's receiver would be, and would then spin in `sched_yield` on the CPU the request
//! path needs). Nothing is dropped: with [`MAX_BUFFERED`] bytes waiting, a logging
//! thread waits for the writer instead. The returned [`LogGuard`] must live until the process
//! ends: dropping it writes out what is buffered, so `main` holds it and drops it last, after a
//! SIGTERM shutdown too. A SIGKILL, or an abort, loses at most the last interval's lines.

use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// How long a line may wait before the writer writes it.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(10);
/// Bytes waiting at which a logging thread wakes the writer at once.
pub const WAKE_AT: usize = 64 * 1024;
/// Bytes waiting at which logging threads wait for the writer (about 128k lines).
pub const MAX_BUFFERED: usize = 16 * 1024 * 1024;

/// Keeps the log writer thread running; dropping it writes out the buffered lines and stops it.
#[must_use = "dropping the guard stops logging"]
pub struct LogGuard {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake_writer.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = buffered(std::io::stderr(), FLUSH_INTERVAL);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(Rfc3339Micros)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    guard
}

/// Each line's time as RFC 3339 in UTC with microseconds (`2026-12-05T04:36:03.884405Z`), the
/// text tracing-subscriber's default timer writes, with the date and time of day formatted once
/// per second per thread instead of for every line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rfc3339Micros;

impl Rfc3339Micros {
    fn write(at: SystemTime, w: &mut impl std::fmt::Write) -> std::fmt::Result {
        thread_local! {
            /// The second last formatted on this thread and its `YYYY-MM-DDTHH:MM:SS`.
            static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
        }
        let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (secs, micros) = (since.as_secs(), since.subsec_micros());
        SECOND.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != secs {
                let whole = UNIX_EPOCH + Duration::from_secs(secs);
                let text = humantime::format_rfc3339_seconds(whole).to_string();
                cached.1.clear();
                cached.1.push_str(text.trim_end_matches('Z'));
                cached.0 = secs;
            }
            write!(w, "{}.{micros:06}Z", cached.1)
        })
    }
}

impl FormatTime for Rfc3339Micros {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        Self::write(SystemTime::now(), w)
    }
}

struct State {
    buf: Vec<u8>,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// The writer waits here for its interval, a full buffer, or the guard's drop.
    wake_writer: Condvar,
    /// Logging threads wait here while [`MAX_BUFFERED`] bytes are waiting.
    drained: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where the formatter writes each line: the shared buffer. Cheap to clone.
#[derive(Clone)]
pub struct BufferedWriter {
    shared: Arc<Shared>,
}

impl Write for BufferedWriter {
    /// Appends the whole of `bytes` (the formatter writes one line at once, so lines of
    /// different threads never interleave).
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut state = self.shared.lock();
        while state.buf.len() >= MAX_BUFFERED && !state.closed {
            self.shared.wake_writer.notify_one();
            state = self
                .shared
                .drained
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        let was_below = state.buf.len() < WAKE_AT;
        state.buf.extend_from_slice(bytes);
        if was_below && state.buf.len() >= WAKE_AT {
            self.shared.wake_writer.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BufferedWriter {
    type Writer = BufferedWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// A writer whose lines reach `out` from a background thread, at most `interval` after they
/// were written (see the module docs), and the guard that stops it.
pub fn buffered<W: Write + Send + 'static>(
    mut out: W,
    interval: Duration,
) -> (BufferedWriter, LogGuard) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            buf: Vec::with_capacity(WAKE_AT),
            closed: false,
        }),
        wake_writer: Condvar::new(),
        drained: Condvar::new(),
    });
    let theirs = shared.clone();
    let writer = std::thread::Builder::new()
        .name("rds-csi-log".into())
        .spawn(move || {
            let shared = theirs;
            let mut spare = Vec::with_capacity(WAKE_AT);
            loop {
                let mut state = shared.lock();
                let until = std::time::Instant::now() + interval;
                while !state.closed && state.buf.len() < WAKE_AT {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    state = shared
                        .wake_writer
                        .wait_timeout(state, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                let closed = state.closed;
                std::mem::swap(&mut state.buf, &mut spare);
                drop(state);
                shared.drained.notify_all();
                if !spare.is_empty() {
                    // Nowhere to report a failed log write; the next batch tries again.
                    let _ = out.write_all(&spare).and_then(|()| out.flush());
                    spare.clear();
                }
                if closed {
                    return;
                }
            }
        })
        .expect("spawning the log writer thread");
    (
        BufferedWriter {
            shared: shared.clone(),
        },
        LogGuard {
            shared,
            writer: Some(writer),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read, that records each write it received.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(bytes.to_vec());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().concat()).unwrap()
        }
        fn writes(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    /// Logging a line wakes nobody: with an interval longer than the test, a hundred lines
    /// reach the sink only when the guard goes, in one write, all of them, in order.
    ///
    /// Catches: a writer woken (or writing) per line.
    #[test]
    fn the_time_is_written_as_tracing_subscribers_default_timer_writes_it() {
        use super::Rfc3339Micros;
        use std::time::{Duration, UNIX_EPOCH};
        // Instants in and across seconds, days, a leap day and years, each against the text of
        // humantime's RFC 3339 with microseconds (the format tracing-subscriber's `SystemTime`
        // timer writes).
        let instants = [
            0,
            1_709_164_799_999_999,
            1_709_164_800_000_001,
            1_764_910_563_884_405,
            1_764_910_563_999_999,
            1_764_910_564_000_000,
            1_764_910_563_000_007,
            4_102_444_799_500_000,
        ];
        for micros in instants {
            let at = UNIX_EPOCH + Duration::from_micros(micros);
            let mut ours = String::new();
            Rfc3339Micros::write(at, &mut ours).unwrap();
            assert_eq!(
                ours,
                humantime::format_rfc3339_micros(at).to_string(),
                "{micros}"
            );
        }
    }

    #[test]
    fn lines_wait_for_the_interval_and_the_guard_writes_them_out() {
        let sink = Sink::default();
        let (mut writer, guard) = buffered(sink.clone(), Duration::from_secs(3600));
        for i in 0..100 {
            writer.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        assert_eq!(sink.writes(), 0, "a line was written before its interval");
        drop(guard);
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(sink.text(), expected);
        assert_eq!(sink.writes(), 1);
    }

    /// Within the interval, lines are written without the guard's help.
    #[test]
    fn a_line_is_written_after_the_interval() {
        let sink = Sink::default();
        let (mut writer, _guard) = buffered(sink.clone(), Duration::from_millis(1));
        writer.write_all(b"one line\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while sink.text().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the line never reached the sink"
            );
            std::thread::yield_now();
        }
        assert_eq!(sink.text(), "one line\n");
    }

    /// A full buffer wakes the writer (no wait for the interval), and writers past
    /// MAX_BUFFERED wait rather than drop: every line of four threads arrives, whole, each
    /// thread's in its order.
    #[test]
    fn many_threads_lose_nothing_and_lines_stay_whole() {
        let sink = Sink::default();
        let (writer, guard) = buffered(sink.clone(), Duration::from_secs(3600));
        let line = |t: usize, i: usize| format!("thread {t} line {i} {}\n", "x".repeat(200));
        let lines_per_thread = MAX_BUFFERED / 200;
        std::thread::scope(|s| {
            for t in 0..4 {
                let mut writer = writer.clone();
                s.spawn(move || {
                    for i in 0..lines_per_thread {
                        writer.write_all(line(t, i).as_bytes()).unwrap();
                    }
                });
            }
        });
        // 4 × 16 MiB could not all wait in the buffer: the writer drained it while the threads
        // ran, with the interval an hour away.
        assert!(
            sink.writes() > 0,
            "the writer was never woken by a full buffer"
        );
        drop(guard);
        let text = sink.text();
        let mut next = [0usize; 4];
        for got in text.lines() {
            let mut words = got.split(' ');
            assert_eq!(words.next(), Some("thread"));
            let t: usize = words.next().unwrap().parse().unwrap();
            assert_eq!(
                format!("{got}\n"),
                line(t, next[t]),
                "a line was cut or reordered"
            );
            next[t] += 1;
        }
        assert_eq!(next, [lines_per_thread; 4], "lines were lost");
    }
}
