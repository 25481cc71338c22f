//! `rds-csi --backend rds` against the fake RouterOS over real SSH: the controller's volume
//! operations with the Go driver's commands, idempotency, error text, host keys, a link that
//! drops or hangs, hostile values, and a volume the Go driver made.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rds_csi::csi::*;
use tonic::Code;

use crate::fake_rds::{client_keypair, Disk, FakeRds, FakeRdsConfig};
use crate::support::*;

const GIB: i64 = 1 << 30;
const GO_VOLUME: &str = "pvc-0f923194-922a-5dd8-b376-c2c6ccb56dd8";

/// The fake RDS and the driver (controller only) pointed at it.
pub(crate) struct Rds {
    pub(crate) fake: FakeRds,
    pub(crate) d: Driver,
}

impl Rds {
    pub(crate) async fn start(extra: &[&str]) -> Rds {
        let keys = tempfile::tempdir().unwrap();
        let (key, public) = client_keypair(keys.path());
        let fake = FakeRds::start(FakeRdsConfig::new(public)).await;
        let host_key = fake.write_host_key(keys.path());
        let d = Self::driver(&fake, &key, &host_key, extra).await;
        // The keys live as long as the test process; the directory is removed at exit.
        std::mem::forget(keys);
        Rds { fake, d }
    }

