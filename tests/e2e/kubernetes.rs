//! Kubernetes mode: the real binary against the fake API server. The tests play the
//! external-attacher: they create the VolumeAttachments (and Nodes and PVs) first, then call the
//! driver, exactly as Kubernetes would.

use std::time::{Duration, Instant, SystemTime};

use rds_csi::kube::cluster::va_name;
use serde_json::{json, Value};
use tonic::Code;

use crate::support::cluster::{Cluster, DRIVER};
use crate::support::*;

fn holders(view: &Value) -> Vec<String> {
    view["nodes"].as_array().map_or(vec![], |n| {
        n.iter()
            .map(|n| n["node"].as_str().unwrap().to_string())
            .collect()
    })
}

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
    // The attacher creates each VA, calls Publish, and marks it attached.
    let ctx: std::collections::HashMap<String, String> =
        [("migrationTimeoutSeconds".to_string(), "900".to_string())].into();
    for n in ["n1", "n2"] {
        let va = c.va("pv", "vol", n, false, Duration::ZERO);
        d.publish_full("vol", n, rwx(), false, ctx.clone())
            .await
            .unwrap();
        c.api
            .patch_status(
                "volumeattachments",
                None,
                &va,
                json!({"status": {"attached": true}}),
            )
            .unwrap();
    }
    let before = d.debug("vol").await;
    assert_eq!(before["migration"]["target"], "n2");
    let target_va = c
        .api
        .get("volumeattachments", None, &va_name("vol", DRIVER, "n2"))
        .unwrap();
    let created = rfc3339(&target_va["metadata"]["creationTimestamp"]);
    // Crash at least two seconds after the VA's creation second, so a start taken from the
    // restarted process's own clock could not pass for it below. A wait, not a timing claim.
    while SystemTime::now() < created + Duration::from_secs(2) {
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

    // The rule: the migration started at the newer VA's creationTimestamp (whole seconds).
    let n2 = after["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "n2")
        .unwrap();
    assert_eq!(
        rfc3339(&n2["attached_at"]),
        created,
        "n2's attach time is its VA's"
    );
    // The view derives started_at from the monotonic clock and prints whole seconds, so a
    // conversion error of microseconds can show the second before `created`. That truncation
    // is the only slack allowed: no other value passes.
    let started = rfc3339(&after["migration"]["started_at"]);
    assert!(
        started == created || started + Duration::from_secs(1) == created,
        "started_at {started:?} is not the VA's creation second {created:?}"
    );
    // The deadline is created + 900 s: time left is what remains of it when the view was
    // taken, somewhere between `asked` and `answered` (the same clock-conversion slack, 1 s).
    let deadline = created + Duration::from_secs(900);
    let left = after["migration"]["time_left_seconds"].as_f64().unwrap();
    let most = deadline.duration_since(asked).unwrap().as_secs_f64();
    let least = deadline.duration_since(answered).unwrap().as_secs_f64();
    assert!(
        left <= most + 1.0 && left >= least - 1.0,
        "time left {left} s, want between {least} and {most} s (deadline = the VA's creation + 900 s)"
    );
}

fn rfc3339(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().unwrap()).unwrap()
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
/// could make hangs (reads and writes alike), and the call log records each request when it
/// arrives: the publish still returns, every request started before it returned is still in
/// flight at that moment (none answered, none given up on), none of them is a read, and the
/// writes the publish queued are answered only once the hang is lifted, after the publish
/// returned, without being abandoned on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_publish_makes_no_synchronous_api_call() {
    let c = Cluster::new(&["n1"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    eventually("node cache filled", || async {
        c.api.count_calls("watch", "nodes") >= 1
    })
    .await;
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
    let not_in_flight: Vec<_> = started.iter().filter(|c| !c.in_flight()).collect();
    assert!(
        not_in_flight.is_empty(),
        "the publish waited on API calls (answered or abandoned before it returned): {not_in_flight:?}"
    );
    let reads: Vec<_> = started
        .iter()
        .filter(|c| !matches!(c.verb.as_str(), "create" | "patch" | "update"))
        .collect();
    assert!(reads.is_empty(), "reads on the success path: {reads:?}");
    println!(
        "{} request(s) started before the publish returned, all writes, all still hung",
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
    let writes: Vec<_> = c
        .api
        .calls()
        .into_iter()
        .filter(|c| matches!(c.verb.as_str(), "create" | "patch"))
        .collect();
    assert!(!writes.is_empty());
    assert!(lifted > returned);
    for w in &writes {
        assert!(
            !w.abandoned && w.answered_at.is_some_and(|t| t >= lifted),
            "every write was answered only after the hang lifted, after the publish returned: {w:?}"
        );
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeding_pages_through_many_volume_attachments() {
    let c = Cluster::new(&["n1", "n2"]).await;
    const VOLUMES: usize = 700;
    for i in 0..VOLUMES {
        let (pv, handle) = (format!("pv-{i}"), format!("vol-{i}"));
        c.pv(&pv, &handle, true, None, json!({}));
        c.va(&pv, &handle, "n1", true, Duration::from_secs(100));
        if i % 7 == 0 {
            c.va(&pv, &handle, "n2", true, Duration::from_secs(50));
        }
    }
    let d = c.start_with_volumes(&["vol-1"]).await;
    d.wait_ready().await;
    let vas = VOLUMES + VOLUMES.div_ceil(7);
    let m = d.scrape().await;
    assert_eq!(
        sample(&m, "rds_csi_seeding_volumeattachments_seen_total"),
        vas as f64
    );
    assert_eq!(
        sample(&m, "rds_csi_migration_active_migrations"),
        VOLUMES.div_ceil(7) as f64
    );
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
    let all = http_get(&format!("{}/debug/attachments", d.metrics_url().await)).await;
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
