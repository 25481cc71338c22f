//! A Kubernetes cluster for the driver to run against: the fake API server with Nodes, and the
//! PVs and VolumeAttachments the tests create as the external-provisioner and external-attacher
//! would. Shared by the Kubernetes e2e tests and the deployment tests.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rds_csi::kube::cluster::va_name;
use serde_json::{json, Value};

use super::{precreate, Driver};
use crate::fake_apiserver::FakeApiServer;

pub const DRIVER: &str = rds_csi::DEFAULT_DRIVER_NAME;

/// RFC 3339 time `age` ago.
pub fn ts(age: Duration) -> String {
    rds_csi::rfc3339(SystemTime::now() - age)
}

pub struct Cluster {
    pub api: FakeApiServer,
    /// Holds the kubeconfig.
    _dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl Cluster {
    pub async fn new(nodes: &[&str]) -> Cluster {
        let api = FakeApiServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = api.write_kubeconfig(&dir.path().join("kube"));
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

    /// The driver in Kubernetes mode against this cluster, with `volumes` in its backend.
    pub async fn start_with_volumes(&self, volumes: &[&str]) -> Driver {
        let dir = tempfile::tempdir().unwrap();
        precreate(dir.path(), volumes).await;
        Driver::start_kube_in(dir, &self.kubeconfig, &[]).await
    }
}
