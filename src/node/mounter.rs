//! How mounts and device nodes are made and read on this node. [`Mounter`] is the seam;
//! [`SystemMounter`] makes the syscalls (mount(2), umount2(2), mknod(2)) and reads
//! `/proc/self/mountinfo` through the pure parser in [`super::mountinfo`].
//!
//! Owns the kernel calls and nothing else: it never decides whether something should be
//! mounted. A target is opened beneath the kubelet directory ([`KubeletRoot::open_dir`]:
//! `O_PATH`, no symlink at any component) and mounted through its `/proc/self/fd` link, so a
//! symlink planted at a target or among its parents is never followed; device nodes are made
//! by [`KubeletRoot::make_device_node`] (temporary name, chmod, `RENAME_NOREPLACE`); unmounts
//! use `UMOUNT_NOFOLLOW` and are never lazy.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use rustix::mount::{MountFlags, UnmountFlags};

use super::confine::{ConfineError, KubeletRoot};
use super::mountinfo::{self, MountEntry};
use super::paths::{AbsPath, BlockDevice};
use crate::domain::FsType;

/// Mount flags parsed from a capability's `mount_flags`: the kernel flags plus the
/// filesystem-specific rest, passed to the filesystem as its data string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MountFlags,
    pub data: Vec<String>,
    /// Options mount(8) handles itself and never passes to the kernel (`_netdev`, `nofail`,
    /// `x-*`, ...), dropped here as mount(8) drops them; kept only to be logged.
    pub dropped: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            flags: MountFlags::empty(),
            data: Vec::new(),
            dropped: Vec::new(),
        }
    }
}

/// A mount option the node refuses; the message names the option.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MountOptionError {
    #[error("mount option {option:?} is not allowed: {why}")]
    NotAllowed { option: String, why: &'static str },
    #[error("a mount option contains NUL")]
    Nul,
}

/// The flags mount(2) applies per mount rather than per filesystem: the only ones a bind
/// mount can carry (a remount with `MS_BIND` changes these and ignores the rest).
pub const PER_MOUNT_FLAGS: MountFlags = MountFlags::RDONLY
    .union(MountFlags::NOSUID)
    .union(MountFlags::NODEV)
    .union(MountFlags::NOEXEC)
    .union(MountFlags::NOATIME)
    .union(MountFlags::NODIRATIME)
    .union(MountFlags::RELATIME)
    .union(MountFlags::STRICTATIME)
    .union(MountFlags::NOSYMFOLLOW);

/// Whether mount(8) consumes `option` itself (util-linux libmount's userspace option map):
/// fstab and utab bookkeeping, who may mount, network ordering, comments. None of them
/// changes what the kernel mounts, and the kernel answers EINVAL to every one.
fn userspace_only(name: &str) -> bool {
    matches!(
        name,
        "defaults"
            | "auto"
            | "noauto"
            | "user"
            | "nouser"
            | "users"
            | "nousers"
            | "owner"
            | "noowner"
            | "group"
            | "nogroup"
            | "_netdev"
            | "_rnetdev"
            | "nofail"
            | "comment"
            | "helper"
            | "uhelper"
            | "loop"
    ) || name.starts_with("x-")
        || name.starts_with("X-")
}

/// Why an option is refused, by its name (the part before `=`), or `None` to go on.
fn refused(name: &str, has_value: bool) -> Option<&'static str> {
    Some(match name {
        "exec" => "a pod's volume is always mounted noexec",
        "suid" | "dev" => "volumes are always mounted nosuid,nodev",
        "bind" | "rbind" | "remount" | "move" | "make-shared" | "make-private" | "make-slave"
        | "make-unbindable" | "shared" | "private" | "slave" | "unbindable" | "rshared"
        | "rprivate" | "rslave" | "runbindable" => "it changes the kind of mount, not its options",
        // ext3/ext4 (external journal) and xfs (external log, realtime section): the
        // filesystem would open a block device the volume does not own.
        "journal_dev" | "journal_path" | "logdev" | "rtdev" => {
            "it points the filesystem at another block device"
        }
        // mount(8) would set up a loop or dm-verity device first: a different thing mounted.
        "loop" if has_value => "it asks mount(8) for a loop device on another file",
        "offset" | "sizelimit" | "encryption" => {
            "it asks mount(8) to mount part of the device through a loop device"
        }
        _ if name.starts_with("verity.") => {
            "it asks mount(8) for dm-verity over another block device"
        }
        _ => return None,
    })
}

