//! Freezes a staged volume's filesystem for the file backend's copy (a snapshot or clone without
//! reflinks), so the copy is one point in time while the VM using the volume keeps running:
//! [`Freezer`] is the node's side of [`crate::backend::quiesce::Quiescer`], present only when
//! the node plugin runs in the controller's process (`--mode all`).
//!
//! Owns the `FIFREEZE`/`FITHAW` of staging mounts and nothing else: it never mounts, unmounts,
//! attaches or changes a record. A freeze holds the volume's node turn
//! ([`NodePlugin::hold_staged`]) until it is thawed, so no stage, unstage or publish of it runs
//! in the middle of a copy. What is frozen is checked to be the volume's own device (the one its
//! backing is attached as now), never a filesystem reached through a missing mount. Every
//! freeze is thawed: when its [`Frozen`] hold is dropped (the copy ended, well or not), or when
//! its window passes first (a watchdog thread thaws it, and the copy is then refused).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;

use super::paths::BlockDevice;
use super::plugin::{NodePlugin, Turn};
use crate::backend::quiesce::{Hold, QuiesceError, Quiesced, Quiescer};
use crate::domain::AccessType;
use crate::ids::VolumeId;
use crate::metrics::{FREEZE_EXPIRED, FREEZE_FAILED, FREEZE_THAWED};

/// `FIFREEZE` and `FITHAW` from `<linux/fs.h>`: `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Freezes volumes staged by `plugin` for the file backend's copies.
pub struct Freezer {
    plugin: Arc<NodePlugin>,
    /// The runtime whose node locks the copy's blocking thread waits for.
    runtime: tokio::runtime::Handle,
    freezes: IntCounterVec,
}

impl Freezer {
    /// Call inside the runtime that serves `plugin`.
    pub fn new(plugin: Arc<NodePlugin>, freezes: IntCounterVec) -> Self {
        Self {
            plugin,
            runtime: tokio::runtime::Handle::current(),
            freezes,
        }
    }
}

impl Quiescer for Freezer {
    /// Blocking: waits for the volume's node turn (at most `window`: a stuck node call makes the
    /// copy fail rather than wait forever), then freezes its staging mount.
    /// `NotInUse` when this node has no record of it or it is not attached; `Unfreezable` for a
    /// raw block volume; an error (counted as `failed`) when the turn did not come, the staging
    /// path does not hold the volume's filesystem, or the kernel refuses the freeze.
    fn quiesce(&self, volume: &VolumeId, window: Duration) -> Result<Quiesced, QuiesceError> {
        self.freeze(volume, window).map_err(|e| {
            self.freezes.with_label_values(&[FREEZE_FAILED]).inc();
            tracing::warn!(volume_id = %volume, error = %e, "cannot freeze the staged filesystem for a copy");
            QuiesceError(e)
        })
    }
}

impl Freezer {
    fn freeze(&self, volume: &VolumeId, window: Duration) -> Result<Quiesced, String> {
        let (turn, staged) = self
            .runtime
            .block_on(async { tokio::time::timeout(window, self.plugin.hold_staged(volume)).await })
            .map_err(|_| format!("a node call on it was still running after {window:?}; retry"))?
            .map_err(|e| e.to_string())?;
        let Some((record, Some(device))) = staged else {
            return Ok(Quiesced::NotInUse);
        };
        if let AccessType::Block = record.capability.access_type() {
            return Ok(Quiesced::Unfreezable(format!(
                "it is staged on this node as a raw block device ({}), which has no filesystem to \
                 freeze: pause or stop the VM using it and retry, or keep --file-root on a \
                 filesystem with reflinks (XFS with reflink=1, btrfs), where copies of volumes in \
                 use are taken at once",
                device.path
            )));
        }
        let staging = record.staging.as_path();
        let frozen = Frozen::freeze(staging, &device, window, turn, self.freezes.clone())?;
        tracing::info!(volume_id = %volume, staging = %staging.display(), device = %device.path, window = ?window, "filesystem frozen for a copy");
        Ok(Quiesced::Frozen(Box::new(frozen)))
    }
}

/// A frozen filesystem; thawed on drop, or by its watchdog when the window passes.
pub struct Frozen {
    /// The staging directory's descriptor while frozen; taken by whoever thaws.
    dir: Arc<Mutex<Option<OwnedFd>>>,
    frozen_at: Instant,
    deadline: Instant,
    /// Tells the watchdog the copy ended (by being dropped).
    done: Option<mpsc::Sender<()>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    freezes: IntCounterVec,
    /// Released after the thaw, when this is dropped.
    _turn: Option<Turn>,
}

