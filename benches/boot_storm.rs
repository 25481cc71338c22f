//! A boot storm on the RDS backend: 1,000 volumes, each CreateVolume (or, on a restart, the
//! lookup CreateVolume does), ControllerPublishVolume, NodeStageVolume and NodePublishVolume,
//! through the real controller (`rds-csi --mode controller --backend rds`, standalone, over its
//! unix socket, with its default `--rds-pool-size` 4 and `--rds-sessions-per-connection` 2)
//! against the fake RouterOS over real SSH with a fixed latency per command, and through the
//! real node service (in this process, one per node) with the node side faked at the device
//! seam: NVMe connect, the device and its node are stand-ins; everything above them (the node
//! plugin's records, locks and path confinement) is the real thing.
//!
//! Driven at the sidecars' and the kubelet's default concurrencies: the external-provisioner's
//! `--worker-threads` (100) for CreateVolume, the external-attacher's `--worker-threads` (10) for
//! ControllerPublish, and no limit for the kubelet's stage and publish (its operation executor
//! runs operations on different volumes in parallel). A volume's steps run in order, each as soon
//! as the one before it answered, as a VM's PVC, VolumeAttachment and pod follow each other. The
//! volumes are KubeVirt disks: block, MULTI_NODE_MULTI_WRITER (live-migratable), 1 GiB, spread
//! round-robin over `BOOT_STORM_NODES` nodes (default 50: 20 VMs per node).
//!
//! Two scenarios per run, each with a freshly started controller and fresh nodes: "fresh" (no
//! volume exists: every CreateVolume creates) and "restart" (every volume exists on the RDS, as
//! after a cluster outage: CreateVolume is the lookup). Reports the wall time, p50/p99 of each
//! step, RouterOS commands, SSH sessions (the most open at once on one connection and in total,
//! and how many were opened), the pool's occupancy (the mean share of its sessions in use, and
//! how often all were; sampled every millisecond), when the last CreateVolume answered, and
//! the serialized bound: the Go driver's commands for the same
//! work, one SSH session at a time, at the injected latency. The Go driver's commands per
//! volume (pkg/driver/controller.go, pkg/rds/commands.go): CreateVolume runs `GetVolume`
//! (`/disk print detail where slot=…`), then `/disk add …` and `VerifyVolumeExists` (another
//! `GetVolume`): 3; its lookup of an existing volume is the first `GetVolume`: 1;
//! ControllerPublishVolume runs one `GetVolume`: 1.
//!
//! The fake refuses a session beyond `sessions per connection` on one connection, as RouterOS
//! bounds it (no RouterOS figure found; the driver's configured default, 2): the bench fails if
//! the fake ever refused one or saw more open.
//!
//! Not criterion: each sample is a whole storm. `cargo bench --bench boot_storm` runs it;
//! `BOOT_STORM_VOLUMES` (1000), `BOOT_STORM_LATENCY_MS` (20), `BOOT_STORM_NODES` (50) and
//! `BOOT_STORM_RUNS` (3) choose what. `BOOT_STORM_REFERENCE=<path to another rds-csi build>`
//! runs that build too, interleaved with this one in every run (reference, this, reference,
//! ...), so noise hits both. `-- --test` is a quick check (50 volumes, 2 ms, 5 nodes, one run)
//! that still checks the session bound.

#[allow(unused_imports)]
#[path = "../tests/support/fake_rds.rs"]
mod fake_rds;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fake_rds::{client_keypair, FakeRds, FakeRdsConfig};
use rds_csi::backend::rds::values::NqnPrefix;
use rds_csi::csi::controller_client::ControllerClient;
use rds_csi::csi::identity_client::IdentityClient;
use rds_csi::csi::node_client::NodeClient;
use rds_csi::csi::node_server::NodeServer;
use rds_csi::csi::volume_capability::access_mode::Mode;
use rds_csi::csi::volume_capability::{AccessMode, AccessType, BlockVolume};
use rds_csi::csi::*;
use rds_csi::domain::FsType;
use rds_csi::grpc::node::NodeService;
use rds_csi::ids::VolumeId;
use rds_csi::metrics::Metrics;
use rds_csi::node::command::{Cmd, CommandError, CommandRunner, Output};
use rds_csi::node::confine::KubeletRoot;
use rds_csi::node::device::{Backing, DeviceSource};
use rds_csi::node::mounter::{MountError, MountOptions, Mounter};
use rds_csi::node::mountinfo::MountEntry;
use rds_csi::node::nvme::NvmeDevices;
use rds_csi::node::paths::{AbsPath, BlockDevice};
use rds_csi::node::plugin::NodeDeps;
use rds_csi::node::records::Records;
use rds_csi::node::{NodeError, NodePlugin};
use tokio::sync::Semaphore;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_rds-csi");
/// `--rds-sessions-per-connection`'s default, and the most the fake lets one connection open.
const SESSIONS_PER_CONNECTION: usize = 2;
/// `--rds-pool-size`'s default.
const POOL_SIZE: usize = 4;
/// external-provisioner `--worker-threads` default.
const PROVISIONER_WORKERS: usize = 100;
/// external-attacher `--worker-threads` default.
const ATTACHER_WORKERS: usize = 10;
/// The Go driver's RouterOS commands per volume: CreateVolume that creates, and the one that
/// finds the volume; ControllerPublishVolume.
const GO_CREATE: usize = 3;
const GO_LOOKUP: usize = 1;
const GO_PUBLISH: usize = 1;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
        })
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The node side, faked at the device seam
// ---------------------------------------------------------------------------------------------

