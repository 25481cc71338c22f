//! The embedded default backend: one sparse file per volume under `--file-root`, with its
//! metadata in a JSON file beside it.
//!
//! Owns the files under its root and nothing else. A volume exists exactly when its `<id>.json`
//! does, and every change is a sequence of steps of which each is durable before the next, so a
//! crash at any point leaves each volume whole or absent, never half made:
//! - create writes and syncs `<id>.img.partial` and `<id>.json.partial`, renames the image into
//!   place, syncs the directory, then renames the metadata (the commit point) and syncs the
//!   directory again. A create that fails undoes itself, metadata first;
//! - delete removes the metadata (the commit point), syncs the directory, then removes the image;
//!   the volume leaves the index only once its files are gone, so a failed delete is retried in
//!   full rather than answered OK with its metadata still on disk;
//! - expand grows and syncs the image, writes and syncs `<id>.json.partial` with the new size,
//!   renames it over the metadata (the commit point) and syncs the directory. An image larger
//!   than its metadata says is harmless: the retried expand finishes.
//!
//! At open, leftovers of an interrupted change are cleaned: `*.partial` files and images without
//! metadata are removed. What cannot be served (metadata without its image, metadata that cannot
//! be read or that names another volume) is moved with its image to `<root>/quarantine/` and
//! logged at warn; every other volume is served. Quarantined files are never touched again.
//!
//! Never blocks an async thread. File I/O runs on tokio's blocking pool. Changes (create,
//! delete, expand) take turns on one async lock, held until their I/O is done even if the caller
//! gave up waiting, so two changes never interleave in the directory. Reads (`get`, `list`,
//! `publish_context`) copy from an in-memory index that is locked only to read or swap an entry,
//! never across I/O, so a read never waits for a disk.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use async_trait::async_trait;

use super::{BackendError, CreateRequest, VolumeBackend, VolumeInfo};
use crate::ids::VolumeId;

const IMAGE_EXT: &str = "img";
const META_EXT: &str = "json";
const PARTIAL_EXT: &str = "partial";
/// Where open moves what it cannot serve.
const QUARANTINE_DIR: &str = "quarantine";

/// A step of a file operation, named for the action about to happen. Tests stop, fail or stall
/// an operation just before one through [`Faults`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Create: `<id>.img.partial` is written (sized and synced) next.
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

/// The test seam of the file backend: consulted just before each [`Step`], on the thread doing
/// the operation's I/O. Production uses [`NoFaults`]. A test may also block in `before` to stall
/// an operation in the middle of its I/O.
pub trait Faults: Send + Sync + 'static {
    fn before(&self, step: Step, volume: &VolumeId) -> Option<Fault>;
}

/// Every step runs.
pub struct NoFaults;

impl Faults for NoFaults {
    fn before(&self, _: Step, _: &VolumeId) -> Option<Fault> {
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
}

/// The root and the index; what the blocking tasks work on.
struct Files {
    root: PathBuf,
    /// The visible volumes. Locked only to copy or swap entries, never across I/O.
    index: RwLock<BTreeMap<VolumeId, VolumeInfo>>,
    faults: Arc<dyn Faults>,
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
        let index = load(&root)?;
        let files = Files {
            root,
            index: RwLock::new(index),
            faults,
        };
        Ok(Self {
            files: Arc::new(files),
            turn: Arc::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.files.root
    }

    /// Runs one change to the directory on the blocking pool, after the changes before it.
    async fn change<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Files) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let turn = self.turn.clone().lock_owned().await;
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            op(&files)
        })
        .await
        .map_err(|e| BackendError::io("running a file operation")(std::io::Error::other(e)))?
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

    fn before(&self, step: Step, volume: &VolumeId) -> Result<(), Stop> {
        match self.faults.before(step, volume) {
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
        };
        if let Err(stop) = self.create_files(&info) {
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
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Open removes it, or quarantines metadata left without its image.
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot clean up after a failed create")
                }
            }
        }
        let _ = sync_dir(&self.root);
    }

    fn create_files(&self, info: &VolumeInfo) -> Result<(), Stop> {
        let image = self.path(&info.id, IMAGE_EXT);
        let meta = self.path(&info.id, META_EXT);
        let image_partial = self.path(&info.id, &format!("{IMAGE_EXT}.{PARTIAL_EXT}"));
        let meta_partial = self.path(&info.id, &format!("{META_EXT}.{PARTIAL_EXT}"));
        self.before(Step::CreateWriteImage, &info.id)?;
        let file =
            std::fs::File::create(&image_partial).map_err(BackendError::io("creating image"))?;
        file.set_len(info.capacity_bytes)
            .map_err(BackendError::io("sizing image"))?;
        file.sync_all().map_err(BackendError::io("syncing image"))?;
        self.before(Step::CreateWriteMetadata, &info.id)?;
        write_meta(&meta_partial, info)?;
        self.before(Step::CreateRenameImage, &info.id)?;
        std::fs::rename(&image_partial, &image).map_err(BackendError::io("committing image"))?;
        self.before(Step::CreateSyncImage, &info.id)?;
        sync_dir(&self.root)?;
        self.before(Step::CreateRenameMetadata, &info.id)?;
        std::fs::rename(&meta_partial, &meta).map_err(BackendError::io("committing metadata"))?;
        self.before(Step::CreateSyncMetadata, &info.id)?;
        Ok(sync_dir(&self.root)?)
    }

    fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        if self.get(id).is_none() {
            return Ok(());
        }
        self.before(Step::DeleteRemoveMetadata, id)?;
        remove_if_present(&self.path(id, META_EXT))
            .map_err(BackendError::io("removing metadata"))?;
        self.before(Step::DeleteSyncMetadata, id)?;
        sync_dir(&self.root)?;
        self.before(Step::DeleteRemoveImage, id)?;
        remove_if_present(&self.path(id, IMAGE_EXT)).map_err(BackendError::io("removing image"))?;
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
        self.before(Step::ExpandGrowImage, id)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(id, IMAGE_EXT))
            .map_err(BackendError::io("opening image"))?;
        file.set_len(bytes)
            .map_err(BackendError::io("growing image"))?;
        file.sync_all().map_err(BackendError::io("syncing image"))?;
        let mut grown = info;
        grown.capacity_bytes = bytes;
        let partial = self.path(id, &format!("{META_EXT}.{PARTIAL_EXT}"));
        self.before(Step::ExpandWriteMetadata, id)?;
        write_meta(&partial, &grown)?;
        self.before(Step::ExpandRenameMetadata, id)?;
        std::fs::rename(&partial, self.path(id, META_EXT))
            .map_err(BackendError::io("committing metadata"))?;
        self.before(Step::ExpandSyncMetadata, id)?;
        sync_dir(&self.root)?;
        self.write().insert(id.clone(), grown);
        Ok(bytes)
    }
}

