//! What operators see: /metrics counts each migration once, /debug/attachments shows live state,
//! health endpoints, gRPC metrics, and structured logs with RPC spans.

use std::time::Duration;

use rds_csi::csi::ControllerPublishVolumeRequest;
use serde_json::{json, Value};

use crate::support::cluster::Cluster;
use crate::support::*;

fn migrations(m: &str) -> (f64, f64, f64) {
    (
        sample(m, r#"rds_csi_migration_migrations_total{result="success"}"#),
        sample(m, r#"rds_csi_migration_migrations_total{result="failed"}"#),
        sample(m, r#"rds_csi_migration_migrations_total{result="timeout"}"#),
    )
}

#[tokio::test]
async fn each_migration_is_counted_exactly_once() {
    let d = Driver::start(&["n2"], &[]).await;
    d.create("v", rwx()).await;
    d.publish("v", "n1", rwx()).await.unwrap();
    d.publish("v", "n2", rwx()).await.unwrap();
    let during = d.scrape().await;
    assert_eq!(sample(&during, "rds_csi_migration_active_migrations"), 1.0);
    assert_eq!(migrations(&during), (0.0, 0.0, 0.0));

    d.unpublish("v", "n1").await.unwrap();
    d.unpublish("v", "n1").await.unwrap(); // a repeated detach changes nothing
    let done = d.scrape().await;
    assert_eq!(migrations(&done), (1.0, 0.0, 0.0));
    assert_eq!(
        sample(&done, "rds_csi_migration_duration_seconds_count"),
        1.0
    );
    assert_eq!(sample(&done, "rds_csi_migration_active_migrations"), 0.0);

    d.publish("v", "n1", rwx()).await.unwrap();
    d.unpublish("v", "n1").await.unwrap();
    let rolled_back = d.scrape().await;
    assert_eq!(migrations(&rolled_back), (1.0, 1.0, 0.0));
    assert_eq!(
        sample(&rolled_back, "rds_csi_migration_duration_seconds_count"),
        1.0,
        "failures are not timed"
    );
    assert_eq!(
        sample(&rolled_back, "rds_csi_migration_active_migrations"),
        0.0
    );
}

async fn debug(d: &Driver, query: &str) -> serde_json::Value {
    let body = http_get(&format!("{}/debug/attachments{query}", d.debug_url().await)).await;
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// `/debug/attachments` comes a page at a time on its own listener: following `next` from a
/// page smaller than the whole lists every attached volume exactly once, in id order; a limit
/// outside 1 to the maximum is refused; the metrics port does not serve the view.
#[tokio::test]
async fn debug_attachments_pages_on_its_own_listener() {
    let d = Driver::start(&[], &[]).await;
    let names: Vec<String> = (0..7).map(|i| format!("vol-{i}")).collect();
    for name in &names {
        d.create(name, rwo()).await;
        d.publish(name, "n1", rwo()).await.unwrap();
    }
    let mut listed = Vec::new();
    let mut query = "?limit=3".to_string();
    let mut pages = 0;
    loop {
        let page = debug(&d, &query).await;
        pages += 1;
        assert!(page["count"].as_u64().unwrap() <= 3, "{page}");
        listed.extend(
            page["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["volume_id"].as_str().unwrap().to_string()),
        );
        match page["next"].as_str() {
            Some(next) => query = format!("?limit=3&after={next}"),
            None => break,
        }
    }
    assert_eq!(listed, names, "every volume once, in order");
    assert_eq!(pages, 3);
    let base = d.debug_url().await;
    for bad in ["limit=0", "limit=5001", "limit=x", "after=bad%2Fid"] {
        let (status, body) = http_get_status(&format!("{base}/debug/attachments?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _) =
        http_get_status(&format!("{}/debug/attachments", d.metrics_url().await)).await;
    assert_eq!(status, 404, "not on the metrics port");
}

#[tokio::test]
async fn debug_attachments_shows_a_migration_counting_down() {
    let d = Driver::start(&["n2"], &[]).await;
    d.create("vm", rwx()).await;
    d.create("idle", rwo()).await;
    d.publish("vm", "n1", rwx()).await.unwrap();
    let ctx = [("migrationTimeoutSeconds".to_string(), "120".to_string())].into();
    d.publish_full("vm", "n2", rwx(), false, ctx).await.unwrap();

    let all = debug(&d, "").await;
    assert_eq!(
        all["count"], 1,
        "only volumes with attachments or grace records: {all}"
    );
    let first = debug(&d, "?volume=vm").await;
    assert_eq!(first["volume_id"], "vm");
    assert_eq!(first["access_class"], "migratable");
    let nodes: Vec<&str> = first["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["n1", "n2"]);
    assert_eq!(first["migration"]["source"], "n1");
    assert_eq!(first["migration"]["target"], "n2");
    assert_eq!(first["migration"]["timeout_seconds"], 120);
    let left1 = first["migration"]["time_left_seconds"].as_f64().unwrap();
    assert!(left1 <= 120.0 && left1 > 0.0);
    // Time left counts down: a later view shows less (whatever the view's precision, one
    // comes; a frozen countdown never does).
    eventually("the migration's time left decreases", || async {
        let later = debug(&d, "?volume=vm").await;
        let left2 = later["migration"]["time_left_seconds"].as_f64().unwrap();
        assert!(left2 <= left1, "time left grew: {left1} then {left2}");
        left2 < left1
    })
    .await;

    d.unpublish("vm", "n1").await.unwrap();
    d.unpublish("vm", "n2").await.unwrap();
    let grace = debug(&d, "?volume=vm").await;
    assert_eq!(grace["nodes"].as_array().unwrap().len(), 0);
    assert_eq!(grace["grace"]["last_node"], "n2");

    let missing = debug(&d, "?volume=idle").await;
    assert!(missing["error"].as_str().unwrap().contains("not attached"));
    let bad = debug(&d, "?volume=..%2Fetc").await;
    assert!(bad["error"].as_str().unwrap().contains("volume_id"));
}

#[tokio::test]
async fn health_grpc_metrics_and_json_logs() {
    let d = Driver::start(&["n2"], &["--log-format", "json"]).await;
    let base = d.metrics_url().await;
    assert_eq!(http_get(&format!("{base}/healthz")).await, "ok\n");
    assert_eq!(http_get(&format!("{base}/readyz")).await, "ready\n");
    d.create("v", rwo()).await;
    d.publish("v", "n1", rwo()).await.unwrap();
    assert!(d.publish("v", "n2", rwo()).await.is_err());
    let m = d.scrape().await;
    let handled = |code: &str| {
        sample(
            &m,
            &format!(
                r#"rds_csi_grpc_server_handled_total{{grpc_code="{code}",grpc_method="ControllerPublishVolume",grpc_service="csi.v1.Controller"}}"#
            ),
        )
    };
    assert_eq!((handled("OK"), handled("FailedPrecondition")), (1.0, 1.0));
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_grpc_server_in_flight_requests{grpc_method="ControllerPublishVolume",grpc_service="csi.v1.Controller"}"#
        ),
        0.0
    );
    assert_eq!(
        sample(&m, r#"rds_csi_attachment_volume_actors{state="attached"}"#),
        1.0
    );
    assert!(sample(&m, "rds_csi_seeding_seconds_to_ready") > 0.0);
    // Standalone, nothing is written to a cluster: that family has no series at all.
    assert_eq!(
        sample_or_absent(
            &m,
            r#"rds_csi_kube_annotation_write_failures_total{reason="server_error"}"#
        ),
        None
    );
    // The TCP sockets the driver listens on are the metrics endpoint and the debug view it
    // logged (the CSI endpoint is a unix socket); the disabled case below relies on this way
    // of looking.
    let mut listening: Vec<String> = tcp_listeners(d.pid())
        .iter()
        .map(|a| format!("http://{a}"))
        .collect();
    listening.sort();
    let mut logged = vec![base.clone(), d.debug_url().await];
    logged.sort();
    assert_eq!(listening, logged);

    let log = d.wait_for_log("publish refused").await;
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let attached = lines
        .iter()
        .find(|l| l["fields"]["message"] == "attached")
        .expect("an 'attached' log line");
    assert_eq!(attached["fields"]["volume_id"], "v");
    let refused = lines
        .iter()
        .find(|l| l["fields"]["message"] == "publish refused")
        .expect("a conflict line");
    assert_eq!(refused["span"]["rpc"], "ControllerPublishVolume");
    assert_eq!(refused["span"]["node_id"], "\"n2\"");
}

#[tokio::test]
async fn an_empty_metrics_address_disables_the_endpoint() {
    let d = Driver::start(&[], &["--metrics-address", "", "--debug-address", ""]).await;
    d.identity()
        .probe(rds_csi::csi::ProbeRequest {})
        .await
        .unwrap();
    // "serving CSI" is logged after where the metrics address would be.
    let log = d.wait_for_log("serving CSI").await;
    assert!(!log.contains("serving /metrics") && !log.contains("serving /debug"));
    // Nothing to connect to: the process listens on no TCP port at all...
    assert_eq!(tcp_listeners(d.pid()), []);
    // ...and in particular not on the default address: a connection there is refused, or
    // (should something else own that port) reaches a socket that is not the driver's.
    let default: std::net::SocketAddr = "127.0.0.1:9809".parse().unwrap();
    if let Ok(stream) = tokio::net::TcpStream::connect(default).await {
        drop(stream);
        assert!(
            !tcp_listeners(d.pid()).contains(&default),
            "the driver serves on the default metrics address"
        );
    }
}

#[test]
fn a_missing_series_is_an_error_not_zero() {
    let scrape =
        "# TYPE rds_csi_attachment_conflicts_total counter\nrds_csi_attachment_conflicts_total 0\n";
    assert_eq!(sample(scrape, "rds_csi_attachment_conflicts_total"), 0.0);
    assert_eq!(
        sample_or_absent(scrape, "rds_csi_attachment_conflict_total"),
        None
    );
    let misspelled =
        std::panic::catch_unwind(|| sample(scrape, "rds_csi_attachment_conflict_total"));
    assert!(
        misspelled.is_err(),
        "a misspelled series must not read as 0"
    );
}

/// A Kubernetes-mode driver where exclusive `vol-stuck` is held by n1 (seeded from its VA) and
/// Nodes answer no GET: a publish of `vol-stuck` from n2 then waits inside its volume actor on
/// the live check of n1 (rule 5.1), its mailbox blocked, until the fault is removed.
struct StuckPublish {
    c: Cluster,
    d: Driver,
    hang: u64,
    publish: tokio::task::JoinHandle<
        Result<tonic::Response<rds_csi::csi::ControllerPublishVolumeResponse>, tonic::Status>,
    >,
}

impl StuckPublish {
    /// `others`: more exclusive volumes, each attached to n1 before the publish hangs.
    async fn start(others: &[&str]) -> StuckPublish {
        let c = Cluster::new(&["n1", "n2"]).await;
        c.pv("pv-stuck", "vol-stuck", false, None, json!({}));
        c.va("pv-stuck", "vol-stuck", "n1", true, Duration::from_secs(60));
        for v in others {
            c.pv(&format!("pv-{v}"), v, false, None, json!({}));
        }
        let mut volumes = vec!["vol-stuck"];
        volumes.extend_from_slice(others);
        let d = c.start_with_volumes(&volumes).await;
        d.wait_ready().await;
        for v in others {
            c.va(&format!("pv-{v}"), v, "n1", false, Duration::ZERO);
            d.publish(v, "n1", rwo()).await.unwrap();
        }
        c.va("pv-stuck", "vol-stuck", "n2", false, Duration::ZERO);
        let hang = c.api.hang("get", "nodes");
        let mut client = d.controller();
        let publish = tokio::spawn(async move {
            client
                .controller_publish_volume(ControllerPublishVolumeRequest {
                    volume_id: "vol-stuck".into(),
                    node_id: "n2".into(),
                    volume_capability: Some(rwo()),
                    ..Default::default()
                })
                .await
        });
        eventually("the publish waits on its live Node check", || async {
            c.api
                .calls_matching("get", "nodes")
                .iter()
                .any(|call| call.status.is_none())
        })
        .await;
        StuckPublish {
            c,
            d,
            hang,
            publish,
        }
    }
}

const PUBLISH_IN_FLIGHT: &str = r#"rds_csi_grpc_server_in_flight_requests{grpc_method="ControllerPublishVolume",grpc_service="csi.v1.Controller"}"#;

/// ControllerPublishVolume requests handled with `code`; None before the first one.
fn publish_handled(m: &str, code: &str) -> Option<f64> {
    sample_or_absent(
        m,
        &format!(
            r#"rds_csi_grpc_server_handled_total{{grpc_code="{code}",grpc_method="ControllerPublishVolume",grpc_service="csi.v1.Controller"}}"#
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_rpc_leaves_no_request_in_flight_and_is_counted_as_canceled() {
    let s = StuckPublish::start(&[]).await;
    let before = s.d.scrape().await;
    assert_eq!(sample(&before, PUBLISH_IN_FLIGHT), 1.0, "the stuck publish");
    assert_eq!(publish_handled(&before, "Canceled"), None);

    // The client gives up: its call is dropped, which resets the HTTP/2 stream.
    s.publish.abort();
    assert!(s.publish.await.unwrap_err().is_cancelled());
    eventually("the cancelled publish is no longer in flight", || async {
        sample(&s.d.scrape().await, PUBLISH_IN_FLIGHT) == 0.0
    })
    .await;
    let m = s.d.scrape().await;
    assert_eq!(
        publish_handled(&m, "Canceled"),
        Some(1.0),
        "counted as handled"
    );
    assert_eq!(publish_handled(&m, "OK"), None);
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_volume_operations_total{operation="publish",status="cancelled"}"#
        ),
        1.0,
        "the operation metrics count it too"
    );
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_attachment_operation_duration_seconds_count{operation="attach"}"#
        ),
        1.0,
        "and time it, up to the cancellation"
    );
    s.c.api.remove_fault(s.hang);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_attachments_lists_a_volume_stuck_in_a_publish_as_unanswered() {
    let s = StuckPublish::start(&["vol-a", "vol-b"]).await;
    let base = s.d.debug_url().await;
    // A guard against hanging forever, not a timing claim: the listing waits for no actor
    // longer than its own deadline.
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(60),
        http_get_status(&format!("{base}/debug/attachments")),
    )
    .await
    .expect("/debug/attachments must not wait for a stuck volume");
    assert_eq!(status, 200, "{body}");
    let all: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(all["unanswered"], json!(["vol-stuck"]), "{all}");
    let listed: Vec<&str> = all["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["volume_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["vol-a", "vol-b"], "the volumes that answered");
    assert_eq!(all["count"], 2);

    let (status, body) = tokio::time::timeout(
        Duration::from_secs(60),
        http_get_status(&format!("{base}/debug/attachments?volume=vol-stuck")),
    )
    .await
    .expect("?volume= must not wait for a stuck volume");
    assert_eq!(status, 503, "{body}");
    let one: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(one["unanswered"], json!(["vol-stuck"]), "{one}");
    assert!(
        one["error"].as_str().unwrap().contains("did not answer"),
        "{one}"
    );
    s.c.api.remove_fault(s.hang);
}

/// The Go driver's `rds_csi_mount_operations_total{operation,status}`.
fn mount_ops(m: &str, operation: &str, status: &str) -> f64 {
    sample(
        m,
        &format!(r#"rds_csi_mount_operations_total{{operation="{operation}",status="{status}"}}"#),
    )
}

/// `rds_csi_volume_operations_total{operation,status="success"}`.
fn node_ops(m: &str, operation: &str) -> f64 {
    sample(
        m,
        &format!(r#"rds_csi_volume_operations_total{{operation="{operation}",status="success"}}"#),
    )
}

/// The node's Go families move with the work, on real loop devices and mounts: NodeStage and
/// NodePublish each count a mount and NodeUnstage an unmount (`mount_op` in the plugin's
/// `mount_staged`, `publish_mount`, `unmount`), and stage/unstage count as volume operations
/// (`record` in `grpc::node`). A mount whose loop device is detached behind the plugin's back
/// is a stale mount to NodeGetVolumeStats and to NodePublishVolume
/// (`stale_mounts_detected_total` in `stats` and `publish`), and the
/// NodeStage that re-attaches and re-mounts that volume is a recovery
/// (`stale_recoveries_total` in `stage`).
#[tokio::test]
async fn node_work_feeds_the_go_drivers_mount_stale_and_stage_families() {
    use crate::node::{mount_cap, Node};
    use rds_csi::csi::volume_capability::access_mode::Mode;
    if !crate::support::host::root_or_skip("node_metrics") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("v", 64 << 20, cap.clone()).await;
    let ctx = n.attach("v", cap.clone()).await;
    n.stage("v", "stage", cap.clone(), ctx.clone())
        .await
        .unwrap();
    n.publish("v", "stage", "t", cap.clone(), false)
        .await
        .unwrap();
    let m = n.d.scrape().await;
    assert_eq!(mount_ops(&m, "mount", "success"), 2.0, "staging + bind");
    assert_eq!(node_ops(&m, "stage"), 1.0);
    assert_eq!(sample(&m, "rds_csi_stale_mounts_detected_total"), 0.0);

    // The device goes away under the mounts (the kernel only marks a busy loop device
    // autoclear): the mount at the target is now stale.
    let loops = n.host.loops();
    assert_eq!(loops.len(), 1, "{loops:?}");
    let out = std::process::Command::new("losetup")
        .args(["--detach", &format!("/dev/{}", loops[0])])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let t = n.host.at("t");
    let stats = n.stats("v", &t).await.unwrap();
    assert!(stats.volume_condition.unwrap().abnormal);
    let m = n.d.scrape().await;
    assert_eq!(sample(&m, "rds_csi_stale_mounts_detected_total"), 1.0);
    assert_eq!(
        sample(&m, r#"rds_csi_stale_recoveries_total{status="success"}"#),
        0.0
    );
    // A new pod's NodePublish finds the staging mount's device gone too.
    let refused = n.publish("v", "stage", "t2", cap.clone(), false).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        sample(&n.d.scrape().await, "rds_csi_stale_mounts_detected_total"),
        2.0
    );

    // Both mounts are taken down by hand, which frees the device; the next NodeStage
    // re-attaches and re-mounts the volume.
    for p in [t.clone(), n.host.at("stage")] {
        rustix::mount::unmount(p.as_str(), rustix::mount::UnmountFlags::empty()).unwrap();
    }
    eventually("the detached loop device is freed", || async {
        n.host.loops().is_empty()
    })
    .await;
    n.stage("v", "stage", cap.clone(), ctx).await.unwrap();
    let m = n.d.scrape().await;
    assert_eq!(
        sample(&m, r#"rds_csi_stale_recoveries_total{status="success"}"#),
        1.0
    );
    assert_eq!(mount_ops(&m, "mount", "success"), 3.0);
    assert_eq!(node_ops(&m, "stage"), 2.0);

    n.unpublish("v", "t").await.unwrap();
    n.unstage("v", "stage").await.unwrap();
    let m = n.d.scrape().await;
    assert_eq!(
        mount_ops(&m, "unmount", "success"),
        1.0,
        "only the staging mount was left"
    );
    assert_eq!(mount_ops(&m, "mount", "failure"), 0.0);
    assert_eq!(node_ops(&m, "unstage"), 1.0);
    assert_eq!(sample(&m, "rds_csi_stale_mounts_detected_total"), 2.0);
    n.host.assert_clean();
}

/// A Node deletion seen by the watch triggers a check (`node_watcher_trigger` in
/// `reconcile::stale`), the check clears the stale attachment (`clear_stale`, beside
/// `stale_cleared_total` in the volume actor), and the StaleAttachmentCleared event the API
/// accepted counts in `rds_csi_events_posted_total` (in `KubeSink::event_writer`), once per
/// event the API holds: a post the API refused is retried, and counts only as a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_deletion_feeds_reconcile_actions_and_posted_events() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    let m = d.scrape().await;
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_attachment_reconcile_total{action="clear_stale"}"#
        ),
        0.0
    );
    assert!(c.api.list("events", Some("default")).is_empty());
    // The first post fails: it is retried, and only the accepted one counts as posted.
    c.api.fail_times("create", "events", 500, 1);
    c.api.delete("nodes", None, "n1").unwrap();
    eventually("the watched deletion clears n1's attachment", || async {
        sample(
            &d.scrape().await,
            r#"rds_csi_attachment_reconcile_total{action="clear_stale"}"#,
        ) == 1.0
    })
    .await;
    let m = d.scrape().await;
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_attachment_reconcile_total{action="node_watcher_trigger"}"#
        ),
        1.0
    );
    let posted = |c: &Cluster| {
        c.api
            .list("events", Some("default"))
            .iter()
            .filter(|e| e["reason"] == "StaleAttachmentCleared")
            .count() as f64
    };
    eventually(
        "the StaleAttachmentCleared event is posted and counted",
        || async {
            posted(&c) == 1.0
                && sample_or_absent(
                    &d.scrape().await,
                    r#"rds_csi_events_posted_total{reason="StaleAttachmentCleared"}"#,
                ) == Some(1.0)
        },
    )
    .await;
    let m = d.scrape().await;
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_kube_event_write_failures_total{reason="server_error"}"#
        ),
        1.0,
        "the refused first post"
    );
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_events_posted_total{reason="StaleAttachmentCleared"}"#
        ),
        1.0,
        "counted once, though posted twice"
    );
}

/// A NodeStage that finds the volume's device gone but its old mount still at the staging
/// path re-attaches the device, then refuses to mount over the stale mount: one stale mount
/// detected (in `mount_staged`) and one failed recovery (`stale_recoveries_total` in `stage`).
#[tokio::test]
async fn a_stale_mount_left_at_the_staging_path_fails_the_recovery() {
    use crate::node::{mount_cap, Node};
    use rds_csi::csi::volume_capability::access_mode::Mode;
    if !crate::support::host::root_or_skip("stale_recovery_failure") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("w", 64 << 20, cap.clone()).await;
    let ctx = n.attach("w", cap.clone()).await;
    n.stage("w", "stage", cap.clone(), ctx.clone())
        .await
        .unwrap();
    let loops = n.host.loops();
    assert_eq!(loops.len(), 1, "{loops:?}");
    let out = std::process::Command::new("losetup")
        .args(["--detach", &format!("/dev/{}", loops[0])])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let again = n.stage("w", "stage", cap.clone(), ctx).await;
    assert_eq!(again.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let m = n.d.scrape().await;
    assert_eq!(
        sample(&m, r#"rds_csi_stale_recoveries_total{status="failure"}"#),
        1.0
    );
    assert_eq!(
        sample(&m, r#"rds_csi_stale_recoveries_total{status="success"}"#),
        0.0
    );
    assert_eq!(sample(&m, "rds_csi_stale_mounts_detected_total"), 1.0);
    assert_eq!(
        mount_ops(&m, "mount", "success"),
        1.0,
        "nothing mounted over it"
    );

    // The stale mount is taken down by hand; unstage detaches the re-attached device.
    rustix::mount::unmount(
        n.host.at("stage").as_str(),
        rustix::mount::UnmountFlags::empty(),
    )
    .unwrap();
    n.unstage("w", "stage").await.unwrap();
    eventually("both loop devices are freed", || async {
        n.host.loops().is_empty()
    })
    .await;
    n.host.assert_clean();
}
