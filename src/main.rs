//! The `rds-csi` binary: parses flags, wires the driver together and runs it until SIGINT or
//! SIGTERM. `rds-csi ctl ...` is a small CSI client for humans.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};

use rds_csi::actors::messages::{Dismiss, Seed};
use rds_csi::actors::supervisor::Supervisor;
use rds_csi::actors::{NodeLimit, Router, VolumeDeps, MAILBOX_TIMEOUT};
use rds_csi::backend::file::FileBackend;
use rds_csi::backend::rds::ssh::{HostKeys, SshConfig, SshPool};
use rds_csi::backend::rds::values::{
    NqnPrefix, RosPath, DEFAULT_NQN_PREFIX, DEFAULT_NVME_PORT, DEFAULT_VOLUME_PATH,
};
use rds_csi::backend::rds::{RdsBackend, RdsDefaults};
use rds_csi::backend::VolumeBackend;
use rds_csi::domain::{DEFAULT_MIGRATION_TIMEOUT, MIGRATION_TIMEOUT_KEY};
use rds_csi::grpc::controller::ControllerService;
use rds_csi::grpc::identity::IdentityService;
use rds_csi::grpc::node::NodeService;
use rds_csi::grpc::server::{self, Services};
use rds_csi::http::HttpState;
use rds_csi::ids::NodeIdRules;
use rds_csi::kube::cluster::{self as kube_cluster, InClusterSigns, KubeCluster, KubernetesMode};
use rds_csi::kube::lease::{self, KubeLease};
use rds_csi::kube::sink::KubeSink;
use rds_csi::kube::{AttachmentAuthority, ClusterSink, NodeDirectory, Standalone};
use rds_csi::metrics::Metrics;
use rds_csi::node::command::SystemRunner;
use rds_csi::node::confine::{KubeletRoot, DEFAULT_KUBELET_DIR};
use rds_csi::node::device::{DeviceSource, LoopDevices};
use rds_csi::node::freeze::Freezer;
use rds_csi::node::mounter::SystemMounter;
use rds_csi::node::nvme::{read_host_nqn, NvmeDevices};
use rds_csi::node::paths::AbsPath;
use rds_csi::node::plugin::NodeDeps;
use rds_csi::node::reconciler::NodeReconciler;
use rds_csi::node::records::Records;
use rds_csi::node::NodePlugin;
use rds_csi::reconcile::orphan::{self, OrphanConfig, OrphanVolumes};
use rds_csi::reconcile::stale::StaleAttachments;
use rds_csi::role::{self, Role, Takeover, Term};
use rds_csi::telemetry::{self, LogFormat};
use rds_csi::{ctl, NodeId, DEFAULT_DRIVER_NAME};

#[derive(Parser)]
#[command(
    name = "rds-csi",
    version,
    about = "CSI driver for KubeVirt VMs on MikroTik ROSE Data Server NVMe/TCP volumes"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

