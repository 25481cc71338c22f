//! A controller takeover against the fake API server: the wall time from the write that moves
//! the csi-attacher's leader Lease to a standby to the first ControllerPublishVolume that
//! standby answers OK, with N attached volumes (N PVs and N attached VolumeAttachments, shaped
//! as in `boot_seeding`), and the driver's peak RSS (VmHWM) then.
//!
//! Each run starts the real `rds-csi --kubernetes on --leader-election --mode controller` while
//! the Lease names another pod (renewed every 2 s, 15 s lease, as csi-lib-utils' defaults renew
//! it), waits until it is a settled standby (Probe ready, every watch it lists for open, no list
//! in flight), moves the Lease to it, and publishes a volume that no VolumeAttachment holds,
//! retrying UNAVAILABLE at once as a csi-attacher retries (without its backoff, which would
//! measure the attacher). The volume was created beforehand through the standby's CreateVolume
//! (file backend in a temp dir), with its PV and its pending VolumeAttachment, as the
//! provisioner and the attach-detach controller leave them.
//!
//! Not criterion: each sample is a process start and a takeover. `cargo bench --bench takeover`
//! runs it; `TAKEOVER_VOLUMES` (comma-separated sizes, default 10000,100000) and
//! `TAKEOVER_RUNS` (default 3) choose what; `TAKEOVER_DRIVER` runs another build of the driver.
//! `-- --test` (as criterion benches take it) checks that the bench works: 1,000 volumes, one
//! measured run, unless the variables say otherwise.
//!
//! The fake API server runs in this process on one tokio thread, on the same two cores as the
//! driver, and would take far longer to serialize 100k VolumeAttachments than the driver takes
//! to read them. So it caches list answers (valid while nothing of their type is written; the
//! Lease's writes do not touch them): the first takeover ("run 0", printed, not counted) fills
//! the cache with whatever the standby did not list already; the measured runs are served from
//! it, so their time is the driver's.

#[path = "../tests/support/fake_apiserver.rs"]
mod fake_apiserver;
#[path = "support/fleet.rs"]
mod fleet;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use fake_apiserver::FakeApiServer;
use rds_csi::csi::controller_client::ControllerClient;
use rds_csi::csi::identity_client::IdentityClient;
use rds_csi::csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
use rds_csi::csi::{
    CapacityRange, ControllerPublishVolumeRequest, CreateVolumeRequest, ProbeRequest,
    VolumeCapability,
};
use serde_json::json;
use tonic::transport::Channel;
use tonic::Code;

use fleet::{cpu_seconds, load, median, status_kib, DRIVER};

const BIN: &str = env!("CARGO_BIN_EXE_rds-csi");
const LEASE_NAMESPACE: &str = "rds-csi";
/// csi-lib-utils' name for the attacher's Lease of [`DRIVER`], written out.
const LEASE: &str = "external-attacher-leader-rds-csi-srvlab-io";
/// The pod whose csi-attacher holds the Lease before the takeover.
const ELSEWHERE: &str = "rds-csi-controller-elsewhere";
/// The driver under test.
const IDENTITY: &str = "rds-csi-controller-bench";
/// The node every measured Publish names.
const TARGET_NODE: &str = "node-1";

/// Now as a Kubernetes MicroTime, as csi-lib-utils writes `acquireTime` and `renewTime`.
fn micro_now() -> String {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970");
    let whole = rds_csi::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(t.as_secs()));
    format!("{}.{:06}Z", whole.trim_end_matches('Z'), t.subsec_micros())
}

/// The Lease held by `holder`, acquired now, as a csi-attacher acquiring it writes it.
fn acquire(api: &FakeApiServer, holder: &str) {
    let now = micro_now();
    match api.get("leases", Some(LEASE_NAMESPACE), LEASE) {
        None => {
            api.create(
                "leases",
                json!({
                    "metadata": {"name": LEASE, "namespace": LEASE_NAMESPACE},
                    "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                             "acquireTime": now, "renewTime": now, "leaseTransitions": 0},
                }),
            )
            .expect("lease");
        }
        Some(lease) => {
            let transitions = lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0);
            api.patch(
                "leases",
                Some(LEASE_NAMESPACE),
                LEASE,
                json!({"spec": {"holderIdentity": holder, "acquireTime": now, "renewTime": now,
                                "leaseTransitions": transitions + 1}}),
            )
            .expect("move lease");
        }
    }
}

/// Whoever holds the Lease renews it every 2 s, for the life of the bench.
fn keep_renewing(api: FakeApiServer) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            api.patch(
                "leases",
                Some(LEASE_NAMESPACE),
                LEASE,
                json!({"spec": {"renewTime": micro_now()}}),
            )
            .expect("renew lease");
        }
    })
}

fn rwo() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

