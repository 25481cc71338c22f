//! The two reconcilers of the active controller, through the real binary and the fake API
//! server, with short intervals set by flags. A pass is counted in
//! `rds_csi_reconciler_runs_total`, so "nothing happened over three passes" is something a test
//! can wait for without measuring time.

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::ha::{is_active, is_standby, start_ha};
use crate::support::cluster::Cluster;
use crate::support::*;

fn runs(reconciler: &str) -> String {
    format!(r#"rds_csi_reconciler_runs_total{{reconciler="{reconciler}",result="success"}}"#)
}

/// Waits for `n` more successful passes of `reconciler` than it has made now.
async fn passes(d: &Driver, reconciler: &str, n: f64) {
    let start = d.metric(&runs(reconciler)).await;
    eventually(&format!("{n} more {reconciler} passes"), || async {
        d.metric(&runs(reconciler)).await >= start + n
    })
    .await;
}

fn stale_events(c: &Cluster, claim: &str) -> usize {
    c.api
        .list("events", Some("default"))
        .iter()
        .filter(|e| e["reason"] == "StaleAttachmentCleared" && e["involvedObject"]["name"] == claim)
        .count()
}

/// Writes by the driver to VolumeAttachments: there must be none, the attach-detach controller
/// and the external-attacher own them.
fn va_writes(c: &Cluster) -> Vec<String> {
    c.api
        .calls()
        .into_iter()
        .filter(|call| {
            call.resource == "volumeattachments"
                && !["get", "list", "watch"].contains(&call.verb.as_str())
        })
        .map(|call| format!("{} {}", call.verb, call.path))
        .collect()
}

// ---- Must show 3: stale attachments -------------------------------------------------------

/// A Node deleted while its volume is attached, and deleted behind the watch's back (the Node
/// projection still lists it), is cleared by the next interval pass: counted once, evented once,
/// its VolumeAttachment untouched. A Node that merely went NotReady is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interval_pass_clears_a_deleted_nodes_attachment_once_and_leaves_a_not_ready_node() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    c.pv("pv-gone", "vol-gone", false, None, json!({}));
    c.pv("pv-sick", "vol-sick", true, None, json!({}));
    let gone_va = c.va("pv-gone", "vol-gone", "n1", true, Duration::from_secs(60));
    c.va("pv-sick", "vol-sick", "n2", true, Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    precreate(dir.path(), &["vol-gone", "vol-sick"]).await;
    let d = Driver::start_kube_in(dir, &c.kubeconfig, &["--stale-attachment-interval", "1s"]).await;
    d.wait_ready().await;
    passes(&d, "stale_attachments", 1.0).await;
    assert_eq!(
        d.metric("rds_csi_attachment_stale_cleared_total").await,
        0.0
    );

    eventually("the Node watch is open", || async {
        c.api.open_watches(Some("nodes")) >= 1
    })
    .await;
    c.api.delete_unwatched("nodes", None, "n1").unwrap();
    c.api
        .patch_status(
            "nodes",
            None,
            "n2",
            json!({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady"}]}}),
        )
        .unwrap();
    eventually("n1's attachment is cleared", || async {
        holders(&d.debug("vol-gone").await).is_empty()
    })
    .await;
    eventually("a StaleAttachmentCleared event", || async {
        stale_events(&c, "claim-pv-gone") == 1
    })
    .await;
    passes(&d, "stale_attachments", 3.0).await;
    assert_eq!(
        d.metric("rds_csi_attachment_stale_cleared_total").await,
        1.0,
        "counted once"
    );
    assert_eq!(stale_events(&c, "claim-pv-gone"), 1, "evented once");
    assert_eq!(
        holders(&d.debug("vol-sick").await),
        ["n2"],
        "NotReady is not gone"
    );
    assert_eq!(stale_events(&c, "claim-pv-sick"), 0);
    assert!(
        c.api.get("volumeattachments", None, &gone_va).is_some(),
        "the VolumeAttachment is the attach-detach controller's to remove"
    );
    assert_eq!(va_writes(&c), Vec::<String>::new());
    // The live GET confirmed the deletion.
    assert!(c
        .api
        .calls_matching("get", "nodes")
        .iter()
        .any(|call| call.name.as_deref() == Some("n1") && call.status == Some(404)));
    // Another node may now have the volume.
    c.va("pv-gone", "vol-gone", "n3", false, Duration::ZERO);
    d.publish("vol-gone", "n3", rwo()).await.unwrap();
}

/// The Node watch reports a deletion: its attachments are cleared at once, without waiting for
/// the (hour-long) interval. A deletion the API does not confirm (a forged event) clears nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deletion_the_watch_reports_and_the_api_confirms_clears_at_once() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    c.pv("pv-a", "vol-a", false, None, json!({}));
    c.pv("pv-b", "vol-b", false, None, json!({}));
    c.va("pv-a", "vol-a", "n1", true, Duration::from_secs(60));
    c.va("pv-b", "vol-b", "n2", true, Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    precreate(dir.path(), &["vol-a", "vol-b"]).await;
    let d = Driver::start_kube_in(dir, &c.kubeconfig, &["--stale-attachment-interval", "1h"]).await;
    d.wait_ready().await;
    eventually("the Node watch is open", || async {
        c.api.open_watches(Some("nodes")) >= 1
    })
    .await;

    let n2 = c.api.get("nodes", None, "n2").unwrap();
    assert!(c.api.forge_watch_event("nodes", "DELETED", n2) >= 1);
    eventually("the forged deletion was checked", || async {
        c.api
            .calls_matching("get", "nodes")
            .iter()
            .any(|call| call.name.as_deref() == Some("n2") && call.status == Some(200))
    })
    .await;
    c.api.delete("nodes", None, "n1").unwrap();
    eventually("n1's attachment is cleared", || async {
        holders(&d.debug("vol-a").await).is_empty()
    })
    .await;
    assert_eq!(holders(&d.debug("vol-b").await), ["n2"], "n2 still exists");
    assert_eq!(
        d.metric("rds_csi_attachment_stale_cleared_total").await,
        1.0
    );
    eventually("a StaleAttachmentCleared event", || async {
        stale_events(&c, "claim-pv-a") == 1
    })
    .await;
    assert_eq!(
        d.metric(&runs("stale_attachments")).await,
        0.0,
        "no interval pass yet"
    );
    assert_eq!(va_writes(&c), Vec::<String>::new());
}

/// Only the active controller reconciles: a standby with the same short interval neither reads
/// Nodes for it nor clears anything, and counts no pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_active_controller_reconciles() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv-a", "vol-a", false, None, json!({}));
    c.va("pv-a", "vol-a", "n1", true, Duration::from_secs(60));
    c.lease("a", 3600);
    let fast = [
        "--stale-attachment-interval",
        "1s",
        "--orphan-interval",
        "1s",
    ];
    let a = start_ha(&c, "a", &["vol-a", "vol-lost"], &fast).await;
    let b = start_ha(&c, "b", &["vol-a", "vol-lost"], &fast).await;
    eventually("a serves, b stands by", || async {
        is_active(&a).await && is_standby(&b).await
    })
    .await;
    c.api.delete_unwatched("nodes", None, "n1").unwrap();
    eventually("a cleared n1", || async {
        a.metric("rds_csi_attachment_stale_cleared_total").await == 1.0
    })
    .await;
    passes(&a, "stale_attachments", 2.0).await;
    passes(&a, "orphan_volumes", 2.0).await;
    let m = b.scrape().await;
    assert_eq!(sample(&m, &runs("stale_attachments")), 0.0);
    assert_eq!(sample(&m, &runs("orphan_volumes")), 0.0);
    assert_eq!(sample(&m, "rds_csi_attachment_stale_cleared_total"), 0.0);
}

// ---- Must show 4: orphan volumes ----------------------------------------------------------

/// Dry run (the default): a backend volume no PersistentVolume names is reported once past the
/// grace (log and `rds_csi_orphan_volumes`) and never deleted; a volume with a PV is never
/// reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_volumes_are_reported_and_kept_in_dry_run() {
    let c = Cluster::new(&["n1"]).await;
    c.pv("pv-kept", "vol-kept", false, None, json!({}));
    let dir = tempfile::tempdir().unwrap();
    precreate(dir.path(), &["vol-kept", "vol-orphan"]).await;
    let d = Driver::start_kube_in(
        dir,
        &c.kubeconfig,
        &["--orphan-interval", "1s", "--orphan-grace", "2s"],
    )
    .await;
    d.wait_ready().await;
    eventually("the orphan is reported", || async {
        d.metric("rds_csi_orphan_volumes").await == 1.0
    })
    .await;
    passes(&d, "orphan_volumes", 3.0).await;
    let ids = d.volume_ids().await.unwrap();
    assert!(ids.contains(&"vol-orphan".into()), "dry run: {ids:?}");
    assert!(ids.contains(&"vol-kept".into()), "{ids:?}");
    assert_eq!(d.metric("rds_csi_orphan_volumes").await, 1.0);
    assert_eq!(d.metric("rds_csi_orphan_volumes_deleted_total").await, 0.0);
    // Logs are written by a background thread: wait for the report, then count.
    let log = d.wait_for_log("dry run").await;
    let reports: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("orphan volume") && l.contains("dry run"))
        .collect();
    assert_eq!(reports.len(), 1, "reported once: {reports:#?}");
    assert!(reports[0].contains("vol-orphan"), "{}", reports[0]);
    assert!(!log
        .lines()
        .any(|l| l.contains("orphan") && l.contains("vol-kept")));
}

