//! Snapshots, restores and clones through the binary's socket on the file backend: the CSI
//! calls, idempotency by name, list paging, sizes, and the content of the images on disk (what
//! a restored or cloned volume holds is the source's at the snapshot's moment). Staging a
//! restored volume and reading it back as root is in `node.rs`; the RDS backend's side is in
//! `rds_snapshots.rs`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use rds_csi::csi::controller_service_capability::rpc::Type as Rpc;
use rds_csi::csi::controller_service_capability::Type as CapType;
use rds_csi::csi::*;
use tonic::Code;

use crate::support::*;

const MIB: i64 = 1 << 20;

/// CSI calls of the snapshot service, on any driver.
pub struct Snaps<'a>(pub &'a Driver);

impl Snaps<'_> {
    pub async fn create_volume(
        &self,
        name: &str,
        bytes: i64,
        source: Option<volume_content_source::Type>,
    ) -> Result<Volume, tonic::Status> {
        self.create_volume_in(name, bytes, 0, source).await
    }

    pub async fn create_volume_in(
        &self,
        name: &str,
        required: i64,
        limit: i64,
        source: Option<volume_content_source::Type>,
    ) -> Result<Volume, tonic::Status> {
        self.0
            .controller()
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: required,
                    limit_bytes: limit,
                }),
                volume_capabilities: vec![rwx()],
                volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().volume.unwrap())
    }

    pub async fn snapshot(&self, name: &str, source: &str) -> Result<Snapshot, tonic::Status> {
        self.0
            .controller()
            .create_snapshot(CreateSnapshotRequest {
                name: name.into(),
                source_volume_id: source.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().snapshot.unwrap())
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<(), tonic::Status> {
        self.0
            .controller()
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    pub async fn delete_volume(&self, id: &str) -> Result<(), tonic::Status> {
        self.0
            .controller()
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    pub async fn list(
        &self,
        snapshot_id: &str,
        source: &str,
        max: i32,
        token: &str,
    ) -> Result<ListSnapshotsResponse, tonic::Status> {
        self.0
            .controller()
            .list_snapshots(ListSnapshotsRequest {
                max_entries: max,
                starting_token: token.into(),
                source_volume_id: source.into(),
                snapshot_id: snapshot_id.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Every snapshot id, page by page (`max` per page).
    pub async fn all_ids(&self, max: i32) -> Vec<String> {
        let mut ids = Vec::new();
        let mut token = String::new();
        loop {
            let page = self.list("", "", max, &token).await.unwrap();
            assert!(max == 0 || page.entries.len() <= max as usize);
            ids.extend(
                page.entries
                    .iter()
                    .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone()),
            );
            if page.next_token.is_empty() {
                return ids;
            }
            token = page.next_token;
        }
    }
}

pub fn from_snapshot(id: &str) -> Option<volume_content_source::Type> {
    Some(volume_content_source::Type::Snapshot(
        volume_content_source::SnapshotSource {
            snapshot_id: id.into(),
        },
    ))
}

pub fn from_volume(id: &str) -> Option<volume_content_source::Type> {
    Some(volume_content_source::Type::Volume(
        volume_content_source::VolumeSource {
            volume_id: id.into(),
        },
    ))
}

fn image(d: &Driver, volume: &str) -> PathBuf {
    d.dir.path().join("volumes").join(format!("{volume}.img"))
}

/// Writes `data` at `offset` of a volume's image, as a VM writing its disk would.
fn write_at(d: &Driver, volume: &str, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(image(d, volume))
        .unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read_at(d: &Driver, volume: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(image(d, volume)).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

#[tokio::test]
async fn the_snapshot_and_clone_capabilities_are_advertised() {
    let d = Driver::start(&[], &[]).await;
    let caps: Vec<i32> = d
        .controller()
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| match c.r#type {
            Some(CapType::Rpc(rpc)) => Some(rpc.r#type),
            _ => None,
        })
        .collect();
    for rpc in [
        Rpc::CreateDeleteSnapshot,
        Rpc::ListSnapshots,
        Rpc::CloneVolume,
    ] {
        assert!(caps.contains(&(rpc as i32)), "{rpc:?} in {caps:?}");
    }
    // GetSnapshot is not advertised, and says what to use instead.
    assert!(!caps.contains(&(Rpc::GetSnapshot as i32)), "{caps:?}");
    let err = d
        .controller()
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: "snap-x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(err.message().contains("ListSnapshots"), "{}", err.message());
}

#[tokio::test]
async fn a_restore_and_a_clone_hold_the_sources_data_at_the_snapshots_moment() {
    let d = Driver::start(&[], &[]).await;
    let s = Snaps(&d);
    let src = s.create_volume("src", 8 * MIB, None).await.unwrap();
    assert!(src.content_source.is_none());
    let before = pattern(1, 64 << 10);
    write_at(&d, "src", 0, &before);
    write_at(&d, "src", 5 << 20, &before);

    let snap = s.snapshot("snap-1", "src").await.unwrap();
    assert!(snap.ready_to_use, "made before the answer");
    assert_eq!(snap.source_volume_id, "src");
    assert_eq!(snap.size_bytes, 8 * MIB);
    assert!(snap.creation_time.is_some_and(|t| t.seconds > 0));
    assert!(
        snap.snapshot_id.starts_with("snap-"),
        "{}",
        snap.snapshot_id
    );

    // The source changes after the snapshot.
    let after = pattern(9, 64 << 10);
    write_at(&d, "src", 0, &after);
    write_at(&d, "src", 7 << 20, &after);

    // Restored into a larger volume: the snapshot's data, zeros beyond, and the new size.
    let restored = s
        .create_volume("restored", 16 * MIB, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(restored.capacity_bytes, 16 * MIB);
    assert_eq!(
        restored.content_source,
        Some(VolumeContentSource {
            r#type: from_snapshot(&snap.snapshot_id)
        })
    );
    assert_eq!(read_at(&d, "restored", 0, before.len()), before);
    assert_eq!(read_at(&d, "restored", 5 << 20, before.len()), before);
    assert_eq!(
        read_at(&d, "restored", 7 << 20, 4096),
        vec![0; 4096],
        "the write after the snapshot is not in the restore"
    );
    assert_eq!(
        std::fs::metadata(image(&d, "restored")).unwrap().len(),
        16 << 20
    );

    // A clone is the source as it is now, again possibly larger.
    let clone = s
        .create_volume("clone", 12 * MIB, from_volume("src"))
        .await
        .unwrap();
    assert_eq!(clone.capacity_bytes, 12 * MIB);
    assert_eq!(read_at(&d, "clone", 0, after.len()), after);
    assert_eq!(read_at(&d, "clone", 5 << 20, before.len()), before);
    assert_eq!(read_at(&d, "clone", 7 << 20, after.len()), after);

    // The copies are independent: writing the restore changes neither the snapshot nor the
    // source.
    write_at(&d, "restored", 0, &pattern(42, 4096));
    let again = s
        .create_volume("restored-2", 8 * MIB, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(again.capacity_bytes, 8 * MIB);
    assert_eq!(read_at(&d, "restored-2", 0, before.len()), before);
    assert_eq!(read_at(&d, "src", 0, after.len()), after);
}

#[tokio::test]
async fn a_volume_is_never_smaller_than_its_source() {
    let d = Driver::start(&[], &[]).await;
    let s = Snaps(&d);
    s.create_volume("src", 8 * MIB, None).await.unwrap();
    let snap = s.snapshot("snap", "src").await.unwrap();
    for source in [from_snapshot(&snap.snapshot_id), from_volume("src")] {
        let err = s
            .create_volume("small", 4 * MIB, source.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
        let err = s
            .create_volume_in("limited", 0, 4 * MIB, source.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
        // No size asked: the source's.
        let v = s
            .create_volume_in("unsized", 0, 0, source.clone())
            .await
            .unwrap();
        assert_eq!(v.capacity_bytes, 8 * MIB);
        s.delete_volume("unsized").await.unwrap();
    }
    let listed = d
        .controller()
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1, "nothing was left by the refusals");
}

#[tokio::test]
async fn create_snapshot_is_idempotent_by_name_across_a_restart() {
    let mut d = Driver::start(&[], &[]).await;
    {
        let s = Snaps(&d);
        s.create_volume("a", 4 * MIB, None).await.unwrap();
        s.create_volume("b", 4 * MIB, None).await.unwrap();
    }
    let first = Snaps(&d).snapshot("daily", "a").await.unwrap();
    let again = Snaps(&d).snapshot("daily", "a").await.unwrap();
    assert_eq!(again, first, "the same name and source: the same snapshot");
    let err = Snaps(&d).snapshot("daily", "b").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    // The name -> snapshot mapping outlives the process.
    d.terminate().await;
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
    let d = Driver::start_in(dir, &[], &[]).await;
    let s = Snaps(&d);
    assert_eq!(s.snapshot("daily", "a").await.unwrap(), first);
    assert_eq!(
        s.snapshot("daily", "b").await.unwrap_err().code(),
        Code::AlreadyExists
    );
    // A name too long for CSI, or none, or no source, is INVALID_ARGUMENT.
    for (name, source) in [("", "a"), ("x", ""), (&*"n".repeat(129), "a")] {
        let err = s.snapshot(name, source).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name:?} {source:?}");
    }
    assert_eq!(
        s.snapshot("of-nothing", "missing")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        s.create_volume("v", 4 * MIB, from_snapshot("snap-missing"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        s.create_volume("v", 4 * MIB, from_volume("missing"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn create_volume_from_a_source_is_idempotent_and_checks_the_source() {
    let d = Driver::start(&[], &[]).await;
    let s = Snaps(&d);
    s.create_volume("src", 4 * MIB, None).await.unwrap();
    let snap = s.snapshot("snap", "src").await.unwrap();
    let v = s
        .create_volume("v", 4 * MIB, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(
        s.create_volume("v", 4 * MIB, from_snapshot(&snap.snapshot_id))
            .await
            .unwrap(),
        v
    );
    for other in [None, from_volume("src")] {
        let err = s.create_volume("v", 4 * MIB, other).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    }
    let err = s
        .create_volume("src", 4 * MIB, from_volume("v"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
}

#[tokio::test]
async fn list_snapshots_by_id_by_source_and_paged() {
    let d = Driver::start(&[], &[]).await;
    let s = Snaps(&d);
    s.create_volume("a", MIB, None).await.unwrap();
    s.create_volume("b", MIB, None).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let source = if i < 3 { "a" } else { "b" };
        ids.push(
            s.snapshot(&format!("s{i}"), source)
                .await
                .unwrap()
                .snapshot_id,
        );
    }
    let of_a = ids[0].clone();
    ids.sort();
    for max in [0, 1, 2, 5, 6] {
        assert_eq!(s.all_ids(max).await, ids, "max_entries {max}");
    }
    let page = s.list("", "", 2, "").await.unwrap();
    assert_eq!(page.entries.len(), 2);
    assert!(!page.next_token.is_empty());

    let one = s.list(&ids[3], "", 0, "").await.unwrap();
    assert_eq!(one.entries.len(), 1);
    let snap = one.entries[0].snapshot.as_ref().unwrap();
    assert_eq!(snap.snapshot_id, ids[3]);
    assert!(snap.ready_to_use && snap.creation_time.is_some() && snap.size_bytes == MIB);

    let of_b = s.list("", "b", 0, "").await.unwrap();
    assert_eq!(of_b.entries.len(), 2);
    assert!(of_b
        .entries
        .iter()
        .all(|e| e.snapshot.as_ref().unwrap().source_volume_id == "b"));
    let of_b_paged = s.list("", "b", 1, "").await.unwrap();
    assert_eq!(of_b_paged.entries.len(), 1);
    let rest = s.list("", "b", 1, &of_b_paged.next_token).await.unwrap();
    assert_eq!(rest.entries.len(), 1);
    assert!(rest.next_token.is_empty());

    for (id, source) in [("snap-none", ""), ("", "nobody"), (&*of_a, "b")] {
        let empty = s.list(id, source, 0, "").await.unwrap();
        assert!(empty.entries.is_empty(), "{id:?} {source:?}");
    }
    for token in ["garbage", "v1:a", "s1:../x"] {
        let err = s.list("", "", 0, token).await.unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "{token}");
    }
    let err = s.list("", "", -1, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn deleting_the_source_keeps_its_snapshots_restorable() {
    let d = Driver::start(&[], &[]).await;
    let s = Snaps(&d);
    s.create_volume("src", 4 * MIB, None).await.unwrap();
    let data = pattern(3, 128 << 10);
    write_at(&d, "src", MIB as u64, &data);
    let snap = s.snapshot("keep", "src").await.unwrap();
    s.delete_volume("src").await.unwrap();
    assert!(!image(&d, "src").exists());

    let listed = s.list(&snap.snapshot_id, "", 0, "").await.unwrap();
    assert_eq!(
        listed.entries[0]
            .snapshot
            .as_ref()
            .unwrap()
            .source_volume_id,
        "src",
        "the snapshot still names where it came from"
    );
    s.create_volume("back", 4 * MIB, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(read_at(&d, "back", MIB as u64, data.len()), data);

    // Deleting the snapshot is idempotent, and an id this driver never made is OK too.
    s.delete_snapshot(&snap.snapshot_id).await.unwrap();
    s.delete_snapshot(&snap.snapshot_id).await.unwrap();
    s.delete_snapshot("reallyfakesnapshotid").await.unwrap();
    assert_eq!(
        s.delete_snapshot("").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert!(s.all_ids(0).await.is_empty());
    assert_eq!(
        s.create_volume("gone", 4 * MIB, from_snapshot(&snap.snapshot_id))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // The restored volume is independent of the snapshot it came from.
    assert_eq!(read_at(&d, "back", MIB as u64, data.len()), data);
}

#[tokio::test]
async fn ctl_takes_lists_restores_clones_and_deletes_snapshots() {
    let d = Driver::start(&[], &[]).await;
    let endpoint = format!("unix://{}", d.socket.display());
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .arg("ctl")
            .arg("--endpoint")
            .arg(&endpoint)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        (out.status.code(), json)
    };
    assert_eq!(
        ctl(&["create", "vm", "--size", "4MiB", "--rwx-block"]).0,
        Some(0)
    );
    write_at(&d, "vm", 0, b"golden image");
    let (code, snap) = ctl(&["snapshot", "create", "golden", "vm"]);
    assert_eq!(code, Some(0), "{snap}");
    let id = snap["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(
        id,
        rds_csi::SnapshotId::for_name("golden").unwrap().as_str()
    );
    assert_eq!(snap["source_volume_id"], "vm");
    assert_eq!(snap["ready_to_use"], true);
    assert_eq!(snap["size_bytes"], 4 * MIB);
    assert!(snap["creation_time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(ctl(&["snapshot", "create", "golden", "vm"]).1, snap);

    let (_, list) = ctl(&["snapshot", "list", "--source", "vm"]);
    assert_eq!(list["snapshots"][0], format!("{id} of vm 4194304 bytes"));
    let (_, none) = ctl(&["snapshot", "list", "--source", "other"]);
    assert_eq!(none["snapshots"], serde_json::json!([]));

    let (code, restored) = ctl(&["create", "vm-2", "--rwx-block", "--from-snapshot", &id]);
    assert_eq!(code, Some(0), "{restored}");
    assert_eq!(restored["capacity_bytes"], 4 * MIB, "the source's size");
    assert_eq!(restored["from_snapshot"], id);
    assert_eq!(read_at(&d, "vm-2", 0, 12), b"golden image");
    let (code, clone) = ctl(&[
        "create",
        "vm-3",
        "--size",
        "8MiB",
        "--rwx-block",
        "--from-volume",
        "vm",
    ]);
    assert_eq!(code, Some(0), "{clone}");
    assert_eq!(clone["from_volume"], "vm");
    assert_eq!(clone["capacity_bytes"], 8 * MIB);
    let (code, err) = ctl(&[
        "create",
        "vm-4",
        "--size",
        "1MiB",
        "--rwx-block",
        "--from-volume",
        "vm",
    ]);
    assert_eq!(code, Some(1));
    assert_eq!(err["error"]["code"], "OutOfRange");

    assert_eq!(ctl(&["snapshot", "delete", &id]).1["deleted_snapshot"], id);
    assert_eq!(
        ctl(&["snapshot", "list"]).1["snapshots"],
        serde_json::json!([])
    );
}
