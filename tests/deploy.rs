//! The deployment manifests, held against the real binary. They come from one Helm chart
//! (deploy/helm/rds-csi): deploy/kubernetes is its render with the default values (the file
//! backend, HA), and deploy/helm/rendered holds its render with each values file in its `ci/`
//! (a Go-driver-style file unchanged, HA and snapshots on, HA and snapshots off), all written
//! by `.ci/render-manifests`, whose `--check` fails CI when they and the chart disagree. So the
//! tests read rendered YAML and need no Helm.
//!
//! The driver's roles allow every API call the driver makes and nothing it does not make (the
//! driver run with the flags of the base and of the Go-style values, the latter against the
//! fake RouterOS); every flag any render passes exists; the objects are wired together as
//! Kubernetes and an operator need them; the Go chart's values become the flags and the
//! StorageClass parameters README.md promises. `.ci/validate-manifests` checks every render
//! against the Kubernetes schemas.

#[path = "support/mod.rs"]
mod support;

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

#[path = "support/fake_rds.rs"]
mod fake_rds;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rds_csi::csi::controller_service_capability::rpc::Type as Rpc;
use rds_csi::csi::controller_service_capability::Type as CapType;
use rds_csi::csi::{ControllerGetCapabilitiesRequest, NodeGetInfoRequest};
use serde_json::{json, Value};
use tonic::Code;

use fake_rds::{client_keypair, Disk, FakeRds, FakeRdsConfig};
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
/// The chart, and its render with the values file a Go-driver user brings along.
const CHART: &str = "deploy/helm/rds-csi";
const GO_STYLE: &str = "go-driver";
/// Where the controller finds the RDS credentials (the Go chart's Secret keys).
const CREDENTIALS_DIR: &str = "/etc/rds-csi";

/// Rules of the driver's ClusterRole that the scenario below does not exercise, each with the
/// reason it must stay. A rule that no call needs is removed from the role instead of being
/// listed here.
const UNEXERCISED_BUT_NEEDED: &[(&str, &str, &str, &str)] = &[(
    "",
    "persistentvolumes",
    "get",
    "a PV a VolumeAttachment names that the PV projection has not seen yet is looked up live \
     (seeding, a standby's DeleteVolume); this scenario's PVs are all in the projection",
)];

/// Non-resource paths the driver may request. They need no rule of ours: the default
/// `system:public-info-viewer` ClusterRole allows them to everyone.
const NON_RESOURCE_PATHS: &[(&str, &str)] = &[(
    "/version",
    "`--kubernetes on` checks at start that the API server answers; seeding reads the API \
     server's clock from its Date header",
)];

/// Flags the tests replace with local values when they run a manifest's driver container.
const LOCAL_FLAGS: &[&str] = &[
    "endpoint",        // a socket in a temporary directory
    "node-id",         // n1
    "file-root",       // a temporary directory
    "metrics-address", // 127.0.0.1, an ephemeral port
    "debug-address",   // 127.0.0.1, an ephemeral port
    "node-state-dir",  // a temporary directory
    // The reconcilers' periods, shortened so their passes happen while the test runs.
    "stale-attachment-interval",
    "orphan-interval",
    "orphan-grace",
    // The fake RouterOS on loopback, its host key and a client key it accepts, in place of the
    // RDS and the Secret's files.
    "rds-address",
    "rds-key-file",
    "rds-host-key",
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
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// Where the driver keeps volumes, as a render's controller runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    File,
    Rds,
}

/// The objects of one render: the kustomize base (what its kustomization lists) or the chart
/// rendered with one of its CI values files.
struct Manifests {
    name: String,
    objects: Vec<Value>,
}

impl Manifests {
    /// The files a kustomization lists under `resources` (the base and the examples have no
    /// nested kustomizations).
    fn load(dir: &str) -> Manifests {
        let root = path(dir);
        let kustomization = read_yaml(&root.join("kustomization.yaml")).remove(0);
        let objects = strings(&kustomization["resources"])
            .iter()
            .flat_map(|file| read_yaml(&root.join(file)))
            .collect();
        Manifests {
            name: dir.to_string(),
            objects,
        }
    }

    fn base() -> Manifests {
        Manifests::load("deploy/kubernetes")
    }

    /// The chart rendered with `ci/<name>-values.yaml`.
    fn rendered(name: &str) -> Manifests {
        let file = format!("deploy/helm/rendered/{name}.yaml");
        Manifests {
            objects: read_yaml(&path(&file)),
            name: file,
        }
    }

    /// The base and every render of the chart's CI values files: every way the chart is
    /// deployed that CI knows of.
    fn all() -> Vec<Manifests> {
        let mut names: Vec<String> = std::fs::read_dir(path(&format!("{CHART}/ci")))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter_map(|f| f.strip_suffix("-values.yaml").map(String::from))
            .collect();
        names.sort();
        assert!(
            names.contains(&GO_STYLE.to_string()),
            "{CHART}/ci has no {GO_STYLE}-values.yaml"
        );
        std::iter::once(Manifests::base())
            .chain(names.iter().map(|n| Manifests::rendered(n)))
            .collect()
    }

    fn of_kind<'a>(&'a self, kind: &str) -> impl Iterator<Item = &'a Value> + 'a {
        let kind = kind.to_string();
        self.objects
            .iter()
            .filter(move |o| o["kind"] == kind.as_str())
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.of_kind(kind)
            .find(|o| o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.name))
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.of_kind(kind).find(|o| o["metadata"]["name"] == name)
    }

    fn controller(&self) -> &Value {
        self.get("Deployment", CONTROLLER)
    }

    fn node(&self) -> &Value {
        self.get("DaemonSet", NODE)
    }

    fn backend(&self) -> Backend {
        match flag(container(self.controller(), DRIVER_CONTAINER), "backend").as_str() {
            "file" => Backend::File,
            "rds" => Backend::Rds,
            other => panic!("{}: --backend={other}", self.name),
        }
    }

    fn replicas(&self) -> u64 {
        self.controller()["spec"]["replicas"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: replicas", self.name))
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

fn find_container<'a>(workload: &'a Value, name: &str) -> Option<&'a Value> {
    containers(workload).iter().find(|c| c["name"] == name)
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    find_container(workload, name)
        .unwrap_or_else(|| panic!("no container {name} in {}", workload["metadata"]["name"]))
}

/// A container's `--flag[=value]` arguments, by flag name (the manifests write each as one
/// argument; a flag given twice keeps its last value, as the programs read it).
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

/// The environment the kubelet gives a container, for a local run in namespace `namespace`:
/// literal values, and `metadata.namespace` from the downward API. Other `valueFrom` sources
/// are not emulated (the harness sets the node id).
fn container_env(container: &Value, namespace: &str) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            if let Some(value) = e["value"].as_str() {
                Some((name, value.to_string()))
            } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace" {
                Some((name, namespace.to_string()))
            } else {
                None
            }
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

/// `rds-csi --help`: each flag's entry (the description lines after `--flag <VALUE>`), by name.
fn help_entries() -> (String, BTreeMap<String, String>) {
    let help = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .expect("rds-csi --help");
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
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
    (help, entries)
}

// ---- 1. The driver's roles cover every API call it makes ----------------------------------

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

/// The volumes of the scenario: two with PVs, one orphan. RDS volume ids are slots, as the
/// csi-provisioner names them.
struct Volumes {
    a: &'static str,
    b: &'static str,
    orphan: &'static str,
}

const FILE_VOLUMES: Volumes = Volumes {
    a: "vol-a",
    b: "vol-b",
    orphan: "vol-orphan",
};

const RDS_VOLUMES: Volumes = Volumes {
    a: "pvc-0a0a0a0a-0000-4000-8000-00000000000a",
    b: "pvc-0b0b0b0b-0000-4000-8000-00000000000b",
    orphan: "pvc-0c0c0c0c-0000-4000-8000-00000000000c",
};

/// The storage a render's controller runs against locally, holding the scenario's volumes:
/// files in the driver's own directory, or a fake RouterOS whose only user is the render's
/// `--rds-user` and whose disks are laid out as the Go driver makes them, under the render's
/// `--rds-volume-path` with NQNs under its `--rds-nqn-prefix`.
struct Storage {
    volumes: Volumes,
    /// The flags standing in for the RDS's address and the Secret's files.
    args: Vec<String>,
    rds: Option<(FakeRds, tempfile::TempDir)>,
}

impl Storage {
    /// `dir` is the driver's directory (the file backend's volumes go under it).
    async fn prepare(m: &Manifests, driver: &Value, dir: &Path) -> Storage {
        match m.backend() {
            Backend::File => {
                let v = FILE_VOLUMES;
                precreate(dir, &[v.a, v.b, v.orphan]).await;
                Storage {
                    volumes: v,
                    args: vec![],
                    rds: None,
                }
            }
            Backend::Rds => {
                let keys = tempfile::tempdir().unwrap();
                let (key, public) = client_keypair(keys.path());
                let fake = FakeRds::start(FakeRdsConfig {
                    user: flag(driver, "rds-user"),
                    ..FakeRdsConfig::new(public)
                })
                .await;
                let v = RDS_VOLUMES;
                let path = flag(driver, "rds-volume-path");
                let prefix = flag(driver, "rds-nqn-prefix");
                let port: u16 = flag(driver, "rds-nvme-port").parse().unwrap();
                for id in [v.a, v.b, v.orphan] {
                    fake.add_disk(Disk {
                        file_path: format!("{path}/{id}.img"),
                        nvme_tcp_server_port: port,
                        nvme_tcp_server_nqn: format!("{prefix}:{id}"),
                        ..Disk::volume(id, 1 << 30)
                    })
                    .unwrap();
                }
                let mut args = vec![
                    format!("--rds-address={}", fake.address()),
                    format!("--rds-key-file={}", key.display()),
                ];
                if !flags(driver).contains_key("rds-insecure-skip-verify") {
                    let host_key = fake.write_host_key(keys.path());
                    args.push(format!("--rds-host-key={}", host_key.display()));
                }
                Storage {
                    volumes: v,
                    args,
                    rds: Some((fake, keys)),
                }
            }
        }
    }
}

