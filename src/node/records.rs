//! What the node remembers about each staged volume, across restarts: one small JSON file per
//! volume under `--node-state-dir`.
//!
//! The kernel is the truth about devices and mounts (sysfs, mountinfo); a record holds only what
//! the kernel cannot say: the capability a volume was staged and published with (for the
//! spec's ALREADY_EXISTS checks), what backs it (so an unstage after a restart knows what to
//! detach), the paths it owns (its staging path and every target) and every device number seen
//! for it (so a mount left by a device that vanished or was renumbered is still known as the
//! volume's: [`super::ownership`] decides with it). A record is written before the work it describes and removed after it is undone,
//! each write atomic (temporary file, fsync, rename, directory fsync).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::device::Backing;
use super::ownership::DeviceNumber;
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
    /// Every device number seen for the volume, oldest first (with `device`'s). Absent in
    /// records written before it existed: `device` alone is then the history.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceNumber>,
    pub publishes: BTreeMap<AbsPath, PublishRecord>,
    /// How the volume came to be staged. Absent in records written before adoption existed,
    /// which were all staged by this plugin.
    #[serde(default, skip_serializing_if = "Origin::is_staged")]
    pub origin: Origin,
}

impl StageRecord {
    /// Every device number the volume is known by: the history and the last device seen.
    pub fn known_devices(&self) -> Vec<DeviceNumber> {
        let mut all = self.devices.clone();
        if let Some(d) = &self.device {
            let n = DeviceNumber {
                major: d.major,
                minor: d.minor,
            };
            if !all.contains(&n) {
                all.push(n);
            }
        }
        all
    }

    /// Notes `device` as the volume's current device and adds its number to the history.
    /// Returns whether the record changed (and must be saved).
    pub fn saw(&mut self, device: &BlockDevice) -> bool {
        let n = DeviceNumber {
            major: device.major,
            minor: device.minor,
        };
        let mut changed = false;
        if let Some(old) = &self.device {
            let old = DeviceNumber {
                major: old.major,
                minor: old.minor,
            };
            if !self.devices.contains(&old) {
                self.devices.push(old);
                changed = true;
            }
        }
        if !self.devices.contains(&n) {
            self.devices.push(n);
            changed = true;
        }
        if self.device.as_ref() != Some(device) {
            self.device = Some(device.clone());
            changed = true;
        }
        changed
    }

    /// Whether `path` is one of the volume's own: its staging path or a recorded target.
    pub fn owns_path(&self, path: &AbsPath) -> bool {
        self.staging == *path || self.publishes.contains_key(path)
    }
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

    /// A recorded volume whose id differs from `volume` only by letter case. Such ids name one
    /// volume on the RDS (the NQN is the id in lowercase, as the Go driver derives it), so the
    /// node never keeps records for two spellings: the callers refuse the second one.
    pub fn spelled_otherwise(&self, volume: &VolumeId) -> Result<Option<VolumeId>, NodeError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| NodeError::Io {
            action: format!("listing {}", self.dir.display()),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if stem != volume.as_str() && stem.eq_ignore_ascii_case(volume.as_str()) {
                if let Ok(other) = VolumeId::try_from(stem) {
                    return Ok(Some(other));
                }
            }
        }
        Ok(None)
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
            devices: Vec::new(),
            publishes: BTreeMap::new(),
            origin: Origin::Staged,
        }
    }

    fn loop_device(minor: u32) -> BlockDevice {
        BlockDevice {
            path: AbsPath::try_from(PathBuf::from(format!("/dev/loop{minor}"))).unwrap(),
            major: 7,
            minor,
        }
    }

    /// A record written before the device history existed (a `device` and no `devices` key)
    /// loads, and knows its one device; removing `#[serde(default)]` on `devices` fails it.
    #[test]
    fn a_record_without_a_device_history_loads_and_knows_its_last_device() {
        let mut record = staged_block_record();
        record.device = Some(loop_device(3));
        let old = serde_json::to_string(&record).unwrap();
        assert!(!old.contains("devices"), "{old}");
        let read: StageRecord = serde_json::from_str(&old).unwrap();
        assert_eq!(
            read.known_devices(),
            vec![DeviceNumber { major: 7, minor: 3 }]
        );
    }

    /// A renumbered device joins the history and the old number stays in it: dropping the push
    /// of the old `device` in `saw` loses 7:3 for a record written before the history.
    #[test]
    fn a_renumbered_device_keeps_the_old_number_in_the_history() {
        let mut record = staged_block_record();
        record.device = Some(loop_device(3));
        assert!(record.saw(&loop_device(9)));
        assert!(
            !record.saw(&loop_device(9)),
            "seeing it again changes nothing"
        );
        assert_eq!(
            record.known_devices(),
            vec![
                DeviceNumber { major: 7, minor: 3 },
                DeviceNumber { major: 7, minor: 9 }
            ]
        );
    }

    /// Only another spelling of the same id is reported, never the id itself or another id.
    #[test]
    fn a_record_of_the_same_id_in_another_case_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path()).unwrap();
        records.save(&staged_block_record()).unwrap();
        let upper = VolumeId::try_from("PVC-1").unwrap();
        assert_eq!(
            records.spelled_otherwise(&upper).unwrap(),
            Some(VolumeId::try_from("pvc-1").unwrap())
        );
        let same = VolumeId::try_from("pvc-1").unwrap();
        assert_eq!(records.spelled_otherwise(&same).unwrap(), None);
        let other = VolumeId::try_from("pvc-12").unwrap();
        assert_eq!(records.spelled_otherwise(&other).unwrap(), None);
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
