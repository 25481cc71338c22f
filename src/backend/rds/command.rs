//! The RouterOS commands the driver sends, with the Go driver's exact syntax, built only from
//! validated values ([`super::values`]). Rendering a command is the only way a command string
//! comes to exist.

use std::fmt;

use super::values::{Nqn, RosPath, RosSize, Slot};

/// Which disks a listing asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    /// `slot~"pvc"`: volumes, as the Go driver lists them.
    Volumes,
    /// `slot~"snap-"`: snapshots.
    Snapshots,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RosCommand {
    /// `/disk add type=file file-path=… file-size=… slot=… nvme-tcp-export=yes …`
    CreateVolume {
        path: RosPath,
        size: RosSize,
        slot: Slot,
        port: u16,
        nqn: Nqn,
    },
    /// `/disk print detail where slot=…`
    Get { slot: Slot },
    /// `/disk print detail where slot~"pvc"` (or `"snap-"`)
    List(Listing),
    /// `/disk set [find slot=…] file-size=…`
    Resize { slot: Slot, size: RosSize },
    /// `/disk remove [find slot=…]`
    Remove { slot: Slot },
    /// `/file remove [find name="…"]` (the path without its leading `/`)
    RemoveFile { path: RosPath },
    /// `/disk print detail where mount-point="…"`
    Capacity { volume_path: RosPath },
}

impl RosCommand {
    /// A short, stable name for metrics labels and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::CreateVolume { .. } => "disk_add",
            Self::Get { .. } => "disk_get",
            Self::List(_) => "disk_list",
            Self::Resize { .. } => "disk_set_size",
            Self::Remove { .. } => "disk_remove",
            Self::RemoveFile { .. } => "file_remove",
            Self::Capacity { .. } => "disk_capacity",
        }
    }

    /// Whether running it twice is harmless: only those are retried after a lost connection.
    pub fn idempotent(&self) -> bool {
        !matches!(self, Self::CreateVolume { .. })
    }
}

impl fmt::Display for RosCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreateVolume {
                path,
                size,
                slot,
                port,
                nqn,
            } => write!(
                f,
                "/disk add type=file file-path={path} file-size={size} slot={slot} \
                 nvme-tcp-export=yes nvme-tcp-server-port={port} nvme-tcp-server-nqn={nqn}"
            ),
            Self::Get { slot } => write!(f, "/disk print detail where slot={slot}"),
            Self::List(Listing::Volumes) => f.write_str("/disk print detail where slot~\"pvc\""),
            Self::List(Listing::Snapshots) => {
                f.write_str("/disk print detail where slot~\"snap-\"")
            }
            Self::Resize { slot, size } => {
                write!(f, "/disk set [find slot={slot}] file-size={size}")
            }
            Self::Remove { slot } => write!(f, "/disk remove [find slot={slot}]"),
            Self::RemoveFile { path } => {
                write!(f, "/file remove [find name=\"{}\"]", path.file_name())
            }
            Self::Capacity { volume_path } => write!(
                f,
                "/disk print detail where mount-point=\"{}\"",
                volume_path.mount_point()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::values::{NqnPrefix, DEFAULT_VOLUME_PATH};
    use super::*;

    #[test]
    fn commands_render_exactly_as_the_go_driver_sends_them() {
        let slot = Slot::parse("pvc-1b2c", "name").unwrap();
        let dir = RosPath::parse(DEFAULT_VOLUME_PATH, "volumePath").unwrap();
        let path = dir.image(&slot).unwrap();
        let size = RosSize::for_request(10 << 30, 0).unwrap();
        let nqn = NqnPrefix::default().nqn(&slot).unwrap();
        let cases = [
            (
                RosCommand::CreateVolume { path: path.clone(), size, slot: slot.clone(), port: 4420, nqn },
                "/disk add type=file file-path=/storage-pool/metal-csi/pvc-1b2c.img file-size=10G slot=pvc-1b2c nvme-tcp-export=yes nvme-tcp-server-port=4420 nvme-tcp-server-nqn=nqn.2000-02.com.mikrotik:pvc-1b2c",
            ),
            (RosCommand::Get { slot: slot.clone() }, "/disk print detail where slot=pvc-1b2c"),
            (RosCommand::List(Listing::Volumes), "/disk print detail where slot~\"pvc\""),
            (RosCommand::List(Listing::Snapshots), "/disk print detail where slot~\"snap-\""),
            (RosCommand::Resize { slot: slot.clone(), size }, "/disk set [find slot=pvc-1b2c] file-size=10G"),
            (RosCommand::Remove { slot }, "/disk remove [find slot=pvc-1b2c]"),
            (RosCommand::RemoveFile { path }, "/file remove [find name=\"storage-pool/metal-csi/pvc-1b2c.img\"]"),
            (RosCommand::Capacity { volume_path: dir }, "/disk print detail where mount-point=\"storage-pool\""),
        ];
        for (cmd, want) in cases {
            assert_eq!(cmd.to_string(), want);
        }
    }
}
