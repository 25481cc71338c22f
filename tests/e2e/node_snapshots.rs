//! Snapshots, restores and clones of the file backend for real, as root: volumes staged as
//! loop devices with ext4 on them, written through the mount, snapshotted, written again,
//! restored into larger volumes, staged and read back. One test runs on the temporary
//! directory's filesystem, one on an XFS with reflinks made in a loop device, where a snapshot
//! of a staged, written volume is taken at once and restores to its moment. On an ext4 made in
//! a loop device (no reflinks), a staged volume is snapshotted while the node plugin of the same
//! process holds its filesystem frozen, and thawed after, even when the copy fails; a raw block
//! volume in use is refused, saying what to do. And `kill -9` in the middle of copying a
//! multi-GiB image. Every test leaves no mount and no loop device behind.

use std::io::Write;
use std::process::Command;

use rds_csi::csi::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::node::{mount_cap, Node};
use crate::snapshots::{from_snapshot, from_volume, Snaps};
use crate::support::host::{root_or_skip, Host};
use crate::support::*;

const MIB: i64 = 1 << 20;

fn write_synced(path: std::path::PathBuf, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Whether the filesystem under `dir` makes reflinks.
fn reflinks_under(dir: &std::path::Path) -> bool {
    let a = dir.join(".reflink-probe-a");
    let b = dir.join(".reflink-probe-b");
    std::fs::write(&a, b"probe").unwrap();
    let src = std::fs::File::open(&a).unwrap();
    let dst = std::fs::File::create(&b).unwrap();
    let ok = rds_csi::backend::copy::reflink(&src, &dst).is_ok();
    let _ = std::fs::remove_file(a);
    let _ = std::fs::remove_file(b);
    ok
}

/// Stages `volume` (ext4) at `staging`, attaching it to n1 first.
async fn stage(n: &Node, volume: &str, staging: &str) {
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    let ctx = n.attach(volume, cap.clone()).await;
    n.stage(volume, staging, cap, ctx).await.unwrap();
}

async fn unstage(n: &Node, volume: &str, staging: &str) {
    n.unstage(volume, staging).await.unwrap();
    n.d.unpublish(volume, "n1").await.unwrap();
}

/// The scenario on any file root: data at the snapshot's moment in a larger restore, a clone
/// with the later data, the source deleted and its snapshot restored again.
async fn restore_and_clone(n: &Node) {
    let s = Snaps(&n.d);
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("src", 64 * MIB, cap).await;
    stage(n, "src", "src").await;
    write_synced(n.host.path().join("src/a.txt"), b"before the snapshot");

    // Staged: a reflink is one point in time, and so is a copy of its frozen filesystem.
    let snap = s.snapshot("while-staged", "src").await.unwrap();
    assert!(snap.ready_to_use);
    s.delete_snapshot(&snap.snapshot_id).await.unwrap();
    unstage(n, "src", "src").await;

    let snap = s.snapshot("moment", "src").await.unwrap();
    stage(n, "src", "src").await;
    write_synced(n.host.path().join("src/b.txt"), b"after the snapshot");
    std::fs::write(n.host.path().join("src/a.txt"), b"changed after").unwrap();
    unstage(n, "src", "src").await;

    let restored = s
        .create_volume("restored", 128 * MIB, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(restored.capacity_bytes, 128 * MIB);
    stage(n, "restored", "restored").await;
    let dir = n.host.path().join("restored");
    assert_eq!(
        std::fs::read(dir.join("a.txt")).unwrap(),
        b"before the snapshot"
    );
    assert!(!dir.join("b.txt").exists(), "the later write is not there");
    unstage(n, "restored", "restored").await;

    let clone = s
        .create_volume("clone", 64 * MIB, from_volume("src"))
        .await
        .unwrap();
    assert_eq!(clone.capacity_bytes, 64 * MIB);
    stage(n, "clone", "clone").await;
    let dir = n.host.path().join("clone");
    assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"changed after");
    assert_eq!(
        std::fs::read(dir.join("b.txt")).unwrap(),
        b"after the snapshot"
    );
    unstage(n, "clone", "clone").await;

    // The source goes; its snapshot stays restorable.
    s.delete_volume("src").await.unwrap();
    s.create_volume("again", 64 * MIB, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    stage(n, "again", "again").await;
    assert_eq!(
        std::fs::read(n.host.path().join("again/a.txt")).unwrap(),
        b"before the snapshot"
    );
    unstage(n, "again", "again").await;
}

#[tokio::test]
async fn restored_and_cloned_volumes_stage_with_the_data_of_their_moment() {
    if !root_or_skip("restored_and_cloned_volumes") {
        return;
    }
    let n = Node::start(&[]).await;
    restore_and_clone(&n).await;
    n.host.assert_clean();
}

/// An XFS with `reflink=1` in a loop device under the test's directory.
fn make_xfs(host: &Host) -> (String, std::path::PathBuf) {
    make_fs(host, "xfs", 1 << 30, &["mkfs.xfs", "-q", "-m", "reflink=1"])
}

/// A filesystem made by `mkfs` (the image path is appended) in a loop device of `bytes` under
/// the test's directory, mounted at `<name>` there: (loop device, mount point). The [`Host`]
/// guard unmounts and detaches it if the test fails.
fn make_fs(host: &Host, name: &str, bytes: u64, mkfs: &[&str]) -> (String, std::path::PathBuf) {
    let image = host.path().join(format!("{name}.img"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    let ok = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    ok(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&image));
    let device = ok(Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&image));
    let mount = host.path().join(name);
    std::fs::create_dir(&mount).unwrap();
    ok(Command::new("mount").arg(&device).arg(&mount));
    (device, mount)
}

#[tokio::test]
async fn on_xfs_with_reflinks_a_staged_volume_is_snapshotted_at_its_moment() {
    if !root_or_skip("xfs_reflink_snapshots") {
        return;
    }
    let host = Host::new();
    let (device, mount) = make_xfs(&host);
    let dir = tempfile::Builder::new()
        .prefix("driver-")
        .tempdir_in(&mount)
        .unwrap();
    let d = Driver::start_in(dir, &[], &host.kubelet_args(&[])).await;
    let n = Node { d, host };
    assert!(
        reflinks_under(n.d.dir.path()),
        "XFS reflink=1 makes reflinks"
    );

    // Snapshot while staged and written, as a running VM's disk would be.
    let s = Snaps(&n.d);
    n.create(
        "vm",
        64 * MIB,
        mount_cap(Mode::SingleNodeWriter, "ext4", &[]),
    )
    .await;
    stage(&n, "vm", "vm").await;
    write_synced(n.host.path().join("vm/one.txt"), b"synced before");
    let snap = s.snapshot("live", "vm").await.unwrap();
    write_synced(n.host.path().join("vm/two.txt"), b"written after");
    let restored = s
        .create_volume("back", 96 * MIB, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(restored.capacity_bytes, 96 * MIB);
    stage(&n, "back", "back").await;
    let back = n.host.path().join("back");
    assert_eq!(
        std::fs::read(back.join("one.txt")).unwrap(),
        b"synced before"
    );
    assert!(!back.join("two.txt").exists());
    unstage(&n, "back", "back").await;
    unstage(&n, "vm", "vm").await;
    s.delete_volume("back").await.unwrap();
    s.delete_snapshot(&snap.snapshot_id).await.unwrap();
    s.delete_volume("vm").await.unwrap();

    // The whole scenario again, with reflinks.
    restore_and_clone(&n).await;

    let Node { d, host } = n;
    drop(d);
    let unmounted = Command::new("umount").arg(&mount).status().unwrap();
    assert!(unmounted.success());
    let detached = Command::new("losetup")
        .args(["--detach", &device])
        .status()
        .unwrap();
    assert!(detached.success());
    host.assert_clean();
}

/// `kill -9` while a snapshot of a sparse image is being copied: after the restart nothing
/// claims to be a snapshot, the half-made copy is gone, and the retried CreateSnapshot completes
/// it with the image's content.
///
/// The kill lands mid-copy for sure: the driver's file root is an ext4 of its own (no
/// reflinks, whose copy has no middle), and once the copy has written its first chunk the test
/// stops the driver (SIGSTOP, every thread seen stopped). While it is held the test checks that
/// the copy is part way (its partial file has less than the image's data, and no snapshot image
/// exists), then sends SIGKILL.
///
/// Catches: the removal of `*.partial` leftovers when the file backend opens (`scan` in
/// `backend/file.rs`).
#[tokio::test]
async fn kill_9_in_the_middle_of_a_snapshot_copy_leaves_none_ready_and_a_retry_completes_it() {
    if !root_or_skip("kill_9_snapshot") {
        return;
    }
    // Room for the image and its snapshot, each counted at its full size.
    let (n, device, mount) = on_ext4(3 << 29).await;
    let volumes = n.d.dir.path().join("volumes");
    let s = Snaps(&n.d);
    // 512 MiB, with 128 MiB of data in 64 runs of 2 MiB spread over it.
    const DATA: u64 = 128 << 20;
    s.create_volume("big", 512 << 20, None).await.unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(volumes.join("big.img"))
            .unwrap();
        let mut chunk = vec![0u8; 2 << 20];
        for i in 0..64u64 {
            chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (i as usize + j % 241 + 1) as u8);
            f.write_all_at(&chunk, i * (8 << 20)).unwrap();
        }
        f.sync_all().unwrap();
    }
    let id = rds_csi::SnapshotId::for_name("big-backup")
        .unwrap()
        .to_string();
    let partial = volumes.join(format!("snapshots/{id}.img.partial"));
    let image = volumes.join(format!("snapshots/{id}.img"));
    let allocated = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| m.blocks() * 512)
    };
    let copy = tokio::spawn({
        let channel = n.d.channel.clone();
        async move {
            rds_csi::csi::controller_client::ControllerClient::new(channel)
                .create_snapshot(rds_csi::csi::CreateSnapshotRequest {
                    name: "big-backup".into(),
                    source_volume_id: "big".into(),
                    ..Default::default()
                })
                .await
        }
    });
    // Watched without a pause between looks, so the stop follows the first written chunk
    // closely and most of the image is still to copy; the check below proves it either way.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !allocated(&partial).is_ok_and(|b| b >= 1 << 20) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: the copy under way"
        );
        tokio::task::yield_now().await;
    }
    let pid = n.d.pid();
    // SAFETY: a signal to our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    eventually("every thread of the driver stopped", || async move {
        stopped(pid)
    })
    .await;
    let written = allocated(&partial);
    assert!(
        written.as_ref().is_ok_and(|&b| b < DATA) && !image.exists(),
        "the copy is held part way when the kill is sent: {written:?} of {DATA} bytes in the \
         partial file, snapshot image present: {}",
        image.exists()
    );
    println!("killed with {written:?} of {DATA} bytes copied");
    let n = n.crash_and_restart(&[]).await;
    let answer = copy.await.unwrap();
    assert!(
        answer.is_err(),
        "the killed driver never answered the CreateSnapshot: {answer:?}"
    );
    let s = Snaps(&n.d);
    assert!(
        s.all_ids(0).await.is_empty(),
        "no snapshot claims to exist after the crash"
    );
    assert!(
        !partial.exists(),
        "the half-made copy was cleaned up at start"
    );

    let snap = s.snapshot("big-backup", "big").await.unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.snapshot_id, id);
    assert_eq!(snap.size_bytes, 512 << 20);
    let status = Command::new("cmp")
        .arg(volumes.join("big.img"))
        .arg(&image)
        .status()
        .unwrap();
    assert!(status.success(), "the snapshot holds the image's bytes");
    tear_down(n, &device, &mount);
}

