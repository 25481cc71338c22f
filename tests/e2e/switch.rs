//! A cluster switching from the Go driver: the RDS holds disks the Go driver made (its own
//! `/disk add` command strings and sizes, typed at the RDS), the API server holds the PVs and
//! VolumeAttachments the Go driver's provisioner and attacher wrote (its volume context, its
//! publish context in `attachmentMetadata`, a live migration in flight), and this driver boots
//! against both with no edit: it seeds, publishes, unpublishes, expands, snapshots, provisions
//! from the Go README's StorageClass, and serves every metric family the Go driver exported.
//!
//! The node half of the switch needs the file backend's loop devices (there is no NVMe/TCP
//! target here), so it is in `tests/e2e/node.rs`, as root: a volume the Go node plugin staged
//! (its device mounted at the staging path, no record) is adopted by NodePublish and then
//! measured, expanded, unpublished and unstaged (`a_volume_the_go_plugin_staged_is_adopted_by_
//! node_publish`, `stats_and_expand_adopt_a_volume_the_go_plugin_staged_and_published`,
//! `a_block_volume_the_go_plugin_attached_is_adopted_by_node_publish`).

use std::collections::HashMap;
use std::time::Duration;

use rds_csi::csi::*;
use serde_json::{json, Value};
use tonic::Code;

use crate::fake_rds::{client_keypair, FakeRds, FakeRdsConfig};
use crate::fake_snmp::FakeSnmp;
use crate::rds::{Rds, GO_README_STORAGE_CLASS};
use crate::snapshots::Snaps;
use crate::support::cluster::{Cluster, DRIVER};
use crate::support::*;

const GIB: i64 = 1 << 30;
const COMMUNITY: &str = "go-switch";
const GO_PATH: &str = "/storage-pool/kubernetes-volumes";
/// A KubeVirt VM's disk (RWX block), mid-migration from n1 to n2 when the switch happens.
const VM: &str = "pvc-3f0c1a52-9a55-4c1e-a0c8-1f4b7c2d9e01";
/// A database's filesystem volume (RWO), attached to n1.
const DB: &str = "pvc-7d2e9b14-0c3a-4f5e-9b6d-2a8c4e1f3b02";

/// Every family `pkg/observability/prometheus.go` of the Go driver registers, with its type.
const GO_FAMILIES: &[(&str, &str)] = &[
    ("rds_csi_volume_operations_total", "counter"),
    ("rds_csi_volume_operation_duration_seconds", "histogram"),
    ("rds_csi_nvme_connects_total", "counter"),
    ("rds_csi_nvme_connect_duration_seconds", "histogram"),
    ("rds_csi_nvme_connections_active", "gauge"),
    ("rds_csi_mount_operations_total", "counter"),
    ("rds_csi_stale_mounts_detected_total", "counter"),
    ("rds_csi_stale_recoveries_total", "counter"),
    ("rds_csi_orphans_cleaned_total", "counter"),
    ("rds_csi_events_posted_total", "counter"),
    ("rds_csi_attachment_attach_total", "counter"),
    ("rds_csi_attachment_detach_total", "counter"),
    ("rds_csi_attachment_conflicts_total", "counter"),
    ("rds_csi_attachment_reconcile_total", "counter"),
    ("rds_csi_attachment_operation_duration_seconds", "histogram"),
    ("rds_csi_attachment_grace_period_used_total", "counter"),
    ("rds_csi_attachment_stale_cleared_total", "counter"),
    ("rds_csi_migration_migrations_total", "counter"),
    ("rds_csi_migration_duration_seconds", "histogram"),
    ("rds_csi_migration_active_migrations", "gauge"),
    ("rds_csi_rds_connection_state", "gauge"),
    ("rds_csi_rds_reconnect_total", "counter"),
    ("rds_csi_rds_reconnect_duration_seconds", "histogram"),
    ("rds_disk_read_ops_per_second", "gauge"),
    ("rds_disk_write_ops_per_second", "gauge"),
    ("rds_disk_read_bytes_per_second", "gauge"),
    ("rds_disk_write_bytes_per_second", "gauge"),
    ("rds_disk_read_latency_milliseconds", "gauge"),
    ("rds_disk_write_latency_milliseconds", "gauge"),
    ("rds_disk_wait_latency_milliseconds", "gauge"),
    ("rds_disk_in_flight_operations", "gauge"),
    ("rds_disk_active_time_milliseconds", "gauge"),
    ("rds_hardware_cpu_temperature_celsius", "gauge"),
    ("rds_hardware_board_temperature_celsius", "gauge"),
    ("rds_hardware_fan1_speed_rpm", "gauge"),
    ("rds_hardware_fan2_speed_rpm", "gauge"),
    ("rds_hardware_psu1_power_watts", "gauge"),
    ("rds_hardware_psu2_power_watts", "gauge"),
    ("rds_hardware_psu1_temperature_celsius", "gauge"),
    ("rds_hardware_psu2_temperature_celsius", "gauge"),
    ("rds_hardware_disk_pool_size_bytes", "gauge"),
    ("rds_hardware_disk_pool_used_bytes", "gauge"),
];