/// Runs the controller's driver container of `m`, with its flags (leader election on, both
/// reconcilers on, with their periods shortened), the literal environment it sets and the
/// namespace the downward API would give it, against the fake API server (and, for the RDS
/// backend, the fake RouterOS) through every path that calls the API: following the
/// csi-attacher's leader Lease (list, watch, and the live read that confirms a takeover), boot
/// seeding, a publish (annotation and event), a refused publish (live checks of the holder's
/// Node and VolumeAttachment), a deleted holder node (the stale-attachment reconciler and
/// self-heal), an unpublish, an orphan volume reported, and, once the Lease moved away, a
/// DeleteVolume answered by the standby from a live list of VolumeAttachments. Then every call
/// must be allowed by the driver's ClusterRole or, for the Lease, its Role in the controller's
/// namespace, and every rule of those roles must have been used.
async fn driver_roles_allow_exactly_the_calls_it_makes(m: &Manifests) {
    let driver = container(m.controller(), DRIVER_CONTAINER);
    assert_eq!(flag(driver, "kubernetes"), "on");
    assert!(
        flags(driver).contains_key("leader-election"),
        "{}: the controller runs with leader election",
        m.name
    );
    assert!(
        !flags(driver).contains_key("orphan-delete"),
        "{}: orphans are reported, never deleted, unless an operator asks",
        m.name
    );
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::prepare(m, driver, dir.path()).await;
    let v = &storage.volumes;
    let mut args = local_args(driver, &["kubernetes"]);
    args.extend(SHORT_RECONCILER_FLAGS.iter().map(|f| f.to_string()));
    args.extend(storage.args.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env = container_env(driver, NAMESPACE);
    assert!(
        env.iter().any(|(name, _)| name == "POD_NAMESPACE"),
        "the driver learns its namespace (where the Lease is) from POD_NAMESPACE: {env:?}"
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();

    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    c.pv("pv-a", v.a, false, None, json!({}));
    c.pv("pv-b", v.b, false, None, json!({}));
    let va_a_n1 = c.va("pv-a", v.a, "n1", true, MINUTE);
    // The csi-attacher of this pod holds the Lease; csi-lib-utils names the holder by the
    // hostname (the pod name), which is also the driver's default identity.
    let pod = gethostname::gethostname().into_string().unwrap();
    c.lease(&pod, 3600);
    let d = Driver::start_kube_in_env(dir, &c.kubeconfig, &args, &env).await;

    // The Lease names this pod: seeded from the VolumeAttachments, then active.
    d.wait_ready().await;
    assert_eq!(d.metric("rds_csi_leader_active").await, 1.0);
    assert_eq!(
        d.debug(v.a).await["nodes"][0]["node"],
        "n1",
        "seeded from the VolumeAttachment"
    );
    eventually("the PV and Node watches", || async {
        c.api.count_calls("watch", "persistentvolumes") >= 1
            && c.api.count_calls("watch", "nodes") >= 1
    })
    .await;

    // A publish: the annotation and the VolumeAttached event follow.
    c.va("pv-b", v.b, "n2", false, MINUTE);
    d.publish(v.b, "n2", rwo()).await.unwrap();
    eventually("pv-b annotated", || async { c.annotation("pv-b") == "n2" }).await;

    // A refused publish: n1 holds volume a, and the live checks find its Node and VA standing.
    c.va("pv-a", v.a, "n2", false, MINUTE);
    let err = d.publish(v.a, "n2", rwo()).await.unwrap_err();
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
    d.publish(v.a, "n2", rwo())
        .await
        .expect("n1 is gone: its attachment is stale");

    // An unpublish clears the annotation.
    d.unpublish(v.b, "n2").await.unwrap();
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
    // Both reconcilers pass; the orphan, with no PV, is reported (dry run: kept).
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
    // VolumeAttachments (the orphan has none).
    c.move_lease("rds-csi-controller-other");
    eventually("a standby", || async {
        d.ready().await && d.metric("rds_csi_leader_active").await == 0.0
    })
    .await;
    d.delete(v.orphan).await.unwrap();
    assert!(!d.volume_ids().await.unwrap().contains(&v.orphan.into()));
    if let Some((rds, _)) = &storage.rds {
        assert!(
            !rds.commands_matching(&format!("/disk remove [find slot={}]", v.orphan))
                .is_empty(),
            "{}: the volumes are the RDS's: {:?}",
            m.name,
            rds.commands()
        );
    }

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
    println!(
        "{}: API calls the driver made ({} in all):",
        m.name,
        calls.len()
    );
    for (access, n) in &observed {
        println!("  {:>4} × {}", n, show(access));
    }
    for p in &non_resource {
        println!("  non-resource path {p}");
    }

    let cluster_wide = grants(m.get("ClusterRole", DRIVER_ROLE));
    let lease_role = grants(m.get("Role", DRIVER_LEASE_ROLE));
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
        "{}: calls {DRIVER_ROLE} and {DRIVER_LEASE_ROLE} do not allow: {denied:?}",
        m.name
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
        "{}: rules nothing used: remove them from the driver's roles, or list them with a reason",
        m.name
    );
}

/// The kustomize base (the chart's defaults): the file backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_cluster_role_allows_exactly_the_calls_the_driver_makes() {
    driver_roles_allow_exactly_the_calls_it_makes(&Manifests::base()).await;
}

/// The chart with a Go-driver user's values file: the RDS backend, against the fake RouterOS,
/// with every flag the chart renders from the Go chart's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_go_style_values_the_driver_roles_allow_exactly_the_calls_the_driver_makes() {
    let m = Manifests::rendered(GO_STYLE);
    assert_eq!(m.backend(), Backend::Rds);
    driver_roles_allow_exactly_the_calls_it_makes(&m).await;
}

/// The scenario above runs two renders; the driver's roles are the same in every one, so it
/// covers them all.
#[test]
fn the_driver_roles_are_the_same_in_every_render() {
    let base = Manifests::base();
    for m in Manifests::all() {
        for (kind, name) in [("ClusterRole", DRIVER_ROLE), ("Role", DRIVER_LEASE_ROLE)] {
            assert_eq!(
                grants(m.get(kind, name)),
                grants(base.get(kind, name)),
                "{}: {kind} {name}",
                m.name
            );
        }
    }
}