/// Two driver instances share one RDS: this one has the default `--rds-volume-path` and
/// `--rds-nqn-prefix`. In delete mode, past any grace, only its own orphan disk goes; a disk of
/// another instance (its own volume path, or its own NQN prefix), although no PV of this
/// cluster names it either, is never a candidate: not reported, not deleted. Catches
/// `RdsBackend::owns` in `list_owned` (with every `pvc-*` disk listed, both foreign disks are
/// deleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_shared_rds_only_this_instances_disks_are_orphan_candidates() {
    use crate::fake_rds::{client_keypair, Disk, FakeRds, FakeRdsConfig};
    const OURS: &str = "pvc-0a000000-0000-4000-8000-000000000001";
    const OTHER_PATH: &str = "pvc-0b000000-0000-4000-8000-000000000002";
    const OTHER_NQN: &str = "pvc-0c000000-0000-4000-8000-000000000003";
    let c = Cluster::new(&["n1"]).await;
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = client_keypair(keys.path());
    let fake = FakeRds::start(FakeRdsConfig::new(public)).await;
    let host_key = fake.write_host_key(keys.path());
    fake.add_disk(Disk::volume(OURS, 1 << 30)).unwrap();
    fake.add_disk(Disk {
        file_path: format!("/storage-pool/cluster-b/{OTHER_PATH}.img"),
        ..Disk::volume(OTHER_PATH, 1 << 30)
    })
    .unwrap();
    fake.add_disk(Disk {
        nvme_tcp_server_nqn: format!("nqn.2000-02.com.mikrotik:cluster-b:{OTHER_NQN}"),
        ..Disk::volume(OTHER_NQN, 1 << 30)
    })
    .unwrap();
    let args = crate::rds::Rds::args(
        &fake,
        &key,
        &host_key,
        &[
            "--orphan-interval",
            "1s",
            "--orphan-grace",
            "0s",
            "--orphan-grace-minimum",
            "0s",
            "--orphan-delete",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Driver::start_kube_in(tempfile::tempdir().unwrap(), &c.kubeconfig, &args).await;
    d.wait_ready().await;

    eventually("this instance's orphan is deleted", || {
        std::future::ready(fake.disk(OURS).is_none())
    })
    .await;
    passes(&d, "orphan_volumes", 3.0).await;
    assert!(fake.disk(OTHER_PATH).is_some(), "another volume path");
    assert!(fake.disk(OTHER_NQN).is_some(), "another NQN prefix");
    assert_eq!(d.metric("rds_csi_orphan_volumes_deleted_total").await, 1.0);
    assert_eq!(d.metric("rds_csi_orphan_volumes").await, 0.0);
    let log = d.log();
    for foreign in [OTHER_PATH, OTHER_NQN] {
        assert!(
            !log.lines().any(|l| l.contains(foreign)),
            "{foreign} was never a candidate: {log}"
        );
    }
    drop(keys);
}

/// `--orphan-delete` refuses a grace shorter than an hour at start, naming the flag and the
/// minimum, and serves nothing; a dry run takes any grace. Catches the minimum check in
/// `main.rs`'s `run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_delete_refuses_a_grace_below_the_minimum_at_start() {
    let c = Cluster::new(&["n1"]).await;
    for grace in ["0s", "59m"] {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("csi.sock");
        let args = [
            "--kubernetes",
            "on",
            "--orphan-delete",
            "--orphan-grace",
            grace,
        ];
        let mut child = Driver::spawn_with(dir.path(), &socket, &[], &args, Some(&c.kubeconfig));
        let mut status = None;
        eventually("the driver exits", || {
            status = child.try_wait().unwrap();
            std::future::ready(status.is_some())
        })
        .await;
        assert!(!status.unwrap().success(), "{grace}");
        let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap();
        assert!(
            log.contains(&format!(
                "--orphan-grace {grace} is too short for --orphan-delete"
            )) && log.contains("the minimum is 1h"),
            "{grace}: {log}"
        );
        assert!(!socket.exists(), "{grace}: served nothing");
    }
    let d = Driver::start_kube(&c.kubeconfig, &["--orphan-grace", "0s"]).await;
    d.wait_ready().await;
    let d = Driver::start_kube(&c.kubeconfig, &["--orphan-grace", "1h", "--orphan-delete"]).await;
    d.wait_ready().await;
}

