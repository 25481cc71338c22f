//! The embedded default backend: one sparse file per volume under `--file-root`, with its
//! metadata in a JSON file beside it.
//!
//! Owns the files under its root and nothing else. A volume exists exactly when its `<id>.json`
//! does, and every change is a sequence of steps of which each is durable before the next, so a
//! crash at any point leaves each volume whole or absent, never half made:
//! - create writes and syncs `<id>.img.partial` and `<id>.json.partial`, renames the image into
//!   place, syncs the directory, then renames the metadata (the commit point) and syncs the
//!   directory again. A create that fails undoes itself, metadata first;
//! - delete removes the metadata (the commit point), syncs the directory, then removes the image
//!   and syncs the directory again; the volume leaves the index only once its files are gone, so
//!   a failed delete is retried in full rather than answered OK with its metadata still on disk;
//! - expand grows and syncs the image, writes and syncs `<id>.json.partial` with the new size,
//!   renames it over the metadata (the commit point) and syncs the directory. An image larger
//!   than its metadata says is harmless: the retried expand finishes.
//!
//! A call answers only once all it changed is durable. The test seam ([`Faults`]) is told of each
//! write, rename, removal and sync as it happens ([`Io`]), so tests check these rules on the
//! record, not only the order of the steps.
//!
//! At open, leftovers of an interrupted change are cleaned: `*.partial` files and images without
//! metadata are removed. What cannot be served (metadata without its image, metadata that cannot
//! be read or that names another volume) is moved with its image to `<root>/quarantine/` and
//! logged at warn; every other volume is served. Quarantined files are never touched again.
//!
//! Snapshots live in `<root>/snapshots/`: `<snapshot id>.img` (a read-only copy of the volume's
//! image) and `<snapshot id>.json` (its CSI name, source volume, size and time: what makes
//! CreateSnapshot idempotent by name across restarts). A snapshot exists exactly when its
//! metadata does, and is made like a volume: `<id>.img.partial` is copied and synced, renamed
//! into place, the directory synced, then `<id>.json.partial` renamed over (the commit point),
//! so a half-made snapshot is never listed, never restorable, and is cleaned up at open (a
//! retried CreateSnapshot then makes it again). A restore or a clone is a create whose image is
//! such a copy. Copies are reflinks where the filesystem can make them, else sparse copies
//! ([`super::copy`]); a sparse copy of an image that is open for writing is refused, as it
//! would not be one point in time, unless the node plugin of this process freezes the volume's
//! filesystem for the copy ([`super::quiesce`], [`FileBackend::quiesce_with`]).
//!
//! Never blocks an async thread. File I/O runs on tokio's blocking pool. Every change of a
//! volume or snapshot holds its lock ([`super::locks`]: exclusive to create, grow or delete it,
//! shared to copy from it), so a snapshot is deleted only after the restores from it, and a
//! volume is not deleted or grown in the middle of its snapshot. Changes that are quick (create
//! empty, delete, expand) also take turns on one async lock, held until their I/O is done even
//! if the caller gave up waiting, so two of them never interleave in the directory; copies do
//! not, so a long copy holds up only what it copies from and to. Reads (`get`, `list`,
//! `publish_context`, snapshots alike) copy from in-memory indexes that are locked only to read
//! or swap an entry, never across I/O, so a read never waits for a disk.
//!
//! This module wires the parts into [`VolumeBackend`]: `steps` (the test seam and the
//! crash-consistent primitives every change is made of), `volumes` (create, delete, expand),
//! `snapshots` (make and delete), `point_in_time` (copies of an image in use) and `open` (what
//! is cleaned, quarantined and loaded at start).

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;

use super::locks::{Held, Key, Locks, Mode};
use super::quiesce::{Quiescer, FREEZE_WINDOW};
use super::{
    BackendError, ContentSource, CreateRequest, SnapshotInfo, SnapshotRequest, VolumeBackend,
    VolumeInfo,
};
use crate::ids::{SnapshotId, VolumeId};
use open::{load, load_snapshots};
use snapshots::SnapshotMeta;
use steps::Stop;
pub use steps::{Fault, Faults, Io, NoFaults, Step};

const IMAGE_EXT: &str = "img";
const META_EXT: &str = "json";
const PARTIAL_EXT: &str = "partial";
/// Where open moves what it cannot serve.
const QUARANTINE_DIR: &str = "quarantine";
/// Where snapshots live, under the root.
const SNAPSHOT_DIR: &str = "snapshots";

/// What every refused copy of an image in use may do instead.
const REFLINK_HINT: &str =
    "keep --file-root on a filesystem with reflinks (XFS with reflink=1, btrfs), where copies \
     of volumes in use are taken at once";