/// NVMe/TCP stand-in: `locate` is the real NVMe source's (it reads the volume context the
/// controller wrote); connect gives the next namespace device number, as the kernel would.
struct FakeNvme {
    real: NvmeDevices<NoCommands>,
    attached: Mutex<HashMap<String, BlockDevice>>,
    next: Arc<AtomicU32>,
}

#[async_trait]
impl DeviceSource for FakeNvme {
    fn kind(&self) -> &'static str {
        "rds"
    }
    fn locate(
        &self,
        volume: &VolumeId,
        publish_context: &HashMap<String, String>,
        volume_context: &HashMap<String, String>,
    ) -> Result<Backing, NodeError> {
        self.real.locate(volume, publish_context, volume_context)
    }
    async fn exists(&self, _: &Backing) -> Result<bool, NodeError> {
        Ok(true)
    }
    async fn find(&self, backing: &Backing) -> Result<Option<BlockDevice>, NodeError> {
        Ok(self.attached.lock().unwrap().get(&key(backing)).cloned())
    }
    async fn attach(&self, backing: &Backing) -> Result<BlockDevice, NodeError> {
        let mut attached = self.attached.lock().unwrap();
        let next = &self.next;
        Ok(attached
            .entry(key(backing))
            .or_insert_with(|| {
                let n = next.fetch_add(1, Ordering::Relaxed);
                BlockDevice {
                    path: AbsPath::parse_field(&format!("/dev/nvme{n}n1"), "device").unwrap(),
                    major: 259,
                    minor: n,
                }
            })
            .clone())
    }
    async fn detach(&self, backing: &Backing) -> Result<(), NodeError> {
        self.attached.lock().unwrap().remove(&key(backing));
        Ok(())
    }
    async fn refresh_size(&self, _: &Backing, _: &BlockDevice) -> Result<u64, NodeError> {
        Ok(1 << 30)
    }
    async fn healthy(&self, _: &Backing, _: &BlockDevice) -> Result<bool, NodeError> {
        Ok(true)
    }
}

fn key(backing: &Backing) -> String {
    match backing {
        Backing::Nvme(t) => t.nqn.to_string(),
        Backing::File { image } => image.to_string(),
    }
}

/// No external command runs for a block volume on this path; one that does fails the bench.
struct NoCommands;

#[async_trait]
impl CommandRunner for NoCommands {
    async fn run(&self, cmd: &Cmd) -> Result<Output, CommandError> {
        panic!("the boot storm's node ran {}", cmd.program)
    }
    fn installed(&self, _: &'static str) -> bool {
        false
    }
}

/// Mounts in memory; a block volume's device node is an empty file (the node never opens it).
#[derive(Default)]
struct FakeMounts;

impl Mounter for FakeMounts {
    fn mounts(&self) -> Result<Vec<MountEntry>, MountError> {
        Ok(Vec::new())
    }
    fn mount_device(
        &self,
        _: &BlockDevice,
        target: &AbsPath,
        _: FsType,
        _: &MountOptions,
    ) -> Result<(), MountError> {
        panic!("the boot storm's block volumes are never mounted ({target})")
    }
    fn bind(
        &self,
        _: &AbsPath,
        target: &AbsPath,
        _: rustix::mount::MountFlags,
    ) -> Result<(), MountError> {
        panic!("the boot storm's block volumes are never bind-mounted ({target})")
    }
    fn unmount(&self, target: &AbsPath) -> Result<(), MountError> {
        panic!("the boot storm never unmounts ({target})")
    }
    fn make_device_node(
        &self,
        target: &AbsPath,
        _: &BlockDevice,
        _: bool,
    ) -> Result<(), MountError> {
        std::fs::write(target.as_path(), "").map_err(|source| MountError {
            action: "creating a device node at",
            path: target.to_string(),
            source,
        })
    }
}

