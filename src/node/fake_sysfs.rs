//! Test fixtures that look like the kernel's: an NVMe-oF sysfs tree, a `/proc` with open file
//! descriptors and a mount table, and a mounter that keeps that table.
//!
//! The layout follows the kernel's sysfs for NVMe over Fabrics (Documentation/ABI and
//! `drivers/nvme/host/{core,multipath,sysfs}.c`) and how nvme-cli's `tree.c` walks it, not our
//! own reader:
//! - a fabrics controller is the device `devices/virtual/nvme-fabrics/ctl/nvmeC`, linked from
//!   `class/nvme/nvmeC`, with `subsysnqn`, `state` and `transport`;
//! - its subsystem is `devices/virtual/nvme-subsystem/nvme-subsysS`, linked from
//!   `class/nvme-subsystem/nvme-subsysS`, holding a link `nvmeC` to each controller;
//! - controllers and subsystems draw their instance numbers from one pool (the core's
//!   `nvme_instance_ida`): a new subsystem takes the number of the controller that founded it
//!   and keeps it after that controller is gone, so a subsystem's later controllers (another
//!   path, a reconnect while the old one is still being torn down) are numbered apart from it
//!   (`nvme-subsys3` holding `nvme1`), and no controller is ever numbered as another live
//!   subsystem;
//! - with native multipath the visible namespace is the subsystem's head `nvmeSnN` (under the
//!   subsystem, in `class/block` and `block`), and each controller holds a hidden path
//!   `nvmeScCnN` (a disk with its own device number and no `/dev` node); without multipath the
//!   namespace is `nvmeCnN` under the controller;
//! - every disk has `dev` (`major:minor`), `size` (512-byte sectors) and `holders/`.
//!
//! The fake is as strict as the kernel where a test could otherwise pass on a layout the kernel
//! never shows: a controller or subsystem instance is never reused while it exists, nor given
//! to a controller while a subsystem holds it, a device number is never given to two disks, a
//! subsystem has one NQN, and `state` takes only the kernel's words.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::mount::MountFlags;

use super::mounter::{MountError, MountOptions, Mounter};
use super::mountinfo::{escape, MountEntry};
use super::paths::{AbsPath, BlockDevice};
use crate::domain::FsType;

/// The words `nvme_sysfs_show_state` prints.
pub const KERNEL_STATES: [&str; 7] = [
    "new",
    "live",
    "resetting",
    "connecting",
    "deleting",
    "deleting (no IO)",
    "dead",
];

/// An NVMe-oF sysfs tree under a temporary root. Clones share the tree, so a runner's hook can
/// change it while the test holds it.
#[derive(Clone)]
pub struct FakeSysfs {
    root: PathBuf,
    state: Arc<Mutex<Taken>>,
}

#[derive(Default)]
struct Taken {
    /// controller instance → subsystem instance.
    controllers: BTreeMap<u32, u32>,
    /// subsystem instance → NQN.
    subsystems: BTreeMap<u32, String>,
    /// device number → disk name.
    devices: BTreeMap<(u32, u32), String>,
}

/// A path as mountinfo names it: the kernel reports a mount point with every symlink resolved
/// (its last component is never one here: the plugin refuses those). The fake mounter keys its
/// table this way, as the kernel does, whatever the code under test compares it with.
pub fn kernel_view(path: &AbsPath) -> PathBuf {
    let p = path.as_path();
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .unwrap_or_else(|_| parent.to_path_buf())
            .join(name),
        _ => p.to_path_buf(),
    }
}

fn dev(s: &str) -> (u32, u32) {
    let (a, b) = s.split_once(':').expect("major:minor");
    (a.parse().unwrap(), b.parse().unwrap())
}

