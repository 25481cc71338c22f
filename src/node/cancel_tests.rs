//! Node calls under cancellation: a caller that goes away (the kubelet's deadline, tonic
//! dropping the RPC) must not cut a call short, and a repeat must join it rather than redo it.
//! The plugin runs on fake seams here: a device source that keeps its state in memory, the
//! kernel-like [`FakeMounter`], and a command runner whose `mkfs` waits at a gate the test
//! opens.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, Semaphore};

use super::command::{Cmd, CommandError, CommandRunner, Output};
use super::confine::KubeletRoot;
use super::device::{Backing, DeviceSource};
use super::fake_sysfs::{kernel_view, FakeMounter, FakeProc};
use super::fakes::RecordingRunner;
use super::mounter::{MountOptions, Mounter};
use super::paths::{AbsPath, BlockDevice};
use super::plugin::{NodeDeps, Stage, Unstage};
use super::records::Records;
use super::{NodeError, NodePlugin};
use crate::domain::fixtures::rwo_ext4;
use crate::ids::VolumeId;
use crate::metrics::Metrics;

/// One volume's device: attached or not, and always "healthy".
struct MemorySource {
    device: BlockDevice,
    attached: Mutex<bool>,
}

#[async_trait]
impl DeviceSource for MemorySource {
    fn kind(&self) -> &'static str {
        "file"
    }
    fn locate(
        &self,
        volume: &VolumeId,
        _: &HashMap<String, String>,
        _: &HashMap<String, String>,
    ) -> Result<Backing, NodeError> {
        Ok(Backing::File {
            image: AbsPath::try_from(PathBuf::from(format!("/images/{volume}.img"))).unwrap(),
        })
    }
    async fn exists(&self, _: &Backing) -> Result<bool, NodeError> {
        Ok(true)
    }
    async fn find(&self, _: &Backing) -> Result<Option<BlockDevice>, NodeError> {
        Ok((*self.attached.lock().unwrap()).then(|| self.device.clone()))
    }
    async fn attach(&self, _: &Backing) -> Result<BlockDevice, NodeError> {
        *self.attached.lock().unwrap() = true;
        Ok(self.device.clone())
    }
    async fn detach(&self, _: &Backing) -> Result<(), NodeError> {
        *self.attached.lock().unwrap() = false;
        Ok(())
    }
    async fn refresh_size(&self, _: &Backing, _: &BlockDevice) -> Result<u64, NodeError> {
        Ok(0)
    }
    async fn healthy(&self, _: &Backing, _: &BlockDevice) -> Result<bool, NodeError> {
        Ok(*self.attached.lock().unwrap())
    }
}

/// `mkfs.*` waits at a gate: it reports that it started, then runs once the test adds a
/// permit. Once formatted, `blkid` reports ext4; before, nothing (exit 2). A cancelled mkfs
/// (its future dropped at the gate) never counts as finished.
struct GatedRunner {
    inner: RecordingRunner,
    started: mpsc::UnboundedSender<()>,
    gate: Arc<Semaphore>,
    formatted: Arc<AtomicUsize>,
}

