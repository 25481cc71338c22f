//! A test's own corner of the host for node tests, which make real loop devices and mounts as
//! root. Everything a test makes lives under one temporary directory; [`Host`] finds what is
//! left there (mounts from mountinfo, loop devices whose backing file is inside it), asserts
//! that nothing is, and on drop unmounts and detaches it even when the test failed. It never
//! touches a mount or device outside its directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use rds_csi::node::mountinfo;

pub struct Host {
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
}

/// The gate and skip ledger the crate's own root-gated unit tests use too.
#[path = "../../src/node/skips.rs"]
pub mod skips;

/// Node tests need root and the filesystem tools (CI runs them as root with the tools
/// installed). Without them they fail, unless `RDS_CSI_SKIP_ROOT_TESTS=1` says the skip is
/// deliberate; a deliberate skip is recorded in the skip ledger, which `.ci/run` checks.
pub fn root_or_skip(test: &str) -> bool {
    skips::can_run_or_skip(test, skips::NODE_TOOLS)
}

impl Host {
    pub fn new() -> Host {
        let dir = tempfile::Builder::new()
            .prefix("rds-csi-node-")
            .tempdir()
            .unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        Host {
            dir: Some(dir),
            root,
        }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `name` under this test's directory, as the absolute string CSI requests carry.
    pub fn at(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }

    /// `extra` with `--kubelet-dir` set to this test's directory (unless `extra` sets it),
    /// so the staging paths and targets under it are beneath the driver's kubelet root.
    pub fn kubelet_args<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        if extra.contains(&"--kubelet-dir") {
            return extra.to_vec();
        }
        let root = self.root.to_str().expect("a UTF-8 temp dir");
        [&["--kubelet-dir", root][..], extra].concat()
    }

    /// A fresh directory for a driver's files (socket, images, records, log).
    pub fn driver_dir(&self) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("driver-")
            .tempdir_in(&self.root)
            .unwrap()
    }

    /// Mount points under this directory, deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mut found: Vec<PathBuf> = mountinfo::parse(&text)
            .unwrap()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&self.root))
            .collect();
        found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        found
    }

    /// Loop devices (`loopN`) whose backing file is under this directory, deleted or not.
    pub fn loops(&self) -> Vec<String> {
        loops_backed_by(|backing| backing.starts_with(&self.root))
    }

    /// Fails the test if a mount or a loop device is left under this directory.
    ///
    /// A loop device detached while something else had it open for a moment (another test's
    /// `losetup --find` or status ioctl, run in parallel) is only marked autoclear: the kernel
    /// frees it when that opener closes it. Such a device, with nothing mounted, is waited for
    /// (bounded); one that is not autoclear, or outlasts the bound, is left behind.
    pub fn assert_clean(&self) {
        let (mounts, mut loops) = (self.mounts(), self.loops());
        if mounts.is_empty() && !loops.is_empty() && loops.iter().all(|l| autoclear(l)) {
            wait_released(&loops);
            loops = self.loops();
        }
        assert!(
            mounts.is_empty() && loops.is_empty(),
            "left behind: mounts {mounts:?}, loop devices {loops:?}"
        );
    }

    fn cleanup(&self) {
        // A mount may hold a loop device busy and a loop device a mount (a filesystem made in
        // a loop device here, with images of its own attached): unmount, detach, and again.
        // Only the last round unmounts lazily: a lazily unmounted filesystem that still backs a
        // loop device would hide that device's backing file from `loops` and leak both.
        const ROUNDS: usize = 4;
        for round in 1..=ROUNDS {
            for _ in 0..5 {
                let before = self.mounts();
                for m in &before {
                    let flags = rustix::mount::UnmountFlags::NOFOLLOW;
                    if rustix::mount::unmount(m, flags).is_err() && round == ROUNDS {
                        // The guard's last resort, so nothing outlives the test; the driver
                        // never unmounts lazily.
                        let _ =
                            rustix::mount::unmount(m, flags | rustix::mount::UnmountFlags::DETACH);
                    }
                }
                if self.mounts().len() == before.len() {
                    break;
                }
            }
            for name in self.loops() {
                let _ = Command::new("losetup")
                    .arg("--detach")
                    .arg(format!("/dev/{name}"))
                    .status();
            }
            if self.mounts().is_empty() && self.loops().is_empty() {
                break;
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.cleanup();
        let leftovers = (self.mounts(), self.loops());
        if leftovers.0.is_empty() && leftovers.1.is_empty() {
            drop(self.dir.take());
        } else {
            // Keep the directory: removing files under a live mount would reach into it.
            let kept = self.dir.take().unwrap().keep();
            eprintln!("could not clean {}: {leftovers:?}", kept.display());
        }
    }
}

/// Loop devices whose backing file (without sysfs's " (deleted)" suffix) satisfies `keep`.
/// Waits until the kernel has let the loop devices `names` (`loopN`) go, for at most 10 s. A
/// detached device that something still holds open (a probe, another test's momentary status
/// ioctl) is only marked autoclear and freed when that opener closes it; sysfs offers no event
/// for that, so this polls. Returns the names still bound at the bound; the caller asserts.
pub fn wait_released(names: &[String]) -> Vec<String> {
    let bound = |n: &String| Path::new(&format!("/sys/block/{n}/loop/backing_file")).exists();
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left: Vec<String> = names.iter().filter(|n| bound(n)).cloned().collect();
        if left.is_empty() || std::time::Instant::now() >= give_up {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether loop device `name` is set to detach itself when its last opener closes it.
fn autoclear(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/block/{name}/loop/autoclear"))
        .is_ok_and(|v| v.trim() == "1")
}

pub fn loops_backed_by(keep: impl Fn(&Path) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = backing.trim_end_matches('\n');
        let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
        if !backing.is_empty() && keep(Path::new(backing)) {
            found.push(name);
        }
    }
    found.sort();
    found
}