/// A volume no VolumeAttachment holds yet, made through the standby's CreateVolume, with its
/// PV (the provisioner's) and a pending VolumeAttachment on [`TARGET_NODE`] (the attach-detach
/// controller's, before the csi-attacher calls Publish). Returns its id.
async fn new_volume(api: &FakeApiServer, channel: Channel, name: &str) -> String {
    let volume = ControllerClient::new(channel)
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 1 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![rwo()],
            ..Default::default()
        })
        .await
        .expect("CreateVolume on the standby")
        .into_inner()
        .volume
        .expect("volume");
    let id = volume.volume_id;
    let pv = format!("pv-{name}");
    api.create(
        "persistentvolumes",
        json!({
            "metadata": {"name": pv, "annotations": {"pv.kubernetes.io/provisioned-by": DRIVER}},
            "spec": {
                "accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
                "capacity": {"storage": "1Mi"}, "persistentVolumeReclaimPolicy": "Delete",
                "csi": {"driver": DRIVER, "volumeHandle": id},
                "claimRef": {"namespace": "vms", "name": format!("{name}-claim"), "uid": format!("uid-{name}")},
            },
            "status": {"phase": "Bound"},
        }),
    )
    .expect("pv");
    api.create(
        "volumeattachments",
        json!({
            "metadata": {"name": rds_csi::kube::cluster::va_name(&id, DRIVER, TARGET_NODE)},
            "spec": {"attacher": DRIVER, "nodeName": TARGET_NODE, "source": {"persistentVolumeName": pv}},
            "status": {"attached": false},
        }),
    )
    .expect("va");
    id
}

/// The driver as a standby, in `dir`, with its file backend in `volumes`.
fn spawn_driver(kubeconfig: &Path, dir: &Path, volumes: &Path) -> Child {
    let bin = std::env::var("TAKEOVER_DRIVER").unwrap_or_else(|_| BIN.to_string());
    Command::new(bin)
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.join("csi.sock").display()))
        .args(["--node-id", "node-0", "--metrics-address", "127.0.0.1:0"])
        .args(["--mode", "controller", "--kubernetes", "on"])
        .args([
            "--leader-election",
            "--leader-election-namespace",
            LEASE_NAMESPACE,
        ])
        .args(["--leader-election-identity", IDENTITY])
        .arg("--file-root")
        .arg(volumes)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        // No debug listener (an env var, so older builds run too).
        .env("RDS_CSI_DEBUG_ADDRESS", "")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("driver.log")).expect("log"))
        .spawn()
        .expect("spawn rds-csi")
}

fn exited(child: &mut Child, dir: &Path) {
    if let Some(status) = child.try_wait().expect("wait") {
        panic!(
            "rds-csi exited ({status}):\n{}",
            std::fs::read_to_string(dir.join("driver.log")).unwrap_or_default()
        );
    }
}

/// Whether the driver's watches are all up and none of its lists is still being read: a
/// standby that has been running for a while, as the one a Lease moves to normally is.
fn settled(api: &FakeApiServer) -> bool {
    let calls = api.calls();
    let listed: std::collections::BTreeSet<&str> = calls
        .iter()
        .filter(|c| c.verb == "list")
        .map(|c| c.resource.as_str())
        .collect();
    !calls.iter().any(|c| c.verb == "list" && c.in_flight())
        && ["persistentvolumes", "nodes", "leases"]
            .into_iter()
            .chain(listed)
            .all(|r| api.open_watches(Some(r)) > 0)
}

