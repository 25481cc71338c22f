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

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::copy::{copy_still, try_reflink, Copied, CopyError, Writers};
use super::locks::{Held, Key, Locks, Mode};
use super::quiesce::{Quiesced, Quiescer, FREEZE_WINDOW};
use super::{
    BackendError, ContentSource, CreateRequest, SnapshotInfo, SnapshotRequest, VolumeBackend,
    VolumeInfo,
};
use crate::ids::{SnapshotId, VolumeId};

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

/// A step of a file operation, named for the action about to happen. Tests stop, fail or stall
/// an operation just before one through [`Faults`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Create: `<id>.img.partial` is written (sized, or copied from the source, and synced)
    /// next.
    CreateWriteImage,
    /// Create: `<id>.json.partial` is written (and synced) next.
    CreateWriteMetadata,
    /// Create: both partial files are synced; the image is renamed into place next.
    CreateRenameImage,
    /// Create: the image is in place; the directory is synced next, so that name is durable.
    CreateSyncImage,
    /// Create: the image is durably in place; the metadata is renamed next (the commit point).
    CreateRenameMetadata,
    /// Create: committed; the directory is synced next.
    CreateSyncMetadata,
    /// Delete: the metadata is removed next (the commit point).
    DeleteRemoveMetadata,
    /// Delete: the metadata is gone; the directory is synced next.
    DeleteSyncMetadata,
    /// Delete: the volume is durably gone; its image is removed next.
    DeleteRemoveImage,
    /// Expand: the image is grown (and synced) next.
    ExpandGrowImage,
    /// Expand: the image is grown; `<id>.json.partial` with the new size is written next.
    ExpandWriteMetadata,
    /// Expand: the new metadata is renamed over the old next (the commit point).
    ExpandRenameMetadata,
    /// Expand: committed; the directory is synced next.
    ExpandSyncMetadata,
    /// Snapshot: `snapshots/<id>.img.partial` is copied from the volume (and synced) next.
    SnapshotCopyImage,
    /// Snapshot: the volume, in use on this node without reflinks, is frozen for the copy
    /// ([`FileBackend::quiesce_with`]); the image is copied next.
    SnapshotCopyFrozen,
    /// Snapshot: `snapshots/<id>.json.partial` is written (and synced) next.
    SnapshotWriteMetadata,
    /// Snapshot: the image is renamed into place next.
    SnapshotRenameImage,
    /// Snapshot: the image is in place; the directory is synced next.
    SnapshotSyncImage,
    /// Snapshot: the metadata is renamed into place next (the commit point: it is ready).
    SnapshotRenameMetadata,
    /// Snapshot: committed; the directory is synced next.
    SnapshotSyncMetadata,
    /// Snapshot delete: the metadata is removed next (the commit point).
    SnapshotDeleteMetadata,
    /// Snapshot delete: the metadata is gone; the directory is synced next.
    SnapshotDeleteSync,
    /// Snapshot delete: the snapshot is durably gone; its image is removed next.
    SnapshotDeleteImage,
}

/// What a test makes happen at a [`Step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The process dies here: the operation stops at once, cleans nothing up and changes no
    /// in-memory state. Use the backend no more; open the root again, as a restart would.
    Crash,
    /// The step fails with an I/O error of this kind; the operation handles it as a real one.
    Fail(std::io::ErrorKind),
}

/// A change to the disk, or the flush that makes changes durable, as the backend made it;
/// reported to [`Faults::done`] right after it succeeded. Paths are absolute.
///
/// The name a new file gets when it is made (a `.partial`) is not reported: it matters only
/// once the file is renamed into place, and the sync of the directory after that rename makes
/// the new name durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Io {
    /// A file's content changed: made, sized, copied into, grown or written.
    Wrote(PathBuf),
    /// A file's content was flushed (`fsync` of the file).
    SyncedFile(PathBuf),
    /// A directory was made in its parent.
    MadeDir(PathBuf),
    /// A name was moved: the directories of both names changed.
    Renamed { from: PathBuf, to: PathBuf },
    /// A name was removed from its directory.
    Removed(PathBuf),
    /// A directory's names were flushed (`fsync` of the directory): every change of a name in
    /// it before this is durable.
    SyncedDir(PathBuf),
}

/// The test seam of the file backend: consulted just before each [`Step`] of the volume or
/// snapshot `id`, on the thread doing the operation's I/O, and told of each change to the disk
/// and each flush in the order they happened. Production uses [`NoFaults`]. A test may also
/// block in `before` to stall an operation in the middle of its I/O.
pub trait Faults: Send + Sync + 'static {
    fn before(&self, step: Step, id: &str) -> Option<Fault>;

    /// Called after each [`Io`], at open too; what a test records to check that each change
    /// was durable before the next.
    fn done(&self, _io: &Io) {}
}

/// Every step runs.
pub struct NoFaults;

impl Faults for NoFaults {
    fn before(&self, _: Step, _: &str) -> Option<Fault> {
        None
    }
}

/// How an operation that met a fault ends.
enum Stop {
    Crashed(Step),
    Failed(BackendError),
}

impl From<BackendError> for Stop {
    fn from(e: BackendError) -> Self {
        Self::Failed(e)
    }
}

impl From<Stop> for BackendError {
    fn from(stop: Stop) -> Self {
        match stop {
            Stop::Crashed(step) => Self::Corrupt(format!("simulated crash before {step:?}")),
            Stop::Failed(e) => e,
        }
    }
}

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

/// A snapshot's metadata file.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct SnapshotMeta {
    id: SnapshotId,
    /// The CreateSnapshot name it was made for.
    name: String,
    source: VolumeId,
    size_bytes: u64,
    #[serde(with = "super::humantime_serde_compat")]
    created_at: SystemTime,
}

