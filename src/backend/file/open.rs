//! What open does to the root before serving: removes the leftovers of interrupted changes,
//! quarantines what cannot be served, and loads the indexes of volumes and snapshots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::snapshots::SnapshotMeta;
use super::steps::{make_dir, remove_if_present, rename, sync_dir, sync_dir_io};
use super::{Faults, IMAGE_EXT, META_EXT, PARTIAL_EXT, QUARANTINE_DIR, SNAPSHOT_DIR};
use crate::backend::{BackendError, VolumeInfo};
use crate::ids::{SnapshotId, VolumeId};

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
pub(super) fn load(
    seam: &dyn Faults,
    root: &Path,
) -> Result<BTreeMap<VolumeId, VolumeInfo>, BackendError> {
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

fn read_meta(path: &Path) -> Result<VolumeInfo, BackendError> {
    let bytes =
        std::fs::read(path).map_err(BackendError::io(format!("reading {}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| BackendError::Corrupt(format!("{}: {e}", path.display())))
}

/// Reads `<root>/snapshots/` at open, as [`load`] reads the root: leftovers of interrupted
/// snapshots are removed, what cannot be served is quarantined, the rest is returned.
pub(super) fn load_snapshots(
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
