//! The deployment manifests under `deploy/`, held against the real binary: the driver's
//! ClusterRole allows every API call the driver makes and nothing it does not make, every flag
//! the manifests pass exists, and the objects are wired together as Kubernetes and an operator
//! need them. The YAML files are read directly (no kubectl); `.ci/validate-manifests` checks the
//! rendered output against the Kubernetes schemas.

#[path = "support/mod.rs"]
mod support;

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rds_csi::csi::controller_service_capability::rpc::Type as Rpc;
use rds_csi::csi::controller_service_capability::Type as CapType;
use rds_csi::csi::{ControllerGetCapabilitiesRequest, NodeGetInfoRequest};
use serde_json::{json, Value};
use tonic::Code;

use support::cluster::{Cluster, DRIVER};
use support::*;

/// How old the test's VolumeAttachments are.
const MINUTE: Duration = Duration::from_secs(60);
const NAMESPACE: &str = "rds-csi";
const DRIVER_ROLE: &str = "rds-csi-driver";
/// The driver's Role in the controller's namespace: reading the csi-attacher's leader Lease.
const DRIVER_LEASE_ROLE: &str = "rds-csi-driver-leases";
const CONTROLLER: &str = "rds-csi-controller";
const NODE: &str = "rds-csi-node";
/// The driver's container in both workloads.
const DRIVER_CONTAINER: &str = "rds-csi";

/// Rules of the driver's ClusterRole that the scenario below does not exercise, each with the
/// reason it must stay. Empty: every rule is used. A rule that no call needs is removed from
/// the role instead of being listed here.
const UNEXERCISED_BUT_NEEDED: &[(&str, &str, &str, &str)] = &[];

/// Non-resource paths the driver may request. They need no rule of ours: the default
/// `system:public-info-viewer` ClusterRole allows them to everyone.
const NON_RESOURCE_PATHS: &[(&str, &str)] = &[(
    "/version",
    "`--kubernetes on` checks at start that the API server answers",
)];

/// Flags the tests replace with local values when they run a manifest's driver container.
const LOCAL_FLAGS: &[&str] = &[
    "endpoint",        // a socket in a temporary directory
    "node-id",         // n1
    "file-root",       // a temporary directory
    "metrics-address", // 127.0.0.1, an ephemeral port
    "node-state-dir",  // a temporary directory
    // The reconcilers' periods, shortened so their passes happen while the test runs.
    "stale-attachment-interval",
    "orphan-interval",
    "orphan-grace",
];

/// The reconcilers' periods for a local run of the manifest's driver container.
const SHORT_RECONCILER_FLAGS: &[&str] = &[
    "--stale-attachment-interval=1s",
    "--orphan-interval=1s",
    "--orphan-grace=1s",
];

// ---- Reading the manifests ----------------------------------------------------------------

fn path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read_yaml(file: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// The objects a kustomization lists under `resources` (files; the base and the examples have
/// no nested kustomizations).
struct Manifests(Vec<Value>);

impl Manifests {
    fn load(dir: &str) -> Manifests {
        let dir = path(dir);
        let kustomization = read_yaml(&dir.join("kustomization.yaml")).remove(0);
        let objects = strings(&kustomization["resources"])
            .iter()
            .flat_map(|file| read_yaml(&dir.join(file)))
            .collect();
        Manifests(objects)
    }

    fn base() -> Manifests {
        Manifests::load("deploy/kubernetes")
    }

    fn of_kind<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a Value> + 'a {
        let kind = kind.to_string();
        self.0.iter().filter(move |o| o["kind"] == kind.as_str())
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.of_kind(kind)
            .find(|o| o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.of_kind(kind).find(|o| o["metadata"]["name"] == name)
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn containers(workload: &Value) -> &Vec<Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    containers(workload)
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {}", workload["metadata"]["name"]))
}

/// A container's `--flag[=value]` arguments, by flag name (the manifests write each as one
/// argument).
fn flags(container: &Value) -> BTreeMap<String, Option<String>> {
    strings(&container["args"])
        .iter()
        .map(|arg| {
            let flag = arg
                .strip_prefix("--")
                .unwrap_or_else(|| panic!("argument {arg:?} is not --flag[=value]"));
            match flag.split_once('=') {
                Some((f, v)) => (f.to_string(), Some(v.to_string())),
                None => (flag.to_string(), None),
            }
        })
        .collect()
}

fn flag(container: &Value, name: &str) -> String {
    flags(container)
        .remove(name)
        .flatten()
        .unwrap_or_else(|| panic!("{} has no --{name}=", container["name"]))
}

/// The driver container's arguments for a local run: as in the manifest, split into separate
/// words, without the flags the test harness sets itself and without `skip`.
fn local_args(container: &Value, skip: &[&str]) -> Vec<String> {
    flags(container)
        .into_iter()
        .filter(|(f, _)| !LOCAL_FLAGS.contains(&f.as_str()) && !skip.contains(&f.as_str()))
        .flat_map(|(f, v)| std::iter::once(format!("--{f}")).chain(v))
        .collect()
}

/// The environment the kubelet gives a container from the downward API's `metadata.namespace`,
/// for a local run in namespace `namespace`. Other `valueFrom` sources are not emulated.
fn downward_env(container: &Value, namespace: &str) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace")
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                namespace.to_string(),
            )
        })
        .collect()
}

