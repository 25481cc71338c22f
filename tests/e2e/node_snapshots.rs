//! Snapshots, restores and clones of the file backend for real, as root: volumes staged as
//! loop devices with ext4 on them, written through the mount, snapshotted, written again,
//! restored into larger volumes, staged and read back. One test runs on the temporary
//! directory's filesystem (no reflinks on ext4: a snapshot of a staged volume is refused there,
//! as its copy would not be one point in time), one on an XFS with reflinks made in a loop
//! device, where a snapshot of a staged, written volume is taken at once and restores to its
//! moment. And `kill -9` in the middle of copying a multi-GiB image. Every test leaves no mount
//! and no loop device behind.

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
async fn restore_and_clone(n: &Node, reflinks: bool) {
    let s = Snaps(&n.d);
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("src", 64 * MIB, cap).await;
    stage(n, "src", "src").await;
    write_synced(n.host.path().join("src/a.txt"), b"before the snapshot");

    // Staged: a reflink is one point in time; a copy without one is refused.
    let staged = s.snapshot("while-staged", "src").await;
    if reflinks {
        let snap = staged.unwrap();
        assert!(snap.ready_to_use);
        s.delete_snapshot(&snap.snapshot_id).await.unwrap();
    } else {
        let err = staged.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(
            err.message().contains("open for writing"),
            "{}",
            err.message()
        );
    }
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
    let reflinks = reflinks_under(n.d.dir.path());
    restore_and_clone(&n, reflinks).await;
    n.host.assert_clean();
}

/// An XFS with `reflink=1` in a loop device under the test's directory.
fn make_xfs(host: &Host) -> (String, std::path::PathBuf) {
    let image = host.path().join("xfs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let ok = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    ok(Command::new("mkfs.xfs")
        .args(["-q", "-m", "reflink=1"])
        .arg(&image));
    let device = ok(Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&image));
    let mount = host.path().join("xfs");
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
    restore_and_clone(&n, true).await;

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

/// `kill -9` while a snapshot of a multi-GiB sparse image is being copied: after the restart
/// nothing claims to be a snapshot, and the retried CreateSnapshot completes it with the image's
/// content.
#[tokio::test]
async fn kill_9_in_the_middle_of_a_snapshot_copy_leaves_none_ready_and_a_retry_completes_it() {
    if !root_or_skip("kill_9_snapshot") {
        return;
    }
    let n = Node::start(&[]).await;
    let volumes = n.d.dir.path().join("volumes");
    if reflinks_under(n.d.dir.path()) {
        eprintln!("kill_9_snapshot: this filesystem reflinks; a reflink has no middle to kill");
        return;
    }
    let s = Snaps(&n.d);
    // 4 GiB, with 1 GiB of data in 64 runs of 16 MiB spread over it.
    s.create_volume("big", 4 << 30, None).await.unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(volumes.join("big.img"))
            .unwrap();
        let mut chunk = vec![0u8; 16 << 20];
        for i in 0..64u64 {
            chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (i as usize + j % 241 + 1) as u8);
            f.write_all_at(&chunk, i * (64 << 20)).unwrap();
        }
        f.sync_all().unwrap();
        // Out of the page cache, so the copy reads the disk and takes a while.
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise on a descriptor we own.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    let id = rds_csi::SnapshotId::for_name("big-backup")
        .unwrap()
        .to_string();
    let partial = volumes.join(format!("snapshots/{id}.img.partial"));
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
    // Wait until the copy has written some of the image, but not all of it.
    eventually("the copy under way", || {
        let partial = partial.clone();
        async move {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&partial).is_ok_and(|m| m.blocks() * 512 >= 32 << 20)
        }
    })
    .await;
    let n = n.crash_and_restart(&[]).await;
    let _ = copy.await;
    let written = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&partial).map(|m| m.blocks() * 512)
    };
    let s = Snaps(&n.d);
    assert!(
        s.all_ids(0).await.is_empty(),
        "no snapshot claims to exist after the crash (the copy had {written:?} bytes)"
    );
    assert!(
        !partial.exists(),
        "the half-made copy was cleaned up at start"
    );

    let snap = s.snapshot("big-backup", "big").await.unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.snapshot_id, id);
    assert_eq!(snap.size_bytes, 4 << 30);
    let status = Command::new("cmp")
        .arg(volumes.join("big.img"))
        .arg(volumes.join(format!("snapshots/{id}.img")))
        .status()
        .unwrap();
    assert!(status.success(), "the snapshot holds the image's bytes");
    n.host.assert_clean();
}
