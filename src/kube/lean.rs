//! What the PV watcher and the boot list of VolumeAttachments deserialize: only the fields the
//! projections in `cluster.rs` read, with the same names and shapes as k8s-openapi's types.
//! Everything else (managedFields, labels, annotations, status details) is skipped by the JSON
//! parser without being built, which is most of the cost of reading 100k objects at boot.
//!
//! Read-only views: nothing here is ever written back to the API.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::{Deserialize, Deserializer};

/// The metadata the watchers need: name and resourceVersion (the watcher resumes from it),
/// uid, and the creation and deletion times.
fn lean_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        name: Option<String>,
        resource_version: Option<String>,
        uid: Option<String>,
        creation_timestamp: Option<Time>,
        deletion_timestamp: Option<Time>,
    }
    let m = Meta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        resource_version: m.resource_version,
        uid: m.uid,
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        ..ObjectMeta::default()
    })
}

macro_rules! cluster_resource {
    ($lean:ty, $full:ty) => {
        impl kube::Resource for $lean {
            type DynamicType = ();
            type Scope = k8s_openapi::ClusterResourceScope;

            fn kind(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::kind(dt)
            }
            fn group(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::group(dt)
            }
            fn version(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::version(dt)
            }
            fn plural(dt: &()) -> Cow<'_, str> {
                <$full as kube::Resource>::plural(dt)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A PersistentVolume as the PV projection reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct PersistentVolume {
    #[serde(deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<PersistentVolumeSpec>,
}
cluster_resource!(
    PersistentVolume,
    k8s_openapi::api::core::v1::PersistentVolume
);

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PersistentVolumeSpec {
    #[serde(default)]
    pub access_modes: Option<Vec<String>>,
    #[serde(default)]
    pub volume_mode: Option<String>,
    #[serde(default)]
    pub csi: Option<CsiSource>,
    #[serde(default)]
    pub claim_ref: Option<ClaimRef>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CsiSource {
    #[serde(default)]
    pub driver: String,
    #[serde(default)]
    pub volume_handle: String,
    #[serde(default)]
    pub volume_attributes: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ClaimRef {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
}

/// A VolumeAttachment as seeding reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct VolumeAttachment {
    #[serde(deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    pub spec: VolumeAttachmentSpec,
    #[serde(default)]
    pub status: Option<VolumeAttachmentStatus>,
}
cluster_resource!(
    VolumeAttachment,
    k8s_openapi::api::storage::v1::VolumeAttachment
);

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachmentSpec {
    #[serde(default)]
    pub attacher: String,
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub source: VolumeAttachmentSource,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachmentSource {
    #[serde(default)]
    pub persistent_volume_name: Option<String>,
    #[serde(default)]
    pub inline_volume_spec: Option<InlineVolumeSpec>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct InlineVolumeSpec {
    #[serde(default)]
    pub csi: Option<CsiSource>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct VolumeAttachmentStatus {
    #[serde(default)]
    pub attached: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_projections_need_and_skips_the_rest() {
        let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "pv-1", "resourceVersion": "42", "creationTimestamp": "2026-01-02T03:04:05Z",
                         "labels": {"a": "b"}, "managedFields": [{"manager": "x", "fieldsV1": {"f:spec": {}}}]},
            "spec": {"accessModes": ["ReadWriteMany"], "volumeMode": "Block", "capacity": {"storage": "1Gi"},
                     "csi": {"driver": "d", "volumeHandle": "h", "volumeAttributes": {"k": "v"}},
                     "claimRef": {"namespace": "ns", "name": "c", "uid": "u", "kind": "PersistentVolumeClaim"}},
            "status": {"phase": "Bound"}
        }))
        .unwrap();
        assert_eq!(pv.metadata.name.as_deref(), Some("pv-1"));
        assert_eq!(pv.metadata.resource_version.as_deref(), Some("42"));
        assert!(pv.metadata.managed_fields.is_none() && pv.metadata.labels.is_none());
        let spec = pv.spec.unwrap();
        assert_eq!(spec.access_modes.unwrap(), ["ReadWriteMany"]);
        let csi = spec.csi.unwrap();
        assert_eq!(
            (csi.driver.as_str(), csi.volume_handle.as_str()),
            ("d", "h")
        );
        assert_eq!(spec.claim_ref.unwrap().uid.as_deref(), Some("u"));

        let va: VolumeAttachment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "va", "creationTimestamp": "2026-01-02T03:04:05Z", "deletionTimestamp": null},
            "spec": {"attacher": "d", "nodeName": "n", "source": {"inlineVolumeSpec": {"csi": {"driver": "d", "volumeHandle": "ih"}}}},
            "status": {"attached": true, "attachmentMetadata": {"x": "y"}}
        }))
        .unwrap();
        assert!(va.metadata.creation_timestamp.is_some());
        assert_eq!(va.spec.node_name, "n");
        assert_eq!(
            va.spec
                .source
                .inline_volume_spec
                .unwrap()
                .csi
                .unwrap()
                .volume_handle,
            "ih"
        );
        assert!(va.status.unwrap().attached);
    }
}
