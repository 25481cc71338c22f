//! What the node remembers about each staged volume, across restarts: one small JSON file per
//! volume under `--node-state-dir`.
//!
//! The kernel is the truth about devices and mounts (sysfs, mountinfo); a record holds only what
//! the kernel cannot say: the capability a volume was staged and published with (for the
//! spec's ALREADY_EXISTS checks), and what backs it (so an unstage after a restart knows what to
//! detach). A record is written before the work it describes and removed after it is undone,
//! each write atomic (temporary file, fsync, rename, directory fsync).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::device::Backing;
use super::paths::{AbsPath, BlockDevice};
use super::NodeError;
use crate::domain::{Capability, FsType};
use crate::ids::VolumeId;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageRecord {
    pub volume: VolumeId,
    pub staging: AbsPath,
    pub capability: Capability,
    /// The filesystem, for mount access.
    pub fs: Option<FsType>,
    pub readonly: bool,
    pub backing: Backing,
    /// The device last seen for it; a hint, always checked against the kernel.
    pub device: Option<BlockDevice>,
    pub publishes: BTreeMap<AbsPath, PublishRecord>,
    /// How the volume came to be staged. Absent in records written before adoption existed,
    /// which were all staged by this plugin.
    #[serde(default, skip_serializing_if = "Origin::is_staged")]
    pub origin: Origin,
}

/// Who staged a volume. The work that undoes a stage is the same either way; the origin says
/// which facts came from a request and which were read back from the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "by", rename_all = "lowercase")]
pub enum Origin {
    /// NodeStageVolume of this plugin: every field is what the request asked for.
    #[default]
    Staged,
    /// Found staged with no record (by the Go node plugin, or by hand) and adopted by the
    /// named call. `staging`, `fs`, `readonly` and `device` were read from the kernel (the
    /// staging mount, or for block the attached device); `capability` is the adopting
    /// request's.
    Adopted { call: String },
}

impl Origin {
    fn is_staged(&self) -> bool {
        *self == Self::Staged
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublishRecord {
    pub capability: Capability,
    pub readonly: bool,
}

pub struct Records {
    dir: PathBuf,
}

impl Records {
    pub fn open(dir: &Path) -> Result<Self, NodeError> {
        std::fs::create_dir_all(dir).map_err(|source| NodeError::Io {
            action: format!("creating --node-state-dir {}", dir.display()),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, volume: &VolumeId) -> PathBuf {
        // VolumeId admits no '/', NUL or leading '.': the name stays inside the directory.
        self.dir.join(format!("{volume}.json"))
    }

    pub fn load(&self, volume: &VolumeId) -> Result<Option<StageRecord>, NodeError> {
        let path = self.path(volume);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| NodeError::Io {
                    action: format!("reading node record {}", path.display()),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(NodeError::Io {
                action: format!("reading node record {}", path.display()),
                source,
            }),
        }
    }

    pub fn save(&self, record: &StageRecord) -> Result<(), NodeError> {
        use std::io::Write;
        let path = self.path(&record.volume);
        let tmp = path.with_extension("json.partial");
        let io = |action: &str| {
            let action = format!("{action} node record {}", path.display());
            move |source| NodeError::Io { action, source }
        };
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| NodeError::Io {
            action: "encoding a node record".into(),
            source: std::io::Error::other(e),
        })?;
        let mut file = std::fs::File::create(&tmp).map_err(io("writing"))?;
        file.write_all(&bytes).map_err(io("writing"))?;
        file.sync_all().map_err(io("syncing"))?;
        std::fs::rename(&tmp, &path).map_err(io("committing"))?;
        self.sync_dir()
    }

    pub fn remove(&self, volume: &VolumeId) -> Result<(), NodeError> {
        let path = self.path(volume);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NodeError::Io {
                action: format!("removing node record {}", path.display()),
                source,
            }),
        }
    }

    /// Every record, for the start-up survey. Unreadable files are reported, not deleted.
    pub fn all(&self) -> Result<Vec<Result<StageRecord, NodeError>>, NodeError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| NodeError::Io {
            action: format!("listing {}", self.dir.display()),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            match VolumeId::try_from(stem) {
                Ok(id) => {
                    if let Some(r) = self.load(&id).transpose() {
                        out.push(r);
                    }
                }
                Err(_) => {
                    tracing::warn!(file = %name, "ignoring a file in --node-state-dir that is not a node record")
                }
            }
        }
        Ok(out)
    }

    fn sync_dir(&self) -> Result<(), NodeError> {
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| NodeError::Io {
                action: format!("syncing {}", self.dir.display()),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::AccessMode;

    /// A block volume `pvc-1` staged by this plugin from a file image, with no publishes.
    fn staged_block_record() -> StageRecord {
        StageRecord {
            volume: VolumeId::try_from("pvc-1").unwrap(),
            staging: AbsPath::try_from(PathBuf::from("/stage/pvc-1")).unwrap(),
            capability: Capability::block(AccessMode::SingleNodeWriter),
            fs: None,
            readonly: false,
            backing: Backing::File {
                image: AbsPath::try_from(PathBuf::from("/v/pvc-1.img")).unwrap(),
            },
            device: None,
            publishes: BTreeMap::new(),
            origin: Origin::Staged,
        }
    }

    /// A record written before `origin` existed (no such key) reads back as staged by this
    /// plugin, and a staged record is still written without the key; removing the
    /// `#[serde(default)]` on `origin` fails this.
    #[test]
    fn a_record_without_an_origin_was_staged_by_this_plugin() {
        let record = staged_block_record();
        let old = serde_json::to_string(&record).unwrap();
        assert!(!old.contains("origin"), "{old}");
        let read: StageRecord = serde_json::from_str(&old).unwrap();
        assert_eq!(read.origin, Origin::Staged);
    }

    #[test]
    fn records_round_trip_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(&dir.path().join("state")).unwrap();
        let volume = VolumeId::try_from("pvc-1").unwrap();
        assert_eq!(records.load(&volume).unwrap(), None);
        let mut record = staged_block_record();
        record.publishes.insert(
            AbsPath::try_from(PathBuf::from("/t/1")).unwrap(),
            PublishRecord {
                capability: record.capability.clone(),
                readonly: true,
            },
        );
        records.save(&record).unwrap();
        assert_eq!(records.load(&volume).unwrap(), Some(record.clone()));
        assert_eq!(records.all().unwrap().len(), 1);
        let adopted = StageRecord {
            origin: Origin::Adopted {
                call: "NodePublishVolume".into(),
            },
            ..record.clone()
        };
        records.save(&adopted).unwrap();
        assert_eq!(records.load(&volume).unwrap(), Some(adopted));
        records.remove(&volume).unwrap();
        records.remove(&volume).unwrap();
        assert_eq!(records.load(&volume).unwrap(), None);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("state"))
            .unwrap()
            .collect();
        assert!(leftovers.is_empty(), "no temporary file left behind");
    }
}