#[derive(Subcommand)]
enum Command {
    /// Talk to a running driver over its CSI socket.
    Ctl(ctl::CtlArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Controller,
    Node,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// Sparse files under --file-root, attached as loop devices on the node.
    File,
    /// A MikroTik ROSE Data Server over SSH, attached over NVMe/TCP on the node.
    Rds,
}

#[derive(Parser)]
struct Args {
    /// CSI endpoint to listen on.
    #[arg(long, env = "RDS_CSI_ENDPOINT", default_value = "unix://./csi.sock")]
    endpoint: String,
    /// This node's id [default: the hostname].
    #[arg(long, env = "RDS_CSI_NODE_ID")]
    node_id: Option<String>,
    /// Extra node ids known in standalone mode (repeatable; comma-separated in the env var).
    #[arg(
        long = "known-node",
        env = "RDS_CSI_KNOWN_NODES",
        value_delimiter = ','
    )]
    known_nodes: Vec<String>,
    /// CSI driver name.
    #[arg(long, env = "RDS_CSI_DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME)]
    driver_name: String,
    /// Which CSI services to run.
    #[arg(long, env = "RDS_CSI_MODE", value_enum, default_value = "all")]
    mode: Mode,
    /// Where volumes live.
    #[arg(long, env = "RDS_CSI_BACKEND", value_enum, default_value = "file")]
    backend: BackendKind,
    /// Directory of the file backend.
    #[arg(long, env = "RDS_CSI_FILE_ROOT", default_value = "./volumes")]
    file_root: PathBuf,
    /// How long a detached volume keeps its grace record (e.g. 30s, 2m).
    #[arg(long, env = "RDS_CSI_ATTACHMENT_GRACE_PERIOD", default_value = "30s", value_parser = humantime::parse_duration)]
    attachment_grace_period: Duration,
    /// Address for /metrics, /healthz and /readyz; empty disables it.
    #[arg(
        long,
        env = "RDS_CSI_METRICS_ADDRESS",
        default_value = "127.0.0.1:9809"
    )]
    metrics_address: String,
    /// Address for /debug/attachments (a controller's attachment state, nodes and volumes by
    /// name); empty disables it. Loopback by default: reach it with `kubectl port-forward`.
    #[arg(long, env = "RDS_CSI_DEBUG_ADDRESS", default_value = "127.0.0.1:9811")]
    debug_address: String,
    /// Use the Kubernetes API: auto (when a config is found; an error when none is but this runs
    /// in a pod), on, or off (standalone).
    #[arg(long, env = "RDS_CSI_KUBERNETES", value_enum, default_value = "auto")]
    kubernetes: KubernetesMode,
    /// Where a pod's service account is mounted; its presence is a sign of running in a cluster
    /// for `--kubernetes auto`. Tests point it elsewhere.
    #[arg(long, env = "RDS_CSI_SERVICE_ACCOUNT_DIR", default_value = kube_cluster::SERVICE_ACCOUNT_DIR, hide = true)]
    service_account_dir: PathBuf,
    /// Log format.
    #[arg(long, env = "RDS_CSI_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// On SIGTERM, how long in-flight RPCs may take to finish.
    #[arg(long, env = "RDS_CSI_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,
    /// Where the node plugin keeps its records of staged volumes (survives restarts).
    #[arg(long, env = "RDS_CSI_NODE_STATE_DIR", default_value = "./node-state")]
    node_state_dir: PathBuf,
    /// The kubelet's root directory: every staging path and target must lie beneath it, and no
    /// symlink beneath it is followed. A run without a kubelet (standalone, `ctl`, csi-sanity)
    /// names the directory its staging paths and targets live in.
    #[arg(long, env = "RDS_CSI_KUBELET_DIR", default_value = DEFAULT_KUBELET_DIR)]
    kubelet_dir: PathBuf,
    /// How often the node plugin of the RDS backend checks its staged volumes against the
    /// kernel (stale mounts recovered, orphaned NVMe/TCP connections disconnected); 0 checks
    /// only at start.
    #[arg(long, env = "RDS_CSI_NODE_RECONCILE_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    node_reconcile_interval: Duration,
    /// The node's NVMe host NQN file (the RDS node plugin refuses to start without it). Tests
    /// point it elsewhere.
    #[arg(long, env = "RDS_CSI_NVME_HOST_NQN_FILE", default_value = rds_csi::node::nvme::HOST_NQN_FILE, hide = true)]
    nvme_host_nqn_file: PathBuf,
    /// Volumes one node may hold (NodeGetInfo's max_volumes_per_node; 0 = unlimited).
    #[arg(long, env = "RDS_CSI_MAX_VOLUMES_PER_NODE", default_value_t = 0)]
    max_volumes_per_node: u64,
    /// Blocking jobs (mounts, unmounts, sysfs and device reads) the node plugin runs at once. A
    /// job stuck in the kernel keeps its slot until it returns, so stuck jobs never exceed this.
    #[arg(long, env = "RDS_CSI_NODE_BLOCKING_JOBS", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    node_blocking_jobs: u64,
    /// How long one blocking job of the node plugin may run, or wait for a slot, before its call
    /// fails; one that runs on is counted in rds_csi_node_blocking_stuck until it returns.
    #[arg(long, env = "RDS_CSI_NODE_BLOCKING_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    node_blocking_timeout: Duration,
    /// The RDS to drive (--backend rds): HOST[:PORT], port 22 by default.
    #[arg(long, env = "RDS_CSI_RDS_ADDRESS")]
    rds_address: Option<String>,
    /// SSH user on the RDS.
    #[arg(long, env = "RDS_CSI_RDS_USER", default_value = "admin")]
    rds_user: String,
    /// OpenSSH private key (unencrypted) for the RDS.
    #[arg(long, env = "RDS_CSI_RDS_KEY_FILE")]
    rds_key_file: Option<PathBuf>,
    /// The RDS's host key: a file of public key lines, or a known_hosts file.
    #[arg(long, env = "RDS_CSI_RDS_HOST_KEY")]
    rds_host_key: Option<PathBuf>,
    /// Accept any RDS host key (testing only: logged as a warning and shown in a metric).
    #[arg(long, env = "RDS_CSI_RDS_INSECURE_SKIP_VERIFY")]
    rds_insecure_skip_verify: bool,
    /// The address nodes dial over NVMe/TCP when a StorageClass names no nvmeAddress
    /// [default: --rds-address's host, when it is an IP address].
    #[arg(long, env = "RDS_CSI_RDS_NVME_ADDRESS")]
    rds_nvme_address: Option<std::net::IpAddr>,
    /// NVMe/TCP port for new volumes when a StorageClass names no nvmePort.
    #[arg(long, env = "RDS_CSI_RDS_NVME_PORT", default_value_t = DEFAULT_NVME_PORT)]
    rds_nvme_port: u16,
    /// Directory on the RDS for volume images when a StorageClass names no volumePath.
    #[arg(long, env = "RDS_CSI_RDS_VOLUME_PATH", default_value = DEFAULT_VOLUME_PATH)]
    rds_volume_path: String,
    /// NQN prefix of this driver's volumes: new volumes get `<prefix>:<id>`, and nodes connect
    /// and disconnect only NQNs under it.
    #[arg(long, env = "RDS_CSI_RDS_NQN_PREFIX", default_value = DEFAULT_NQN_PREFIX)]
    rds_nqn_prefix: String,
    /// SSH connections to the RDS.
    #[arg(long, env = "RDS_CSI_RDS_POOL_SIZE", default_value_t = 4)]
    rds_pool_size: usize,
    /// Commands one SSH connection carries at once (RouterOS opens its sessions one by one).
    #[arg(long, env = "RDS_CSI_RDS_SESSIONS_PER_CONNECTION", default_value_t = 2)]
    rds_sessions_per_connection: usize,
    /// How long one RouterOS command may take, connecting included.
    #[arg(long, env = "RDS_CSI_RDS_COMMAND_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    rds_command_timeout: Duration,
    /// How often the controller reads the RDS's storage metrics (rds_disk_*, and rds_hardware_*
    /// with --snmp-address) in the background; 0 turns the poller off. RDS backend only.
    #[arg(long, env = "RDS_CSI_STORAGE_POLL_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    storage_poll_interval: Duration,
    /// How long one storage poll may take before it counts as failed.
    #[arg(long, env = "RDS_CSI_STORAGE_POLL_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    storage_poll_timeout: Duration,
    /// SNMP agent of the RDS (`HOST[:PORT]`, port 161 by default) for the rds_hardware_*
    /// gauges; without it SNMP is off.
    #[arg(long, env = "RDS_CSI_SNMP_ADDRESS")]
    snmp_address: Option<String>,
    /// SNMPv2c community of that agent (the chart reads it from its Secret's `snmp-community`).
    #[arg(
        long,
        env = "RDS_CSI_SNMP_COMMUNITY",
        default_value = "public",
        hide_default_value = true,
        hide_env_values = true
    )]
    snmp_community: String,
    /// Arbiter threads [default: one per core]: each serves a share of the CSI connections,
    /// each connection on one, and runs the volume actors its connections start. 0 runs
    /// everything (the gRPC server, the supervisor and every volume actor) on one thread.
    #[arg(long, env = "RDS_CSI_ARBITERS")]
    arbiters: Option<usize>,
    /// Follow the csi-attacher's leader Lease (never written): serve ControllerPublish/Unpublish
    /// only while it names this pod and has not expired, as a standby otherwise; each takeover
    /// re-seeds from VolumeAttachments first. Kubernetes mode only.
    #[arg(long, env = "RDS_CSI_LEADER_ELECTION")]
    leader_election: bool,
    /// Namespace of that Lease [default: POD_NAMESPACE, then the pod's service-account namespace].
    #[arg(long, env = "RDS_CSI_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of that Lease [default: external-attacher-leader-<driver name, every character
    /// outside A-Z a-z 0-9 - replaced by ->, as csi-lib-utils names it].
    #[arg(long, env = "RDS_CSI_LEADER_ELECTION_LEASE")]
    leader_election_lease: Option<String>,
    /// The Lease holder that means this pod [default: the hostname, i.e. the pod name, which
    /// the csi-attacher in the same pod uses].
    #[arg(long, env = "RDS_CSI_LEADER_ELECTION_IDENTITY")]
    leader_election_identity: Option<String>,
    /// How often the active controller checks, live, that every node holding a volume still has
    /// its Node object (deletions the Node watch reports are checked at once).
    #[arg(long, env = "RDS_CSI_STALE_ATTACHMENT_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    stale_attachment_interval: Duration,
    /// How often the active controller looks for backend volumes no PersistentVolume names.
    #[arg(long, env = "RDS_CSI_ORPHAN_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    orphan_interval: Duration,
    /// How long a volume must have had no PersistentVolume, counted from when this process first
    /// saw it so, before it is reported as an orphan (and deleted, with --orphan-delete).
    #[arg(long, env = "RDS_CSI_ORPHAN_GRACE", default_value = "24h", value_parser = humantime::parse_duration)]
    orphan_grace: Duration,
    /// Delete orphan volumes past their grace (after a live PV list, through the volume's actor).
    /// Without it orphans are only reported.
    #[arg(long, env = "RDS_CSI_ORPHAN_DELETE")]
    orphan_delete: bool,
    /// The shortest --orphan-grace that --orphan-delete accepts [default: 1h]. A test seam (the
    /// end-to-end tests watch a deletion in seconds); lowering it is logged as a warning.
    #[arg(long, env = "RDS_CSI_ORPHAN_GRACE_MINIMUM", value_parser = humantime::parse_duration, hide = true)]
    orphan_grace_minimum: Option<Duration>,
}

