//! What the benches that start the real driver against the fake API server share: a cluster
//! of N attached volumes shaped like real objects, and readings of the driver's process.
//! Included by path; the including bench declares `mod fake_apiserver` at its root.

#![allow(dead_code)]

use std::time::Duration;

use serde_json::json;

use crate::fake_apiserver::FakeApiServer;

pub const DRIVER: &str = rds_csi::DEFAULT_DRIVER_NAME;
/// Nodes the volumes are spread over, `node-0` to `node-99`.
pub const NODES: usize = 100;

pub fn rfc3339_ago(age: Duration) -> String {
    rds_csi::rfc3339(std::time::SystemTime::now() - age)
}

/// The objects a real cluster would hold for `n` attached volumes: the Nodes, and per volume a
/// PV of this driver and its attached VolumeAttachment (every tenth RWX block).
pub fn load(api: &FakeApiServer, n: usize) {
    let ts = rfc3339_ago(Duration::from_secs(3600));
    for i in 0..NODES {
        api.create("nodes", json!({"metadata": {"name": format!("node-{i}")}}))
            .expect("node");
    }
    for i in 0..n {
        let pv = format!("pvc-{i:08x}-0000-4000-8000-000000000000");
        let handle = format!("vol-{i:08}");
        let node = format!("node-{}", i % NODES);
        let rwx = i % 10 == 0;
        api.create(
            "persistentvolumes",
            json!({
                "metadata": {
                    "name": pv,
                    "creationTimestamp": ts,
                    "annotations": {"pv.kubernetes.io/provisioned-by": DRIVER, "volume.kubernetes.io/provisioner-deletion-secret-name": ""},
                    "finalizers": ["kubernetes.io/pv-protection", "external-provisioner.volume.kubernetes.io/finalizer"],
                    "managedFields": [
                        {"manager": "csi-provisioner", "operation": "Update", "apiVersion": "v1", "time": ts, "fieldsType": "FieldsV1",
                         "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:pv.kubernetes.io/provisioned-by": {}}, "f:finalizers": {".": {}, "v:\"external-provisioner.volume.kubernetes.io/finalizer\"": {}}},
                                      "f:spec": {"f:accessModes": {}, "f:capacity": {".": {}, "f:storage": {}}, "f:claimRef": {".": {}, "f:name": {}, "f:namespace": {}, "f:uid": {}},
                                                 "f:csi": {".": {}, "f:driver": {}, "f:volumeAttributes": {".": {}, "f:storage.kubernetes.io/csiProvisionerIdentity": {}}, "f:volumeHandle": {}},
                                                 "f:persistentVolumeReclaimPolicy": {}, "f:storageClassName": {}, "f:volumeMode": {}}}},
                        {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": ts, "fieldsType": "FieldsV1", "subresource": "status",
                         "fieldsV1": {"f:status": {"f:phase": {}}}}
                    ]
                },
                "spec": {
                    "accessModes": [if rwx { "ReadWriteMany" } else { "ReadWriteOnce" }],
                    "volumeMode": if rwx { "Block" } else { "Filesystem" },
                    "capacity": {"storage": "10Gi"},
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": "rds-nvme",
                    "csi": {"driver": DRIVER, "volumeHandle": handle,
                            "volumeAttributes": {"storage.kubernetes.io/csiProvisionerIdentity": "1700000000000-8081-rds.csi.srvlab.io", "migrationTimeoutSeconds": "300"}},
                    "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": "vms", "name": format!("vm-{i}-disk"),
                                 "uid": format!("{i:08x}-1111-4000-8000-000000000000"), "resourceVersion": "12345"},
                },
                "status": {"phase": "Bound"},
            }),
        )
        .expect("pv");
        api.create(
            "volumeattachments",
            json!({
                "metadata": {
                    "name": rds_csi::kube::cluster::va_name(&handle, DRIVER, &node),
                    "creationTimestamp": ts,
                    "annotations": {"csi.alpha.kubernetes.io/node-id": node},
                    "finalizers": ["external-attacher/rds-csi-srvlab-io"],
                    "managedFields": [
                        {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "storage.k8s.io/v1", "time": ts, "fieldsType": "FieldsV1",
                         "fieldsV1": {"f:spec": {"f:attacher": {}, "f:nodeName": {}, "f:source": {"f:persistentVolumeName": {}}}}},
                        {"manager": "csi-attacher", "operation": "Update", "apiVersion": "storage.k8s.io/v1", "time": ts, "fieldsType": "FieldsV1",
                         "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:csi.alpha.kubernetes.io/node-id": {}}, "f:finalizers": {".": {}, "v:\"external-attacher/rds-csi-srvlab-io\"": {}}}}},
                        {"manager": "csi-attacher", "operation": "Update", "apiVersion": "storage.k8s.io/v1", "time": ts, "fieldsType": "FieldsV1", "subresource": "status",
                         "fieldsV1": {"f:status": {"f:attached": {}, "f:attachmentMetadata": {".": {}, "f:backend": {}}}}}
                    ]
                },
                "spec": {"attacher": DRIVER, "nodeName": node, "source": {"persistentVolumeName": pv}},
                "status": {"attached": true, "attachmentMetadata": {"backend": "rds"}},
            }),
        )
        .expect("va");
    }
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    Some(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// A `kB` field of /proc/PID/status (VmHWM, VmRSS), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The median; NaN of nothing.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The sizes and run count a bench was asked for: `<PREFIX>_VOLUMES` (comma-separated counts,
/// else `default_sizes`, or 1000 under `-- --test`) and `<PREFIX>_RUNS` (else 3, or 1 under
/// `--test`).
pub fn sizes_and_runs(prefix: &str, default_sizes: &str) -> (Vec<usize>, usize) {
    let test_mode = std::env::args().any(|a| a == "--test");
    let sizes_var = format!("{prefix}_VOLUMES");
    let sizes = std::env::var(&sizes_var)
        .unwrap_or_else(|_| if test_mode { "1000" } else { default_sizes }.into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{sizes_var}: comma-separated counts"))
        })
        .collect();
    let runs_var = format!("{prefix}_RUNS");
    let runs = std::env::var(&runs_var)
        .ok()
        .map(|s| s.parse().unwrap_or_else(|_| panic!("{runs_var}: a count")))
        .unwrap_or(if test_mode { 1 } else { 3 });
    (sizes, runs)
}

/// The runtime the benches drive the fake API server on: one worker, so the driver under test
/// has the other core.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}
