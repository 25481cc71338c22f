//! The storage poller: fills the Go driver's `rds_disk_*` and `rds_hardware_*` gauges in the
//! background, so a scrape only reads numbers already in memory and never waits on the RDS.
//!
//! Owns the polling loop (one per source, never two polls of a source in flight, each bounded
//! by its own timeout), the disk source (`/disk monitor-traffic <slot> once` and the pool's
//! size over the backend's SSH pool) and the pure parser of monitor-traffic's output. The SNMP
//! source is [`super::snmp`]. Touches no volume and sends nothing but those read-only commands.
//!
//! A failed or timed-out poll is counted in `rds_csi_storage_poll_failures_total{source}` and
//! leaves the gauges at their last values; `rds_csi_storage_poll_age_seconds{source}` says how
//! old they are. Neither ever turns into an error on `/metrics`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::command::RosCommand;
use super::parse;
use super::ssh::{SshError, SshPool};
use super::values::{RosPath, Slot};
use crate::metrics::StorageMetrics;

/// Why one poll produced no sample.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The RDS could not be reached or did not answer (the SSH pool's error).
    #[error("{0}")]
    Link(#[from] SshError),
    /// RouterOS refused the command (for monitor-traffic: a slot it does not know).
    #[error("the RDS refused `{command}`: {message}")]
    Refused {
        command: &'static str,
        message: String,
    },
    /// The answer was not what RouterOS prints.
    #[error(transparent)]
    Traffic(#[from] TrafficError),
    #[error("unreadable answer: {0}")]
    Parse(String),
    #[error("the RDS printed no size and free for its pool partition")]
    NoPool,
    /// SNMP: no answer, a wrong answer or a refused request.
    #[error("SNMP: {0}")]
    Snmp(String),
    /// The poll did not finish within the poller's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One source of storage metrics.
pub trait Source: Send + Sync + 'static {
    type Sample: Send + 'static;
    /// The `source` label (`disk` or `hardware`).
    const NAME: &'static str;
    /// One poll. Must end on its own, even when the far side never answers (the SSH pool's
    /// command timeout, SNMP's own timeout): the poller waits for it before polling again.
    fn poll(&self) -> impl Future<Output = Result<Self::Sample, PollError>> + Send;
    /// Writes a sample into the gauges.
    fn record(sample: &Self::Sample, metrics: &StorageMetrics);
}

/// Polls `source` every `every`, the first time one interval after the start (the SSH pool's
/// health check dials the RDS meanwhile), until the task is dropped. A poll that outlives `timeout`
/// is counted as failed at once (the age gauge keeps growing), and is still awaited, with its
/// late answer discarded, before the next one starts: a hung RDS never has two of these
/// commands from this poller. Ticks that fall while a poll is still running are skipped.
pub async fn run<S: Source>(
    source: S,
    metrics: Arc<StorageMetrics>,
    every: Duration,
    timeout: Duration,
) {
    let source = Arc::new(source);
    metrics.poll_age.start(S::NAME);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running: Option<tokio::task::JoinHandle<()>> = None;
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    loop {
        ticks.tick().await;
        if running.as_ref().is_some_and(|h| !h.is_finished()) {
            tracing::debug!(
                source = S::NAME,
                "the previous storage poll is still running; this one is skipped"
            );
            continue;
        }
        let (source, metrics, failing) = (source.clone(), metrics.clone(), failing.clone());
        running = Some(tokio::spawn(async move {
            let poll = source.poll();
            tokio::pin!(poll);
            let (outcome, late) = match tokio::time::timeout(timeout, &mut poll).await {
                Ok(result) => (result, false),
                Err(_) => (Err(PollError::Timeout(timeout)), true),
            };
            report::<S>(outcome, &metrics, &failing);
            if late {
                // Counted as failed already; the task (and so the "still running" check) ends
                // only when the poll does. Its answer is stale by now and is dropped.
                if let Err(e) = poll.await {
                    tracing::debug!(source = S::NAME, error = %e, "a timed-out storage poll ended");
                }
            }
        }));
    }
}

/// Records one poll's outcome; logs a failure at warn only when the source was healthy.
fn report<S: Source>(
    outcome: Result<S::Sample, PollError>,
    metrics: &StorageMetrics,
    failing: &std::sync::atomic::AtomicBool,
) {
    let was_failing = failing.swap(outcome.is_err(), std::sync::atomic::Ordering::AcqRel);
    match outcome {
        Ok(sample) => {
            S::record(&sample, metrics);
            metrics.poll_age.succeeded(S::NAME);
            if was_failing {
                tracing::info!(source = S::NAME, "storage metrics polled again");
            }
        }
        Err(e) => {
            metrics.poll_failures.with_label_values(&[S::NAME]).inc();
            if was_failing {
                tracing::debug!(source = S::NAME, error = %e, "storage poll failed");
            } else {
                tracing::warn!(source = S::NAME, error = %e, "storage poll failed; its metrics keep their last values (see rds_csi_storage_poll_age_seconds)");
            }
        }
    }
}

/// The disk source: `/disk monitor-traffic <slot> once` for the pool's disk, then the pool
/// partition's size and free (`/disk print detail where mount-point=...`), over the backend's
/// SSH pool (so it shares its connections, limits and `rds_csi_rds_*` metrics).
pub struct DiskSource {
    pub pool: SshPool,
    /// The disk to watch: the mount point of the volume path (`/storage-pool/metal-csi` →
    /// `storage-pool`), the slot the Go driver hard-codes.
    pub slot: Slot,
    pub volume_path: RosPath,
}

impl DiskSource {
    /// The source for the pool that holds `volume_path`.
    pub fn for_volume_path(pool: SshPool, volume_path: RosPath) -> Result<Self, crate::Error> {
        let slot = Slot::parse(volume_path.mount_point(), "--rds-volume-path")?;
        Ok(Self {
            pool,
            slot,
            volume_path,
        })
    }

    async fn run(&self, command: &RosCommand) -> Result<String, PollError> {
        let out = self.pool.run(command).await?;
        let all = format!("{}\n{}", out.stdout, out.stderr);
        if let Some(f) = parse::failure(&all) {
            return Err(PollError::Refused {
                command: command.label(),
                message: f.message().to_string(),
            });
        }
        if let Some(status) = out.exit_status.filter(|s| *s != 0) {
            return Err(PollError::Refused {
                command: command.label(),
                message: format!("exit status {status}"),
            });
        }
        Ok(out.stdout)
    }
}

/// What one disk poll read.
#[derive(Clone, Debug, PartialEq)]
pub struct DiskSample {
    pub traffic: DiskTraffic,
    /// The pool partition's `(size, free)` in bytes.
    pub pool: (u64, u64),
}

impl Source for DiskSource {
    type Sample = DiskSample;
    const NAME: &'static str = "disk";

    async fn poll(&self) -> Result<DiskSample, PollError> {
        // Reconnecting is the pool's health check's job: a poll never dials (a dial racing the
        // health check's would only add attempts against an RDS that is down or refusing us).
        if !self.pool.connected() {
            return Err(PollError::Link(SshError::Unavailable(
                "the RDS is not connected (the SSH pool keeps trying)".into(),
            )));
        }
        let text = self
            .run(&RosCommand::MonitorTraffic {
                slot: self.slot.clone(),
            })
            .await?;
        let traffic = traffic(&text)?;
        let text = self
            .run(&RosCommand::Capacity {
                volume_path: self.volume_path.clone(),
            })
            .await?;
        let pool = parse::capacity(&text)
            .map_err(|e| PollError::Parse(e.to_string()))
            .and_then(|c| c.ok_or(PollError::NoPool))?;
        Ok(DiskSample { traffic, pool })
    }

    fn record(s: &DiskSample, m: &StorageMetrics) {
        let (d, t) = (&m.disk, &s.traffic);
        d.read_ops_per_second.set(t.read_ops_per_second);
        d.write_ops_per_second.set(t.write_ops_per_second);
        d.read_bytes_per_second.set(t.read_bytes_per_second);
        d.write_bytes_per_second.set(t.write_bytes_per_second);
        d.read_latency_milliseconds.set(t.read_time_ms);
        d.write_latency_milliseconds.set(t.write_time_ms);
        d.wait_latency_milliseconds.set(t.wait_time_ms);
        d.in_flight_operations.set(t.in_flight_ops);
        d.active_time_milliseconds.set(t.active_time_ms);
        let (size, free) = s.pool;
        d.pool_size_bytes.set(size as f64);
        d.pool_used_bytes.set(size.saturating_sub(free) as f64);
    }
}

/// One sample of `/disk monitor-traffic <slot> once`, in the units of the `rds_disk_*` gauges.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DiskTraffic {
    pub read_ops_per_second: f64,
    pub write_ops_per_second: f64,
    /// Bytes per second (RouterOS prints bits per second).
    pub read_bytes_per_second: f64,
    pub write_bytes_per_second: f64,
    pub read_time_ms: f64,
    pub write_time_ms: f64,
    pub wait_time_ms: f64,
    pub in_flight_ops: f64,
    pub active_time_ms: f64,
}