/// jemalloc, not the system allocator: on the attach path glibc's malloc and free were about an
/// eighth of the driver's CPU per RPC (perf, BENCHMARKS.md "Issue 25"), and jemalloc's per-thread
/// caches take most of that off while keeping boot seeding's peak memory within a few MiB.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Ctl(args)) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let code = rt.block_on(ctl::run(args));
            std::process::exit(code);
        }
        None => run(cli.args),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let Args {
        endpoint,
        node_id,
        known_nodes,
        driver_name,
        mode,
        backend,
        file_root,
        attachment_grace_period,
        metrics_address,
        debug_address,
        kubernetes,
        service_account_dir,
        log_format,
        shutdown_timeout,
        arbiters,
        node_state_dir,
        kubelet_dir,
        node_reconcile_interval,
        nvme_host_nqn_file,
        max_volumes_per_node,
        node_blocking_jobs,
        node_blocking_timeout,
        rds_address,
        rds_user,
        rds_key_file,
        rds_host_key,
        rds_insecure_skip_verify,
        rds_nvme_address,
        rds_nvme_port,
        rds_volume_path,
        rds_nqn_prefix,
        rds_pool_size,
        rds_sessions_per_connection,
        rds_command_timeout,
        storage_poll_interval,
        storage_poll_timeout,
        snmp_address,
        snmp_community,
        leader_election,
        leader_election_namespace,
        leader_election_lease,
        leader_election_identity,
        stale_attachment_interval,
        orphan_interval,
        orphan_grace,
        orphan_delete,
        orphan_grace_minimum,
    } = args;
    let rds = RdsArgs {
        address: rds_address,
        user: rds_user,
        key_file: rds_key_file,
        host_key: rds_host_key,
        insecure: rds_insecure_skip_verify,
        nvme_address: rds_nvme_address,
        nvme_port: rds_nvme_port,
        volume_path: rds_volume_path,
        nqn_prefix: rds_nqn_prefix,
        pool_size: rds_pool_size,
        sessions_per_connection: rds_sessions_per_connection,
        command_timeout: rds_command_timeout,
    };
    let storage_poll = StoragePollArgs {
        interval: storage_poll_interval,
        timeout: storage_poll_timeout,
        snmp_address,
        snmp_community,
    };
    // Dropped when `run` returns, after everything else has logged: that writes out the queue.
    let _log = telemetry::init(log_format);

    let node_id = match node_id {
        Some(id) => id,
        None => gethostname::gethostname()
            .into_string()
            .map_err(|h| anyhow::anyhow!("hostname {h:?} is not UTF-8; pass --node-id"))?,
    };
    let node_id = NodeId::try_from(node_id.as_str()).context("--node-id")?;
    let known: Vec<NodeId> = std::iter::once(Ok(node_id.clone()))
        .chain(
            known_nodes
                .iter()
                .filter(|n| !n.is_empty())
                .map(|n| NodeId::try_from(n.as_str())),
        )
        .collect::<Result<_, _>>()
        .context("--known-node")?;
    if driver_name.is_empty() {
        bail!("--driver-name must not be empty");
    }
    for (flag, period) in [
        ("--stale-attachment-interval", stale_attachment_interval),
        ("--orphan-interval", orphan_interval),
    ] {
        if period.is_zero() {
            bail!("{flag} must be longer than zero");
        }
    }
    let minimum = orphan_grace_minimum.unwrap_or(orphan::MIN_DELETE_GRACE);
    if minimum < orphan::MIN_DELETE_GRACE {
        tracing::warn!(minimum = %humantime::format_duration(minimum),
            "--orphan-grace-minimum is lowered: --orphan-delete may delete a volume whose PersistentVolume is still being written");
    }
    if orphan_delete && orphan_grace < minimum {
        bail!(
            "--orphan-grace {} is too short for --orphan-delete: the minimum is {} (a volume's \
             PersistentVolume is written after CreateVolume answers, with retries; a shorter \
             grace could delete it first)",
            humantime::format_duration(orphan_grace),
            humantime::format_duration(minimum)
        );
    }
    let reconcilers = ReconcilerFlags {
        stale_interval: stale_attachment_interval,
        orphan: OrphanConfig {
            interval: orphan_interval,
            grace: orphan_grace,
            delete: orphan_delete,
        },
    };
    let socket = server::parse_endpoint(&endpoint)?;
    let arbiter_count =
        arbiters.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));

    let started = std::time::Instant::now();
    let system = actix_rt::System::with_tokio_rt(move || {
        let mut runtime = match arbiter_count {
            0 => tokio::runtime::Builder::new_current_thread(),
            _ => tokio::runtime::Builder::new_multi_thread(),
        };
        runtime.enable_all().build().expect("tokio runtime")
    });
    system.block_on(async move {
        let metrics = Arc::new(Metrics::new());
        let ready = Arc::new(AtomicBool::new(false));
        let controller = matches!(mode, Mode::Controller | Mode::All);
        // The node plugin makes no API call: `auto` looks for no cluster it would not use.
        let kubernetes = match kubernetes {
            KubernetesMode::Auto if !controller => KubernetesMode::Off,
            other => other,
        };
        let signs = InClusterSigns::detect(&service_account_dir);
        let client = kube_cluster::connect(kubernetes, &signs).await.context("--kubernetes")?;
        let node_ids = match client {
            Some(_) => NodeIdRules::Kubernetes,
            None => NodeIdRules::Standalone,
        };
        // Where the csi-attacher's Lease is and whom it names for this pod: followed with
        // --leader-election; without it, watched in Kubernetes mode for an election among
        // several replicas (rds_csi::role::serve_unelected).
        let lease_flags = || -> anyhow::Result<LeaderFlags> {
            let pod_namespace = std::env::var("POD_NAMESPACE").ok();
            let namespace = lease::resolve_namespace(
                leader_election_namespace.as_deref(),
                pod_namespace.as_deref(),
                &service_account_dir,
            )?;
            let identity = match &leader_election_identity {
                Some(id) if !id.is_empty() => id.clone(),
                Some(_) => bail!("--leader-election-identity must not be empty"),
                None => gethostname::gethostname().into_string().map_err(|h| {
                    anyhow::anyhow!("hostname {h:?} is not UTF-8; pass --leader-election-identity")
                })?,
            };
            let name = leader_election_lease.clone().unwrap_or_else(|| lease::lease_name(&driver_name));
            Ok(LeaderFlags { namespace, name, identity: lease::HolderIdentity::of(&identity) })
        };
        let (leader, unelected) = match (leader_election, &client) {
            (false, Some(_)) if controller => match lease_flags() {
                Ok(flags) => (None, Some(flags)),
                Err(e) => {
                    tracing::warn!(error = %e, "without --leader-election, the csi-attacher's Lease cannot be watched: run one controller replica only");
                    (None, None)
                }
            },
            (false, _) => (None, None),
            (true, _) if !controller => bail!("--leader-election is for the controller (--mode controller or all)"),
            (true, None) => bail!("--leader-election needs Kubernetes mode (--kubernetes on, or auto with a cluster): it follows the csi-attacher's Lease"),
            (true, Some(_)) => (Some(lease_flags()?), None),
        };
        match &client {
            Some(_) => tracing::info!(driver = %driver_name, node_id = %node_id, mode = ?mode,
                "Kubernetes mode: attachment state is rebuilt from VolumeAttachments before serving"),
            None => tracing::info!(driver = %driver_name, node_id = %node_id, mode = ?mode, known_nodes = known.len(),
                "standalone: no Kubernetes cluster; known nodes come from --node-id and --known-node, no seeding, annotations or events"),
        }

        let mut arbiter_threads = Vec::new();
        let mut supervisor_addr = None;
        let mut storage: Option<Arc<dyn VolumeBackend>> = None;
        // The file backend, for the node plugin of this process to freeze what it copies.
        let mut files: Option<Arc<FileBackend>> = None;
        let controller_service = if controller {
            let backend: Arc<dyn VolumeBackend> = match backend {
                BackendKind::File => {
                    let opened = Arc::new(
                        FileBackend::open(&file_root).with_context(|| format!("--file-root {}", file_root.display()))?,
                    );
                    files = Some(opened.clone());
                    opened
                }
                BackendKind::Rds => {
                    let rds_backend = rds_backend(&rds, metrics.clone())?;
                    start_storage_poller(&rds_backend, &rds, &storage_poll, &metrics)?;
                    Arc::new(rds_backend)
                }
            };
            storage = Some(backend.clone());
            let (nodes, authority, sink, cluster): Adapters = match &client {
                    Some(client) => {
                        // Without leader election the first term begins with the process, so
                        // its seeding can use the VolumeAttachment watcher's first list.
                        let cluster = match (&leader, controller) {
                            (None, true) => KubeCluster::start_with_boot_list(client.clone(), driver_name.clone()),
                            _ => KubeCluster::start(client.clone(), driver_name.clone()),
                        };
                        let sink = KubeSink::start(cluster.clone(), metrics.clone());
                        (cluster.clone(), cluster.clone(), sink, Some(cluster))
                    }
                    None => {
                        let standalone = Arc::new(Standalone::new(known));
                        (standalone.clone(), standalone.clone(), standalone, None)
                    }
                };
            let deps = Arc::new(VolumeDeps {
                backend: backend.clone(),
                nodes,
                authority,
                sink,
                metrics: metrics.clone(),
                grace_period: attachment_grace_period,
                node_limit: NodeLimit::new(max_volumes_per_node),
            });
            arbiter_threads = (0..arbiter_count).map(|_| Arbiter::new()).collect();
            let handles = arbiter_threads.iter().map(|a| a.handle()).collect();
            let supervisor = Supervisor::new(deps, handles).start();
            supervisor_addr = Some(supervisor.clone());
            let role = Role::new(ready.clone(), metrics.clone());
            match (&cluster, &client) {
                (Some(cluster), Some(client)) => {
                    let takeover: Arc<dyn Takeover> = Arc::new(Attachments {
                        cluster: cluster.clone(),
                        supervisor: supervisor.clone(),
                        metrics: metrics.clone(),
                        backend: backend.clone(),
                        reconcilers,
                    });
                    match &leader {
                        None => {
                            let watch = unelected.as_ref().map(|flags| {
                                tracing::info!(namespace = %flags.namespace, lease = %flags.name, identity = %flags.identity,
                                    "no leader election: serving ControllerPublish/Unpublish as the only controller; if the csi-attacher's Lease shows another pod holding it, they stop until a restart with --leader-election");
                                role::Unelected {
                                    lease: KubeLease::start(client.clone(), &flags.namespace, &flags.name),
                                    identity: flags.identity.clone(),
                                }
                            });
                            tokio::spawn(role::serve_unelected(role.clone(), takeover, started, watch));
                        }
                        Some(leader) => {
                            tracing::info!(namespace = %leader.namespace, lease = %leader.name, identity = %leader.identity,
                                "leader election: following the csi-attacher's Lease; ControllerPublish/Unpublish are served only while it names this pod");
                            let lease = KubeLease::start(client.clone(), &leader.namespace, &leader.name);
                            tokio::spawn(role::follow(role.clone(), lease, takeover, leader.identity.clone(), role::system_clock()));
                        }
                    }
                    role.decide_standby_deletes_by(cluster.clone());
                }
                _ => role.serve_standalone(started),
            }
            tracing::info!(backend = backend.kind(), arbiters = arbiter_count, "controller started");
            Some(ControllerService {
                router: Router::new(supervisor, MAILBOX_TIMEOUT),
                backend,
                role,
                metrics: metrics.clone(),
                node_ids,
            })
        } else {
            None
        };
        if !controller {
            // A node plugin has no attachment state to rebuild.
            ready.store(true, std::sync::atomic::Ordering::Release);
        }

        let node_service = match mode {
            Mode::Node | Mode::All => {
                rds_csi::node::work::configure(node_blocking_jobs as usize, node_blocking_timeout);
                let (plugin, reconciler) = node_plugin(backend, &file_root, &rds.nqn_prefix, &nvme_host_nqn_file, &node_state_dir, &kubelet_dir, metrics.clone())?;
                let adopted = plugin.survey().await.context("surveying staged volumes")?;
                tracing::info!(state_dir = %node_state_dir.display(), staged = adopted, max_volumes_per_node, "node plugin started");
                let plugin = Arc::new(plugin);
                if let Some(files) = &files {
                    files.quiesce_with(Arc::new(Freezer::new(plugin.clone(), metrics.snapshot_freezes.clone())));
                    tracing::info!("snapshots and clones of volumes staged here freeze their filesystem for a copy without reflinks");
                }
                if let Some(reconciler) = reconciler {
                    tracing::info!(interval = %humantime::format_duration(node_reconcile_interval), "node reconciler: a pass now, then periodically");
                    tokio::spawn(reconciler.run(node_reconcile_interval));
                }
                Some(NodeService {
                    node_id: node_id.to_string(),
                    max_volumes_per_node,
                    plugin,
                    metrics: metrics.clone(),
                })
            }
            Mode::Controller => None,
        };

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        if !metrics_address.is_empty() {
            let listener = tokio::net::TcpListener::bind(&metrics_address)
                .await
                .with_context(|| format!("--metrics-address {metrics_address}"))?;
            tracing::info!(address = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
            let state = HttpState { metrics: metrics.clone(), ready: ready.clone(), backend: storage.clone() };
            let stop = stopped(stop_rx.clone());
            tokio::spawn(async move {
                if let Err(e) = rds_csi::http::serve(listener, state, stop).await {
                    tracing::error!(error = %e, "metrics server failed");
                }
            });
        }

        // The debug view needs attachment state: a node plugin has none to show.
        if let (Some(supervisor), false) = (supervisor_addr, debug_address.is_empty()) {
            let listener = tokio::net::TcpListener::bind(&debug_address)
                .await
                .with_context(|| format!("--debug-address {debug_address}"))?;
            tracing::info!(address = %listener.local_addr()?, "serving /debug/attachments");
            let stop = stopped(stop_rx.clone());
            tokio::spawn(async move {
                if let Err(e) = rds_csi::http::serve_debug(listener, supervisor, stop).await {
                    tracing::error!(error = %e, "debug server failed");
                }
            });
        }

        let listener = server::bind(&socket).await?;
        tracing::info!(endpoint = %socket.display(), "serving CSI");
        let services = Services {
            metrics: metrics.clone(),
            identity: IdentityService { driver_name: driver_name.clone(), controller, ready: ready.clone(), backend: storage },
            controller: controller_service,
            node: node_service,
        };
        let serving_arbiters: Vec<_> = arbiter_threads.iter().map(|a| a.handle()).collect();
        server::serve(listener, &socket, services, stopped(stop_rx), shutdown_timeout, &serving_arbiters).await?;
        tracing::info!("shut down cleanly");
        for arbiter in arbiter_threads {
            arbiter.stop();
        }
        System::current().stop();
        Ok(())
    })
}