/// Delete mode: the orphan goes once its grace has passed; a volume whose PV the driver's cache
/// missed (the watch was told it was deleted; it exists) is past the grace by the cache and
/// still never deleted, because a live list of PVs comes first; a volume with a PV is never
/// touched; and a published orphan is refused by its volume actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_delete_deletes_past_the_grace_and_never_a_volume_with_a_pv() {
    let c = Cluster::new(&["n1"]).await;
    c.pv("pv-kept", "vol-kept", false, None, json!({}));
    c.pv("pv-lagging", "vol-lagging", false, None, json!({}));
    let dir = tempfile::tempdir().unwrap();
    precreate(
        dir.path(),
        &["vol-kept", "vol-lagging", "vol-orphan", "vol-busy"],
    )
    .await;
    let d = Driver::start_kube_in(
        dir,
        &c.kubeconfig,
        &[
            "--orphan-interval",
            "1s",
            "--orphan-grace",
            "3s",
            "--orphan-grace-minimum",
            "0s",
            "--orphan-delete",
        ],
    )
    .await;
    d.wait_ready().await;
    // vol-busy has no PV but is published (in memory: no VolumeAttachment can name it).
    d.publish("vol-busy", "n1", rwo()).await.unwrap();
    eventually("the PV watch is open", || async {
        c.api.open_watches(Some("persistentvolumes")) >= 1
    })
    .await;
    let lagging = c.api.get("persistentvolumes", None, "pv-lagging").unwrap();
    assert!(
        c.api
            .forge_watch_event("persistentvolumes", "DELETED", lagging)
            >= 1
    );

    eventually("the orphan is deleted", || async {
        !d.volume_ids()
            .await
            .unwrap()
            .contains(&"vol-orphan".to_string())
    })
    .await;
    assert_eq!(d.metric("rds_csi_orphan_volumes_deleted_total").await, 1.0);
    eventually("vol-lagging is past its grace by the cache", || async {
        d.log()
            .lines()
            .any(|l| l.contains("vol-lagging") && l.contains("live list"))
    })
    .await;
    passes(&d, "orphan_volumes", 3.0).await;
    let ids = d.volume_ids().await.unwrap();
    assert!(ids.contains(&"vol-lagging".into()), "{ids:?}");
    assert!(ids.contains(&"vol-kept".into()), "{ids:?}");
    assert!(ids.contains(&"vol-busy".into()), "{ids:?}");
    assert_eq!(d.metric("rds_csi_orphan_volumes_deleted_total").await, 1.0);
    let log = d.wait_for_log("still published to n1").await;
    assert!(
        log.lines()
            .any(|l| l.contains("vol-busy") && l.contains("still published to n1")),
        "the volume actor refused: {log}"
    );
    let first_seen = log
        .lines()
        .position(|l| l.contains("vol-orphan") && l.contains("no PersistentVolume"))
        .expect("first seen logged");
    let deleted = log
        .lines()
        .position(|l| l.contains("vol-orphan") && l.contains("deleted orphan volume"))
        .expect("deletion logged");
    assert!(first_seen < deleted);
    assert!(
        c.api.count_calls("list", "persistentvolumes") >= 2,
        "the live list before deleting"
    );
}

