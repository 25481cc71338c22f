//! Kubernetes mode, the paths around the attachment rules: how the driver decides it is in a
//! cluster, when it becomes ready, how long a Publish may wait on the API, which node ids may
//! reach an API URL, the PV annotation queue, and what seeding reports. The real binary against
//! the fake API server, as in `kubernetes.rs`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tonic::Code;

use crate::support::cluster::{Cluster, DRIVER};
use crate::support::*;

// ---- `--kubernetes auto` ------------------------------------------------------------------

/// The driver with `--kubernetes auto`, no kubeconfig, and only the in-cluster signs in `env`
/// (the real ones of the machine running the tests are removed). `service_account_dir` is where
/// it looks for the mounted service account.
fn spawn_auto(dir: &Path, service_account_dir: &Path, env: &[(&str, &str)]) -> Child {
    let log = std::fs::File::create(dir.join("driver.log")).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("KUBECONFIG", dir.join("no-such-kubeconfig"))
        .env("HOME", dir)
        .env("RDS_CSI_SERVICE_ACCOUNT_DIR", service_account_dir)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.join("csi.sock").display()))
        .args([
            "--node-id",
            "n1",
            "--kubernetes",
            "auto",
            "--metrics-address",
            "",
            "--debug-address",
            "",
        ])
        .arg("--file-root")
        .arg(dir.join("volumes"))
        .arg("--node-state-dir")
        .arg(dir.join("node-state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    cmd.spawn().expect("spawn rds-csi")
}

/// Waits for the child to exit, failing if it serves its socket instead.
async fn exit_without_serving(child: &mut Child, dir: &Path) -> std::process::ExitStatus {
    let socket = dir.join("csi.sock");
    let log = || std::fs::read_to_string(dir.join("driver.log")).unwrap_or_default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!socket.exists(), "a socket was created:\n{}", log());
            return status;
        }
        assert!(
            !socket.exists(),
            "the driver served its socket (standalone) instead of failing:\n{}",
            log()
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "neither exited nor served:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_with_in_cluster_signs_but_no_usable_config_refuses_to_start() {
    // A pod whose service-account mount is broken: the API server's address is in the
    // environment, but there is no token (and no kubeconfig).
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-service-account");
    let mut child = spawn_auto(
        dir.path(),
        &missing,
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", "1"),
        ],
    );
    let status = exit_without_serving(&mut child, dir.path()).await;
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap();
    assert!(log.contains("KUBERNETES_SERVICE_HOST"), "{log}");
    assert!(log.contains("refusing to run standalone"), "{log}");

    // The service-account directory alone is a sign too (here without a token in it).
    let dir = tempfile::tempdir().unwrap();
    let account = dir.path().join("serviceaccount");
    std::fs::create_dir(&account).unwrap();
    let mut child = spawn_auto(dir.path(), &account, &[]);
    let status = exit_without_serving(&mut child, dir.path()).await;
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap();
    assert!(log.contains(&account.display().to_string()), "{log}");
    assert!(log.contains("refusing to run standalone"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_with_no_cluster_signs_runs_standalone_and_warns_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_auto(dir.path(), &dir.path().join("no-service-account"), &[]);
    let socket = dir.path().join("csi.sock");
    let served = tokio::select! {
        _ = wait_for(&socket) => true,
        _ = async { while child.try_wait().unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        } } => false,
    };
    if served {
        // SIGKILL loses what the log writer still holds: wait for the line first.
        eventually("the standalone warning is written", || async {
            std::fs::read_to_string(dir.path().join("driver.log"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("WARN") && l.contains("standalone"))
        })
        .await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap();
    assert!(served, "{log}");
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("standalone"))
        .unwrap_or_else(|| panic!("no warning about running standalone:\n{log}"));
    assert!(
        warning.contains("no-such-kubeconfig"),
        "the warning gives the reason: {warning}"
    );
}

// ---- Readiness waits for the Node projection ----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_node_list_has_synced() {
    for hang in [false, true] {
        let c = Cluster::new(&["n1", "n2"]).await;
        c.pv("pv", "vol", false, None, json!({}));
        c.va("pv", "vol", "n1", true, Duration::from_secs(60));
        let fault = if hang {
            c.api.hang("list", "nodes")
        } else {
            c.api.fail("list", "nodes", 500)
        };
        let d = c.start_with_volumes(&["vol"]).await;
        // VolumeAttachments and PVs are served: the attachment state is rebuilt...
        eventually("the VolumeAttachments were read", || async {
            sample(
                &d.scrape().await,
                "rds_csi_seeding_volumeattachments_seen_total",
            ) == 1.0
        })
        .await;
        eventually("the seeded holder", || async {
            holders(&d.debug("vol").await) == ["n1"]
        })
        .await;
        assert!(c.api.count_calls("list", "nodes") >= 1);
        // ...but the Node projection is not, so the driver is not ready.
        assert!(!d.ready().await, "hang={hang}: ready without the Node list");
        let readyz = http_get(&format!("{}/readyz", d.metrics_url().await)).await;
        assert!(readyz.contains("still being rebuilt"), "{readyz}");
        c.va("pv", "vol", "n2", false, Duration::ZERO);
        assert_eq!(
            d.publish("vol", "n2", rwo()).await.unwrap_err().code(),
            Code::Unavailable
        );
        c.api.remove_fault(fault);
        d.wait_ready().await;
        let err = d.publish("vol", "n2", rwo()).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    }
}