/// One (apiGroup, resource[/subresource], verb) a role grants or a call needs.
type Access = (String, String, String);

fn grants(role: &Value) -> BTreeSet<Access> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert!(
            rule.get("resourceNames").is_none(),
            "{}: resourceNames would need a reason here",
            role["metadata"]["name"]
        );
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    out.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    out
}

fn show(a: &Access) -> String {
    let group = if a.0.is_empty() { "core" } else { &a.0 };
    format!("{} {} ({group})", a.2, a.1)
}

// ---- 1. The driver's ClusterRole covers every API call it makes ---------------------------

/// What the deployment tests read back from the cluster.
impl Cluster {
    fn event_reasons(&self) -> BTreeSet<String> {
        self.api
            .list("events", Some("default"))
            .iter()
            .filter_map(|e| e["reason"].as_str().map(String::from))
            .collect()
    }

    fn annotation(&self, pv: &str) -> Value {
        self.api.get("persistentvolumes", None, pv).unwrap()["metadata"]["annotations"]
            [format!("{DRIVER}/attached-node")]
        .clone()
    }
}

/// Runs the controller's driver container, with the manifest's flags (leader election on, both
/// reconcilers on, with their periods shortened) and the namespace the downward API would give
/// it, against the fake API server through every path that calls the API: following the
/// csi-attacher's leader Lease (list, watch, and the live read that confirms a takeover), boot
/// seeding, a publish (annotation and event), a refused publish (live checks of the holder's
/// Node and VolumeAttachment), a deleted holder node (the stale-attachment reconciler and
/// self-heal), an unpublish, an orphan volume reported, and, once the Lease moved away, a
/// DeleteVolume answered by the standby from a live list of VolumeAttachments. Then every call
/// must be allowed by the driver's ClusterRole or, for the Lease, its Role in the controller's
/// namespace, and every rule of those roles must have been used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_cluster_role_allows_exactly_the_calls_the_driver_makes() {
    let base = Manifests::base();
    let driver = container(base.get("Deployment", CONTROLLER), DRIVER_CONTAINER);
    assert_eq!(flag(driver, "kubernetes"), "on");
    assert!(
        flags(driver).contains_key("leader-election"),
        "the manifest runs the controller with leader election"
    );
    assert!(
        !flags(driver).contains_key("orphan-delete"),
        "orphans are reported, never deleted, unless an operator asks"
    );
    let mut args = local_args(driver, &["kubernetes"]);
    args.extend(SHORT_RECONCILER_FLAGS.iter().map(|f| f.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = downward_env(driver, NAMESPACE);
    assert!(
        env.iter().any(|(name, _)| name == "POD_NAMESPACE"),
        "the driver learns its namespace (where the Lease is) from POD_NAMESPACE: {env:?}"
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();

    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    c.pv("pv-a", "vol-a", false, None, json!({}));
    c.pv("pv-b", "vol-b", false, None, json!({}));
    let va_a_n1 = c.va("pv-a", "vol-a", "n1", true, MINUTE);
    // The csi-attacher of this pod holds the Lease; csi-lib-utils names the holder by the
    // hostname (the pod name), which is also the driver's default identity.
    let pod = gethostname::gethostname().into_string().unwrap();
    c.lease(&pod, 3600);
    let dir = tempfile::tempdir().unwrap();
    precreate(dir.path(), &["vol-a", "vol-b", "vol-orphan"]).await;
    let d = Driver::start_kube_in_env(dir, &c.kubeconfig, &args, &env).await;

    // The Lease names this pod: seeded from the VolumeAttachments, then active.
    d.wait_ready().await;
    assert_eq!(d.metric("rds_csi_leader_active").await, 1.0);
    assert_eq!(
        d.debug("vol-a").await["nodes"][0]["node"],
        "n1",
        "seeded from the VolumeAttachment"
    );
    eventually("the PV and Node watches", || async {
        c.api.count_calls("watch", "persistentvolumes") >= 1
            && c.api.count_calls("watch", "nodes") >= 1
    })
    .await;

    // A publish: the annotation and the VolumeAttached event follow.
    c.va("pv-b", "vol-b", "n2", false, MINUTE);
    d.publish("vol-b", "n2", rwo()).await.unwrap();
    eventually("pv-b annotated", || async { c.annotation("pv-b") == "n2" }).await;

    // A refused publish: n1 holds vol-a, and the live checks find its Node and VA standing.
    c.va("pv-a", "vol-a", "n2", false, MINUTE);
    let err = d.publish("vol-a", "n2", rwo()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    let gets: Vec<(String, Option<String>)> = c
        .api
        .calls_matching("get", "*")
        .into_iter()
        .map(|call| (call.resource, call.name))
        .collect();
    assert!(
        gets.contains(&("nodes".into(), Some("n1".into()))),
        "{gets:?}"
    );
    assert!(
        gets.contains(&("volumeattachments".into(), Some(va_a_n1))),
        "{gets:?}"
    );

    // n1's Node is deleted: its attachment is stale (the reconciler, or the next publish,
    // finds out), and n2 takes over.
    c.api.delete("nodes", None, "n1").unwrap();
    d.publish("vol-a", "n2", rwo())
        .await
        .expect("n1 is gone: its attachment is stale");

    // An unpublish clears the annotation.
    d.unpublish("vol-b", "n2").await.unwrap();
    eventually("pv-b's annotation cleared", || async {
        c.annotation("pv-b").is_null()
    })
    .await;
    eventually("every event posted", || async {
        let reasons = c.event_reasons();
        [
            "VolumeAttached",
            "AttachmentConflict",
            "StaleAttachmentCleared",
            "VolumeDetached",
        ]
        .iter()
        .all(|r| reasons.contains(*r))
    })
    .await;
    // Both reconcilers pass; vol-orphan, with no PV, is reported (dry run: kept).
    eventually("the reconcilers' passes, the orphan reported", || async {
        let m = d.scrape().await;
        sample(
            &m,
            r#"rds_csi_reconciler_runs_total{reconciler="stale_attachments",result="success"}"#,
        ) >= 1.0
            && sample(&m, "rds_csi_orphan_volumes") == 1.0
    })
    .await;

    // The Lease moves to the other pod: a standby answers DeleteVolume from a live list of
    // VolumeAttachments (vol-orphan has none).
    c.move_lease("rds-csi-controller-other");
    eventually("a standby", || async {
        d.ready().await && d.metric("rds_csi_leader_active").await == 0.0
    })
    .await;
    d.delete("vol-orphan").await.unwrap();
    assert!(!d.volume_ids().await.unwrap().contains(&"vol-orphan".into()));

    let calls = c.api.calls();
    let mut observed: BTreeMap<Access, usize> = BTreeMap::new();
    let mut non_resource = BTreeSet::new();
    for call in &calls {
        if call.resource.is_empty() {
            non_resource.insert(call.path.clone());
            continue;
        }
        if call.resource == "leases" {
            assert_eq!(
                call.namespace.as_deref(),
                Some(NAMESPACE),
                "the Lease is in the controller's namespace: {}",
                call.path
            );
        }
        let resource = match &call.subresource {
            Some(sub) => format!("{}/{sub}", call.resource),
            None => call.resource.clone(),
        };
        *observed
            .entry((call.group.clone(), resource, call.verb.clone()))
            .or_default() += 1;
    }
    println!("API calls the driver made ({} in all):", calls.len());
    for (access, n) in &observed {
        println!("  {:>4} × {}", n, show(access));
    }
    for p in &non_resource {
        println!("  non-resource path {p}");
    }

    let cluster_wide = grants(base.get("ClusterRole", DRIVER_ROLE));
    let lease_role = grants(base.get("Role", DRIVER_LEASE_ROLE));
    assert!(
        lease_role.iter().all(|(_, r, _)| r == "leases"),
        "{DRIVER_LEASE_ROLE} is for the Lease only: {lease_role:?}"
    );
    let granted: BTreeSet<Access> = cluster_wide.union(&lease_role).cloned().collect();
    let denied: Vec<String> = observed
        .keys()
        .filter(|a| !granted.contains(*a))
        .map(show)
        .collect();
    assert!(
        denied.is_empty(),
        "calls {DRIVER_ROLE} and {DRIVER_LEASE_ROLE} do not allow: {denied:?}"
    );
    let allowed_paths: BTreeSet<String> = NON_RESOURCE_PATHS
        .iter()
        .map(|(p, _)| p.to_string())
        .collect();
    assert!(
        non_resource.is_subset(&allowed_paths),
        "non-resource paths with no reason given: {:?}",
        non_resource.difference(&allowed_paths).collect::<Vec<_>>()
    );

    let unexercised: BTreeSet<Access> = granted
        .iter()
        .filter(|a| !observed.contains_key(*a))
        .cloned()
        .collect();
    println!("rules of {DRIVER_ROLE} and {DRIVER_LEASE_ROLE} no call exercised:");
    if unexercised.is_empty() {
        println!("  none");
    }
    for (group, resource, verb, reason) in UNEXERCISED_BUT_NEEDED {
        println!(
            "  {}: {reason}",
            show(&(group.to_string(), resource.to_string(), verb.to_string()))
        );
    }
    let expected: BTreeSet<Access> = UNEXERCISED_BUT_NEEDED
        .iter()
        .map(|(g, r, v, _)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        unexercised.iter().map(show).collect::<Vec<_>>(),
        expected.iter().map(show).collect::<Vec<_>>(),
        "rules nothing used: remove them from the driver's roles, or list them with a reason"
    );
}

/// The node plugin's container, with the manifest's flags, makes no API call even with a
/// kubeconfig at hand: its ServiceAccount needs no binding and no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_plugin_makes_no_api_call() {
    let base = Manifests::base();
    let node = base.get("DaemonSet", NODE);
    let driver = container(node, DRIVER_CONTAINER);
    assert_eq!(flag(driver, "mode"), "node");
    let args = local_args(driver, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let c = Cluster::new(&["n1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let _child = Killed(Driver::spawn_with(
        dir.path(),
        &socket,
        &[],
        &args,
        Some(&c.kubeconfig),
    ));
    let channel = wait_for(&socket).await;
    let info = rds_csi::csi::node_client::NodeClient::new(channel)
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "n1");
    // Any call at start would come before the socket is served.
    let calls: Vec<String> = c.api.calls().iter().map(|c| c.path.clone()).collect();
    assert!(
        calls.is_empty(),
        "the node plugin called the API: {calls:?}"
    );

    assert_eq!(
        node["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
    let account = node["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    let bound: Vec<&Value> = base
        .0
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
        .filter(|b| {
            b["subjects"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["name"] == account)
        })
        .collect();
    assert!(bound.is_empty(), "{account} needs no binding: {bound:?}");
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---- 2. The driver flags in the manifests exist ------------------------------------------

/// Every `--flag` and `RDS_CSI_*` variable the manifests give the driver appears in
/// `rds-csi --help`, and every value of a flag with a fixed set of values is one of them.
#[test]
fn every_driver_flag_in_the_manifests_exists() {
    let help = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .expect("rds-csi --help");
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    // "--flag <VALUE>" starts an entry; its description follows on the next line.
    let mut entries: BTreeMap<String, String> = BTreeMap::new();
    let mut current = None;
    for line in help.lines() {
        let word = line.split_whitespace().next().unwrap_or("");
        if let Some(name) = word.strip_prefix("--") {
            current = Some(name.trim_end_matches(',').to_string());
            entries.insert(current.clone().unwrap(), String::new());
        } else if let Some(name) = &current {
            entries.get_mut(name).unwrap().push_str(line);
        }
    }

    let base = Manifests::base();
    let mut checked = 0;
    for workload in [
        base.get("Deployment", CONTROLLER),
        base.get("DaemonSet", NODE),
    ] {
        let driver = container(workload, DRIVER_CONTAINER);
        for (name, value) in flags(driver) {
            let entry = entries.get(&name).unwrap_or_else(|| {
                panic!(
                    "{}: --{name} is not in rds-csi --help",
                    workload["metadata"]["name"]
                )
            });
            if let (Some(value), Some(values)) = (&value, entry.split("[possible values: ").nth(1))
            {
                let values: Vec<&str> = values.split(']').next().unwrap().split(", ").collect();
                assert!(
                    values.contains(&value.as_str()),
                    "--{name}={value}: not one of {values:?}"
                );
            }
            checked += 1;
        }
        for env in driver["env"].as_array().into_iter().flatten() {
            let name = env["name"].as_str().unwrap();
            if name.starts_with("RDS_CSI_") {
                assert!(
                    help.contains(&format!("[env: {name}=]")),
                    "{name} is not in rds-csi --help"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} flags found");
}

// ---- 3. CSIDriver, RBAC shape, wiring ----------------------------------------------------

#[test]
fn the_csidriver_object_has_what_the_driver_needs() {
    let base = Manifests::base();
    let csidriver = base.get("CSIDriver", DRIVER);
    assert_eq!(csidriver["apiVersion"], "storage.k8s.io/v1");
    assert_eq!(csidriver["spec"]["attachRequired"], true);
    assert_eq!(csidriver["spec"]["podInfoOnMount"], true);
    assert_eq!(
        csidriver["spec"]["volumeLifecycleModes"],
        json!(["Persistent"])
    );
    for workload in [
        base.get("Deployment", CONTROLLER),
        base.get("DaemonSet", NODE),
    ] {
        assert_eq!(
            flag(container(workload, DRIVER_CONTAINER), "driver-name"),
            DRIVER
        );
    }
}

/// A manifest file left out of its kustomization would be validated by nothing and applied by
/// nobody.
#[test]
fn every_manifest_file_is_in_its_kustomization() {
    for dir in ["deploy/kubernetes", "deploy/examples"] {
        let kustomization = read_yaml(&path(dir).join("kustomization.yaml")).remove(0);
        let mut listed: BTreeSet<String> =
            strings(&kustomization["resources"]).into_iter().collect();
        for patch in kustomization["patches"].as_array().into_iter().flatten() {
            listed.extend(patch["path"].as_str().map(String::from));
        }
        for entry in std::fs::read_dir(path(dir)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".yaml") && name != "kustomization.yaml" {
                assert!(
                    listed.contains(&name),
                    "{dir}/{name} is not in its kustomization.yaml"
                );
            }
        }
    }
}

/// Every YAML document under deploy/ (base, overlays, examples).
fn every_deploy_object() -> Vec<(PathBuf, Value)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, Value)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "yaml") {
                out.extend(read_yaml(&p).into_iter().map(|v| (p.clone(), v)));
            }
        }
    }
    let mut out = Vec::new();
    walk(&path("deploy"), &mut out);
    out
}

#[test]
fn no_role_anywhere_uses_a_wildcard() {
    let mut roles = 0;
    for (file, o) in every_deploy_object() {
        if o["kind"] != "ClusterRole" && o["kind"] != "Role" {
            continue;
        }
        roles += 1;
        for rule in o["rules"].as_array().expect("rules") {
            for field in [
                "apiGroups",
                "resources",
                "verbs",
                "resourceNames",
                "nonResourceURLs",
            ] {
                assert!(
                    !strings(&rule[field]).iter().any(|s| s.contains('*')),
                    "{}: {} {} has a wildcard in {field}",
                    file.display(),
                    o["kind"],
                    o["metadata"]["name"]
                );
            }
        }
        assert!(
            o.get("aggregationRule").is_none(),
            "{}: aggregated roles grow behind our back",
            file.display()
        );
    }
    assert!(roles >= 5, "only {roles} roles found");
}

/// Bindings name roles and ServiceAccounts that exist; every role is bound; every namespaced
/// object already names the namespace (so these files mean what the rendered output means).
#[test]
fn rbac_objects_reference_each_other() {
    let base = Manifests::base();
    let namespaced = [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "DaemonSet",
        "Service",
        "ServiceMonitor",
        "PodDisruptionBudget",
    ];
    for o in &base.0 {
        let kind = o["kind"].as_str().unwrap();
        if namespaced.contains(&kind) {
            assert_eq!(
                o["metadata"]["namespace"], NAMESPACE,
                "{kind} {}",
                o["metadata"]["name"]
            );
        }
    }
    let mut bound = BTreeSet::new();
    for binding in base
        .of_kind("ClusterRoleBinding")
        .chain(base.of_kind("RoleBinding"))
    {
        let role = &binding["roleRef"];
        assert_eq!(role["apiGroup"], "rbac.authorization.k8s.io");
        let (kind, name) = (
            role["kind"].as_str().unwrap(),
            role["name"].as_str().unwrap(),
        );
        assert!(base.find(kind, name).is_some(), "{name}: no {kind} {name}");
        bound.insert((kind.to_string(), name.to_string()));
        for subject in binding["subjects"].as_array().unwrap() {
            assert_eq!(subject["kind"], "ServiceAccount");
            assert_eq!(subject["namespace"], NAMESPACE);
            base.get("ServiceAccount", subject["name"].as_str().unwrap());
        }
    }
    for role in base.of_kind("ClusterRole").chain(base.of_kind("Role")) {
        let key = (
            role["kind"].as_str().unwrap().to_string(),
            role["metadata"]["name"].as_str().unwrap().to_string(),
        );
        assert!(bound.contains(&key), "{key:?} is bound to nobody");
    }
    // The sidecars' leases: leader election needs the Role in the pod's namespace. The driver
    // only follows the csi-attacher's Lease: its own Role reads it and never writes.
    let controller = base.get("Deployment", CONTROLLER);
    let leases = grants(base.get("Role", "rds-csi-leader-election"));
    let follow: BTreeSet<Access> = ["get", "list", "watch"]
        .into_iter()
        .map(|v| ("coordination.k8s.io".into(), "leases".into(), v.into()))
        .collect();
    assert_eq!(grants(base.get("Role", DRIVER_LEASE_ROLE)), follow);
    for c in containers(controller) {
        if flags(c).contains_key("leader-election") && c["name"] != DRIVER_CONTAINER {
            for verb in ["get", "create", "update"] {
                assert!(
                    leases.contains(&("coordination.k8s.io".into(), "leases".into(), verb.into())),
                    "{}: leases {verb}",
                    c["name"]
                );
            }
        }
    }
}

/// Sockets, volumes, ports, probes, selectors and security settings line up.
#[test]
fn the_workloads_are_wired_together() {
    let base = Manifests::base();
    let controller = base.get("Deployment", CONTROLLER);
    let node = base.get("DaemonSet", NODE);

    for workload in [controller, node] {
        let pod = &workload["spec"]["template"];
        let name = &workload["metadata"]["name"];
        assert_eq!(workload["spec"]["selector"]["matchLabels"], {
            let labels = &pod["metadata"]["labels"];
            json!({"app.kubernetes.io/name": labels["app.kubernetes.io/name"], "app.kubernetes.io/component": labels["app.kubernetes.io/component"]})
        });
        base.get(
            "ServiceAccount",
            pod["spec"]["serviceAccountName"].as_str().unwrap(),
        );
        let volumes: BTreeMap<String, &Value> = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap().to_string(), v))
            .collect();
        // The driver's socket, and where each sidecar looks for it.
        let driver = container(workload, DRIVER_CONTAINER);
        let endpoint = flag(driver, "endpoint");
        let socket = endpoint.strip_prefix("unix://").expect("a unix endpoint");
        let socket_volume = |c: &Value, path: &str| -> String {
            let (dir, file) = path.rsplit_once('/').unwrap();
            let mount = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["mountPath"] == dir)
                .unwrap_or_else(|| panic!("{name}/{}: nothing mounted at {dir}", c["name"]));
            format!("{}/{file}", mount["name"].as_str().unwrap())
        };
        let driver_socket = socket_volume(driver, socket);
        for c in containers(workload) {
            for m in c["volumeMounts"].as_array().unwrap() {
                assert!(
                    volumes.contains_key(m["name"].as_str().unwrap()),
                    "{name}/{}: no volume {}",
                    c["name"],
                    m["name"]
                );
            }
            if let Some(Some(address)) = flags(c).get("csi-address") {
                assert_eq!(
                    socket_volume(c, address),
                    driver_socket,
                    "{name}/{}: --csi-address is not the driver's socket",
                    c["name"]
                );
            }
            let security = &c["securityContext"];
            if c["name"] != DRIVER_CONTAINER || workload == controller {
                assert_ne!(security["privileged"], true, "{name}/{}", c["name"]);
                assert_eq!(
                    security["allowPrivilegeEscalation"], false,
                    "{name}/{}",
                    c["name"]
                );
                assert_eq!(
                    security["capabilities"]["drop"],
                    json!(["ALL"]),
                    "{name}/{}",
                    c["name"]
                );
            }
            assert_eq!(
                security["readOnlyRootFilesystem"], true,
                "{name}/{}",
                c["name"]
            );
            assert!(
                c["resources"]["requests"].is_object(),
                "{name}/{}: requests",
                c["name"]
            );
        }
    }

    // Controller: two replicas on different nodes, one active (the csi-attacher's leader) and
    // one standby; a rollout or a drain takes down one at a time; non-root; probes on the
    // driver's own port.
    assert_eq!(controller["spec"]["replicas"], 2);
    assert_eq!(
        controller["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}})
    );
    let pod_labels = &controller["spec"]["template"]["metadata"]["labels"];
    let anti = &controller["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(anti.as_array().map(Vec::len), Some(1), "{anti}");
    assert_eq!(anti[0]["topologyKey"], "kubernetes.io/hostname");
    for (k, v) in anti[0]["labelSelector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&pod_labels[k], v, "anti-affinity selector {k}");
    }
    let budget = base.get("PodDisruptionBudget", CONTROLLER);
    assert_eq!(budget["apiVersion"], "policy/v1");
    assert_eq!(budget["metadata"]["namespace"], NAMESPACE);
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    assert_eq!(
        budget["spec"]["selector"]["matchLabels"],
        controller["spec"]["selector"]["matchLabels"]
    );
    let pod = &controller["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let driver = container(controller, DRIVER_CONTAINER);
    assert_eq!(flag(driver, "mode"), "controller");
    let metrics_port = flag(driver, "metrics-address")
        .rsplit_once(':')
        .unwrap()
        .1
        .parse::<u64>()
        .unwrap();
    let port = driver["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a metrics port");
    assert_eq!(port["containerPort"], metrics_port);
    assert_eq!(
        driver["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "metrics"})
    );
    assert_eq!(
        driver["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "metrics"})
    );
    let file_root = flag(driver, "file-root");
    assert!(
        driver["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == file_root),
        "--file-root {file_root} is not a mounted volume (the root filesystem is read-only)"
    );

    // Node: only the driver is privileged; it shares its mounts with the host.
    let driver = container(node, DRIVER_CONTAINER);
    assert_eq!(flag(driver, "mode"), "node");
    assert_eq!(driver["securityContext"]["privileged"], true);
    let env = &driver["env"][0];
    assert_eq!(env["name"], "RDS_CSI_NODE_ID");
    assert_eq!(env["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    let mounts = driver["volumeMounts"].as_array().unwrap();
    let kubelet = mounts
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/kubelet")
        .unwrap();
    assert_eq!(kubelet["mountPropagation"], "Bidirectional");
    for host in ["/dev", "/sys"] {
        assert!(mounts.iter().any(|m| m["mountPath"] == host), "{host}");
    }
    let volumes = node["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    let host_path = |name: &str| -> String {
        volumes.iter().find(|v| v["name"] == name).unwrap()["hostPath"]["path"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // The node only reads sysfs (loop devices' backing files, numbers and sizes).
    let sys = mounts.iter().find(|m| m["mountPath"] == "/sys").unwrap();
    assert_eq!(sys["readOnly"], true, "/sys");
    // The records of staged volumes outlive the pod: they are on a host directory.
    let state_dir = flag(driver, "node-state-dir");
    let state_mount = mounts
        .iter()
        .find(|m| {
            let dir = m["mountPath"].as_str().unwrap();
            state_dir == dir || state_dir.starts_with(&format!("{dir}/"))
        })
        .unwrap_or_else(|| panic!("--node-state-dir {state_dir} is not on a mounted volume"));
    let state_volume = volumes
        .iter()
        .find(|v| v["name"] == state_mount["name"])
        .unwrap();
    assert!(
        state_volume["hostPath"]["path"].is_string(),
        "--node-state-dir {state_dir} must be on a hostPath to survive restarts"
    );
    let registrar = container(node, "node-driver-registrar");
    assert_eq!(
        flag(registrar, "kubelet-registration-path"),
        format!("{}/csi.sock", host_path("socket-dir")),
        "the kubelet must find the socket the driver serves"
    );
    assert_eq!(
        host_path("socket-dir"),
        format!("/var/lib/kubelet/plugins/{DRIVER}")
    );
    assert_eq!(
        host_path("registration-dir"),
        "/var/lib/kubelet/plugins_registry"
    );

    // Metrics: the Service selects the controller pod; the ServiceMonitor selects the Service.
    let service = base.get("Service", "rds-csi-controller-metrics");
    let labels = &controller["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "Service selector {k}");
    }
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
    let monitor = base.get("ServiceMonitor", "rds-csi-controller");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &service["metadata"]["labels"][k], v,
            "ServiceMonitor selector {k}"
        );
    }
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service["spec"]["ports"][0]["name"]
    );
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
}

/// The sidecars in the controller pod are the ones the driver's capabilities call for:
/// csi-attacher with PUBLISH_UNPUBLISH_VOLUME (and attachRequired), csi-provisioner with
/// CREATE_DELETE_VOLUME, csi-resizer exactly with EXPAND_VOLUME (it exits at start against
/// a driver that cannot resize, and without it no PVC ever grows), and csi-snapshotter exactly
/// with CREATE_DELETE_SNAPSHOT (without it no VolumeSnapshot is ever taken; with it and no such
/// capability it would fail every one), with the provisioner's snapshot rules (restores) and a
/// VolumeSnapshotClass example alongside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecars_match_the_driver_capabilities() {
    let d = Driver::start(&[], &["--mode", "controller"]).await;
    let caps: BTreeSet<i32> = d
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
    let has = |rpc: Rpc| caps.contains(&(rpc as i32));

    let base = Manifests::base();
    let controller = base.get("Deployment", CONTROLLER);
    let sidecar = |image: &str| {
        containers(controller).iter().any(|c| {
            c["image"]
                .as_str()
                .unwrap()
                .starts_with(&format!("registry.k8s.io/sig-storage/{image}:"))
        })
    };
    assert_eq!(sidecar("csi-attacher"), has(Rpc::PublishUnpublishVolume));
    assert_eq!(
        base.get("CSIDriver", DRIVER)["spec"]["attachRequired"],
        has(Rpc::PublishUnpublishVolume)
    );
    assert_eq!(sidecar("csi-provisioner"), has(Rpc::CreateDeleteVolume));
    assert_eq!(
        sidecar("csi-resizer"),
        has(Rpc::ExpandVolume),
        "csi-resizer belongs in the base exactly when the driver advertises EXPAND_VOLUME"
    );
    assert_eq!(
        sidecar("csi-snapshotter"),
        has(Rpc::CreateDeleteSnapshot),
        "csi-snapshotter belongs in the base exactly when the driver advertises \
         CREATE_DELETE_SNAPSHOT"
    );
    assert!(sidecar("livenessprobe"));

    let examples = Manifests::load("deploy/examples");
    let classes: Vec<&Value> = examples.of_kind("VolumeSnapshotClass").collect();
    assert_eq!(
        !classes.is_empty(),
        has(Rpc::CreateDeleteSnapshot),
        "a VolumeSnapshotClass example exactly when snapshots are offered"
    );
    for class in classes {
        assert_eq!(class["apiVersion"], "snapshot.storage.k8s.io/v1");
        assert_eq!(class["driver"], DRIVER);
        assert_eq!(class["deletionPolicy"], "Delete");
    }
    // A restore reads the VolumeSnapshot and its content: the provisioner's role allows it
    // exactly when the driver can restore.
    let provisioner = grants(base.get("ClusterRole", "rds-csi-external-provisioner"));
    for (resource, verb) in [
        ("volumesnapshots", "get"),
        ("volumesnapshotcontents", "get"),
    ] {
        assert_eq!(
            provisioner.contains(&(
                "snapshot.storage.k8s.io".into(),
                resource.into(),
                verb.into()
            )),
            has(Rpc::CreateDeleteSnapshot),
            "csi-provisioner: {resource} {verb}"
        );
    }
    for class in examples.of_kind("StorageClass") {
        assert_eq!(
            class["allowVolumeExpansion"] == true,
            has(Rpc::ExpandVolume),
            "{}: allowVolumeExpansion",
            class["metadata"]["name"]
        );
    }

    // The resizer runs in the controller pod, on the same socket, with its role bound.
    let resizer = container(controller, "csi-resizer");
    assert_eq!(
        flag(resizer, "csi-address"),
        flag(container(controller, "csi-attacher"), "csi-address")
    );
    assert_eq!(
        format!("unix://{}", flag(resizer, "csi-address")),
        flag(container(controller, DRIVER_CONTAINER), "endpoint"),
        "csi-resizer talks to the driver's socket"
    );
    assert!(flags(resizer).contains_key("leader-election"));
    base.get("ClusterRole", "rds-csi-external-resizer");
    let binding = base
        .of_kind("ClusterRoleBinding")
        .find(|b| b["roleRef"]["name"] == "rds-csi-external-resizer")
        .expect("a ClusterRoleBinding of rds-csi-external-resizer");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["subjects"][0]["name"], CONTROLLER);
    assert_eq!(
        binding["subjects"][0]["name"],
        controller["spec"]["template"]["spec"]["serviceAccountName"]
    );

    // Likewise the snapshotter, with the rules its documentation lists for snapshots.
    let snapshotter = container(controller, "csi-snapshotter");
    assert_eq!(
        format!("unix://{}", flag(snapshotter, "csi-address")),
        flag(container(controller, DRIVER_CONTAINER), "endpoint"),
        "csi-snapshotter talks to the driver's socket"
    );
    assert!(
        flags(snapshotter).contains_key("leader-election"),
        "one snapshotter acts at a time"
    );
    let role = grants(base.get("ClusterRole", "rds-csi-external-snapshotter"));
    for (group, resource, verbs) in [
        (
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents",
            &["get", "list", "watch", "update", "patch"][..],
        ),
        (
            "snapshot.storage.k8s.io",
            "volumesnapshotcontents/status",
            &["update", "patch"][..],
        ),
        (
            "snapshot.storage.k8s.io",
            "volumesnapshotclasses",
            &["get", "list", "watch"][..],
        ),
        ("", "events", &["create", "patch"][..]),
    ] {
        for verb in verbs {
            assert!(
                role.contains(&(group.into(), resource.into(), verb.to_string())),
                "csi-snapshotter: {resource} {verb}"
            );
        }
    }
    let binding = base
        .of_kind("ClusterRoleBinding")
        .find(|b| b["roleRef"]["name"] == "rds-csi-external-snapshotter")
        .expect("a ClusterRoleBinding of rds-csi-external-snapshotter");
    assert_eq!(
        binding["subjects"][0]["name"],
        controller["spec"]["template"]["spec"]["serviceAccountName"]
    );
}

/// The examples use this driver, the migration class is RWX-ready, and the VM live-migrates on
/// the PVC.
#[test]
fn the_examples_use_the_driver_for_live_migration() {
    let examples = Manifests::load("deploy/examples");
    for class in examples.of_kind("StorageClass") {
        assert_eq!(class["provisioner"], DRIVER);
    }
    examples.get("StorageClass", "rds-csi-rwo");
    let rwx = examples.get("StorageClass", "rds-csi-rwx-block");
    let timeout: u64 = rwx["parameters"]["migrationTimeoutSeconds"]
        .as_str()
        .expect("StorageClass parameters are strings")
        .parse()
        .unwrap();
    assert!(
        (30..=3600).contains(&timeout),
        "{timeout} is clamped by the driver"
    );

    let pvc = examples.get("PersistentVolumeClaim", "vm-disk");
    assert_eq!(pvc["spec"]["storageClassName"], "rds-csi-rwx-block");
    assert_eq!(pvc["spec"]["accessModes"], json!(["ReadWriteMany"]));
    assert_eq!(pvc["spec"]["volumeMode"], "Block");

    let vm = examples.get("VirtualMachine", "vm-demo");
    assert_eq!(vm["apiVersion"], "kubevirt.io/v1");
    let spec = &vm["spec"]["template"]["spec"];
    assert_eq!(spec["evictionStrategy"], "LiveMigrate");
    assert!(spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["persistentVolumeClaim"]["claimName"] == "vm-disk"));
}

/// The image the manifests run is this crate's version, runs the binary as its entrypoint, and
/// is non-root by default as the controller pod expects.
#[test]
fn the_image_matches_the_manifests() {
    let kustomization = read_yaml(&path("deploy/kubernetes/kustomization.yaml")).remove(0);
    let image = &kustomization["images"][0];
    assert_eq!(image["name"], "rds-csi");
    assert_eq!(image["newTag"], env!("CARGO_PKG_VERSION"));
    let base = Manifests::base();
    for workload in [
        base.get("Deployment", CONTROLLER),
        base.get("DaemonSet", NODE),
    ] {
        let driver = container(workload, DRIVER_CONTAINER);
        assert_eq!(driver["image"], "rds-csi");
        assert!(
            driver.get("command").is_none(),
            "args go to the image's entrypoint"
        );
    }

    let dockerfile = std::fs::read_to_string(path("Dockerfile")).unwrap();
    let last = |directive: &str| {
        dockerfile
            .lines()
            .filter_map(|l| l.strip_prefix(directive))
            .next_back()
            .unwrap_or_else(|| panic!("no {directive} in the Dockerfile"))
            .trim()
            .to_string()
    };
    assert_eq!(last("ENTRYPOINT "), r#"["/usr/local/bin/rds-csi"]"#);
    let user = last("USER ");
    let pod = &base.get("Deployment", CONTROLLER)["spec"]["template"]["spec"];
    assert_eq!(
        user,
        format!("{0}:{0}", pod["securityContext"]["runAsUser"])
    );
    for tool in ["nvme-cli", "e2fsprogs", "xfsprogs", "util-linux"] {
        assert!(dockerfile.contains(tool), "the runtime image needs {tool}");
    }
    let ignored = std::fs::read_to_string(path(".dockerignore")).unwrap();
    for p in ["target/", "volumes/", ".git"] {
        assert!(ignored.lines().any(|l| l == p), ".dockerignore: {p}");
    }
}
