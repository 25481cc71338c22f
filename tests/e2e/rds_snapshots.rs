//! Snapshots, restores and clones with `--backend rds` against the fake RouterOS over SSH: the
//! Go driver's commands byte for byte, content at the snapshot's moment (the fake's files carry
//! a content marker that `copy-from` copies), idempotency by name across a restart, the source
//! recorded in the disk's comment, the Go driver's own snapshots, list paging, and deleting the
//! source.

use rds_csi::csi::*;
use rds_csi::SnapshotId;
use tonic::Code;

use crate::fake_rds::{client_keypair, Disk, FakeRds, FakeRdsConfig};
use crate::rds::Rds;
use crate::snapshots::{from_snapshot, from_volume, Snaps};

const GIB: i64 = 1 << 30;
const A: &str = "pvc-11111111-0000-4000-8000-00000000000a";
const B: &str = "pvc-11111111-0000-4000-8000-00000000000b";
const DIR: &str = "/storage-pool/metal-csi";

fn image(slot: &str) -> String {
    format!("{DIR}/{slot}.img")
}

fn content(fake: &FakeRds, slot: &str) -> (u64, String) {
    let f = fake
        .file(&image(slot))
        .unwrap_or_else(|| panic!("no file for {slot}"));
    (f.size, f.content)
}

