//! Confined paths: every staging path and target a CO names must lie beneath the kubelet's
//! directory (`--kubelet-dir`), and every file operation on one resolves it from a directory fd
//! on that root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`. A symlink anywhere
//! beneath the root — at a parent as well as at the last component — is refused, never
//! followed, so a request cannot make the node mount over, mknod in, or remove from a directory
//! outside the kubelet's trees.
//!
//! Owns the file operations on CO-named paths (look, mkdir, rmdir, unlink, device nodes,
//! opening a mount point) and the per-path locks. Never decides whether something belongs to a
//! volume: the plugin asks that and then calls here. [`super::paths`] keeps the pure types.
//!
//! The root itself may be reached through a symlink (an admin's choice of where the kubelet
//! lives); only what lies beneath it is confined. The root is opened on first use, so a
//! controller-only or laptop run without a kubelet directory starts, and node calls say what is
//! missing.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags};
use rustix::io::Errno;
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::paths::{AbsPath, Found};
use crate::keyed::KeyedLocks;

/// The kubelet's own default root directory.
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";

/// Why a confined operation refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("{path} is not beneath the kubelet directory {root} (--kubelet-dir)")]
    Outside { path: AbsPath, root: AbsPath },
    #[error("{path} has a symbolic link in its path beneath {root}; refusing to follow it")]
    SymlinkInPath { path: AbsPath, root: AbsPath },
    #[error("{path} already exists")]
    Exists { path: AbsPath },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ConfineError {
    fn io(action: &'static str, path: impl std::fmt::Display, errno: Errno) -> Self {
        Self::Io {
            action,
            path: path.to_string(),
            source: errno.into(),
        }
    }

    /// The errno of an I/O failure (ENOTEMPTY from rmdir, say).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

type Hook = Box<dyn FnOnce() + Send>;

/// The kubelet's directory, opened once, and the root of every confined path.
pub struct KubeletRoot {
    path: AbsPath,
    dir: OnceLock<OwnedFd>,
    /// The root as the kernel names it in mountinfo (its symlinks resolved), read once when
    /// the root is opened.
    canonical: OnceLock<PathBuf>,
    /// Runs once, inside the next device node creation, just before the target's name is
    /// claimed: where a test lets a racing publish win.
    before_claim: std::sync::Mutex<Option<Hook>>,
}

impl std::fmt::Debug for KubeletRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletRoot")
            .field("path", &self.path)
            .finish()
    }
}

/// Where a confined path's last component lives: its parent, opened beneath the root.
struct Parent<'a> {
    fd: OwnedFd,
    name: &'a OsStr,
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

impl KubeletRoot {
    /// `path` as the kubelet names it (requests carry paths in that spelling).
    pub fn new(path: AbsPath) -> Self {
        Self {
            path,
            dir: OnceLock::new(),
            canonical: OnceLock::new(),
            before_claim: std::sync::Mutex::new(None),
        }
    }

    pub fn path(&self) -> &AbsPath {
        &self.path
    }

    /// Opens the root now, so a start-up can say early that it is missing.
    pub fn open(&self) -> Result<(), ConfineError> {
        self.dir().map(|_| ())
    }