/// Seeding's retries of a live PV lookup: 500 ms doubling to 30 s.
const SEED_BACKOFF_START: Duration = Duration::from_millis(500);
const SEED_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Rebuilds attachment state from VolumeAttachments, and returns once the Node projection has
/// synced too (so no Publish needs a live Node GET to know a node). The role serves only after
/// it returns: until then Probe says not ready and Controller RPCs answer UNAVAILABLE. Runs at
/// boot, and again at every takeover, into a supervisor that was just dismissed.
async fn seed(cluster: &KubeCluster, supervisor: &Addr<Supervisor>, metrics: &Metrics, term: Term) {
    let retried = |step: &str| metrics.seeding_retries.with_label_values(&[step]).inc();
    // The term that begins with the process takes the VolumeAttachment watcher's first list
    // instead of reading every VolumeAttachment a second time; any other lists afresh. Either
    // is read while the PV projection fills: nothing is decided from either until both are
    // complete.
    let listed = async {
        match cluster.boot_attachments().await {
            Some((vas, failures)) => {
                for _ in 0..failures {
                    retried("volumeattachment_list");
                }
                vas
            }
            None => {
                cluster
                    .list_attachments(|_| retried("volumeattachment_list"))
                    .await
            }
        }
    };
    let (vas, ()) = tokio::join!(listed, cluster.pvs_ready());
    let seen = vas.len();
    metrics.seeding_seen.inc_by(seen as u64);
    // Rules, "Boot seeding" 1: a PV the projection misses is looked up live before anything is
    // decided; until every lookup answers (found, or 404) the driver stays not ready.
    // Rules, "Boot seeding" 3: ages are measured against the API server's clock, read after
    // the list so no VolumeAttachment in it is younger than that now.
    let mut backoff = SEED_BACKOFF_START;
    let (looked_up, server_now) = loop {
        let read = async {
            let found = cluster
                .look_up_unknown_pvs(&vas)
                .await
                .map_err(|e| ("pv_lookup", e))?;
            let now = cluster.server_now().await.map_err(|e| ("server_time", e))?;
            Ok::<_, (&str, rds_csi::kube::KubeError)>((found, now))
        };
        match read.await {
            Ok(done) => break done,
            Err((step, e)) => {
                retried(step);
                tracing::warn!(error = %e, step, retry_in = ?backoff, "a read seeding needs failed; staying not ready and retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(SEED_BACKOFF_MAX);
            }
        }
    };
    let plan = cluster.plan_seed(&vas, &looked_up, server_now);
    drop(looked_up);
    // The VolumeAttachment views are not needed past the plan; free them before the actors'
    // state is built, so the two never peak together.
    drop(vas);
    for (va, reason) in &plan.skipped {
        metrics
            .seeding_skipped
            .with_label_values(&[reason.label()])
            .inc();
        tracing::warn!(volume_attachment = %va, reason = reason.label(), "VolumeAttachment skipped while seeding");
    }
    for (pv, raw) in &plan.unparsable_timeouts {
        tracing::warn!(pv = %pv, value = ?raw, "unparsable {MIGRATION_TIMEOUT_KEY} on the PV; seeding takes the default ({DEFAULT_MIGRATION_TIMEOUT:?}) for its volume");
    }
    let holders: usize = plan.volumes.iter().map(|v| v.holders.len()).sum();
    let skipped = plan.skipped.len();
    let volumes = match supervisor
        .send(Seed {
            term,
            volumes: plan.volumes,
        })
        .await
    {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "the supervisor stopped while seeding");
            return std::future::pending().await;
        }
    };
    if !cluster.nodes_synced() {
        tracing::info!("attachment state rebuilt; waiting for the first complete Node list before becoming ready");
    }
    cluster.nodes_ready().await;
    tracing::info!(
        volume_attachments = seen,
        volumes,
        attachments = holders,
        skipped,
        "attachment state rebuilt from VolumeAttachments"
    );
}