// ---- One live-check budget per Publish ----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_live_checks_answer_unavailable_before_the_routers_timeout() {
    let c = Cluster::new(&["n1", "n2", "n3", "n4"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    // Freeze the caches, add a node they cannot see, then let no Node or VolumeAttachment GET
    // ever answer.
    c.api.hang("watch", "*");
    c.api.drop_watches();
    c.api
        .create("nodes", json!({"metadata": {"name": "n9"}}))
        .unwrap();
    c.api.hang("get", "nodes");
    c.api.hang("get", "volumeattachments");
    // Four nodes ask for the exclusive volume n1 holds at once, as the attacher's workers
    // would: each needs live checks (n9 also the Node GET a cache miss falls back to), and
    // they queue behind each other in the volume's mailbox.
    let asks = ["n2", "n3", "n4", "n9"].map(|n| {
        c.va("pv", "vol", n, false, Duration::ZERO);
        let d = &d;
        async move { (n, d.publish("vol", n, rwo()).await) }
    });
    for (node, answer) in futures::future::join_all(asks).await {
        let err = answer.expect_err(node);
        assert_eq!(
            err.code(),
            Code::Unavailable,
            "{node}: {} (not the Router's DEADLINE_EXCEEDED)",
            err.message()
        );
        assert!(
            err.message().contains("budget"),
            "{node}: {}",
            err.message()
        );
    }
    c.api.clear_faults();
    assert_eq!(holders(&d.debug("vol").await), ["n1"], "nothing changed");
    let m = d.scrape().await;
    assert_eq!(sample(&m, "rds_csi_attachment_stale_cleared_total"), 0.0);
    assert_eq!(
        sample(&m, "rds_csi_attachment_grace_period_used_total"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_api_cannot_stretch_one_publish_past_the_routers_timeout() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv", "vol", true, Some("600"), json!({}));
    c.va("pv", "vol", "n1", true, Duration::from_secs(600));
    c.va("pv", "vol", "n2", true, Duration::from_secs(60));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    c.api.hang("watch", "*");
    c.api.drop_watches();
    c.api
        .create("nodes", json!({"metadata": {"name": "n3"}}))
        .unwrap();
    c.va("pv", "vol", "n3", false, Duration::ZERO);
    // Every GET answers, but slowly: n3's Node (a cache miss), then n1's and n2's Node and
    // VolumeAttachment. One by one each is quick enough; together they are not.
    c.api.delay("get", "*", Duration::from_secs(9));
    let err = d.publish("vol", "n3", rwx()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains("budget"), "{}", err.message());
    c.api.clear_faults();
    assert_eq!(
        holders(&d.debug("vol").await),
        ["n1", "n2"],
        "nothing changed"
    );
}

// ---- Node ids in Kubernetes mode ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ids_that_are_not_dns_subdomains_are_refused_before_any_api_call() {
    let c = Cluster::new(&["n1"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    let too_long_label = format!("{}.example", "a".repeat(64));
    let bad = [
        "Node-A",
        "n1/../../api/v1/secrets",
        "n1%2F..",
        "a..b",
        "-a",
        "a-",
        ".a",
        "n_1",
        "n1 ",
        "n1?watch=true",
    ];
    c.api.clear_calls();
    for node in bad {
        let err = d.publish("vol", node, rwo()).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{node:?}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with("node_id"),
            "{node:?}: {}",
            err.message()
        );
        let err = d.unpublish("vol", node).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{node:?}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with("node_id"),
            "{node:?}: {}",
            err.message()
        );
    }
    let calls: Vec<String> = c
        .api
        .calls()
        .into_iter()
        .filter(|c| c.verb != "watch" && c.verb != "list")
        .map(|c| format!("{} {}", c.verb, c.path))
        .collect();
    assert!(
        calls.is_empty(),
        "API calls for invalid node ids: {calls:?}"
    );

    // A DNS subdomain's labels may be longer than a DNS label's 63 characters.
    c.api
        .create("nodes", json!({"metadata": {"name": too_long_label}}))
        .unwrap();
    c.va("pv", "vol", &too_long_label, false, Duration::ZERO);
    d.publish("vol", &too_long_label, rwo())
        .await
        .expect("a valid node name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_keeps_the_looser_node_id_rules() {
    let d = Driver::start(&["Node_A"], &[]).await;
    d.create("vol", rwo()).await;
    d.publish("vol", "Node_A", rwo())
        .await
        .expect("standalone node ids are not Kubernetes names");
    d.unpublish("vol", "Node_A").await.unwrap();
}

// ---- The PV annotation queue ----------------------------------------------------------------

fn annotation(c: &Cluster, pv: &str) -> Value {
    c.api.get("persistentvolumes", None, pv).unwrap()["metadata"]["annotations"]
        [format!("{DRIVER}/attached-node")]
    .clone()
}

/// The attach's annotation write fails and waits for its retry; the detach comes meanwhile and
/// its write is held in flight while the failed write's retry comes due. That retry is dropped
/// (the detach's value replaced the one that failed), the detach's write lands, and it is the
/// last: the PV never says attached after the detach.
///
/// The order is forced and checked, not hoped for: the attach's write fails three times, so its
/// next retry waits 800 ms (backoff 200 ms doubling), and the test checks that the first write
/// after the failures is the detach's (had the unpublish come after the retry, it would be the
/// attach's). The retry's chance to run while the detach's write is held is witnessed by the
/// driver's log line for a dropped retry, not by a sleep.
///
/// Catches: `AnnotationQueue::set` keeping the failed value for its retry instead of taking
/// the newer one (`entry.value = value` skipped while a retry is pending): the held write then
/// says attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_annotation_never_overwrites_a_newer_one() {
    let c = Cluster::new(&["n1"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    c.va("pv", "vol", "n1", false, Duration::ZERO);
    // The first three writes (attached to n1) fail; the next one is held in flight.
    const FAILURES: usize = 3;
    let failing = c
        .api
        .fail_times("patch", "persistentvolumes", 500, FAILURES as u32);
    let held = c.api.hang("patch", "persistentvolumes");
    d.publish("vol", "n1", rwo()).await.unwrap();
    eventually("the attach's write failed three times", || async {
        c.api
            .calls_matching("patch", "persistentvolumes")
            .iter()
            .filter(|p| p.status == Some(500))
            .count()
            == FAILURES
    })
    .await;
    d.unpublish("vol", "n1").await.unwrap();
    let clears = |p: &crate::fake_apiserver::Call| {
        p.body.as_ref().unwrap()["metadata"]["annotations"][format!("{DRIVER}/attached-node")]
            .is_null()
    };
    eventually("a write is held in flight", || async {
        c.api
            .calls_matching("patch", "persistentvolumes")
            .iter()
            .any(|p| p.in_flight())
    })
    .await;
    let patches = c.api.calls_matching("patch", "persistentvolumes");
    assert!(
        patches.len() == FAILURES + 1 && clears(&patches[FAILURES]),
        "the write after the failures is the detach's, clearing the annotations (had the \
         unpublish come after the failed write's retry, that retry would be next): {patches:?}"
    );
    d.wait_for_log("annotation retry dropped").await;
    c.api.remove_fault(held);
    c.api.remove_fault(failing);
    eventually("the detach's write landed", || async {
        c.api
            .calls_matching("patch", "persistentvolumes")
            .iter()
            .any(|p| p.status == Some(200) && clears(p))
    })
    .await;
    assert!(
        annotation(&c, "pv").is_null(),
        "the detached volume's PV says attached to {}",
        annotation(&c, "pv")
    );
    let patches = c.api.calls_matching("patch", "persistentvolumes");
    assert_eq!(
        patches.len(),
        FAILURES + 1,
        "nothing was written after the detach's value: {patches:?}"
    );
}

/// A write that finds its PV deleted (404) ends that PV's queue: counted, logged once, never
/// retried; the volume's next change is tried afresh. "Never retried" is read after the
/// writer's logged decision, not after a wait.
///
/// Catches: a 404 taken as a failure to retry (`Err(NOT_FOUND) => Outcome::Gone` in the
/// annotation writer made `Outcome::Failed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pv_ends_its_annotation_queue() {
    let c = Cluster::new(&["n1"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    // The PV goes while the driver's projection still has it (its watch lags).
    c.api.hang("watch", "*");
    c.api.drop_watches();
    c.api.delete("persistentvolumes", None, "pv").unwrap();
    c.va("pv", "vol", "n1", false, Duration::ZERO);
    d.publish("vol", "n1", rwo()).await.unwrap();
    eventually("the write found the PV gone", || async {
        c.api
            .calls_matching("patch", "persistentvolumes")
            .iter()
            .any(|p| p.status == Some(404))
    })
    .await;
    // The writer's decision after the 404, logged once it is made: this PV's queue ends, so
    // no retry of it is scheduled.
    let log = d.wait_for_log("PV is gone").await;
    assert_eq!(
        c.api.count_calls("patch", "persistentvolumes"),
        1,
        "a deleted PV is not written again"
    );
    assert_eq!(
        sample(
            &d.scrape().await,
            r#"rds_csi_kube_annotation_write_failures_total{reason="pv_deleted"}"#
        ),
        1.0
    );
    let lines = log
        .lines()
        .filter(|l| l.contains("PV is gone") && l.contains("pv"))
        .count();
    assert_eq!(lines, 1, "logged once:\n{log}");
    // The next change of the volume is attempted afresh (and ends the same way).
    d.unpublish("vol", "n1").await.unwrap();
    d.wait_for_log_count("PV is gone", 2).await;
    let patches = c.api.calls_matching("patch", "persistentvolumes");
    assert!(
        patches.len() == 2
            && patches[1].body.as_ref().unwrap()["metadata"]["annotations"]
                [format!("{DRIVER}/attached-node")]
            .is_null(),
        "the second write is the detach's, and the last: {patches:?}"
    );
    c.api.clear_faults();
}

// ---- What seeding reports -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparsable_pv_migration_timeout_at_seeding_warns_once() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv-odd", "vol", true, Some("ten minutes"), json!({}));
    c.va("pv-odd", "vol", "n1", true, Duration::from_secs(600));
    c.va("pv-odd", "vol", "n2", true, Duration::from_secs(60));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    assert_eq!(
        d.debug("vol").await["migration"]["timeout_seconds"],
        300,
        "the default"
    );
    // Logged while seeding, before ready; the writer thread may still hold it.
    let log = d.wait_for_log("ten minutes").await;
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("ten minutes"))
        .collect();
    assert_eq!(warnings.len(), 1, "warned once:\n{log}");
    assert!(warnings[0].contains("pv-odd"), "{}", warnings[0]);
    assert!(
        warnings[0].contains("migrationTimeoutSeconds"),
        "{}",
        warnings[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seen_counts_only_this_drivers_volume_attachments() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    c.va("pv", "vol", "n2", false, Duration::from_secs(30));
    c.api
        .create(
            "volumeattachments",
            json!({
                "metadata": {"name": "csi-other"},
                "spec": {"attacher": "other.csi.example.com", "nodeName": "n2",
                         "source": {"persistentVolumeName": "pv-other"}},
                "status": {"attached": true},
            }),
        )
        .unwrap();
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    let m = d.scrape().await;
    assert_eq!(
        sample(&m, "rds_csi_seeding_volumeattachments_seen_total"),
        2.0,
        "this driver's two, not the other driver's"
    );
    assert_eq!(
        sample(
            &m,
            r#"rds_csi_seeding_volumeattachments_skipped_total{reason="not_attached"}"#
        ),
        1.0
    );
}

// ---- Who the driver is to the API server ----------------------------------------------------

/// The driver calls the API server as the controller's ServiceAccount held to the driver's
/// roles of the rendered RBAC, never as the all-powerful harness: so the chart's RBAC decides
/// every call of every Kubernetes-mode test, and `Cluster` fails a test on any 403. The same
/// kubeconfig is refused what only a sidecar's role of that account allows (the csi-attacher's
/// VolumeAttachment status patch).
///
/// Catches: `Cluster::new` writing the harness's kubeconfig for the driver, and
/// `driver_identity` leaving out the driver's roles (the account's sidecar roles would then
/// hide a rule missing from the driver's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_calls_the_api_as_the_controller_account_with_the_driver_roles() {
    use k8s_openapi::api::storage::v1::VolumeAttachment;
    use kube::api::{Api, Patch, PatchParams};

    let c = Cluster::new(&["n1"]).await;
    c.pv("pv", "vol", false, None, json!({}));
    let d = c.start_with_volumes(&["vol"]).await;
    d.wait_ready().await;
    let va = c.va("pv", "vol", "n1", false, Duration::ZERO);
    d.publish("vol", "n1", rwo()).await.unwrap();
    eventually("pv annotated", || async { annotation(&c, "pv") == "n1" }).await;
    let users: std::collections::BTreeSet<String> =
        c.api.calls().iter().map(|call| call.user.clone()).collect();
    assert_eq!(
        users.into_iter().collect::<Vec<_>>(),
        ["system:serviceaccount:rds-csi:rds-csi-controller"],
        "every call the driver made"
    );

    let kubeconfig = kube::config::Kubeconfig::read_from(&c.kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let api: Api<VolumeAttachment> = Api::all(kube::Client::try_from(config).unwrap());
    let err = api
        .patch_status(
            &va,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"attached": true}})),
        )
        .await
        .expect_err("the csi-attacher's rule is not the driver's");
    match err {
        kube::Error::Api(s) => assert_eq!(
            (s.code, s.reason.as_str()),
            (403, "Forbidden"),
            "{}",
            s.message
        ),
        other => panic!("not an API error: {other:?}"),
    }
    let refused = c.api.take_rbac_denials();
    assert_eq!(refused.len(), 1, "only the provoked refusal: {refused:?}");
}