/// The node plugin's container, with each render's flags, makes no API call even with a
/// kubeconfig at hand: its ServiceAccount needs no binding and no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_plugin_makes_no_api_call() {
    for m in Manifests::all() {
        let node = m.node();
        let driver = container(node, DRIVER_CONTAINER);
        assert_eq!(flag(driver, "mode"), "node");
        let args = local_args(driver, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();

        let c = Cluster::new(&["n1"]).await;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("csi.sock");
        // The RDS node plugin needs a host NQN (the chart mounts the host's /etc/nvme).
        let hostnqn = dir.path().join("hostnqn");
        std::fs::write(&hostnqn, "nqn.2014-08.org.nvmexpress:uuid:deploy-test\n").unwrap();
        let _child = Killed(Driver::spawn_with_env(
            dir.path(),
            &socket,
            &[],
            &args,
            Some(&c.kubeconfig),
            &[("RDS_CSI_NVME_HOST_NQN_FILE", hostnqn.to_str().unwrap())],
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
            "{}: the node plugin called the API: {calls:?}",
            m.name
        );

        assert_eq!(
            node["spec"]["template"]["spec"]["automountServiceAccountToken"],
            false
        );
        let account = node["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap();
        let bound: Vec<&Value> = m
            .objects
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

/// Every `--flag` and `RDS_CSI_*` variable any render gives the driver appears in
/// `rds-csi --help`, and every value of a flag with a fixed set of values is one of them.
#[test]
fn every_driver_flag_in_the_manifests_exists() {
    let (help, entries) = help_entries();
    let mut checked = BTreeSet::new();
    for m in Manifests::all() {
        for workload in [m.controller(), m.node()] {
            let driver = container(workload, DRIVER_CONTAINER);
            for (name, value) in flags(driver) {
                let entry = entries.get(&name).unwrap_or_else(|| {
                    panic!(
                        "{}: {}: --{name} is not in rds-csi --help",
                        m.name, workload["metadata"]["name"]
                    )
                });
                if let (Some(value), Some(values)) =
                    (&value, entry.split("[possible values: ").nth(1))
                {
                    let values: Vec<&str> = values.split(']').next().unwrap().split(", ").collect();
                    assert!(
                        values.contains(&value.as_str()),
                        "{}: --{name}={value}: not one of {values:?}",
                        m.name
                    );
                }
                checked.insert(name);
            }
            for env in driver["env"].as_array().into_iter().flatten() {
                let name = env["name"].as_str().unwrap();
                if name.starts_with("RDS_CSI_") {
                    assert!(
                        help.contains(&format!("[env: {name}=]")),
                        "{name} is not in rds-csi --help"
                    );
                    checked.insert(name.to_string());
                }
            }
        }
    }
    // The renders cover both backends' flags.
    for f in [
        "file-root",
        "rds-address",
        "rds-user",
        "rds-key-file",
        "rds-host-key",
        "rds-insecure-skip-verify",
        "rds-nvme-address",
        "rds-nvme-port",
        "rds-volume-path",
        "rds-nqn-prefix",
        "orphan-delete",
        "attachment-grace-period",
    ] {
        assert!(checked.contains(f), "no render passes --{f}");
    }
}

// ---- 3. CSIDriver, RBAC shape, wiring ----------------------------------------------------

#[test]
fn the_csidriver_object_has_what_the_driver_needs() {
    for m in Manifests::all() {
        let csidriver = m.get("CSIDriver", DRIVER);
        assert_eq!(csidriver["apiVersion"], "storage.k8s.io/v1");
        assert_eq!(csidriver["spec"]["attachRequired"], true);
        assert_eq!(csidriver["spec"]["podInfoOnMount"], true);
        assert_eq!(
            csidriver["spec"]["volumeLifecycleModes"],
            json!(["Persistent"])
        );
        for workload in [m.controller(), m.node()] {
            assert_eq!(
                flag(container(workload, DRIVER_CONTAINER), "driver-name"),
                DRIVER
            );
        }
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

/// Every YAML document under deploy/ (base, overlays, examples, the chart's values files and
/// its renders), except the chart's templates, which are not YAML until rendered.
fn every_deploy_object() -> Vec<(PathBuf, Value)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, Value)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "templates") {
                    walk(&p, out);
                }
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
    let mut rendered = 0;
    for (file, o) in every_deploy_object() {
        if o["kind"] != "ClusterRole" && o["kind"] != "Role" {
            continue;
        }
        roles += 1;
        if file.starts_with(path("deploy/helm/rendered")) {
            rendered += 1;
        }
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
    assert!(
        rendered >= 5,
        "only {rendered} roles in the chart's renders"
    );
}

/// Bindings name roles and ServiceAccounts that exist; every role is bound; every namespaced
/// object already names the namespace (so these files mean what the rendered output means).
#[test]
fn rbac_objects_reference_each_other() {
    for m in Manifests::all() {
        rbac_references(&m);
    }
}

fn rbac_references(m: &Manifests) {
    let namespaced = [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "DaemonSet",
        "Service",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "PodDisruptionBudget",
    ];
    for o in &m.objects {
        let kind = o["kind"].as_str().unwrap();
        if namespaced.contains(&kind) {
            assert_eq!(
                o["metadata"]["namespace"], NAMESPACE,
                "{}: {kind} {}",
                m.name, o["metadata"]["name"]
            );
        }
    }
    let mut bound = BTreeSet::new();
    for binding in m
        .of_kind("ClusterRoleBinding")
        .chain(m.of_kind("RoleBinding"))
    {
        let role = &binding["roleRef"];
        assert_eq!(role["apiGroup"], "rbac.authorization.k8s.io");
        let (kind, name) = (
            role["kind"].as_str().unwrap(),
            role["name"].as_str().unwrap(),
        );
        assert!(
            m.find(kind, name).is_some(),
            "{}: {name}: no {kind} {name}",
            m.name
        );
        bound.insert((kind.to_string(), name.to_string()));
        for subject in binding["subjects"].as_array().unwrap() {
            assert_eq!(subject["kind"], "ServiceAccount");
            assert_eq!(subject["namespace"], NAMESPACE);
            m.get("ServiceAccount", subject["name"].as_str().unwrap());
        }
    }
    for role in m.of_kind("ClusterRole").chain(m.of_kind("Role")) {
        let key = (
            role["kind"].as_str().unwrap().to_string(),
            role["metadata"]["name"].as_str().unwrap().to_string(),
        );
        assert!(
            bound.contains(&key),
            "{}: {key:?} is bound to nobody",
            m.name
        );
    }
    // The sidecars' leases: leader election needs the Role in the pod's namespace. The driver
    // only follows the csi-attacher's Lease: its own Role reads it and never writes.
    let leases = grants(m.get("Role", "rds-csi-leader-election"));
    let follow: BTreeSet<Access> = ["get", "list", "watch"]
        .into_iter()
        .map(|v| ("coordination.k8s.io".into(), "leases".into(), v.into()))
        .collect();
    assert_eq!(grants(m.get("Role", DRIVER_LEASE_ROLE)), follow);
    for c in containers(m.controller()) {
        if flags(c).contains_key("leader-election") && c["name"] != DRIVER_CONTAINER {
            for verb in ["get", "create", "update"] {
                assert!(
                    leases.contains(&("coordination.k8s.io".into(), "leases".into(), verb.into())),
                    "{}: {}: leases {verb}",
                    m.name,
                    c["name"]
                );
            }
        }
    }
}

/// Sockets, volumes, ports, probes, selectors and security settings line up, in every render.
#[test]
fn the_workloads_are_wired_together() {
    for m in Manifests::all() {
        workloads_wired(&m);
    }
}

fn volumes_by_name(workload: &Value) -> BTreeMap<String, &Value> {
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v))
        .collect()
}

/// The volume mounted in `c` at the directory holding `file`, and the file's name in it.
fn mount_of<'a>(c: &'a Value, file: &str) -> Option<(&'a Value, String)> {
    let (dir, name) = file.rsplit_once('/').unwrap();
    c["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["mountPath"] == dir)
        .map(|m| (m, name.to_string()))
}

fn workloads_wired(m: &Manifests) {
    let controller = m.controller();
    let node = m.node();
    let n = &m.name;

    for workload in [controller, node] {
        let pod = &workload["spec"]["template"];
        let name = &workload["metadata"]["name"];
        assert_eq!(workload["spec"]["selector"]["matchLabels"], {
            let labels = &pod["metadata"]["labels"];
            json!({"app.kubernetes.io/name": labels["app.kubernetes.io/name"], "app.kubernetes.io/component": labels["app.kubernetes.io/component"]})
        });
        m.get(
            "ServiceAccount",
            pod["spec"]["serviceAccountName"].as_str().unwrap(),
        );
        let volumes = volumes_by_name(workload);
        // The driver's socket, and where each sidecar looks for it.
        let driver = container(workload, DRIVER_CONTAINER);
        let endpoint = flag(driver, "endpoint");
        let socket = endpoint.strip_prefix("unix://").expect("a unix endpoint");
        let socket_volume = |c: &Value, path: &str| -> String {
            let (mount, file) = mount_of(c, path)
                .unwrap_or_else(|| panic!("{n}: {name}/{}: nothing mounted at {path}", c["name"]));
            format!("{}/{file}", mount["name"].as_str().unwrap())
        };
        let driver_socket = socket_volume(driver, socket);
        for c in containers(workload) {
            for mount in c["volumeMounts"].as_array().unwrap() {
                assert!(
                    volumes.contains_key(mount["name"].as_str().unwrap()),
                    "{n}: {name}/{}: no volume {}",
                    c["name"],
                    mount["name"]
                );
            }
            if let Some(Some(address)) = flags(c).get("csi-address") {
                assert_eq!(
                    socket_volume(c, address),
                    driver_socket,
                    "{n}: {name}/{}: --csi-address is not the driver's socket",
                    c["name"]
                );
            }
            let security = &c["securityContext"];
            if c["name"] != DRIVER_CONTAINER || workload == controller {
                assert_ne!(security["privileged"], true, "{n}: {name}/{}", c["name"]);
                assert_eq!(
                    security["allowPrivilegeEscalation"], false,
                    "{n}: {name}/{}",
                    c["name"]
                );
                assert_eq!(
                    security["capabilities"]["drop"],
                    json!(["ALL"]),
                    "{n}: {name}/{}",
                    c["name"]
                );
            }
            assert_eq!(
                security["readOnlyRootFilesystem"], true,
                "{n}: {name}/{}",
                c["name"]
            );
            assert!(
                c["resources"]["requests"].is_object(),
                "{n}: {name}/{}: requests",
                c["name"]
            );
        }
    }

    // Controller: with two replicas or more, on different nodes, one active (the csi-attacher's
    // leader) and the others standby, a rollout or a drain taking down one at a time; with
    // one, a new pod first (a Ready standby) and no PodDisruptionBudget. Non-root; probes on the
    // driver's own port; the driver follows the Lease either way.
    let pod_labels = &controller["spec"]["template"]["metadata"]["labels"];
    let anti = &controller["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        ["requiredDuringSchedulingIgnoredDuringExecution"];
    let budget = m.find("PodDisruptionBudget", CONTROLLER);
    if m.replicas() >= 2 {
        assert_eq!(
            controller["spec"]["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}),
            "{n}"
        );
        assert_eq!(anti.as_array().map(Vec::len), Some(1), "{n}: {anti}");
        assert_eq!(anti[0]["topologyKey"], "kubernetes.io/hostname");
        for (k, v) in anti[0]["labelSelector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&pod_labels[k], v, "{n}: anti-affinity selector {k}");
        }
        let budget = budget.unwrap_or_else(|| panic!("{n}: no PodDisruptionBudget"));
        assert_eq!(budget["apiVersion"], "policy/v1");
        assert_eq!(budget["metadata"]["namespace"], NAMESPACE);
        assert_eq!(budget["spec"]["maxUnavailable"], 1);
        assert_eq!(
            budget["spec"]["selector"]["matchLabels"],
            controller["spec"]["selector"]["matchLabels"]
        );
    } else {
        assert_eq!(m.replicas(), 1, "{n}");
        assert_eq!(
            controller["spec"]["strategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
            "{n}"
        );
        assert!(anti.is_null(), "{n}: one replica needs no anti-affinity");
        assert!(budget.is_none(), "{n}: a budget for one replica");
    }
    let pod = &controller["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let driver = container(controller, DRIVER_CONTAINER);
    assert_eq!(flag(driver, "mode"), "controller");
    assert!(flags(driver).contains_key("leader-election"), "{n}");
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
    let controller_volumes = volumes_by_name(controller);
    match m.backend() {
        Backend::File => {
            let file_root = flag(driver, "file-root");
            assert!(
                driver["volumeMounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|mount| mount["mountPath"] == file_root),
                "{n}: --file-root {file_root} is not a mounted volume (the root filesystem is read-only)"
            );
        }
        Backend::Rds => {
            // The SSH key and the host key are the Go chart's Secret keys, read-only, 0400.
            let mut secrets = BTreeSet::new();
            let mut wanted = vec![("rds-key-file", "rds-private-key")];
            if !flags(driver).contains_key("rds-insecure-skip-verify") {
                wanted.push(("rds-host-key", "rds-host-key"));
            }
            for (f, key) in wanted {
                let file = flag(driver, f);
                let (mount, name) = mount_of(driver, &file)
                    .unwrap_or_else(|| panic!("{n}: --{f} {file} is not on a mounted volume"));
                assert_eq!(name, key, "{n}: --{f}");
                assert_eq!(mount["mountPath"], CREDENTIALS_DIR);
                assert_eq!(
                    mount["readOnly"], true,
                    "{n}: the credentials are read-only"
                );
                let secret = &controller_volumes[mount["name"].as_str().unwrap()]["secret"];
                assert_eq!(secret["defaultMode"], 0o400, "{n}: {secret}");
                secrets.insert(secret["secretName"].as_str().unwrap().to_string());
            }
            assert_eq!(secrets.len(), 1, "{n}: one Secret: {secrets:?}");
            assert!(
                !flags(driver).contains_key("file-root"),
                "{n}: the RDS backend keeps no files in the pod"
            );
        }
    }

    // Node: only the driver is privileged; it shares its mounts with the host.
    let driver = container(node, DRIVER_CONTAINER);
    assert_eq!(flag(driver, "mode"), "node");
    assert_eq!(driver["securityContext"]["privileged"], true);
    let env = &driver["env"][0];
    assert_eq!(env["name"], "RDS_CSI_NODE_ID");
    assert_eq!(env["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    let mounts = driver["volumeMounts"].as_array().unwrap();
    let node_volumes = volumes_by_name(node);
    let host_path = |name: &str| -> String {
        node_volumes[name]["hostPath"]["path"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // The kubelet passes host paths: the kubelet's directory is mounted at its own path.
    let kubelet = host_path("kubelet-dir");
    let kubelet_mount = mounts
        .iter()
        .find(|mount| mount["name"] == "kubelet-dir")
        .unwrap();
    assert_eq!(kubelet_mount["mountPath"], kubelet.as_str(), "{n}");
    assert_eq!(kubelet_mount["mountPropagation"], "Bidirectional");
    for host in ["/dev", "/sys"] {
        assert!(
            mounts.iter().any(|mount| mount["mountPath"] == host),
            "{host}"
        );
    }
    let sys = mounts
        .iter()
        .find(|mount| mount["mountPath"] == "/sys")
        .unwrap();
    let host_network = &node["spec"]["template"]["spec"]["hostNetwork"];
    let host_pid = &node["spec"]["template"]["spec"]["hostPID"];
    match m.backend() {
        // The node only reads sysfs (loop devices' backing files, numbers and sizes).
        Backend::File => {
            assert_eq!(sys["readOnly"], true, "{n}: /sys");
            assert!(
                host_network.is_null(),
                "{n}: loop devices need no host network"
            );
            assert!(host_pid.is_null(), "{n}: loop devices need no host PIDs");
        }
        // `nvme disconnect` writes a controller's delete_controller in sysfs; an NVMe/TCP
        // connection is made in the caller's network namespace and must outlive the pod.
        Backend::Rds => {
            assert!(sys["readOnly"].is_null(), "{n}: /sys must be writable");
            assert_eq!(host_network, true, "{n}");
            // Before a disconnect the plugin looks for the device open in any process
            // (/proc/*/fd): a VM's qemu is in another pod.
            assert_eq!(host_pid, true, "{n}");
            assert!(flags(driver).contains_key("rds-nqn-prefix"), "{n}");
        }
    }
    // The records of staged volumes outlive the pod: they are on a host directory.
    let state_dir = flag(driver, "node-state-dir");
    let state_mount = mounts
        .iter()
        .find(|mount| {
            let dir = mount["mountPath"].as_str().unwrap();
            state_dir == dir || state_dir.starts_with(&format!("{dir}/"))
        })
        .unwrap_or_else(|| panic!("--node-state-dir {state_dir} is not on a mounted volume"));
    assert!(
        node_volumes[state_mount["name"].as_str().unwrap()]["hostPath"]["path"].is_string(),
        "--node-state-dir {state_dir} must be on a hostPath to survive restarts"
    );
    let registrar = container(node, "node-driver-registrar");
    assert_eq!(
        flag(registrar, "kubelet-registration-path"),
        format!("{}/csi.sock", host_path("socket-dir")),
        "{n}: the kubelet must find the socket the driver serves"
    );
    assert_eq!(
        host_path("socket-dir"),
        format!("{kubelet}/plugins/{DRIVER}")
    );
    assert_eq!(
        host_path("registration-dir"),
        format!("{kubelet}/plugins_registry")
    );
    // The node driver's liveness is the CSI Probe that livenessprobe serves.
    let probe_port = flag(container(node, "livenessprobe"), "http-endpoint");
    assert_eq!(
        format!(":{}", driver["livenessProbe"]["httpGet"]["port"]),
        probe_port,
        "{n}"
    );

    // Metrics: the Service selects the controller pod; the ServiceMonitor selects the Service.
    let Some(service) = m.find("Service", "rds-csi-controller-metrics") else {
        assert!(
            m.find("ServiceMonitor", "rds-csi-controller").is_none(),
            "{n}: a ServiceMonitor without its Service"
        );
        assert!(
            m.find("PodMonitor", "rds-csi-node").is_none(),
            "{n}: a PodMonitor with monitoring off"
        );
        return;
    };
    // The node plugins' metrics (mounts, stages, NVMe, stale mounts: the dashboard's node panels
    // and RdsCsiStaleMountRecoveriesFailing) are scraped from each node pod's metrics port by the
    // PodMonitor, in a job apart from the controller's.
    let pods = m.get("PodMonitor", "rds-csi-node");
    assert_eq!(pods["apiVersion"], "monitoring.coreos.com/v1", "{n}");
    let node_labels = &m.node()["spec"]["template"]["metadata"]["labels"];
    let controller_labels = &controller["spec"]["template"]["metadata"]["labels"];
    let selector = pods["spec"]["selector"]["matchLabels"].as_object().unwrap();
    for (k, v) in selector {
        assert_eq!(&node_labels[k], v, "{n}: PodMonitor selector {k}");
    }
    assert!(
        selector.iter().any(|(k, v)| &controller_labels[k] != v),
        "{n}: the PodMonitor also selects the controller pod"
    );
    let endpoint = &pods["spec"]["podMetricsEndpoints"][0];
    let node_driver = container(m.node(), DRIVER_CONTAINER);
    assert!(
        node_driver["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == endpoint["port"]),
        "{n}: the PodMonitor's port {} is no port of the node's driver container",
        endpoint["port"]
    );
    assert_eq!(endpoint["path"], "/metrics", "{n}");
    let labels = &controller["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "Service selector {k}");
    }
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
    let monitor = m.get("ServiceMonitor", "rds-csi-controller");
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

/// A render with alerts on carries every alert of the chart's rules file, each with a severity and
/// a runbook, under the labels its values give a Prometheus to select it by; the rules themselves
/// are `.ci/check-alerts`'s (promtool). At least one CI values file renders one.
#[test]
fn the_prometheus_rule_carries_the_rules_file() {
    let file = &read_yaml(&path(&format!("{CHART}/files/alerts.yaml")))[0];
    let alerts = |groups: &Value| -> Vec<String> {
        groups
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().iter())
            .map(|r| r["alert"].as_str().unwrap().to_string())
            .collect()
    };
    let want = alerts(&file["groups"]);
    let mut rendered = 0;
    for m in Manifests::all() {
        let Some(rule) = m.find("PrometheusRule", "rds-csi-alerts") else {
            continue;
        };
        rendered += 1;
        assert_eq!(alerts(&rule["spec"]["groups"]), want, "{}", m.name);
        let ci = m
            .name
            .strip_prefix("deploy/helm/rendered/")
            .and_then(|n| n.strip_suffix(".yaml"))
            .unwrap_or_else(|| panic!("{}: a PrometheusRule in the kustomize base", m.name));
        let values = &read_yaml(&path(&format!("{CHART}/ci/{ci}-values.yaml")))[0];
        let labels = values["monitoring"]["alerts"]["labels"].as_object();
        for (k, v) in labels.into_iter().flatten() {
            assert_eq!(&rule["metadata"]["labels"][k], v, "{}: label {k}", m.name);
        }
        for group in rule["spec"]["groups"].as_array().unwrap() {
            for r in group["rules"].as_array().unwrap() {
                let name = &r["alert"];
                assert!(r["labels"]["severity"].is_string(), "{}: {name}", m.name);
                assert!(
                    r["annotations"]["runbook_url"]
                        .as_str()
                        .is_some_and(|u| u.contains("README.md#")),
                    "{}: {name}",
                    m.name
                );
            }
        }
    }
    assert!(rendered > 0, "no CI values file renders the PrometheusRule");
}

/// The sidecars in the controller pod are the ones the driver's capabilities call for:
/// csi-attacher with PUBLISH_UNPUBLISH_VOLUME (and attachRequired), csi-provisioner with
/// CREATE_DELETE_VOLUME, csi-resizer exactly with EXPAND_VOLUME (it exits at start against
/// a driver that cannot resize, and without it no PVC ever grows), and csi-snapshotter exactly
/// with CREATE_DELETE_SNAPSHOT in the base (without it no VolumeSnapshot is ever taken; with
/// it and no such capability it would fail every one), with the provisioner's snapshot rules
/// (restores) and a VolumeSnapshotClass example alongside. A render may turn snapshots off
/// (sidecars.snapshotter.enabled false): then csi-snapshotter, its role, the provisioner's
/// snapshot rules and every VolumeSnapshotClass go together.
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
    let snapshots = |m: &Manifests| {
        containers(m.controller()).iter().any(|c| {
            c["image"]
                .as_str()
                .unwrap()
                .starts_with("registry.k8s.io/sig-storage/csi-snapshotter:")
        })
    };
    assert_eq!(
        snapshots(&base),
        has(Rpc::CreateDeleteSnapshot),
        "csi-snapshotter belongs in the base exactly when the driver advertises \
         CREATE_DELETE_SNAPSHOT"
    );
    let mut without_snapshots = 0;
    for m in Manifests::all() {
        sidecars_match(&m, &has, snapshots(&m));
        if !snapshots(&m) {
            without_snapshots += 1;
        }
    }
    assert!(
        without_snapshots >= 1,
        "no render turns snapshots off: the chart's switch is untested"
    );

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
    for class in examples.of_kind("StorageClass") {
        assert_eq!(
            class["allowVolumeExpansion"] == true,
            has(Rpc::ExpandVolume),
            "{}: allowVolumeExpansion",
            class["metadata"]["name"]
        );
    }
}

fn sidecars_match(m: &Manifests, has: &dyn Fn(Rpc) -> bool, snapshots: bool) {
    let n = &m.name;
    let controller = m.controller();
    let sidecar = |image: &str| {
        containers(controller).iter().any(|c| {
            c["image"]
                .as_str()
                .unwrap()
                .starts_with(&format!("registry.k8s.io/sig-storage/{image}:"))
        })
    };
    assert_eq!(
        sidecar("csi-attacher"),
        has(Rpc::PublishUnpublishVolume),
        "{n}"
    );
    assert_eq!(
        m.get("CSIDriver", DRIVER)["spec"]["attachRequired"],
        has(Rpc::PublishUnpublishVolume)
    );
    assert_eq!(
        sidecar("csi-provisioner"),
        has(Rpc::CreateDeleteVolume),
        "{n}"
    );
    assert_eq!(
        sidecar("csi-resizer"),
        has(Rpc::ExpandVolume),
        "{n}: csi-resizer belongs in the pod exactly when the driver advertises EXPAND_VOLUME"
    );
    assert!(sidecar("livenessprobe"), "{n}");
    if snapshots {
        assert!(
            has(Rpc::CreateDeleteSnapshot),
            "{n}: csi-snapshotter without snapshots"
        );
    }

    // A restore reads the VolumeSnapshot and its content: the provisioner's role allows it
    // exactly when snapshots are on, and the provisioner sweeps snapshot finalizers only then.
    let provisioner = grants(m.get("ClusterRole", "rds-csi-external-provisioner"));
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
            snapshots,
            "{n}: csi-provisioner: {resource} {verb}"
        );
    }
    assert_eq!(
        flags(container(controller, "csi-provisioner")).get("snapshot-orphan-sweep-interval"),
        (!snapshots).then(|| Some("0".to_string())).as_ref(),
        "{n}: without snapshot rules the provisioner must not sweep snapshot finalizers"
    );

    // The resizer runs in the controller pod, on the same socket, with its role bound.
    let driver = container(controller, DRIVER_CONTAINER);
    let resizer = container(controller, "csi-resizer");
    assert_eq!(
        flag(resizer, "csi-address"),
        flag(container(controller, "csi-attacher"), "csi-address")
    );
    assert_eq!(
        format!("unix://{}", flag(resizer, "csi-address")),
        flag(driver, "endpoint"),
        "csi-resizer talks to the driver's socket"
    );
    assert!(flags(resizer).contains_key("leader-election"));
    m.get("ClusterRole", "rds-csi-external-resizer");
    let binding = m
        .of_kind("ClusterRoleBinding")
        .find(|b| b["roleRef"]["name"] == "rds-csi-external-resizer")
        .expect("a ClusterRoleBinding of rds-csi-external-resizer");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["subjects"][0]["name"], CONTROLLER);
    assert_eq!(
        binding["subjects"][0]["name"],
        controller["spec"]["template"]["spec"]["serviceAccountName"]
    );

    // Likewise the snapshotter, with the rules its documentation lists for snapshots; or, with
    // snapshots off, none of it.
    let role = m.find("ClusterRole", "rds-csi-external-snapshotter");
    if !snapshots {
        assert!(role.is_none(), "{n}: the snapshotter's role without it");
        assert!(
            m.of_kind("VolumeSnapshotClass").next().is_none(),
            "{n}: a VolumeSnapshotClass without csi-snapshotter"
        );
        return;
    }
    let snapshotter = container(controller, "csi-snapshotter");
    assert_eq!(
        format!("unix://{}", flag(snapshotter, "csi-address")),
        flag(driver, "endpoint"),
        "csi-snapshotter talks to the driver's socket"
    );
    assert!(
        flags(snapshotter).contains_key("leader-election"),
        "one snapshotter acts at a time"
    );
    let role = grants(role.unwrap_or_else(|| panic!("{n}: no snapshotter role")));
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
                "{n}: csi-snapshotter: {resource} {verb}"
            );
        }
    }
    let binding = m
        .of_kind("ClusterRoleBinding")
        .find(|b| b["roleRef"]["name"] == "rds-csi-external-snapshotter")
        .expect("a ClusterRoleBinding of rds-csi-external-snapshotter");
    assert_eq!(
        binding["subjects"][0]["name"],
        controller["spec"]["template"]["spec"]["serviceAccountName"]
    );
    for class in m.of_kind("VolumeSnapshotClass") {
        assert_eq!(class["apiVersion"], "snapshot.storage.k8s.io/v1");
        assert_eq!(class["driver"], DRIVER);
    }
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

/// The chart's version and appVersion are this crate's; the image the base runs is this
/// crate's version, runs the binary as its entrypoint, and is non-root by default as the
/// controller pod expects.
#[test]
fn the_image_matches_the_manifests() {
    let chart = read_yaml(&path(&format!("{CHART}/Chart.yaml"))).remove(0);
    assert_eq!(chart["name"], "rds-csi");
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
    assert_eq!(chart["version"], env!("CARGO_PKG_VERSION"));
    let base = Manifests::base();
    for workload in [base.controller(), base.node()] {
        let driver = container(workload, DRIVER_CONTAINER);
        assert_eq!(
            driver["image"],
            format!("rds-csi:{}", env!("CARGO_PKG_VERSION"))
        );
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
    let pod = &base.controller()["spec"]["template"]["spec"];
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

// ---- 4. The Go chart's values ---------------------------------------------------------------

fn go_style_values() -> Value {
    read_yaml(&path(&format!("{CHART}/ci/{GO_STYLE}-values.yaml"))).remove(0)
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The Go chart's keys in a Go user's values file become the flags README.md's table promises.
#[test]
fn go_style_values_become_the_documented_flags() {
    let values = go_style_values();
    let m = Manifests::rendered(GO_STYLE);
    let rds = &values["rds"];
    let c = &values["controller"];
    let driver = container(m.controller(), DRIVER_CONTAINER);
    let f = flags(driver);
    let expect = |flag: &str, value: String| {
        assert_eq!(
            f.get(flag),
            Some(&Some(value.clone())),
            "--{flag} should be {value}"
        );
    };
    expect("backend", "rds".into());
    expect(
        "rds-address",
        format!("{}:{}", text(&rds["managementIP"]), text(&rds["sshPort"])),
    );
    expect("rds-user", text(&rds["sshUser"]));
    expect("rds-nvme-address", text(&rds["storageIP"]));
    expect("rds-nvme-port", text(&rds["nvmePort"]));
    expect("rds-volume-path", text(&rds["basePath"]));
    // "nqn.2000-02.com.mikrotik:pvc-" (the Go node's managed-NQN prefix) is the NQN's first
    // part followed by the volume id's "pvc-": this driver takes the first part.
    let go_prefix = text(&rds["nqnPrefix"]);
    let prefix = go_prefix
        .strip_suffix(":pvc-")
        .expect("the Go chart's form");
    expect("rds-nqn-prefix", prefix.into());
    assert_eq!(
        flag(container(m.node(), DRIVER_CONTAINER), "rds-nqn-prefix"),
        prefix
    );
    assert_eq!(prefix, fake_rds::GO_NQN_PREFIX, "the Go driver's NQNs");
    expect("rds-key-file", format!("{CREDENTIALS_DIR}/rds-private-key"));
    expect("rds-host-key", format!("{CREDENTIALS_DIR}/rds-host-key"));
    assert_eq!(rds["insecureSkipVerify"], false);
    assert!(!f.contains_key("rds-insecure-skip-verify"));
    let secret = m.controller()["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| v["secret"]["secretName"].as_str())
        .unwrap();
    assert_eq!(secret, text(&rds["secretName"]));

    expect(
        "stale-attachment-interval",
        text(&c["attachmentReconcileInterval"]),
    );
    expect(
        "orphan-interval",
        text(&c["orphanReconciler"]["checkInterval"]),
    );
    expect("orphan-grace", text(&c["orphanReconciler"]["gracePeriod"]));
    assert_eq!(c["orphanReconciler"]["dryRun"], true);
    assert!(!f.contains_key("orphan-delete"), "dryRun: report only");
    // 30s is the driver's default: not passed (the_chart_defaults_are_the_drivers holds them
    // equal).
    assert_eq!(c["attachmentGracePeriod"], "30s");
    assert!(!f.contains_key("attachment-grace-period"));
    // replicas 1: no standby, the driver still follows the Lease.
    assert_eq!(c["replicas"], 1);
    assert_eq!(m.replicas(), 1);
    assert!(f.contains_key("leader-election"));
    // logLevel 5 (klog's debug range): this driver's debug lines.
    assert_eq!(c["logLevel"], 5);
    let env = container_env(driver, NAMESPACE);
    assert!(
        env.contains(&("RUST_LOG".into(), "info,rds_csi=debug".into())),
        "{env:?}"
    );
    // The Go chart's sidecar arguments are appended; the later --timeout wins.
    let attacher = container(m.controller(), "csi-attacher");
    assert_eq!(flag(attacher, "timeout"), "300s");
    let node = &m.node()["spec"]["template"]["spec"];
    assert_eq!(node["terminationGracePeriodSeconds"], 60);
    // The metrics port, the ServiceMonitor's labels.
    let port = values["monitoring"]["port"].as_u64().unwrap();
    assert_eq!(flag(driver, "metrics-address"), format!("0.0.0.0:{port}"));
    let monitor = m.get("ServiceMonitor", "rds-csi-controller");
    let pods = m.get("PodMonitor", "rds-csi-node");
    for (k, v) in values["monitoring"]["serviceMonitor"]["labels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&monitor["metadata"]["labels"][k], v);
        assert_eq!(&pods["metadata"]["labels"][k], v);
    }
}

/// A StorageClass's parameters cannot change, so `helm upgrade` from the Go chart updates its
/// classes in place only if this chart renders exactly the Go chart's parameters from the same
/// entries: csi.storage.k8s.io/fstype, nvmeAddress (else rds.storageIP), nvmePort (else
/// rds.nvmePort, as a string) and volumePath (else rds.basePath), nothing more.
#[test]
fn go_style_storage_classes_keep_the_go_charts_parameters() {
    let values = go_style_values();
    let m = Manifests::rendered(GO_STYLE);
    let rds = &values["rds"];
    let entries = values["storageClasses"].as_array().unwrap();
    let mut rendered = 0;
    for entry in entries.iter().filter(|e| e["enabled"] != false) {
        let class = m.get("StorageClass", entry["name"].as_str().unwrap());
        rendered += 1;
        let or = |key: &str, fallback: &Value| match &entry[key] {
            Value::String(s) if s.is_empty() => text(fallback),
            Value::Null => text(fallback),
            v => text(v),
        };
        assert_eq!(
            class["parameters"],
            json!({
                "csi.storage.k8s.io/fstype": text(&entry["fsType"]),
                "nvmeAddress": or("nvmeAddress", &rds["storageIP"]),
                "nvmePort": or("nvmePort", &rds["nvmePort"]),
                "volumePath": or("volumePath", &rds["basePath"]),
            }),
            "{}",
            entry["name"]
        );
        assert_eq!(class["provisioner"], DRIVER);
        assert_eq!(class["reclaimPolicy"], entry["reclaimPolicy"]);
        assert_eq!(class["volumeBindingMode"], entry["volumeBindingMode"]);
        assert_eq!(
            class["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"]
                == "true",
            entry["isDefault"] == true
        );
    }
    assert_eq!(rendered, m.of_kind("StorageClass").count());
    assert!(
        rendered >= 2,
        "the Go-style file has rds-nvme and rds-nvme-rwx"
    );
    let class = m.get("VolumeSnapshotClass", "rds-csi-snapclass");
    assert_eq!(
        class["deletionPolicy"],
        values["snapshotClass"]["deletionPolicy"]
    );
}

/// Every StorageClass any render makes is one this driver serves: its provisioner, a
/// filesystem it formats, an nvmeAddress that is an IP address, parameters as strings, and a
/// migrationTimeoutSeconds within the driver's clamp. Some render has a KubeVirt live-migration
/// class with migrationTimeoutSeconds.
#[test]
fn rendered_storage_classes_are_served_by_the_driver() {
    let mut migration_classes = 0;
    for m in Manifests::all() {
        if m.backend() == Backend::File {
            assert_eq!(
                m.of_kind("StorageClass").count(),
                0,
                "{}: StorageClasses come with the RDS backend",
                m.name
            );
        }
        for class in m.of_kind("StorageClass") {
            let name = format!("{}: {}", m.name, class["metadata"]["name"]);
            assert_eq!(class["provisioner"], DRIVER, "{name}");
            let params = class["parameters"].as_object().unwrap();
            for (k, v) in params {
                assert!(v.is_string(), "{name}: {k} is not a string");
            }
            let fs = params["csi.storage.k8s.io/fstype"].as_str().unwrap();
            assert!(["ext4", "xfs"].contains(&fs), "{name}: {fs}");
            if let Some(a) = params.get("nvmeAddress") {
                a.as_str()
                    .unwrap()
                    .parse::<std::net::IpAddr>()
                    .unwrap_or_else(|e| panic!("{name}: nvmeAddress {a}: {e}"));
            }
            if let Some(t) = params.get("migrationTimeoutSeconds") {
                let t: u64 = t.as_str().unwrap().parse().unwrap();
                assert!((30..=3600).contains(&t), "{name}: {t}");
                migration_classes += 1;
            }
        }
    }
    assert!(
        migration_classes >= 1,
        "no render has a live-migration class"
    );
}

/// `/debug/attachments` names volumes and nodes: the chart serves it on loopback (reached with
/// `kubectl port-forward`), never on the metrics port that Prometheus reaches on all
/// interfaces, and `monitoring.debugAddress` changes it (empty turns it off, as the
/// no-HA render's values do). Catches the chart dropping `--debug-address` (the driver's own
/// default is loopback too, but a chart that stops saying so can drift) or exposing it.
#[test]
fn the_debug_view_is_on_loopback_unless_the_values_say_otherwise() {
    let values = read_yaml(&path(&format!("{CHART}/values.yaml"))).remove(0);
    assert_eq!(values["monitoring"]["debugAddress"], "127.0.0.1:9811");
    for m in Manifests::all() {
        let n = &m.name;
        let driver = container(m.controller(), DRIVER_CONTAINER);
        let debug = flag(driver, "debug-address");
        if n.contains("no-ha-no-snapshots") {
            assert_eq!(debug, "", "{n}: monitoring.debugAddress \"\" turns it off");
        } else {
            assert_eq!(debug, "127.0.0.1:9811", "{n}");
        }
        let ports: Vec<&Value> = driver["ports"]
            .as_array()
            .map_or(vec![], |p| p.iter().collect());
        assert!(
            ports.iter().all(|p| p["containerPort"] != 9811),
            "{n}: the debug port is not a container port: {ports:?}"
        );
        let node = container(m.node(), DRIVER_CONTAINER);
        assert!(
            !flags(node).contains_key("debug-address"),
            "{n}: a node plugin has no attachment state to show"
        );
    }
}

/// Defaults the chart leaves to the driver are the driver's: the chart passes
/// --attachment-grace-period only when it differs from its default, so the two must agree.
#[test]
fn the_chart_defaults_are_the_drivers() {
    let values = read_yaml(&path(&format!("{CHART}/values.yaml"))).remove(0);
    let (_, entries) = help_entries();
    let default = entries["attachment-grace-period"]
        .split("[default: ")
        .nth(1)
        .and_then(|d| d.split(']').next())
        .unwrap()
        .to_string();
    assert_eq!(values["controller"]["attachmentGracePeriod"], default);
}

// ---- 5. The Kubernetes floor -----------------------------------------------------------------

/// A Kubernetes release 1.x, by its minor number.
type Minor = u64;

/// Each pinned sidecar (image name and tag) with the lowest Kubernetes it supports, as its
/// project documents it. Every sidecar image any render runs must be here: a new pin is a new
/// row, read from that release's notes.
const SIDECAR_FLOORS: &[(&str, &str, Minor, &str)] = &[
    (
        "csi-provisioner",
        "v6.3.0",
        20,
        "README's compatibility table (1.20). The v6 release notes name 1.34 only for the \
         VolumeAttributesClass v1 API: the provisioner turns that feature off where the API is \
         missing (#1423), and this driver has no MODIFY_VOLUME (held below)",
    ),
    ("csi-attacher", "v4.12.0", 17, "release notes: minimum 1.17"),
    (
        "csi-resizer",
        "v2.2.1",
        16,
        "release notes: minimum 1.16 (1.34 recommended for VolumeAttributesClass)",
    ),
    (
        "csi-snapshotter",
        "v8.6.0",
        25,
        "v8 release notes: minimum 1.25",
    ),
    (
        "csi-node-driver-registrar",
        "v2.17.0",
        13,
        "release notes: minimum 1.13",
    ),
    (
        "livenessprobe",
        "v2.19.0",
        13,
        "release notes: minimum 1.13",
    ),
];

/// Each kind the renders contain, at its apiVersion, with the first release that serves it by
/// default. Custom resources count from what their CRDs need (the VolumeSnapshot CRDs of
/// external-snapshotter v4 and later need 1.20); where only their operator sets a floor, 0.
/// Fields newer than the chart's floor are left out for older clusters by the templates, which
/// `.ci/validate-manifests` checks by rendering for the floor and validating against its schema.
const API_FLOORS: &[(&str, &str, Minor)] = &[
    ("v1", "Namespace", 0),
    ("v1", "ServiceAccount", 0),
    ("v1", "Service", 0),
    ("v1", "ConfigMap", 0),
    ("rbac.authorization.k8s.io/v1", "ClusterRole", 8),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", 8),
    ("rbac.authorization.k8s.io/v1", "Role", 8),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", 8),
    ("apps/v1", "Deployment", 9),
    ("apps/v1", "DaemonSet", 9),
    ("policy/v1", "PodDisruptionBudget", 21),
    ("storage.k8s.io/v1", "StorageClass", 6),
    ("storage.k8s.io/v1", "CSIDriver", 18),
    ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass", 20),
    ("monitoring.coreos.com/v1", "ServiceMonitor", 0),
    ("monitoring.coreos.com/v1", "PodMonitor", 0),
    ("monitoring.coreos.com/v1", "PrometheusRule", 0),
    ("cdi.kubevirt.io/v1beta1", "StorageProfile", 0),
];

/// `>=1.N.0-0` from Chart.yaml's kubeVersion: N.
fn chart_floor() -> Minor {
    let chart = read_yaml(&path(&format!("{CHART}/Chart.yaml"))).remove(0);
    let range = chart["kubeVersion"]
        .as_str()
        .expect("Chart.yaml: kubeVersion");
    range
        .strip_prefix(">=1.")
        .and_then(|r| r.strip_suffix(".0-0"))
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("Chart.yaml: kubeVersion {range:?} is not \">=1.N.0-0\""))
}

/// Chart.yaml's kubeVersion is exactly the lowest release that every rendered object and every
/// pinned sidecar supports: no higher (a Go chart user on an older cluster could not switch,
/// as with the 1.34 this chart used to demand), no lower (Helm would install what cannot run).
/// The chart's README says why, and csi-provisioner's 1.34 (VolumeAttributesClass) stays
/// irrelevant only while the driver does not advertise MODIFY_VOLUME, which is held here too.
/// Catches: a kubeVersion that is not the computed floor, a new sidecar pin or kind without its
/// documented floor, a README that does not name the floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_kubernetes_floor_is_what_its_objects_and_sidecars_need() {
    let mut floor: (Minor, String) = (0, String::new());
    let mut raise = |minor: Minor, why: String| {
        if minor > floor.0 {
            floor = (minor, why);
        }
    };
    for m in Manifests::all() {
        for o in &m.objects {
            let (api, kind) = (text(&o["apiVersion"]), text(&o["kind"]));
            let minor = API_FLOORS
                .iter()
                .find(|(a, k, _)| *a == api && *k == kind)
                .map(|(_, _, minor)| *minor)
                .unwrap_or_else(|| panic!("{}: {kind} {api} has no row in API_FLOORS", m.name));
            raise(minor, format!("{kind} {api}"));
        }
        for workload in [m.controller(), m.node()] {
            for c in containers(workload) {
                let image = text(&c["image"]);
                let Some(pinned) = image.strip_prefix("registry.k8s.io/sig-storage/") else {
                    continue;
                };
                let (name, tag) = pinned.split_once(':').expect("image:tag");
                let (_, _, minor, _) = SIDECAR_FLOORS
                    .iter()
                    .find(|(n, t, _, _)| *n == name && *t == tag)
                    .unwrap_or_else(|| panic!("{}: {image} has no row in SIDECAR_FLOORS", m.name));
                raise(*minor, image.clone());
            }
        }
    }
    assert!(floor.0 > 0, "no object or sidecar found");
    assert_eq!(
        chart_floor(),
        floor.0,
        "Chart.yaml's kubeVersion should be >=1.{}.0-0, what {} needs",
        floor.0,
        floor.1
    );

    let readme = std::fs::read_to_string(path(&format!("{CHART}/README.md"))).unwrap();
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Kubernetes versions"))
        .expect("the chart's README has a \"Kubernetes versions\" section");
    assert!(
        section.contains(&format!("Kubernetes 1.{} or newer", floor.0)),
        "the chart's README should name the floor, 1.{}",
        floor.0
    );
    for (name, tag, minor, _) in SIDECAR_FLOORS {
        assert!(
            section.contains(&format!("{name} {tag}")) && section.contains(&format!("1.{minor}")),
            "the chart's README should give {name} {tag}'s floor, 1.{minor}"
        );
    }

    let d = Driver::start(&[], &["--mode", "controller"]).await;
    let modify = d
        .controller()
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .any(|c| {
            matches!(c.r#type, Some(CapType::Rpc(rpc)) if rpc.r#type == Rpc::ModifyVolume as i32)
        });
    assert!(
        !modify,
        "with MODIFY_VOLUME, csi-provisioner's and csi-resizer's VolumeAttributesClass \
         support needs Kubernetes 1.34: raise the floor"
    );
}

// ---- 6. The Go chart's keys that have no effect ---------------------------------------------

/// The Go chart's values keys this chart accepts and ignores, as NOTES.txt names them (a
/// StorageClass entry's key as `storageClasses[<name>].<key>`). `storageClasses[].accessModes`
/// has an effect only where the class's CDI StorageProfile is rendered.
const GO_KEYS_WITHOUT_EFFECT: &[&str] = &[
    "controller.vmiSerialization.enabled",
    "controller.vmiSerialization.cacheTTL",
    "scheduledSnapshots.enabled",
    "scheduledSnapshots.schedules",
    "scheduledSnapshots.image",
    "scheduledSnapshots.resources",
    "storageClasses[].accessModes",
];

/// The keys NOTES.txt's "IGNORED:" paragraph names, in a render's `-NOTES.txt`.
fn ignored_in_notes(name: &str) -> BTreeSet<String> {
    let file = path(&format!("deploy/helm/rendered/{name}-NOTES.txt"));
    let notes = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e} (run .ci/render-manifests)", file.display()));
    let Some((_, after)) = notes.split_once("\nIGNORED:") else {
        return BTreeSet::new();
    };
    after
        .lines()
        .skip_while(|l| !l.starts_with("  "))
        .take_while(|l| l.starts_with("  "))
        .map(|l| l.trim().split_once(": ").expect("key: why").0.to_string())
        .collect()
}

/// The keys of GO_KEYS_WITHOUT_EFFECT that a values file sets and that have no effect in `m`.
fn ignored_in_values(values: &Value, m: &Manifests) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for key in GO_KEYS_WITHOUT_EFFECT {
        if let Some(field) = key.strip_prefix("storageClasses[].") {
            for class in values["storageClasses"].as_array().into_iter().flatten() {
                let name = text(&class["name"]);
                if class.get(field).is_some() && m.find("StorageProfile", &name).is_none() {
                    set.insert(format!("storageClasses[{name}].{field}"));
                }
            }
        } else if key
            .split('.')
            .try_fold(values, |v, part| v.get(part))
            .is_some()
        {
            set.insert(key.to_string());
        }
    }
    set
}

/// Every Go key this chart accepts with no effect is listed in the chart's README, and the
/// NOTES of `helm install` name exactly those a values file sets (the Go user's file names
/// six; the chart's own files none), so a Go user learns what to delete. No template but the
/// helpers reads these keys, so "no effect" stays true: a template that starts using one must
/// take it off the list. Catches: a warning line removed from "rds-csi.goKeysWithoutEffect", a
/// key warned about that is not set, a key missing from the README.
#[test]
fn go_keys_without_effect_are_listed_and_warned_about() {
    let readme = std::fs::read_to_string(path(&format!("{CHART}/README.md"))).unwrap();
    let section = readme
        .split("\n### ")
        .find(|s| s.starts_with("Accepted with no effect"))
        .expect("the chart's README has an \"Accepted with no effect\" section");
    for key in GO_KEYS_WITHOUT_EFFECT {
        assert!(
            section.contains(&format!("`{key}`")),
            "the chart's README should list `{key}` under \"Accepted with no effect\""
        );
    }

    let mut go_style = 0;
    for entry in std::fs::read_dir(path(&format!("{CHART}/ci"))).unwrap() {
        let file = entry.unwrap().path();
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        let Some(name) = name.strip_suffix("-values.yaml") else {
            continue;
        };
        let values = read_yaml(&file).remove(0);
        let expected = ignored_in_values(&values, &Manifests::rendered(name));
        assert_eq!(
            ignored_in_notes(name),
            expected,
            "{name}: NOTES.txt should warn about exactly the Go keys without effect it sets"
        );
        if name == GO_STYLE {
            go_style = expected.len();
        }
    }
    assert!(
        go_style >= 5,
        "{GO_STYLE}-values.yaml, a Go user's file, sets only {go_style} such keys"
    );

    for entry in std::fs::read_dir(path(&format!("{CHART}/templates"))).unwrap() {
        let file = entry.unwrap().path();
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        if name == "_helpers.tpl" {
            continue;
        }
        let template = std::fs::read_to_string(&file).unwrap();
        for key in GO_KEYS_WITHOUT_EFFECT {
            let last = key.rsplit('.').next().unwrap();
            let parent = key.split('.').rev().nth(1).unwrap();
            let used = if parent == "storageClasses[]" {
                name != "storageprofiles.yaml" && template.contains(&format!(".{last}"))
            } else {
                template.contains(parent)
            };
            assert!(
                !used,
                "templates/{name} reads {key}: it has an effect, take it off the list"
            );
        }
    }
}

// ---- 7. KubeVirt: CDI StorageProfiles --------------------------------------------------------

/// CDI's StorageProfile spec (cdi.kubevirt.io/v1beta1, containerized-data-importer-api's
/// `StorageProfileSpec`): its fields, and the values its enums allow.
const PROFILE_SPEC_FIELDS: &[&str] = &[
    "cloneStrategy",
    "claimPropertySets",
    "dataImportCronSourceFormat",
    "snapshotClass",
];
const CLONE_STRATEGIES: &[&str] = &["copy", "snapshot", "csi-clone"];
const SOURCE_FORMATS: &[&str] = &["snapshot", "pvc"];
const ACCESS_MODES: &[&str] = &[
    "ReadWriteOnce",
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOncePod",
];
const VOLUME_MODES: &[&str] = &["Block", "Filesystem"];

/// One claim property set: (access modes, volume mode), checked against CDI's
/// `ClaimPropertySet` (both fields required, at most 4 legal access modes, a legal mode).
fn claim_property_set(set: &Value, where_: &str) -> (Vec<String>, String) {
    let keys: BTreeSet<&str> = set
        .as_object()
        .unwrap_or_else(|| panic!("{where_}: a claim property set is an object"))
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["accessModes", "volumeMode"]),
        "{where_}: a claim property set has accessModes and volumeMode"
    );
    let modes = strings(&set["accessModes"]);
    assert!(
        !modes.is_empty() && modes.len() <= 4,
        "{where_}: accessModes {modes:?}"
    );
    for mode in &modes {
        assert!(ACCESS_MODES.contains(&mode.as_str()), "{where_}: {mode}");
    }
    let volume_mode = text(&set["volumeMode"]);
    assert!(
        VOLUME_MODES.contains(&volume_mode.as_str()),
        "{where_}: volumeMode {volume_mode}"
    );
    (modes, volume_mode)
}

/// With `cdi.storageProfiles`, each rendered StorageClass has a CDI StorageProfile of its name,
/// in CDI's documented shape (no field CDI's spec lacks, enums within theirs, cluster-scoped),
/// saying what the driver serves: a live-migration class (accessModes ReadWriteMany, or a
/// migrationTimeoutSeconds) ReadWriteMany Block only, since the driver refuses ReadWriteMany
/// filesystems; any other class ReadWriteOnce Block, then Filesystem; `csi-clone`, which needs
/// the driver's CLONE_VOLUME; `dataImportCronSourceFormat: snapshot` exactly where the render
/// has a VolumeSnapshotClass. Off by default. Catches: a profile missing or extra, a claim
/// property set the driver would refuse, the source format without snapshots (CDI's golden
/// images would never become ready), a field CDI does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdi_storage_profiles_fit_each_storage_class() {
    let d = Driver::start(&[], &["--mode", "controller"]).await;
    let clone = d
        .controller()
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .any(|c| {
            matches!(c.r#type, Some(CapType::Rpc(rpc)) if rpc.r#type == Rpc::CloneVolume as i32)
        });
    assert!(clone, "cloneStrategy csi-clone needs CLONE_VOLUME");

    let defaults = read_yaml(&path(&format!("{CHART}/values.yaml"))).remove(0);
    assert_eq!(
        defaults["cdi"]["storageProfiles"]["enabled"], false,
        "StorageProfiles are off by default"
    );

    let (mut with_snapshots, mut without_snapshots, mut rwx, mut rwo) = (0, 0, 0, 0);
    for m in Manifests::all() {
        let profiles: Vec<&Value> = m.of_kind("StorageProfile").collect();
        if profiles.is_empty() {
            continue;
        }
        let values_file = m
            .name
            .strip_prefix("deploy/helm/rendered/")
            .and_then(|n| n.strip_suffix(".yaml"))
            .map(|n| path(&format!("{CHART}/ci/{n}-values.yaml")))
            .unwrap_or_else(|| panic!("{}: StorageProfiles outside a CI render", m.name));
        let values = read_yaml(&values_file).remove(0);
        let classes: BTreeSet<String> = m
            .of_kind("StorageClass")
            .map(|c| text(&c["metadata"]["name"]))
            .collect();
        let named: BTreeSet<String> = profiles
            .iter()
            .map(|p| text(&p["metadata"]["name"]))
            .collect();
        assert_eq!(
            named, classes,
            "{}: one StorageProfile per StorageClass",
            m.name
        );
        let snapshots = m.of_kind("VolumeSnapshotClass").next().is_some();

        for profile in profiles {
            let name = text(&profile["metadata"]["name"]);
            let at = format!("{}: StorageProfile {name}", m.name);
            assert_eq!(profile["apiVersion"], "cdi.kubevirt.io/v1beta1", "{at}");
            assert!(
                profile["metadata"].get("namespace").is_none(),
                "{at}: StorageProfiles are cluster-scoped"
            );
            let top: BTreeSet<&str> = profile
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(
                top,
                BTreeSet::from(["apiVersion", "kind", "metadata", "spec"]),
                "{at}: status is CDI's"
            );
            let spec = profile["spec"].as_object().expect("spec");
            for field in spec.keys() {
                assert!(
                    PROFILE_SPEC_FIELDS.contains(&field.as_str()),
                    "{at}: spec.{field} is not in CDI's StorageProfileSpec"
                );
            }
            let strategy = text(&spec["cloneStrategy"]);
            assert!(CLONE_STRATEGIES.contains(&strategy.as_str()), "{at}");
            assert_eq!(strategy, "csi-clone", "{at}");
            match spec.get("dataImportCronSourceFormat") {
                Some(format) => {
                    assert!(SOURCE_FORMATS.contains(&text(format).as_str()), "{at}");
                    assert_eq!(text(format), "snapshot", "{at}");
                    assert!(snapshots, "{at}: snapshot sources without snapshots");
                }
                None => assert!(
                    !snapshots,
                    "{at}: snapshots are on: golden images as snapshots"
                ),
            }

            let sets = spec["claimPropertySets"]
                .as_array()
                .expect("claimPropertySets");
            assert!(!sets.is_empty() && sets.len() <= 8, "{at}: 1 to 8 sets");
            let sets: Vec<(Vec<String>, String)> =
                sets.iter().map(|s| claim_property_set(s, &at)).collect();
            let class = m.get("StorageClass", &name);
            let entry = values["storageClasses"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name.as_str())
                .unwrap();
            let migration = class["parameters"].get("migrationTimeoutSeconds").is_some()
                || strings(&entry["accessModes"]).contains(&"ReadWriteMany".to_string());
            let expected: Vec<(Vec<String>, String)> = if migration {
                rwx += 1;
                vec![(vec!["ReadWriteMany".into()], "Block".into())]
            } else {
                rwo += 1;
                vec![
                    (vec!["ReadWriteOnce".into()], "Block".into()),
                    (vec!["ReadWriteOnce".into()], "Filesystem".into()),
                ]
            };
            assert_eq!(sets, expected, "{at}: claimPropertySets");
        }
        if snapshots {
            with_snapshots += 1;
        } else {
            without_snapshots += 1;
        }
    }
    assert!(
        with_snapshots >= 1 && without_snapshots >= 1 && rwx >= 2 && rwo >= 2,
        "the CI renders should have StorageProfiles with and without snapshots, of \
         live-migration and other classes ({with_snapshots}, {without_snapshots}, {rwx}, {rwo})"
    );
}

/// README.md's KubeVirt section says what each node needs and why: the runtime's
/// `device_ownership_from_security_context` (containerd and CRI-O), without which a non-root
/// virt-launcher cannot open a Block PVC's device, and a unique `/etc/nvme/hostnqn`, by which
/// NVMe/TCP tells hosts apart. For the host's file to count, every RDS render mounts the host's
/// /etc/nvme read-only into the node plugin at /etc/nvme: without it nvme-cli reads the image's
/// own hostnqn, the same on every node. Catches: the section or one of its facts removed, the
/// mount removed or made writable.
#[test]
fn kubevirt_nodes_are_told_what_they_need_and_use_their_own_host_nqn() {
    let readme = std::fs::read_to_string(path("README.md")).unwrap();
    let section = readme
        .split("\n### ")
        .find(|s| s.starts_with("KubeVirt\n"))
        .expect("README.md has a \"KubeVirt\" section");
    for needed in [
        "device_ownership_from_security_context = true",
        "containerd",
        "CRI-O",
        "non-root",
        "/etc/nvme/hostnqn",
        "unique",
        "host NQN",
    ] {
        assert!(
            section.contains(needed),
            "README.md's KubeVirt section should say {needed:?}"
        );
    }

    let mut rds = 0;
    for m in Manifests::all() {
        let node = m.node();
        let driver = container(node, DRIVER_CONTAINER);
        let mount = mount_of(driver, "/etc/nvme/hostnqn");
        if m.backend() != Backend::Rds {
            assert!(
                mount.is_none(),
                "{}: the file backend makes no NVMe connection",
                m.name
            );
            continue;
        }
        rds += 1;
        let (mount, _) = mount
            .unwrap_or_else(|| panic!("{}: the node plugin must see the host's /etc/nvme", m.name));
        assert_eq!(mount["mountPath"], "/etc/nvme", "{}", m.name);
        assert_eq!(
            mount["readOnly"], true,
            "{}: the host's identity is only read",
            m.name
        );
        let volumes = volumes_by_name(node);
        let volume = volumes[mount["name"].as_str().unwrap()];
        assert_eq!(volume["hostPath"]["path"], "/etc/nvme", "{}", m.name);
    }
    assert!(rds >= 3, "only {rds} RDS renders");
}
