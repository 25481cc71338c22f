//! Where volumes live. The [`VolumeBackend`] trait is everything the controller needs from
//! storage: volumes, their snapshots, and volumes made from either; [`file`] is the embedded
//! default (sparse files on local disk), [`rds`] the ROSE Data Server. Backends know nothing
//! about attachments. [`copy`] is how the file backend copies an image, [`locks`] how a
//! backend keeps a copy and a delete of the same volume or snapshot apart, [`quiesce`] how it asks
//! the node plugin in the same process to freeze a volume in use for a copy.

pub mod copy;
pub mod file;
pub mod locks;
pub mod quiesce;
pub mod rds;

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use async_trait::async_trait;

use crate::domain::Capability;
use crate::ids::{SnapshotId, VolumeId};

/// Size given to a volume whose request names no capacity.
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VolumeInfo {
    pub id: VolumeId,
    /// The CreateVolume name it was made for (empty in metadata older than the field: the
    /// id then).
    #[serde(default)]
    pub name: String,
    pub capacity_bytes: u64,
    /// The capabilities it was created for; a repeated CreateVolume must ask for the same set.
    pub capabilities: Vec<Capability>,
    pub parameters: BTreeMap<String, String>,
    #[serde(with = "humantime_serde_compat")]
    pub created_at: SystemTime,
    /// What it was made from (CreateVolume's `volume_content_source`); `None`: made empty, or
    /// not recorded (metadata older than the field; an RDS disk made by the Go driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ContentSource>,
}

/// Where a new volume's content comes from: a snapshot (a restore) or a volume (a clone).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentSource {
    Snapshot(SnapshotId),
    Volume(VolumeId),
}

impl std::fmt::Display for ContentSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Snapshot(s) => write!(f, "snapshot {s}"),
            Self::Volume(v) => write!(f, "volume {v}"),
        }
    }
}

/// A snapshot: a point-in-time, read-only copy of a volume, independent of it (deleting the
/// volume keeps its snapshots).
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    /// The volume it was taken of; `None` when the storage never recorded it (an RDS snapshot
    /// made by the Go driver). It may have been deleted since.
    pub source: Option<VolumeId>,
    /// The source's size when the snapshot was taken; a restore is at least this large.
    pub size_bytes: u64,
    /// When it was taken, if recorded.
    pub created_at: Option<SystemTime>,
    /// Whether it can be restored from. Backends only show snapshots that are complete, so
    /// this is true for every snapshot they list; a half-made one is never shown at all.
    pub ready: bool,
}

/// A validated CreateSnapshot.
#[derive(Clone, Debug)]
pub struct SnapshotRequest {
    /// Derived from `name` ([`VolumeBackend::snapshot_id_for`]).
    pub id: SnapshotId,
    pub name: String,
    pub source: VolumeId,
    /// The VolumeSnapshotClass parameters.
    pub parameters: BTreeMap<String, String>,
}

/// A validated CreateVolume. `limit_bytes == 0` means no limit.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    pub id: VolumeId,
    /// The CSI name; `id` is derived from it (`VolumeId::for_name`).
    pub name: String,
    pub required_bytes: u64,
    pub limit_bytes: u64,
    pub capabilities: Vec<Capability>,
    pub parameters: BTreeMap<String, String>,
    /// Restore from a snapshot or clone a volume; `None`: an empty volume.
    pub source: Option<ContentSource>,
}

impl CreateRequest {
    /// The size to allocate: the required size, or the default clamped to the limit.
    pub fn size(&self) -> Result<u64, BackendError> {
        if self.limit_bytes != 0 && self.required_bytes > self.limit_bytes {
            return Err(BackendError::OutOfRange(format!(
                "capacity_range.required_bytes ({}) exceeds limit_bytes ({})",
                self.required_bytes, self.limit_bytes
            )));
        }
        Ok(match (self.required_bytes, self.limit_bytes) {
            (0, 0) => DEFAULT_VOLUME_BYTES,
            (0, limit) => DEFAULT_VOLUME_BYTES.min(limit),
            (required, _) => required,
        })
    }

    /// The size of a volume made from a source of `source_bytes`: the required size, or the
    /// source's when none is asked for. Never smaller than the source (CSI: OUT_OF_RANGE "when
    /// trying to create a volume smaller than the source snapshot"), so a required size below
    /// the source's, or a limit below it, is `OutOfRange`.
    pub fn size_from(&self, source_bytes: u64) -> Result<u64, BackendError> {
        self.size()?;
        let source = self
            .source
            .as_ref()
            .map_or_else(String::new, |s| s.to_string());
        if self.required_bytes != 0 && self.required_bytes < source_bytes {
            return Err(BackendError::OutOfRange(format!(
                "capacity_range.required_bytes ({}) is smaller than {source} ({source_bytes} \
                 bytes): a volume is never smaller than its source",
                self.required_bytes
            )));
        }
        if self.limit_bytes != 0 && self.limit_bytes < source_bytes {
            return Err(BackendError::OutOfRange(format!(
                "capacity_range.limit_bytes ({}) is smaller than {source} ({source_bytes} \
                 bytes): a volume is never smaller than its source",
                self.limit_bytes
            )));
        }
        Ok(self.required_bytes.max(source_bytes))
    }