/// Why monitor-traffic's output could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrafficError {
    #[error("monitor-traffic printed no {0}")]
    Missing(&'static str),
    #[error("monitor-traffic printed {field}: {value:?}, which is not a {kind}")]
    Bad {
        field: &'static str,
        value: String,
        kind: &'static str,
    },
}

#[derive(Clone, Copy)]
enum Kind {
    Count,
    Rate,
    Time,
}

/// The fields read, each with how RouterOS prints it.
const FIELDS: [(&str, Kind); 9] = [
    ("read-ops-per-second", Kind::Count),
    ("write-ops-per-second", Kind::Count),
    ("read-rate", Kind::Rate),
    ("write-rate", Kind::Rate),
    ("read-time", Kind::Time),
    ("write-time", Kind::Time),
    ("wait-time", Kind::Time),
    ("in-flight-ops", Kind::Count),
    ("active-time", Kind::Time),
];

/// Parses `/disk monitor-traffic <slot> once`: `key: value` lines, keys right-aligned, values
/// right-aligned, `\r\n` or `\n` line ends. Counts are integers grouped by spaces
/// (`17 667 231`), rates bits per second with a unit (`0bps`, `500kbps`, `12.8Mbps`,
/// `1.5Gbps`), times RouterOS durations (`0ms`, `1s200ms`). Every field the gauges need must be
/// present and well-formed: a missing or garbled one is an error, not a zero.
pub fn traffic(text: &str) -> Result<DiskTraffic, TrafficError> {
    let mut values = [0.0; 9];
    for (i, (field, kind)) in FIELDS.iter().enumerate() {
        let raw = text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == *field)
            .map(|(_, v)| v.trim())
            .ok_or(TrafficError::Missing(field))?;
        let (value, kind_name) = match kind {
            Kind::Count => (count(raw), "count"),
            Kind::Rate => (rate(raw), "rate in bits per second"),
            Kind::Time => (millis(raw), "RouterOS duration"),
        };
        values[i] = value.ok_or_else(|| TrafficError::Bad {
            field,
            value: raw.to_string(),
            kind: kind_name,
        })?;
    }
    let [read_ops_per_second, write_ops_per_second, read_rate, write_rate, read_time_ms, write_time_ms, wait_time_ms, in_flight_ops, active_time_ms] =
        values;
    Ok(DiskTraffic {
        read_ops_per_second,
        write_ops_per_second,
        read_bytes_per_second: read_rate / 8.0,
        write_bytes_per_second: write_rate / 8.0,
        read_time_ms,
        write_time_ms,
        wait_time_ms,
        in_flight_ops,
        active_time_ms,
    })
}

