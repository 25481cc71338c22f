//! Volumes: how one is created (empty, restored from a snapshot or cloned from a volume),
//! deleted and expanded, each a sequence of crash-consistent steps.

use std::time::SystemTime;

use super::steps::{
    new_file, remove_if_present, rename, sync_dir, sync_file, write_json, wrote, Stop,
};
use super::{free_bytes, Files, Step, IMAGE_EXT, META_EXT, PARTIAL_EXT};
use crate::backend::{BackendError, ContentSource, CreateRequest, VolumeInfo};
use crate::ids::VolumeId;

impl Files {
    pub(super) fn create(&self, req: CreateRequest) -> Result<VolumeInfo, BackendError> {
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

    pub(super) fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
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

    pub(super) fn expand(&self, id: &VolumeId, bytes: u64) -> Result<u64, BackendError> {
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