/// `--leader-election*`, resolved.
struct LeaderFlags {
    namespace: String,
    name: String,
    /// As the csi-attacher writes it into the Lease (sanitized).
    identity: lease::HolderIdentity,
}

/// The reconcilers' flags.
#[derive(Clone, Copy)]
struct ReconcilerFlags {
    stale_interval: Duration,
    orphan: OrphanConfig,
}

/// What a term's beginning and end do, with a cluster: the supervisor's state dropped or
/// rebuilt from VolumeAttachments, and the reconcilers of the term.
struct Attachments {
    cluster: Arc<KubeCluster>,
    supervisor: Addr<Supervisor>,
    metrics: Arc<Metrics>,
    backend: Arc<dyn VolumeBackend>,
    reconcilers: ReconcilerFlags,
}

#[async_trait::async_trait]
impl Takeover for Attachments {
    async fn dismiss(&self) {
        match self.supervisor.send(Dismiss).await {
            Ok(volumes) => tracing::info!(volumes, "attachment state dropped"),
            Err(e) => {
                tracing::error!(error = %e, "the supervisor stopped while dropping attachment state")
            }
        }
    }

    async fn seed(&self, term: Term) {
        seed(&self.cluster, &self.supervisor, &self.metrics, term).await;
    }

    fn start_reconcilers(&self, term: Term) -> Vec<tokio::task::JoinHandle<()>> {
        let stale = StaleAttachments {
            supervisor: self.supervisor.clone(),
            nodes: self.cluster.clone(),
            metrics: self.metrics.clone(),
        };
        let orphans = OrphanVolumes {
            backend: self.backend.clone(),
            pvs: self.cluster.clone(),
            router: Router::new(self.supervisor.clone(), MAILBOX_TIMEOUT),
            term,
            metrics: self.metrics.clone(),
            config: self.reconcilers.orphan,
        };
        vec![
            tokio::spawn(stale.run(
                self.reconcilers.stale_interval,
                self.cluster.node_deletions(),
            )),
            tokio::spawn(orphans.run()),
        ]
    }
}