/// A copy refused with no node plugin in this process to freeze the volume.
const NO_NODE_PLUGIN: &str = "no node plugin runs in this process to freeze its filesystem for \
     the copy (only --mode all has one): pause or stop the VM using it, or unstage it, and \
     retry; or keep --file-root on a filesystem with reflinks (XFS with reflink=1, btrfs)";
/// A copy refused with a node plugin in this process that does not stage the volume.
const NOT_STAGED: &str = "this node plugin does not stage it, so it cannot freeze it: stop \
     whatever writes it and retry; or keep --file-root on a filesystem with reflinks (XFS with \
     reflink=1, btrfs)";

pub struct FileBackend {
    files: Arc<Files>,
    /// Whose turn it is to change the directory. Held across the change's I/O, and moved into
    /// the blocking task so it is released only when that I/O is over.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// One lock per volume and per snapshot.
    locks: Locks,
}

/// The root and the indexes; what the blocking tasks work on.
struct Files {
    root: PathBuf,
    /// The visible volumes. Locked only to copy or swap entries, never across I/O.
    index: RwLock<BTreeMap<VolumeId, VolumeInfo>>,
    /// The visible snapshots, likewise.
    snapshots: RwLock<BTreeMap<SnapshotId, SnapshotMeta>>,
    faults: Arc<dyn Faults>,
    /// The node plugin in this process, which freezes a staged volume for a copy without a
    /// reflink; unset in a controller alone.
    quiescer: OnceLock<(Arc<dyn Quiescer>, Duration)>,
}

impl FileBackend {
    /// Opens (creating if needed) the root, cleans up after interrupted changes, quarantines what
    /// cannot be served, and loads the index. Fails only if the root itself is unusable.
    /// Blocking: call it at start-up, before serving.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BackendError> {
        Self::open_with_faults(root, Arc::new(NoFaults))
    }

    /// [`FileBackend::open`] with a test seam.
    pub fn open_with_faults(
        root: impl Into<PathBuf>,
        faults: Arc<dyn Faults>,
    ) -> Result<Self, BackendError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(BackendError::io(format!(
            "creating file root {}",
            root.display()
        )))?;
        // Absolute, so the image paths in publish contexts mean the same thing to any process.
        let root = std::fs::canonicalize(&root).map_err(BackendError::io(format!(
            "resolving file root {}",
            root.display()
        )))?;
        let index = load(&*faults, &root)?;
        let snapshots = load_snapshots(&*faults, &root)?;
        let files = Files {
            root,
            index: RwLock::new(index),
            snapshots: RwLock::new(snapshots),
            faults,
            quiescer: OnceLock::new(),
        };
        Ok(Self {
            files: Arc::new(files),
            turn: Arc::default(),
            locks: Locks::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.files.root
    }

    /// Copies of a volume in use (snapshots and clones, where the filesystem cannot reflink)
    /// ask `quiescer` to freeze it for the copy ([`FREEZE_WINDOW`] at most) instead of being
    /// refused: set when the node plugin that stages the volumes runs in this process. Only the
    /// first call counts.
    pub fn quiesce_with(&self, quiescer: Arc<dyn Quiescer>) {
        self.quiesce_within(quiescer, FREEZE_WINDOW);
    }

    /// [`FileBackend::quiesce_with`] with another window (tests).
    pub fn quiesce_within(&self, quiescer: Arc<dyn Quiescer>, window: Duration) {
        let _ = self.files.quiescer.set((quiescer, window));
    }

    /// Runs one quick change to the directory on the blocking pool, holding `held` and after
    /// the quick changes before it.
    async fn change<T: Send + 'static>(
        &self,
        held: Held,
        op: impl FnOnce(&Files) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let turn = self.turn.clone().lock_owned().await;
        self.copying(held, move |files| {
            let _turn = turn;
            op(files)
        })
        .await
    }

    /// Runs one change that copies on the blocking pool, holding `held` (the locks of what it
    /// copies from and to) until its I/O is over, but not the turn of quick changes.
    async fn copying<T: Send + 'static>(
        &self,
        held: Held,
        op: impl FnOnce(&Files) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || {
            let _held = held;
            op(&files)
        })
        .await
        .map_err(|e| BackendError::io("running a file operation")(std::io::Error::other(e)))?
    }

    async fn lock_volume(&self, id: &VolumeId) -> Held {
        self.locks
            .acquire([(Key::Volume(id.clone()), Mode::Exclusive)])
            .await
    }
}

impl Files {
    fn path(&self, id: &VolumeId, ext: &str) -> PathBuf {
        // VolumeId admits no '/', NUL or leading '.', so this stays inside the root.
        self.root.join(format!("{id}.{ext}"))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<VolumeId, VolumeInfo>> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<VolumeId, VolumeInfo>> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &VolumeId) -> Option<VolumeInfo> {
        self.read().get(id).cloned()
    }

    fn snapshot_dir(&self) -> PathBuf {
        self.root.join(SNAPSHOT_DIR)
    }