impl FakeSysfs {
    pub fn new(root: &Path) -> Self {
        for d in [
            "class/nvme",
            "class/nvme-subsystem",
            "class/block",
            "block",
            "devices/virtual/nvme-fabrics/ctl",
            "devices/virtual/nvme-subsystem",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        Self {
            root: root.to_path_buf(),
            state: Arc::default(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn ctrl_dir(&self, ctrl: u32) -> PathBuf {
        self.root
            .join(format!("devices/virtual/nvme-fabrics/ctl/nvme{ctrl}"))
    }

    fn subsys_dir(&self, subsys: u32) -> PathBuf {
        self.root.join(format!(
            "devices/virtual/nvme-subsystem/nvme-subsys{subsys}"
        ))
    }

    /// `nvme connect` as the kernel shows it: controller `nvme{ctrl}` in subsystem
    /// `nvme-subsys{subsys}` (created with `nqn` if new), state `live`, no namespace yet.
    /// A new subsystem numbered apart from `ctrl` is one whose founding controller
    /// `nvme{subsys}` has gone since; its number stays the subsystem's.
    pub fn connect(&self, ctrl: u32, subsys: u32, nqn: &str) {
        let mut taken = self.state.lock().unwrap();
        assert!(
            !taken.controllers.contains_key(&ctrl),
            "the kernel never reuses a live controller instance: nvme{ctrl} exists"
        );
        assert!(
            ctrl == subsys || !taken.subsystems.contains_key(&ctrl),
            "controllers and subsystems share one instance pool: nvme-subsys{ctrl} holds {ctrl}"
        );
        assert!(
            taken.subsystems.contains_key(&subsys) || !taken.controllers.contains_key(&subsys),
            "a new subsystem takes its founding controller's number, and nvme{subsys} is \
             another live controller"
        );
        match taken.subsystems.get(&subsys) {
            Some(existing) => assert_eq!(existing, nqn, "nvme-subsys{subsys} has one NQN"),
            None => {
                assert!(
                    !taken.subsystems.values().any(|n| n == nqn),
                    "one subsystem per NQN"
                );
                let s = self.subsys_dir(subsys);
                std::fs::create_dir_all(&s).unwrap();
                std::fs::write(s.join("subsysnqn"), format!("{nqn}\n")).unwrap();
                symlink(
                    format!("../../devices/virtual/nvme-subsystem/nvme-subsys{subsys}"),
                    self.root
                        .join(format!("class/nvme-subsystem/nvme-subsys{subsys}")),
                )
                .unwrap();
                taken.subsystems.insert(subsys, nqn.to_string());
            }
        }
        let c = self.ctrl_dir(ctrl);
        std::fs::create_dir_all(&c).unwrap();
        std::fs::write(c.join("subsysnqn"), format!("{nqn}\n")).unwrap();
        std::fs::write(c.join("state"), "live\n").unwrap();
        std::fs::write(c.join("transport"), "tcp\n").unwrap();
        symlink(
            format!("../../devices/virtual/nvme-fabrics/ctl/nvme{ctrl}"),
            self.root.join(format!("class/nvme/nvme{ctrl}")),
        )
        .unwrap();
        symlink(
            format!("../../nvme-fabrics/ctl/nvme{ctrl}"),
            self.subsys_dir(subsys).join(format!("nvme{ctrl}")),
        )
        .unwrap();
        taken.controllers.insert(ctrl, subsys);
    }

    fn disk(&self, taken: &mut Taken, dir: &Path, name: &str, number: &str, linked_from: &str) {
        let n = dev(number);
        assert!(
            !taken.devices.contains_key(&n),
            "device number {number} is already {}",
            taken.devices[&n]
        );
        std::fs::create_dir_all(dir.join("holders")).unwrap();
        std::fs::write(dir.join("dev"), format!("{number}\n")).unwrap();
        std::fs::write(dir.join("size"), "20971520\n").unwrap();
        for class in ["class/block", "block"] {
            symlink(
                format!("../../{linked_from}"),
                self.root.join(class).join(name),
            )
            .unwrap();
        }
        taken.devices.insert(n, name.to_string());
    }

    /// A namespace with native multipath: the head `nvme{subsys}n{nsid}` (device `head`) under
    /// the subsystem, if the subsystem has none yet, and the hidden path
    /// `nvme{subsys}c{ctrl}n{nsid}` (device `path`) under the controller.
    pub fn multipath_namespace(&self, ctrl: u32, nsid: u32, head: &str, path: &str) {
        let mut taken = self.state.lock().unwrap();
        let subsys = *taken
            .controllers
            .get(&ctrl)
            .expect("a namespace appears under a connected controller");
        let head_name = format!("nvme{subsys}n{nsid}");
        let head_dir = self.subsys_dir(subsys).join(&head_name);
        if !head_dir.exists() {
            self.disk(
                &mut taken,
                &head_dir,
                &head_name,
                head,
                &format!("devices/virtual/nvme-subsystem/nvme-subsys{subsys}/{head_name}"),
            );
        }
        let path_name = format!("nvme{subsys}c{ctrl}n{nsid}");
        self.disk(
            &mut taken,
            &self.ctrl_dir(ctrl).join(&path_name),
            &path_name,
            path,
            &format!("devices/virtual/nvme-fabrics/ctl/nvme{ctrl}/{path_name}"),
        );
    }

    /// A namespace without multipath (`nvme_core.multipath=N`): `nvme{ctrl}n{nsid}` under the
    /// controller.
    pub fn plain_namespace(&self, ctrl: u32, nsid: u32, number: &str) {
        let mut taken = self.state.lock().unwrap();
        assert!(
            taken.controllers.contains_key(&ctrl),
            "nvme{ctrl} connected"
        );
        let name = format!("nvme{ctrl}n{nsid}");
        self.disk(
            &mut taken,
            &self.ctrl_dir(ctrl).join(&name),
            &name,
            number,
            &format!("devices/virtual/nvme-fabrics/ctl/nvme{ctrl}/{name}"),
        );
    }

    /// The controller's `state`, one of [`KERNEL_STATES`].
    pub fn set_state(&self, ctrl: u32, state: &str) {
        assert!(
            KERNEL_STATES.contains(&state),
            "the kernel never says {state:?}"
        );
        let c = self.ctrl_dir(ctrl);
        assert!(c.exists(), "nvme{ctrl} exists");
        std::fs::write(c.join("state"), format!("{state}\n")).unwrap();
    }

    /// `nvme{ctrl}` deleted (`nvme disconnect`, or `ctrl_loss_tmo` expired): its directory, its
    /// links and its hidden paths go; the subsystem and its heads go with its last controller.
    pub fn delete_controller(&self, ctrl: u32) {
        let mut taken = self.state.lock().unwrap();
        let subsys = taken
            .controllers
            .remove(&ctrl)
            .unwrap_or_else(|| panic!("nvme{ctrl} does not exist"));
        let c = self.ctrl_dir(ctrl);
        let mut gone = Vec::new();
        for e in std::fs::read_dir(&c).unwrap().flatten() {
            if e.path().join("dev").exists() {
                gone.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        std::fs::remove_dir_all(&c).unwrap();
        std::fs::remove_file(self.root.join(format!("class/nvme/nvme{ctrl}"))).unwrap();
        std::fs::remove_file(self.subsys_dir(subsys).join(format!("nvme{ctrl}"))).unwrap();
        if !taken.controllers.values().any(|s| *s == subsys) {
            for e in std::fs::read_dir(self.subsys_dir(subsys))
                .unwrap()
                .flatten()
            {
                if e.path().join("dev").exists() {
                    gone.push(e.file_name().to_string_lossy().into_owned());
                }
            }
            std::fs::remove_dir_all(self.subsys_dir(subsys)).unwrap();
            std::fs::remove_file(
                self.root
                    .join(format!("class/nvme-subsystem/nvme-subsys{subsys}")),
            )
            .unwrap();
            taken.subsystems.remove(&subsys);
        }
        for name in gone {
            for class in ["class/block", "block"] {
                std::fs::remove_file(self.root.join(class).join(&name)).unwrap();
            }
            taken.devices.retain(|_, n| *n != name);
        }
    }

    /// Every controller of `nqn`, for a runner's `nvme disconnect -n` hook.
    pub fn controllers_of(&self, nqn: &str) -> Vec<u32> {
        let taken = self.state.lock().unwrap();
        taken
            .controllers
            .iter()
            .filter(|(_, s)| taken.subsystems.get(s).map(String::as_str) == Some(nqn))
            .map(|(c, _)| *c)
            .collect()
    }

    /// A device-mapper (or md) device stacked on `disk`: `holders/<holder>` links to it.
    pub fn add_holder(&self, disk: &str, holder: &str) {
        let holders = self.root.join("class/block").join(disk).join("holders");
        assert!(holders.exists(), "{disk} exists");
        symlink(
            format!("../../../../virtual/block/{holder}"),
            holders.join(holder),
        )
        .unwrap();
    }
}

/// A `/proc` with processes' open file descriptors (`<pid>/fd/<n>`, symlinks to what is open,
/// as `readlink` shows them) and this process's mount table (`self/mountinfo`).
#[derive(Clone)]
pub struct FakeProc {
    root: PathBuf,
}

impl FakeProc {
    pub fn new(root: &Path) -> Self {
        std::fs::create_dir_all(root.join("self")).unwrap();
        std::fs::write(root.join("self/mountinfo"), "").unwrap();
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Process `pid` holds `target` (`/dev/nvme3n1`) open as descriptor `fd`.
    pub fn open_fd(&self, pid: u32, fd: u32, target: &str) {
        let dir = self.root.join(format!("{pid}/fd"));
        std::fs::create_dir_all(&dir).unwrap();
        symlink(target, dir.join(fd.to_string())).unwrap();
    }
}

/// The node tests' one [`Mounter`]: it keeps a [`FakeProc`]'s mount table and writes
/// `self/mountinfo` as the kernel would, and it refuses what the kernel refuses: unmounting a
/// missing path (ENOENT) or one that is not a mount point (EINVAL), mounting or binding onto a
/// missing directory (ENOENT), binding from a missing source (ENOENT) or from one nothing is
/// mounted at (EINVAL, as both earlier fakes did), and a device node where something already is
/// (EEXIST) or in a missing directory (ENOENT). Every call is logged (`mount`, `bind`, `umount`,
/// `mknod`), refused or not.
#[derive(Clone)]
pub struct FakeMounter {
    proc: FakeProc,
    inner: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    entries: Vec<MountEntry>,
    next_id: u32,
    calls: Vec<String>,
    busy: BTreeSet<PathBuf>,
}

impl FakeMounter {
    pub fn new(proc: &FakeProc) -> Self {
        Self {
            proc: proc.clone(),
            inner: Arc::new(Mutex::new(Table {
                next_id: 100,
                ..Table::default()
            })),
        }
    }

    pub fn calls(&self) -> Vec<String> {
        self.inner.lock().unwrap().calls.clone()
    }

    /// The device numbers mounted at `path`, bottom to top, as mountinfo lists them.
    pub fn at(&self, path: &AbsPath) -> Vec<(u32, u32)> {
        let view = kernel_view(path);
        self.inner
            .lock()
            .unwrap()
            .entries
            .iter()
            .filter(|e| e.mount_point == view)
            .map(|e| (e.major, e.minor))
            .collect()
    }

    /// The mount table a reboot leaves: empty. Not logged as calls.
    pub fn reboot(&self) {
        let mut t = self.inner.lock().unwrap();
        t.entries.clear();
        self.write(&t);
    }

    /// Unmounting `path` fails with EBUSY (an open file under it).
    pub fn make_busy(&self, path: &Path) {
        self.inner.lock().unwrap().busy.insert(path.to_path_buf());
    }

    /// A mount made before the test (by an earlier process).
    pub fn preload(&self, major: u32, minor: u32, source: &str, point: &Path, fs: &str) {
        let mut t = self.inner.lock().unwrap();
        self.push(&mut t, major, minor, source, point, fs, "/");
    }

    /// `device` mounted (ext4) at each of `points`, in order, before the test: what a stage
    /// and its publishes leave.
    pub fn preload_ext4(&self, device: &BlockDevice, points: &[&AbsPath]) {
        for at in points {
            self.preload(
                device.major,
                device.minor,
                &device.path.to_string(),
                &kernel_view(at),
                "ext4",
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        t: &mut Table,
        major: u32,
        minor: u32,
        source: &str,
        point: &Path,
        fs: &str,
        root: &str,
    ) {
        t.next_id += 1;
        t.entries.push(MountEntry {
            mount_id: t.next_id,
            parent_id: 1,
            major,
            minor,
            root: PathBuf::from(root),
            mount_point: point.to_path_buf(),
            options: vec!["rw".into(), "nosuid".into(), "nodev".into()],
            fs_type: fs.to_string(),
            source: source.to_string(),
            super_options: vec!["rw".into()],
        });
        self.write(t);
    }

    fn write(&self, t: &Table) {
        let text: String = t
            .entries
            .iter()
            .map(|e| {
                format!(
                    "{} {} {}:{} {} {} {} - {} {} {}\n",
                    e.mount_id,
                    e.parent_id,
                    e.major,
                    e.minor,
                    escape(&e.root.to_string_lossy()),
                    escape(&e.mount_point.to_string_lossy()),
                    e.options.join(","),
                    e.fs_type,
                    e.source,
                    e.super_options.join(","),
                )
            })
            .collect();
        std::fs::write(self.proc.root().join("self/mountinfo"), text).unwrap();
    }

    fn err(action: &'static str, path: &AbsPath, errno: i32) -> MountError {
        MountError {
            action,
            path: path.to_string(),
            source: std::io::Error::from_raw_os_error(errno),
        }
    }
}

impl Mounter for FakeMounter {
    fn mounts(&self) -> Result<Vec<MountEntry>, MountError> {
        let text = std::fs::read_to_string(self.proc.root().join("self/mountinfo")).unwrap();
        Ok(super::mountinfo::parse(&text).expect("the fake writes valid mountinfo"))
    }

    fn mount_device(
        &self,
        device: &BlockDevice,
        target: &AbsPath,
        fs: FsType,
        _options: &MountOptions,
    ) -> Result<(), MountError> {
        let mut t = self.inner.lock().unwrap();
        t.calls.push(format!("mount {} {target}", device.path));
        if !target.as_path().is_dir() {
            return Err(Self::err("mounting", target, libc::ENOENT));
        }
        let point = kernel_view(target);
        self.push(
            &mut t,
            device.major,
            device.minor,
            &device.path.to_string(),
            &point,
            fs.as_str(),
            "/",
        );
        Ok(())
    }

    /// The new mount's per-mount options are `flags`' (`ro`/`rw`, `nosuid`, `nodev`,
    /// `noexec`), as mountinfo shows a bind mount remounted with them.
    fn bind(
        &self,
        source: &AbsPath,
        target: &AbsPath,
        flags: MountFlags,
    ) -> Result<(), MountError> {
        let mut t = self.inner.lock().unwrap();
        t.calls.push(format!("bind {source} {target}"));
        if !source.as_path().exists() {
            return Err(Self::err("bind-mounting", source, libc::ENOENT));
        }
        let view = kernel_view(source);
        let Some(under) = t
            .entries
            .iter()
            .rev()
            .find(|e| e.mount_point == view)
            .cloned()
        else {
            return Err(Self::err("bind-mounting", source, libc::EINVAL));
        };
        if !target.as_path().is_dir() {
            return Err(Self::err("bind-mounting", target, libc::ENOENT));
        }
        self.push(
            &mut t,
            under.major,
            under.minor,
            &under.source,
            &kernel_view(target),
            &under.fs_type,
            "/",
        );
        let mut options = vec![if flags.contains(MountFlags::RDONLY) {
            "ro"
        } else {
            "rw"
        }];
        for (flag, name) in [
            (MountFlags::NOSUID, "nosuid"),
            (MountFlags::NODEV, "nodev"),
            (MountFlags::NOEXEC, "noexec"),
        ] {
            if flags.contains(flag) {
                options.push(name);
            }
        }
        t.entries.last_mut().unwrap().options = options.into_iter().map(String::from).collect();
        self.write(&t);
        Ok(())
    }

    fn unmount(&self, target: &AbsPath) -> Result<(), MountError> {
        let mut t = self.inner.lock().unwrap();
        t.calls.push(format!("umount {target}"));
        if !target.as_path().exists() {
            return Err(Self::err("unmounting", target, libc::ENOENT));
        }
        let view = kernel_view(target);
        if t.busy.contains(&view) || t.busy.contains(target.as_path()) {
            return Err(Self::err("unmounting", target, libc::EBUSY));
        }
        let Some(i) = t.entries.iter().rposition(|e| e.mount_point == view) else {
            return Err(Self::err("unmounting", target, libc::EINVAL));
        };
        t.entries.remove(i);
        self.write(&t);
        Ok(())
    }

    /// An empty file stands for the node: what the tests look at is that one is there.
    fn make_device_node(
        &self,
        target: &AbsPath,
        device: &BlockDevice,
        _readonly: bool,
    ) -> Result<(), MountError> {
        let mut t = self.inner.lock().unwrap();
        t.calls.push(format!("mknod {target} {device}"));
        let path = target.as_path();
        if !path.parent().is_some_and(Path::is_dir) {
            return Err(Self::err("creating a device node at", target, libc::ENOENT));
        }
        if path.symlink_metadata().is_ok() {
            return Err(Self::err("creating a device node at", target, libc::EEXIST));
        }
        std::fs::write(path, "").unwrap();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fake refuses numbers the kernel's one instance pool never hands out: a controller
    /// numbered as a live subsystem it did not found, and a new subsystem numbered as another
    /// live controller.
    #[test]
    fn instance_numbers_come_from_one_pool() {
        let nqn = "nqn.2000-02.com.mikrotik:pvc-a";
        let refused = |setup: fn(&FakeSysfs)| {
            let dir = tempfile::tempdir().unwrap();
            let fs = FakeSysfs::new(dir.path());
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| setup(&fs))).is_err()
        };
        assert!(refused(|fs| {
            fs.connect(1, 3, "nqn.2000-02.com.mikrotik:pvc-a");
            fs.connect(3, 7, "nqn.2000-02.com.mikrotik:pvc-b");
        }));
        assert!(refused(|fs| {
            fs.connect(3, 3, "nqn.2000-02.com.mikrotik:pvc-a");
            fs.connect(1, 3, "nqn.2000-02.com.mikrotik:pvc-a");
            fs.delete_controller(3);
            fs.connect(3, 9, "nqn.2000-02.com.mikrotik:pvc-b");
        }));
        assert!(refused(|fs| {
            fs.connect(1, 1, "nqn.2000-02.com.mikrotik:pvc-a");
            fs.connect(2, 1, "nqn.2000-02.com.mikrotik:pvc-a");
            fs.connect(5, 2, "nqn.2000-02.com.mikrotik:pvc-b");
        }));
        let dir = tempfile::tempdir().unwrap();
        let fs = FakeSysfs::new(dir.path());
        fs.connect(3, 3, nqn);
        fs.connect(1, 3, nqn);
        fs.delete_controller(3);
        fs.connect(4, 3, nqn);
        assert_eq!(fs.controllers_of(nqn), vec![1, 4]);
    }
}
