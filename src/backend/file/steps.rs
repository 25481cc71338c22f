//! The crash-consistent steps of the file backend: the test seam ([`Faults`]) that names each
//! step ([`Step`]) and hears of each change to the disk ([`Io`]), and the primitives that write,
//! rename, remove and sync, each reporting what it did. Every change of a volume or snapshot is
//! made of these, so what a test records is what reached the disk.

use std::path::{Path, PathBuf};

use super::super::BackendError;

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
pub(super) enum Stop {
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

/// Removes `path`; a name already gone is not an error.
pub(super) fn remove_if_present(seam: &dyn Faults, path: &Path) -> std::io::Result<()> {
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
pub(super) fn rename(seam: &dyn Faults, from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    seam.done(&Io::Renamed {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
    });
    Ok(())
}

/// Flushes `file`'s content, so a rename of it after this names what was written.
pub(super) fn sync_file(
    seam: &dyn Faults,
    file: &std::fs::File,
    path: &Path,
) -> std::io::Result<()> {
    file.sync_all()?;
    seam.done(&Io::SyncedFile(path.to_path_buf()));
    Ok(())
}

/// Reports that `path`'s content changed (sized, copied into, grown): it is not durable until
/// [`sync_file`].
pub(super) fn wrote(seam: &dyn Faults, path: &Path) {
    seam.done(&Io::Wrote(path.to_path_buf()));
}

/// Makes `dir` in `parent` unless it is there, and syncs `parent`, so nothing is put in a
/// directory that a crash could lose.
pub(super) fn make_dir(seam: &dyn Faults, parent: &Path, dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(e),
    }
    seam.done(&Io::MadeDir(dir.to_path_buf()));
    sync_dir_io(seam, parent)
}

/// Flushes `dir`'s names: every rename, removal and new name in it before this is durable.
pub(super) fn sync_dir_io(seam: &dyn Faults, dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all())?;
    seam.done(&Io::SyncedDir(dir.to_path_buf()));
    Ok(())
}

pub(super) fn sync_dir(seam: &dyn Faults, dir: &Path) -> Result<(), BackendError> {
    sync_dir_io(seam, dir).map_err(BackendError::io(format!("syncing {}", dir.display())))
}

/// Writes `value` as the JSON file `path` and syncs it, so a rename of it names all of it.
pub(super) fn write_json(
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
pub(super) fn new_file(seam: &dyn Faults, path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    wrote(seam, path);
    Ok(file)
}
