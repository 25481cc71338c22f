//! The driver's shared vocabulary: CSI access modes and capabilities, access classes, and the
//! keys of volume contexts (StorageClass parameters) and publish contexts.
//!
//! Owns only definitions and pure parsing. Controller, node, kube adapters and backends all
//! depend on this module; it depends on nothing of theirs.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::Error;

/// volume_context key (a StorageClass parameter) that sets a live migration's timeout.
pub const MIGRATION_TIMEOUT_KEY: &str = "migrationTimeoutSeconds";
/// volume_context key for the filesystem, as the Go driver's StorageClasses spell it.
pub const FS_TYPE_KEY: &str = "fsType";
/// volume_context key for the filesystem, as Kubernetes' external-provisioner passes it.
pub const CSI_FS_TYPE_KEY: &str = "csi.storage.k8s.io/fstype";

/// StorageClass parameters and volume_context keys of the RDS backend, spelled as the Go driver
/// spells them, so its StorageClasses and PVs work unchanged.
pub mod rds_keys {
    /// The RDS's management address (must name the one this controller drives).
    pub const RDS_ADDRESS: &str = "rdsAddress";
    /// The address `nvme connect` dials (the RDS's storage network address).
    pub const NVME_ADDRESS: &str = "nvmeAddress";
    pub const NVME_PORT: &str = "nvmePort";
    pub const SSH_PORT: &str = "sshPort";
    /// In StorageClass parameters: the directory for images. In a volume context (as the Go
    /// driver writes it): the image's full path.
    pub const VOLUME_PATH: &str = "volumePath";
    pub const NQN_PREFIX: &str = "nqnPrefix";
    /// In a volume context: the volume's NQN.
    pub const NQN: &str = "nqn";
    pub const CTRL_LOSS_TMO: &str = "ctrlLossTmo";
    pub const RECONNECT_DELAY: &str = "reconnectDelay";
    pub const KEEP_ALIVE_TMO: &str = "keepAliveTmo";
    /// publish_context keys the Go driver returns (kept for tools that read them).
    pub const PUBLISH_NVME_ADDRESS: &str = "nvme_address";
    pub const PUBLISH_NVME_PORT: &str = "nvme_port";
    pub const PUBLISH_NVME_NQN: &str = "nvme_nqn";
    pub const PUBLISH_FS_TYPE: &str = "fs_type";
}

/// publish_context key naming the backend that published the volume ("file" or "rds").
pub const PUBLISH_BACKEND_KEY: &str = "backend";
/// publish_context key of the file backend: the absolute path of the volume's image.
pub const PUBLISH_IMAGE_PATH_KEY: &str = "imagePath";
/// publish_context key carrying readonly, so the node honours ControllerPublish's flag.
pub const PUBLISH_READONLY_KEY: &str = "readonly";
/// publish_context key carrying the instant this driver attached the volume to the node, as
/// [`attach_instant_text`] writes it. The external-attacher stores publish_context verbatim in
/// the VolumeAttachment's `status.attachmentMetadata`, so boot seeding can order the holders
/// of a migration exactly: `creationTimestamp` has whole seconds only. The same instant for
/// every repeat of a publish. Fixed whatever `--driver-name` says; the node ignores it.
pub const PUBLISH_ATTACHED_AT_KEY: &str = "rds.csi.srvlab.io/attached-at";

/// Default migration timeout when the volume context names none (rules, Publish 5.5).
pub const DEFAULT_MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
pub const MIN_MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_MIGRATION_TIMEOUT: Duration = Duration::from_secs(3600);

/// CSI access modes this driver supports. The unsupported ones never get past validation.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
    MultiNodeMultiWriter,
}

#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum AccessType {
    Block,
    Mount {
        fs_type: String,
        mount_flags: Vec<String>,
    },
}

/// A validated volume capability. Construct it through `Capability::new`, which enforces
/// "RWX requires volumeMode: Block".
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Capability {
    mode: AccessMode,
    access_type: AccessType,
}

/// Exclusive: at most one node. Migratable: RWX block, at most two nodes during a live migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessClass {
    Exclusive,
    Migratable,
}

impl Capability {
    pub fn new(mode: AccessMode, access_type: AccessType) -> Result<Self, Error> {
        if mode == AccessMode::MultiNodeMultiWriter && access_type != AccessType::Block {
            return Err(Error::InvalidArgument {
                field: "volume_capability",
                reason: "RWX requires volumeMode: Block (MULTI_NODE_MULTI_WRITER with a mount \
                         access type would let two nodes mount one filesystem)"
                    .into(),
            });
        }
        Ok(Self { mode, access_type })
    }

    pub fn block(mode: AccessMode) -> Self {
        Self {
            mode,
            access_type: AccessType::Block,
        }
    }

    pub fn mode(&self) -> AccessMode {
        self.mode
    }

    pub fn access_type(&self) -> &AccessType {
        &self.access_type
    }

    pub fn class(&self) -> AccessClass {
        match self.mode {
            AccessMode::MultiNodeMultiWriter => AccessClass::Migratable,
            AccessMode::SingleNodeWriter
            | AccessMode::SingleNodeReaderOnly
            | AccessMode::SingleNodeSingleWriter
            | AccessMode::SingleNodeMultiWriter => AccessClass::Exclusive,
        }
    }
}

