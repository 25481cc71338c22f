//! `rds-csi-bench`: a load generator for any CSI controller on a unix socket.
//!
//! It speaks only the CSI protocol (Identity Probe, Controller Create/Publish/Unpublish/Delete),
//! so the same tool measures this driver and a peer. Each worker keeps one RPC in flight: in the
//! default mode it runs publish/unpublish cycles on volumes no other worker touches; with
//! `--contention K` every worker aims at the same K volumes from its own node, so refusals
//! (FAILED_PRECONDITION) are expected and counted apart. `--probe-only` runs the no-op Probe RPC
//! instead: the transport ceiling of the socket at the same concurrency. `--compare` runs a
//! Probe phase and an attach phase back to back and reports the ratios; `--repeat R` does that R
//! times and reports the medians.
//!
//! Owns nothing of the driver: it never reads the driver's state, only its answers (and, with
//! `--driver-pid`, its CPU time from /proc).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use rds_csi::csi::controller_client::ControllerClient;
use rds_csi::csi::identity_client::IdentityClient;
use rds_csi::csi::volume_capability::{
    access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
};
use rds_csi::csi::*;
use serde_json::{json, Value};
use tonic::transport::Channel;

#[derive(Parser, Clone)]
#[command(
    name = "rds-csi-bench",
    version,
    about = "Load generator for a CSI controller on a unix socket: publish/unpublish cycles, or Probe as the transport ceiling"
)]
struct Args {
    /// CSI endpoint of the driver under test.
    #[arg(long, default_value = "unix://./csi.sock")]
    endpoint: String,
    /// Volumes to create (CreateVolume, idempotent; the volume ids it answers with are used) and
    /// cycle through. At least --workers unless --contention is set.
    #[arg(long, default_value_t = 64)]
    volumes: usize,
    /// Use these existing volume ids (comma-separated) instead of creating --volumes.
    #[arg(long, value_delimiter = ',')]
    use_existing: Vec<String>,
    /// Name prefix of created volumes: PREFIX-0 ... PREFIX-(V-1).
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Size of created volumes (bytes, or with a KiB/MiB/GiB suffix).
    #[arg(long, default_value = "1MiB", value_parser = rds_csi::ctl::parse_size)]
    size: u64,
    /// Concurrent workers, each with one RPC in flight.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Node ids NODE_PREFIX-0 ... NODE_PREFIX-(N-1); worker w publishes from node w mod N. The
    /// driver must know them (rds-csi: RDS_CSI_KNOWN_NODES=node-0,node-1,...).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Prefix of the node ids.
    #[arg(long, default_value = "node")]
    node_prefix: String,
    /// Measured time per phase (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured load before each phase's measurement.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Contention mode: every worker aims at the same K volumes (worker w at volume w mod K,
    /// from node (w div K) mod N).
    #[arg(long, value_name = "K")]
    contention: Option<usize>,
    /// Only the no-op Probe RPC: the transport ceiling at this concurrency.
    #[arg(long, conflicts_with = "compare")]
    probe_only: bool,
    /// A Probe phase, then an attach phase, with the same workers and connections; reports the
    /// ratios of the second to the first.
    #[arg(long)]
    compare: bool,
    /// Run the phase (or the --compare pair) this many times and report medians.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Access type of the volumes.
    #[arg(long, value_enum, default_value = "rwo")]
    capability: CapabilityKind,
    /// HTTP/2 connections to the socket; worker w uses connection w mod C.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Threads of the generator's own runtime [default: 1].
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Also report this process's CPU use over each measurement (the driver under test).
    #[arg(long)]
    driver_pid: Option<i32>,
    /// Delete the created volumes at the end.
    #[arg(long)]
    cleanup: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CapabilityKind {
    /// SINGLE_NODE_WRITER, ext4 mount.
    Rwo,
    /// SINGLE_NODE_WRITER, raw block.
    RwoBlock,
    /// MULTI_NODE_MULTI_WRITER, raw block (migratable).
    RwxBlock,
}

impl CapabilityKind {
    fn proto(self) -> VolumeCapability {
        let (mode, access_type) = match self {
            Self::Rwo => (
                Mode::SingleNodeWriter,
                AccessType::Mount(MountVolume {
                    fs_type: "ext4".into(),
                    mount_flags: Vec::new(),
                    volume_mount_group: String::new(),
                }),
            ),
            Self::RwoBlock => (Mode::SingleNodeWriter, AccessType::Block(BlockVolume {})),
            Self::RwxBlock => (
                Mode::MultiNodeMultiWriter,
                AccessType::Block(BlockVolume {}),
            ),
        };
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(access_type),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Probe,
    Attach,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::Probe => "probe",
            Self::Attach => "attach",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Rpc {
    Probe,
    Publish,
    Unpublish,
}

const RPCS: [Rpc; 3] = [Rpc::Probe, Rpc::Publish, Rpc::Unpublish];

impl Rpc {
    fn name(self) -> &'static str {
        match self {
            Self::Probe => "probe",
            Self::Publish => "publish",
            Self::Unpublish => "unpublish",
        }
    }
}

/// Counters the progress ticker reads while workers run.
#[derive(Default)]
struct Live {
    ok: [AtomicU64; 3],
    failed: [AtomicU64; 3],
}

/// What one worker measured: latencies (ns) of OK answers, and every non-OK answer by code.
#[derive(Default)]
struct Tally {
    latencies: [Vec<u64>; 3],
    /// (rpc, code) -> count and one sample message.
    codes: BTreeMap<(Rpc, String), (u64, String)>,
    cycles: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        for (mine, theirs) in self.latencies.iter_mut().zip(other.latencies) {
            mine.extend(theirs);
        }
        for (key, (n, msg)) in other.codes {
            let entry = self.codes.entry(key).or_insert((0, msg));
            entry.0 += n;
        }
        self.cycles += other.cycles;
    }
}

/// Start and end of one phase's measurement window.
#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    until: Instant,
}