/// Waits for a settled standby; returns its channel.
async fn standby(api: &FakeApiServer, child: &mut Child, dir: &Path) -> Channel {
    let endpoint = format!("unix://{}", dir.join("csi.sock").display());
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        assert!(Instant::now() < deadline, "no settled standby after 600 s");
        exited(child, dir);
        if let Ok(channel) = rds_csi::ctl::connect(&endpoint).await {
            let ready = IdentityClient::new(channel.clone())
                .probe(ProbeRequest {})
                .await
                .is_ok_and(|r| r.get_ref().ready == Some(true));
            if ready && settled(api) {
                return channel;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Sample {
    /// The Lease write to the first OK.
    to_publish: Duration,
    /// Publishes answered UNAVAILABLE before it.
    refused: usize,
    /// The Lease write to the first VolumeAttachment list request, and that list's span.
    to_list: Option<Duration>,
    list: Option<Duration>,
    /// The driver's own `seconds` from the live Lease read to serving.
    driver_reported_s: Option<f64>,
    hwm_mib: f64,
    rss_mib: f64,
    /// Driver CPU during the takeover alone.
    cpu_s: f64,
}

/// One standby started, moved to, and published through: `volume`, made before.
async fn takeover_once(
    api: &FakeApiServer,
    kubeconfig: &Path,
    volumes: &Path,
    volume: &str,
) -> Sample {
    acquire(api, ELSEWHERE);
    api.clear_calls();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = spawn_driver(kubeconfig, dir.path(), volumes);
    let pid = child.id();
    let channel = standby(api, &mut child, dir.path()).await;
    let mut controller = ControllerClient::new(channel);
    let request = ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: TARGET_NODE.into(),
        volume_capability: Some(rwo()),
        ..Default::default()
    };
    let answer = controller.controller_publish_volume(request.clone()).await;
    assert!(
        matches!(&answer, Err(s) if s.code() == Code::Unavailable),
        "a standby refuses Publish: {answer:?}"
    );
    let cpu_before = cpu_seconds(pid).unwrap_or(f64::NAN);
    let mut refused = 0;
    let moved = Instant::now();
    acquire(api, IDENTITY);
    let deadline = moved + Duration::from_secs(600);
    loop {
        match controller.controller_publish_volume(request.clone()).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unavailable => refused += 1,
            Err(s) => panic!("Publish of {volume}: {:?}: {}", s.code(), s.message()),
        }
        assert!(Instant::now() < deadline, "no Publish served after 600 s");
        exited(&mut child, dir.path());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let to_publish = moved.elapsed();
    let cpu_s = cpu_seconds(pid).unwrap_or(f64::NAN) - cpu_before;
    let hwm = status_kib(pid, "VmHWM:").unwrap_or(0);
    let rss = status_kib(pid, "VmRSS:").unwrap_or(0);
    let vas: Vec<_> = api
        .calls_matching("list", "volumeattachments")
        .into_iter()
        .filter(|c| c.at >= moved)
        .collect();
    let to_list = vas.first().map(|c| c.at - moved);
    let list = vas
        .first()
        .zip(vas.iter().filter_map(|c| c.answered_at).max())
        .map(|(first, last)| last - first.at);
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap_or_default();
    let driver_reported_s = log
        .lines()
        .find(|l| l.contains("active: attachment state rebuilt") && l.contains("seconds="))
        .and_then(|l| l.split("seconds=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok());
    Sample {
        to_publish,
        refused,
        to_list,
        list,
        driver_reported_s,
        hwm_mib: hwm as f64 / 1024.0,
        rss_mib: rss as f64 / 1024.0,
        cpu_s,
    }
}

fn print_sample(label: &str, s: &Sample) {
    let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.3?}", d));
    println!(
        "  {label}: Lease write -> Publish OK {:.3?} ({} UNAVAILABLE first; VA list requested after {}, read in {}; driver's own Lease read -> serving {}), driver CPU {:.2} s, peak RSS {:.1} MiB, RSS after {:.1} MiB",
        s.to_publish,
        s.refused,
        ms(s.to_list),
        ms(s.list),
        s.driver_reported_s.map_or("-".into(), |v| format!("{v:.3} s")),
        s.cpu_s,
        s.hwm_mib,
        s.rss_mib
    );
}

fn main() {
    let (sizes, runs) = fleet::sizes_and_runs("TAKEOVER", "10000,100000");
    let runtime = fleet::runtime();
    runtime.block_on(async {
        for n in sizes {
            let api = FakeApiServer::start().await;
            let loaded = Instant::now();
            load(&api, n);
            println!(
                "takeover: {n} PVs + {n} attached VolumeAttachments loaded in {:.2?}",
                loaded.elapsed()
            );
            let dir = tempfile::tempdir().expect("tempdir");
            let kubeconfig = api.write_kubeconfig(&dir.path().join("kube"));
            let volumes = dir.path().join("volumes");
            api.cache_lists(true);
            acquire(&api, ELSEWHERE);
            let renewer = keep_renewing(api.clone());
            // Every volume a run publishes is made first, on a standby, so that no
            // VolumeAttachment is written between the runs and the cached list stays valid.
            let mut prepared = Vec::new();
            {
                let dir = tempfile::tempdir().expect("tempdir");
                let mut child = spawn_driver(&kubeconfig, dir.path(), &volumes);
                let channel = standby(&api, &mut child, dir.path()).await;
                for run in 0..=runs {
                    let name = format!("takeover-{run}");
                    prepared.push(new_volume(&api, channel.clone(), &name).await);
                }
                // SAFETY: plain kill(2) on our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let _ = child.wait();
            }
            let s = takeover_once(&api, &kubeconfig, &volumes, &prepared[0]).await;
            print_sample("run 0 (not counted: it fills the fake's list cache)", &s);
            let mut samples = Vec::new();
            for (run, volume) in prepared[1..].iter().enumerate() {
                let s = takeover_once(&api, &kubeconfig, &volumes, volume).await;
                print_sample(&format!("run {}", run + 1), &s);
                samples.push(s);
            }
            renewer.abort();
            println!(
                "takeover {n}: median Lease write -> Publish OK {:.3} s, median peak RSS {:.1} MiB (target: <= 2 s at 100k)",
                median(samples.iter().map(|s| s.to_publish.as_secs_f64()).collect()),
                median(samples.iter().map(|s| s.hwm_mib).collect())
            );
        }
    });
}