impl SnapshotMeta {
    fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            source: Some(self.source.clone()),
            size_bytes: self.size_bytes,
            created_at: Some(self.created_at),
            ready: true,
        }
    }
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

    fn create(&self, req: CreateRequest) -> Result<VolumeInfo, BackendError> {
        let size = req.size()?;
        if let Some(existing) = self.get(&req.id) {
            req.check_compatible(&existing)?;
            return Ok(existing);
        }
        let source = match &req.source {
            None => None,
            // The image of what it is made from, and that image's size.
            Some(ContentSource::Snapshot(s)) => {
                let meta = self
                    .snapshot(s)
                    .ok_or_else(|| BackendError::SnapshotNotFound(s.clone()))?;
                Some((self.snapshot_path(s, IMAGE_EXT), meta.size_bytes))
            }
            Some(ContentSource::Volume(v)) => {
                let info = self
                    .get(v)
                    .ok_or_else(|| BackendError::NotFound(v.clone()))?;
                Some((self.path(v, IMAGE_EXT), info.capacity_bytes))
            }
        };
        let size = match &source {
            Some((_, bytes)) => req.size_from(*bytes)?,
            None => size,
        };
        if let Some(file) = [IMAGE_EXT, META_EXT]
            .map(|ext| self.path(&req.id, ext))
            .into_iter()
            .find(|path| path.exists())
        {
            return Err(BackendError::Corrupt(format!(
                "{} belongs to a volume that is not served (see the log of the last start); move \
                 it away before creating {} again",
                file.display(),
                req.id
            )));
        }
        let available = free_bytes(&self.root)?;
        if size > available {
            return Err(BackendError::OutOfRange(format!(
                "requested {size} bytes but only {available} are free under {}",
                self.root.display()
            )));
        }
        let info = VolumeInfo {
            id: req.id,
            name: req.name,
            capacity_bytes: size,
            capabilities: req.capabilities,
            parameters: req.parameters,
            created_at: SystemTime::now(),
            source: req.source,
        };
        let made = match source {
            None => self.create_files(&info, |image| {
                image
                    .set_len(info.capacity_bytes)
                    .map_err(|e| BackendError::io("sizing image")(e).into())
            }),
            Some((from, bytes)) => {
                let from = std::fs::File::open(&from)
                    .map_err(BackendError::io(format!("opening {}", from.display())))?;
                self.create_files(&info, |image| {
                    let source = info.source.as_ref().expect("a source was found");
                    self.copy(&from, image, bytes, source, None)?;
                    image
                        .set_len(info.capacity_bytes)
                        .map_err(|e| BackendError::io("sizing image")(e).into())
                })
            }
        };
        if let Err(stop) = made {
            if let Stop::Failed(_) = stop {
                self.undo_create(&info.id);
            }
            return Err(stop.into());
        }
        self.write().insert(info.id.clone(), info.clone());
        Ok(info)
    }

    /// Removes what a failed create left, metadata first so that no step leaves metadata
    /// without its image. The id was not in the index, so no file of it belongs to anyone else.
    fn undo_create(&self, id: &VolumeId) {
        for ext in [
            META_EXT.to_string(),
            format!("{META_EXT}.{PARTIAL_EXT}"),
            IMAGE_EXT.to_string(),
            format!("{IMAGE_EXT}.{PARTIAL_EXT}"),
        ] {
            let path = self.path(id, &ext);
            // Open removes it, or quarantines metadata left without its image.
            if let Err(e) = remove_if_present(self.seam(), &path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot clean up after a failed create");
            }
        }
        // Best effort: what a crash brings back, open cleans up.
        if let Err(e) = sync_dir(self.seam(), &self.root) {
            tracing::warn!(error = %e, "cannot sync the file root after a failed create");
        }
    }

    /// Writes a volume's files; `fill` gives the new image its size and content.
    fn create_files(
        &self,
        info: &VolumeInfo,
        fill: impl FnOnce(&std::fs::File) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        let id = info.id.as_str();
        let image = self.path(&info.id, IMAGE_EXT);
        let meta = self.path(&info.id, META_EXT);
        let image_partial = self.path(&info.id, &format!("{IMAGE_EXT}.{PARTIAL_EXT}"));
        let meta_partial = self.path(&info.id, &format!("{META_EXT}.{PARTIAL_EXT}"));
        let seam = self.seam();
        self.before(Step::CreateWriteImage, id)?;
        let file = new_file(seam, &image_partial).map_err(BackendError::io("creating image"))?;
        fill(&file)?;
        wrote(seam, &image_partial);
        sync_file(seam, &file, &image_partial).map_err(BackendError::io("syncing image"))?;
        self.before(Step::CreateWriteMetadata, id)?;
        write_json(seam, &meta_partial, info)?;
        self.before(Step::CreateRenameImage, id)?;
        rename(seam, &image_partial, &image).map_err(BackendError::io("committing image"))?;
        self.before(Step::CreateSyncImage, id)?;
        sync_dir(seam, &self.root)?;
        self.before(Step::CreateRenameMetadata, id)?;
        rename(seam, &meta_partial, &meta).map_err(BackendError::io("committing metadata"))?;
        self.before(Step::CreateSyncMetadata, id)?;
        Ok(sync_dir(seam, &self.root)?)
    }

    /// Copies the first `len` bytes of `source`'s image `from` into `to` as one point in time:
    /// a reflink; else a sparse copy of an image nobody writes, or, for a volume staged by the
    /// node plugin in this process, a sparse copy while that plugin holds its filesystem frozen
    /// (consulting `frozen_step` inside the freeze). An image in use that can be neither
    /// reflinked nor frozen is [`BackendError::InUse`], saying what to do instead.
    fn copy(
        &self,
        from: &std::fs::File,
        to: &std::fs::File,
        len: u64,
        source: &ContentSource,
        frozen_step: Option<(Step, &str)>,
    ) -> Result<Copied, Stop> {
        let refused = |hint: &str, e: CopyError| -> Stop {
            Stop::Failed(match e {
                CopyError::Io(e) => BackendError::io(format!("copying {source}"))(e),
                CopyError::Busy(why) => {
                    BackendError::InUse(format!("cannot copy {source} now: {why}; {hint}"))
                }
                CopyError::Thawed => BackendError::InUse(format!(
                    "cannot copy {source} now: {}; {hint}",
                    CopyError::Thawed
                )),
            })
        };
        if let Some(copied) = try_reflink(from, to, len).map_err(|e| refused("", e))? {
            return Ok(copied);
        }
        let volume = match (source, self.quiescer.get()) {
            (ContentSource::Volume(v), Some((quiescer, window))) => Some((v, quiescer, *window)),
            _ => None,
        };
        let Some((volume, quiescer, window)) = volume else {
            return copy_still(from, to, len, Writers::Unknown)
                .map_err(|e| refused(NO_NODE_PLUGIN, e));
        };
        let hold = match quiescer.quiesce(volume, window) {
            Ok(Quiesced::Frozen(hold)) => hold,
            Ok(Quiesced::NotInUse) => {
                return copy_still(from, to, len, Writers::Unknown)
                    .map_err(|e| refused(NOT_STAGED, e));
            }
            Ok(Quiesced::Unfreezable(why)) => {
                return copy_still(from, to, len, Writers::Unknown).map_err(|e| refused(&why, e));
            }
            Err(e) => {
                return Err(Stop::Failed(BackendError::InUse(format!(
                    "cannot copy {source} now: it is staged on this node and could not be frozen \
                     for the copy: {e}; {REFLINK_HINT}"
                ))));
            }
        };
        if let Some((step, id)) = frozen_step {
            self.before(step, id)?;
        }
        let still = || hold.still();
        let copied = copy_still(from, to, len, Writers::Held(&still)).map_err(|e| {
            let hint = format!(
                "it was frozen for at most {window:?}: pause or stop the VM using it and retry, \
                 or {REFLINK_HINT}"
            );
            refused(&hint, e)
        })?;
        drop(hold);
        tracing::info!(volume_id = %volume, bytes_copied = copied.bytes_copied, "copied while its filesystem was frozen");
        Ok(copied)
    }

    fn create_snapshot(&self, req: SnapshotRequest) -> Result<SnapshotInfo, BackendError> {
        if let Some(meta) = self.snapshot(&req.id) {
            if meta.name != req.name {
                return Err(BackendError::AlreadyExists(format!(
                    "snapshot {} exists for the name {:?}, not {:?}",
                    req.id, meta.name, req.name
                )));
            }
            if meta.source != req.source {
                return Err(BackendError::AlreadyExists(format!(
                    "snapshot {:?} exists, of volume {}, not of {}",
                    req.name, meta.source, req.source
                )));
            }
            return Ok(meta.info());
        }
        if let Some(file) = [IMAGE_EXT, META_EXT]
            .map(|ext| self.snapshot_path(&req.id, ext))
            .into_iter()
            .find(|path| path.exists())
        {
            return Err(BackendError::Corrupt(format!(
                "{} belongs to a snapshot that is not served (see the log of the last start); \
                 move it away before creating {} again",
                file.display(),
                req.id
            )));
        }
        let source = self
            .get(&req.source)
            .ok_or_else(|| BackendError::NotFound(req.source.clone()))?;
        make_dir(self.seam(), &self.root, &self.snapshot_dir())
            .map_err(BackendError::io("making snapshots/"))?;
        let meta = SnapshotMeta {
            id: req.id,
            name: req.name,
            source: req.source,
            size_bytes: source.capacity_bytes,
            created_at: SystemTime::now(),
        };
        if let Err(stop) = self.snapshot_files(&meta) {
            if let Stop::Failed(_) = stop {
                self.undo_snapshot(&meta.id);
            }
            return Err(stop.into());
        }
        self.snapshots_mut().insert(meta.id.clone(), meta.clone());
        tracing::info!(snapshot_id = %meta.id, volume_id = %meta.source, bytes = meta.size_bytes, "snapshot taken");
        Ok(meta.info())
    }

    /// Writes a snapshot's files, the same steps as a volume's.
    fn snapshot_files(&self, meta: &SnapshotMeta) -> Result<(), Stop> {
        let id = meta.id.as_str();
        let dir = self.snapshot_dir();
        let image = self.snapshot_path(&meta.id, IMAGE_EXT);
        let json = self.snapshot_path(&meta.id, META_EXT);
        let image_partial = self.snapshot_path(&meta.id, &format!("{IMAGE_EXT}.{PARTIAL_EXT}"));
        let json_partial = self.snapshot_path(&meta.id, &format!("{META_EXT}.{PARTIAL_EXT}"));
        let source = self.path(&meta.source, IMAGE_EXT);
        let from = std::fs::File::open(&source)
            .map_err(BackendError::io(format!("opening {}", source.display())))?;
        let seam = self.seam();
        self.before(Step::SnapshotCopyImage, id)?;
        let file =
            new_file(seam, &image_partial).map_err(BackendError::io("creating snapshot image"))?;
        let copied = self.copy(
            &from,
            &file,
            meta.size_bytes,
            &ContentSource::Volume(meta.source.clone()),
            Some((Step::SnapshotCopyFrozen, id)),
        )?;
        tracing::debug!(snapshot_id = %meta.id, method = copied.method.name(), bytes_copied = copied.bytes_copied, "snapshot image copied");
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o444))
            .map_err(BackendError::io("making the snapshot image read-only"))?;
        wrote(seam, &image_partial);
        sync_file(seam, &file, &image_partial)
            .map_err(BackendError::io("syncing snapshot image"))?;
        self.before(Step::SnapshotWriteMetadata, id)?;
        write_json(seam, &json_partial, meta)?;
        self.before(Step::SnapshotRenameImage, id)?;
        rename(seam, &image_partial, &image)
            .map_err(BackendError::io("committing snapshot image"))?;
        self.before(Step::SnapshotSyncImage, id)?;
        sync_dir(seam, &dir)?;
        self.before(Step::SnapshotRenameMetadata, id)?;
        rename(seam, &json_partial, &json)
            .map_err(BackendError::io("committing snapshot metadata"))?;
        self.before(Step::SnapshotSyncMetadata, id)?;
        Ok(sync_dir(seam, &dir)?)
    }

    /// Removes what a failed snapshot left, metadata first.
    fn undo_snapshot(&self, id: &SnapshotId) {
        for ext in [
            META_EXT.to_string(),
            format!("{META_EXT}.{PARTIAL_EXT}"),
            IMAGE_EXT.to_string(),
            format!("{IMAGE_EXT}.{PARTIAL_EXT}"),
        ] {
            let path = self.snapshot_path(id, &ext);
            if let Err(e) = remove_if_present(self.seam(), &path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot clean up after a failed snapshot");
            }
        }
        // Best effort: what a crash brings back, open cleans up.
        if let Err(e) = sync_dir(self.seam(), &self.snapshot_dir()) {
            tracing::warn!(error = %e, "cannot sync snapshots/ after a failed snapshot");
        }
    }

    fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), BackendError> {
        if self.snapshot(id).is_none() {
            return Ok(());
        }
        let key = id.as_str();
        let seam = self.seam();
        let dir = self.snapshot_dir();
        self.before(Step::SnapshotDeleteMetadata, key)?;
        remove_if_present(seam, &self.snapshot_path(id, META_EXT))
            .map_err(BackendError::io("removing snapshot metadata"))?;
        self.before(Step::SnapshotDeleteSync, key)?;
        sync_dir(seam, &dir)?;
        self.before(Step::SnapshotDeleteImage, key)?;
        remove_if_present(seam, &self.snapshot_path(id, IMAGE_EXT))
            .map_err(BackendError::io("removing snapshot image"))?;
        sync_dir(seam, &dir)?;
        self.snapshots_mut().remove(id);
        tracing::info!(snapshot_id = %id, "snapshot deleted");
        Ok(())
    }

    fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        if self.get(id).is_none() {
            return Ok(());
        }
        let seam = self.seam();
        self.before(Step::DeleteRemoveMetadata, id.as_str())?;
        remove_if_present(seam, &self.path(id, META_EXT))
            .map_err(BackendError::io("removing metadata"))?;
        self.before(Step::DeleteSyncMetadata, id.as_str())?;
        sync_dir(seam, &self.root)?;
        self.before(Step::DeleteRemoveImage, id.as_str())?;
        remove_if_present(seam, &self.path(id, IMAGE_EXT))
            .map_err(BackendError::io("removing image"))?;
        sync_dir(seam, &self.root)?;
        self.write().remove(id);
        Ok(())
    }

    fn expand(&self, id: &VolumeId, bytes: u64) -> Result<u64, BackendError> {
        let info = self
            .get(id)
            .ok_or_else(|| BackendError::NotFound(id.clone()))?;
        if bytes < info.capacity_bytes {
            return Err(BackendError::OutOfRange(format!(
                "volume {id} is {} bytes; shrinking it to {bytes} is not supported",
                info.capacity_bytes
            )));
        }
        if bytes == info.capacity_bytes {
            return Ok(bytes);
        }
        let seam = self.seam();
        let image = self.path(id, IMAGE_EXT);
        self.before(Step::ExpandGrowImage, id.as_str())?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .map_err(BackendError::io("opening image"))?;
        file.set_len(bytes)
            .map_err(BackendError::io("growing image"))?;
        wrote(seam, &image);
        sync_file(seam, &file, &image).map_err(BackendError::io("syncing image"))?;
        let mut grown = info;
        grown.capacity_bytes = bytes;
        let partial = self.path(id, &format!("{META_EXT}.{PARTIAL_EXT}"));
        self.before(Step::ExpandWriteMetadata, id.as_str())?;
        write_json(seam, &partial, &grown)?;
        self.before(Step::ExpandRenameMetadata, id.as_str())?;
        rename(seam, &partial, &self.path(id, META_EXT))
            .map_err(BackendError::io("committing metadata"))?;
        self.before(Step::ExpandSyncMetadata, id.as_str())?;
        sync_dir(seam, &self.root)?;
        self.write().insert(id.clone(), grown);
        Ok(bytes)
    }
}