/// Whether every thread of process `pid` is stopped (state `T` in `/proc/<pid>/task/*/stat`).
fn stopped(pid: i32) -> bool {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks.into_iter().all(|task| {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap_or_default();
        // The state follows the command name's closing parenthesis.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T'))
    })
}

/// A driver (all services: the node plugin is in the controller's process) whose `--file-root`
/// is on an ext4 of `bytes` made in a loop device, so no copy can be a reflink.
async fn on_ext4(bytes: u64) -> (Node, String, std::path::PathBuf) {
    let host = Host::new();
    let (device, mount) = make_fs(&host, "ext4", bytes, &["mkfs.ext4", "-q", "-F"]);
    let dir = tempfile::Builder::new()
        .prefix("driver-")
        .tempdir_in(&mount)
        .unwrap();
    let d = Driver::start_in(dir, &[], &host.kubelet_args(&[])).await;
    let n = Node { d, host };
    assert!(!reflinks_under(n.d.dir.path()), "ext4 makes no reflinks");
    (n, device, mount)
}

/// Stops the driver, unmounts and detaches [`on_ext4`]'s filesystem, and asserts that nothing
/// is left.
fn tear_down(n: Node, device: &str, mount: &std::path::Path) {
    let Node { d, host } = n;
    drop(d);
    assert!(Command::new("umount")
        .arg(mount)
        .status()
        .unwrap()
        .success());
    let detached = Command::new("losetup")
        .args(["--detach", device])
        .status()
        .unwrap();
    assert!(detached.success());
    host.assert_clean();
}