    fn dir(&self) -> Result<&OwnedFd, ConfineError> {
        if let Some(fd) = self.dir.get() {
            return Ok(fd);
        }
        let fd = rustix::fs::open(
            self.path.as_path(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| ConfineError::io("opening the kubelet directory", &self.path, e))?;
        if self.canonical.get().is_none() {
            let canonical =
                std::fs::canonicalize(self.path.as_path()).map_err(|e| ConfineError::Io {
                    action: "resolving the kubelet directory",
                    path: self.path.to_string(),
                    source: e,
                })?;
            // A racing first use resolved it too; both name the same directory.
            let _ = self.canonical.set(canonical);
        }
        // A racing first use opened it too; either fd names the same directory.
        let _ = self.dir.set(fd);
        Ok(self.dir.get().expect("set above"))
    }

    /// `path` as the kernel names it in mountinfo, for comparing with mount points. Pure once
    /// the root is open: the root's own symlinks were resolved then, and a path beneath it has
    /// none (every call refuses one, `RESOLVE_NO_SYMLINKS`), so the rest is taken as it is. A
    /// path outside the root, or one asked before the root was opened, is its own view.
    pub fn kernel_view(&self, path: &AbsPath) -> PathBuf {
        match (self.canonical.get(), self.beneath(path)) {
            (Some(root), Ok(rel)) => root.join(rel),
            _ => path.as_path().to_path_buf(),
        }
    }

    /// `path` relative to the root: strictly beneath it (the root itself is no volume path).
    /// Pure: compares components, touches nothing.
    pub fn beneath<'a>(&self, path: &'a AbsPath) -> Result<&'a Path, ConfineError> {
        match path.as_path().strip_prefix(self.path.as_path()) {
            Ok(rel) if !rel.as_os_str().is_empty() => Ok(rel),
            _ => Err(ConfineError::Outside {
                path: path.clone(),
                root: self.path.clone(),
            }),
        }
    }

    fn resolve_error(&self, path: &AbsPath, action: &'static str, e: Errno) -> ConfineError {
        match e {
            // ELOOP: RESOLVE_NO_SYMLINKS met a symlink; EXDEV: a step left the root.
            Errno::LOOP => ConfineError::SymlinkInPath {
                path: path.clone(),
                root: self.path.clone(),
            },
            Errno::XDEV => ConfineError::Outside {
                path: path.clone(),
                root: self.path.clone(),
            },
            other => ConfineError::io(action, path, other),
        }
    }

    /// Opens `rel` (beneath the root) as an `O_PATH` directory, never through a symlink.
    fn open_beneath(
        &self,
        path: &AbsPath,
        rel: &Path,
        action: &'static str,
    ) -> Result<OwnedFd, ConfineError> {
        let rel: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        let dir = self.dir()?;
        // EAGAIN: a rename elsewhere raced the walk; the kernel asks for a retry.
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(
                dir,
                rel,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            ) {
                Err(Errno::AGAIN) if tries < 8 => tries += 1,
                other => return other.map_err(|e| self.resolve_error(path, action, e)),
            }
        }
    }

    fn parent<'a>(
        &self,
        path: &'a AbsPath,
        action: &'static str,
    ) -> Result<Parent<'a>, ConfineError> {
        let rel = self.beneath(path)?;
        let name = rel
            .file_name()
            .expect("a clean relative path ends in a name");
        let fd = self.open_beneath(path, rel.parent().unwrap_or(Path::new("")), action)?;
        Ok(Parent { fd, name })
    }

    /// Checks that `path` lies beneath the root and that no parent of it is a symlink; what
    /// is at the path itself is [`Self::inspect`]'s answer. A missing parent is fine here.
    pub fn check(&self, path: &AbsPath) -> Result<(), ConfineError> {
        match self.parent(path, "resolving") {
            Ok(_) => Ok(()),
            Err(ConfineError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// What is at `path`, looked at through its parent's fd without following a symlink at
    /// the path. A missing parent is [`Found::Nothing`].
    pub fn inspect(&self, path: &AbsPath) -> Result<Found, ConfineError> {
        let parent = match self.parent(path, "looking at") {
            Ok(p) => p,
            Err(ConfineError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(Found::Nothing)
            }
            Err(e) => return Err(e),
        };
        let st = match rustix::fs::statat(&parent.fd, parent.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(Found::Nothing),
            Err(e) => return Err(ConfineError::io("looking at", path, e)),
        };
        Ok(match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => Found::Symlink,
            FileType::Directory => Found::Directory,
            FileType::BlockDevice => Found::BlockDevice {
                major: rustix::fs::major(st.st_rdev),
                minor: rustix::fs::minor(st.st_rdev),
                mode: st.st_mode & 0o7777,
            },
            FileType::RegularFile => Found::RegularFile {
                len: st.st_size as u64,
            },
            _ => Found::Other,
        })
    }

    /// Creates the directory `path` (mode 0750 before the umask); its parent must exist.
    pub fn mkdir(&self, path: &AbsPath) -> Result<(), ConfineError> {
        let parent = self.parent(path, "creating")?;
        match rustix::fs::mkdirat(&parent.fd, parent.name, Mode::from_raw_mode(0o750)) {
            Ok(()) => Ok(()),
            Err(Errno::EXIST) => Err(ConfineError::Exists { path: path.clone() }),
            Err(e) => Err(ConfineError::io("creating", path, e)),
        }
    }

    /// Removes the empty directory `path`; `Ok(false)` when it is already gone.
    pub fn rmdir(&self, path: &AbsPath) -> Result<bool, ConfineError> {
        self.remove(path, AtFlags::REMOVEDIR)
    }

    /// Removes the non-directory `path` (never what a symlink there points to); `Ok(false)`
    /// when it is already gone.
    pub fn unlink(&self, path: &AbsPath) -> Result<bool, ConfineError> {
        self.remove(path, AtFlags::empty())
    }

    fn remove(&self, path: &AbsPath, flags: AtFlags) -> Result<bool, ConfineError> {
        let parent = match self.parent(path, "removing") {
            Ok(p) => p,
            Err(ConfineError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&parent.fd, parent.name, flags) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(ConfineError::io("removing", path, e)),
        }
    }

    /// Opens the directory `path` as `O_PATH`, never through a symlink: a mount is made
    /// through its `/proc/self/fd` link, so the directory checked is the one mounted over.
    pub fn open_dir(&self, path: &AbsPath) -> Result<OwnedFd, ConfineError> {
        let rel = self.beneath(path)?;
        self.open_beneath(path, rel, "opening")
    }

    /// Creates a block device node for `major:minor` at `path` with exactly `mode`, or
    /// nothing: the node is made under a temporary name in the target's directory, given its
    /// mode, then renamed onto the target with `RENAME_NOREPLACE`. A node another call put
    /// there first is never replaced nor removed ([`ConfineError::Exists`]), and a kill at any
    /// step leaves no node at the target that a retry would refuse for its mode. Only the
    /// temporary name is ever removed here.
    pub fn make_device_node(
        &self,
        path: &AbsPath,
        major: u32,
        minor: u32,
        mode: u32,
    ) -> Result<(), ConfineError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let parent = self.parent(path, "creating device node")?;
        let temp = format!(
            ".rds-csi-{}-{}.tmp",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mode = Mode::from_raw_mode(mode);
        rustix::fs::mknodat(
            &parent.fd,
            temp.as_str(),
            FileType::BlockDevice,
            mode,
            rustix::fs::makedev(major, minor),
        )
        .map_err(|e| ConfineError::io("creating device node", path, e))?;
        let placed = (|| {
            // mknod applies the umask; the node's mode is part of the contract.
            rustix::fs::chmodat(&parent.fd, temp.as_str(), mode, AtFlags::empty())
                .map_err(|e| ConfineError::io("setting the mode of", path, e))?;
            if let Some(hook) = self.before_claim.lock().expect("hook lock").take() {
                hook();
            }
            rustix::fs::renameat_with(
                &parent.fd,
                temp.as_str(),
                &parent.fd,
                parent.name,
                RenameFlags::NOREPLACE,
            )
            .map_err(|e| match e {
                Errno::EXIST => ConfineError::Exists { path: path.clone() },
                e => ConfineError::io("placing device node", path, e),
            })
        })();
        if placed.is_err() {
            if let Err(e) = rustix::fs::unlinkat(&parent.fd, temp.as_str(), AtFlags::empty()) {
                tracing::warn!(path = %path, temp, error = %e, "could not remove a temporary device node");
            }
        }
        placed
    }

    /// Test seam: `hook` runs once inside the next [`Self::make_device_node`], after the
    /// temporary node is made and before the target's name is claimed.
    #[doc(hidden)]
    pub fn before_next_claim(&self, hook: impl FnOnce() + Send + 'static) {
        *self.before_claim.lock().expect("hook lock") = Some(Box::new(hook));
    }
}

/// One async lock per CO-named path, so two calls on one path (two volumes publishing at one
/// target) never interleave even though their volume locks differ. Taken after the volume's
/// lock and never while waiting for another volume, so the two kinds cannot deadlock.
#[derive(Default)]
pub struct PathLocks {
    locks: KeyedLocks<AbsPath, Mutex<()>>,
}

impl PathLocks {
    /// Waits for the path's turn; the guard releases it.
    pub async fn lock(&self, path: &AbsPath) -> OwnedMutexGuard<()> {
        self.locks.get(path).lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A root in a fresh temp dir (canonical, so the test's own paths carry no symlink).
    fn root() -> (tempfile::TempDir, KubeletRoot) {
        let dir = tempfile::tempdir().unwrap();
        let path = std::fs::canonicalize(dir.path()).unwrap();
        let root = KubeletRoot::new(AbsPath::try_from(path).unwrap());
        (dir, root)
    }

    fn abs(p: impl Into<PathBuf>) -> AbsPath {
        AbsPath::try_from(p.into()).unwrap()
    }

    /// A kubelet directory reached through a symlink (`/var/lib/kubelet` -> `/data/kubelet` on
    /// some distributions): mountinfo names its mounts by the resolved path, so the view of a
    /// path beneath it is the resolved root plus the rest, and resolving takes no I/O after the
    /// root was opened. Removing the resolution in `dir()` (or `kernel_view` returning the
    /// path as it is) fails this; a path outside the root is its own view.
    #[test]
    fn the_kernel_view_of_a_path_resolves_the_roots_own_symlink_once() {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path())
            .unwrap()
            .join("data-kubelet");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("kubelet");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let root = KubeletRoot::new(abs(link.clone()));
        let staging = abs(link.join("plugins/x/globalmount"));
        assert_eq!(
            root.kernel_view(&staging),
            staging.as_path(),
            "not opened yet"
        );
        root.open().unwrap();
        assert_eq!(
            root.kernel_view(&staging),
            real.join("plugins/x/globalmount")
        );
        let outside = abs("/elsewhere/x");
        assert_eq!(root.kernel_view(&outside), outside.as_path());
    }

    /// mknod needs CAP_MKNOD: as the node tests, these fail without root unless
    /// `RDS_CSI_SKIP_ROOT_TESTS=1` says the skip is deliberate, and then record the skip
    /// (see [`crate::node::skips`]). They run no external tool.
    fn root_or_skip(test: &str) -> bool {
        crate::node::skips::can_run_or_skip(test, &[])
    }

    /// Catches `beneath` accepting a path by string prefix or the root itself: `/x/rootother`
    /// shares the root's bytes but not its directory.
    #[test]
    fn a_staging_path_outside_the_kubelet_root_is_refused() {
        let (_dir, root) = root();
        let r = root.path().to_string();
        for outside in [
            "/etc/stage".to_string(),
            format!("{r}other/stage"),
            r.clone(),
            "/".to_string(),
        ] {
            let p = abs(&outside);
            assert!(
                matches!(root.check(&p), Err(ConfineError::Outside { .. })),
                "{outside}"
            );
            assert!(
                matches!(root.mkdir(&p), Err(ConfineError::Outside { .. })),
                "{outside}"
            );
        }
        let inside = abs(format!("{r}/plugins/stage"));
        root.check(&inside).unwrap();
        assert_eq!(root.beneath(&inside).unwrap(), Path::new("plugins/stage"));
    }

    /// Catches dropping `RESOLVE_NO_SYMLINKS` (or resolving by path): a symlinked parent,
    /// inside or pointing outside the root, is refused by every operation, and nothing is made
    /// where it points.
    #[test]
    fn a_symlinked_parent_is_refused() {
        let (dir, root) = root();
        let outside = tempfile::tempdir().unwrap();
        let base = root.path().as_path().to_path_buf();
        std::fs::create_dir(base.join("real")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("inner")).unwrap();
        std::os::unix::fs::symlink(outside.path(), base.join("escape")).unwrap();
        for link in ["inner", "escape"] {
            let p = abs(base.join(link).join("stage"));
            let refused = |r: Result<(), ConfineError>| {
                assert!(
                    matches!(r, Err(ConfineError::SymlinkInPath { .. })),
                    "{link}: {r:?}"
                )
            };
            refused(root.check(&p));
            refused(root.inspect(&p).map(|_| ()));
            refused(root.mkdir(&p));
            refused(root.rmdir(&p).map(|_| ()));
            refused(root.unlink(&p).map(|_| ()));
            refused(root.open_dir(&p).map(|_| ()));
        }
        assert!(!base.join("real/stage").exists());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        drop(dir);
    }

    /// Catches following a symlink at the last component: it is reported, not looked through.
    #[test]
    fn inspect_never_follows_a_symlink() {
        let (_dir, root) = root();
        let base = root.path().as_path().to_path_buf();
        std::fs::create_dir(base.join("real")).unwrap();
        std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
        assert_eq!(
            root.inspect(&abs(base.join("link"))).unwrap(),
            Found::Symlink
        );
        assert_eq!(
            root.inspect(&abs(base.join("real"))).unwrap(),
            Found::Directory
        );
        assert_eq!(
            root.inspect(&abs(base.join("none"))).unwrap(),
            Found::Nothing
        );
        assert_eq!(
            root.inspect(&abs(base.join("none/deeper"))).unwrap(),
            Found::Nothing,
            "a missing parent is nothing there"
        );
        root.mkdir(&abs(base.join("made"))).unwrap();
        assert!(matches!(
            root.mkdir(&abs(base.join("made"))),
            Err(ConfineError::Exists { .. })
        ));
        assert!(root.rmdir(&abs(base.join("made"))).unwrap());
        assert!(
            !root.rmdir(&abs(base.join("made"))).unwrap(),
            "gone is Ok(false)"
        );
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Catches the mknod-at-the-target (and remove-after-EEXIST) way: another volume's node
    /// that appears at the target between the caller's look and the claim stays as it was,
    /// the loser gets `Exists`, and no temporary node is left.
    #[test]
    fn a_block_publish_racing_another_volume_on_one_target_leaves_the_winner_intact() {
        if !root_or_skip(
            "a_block_publish_racing_another_volume_on_one_target_leaves_the_winner_intact",
        ) {
            return;
        }
        let (_dir, root) = root();
        let base = root.path().as_path().to_path_buf();
        let target = abs(base.join("target"));
        let winner = target.clone();
        let winner_root = KubeletRoot::new(root.path().clone());
        root.before_next_claim(move || {
            winner_root
                .make_device_node(&winner, 7, 201, 0o660)
                .expect("the winner's publish");
        });
        let lost = root.make_device_node(&target, 7, 202, 0o440);
        assert!(matches!(lost, Err(ConfineError::Exists { .. })), "{lost:?}");
        assert_eq!(
            root.inspect(&target).unwrap(),
            Found::BlockDevice {
                major: 7,
                minor: 201,
                mode: 0o660
            },
            "the winner's node is untouched"
        );
        assert_eq!(names_in(&base), vec!["target"], "no temporary node left");
        std::fs::remove_file(target.as_path()).unwrap();
    }

    /// Catches dropping the chmod (mknod applies the umask) or leaving the temporary name.
    #[test]
    fn a_device_node_gets_exactly_its_mode_and_only_its_name() {
        if !root_or_skip("a_device_node_gets_exactly_its_mode_and_only_its_name") {
            return;
        }
        let (_dir, root) = root();
        let base = root.path().as_path().to_path_buf();
        let target = abs(base.join("dev"));
        root.make_device_node(&target, 7, 203, 0o660).unwrap();
        assert_eq!(
            root.inspect(&target).unwrap(),
            Found::BlockDevice {
                major: 7,
                minor: 203,
                mode: 0o660
            }
        );
        assert_eq!(names_in(&base), vec!["dev"]);
        assert!(root.unlink(&target).unwrap());
        assert!(names_in(&base).is_empty());
    }

    /// Catches `PathLocks` keying on anything but the path: a second call on one path waits
    /// for the holder (two volumes publishing at one target), a call on another path does not.
    /// The paused clock only advances when every task is idle, so the timeout fires only if
    /// the lock really is pending.
    #[tokio::test(start_paused = true)]
    async fn two_calls_on_one_path_take_turns() {
        use std::time::Duration;
        let locks = PathLocks::default();
        let (t, u) = (abs("/k/pods/t"), abs("/k/pods/u"));
        let held = locks.lock(&t).await;
        assert!(
            tokio::time::timeout(Duration::from_secs(1), locks.lock(&t))
                .await
                .is_err(),
            "the same path waits for its holder"
        );
        drop(
            tokio::time::timeout(Duration::from_secs(1), locks.lock(&u))
                .await
                .expect("another path does not wait"),
        );
        drop(held);
        drop(
            tokio::time::timeout(Duration::from_secs(1), locks.lock(&t))
                .await
                .expect("released"),
        );
    }

    /// One attached device for every volume, as a loop device would be: enough for the plugin
    /// to stage and publish block volumes without a kernel device behind them.
    struct OneDevice(BlockDevice_);
    type BlockDevice_ = crate::node::paths::BlockDevice;

    #[async_trait::async_trait]
    impl crate::node::device::DeviceSource for OneDevice {
        fn kind(&self) -> &'static str {
            "file"
        }
        fn locate(
            &self,
            volume: &crate::ids::VolumeId,
            _: &std::collections::HashMap<String, String>,
            _: &std::collections::HashMap<String, String>,
        ) -> Result<crate::node::device::Backing, crate::node::NodeError> {
            Ok(crate::node::device::Backing::File {
                image: abs(format!("/nonexistent/{volume}.img")),
            })
        }
        async fn exists(
            &self,
            _: &crate::node::device::Backing,
        ) -> Result<bool, crate::node::NodeError> {
            Ok(true)
        }
        async fn find(
            &self,
            _: &crate::node::device::Backing,
        ) -> Result<Option<BlockDevice_>, crate::node::NodeError> {
            Ok(Some(self.0.clone()))
        }
        async fn attach(
            &self,
            _: &crate::node::device::Backing,
        ) -> Result<BlockDevice_, crate::node::NodeError> {
            Ok(self.0.clone())
        }
        async fn detach(
            &self,
            _: &crate::node::device::Backing,
        ) -> Result<(), crate::node::NodeError> {
            Ok(())
        }
        async fn refresh_size(
            &self,
            _: &crate::node::device::Backing,
            _: &BlockDevice_,
        ) -> Result<u64, crate::node::NodeError> {
            Ok(0)
        }
        async fn healthy(
            &self,
            _: &crate::node::device::Backing,
            _: &BlockDevice_,
        ) -> Result<bool, crate::node::NodeError> {
            Ok(true)
        }
    }

    /// Through the plugin: catches the block publish's cleanup removing the target after a
    /// failed device node creation (plugin.rs `publish_block`): another volume's node that
    /// appears at the target while this publish runs is left intact, and the publish answers
    /// FAILED_PRECONDITION.
    #[tokio::test]
    async fn a_block_publish_losing_the_race_through_the_plugin_leaves_the_winner_intact() {
        use crate::domain::{AccessMode, Capability};
        use crate::node::mounter::{MountOptions, SystemMounter};
        use crate::node::plugin::{NodeDeps, NodePlugin, Publish, Stage};
        use std::sync::Arc;
        if !root_or_skip(
            "a_block_publish_losing_the_race_through_the_plugin_leaves_the_winner_intact",
        ) {
            return;
        }
        let (dir, root) = root();
        let root = Arc::new(root);
        let base = root.path().as_path().to_path_buf();
        std::fs::create_dir(base.join("stage")).unwrap();
        let device = BlockDevice_ {
            path: abs("/dev/loop250"),
            major: 7,
            minor: 250,
        };
        let plugin = Arc::new(NodePlugin::new(NodeDeps {
            source: Arc::new(OneDevice(device)),
            mounter: Arc::new(SystemMounter::new(root.clone())),
            runner: Arc::new(crate::node::fakes::RecordingRunner::default()),
            records: crate::node::records::Records::open(&dir.path().join("state")).unwrap(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            root: root.clone(),
        }));
        let volume = crate::ids::VolumeId::try_from("a").unwrap();
        let cap = Capability::block(AccessMode::SingleNodeWriter);
        plugin
            .stage(Stage {
                volume: volume.clone(),
                staging: abs(base.join("stage")),
                capability: cap.clone(),
                options: MountOptions::default(),
                publish_context: Default::default(),
                volume_context: Default::default(),
            })
            .await
            .unwrap();
        let target = abs(base.join("target"));
        let (winner, winner_root) = (target.clone(), KubeletRoot::new(root.path().clone()));
        root.before_next_claim(move || {
            winner_root
                .make_device_node(&winner, 7, 251, 0o660)
                .expect("the winner's publish");
        });
        let lost = plugin
            .publish(Publish {
                volume,
                staging: abs(base.join("stage")),
                target: target.clone(),
                capability: cap,
                options: MountOptions::default(),
                readonly: false,
                publish_context: Default::default(),
                volume_context: Default::default(),
            })
            .await;
        assert!(
            matches!(lost, Err(crate::node::NodeError::FailedPrecondition(_))),
            "{lost:?}"
        );
        assert_eq!(
            root.inspect(&target).unwrap(),
            Found::BlockDevice {
                major: 7,
                minor: 251,
                mode: 0o660
            },
            "the winner's node is untouched"
        );
        assert_eq!(names_in(&base), vec!["stage", "state", "target"]);
        std::fs::remove_file(target.as_path()).unwrap();
    }
}
