//! CSI gRPC services. Handlers validate, translate into one message and map the answer; they
//! never touch attachment state.

pub mod controller;
pub mod identity;
pub mod node;
pub mod observe;
pub mod server;
pub mod status;

use crate::csi::volume_capability::{access_mode::Mode, AccessType as ProtoAccessType};
use crate::csi::VolumeCapability;
use crate::domain::{AccessMode, AccessType, Capability, SUPPORTED_FS_TYPES};
use crate::Error;

/// Validates one CSI capability (rules, Publish step 1). `field` names it in errors.
pub fn capability(
    raw: Option<&VolumeCapability>,
    field: &'static str,
) -> Result<Capability, Error> {
    let invalid = |reason: String| Error::InvalidArgument { field, reason };
    let raw = raw.ok_or_else(|| invalid("is required".into()))?;
    let mode = raw
        .access_mode
        .as_ref()
        .ok_or_else(|| invalid("has no access_mode".into()))?;
    let mode = match Mode::try_from(mode.mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
        Ok(m @ (Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter)) => {
            return Err(invalid(format!(
                "access mode {} is not supported",
                m.as_str_name()
            )))
        }
        Ok(Mode::Unknown) => return Err(invalid("access mode is UNKNOWN".into())),
        Err(_) => {
            return Err(invalid(format!(
                "access mode {} is not a CSI access mode",
                mode.mode
            )))
        }
    };
    let access_type = match raw.access_type.as_ref() {
        Some(ProtoAccessType::Block(_)) => AccessType::Block,
        Some(ProtoAccessType::Mount(m)) => {
            if !SUPPORTED_FS_TYPES.contains(&m.fs_type.as_str()) {
                return Err(invalid(format!(
                    "fs_type {:?} is not supported (use ext4, ext3 or xfs)",
                    m.fs_type
                )));
            }
            AccessType::Mount {
                fs_type: m.fs_type.clone(),
                mount_flags: m.mount_flags.clone(),
            }
        }
        None => return Err(invalid("has no access_type (block or mount)".into())),
    };
    Capability::new(mode, access_type).map_err(|e| match e {
        Error::InvalidArgument { reason, .. } => invalid(reason),
        other => other,
    })
}

/// The CSI form of a validated capability, to echo back to the CO.
pub fn to_proto(cap: &Capability) -> VolumeCapability {
    use crate::csi::volume_capability::{AccessMode as ProtoMode, BlockVolume, MountVolume};
    let mode = match cap.mode() {
        AccessMode::SingleNodeWriter => Mode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
        AccessMode::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
        AccessMode::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
    };
    let access_type = match cap.access_type() {
        AccessType::Block => ProtoAccessType::Block(BlockVolume {}),
        AccessType::Mount {
            fs_type,
            mount_flags,
        } => ProtoAccessType::Mount(MountVolume {
            fs_type: fs_type.clone(),
            mount_flags: mount_flags.clone(),
            volume_mount_group: String::new(),
        }),
    };
    VolumeCapability {
        access_mode: Some(ProtoMode { mode: mode as i32 }),
        access_type: Some(access_type),
    }
}