    pub(crate) async fn driver(
        fake: &FakeRds,
        key: &Path,
        host_key: &Path,
        extra: &[&str],
    ) -> Driver {
        let args = Self::args(fake, key, host_key, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Driver::start(&[], &args).await
    }

    /// The controller's flags for the RDS backend against `fake`, then `extra`.
    pub(crate) fn args(fake: &FakeRds, key: &Path, host_key: &Path, extra: &[&str]) -> Vec<String> {
        let address = fake.address().to_string();
        let mut args: Vec<String> = [
            "--mode",
            "controller",
            "--backend",
            "rds",
            "--rds-address",
            &address,
            "--rds-key-file",
            key.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !extra.contains(&"--rds-command-timeout") {
            args.extend(["--rds-command-timeout".into(), "3s".into()]);
        }
        if !extra.contains(&"--rds-insecure-skip-verify") && !extra.contains(&"--rds-host-key") {
            args.push("--rds-host-key".into());
            args.push(host_key.display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    async fn create(
        &self,
        name: &str,
        bytes: i64,
        params: &[(&str, &str)],
    ) -> Result<Volume, tonic::Status> {
        self.create_with(name, bytes, rwx(), params).await
    }

    /// CreateVolume with a deadline: `grpc-timeout` set to `timeout`, as the external-provisioner
    /// sends its `--timeout`.
    async fn create_within(&self, name: &str, timeout: Duration) -> Result<Volume, tonic::Status> {
        let mut req = tonic::Request::new(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: GIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![rwx()],
            parameters: [("nvmeAddress".to_string(), "10.0.0.1".to_string())].into(),
            ..Default::default()
        });
        req.set_timeout(timeout);
        self.d
            .controller()
            .create_volume(req)
            .await
            .map(|r| r.into_inner().volume.unwrap())
    }

    async fn delete(&self, id: &str) -> Result<(), tonic::Status> {
        self.d
            .controller()
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    async fn expand(&self, id: &str, bytes: i64) -> Result<i64, tonic::Status> {
        self.d
            .controller()
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: id.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().capacity_bytes)
    }

    async fn list(&self, max: i32, token: &str) -> ListVolumesResponse {
        self.d
            .controller()
            .list_volumes(ListVolumesRequest {
                max_entries: max,
                starting_token: token.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub(crate) async fn wait_ready(&self) {
        self.d.wait_ready().await;
    }

    pub(crate) fn commands(&self) -> Vec<String> {
        self.fake
            .commands()
            .into_iter()
            .map(|c| c.command)
            .collect()
    }
}

#[tokio::test]
async fn volumes_are_created_listed_grown_and_deleted_with_the_go_drivers_commands() {
    let r = Rds::start(&[]).await;
    r.wait_ready().await;
    let v = r
        .create(
            "pvc-1b2c3d4e-0000-4000-8000-000000000001",
            10 * GIB,
            &[
                ("nvmeAddress", "10.42.68.1"),
                ("migrationTimeoutSeconds", "600"),
            ],
        )
        .await
        .unwrap();
    let id = "pvc-1b2c3d4e-0000-4000-8000-000000000001";
    assert_eq!((v.volume_id.as_str(), v.capacity_bytes), (id, 10 * GIB));
    let ctx = &v.volume_context;
    assert_eq!(ctx["nqn"], format!("nqn.2000-02.com.mikrotik:{id}"));
    assert_eq!(ctx["nvmeAddress"], "10.42.68.1");
    assert_eq!(ctx["nvmePort"], "4420");
    assert_eq!(
        ctx["volumePath"],
        format!("/storage-pool/metal-csi/{id}.img")
    );
    assert_eq!(
        (
            ctx["ctrlLossTmo"].as_str(),
            ctx["reconnectDelay"].as_str(),
            ctx["keepAliveTmo"].as_str()
        ),
        ("-1", "5", "0")
    );
    assert_eq!(ctx["migrationTimeoutSeconds"], "600");
    let sent = r.commands();
    let disk = r.fake.disk(id).unwrap();
    assert!(disk.comment.starts_with("made-"), "{}", disk.comment);
    assert!(
        sent.contains(&format!(
            "/disk add type=file file-path=/storage-pool/metal-csi/{id}.img file-size=10G slot={id} nvme-tcp-export=yes nvme-tcp-server-port=4420 nvme-tcp-server-nqn=nqn.2000-02.com.mikrotik:{id} comment={}",
            disk.comment
        )),
        "the Go driver's add, its record given on it: {sent:#?}"
    );
    assert!(
        !sent.iter().any(|c| c.starts_with("/disk set")),
        "one write: {sent:#?}"
    );
    assert!(disk.nvme_tcp_export && disk.file_size == 10 << 30);

    // Idempotent: the same name and size again answers the existing volume, sends no add.
    let adds = |r: &Rds| {
        r.commands()
            .iter()
            .filter(|c| c.starts_with("/disk add"))
            .count()
    };
    let again = r
        .create(
            id,
            10 * GIB,
            &[
                ("nvmeAddress", "10.42.68.1"),
                ("migrationTimeoutSeconds", "600"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(again.volume_id, id);
    assert_eq!(adds(&r), 1);
    let bigger = r
        .create(
            id,
            20 * GIB,
            &[
                ("nvmeAddress", "10.42.68.1"),
                ("migrationTimeoutSeconds", "600"),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(bigger.code(), Code::AlreadyExists, "{}", bigger.message());

    // A size RouterOS cannot take exactly is rounded up, never down.
    let odd = r
        .create(
            "pvc-1b2c3d4e-0000-4000-8000-000000000002",
            3 * GIB / 2 + 1,
            &[("nvmeAddress", "10.42.68.1")],
        )
        .await
        .unwrap();
    assert!(odd.capacity_bytes > 3 * GIB / 2, "{}", odd.capacity_bytes);
    assert!(r.commands().iter().any(|c| c.contains("file-size=1537M")));

    // Expansion, idempotent, never shrinking.
    assert_eq!(r.expand(id, 12 * GIB).await.unwrap(), 12 * GIB);
    assert!(r
        .commands()
        .contains(&format!("/disk set [find slot={id}] file-size=12G")));
    assert_eq!(r.expand(id, 12 * GIB).await.unwrap(), 12 * GIB);
    assert_eq!(
        r.expand(id, 11 * GIB).await.unwrap_err().code(),
        Code::OutOfRange
    );
    assert_eq!(r.fake.disk(id).unwrap().file_size, 12 << 30);

    // Capacity from the pool's free bytes.
    let free =
        r.d.controller()
            .get_capacity(GetCapacityRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert_eq!(free.available_capacity as u64, r.fake.pool_free_bytes());

    // Delete: the disk, then its backing file; again is OK.
    r.delete(id).await.unwrap();
    assert!(r.fake.disk(id).is_none());
    assert!(
        r.fake
            .file(&format!("storage-pool/metal-csi/{id}.img"))
            .is_none(),
        "the backing file is gone too"
    );
    assert!(r
        .commands()
        .contains(&format!("/disk remove [find slot={id}]")));
    assert!(r.commands().contains(&format!(
        "/file remove [find name=\"storage-pool/metal-csi/{id}.img\"]"
    )));
    r.delete(id).await.unwrap();
    assert_eq!(
        r.expand(id, 20 * GIB).await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn list_volumes_pages_through_every_volume() {
    let r = Rds::start(&[]).await;
    r.wait_ready().await;
    let mut want = Vec::new();
    for i in 0..7 {
        let v = r
            .create(
                &format!("sanity-style name {i}"),
                GIB,
                &[("nvmeAddress", "10.0.0.1")],
            )
            .await
            .unwrap();
        assert!(v.volume_id.starts_with("pvc-"), "{}", v.volume_id);
        want.push(v.volume_id);
    }
    want.sort();
    let (mut seen, mut token) = (Vec::new(), String::new());
    loop {
        let page = r.list(3, &token).await;
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
    assert_eq!(seen, want);
    assert!(
        r.commands().iter().all(|c| !c.contains("sanity-style")),
        "names never reach a command"
    );
}

#[tokio::test]
async fn routeros_failure_text_maps_to_csi_codes() {
    let r = Rds::start(&[]).await;
    r.wait_ready().await;
    r.fake
        .fail_matching("/disk add", "failure: not enough space\r\n", 0, 1);
    let err = r
        .create("pvc-full", GIB, &[("nvmeAddress", "10.0.0.1")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    r.fake.fail_matching(
        "/disk add",
        "input does not match any value of file-size\r\n",
        0,
        1,
    );
    let err = r
        .create("pvc-rejected", GIB, &[("nvmeAddress", "10.0.0.1")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{}", err.message());
    assert!(
        err.message().contains("input does not match"),
        "{}",
        err.message()
    );
    r.create("pvc-grow", GIB, &[("nvmeAddress", "10.0.0.1")])
        .await
        .unwrap();
    r.fake
        .fail_matching("/disk set", "failure: something else went wrong\r\n", 0, 1);
    let err = r.expand("pvc-grow", 2 * GIB).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(
        err.message().contains("something else went wrong"),
        "{}",
        err.message()
    );
    // A non-zero exit status without failure text is a failure too.
    r.fake.fail_matching("/disk add", "", 1, 1);
    let err = r
        .create("pvc-exit", GIB, &[("nvmeAddress", "10.0.0.1")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{}", err.message());
    // And the volume the failures left nothing of can be made afterwards.
    r.create("pvc-full", GIB, &[("nvmeAddress", "10.0.0.1")])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_wrong_host_key_is_refused_and_the_insecure_flag_accepts_it_loudly() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = client_keypair(keys.path());
    let fake = FakeRds::start(FakeRdsConfig::new(public.clone())).await;
    let impostor = FakeRds::start(FakeRdsConfig::new(public)).await;
    let wrong = impostor.write_host_key(&keys.path().join("other").tap_mkdir());
    let d = Rds::driver(&fake, &key, &wrong, &[]).await;
    eventually("the host key mismatch is logged", || async {
        d.log()
            .contains("is not the one configured in --rds-host-key")
    })
    .await;
    assert!(
        !d.ready().await,
        "not ready while the RDS cannot be verified"
    );
    let err = d
        .controller()
        .create_volume(CreateVolumeRequest {
            name: "pvc-x".into(),
            volume_capabilities: vec![rwx()],
            parameters: [("nvmeAddress".to_string(), "10.0.0.1".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        fake.commands().is_empty(),
        "no command reached an unverified server"
    );
    let m = d.scrape().await;
    assert!(
        m.contains("rds_csi_rds_connection_state{address=\"")
            && m.contains("host_key=\"verified\"} 0"),
        "{m}"
    );

    // A known_hosts file naming the real key works.
    let known = fake.write_known_hosts(keys.path());
    let d = Rds::driver(&fake, &key, &known, &[]).await;
    d.wait_ready().await;

    let d = Rds::driver(&fake, &key, &wrong, &["--rds-insecure-skip-verify"]).await;
    d.wait_ready().await;
    d.wait_for_log("--rds-insecure-skip-verify: the RDS's host key is NOT verified")
        .await;
    let m = d.scrape().await;
    assert!(m.contains("host_key=\"insecure-skip-verify\"} 1"), "{m}");
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[tokio::test]
async fn the_driver_reconnects_after_the_rds_drops_every_connection() {
    let r = Rds::start(&[]).await;
    r.wait_ready().await;
    r.create("pvc-before", GIB, &[("nvmeAddress", "10.0.0.1")])
        .await
        .unwrap();
    let accepted = r.fake.connections_accepted();
    r.fake.drop_all_connections();
    // The next RPCs may meet the dead connection once; the driver re-dials and carries on.
    eventually("the driver reconnected and created the volume", || async {
        match r
            .create("pvc-after", GIB, &[("nvmeAddress", "10.0.0.1")])
            .await
        {
            Ok(_) => true,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
                false
            }
        }
    })
    .await;
    assert!(
        r.fake.connections_accepted() > accepted,
        "a new connection was made"
    );
    assert!(r.fake.disk("pvc-after").is_some());
    r.wait_ready().await;
}

#[tokio::test]
async fn rpcs_fail_unavailable_instead_of_hanging_when_the_rds_does() {
    let r = Rds::start(&[]).await;
    r.wait_ready().await;
    // Commands that never answer: the command timeout (3 s here) ends them.
    r.fake.hang(true);
    let err = r
        .create("pvc-hung", GIB, &[("nvmeAddress", "10.0.0.1")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("did not answer"),
        "{}",
        err.message()
    );
    r.fake.hang(false);
    // The RDS gone altogether: not ready, and RPCs fail by their deadline rather than hang.
    r.fake.refuse_connections(true);
    r.fake.drop_all_connections();
    eventually("not ready while the RDS is unreachable", || async {
        !r.d.ready().await
    })
    .await;
    let readyz = http_get(&format!("{}/readyz", r.d.metrics_url().await)).await;
    assert!(readyz.contains("cannot be reached"), "{readyz}");
    let err = r
        .create("pvc-down", GIB, &[("nvmeAddress", "10.0.0.1")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    r.fake.refuse_connections(false);
    r.wait_ready().await;
    r.create("pvc-down", GIB, &[("nvmeAddress", "10.0.0.1")])
        .await
        .unwrap();
}

#[tokio::test]
async fn hostile_values_are_refused_before_any_command_is_sent() {
    let r = Rds::start(&[]).await;
    r.wait_ready().await;
    r.fake.clear_commands();
    let corpus = rds_csi::backend::rds::values::hostile_corpus();
    for bad in &corpus {
        for (key, value) in [
            ("volumePath", format!("/storage-pool/{bad}")),
            ("nvmeAddress", bad.clone()),
            ("nvmePort", format!("70000{bad}")),
            ("rdsAddress", bad.clone()),
            ("ctrlLossTmo", bad.clone()),
            ("reconnectDelay", bad.clone()),
            ("keepAliveTmo", bad.clone()),
        ] {
            let err = r
                .create("pvc-hostile", GIB, &[(key, value.as_str())])
                .await
                .unwrap_err();
            assert_eq!(
                err.code(),
                Code::InvalidArgument,
                "{key}={bad:?}: {}",
                err.message()
            );
            assert!(err.message().contains(key), "{key}: {}", err.message());
        }
        for rpc in ["delete", "expand"] {
            let result = match rpc {
                "delete" => r.delete(bad).await.map(drop),
                _ => r.expand(bad, GIB).await.map(drop),
            };
            // Ids are validated before any path or command; a valid id that is no RouterOS
            // slot names nothing the RDS could hold.
            match result {
                Err(e) => assert!(
                    matches!(e.code(), Code::InvalidArgument | Code::NotFound),
                    "{rpc} {bad:?}: {:?}",
                    e.code()
                ),
                Ok(()) => assert_eq!(rpc, "delete", "{bad:?}"),
            }
        }
    }
    let sent = r.commands();
    assert!(sent.is_empty(), "commands were sent: {sent:#?}");
    // Parameters the Go driver ignores are ignored whatever they hold: nothing of them
    // reaches the RDS.
    let hostile = "pvc-1;/system reboot";
    r.create(
        "pvc-ignored",
        GIB,
        &[
            ("nvmeAddress", "10.0.0.1"),
            ("sshPort", hostile),
            ("nqnPrefix", hostile),
            // No number in it: the Go driver's default port, as it reads it.
            ("nvmePort", hostile),
        ],
    )
    .await
    .unwrap();
    let sent = r.commands();
    assert!(
        !sent.is_empty() && sent.iter().all(|c| !c.contains("/system")),
        "{sent:#?}"
    );
    assert_eq!(r.fake.violations(), [], "one plain command per line");
}

#[tokio::test]
async fn a_volume_the_go_driver_made_is_used_unchanged() {
    let r = Rds::start(&[]).await;
    r.fake.add_disk(Disk::volume(GO_VOLUME, 5 << 30)).unwrap();
    r.wait_ready().await;
    let listed = r.list(0, "").await;
    let ids: Vec<_> = listed
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    assert_eq!(ids, vec![GO_VOLUME.to_string()]);
    // The external-provisioner's retry of the Go driver's CreateVolume finds it as it is.
    let v = r
        .create(GO_VOLUME, 5 * GIB, &[("nvmeAddress", "10.42.68.1")])
        .await
        .unwrap();
    assert_eq!(
        v.volume_context["nqn"],
        format!("nqn.2000-02.com.mikrotik:{GO_VOLUME}")
    );
    assert_eq!(
        v.volume_context["volumePath"],
        format!("/storage-pool/metal-csi/{GO_VOLUME}.img")
    );
    assert!(
        !r.commands().iter().any(|c| c.starts_with("/disk add")),
        "nothing was re-created"
    );
    // It publishes (the controller finds it), grows and is deleted with its file.
    let ctx = r.d.publish(GO_VOLUME, "n1", rwx()).await.unwrap();
    assert_eq!(ctx["backend"], "rds");
    assert_eq!(
        ctx["nvme_nqn"],
        format!("nqn.2000-02.com.mikrotik:{GO_VOLUME}")
    );
    assert_eq!(r.expand(GO_VOLUME, 6 * GIB).await.unwrap(), 6 * GIB);
    r.d.unpublish(GO_VOLUME, "n1").await.unwrap();
    r.delete(GO_VOLUME).await.unwrap();
    assert!(
        r.fake.disks().is_empty() && r.fake.files().iter().all(|f| !f.name.contains(GO_VOLUME))
    );
}

impl Rds {
    async fn create_with(
        &self,
        name: &str,
        bytes: i64,
        capability: VolumeCapability,
        params: &[(&str, &str)],
    ) -> Result<Volume, tonic::Status> {
        self.d
            .controller()
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![capability],
                parameters: params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().volume.unwrap())
    }
}

/// The Go README's example StorageClass, verbatim: `rdsAddress` is the RDS's storage address,
/// not this controller's SSH address (127.0.0.1 here).
pub(crate) const GO_README_STORAGE_CLASS: [(&str, &str); 6] = [
    ("rdsAddress", "10.42.68.1"),
    ("nvmePort", "4420"),
    ("sshPort", "22"),
    ("fsType", "ext4"),
    ("volumePath", "/storage-pool/kubernetes-volumes"),
    ("nqnPrefix", "nqn.2000-02.com.mikrotik"),
];

/// A filesystem PVC of the Go README's StorageClass provisions with the `/disk add` the Go
/// driver sends and answers the Go driver's volume context. Catches `rdsAddress` being checked
/// against `--rds-address` (it was INVALID_ARGUMENT), `sshPort` against the SSH port, and the
/// volume context losing Go's `rdsAddress` echo or `migrationTimeoutSeconds` default.
#[tokio::test]
async fn the_go_readmes_storage_class_provisions_with_the_go_drivers_disk_command() {
    let r = Rds::start(&[]).await;
    r.wait_ready().await;
    let id = "pvc-6f1e2d3c-0000-4000-8000-00000000a001";
    let v = r
        .create_with(id, 10 * GIB, rwo(), &GO_README_STORAGE_CLASS)
        .await
        .unwrap();
    assert_eq!(
        r.commands()
            .iter()
            .filter(|c| c.starts_with("/disk add"))
            .collect::<Vec<_>>(),
        vec![&format!(
            "/disk add type=file file-path=/storage-pool/kubernetes-volumes/{id}.img \
             file-size=10G slot={id} nvme-tcp-export=yes nvme-tcp-server-port=4420 \
             nvme-tcp-server-nqn=nqn.2000-02.com.mikrotik:{id} comment={}",
            r.fake.disk(id).unwrap().comment
        )]
    );
    let go_context: std::collections::HashMap<String, String> = [
        ("rdsAddress", "10.42.68.1".to_string()),
        ("nvmeAddress", "10.42.68.1".to_string()),
        ("nvmePort", "4420".to_string()),
        ("nqn", format!("nqn.2000-02.com.mikrotik:{id}")),
        (
            "volumePath",
            format!("/storage-pool/kubernetes-volumes/{id}.img"),
        ),
        ("ctrlLossTmo", "-1".to_string()),
        ("reconnectDelay", "5".to_string()),
        ("keepAliveTmo", "0".to_string()),
        ("migrationTimeoutSeconds", "300".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .chain([("fsType".to_string(), "ext4".to_string())])
    .collect();
    assert_eq!(v.volume_context, go_context);
    assert_eq!(v.capacity_bytes, 10 * GIB);

    // The same StorageClass with ext3, which the Go node plugin formats.
    let ext3 = |mut c: VolumeCapability| {
        if let Some(volume_capability::AccessType::Mount(m)) = c.access_type.as_mut() {
            m.fs_type = "ext3".into();
        }
        c
    };
    let mut params = GO_README_STORAGE_CLASS;
    params[3] = ("fsType", "ext3");
    let id3 = "pvc-6f1e2d3c-0000-4000-8000-00000000a003";
    let v = r.create_with(id3, GIB, ext3(rwo()), &params).await.unwrap();
    assert_eq!(v.volume_context["fsType"], "ext3");
    // A filesystem Go's node could not format is refused at once, for a filesystem volume.
    params[3] = ("fsType", "btrfs");
    let err = r
        .create_with("pvc-btrfs", GIB, rwo(), &params)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("fsType"), "{}", err.message());
}

/// Parameters the Go driver never reads (`sshPort`, `nqnPrefix`, a typo) are accepted and
/// ignored: the NQN stays the Go driver's, one warning per StorageClass (however many PVCs
/// it provisions; the provisioner's own `csi.storage.k8s.io/` keys differ per PVC and are not
/// part of it), and a counter per ignored parameter. Catches `sshPort`/`nqnPrefix` being
/// refused or obeyed, a warning per call, and the counter not moving.
#[tokio::test]
async fn parameters_the_go_driver_ignores_are_ignored_with_one_warning_per_storage_class() {
    let r = Rds::start(&[]).await;
    r.wait_ready().await;
    for i in 0..3 {
        let id = format!("pvc-6f1e2d3c-0000-4000-8000-00000000b00{i}");
        let claim = format!("claim-{i}");
        let v = r
            .create(
                &id,
                GIB,
                &[
                    ("nvmeAddress", "10.42.68.1"),
                    ("sshPort", "2222"),
                    ("nqnPrefix", "nqn.2014-08.org.example"),
                    ("volumPath", "/storage-pool/typo"),
                    ("nvmePort", "not a port"),
                    ("csi.storage.k8s.io/pvc/name", &claim),
                    ("csi.storage.k8s.io/pvc/namespace", "default"),
                    ("csi.storage.k8s.io/pv/name", &id),
                ],
            )
            .await
            .unwrap();
        assert_eq!(
            v.volume_context["nqn"],
            format!("nqn.2000-02.com.mikrotik:{id}")
        );
        assert!(!v.volume_context.contains_key("sshPort"));
        assert_eq!(
            v.volume_context["volumePath"],
            format!("/storage-pool/metal-csi/{id}.img")
        );
    }
    const WARNING: &str = "StorageClass parameters the Go driver ignores";
    let log = r.d.wait_for_log_count("created on the RDS", 3).await;
    assert_eq!(log.matches(WARNING).count(), 1, "{log}");
    let m = r.d.scrape().await;
    for p in ["sshPort", "nqnPrefix", "volumPath", "nvmePort"] {
        assert!(
            m.contains(&format!(
                "rds_csi_storageclass_parameters_ignored_total{{parameter=\"{p}\"}} 3"
            )),
            "{p}: {m}"
        );
    }
    assert!(!m.contains("parameter=\"csi.storage.k8s.io"), "{m}");

    // Another StorageClass warns once more.
    r.create(
        "pvc-6f1e2d3c-0000-4000-8000-00000000b009",
        GIB,
        &[("nvmeAddress", "10.42.68.1"), ("sshPort", "22")],
    )
    .await
    .unwrap();
    r.d.wait_for_log_count(WARNING, 2).await;
    let log = r.d.wait_for_log_count("created on the RDS", 4).await;
    assert_eq!(log.matches(WARNING).count(), 2, "{log}");
}

/// GetCapacity asks the pool the StorageClass's `volumePath` names, as the Go driver does.
/// Catches GetCapacity always asking `--rds-volume-path`'s pool.
#[tokio::test]
async fn get_capacity_asks_the_pool_of_the_storage_classs_volume_path() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = client_keypair(keys.path());
    let fake = FakeRds::start(FakeRdsConfig {
        mount_point: "nvme1".into(),
        ..FakeRdsConfig::new(public)
    })
    .await;
    let host_key = fake.write_host_key(keys.path());
    let d = Rds::driver(&fake, &key, &host_key, &[]).await;
    d.wait_ready().await;
    let free = d
        .controller()
        .get_capacity(GetCapacityRequest {
            parameters: [("volumePath".to_string(), "/nvme1/kubernetes".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(free.available_capacity as u64, fake.pool_free_bytes());
    assert!(
        fake.commands()
            .iter()
            .any(|c| c.command == "/disk print detail where mount-point=\"nvme1\""),
        "{:#?}",
        fake.commands()
    );
    let err = d
        .controller()
        .get_capacity(GetCapacityRequest {
            parameters: [("volumePath".to_string(), "/nvme1/a;b".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
}

/// A CreateVolume repeated with the same name but other parameters or capabilities is
/// ALREADY_EXISTS (CSI CreateVolume: "compatible with the specified capacity_range,
/// volume_capabilities, parameters"), as with the file backend; the same request again is
/// the volume. A disk with no record (the Go driver's) takes the first request's. Catches the
/// RDS idempotency check comparing only size and path.
#[tokio::test]
async fn a_repeated_create_volume_with_incompatible_parameters_is_already_exists() {
    let r = Rds::start(&[]).await;
    r.wait_ready().await;
    let id = "pvc-6f1e2d3c-0000-4000-8000-00000000c001";
    let params = [("nvmeAddress", "10.42.68.1"), ("nvmePort", "4420")];
    r.create(id, 2 * GIB, &params).await.unwrap();
    r.create(id, 2 * GIB, &params).await.unwrap();
    let err = r
        .create(
            id,
            2 * GIB,
            &[("nvmeAddress", "10.42.68.1"), ("nvmePort", "4421")],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    assert!(err.message().contains("nvmePort"), "{}", err.message());
    let err = r
        .create(
            id,
            2 * GIB,
            &[
                ("nvmeAddress", "10.42.68.1"),
                ("volumePath", "/storage-pool/other"),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    let err = r.create(id, 3 * GIB, &params).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    // What RouterOS does not show: another address, timing, or capability.
    for other in [
        vec![("nvmeAddress", "10.42.68.2"), ("nvmePort", "4420")],
        vec![
            ("nvmeAddress", "10.42.68.1"),
            ("nvmePort", "4420"),
            ("ctrlLossTmo", "60"),
        ],
    ] {
        let err = r.create(id, 2 * GIB, &other).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::AlreadyExists,
            "{other:?}: {}",
            err.message()
        );
    }
    let err = r
        .create_with(id, 2 * GIB, rwo_block(), &params)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    // The provisioner's per-claim keys are not the StorageClass's: the same volume.
    let mut claim = params.to_vec();
    claim.push(("csi.storage.k8s.io/pvc/name", "claim-1"));
    r.create(id, 2 * GIB, &claim).await.unwrap();
    assert_eq!(
        r.commands()
            .iter()
            .filter(|c| c.starts_with("/disk add"))
            .count(),
        1
    );

    // The Go driver's disk, no record: the first CreateVolume's is kept and held to.
    r.fake.add_disk(Disk::volume(GO_VOLUME, 5 << 30)).unwrap();
    r.create(GO_VOLUME, 5 * GIB, &params).await.unwrap();
    r.create(GO_VOLUME, 5 * GIB, &params).await.unwrap();
    let err = r
        .create(GO_VOLUME, 5 * GIB, &[("nvmeAddress", "10.42.68.2")])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
}

/// The value of an unlabelled sample in a scrape (0 when absent).
fn sample(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A CreateVolume that arrives while the RDS restarts waits for it and succeeds once the RDS
/// accepts again, within the call's deadline; the outage is one
/// `rds_csi_rds_reconnect_duration_seconds` sample. Catches the `Dial::At` wait in
/// `SshPool::handle` (without it the call is UNAVAILABLE at its first refused dial) and the
/// re-dial after a failed one (without it, at its second).
#[tokio::test]
async fn a_create_during_an_rds_restart_waits_for_the_reconnect_its_deadline_covers() {
    let r = Rds::start(&["--rds-pool-size", "1", "--rds-command-timeout", "60s"]).await;
    r.wait_ready().await;
    r.create_within("pvc-before", Duration::from_secs(30))
        .await
        .unwrap();
    let metrics = format!("{}/metrics", r.d.metrics_url().await);
    let outages = sample(
        &http_get(&metrics).await,
        "rds_csi_rds_reconnect_duration_seconds_count",
    );
    r.fake.begin_restart();
    let refused = r.fake.connections_refused();
    let create = r.create_within("pvc-during", Duration::from_secs(30));
    tokio::pin!(create);
    // The driver has been refused twice since the restart began: the call is re-dialling.
    tokio::select! {
        result = &mut create => panic!("the call ended while the RDS was down: {result:?}"),
        () = r.fake.wait_until("two refused dials", || {
            r.fake.connections_refused() >= refused + 2
        }) => {}
    }
    assert!(r.fake.disk("pvc-during").is_none());
    r.fake.end_restart();
    let volume = create.await.unwrap_or_else(|e| {
        panic!("{:?}: {}", e.code(), e.message());
    });
    assert_eq!(volume.volume_id, "pvc-during");
    assert!(r.fake.disk("pvc-during").is_some());
    let scrape = http_get(&metrics).await;
    assert_eq!(
        sample(&scrape, "rds_csi_rds_reconnect_duration_seconds_count"),
        outages + 1.0,
        "one outage, one sample:\n{scrape}"
    );
    // The Go driver's label value: the host, no port.
    assert!(
        scrape
            .contains(r#"rds_csi_rds_connection_state{address="127.0.0.1",host_key="verified"} 1"#),
        "{scrape}"
    );
}

/// A call whose deadline ends before the next dial fails at once, UNAVAILABLE, saying when
/// that dial is (and the RDS sees no dial from it); one whose deadline covers some dials makes
/// them, then fails the same way, by its deadline. Catches `Dial::TooLate` (without it the
/// short call waits and is cut off by tonic, CANCELLED, with no word of the next attempt).
#[tokio::test]
async fn a_call_whose_deadline_ends_before_the_next_dial_fails_at_once_and_says_when() {
    let r = Rds::start(&["--rds-pool-size", "1", "--rds-command-timeout", "60s"]).await;
    r.wait_ready().await;
    r.fake.begin_restart();
    let refused = r.fake.connections_refused();
    // 5.4 s to spend: dials at about 0, 0.5, 1.5 and 3.5 s (each ±20 %), the next after 6 s.
    let err = r
        .create_within("pvc-six-seconds", Duration::from_secs(6))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("next attempt in")
            && err.message().contains("later than this call can wait"),
        "{}",
        err.message()
    );
    assert!(
        r.fake.connections_refused() >= refused + 3,
        "the call re-dialled while its deadline covered it ({} refused)",
        r.fake.connections_refused() - refused
    );
    // The backoff is now over 3 s: a call with 1.8 s to spend does not wait for it.
    let refused = r.fake.connections_refused();
    let err = r
        .create_within("pvc-two-seconds", Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("is unreachable")
            && err.message().contains("next attempt in")
            && err.message().contains("later than this call can wait"),
        "{}",
        err.message()
    );
    assert_eq!(
        r.fake.connections_refused(),
        refused,
        "no dial from the short call"
    );
    assert!(r.fake.commands_matching("pvc-").is_empty());
    r.fake.end_restart();
    r.wait_ready().await;
    r.create_within("pvc-two-seconds", Duration::from_secs(30))
        .await
        .unwrap();
}

/// An RDS that hangs, on its commands or before its SSH banner, still gets the call answered
/// by the call's deadline, UNAVAILABLE with the reason, though `--rds-command-timeout` is a
/// minute. Catches the caller's deadline dropped from `SshPool::run` (tonic then cuts the call
/// off at the deadline, CANCELLED "Timeout expired").
#[tokio::test]
async fn a_hung_rds_is_answered_within_the_calls_deadline() {
    let r = Rds::start(&["--rds-pool-size", "1", "--rds-command-timeout", "60s"]).await;
    r.wait_ready().await;
    r.fake.hang(true);
    let err = r
        .create_within("pvc-hung", Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("did not answer") && err.message().contains("this call's deadline"),
        "{}",
        err.message()
    );
    r.fake.hang(false);
    // A host that takes the TCP connection and never speaks.
    r.fake.stop_accepting(true);
    r.fake.drop_all_connections();
    let err = r
        .create_within("pvc-wedged", Duration::from_secs(2))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("this call's deadline"),
        "{}",
        err.message()
    );
    r.fake.stop_accepting(false);
    r.wait_ready().await;
}

/// A ControllerPublish that must read its volume from an RDS that is down answers by its
/// live-check budget (8 s), UNAVAILABLE and saying when the next dial is, not when
/// `--rds-command-timeout` (a minute) or the Router's 30 s mailbox timeout runs out. Catches the
/// `deadline::scope` around Publish's checks in `VolumeActor::publish` (without it the call is
/// DEADLINE_EXCEEDED after 30 s).
#[tokio::test]
async fn a_publish_while_the_rds_is_down_answers_by_its_budget() {
    let r = Rds::start(&["--rds-pool-size", "1", "--rds-command-timeout", "60s"]).await;
    r.wait_ready().await;
    r.create_within("pvc-published", Duration::from_secs(30))
        .await
        .unwrap();
    r.fake.begin_restart();
    let err = r.d.publish("pvc-published", "n1", rwx()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("later than this call can wait"),
        "{}",
        err.message()
    );
    r.fake.end_restart();
}

/// `rds-csi --mode node --backend rds` with its host NQN file at `hostnqn`, in `dir`; the
/// prefix matches no subsystem, so the node reconciler's first pass touches nothing here.
fn spawn_rds_node(dir: &Path, hostnqn: &Path) -> std::process::Child {
    let log = std::fs::File::create(dir.join("driver.log")).unwrap();
    std::process::Command::new(BIN)
        .env("KUBECONFIG", dir.join("no-such-kubeconfig"))
        .env("RUST_LOG", "info")
        .arg("--endpoint")
        .arg(format!("unix://{}", dir.join("csi.sock").display()))
        .args(["--mode", "node", "--backend", "rds", "--kubernetes", "off"])
        .args(["--node-id", "n1", "--metrics-address", ""])
        .args(["--rds-nqn-prefix", "nqn.2000-01.test.invalid"])
        .arg("--node-state-dir")
        .arg(dir.join("node-state"))
        .arg("--nvme-host-nqn-file")
        .arg(hostnqn)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn rds-csi")
}

/// The RDS node plugin refuses to start without this node's NVMe host NQN (without one,
/// `nvme connect` presents a made-up or cloned identity to the RDS), exiting before it serves
/// and saying how to make one; with one it starts and logs the NQN in use. Catches the
/// `read_host_nqn` call in main's `node_plugin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rds_node_plugin_refuses_to_start_without_a_host_nqn() {
    let dir = tempfile::tempdir().unwrap();
    let hostnqn = dir.path().join("hostnqn");
    let mut child = spawn_rds_node(dir.path(), &hostnqn);
    let log = || std::fs::read_to_string(dir.path().join("driver.log")).unwrap_or_default();
    let pid = child.id() as libc::pid_t;
    // Its exit is the event: a driver that starts instead never exits, and is killed once the
    // bound (only a failing run waits for it) has passed.
    let exited = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await;
    let status = match exited {
        Ok(waited) => waited.unwrap().unwrap(),
        Err(_) => {
            // SAFETY: kill(2) of the child this test spawned and has not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the node plugin did not refuse to start:\n{}", log());
        }
    };
    assert!(!status.success());
    assert!(!dir.path().join("csi.sock").exists());
    let text = log();
    assert!(text.contains("NVMe host NQN"), "{text}");
    assert!(text.contains("nvme gen-hostnqn"), "{text}");

    let nqn = "nqn.2014-08.org.nvmexpress:uuid:0b6c2a8e-4f4e-4f4a-9d6c-1a2b3c4d5e6f";
    std::fs::write(&hostnqn, format!("{nqn}\n")).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let mut child = spawn_rds_node(dir2.path(), &hostnqn);
    let channel = wait_for(&dir2.path().join("csi.sock")).await;
    drop(channel);
    let text = std::fs::read_to_string(dir2.path().join("driver.log")).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(text.contains(nqn), "the host NQN in use is logged:\n{text}");
}

/// Every command the driver can render, from every value its validators accept, reads on the
/// strict fake RouterOS as exactly one command without substitutions, and its values arrive
/// as rendered (the model holds the same slot, path, NQN and comment). Candidates are `a?b`
/// for every printable ASCII character `?` and a few look-alikes, in each place a value
/// reaches a command line: slot, volume directory, NQN.
///
/// Catches: `$` allowed in `RosPath::parse` (values.rs): `file-path=/storage-pool/a$b/...`
/// is a variable substitution on RouterOS. Catches: `;` allowed in `Slot::parse`: `slot=a;b`
/// is a second command.
#[tokio::test]
async fn rendered_commands_are_single_commands_on_a_strict_routeros() {
    use rds_csi::backend::rds::command::RosCommand;
    use rds_csi::backend::rds::values::{
        MadeWith, Nqn, NqnPrefix, Provenance, Record, RosPath, RosSize, Slot,
    };

    let fake = FakeRds::start(FakeRdsConfig::default()).await;
    let run = |command: RosCommand| -> String {
        let line = command.to_string();
        let out = fake.run_local(&line);
        let violations = fake.take_violations();
        assert!(
            violations.is_empty(),
            "{line:?} is not one plain command: {violations:#?}"
        );
        for refusal in [
            "syntax error",
            "expected end of command",
            "bad command name",
        ] {
            assert!(!out.starts_with(refusal), "{line:?}: {out}");
        }
        out
    };
    let mut chars: Vec<String> = (0x20u8..0x7f).map(|b| char::from(b).to_string()).collect();
    chars.extend(["\u{2010}", "\u{200b}", "\u{0430}", "\t", "\n"].map(String::from));
    let candidates =
        |f: &dyn Fn(&str) -> String| -> Vec<String> { chars.iter().map(|c| f(c)).collect() };
    let slots: Vec<Slot> = candidates(&|c| format!("a{c}b"))
        .iter()
        .filter_map(|s| Slot::parse(s, "slot").ok())
        .collect();
    let dirs: Vec<RosPath> = candidates(&|c| format!("/storage-pool/a{c}b"))
        .iter()
        .filter_map(|s| RosPath::parse(s, "volumePath").ok())
        .collect();
    let nqns: Vec<Nqn> = candidates(&|c| format!("nqn.2000-02.com.mikrotik:a{c}b"))
        .iter()
        .filter_map(|s| Nqn::parse(s, "nqn").ok())
        .collect();
    assert!(
        slots.len() > 60 && dirs.len() > 60 && nqns.len() > 30,
        "the allowlists"
    );

    let size = RosSize::for_request(GIB as u64, 0).unwrap();
    let base = RosPath::parse("/storage-pool/metal-csi", "volumePath").unwrap();
    let prefix = NqnPrefix::default();
    let made = MadeWith::of(&Default::default(), &[]);
    for (i, slot) in slots.iter().enumerate() {
        // The slot alone first: a lookup of a disk that is not there yet.
        assert!(!run(RosCommand::Get { slot: slot.clone() }).contains(slot.as_str()));
        let path = base.image(slot).unwrap();
        let nqn = prefix.nqn(slot).unwrap();
        let record = Record {
            provenance: None,
            made: Some(made.clone()),
        };
        run(RosCommand::CreateVolume {
            path: path.clone(),
            size,
            slot: slot.clone(),
            port: 4420,
            nqn: nqn.clone(),
            record: record.clone(),
        });
        let disk = fake.disk(slot.as_str()).expect("created");
        assert_eq!(
            (
                disk.file_path.as_str(),
                disk.nvme_tcp_server_nqn.as_str(),
                disk.comment
            ),
            (path.as_str(), nqn.as_str(), record.to_string())
        );
        assert!(run(RosCommand::Get { slot: slot.clone() }).contains(slot.as_str()));
        run(RosCommand::Resize {
            slot: slot.clone(),
            size: RosSize::for_request(2 * GIB as u64, 0).unwrap(),
        });
        let snap = Slot::parse(&format!("snap-{i}"), "slot").unwrap();
        let comment = Record {
            provenance: Some(Provenance {
                source: slot.clone(),
                at: 1_739_800_000,
            }),
            made: None,
        };
        run(RosCommand::CreateSnapshot {
            source: slot.clone(),
            path: base.image(&snap).unwrap(),
            slot: snap.clone(),
            record: comment.clone(),
        });
        assert_eq!(
            fake.disk(snap.as_str()).unwrap().comment,
            comment.to_string()
        );
        run(RosCommand::SetComment {
            slot: snap.clone(),
            comment: comment.clone(),
        });
        assert_eq!(
            fake.disk(snap.as_str()).unwrap().comment,
            comment.to_string()
        );
        let copy = Slot::parse(&format!("copy-{i}"), "slot").unwrap();
        let copied = Record {
            provenance: Some(Provenance {
                source: snap.clone(),
                at: 1_739_800_000,
            }),
            made: Some(made.clone()),
        };
        run(RosCommand::CopyVolume {
            source: snap.clone(),
            path: base.image(&copy).unwrap(),
            size: RosSize::for_request(2 * GIB as u64, 0).unwrap(),
            slot: copy.clone(),
            port: 4420,
            nqn: prefix.nqn(&copy).unwrap(),
            record: copied.clone(),
        });
        assert_eq!(
            fake.disk(copy.as_str()).map(|d| d.comment),
            Some(copied.to_string()),
            "{copy}"
        );
        run(RosCommand::MonitorTraffic { slot: slot.clone() });
        for gone in [slot, &snap, &copy] {
            run(RosCommand::Remove { slot: gone.clone() });
            run(RosCommand::RemoveFile {
                path: base.image(gone).unwrap(),
            });
            assert!(fake.disk(gone.as_str()).is_none(), "{gone}");
            assert!(fake.file(base.image(gone).unwrap().as_str()).is_none());
        }
    }
    let slot = Slot::parse("pvc-1", "slot").unwrap();
    for dir in &dirs {
        let path = dir.image(&slot).unwrap();
        run(RosCommand::CreateVolume {
            path: path.clone(),
            size,
            slot: slot.clone(),
            port: 4420,
            nqn: prefix.nqn(&slot).unwrap(),
            record: Record::default(),
        });
        assert_eq!(fake.disk("pvc-1").unwrap().file_path, path.as_str());
        assert!(run(RosCommand::Capacity {
            volume_path: dir.clone()
        })
        .contains("storage-pool"));
        run(RosCommand::Remove { slot: slot.clone() });
        run(RosCommand::RemoveFile { path: path.clone() });
        assert!(fake.file(path.as_str()).is_none(), "{path}");
    }
    for nqn in &nqns {
        run(RosCommand::CreateVolume {
            path: base.image(&slot).unwrap(),
            size,
            slot: slot.clone(),
            port: 4420,
            nqn: nqn.clone(),
            record: Record::default(),
        });
        assert_eq!(
            fake.disk("pvc-1").unwrap().nvme_tcp_server_nqn,
            nqn.as_str()
        );
        run(RosCommand::Remove { slot: slot.clone() });
        run(RosCommand::RemoveFile {
            path: base.image(&slot).unwrap(),
        });
    }
}