/// The grace counts from when this process first saw the volume without a PV, never from the
/// volume's age, and nothing carries it across a restart: an orphan thirty days old is not
/// deleted by a driver with a one-hour grace, before or after a `kill -9`. A volume made by
/// CreateVolume whose PV is written only after several passes is never deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orphan_grace_starts_at_first_sight_and_a_late_pv_keeps_its_volume() {
    let c = Cluster::new(&["n1"]).await;
    let dir = tempfile::tempdir().unwrap();
    precreate(dir.path(), &["vol-old"]).await;
    // The file backend's record of vol-old says it was made thirty days ago.
    let meta = dir.path().join("volumes").join("vol-old.json");
    let mut record: Value = serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    let month_ago = SystemTime::now() - Duration::from_secs(30 * 86_400);
    record["created_at"] = json!(humantime::format_rfc3339_nanos(month_ago).to_string());
    std::fs::write(&meta, record.to_string()).unwrap();

    let flags = [
        "--orphan-interval",
        "1s",
        "--orphan-grace",
        "1h",
        "--orphan-delete",
    ];
    let d = Driver::start_kube_in(dir, &c.kubeconfig, &flags).await;
    d.wait_ready().await;

    // CreateVolume answered, as for the external-provisioner; the PV is not written yet.
    d.create("pvc-late", rwo()).await;
    passes(&d, "orphan_volumes", 3.0).await;
    eventually("both volumes logged without a PV", || async {
        let log = d.log();
        ["vol-old", "pvc-late"].iter().all(|v| {
            log.lines()
                .any(|l| l.contains(v) && l.contains("no PersistentVolume"))
        })
    })
    .await;
    let log = d.log();
    for v in ["vol-old", "pvc-late"] {
        assert!(
            log.lines()
                .any(|l| l.contains(v) && l.contains("no PersistentVolume")),
            "{v} seen without a PV: {log}"
        );
    }
    c.pv("pvc-late", "pvc-late", false, None, json!({}));
    eventually("pvc-late's PV is seen", || async {
        d.log()
            .lines()
            .any(|l| l.contains("pvc-late") && l.contains("has a PersistentVolume"))
    })
    .await;

    let d = d.crash_and_restart(&c.kubeconfig, &flags).await;
    d.wait_ready().await;
    passes(&d, "orphan_volumes", 3.0).await;
    let ids = d.volume_ids().await.unwrap();
    assert!(ids.contains(&"vol-old".into()), "{ids:?}");
    assert!(ids.contains(&"pvc-late".into()), "{ids:?}");
    assert_eq!(d.metric("rds_csi_orphan_volumes_deleted_total").await, 0.0);
    assert_eq!(
        d.metric("rds_csi_orphan_volumes").await,
        0.0,
        "none past its grace"
    );
}
