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

/// One RouterOS command.
///
/// The three `/disk add`s carry the disk's [`Record`] as `comment=`, so a disk made by this
/// driver exists with its record from its first instant, in one write: a crash can no longer
/// leave it between the add and a `/disk set comment=`. Why RouterOS takes it there:
/// `comment` is a writable property of a `/disk` entry like `type`, `slot`, `file-path`,
/// `file-size`, `nvme-tcp-export` and `nvme-tcp-server-port` (the community.routeros
/// collection's API model of the `disk` path, RouterOS 7.15 and later, marked fully
/// understood); that collection creates a missing entry with one `add` carrying all of its
/// properties; and RouterOS's command reference lists `comment` ("short description of the
/// item") and `copy-from` among the arguments of a menu's `add`. Otherwise the adds are the
/// Go driver's commands byte for byte, with ` comment=…` after them. An empty record is not
/// rendered (`comment=` with nothing is not sent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RosCommand {
    /// `/disk add type=file file-path=… file-size=… slot=… nvme-tcp-export=yes …
    /// comment=…`: the Go driver's command, with the disk's [`Record`] given as a property of
    /// the add (see [`RosCommand`]).
    CreateVolume {
        path: RosPath,
        size: RosSize,
        slot: Slot,
        port: u16,
        nqn: Nqn,
        record: Record,
    },
    /// `/disk add type=file copy-from=[find slot=…] file-path=… slot=… comment=…`: a snapshot
    /// (not exported), as the Go driver's CreateSnapshot, with its [`Record`].
    CreateSnapshot {
        source: Slot,
        path: RosPath,
        slot: Slot,
        record: Record,
    },
    /// `/disk add type=file copy-from=[find slot=…] file-path=… file-size=… slot=…
    /// nvme-tcp-export=yes … comment=…`: a volume made from a snapshot (the Go driver's
    /// RestoreSnapshot) or from another volume (a clone), with its [`Record`].
    CopyVolume {
        source: Slot,
        path: RosPath,
        size: RosSize,
        slot: Slot,
        port: u16,
        nqn: Nqn,
        record: Record,
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
                record,
            } => {
                write!(
                    f,
                    "/disk add type=file file-path={path} file-size={size} slot={slot} \
                     nvme-tcp-export=yes nvme-tcp-server-port={port} nvme-tcp-server-nqn={nqn}"
                )?;
                comment(f, record)
            }
            Self::CreateSnapshot {
                source,
                path,
                slot,
                record,
            } => {
                write!(
                    f,
                    "/disk add type=file copy-from=[find slot={source}] file-path={path} \
                     slot={slot}"
                )?;
                comment(f, record)
            }
            Self::CopyVolume {
                source,
                path,
                size,
                slot,
                port,
                nqn,
                record,
            } => {
                write!(
                    f,
                    "/disk add type=file copy-from=[find slot={source}] file-path={path} \
                     file-size={size} slot={slot} nvme-tcp-export=yes \
                     nvme-tcp-server-port={port} nvme-tcp-server-nqn={nqn}"
                )?;
                comment(f, record)
            }
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

/// ` comment=<record>`, the last property of an add; nothing for an empty record.
fn comment(f: &mut fmt::Formatter<'_>, record: &Record) -> fmt::Result {
    if record.is_empty() {
        Ok(())
    } else {
        write!(f, " comment={record}")
    }
}

#[cfg(test)]
mod tests {
    use super::super::values::{MadeWith, NqnPrefix, Provenance, DEFAULT_VOLUME_PATH};
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
        let made = Record {
            provenance: None,
            made: Some(MadeWith::of(
                &[("nvmeAddress".to_string(), "10.0.0.1".to_string())].into(),
                &[],
            )),
        };
        let from_volume = Provenance {
            source: Slot::parse("pvc-1b2c", "s").unwrap(),
            at: 1_739_800_000,
        };
        let cases = [
            (
                RosCommand::CreateVolume { path: path.clone(), size, slot: slot.clone(), port: 4420, nqn: nqn.clone(), record: made.clone() },
                "/disk add type=file file-path=/storage-pool/metal-csi/pvc-1b2c.img file-size=10G slot=pvc-1b2c nvme-tcp-export=yes nvme-tcp-server-port=4420 nvme-tcp-server-nqn=nqn.2000-02.com.mikrotik:pvc-1b2c comment=made-999bcc6d83e353ab",
            ),
            (
                RosCommand::CreateVolume { path: path.clone(), size, slot: slot.clone(), port: 4420, nqn, record: Record::default() },
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
                RosCommand::CreateSnapshot { source: Slot::parse("pvc-1b2c", "s").unwrap(), path: dir.image(&snap).unwrap(), slot: snap.clone(), record: Record { provenance: Some(from_volume.clone()), made: None } },
                "/disk add type=file copy-from=[find slot=pvc-1b2c] file-path=/storage-pool/metal-csi/snap-6a68ee75-bc83-5a99-a647-c2bf3ee96f67-at-6a68ee75bc.img slot=snap-6a68ee75-bc83-5a99-a647-c2bf3ee96f67-at-6a68ee75bc comment=source-pvc-1b2c-at-1739800000",
            ),
            (
                RosCommand::CopyVolume { source: snap.clone(), path: dir.image(&restored).unwrap(), size, slot: restored.clone(), port: 4420, nqn: NqnPrefix::default().nqn(&restored).unwrap(), record: Record { provenance: Some(Provenance { source: snap.clone(), at: 1_739_800_000 }), made: made.made.clone() } },
                "/disk add type=file copy-from=[find slot=snap-6a68ee75-bc83-5a99-a647-c2bf3ee96f67-at-6a68ee75bc] file-path=/storage-pool/metal-csi/pvc-2.img file-size=10G slot=pvc-2 nvme-tcp-export=yes nvme-tcp-server-port=4420 nvme-tcp-server-nqn=nqn.2000-02.com.mikrotik:pvc-2 comment=source-snap-6a68ee75-bc83-5a99-a647-c2bf3ee96f67-at-6a68ee75bc-at-1739800000-made-999bcc6d83e353ab",
            ),
            (
                RosCommand::SetComment { slot: snap, comment: Record { provenance: Some(from_volume), made: None } },
                "/disk set [find slot=snap-6a68ee75-bc83-5a99-a647-c2bf3ee96f67-at-6a68ee75bc] comment=source-pvc-1b2c-at-1739800000",
            ),
        ];
        for (cmd, want) in cases {
            assert_eq!(cmd.to_string(), want);
        }
    }
}