impl Window {
    fn counts(&self, started: Instant) -> bool {
        started >= self.measure_from && started < self.until
    }
}

struct Worker {
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Channel>,
    volumes: Vec<String>,
    node: String,
    capability: VolumeCapability,
    /// Refusals (FAILED_PRECONDITION) are the expected outcome of contention.
    contention: bool,
}

impl Worker {
    fn record(
        &self,
        tally: &mut Tally,
        live: &Live,
        rpc: Rpc,
        started: Instant,
        window: &Window,
        result: Result<(), tonic::Status>,
    ) -> bool {
        let elapsed = started.elapsed();
        let ok = result.is_ok();
        let counted = window.counts(started);
        match result {
            Ok(()) => {
                if counted {
                    tally.latencies[rpc as usize].push(elapsed.as_nanos() as u64);
                    live.ok[rpc as usize].fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(status) => {
                if counted {
                    live.failed[rpc as usize].fetch_add(1, Ordering::Relaxed);
                    let entry = tally
                        .codes
                        .entry((rpc, format!("{:?}", status.code())))
                        .or_insert_with(|| (0, status.message().to_string()));
                    entry.0 += 1;
                }
            }
        }
        ok
    }

    async fn run(mut self, phase: Phase, window: Window, live: Arc<Live>) -> Tally {
        let mut tally = Tally::default();
        let mut cycle = 0usize;
        loop {
            let started = Instant::now();
            if started >= window.until {
                break;
            }
            match phase {
                Phase::Probe => {
                    let result = self.identity.probe(ProbeRequest {}).await.map(|_| ());
                    self.record(&mut tally, &live, Rpc::Probe, started, &window, result);
                }
                Phase::Attach => {
                    let volume = &self.volumes[cycle % self.volumes.len()];
                    cycle += 1;
                    let result = self
                        .controller
                        .controller_publish_volume(ControllerPublishVolumeRequest {
                            volume_id: volume.clone(),
                            node_id: self.node.clone(),
                            volume_capability: Some(self.capability.clone()),
                            readonly: false,
                            secrets: HashMap::new(),
                            volume_context: HashMap::new(),
                        })
                        .await
                        .map(|_| ());
                    let refused = self.contention
                        && matches!(&result, Err(s) if s.code() == tonic::Code::FailedPrecondition);
                    if !self.record(&mut tally, &live, Rpc::Publish, started, &window, result) {
                        if !refused {
                            // Unexpected: do not hammer a failing driver in a tight loop.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        continue;
                    }
                    // A successful publish is always undone, even past the deadline, so every
                    // run leaves its volumes detached.
                    let unpublish_started = Instant::now();
                    let result = self
                        .controller
                        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                            volume_id: volume.clone(),
                            node_id: self.node.clone(),
                            secrets: HashMap::new(),
                        })
                        .await
                        .map(|_| ());
                    let ok = self.record(
                        &mut tally,
                        &live,
                        Rpc::Unpublish,
                        unpublish_started,
                        &window,
                        result,
                    );
                    if ok && window.counts(started) && window.counts(unpublish_started) {
                        tally.cycles += 1;
                    }
                }
            }
        }
        tally
    }
}

/// CPU seconds (user + system) of this process so far.
fn self_cpu() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU seconds (user + system) of another process, from /proc/PID/stat.
fn proc_cpu(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3, "state".
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// Nearest-rank percentile of sorted nanoseconds, in microseconds.
fn percentile_us(sorted: &[u64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e3)
}

#[derive(Clone, Debug)]
struct RpcReport {
    rpc: Rpc,
    ok: u64,
    ops_per_s: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    p999_us: Option<f64>,
    max_us: Option<f64>,
}

#[derive(Clone, Debug)]
struct PhaseReport {
    phase: Phase,
    seconds: f64,
    rpcs: Vec<RpcReport>,
    /// (rpc, code) -> count and a sample message.
    codes: BTreeMap<(Rpc, String), (u64, String)>,
    unexpected: u64,
    cycles_per_s: Option<f64>,
    /// OK RPCs per second over all RPCs of the phase.
    rpc_per_s: f64,
    generator_cores: f64,
    driver_cores: Option<f64>,
}

impl PhaseReport {
    fn rpc(&self, rpc: Rpc) -> Option<&RpcReport> {
        self.rpcs.iter().find(|r| r.rpc == rpc)
    }

    fn to_json(&self) -> Value {
        let rpcs: serde_json::Map<String, Value> = self
            .rpcs
            .iter()
            .map(|r| {
                (
                    r.rpc.name().to_string(),
                    json!({
                        "ok": r.ok,
                        "ops_per_s": r.ops_per_s,
                        "p50_us": r.p50_us,
                        "p99_us": r.p99_us,
                        "p99_9_us": r.p999_us,
                        "max_us": r.max_us,
                    }),
                )
            })
            .collect();
        let codes: Vec<Value> = self
            .codes
            .iter()
            .map(|((rpc, code), (n, msg))| {
                json!({"rpc": rpc.name(), "code": code, "count": n, "sample_message": msg})
            })
            .collect();
        json!({
            "phase": self.phase.name(),
            "seconds": self.seconds,
            "rpc_per_s": self.rpc_per_s,
            "cycles_per_s": self.cycles_per_s,
            "rpcs": rpcs,
            "non_ok_answers": codes,
            "unexpected_errors": self.unexpected,
            "generator_cpu_cores": self.generator_cores,
            "driver_cpu_cores": self.driver_cores,
        })
    }

    fn print(&self) {
        println!(
            "phase {}: {:.1} s measured, {:.0} OK RPC/s{}",
            self.phase.name(),
            self.seconds,
            self.rpc_per_s,
            self.cycles_per_s
                .map(|c| format!(", {c:.0} publish+unpublish cycles/s"))
                .unwrap_or_default()
        );
        let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        println!(
            "  {:<10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9}",
            "rpc", "ok", "ops/s", "p50 us", "p99 us", "p99.9 us", "max us"
        );
        for r in &self.rpcs {
            println!(
                "  {:<10} {:>10} {:>10.0} {:>9} {:>9} {:>9} {:>9}",
                r.rpc.name(),
                r.ok,
                r.ops_per_s,
                us(r.p50_us),
                us(r.p99_us),
                us(r.p999_us),
                us(r.max_us)
            );
        }
        for ((rpc, code), (n, msg)) in &self.codes {
            println!("  non-OK: {} {code} x{n} (e.g. {msg:?})", rpc.name());
        }
        println!(
            "  unexpected errors: {}; CPU: generator {:.2} cores{}",
            self.unexpected,
            self.generator_cores,
            self.driver_cores
                .map(|c| format!(", driver {c:.2} cores"))
                .unwrap_or_default()
        );
    }
}

struct Bench {
    args: Args,
    channels: Vec<Channel>,
    volumes: Vec<String>,
}

impl Bench {
    /// Worker w's node: w mod N; in contention mode the workers that share a volume (w mod K)
    /// are spread over the nodes, so each hot volume is asked for from several nodes.
    fn node(&self, worker: usize) -> String {
        let slot = match self.args.contention {
            Some(k) => worker / k.min(self.volumes.len()).max(1),
            None => worker,
        };
        format!(
            "{}-{}",
            self.args.node_prefix,
            slot % self.args.nodes.max(1)
        )
    }

    fn workers(&self) -> Vec<Worker> {
        let w = self.args.workers;
        (0..w)
            .map(|i| {
                let channel = self.channels[i % self.channels.len()].clone();
                let volumes = match self.args.contention {
                    Some(k) => vec![self.volumes[i % k.min(self.volumes.len())].clone()],
                    None => self.volumes.iter().skip(i).step_by(w).cloned().collect(),
                };
                Worker {
                    identity: IdentityClient::new(channel.clone()),
                    controller: ControllerClient::new(channel),
                    volumes,
                    node: self.node(i),
                    capability: self.args.capability.proto(),
                    contention: self.args.contention.is_some(),
                }
            })
            .collect()
    }

    async fn run_phase(&self, phase: Phase) -> PhaseReport {
        let live = Arc::new(Live::default());
        let start = Instant::now();
        let window = Window {
            measure_from: start + self.args.warmup,
            until: start + self.args.warmup + self.args.duration,
        };
        let handles: Vec<_> = self
            .workers()
            .into_iter()
            .map(|w| tokio::spawn(w.run(phase, window, live.clone())))
            .collect();

        // CPU snapshots at the window's edges, and a progress line each second inside it.
        tokio::time::sleep_until(window.measure_from.into()).await;
        let (gen0, drv0) = (self_cpu(), self.args.driver_pid.and_then(proc_cpu));
        let measured_from = Instant::now();
        let show_progress = !self.args.quiet && self.args.duration >= Duration::from_secs(3);
        let mut last = [0u64; 3];
        let mut last_failed = 0u64;
        let mut tick = measured_from;
        loop {
            let next = (tick + Duration::from_secs(1)).min(window.until);
            tokio::time::sleep_until(next.into()).await;
            let dt = next.duration_since(tick).as_secs_f64();
            tick = next;
            if show_progress && dt > 0.5 {
                let now: Vec<u64> = live.ok.iter().map(|c| c.load(Ordering::Relaxed)).collect();
                let failed: u64 = live.failed.iter().map(|c| c.load(Ordering::Relaxed)).sum();
                let rates: Vec<String> = RPCS
                    .iter()
                    .filter(|r| now[**r as usize] > 0)
                    .map(|r| {
                        format!(
                            "{} {:.0}/s",
                            r.name(),
                            (now[*r as usize] - last[*r as usize]) as f64 / dt
                        )
                    })
                    .collect();
                eprintln!(
                    "[{} {:>4.0}s] {} non-OK {}",
                    phase.name(),
                    tick.duration_since(measured_from).as_secs_f64(),
                    rates.join(", "),
                    failed - last_failed
                );
                last.copy_from_slice(&now);
                last_failed = failed;
            }
            if tick >= window.until {
                break;
            }
        }
        let seconds = measured_from.elapsed().as_secs_f64();
        let generator_cores = (self_cpu() - gen0) / seconds;
        let driver_cores = match (drv0, self.args.driver_pid.and_then(proc_cpu)) {
            (Some(a), Some(b)) => Some((b - a) / seconds),
            _ => None,
        };

        let mut tally = Tally::default();
        for h in handles {
            tally.merge(h.await.expect("worker panicked"));
        }
        let seconds = self.args.duration.as_secs_f64();
        let rpcs: Vec<RpcReport> = RPCS
            .iter()
            .filter(|r| match phase {
                Phase::Probe => **r == Rpc::Probe,
                Phase::Attach => **r != Rpc::Probe,
            })
            .map(|r| {
                let lat = &mut tally.latencies[*r as usize];
                lat.sort_unstable();
                RpcReport {
                    rpc: *r,
                    ok: lat.len() as u64,
                    ops_per_s: lat.len() as f64 / seconds,
                    p50_us: percentile_us(lat, 50.0),
                    p99_us: percentile_us(lat, 99.0),
                    p999_us: percentile_us(lat, 99.9),
                    max_us: lat.last().map(|v| *v as f64 / 1e3),
                }
            })
            .collect();
        let contention = self.args.contention.is_some();
        let unexpected = tally
            .codes
            .iter()
            .filter(|((rpc, code), _)| {
                !(contention && *rpc == Rpc::Publish && code == "FailedPrecondition")
            })
            .map(|(_, (n, _))| n)
            .sum();
        PhaseReport {
            phase,
            seconds,
            rpc_per_s: rpcs.iter().map(|r| r.ops_per_s).sum(),
            cycles_per_s: (phase == Phase::Attach).then(|| tally.cycles as f64 / seconds),
            rpcs,
            codes: tally.codes,
            unexpected,
            generator_cores,
            driver_cores,
        }
    }
}

async fn connect_all(args: &Args) -> Result<Vec<Channel>, String> {
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections.max(1) {
        let channel = rds_csi::ctl::connect(&args.endpoint)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", args.endpoint))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Polls Probe until the driver says ready (a driver seeding from the cluster is not at first).
async fn wait_ready(channel: Channel) -> Result<(), String> {
    let mut identity = IdentityClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match identity.probe(ProbeRequest {}).await {
            Ok(r) if r.get_ref().ready != Some(false) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(format!("Probe failed: {:?}: {}", e.code(), e.message())),
        }
        if Instant::now() > deadline {
            return Err("the driver did not become ready within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates the volumes, a few at a time, and returns the volume ids the driver answered with
/// (a driver may choose ids unlike the names, as hostpath does). CreateVolume is idempotent, so
/// reruns reuse them.
async fn create_volumes(args: &Args, channel: Channel) -> Result<Vec<String>, String> {
    use futures::StreamExt;
    let names: Vec<String> = (0..args.volumes)
        .map(|i| format!("{}-{i}", args.prefix))
        .collect();
    let cap = args.capability.proto();
    let results: Vec<Result<String, String>> = futures::stream::iter(names)
        .map(|name| {
            let mut controller = ControllerClient::new(channel.clone());
            let cap = cap.clone();
            async move {
                let created = controller
                    .create_volume(CreateVolumeRequest {
                        name: name.clone(),
                        capacity_range: Some(CapacityRange {
                            required_bytes: args.size as i64,
                            limit_bytes: 0,
                        }),
                        volume_capabilities: vec![cap],
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("CreateVolume {name}: {:?}: {}", e.code(), e.message()))?;
                match created.into_inner().volume.map(|v| v.volume_id) {
                    Some(id) if !id.is_empty() => Ok(id),
                    _ => Err(format!("CreateVolume {name}: the answer has no volume_id")),
                }
            }
        })
        .buffer_unordered(args.workers.clamp(1, 16))
        .collect()
        .await;
    results.into_iter().collect()
}

async fn delete_volumes(names: &[String], channel: Channel) -> Vec<String> {
    let mut failures = Vec::new();
    let mut controller = ControllerClient::new(channel);
    for name in names {
        if let Err(e) = controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: name.clone(),
                secrets: HashMap::new(),
            })
            .await
        {
            failures.push(format!(
                "DeleteVolume {name}: {:?}: {}",
                e.code(),
                e.message()
            ));
        }
    }
    failures
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// One --compare round: the probe ceiling and the attach phase, and their ratios.
struct Round {
    probe: PhaseReport,
    attach: PhaseReport,
}

impl Round {
    fn ratios(&self) -> BTreeMap<&'static str, Option<f64>> {
        let p = self.probe.rpc(Rpc::Probe);
        let publish = self.attach.rpc(Rpc::Publish);
        let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        BTreeMap::from([
            (
                "attach_rpc_per_s_over_probe_rpc_per_s",
                div(Some(self.attach.rpc_per_s), Some(self.probe.rpc_per_s)),
            ),
            (
                "publish_p50_over_probe_p50",
                div(publish.and_then(|r| r.p50_us), p.and_then(|r| r.p50_us)),
            ),
            (
                "publish_p99_over_probe_p99",
                div(publish.and_then(|r| r.p99_us), p.and_then(|r| r.p99_us)),
            ),
        ])
    }
}

/// The numbers reported as medians over rounds.
fn summary_keys(report: &PhaseReport) -> Vec<(String, Option<f64>)> {
    let mut out = vec![
        (
            format!("{}.rpc_per_s", report.phase.name()),
            Some(report.rpc_per_s),
        ),
        (
            format!("{}.generator_cpu_cores", report.phase.name()),
            Some(report.generator_cores),
        ),
        (
            format!("{}.driver_cpu_cores", report.phase.name()),
            report.driver_cores,
        ),
    ];
    if let Some(c) = report.cycles_per_s {
        out.push((format!("{}.cycles_per_s", report.phase.name()), Some(c)));
    }
    for r in &report.rpcs {
        out.push((format!("{}.ops_per_s", r.rpc.name()), Some(r.ops_per_s)));
        out.push((format!("{}.p50_us", r.rpc.name()), r.p50_us));
        out.push((format!("{}.p99_us", r.rpc.name()), r.p99_us));
        out.push((format!("{}.p99_9_us", r.rpc.name()), r.p999_us));
    }
    out
}

async fn run(args: Args) -> Result<bool, String> {
    if args.workers == 0 || args.connections == 0 || args.repeat == 0 || args.nodes == 0 {
        return Err("--workers, --connections, --repeat and --nodes must be at least 1".into());
    }
    let channels = connect_all(&args).await?;
    wait_ready(channels[0].clone()).await?;
    let setup = Instant::now();
    let needs_volumes = !args.probe_only;
    let (volumes, created) = if !needs_volumes {
        (Vec::new(), false)
    } else if !args.use_existing.is_empty() {
        (args.use_existing.clone(), false)
    } else {
        (create_volumes(&args, channels[0].clone()).await?, true)
    };
    if needs_volumes {
        if volumes.is_empty() {
            return Err("no volumes: --volumes is 0 and --use-existing is empty".into());
        }
        match args.contention {
            Some(0) => return Err("--contention needs at least 1 volume".into()),
            Some(_) => {}
            None if volumes.len() < args.workers => {
                return Err(format!(
                    "{} volumes for {} workers: each worker needs volumes of its own (or use --contention K)",
                    volumes.len(),
                    args.workers
                ))
            }
            None => {}
        }
    }
    let setup_s = setup.elapsed().as_secs_f64();
    if !args.json && !args.quiet {
        eprintln!(
            "endpoint {}: {} workers over {} connection(s), generator threads {}, {} volumes{} ({:.1} s setup), nodes {}-0..{}, capability {:?}",
            args.endpoint,
            args.workers,
            channels.len(),
            args.threads,
            volumes.len(),
            if created { " created" } else { "" },
            setup_s,
            args.node_prefix,
            args.nodes - 1,
            args.capability,
        );
    }
    let bench = Bench {
        args: args.clone(),
        channels,
        volumes,
    };

    let phases: Vec<Phase> = if args.probe_only {
        vec![Phase::Probe]
    } else if args.compare {
        vec![Phase::Probe, Phase::Attach]
    } else {
        vec![Phase::Attach]
    };
    let mut rounds: Vec<Vec<PhaseReport>> = Vec::new();
    let mut ok = true;
    for round in 0..args.repeat {
        let mut reports = Vec::new();
        if !args.json && args.repeat > 1 {
            println!("-- round {}/{}", round + 1, args.repeat);
        }
        for phase in &phases {
            let report = bench.run_phase(*phase).await;
            ok &= report.unexpected == 0;
            if !args.json {
                report.print();
            }
            reports.push(report);
        }
        if let [probe, attach] = &reports[..] {
            if !args.json {
                let r = Round {
                    probe: probe.clone(),
                    attach: attach.clone(),
                };
                for (k, v) in r.ratios() {
                    println!("  {k}: {}", v.map_or("-".into(), |v| format!("{v:.3}")));
                }
            }
        }
        rounds.push(reports);
    }

    // Medians over rounds, and of each round's ratios.
    let mut series: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for reports in &rounds {
        for report in reports {
            for (k, v) in summary_keys(report) {
                if let Some(v) = v {
                    series.entry(k).or_default().push(v);
                }
            }
        }
        if let [probe, attach] = &reports[..] {
            let r = Round {
                probe: probe.clone(),
                attach: attach.clone(),
            };
            for (k, v) in r.ratios() {
                if let Some(v) = v {
                    series.entry(format!("ratio.{k}")).or_default().push(v);
                }
            }
        }
    }
    let medians: BTreeMap<String, Option<f64>> =
        series.into_iter().map(|(k, v)| (k, median(v))).collect();

    let cleanup_failures = if args.cleanup && created {
        delete_volumes(&bench.volumes, bench.channels[0].clone()).await
    } else {
        Vec::new()
    };
    ok &= cleanup_failures.is_empty();

    if args.json {
        let out = json!({
            "endpoint": args.endpoint,
            "workers": args.workers,
            "connections": args.connections,
            "generator_threads": args.threads,
            "volumes": bench.volumes.len(),
            "nodes": args.nodes,
            "contention": args.contention,
            "capability": format!("{:?}", args.capability),
            "duration_s": args.duration.as_secs_f64(),
            "warmup_s": args.warmup.as_secs_f64(),
            "rounds": rounds.iter().map(|r| r.iter().map(PhaseReport::to_json).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "medians": medians,
            "cleanup_failures": cleanup_failures,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        if args.repeat > 1 {
            println!("-- medians of {} rounds", args.repeat);
            for (k, v) in &medians {
                println!("  {k}: {}", v.map_or("-".into(), |v| format!("{v:.3}")));
            }
        }
        for f in &cleanup_failures {
            println!("cleanup failed: {f}");
        }
    }
    Ok(ok)
}

fn main() {
    let args = Args::parse();
    let runtime = match args.threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .expect("tokio runtime");
    let json = args.json;
    match runtime.block_on(run(args)) {
        Ok(true) => {}
        Ok(false) => {
            if !json {
                eprintln!("unexpected errors occurred (see above)");
            }
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
