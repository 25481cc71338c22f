//! Kubernetes mode: the real binary against the fake API server. The tests play the
//! external-attacher: they create the VolumeAttachments (and Nodes and PVs) first, then call the
//! driver, exactly as Kubernetes would.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use rds_csi::kube::cluster::va_name;
use serde_json::{json, Value};
use tonic::Code;

use crate::support::cluster::{ts, Cluster, DRIVER};
use crate::support::*;

// ---- 1. The seed's success criteria ---------------------------------------------------------

/// Attachment state after a restart is what the attached VolumeAttachments say: at the first
/// boot, and again after a `kill -9` once the world has moved on (a migration finished, a volume
/// attached, a publish whose VolumeAttachment never became attached), whatever the old process
/// held in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_after_restart_equals_the_va_truth() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    c.pv("pv-rwo", "vol-rwo", false, None, json!({}));
    c.pv("pv-rwx", "vol-rwx", true, None, json!({}));
    c.pv("pv-free", "vol-free", false, None, json!({}));
    c.pv("pv-pending", "vol-pending", false, None, json!({}));
    c.va("pv-rwo", "vol-rwo", "n2", true, Duration::from_secs(600));
    let rwx_source = c.va("pv-rwx", "vol-rwx", "n1", true, Duration::from_secs(300));
    c.va("pv-rwx", "vol-rwx", "n3", true, Duration::from_secs(60));
    let d = c
        .start_with_volumes(&["vol-rwo", "vol-rwx", "vol-free", "vol-pending"])
        .await;
    d.wait_ready().await;
    assert_eq!(holders(&d.debug("vol-rwo").await), ["n2"]);
    let rwx = d.debug("vol-rwx").await;
    assert_eq!(holders(&rwx), ["n1", "n3"]);
    assert_eq!(rwx["migration"]["source"], "n1");
    assert!(
        d.debug("vol-free").await["error"].is_string(),
        "no VA: not attached"
    );
    let err = d.publish("vol-rwo", "n1", rwo()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("n2"), "{}", err.message());
    let m = d.scrape().await;
    assert_eq!(
        sample(&m, "rds_csi_seeding_volumeattachments_seen_total"),
        3.0
    );
    assert_eq!(sample(&m, "rds_csi_migration_active_migrations"), 1.0);

    // The world moves on, as the external-attacher drives it: the migration completes (the
    // source detaches and its VA goes), vol-free is attached to n1, and vol-pending is
    // published to n2 but its VA never reports attached.
    d.unpublish("vol-rwx", "n1").await.unwrap();
    c.api
        .remove_finalizers("volumeattachments", None, &rwx_source)
        .unwrap();
    c.api
        .delete("volumeattachments", None, &rwx_source)
        .unwrap();
    let free = c.va("pv-free", "vol-free", "n1", false, Duration::ZERO);
    d.publish("vol-free", "n1", rwo()).await.unwrap();
    c.api
        .patch_status(
            "volumeattachments",
            None,
            &free,
            json!({"status": {"attached": true}}),
        )
        .unwrap();
    c.va("pv-pending", "vol-pending", "n2", false, Duration::ZERO);
    d.publish("vol-pending", "n2", rwo()).await.unwrap();
    assert_eq!(
        holders(&d.debug("vol-pending").await),
        ["n2"],
        "held in memory"
    );

    let old_pid = d.pid();
    let d = d.crash_and_restart(&c.kubeconfig, &[]).await;
    assert_ne!(d.pid(), old_pid, "a new process");
    d.wait_ready().await;
    assert_eq!(holders(&d.debug("vol-rwo").await), ["n2"]);
    let rwx = d.debug("vol-rwx").await;
    assert_eq!(holders(&rwx), ["n3"], "the finished migration");
    assert!(rwx["migration"].is_null(), "{rwx}");
    assert_eq!(holders(&d.debug("vol-free").await), ["n1"]);
    assert!(
        d.debug("vol-pending").await["error"].is_string(),
        "a VA not attached is no attachment, whatever the old process held"
    );
    let m = d.scrape().await;
    assert_eq!(
        sample(&m, "rds_csi_seeding_volumeattachments_seen_total"),
        4.0
    );
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_seeding_volumeattachments_skipped_total{reason="not_attached"}"#
        ),
        1.0
    );
    assert_eq!(sample(&m, "rds_csi_migration_active_migrations"), 0.0);
    let err = d.publish("vol-free", "n2", rwo()).await.unwrap_err();
    assert!(err.message().contains("n1"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vas_rebuild_a_migration_whose_timeout_is_enforced() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    // Started (by the newer VA) 45 s ago with a 30 s timeout: it fires at once after boot.
    c.pv("pv-late", "vol-late", true, Some("30"), json!({}));
    c.va("pv-late", "vol-late", "n1", true, Duration::from_secs(3000));
    c.va("pv-late", "vol-late", "n2", true, Duration::from_secs(45));
    let d = c.start_with_volumes(&["vol-late"]).await;
    d.wait_ready().await;
    eventually("the overdue migration times out", || async {
        sample(
            &d.scrape().await,
            r#"rds_csi_migration_migrations_total{result="timeout"}"#,
        ) == 1.0
    })
    .await;
    let view = d.debug("vol-late").await;
    assert_eq!(view["migration"]["timed_out"], true);
    assert_eq!(
        holders(&view),
        ["n1", "n2"],
        "a timed-out migration stays dual-attached"
    );
    c.va("pv-late", "vol-late", "n3", false, Duration::ZERO);
    let err = d.publish("vol-late", "n3", rwx()).await.unwrap_err();
    assert!(
        err.message()
            .contains("migration limit: attached to n1 and n2"),
        "{}",
        err.message()
    );
    d.unpublish("vol-late", "n1").await.unwrap();
    let m = d.scrape().await;
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_migration_migrations_total{result="timeout"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_migration_migrations_total{result="success"}"#
        ),
        0.0,
        "counted once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_annotations_without_a_va_leave_the_volume_detached_and_are_never_read() {
    let c = Cluster::new(&["n1", "n2"]).await;
    let stale = json!({format!("{DRIVER}/attached-node"): "n1", format!("{DRIVER}/attached-at"): "2020-01-01T00:00:00Z"});
    c.pv("pv", "vol", false, None, stale);
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    assert!(
        d.debug("vol").await["error"].is_string(),
        "detached despite the annotation"
    );
    c.va("pv", "vol", "n2", false, Duration::ZERO);
    d.publish("vol", "n2", rwo())
        .await
        .expect("n1 in the annotation must not block n2");
    let pv_reads: Vec<_> = c
        .api
        .calls()
        .into_iter()
        .filter(|c| c.resource == "persistentvolumes" && c.verb == "get")
        .collect();
    assert!(
        pv_reads.is_empty(),
        "PVs must never be read one by one: {pv_reads:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_volumes_with_stale_annotations_work() {
    let c = Cluster::new(&["n1", "n2"]).await;
    let stale = json!({format!("{DRIVER}/attached-node"): "n2", format!("{DRIVER}/attached-at"): "2020-01-01T00:00:00Z"});
    c.pv("pv", "vol", false, None, stale);
    c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    assert_eq!(
        holders(&d.debug("vol").await),
        ["n1"],
        "the VA, not the annotation"
    );
    d.publish("vol", "n1", rwo())
        .await
        .expect("idempotent re-publish of the seeded holder");
    d.unpublish("vol", "n1").await.unwrap();
    eventually("annotations cleared", || async {
        let pv = c.api.get("persistentvolumes", None, "pv").unwrap();
        pv["metadata"]["annotations"]
            .get(format!("{DRIVER}/attached-node"))
            .is_none()
    })
    .await;
}

// ---- 2. The Go driver's bugs ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_pv_whose_handle_differs_from_its_name() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv-static-legacy", "vol-abc", false, None, json!({}));
    c.va(
        "pv-static-legacy",
        "vol-abc",
        "n1",
        true,
        Duration::from_secs(60),
    );
    let d = c.start_with_volumes(&["vol-abc"]).await;
    d.wait_ready().await;
    assert_eq!(
        holders(&d.debug("vol-abc").await),
        ["n1"],
        "keyed by volumeHandle"
    );
    assert!(
        d.debug("pv-static-legacy").await["error"].is_string(),
        "never by PV name"
    );
    c.va("pv-static-legacy", "vol-abc", "n2", false, Duration::ZERO);
    let err = d.publish("vol-abc", "n2", rwo()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newer_va_time_is_the_migration_start() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv", "vol", true, Some("600"), json!({}));
    c.va("pv", "vol", "n1", true, Duration::from_secs(3000));
    c.va("pv", "vol", "n2", true, Duration::from_secs(100));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    let view = d.debug("vol").await;
    let left = view["migration"]["time_left_seconds"].as_f64().unwrap();
    // Started 100 s ago (the newer VA) with 600 s: about 500 s left. From the older VA it would
    // already have timed out.
    assert!(left > 400.0 && left <= 500.0, "time left {left}");
    assert_eq!(view["migration"]["timed_out"], false);
    assert_eq!(view["migration"]["timeout_seconds"], 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_order_follows_creation_time() {
    let c = Cluster::new(&["aaa", "zzz"]).await;
    c.pv("pv", "vol", true, None, json!({}));
    // Alphabetical and VA-name order would put "aaa" first; creation time puts "zzz" first.
    c.va("pv", "vol", "aaa", true, Duration::from_secs(10));
    c.va("pv", "vol", "zzz", true, Duration::from_secs(200));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    let view = d.debug("vol").await;
    assert_eq!(holders(&view), ["zzz", "aaa"]);
    assert_eq!(
        (
            view["migration"]["source"].as_str(),
            view["migration"]["target"].as_str()
        ),
        (Some("zzz"), Some("aaa"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_two_vas_are_kept_and_further_nodes_refused() {
    let c = Cluster::new(&["n1", "n2", "n3", "n4"]).await;
    c.pv("pv", "vol", true, None, json!({}));
    for (i, n) in ["n1", "n2", "n3"].iter().enumerate() {
        c.va("pv", "vol", n, true, Duration::from_secs(100 - i as u64));
    }
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    assert_eq!(holders(&d.debug("vol").await), ["n1", "n2", "n3"]);
    c.va("pv", "vol", "n4", false, Duration::ZERO);
    assert_eq!(
        d.publish("vol", "n4", rwx()).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        sample(&d.scrape().await, "rds_csi_attachment_over_attached_total"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_va_is_not_counted() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    c.va("pv", "vol", "n2", false, Duration::from_secs(60));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    assert!(d.debug("vol").await["error"].is_string());
    assert_eq!(
        sample(
            &d.scrape().await,
            r#"rds_csi_seeding_volumeattachments_skipped_total{reason="not_attached"}"#
        ),
        1.0
    );
    c.va("pv", "vol", "n1", false, Duration::ZERO);
    d.publish("vol", "n1", rwo())
        .await
        .expect("the pending VA on n2 invents no holder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_node_inside_a_grace_window_is_refused_on_an_exclusive_volume() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    let va1 = c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    d.unpublish("vol", "n1").await.unwrap();
    c.api
        .remove_finalizers("volumeattachments", None, &va1)
        .ok();
    c.api.delete("volumeattachments", None, &va1).unwrap();
    c.va("pv", "vol", "n2", false, Duration::ZERO);
    d.publish("vol", "n2", rwo())
        .await
        .expect("handoff inside the grace window");
    c.va("pv", "vol", "n3", false, Duration::ZERO);
    let err = d.publish("vol", "n3", rwo()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("n2"), "{}", err.message());
    assert_eq!(
        sample(
            &d.scrape().await,
            "rds_csi_attachment_grace_period_used_total"
        ),
        1.0
    );
}

// ---- 3. Self-heal ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_clears_the_stale_attachment() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    c.api.delete("nodes", None, "n1").unwrap();
    // The stale reconciler hears the deletion and clears n1 first; the publish then comes inside
    // the term's first lease duration, whose live read still finds n1's VolumeAttachment. That
    // attachment is cleared, evented and counted once, not again by the publish.
    eventually("the stale reconciler cleared n1", || async {
        d.metric("rds_csi_attachment_stale_cleared_total").await == 1.0
    })
    .await;
    c.va("pv", "vol", "n2", false, Duration::ZERO);
    d.publish("vol", "n2", rwo())
        .await
        .expect("n1 is gone: its attachment is stale");
    assert_eq!(holders(&d.debug("vol").await), ["n2"]);
    assert_eq!(
        sample(&d.scrape().await, "rds_csi_attachment_stale_cleared_total"),
        1.0
    );
    eventually("a StaleAttachmentCleared event on the PVC", || async {
        c.api.list("events", Some("default")).iter().any(|e| {
            e["reason"] == "StaleAttachmentCleared" && e["involvedObject"]["name"] == "claim-pv"
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_va_being_deleted_allows_the_handoff() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    let va1 = c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    c.api.delete("volumeattachments", None, &va1).unwrap();
    assert!(
        c.api.get("volumeattachments", None, &va1).unwrap()["metadata"]["deletionTimestamp"]
            .is_string()
    );
    c.va("pv", "vol", "n2", false, Duration::ZERO);
    d.publish("vol", "n2", rwo())
        .await
        .expect("n1's VA is being deleted: handoff");
    assert_eq!(holders(&d.debug("vol").await), ["n2"]);
    assert_eq!(
        sample(
            &d.scrape().await,
            "rds_csi_attachment_grace_period_used_total"
        ),
        1.0
    );
}

fn live_gets(c: &Cluster) -> Vec<(String, String, Option<u16>)> {
    c.api
        .calls()
        .into_iter()
        .filter(|c| c.verb == "get")
        .map(|c| (c.resource, c.name.unwrap_or_default(), c.status))
        .collect()
}

/// The cache says "gone", the API says "present": no handoff. The watch streams are told that
/// n1's Node and VolumeAttachment were deleted (forged DELETED events) while both still exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_cache_never_causes_a_handoff() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    c.pv("pv-probe", "probe", false, None, json!({}));
    let va1 = c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    let d = c.start_with_volumes(&["vol", "probe"]).await;
    d.wait_ready().await;
    eventually("the Node watch is open", || async {
        c.api.open_watches(Some("nodes")) >= 1
    })
    .await;
    let n1 = c.api.get("nodes", None, "n1").unwrap();
    assert!(c.api.forge_watch_event("nodes", "DELETED", n1) >= 1);
    let va = c.api.get("volumeattachments", None, &va1).unwrap();
    c.api.forge_watch_event("volumeattachments", "DELETED", va);
    // The Node cache believes it: a publish to n1 now has to ask the API whether n1 exists.
    eventually("the Node cache says n1 is gone", || async {
        c.api.clear_calls();
        d.publish("probe", "n1", rwo()).await.unwrap();
        live_gets(&c).contains(&("nodes".into(), "n1".into(), Some(200)))
    })
    .await;

    c.va("pv", "vol", "n2", false, Duration::ZERO);
    c.api.clear_calls();
    let err = d.publish("vol", "n2", rwo()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("n1"), "{}", err.message());
    let live = live_gets(&c);
    assert!(
        live.contains(&("nodes".into(), "n1".into(), Some(200))),
        "{live:?}"
    );
    assert!(
        live.contains(&("volumeattachments".into(), va1.clone(), Some(200))),
        "{live:?}"
    );
    assert_eq!(holders(&d.debug("vol").await), ["n1"]);
    let m = d.scrape().await;
    assert_eq!(
        sample(&m, "rds_csi_attachment_grace_period_used_total"),
        0.0
    );
    assert_eq!(sample(&m, "rds_csi_attachment_stale_cleared_total"), 0.0);
}

/// The mirror case: the cache says "present", the API says "gone": the live answer wins. n1's
/// Node, then n3's VolumeAttachment, are deleted without the watch streams hearing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_get_that_says_gone_wins_over_a_cache_that_says_present() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    c.pv("pv-b", "vol-b", false, None, json!({}));
    c.pv("pv-probe", "probe", false, None, json!({}));
    c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    let vb = c.va("pv-b", "vol-b", "n3", true, Duration::from_secs(60));
    let d = c.start_with_volumes(&["vol", "vol-b", "probe"]).await;
    d.wait_ready().await;
    eventually("the Node watch is open", || async {
        c.api.open_watches(Some("nodes")) >= 1
    })
    .await;
    c.api.delete_unwatched("nodes", None, "n1").unwrap();
    // The Node cache still lists n1: a publish to n1 asks the API nothing (and succeeds).
    c.api.clear_calls();
    d.publish("probe", "n1", rwo())
        .await
        .expect("the cache still has n1");
    assert_eq!(live_gets(&c), [], "answered from the cache");

    // A publish n1 blocks asks the API, which says n1 is gone: the holder is stale.
    c.va("pv", "vol", "n2", false, Duration::ZERO);
    c.api.clear_calls();
    d.publish("vol", "n2", rwo())
        .await
        .expect("n1's Node is gone: its attachment is stale");
    assert!(
        live_gets(&c).contains(&("nodes".into(), "n1".into(), Some(404))),
        "{:?}",
        live_gets(&c)
    );
    assert_eq!(holders(&d.debug("vol").await), ["n2"]);
    assert_eq!(
        sample(&d.scrape().await, "rds_csi_attachment_stale_cleared_total"),
        1.0
    );

    // n3's VolumeAttachment goes unseen: the live GET finds it gone, a handoff.
    c.api
        .delete_unwatched("volumeattachments", None, &vb)
        .unwrap();
    c.va("pv-b", "vol-b", "n2", false, Duration::ZERO);
    c.api.clear_calls();
    d.publish("vol-b", "n2", rwo())
        .await
        .expect("n3's VolumeAttachment is gone: handoff");
    assert!(
        live_gets(&c).contains(&("volumeattachments".into(), vb, Some(404))),
        "{:?}",
        live_gets(&c)
    );
    assert_eq!(holders(&d.debug("vol-b").await), ["n2"]);
    assert_eq!(
        sample(
            &d.scrape().await,
            "rds_csi_attachment_grace_period_used_total"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_error_during_the_checks_is_unavailable_and_changes_nothing() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    let va1 = c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    c.api.delete("volumeattachments", None, &va1).unwrap(); // would allow a handoff...
    c.va("pv", "vol", "n2", false, Duration::ZERO);
    let fault = c.api.fail("get", "volumeattachments", 500); // ...but the API fails
    let err = d.publish("vol", "n2", rwo()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert_eq!(holders(&d.debug("vol").await), ["n1"], "state unchanged");
    assert_eq!(
        sample(
            &d.scrape().await,
            "rds_csi_attachment_grace_period_used_total"
        ),
        0.0
    );
    c.api.remove_fault(fault);
    let fault = c.api.fail("get", "nodes", 503);
    assert_eq!(
        d.publish("vol", "n2", rwo()).await.unwrap_err().code(),
        Code::Unavailable
    );
    assert_eq!(holders(&d.debug("vol").await), ["n1"]);
    c.api.remove_fault(fault);
    d.publish("vol", "n2", rwo())
        .await
        .expect("once the API answers, the handoff goes ahead");
}

// ---- 4. Crash and restart -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_migration_keeps_the_migration_its_start_and_timeout() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv", "vol", true, Some("900"), json!({}));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    // The attacher creates each VA, calls Publish, and marks it attached with the answer as
    // its attachmentMetadata.
    let ctx: HashMap<String, String> =
        [("migrationTimeoutSeconds".to_string(), "900".to_string())].into();
    let mut target_context = HashMap::new();
    let mut target_va = String::new();
    for n in ["n1", "n2"] {
        let va = c.va("pv", "vol", n, false, Duration::ZERO);
        target_va = va.clone();
        target_context = d
            .publish_full("vol", n, rwx(), false, ctx.clone())
            .await
            .unwrap();
        c.mark_attached(&va, &target_context);
    }
    let before = d.debug("vol").await;
    assert_eq!(before["migration"]["target"], "n2");
    let attached = instant(&target_context[ATTACHED_AT]);
    // Crash at least two seconds after the target's attach, so a start taken from the
    // restarted process's own clock could not pass for it below. A wait, not a timing claim.
    while SystemTime::now() < attached + Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let d = d.crash_and_restart(&c.kubeconfig, &[]).await;
    d.wait_ready().await;
    let asked = SystemTime::now();
    let after = d.debug("vol").await;
    let answered = SystemTime::now();
    assert_eq!(holders(&after), ["n1", "n2"]);
    assert_eq!(after["migration"]["source"], "n1");
    assert_eq!(after["migration"]["target"], "n2");
    assert_eq!(after["migration"]["timeout_seconds"], 900);
    assert_eq!(after["migration"]["timed_out"], false);

    // The rule: the migration started at the newer holder's attach instant, which its VA
    // recorded, to the nanosecond.
    let n2 = after["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "n2")
        .unwrap();
    assert_eq!(
        rfc3339(&n2["attached_at"]),
        attached,
        "n2's attach time is the instant its VA recorded"
    );
    assert_eq!(rfc3339(&after["migration"]["started_at"]), attached);
    // The deadline is the newer VA's creationTimestamp + 900 s (rules, "Boot seeding" 3: its
    // age is measured on the API server's clock, whose Date header has whole seconds): time
    // left is what remains of it when the view was taken, somewhere between `asked` and
    // `answered`, give or take that second and the conversion between the wall clock and the
    // monotonic one the timer runs on (2 s of slack).
    let va = c.api.get("volumeattachments", None, &target_va).unwrap();
    let deadline = rfc3339(&va["metadata"]["creationTimestamp"]) + Duration::from_secs(900);
    let left = after["migration"]["time_left_seconds"].as_f64().unwrap();
    let most = deadline.duration_since(asked).unwrap().as_secs_f64();
    let least = deadline.duration_since(answered).unwrap().as_secs_f64();
    assert!(
        left <= most + 2.0 && left >= least - 2.0,
        "time left {left} s, want between {least} and {most} s (deadline = the VA's creation + 900 s)"
    );
}

fn rfc3339(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().unwrap()).unwrap()
}

// ---- 4b. Migration direction across a restart ----------------------------------------------

/// The publish_context key that carries the driver's attach instant. A literal on purpose: the
/// external-attacher stores it in every VolumeAttachment's `status.attachmentMetadata`, so a
/// rename would leave the VolumeAttachments of a running cluster unreadable to seeding.
const ATTACHED_AT: &str = "rds.csi.srvlab.io/attached-at";

/// Handles whose two VolumeAttachments sort by name in each order: under `vol-a` n1's VA name
/// sorts first, under `vol-b` n2's. A tie broken by name is right for one and wrong for the
/// other, whichever way it breaks.
const NAME_ORDERS: [(&str, &str); 2] = [("vol-a", "n1"), ("vol-b", "n2")];

fn handles_in_both_name_orders() -> [&'static str; 2] {
    for (handle, first) in NAME_ORDERS {
        let (n1, n2) = (va_name(handle, DRIVER, "n1"), va_name(handle, DRIVER, "n2"));
        let sorts_first = if n1 < n2 { "n1" } else { "n2" };
        assert_eq!(sorts_first, first, "fixture: the VA names of {handle}");
    }
    NAME_ORDERS.map(|(handle, _)| handle)
}

/// Plays the external-attacher through a live migration n1 → n2 of `handle` (on PV
/// `pv-<handle>`): for each node in turn it creates the VolumeAttachment with the given
/// creationTimestamp, calls ControllerPublishVolume, and marks the VA attached with the answer
/// as its `attachmentMetadata`. With `with_instant` false the answer is stored without the attach
/// instant, as the Go driver or an older version of this one answered. Returns what each VA
/// recorded, n1's first.
async fn migrate_as_the_attacher(
    c: &Cluster,
    d: &Driver,
    handle: &str,
    created: [&str; 2],
    with_instant: bool,
) -> [HashMap<String, String>; 2] {
    let pv = format!("pv-{handle}");
    let mut recorded = [HashMap::new(), HashMap::new()];
    for (i, node) in ["n1", "n2"].into_iter().enumerate() {
        let va = c.va_created(&pv, handle, node, false, created[i]);
        let mut ctx = d.publish(handle, node, rwx()).await.unwrap();
        if !with_instant {
            ctx.remove(ATTACHED_AT);
        }
        c.mark_attached(&va, &ctx);
        recorded[i] = ctx;
    }
    recorded
}

fn instant(text: &str) -> SystemTime {
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

fn events_of(c: &Cluster, reason: &str) -> Vec<String> {
    c.api
        .list("events", Some("default"))
        .iter()
        .filter(|e| e["reason"] == reason)
        .map(|e| {
            e["involvedObject"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

/// Both VolumeAttachments of a migration carry one creationTimestamp second (a VM migrated
/// within a second of its volume's attach): after a `kill -9`, the attach instants the
/// attacher stored order them, whichever VA name sorts first, so the source's detach is a
/// success, counted once, with its MigrationCompleted event and its duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_second_migrations_keep_their_direction_across_kill_9() {
    let handles = handles_in_both_name_orders();
    let c = Cluster::new(&["n1", "n2"]).await;
    for h in handles {
        c.pv(&format!("pv-{h}"), h, true, None, json!({}));
    }
    let d = c.start_with_volumes(&handles).await;
    d.wait_ready().await;
    let mut recorded = Vec::new();
    for h in handles {
        let second = ts(Duration::ZERO);
        recorded.push(migrate_as_the_attacher(&c, &d, h, [&second, &second], true).await);
    }

    let d = d.crash_and_restart(&c.kubeconfig, &[]).await;
    d.wait_ready().await;
    let mut views = Vec::new();
    for (h, [n1, n2]) in handles.iter().zip(&recorded) {
        views.push(d.debug(h).await);
        // A seeded holder answers a repeated publish with what its VolumeAttachment recorded.
        assert_eq!(&d.publish(h, "n1", rwx()).await.unwrap(), n1, "{h}: n1");
        assert_eq!(&d.publish(h, "n2", rwx()).await.unwrap(), n2, "{h}: n2");
    }
    for h in handles {
        d.unpublish(h, "n1").await.unwrap();
    }
    let m = d.scrape().await;
    let result = |r: &str| {
        sample(
            &m,
            &format!("rds_csi_migration_migrations_total{{result=\"{r}\"}}"),
        )
    };
    assert_eq!(
        (result("success"), result("failed"), result("timeout")),
        (2.0, 0.0, 0.0),
        "the source detached from each volume: two successes, nothing else"
    );
    assert_eq!(sample(&m, "rds_csi_migration_duration_seconds_count"), 2.0);
    assert_eq!(sample(&m, "rds_csi_migration_active_migrations"), 0.0);

    for ((h, [_, n2]), view) in handles.iter().zip(&recorded).zip(&views) {
        let migration = &view["migration"];
        assert_eq!(
            (migration["source"].as_str(), migration["target"].as_str()),
            (Some("n1"), Some("n2")),
            "{h}: {view}"
        );
        assert_eq!(migration["direction_known"], true, "{h}: {view}");
        // Started exactly at the target's attach instant, not at its VA's creation second.
        let target_instant = instant(&n2[ATTACHED_AT]);
        assert_eq!(
            instant(migration["started_at"].as_str().unwrap()),
            target_instant,
            "{h}: {view}"
        );
        assert_eq!(holders(&d.debug(h).await), ["n2"], "{h}");
    }
    eventually("a MigrationCompleted event on each PVC", || async {
        let mut on = events_of(&c, "MigrationCompleted");
        on.sort();
        on == ["claim-pv-vol-a", "claim-pv-vol-b"]
    })
    .await;
    assert!(events_of(&c, "MigrationFailed").is_empty());
}

/// VolumeAttachments without attach instants (made through the Go driver, or an older version
/// of this one) in different seconds: creationTimestamp still orders them, in both name orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_attach_instants_creation_order_still_decides_across_kill_9() {
    let handles = handles_in_both_name_orders();
    let c = Cluster::new(&["n1", "n2"]).await;
    for h in handles {
        c.pv(&format!("pv-{h}"), h, true, None, json!({}));
    }
    let d = c.start_with_volumes(&handles).await;
    d.wait_ready().await;
    let mut recorded = Vec::new();
    for h in handles {
        let (older, newer) = (ts(Duration::from_secs(5)), ts(Duration::from_secs(1)));
        recorded.push(migrate_as_the_attacher(&c, &d, h, [&older, &newer], false).await);
    }

    let d = d.crash_and_restart(&c.kubeconfig, &[]).await;
    d.wait_ready().await;
    for (h, [n1, n2]) in handles.iter().zip(&recorded) {
        let view = d.debug(h).await;
        let migration = &view["migration"];
        assert_eq!(
            (migration["source"].as_str(), migration["target"].as_str()),
            (Some("n1"), Some("n2")),
            "{h}: {view}"
        );
        assert_eq!(migration["direction_known"], true, "{h}: {view}");
        let target_va = c
            .api
            .get("volumeattachments", None, &va_name(h, DRIVER, "n2"))
            .unwrap();
        assert_eq!(
            instant(migration["started_at"].as_str().unwrap()),
            rfc3339(&target_va["metadata"]["creationTimestamp"]),
            "{h}: started at the newer VA's creation second"
        );
        // No instant was recorded, so none is invented: the repeat answers what the VA holds.
        assert_eq!(&d.publish(h, "n1", rwx()).await.unwrap(), n1, "{h}: n1");
        assert_eq!(&d.publish(h, "n2", rwx()).await.unwrap(), n2, "{h}: n2");
        assert!(!n2.contains_key(ATTACHED_AT));
        d.unpublish(h, "n1").await.unwrap();
    }
    let m = d.scrape().await;
    let result = |r: &str| {
        sample(
            &m,
            &format!("rds_csi_migration_migrations_total{{result=\"{r}\"}}"),
        )
    };
    assert_eq!(
        (result("success"), result("failed"), result("timeout")),
        (2.0, 0.0, 0.0)
    );
    assert_eq!(sample(&m, "rds_csi_migration_duration_seconds_count"), 2.0);
    eventually("a MigrationCompleted event on each PVC", || async {
        events_of(&c, "MigrationCompleted").len() == 2
    })
    .await;
    assert!(events_of(&c, "MigrationFailed").is_empty());
}

/// Two VolumeAttachments in one creationTimestamp second and neither with an attach instant:
/// nothing says which node is the source. The volume is seeded as a migration (both holders
/// kept, a third node refused, its timeout armed), marked direction unknown, and when one side
/// detaches the migration is counted once as `unknown` with a MigrationEnded event: neither a
/// success nor a failure, no duration, no MigrationCompleted or MigrationFailed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_tie_without_attach_instants_is_a_migration_of_unknown_direction() {
    let handles = handles_in_both_name_orders();
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    for h in handles {
        c.pv(&format!("pv-{h}"), h, true, None, json!({}));
    }
    let d = c.start_with_volumes(&handles).await;
    d.wait_ready().await;
    for h in handles {
        let second = ts(Duration::ZERO);
        migrate_as_the_attacher(&c, &d, h, [&second, &second], false).await;
    }

    let d = d.crash_and_restart(&c.kubeconfig, &[]).await;
    d.wait_ready().await;
    for h in handles {
        let view = d.debug(h).await;
        assert_eq!(view["migration"]["direction_known"], false, "{h}: {view}");
        let mut on = holders(&view);
        on.sort();
        assert_eq!(on, ["n1", "n2"], "{h}: both holders kept");
        c.va(&format!("pv-{h}"), h, "n3", false, Duration::ZERO);
        let err = d.publish(h, "n3", rwx()).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::FailedPrecondition,
            "{h}: {}",
            err.message()
        );
    }
    assert_eq!(
        sample(&d.scrape().await, "rds_csi_migration_active_migrations"),
        2.0
    );
    // One side detaches from each volume: n1 from vol-a, n2 from vol-b.
    d.unpublish("vol-a", "n1").await.unwrap();
    d.unpublish("vol-b", "n2").await.unwrap();
    let m = d.scrape().await;
    let result = |r: &str| {
        sample(
            &m,
            &format!("rds_csi_migration_migrations_total{{result=\"{r}\"}}"),
        )
    };
    assert_eq!(
        (
            result("unknown"),
            result("success"),
            result("failed"),
            result("timeout")
        ),
        (2.0, 0.0, 0.0, 0.0),
        "counted once each, claiming no direction"
    );
    assert_eq!(sample(&m, "rds_csi_migration_duration_seconds_count"), 0.0);
    assert_eq!(sample(&m, "rds_csi_migration_active_migrations"), 0.0);
    assert_eq!(holders(&d.debug("vol-a").await), ["n2"]);
    assert_eq!(holders(&d.debug("vol-b").await), ["n1"]);
    eventually("a MigrationEnded event on each PVC", || async {
        let mut on = events_of(&c, "MigrationEnded");
        on.sort();
        on == ["claim-pv-vol-a", "claim-pv-vol-b"]
    })
    .await;
    assert!(events_of(&c, "MigrationCompleted").is_empty());
    assert!(events_of(&c, "MigrationFailed").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_boot_list_failure_keeps_it_not_ready_until_the_api_recovers() {
    let c = Cluster::new(&["n1"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    let fault = c.api.fail("list", "volumeattachments", 500);
    let d = c.start_with_volumes(&["vol"]).await;
    eventually("the driver tried to list", || async {
        c.api.count_calls("list", "volumeattachments") >= 2
    })
    .await;
    assert!(!d.ready().await);
    assert_eq!(
        d.publish("vol", "n1", rwo()).await.unwrap_err().code(),
        Code::Unavailable
    );
    let readyz = http_get(&format!("{}/readyz", d.metrics_url().await)).await;
    assert!(readyz.contains("still being rebuilt"), "{readyz}");
    c.api.remove_fault(fault);
    d.wait_ready().await;
    assert_eq!(holders(&d.debug("vol").await), ["n1"]);
}

/// Starts the driver with its PV watch cache blind to what comes next: the PV list is served,
/// the PV watch is held, and so is the VolumeAttachment list until `release` runs. The PV `pv`
/// (handle `vol`) and its VolumeAttachment attached on n1 are created in between, so the list
/// seeding reads names a PV the cache has never seen; `pv-gone` is named by a VolumeAttachment
/// on n3 and exists nowhere.
async fn seed_with_a_pv_the_cache_missed(c: &Cluster) -> (Driver, u64) {
    c.api.hang("watch", "persistentvolumes");
    let held_list = c.api.hang("list", "volumeattachments");
    let d = c.start_with_volumes(&["vol"]).await;
    eventually("the PV list is served and seeding is listing", || async {
        c.api.count_calls("watch", "persistentvolumes") >= 1
            && c.api
                .calls_matching("list", "volumeattachments")
                .iter()
                .any(|call| call.in_flight())
    })
    .await;
    c.pv("pv", "vol", false, None, json!({}));
    c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    c.va("pv-gone", "gone", "n3", true, Duration::from_secs(60));
    (d, held_list)
}

/// Rules, "Boot seeding" 1: a PV the cache does not know is looked up live, so its attached
/// VolumeAttachment is a holder and another node is refused; a live 404 skips as `unknown_pv`.
/// Catches the removal of `look_up_unknown_pvs` from `seed()` (main.rs): the volume is then
/// seeded holderless and n2's Publish is OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeding_looks_up_a_pv_the_cache_missed() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    let (d, held_list) = seed_with_a_pv_the_cache_missed(&c).await;
    c.api.remove_fault(held_list);
    d.wait_ready().await;
    assert_eq!(holders(&d.debug("vol").await), ["n1"]);
    c.va("pv", "vol", "n2", false, Duration::ZERO);
    let err = d.publish("vol", "n2", rwo()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    let m = d.scrape().await;
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_seeding_volumeattachments_skipped_total{reason="unknown_pv"}"#
        ),
        1.0,
        "only the live 404 is skipped"
    );
    let gets: Vec<_> = c
        .api
        .calls_matching("get", "persistentvolumes")
        .into_iter()
        .map(|call| (call.name.unwrap_or_default(), call.status))
        .collect();
    assert!(gets.contains(&("pv".into(), Some(200))), "{gets:?}");
    assert!(gets.contains(&("pv-gone".into(), Some(404))), "{gets:?}");
}

/// Rules, "Boot seeding" 1: a live PV lookup that fails keeps the driver not ready (Publish
/// UNAVAILABLE), retried and counted, until it heals; then the holder is seeded. Catches
/// seeding going on without the lookup's answer (treating an error like a 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pv_lookup_keeps_seeding_not_ready_until_it_heals() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    let (d, held_list) = seed_with_a_pv_the_cache_missed(&c).await;
    let failing = c.api.fail("get", "persistentvolumes", 500);
    c.api.remove_fault(held_list);
    eventually("the lookup was retried", || async {
        sample(
            &d.scrape().await,
            r#"rds_csi_seeding_retries_total{step="pv_lookup"}"#,
        ) >= 2.0
    })
    .await;
    assert!(!d.ready().await);
    assert_eq!(
        d.publish("vol", "n2", rwo()).await.unwrap_err().code(),
        Code::Unavailable
    );
    c.api.remove_fault(failing);
    d.wait_ready().await;
    assert_eq!(holders(&d.debug("vol").await), ["n1"]);
    c.va("pv", "vol", "n2", false, Duration::ZERO);
    let err = d.publish("vol", "n2", rwo()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_with_no_reachable_api_is_an_error_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!("apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: x\n  user: {{}}\ncontexts:\n- name: x\n  context:\n    cluster: x\n    user: x\ncurrent-context: x\n"),
    )
    .unwrap();
    let socket = dir.path().join("csi.sock");
    let mut child = Driver::spawn_with(
        dir.path(),
        &socket,
        &[],
        &["--kubernetes", "on"],
        Some(&kubeconfig),
    );
    assert!(!child.wait().unwrap().success());
    let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap();
    assert!(log.contains("reaching the API server"), "{log}");
    assert!(!socket.exists(), "never served in standalone instead");
}

// ---- 5. No API call on the publish path -----------------------------------------------------

/// The publish success path makes no API call the answer waits for. Every request the driver
/// could make hangs (reads and writes alike), so a publish that awaited any of them would not
/// return OK: it returns, and no request that arrived after the hang ended (was answered or
/// given up on) before it returned. No GET, the verb of every live read a publish can make
/// (Node, VolumeAttachment, PersistentVolume), started before it returned; watches and lists
/// belong to the reflectors, which run beside it and are not the publish's. The writes the
/// publish queued are sent afterwards and land once the hang is lifted, never before.
///
/// The publish falls inside the term's first lease duration (15 s without leader election),
/// where a holderless volume's publish reads the VolumeAttachments other nodes have of it
/// (rules, "High availability"); this volume has none but the publishing node's, so there is
/// nothing to read and the answer is the same inside that window and after it. The window's
/// read itself is the actor tests' (`term_tests`).
///
/// Catches: a publish awaiting its annotation or event write (`ClusterSink` calls awaited on
/// the publish path), or a live read made for a holderless volume with no other
/// VolumeAttachment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_publish_makes_no_synchronous_api_call() {
    let c = Cluster::new(&["n1"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    c.va("pv", "vol", "n1", false, Duration::ZERO);
    let hung = c.api.hang("*", "*");
    c.api.clear_calls();
    // A wait for a hang to show as a failure rather than a stuck test, not a timing claim.
    tokio::time::timeout(Duration::from_secs(60), d.publish("vol", "n1", rwo()))
        .await
        .expect("publish did not return while every API request hung")
        .unwrap();
    let returned = Instant::now();
    let started = c.api.calls();
    let ended: Vec<_> = started.iter().filter(|c| !c.in_flight()).collect();
    assert!(
        ended.is_empty(),
        "the publish waited on API calls (answered or abandoned before it returned): {ended:?}"
    );
    let gets: Vec<_> = started.iter().filter(|c| c.verb == "get").collect();
    assert!(gets.is_empty(), "live reads on the success path: {gets:?}");
    println!(
        "{} request(s) started before the publish returned, none a GET, all still hung",
        started.len()
    );

    // The writes the publish queued go out (and hang) afterwards, then land once the API
    // answers again.
    eventually(
        "the annotation PATCH and the event POST are sent",
        || async {
            c.api.count_calls("patch", "persistentvolumes") >= 1
                && c.api.count_calls("create", "events") >= 1
        },
    )
    .await;
    let lifted = Instant::now();
    assert!(lifted > returned);
    c.api.remove_fault(hung);
    eventually("the annotation arrives afterwards", || async {
        let pv = c.api.get("persistentvolumes", None, "pv").unwrap();
        pv["metadata"]["annotations"][format!("{DRIVER}/attached-node")] == "n1"
    })
    .await;
    eventually("the event arrives afterwards", || async {
        c.api
            .list("events", Some("default"))
            .iter()
            .any(|e| e["reason"] == "VolumeAttached")
    })
    .await;
    // A write the sink gave up on while hung (its own write timeout) and sent again is allowed;
    // an answer before the hang lifted is not.
    let writes: Vec<_> = c
        .api
        .calls()
        .into_iter()
        .filter(|c| matches!(c.verb.as_str(), "create" | "patch"))
        .collect();
    for w in &writes {
        assert!(
            w.answered_at.is_none_or(|t| t >= lifted),
            "a write was answered while every request hung: {w:?}"
        );
    }
    let landed = |verb: &str, resource: &str| {
        writes
            .iter()
            .any(|w| w.verb == verb && w.resource == resource && w.status.is_some_and(|s| s < 300))
    };
    assert!(
        landed("patch", "persistentvolumes") && landed("create", "events"),
        "the queued writes landed after the hang lifted: {writes:?}"
    );
    let pv = c.api.get("persistentvolumes", None, "pv").unwrap();
    assert!(
        pv["metadata"]["annotations"][format!("{DRIVER}/attached-at")]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_succeeds_while_every_write_fails_and_failures_are_counted() {
    let c = Cluster::new(&["n1"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    c.api.fail_writes(500);
    c.va("pv", "vol", "n1", false, Duration::ZERO);
    d.publish("vol", "n1", rwo())
        .await
        .expect("writes failing never fail a publish");
    eventually("annotation and event failures counted", || async {
        let m = d.scrape().await;
        // Labelled families appear with their first failure.
        sample_or_absent(
            &m,
            r#"rds_csi_kube_annotation_write_failures_total{reason="server_error"}"#,
        )
        .is_some_and(|n| n >= 1.0)
            && sample_or_absent(
                &m,
                r#"rds_csi_kube_event_write_failures_total{reason="server_error"}"#,
            )
            .is_some_and(|n| n >= 1.0)
    })
    .await;
    c.api.clear_faults();
    eventually("the annotation lands once the API recovers", || async {
        let pv = c.api.get("persistentvolumes", None, "pv").unwrap();
        pv["metadata"]["annotations"][format!("{DRIVER}/attached-node")] == "n1"
    })
    .await;
}

/// `volumes` PVs attached to n1, every `every`th also to n2 (a migration), then the driver
/// started and ready; checks that seeding saw every VolumeAttachment and counted every migration.
/// Returns the driver and the number of VolumeAttachments.
async fn seeded_migrating_every(c: &Cluster, volumes: usize, every: usize) -> (Driver, usize) {
    for i in 0..volumes {
        let (pv, handle) = (format!("pv-{i}"), format!("vol-{i}"));
        c.pv(&pv, &handle, true, None, json!({}));
        c.va(&pv, &handle, "n1", true, Duration::from_secs(100));
        if i % every == 0 {
            c.va(&pv, &handle, "n2", true, Duration::from_secs(50));
        }
    }
    let d = c.start_with_volumes(&["vol-1"]).await;
    d.wait_ready().await;
    let vas = volumes + volumes.div_ceil(every);
    let m = d.scrape().await;
    assert_eq!(
        sample(&m, "rds_csi_seeding_volumeattachments_seen_total"),
        vas as f64
    );
    assert_eq!(
        sample(&m, "rds_csi_migration_active_migrations"),
        volumes.div_ceil(every) as f64
    );
    (d, vas)
}

/// Without leader election the first term begins with the process: its seeding takes the
/// VolumeAttachment watcher's first complete list instead of paging through every
/// VolumeAttachment a second time, and still rebuilds every holder and migration from it.
/// Catches the boot seeding listing on its own again (two first pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_boot_seeding_reads_the_volume_attachments_once() {
    let c = Cluster::new(&["n1", "n2"]).await;
    const VOLUMES: usize = 600;
    let (_d, vas) = seeded_migrating_every(&c, VOLUMES, 5).await;
    let lists = c.api.calls_matching("list", "volumeattachments");
    let first_pages = lists
        .iter()
        .filter(|call| !call.params().contains_key("continue"))
        .count();
    assert_eq!(first_pages, 1, "one list of the VolumeAttachments at boot");
    assert_eq!(lists.len(), vas.div_ceil(500), "pages of that one list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeding_pages_through_many_volume_attachments() {
    let c = Cluster::new(&["n1", "n2"]).await;
    const VOLUMES: usize = 700;
    let (d, vas) = seeded_migrating_every(&c, VOLUMES, 7).await;
    let m = d.scrape().await;
    // Only the migrations need actors; the settled volumes are parked, and all are attached.
    let migrating = VOLUMES.div_ceil(7) as f64;
    assert_eq!(
        sample(&m, r#"rds_csi_attachment_volume_actors{state="migrating"}"#),
        migrating
    );
    assert_eq!(
        sample(&m, r#"rds_csi_attachment_volume_actors{state="attached"}"#),
        0.0
    );
    assert_eq!(
        sample(&m, "rds_csi_attachment_parked_volumes"),
        VOLUMES as f64 - migrating
    );
    assert_eq!(
        sample(&m, "rds_csi_nvme_connections_active"),
        VOLUMES as f64
    );
    let pages: Vec<_> = c
        .api
        .calls_matching("list", "volumeattachments")
        .into_iter()
        .map(|call| call.params())
        .collect();
    assert!(
        pages.len() >= vas.div_ceil(500),
        "{} list calls for {vas} VAs",
        pages.len()
    );
    assert!(
        pages
            .iter()
            .all(|p| p.get("limit").map(String::as_str) == Some("500")),
        "{pages:?}"
    );
    let all = http_get(&format!("{}/debug/attachments", d.debug_url().await)).await;
    let all: Value = serde_json::from_str(&all).unwrap();
    assert_eq!(all["count"], VOLUMES);
    assert_eq!(
        holders(&all["volumes"][1]),
        ["n1"],
        "a parked volume is listed"
    );

    // The first RPC for a parked volume starts its actor with the seeded holder.
    let err = d.publish("vol-1", "n2", rwo()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("n1"), "{}", err.message());
    let m = d.scrape().await;
    assert_eq!(
        sample(&m, "rds_csi_attachment_parked_volumes"),
        VOLUMES as f64 - migrating - 1.0
    );
    assert_eq!(
        sample(&m, r#"rds_csi_attachment_volume_actors{state="attached"}"#),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_events_are_posted_at_most_once_a_minute_per_volume() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    c.va("pv", "vol", "n2", false, Duration::ZERO);
    for _ in 0..5 {
        assert_eq!(
            d.publish("vol", "n2", rwo()).await.unwrap_err().code(),
            Code::FailedPrecondition
        );
    }
    assert_eq!(
        sample(&d.scrape().await, "rds_csi_attachment_conflicts_total"),
        5.0
    );
    eventually("one AttachmentConflict event", || async {
        c.api
            .list("events", Some("default"))
            .iter()
            .any(|e| e["reason"] == "AttachmentConflict")
    })
    .await;
    // Events are posted in order: once a later event (the detach) has arrived, any extra
    // conflict event would have arrived too.
    d.unpublish("vol", "n1").await.unwrap();
    eventually("the later VolumeDetached event", || async {
        c.api
            .list("events", Some("default"))
            .iter()
            .any(|e| e["reason"] == "VolumeDetached")
    })
    .await;
    let conflicts = c
        .api
        .list("events", Some("default"))
        .iter()
        .filter(|e| e["reason"] == "AttachmentConflict")
        .count();
    assert_eq!(conflicts, 1);
    let message = &c
        .api
        .list("events", Some("default"))
        .into_iter()
        .find(|e| e["reason"] == "AttachmentConflict")
        .unwrap()["message"];
    assert!(message.as_str().unwrap().contains("n1"), "{message}");
}