impl Frozen {
    /// Freezes the filesystem mounted at `dir`, which must be `device`'s (checked on the open
    /// descriptor, so a missing mount never freezes the filesystem beneath it), for at most
    /// `window`, holding `turn` until thawed. An error says why nothing was frozen.
    pub fn freeze(
        dir: &Path,
        device: &BlockDevice,
        window: Duration,
        turn: impl Into<Option<Turn>>,
        freezes: IntCounterVec,
    ) -> Result<Self, String> {
        let fd = rustix::fs::open(
            dir,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| format!("opening {}: {e}", dir.display()))?;
        let stat = rustix::fs::fstat(&fd).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (major, minor) = (
            rustix::fs::major(stat.st_dev),
            rustix::fs::minor(stat.st_dev),
        );
        if (major, minor) != (device.major, device.minor) {
            return Err(format!(
                "{} is on device {major}:{minor}, not the volume's {} ({}:{}); it is not mounted \
                 there",
                dir.display(),
                device.path,
                device.major,
                device.minor
            ));
        }
        // SAFETY: an ioctl on a descriptor we own; FIFREEZE takes no argument.
        if unsafe { libc::ioctl(fd.as_raw_fd(), FIFREEZE as _, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => format!(
                    "{} is already frozen by someone else, who decides when it thaws",
                    dir.display()
                ),
                _ => format!("freezing {}: {e}", dir.display()),
            });
        }
        let frozen_at = Instant::now();
        let deadline = frozen_at + window;
        let dir = Arc::new(Mutex::new(Some(fd)));
        let (done, ended) = mpsc::channel::<()>();
        let watchdog = {
            let dir = dir.clone();
            let freezes = freezes.clone();
            std::thread::Builder::new()
                .name("rds-csi-thaw".into())
                .spawn(move || {
                    if let Err(mpsc::RecvTimeoutError::Timeout) =
                        ended.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    {
                        if thaw(&dir) {
                            freezes.with_label_values(&[FREEZE_EXPIRED]).inc();
                            tracing::warn!(window = ?window, "a copy outlasted its freeze window; the filesystem was thawed and the copy will be refused");
                        }
                    }
                })
        };
        let watchdog = match watchdog {
            Ok(w) => w,
            Err(e) => {
                thaw(&dir);
                return Err(format!("starting the thaw watchdog: {e}"));
            }
        };
        Ok(Self {
            dir,
            frozen_at,
            deadline,
            done: Some(done),
            watchdog: Some(watchdog),
            freezes,
            _turn: turn.into(),
        })
    }
}

/// Thaws the filesystem if nobody did yet; true when this call thawed it.
fn thaw(dir: &Mutex<Option<OwnedFd>>) -> bool {
    let Some(fd) = dir.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return false;
    };
    // SAFETY: an ioctl on a descriptor we own; FITHAW takes no argument.
    if unsafe { libc::ioctl(fd.as_raw_fd(), FITHAW as _, 0) } != 0 {
        tracing::error!(error = %std::io::Error::last_os_error(), "FITHAW failed: the staged filesystem may still be frozen");
    }
    true
}

impl Hold for Frozen {
    fn still(&self) -> bool {
        Instant::now() < self.deadline
            && self.dir.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if thaw(&self.dir) {
            self.freezes.with_label_values(&[FREEZE_THAWED]).inc();
            tracing::info!(frozen_for = ?self.frozen_at.elapsed(), "filesystem thawed after the copy");
        }
        drop(self.done.take());
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::node::device::LoopDevices;
    use crate::node::fakes::RecordingRunner;
    use crate::node::mounter::SystemMounter;
    use crate::node::plugin::NodeDeps;
    use crate::node::records::Records;

    /// A copy waits for the volume's node turn at most its window: while a node call holds the
    /// turn (forced: the test holds it throughout), `quiesce` fails saying so instead of
    /// waiting. Removing the timeout around `hold_staged` fails this (the outer deadline, which
    /// only turns a hang into a failure, passes first); nothing is frozen either way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_waits_for_a_busy_volume_at_most_its_window() {
        let dir = tempfile::tempdir().unwrap();
        let runner = RecordingRunner::default();
        let plugin = Arc::new(NodePlugin::new(NodeDeps {
            source: Arc::new(
                LoopDevices::new(runner.clone(), dir.path(), dir.path().join("sys")).unwrap(),
            ),
            mounter: Arc::new(SystemMounter::default()),
            runner: Arc::new(runner.clone()),
            records: Records::open(&dir.path().join("state")).unwrap(),
            metrics: Arc::new(Metrics::new()),
            root: Arc::new(crate::node::confine::KubeletRoot::new(
                crate::node::paths::AbsPath::try_from(dir.path().to_path_buf()).unwrap(),
            )),
        }));
        let metrics = Metrics::new();
        let freezer = Freezer::new(plugin.clone(), metrics.snapshot_freezes.clone());
        let volume = VolumeId::try_from("v").unwrap();
        let (busy, _) = plugin.hold_staged(&volume).await.unwrap();

        let asked = tokio::task::spawn_blocking({
            let volume = volume.clone();
            move || {
                freezer
                    .quiesce(&volume, Duration::from_millis(20))
                    .map(|_| ())
            }
        });
        let answer = tokio::time::timeout(Duration::from_secs(60), asked)
            .await
            .expect("quiesce kept waiting for the node turn past its window")
            .unwrap();
        let QuiesceError(message) = answer.expect_err("the volume's turn is held");
        assert!(message.contains("still running"), "{message}");
        let failed = metrics.snapshot_freezes.with_label_values(&[FREEZE_FAILED]);
        assert_eq!(failed.get(), 1, "counted as a freeze that failed");
        assert!(runner.calls().is_empty(), "nothing was looked up or run");
        drop(busy);
    }
}