#[async_trait]
impl CommandRunner for GatedRunner {
    async fn run(&self, cmd: &Cmd) -> Result<Output, CommandError> {
        if cmd.program.starts_with("mkfs.") {
            self.started.send(()).unwrap();
            self.gate.acquire().await.unwrap().forget();
            self.formatted.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.run(cmd).await
    }
    fn installed(&self, program: &'static str) -> bool {
        self.inner.installed(program)
    }
}

struct Node {
    plugin: Arc<NodePlugin>,
    mounter: FakeMounter,
    runner: RecordingRunner,
    mkfs_started: mpsc::UnboundedReceiver<()>,
    gate: Arc<Semaphore>,
    formatted: Arc<AtomicUsize>,
    staging: AbsPath,
    _dir: tempfile::TempDir,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let staging = root.join("staging");
    std::fs::create_dir(&staging).unwrap();
    // The probe reads the device's ends: a zeroed file stands in for an empty device.
    let dev = dir.path().join("dev");
    std::fs::write(&dev, vec![0u8; 4096]).unwrap();
    let device = BlockDevice {
        path: AbsPath::try_from(dev).unwrap(),
        major: 7,
        minor: 3,
    };
    let formatted = Arc::new(AtomicUsize::new(0));
    let runner = RecordingRunner::default();
    let seen = formatted.clone();
    runner.on("blkid", move |_| {
        Ok(if seen.load(Ordering::SeqCst) > 0 {
            Output {
                code: Some(0),
                stdout: "TYPE=ext4\nUSAGE=filesystem\n".into(),
                ..Output::default()
            }
        } else {
            Output {
                code: Some(2),
                ..Output::default()
            }
        })
    });
    runner.ok("mkfs.ext4 -F -q ");
    let (started, mkfs_started) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let mounter = FakeMounter::new(&FakeProc::new(&dir.path().join("proc")));
    let plugin = Arc::new(NodePlugin::new(NodeDeps {
        source: Arc::new(MemorySource {
            device,
            attached: Mutex::new(false),
        }),
        mounter: Arc::new(mounter.clone()),
        runner: Arc::new(GatedRunner {
            inner: runner.clone(),
            started,
            gate: gate.clone(),
            formatted: formatted.clone(),
        }),
        records: Records::open(&dir.path().join("records")).unwrap(),
        metrics: Arc::new(Metrics::new()),
        root: Arc::new(KubeletRoot::new(AbsPath::try_from(root).unwrap())),
    }));
    Node {
        plugin,
        mounter,
        runner,
        mkfs_started,
        gate,
        formatted,
        staging: AbsPath::try_from(staging).unwrap(),
        _dir: dir,
    }
}

fn vol() -> VolumeId {
    VolumeId::try_from("pvc-cancel").unwrap()
}

fn stage(node: &Node) -> Stage {
    Stage {
        volume: vol(),
        staging: node.staging.clone(),
        capability: rwo_ext4(),
        options: MountOptions::default(),
        publish_context: HashMap::new(),
        volume_context: HashMap::new(),
    }
}

fn spawn_stage(node: &Node) -> tokio::task::JoinHandle<Result<(), NodeError>> {
    let (plugin, req) = (node.plugin.clone(), stage(node));
    tokio::spawn(async move { plugin.stage(req).await })
}

/// Bounds a call that must not hang; the clock is paused, so this is no real-time threshold:
/// it turns a call that would wait forever into a failure.
async fn answered<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(3600), f)
        .await
        .expect("the call never answered")
}

/// The kubelet's deadline passes mid-mkfs and tonic drops the stage; the retry joins the
/// stage still running and gets its OK: mkfs ran (and finished) once, the volume is mounted
/// once. Catches the public `stage` awaiting the body in the caller's future (the drop cancels
/// mkfs, the undo never runs, and the retry formats again) and a retry that does not join.
#[tokio::test(start_paused = true)]
async fn a_stage_cancelled_mid_mkfs_keeps_running_and_its_retry_converges() {
    let mut node = node();
    let first = spawn_stage(&node);
    node.mkfs_started.recv().await.unwrap();
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());

    let retry = spawn_stage(&node);
    node.gate.add_permits(1);
    answered(retry).await.unwrap().unwrap();

    assert!(
        node.mkfs_started.try_recv().is_err(),
        "mkfs started a second time (the first was cut short)"
    );
    assert_eq!(
        node.formatted.load(Ordering::SeqCst),
        1,
        "mkfs finished once"
    );
    let mkfs: Vec<_> = node
        .runner
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("mkfs."))
        .collect();
    assert_eq!(mkfs.len(), 1, "mkfs ran once: {mkfs:?}");
    let mounts = node.mounter.mounts().unwrap();
    assert_eq!(mounts.len(), 1, "mounted once: {mounts:?}");
    assert_eq!(mounts[0].mount_point, kernel_view(&node.staging));
}

/// While a stage runs, the same stage from a caller whose deadline is too short, and an
/// unstage of the volume (which waits its turn on the lock), are answered ABORTED "in
/// progress" at their deadlines; the stage then completes. Catches a call that ignores the
/// caller's deadline (it would wait for the lock as long as mkfs takes) and an unstage that
/// does not wait for the volume's lock.
#[tokio::test(start_paused = true)]
async fn a_call_whose_deadline_ends_while_another_runs_is_aborted_in_progress() {
    let mut node = node();
    let first = spawn_stage(&node);
    node.mkfs_started.recv().await.unwrap();

    let soon = || Some(tokio::time::Instant::now() + Duration::from_secs(5));
    let repeat = crate::deadline::scope(soon(), node.plugin.stage(stage(&node)));
    let err = answered(repeat).await.unwrap_err();
    assert!(matches!(err, NodeError::Aborted(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "operation for volume pvc-cancel is already in progress"
    );
    let unstage = Unstage {
        volume: vol(),
        staging: node.staging.clone(),
    };
    let err = answered(crate::deadline::scope(
        soon(),
        node.plugin.unstage(unstage.clone()),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, NodeError::Aborted(_)), "{err}");

    node.gate.add_permits(1);
    answered(first).await.unwrap().unwrap();
    // The unstage answered ABORTED runs when its turn comes; its retry joins it.
    answered(node.plugin.unstage(unstage)).await.unwrap();
    assert_eq!(node.mounter.mounts().unwrap().len(), 0);
    assert_eq!(node.formatted.load(Ordering::SeqCst), 1);
}
