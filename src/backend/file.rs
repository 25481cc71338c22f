//! The embedded default backend: one sparse file per volume under `--file-root`, with its
//! metadata in a JSON file beside it.
//!
//! Owns the files under its root and nothing else. A volume is visible exactly when its
//! `<id>.json` exists: create writes `<id>.img.partial` and `<id>.json.partial`, syncs them, then
//! renames the image and finally the metadata (the commit point). Delete removes the metadata
//! first. At open, leftovers of an interrupted create or delete (`*.partial`, images without
//! metadata) are removed, so a crash never leaves a half-made volume visible.
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

/// A step of a file operation, named for the action about to happen. Tests stop or stall an
/// operation just before one through [`Faults`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Create: both partial files are written and synced; the image is renamed next.
    CreateRenameImage,
    /// Create: the image is in place; the metadata is renamed next (the commit point).
    CreateRenameMetadata,
}

/// What a test makes happen at a [`Step`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The process dies here: the operation stops at once, cleans nothing up and changes no
    /// in-memory state. Use the backend no more; open the root again, as a restart would.
    Crash,
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
    /// Opens (creating if needed) the root, cleans up after interrupted operations and loads
    /// the index. Metadata that cannot be read is reported, not deleted. Blocking: call it at
    /// start-up, before serving.
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
        let mut index = BTreeMap::new();
        let entries = std::fs::read_dir(&root).map_err(BackendError::io(format!(
            "reading file root {}",
            root.display()
        )))?;
        let mut images = Vec::new();
        for entry in entries {
            let entry = entry.map_err(BackendError::io("reading file root"))?;
            let path = entry.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some(PARTIAL_EXT) => {
                    tracing::info!(path = %path.display(), "removing leftover of an interrupted create");
                    std::fs::remove_file(&path)
                        .map_err(BackendError::io("removing partial file"))?;
                }
                Some(META_EXT) => {
                    let info = read_meta(&path)?;
                    index.insert(info.id.clone(), info);
                }
                Some(IMAGE_EXT) => images.push(path),
                _ => {}
            }
        }
        for image in images {
            let orphan = image
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| VolumeId::try_from(s).ok())
                .is_none_or(|id| !index.contains_key(&id));
            if orphan {
                tracing::info!(path = %image.display(), "removing image without metadata");
                std::fs::remove_file(&image).map_err(BackendError::io("removing orphan image"))?;
            }
        }
        for id in index.keys() {
            let image = root.join(format!("{id}.{IMAGE_EXT}"));
            if !image.exists() {
                return Err(BackendError::Corrupt(format!(
                    "metadata for {id} exists but its image {} is missing",
                    image.display()
                )));
            }
        }
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
        }
    }

    fn create(&self, req: CreateRequest) -> Result<VolumeInfo, BackendError> {
        let size = req.size()?;
        if let Some(existing) = self.get(&req.id) {
            req.check_compatible(&existing)?;
            return Ok(existing);
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
                for ext in [
                    format!("{IMAGE_EXT}.{PARTIAL_EXT}"),
                    format!("{META_EXT}.{PARTIAL_EXT}"),
                    IMAGE_EXT.to_string(),
                ] {
                    let _ = std::fs::remove_file(self.path(&info.id, &ext));
                }
            }
            return Err(stop.into());
        }
        self.write().insert(info.id.clone(), info.clone());
        Ok(info)
    }

    fn create_files(&self, info: &VolumeInfo) -> Result<(), Stop> {
        let image = self.path(&info.id, IMAGE_EXT);
        let meta = self.path(&info.id, META_EXT);
        let image_partial = self.path(&info.id, &format!("{IMAGE_EXT}.{PARTIAL_EXT}"));
        let meta_partial = self.path(&info.id, &format!("{META_EXT}.{PARTIAL_EXT}"));
        let file =
            std::fs::File::create(&image_partial).map_err(BackendError::io("creating image"))?;
        file.set_len(info.capacity_bytes)
            .map_err(BackendError::io("sizing image"))?;
        file.sync_all().map_err(BackendError::io("syncing image"))?;
        write_meta(&meta_partial, info)?;
        self.before(Step::CreateRenameImage, &info.id)?;
        std::fs::rename(&image_partial, &image).map_err(BackendError::io("committing image"))?;
        self.before(Step::CreateRenameMetadata, &info.id)?;
        std::fs::rename(&meta_partial, &meta).map_err(BackendError::io("committing metadata"))?;
        Ok(sync_dir(&self.root)?)
    }

    fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        if self.write().remove(id).is_none() {
            return Ok(());
        }
        std::fs::remove_file(self.path(id, META_EXT))
            .map_err(BackendError::io("removing metadata"))?;
        sync_dir(&self.root)?;
        match std::fs::remove_file(self.path(id, IMAGE_EXT)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BackendError::io("removing image")(e)),
        }
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
        write_meta(&partial, &grown)?;
        std::fs::rename(&partial, self.path(id, META_EXT))
            .map_err(BackendError::io("committing metadata"))?;
        self.write().insert(id.clone(), grown);
        Ok(bytes)
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

    /// Crashes the process at one step of one volume's operations.
    struct CrashAt(Step, &'static str);

    impl Faults for CrashAt {
        fn before(&self, step: Step, volume: &VolumeId) -> Option<Fault> {
            (step == self.0 && volume.as_str() == self.1).then_some(Fault::Crash)
        }
    }

    #[tokio::test]
    async fn crash_during_create_leaves_nothing_visible() {
        for point in [Step::CreateRenameImage, Step::CreateRenameMetadata] {
            let dir = tempfile::tempdir().unwrap();
            let backend = FileBackend::open(dir.path()).unwrap();
            backend.create(req("keep", 1 << 20)).await.unwrap();
            drop(backend);
            let faults = std::sync::Arc::new(CrashAt(point, "half"));
            let backend = FileBackend::open_with_faults(dir.path(), faults).unwrap();
            assert!(backend.create(req("half", 1 << 20)).await.is_err());
            drop(backend);
            let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
            assert!(
                leftovers > 2,
                "{point:?}: the simulated crash must leave files behind"
            );
            let reopened = FileBackend::open(dir.path()).unwrap();
            let ids: Vec<String> = reopened
                .list()
                .await
                .unwrap()
                .iter()
                .map(|v| v.id.to_string())
                .collect();
            assert_eq!(ids, vec!["keep"], "{point:?}");
            let mut files: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            assert_eq!(
                files,
                vec!["keep.img", "keep.json"],
                "{point:?}: leftovers cleaned"
            );
            assert!(reopened.create(req("half", 1 << 20)).await.is_ok());
        }
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
    async fn capacity_reports_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        assert!(backend.capacity().await.unwrap() > 0);
    }
}
