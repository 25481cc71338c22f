//! The RouterOS commands the driver sends, with the Go driver's exact syntax, built only from
//! validated values ([`super::values`]). Rendering a command is the only way a command string
//! comes to exist.

use std::fmt;

use super::values::{Nqn, Record, RosPath, RosSize, Slot};

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
    /// `/disk add type=file copy-from=[find slot=…] file-path=… slot=…`: a snapshot (not
    /// exported), as the Go driver's CreateSnapshot.
    CreateSnapshot {
        source: Slot,
        path: RosPath,
        slot: Slot,
    },
    /// `/disk add type=file copy-from=[find slot=…] file-path=… file-size=… slot=…
    /// nvme-tcp-export=yes …`: a volume made from a snapshot (the Go driver's RestoreSnapshot)
    /// or from another volume (a clone).
    CopyVolume {
        source: Slot,
        path: RosPath,
        size: RosSize,
        slot: Slot,
        port: u16,
        nqn: Nqn,
    },
    /// `/disk set [find slot=…] comment=…`: records what a disk was made from and for.
    SetComment { slot: Slot, comment: Record },
    /// `/disk print detail where slot=…`
    Get { slot: Slot },
    /// `/disk print detail where slot~"a|b|…"`: the disks of several slots at once (a POSIX
    /// alternation, which RouterOS's `~` takes; slot names hold no character special to it).
    /// It matches a slot containing any of them: the caller picks each slot's disk exactly.
    GetMany { slots: Vec<Slot> },
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
    /// `/disk monitor-traffic <slot> once`: one sample of a disk's traffic (the storage poller's;
    /// without `once` RouterOS never stops printing).
    MonitorTraffic { slot: Slot },
}