/// The node plugin on the real seams: loop devices for the file backend's images, NVMe/TCP
/// for the RDS's, the kernel's mounts, external tools on `PATH`. For the RDS backend, also its
/// reconciler, on the same seams and the plugin's volume locks; and the host NQN is required.
fn node_plugin(
    backend: BackendKind,
    file_root: &std::path::Path,
    nqn_prefix: &str,
    host_nqn_file: &std::path::Path,
    state_dir: &std::path::Path,
    kubelet_dir: &std::path::Path,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(NodePlugin, Option<NodeReconciler<SystemRunner>>)> {
    let root = std::path::absolute(kubelet_dir)
        .map_err(anyhow::Error::from)
        .and_then(|p| AbsPath::try_from(p).map_err(|e| anyhow::anyhow!("{e}")))
        .with_context(|| format!("--kubelet-dir {}", kubelet_dir.display()))?;
    let root = Arc::new(KubeletRoot::new(root));
    match root.open() {
        Ok(()) => {
            tracing::info!(kubelet_dir = %root.path(), "staging paths and targets are confined beneath the kubelet directory")
        }
        Err(e) => {
            tracing::warn!(error = %e, "the kubelet directory cannot be opened; node calls fail until it can")
        }
    }
    let mounter = Arc::new(SystemMounter::new(root.clone()));
    let records = || Records::open(state_dir).context("--node-state-dir");
    let (source, nvme): (Arc<dyn DeviceSource>, _) = match backend {
        BackendKind::File => {
            std::fs::create_dir_all(file_root)
                .with_context(|| format!("--file-root {}", file_root.display()))?;
            let loops = LoopDevices::new(SystemRunner, file_root, "/sys").context("--file-root")?;
            (Arc::new(loops), None)
        }
        BackendKind::Rds => {
            let host = read_host_nqn(host_nqn_file)
                .context("the RDS node plugin needs this node's NVMe host NQN")?;
            tracing::info!(host_nqn = %host, file = %host_nqn_file.display(), "NVMe host NQN in use");
            let prefix = NqnPrefix::parse(nqn_prefix, "--rds-nqn-prefix")
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let nvme = Arc::new(
                NvmeDevices::new(SystemRunner, "/sys", prefix).with_metrics(metrics.clone()),
            );
            (nvme.clone() as Arc<dyn DeviceSource>, Some(nvme))
        }
    };
    let plugin = NodePlugin::new(NodeDeps {
        source,
        mounter: mounter.clone(),
        runner: Arc::new(SystemRunner),
        records: records()?,
        metrics: metrics.clone(),
        root: root.clone(),
    });
    let reconciler = match nvme {
        Some(nvme) => Some(NodeReconciler::new(
            nvme,
            mounter,
            records()?,
            plugin.volume_locks(),
            metrics,
            root,
        )),
        None => None,
    };
    Ok((plugin, reconciler))
}

/// The `--rds-*` flags.
struct RdsArgs {
    address: Option<String>,
    user: String,
    key_file: Option<PathBuf>,
    host_key: Option<PathBuf>,
    insecure: bool,
    nvme_address: Option<std::net::IpAddr>,
    nvme_port: u16,
    volume_path: String,
    nqn_prefix: String,
    pool_size: usize,
    sessions_per_connection: usize,
    command_timeout: Duration,
}

/// `HOST[:PORT]`, `[v6]:PORT` or a bare IPv6 address; port 22 by default.
fn host_port(raw: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        let (h, tail) = rest
            .split_once(']')
            .context("--rds-address: unclosed '['")?;
        (h, tail.strip_prefix(':'))
    } else if raw.matches(':').count() == 1 {
        let (h, p) = raw.split_once(':').expect("one colon");
        (h, Some(p))
    } else {
        (raw, None)
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("--rds-address {raw:?}: bad port"))?,
        None => 22,
    };
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    if !valid {
        bail!("--rds-address {raw:?}: not a host name or IP address");
    }
    Ok((host.to_string(), port))
}