#[tokio::test]
async fn snapshot_restore_and_clone_with_the_go_drivers_commands() {
    let r = Rds::start(&[]).await;
    r.wait_ready().await;
    let s = Snaps(&r.d);
    s.create_volume(A, GIB, None).await.unwrap();
    r.fake.write_content(&image(A), "before the snapshot");

    r.fake.clear_commands();
    let snap = s.snapshot("vm-backup-1", A).await.unwrap();
    let id = SnapshotId::for_name("vm-backup-1").unwrap().to_string();
    assert_eq!(snap.snapshot_id, id, "the Go driver's id for the name");
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, A);
    assert_eq!(snap.size_bytes, GIB);
    let taken = snap.creation_time.expect("recorded").seconds;
    assert!(taken > 1_700_000_000);
    let commands = r.commands();
    let adds: Vec<&String> = commands
        .iter()
        .filter(|c| c.starts_with("/disk add"))
        .collect();
    assert_eq!(
        adds,
        [&format!(
            "/disk add type=file copy-from=[find slot={A}] file-path={DIR}/{id}.img slot={id} \
             comment=source-{A}-at-{taken}"
        )],
        "the Go driver's CreateSnapshot, verbatim, its record given on it"
    );
    assert!(
        !commands.iter().any(|c| c.starts_with("/disk set")),
        "one write: {commands:#?}"
    );
    let disk = r.fake.disk(&id).unwrap();
    assert!(!disk.nvme_tcp_export, "a snapshot is not exported");
    assert_eq!(
        content(&r.fake, &id),
        (GIB as u64, "before the snapshot".into())
    );

    // The source moves on.
    r.fake.write_content(&image(A), "after the snapshot");

    // Restore into a larger volume: the Go driver's RestoreSnapshot, the snapshot's content.
    r.fake.clear_commands();
    let restored = s
        .create_volume(B, 2 * GIB, from_snapshot(&id))
        .await
        .unwrap();
    assert_eq!(restored.capacity_bytes, 2 * GIB);
    assert_eq!(
        restored.content_source,
        Some(VolumeContentSource {
            r#type: from_snapshot(&id)
        })
    );
    let record = r.fake.disk(B).unwrap().comment;
    assert!(
        record.starts_with(&format!("source-{id}-at-")) && record.contains("-made-"),
        "{record}"
    );
    let sent = r.commands();
    assert!(
        sent.contains(&format!(
            "/disk add type=file copy-from=[find slot={id}] file-path={DIR}/{B}.img file-size=2G \
             slot={B} nvme-tcp-export=yes nvme-tcp-server-port=4420 \
             nvme-tcp-server-nqn=nqn.2000-02.com.mikrotik:{B} comment={record}"
        )),
        "{sent:#?}"
    );
    assert!(
        !sent.iter().any(|c| c.starts_with("/disk set")),
        "one write: {sent:#?}"
    );
    assert_eq!(
        content(&r.fake, B),
        (2 * GIB as u64, "before the snapshot".into())
    );
    assert!(r.fake.disk(B).unwrap().nvme_tcp_export);

    // A clone is the source now.
    let clone = "pvc-11111111-0000-4000-8000-00000000000c";
    let c = s.create_volume(clone, GIB, from_volume(A)).await.unwrap();
    assert_eq!(
        c.content_source,
        Some(VolumeContentSource {
            r#type: from_volume(A)
        })
    );
    assert_eq!(
        content(&r.fake, clone),
        (GIB as u64, "after the snapshot".into())
    );
    // Never smaller than the source.
    let err = s
        .create_volume("pvc-small", GIB, from_volume(B))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(r.fake.disk("pvc-small").is_none());
    // Repeats are idempotent, other sources are ALREADY_EXISTS.
    assert_eq!(
        s.create_volume(B, 2 * GIB, from_snapshot(&id))
            .await
            .unwrap(),
        restored
    );
    for other in [None, from_volume(A)] {
        let err = s.create_volume(B, 2 * GIB, other).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    }
    let missing = SnapshotId::for_name("never").unwrap().to_string();
    for (source, code) in [
        (from_snapshot(&missing), Code::NotFound),
        (from_snapshot("reallyfakesnapshotid"), Code::NotFound),
        (from_snapshot(A), Code::NotFound),
        (from_volume("pvc-nothing-here"), Code::NotFound),
        (from_volume(&id), Code::NotFound),
    ] {
        let err = s.create_volume("pvc-x", GIB, source).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
    }

    // Deleting the source keeps the snapshot restorable.
    s.delete_volume(A).await.unwrap();
    assert!(r.fake.disk(A).is_none() && r.fake.file(&image(A)).is_none());
    let again = "pvc-11111111-0000-4000-8000-00000000000d";
    s.create_volume(again, GIB, from_snapshot(&id))
        .await
        .unwrap();
    assert_eq!(content(&r.fake, again).1, "before the snapshot");

    // Deleting the snapshot removes its disk and file; the restores are independent.
    r.fake.clear_commands();
    s.delete_snapshot(&id).await.unwrap();
    assert_eq!(
        r.commands()[1..],
        [
            format!("/disk remove [find slot={id}]"),
            format!("/file remove [find name=\"storage-pool/metal-csi/{id}.img\"]"),
        ]
    );
    assert!(r.fake.disk(&id).is_none() && r.fake.file(&image(&id)).is_none());
    s.delete_snapshot(&id).await.unwrap();
    assert_eq!(content(&r.fake, B).1, "before the snapshot");
    // A snapshot call never touches a volume, nor a volume call a snapshot.
    s.delete_snapshot(B).await.unwrap();
    assert!(r.fake.disk(B).is_some());
    assert!(s.list(B, "", 0, "").await.unwrap().entries.is_empty());
}