impl MountOptions {
    /// Parses CSI `mount_flags` as mount(8) reads `-o`. Each item may itself hold
    /// comma-separated options; of contradicting ones the last wins. Options only mount(8)
    /// understands are dropped (listed in [`Self::dropped`]); options that would undo the
    /// node's safety (`exec`, `suid`, `dev`), change the kind of mount (`bind`, `remount`,
    /// ...) or point the filesystem at another device (`journal_path=`, `logdev=`, ...) are
    /// refused, naming the option. Everything else is filesystem data for the kernel.
    pub fn parse(items: &[String]) -> Result<Self, MountOptionError> {
        let mut opts = Self::default();
        for option in items.iter().flat_map(|i| i.split(',')).map(str::trim) {
            if option.is_empty() {
                continue;
            }
            if option.contains('\0') {
                return Err(MountOptionError::Nul);
            }
            let (name, has_value) = match option.split_once('=') {
                Some((name, _)) => (name, true),
                None => (option, false),
            };
            if let Some(why) = refused(name, has_value) {
                return Err(MountOptionError::NotAllowed {
                    option: option.to_string(),
                    why,
                });
            }
            if userspace_only(name) {
                opts.dropped.push(option.to_string());
                continue;
            }
            let set = |f: MountFlags| (f, true);
            let clear = |f: MountFlags| (f, false);
            let (flag, on) = match option {
                "ro" => set(MountFlags::RDONLY),
                "rw" => clear(MountFlags::RDONLY),
                "nosuid" => set(MountFlags::NOSUID),
                "nodev" => set(MountFlags::NODEV),
                "noexec" => set(MountFlags::NOEXEC),
                "sync" => set(MountFlags::SYNCHRONOUS),
                "async" => clear(MountFlags::SYNCHRONOUS),
                "dirsync" => set(MountFlags::DIRSYNC),
                "noatime" => set(MountFlags::NOATIME),
                "atime" => clear(MountFlags::NOATIME),
                "nodiratime" => set(MountFlags::NODIRATIME),
                "diratime" => clear(MountFlags::NODIRATIME),
                "relatime" => set(MountFlags::RELATIME),
                "norelatime" => clear(MountFlags::RELATIME),
                "strictatime" => set(MountFlags::STRICTATIME),
                "nostrictatime" => clear(MountFlags::STRICTATIME),
                "lazytime" => set(MountFlags::LAZYTIME),
                "nolazytime" => clear(MountFlags::LAZYTIME),
                "nosymfollow" => set(MountFlags::NOSYMFOLLOW),
                "symfollow" => clear(MountFlags::NOSYMFOLLOW),
                "silent" => set(MountFlags::SILENT),
                "loud" => clear(MountFlags::SILENT),
                other => {
                    opts.data.push(other.to_string());
                    continue;
                }
            };
            if on {
                opts.flags |= flag;
            } else {
                opts.flags -= flag;
            }
        }
        Ok(opts)
    }

    pub fn read_only(&self) -> bool {
        self.flags.contains(MountFlags::RDONLY)
    }