/// `0`, `76`, `17 667 231`: digits in groups of three after the first, split by single spaces.
fn count(raw: &str) -> Option<f64> {
    let mut groups = raw.split(' ');
    let first = groups.next()?;
    // Grouped (`243 401`): the first group has 1 to 3 digits; ungrouped (`1500`): any number.
    let first_ok = !first.is_empty() && (first.len() <= 3 || !raw.contains(' '));
    if !first_ok || !first.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits = first.to_string();
    for g in groups {
        if g.len() != 3 || !g.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.push_str(g);
    }
    digits.parse::<u64>().ok().map(|n| n as f64)
}

/// A decimal number (`12`, `12.8`), digits on both sides of an optional point.
fn decimal(raw: &str) -> Option<f64> {
    let (int, frac) = raw.split_once('.').unwrap_or((raw, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || !digits(frac) {
        return None;
    }
    raw.parse().ok()
}

/// Bits per second: a decimal and `bps`, `kbps`, `Mbps`, `Gbps` or `Tbps` (powers of 1000).
fn rate(raw: &str) -> Option<f64> {
    let split = raw.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = raw.split_at(split);
    let scale = match unit {
        "bps" => 1.0,
        "kbps" | "Kbps" => 1e3,
        "Mbps" => 1e6,
        "Gbps" => 1e9,
        "Tbps" => 1e12,
        _ => return None,
    };
    Some(decimal(number)? * scale)
}

/// A RouterOS duration in milliseconds: one or more `<number><unit>` with units `w`, `d`, `h`,
/// `m`, `s`, `ms`, `us`, largest first (`0ms`, `950ms`, `1s200ms`, `2m3s`).
fn millis(raw: &str) -> Option<f64> {
    const UNITS: [(&str, f64); 7] = [
        ("w", 604_800_000.0),
        ("d", 86_400_000.0),
        ("h", 3_600_000.0),
        ("m", 60_000.0),
        ("s", 1_000.0),
        ("ms", 1.0),
        ("us", 0.001),
    ];
    let mut rest = raw;
    let mut total = 0.0;
    let mut last = None;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let unit_at = rest.find(|c: char| c.is_ascii_alphabetic())?;
        let number = decimal(&rest[..unit_at])?;
        let tail = &rest[unit_at..];
        let unit_len = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let unit = &tail[..unit_len];
        let rank = UNITS.iter().position(|(u, _)| *u == unit)?;
        if last.is_some_and(|l| rank <= l) {
            return None;
        }
        last = Some(rank);
        total += number * UNITS[rank].1;
        rest = &tail[unit_len..];
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    /// The Go driver's test sample, which it describes as captured from an RDS.
    const CAPTURED: &str = "                  slot:    storage-pool
              read-ops:         243 401
   read-ops-per-second:               0
            read-bytes:  33 131 503 616
             read-rate:            0bps
           read-merges:               0
             read-time:             0ms
             write-ops:      17 667 231
  write-ops-per-second:              76
           write-bytes: 515 659 673 600
            write-rate:        12.8Mbps
          write-merges:               0
            write-time:             0ms
         in-flight-ops:               0
           active-time:             0ms
             wait-time:             0ms
           discard-ops:               0
         discard-bytes:               0
        discard-merges:               0
          discard-time:             0ms
             flush-ops:               0
            flush-time:             0ms";

    #[test]
    fn reads_the_captured_sample() {
        let t = traffic(&CAPTURED.replace('\n', "\r\n")).unwrap();
        assert_eq!(
            t,
            DiskTraffic {
                write_ops_per_second: 76.0,
                write_bytes_per_second: 1_600_000.0,
                ..Default::default()
            }
        );
    }

    #[test]
    fn units() {
        assert_eq!(rate("0bps"), Some(0.0));
        assert_eq!(rate("500kbps"), Some(500_000.0));
        assert_eq!(rate("1.5Gbps"), Some(1.5e9));
        assert_eq!(rate("100.0Mbps"), Some(1e8));
        for bad in [
            "", "bps", "12", "12.Mbps", ".5Mbps", "1 Mbps", "12MBps", "-1bps",
        ] {
            assert_eq!(rate(bad), None, "{bad}");
        }
        assert_eq!(millis("0ms"), Some(0.0));
        assert_eq!(millis("10ms"), Some(10.0));
        assert_eq!(millis("1s200ms"), Some(1200.0));
        assert_eq!(millis("2m3s"), Some(123_000.0));
        for bad in ["", "ms", "10", "3ms1s", "1x", "1s1s", "1 ms"] {
            assert_eq!(millis(bad), None, "{bad}");
        }
        assert_eq!(count("17 667 231"), Some(17_667_231.0));
        assert_eq!(count("1500"), Some(1500.0));
        for bad in ["", " 1", "1  000", "1 00", "12 3456", "x", "1.5"] {
            assert_eq!(count(bad), None, "{bad}");
        }
    }

    /// Catches a parser that defaults a missing or garbled field to zero (as the Go driver's
    /// does): the gauge would then report an idle disk that was never read.
    #[test]
    fn a_missing_or_garbled_field_is_an_error() {
        let without = CAPTURED
            .lines()
            .filter(|l| !l.contains("wait-time"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(traffic(&without), Err(TrafficError::Missing("wait-time")));
        let garbled = CAPTURED.replace("12.8Mbps", "12.8 megabits");
        assert!(matches!(
            traffic(&garbled),
            Err(TrafficError::Bad {
                field: "write-rate",
                ..
            })
        ));
        assert_eq!(
            traffic(""),
            Err(TrafficError::Missing("read-ops-per-second"))
        );
    }

    /// A source the test drives: each poll waits for the test's go-ahead (or not), and the
    /// source counts how many run at once.
    struct Scripted {
        calls: AtomicUsize,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
        /// `true`: polls answer at once; `false`: they wait until it turns `true`.
        open: tokio::sync::watch::Sender<bool>,
        fail: AtomicBool,
    }

    impl Scripted {
        fn new(open: bool, fail: bool) -> Arc<Self> {
            Arc::new(Self {
                calls: AtomicUsize::new(0),
                in_flight: AtomicUsize::new(0),
                max_in_flight: AtomicUsize::new(0),
                open: tokio::sync::watch::channel(open).0,
                fail: AtomicBool::new(fail),
            })
        }
    }

    struct Handle(Arc<Scripted>);

    impl Source for Handle {
        type Sample = f64;
        const NAME: &'static str = "disk";

        async fn poll(&self) -> Result<f64, PollError> {
            let s = &self.0;
            let n = s.calls.fetch_add(1, SeqCst) + 1;
            let now = s.in_flight.fetch_add(1, SeqCst) + 1;
            s.max_in_flight.fetch_max(now, SeqCst);
            let mut open = s.open.subscribe();
            open.wait_for(|o| *o)
                .await
                .expect("sender lives in the test");
            s.in_flight.fetch_sub(1, SeqCst);
            if s.fail.load(SeqCst) {
                return Err(PollError::Parse("scripted failure".into()));
            }
            Ok(n as f64)
        }

        fn record(sample: &f64, m: &StorageMetrics) {
            m.disk.read_ops_per_second.set(*sample);
        }
    }

    fn storage() -> (crate::metrics::Metrics, Arc<StorageMetrics>) {
        let m = crate::metrics::Metrics::new();
        let s = Arc::new(m.storage("storage-pool", false).unwrap());
        (m, s)
    }

    fn series(m: &crate::metrics::Metrics, name: &str) -> f64 {
        let text = m.render();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} not in\n{text}"))
            .parse()
            .unwrap()
    }

    const FAILURES: &str = "rds_csi_storage_poll_failures_total{source=\"disk\"}";
    const AGE: &str = "rds_csi_storage_poll_age_seconds{source=\"disk\"}";
    const READ_OPS: &str = "rds_disk_read_ops_per_second{slot=\"storage-pool\"}";

    /// A hung RDS: the poll's own timeout counts one failure at once (catches removing the
    /// `timeout` around the poll in `run`), the age keeps growing while the scrape answers from
    /// memory, and no second poll starts while the first is still out (catches removing the
    /// `is_finished` check). Once the hung poll ends, polling resumes and the age resets.
    #[tokio::test(start_paused = true)]
    async fn a_hung_poll_is_counted_once_and_never_doubled() {
        let (m, s) = storage();
        let src = Scripted::new(false, false);
        let task = tokio::spawn(run(
            Handle(src.clone()),
            s,
            Duration::from_secs(10),
            Duration::from_secs(4),
        ));
        // The first poll starts at 10 s, and times out at 14 s.
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert_eq!(series(&m, FAILURES), 1.0);
        let age = series(&m, AGE);
        assert_eq!(age, 15.0);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(src.calls.load(SeqCst), 1, "no second poll while one is out");
        assert_eq!(src.max_in_flight.load(SeqCst), 1);
        assert_eq!(series(&m, FAILURES), 1.0);
        assert_eq!(series(&m, AGE), 75.0);
        assert_eq!(series(&m, READ_OPS), 0.0);
        // The RDS answers again: the late answer is dropped, the next tick polls afresh.
        src.open.send_replace(true);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(src.calls.load(SeqCst), 2);
        assert_eq!(
            series(&m, READ_OPS),
            2.0,
            "the second poll's sample, not the late first"
        );
        assert!(series(&m, AGE) < 10.0);
        assert_eq!(series(&m, FAILURES), 1.0);
        assert_eq!(src.max_in_flight.load(SeqCst), 1);
        task.abort();
    }

    /// Every failed poll is counted (catches dropping the `inc` in `report`) and leaves the
    /// gauges and the age alone (catches `succeeded` on a failure).
    #[tokio::test(start_paused = true)]
    async fn each_failed_poll_is_counted_and_the_age_grows() {
        let (m, s) = storage();
        let src = Scripted::new(true, false);
        let task = tokio::spawn(run(
            Handle(src.clone()),
            s,
            Duration::from_secs(10),
            Duration::from_secs(4),
        ));
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(series(&m, READ_OPS), 1.0);
        assert_eq!(series(&m, AGE), 1.0);
        src.fail.store(true, SeqCst);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(series(&m, FAILURES), 3.0);
        assert_eq!(series(&m, READ_OPS), 1.0, "the last good sample stays");
        assert_eq!(series(&m, AGE), 31.0);
        task.abort();
    }

    proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,400}") {
            let _ = traffic(&text);
        }

        #[test]
        fn reads_what_routeros_prints(
            ops in 0u64..10_000_000, tenths in 0u64..100_000, ms in 0u64..5_000,
        ) {
            let rate = format!("{}.{}Mbps", tenths / 10, tenths % 10);
            let time = if ms >= 1000 { format!("{}s{}ms", ms / 1000, ms % 1000) } else { format!("{ms}ms") };
            let text = FIELDS
                .iter()
                .map(|(k, kind)| {
                    let v = match kind {
                        Kind::Count => ops.to_string(),
                        Kind::Rate => rate.clone(),
                        Kind::Time => time.clone(),
                    };
                    format!("{k:>22}: {v:>15}\r\n")
                })
                .collect::<String>();
            let t = traffic(&text).unwrap();
            prop_assert_eq!(t.read_ops_per_second, ops as f64);
            prop_assert!((t.write_bytes_per_second - tenths as f64 * 1e5 / 8.0).abs() < 1e-6 * (1.0 + t.write_bytes_per_second));
            prop_assert_eq!(t.active_time_ms, ms as f64);
        }
    }
}