    /// Whether an existing volume satisfies this request (CreateVolume idempotency): the same
    /// name, a size inside the range, the same capabilities and the same parameters.
    pub fn check_compatible(&self, existing: &VolumeInfo) -> Result<(), BackendError> {
        let existing_name = if existing.name.is_empty() {
            existing.id.as_str()
        } else {
            existing.name.as_str()
        };
        if existing_name != self.name {
            return Err(BackendError::AlreadyExists(format!(
                "volume {} exists for the name {existing_name:?}, not {:?}",
                self.id, self.name
            )));
        }
        self.check_parameters(&existing.parameters, &self.parameters)?;
        self.check_capacity(existing.capacity_bytes)?;
        if existing.source != self.source {
            let show = |s: &Option<ContentSource>| {
                s.as_ref()
                    .map_or_else(|| "no content source".to_string(), |s| s.to_string())
            };
            return Err(BackendError::AlreadyExists(format!(
                "volume {} exists, made from {}, not from {}",
                self.id,
                show(&existing.source),
                show(&self.source)
            )));
        }
        self.check_capabilities(&existing.capabilities)
    }

    /// Idempotency, parameters: the existing volume was made with `have`, this request would
    /// make it with `want` (CSI CreateVolume: ALREADY_EXISTS when they are incompatible). A
    /// backend that keeps only some of what parameters decide compares those.
    pub fn check_parameters(
        &self,
        have: &BTreeMap<String, String>,
        want: &BTreeMap<String, String>,
    ) -> Result<(), BackendError> {
        if have != want {
            return Err(BackendError::AlreadyExists(format!(
                "volume {} exists with parameters {have:?}, not {want:?}",
                self.id
            )));
        }
        Ok(())
    }

    /// Idempotency, size: the existing volume's `bytes` lie inside the requested range.
    pub fn check_capacity(&self, bytes: u64) -> Result<(), BackendError> {
        let fits =
            bytes >= self.required_bytes && (self.limit_bytes == 0 || bytes <= self.limit_bytes);
        if !fits {
            return Err(BackendError::AlreadyExists(format!(
                "volume {} exists with {bytes} bytes, outside the requested capacity_range [{}, {}]",
                self.id,
                self.required_bytes,
                if self.limit_bytes == 0 {
                    "unlimited".to_string()
                } else {
                    self.limit_bytes.to_string()
                }
            )));
        }
        Ok(())
    }

    /// Idempotency, capabilities: the existing volume was created for the same set.
    pub fn check_capabilities(&self, have: &[Capability]) -> Result<(), BackendError> {
        let mut wanted = self.capabilities.clone();
        let mut have = have.to_vec();
        wanted.sort();
        wanted.dedup();
        have.sort();
        have.dedup();
        if wanted != have {
            return Err(BackendError::AlreadyExists(format!(
                "volume {} exists with capabilities {have:?}, not {wanted:?}",
                self.id
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("volume {0} does not exist")]
    NotFound(VolumeId),
    #[error("snapshot {0} does not exist")]
    SnapshotNotFound(SnapshotId),
    /// The operation needs something that is not so now (a volume written while it would be
    /// copied); it may work later.
    #[error("{0}")]
    InUse(String),
    #[error("backend storage is corrupt: {0}")]
    Corrupt(String),
    #[error("backend I/O error while {action}: {source}")]
    Io {
        action: String,
        source: std::io::Error,
    },
    #[error("{field} {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The storage cannot be reached now (the RDS link is down or did not answer in time).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// The storage refused or failed an operation, and said why.
    #[error("{0}")]
    Rejected(String),
}

/// Request validation inside a backend (e.g. a StorageClass parameter) keeps its field.
impl From<crate::Error> for BackendError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::InvalidArgument { field, reason } => {
                Self::InvalidArgument { field, reason }
            }
            crate::Error::Backend(b) => b,
            other => Self::Rejected(other.to_string()),
        }
    }
}

impl BackendError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::AlreadyExists(_) => "already_exists",
            Self::OutOfRange(_) => "out_of_range",
            Self::NotFound(_) | Self::SnapshotNotFound(_) => "not_found",
            Self::InUse(_) => "in_use",
            Self::Corrupt(_) => "backend_corrupt",
            Self::Io { .. } => "backend_io",
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::Unavailable(_) => "backend_unavailable",
            Self::ResourceExhausted(_) => "resource_exhausted",
            Self::Rejected(_) => "backend_rejected",
        }
    }

    pub(crate) fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let action = action.into();
        move |source| Self::Io { action, source }
    }
}