fn nqn(id: &str) -> String {
    format!("nqn.2000-02.com.mikrotik:{id}")
}

/// The `/disk add` the Go driver's `CreateVolume` sends (`pkg/rds/commands.go`), with its
/// size formatting (whole GiB as `10G`).
fn go_disk_add(id: &str, gib: i64) -> String {
    format!(
        "/disk add type=file file-path={GO_PATH}/{id}.img file-size={gib}G slot={id} \
         nvme-tcp-export=yes nvme-tcp-server-port=4420 nvme-tcp-server-nqn={}",
        nqn(id)
    )
}

/// The volume context the Go driver's `CreateVolume` answered, which the external-provisioner
/// stored in the PV's `volumeAttributes` (plus its own identity key).
fn go_volume_context(id: &str) -> Value {
    json!({
        "rdsAddress": "10.42.68.1",
        "nvmeAddress": "10.42.68.1",
        "nvmePort": "4420",
        "nqn": nqn(id),
        "volumePath": format!("{GO_PATH}/{id}.img"),
        "ctrlLossTmo": "-1",
        "reconnectDelay": "5",
        "keepAliveTmo": "0",
        "migrationTimeoutSeconds": "300",
        "storage.kubernetes.io/csiProvisionerIdentity": "1733300000000-8081-rds.csi.srvlab.io",
    })
}