/// `FIFREEZE` and `FITHAW` from `<linux/fs.h>`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Whether the filesystem mounted at `dir` is thawed, asked without blocking (a write to a
/// frozen filesystem would hang the test): `FIFREEZE` succeeds on a thawed one, which is thawed
/// again at once, and is refused with `EBUSY` on a frozen one. `dir` must be a mount point
/// (checked), so the probe never reaches the filesystem beneath it.
fn thawed(dir: &std::path::Path) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &std::path::Path| std::fs::metadata(p).unwrap().dev();
    assert_ne!(
        dev(dir),
        dev(dir.parent().unwrap()),
        "{} is not a mount point",
        dir.display()
    );
    let f = std::fs::File::open(dir).unwrap();
    // SAFETY: ioctls without an argument on a descriptor we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), FIFREEZE as _, 0) } == 0 {
        assert_eq!(unsafe { libc::ioctl(f.as_raw_fd(), FITHAW as _, 0) }, 0);
        return true;
    }
    let e = std::io::Error::last_os_error();
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}");
    false
}

const THAWED: &str = "rds_csi_snapshot_freezes_total{result=\"thawed\"}";
const EXPIRED: &str = "rds_csi_snapshot_freezes_total{result=\"expired\"}";
const FREEZE_FAILED: &str = "rds_csi_snapshot_freezes_total{result=\"failed\"}";