/// Storage operations. Every method is idempotent where CSI requires it: `create` by id,
/// `delete` of a missing volume succeeds.
///
/// Callers are async threads shared by every volume: an implementation must not block them (do
/// blocking I/O on the blocking pool), and `get` and `list` should not wait for a slow change
/// of another volume.
#[async_trait]
pub trait VolumeBackend: Send + Sync + 'static {
    /// A short name for logs ("file", "rds").
    fn kind(&self) -> &'static str;
    /// The volume id of a CreateVolume `name` (the same name always gives the same id). By
    /// default [`VolumeId::for_name`].
    fn volume_id_for(&self, name: &str) -> Result<VolumeId, crate::Error> {
        VolumeId::for_name(name)
    }
    /// The snapshot id of a CreateSnapshot `name`: by default [`SnapshotId::for_name`], the Go
    /// driver's `snap-<uuid5>-at-<hex>`. The same name always gives the same id, which keeps
    /// CreateSnapshot idempotent across restarts.
    fn snapshot_id_for(&self, name: &str) -> Result<SnapshotId, crate::Error> {
        SnapshotId::for_name(name)
    }
    /// Whether the storage can be reached now; Probe and `/readyz` follow it.
    fn ready(&self) -> bool {
        true
    }
    /// Creates the volume, or returns the existing one when compatible (else `AlreadyExists`),
    /// made from `req.source` when set: its content is the source's (a snapshot's, or a
    /// volume's now), its size at least the source's. A missing source is `NotFound` /
    /// `SnapshotNotFound`.
    async fn create(&self, req: CreateRequest) -> Result<VolumeInfo, BackendError>;
    /// Deletes the volume; a missing volume is success.
    async fn delete(&self, id: &VolumeId) -> Result<(), BackendError>;
    async fn get(&self, id: &VolumeId) -> Result<Option<VolumeInfo>, BackendError>;
    /// Every volume, sorted by id.
    async fn list(&self) -> Result<Vec<VolumeInfo>, BackendError>;
    /// The volumes this driver instance may take for its own when no PersistentVolume names
    /// them: the orphan reconciler's candidates, which it may delete. Storage shared with
    /// another cluster or driver instance must leave that instance's volumes out (rules, High
    /// availability: "only volumes of this driver instance"). Sorted by id. No default: a
    /// backend decides what is its own.
    async fn list_owned(&self) -> Result<Vec<VolumeInfo>, BackendError>;
    /// Bytes available for new volumes.
    async fn capacity(&self) -> Result<u64, BackendError>;
    /// Bytes available for new volumes of a StorageClass (GetCapacity's `parameters`). By
    /// default [`VolumeBackend::capacity`]: where a backend keeps volumes does not depend on
    /// the StorageClass. Invalid parameters are `InvalidArgument`.
    async fn capacity_for(
        &self,
        _parameters: &BTreeMap<String, String>,
    ) -> Result<u64, BackendError> {
        self.capacity().await
    }
    /// Grows a volume to `bytes`; returns the new size. The current size again is success;
    /// less is `OutOfRange` (volumes never shrink).
    async fn expand(&self, id: &VolumeId, bytes: u64) -> Result<u64, BackendError>;
    /// What the node plugin needs to reach the volume (ControllerPublishVolume's publish_context).
    /// A function of the volume's identity only, never of its size: a volume actor keeps it from
    /// its first publish until the volume is deleted (through that actor).
    fn publish_context(&self, volume: &VolumeInfo) -> HashMap<String, String>;

    /// Takes a snapshot of `req.source` (CSI CreateSnapshot), returning it once it is complete
    /// and durable. Idempotent by name: the same name and source give the existing snapshot;
    /// the same name with another source is `AlreadyExists`. A missing source is `NotFound`.
    /// By default a backend keeps no snapshots.
    async fn create_snapshot(&self, req: SnapshotRequest) -> Result<SnapshotInfo, BackendError> {
        Err(BackendError::Rejected(format!(
            "the {} backend keeps no snapshots (asked for {})",
            self.kind(),
            req.id
        )))
    }
    /// Deletes a snapshot; a missing one is success. Waits for restores from it to finish.
    async fn delete_snapshot(&self, _id: &SnapshotId) -> Result<(), BackendError> {
        Ok(())
    }
    async fn get_snapshot(&self, _id: &SnapshotId) -> Result<Option<SnapshotInfo>, BackendError> {
        Ok(None)
    }
    /// Every snapshot, sorted by id.
    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, BackendError> {
        Ok(Vec::new())
    }
}

/// Serializes `SystemTime` as RFC 3339 text so metadata files stay readable.
mod humantime_serde_compat {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_nanos(*t).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}