/// An attach instant as [`PUBLISH_ATTACHED_AT_KEY`] carries it: RFC 3339 in UTC with nine
/// fractional digits (`2026-01-02T03:04:05.123456789Z`), exact to the nanosecond.
pub fn attach_instant_text(at: SystemTime) -> String {
    humantime::format_rfc3339_nanos(at).to_string()
}

/// Reads a [`PUBLISH_ATTACHED_AT_KEY`] value: RFC 3339 in UTC, any number of fractional digits.
/// `None` for anything else, which seeding then ignores.
pub fn parse_attach_instant(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(text).ok()
}

/// Parses `volume_context["migrationTimeoutSeconds"]`: default 300 s, clamped to [30 s, 3600 s].
/// An unparsable value yields the default and `Err(raw)` so the caller can warn.
pub fn migration_timeout(raw: Option<&str>) -> (Duration, Option<String>) {
    match raw {
        None => (DEFAULT_MIGRATION_TIMEOUT, None),
        Some(text) => match text.trim().parse::<u64>() {
            Ok(secs) => (
                Duration::from_secs(secs).clamp(MIN_MIGRATION_TIMEOUT, MAX_MIGRATION_TIMEOUT),
                None,
            ),
            Err(_) => (DEFAULT_MIGRATION_TIMEOUT, Some(text.to_string())),
        },
    }
}

/// Filesystems the node plugin formats and mounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    /// Formatted and grown with the ext tools, as ext4; the Go driver's node formats it too.
    Ext3,
    Xfs,
}

/// The `fs_type` values a mount capability may name; empty means "the volume context's, or ext4".
pub const SUPPORTED_FS_TYPES: &[&str] = &["", "ext4", "ext3", "xfs"];

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Ext3 => "ext3",
            Self::Xfs => "xfs",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "ext4" => Some(Self::Ext4),
            "ext3" => Some(Self::Ext3),
            "xfs" => Some(Self::Xfs),
            _ => None,
        }
    }

    /// The filesystem a mount volume gets: the capability's `fs_type`, else the volume
    /// context's `csi.storage.k8s.io/fstype` or `fsType`, else ext4. An unsupported name is
    /// INVALID_ARGUMENT naming where it came from.
    pub fn resolve(capability: &str, context: &HashMap<String, String>) -> Result<Self, Error> {
        let (field, raw) = if !capability.is_empty() {
            ("volume_capability.mount.fs_type", capability)
        } else if let Some(v) = context.get(CSI_FS_TYPE_KEY).filter(|v| !v.is_empty()) {
            ("volume_context[csi.storage.k8s.io/fstype]", v.as_str())
        } else if let Some(v) = context.get(FS_TYPE_KEY).filter(|v| !v.is_empty()) {
            ("volume_context[fsType]", v.as_str())
        } else {
            return Ok(Self::Ext4);
        };
        Self::parse(raw).ok_or_else(|| Error::InvalidArgument {
            field,
            reason: format!("{raw:?} is not a supported filesystem (use ext4, ext3 or xfs)"),
        })
    }
}

impl std::fmt::Display for FsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Capabilities the unit tests of several layers share.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::{AccessMode, AccessType, Capability};

    /// Single-node writer, mounted as ext4: how most volumes are published and staged.
    pub fn rwo_ext4() -> Capability {
        Capability::new(
            AccessMode::SingleNodeWriter,
            AccessType::Mount {
                fs_type: "ext4".into(),
                mount_flags: vec![],
            },
        )
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_instants_round_trip_to_the_nanosecond() {
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_767_323_045, 123_456_789);
        let text = attach_instant_text(at);
        assert_eq!(text, "2026-01-02T03:04:05.123456789Z");
        assert_eq!(parse_attach_instant(&text), Some(at));
        let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_323_045);
        assert_eq!(attach_instant_text(whole), "2026-01-02T03:04:05.000000000Z");
        assert_eq!(parse_attach_instant("2026-01-02T03:04:05Z"), Some(whole));
        assert_eq!(
            parse_attach_instant("2026-01-02T03:04:05.2Z"),
            Some(whole + Duration::from_millis(200))
        );
        for junk in ["", "yesterday", "2026-01-02 03:04:05", "1767323045"] {
            assert_eq!(parse_attach_instant(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn fs_type_comes_from_the_capability_then_the_context_then_ext4() {
        let ctx = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(FsType::resolve("", &HashMap::new()).unwrap(), FsType::Ext4);
        assert_eq!(
            FsType::resolve("xfs", &ctx(FS_TYPE_KEY, "ext4")).unwrap(),
            FsType::Xfs
        );
        assert_eq!(
            FsType::resolve("", &ctx(FS_TYPE_KEY, "xfs")).unwrap(),
            FsType::Xfs
        );
        assert_eq!(
            FsType::resolve("", &ctx(CSI_FS_TYPE_KEY, "xfs")).unwrap(),
            FsType::Xfs
        );
        let err = FsType::resolve("", &ctx(FS_TYPE_KEY, "btrfs")).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    field: "volume_context[fsType]",
                    ..
                }
            ),
            "{err}"
        );
        let err = FsType::resolve("vfat", &HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("vfat"), "{err}");
    }
}
