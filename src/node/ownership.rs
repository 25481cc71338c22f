//! The one answer to "does what is at this path belong to this volume": every node call that
//! would unmount, remove, publish from or measure a path asks [`decide`], none re-derives it.
//!
//! Owns the rule only: it is pure (no I/O, no clock), fed with what the caller read from the
//! kernel (mountinfo entries, what a path is) and from the volume's record. It must not touch
//! devices, mounts or records itself.
//!
//! **The rule.** A volume is known by every device number the node has seen for it (the
//! record's history) and by the one its backing resolves to now. A mount whose device is any of
//! them is the volume's: a reconnect that renumbered the device leaves the old mount showing
//! the old minor, and a controller deleted after `ctrl_loss_tmo` leaves a mount whose device
//! the kernel no longer resolves at all; both must still be cleaned up. A mount of any other
//! device is never ours, whatever the record says. A device node is the volume's when its
//! number is known, or when the path is one of the record's targets (the plugin made it there);
//! an empty file only when the path is recorded.

use std::fmt;

use super::device::Backing;
use super::mountinfo::MountEntry;

/// A device number (`major:minor`), as mountinfo and `stat` show it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct DeviceNumber {
    pub major: u32,
    pub minor: u32,
}

impl DeviceNumber {
    pub fn of_mount(entry: &MountEntry) -> Self {
        Self {
            major: entry.major,
            minor: entry.minor,
        }
    }
}

impl fmt::Display for DeviceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// Whether two backings are the same storage: the same image, or the same NQN (the address
/// and timings a context adds do not change which volume it is). Used to hold a request's
/// contexts to the volume its id and its record name.
pub fn same_storage(a: &Backing, b: &Backing) -> bool {
    match (a, b) {
        (Backing::File { image: x }, Backing::File { image: y }) => x == y,
        (Backing::Nvme(x), Backing::Nvme(y)) => x.nqn == y.nqn,
        _ => false,
    }
}

/// What the node knows of a volume, for one path.
#[derive(Clone, Copy, Debug)]
pub struct Known<'a> {
    /// Every device number recorded for the volume (may be empty: no record).
    pub history: &'a [DeviceNumber],
    /// The device the volume's backing resolves to now; `None` when it is gone.
    pub current: Option<DeviceNumber>,
    /// Whether the path is one of the record's own (its staging path or a target).
    pub recorded: bool,
}

impl Known<'_> {
    fn knows(&self, device: DeviceNumber) -> bool {
        self.current == Some(device) || self.history.contains(&device)
    }
}

/// What the kernel shows at a path, read by the caller.
#[derive(Clone, Debug)]
pub enum AtPath<'a> {
    Nothing,
    /// A directory and the mounts stacked on it, oldest first (empty: not a mount point).
    Directory(Vec<&'a MountEntry>),
    DeviceNode(DeviceNumber),
    /// An empty regular file (what a CO may create for a block target).
    EmptyFile,
    /// Anything else, described for the error.
    Other(String),
}

/// The answer for one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing of anyone's is there (an absent path, an unmounted directory).
    Empty,
    /// The volume's. `live`: every mount (or the node) is of the device the backing resolves to
    /// now; `false` for a mount or node left over from a device that vanished or was renumbered,
    /// which may be undone but must not be published from or measured. `mounts`: how many of
    /// the volume's mounts are stacked there (0 for a node or file).
    Ours { live: bool, mounts: usize },
    /// Someone else's: never unmount, remove, publish from or measure it. Says what it is.
    Foreign(String),
}