    /// The flags of a pod's bind mount of this volume: always `nosuid,nodev,noexec`, plus the
    /// volume's own per-mount flags (`ro`, `noatime`, ...), read-only when asked. Filesystem
    /// flags (`sync`, `lazytime`, ...) and data belong to the staging mount and are left out.
    pub fn bind_flags(&self, readonly: bool) -> MountFlags {
        let mut flags = (self.flags & PER_MOUNT_FLAGS)
            | MountFlags::NOSUID
            | MountFlags::NODEV
            | MountFlags::NOEXEC;
        if readonly {
            flags |= MountFlags::RDONLY;
        }
        flags
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct MountError {
    pub action: &'static str,
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

impl MountError {
    fn new(action: &'static str, path: impl std::fmt::Display, source: std::io::Error) -> Self {
        Self {
            action,
            path: path.to_string(),
            source,
        }
    }

    /// The target is in use (EBUSY).
    pub fn busy(&self) -> bool {
        self.source.raw_os_error() == Some(libc::EBUSY)
    }

    /// The target is not a mount point (EINVAL from umount2).
    pub fn not_mounted(&self) -> bool {
        self.source.raw_os_error() == Some(libc::EINVAL)
    }
}

/// Blocking calls: the node layer runs them on the blocking pool.
pub trait Mounter: Send + Sync + 'static {
    /// The mount table, parsed.
    fn mounts(&self) -> Result<Vec<MountEntry>, MountError>;
    /// Mounts `device`'s filesystem at the directory `target`, always `nosuid,nodev`.
    fn mount_device(
        &self,
        device: &BlockDevice,
        target: &AbsPath,
        fs: FsType,
        options: &MountOptions,
    ) -> Result<(), MountError>;
    /// Bind-mounts the directory `source` at the directory `target` with exactly the
    /// per-mount `flags` (see [`MountOptions::bind_flags`]), or leaves nothing mounted there.
    fn bind(&self, source: &AbsPath, target: &AbsPath, flags: MountFlags)
        -> Result<(), MountError>;
    /// Unmounts `target` (never lazily, never through a symlink).
    fn unmount(&self, target: &AbsPath) -> Result<(), MountError>;
    /// Creates a block device node for `device` at `target`, mode 0660 (0440 read-only), or
    /// nothing: a node already there, whoever made it, is EEXIST and left as it is.
    fn make_device_node(
        &self,
        target: &AbsPath,
        device: &BlockDevice,
        readonly: bool,
    ) -> Result<(), MountError>;
}

/// The real thing.
#[derive(Clone, Debug)]
pub struct SystemMounter {
    mountinfo: PathBuf,
    /// Every mount point and device node lies beneath it.
    root: Arc<KubeletRoot>,
}

/// Confined to `/`: no symlink is followed anywhere, but any path is allowed. The node plugin
/// uses [`SystemMounter::new`] with `--kubelet-dir`.
impl Default for SystemMounter {
    fn default() -> Self {
        Self::new(Arc::new(KubeletRoot::new(
            AbsPath::try_from(PathBuf::from("/")).expect("/ is a clean absolute path"),
        )))
    }
}

impl SystemMounter {
    pub fn new(root: Arc<KubeletRoot>) -> Self {
        Self {
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            root,
        }
    }

    /// Opens the directory `target` beneath the root without following a symlink anywhere,
    /// for mounting through `/proc/self/fd/N`.
    fn open_dir_nofollow(&self, target: &AbsPath) -> Result<rustix::fd::OwnedFd, MountError> {
        self.root
            .open_dir(target)
            .map_err(|e| confine_failure("opening mount target", target, e))
    }
}

fn confine_failure(action: &'static str, path: &AbsPath, e: ConfineError) -> MountError {
    let source = match e {
        ConfineError::Io { source, .. } => source,
        ConfineError::Exists { .. } => std::io::Error::from_raw_os_error(libc::EEXIST),
        e @ (ConfineError::Outside { .. } | ConfineError::SymlinkInPath { .. }) => {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
        }
    };
    MountError::new(action, path, source)
}

fn fd_path(fd: &rustix::fd::OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

impl Mounter for SystemMounter {
    fn mounts(&self) -> Result<Vec<MountEntry>, MountError> {
        let text = std::fs::read_to_string(&self.mountinfo)
            .map_err(|e| MountError::new("reading", self.mountinfo.display(), e))?;
        mountinfo::parse(&text).map_err(|e| {
            MountError::new(
                "parsing",
                self.mountinfo.display(),
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })
    }

    fn mount_device(
        &self,
        device: &BlockDevice,
        target: &AbsPath,
        fs: FsType,
        options: &MountOptions,
    ) -> Result<(), MountError> {
        let dir = self.open_dir_nofollow(target)?;
        let data = std::ffi::CString::new(options.data.join(","))
            .map_err(|e| MountError::new("mounting", target, std::io::Error::other(e)))?;
        let flags = options.flags | MountFlags::NOSUID | MountFlags::NODEV;
        rustix::mount::mount(
            device.path.as_path(),
            fd_path(&dir),
            fs.as_str(),
            flags,
            Some(data.as_c_str()),
        )
        .map_err(|e| MountError::new("mounting", format!("{device} at {target}"), e.into()))
    }

    fn bind(
        &self,
        source: &AbsPath,
        target: &AbsPath,
        flags: MountFlags,
    ) -> Result<(), MountError> {
        let from = self.open_dir_nofollow(source)?;
        let to = self.open_dir_nofollow(target)?;
        rustix::mount::mount_bind(fd_path(&from), fd_path(&to)).map_err(|e| {
            MountError::new("bind-mounting", format!("{source} at {target}"), e.into())
        })?;
        // A bind mount takes its flags only from a remount of the new mount, and
        // MS_REMOUNT|MS_BIND replaces every per-mount flag (only the atime ones are kept when
        // none is given): all of them are passed, every time.
        let flags = MountFlags::BIND | (flags & PER_MOUNT_FLAGS);
        let remounted = self.open_dir_nofollow(target).and_then(|fd| {
            rustix::mount::mount_remount(fd_path(&fd), flags, c"")
                .map_err(|e| MountError::new("remounting", target, e.into()))
        });
        if let Err(e) = remounted {
            // Never leave a bind mount without the flags it was asked for.
            let _ = self.unmount(target);
            return Err(e);
        }
        Ok(())
    }

    fn unmount(&self, target: &AbsPath) -> Result<(), MountError> {
        rustix::mount::unmount(target.as_path(), UnmountFlags::NOFOLLOW)
            .map_err(|e| MountError::new("unmounting", target, e.into()))
    }

    fn make_device_node(
        &self,
        target: &AbsPath,
        device: &BlockDevice,
        readonly: bool,
    ) -> Result<(), MountError> {
        let mode = if readonly { 0o440 } else { 0o660 };
        self.root
            .make_device_node(target, device.major, device.minor, mode)
            .map_err(|e| confine_failure("creating device node", target, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(items: &[&str]) -> Result<MountOptions, MountOptionError> {
        MountOptions::parse(&items.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_become_kernel_flags_and_the_rest_is_data() {
        let o = parse(&["noatime", "discard,errors=remount-ro", "ro", "defaults"]).unwrap();
        assert!(o.flags.contains(MountFlags::NOATIME | MountFlags::RDONLY));
        assert_eq!(o.data, vec!["discard", "errors=remount-ro"]);
        assert!(o.read_only());
        let o = parse(&["ro", "rw"]).unwrap();
        assert!(!o.read_only(), "the last word wins, as mount(8) does");
        assert_eq!(parse(&[]).unwrap(), MountOptions::default());
    }

    #[test]
    fn unsafe_or_structural_flags_are_refused() {
        for bad in ["suid", "dev", "bind", "rbind", "remount", "a\0b"] {
            assert!(parse(&[bad]).is_err(), "{bad:?}");
        }
    }

    /// Catches removing any name from `userspace_only`: mount(8) consumes these itself, and
    /// the kernel answers EINVAL to each one that reaches mount(2) as data.
    #[test]
    fn userspace_only_options_are_dropped_not_passed_to_the_kernel() {
        let o = parse(&[
            "_netdev,defaults,nofail",
            "auto",
            "noauto",
            "user",
            "nouser",
            "users",
            "owner",
            "group",
            "user=alice",
            "x-systemd.automount",
            "X-mount.mkdir",
            "comment=from fstab",
            "loop",
            "noatime",
            "discard",
        ])
        .unwrap();
        assert_eq!(
            o.data,
            vec!["discard"],
            "only filesystem data reaches mount(2)"
        );
        assert!(o.flags.contains(MountFlags::NOATIME));
        assert_eq!(o.dropped.len(), 15, "{:?}", o.dropped);
    }

    /// Catches removing `exec` from `refused`: it would clear the noexec a pod's mount keeps.
    #[test]
    fn exec_is_refused_naming_it() {
        for items in [&["exec"][..], &["noexec", "exec"], &["ro,exec"]] {
            let err = parse(items).unwrap_err().to_string();
            assert!(err.contains("\"exec\""), "{items:?}: {err}");
        }
        assert!(parse(&["noexec"])
            .unwrap()
            .flags
            .contains(MountFlags::NOEXEC));
    }

    /// Catches removing any device-naming option from `refused` (ext4's external journal,
    /// xfs's external log and realtime devices, mount(8)'s loop and verity setup).
    #[test]
    fn options_naming_another_device_are_refused_naming_them() {
        for bad in [
            "journal_path=/dev/x",
            "journal_dev=259:3",
            "logdev=/dev/sdb1",
            "rtdev=/dev/sdc",
            "noatime,logdev=/dev/sdb1",
            "loop=/dev/loop7",
            "offset=4096",
            "sizelimit=1024",
            "verity.hashdevice=/dev/sdd",
        ] {
            let err = parse(&[bad]).unwrap_err().to_string();
            let option = bad.rsplit(',').next().unwrap();
            assert!(err.contains(option), "{bad:?}: {err}");
        }
        // A similar name is not a device option: it goes to the filesystem, which decides.
        assert_eq!(
            parse(&["journal_checksum"]).unwrap().data,
            vec!["journal_checksum"]
        );
    }

    /// Catches a bind that drops `noexec` (or any of the volume's per-mount flags) or keeps
    /// a filesystem-wide flag a bind remount cannot carry.
    #[test]
    fn bind_flags_keep_the_safety_flags_and_the_volumes_per_mount_flags() {
        let o = parse(&["noatime,nodiratime,sync,discard,lazytime"]).unwrap();
        let rw = o.bind_flags(false);
        assert_eq!(
            rw,
            MountFlags::NOSUID
                | MountFlags::NODEV
                | MountFlags::NOEXEC
                | MountFlags::NOATIME
                | MountFlags::NODIRATIME
        );
        assert_eq!(o.bind_flags(true), rw | MountFlags::RDONLY);
        let ro = parse(&["ro"]).unwrap();
        assert!(ro
            .bind_flags(false)
            .contains(MountFlags::RDONLY | MountFlags::NOEXEC));
    }

    proptest::proptest! {
        /// Whatever the input, the parser never panics, and a pod's bind mount is always
        /// nosuid,nodev,noexec.
        #[test]
        fn any_accepted_options_still_bind_nosuid_nodev_noexec(
            items in proptest::collection::vec("[a-z_=,.-]{0,20}", 0..6)
        ) {
            if let Ok(o) = MountOptions::parse(&items) {
                let safe = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
                proptest::prop_assert!(o.bind_flags(false).contains(safe));
                proptest::prop_assert!(!o.data.iter().any(|d| d == "exec" || d.starts_with("journal_path")));
            }
        }
    }
}
