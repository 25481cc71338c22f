//! A Kubernetes cluster for the driver to run against: the fake API server with Nodes, and the
//! PVs and VolumeAttachments the tests create as the external-provisioner and external-attacher
//! would. Shared by the Kubernetes e2e tests and the deployment tests.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rds_csi::kube::cluster::va_name;
use serde_json::{json, Value};

use super::{precreate, Driver};
use crate::fake_apiserver::{FakeApiServer, Identity};

pub const DRIVER: &str = rds_csi::DEFAULT_DRIVER_NAME;

/// Where the controller pods, and so the csi-attacher's leader Lease, live.
pub const LEASE_NAMESPACE: &str = "rds-csi";

/// The controller pod's ServiceAccount, and the roles the chart writes for the driver
/// container (the sidecars beside it hold the account's other roles).
pub const CONTROLLER_ACCOUNT: &str = "rds-csi-controller";
pub const DRIVER_ROLES: &[&str] = &["rds-csi-driver", "rds-csi-driver-leases"];

/// Who the driver is to the fake API server: the controller's ServiceAccount, held to the
/// driver's roles of the rendered RBAC, so a call those roles do not allow is answered 403.
pub fn driver_identity() -> Identity {
    Identity::service_account_with_roles(LEASE_NAMESPACE, CONTROLLER_ACCOUNT, DRIVER_ROLES)
}

/// The csi-attacher's leader Lease for [`DRIVER`]: csi-lib-utils names it
/// `external-attacher-leader-` + the driver name with every character outside `[A-Za-z0-9-]`
/// replaced by `-`. Written out here, not computed by the driver's code.
pub const LEASE: &str = "external-attacher-leader-rds-csi-srvlab-io";

/// Now as a Kubernetes MicroTime, as csi-lib-utils writes `acquireTime` and `renewTime`.
pub fn micro_now() -> String {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    let whole = rds_csi::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(t.as_secs()));
    format!("{}.{:06}Z", whole.trim_end_matches('Z'), t.subsec_micros())
}

/// RFC 3339 time `age` ago.
pub fn ts(age: Duration) -> String {
    rds_csi::rfc3339(SystemTime::now() - age)
}

pub struct Cluster {
    pub api: FakeApiServer,
    /// Holds the kubeconfig.
    _dir: tempfile::TempDir,
    /// The driver's kubeconfig: [`driver_identity`]'s token.
    pub kubeconfig: PathBuf,
}

impl Cluster {
    pub async fn new(nodes: &[&str]) -> Cluster {
        let api = FakeApiServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = api.write_kubeconfig_as(&dir.path().join("kube"), driver_identity());
        for n in nodes {
            api.create("nodes", json!({"metadata": {"name": n}}))
                .unwrap();
        }
        Cluster {
            api,
            _dir: dir,
            kubeconfig,
        }
    }

    /// A PV of this driver, bound to PVC default/claim-NAME.
    pub fn pv(
        &self,
        name: &str,
        handle: &str,
        rwx_block: bool,
        timeout: Option<&str>,
        annotations: Value,
    ) {
        let mut attrs = serde_json::Map::new();
        if let Some(t) = timeout {
            attrs.insert("migrationTimeoutSeconds".into(), t.into());
        }
        self.api
            .create(
                "persistentvolumes",
                json!({
                    "metadata": {"name": name, "annotations": annotations},
                    "spec": {
                        "accessModes": [if rwx_block { "ReadWriteMany" } else { "ReadWriteOnce" }],
                        "volumeMode": if rwx_block { "Block" } else { "Filesystem" },
                        "capacity": {"storage": "1Mi"},
                        "csi": {"driver": DRIVER, "volumeHandle": handle, "volumeAttributes": attrs},
                        "claimRef": {"namespace": "default", "name": format!("claim-{name}"), "uid": format!("uid-{name}")},
                    },
                }),
            )
            .unwrap();
    }

    /// The VolumeAttachment the external-attacher would create, named as Kubernetes names it.
    pub fn va(&self, pv: &str, handle: &str, node: &str, attached: bool, age: Duration) -> String {
        self.va_created(pv, handle, node, attached, &ts(age))
    }

    /// [`Self::va`] with a given `creationTimestamp` (RFC 3339, whole seconds as the API server
    /// writes it), so two VolumeAttachments can share one second on purpose.
    pub fn va_created(
        &self,
        pv: &str,
        handle: &str,
        node: &str,
        attached: bool,
        created: &str,
    ) -> String {
        let name = va_name(handle, DRIVER, node);
        self.api
            .create(
                "volumeattachments",
                json!({
                    "metadata": {"name": name, "creationTimestamp": created, "finalizers": ["external-attacher/rds-csi-srvlab-io"]},
                    "spec": {"attacher": DRIVER, "nodeName": node, "source": {"persistentVolumeName": pv}},
                    "status": {"attached": attached},
                }),
            )
            .unwrap();
        name
    }