/// Decides whether what is at a path belongs to the volume `known` describes. A directory
/// with mounts is the volume's only when every mount stacked there is: one foreign mount
/// anywhere in the stack makes the whole path foreign, so an unmount loop never reaches it.
pub fn decide(at: &AtPath<'_>, known: &Known<'_>) -> Verdict {
    match at {
        AtPath::Nothing => Verdict::Empty,
        AtPath::Directory(mounts) if mounts.is_empty() => Verdict::Empty,
        AtPath::Directory(mounts) => {
            if let Some(foreign) = mounts
                .iter()
                .rev()
                .find(|m| !known.knows(DeviceNumber::of_mount(m)))
            {
                return Verdict::Foreign(format!(
                    "a mount of {} ({}:{}, {})",
                    foreign.source, foreign.major, foreign.minor, foreign.fs_type
                ));
            }
            Verdict::Ours {
                live: mounts
                    .iter()
                    .all(|m| known.current == Some(DeviceNumber::of_mount(m))),
                mounts: mounts.len(),
            }
        }
        AtPath::DeviceNode(device) if known.knows(*device) || known.recorded => Verdict::Ours {
            live: known.current == Some(*device),
            mounts: 0,
        },
        AtPath::DeviceNode(device) => Verdict::Foreign(format!("the device node of {device}")),
        AtPath::EmptyFile if known.recorded => Verdict::Ours {
            live: false,
            mounts: 0,
        },
        AtPath::EmptyFile => Verdict::Foreign("an empty file this plugin did not create".into()),
        AtPath::Other(what) => Verdict::Foreign(what.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn dev(major: u32, minor: u32) -> DeviceNumber {
        DeviceNumber { major, minor }
    }

    fn mount(major: u32, minor: u32) -> MountEntry {
        MountEntry {
            mount_id: 100 + minor,
            parent_id: 1,
            major,
            minor,
            root: PathBuf::from("/"),
            mount_point: PathBuf::from("/stage/pvc-1"),
            options: vec!["rw".into()],
            fs_type: "ext4".into(),
            source: format!("/dev/x{minor}"),
            super_options: vec![],
        }
    }

    fn k(history: &[DeviceNumber], current: Option<DeviceNumber>, recorded: bool) -> Known<'_> {
        Known {
            history,
            current,
            recorded,
        }
    }

    fn ours(live: bool, mounts: usize) -> Verdict {
        Verdict::Ours { live, mounts }
    }

    /// One row per rule in the module doc. Removing the history from `knows` fails the
    /// "renumbered" and "vanished" rows; dropping the `recorded` arm fails the node rows;
    /// checking only the top mount fails "foreign under ours".
    #[test]
    fn what_at_a_path_belongs_to_a_volume() {
        let (old, new, other) = (dev(259, 1), dev(259, 7), dev(8, 0));
        let (m_old, m_new, m_other) = (mount(259, 1), mount(259, 7), mount(8, 0));
        let (history, both, none) = (&[old][..], &[old, new][..], &[][..]);
        let rows: Vec<(&str, AtPath<'_>, Known<'_>, Verdict)> = vec![
            (
                "absent",
                AtPath::Nothing,
                k(history, Some(old), true),
                Verdict::Empty,
            ),
            (
                "unmounted dir",
                AtPath::Directory(vec![]),
                k(history, Some(old), true),
                Verdict::Empty,
            ),
            (
                "live mount",
                AtPath::Directory(vec![&m_old]),
                k(history, Some(old), true),
                ours(true, 1),
            ),
            (
                "renumbered: the mount shows the old minor, the device now has a new one",
                AtPath::Directory(vec![&m_old]),
                k(history, Some(new), true),
                ours(false, 1),
            ),
            (
                "vanished: the backing resolves to nothing, the mount shows a recorded number",
                AtPath::Directory(vec![&m_old]),
                k(history, None, true),
                ours(false, 1),
            ),
            (
                "stacked old and new mounts of one volume",
                AtPath::Directory(vec![&m_old, &m_new]),
                k(both, Some(new), true),
                ours(false, 2),
            ),
            (
                "no record: the current device alone decides",
                AtPath::Directory(vec![&m_new]),
                k(none, Some(new), false),
                ours(true, 1),
            ),
            (
                "another device is never ours, even at a recorded path",
                AtPath::Directory(vec![&m_other]),
                k(history, Some(old), true),
                Verdict::Foreign("a mount of /dev/x0 (8:0, ext4)".into()),
            ),
            (
                "foreign under ours",
                AtPath::Directory(vec![&m_other, &m_old]),
                k(history, Some(old), true),
                Verdict::Foreign("a mount of /dev/x0 (8:0, ext4)".into()),
            ),
            (
                "vanished with no record: nothing proves the mount is ours",
                AtPath::Directory(vec![&m_old]),
                k(none, None, false),
                Verdict::Foreign("a mount of /dev/x1 (259:1, ext4)".into()),
            ),
            (
                "live node",
                AtPath::DeviceNode(new),
                k(both, Some(new), false),
                ours(true, 0),
            ),
            (
                "renumbered node",
                AtPath::DeviceNode(old),
                k(history, Some(new), false),
                ours(false, 0),
            ),
            (
                "node at a recorded target",
                AtPath::DeviceNode(other),
                k(history, Some(old), true),
                ours(false, 0),
            ),
            (
                "another device's node at a path not recorded",
                AtPath::DeviceNode(other),
                k(history, Some(old), false),
                Verdict::Foreign("the device node of 8:0".into()),
            ),
            (
                "empty file at a recorded target",
                AtPath::EmptyFile,
                k(history, None, true),
                ours(false, 0),
            ),
            (
                "empty file elsewhere",
                AtPath::EmptyFile,
                k(history, None, false),
                Verdict::Foreign("an empty file this plugin did not create".into()),
            ),
            (
                "anything else",
                AtPath::Other("a symbolic link".into()),
                k(history, Some(old), true),
                Verdict::Foreign("a symbolic link".into()),
            ),
        ];
        for (what, at, known, want) in rows {
            assert_eq!(decide(&at, &known), want, "{what}");
        }
    }

    fn any_device() -> impl proptest::strategy::Strategy<Value = DeviceNumber> {
        use proptest::prelude::*;
        (0u32..3, 0u32..4).prop_map(|(major, minor)| dev(major, minor))
    }

    proptest::proptest! {
        /// Whatever the history, the current device and the stack: a mount of a device the
        /// volume was never seen with makes the path foreign, and a path called the volume's
        /// holds only mounts of devices it knows, all of them counted. (The safety rule: no
        /// call ever unmounts another device's mount.)
        #[test]
        fn a_mount_of_an_unknown_device_is_never_the_volumes(
            history in proptest::collection::vec(any_device(), 0..3),
            current in proptest::option::of(any_device()),
            stack in proptest::collection::vec(any_device(), 0..4),
            recorded in proptest::bool::ANY,
        ) {
            let entries: Vec<MountEntry> = stack.iter().map(|d| mount(d.major, d.minor)).collect();
            let at = AtPath::Directory(entries.iter().collect());
            let verdict = decide(&at, &k(&history, current, recorded));
            let known = |d: &DeviceNumber| history.contains(d) || current == Some(*d);
            match verdict {
                Verdict::Empty => proptest::prop_assert!(stack.is_empty()),
                Verdict::Ours { live, mounts } => {
                    proptest::prop_assert!(stack.iter().all(known));
                    proptest::prop_assert_eq!(mounts, stack.len());
                    proptest::prop_assert_eq!(live, stack.iter().all(|d| current == Some(*d)));
                }
                Verdict::Foreign(_) => proptest::prop_assert!(!stack.iter().all(known)),
            }
        }
    }
}