#[tokio::test]
async fn create_snapshot_is_idempotent_by_name_across_a_restart_and_lists_page() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = client_keypair(keys.path());
    let fake = FakeRds::start(FakeRdsConfig::new(public)).await;
    let host_key = fake.write_host_key(keys.path());
    let d = Rds::driver(&fake, &key, &host_key, &[]).await;
    d.wait_ready().await;
    let s = Snaps(&d);
    s.create_volume(A, GIB, None).await.unwrap();
    s.create_volume(B, GIB, None).await.unwrap();
    let first = s.snapshot("daily", A).await.unwrap();
    assert_eq!(s.snapshot("daily", A).await.unwrap(), first);
    assert_eq!(
        s.snapshot("daily", B).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    let mut ids = vec![first.snapshot_id.clone()];
    for i in 0..4 {
        let source = if i % 2 == 0 { A } else { B };
        ids.push(
            s.snapshot(&format!("s{i}"), source)
                .await
                .unwrap()
                .snapshot_id,
        );
    }
    ids.sort();
    drop(d);

    // A new process: the name still maps to the same snapshot, with the same source.
    let d = Rds::driver(&fake, &key, &host_key, &[]).await;
    d.wait_ready().await;
    let s = Snaps(&d);
    fake.clear_commands();
    assert_eq!(s.snapshot("daily", A).await.unwrap(), first);
    assert!(
        fake.commands()
            .iter()
            .all(|c| !c.command.starts_with("/disk add")),
        "a retry copies nothing"
    );
    assert_eq!(
        s.snapshot("daily", B).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    for max in [0, 1, 2, 5, 7] {
        assert_eq!(s.all_ids(max).await, ids, "max_entries {max}");
    }
    let of_b = s.list("", B, 0, "").await.unwrap();
    assert_eq!(of_b.entries.len(), 2);
    let by_id = s.list(&first.snapshot_id, "", 0, "").await.unwrap();
    assert_eq!(by_id.entries[0].snapshot.as_ref().unwrap(), &first);
    assert_eq!(
        s.list("", "", 0, "v1:x").await.unwrap_err().code(),
        Code::Aborted
    );
    drop(keys);
}

/// RouterOS keeps no source for a disk. A snapshot whose source was never recorded (the Go
/// driver's, or one whose copy finished just before a crash) is listed and restorable; a
/// CreateSnapshot of its name (the slot is derived from it) with a source it can have come
/// from records that source, one it cannot have come from (smaller) is ALREADY_EXISTS.
#[tokio::test]
async fn a_snapshot_without_a_recorded_source_is_adopted_honestly() {
    let r = Rds::start(&[]).await;
    r.wait_ready().await;
    let s = Snaps(&r.d);
    s.create_volume(A, 2 * GIB, None).await.unwrap();
    s.create_volume(B, GIB, None).await.unwrap();
    let go = SnapshotId::for_name("made-by-the-go-driver")
        .unwrap()
        .to_string();
    r.fake.add_disk(Disk::snapshot(&go, 2 << 30)).unwrap();
    r.fake.write_content(&image(&go), "go data");

    let listed = s.list(&go, "", 0, "").await.unwrap();
    let snap = listed.entries[0].snapshot.as_ref().unwrap();
    assert_eq!(
        (snap.source_volume_id.as_str(), snap.creation_time.is_none()),
        ("", true),
        "nothing recorded: no source, no time"
    );
    assert!(s.list("", A, 0, "").await.unwrap().entries.is_empty());
    let v = "pvc-11111111-0000-4000-8000-0000000000ee";
    s.create_volume(v, 2 * GIB, from_snapshot(&go))
        .await
        .unwrap();
    assert_eq!(content(&r.fake, v).1, "go data");

    let err = s.snapshot("made-by-the-go-driver", B).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "larger than B: not B's");
    let adopted = s.snapshot("made-by-the-go-driver", A).await.unwrap();
    assert_eq!(adopted.snapshot_id, go);
    assert_eq!(adopted.source_volume_id, A);
    assert!(r.fake.disk(&go).unwrap().comment.contains(A));
    assert_eq!(
        s.snapshot("made-by-the-go-driver", B)
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists,
        "recorded now"
    );

    // The copy ran but its answer was lost: the disk exists with its record already (the
    // record is a property of the add, so there is no window without it), and the retry
    // answers from it without writing anything.
    r.fake.drop_connection_on("copy-from", true, 1);
    let err = s.snapshot("interrupted", A).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let id = SnapshotId::for_name("interrupted").unwrap().to_string();
    assert!(
        r.fake
            .disk(&id)
            .unwrap()
            .comment
            .starts_with(&format!("source-{A}-at-")),
        "recorded by the add itself"
    );
    r.fake.clear_commands();
    let done = s.snapshot("interrupted", A).await.unwrap();
    assert_eq!(done.snapshot_id, id);
    assert_eq!(done.source_volume_id, A);
    assert_eq!(
        r.commands(),
        [format!("/disk print detail where slot={id}")],
        "the retry reads, and writes nothing"
    );
    assert_eq!(
        r.fake.disks().iter().filter(|d| d.slot == id).count(),
        1,
        "copied once"
    );
}

