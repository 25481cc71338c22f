//! The embedded default backend: one sparse file per volume under `--file-root`, with its
//! metadata in a JSON file beside it.
//!
//! Owns the files under its root and nothing else. A volume is visible exactly when its
//! `<id>.json` exists: create writes `<id>.img.partial` and `<id>.json.partial`, syncs them, then
//! renames the image and finally the metadata (the commit point). Delete removes the metadata
//! first. At open, leftovers of an interrupted create or delete (`*.partial`, images without
//! metadata) are removed, so a crash never leaves a half-made volume visible.

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;

use super::{BackendError, CreateRequest, VolumeBackend, VolumeInfo};
use crate::ids::VolumeId;

const IMAGE_EXT: &str = "img";
const META_EXT: &str = "json";
const PARTIAL_EXT: &str = "partial";

/// Where a test asks create to stop, as if the process had died there.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum CrashPoint {
    AfterPartialFiles,
    AfterImageRename,
}

pub struct FileBackend {
    root: PathBuf,
    /// The visible volumes. The mutex also serializes every change to the directory.
    index: Mutex<BTreeMap<VolumeId, VolumeInfo>>,
    #[cfg(test)]
    crash_at: Mutex<Option<CrashPoint>>,
}

impl FileBackend {
    /// Opens (creating if needed) the root, cleans up after interrupted operations and loads
    /// the index. Metadata that cannot be read is reported, not deleted.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BackendError> {
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
        Ok(Self {
            root,
            index: Mutex::new(index),
            #[cfg(test)]
            crash_at: Mutex::new(None),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, id: &VolumeId, ext: &str) -> PathBuf {
        // VolumeId admits no '/', NUL or leading '.', so this stays inside the root.
        self.root.join(format!("{id}.{ext}"))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<VolumeId, VolumeInfo>> {
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[cfg(test)]
    pub(crate) fn crash_at(&self, point: CrashPoint) {
        *self.crash_at.lock().unwrap() = Some(point);
    }

    #[cfg(test)]
    fn crash_here(&self, point: CrashPoint) -> Result<(), BackendError> {
        if *self.crash_at.lock().unwrap() == Some(point) {
            return Err(BackendError::Corrupt(format!(
                "simulated crash at {point:?}"
            )));
        }
        Ok(())
    }

    fn create_files(&self, info: &VolumeInfo) -> Result<(), BackendError> {
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
        #[cfg(test)]
        self.crash_here(CrashPoint::AfterPartialFiles)?;
        std::fs::rename(&image_partial, &image).map_err(BackendError::io("committing image"))?;
        #[cfg(test)]
        self.crash_here(CrashPoint::AfterImageRename)?;
        std::fs::rename(&meta_partial, &meta).map_err(BackendError::io("committing metadata"))?;
        sync_dir(&self.root)
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
        let size = req.size()?;
        let mut index = self.lock();
        if let Some(existing) = index.get(&req.id) {
            req.check_compatible(existing)?;
            return Ok(existing.clone());
        }
        let available = free_bytes(&self.root)?;
        if size > available {
            return Err(BackendError::OutOfRange(format!(
                "requested {size} bytes but only {available} are free under {}",
                self.root.display()
            )));
        }
        let info = VolumeInfo {
            id: req.id.clone(),
            name: req.name.clone(),
            capacity_bytes: size,
            capabilities: req.capabilities.clone(),
            parameters: req.parameters.clone(),
            created_at: SystemTime::now(),
        };
        if let Err(e) = self.create_files(&info) {
            #[cfg(test)]
            if matches!(e, BackendError::Corrupt(ref m) if m.starts_with("simulated crash")) {
                return Err(e);
            }
            for ext in [
                format!("{IMAGE_EXT}.{PARTIAL_EXT}"),
                format!("{META_EXT}.{PARTIAL_EXT}"),
                IMAGE_EXT.to_string(),
            ] {
                let _ = std::fs::remove_file(self.path(&info.id, &ext));
            }
            return Err(e);
        }
        index.insert(info.id.clone(), info.clone());
        Ok(info)
    }

    async fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        let mut index = self.lock();
        if index.remove(id).is_none() {
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

    async fn get(&self, id: &VolumeId) -> Result<Option<VolumeInfo>, BackendError> {
        Ok(self.lock().get(id).cloned())
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        Ok(self.lock().values().cloned().collect())
    }

    async fn capacity(&self) -> Result<u64, BackendError> {
        free_bytes(&self.root)
    }

    async fn expand(&self, id: &VolumeId, bytes: u64) -> Result<u64, BackendError> {
        let mut index = self.lock();
        let info = index
            .get_mut(id)
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
        let mut grown = info.clone();
        grown.capacity_bytes = bytes;
        let partial = self.path(id, &format!("{META_EXT}.{PARTIAL_EXT}"));
        write_meta(&partial, &grown)?;
        std::fs::rename(&partial, self.path(id, META_EXT))
            .map_err(BackendError::io("committing metadata"))?;
        *info = grown;
        Ok(bytes)
    }

    fn publish_context(&self, volume: &VolumeInfo) -> HashMap<String, String> {
        HashMap::from([
            ("backend".to_string(), "file".to_string()),
            (
                "imagePath".to_string(),
                self.path(&volume.id, IMAGE_EXT).display().to_string(),
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

    #[tokio::test]
    async fn crash_during_create_leaves_nothing_visible() {
        for point in [CrashPoint::AfterPartialFiles, CrashPoint::AfterImageRename] {
            let dir = tempfile::tempdir().unwrap();
            let backend = FileBackend::open(dir.path()).unwrap();
            backend.create(req("keep", 1 << 20)).await.unwrap();
            backend.crash_at(point);
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
    async fn capacity_reports_free_space() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FileBackend::open(dir.path()).unwrap();
        assert!(backend.capacity().await.unwrap() > 0);
    }
}
