//! Snapshots: their metadata, how one is made from a volume (a copy, synced and renamed into
//! place like a volume's files) and how one is deleted.

use std::time::SystemTime;

use super::steps::{
    make_dir, new_file, remove_if_present, rename, sync_dir, sync_file, write_json, wrote, Stop,
};
use super::{Files, Step, IMAGE_EXT, META_EXT, PARTIAL_EXT};
use crate::backend::{BackendError, ContentSource, SnapshotInfo, SnapshotRequest};
use crate::ids::{SnapshotId, VolumeId};

/// A snapshot's metadata file.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct SnapshotMeta {
    pub(super) id: SnapshotId,
    /// The CreateSnapshot name it was made for.
    pub(super) name: String,
    pub(super) source: VolumeId,
    pub(super) size_bytes: u64,
    #[serde(with = "crate::backend::humantime_serde_compat")]
    pub(super) created_at: SystemTime,
}

impl SnapshotMeta {
    pub(super) fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            source: Some(self.source.clone()),
            size_bytes: self.size_bytes,
            created_at: Some(self.created_at),
            ready: true,
        }
    }
}

impl Files {
    pub(super) fn create_snapshot(
        &self,
        req: SnapshotRequest,
    ) -> Result<SnapshotInfo, BackendError> {
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

    pub(super) fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), BackendError> {
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
}