    /// Marks a VolumeAttachment attached, as the external-attacher does after a Publish answered
    /// OK (with no publish_context to record).
    pub fn attach(&self, va: &str) {
        self.mark_attached(va, &HashMap::new());
    }

    /// What the external-attacher does once ControllerPublishVolume answered: marks the
    /// VolumeAttachment attached and stores the publish_context verbatim in
    /// `status.attachmentMetadata`.
    pub fn mark_attached(&self, va: &str, publish_context: &HashMap<String, String>) {
        self.api
            .patch_status(
                "volumeattachments",
                None,
                va,
                json!({"status": {"attached": true, "attachmentMetadata": publish_context}}),
            )
            .unwrap();
    }

    /// Detaches and removes a VolumeAttachment, as the external-attacher does after an
    /// Unpublish answered OK.
    pub fn remove_va(&self, va: &str) {
        self.api
            .remove_finalizers("volumeattachments", None, va)
            .unwrap();
        let _ = self.api.delete("volumeattachments", None, va);
    }

    /// The csi-attacher's leader Lease, as csi-lib-utils writes it when `holder` (a pod name)
    /// acquires it: held for `duration_s` seconds from now unless renewed.
    pub fn lease(&self, holder: &str, duration_s: u32) {
        let now = micro_now();
        self.api
            .create(
                "leases",
                json!({
                    "metadata": {"name": LEASE, "namespace": LEASE_NAMESPACE},
                    "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration_s,
                             "acquireTime": now, "renewTime": now, "leaseTransitions": 0},
                }),
            )
            .unwrap();
    }

    /// The Lease moves to `holder`, as another csi-attacher acquiring it does: a new holder, a
    /// new acquireTime, renewed now, one more transition.
    pub fn move_lease(&self, holder: &str) {
        let lease = self
            .api
            .get("leases", Some(LEASE_NAMESPACE), LEASE)
            .unwrap();
        let transitions = lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0);
        let now = micro_now();
        self.api
            .patch(
                "leases",
                Some(LEASE_NAMESPACE),
                LEASE,
                json!({"spec": {"holderIdentity": holder, "acquireTime": now, "renewTime": now,
                                "leaseTransitions": transitions + 1}}),
            )
            .unwrap();
    }

    /// The holder's csi-attacher renews the Lease (renewTime now).
    pub fn renew_lease(&self) {
        renew(&self.api);
    }

    /// Renews the Lease every `every` until the returned guard is dropped, as a live csi-attacher
    /// holding it does. Writes go straight to the store: faults injected for the driver's
    /// requests do not stop them.
    pub fn keep_renewing(&self, every: Duration) -> Renewer {
        let api = self.api.clone();
        Renewer(tokio::spawn(async move {
            loop {
                renew(&api);
                tokio::time::sleep(every).await;
            }
        }))
    }

    /// The driver in Kubernetes mode against this cluster, with `volumes` in its backend.
    pub async fn start_with_volumes(&self, volumes: &[&str]) -> Driver {
        let dir = tempfile::tempdir().unwrap();
        precreate(dir.path(), volumes).await;
        Driver::start_kube_in(dir, &self.kubeconfig, &[]).await
    }
}

/// Every call the driver makes must be one the rendered RBAC allows: a 403 the driver
/// retried, logged or counted (an event, an annotation) would otherwise leave the test green.
impl Drop for Cluster {
    fn drop(&mut self) {
        let denied: Vec<String> = self
            .api
            .rbac_denials()
            .iter()
            .map(|c| format!("{} {} {} ({})", c.user, c.method, c.path, c.verb))
            .collect();
        if !denied.is_empty() && !std::thread::panicking() {
            panic!(
                "calls the rendered RBAC ({}) does not allow, answered 403: {denied:#?}",
                crate::fake_apiserver::rbac::CHART_RBAC
            );
        }
    }
}

fn renew(api: &FakeApiServer) {
    api.patch(
        "leases",
        Some(LEASE_NAMESPACE),
        LEASE,
        json!({"spec": {"renewTime": micro_now()}}),
    )
    .unwrap();
}

/// A csi-attacher renewing the Lease; it stops (the attacher died) when dropped.
pub struct Renewer(tokio::task::JoinHandle<()>);

impl Drop for Renewer {
    fn drop(&mut self) {
        self.0.abort();
    }
}
