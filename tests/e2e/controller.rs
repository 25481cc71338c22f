//! The rest of the Controller, Identity and Node services.

use rds_csi::csi::controller_service_capability::rpc::Type as Rpc;
use rds_csi::csi::*;
use tonic::Code;

use crate::support::*;

fn create_req(
    name: &str,
    required: i64,
    limit: i64,
    caps: Vec<VolumeCapability>,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        volume_capabilities: caps,
        parameters: [("migrationTimeoutSeconds".to_string(), "120".to_string())].into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn create_volume_is_idempotent_and_honours_capacity() {
    let d = Driver::start(&[], &[]).await;
    let mut c = d.controller();
    let first = c
        .create_volume(create_req("pvc-1", 5 << 20, 0, vec![rwx()]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(first.capacity_bytes, 5 << 20);
    assert_eq!(first.volume_id, "pvc-1");
    assert_eq!(
        first
            .volume_context
            .get("migrationTimeoutSeconds")
            .map(String::as_str),
        Some("120")
    );
    let again = c
        .create_volume(create_req("pvc-1", 5 << 20, 0, vec![rwx()]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, first);
    let bigger = c
        .create_volume(create_req("pvc-1", 6 << 20, 0, vec![rwx()]))
        .await
        .unwrap_err();
    assert_eq!(bigger.code(), Code::AlreadyExists, "{}", bigger.message());
    let other_caps = c
        .create_volume(create_req("pvc-1", 5 << 20, 0, vec![rwo()]))
        .await
        .unwrap_err();
    assert_eq!(
        other_caps.code(),
        Code::AlreadyExists,
        "{}",
        other_caps.message()
    );
    let mut other_params = create_req("pvc-1", 5 << 20, 0, vec![rwx()]);
    other_params
        .parameters
        .insert("migrationTimeoutSeconds".into(), "900".into());
    let other_params = c.create_volume(other_params).await.unwrap_err();
    assert_eq!(other_params.code(), Code::AlreadyExists);
    assert!(
        other_params.message().contains("parameters"),
        "{}",
        other_params.message()
    );
    let rwx_mount = c
        .create_volume(create_req("pvc-2", 1 << 20, 0, vec![rwx_mount()]))
        .await
        .unwrap_err();
    assert_eq!(rwx_mount.code(), Code::InvalidArgument);
    assert!(rwx_mount
        .message()
        .contains("RWX requires volumeMode: Block"));
    let inverted = c
        .create_volume(create_req("pvc-3", 2 << 20, 1 << 20, vec![rwo()]))
        .await
        .unwrap_err();
    assert_eq!(inverted.code(), Code::OutOfRange);
    let no_caps = c
        .create_volume(create_req("pvc-4", 1 << 20, 0, vec![]))
        .await
        .unwrap_err();
    assert_eq!(no_caps.code(), Code::InvalidArgument);
    let default_size = c
        .create_volume(create_req("pvc-5", 0, 0, vec![rwo()]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(default_size.capacity_bytes, 1 << 30);
    let image = d.dir.path().join("volumes/pvc-1.img");
    assert_eq!(std::fs::metadata(image).unwrap().len(), 5 << 20);
}

#[tokio::test]
async fn delete_volume_is_idempotent_and_refused_while_published() {
    let d = Driver::start(&["n2"], &[]).await;
    d.create("v", rwx()).await;
    d.publish("v", "n1", rwx()).await.unwrap();
    d.publish("v", "n2", rwx()).await.unwrap();
    let mut c = d.controller();
    let del = || DeleteVolumeRequest {
        volume_id: "v".into(),
        ..Default::default()
    };
    let err = c.delete_volume(del()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("n1") && err.message().contains("n2"),
        "{}",
        err.message()
    );
    d.unpublish("v", "").await.unwrap();
    c.delete_volume(del()).await.unwrap();
    c.delete_volume(del()).await.unwrap();
    assert_eq!(
        d.publish("v", "n1", rwx()).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn list_volumes_paginates_and_aborts_on_a_foreign_token() {
    let d = Driver::start(&[], &[]).await;
    for i in 0..7 {
        d.create(&format!("vol-{i}"), rwo()).await;
    }
    let mut c = d.controller();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_volumes(ListVolumesRequest {
                max_entries: 3,
                starting_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.entries.len() <= 3);
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (0..7).map(|i| format!("vol-{i}")).collect::<Vec<_>>());
    let all = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((all.entries.len(), all.next_token.as_str()), (7, ""));
    let bad = c
        .list_volumes(ListVolumesRequest {
            max_entries: 1,
            starting_token: "invalid-token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::Aborted);
    let negative = c
        .list_volumes(ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(negative.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn validate_capacity_capabilities_identity_and_node() {
    let d = Driver::start(&[], &["--driver-name", "example.csi.test"]).await;
    d.create("v", rwo()).await;
    let mut c = d.controller();
    let ok = c
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "v".into(),
            volume_capabilities: vec![rwo(), rwx()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.confirmed.unwrap().volume_capabilities.len(), 2);
    for unsupported in [
        rwx_mount(),
        cap(
            rds_csi::csi::volume_capability::access_mode::Mode::MultiNodeReaderOnly,
            true,
        ),
    ] {
        let no = c
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: "v".into(),
                volume_capabilities: vec![unsupported],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(no.confirmed.is_none() && !no.message.is_empty());
    }
    let missing = c
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "ghost".into(),
            volume_capabilities: vec![rwo()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let capacity = c
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(capacity.available_capacity > 0);

    let caps: Vec<i32> = c
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [
        Rpc::CreateDeleteVolume,
        Rpc::PublishUnpublishVolume,
        Rpc::ListVolumes,
        Rpc::GetCapacity,
        Rpc::PublishReadonly,
        Rpc::ExpandVolume,
        Rpc::CreateDeleteSnapshot,
        Rpc::ListSnapshots,
        Rpc::CloneVolume,
    ] {
        assert!(caps.contains(&(want as i32)), "{want:?} advertised");
    }
    for not in [
        Rpc::ListVolumesPublishedNodes,
        Rpc::GetVolume,
        Rpc::ModifyVolume,
    ] {
        assert!(
            !caps.contains(&(not as i32)),
            "{not:?} must not be advertised: it does not work"
        );
    }

    let mut id = d.identity();
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "example.csi.test");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        id.probe(ProbeRequest {}).await.unwrap().into_inner().ready,
        Some(true)
    );
    let plugin_caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
    assert_eq!(
        plugin_caps.capabilities,
        vec![
            PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: service::Type::ControllerService as i32
                }))
            },
            PluginCapability {
                r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32
                }))
            },
        ]
    );

    let node = d
        .node()
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.node_id, "n1");
    let stage = d
        .node()
        .node_stage_volume(NodeStageVolumeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(stage.code(), Code::InvalidArgument);
    assert!(stage.message().contains("volume_id"), "{}", stage.message());
    let node_caps: Vec<i32> = d
        .node()
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    use node_service_capability::rpc::Type as NodeRpc;
    assert_eq!(
        node_caps,
        [
            NodeRpc::StageUnstageVolume,
            NodeRpc::GetVolumeStats,
            NodeRpc::VolumeCondition,
            NodeRpc::ExpandVolume
        ]
        .map(|r| r as i32)
    );
}

#[tokio::test]
async fn default_driver_name_and_ctl_round_trip() {
    let d = Driver::start(&["n2"], &[]).await;
    let info = d
        .identity()
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "rds.csi.srvlab.io");
    let endpoint = format!("unix://{}", d.socket.display());
    let ctl = |args: &[&str]| {
        std::process::Command::new(BIN)
            .arg("ctl")
            .arg("--endpoint")
            .arg(&endpoint)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(ctl(&["create", "disk", "--size", "2MiB", "--rwx-block"])
        .status
        .success());
    assert!(ctl(&["publish", "disk", "n1", "--rwx-block"])
        .status
        .success());
    let out = ctl(&["publish", "disk", "n2", "--rwx-block", "--json"]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["node"], "n2");
    let refused = ctl(&["publish", "disk", "n3", "--rwx-block"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("NotFound"));
    assert!(ctl(&["unpublish", "disk"]).status.success());
    let list = ctl(&["list", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(json["volumes"][0], "disk 2097152 bytes");
}