/// On ext4 (no reflinks), a volume staged and published on this node and written through its
/// mount is snapshotted while the node plugin holds its filesystem frozen: the snapshot holds
/// what was written before it, the filesystem is thawed after (a later write lands, and is not
/// in the snapshot), and the freeze is counted. Fails without the freeze (the snapshot is
/// refused as "open for writing"), and if the hold is not thawed (the probe finds it frozen).
#[tokio::test]
async fn on_ext4_a_published_volume_in_use_is_snapshotted_frozen_at_its_moment_then_thawed() {
    if !root_or_skip("ext4_frozen_snapshot") {
        return;
    }
    let (n, device, mount) = on_ext4(512 << 20).await;
    let s = Snaps(&n.d);
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("vm", 64 * MIB, cap.clone()).await;
    stage(&n, "vm", "vm").await;
    std::fs::create_dir_all(n.host.path().join("pod")).unwrap();
    n.publish("vm", "vm", "pod/disk", cap, false).await.unwrap();
    let disk = n.host.path().join("pod/disk");
    write_synced(disk.join("one.txt"), b"written before the snapshot");
    // A writer that keeps its file open across the snapshot, as a VM keeps its disk.
    let mut open_writer = std::fs::File::create(disk.join("log.txt")).unwrap();
    open_writer.write_all(b"first line\n").unwrap();
    open_writer.sync_all().unwrap();

    let snap = s.snapshot("live", "vm").await.unwrap();
    assert!(snap.ready_to_use);
    let staging = n.host.path().join("vm");
    assert!(thawed(&staging), "thawed after the snapshot");
    open_writer.write_all(b"second line\n").unwrap();
    open_writer.sync_all().unwrap();
    write_synced(disk.join("two.txt"), b"written after");
    assert_eq!(n.d.metric(THAWED).await, 1.0);
    assert_eq!(n.d.metric(EXPIRED).await, 0.0);
    n.d.wait_for_log("filesystem frozen for a copy").await;

    let restored = s
        .create_volume("back", 96 * MIB, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(restored.capacity_bytes, 96 * MIB);
    stage(&n, "back", "back").await;
    let back = n.host.path().join("back");
    assert_eq!(
        std::fs::read(back.join("one.txt")).unwrap(),
        b"written before the snapshot"
    );
    assert_eq!(
        std::fs::read(back.join("log.txt")).unwrap(),
        b"first line\n"
    );
    assert!(
        !back.join("two.txt").exists(),
        "the later write is not there"
    );
    unstage(&n, "back", "back").await;

    drop(open_writer);
    n.unpublish("vm", "pod/disk").await.unwrap();
    unstage(&n, "vm", "vm").await;
    s.delete_volume("back").await.unwrap();
    s.delete_snapshot(&snap.snapshot_id).await.unwrap();
    s.delete_volume("vm").await.unwrap();
    tear_down(n, &device, &mount);
}

/// A copy that fails while the volume is frozen (the file root runs out of space in the middle
/// of it) still thaws the volume: the error is the copy's, a write after it lands, nothing
/// claims to be a snapshot, and once there is room the retry succeeds. Fails if the hold were
/// kept past the error (the probe finds the filesystem frozen).
#[tokio::test]
async fn a_snapshot_copy_that_fails_while_frozen_still_thaws_the_volume() {
    if !root_or_skip("ext4_failed_frozen_snapshot") {
        return;
    }
    let (n, device, mount) = on_ext4(192 << 20).await;
    let s = Snaps(&n.d);
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("vm", 64 * MIB, cap).await;
    stage(&n, "vm", "vm").await;
    let staging = n.host.path().join("vm");
    // 24 MiB the copy must write, none of it zeros (zeros are skipped).
    let data: Vec<u8> = (0..24u32 << 20).map(|i| (i % 251 + 1) as u8).collect();
    write_synced(staging.join("data.bin"), &data);
    // Leave the file root 8 MiB: the copy fails in the middle with ENOSPC.
    let ballast = mount.join("ballast");
    {
        let free = rustix::fs::statvfs(&mount).unwrap();
        let free = free.f_bavail * free.f_frsize;
        let f = std::fs::File::create(&ballast).unwrap();
        rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, free - (8 << 20))
            .unwrap();
        f.sync_all().unwrap();
    }

    let err = s.snapshot("full", "vm").await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message().contains("No space left on device"),
        "{}",
        err.message()
    );
    assert!(thawed(&staging), "thawed after the failed copy");
    assert_eq!(n.d.metric(THAWED).await, 1.0);
    assert_eq!(n.d.metric(EXPIRED).await, 0.0);
    assert!(s.all_ids(0).await.is_empty(), "no snapshot claims to exist");

    std::fs::remove_file(&ballast).unwrap();
    write_synced(staging.join("after.txt"), b"written after the failure");
    let snap = s.snapshot("full", "vm").await.unwrap();
    assert!(snap.ready_to_use);
    assert!(thawed(&staging));
    assert_eq!(n.d.metric(THAWED).await, 2.0);

    unstage(&n, "vm", "vm").await;
    s.delete_snapshot(&snap.snapshot_id).await.unwrap();
    s.delete_volume("vm").await.unwrap();
    tear_down(n, &device, &mount);
}