/// One node: its kubelet directory and its node service on a unix socket.
struct Node {
    name: String,
    kubelet: PathBuf,
    client: NodeClient<Channel>,
}

async fn start_node(dir: &Path, name: &str, next: Arc<AtomicU32>) -> Node {
    let kubelet = dir.join(name).join("kubelet");
    let state = dir.join(name).join("state");
    std::fs::create_dir_all(&kubelet).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let metrics = Arc::new(Metrics::new());
    let root = Arc::new(KubeletRoot::new(
        AbsPath::parse_field(kubelet.to_str().unwrap(), "kubelet").unwrap(),
    ));
    root.open().unwrap();
    let plugin = NodePlugin::new(NodeDeps {
        source: Arc::new(FakeNvme {
            real: NvmeDevices::new(NoCommands, dir.join("no-sysfs"), NqnPrefix::default()),
            attached: Mutex::default(),
            next,
        }),
        mounter: Arc::new(FakeMounts),
        runner: Arc::new(NoCommands),
        records: Records::open(&state).unwrap(),
        metrics: metrics.clone(),
        root,
    });
    let service = NodeService {
        node_id: name.to_string(),
        max_volumes_per_node: 0,
        plugin: Arc::new(plugin),
        metrics,
    };
    let socket = dir.join(name).join("csi.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let endpoint = format!("unix://{}", socket.display());
    let channel = rds_csi::ctl::connect(&endpoint).await.unwrap();
    Node {
        name: name.to_string(),
        kubelet,
        client: NodeClient::new(channel),
    }
}

// ---------------------------------------------------------------------------------------------
// The controller: the real binary
// ---------------------------------------------------------------------------------------------

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Controller {
    child: Killed,
    channel: Channel,
}

/// CPU seconds (user + system) process `pid` has used, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line; 11 and 12 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

async fn start_controller(
    bin: &str,
    dir: &Path,
    fake: &FakeRds,
    key: &Path,
    host_key: &Path,
    nodes: &[String],
) -> Controller {
    let socket = dir.join("controller.sock");
    let _ = std::fs::remove_file(&socket);
    let log = dir.join("controller.log");
    let child = Command::new(bin)
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args([
            "--mode",
            "controller",
            "--kubernetes",
            "off",
            "--backend",
            "rds",
        ])
        .args(["--node-id", &nodes[0]])
        .args(["--metrics-address", "127.0.0.1:0"])
        .arg("--rds-address")
        .arg(fake.address().to_string())
        .arg("--rds-key-file")
        .arg(key)
        .arg("--rds-host-key")
        .arg(host_key)
        // The storm's commands only: the storage poller's are not the storm's.
        .args(["--storage-poll-interval", "0"])
        .env("RDS_CSI_KNOWN_NODES", nodes[1..].join(","))
        .env("KUBECONFIG", dir.join("no-such-kubeconfig"))
        .env("RDS_CSI_DEBUG_ADDRESS", "")
        .env("RUST_LOG", "warn")
        .env_remove("POD_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("spawn rds-csi");
    let mut child = Killed(child);
    let endpoint = format!("unix://{}", socket.display());
    let started = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!(
                "{bin} exited during start-up ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if let Ok(channel) = rds_csi::ctl::connect(&endpoint).await {
            let probe = IdentityClient::new(channel.clone())
                .probe(ProbeRequest {})
                .await;
            if probe.is_ok_and(|p| p.into_inner().ready == Some(true)) {
                return Controller { child, channel };
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{bin} was not ready within 60 s:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The storm
// ---------------------------------------------------------------------------------------------

fn block_rwx() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// The PV name the external-provisioner gives volume `i`: `pvc-` and the claim's UID.
fn pv_name(i: usize) -> String {
    format!("pvc-{i:08x}-b007-4000-8000-{i:012x}")
}

#[derive(Default)]
struct Steps {
    create: Vec<Duration>,
    publish: Vec<Duration>,
    stage: Vec<Duration>,
    node_publish: Vec<Duration>,
}

struct Sample {
    wall: Duration,
    steps: Steps,
    commands: usize,
    max_per_connection: usize,
    max_total: usize,
    opened: u64,
    refused: u64,
    /// CPU seconds the controller and this process (the fake RDS, the nodes, the sidecars'
    /// stand-ins) used during the storm.
    controller_cpu: f64,
    bench_cpu: f64,
    /// The pool's occupancy, sampled every millisecond from the fake's open sessions (one per
    /// command in flight): the mean share of the pool's sessions in use, and the share of the
    /// samples with every session in use.
    busy: f64,
    full: f64,
    /// When the last CreateVolume answered, from the storm's start: what comes after it is the
    /// pipeline's drain (the last volumes' publish, stage and node publish).
    creates_done: Duration,
}

async fn storm(controller: &Controller, nodes: &[Node], volumes: usize, fake: &FakeRds) -> Sample {
    fake.clear_commands();
    fake.reset_max_concurrency();
    let opened_before = fake.sessions_opened();
    let refused_before = fake.sessions_refused();
    let provisioner = Arc::new(Semaphore::new(PROVISIONER_WORKERS));
    let attacher = Arc::new(Semaphore::new(ATTACHER_WORKERS));
    // Two sidecars, two connections.
    let create_client = ControllerClient::new(controller.channel.clone());
    let pid = controller.child.0.id().to_string();
    let (controller_cpu, bench_cpu) = (cpu_seconds(&pid), cpu_seconds("self"));
    let attach_client = ControllerClient::new(controller.channel.clone());
    let started = Instant::now();
    let tasks: Vec<_> = (0..volumes)
        .map(|i| {
            let (provisioner, attacher) = (provisioner.clone(), attacher.clone());
            let (mut create_client, mut attach_client) =
                (create_client.clone(), attach_client.clone());
            let node = &nodes[i % nodes.len()];
            let (node_name, kubelet, mut node_client) =
                (node.name.clone(), node.kubelet.clone(), node.client.clone());
            tokio::spawn(async move {
                let name = pv_name(i);
                let permit = provisioner.acquire().await.unwrap();
                let at = Instant::now();
                let volume = create_client
                    .create_volume(CreateVolumeRequest {
                        name: name.clone(),
                        capacity_range: Some(CapacityRange {
                            required_bytes: 1 << 30,
                            limit_bytes: 0,
                        }),
                        volume_capabilities: vec![block_rwx()],
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
                    .into_inner()
                    .volume
                    .unwrap();
                let create = at.elapsed();
                let created = Instant::now();
                drop(permit);
                let permit = attacher.acquire().await.unwrap();
                let at = Instant::now();
                let publish_context = attach_client
                    .controller_publish_volume(ControllerPublishVolumeRequest {
                        volume_id: volume.volume_id.clone(),
                        node_id: node_name.clone(),
                        volume_capability: Some(block_rwx()),
                        readonly: false,
                        secrets: Default::default(),
                        volume_context: volume.volume_context.clone(),
                    })
                    .await
                    .unwrap_or_else(|e| panic!("ControllerPublishVolume {name}: {e}"))
                    .into_inner()
                    .publish_context;
                let publish = at.elapsed();
                drop(permit);
                // The kubelet's paths for a CSI block volume: the staging directory it creates,
                // and the per-pod publish path whose parent it creates.
                let csi = kubelet.join("plugins/kubernetes.io/csi/volumeDevices");
                let staging = csi.join("staging").join(&name);
                let target_dir = csi.join("publish").join(&name);
                std::fs::create_dir_all(&staging).unwrap();
                std::fs::create_dir_all(&target_dir).unwrap();
                let target = target_dir.join(format!("pod-{i}"));
                let at = Instant::now();
                node_client
                    .node_stage_volume(NodeStageVolumeRequest {
                        volume_id: volume.volume_id.clone(),
                        publish_context: publish_context.clone(),
                        staging_target_path: staging.display().to_string(),
                        volume_capability: Some(block_rwx()),
                        secrets: Default::default(),
                        volume_context: volume.volume_context.clone(),
                    })
                    .await
                    .unwrap_or_else(|e| panic!("NodeStageVolume {name}: {e}"));
                let stage = at.elapsed();
                let at = Instant::now();
                node_client
                    .node_publish_volume(NodePublishVolumeRequest {
                        volume_id: volume.volume_id.clone(),
                        publish_context,
                        staging_target_path: staging.display().to_string(),
                        target_path: target.display().to_string(),
                        volume_capability: Some(block_rwx()),
                        readonly: false,
                        secrets: Default::default(),
                        volume_context: volume.volume_context,
                    })
                    .await
                    .unwrap_or_else(|e| panic!("NodePublishVolume {name}: {e}"));
                (create, created, publish, stage, at.elapsed())
            })
        })
        .collect();
    let done = AtomicBool::new(false);
    let collect = async {
        let mut steps = Steps::default();
        let mut creates_done = started;
        for t in tasks {
            let (c, created, p, s, n) = t.await.unwrap();
            steps.create.push(c);
            creates_done = creates_done.max(created);
            steps.publish.push(p);
            steps.stage.push(s);
            steps.node_publish.push(n);
        }
        done.store(true, Ordering::SeqCst);
        (steps, creates_done - started)
    };
    let pool = POOL_SIZE * SESSIONS_PER_CONNECTION;
    let occupancy = async {
        let (mut open, mut full, mut samples) = (0usize, 0usize, 0usize);
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while !done.load(Ordering::SeqCst) {
            tick.tick().await;
            let now = fake.open_sessions();
            open += now;
            full += usize::from(now >= pool);
            samples += 1;
        }
        let samples = samples.max(1) as f64;
        (open as f64 / samples / pool as f64, full as f64 / samples)
    };
    let ((steps, creates_done), (busy, full)) = tokio::join!(collect, occupancy);
    let wall = started.elapsed();
    Sample {
        wall,
        steps,
        commands: fake.commands().len(),
        max_per_connection: fake.max_concurrent_sessions_per_connection(),
        max_total: fake.max_concurrent_sessions_total(),
        opened: fake.sessions_opened() - opened_before,
        refused: fake.sessions_refused() - refused_before,
        controller_cpu: cpu_seconds(&pid) - controller_cpu,
        bench_cpu: cpu_seconds("self") - bench_cpu,
        busy,
        full,
        creates_done,
    }
}

/// One run of one build: a fresh storm, then a controller and nodes restarted against the same
/// RDS, and the storm again.
async fn run(bin: &str, volumes: usize, latency: Duration, node_count: usize) -> [Sample; 2] {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = client_keypair(dir.path());
    let mut config = FakeRdsConfig::new(public);
    config.latency = latency;
    config.max_sessions_per_connection = Some(SESSIONS_PER_CONNECTION);
    let fake = FakeRds::start(config).await;
    let host_key = fake.write_host_key(dir.path());
    let names: Vec<String> = (0..node_count).map(|n| format!("node-{n:03}")).collect();
    let mut out = Vec::new();
    for scenario in ["fresh", "restart"] {
        let here = dir.path().join(scenario);
        std::fs::create_dir_all(&here).unwrap();
        let next = Arc::new(AtomicU32::new(1));
        let mut nodes = Vec::new();
        for name in &names {
            nodes.push(start_node(&here, name, next.clone()).await);
        }
        let controller = start_controller(bin, &here, &fake, &key, &host_key, &names).await;
        let sample = storm(&controller, &nodes, volumes, &fake).await;
        assert_eq!(
            fake.disks()
                .iter()
                .filter(|d| d.slot.starts_with("pvc-"))
                .count(),
            volumes,
            "{scenario}: every volume is on the RDS"
        );
        out.push(sample);
    }
    let violations = fake.take_violations();
    assert!(
        violations.is_empty(),
        "the fake refused commands: {violations:?}"
    );
    out.try_into().ok().unwrap()
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let test_mode = std::env::args().any(|a| a == "--test");
    let (volumes, latency_ms, nodes, runs) = if test_mode {
        (50, 2, 5, 1)
    } else {
        (
            env("BOOT_STORM_VOLUMES", 1000) as usize,
            env("BOOT_STORM_LATENCY_MS", 20),
            env("BOOT_STORM_NODES", 50) as usize,
            env("BOOT_STORM_RUNS", 3) as usize,
        )
    };
    let latency = Duration::from_millis(latency_ms);
    let mut builds: Vec<(String, String)> = Vec::new();
    if let Ok(reference) = std::env::var("BOOT_STORM_REFERENCE") {
        builds.push(("reference".into(), reference));
    }
    builds.push(("this tree".into(), BIN.to_string()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "boot_storm: {volumes} volumes over {nodes} nodes, {latency_ms} ms per RouterOS command, \
         pool {POOL_SIZE} x {SESSIONS_PER_CONNECTION} sessions, provisioner {PROVISIONER_WORKERS} / \
         attacher {ATTACHER_WORKERS} workers, kubelet unbounded; {runs} run(s)"
    );
    let mut results: HashMap<(String, &str), Vec<Sample>> = HashMap::new();
    for r in 0..runs {
        for (label, bin) in &builds {
            let [fresh, restart] = rt.block_on(run(bin, volumes, latency, nodes));
            for (scenario, s) in [("fresh", fresh), ("restart", restart)] {
                let go = match scenario {
                    "fresh" => GO_CREATE + GO_PUBLISH,
                    _ => GO_LOOKUP + GO_PUBLISH,
                };
                let bound = latency * (go * volumes) as u32;
                println!(
                    "run {r} {label:>9} {scenario:>7}: wall {:>7.0} ms  create p50/p99 {:.0}/{:.0}  \
                     publish {:.0}/{:.0}  stage {:.1}/{:.1}  node-publish {:.1}/{:.1} ms  \
                     commands {}  sessions/conn {}  sessions {}  opened {}  refused {}  \
                     cpu s controller {:.2} bench {:.2}  pool busy {:.0}% full {:.0}%  \
                     creates done {:.0} ms  serialized {:.0} ms  speed-up {:.2}x",
                    ms(s.wall),
                    ms(percentile(&s.steps.create, 0.5)),
                    ms(percentile(&s.steps.create, 0.99)),
                    ms(percentile(&s.steps.publish, 0.5)),
                    ms(percentile(&s.steps.publish, 0.99)),
                    ms(percentile(&s.steps.stage, 0.5)),
                    ms(percentile(&s.steps.stage, 0.99)),
                    ms(percentile(&s.steps.node_publish, 0.5)),
                    ms(percentile(&s.steps.node_publish, 0.99)),
                    s.commands,
                    s.max_per_connection,
                    s.max_total,
                    s.opened,
                    s.refused,
                    s.controller_cpu,
                    s.bench_cpu,
                    s.busy * 100.0,
                    s.full * 100.0,
                    ms(s.creates_done),
                    ms(bound),
                    bound.as_secs_f64() / s.wall.as_secs_f64(),
                );
                assert!(
                    s.max_per_connection <= SESSIONS_PER_CONNECTION && s.refused == 0,
                    "{label} {scenario}: {} sessions open on one connection, {} refused; \
                     RouterOS allows {SESSIONS_PER_CONNECTION}",
                    s.max_per_connection,
                    s.refused
                );
                results
                    .entry((label.clone(), scenario))
                    .or_default()
                    .push(s);
            }
        }
    }
    println!();
    println!(
        "median of {runs}: build scenario wall_ms create_p50 create_p99 publish_p50 publish_p99 \
         stage_p50 stage_p99 nodepub_p50 nodepub_p99 commands busy% full% creates_done_ms \
         serialized_ms speedup"
    );
    for (label, _) in &builds {
        for scenario in ["fresh", "restart"] {
            let samples = &results[&(label.clone(), scenario)];
            let go = if scenario == "fresh" {
                GO_CREATE + GO_PUBLISH
            } else {
                GO_LOOKUP + GO_PUBLISH
            };
            let bound = ms(latency * (go * volumes) as u32);
            let m = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
            let wall = m(&|s| ms(s.wall));
            println!(
                "{label:>9} {scenario:>7} {wall:>8.0} {:>6.0} {:>6.0} {:>6.0} {:>6.0} {:>6.1} {:>6.1} \
                 {:>6.1} {:>6.1} {:>6.0} {:>5.0} {:>5.0} {:>6.0} {bound:>8.0} {:>6.2}x",
                m(&|s| ms(percentile(&s.steps.create, 0.5))),
                m(&|s| ms(percentile(&s.steps.create, 0.99))),
                m(&|s| ms(percentile(&s.steps.publish, 0.5))),
                m(&|s| ms(percentile(&s.steps.publish, 0.99))),
                m(&|s| ms(percentile(&s.steps.stage, 0.5))),
                m(&|s| ms(percentile(&s.steps.stage, 0.99))),
                m(&|s| ms(percentile(&s.steps.node_publish, 0.5))),
                m(&|s| ms(percentile(&s.steps.node_publish, 0.99))),
                m(&|s| s.commands as f64),
                m(&|s| s.busy * 100.0),
                m(&|s| s.full * 100.0),
                m(&|s| ms(s.creates_done)),
                bound / wall,
            );
        }
    }
}