/// Every snapshot RPC validates its ids before the RDS hears a word: each hostile value gets
/// its CSI answer (INVALID_ARGUMENT naming the field, or an empty list for ListSnapshots'
/// filters, as CSI §4.3 asks) and the fake RouterOS's log stays exactly as it was, request by
/// request.
///
/// Catches: ListSnapshots listing every snapshot when `snapshot_id` is no valid id (the
/// `Err(_) => Vec::new()` arm in `grpc/controller.rs` replaced by the full listing): a
/// `/disk print detail where slot~"snap-"` reaches the RDS. Catches: VolumeId's character
/// check removed (`ids.rs`): CreateSnapshot of `a;b` answers NOT_FOUND (the backend finds no
/// such slot) instead of INVALID_ARGUMENT.
#[tokio::test]
async fn snapshot_values_are_validated_before_any_command() {
    let r = Rds::start(&[]).await;
    r.wait_ready().await;
    let s = Snaps(&r.d);
    s.create_volume(A, GIB, None).await.unwrap();
    r.fake.clear_commands();
    let invalid = |what: &str, bad: &str, field: &str, result: Result<(), tonic::Status>| {
        let err = result.expect_err(&format!("{what} {bad:?} was accepted"));
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{what} {bad:?}: {}",
            err.message()
        );
        assert!(
            err.message().contains(field),
            "{what} {bad:?}: the message names {field}: {}",
            err.message()
        );
        let sent = r.commands();
        assert!(sent.is_empty(), "{what} {bad:?} reached the RDS: {sent:#?}");
    };
    for bad in rds_csi::backend::rds::values::hostile_corpus() {
        let bad = bad.as_str();
        invalid(
            "CreateSnapshot source",
            bad,
            "source_volume_id",
            s.snapshot("x", bad).await.map(drop),
        );
        invalid(
            "DeleteSnapshot",
            bad,
            "snapshot_id",
            s.delete_snapshot(bad).await,
        );
        invalid(
            "restore from",
            bad,
            "volume_content_source.snapshot.snapshot_id",
            s.create_volume("pvc-y", GIB, from_snapshot(bad))
                .await
                .map(drop),
        );
        invalid(
            "clone of",
            bad,
            "volume_content_source.volume.volume_id",
            s.create_volume("pvc-y", GIB, from_volume(bad))
                .await
                .map(drop),
        );
        if !bad.is_empty() {
            // An empty filter means "all"; any other id that is not valid names nothing.
            let listed = s.list(bad, bad, 0, "").await.unwrap_or_else(|e| {
                panic!("ListSnapshots {bad:?}: {:?} {}", e.code(), e.message())
            });
            assert_eq!(
                (listed.entries.len(), listed.next_token.as_str()),
                (0, ""),
                "ListSnapshots {bad:?}"
            );
            let sent = r.commands();
            assert!(
                sent.is_empty(),
                "ListSnapshots {bad:?} reached the RDS: {sent:#?}"
            );
        }
    }
    let bad_path =
        r.d.controller()
            .create_snapshot(CreateSnapshotRequest {
                name: "x".into(),
                source_volume_id: A.into(),
                parameters: [("volumePath".to_string(), "/storage-pool/a;b".to_string())].into(),
                ..Default::default()
            })
            .await
            .map(drop);
    invalid("volumePath", "/storage-pool/a;b", "volumePath", bad_path);
}