    fn snapshot_path(&self, id: &SnapshotId, ext: &str) -> PathBuf {
        // SnapshotId admits no '/', NUL or leading '.', so this stays inside the directory.
        self.snapshot_dir().join(format!("{id}.{ext}"))
    }

    fn snapshot(&self, id: &SnapshotId) -> Option<SnapshotMeta> {
        self.snapshots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn snapshots_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<SnapshotId, SnapshotMeta>> {
        self.snapshots.write().unwrap_or_else(|p| p.into_inner())
    }

    fn seam(&self) -> &dyn Faults {
        &*self.faults
    }

    fn before(&self, step: Step, id: &str) -> Result<(), Stop> {
        match self.faults.before(step, id) {
            None => Ok(()),
            Some(Fault::Crash) => Err(Stop::Crashed(step)),
            Some(Fault::Fail(kind)) => Err(Stop::Failed(BackendError::io(format!(
                "{step:?} (injected)"
            ))(kind.into()))),
        }
    }
}

#[async_trait]
impl VolumeBackend for FileBackend {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn create(&self, req: CreateRequest) -> Result<VolumeInfo, BackendError> {
        let mut locks = vec![(Key::Volume(req.id.clone()), Mode::Exclusive)];
        match &req.source {
            None => {
                let held = self.locks.acquire(locks).await;
                return self.change(held, move |files| files.create(req)).await;
            }
            Some(ContentSource::Snapshot(s)) => {
                locks.push((Key::Snapshot(s.clone()), Mode::Shared))
            }
            Some(ContentSource::Volume(v)) => locks.push((Key::Volume(v.clone()), Mode::Shared)),
        }
        if req.source == Some(ContentSource::Volume(req.id.clone())) {
            // A clone of itself: it either exists (and was not made from itself) or has
            // nothing to be made from.
            locks.truncate(1);
        }
        let held = self.locks.acquire(locks).await;
        self.copying(held, move |files| files.create(req)).await
    }

    async fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        let held = self.lock_volume(id).await;
        let id = id.clone();
        self.change(held, move |files| files.delete(&id)).await
    }

    async fn get(&self, id: &VolumeId) -> Result<Option<VolumeInfo>, BackendError> {
        Ok(self.files.get(id))
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        Ok(self.files.read().values().cloned().collect())
    }

    /// Every volume: the root (`--data-dir`) is this instance's alone, so it already scopes
    /// them to this instance; a second instance has a root of its own.
    async fn list_owned(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        self.list().await
    }

    async fn capacity(&self) -> Result<u64, BackendError> {
        let root = self.files.root.clone();
        tokio::task::spawn_blocking(move || free_bytes(&root))
            .await
            .map_err(|e| BackendError::io("reading free space")(std::io::Error::other(e)))?
    }

    async fn expand(&self, id: &VolumeId, bytes: u64) -> Result<u64, BackendError> {
        let held = self.lock_volume(id).await;
        let id = id.clone();
        self.change(held, move |files| files.expand(&id, bytes))
            .await
    }

    fn publish_context(&self, volume: &VolumeInfo) -> HashMap<String, String> {
        HashMap::from([
            ("backend".to_string(), "file".to_string()),
            (
                "imagePath".to_string(),
                self.files.path(&volume.id, IMAGE_EXT).display().to_string(),
            ),
        ])
    }

    /// A copy of the volume's image in `snapshots/`, made while holding the volume's lock
    /// shared (it is neither grown nor deleted meanwhile) and the snapshot's exclusively (a
    /// retry of the same CreateSnapshot waits for this one, then finds it made).
    async fn create_snapshot(&self, req: SnapshotRequest) -> Result<SnapshotInfo, BackendError> {
        let held = self
            .locks
            .acquire([
                (Key::Snapshot(req.id.clone()), Mode::Exclusive),
                (Key::Volume(req.source.clone()), Mode::Shared),
            ])
            .await;
        self.copying(held, move |files| files.create_snapshot(req))
            .await
    }

    /// Waits for the restores from this snapshot to finish, then deletes it.
    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), BackendError> {
        let held = self
            .locks
            .acquire([(Key::Snapshot(id.clone()), Mode::Exclusive)])
            .await;
        let id = id.clone();
        self.change(held, move |files| files.delete_snapshot(&id))
            .await
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<SnapshotInfo>, BackendError> {
        Ok(self.files.snapshot(id).map(|m| m.info()))
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, BackendError> {
        Ok(self
            .files
            .snapshots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(SnapshotMeta::info)
            .collect())
    }
}

fn free_bytes(root: &Path) -> Result<u64, BackendError> {
    let path = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| BackendError::Corrupt("file root contains NUL".into()))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a valid out-pointer.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(BackendError::io("reading free space")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

mod open;
mod point_in_time;
mod snapshots;
mod steps;
mod volumes;

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod durability_tests;

#[cfg(test)]
mod quiesce_tests;