/// The publish context the Go driver's `ControllerPublishVolume` answered
/// (`buildPublishContext`), which the external-attacher stored in `attachmentMetadata`.
fn go_publish_context(id: &str) -> HashMap<String, String> {
    [
        ("nvme_address", "10.42.68.1".to_string()),
        ("nvme_port", "4420".to_string()),
        ("nvme_nqn", nqn(id)),
        ("fs_type", "ext4".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A PV as the external-provisioner wrote it for the Go driver.
fn go_pv(c: &Cluster, name: &str, id: &str, rwx_block: bool) {
    c.api
        .create(
            "persistentvolumes",
            json!({
                "metadata": {
                    "name": name,
                    "annotations": {"pv.kubernetes.io/provisioned-by": DRIVER},
                    "finalizers": ["kubernetes.io/pv-protection"],
                },
                "spec": {
                    "accessModes": [if rwx_block { "ReadWriteMany" } else { "ReadWriteOnce" }],
                    "volumeMode": if rwx_block { "Block" } else { "Filesystem" },
                    "capacity": {"storage": "10Gi"},
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": "rds-nvme-tcp",
                    "csi": {
                        "driver": DRIVER,
                        "volumeHandle": id,
                        "fsType": "ext4",
                        "volumeAttributes": go_volume_context(id),
                    },
                    "claimRef": {"namespace": "vms", "name": format!("claim-{name}"), "uid": format!("uid-{name}")},
                },
            }),
        )
        .unwrap();
}

/// An attached VolumeAttachment as the external-attacher left it for the Go driver.
fn go_va(c: &Cluster, pv: &str, id: &str, node: &str, age: Duration) -> String {
    let va = c.va(pv, id, node, false, age);
    c.mark_attached(&va, &go_publish_context(id));
    va
}

/// The switch, controller side. Catches, each with its own assertion: a Go StorageClass
/// refused (`rdsAddress` checked against the SSH address), Go's disks not found under their
/// slots and paths, Go's VolumeAttachments (no attach instant, Go's publish context) not
/// seeding holders or the migration, a Go family missing from the scrape or of another type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_switches_from_the_go_driver_with_no_edits() {
    // The RDS as the Go driver left it.
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = client_keypair(keys.path());
    let fake = FakeRds::start(FakeRdsConfig::new(public)).await;
    let host_key = fake.write_host_key(keys.path());
    for id in [VM, DB] {
        let out = fake.console(&go_disk_add(id, 10));
        assert!(
            !out.contains("failure") && !out.contains("error"),
            "the RDS refused the Go driver's command: {out}"
        );
    }
    let snmp = FakeSnmp::start(COMMUNITY).await;

    // The cluster as the Go driver's sidecars left it: the VM migrating n1 → n2 (two attached
    // VAs), the database on n1.
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    go_pv(&c, "pv-vm", VM, true);
    go_pv(&c, "pv-db", DB, false);
    let vm_source = go_va(&c, "pv-vm", VM, "n1", Duration::from_secs(3600));
    go_va(&c, "pv-vm", VM, "n2", Duration::from_secs(20));
    go_va(&c, "pv-db", DB, "n1", Duration::from_secs(7200));

    // This driver, as the chart runs it from a Go values file (rds.basePath is the Go
    // StorageClass's volumePath), with nothing edited.
    let snmp_address = snmp.address().to_string();
    let args = Rds::args(
        &fake,
        &key,
        &host_key,
        &[
            "--rds-volume-path",
            GO_PATH,
            "--storage-poll-interval",
            "100ms",
            "--snmp-address",
            &snmp_address,
            "--snmp-community",
            COMMUNITY,
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Driver::start_kube(&c.kubeconfig, &args).await;
    d.wait_ready().await;

    // Seeded from the Go driver's VolumeAttachments.
    let vm = d.debug(VM).await;
    assert_eq!(holders(&vm), ["n1", "n2"], "{vm}");
    assert_eq!(vm["migration"]["source"], "n1", "{vm}");
    assert_eq!(holders(&d.debug(DB).await), ["n1"]);
    let refused = d.publish(DB, "n3", rwo()).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("n1"), "{}", refused.message());

    // The migration finishes as the attacher drives it: the source detaches.
    d.unpublish(VM, "n1").await.unwrap();
    c.api
        .remove_finalizers("volumeattachments", None, &vm_source)
        .unwrap();
    c.api.delete("volumeattachments", None, &vm_source).unwrap();
    assert_eq!(holders(&d.debug(VM).await), ["n2"]);
    let scrape = d.scrape().await;
    assert_eq!(
        sample(
            &scrape,
            r#"rds_csi_migration_migrations_total{result="success"}"#
        ),
        1.0
    );
    // A publish to the node that holds it answers the publish context nodes need.
    let ctx = d.publish(DB, "n1", rwo()).await.unwrap();
    assert!(
        ctx.values().any(|v| v == &nqn(DB)),
        "the Go NQN in the publish context: {ctx:?}"
    );

    // Expansion and a snapshot of a Go disk, with the Go driver's commands.
    fake.clear_commands();
    let grown = d
        .controller()
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: DB.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 12 * GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 12 * GIB);
    assert!(
        fake.commands()
            .iter()
            .any(|c| c.command == format!("/disk set [find slot={DB}] file-size=12G")),
        "{:?}",
        fake.commands()
    );
    let snap = Snaps(&d).snapshot("db-before-switch", DB).await.unwrap();
    assert_eq!(snap.source_volume_id, DB);
    assert!(snap.ready_to_use);

    // A new PVC of the Go README's StorageClass provisions as the Go driver would.
    let new_id = "pvc-0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c04";
    let mut params: HashMap<String, String> = GO_README_STORAGE_CLASS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    params.insert("csi.storage.k8s.io/pvc/name".into(), "new-claim".into());
    params.insert("csi.storage.k8s.io/pvc/namespace".into(), "vms".into());
    params.insert("csi.storage.k8s.io/pv/name".into(), new_id.into());
    fake.clear_commands();
    let created = d
        .controller()
        .create_volume(CreateVolumeRequest {
            name: new_id.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 10 * GIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![rwo()],
            parameters: params,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(created.volume_id, new_id);
    let record = fake.disk(new_id).unwrap().comment;
    assert!(record.starts_with("made-"), "{record}");
    assert!(
        fake.commands()
            .iter()
            .any(|c| c.command == format!("{} comment={record}", go_disk_add(new_id, 10))),
        "the Go driver's /disk add, with this driver's record: {:?}",
        fake.commands()
    );
    for (key, want) in [
        ("rdsAddress", "10.42.68.1"),
        ("nvmeAddress", "10.42.68.1"),
        ("nvmePort", "4420"),
        ("migrationTimeoutSeconds", "300"),
    ] {
        assert_eq!(
            created.volume_context.get(key).map(String::as_str),
            Some(want),
            "{key} in {:?}",
            created.volume_context
        );
    }
    assert_eq!(created.volume_context["nqn"], nqn(new_id));

    // Every Go family, with the Go driver's type, once the storage poller has run.
    eventually("the storage families are filled", || async {
        let s = d.scrape().await;
        s.contains("\nrds_disk_in_flight_operations{")
            && s.contains("\nrds_hardware_fan1_speed_rpm ")
    })
    .await;
    let scrape = d.scrape().await;
    let missing: Vec<String> = GO_FAMILIES
        .iter()
        .filter(|(name, kind)| !scrape.contains(&format!("# TYPE {name} {kind}\n")))
        .map(|(name, kind)| format!("{name} ({kind})"))
        .collect();
    assert!(
        missing.is_empty(),
        "Go families not served with Go's type: {missing:?}"
    );
}