/// The files of one directory read at open.
struct Scan {
    metas: Vec<PathBuf>,
    images: Vec<PathBuf>,
    /// Leftovers were removed.
    changed: bool,
}

/// Sorts a directory's files into metadata and images, and removes the leftovers (`.partial`)
/// of interrupted changes of the kind `what`. Subdirectories are not looked into.
fn scan(
    seam: &dyn Faults,
    entries: std::fs::ReadDir,
    dir: &str,
    what: &str,
) -> Result<Scan, BackendError> {
    let mut found = Scan {
        metas: Vec::new(),
        images: Vec::new(),
        changed: false,
    };
    for entry in entries {
        let entry = entry.map_err(BackendError::io(format!("reading {dir}")))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some(PARTIAL_EXT) => {
                tracing::info!(path = %path.display(), "removing leftover of an interrupted {what}");
                found.changed = true;
                if let Err(e) = remove_if_present(seam, &path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove leftover");
                }
            }
            Some(META_EXT) => found.metas.push(path),
            Some(IMAGE_EXT) => found.images.push(path),
            _ => {}
        }
    }
    Ok(found)
}

/// Removes the images no metadata file describes (`what`: "image" or "snapshot image"), the
/// leftovers of an interrupted `change`. Answers whether it removed any.
fn remove_undescribed(
    seam: &dyn Faults,
    images: Vec<PathBuf>,
    described: &std::collections::HashSet<String>,
    what: &str,
    change: &str,
) -> bool {
    let mut removed = false;
    for image in images {
        if !described.contains(&stem(&image)) && image.exists() {
            tracing::info!(path = %image.display(), "removing {what} without metadata (an interrupted {change})");
            removed = true;
            if let Err(e) = remove_if_present(seam, &image) {
                tracing::warn!(path = %image.display(), error = %e, "cannot remove {what} without metadata");
            }
        }
    }
    removed
}