/// The RDS backend from the `--rds-*` flags, with a loop that keeps trying to reach the RDS
/// while it is down (Probe and /readyz follow it).
fn rds_backend(args: &RdsArgs, metrics: Arc<Metrics>) -> anyhow::Result<RdsBackend> {
    let address = args
        .address
        .as_deref()
        .context("--backend rds needs --rds-address")?;
    let (host, port) = host_port(address)?;
    let key_file = args
        .key_file
        .as_ref()
        .context("--backend rds needs --rds-key-file")?;
    let key = russh::keys::load_secret_key(key_file, None)
        .with_context(|| format!("--rds-key-file {}", key_file.display()))?;
    let host_keys = match (&args.host_key, args.insecure) {
        (_, true) => {
            tracing::warn!(rds = %address, "--rds-insecure-skip-verify: the RDS's host key is NOT verified; anyone who can intercept the connection can impersonate the RDS. Use --rds-host-key in production");
            HostKeys::Insecure
        }
        (Some(path), false) => HostKeys::load(path, &host, port).map_err(|e| anyhow::anyhow!(e))?,
        (None, false) => bail!(
            "--backend rds needs --rds-host-key (the RDS's public host key, or a known_hosts file); \
             --rds-insecure-skip-verify is for testing only"
        ),
    };
    let defaults = RdsDefaults {
        nvme_address: args.nvme_address.or_else(|| host.parse().ok()),
        nvme_port: args.nvme_port,
        volume_path: RosPath::parse(&args.volume_path, "--rds-volume-path")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        nqn_prefix: NqnPrefix::parse(&args.nqn_prefix, "--rds-nqn-prefix")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let pool = SshPool::new(
        SshConfig {
            host,
            port,
            user: args.user.clone(),
            key: Arc::new(key),
            host_keys,
            pool_size: args.pool_size,
            sessions_per_connection: args.sessions_per_connection,
            connect_timeout: Duration::from_secs(10),
            command_timeout: args.command_timeout,
        },
        metrics.clone(),
    );
    let watch = pool.clone();
    tokio::spawn(async move {
        let mut last_error = None;
        loop {
            match watch.check().await {
                Ok(()) => last_error = None,
                Err(e) => {
                    let text = e.to_string();
                    // The backoff message changes with its countdown; log each new cause once.
                    let cause = text
                        .split("; next attempt")
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    if last_error.as_deref() != Some(cause.as_str()) {
                        tracing::warn!(error = %text, "the RDS cannot be reached; not ready until it can");
                        last_error = Some(cause);
                    }
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    tracing::info!(rds = %address, pool = args.pool_size, sessions_per_connection = args.sessions_per_connection, "RDS backend");
    Ok(RdsBackend::new(pool, defaults).with_metrics(metrics))
}

/// The storage poller's flags.
struct StoragePollArgs {
    interval: Duration,
    timeout: Duration,
    snmp_address: Option<String>,
    snmp_community: String,
}

/// Starts the background poller of the storage metrics (the controller's, RDS backend only):
/// the pool's disk over the backend's SSH pool, and the hardware over SNMP when
/// `--snmp-address` is set. Registers the families it fills, and only those.
fn start_storage_poller(
    backend: &RdsBackend,
    rds: &RdsArgs,
    flags: &StoragePollArgs,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    use rds_csi::backend::rds::monitor::{self, DiskSource};
    use rds_csi::backend::rds::snmp::{Community, HardwareSource, SnmpAddress};
    if flags.interval.is_zero() {
        tracing::info!(
            "--storage-poll-interval 0: the rds_disk_* and rds_hardware_* metrics are off"
        );
        return Ok(());
    }
    if flags.timeout.is_zero() {
        bail!("--storage-poll-timeout must be longer than zero");
    }
    let volume_path = RosPath::parse(&rds.volume_path, "--rds-volume-path")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let disk = DiskSource::for_volume_path(backend.pool().clone(), volume_path)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let hardware = match &flags.snmp_address {
        Some(raw) if !raw.is_empty() => Some(HardwareSource {
            address: SnmpAddress::parse(raw, "--snmp-address")
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            community: Community::parse(&flags.snmp_community, "--snmp-community")
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            timeout: flags.timeout,
        }),
        _ => None,
    };
    let storage = Arc::new(
        metrics
            .storage(disk.slot.as_str(), hardware.is_some())
            .context("registering the storage metrics")?,
    );
    tracing::info!(slot = %disk.slot, snmp = ?hardware.as_ref().map(|h| h.address.to_string()), interval = ?flags.interval, timeout = ?flags.timeout, "polling the RDS's storage metrics in the background");
    tokio::spawn(monitor::run(
        disk,
        storage.clone(),
        flags.interval,
        flags.timeout,
    ));
    if let Some(hardware) = hardware {
        tokio::spawn(monitor::run(
            hardware,
            storage,
            flags.interval,
            flags.timeout,
        ));
    }
    Ok(())
}

/// The cluster behind the actors' traits, and the kube-rs cluster when there is one.
type Adapters = (
    Arc<dyn NodeDirectory>,
    Arc<dyn AttachmentAuthority>,
    Arc<dyn ClusterSink>,
    Option<Arc<KubeCluster>>,
);

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}