impl RosCommand {
    /// A short, stable name for metrics labels and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::CreateVolume { .. } => "disk_add",
            Self::CreateSnapshot { .. } => "disk_add_snapshot",
            Self::CopyVolume { .. } => "disk_add_copy",
            Self::SetComment { .. } => "disk_set_comment",
            Self::Get { .. } => "disk_get",
            Self::GetMany { .. } => "disk_get_many",
            Self::List(_) => "disk_list",
            Self::Resize { .. } => "disk_set_size",
            Self::Remove { .. } => "disk_remove",
            Self::RemoveFile { .. } => "file_remove",
            Self::Capacity { .. } => "disk_capacity",
            Self::MonitorTraffic { .. } => "disk_monitor_traffic",
        }
    }

    /// Whether running it twice is harmless: only those are retried after a lost connection.
    pub fn idempotent(&self) -> bool {
        !matches!(
            self,
            Self::CreateVolume { .. } | Self::CreateSnapshot { .. } | Self::CopyVolume { .. }
        )
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
            Self::CreateSnapshot { source, path, slot } => write!(
                f,
                "/disk add type=file copy-from=[find slot={source}] file-path={path} slot={slot}"
            ),
            Self::CopyVolume {
                source,
                path,
                size,
                slot,
                port,
                nqn,
            } => write!(
                f,
                "/disk add type=file copy-from=[find slot={source}] file-path={path} \
                 file-size={size} slot={slot} nvme-tcp-export=yes nvme-tcp-server-port={port} \
                 nvme-tcp-server-nqn={nqn}"
            ),
            Self::SetComment { slot, comment } => {
                write!(f, "/disk set [find slot={slot}] comment={comment}")
            }
            Self::Get { slot } => write!(f, "/disk print detail where slot={slot}"),
            Self::GetMany { slots } => {
                f.write_str("/disk print detail where slot~\"")?;
                for (i, slot) in slots.iter().enumerate() {
                    if i > 0 {
                        f.write_str("|")?;
                    }
                    f.write_str(slot.as_str())?;
                }
                f.write_str("\"")
            }
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
            Self::MonitorTraffic { slot } => write!(f, "/disk monitor-traffic {slot} once"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::values::{NqnPrefix, Provenance, DEFAULT_VOLUME_PATH};
    use super::*;

    #[test]
    fn commands_render_exactly_as_the_go_driver_sends_them() {
        let slot = Slot::parse("pvc-1b2c", "name").unwrap();
        let dir = RosPath::parse(DEFAULT_VOLUME_PATH, "volumePath").unwrap();
        let path = dir.image(&slot).unwrap();
        let size = RosSize::for_request(10 << 30, 0).unwrap();
        let nqn = NqnPrefix::default().nqn(&slot).unwrap();
        let snap = Slot::parse(
            crate::ids::SnapshotId::for_name("snapshot-1")
                .unwrap()
                .as_str(),
            "s",
        )
        .unwrap();
        let restored = Slot::parse("pvc-2", "s").unwrap();
        let cases = [
            (
                RosCommand::CreateVolume { path: path.clone(), size, slot: slot.clone(), port: 4420, nqn },
                "/disk add type=file file-path=/storage-pool/metal-csi/pvc-1b2c.img file-size=10G slot=pvc-1b2c nvme-tcp-export=yes nvme-tcp-server-port=4420 nvme-tcp-server-nqn=nqn.2000-02.com.mikrotik:pvc-1b2c",
            ),
            (RosCommand::Get { slot: slot.clone() }, "/disk print detail where slot=pvc-1b2c"),
            (RosCommand::GetMany { slots: vec![slot.clone(), restored.clone()] }, "/disk print detail where slot~\"pvc-1b2c|pvc-2\""),
            (RosCommand::List(Listing::Volumes), "/disk print detail where slot~\"pvc\""),
            (RosCommand::List(Listing::Snapshots), "/disk print detail where slot~\"snap-\""),
            (RosCommand::Resize { slot: slot.clone(), size }, "/disk set [find slot=pvc-1b2c] file-size=10G"),
            (RosCommand::Remove { slot }, "/disk remove [find slot=pvc-1b2c]"),
            (RosCommand::RemoveFile { path }, "/file remove [find name=\"storage-pool/metal-csi/pvc-1b2c.img\"]"),
            (RosCommand::Capacity { volume_path: dir.clone() }, "/disk print detail where mount-point=\"storage-pool\""),
            (RosCommand::MonitorTraffic { slot: Slot::parse("storage-pool", "s").unwrap() }, "/disk monitor-traffic storage-pool once"),
            (
                RosCommand::CreateSnapshot { source: Slot::parse("pvc-1b2c", "s").unwrap(), path: dir.image(&snap).unwrap(), slot: snap.clone() },
                "/disk add type=file copy-from=[find slot=pvc-1b2c] file-path=/storage-pool/metal-csi/snap-6a68ee75-bc83-5a99-a647-c2bf3ee96f67-at-6a68ee75bc.img slot=snap-6a68ee75-bc83-5a99-a647-c2bf3ee96f67-at-6a68ee75bc",
            ),
            (
                RosCommand::CopyVolume { source: snap.clone(), path: dir.image(&restored).unwrap(), size, slot: restored.clone(), port: 4420, nqn: NqnPrefix::default().nqn(&restored).unwrap() },
                "/disk add type=file copy-from=[find slot=snap-6a68ee75-bc83-5a99-a647-c2bf3ee96f67-at-6a68ee75bc] file-path=/storage-pool/metal-csi/pvc-2.img file-size=10G slot=pvc-2 nvme-tcp-export=yes nvme-tcp-server-port=4420 nvme-tcp-server-nqn=nqn.2000-02.com.mikrotik:pvc-2",
            ),
            (
                RosCommand::SetComment { slot: snap, comment: Record { provenance: Some(Provenance { source: Slot::parse("pvc-1b2c", "s").unwrap(), at: 1_739_800_000 }), made: None } },
                "/disk set [find slot=snap-6a68ee75-bc83-5a99-a647-c2bf3ee96f67-at-6a68ee75bc] comment=source-pvc-1b2c-at-1739800000",
            ),
        ];
        for (cmd, want) in cases {
            assert_eq!(cmd.to_string(), want);
        }
    }
}