/// On ext4, a raw block volume in use on this node has no filesystem to freeze: its snapshot is
/// refused with FAILED_PRECONDITION saying what to do (pause or stop the VM, or reflinks), and
/// nothing is frozen. Fails if the node's raw-block answer is lost (the message then names
/// neither).
#[tokio::test]
async fn on_ext4_a_raw_block_volume_in_use_is_refused_saying_what_to_do() {
    if !root_or_skip("ext4_raw_block_snapshot") {
        return;
    }
    let (n, device, mount) = on_ext4(256 << 20).await;
    let s = Snaps(&n.d);
    let cap = crate::support::rwo_block();
    n.create("raw", 16 * MIB, cap.clone()).await;
    let ctx = n.attach("raw", cap.clone()).await;
    n.stage("raw", "stage", cap.clone(), ctx).await.unwrap();
    std::fs::create_dir_all(n.host.path().join("pod")).unwrap();
    n.publish("raw", "stage", "pod/dev", cap, false)
        .await
        .unwrap();

    let err = s.snapshot("raw-snap", "raw").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    for hint in ["raw block device", "pause or stop the VM", "reflink"] {
        assert!(err.message().contains(hint), "{hint}: {}", err.message());
    }
    for series in [THAWED, EXPIRED, FREEZE_FAILED] {
        assert_eq!(n.d.metric(series).await, 0.0, "{series}");
    }

    n.unpublish("raw", "pod/dev").await.unwrap();
    unstage(&n, "raw", "stage").await;
    // Not in use any more: copied without a freeze.
    s.snapshot("raw-snap", "raw").await.unwrap();
    assert_eq!(n.d.metric(THAWED).await, 0.0);
    tear_down(n, &device, &mount);
}