/// Reads the root at open: cleans leftovers of interrupted changes, quarantines what cannot be
/// served, and returns the volumes that remain. Only an unreadable root is an error.
fn load(root: &Path) -> Result<BTreeMap<VolumeId, VolumeInfo>, BackendError> {
    let entries = std::fs::read_dir(root).map_err(BackendError::io(format!(
        "reading file root {}",
        root.display()
    )))?;
    let (mut metas, mut images) = (Vec::new(), Vec::new());
    let mut changed = false;
    for entry in entries {
        let entry = entry.map_err(BackendError::io("reading file root"))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = entry.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some(PARTIAL_EXT) => {
                tracing::info!(path = %path.display(), "removing leftover of an interrupted change");
                changed = true;
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove leftover");
                }
            }
            Some(META_EXT) => metas.push(path),
            Some(IMAGE_EXT) => images.push(path),
            _ => {}
        }
    }
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
        quarantine(root, &meta, &image, &problem);
    }
    for image in images {
        if !described.contains(&stem(&image)) && image.exists() {
            tracing::info!(path = %image.display(), "removing image without metadata (an interrupted create or delete)");
            changed = true;
            if let Err(e) = std::fs::remove_file(&image) {
                tracing::warn!(path = %image.display(), error = %e, "cannot remove image without metadata");
            }
        }
    }
    if changed {
        sync_dir(root)?;
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
/// numbered suffix. If the move fails, both stay where they are, unserved.
fn quarantine(root: &Path, meta: &Path, image: &Path, problem: &str) {
    let dir = root.join(QUARANTINE_DIR);
    let moved = std::fs::create_dir_all(&dir).and_then(|()| {
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
            std::fs::rename(file, &to)?;
            moved.push(to.display().to_string());
        }
        std::fs::File::open(&dir)?.sync_all()?;
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

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn read_meta(path: &Path) -> Result<VolumeInfo, BackendError> {
    let bytes =
        std::fs::read(path).map_err(BackendError::io(format!("reading {}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| BackendError::Corrupt(format!("{}: {e}", path.display())))
}

fn write_meta(path: &Path, info: &VolumeInfo) -> Result<(), BackendError> {
    use std::io::Write;
    let bytes =
        serde_json::to_vec_pretty(info).map_err(|e| BackendError::Corrupt(e.to_string()))?;
    let mut file = std::fs::File::create(path).map_err(BackendError::io("writing metadata"))?;
    file.write_all(&bytes)
        .map_err(BackendError::io("writing metadata"))?;
    file.sync_all()
        .map_err(BackendError::io("syncing metadata"))
}

fn sync_dir(dir: &Path) -> Result<(), BackendError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(BackendError::io("syncing file root"))
}

#[async_trait]
impl VolumeBackend for FileBackend {
    fn kind(&self) -> &'static str {
        "file"
    }

    async fn create(&self, req: CreateRequest) -> Result<VolumeInfo, BackendError> {
        self.change(move |files| files.create(req)).await
    }

    async fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        let id = id.clone();
        self.change(move |files| files.delete(&id)).await
    }

    async fn get(&self, id: &VolumeId) -> Result<Option<VolumeInfo>, BackendError> {
        Ok(self.files.get(id))
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        Ok(self.files.read().values().cloned().collect())
    }

    async fn capacity(&self) -> Result<u64, BackendError> {
        let root = self.files.root.clone();
        tokio::task::spawn_blocking(move || free_bytes(&root))
            .await
            .map_err(|e| BackendError::io("reading free space")(std::io::Error::other(e)))?
    }

    async fn expand(&self, id: &VolumeId, bytes: u64) -> Result<u64, BackendError> {
        let id = id.clone();
        self.change(move |files| files.expand(&id, bytes)).await
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
    use std::sync::mpsc;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::{Fault, Faults, Step};
    use crate::ids::VolumeId;

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
        fn before(&self, step: Step, volume: &VolumeId) -> Option<Fault> {
            if step == self.step && volume.as_str() == self.volume {
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
        fn before(&self, step: Step, volume: &VolumeId) -> Option<Fault> {
            let mut armed = self.0.lock().unwrap();
            match *armed {
                Some((at, v, fault)) if at == step && v == volume.as_str() => {
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
        fn before(&self, step: Step, _: &VolumeId) -> Option<Fault> {
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
        backend.delete(&id).await.unwrap();
        assert_eq!(
            taken(),
            [DeleteRemoveMetadata, DeleteSyncMetadata, DeleteRemoveImage],
            "the metadata goes first: never metadata without its image"
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

    #[tokio::test]
    async fn capacity_reports_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        assert!(backend.capacity().await.unwrap() > 0);
    }
}
