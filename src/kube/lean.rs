//! What the PV watcher and the boot list of VolumeAttachments deserialize: only the fields the
//! projections in `cluster.rs` read, with the same names and shapes as k8s-openapi's types.
//! Everything else (managedFields, labels, annotations, status details) is skipped by the JSON
//! parser without being built, which is most of the cost of reading 100k objects at boot.
//!
//! Read-only views: nothing here is ever written back to the API.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::domain::PUBLISH_ATTACHED_AT_KEY;

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
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachmentStatus {
    #[serde(default)]
    pub attached: bool,
    /// Of `attachmentMetadata` (the publish_context the external-attacher stored), only the
    /// value under [`PUBLISH_ATTACHED_AT_KEY`]; the other entries are skipped unbuilt.
    #[serde(
        default,
        rename = "attachmentMetadata",
        deserialize_with = "attach_instant"
    )]
    pub attached_at: Option<String>,
}

/// `attachmentMetadata[PUBLISH_ATTACHED_AT_KEY]`, from a map that may be null or absent.
fn attach_instant<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<AttachInstant>::deserialize(d)?.and_then(|m| m.0))
}

struct AttachInstant(Option<String>);

impl<'de> Deserialize<'de> for AttachInstant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(AttachInstantVisitor)
    }
}

struct AttachInstantVisitor;

impl<'de> Visitor<'de> for AttachInstantVisitor {
    type Value = AttachInstant;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a map of strings")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AttachInstant, A::Error> {
        let mut found = None;
        while let Some(IsAttachInstant(ours)) = map.next_key()? {
            if ours {
                found = map.next_value::<Option<String>>()?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(AttachInstant(found))
    }
}

/// A map key, compared with [`PUBLISH_ATTACHED_AT_KEY`] without being copied.
struct IsAttachInstant(bool);

impl<'de> Deserialize<'de> for IsAttachInstant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Key;
        impl Visitor<'_> for Key {
            type Value = IsAttachInstant;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string key")
            }

            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<IsAttachInstant, E> {
                Ok(IsAttachInstant(key == PUBLISH_ATTACHED_AT_KEY))
            }
        }
        d.deserialize_str(Key)
    }
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
        let status = va.status.unwrap();
        assert!(status.attached);
        assert_eq!(
            status.attached_at, None,
            "no attach instant among the metadata"
        );
    }

    #[test]
    fn of_the_attachment_metadata_only_the_attach_instant_is_kept() {
        let status = |metadata: serde_json::Value| {
            let va: VolumeAttachment = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "va"},
                "spec": {"attacher": "d", "nodeName": "n"},
                "status": {"attached": true, "attachmentMetadata": metadata}
            }))
            .unwrap();
            va.status.unwrap().attached_at
        };
        let ours = serde_json::json!({
            "backend": "file", "imagePath": "/v/x.img",
            PUBLISH_ATTACHED_AT_KEY: "2026-01-02T03:04:05.123456789Z", "readonly": "true"
        });
        assert_eq!(
            status(ours).as_deref(),
            Some("2026-01-02T03:04:05.123456789Z")
        );
        let go_driver = serde_json::json!({"nvme_address": "10.0.0.1", "nvme_port": "4420"});
        assert_eq!(status(go_driver), None);
        assert_eq!(status(serde_json::Value::Null), None);
        // The same bytes through the borrowing parser the API client uses, with an escaped key.
        let escaped = br#"{"metadata":{"name":"va"},"spec":{"attacher":"d","nodeName":"n"},
            "status":{"attached":true,"attachmentMetadata":{"rds.csi.srvlab.io\/attached-at":"x","a":"b"}}}"#;
        let va: VolumeAttachment = serde_json::from_slice(escaped).unwrap();
        assert_eq!(va.status.unwrap().attached_at.as_deref(), Some("x"));
    }
}