/// The freeze itself, on an ext4 of the test's own in a loop device: a descriptor on another
/// device than the volume's is refused before anything is frozen (removing the device check in
/// `Frozen::freeze` fails this, freezing only this test's filesystem); a hold keeps the
/// filesystem frozen until dropped; when the window passes first, the watchdog thaws it, and
/// the hold's drop then thaws nothing more, not even a freeze someone else made since (removing
/// the take-once in `thaw` fails this).
#[test]
fn a_freeze_checks_its_device_holds_until_dropped_and_its_watchdog_thaws_once() {
    use rds_csi::node::freeze::Frozen;
    use rds_csi::node::paths::{AbsPath, BlockDevice};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    use std::time::{Duration, Instant};

    if !root_or_skip("freeze_hold") {
        return;
    }
    let host = Host::new();
    let (device, mount) = make_fs(&host, "ext4", 64 << 20, &["mkfs.ext4", "-q", "-F"]);
    let rdev = std::fs::metadata(&device).unwrap().rdev();
    let ours = BlockDevice {
        path: AbsPath::try_from(std::path::PathBuf::from(&device)).unwrap(),
        major: libc::major(rdev),
        minor: libc::minor(rdev),
    };
    let counts = prometheus::IntCounterVec::new(
        prometheus::Opts::new("freezes_total", "freezes by result"),
        &["result"],
    )
    .unwrap();
    let count = |result: &str| counts.with_label_values(&[result]).get();
    let hour = Duration::from_secs(3600);

    let other = BlockDevice {
        minor: ours.minor + 1000,
        ..ours.clone()
    };
    let refused = Frozen::freeze(&mount, &other, hour, None, counts.clone())
        .err()
        .expect("another device's descriptor is refused");
    assert!(refused.contains("not the volume's"), "{refused}");
    assert!(thawed(&mount), "nothing was frozen");

    let held = Frozen::freeze(&mount, &ours, hour, None, counts.clone()).unwrap();
    assert!(rds_csi::backend::quiesce::Hold::still(&held));
    assert!(!thawed(&mount), "frozen while held");
    drop(held);
    assert!(thawed(&mount), "thawed when dropped");
    assert_eq!((count("thawed"), count("expired")), (1, 0));

    let held = Frozen::freeze(&mount, &ours, Duration::ZERO, None, counts.clone()).unwrap();
    assert!(
        !rds_csi::backend::quiesce::Hold::still(&held),
        "the window passed"
    );
    // Waits for the watchdog's thaw; the deadline only turns a hang into a failure.
    let give_up = Instant::now() + Duration::from_secs(60);
    while count("expired") == 0 {
        assert!(Instant::now() < give_up, "the watchdog never thawed");
        std::thread::yield_now();
    }
    assert!(thawed(&mount), "the watchdog thawed it");
    // Someone else freezes it now; dropping the expired hold must leave their freeze alone.
    let dir = std::fs::File::open(&mount).unwrap();
    // SAFETY: an ioctl without an argument on a descriptor we own.
    assert_eq!(unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) }, 0);
    struct ThawOnDrop(std::fs::File);
    impl Drop for ThawOnDrop {
        fn drop(&mut self) {
            // SAFETY: as above.
            unsafe { libc::ioctl(self.0.as_raw_fd(), FITHAW as _, 0) };
        }
    }
    let theirs = ThawOnDrop(dir);
    drop(held);
    assert!(!thawed(&mount), "their freeze is kept");
    drop(theirs);
    assert!(thawed(&mount));
    assert_eq!((count("thawed"), count("expired")), (1, 1));

    assert!(Command::new("umount")
        .arg(&mount)
        .status()
        .unwrap()
        .success());
    let detached = Command::new("losetup")
        .args(["--detach", &device])
        .status()
        .unwrap();
    assert!(detached.success());
    host.assert_clean();
}