/// Reads the root at open: cleans leftovers of interrupted changes, quarantines what cannot be
/// served, and returns the volumes that remain. Only an unreadable root is an error.
fn load(seam: &dyn Faults, root: &Path) -> Result<BTreeMap<VolumeId, VolumeInfo>, BackendError> {
    let entries = std::fs::read_dir(root).map_err(BackendError::io(format!(
        "reading file root {}",
        root.display()
    )))?;
    let Scan {
        metas,
        images,
        mut changed,
    } = scan(seam, entries, "file root", "change")?;
    let mut index = BTreeMap::new();
    // Stems of every metadata file found, served or not: their images are never orphans.
    let mut described = std::collections::HashSet::new();
    for meta in metas {
        let stem = stem(&meta);
        described.insert(stem.clone());
        let image = root.join(format!("{stem}.{IMAGE_EXT}"));
        let problem = match (VolumeId::try_from(stem.as_str()), read_meta(&meta)) {
            (Err(_), _) => format!("{stem:?} is not a volume id"),
            (_, Err(e)) => format!("its metadata cannot be read: {e}"),
            (Ok(id), Ok(info)) if info.id != id => {
                format!("its metadata names volume {}", info.id)
            }
            (Ok(_), Ok(_)) if !image.is_file() => {
                format!("its image {stem}.{IMAGE_EXT} is missing")
            }
            (Ok(id), Ok(info)) => {
                index.insert(id, info);
                continue;
            }
        };
        changed = true;
        quarantine(seam, root, &meta, &image, &problem);
    }
    changed |= remove_undescribed(seam, images, &described, "image", "create or delete");
    if changed {
        sync_dir(seam, root)?;
    }
    Ok(index)
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Moves a volume's metadata, and its image if there is one, to `<root>/quarantine/`, so it is
/// neither served nor cleaned up; an operator decides. A name already taken there gets a
/// numbered suffix. If the move fails, both stay where they are, unserved. The quarantine is
/// durable before anything is moved into it, and what is moved is durable there when this
/// returns; the directory it left is synced by the caller, once all are moved.
fn quarantine(seam: &dyn Faults, root: &Path, meta: &Path, image: &Path, problem: &str) {
    let dir = root.join(QUARANTINE_DIR);
    let moved = make_dir(seam, root, &dir).and_then(|()| {
        let mut moved = Vec::new();
        for file in [meta, image] {
            let Some(name) = file.file_name() else {
                continue;
            };
            if !file.exists() {
                continue;
            }
            let mut to = dir.join(name);
            let mut n = 0;
            while to.exists() {
                n += 1;
                to = dir.join(format!("{}.{n}", name.to_string_lossy()));
            }
            rename(seam, file, &to)?;
            moved.push(to.display().to_string());
        }
        sync_dir_io(seam, &dir)?;
        Ok(moved)
    });
    match moved {
        Ok(moved) => tracing::warn!(
            metadata = %meta.display(), problem, moved_to = ?moved,
            "quarantined a volume that cannot be served: not served, files kept for an operator"
        ),
        Err(e) => tracing::error!(
            metadata = %meta.display(), problem, error = %e,
            "cannot quarantine a volume that cannot be served: not served, files left in place"
        ),
    }
}

/// Removes `path`; a name already gone is not an error.
fn remove_if_present(seam: &dyn Faults, path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            seam.done(&Io::Removed(path.to_path_buf()));
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Moves `from` to `to`, replacing what `to` named. Durable only once the directories of both
/// are synced.
fn rename(seam: &dyn Faults, from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    seam.done(&Io::Renamed {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
    });
    Ok(())
}

/// Flushes `file`'s content, so a rename of it after this names what was written.
fn sync_file(seam: &dyn Faults, file: &std::fs::File, path: &Path) -> std::io::Result<()> {
    file.sync_all()?;
    seam.done(&Io::SyncedFile(path.to_path_buf()));
    Ok(())
}

/// Reports that `path`'s content changed (sized, copied into, grown): it is not durable until
/// [`sync_file`].
fn wrote(seam: &dyn Faults, path: &Path) {
    seam.done(&Io::Wrote(path.to_path_buf()));
}

/// Makes `dir` in `parent` unless it is there, and syncs `parent`, so nothing is put in a
/// directory that a crash could lose.
fn make_dir(seam: &dyn Faults, parent: &Path, dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    seam.done(&Io::MadeDir(dir.to_path_buf()));
    sync_dir_io(seam, parent)
}

/// Flushes `dir`'s names: every rename, removal and new name in it before this is durable.
fn sync_dir_io(seam: &dyn Faults, dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all())?;
    seam.done(&Io::SyncedDir(dir.to_path_buf()));
    Ok(())
}

fn sync_dir(seam: &dyn Faults, dir: &Path) -> Result<(), BackendError> {
    sync_dir_io(seam, dir).map_err(BackendError::io(format!("syncing {}", dir.display())))
}

fn read_meta(path: &Path) -> Result<VolumeInfo, BackendError> {
    let bytes =
        std::fs::read(path).map_err(BackendError::io(format!("reading {}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| BackendError::Corrupt(format!("{}: {e}", path.display())))
}

/// Writes `value` as the JSON file `path` and syncs it, so a rename of it names all of it.
fn write_json(
    seam: &dyn Faults,
    path: &Path,
    value: &impl serde::Serialize,
) -> Result<(), BackendError> {
    use std::io::Write;
    let bytes =
        serde_json::to_vec_pretty(value).map_err(|e| BackendError::Corrupt(e.to_string()))?;
    let mut file = std::fs::File::create(path).map_err(BackendError::io("writing metadata"))?;
    file.write_all(&bytes)
        .map_err(BackendError::io("writing metadata"))?;
    wrote(seam, path);
    sync_file(seam, &file, path).map_err(BackendError::io("syncing metadata"))
}

/// A new, empty file for an image, opened to read and write (a reflink needs that), replacing
/// a leftover of an interrupted change.
fn new_file(seam: &dyn Faults, path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    wrote(seam, path);
    Ok(file)
}

/// Reads `<root>/snapshots/` at open, as [`load`] reads the root: leftovers of interrupted
/// snapshots are removed, what cannot be served is quarantined, the rest is returned.
fn load_snapshots(
    seam: &dyn Faults,
    root: &Path,
) -> Result<BTreeMap<SnapshotId, SnapshotMeta>, BackendError> {
    let dir = root.join(SNAPSHOT_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => {
            return Err(BackendError::io(format!("reading {}", dir.display()))(e));
        }
    };
    let Scan {
        metas,
        images,
        mut changed,
    } = scan(seam, entries, "snapshots/", "snapshot")?;
    let mut index = BTreeMap::new();
    let mut described = std::collections::HashSet::new();
    for meta in metas {
        let stem = stem(&meta);
        described.insert(stem.clone());
        let image = dir.join(format!("{stem}.{IMAGE_EXT}"));
        let read = std::fs::read(&meta)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<SnapshotMeta>(&b).map_err(|e| e.to_string()));
        let problem = match (SnapshotId::try_from(stem.as_str()), read) {
            (Err(_), _) => format!("{stem:?} is not a snapshot id"),
            (_, Err(e)) => format!("its metadata cannot be read: {e}"),
            (Ok(id), Ok(m)) if m.id != id => format!("its metadata names snapshot {}", m.id),
            (Ok(_), Ok(_)) if !image.is_file() => {
                format!("its image {stem}.{IMAGE_EXT} is missing")
            }
            (Ok(id), Ok(m)) => {
                index.insert(id, m);
                continue;
            }
        };
        changed = true;
        quarantine(seam, root, &meta, &image, &problem);
    }
    changed |= remove_undescribed(
        seam,
        images,
        &described,
        "snapshot image",
        "snapshot or delete",
    );
    if changed {
        sync_dir(seam, &dir)?;
    }
    Ok(index)
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

/// Test seams built on [`Faults`].
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};
    use std::sync::mpsc;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::{Fault, Faults, Io, Step};

    /// Every step and every change to the disk, in the order they happened.
    #[derive(Default)]
    pub(crate) struct Journal(Mutex<Vec<Entry>>);

    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) enum Entry {
        Step(Step),
        Io(Io),
    }

    impl Journal {
        /// What was recorded since the last take.
        pub(crate) fn take(&self) -> Vec<Entry> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl Faults for Journal {
        fn before(&self, step: Step, _: &str) -> Option<Fault> {
            self.0.lock().unwrap().push(Entry::Step(step));
            None
        }

        fn done(&self, io: &Io) {
            self.0.lock().unwrap().push(Entry::Io(io.clone()));
        }
    }

    /// How one call must order its changes of names.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Order {
        /// Each change of a name is durable (its directories synced) before the next change
        /// of a name and before the call returns: the steps of a create, expand, delete or
        /// snapshot, where a later name relies on an earlier one.
        EachBeforeTheNext,
        /// Changes may be batched, as long as all are durable before the call returns: open's
        /// cleanup, whose removals and moves do not rely on one another.
        AllBeforeReturn,
    }

    /// `path` relative to `root`, for messages and expectations (`.` for the root itself).
    pub(crate) fn rel(root: &Path, path: &Path) -> String {
        match path.strip_prefix(root) {
            Ok(p) if p.as_os_str().is_empty() => ".".into(),
            Ok(p) => p.display().to_string(),
            Err(_) => path.display().to_string(),
        }
    }

    /// The changes of names in `log`, one line each ("rename a b", "remove a", "mkdir d"),
    /// relative to `root`.
    pub(crate) fn changes(log: &[Entry], root: &Path) -> Vec<String> {
        log.iter()
            .filter_map(|entry| match entry {
                Entry::Io(Io::Renamed { from, to }) => {
                    Some(format!("rename {} {}", rel(root, from), rel(root, to)))
                }
                Entry::Io(Io::Removed(p)) => Some(format!("remove {}", rel(root, p))),
                Entry::Io(Io::MadeDir(p)) => Some(format!("mkdir {}", rel(root, p))),
                _ => None,
            })
            .collect()
    }

    /// The durability rules the recorded call `log` broke, one line each; empty when it kept
    /// them all. The rules, for what survives a power loss on a POSIX filesystem (a file's
    /// content is durable once it is synced, a name once its directory is):
    /// - no name changes while a file written in this call is not synced since, so a file is
    ///   never renamed into place, nor named by metadata, before its content is durable;
    /// - nothing is put into a directory this call made before that directory's parent is
    ///   synced;
    /// - with [`Order::EachBeforeTheNext`], no name changes before the directories of the
    ///   change before it are synced;
    /// - the call returns only once every file it wrote and every directory it changed is
    ///   synced.
    pub(crate) fn broken(log: &[Entry], root: &Path, order: Order) -> Vec<String> {
        let mut broken = Vec::new();
        let mut dirty: BTreeSet<PathBuf> = BTreeSet::new();
        let mut unsynced: BTreeSet<PathBuf> = BTreeSet::new();
        let mut made: BTreeSet<PathBuf> = BTreeSet::new();
        let at = |p: &Path| rel(root, p);
        let parent = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
        for entry in log {
            let Entry::Io(io) = entry else { continue };
            let (what, dirs, removed): (String, Vec<PathBuf>, Option<&PathBuf>) = match io {
                Io::Wrote(p) => {
                    dirty.insert(p.clone());
                    continue;
                }
                Io::SyncedFile(p) => {
                    dirty.remove(p);
                    continue;
                }
                Io::SyncedDir(d) => {
                    unsynced.remove(d);
                    made.retain(|m| m.parent() != Some(d.as_path()));
                    continue;
                }
                Io::Renamed { from, to } => (
                    format!("rename {} {}", at(from), at(to)),
                    vec![parent(from), parent(to)],
                    None,
                ),
                Io::Removed(p) => (format!("remove {}", at(p)), vec![parent(p)], Some(p)),
                Io::MadeDir(p) => (format!("mkdir {}", at(p)), vec![parent(p)], None),
            };
            for p in dirty.iter().filter(|p| Some(*p) != removed) {
                broken.push(format!(
                    "`{what}` while {} was written and not synced",
                    at(p)
                ));
            }
            for m in made.iter().filter(|m| dirs.contains(m)) {
                broken.push(format!(
                    "`{what}` inside {} before its parent was synced",
                    at(m)
                ));
            }
            if order == Order::EachBeforeTheNext {
                for d in &unsynced {
                    broken.push(format!(
                        "`{what}` before the change before it was made durable (sync of {})",
                        at(d)
                    ));
                }
            }
            if let Some(p) = removed {
                dirty.remove(p);
            }
            if let Io::Renamed { from, to } = io {
                if dirty.remove(from) {
                    dirty.insert(to.clone());
                }
            }
            if let Io::MadeDir(p) = io {
                made.insert(p.clone());
            }
            unsynced.extend(dirs);
        }
        for p in &dirty {
            broken.push(format!("returned with {} written and not synced", at(p)));
        }
        for d in &unsynced {
            broken.push(format!(
                "returned before the changes in {} were made durable",
                at(d)
            ));
        }
        broken
    }

    /// Stalls one volume's operation just before `step`, as a disk that stops answering would,
    /// until the test releases it. It blocks the thread doing the I/O, for real.
    pub(crate) struct Stall {
        step: Step,
        volume: &'static str,
        entered: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
        release: Mutex<mpsc::Receiver<()>>,
    }

    /// Sending on it (or dropping it) lets the stalled operation go on.
    pub(crate) type Release = mpsc::Sender<()>;

    impl Stall {
        /// The seam, the release, and a future that resolves once the operation is stalled.
        pub(crate) fn new(
            step: Step,
            volume: &'static str,
        ) -> (Self, Release, tokio::sync::oneshot::Receiver<()>) {
            let (release, waiting) = mpsc::channel();
            let (entered, stalled) = tokio::sync::oneshot::channel();
            let stall = Self {
                step,
                volume,
                entered: Mutex::new(Some(entered)),
                release: Mutex::new(waiting),
            };
            (stall, release, stalled)
        }
    }

    impl Faults for Stall {
        fn before(&self, step: Step, volume: &str) -> Option<Fault> {
            if step == self.step && volume == self.volume {
                if let Some(entered) = self.entered.lock().unwrap().take() {
                    let _ = entered.send(());
                }
                // Bounded only so that a backend that stalls its caller's thread fails the test
                // (by completing in the wrong order) instead of hanging it; a correct backend
                // is released long before.
                let _ = self
                    .release
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(20));
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AccessMode, Capability};

    fn req(id: &str, bytes: u64) -> CreateRequest {
        CreateRequest {
            id: VolumeId::try_from(id).unwrap(),
            name: id.to_string(),
            required_bytes: bytes,
            limit_bytes: 0,
            capabilities: vec![Capability::block(AccessMode::SingleNodeWriter)],
            parameters: BTreeMap::new(),
            source: None,
        }
    }

    #[tokio::test]
    async fn create_is_sparse_idempotent_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        let a = backend.create(req("vol-a", 10 << 30)).await.unwrap();
        assert_eq!(a.capacity_bytes, 10 << 30);
        let again = backend.create(req("vol-a", 1 << 30)).await.unwrap();
        assert_eq!(again, a, "same name, compatible size: the existing volume");
        let meta = std::fs::metadata(dir.path().join("vol-a.img")).unwrap();
        assert_eq!(meta.len(), 10 << 30);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "image must be sparse");
        drop(backend);
        let reopened = FileBackend::open(dir.path()).unwrap();
        assert_eq!(reopened.list().await.unwrap(), vec![a]);
    }

    #[tokio::test]
    async fn incompatible_repeat_is_already_exists() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        backend.create(req("v", 1 << 20)).await.unwrap();
        let mut bigger = req("v", 2 << 20);
        assert!(matches!(
            backend.create(bigger.clone()).await,
            Err(BackendError::AlreadyExists(_))
        ));
        bigger.required_bytes = 1 << 20;
        bigger.capabilities = vec![Capability::block(AccessMode::MultiNodeMultiWriter)];
        assert!(matches!(
            backend.create(bigger).await,
            Err(BackendError::AlreadyExists(_))
        ));
        let mut limited = req("v", 0);
        limited.limit_bytes = 1 << 19;
        assert!(matches!(
            backend.create(limited).await,
            Err(BackendError::AlreadyExists(_))
        ));
    }

    #[tokio::test]
    async fn required_above_limit_is_out_of_range() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        let mut r = req("v", 2 << 20);
        r.limit_bytes = 1 << 20;
        assert!(matches!(
            backend.create(r).await,
            Err(BackendError::OutOfRange(_))
        ));
        assert!(backend.list().await.unwrap().is_empty());
    }

    /// Makes one step of one volume's operations crash or fail, once.
    struct FaultOnce(std::sync::Mutex<Option<(Step, &'static str, Fault)>>);

    impl FaultOnce {
        fn new(step: Step, volume: &'static str, fault: Fault) -> Arc<Self> {
            Arc::new(Self(std::sync::Mutex::new(Some((step, volume, fault)))))
        }
    }

    impl Faults for FaultOnce {
        fn before(&self, step: Step, volume: &str) -> Option<Fault> {
            let mut armed = self.0.lock().unwrap();
            match *armed {
                Some((at, v, fault)) if at == step && v == volume => {
                    *armed = None;
                    Some(fault)
                }
                _ => None,
            }
        }
    }

    /// Every step taken, in order.
    #[derive(Default)]
    struct Record(std::sync::Mutex<Vec<Step>>);

    impl Faults for Record {
        fn before(&self, step: Step, _: &str) -> Option<Fault> {
            self.0.lock().unwrap().push(step);
            None
        }
    }

    /// The names under `dir`, sorted; directories end with '/'.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .map(|e| {
                        let e = e.unwrap();
                        let name = e.file_name().to_string_lossy().into_owned();
                        if e.file_type().unwrap().is_dir() {
                            name + "/"
                        } else {
                            name
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    async fn ids(backend: &FileBackend) -> Vec<String> {
        let volumes = backend.list().await.unwrap();
        volumes.iter().map(|v| v.id.to_string()).collect()
    }

    const FAIL: Fault = Fault::Fail(std::io::ErrorKind::Other);

    /// A root holding the volume `keep` and, unless `only_keep`, the volume `v` of 1 MiB.
    async fn root_with(only_keep: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        backend.create(req("keep", 1 << 20)).await.unwrap();
        if !only_keep {
            backend.create(req("v", 1 << 20)).await.unwrap();
        }
        dir
    }

    #[tokio::test]
    async fn every_change_makes_each_step_durable_before_the_next() {
        use Step::*;
        let dir = tempfile::tempdir().unwrap();
        let record = Arc::new(Record::default());
        let backend = FileBackend::open_with_faults(dir.path(), record.clone()).unwrap();
        let id = VolumeId::try_from("v").unwrap();
        let taken = || std::mem::take(&mut *record.0.lock().unwrap());
        backend.create(req("v", 1 << 20)).await.unwrap();
        assert_eq!(
            taken(),
            [
                CreateWriteImage,
                CreateWriteMetadata,
                CreateRenameImage,
                CreateSyncImage,
                CreateRenameMetadata,
                CreateSyncMetadata
            ],
            "the image's name is durable before the metadata names it"
        );
        backend.expand(&id, 2 << 20).await.unwrap();
        assert_eq!(
            taken(),
            [
                ExpandGrowImage,
                ExpandWriteMetadata,
                ExpandRenameMetadata,
                ExpandSyncMetadata
            ]
        );
        let snapshot = SnapshotRequest {
            id: SnapshotId::for_name("s").unwrap(),
            name: "s".into(),
            source: id.clone(),
            parameters: BTreeMap::new(),
        };
        backend.create_snapshot(snapshot.clone()).await.unwrap();
        assert_eq!(
            taken(),
            [
                SnapshotCopyImage,
                SnapshotWriteMetadata,
                SnapshotRenameImage,
                SnapshotSyncImage,
                SnapshotRenameMetadata,
                SnapshotSyncMetadata
            ],
            "a snapshot's image is durable before its metadata names it"
        );
        backend.delete_snapshot(&snapshot.id).await.unwrap();
        assert_eq!(
            taken(),
            [
                SnapshotDeleteMetadata,
                SnapshotDeleteSync,
                SnapshotDeleteImage
            ]
        );
        backend.delete(&id).await.unwrap();
        assert_eq!(
            taken(),
            [DeleteRemoveMetadata, DeleteSyncMetadata, DeleteRemoveImage],
            "the metadata goes first: never metadata without its image"
        );
    }

    /// A backend on `dir` whose seam journals every step and change, and the journal, empty.
    fn journaled(dir: &Path) -> (FileBackend, Arc<testing::Journal>) {
        let journal = Arc::new(testing::Journal::default());
        let backend = FileBackend::open_with_faults(dir, journal.clone()).unwrap();
        journal.take();
        (backend, journal)
    }

    /// The changes to the disk in `log`, one line each, relative to `root`.
    fn ios(log: &[testing::Entry], root: &Path) -> Vec<String> {
        let at = |p: &Path| testing::rel(root, p);
        log.iter()
            .filter_map(|entry| match entry {
                testing::Entry::Step(_) => None,
                testing::Entry::Io(io) => Some(match io {
                    Io::Wrote(p) => format!("write {}", at(p)),
                    Io::SyncedFile(p) => format!("fsync {}", at(p)),
                    Io::MadeDir(p) => format!("mkdir {}", at(p)),
                    Io::Renamed { from, to } => format!("rename {} {}", at(from), at(to)),
                    Io::Removed(p) => format!("remove {}", at(p)),
                    Io::SyncedDir(p) => format!("fsync dir {}", at(p)),
                }),
            })
            .collect()
    }

    /// Checks the call just journaled: first that it broke no durability rule
    /// ([`testing::broken`]), then that it did exactly `want` (so the rules were checked on the
    /// sequence meant, not on nothing). With [`testing::Order::AllBeforeReturn`] the order of
    /// `want` is not checked.
    fn assert_durable(
        journal: &testing::Journal,
        root: &Path,
        order: testing::Order,
        want: &[&str],
    ) {
        let log = journal.take();
        let broken = testing::broken(&log, root, order);
        assert!(
            broken.is_empty(),
            "durability rules broken:\n{}",
            broken.join("\n")
        );
        let mut did = ios(&log, root);
        let mut want: Vec<String> = want.iter().map(|w| w.to_string()).collect();
        if order == testing::Order::AllBeforeReturn {
            did.sort();
            want.sort();
        }
        assert_eq!(did, want);
        let steps = testing::changes(&log, root);
        assert!(!steps.is_empty(), "the call changed some name");
    }

    /// A create's image and metadata are synced before either is renamed into place, the
    /// image's name is durable before the metadata (the commit point) names it, and the
    /// metadata's before the create answers.
    ///
    /// Catches: removing `sync_file` of the image in `create_files` (`write v.img.partial`
    /// unsynced at the rename), `sync_file` in `write_json`, the `sync_dir` after the image's
    /// rename (`CreateSyncImage`) or the last `sync_dir` of `create_files`.
    #[tokio::test]
    async fn a_create_makes_each_change_durable_before_the_next_step() {
        let dir = tempfile::tempdir().unwrap();
        let (backend, journal) = journaled(dir.path());
        backend.create(req("v", 1 << 20)).await.unwrap();
        assert_durable(
            &journal,
            backend.root(),
            testing::Order::EachBeforeTheNext,
            &[
                "write v.img.partial",
                "write v.img.partial",
                "fsync v.img.partial",
                "write v.json.partial",
                "fsync v.json.partial",
                "rename v.img.partial v.img",
                "fsync dir .",
                "rename v.json.partial v.json",
                "fsync dir .",
            ],
        );
    }

    /// A restore and a clone are creates whose image is a copy: the copy is synced before
    /// it is renamed into place, and each name is durable before the next step.
    ///
    /// Catches: the same lines as
    /// [`a_create_makes_each_change_durable_before_the_next_step`], on the copying path.
    #[tokio::test]
    async fn a_restore_and_a_clone_make_each_change_durable_before_the_next_step() {
        let dir = root_with(false).await;
        let (backend, journal) = journaled(dir.path());
        backend.create_snapshot(snap_req("s", "v")).await.unwrap();
        journal.take();
        let mut restore = req("r", 1 << 20);
        restore.source = Some(ContentSource::Snapshot(snap_req("s", "v").id));
        let mut clone = req("c", 1 << 20);
        clone.source = Some(ContentSource::Volume(VolumeId::try_from("v").unwrap()));
        for (r, id) in [(restore, "r"), (clone, "c")] {
            backend.create(r).await.unwrap();
            assert_durable(
                &journal,
                backend.root(),
                testing::Order::EachBeforeTheNext,
                &[
                    format!("write {id}.img.partial").as_str(),
                    &format!("write {id}.img.partial"),
                    &format!("fsync {id}.img.partial"),
                    &format!("write {id}.json.partial"),
                    &format!("fsync {id}.json.partial"),
                    &format!("rename {id}.img.partial {id}.img"),
                    "fsync dir .",
                    &format!("rename {id}.json.partial {id}.json"),
                    "fsync dir .",
                ],
            );
        }
    }

    /// An expand syncs the grown image before the metadata with the new size is renamed over
    /// the old (the commit point), and that rename is durable before the expand answers.
    ///
    /// Catches: removing `sync_file` of the grown image in `expand`, or its `sync_dir`.
    #[tokio::test]
    async fn an_expand_makes_each_change_durable_before_the_next_step() {
        let dir = root_with(false).await;
        let (backend, journal) = journaled(dir.path());
        let id = VolumeId::try_from("v").unwrap();
        backend.expand(&id, 2 << 20).await.unwrap();
        assert_durable(
            &journal,
            backend.root(),
            testing::Order::EachBeforeTheNext,
            &[
                "write v.img",
                "fsync v.img",
                "write v.json.partial",
                "fsync v.json.partial",
                "rename v.json.partial v.json",
                "fsync dir .",
            ],
        );
    }

    /// A delete's removal of the metadata (the commit point) is durable before the image is
    /// removed, and the image's removal before the delete answers.
    ///
    /// Catches: removing either `sync_dir` of `delete`.
    #[tokio::test]
    async fn a_delete_makes_each_change_durable_before_the_next_step() {
        let dir = root_with(false).await;
        let (backend, journal) = journaled(dir.path());
        backend
            .delete(&VolumeId::try_from("v").unwrap())
            .await
            .unwrap();
        assert_durable(
            &journal,
            backend.root(),
            testing::Order::EachBeforeTheNext,
            &[
                "remove v.json",
                "fsync dir .",
                "remove v.img",
                "fsync dir .",
            ],
        );
    }

    /// A snapshot is made like a volume, in `snapshots/`, which is itself durable in the root
    /// before anything is put in it; a snapshot delete is durable step by step like a volume's.
    ///
    /// Catches: removing `sync_file` of the copied image in `snapshot_files`, either of its
    /// `sync_dir`s, the parent's sync in `make_dir`, or either `sync_dir` of
    /// `delete_snapshot`.
    #[tokio::test]
    async fn a_snapshot_and_its_delete_make_each_change_durable_before_the_next_step() {
        use testing::Order::EachBeforeTheNext;
        let dir = root_with(false).await;
        let (backend, journal) = journaled(dir.path());
        let root = backend.root().to_path_buf();
        let snap = |name: &str| {
            let id = snap_id(name);
            [
                format!("write snapshots/{id}.img.partial"),
                format!("write snapshots/{id}.img.partial"),
                format!("fsync snapshots/{id}.img.partial"),
                format!("write snapshots/{id}.json.partial"),
                format!("fsync snapshots/{id}.json.partial"),
                format!("rename snapshots/{id}.img.partial snapshots/{id}.img"),
                "fsync dir snapshots".to_string(),
                format!("rename snapshots/{id}.json.partial snapshots/{id}.json"),
                "fsync dir snapshots".to_string(),
            ]
        };
        backend.create_snapshot(snap_req("s", "v")).await.unwrap();
        let first: Vec<String> = ["mkdir snapshots", "fsync dir ."]
            .map(String::from)
            .into_iter()
            .chain(snap("s"))
            .collect();
        let first: Vec<&str> = first.iter().map(String::as_str).collect();
        assert_durable(&journal, &root, EachBeforeTheNext, &first);

        backend.create_snapshot(snap_req("t", "v")).await.unwrap();
        let second = snap("t");
        let second: Vec<&str> = second.iter().map(String::as_str).collect();
        assert_durable(&journal, &root, EachBeforeTheNext, &second);

        backend
            .delete_snapshot(&snap_req("s", "v").id)
            .await
            .unwrap();
        let id = snap_id("s");
        assert_durable(
            &journal,
            &root,
            EachBeforeTheNext,
            &[
                &format!("remove snapshots/{id}.json"),
                "fsync dir snapshots",
                &format!("remove snapshots/{id}.img"),
                "fsync dir snapshots",
            ],
        );
    }

    /// Open's cleanup (leftovers removed, what cannot be served quarantined) is durable before
    /// open returns, and the quarantine is durable in the root before anything is moved into
    /// it, also when only a snapshot is quarantined.
    ///
    /// Catches: removing the `sync_dir` at the end of `load` or of `load_snapshots`, the sync
    /// of the quarantine in `quarantine`, or the parent's sync in `make_dir`.
    #[tokio::test]
    async fn open_makes_its_cleanup_durable_before_it_serves() {
        use testing::Order::AllBeforeReturn;
        let dir = root_with(false).await;
        let backend = FileBackend::open(dir.path()).unwrap();
        backend.create(req("lost", 1 << 20)).await.unwrap();
        backend.create_snapshot(snap_req("s", "v")).await.unwrap();
        drop(backend);
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::remove_file(root.join("lost.img")).unwrap();
        std::fs::write(root.join("orphan.img"), b"").unwrap();
        std::fs::write(root.join("half.json.partial"), b"{}").unwrap();
        let snapshots = root.join(SNAPSHOT_DIR);
        std::fs::write(snapshots.join("snap-x.img.partial"), b"").unwrap();

        let journal = Arc::new(testing::Journal::default());
        FileBackend::open_with_faults(&root, journal.clone()).unwrap();
        assert_durable(
            &journal,
            &root,
            AllBeforeReturn,
            &[
                "remove half.json.partial",
                "mkdir quarantine",
                "fsync dir .",
                "rename lost.json quarantine/lost.json",
                "fsync dir quarantine",
                "remove orphan.img",
                "fsync dir .",
                "remove snapshots/snap-x.img.partial",
                "fsync dir snapshots",
            ],
        );

        // Only a snapshot to quarantine: the quarantine is made while reading snapshots/.
        let dir = root_with(false).await;
        let backend = FileBackend::open(dir.path()).unwrap();
        backend.create_snapshot(snap_req("s", "v")).await.unwrap();
        drop(backend);
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let id = snap_id("s");
        std::fs::remove_file(root.join(SNAPSHOT_DIR).join(format!("{id}.img"))).unwrap();
        let journal = Arc::new(testing::Journal::default());
        FileBackend::open_with_faults(&root, journal.clone()).unwrap();
        assert_durable(
            &journal,
            &root,
            AllBeforeReturn,
            &[
                "mkdir quarantine",
                "fsync dir .",
                &format!("rename snapshots/{id}.json quarantine/{id}.json"),
                "fsync dir quarantine",
                "fsync dir snapshots",
            ],
        );
    }

    #[tokio::test]
    async fn a_crash_at_any_step_of_create_leaves_the_volume_whole_or_absent() {
        use Step::*;
        let keep = ["keep.img", "keep.json"];
        for (step, at_crash, committed) in [
            (CreateWriteImage, vec![], false),
            (CreateWriteMetadata, vec!["v.img.partial"], false),
            (
                CreateRenameImage,
                vec!["v.img.partial", "v.json.partial"],
                false,
            ),
            (CreateSyncImage, vec!["v.img", "v.json.partial"], false),
            (CreateRenameMetadata, vec!["v.img", "v.json.partial"], false),
            (CreateSyncMetadata, vec!["v.img", "v.json"], true),
        ] {
            let dir = root_with(true).await;
            let faults = FaultOnce::new(step, "v", Fault::Crash);
            let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
            assert!(
                backend.create(req("v", 1 << 20)).await.is_err(),
                "{step:?}: the crash happened"
            );
            drop(backend);
            let mut files: Vec<&str> = keep.into_iter().chain(at_crash).collect();
            files.sort();
            assert_eq!(names(dir.path()), files, "{step:?}: on disk at the crash");

            let reopened = FileBackend::open(dir.path()).unwrap();
            let (want_ids, want_files) = if committed {
                (
                    vec!["keep", "v"],
                    vec!["keep.img", "keep.json", "v.img", "v.json"],
                )
            } else {
                (vec!["keep"], keep.to_vec())
            };
            assert_eq!(ids(&reopened).await, want_ids, "{step:?}: visible");
            assert_eq!(names(dir.path()), want_files, "{step:?}: after open");
            // The CO retries CreateVolume: it succeeds and the volume is whole.
            reopened.create(req("v", 1 << 20)).await.unwrap();
            assert_eq!(
                std::fs::metadata(dir.path().join("v.img")).unwrap().len(),
                1 << 20,
                "{step:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_create_that_fails_at_any_step_leaves_nothing_behind() {
        use Step::*;
        for step in [
            CreateWriteImage,
            CreateWriteMetadata,
            CreateRenameImage,
            CreateSyncImage,
            CreateRenameMetadata,
            CreateSyncMetadata,
        ] {
            let dir = root_with(true).await;
            let faults = FaultOnce::new(step, "v", FAIL);
            let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
            let err = backend.create(req("v", 1 << 20)).await.unwrap_err();
            assert!(matches!(err, BackendError::Io { .. }), "{step:?}: {err}");
            assert_eq!(ids(&backend).await, ["keep"], "{step:?}");
            assert_eq!(
                names(dir.path()),
                ["keep.img", "keep.json"],
                "{step:?}: cleaned up"
            );
            backend.create(req("v", 1 << 20)).await.unwrap();
            drop(backend);
            let reopened = FileBackend::open(dir.path()).unwrap();
            assert_eq!(ids(&reopened).await, ["keep", "v"], "{step:?}");
        }
    }

    #[tokio::test]
    async fn a_crash_at_any_step_of_delete_leaves_the_volume_whole_or_gone() {
        use Step::*;
        for (step, at_crash, gone) in [
            (DeleteRemoveMetadata, vec!["v.img", "v.json"], false),
            (DeleteSyncMetadata, vec!["v.img"], true),
            (DeleteRemoveImage, vec!["v.img"], true),
        ] {
            let dir = root_with(false).await;
            let faults = FaultOnce::new(step, "v", Fault::Crash);
            let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
            let id = VolumeId::try_from("v").unwrap();
            assert!(backend.delete(&id).await.is_err(), "{step:?}");
            drop(backend);
            let mut files: Vec<&str> = ["keep.img", "keep.json"]
                .into_iter()
                .chain(at_crash)
                .collect();
            files.sort();
            assert_eq!(names(dir.path()), files, "{step:?}: on disk at the crash");

            let reopened = FileBackend::open(dir.path()).unwrap();
            let want: &[&str] = if gone { &["keep"] } else { &["keep", "v"] };
            assert_eq!(ids(&reopened).await, want, "{step:?}: visible");
            reopened.delete(&id).await.unwrap();
            assert_eq!(names(dir.path()), ["keep.img", "keep.json"], "{step:?}");
        }
    }

    #[tokio::test]
    async fn a_delete_that_failed_is_retried_until_its_files_are_gone() {
        use Step::*;
        for step in [DeleteRemoveMetadata, DeleteSyncMetadata, DeleteRemoveImage] {
            let dir = root_with(false).await;
            let faults = FaultOnce::new(step, "v", FAIL);
            let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
            let id = VolumeId::try_from("v").unwrap();
            let err = backend.delete(&id).await.unwrap_err();
            assert!(matches!(err, BackendError::Io { .. }), "{step:?}: {err}");
            assert!(
                backend.get(&id).await.unwrap().is_some(),
                "{step:?}: not deleted until its files are"
            );
            backend.delete(&id).await.unwrap();
            assert!(backend.get(&id).await.unwrap().is_none(), "{step:?}");
            assert_eq!(names(dir.path()), ["keep.img", "keep.json"], "{step:?}");
            drop(backend);
            let reopened = FileBackend::open(dir.path()).unwrap();
            assert_eq!(ids(&reopened).await, ["keep"], "{step:?}: it stays deleted");
        }
    }

    #[tokio::test]
    async fn a_crash_at_any_step_of_expand_leaves_the_old_size_or_the_new() {
        use Step::*;
        for (step, grown) in [
            (ExpandGrowImage, false),
            (ExpandWriteMetadata, false),
            (ExpandRenameMetadata, false),
            (ExpandSyncMetadata, true),
        ] {
            let dir = root_with(false).await;
            let faults = FaultOnce::new(step, "v", Fault::Crash);
            let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
            let id = VolumeId::try_from("v").unwrap();
            assert!(backend.expand(&id, 4 << 20).await.is_err(), "{step:?}");
            drop(backend);

            let reopened = FileBackend::open(dir.path()).unwrap();
            let size = reopened.get(&id).await.unwrap().unwrap().capacity_bytes;
            assert_eq!(size, if grown { 4 << 20 } else { 1 << 20 }, "{step:?}");
            assert_eq!(
                names(dir.path()),
                ["keep.img", "keep.json", "v.img", "v.json"],
                "{step:?}"
            );
            let image = std::fs::metadata(dir.path().join("v.img")).unwrap().len();
            assert!(
                image >= size,
                "{step:?}: the image holds what the metadata says"
            );
            assert_eq!(reopened.expand(&id, 4 << 20).await.unwrap(), 4 << 20);
            assert_eq!(
                std::fs::metadata(dir.path().join("v.img")).unwrap().len(),
                4 << 20
            );
        }
    }

    #[tokio::test]
    async fn an_expand_that_failed_changes_nothing_visible_and_can_be_retried() {
        use Step::*;
        for step in [
            ExpandGrowImage,
            ExpandWriteMetadata,
            ExpandRenameMetadata,
            ExpandSyncMetadata,
        ] {
            let dir = root_with(false).await;
            let faults = FaultOnce::new(step, "v", FAIL);
            let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
            let id = VolumeId::try_from("v").unwrap();
            assert!(backend.expand(&id, 4 << 20).await.is_err(), "{step:?}");
            let size = backend.get(&id).await.unwrap().unwrap().capacity_bytes;
            assert_eq!(size, 1 << 20, "{step:?}");
            assert_eq!(backend.expand(&id, 4 << 20).await.unwrap(), 4 << 20);
            drop(backend);
            let reopened = FileBackend::open(dir.path()).unwrap();
            let size = reopened.get(&id).await.unwrap().unwrap().capacity_bytes;
            assert_eq!(size, 4 << 20, "{step:?}");
            assert_eq!(
                names(dir.path()),
                ["keep.img", "keep.json", "v.img", "v.json"],
                "{step:?}"
            );
        }
    }

    /// What the backend logs while `f` runs, as text.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        (out, text)
    }

    #[tokio::test]
    async fn open_quarantines_what_it_cannot_serve_and_serves_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        for v in ["keep", "lost", "bad", "alias"] {
            backend.create(req(v, 1 << 20)).await.unwrap();
        }
        drop(backend);
        let root = dir.path();
        // Metadata without its image; unreadable metadata; metadata naming another volume;
        // leftovers of interrupted creates.
        std::fs::remove_file(root.join("lost.img")).unwrap();
        std::fs::write(root.join("bad.json"), b"{ not json").unwrap();
        std::fs::copy(root.join("keep.json"), root.join("alias.json")).unwrap();
        std::fs::write(root.join("orphan.img"), b"").unwrap();
        std::fs::write(root.join("half.json.partial"), b"{}").unwrap();

        let (backend, log) = logged(|| FileBackend::open(root));
        let backend = backend.expect("one inconsistent volume never stops the others");
        assert_eq!(ids(&backend).await, ["keep"]);
        assert_eq!(names(root), ["keep.img", "keep.json", "quarantine/"]);
        assert_eq!(
            names(&root.join("quarantine")),
            [
                "alias.img",
                "alias.json",
                "bad.img",
                "bad.json",
                "lost.json"
            ]
        );
        for (volume, why) in [
            ("lost", "its image lost.img is missing"),
            ("bad", "cannot be read"),
            ("alias", "names volume keep"),
        ] {
            let line = log
                .lines()
                .find(|l| l.contains("quarantined") && l.contains(&format!("{volume}.json")))
                .unwrap_or_else(|| panic!("no quarantine line for {volume}:\n{log}"));
            assert!(line.contains("WARN") && line.contains(why), "{line}");
        }
        drop(backend);

        let (again, log) = logged(|| FileBackend::open(root));
        assert_eq!(ids(&again.unwrap()).await, ["keep"]);
        assert!(!log.contains("quarantined"), "nothing new to move:\n{log}");
        assert_eq!(names(&root.join("quarantine")).len(), 5);
    }

    #[tokio::test]
    async fn delete_is_idempotent_and_expand_grows() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        let id = VolumeId::try_from("v").unwrap();
        backend.create(req("v", 1 << 20)).await.unwrap();
        assert_eq!(backend.expand(&id, 4 << 20).await.unwrap(), 4 << 20);
        assert_eq!(
            backend.expand(&id, 4 << 20).await.unwrap(),
            4 << 20,
            "the same size again is OK"
        );
        assert!(
            matches!(backend.expand(&id, 2 << 20).await, Err(BackendError::OutOfRange(m)) if m.contains("shrinking")),
            "never shrinks"
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("v.img")).unwrap().len(),
            4 << 20
        );
        backend.delete(&id).await.unwrap();
        backend.delete(&id).await.unwrap();
        assert!(backend.get(&id).await.unwrap().is_none());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(matches!(
            backend.expand(&id, 1).await,
            Err(BackendError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn reads_answer_while_a_create_is_stuck_in_its_io() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        let a = backend.create(req("a", 1 << 20)).await.unwrap();
        drop(backend);
        let (stall, release, stalled) = testing::Stall::new(Step::CreateRenameImage, "slow");
        let backend = std::sync::Arc::new(
            FileBackend::open_with_faults(dir.path(), std::sync::Arc::new(stall)).unwrap(),
        );
        let create = tokio::spawn({
            let backend = backend.clone();
            async move { backend.create(req("slow", 1 << 20)).await }
        });
        stalled.await.unwrap();
        let id = VolumeId::try_from("a").unwrap();
        assert_eq!(backend.get(&id).await.unwrap().as_ref(), Some(&a));
        assert_eq!(backend.list().await.unwrap(), vec![a.clone()]);
        assert!(
            !create.is_finished(),
            "the reads answered while the create was still in its I/O"
        );
        release.send(()).unwrap();
        create.await.unwrap().unwrap();
        assert_eq!(backend.list().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_create_whose_caller_gave_up_still_completes_before_the_next_change() {
        let dir = tempfile::tempdir().unwrap();
        let (stall, release, stalled) = testing::Stall::new(Step::CreateRenameImage, "slow");
        let backend = std::sync::Arc::new(
            FileBackend::open_with_faults(dir.path(), std::sync::Arc::new(stall)).unwrap(),
        );
        let create = tokio::spawn({
            let backend = backend.clone();
            async move { backend.create(req("slow", 1 << 20)).await }
        });
        stalled.await.unwrap();
        create.abort();
        assert!(create.await.unwrap_err().is_cancelled());
        let next = tokio::spawn({
            let backend = backend.clone();
            async move { backend.create(req("next", 1 << 20)).await }
        });
        release.send(()).unwrap();
        next.await.unwrap().unwrap();
        let ids: Vec<String> = backend
            .list()
            .await
            .unwrap()
            .iter()
            .map(|v| v.id.to_string())
            .collect();
        assert_eq!(ids, ["next", "slow"], "the index says what the disk has");
        assert!(dir.path().join("slow.json").exists());
    }

    #[tokio::test]
    async fn a_volume_that_cannot_be_quarantined_is_left_alone_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        backend.create(req("keep", 1 << 20)).await.unwrap();
        backend.create(req("bad", 1 << 20)).await.unwrap();
        drop(backend);
        let root = dir.path();
        std::fs::write(root.join("bad.img"), b"the only copy of someone's data").unwrap();
        std::fs::write(root.join("bad.json"), b"{ not json").unwrap();
        // The quarantine cannot be made: a file is in its way.
        std::fs::write(root.join("quarantine"), b"").unwrap();

        let (backend, log) = logged(|| FileBackend::open(root));
        let backend = backend.expect("still serves the others");
        assert_eq!(ids(&backend).await, ["keep"]);
        assert!(log.contains("cannot quarantine"), "{log}");
        let err = backend.create(req("bad", 1 << 20)).await.unwrap_err();
        assert!(
            matches!(&err, BackendError::Corrupt(m) if m.contains("bad.")),
            "{err}"
        );
        assert_eq!(
            std::fs::read(root.join("bad.img")).unwrap(),
            b"the only copy of someone's data"
        );
        assert_eq!(
            names(root),
            ["bad.img", "bad.json", "keep.img", "keep.json", "quarantine"]
        );
    }

    fn snap_req(name: &str, source: &str) -> SnapshotRequest {
        SnapshotRequest {
            id: SnapshotId::for_name(name).unwrap(),
            name: name.to_string(),
            source: VolumeId::try_from(source).unwrap(),
            parameters: BTreeMap::new(),
        }
    }

    fn snap_id(name: &str) -> &'static str {
        Box::leak(
            SnapshotId::for_name(name)
                .unwrap()
                .to_string()
                .into_boxed_str(),
        )
    }

    fn write_image(dir: &Path, volume: &str, at: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(format!("{volume}.img")))
            .unwrap();
        f.write_all_at(data, at).unwrap();
    }

    fn read_file(path: &Path, at: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; len];
        std::fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, at)
            .unwrap();
        buf
    }

    #[tokio::test]
    async fn a_crash_at_any_step_of_a_snapshot_leaves_none_that_claims_to_be_ready() {
        use Step::*;
        let id = snap_id("s");
        for (step, committed) in [
            (SnapshotCopyImage, false),
            (SnapshotWriteMetadata, false),
            (SnapshotRenameImage, false),
            (SnapshotSyncImage, false),
            (SnapshotRenameMetadata, false),
            (SnapshotSyncMetadata, true),
        ] {
            let dir = root_with(false).await;
            write_image(dir.path(), "v", 4096, b"the snapshot's moment");
            let faults = FaultOnce::new(step, id, Fault::Crash);
            let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
            assert!(
                backend.create_snapshot(snap_req("s", "v")).await.is_err(),
                "{step:?}: the crash happened"
            );
            drop(backend);

            let reopened = FileBackend::open(dir.path()).unwrap();
            let listed = reopened.list_snapshots().await.unwrap();
            let snapshots = dir.path().join(SNAPSHOT_DIR);
            if committed {
                assert_eq!(listed.len(), 1, "{step:?}");
                assert!(listed[0].ready);
            } else {
                assert!(listed.is_empty(), "{step:?}: nothing claims to be ready");
                assert!(
                    reopened
                        .get_snapshot(&snap_req("s", "v").id)
                        .await
                        .unwrap()
                        .is_none(),
                    "{step:?}"
                );
                assert_eq!(names(&snapshots), Vec::<String>::new(), "{step:?}: cleaned");
            }
            // The CO retries CreateSnapshot: it completes, with the data of the moment.
            write_image(dir.path(), "v", 8192, b"later");
            let made = reopened.create_snapshot(snap_req("s", "v")).await.unwrap();
            assert!(made.ready && made.size_bytes == 1 << 20, "{step:?}");
            assert_eq!(
                names(&snapshots),
                [format!("{id}.img"), format!("{id}.json")],
                "{step:?}"
            );
            let image = snapshots.join(format!("{id}.img"));
            assert_eq!(read_file(&image, 4096, 21), b"the snapshot's moment");
            let expect_later = !committed;
            assert_eq!(
                read_file(&image, 8192, 5) == b"later",
                expect_later,
                "{step:?}: a committed snapshot keeps its moment; a retried one takes a new one"
            );
        }
    }

    #[tokio::test]
    async fn a_snapshot_that_fails_at_any_step_leaves_nothing_and_can_be_retried() {
        use Step::*;
        let id = snap_id("s");
        for step in [
            SnapshotCopyImage,
            SnapshotWriteMetadata,
            SnapshotRenameImage,
            SnapshotSyncImage,
            SnapshotRenameMetadata,
            SnapshotSyncMetadata,
        ] {
            let dir = root_with(false).await;
            let faults = FaultOnce::new(step, id, FAIL);
            let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
            let err = backend
                .create_snapshot(snap_req("s", "v"))
                .await
                .unwrap_err();
            assert!(matches!(err, BackendError::Io { .. }), "{step:?}: {err}");
            assert!(
                backend.list_snapshots().await.unwrap().is_empty(),
                "{step:?}"
            );
            assert!(names(&dir.path().join(SNAPSHOT_DIR)).is_empty(), "{step:?}");
            backend.create_snapshot(snap_req("s", "v")).await.unwrap();
            drop(backend);
            let reopened = FileBackend::open(dir.path()).unwrap();
            assert_eq!(
                reopened.list_snapshots().await.unwrap().len(),
                1,
                "{step:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_crash_at_any_step_of_a_snapshot_delete_leaves_it_whole_or_gone() {
        use Step::*;
        let id = snap_id("s");
        for (step, gone) in [
            (SnapshotDeleteMetadata, false),
            (SnapshotDeleteSync, true),
            (SnapshotDeleteImage, true),
        ] {
            let dir = root_with(false).await;
            FileBackend::open(dir.path())
                .unwrap()
                .create_snapshot(snap_req("s", "v"))
                .await
                .unwrap();
            let faults = FaultOnce::new(step, id, Fault::Crash);
            let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
            let sid = snap_req("s", "v").id;
            assert!(backend.delete_snapshot(&sid).await.is_err(), "{step:?}");
            drop(backend);
            let reopened = FileBackend::open(dir.path()).unwrap();
            assert_eq!(
                reopened.list_snapshots().await.unwrap().is_empty(),
                gone,
                "{step:?}"
            );
            reopened.delete_snapshot(&sid).await.unwrap();
            assert!(names(&dir.path().join(SNAPSHOT_DIR)).is_empty(), "{step:?}");
        }
    }

    #[tokio::test]
    async fn deleting_a_snapshot_waits_for_a_restore_from_it() {
        let dir = root_with(false).await;
        write_image(dir.path(), "v", 0, b"restored data");
        FileBackend::open(dir.path())
            .unwrap()
            .create_snapshot(snap_req("s", "v"))
            .await
            .unwrap();
        let (stall, release, stalled) = testing::Stall::new(Step::CreateWriteImage, "r");
        let backend = Arc::new(FileBackend::open_with_faults(dir.path(), Arc::new(stall)).unwrap());
        let sid = snap_req("s", "v").id;
        let restore = tokio::spawn({
            let backend = backend.clone();
            let mut r = req("r", 2 << 20);
            r.source = Some(ContentSource::Snapshot(sid.clone()));
            async move { backend.create(r).await }
        });
        stalled.await.unwrap();
        let delete = tokio::spawn({
            let backend = backend.clone();
            let sid = sid.clone();
            async move { backend.delete_snapshot(&sid).await }
        });
        // Other work goes on meanwhile.
        backend.create(req("other", 1 << 20)).await.unwrap();
        assert!(backend.get_snapshot(&sid).await.unwrap().is_some());
        assert!(!delete.is_finished(), "the delete waits for the restore");
        release.send(()).unwrap();
        let restored = restore.await.unwrap().unwrap();
        assert_eq!(restored.capacity_bytes, 2 << 20);
        delete.await.unwrap().unwrap();
        assert!(backend.get_snapshot(&sid).await.unwrap().is_none());
        assert_eq!(
            read_file(&dir.path().join("r.img"), 0, 13),
            b"restored data"
        );
    }

    #[tokio::test]
    async fn open_quarantines_snapshots_it_cannot_serve() {
        let dir = root_with(false).await;
        let backend = FileBackend::open(dir.path()).unwrap();
        backend
            .create_snapshot(snap_req("good", "v"))
            .await
            .unwrap();
        backend
            .create_snapshot(snap_req("lost", "v"))
            .await
            .unwrap();
        drop(backend);
        let snapshots = dir.path().join(SNAPSHOT_DIR);
        std::fs::remove_file(snapshots.join(format!("{}.img", snap_id("lost")))).unwrap();
        std::fs::write(snapshots.join("snap-x.img"), b"").unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        let listed = backend.list_snapshots().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id.as_str(), snap_id("good"));
        assert_eq!(
            names(&dir.path().join(QUARANTINE_DIR)),
            [format!("{}.json", snap_id("lost"))]
        );
        assert_eq!(names(&snapshots).len(), 2, "the orphan image is removed");
    }

    #[tokio::test]
    async fn capacity_reports_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        assert!(backend.capacity().await.unwrap() > 0);
    }
}

#[cfg(test)]
#[path = "file_quiesce_tests.rs"]
mod quiesce_tests;
