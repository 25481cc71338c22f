//! The node service for real, through the binary's socket: loop devices, mkfs, mounts and
//! device nodes, as root. Every test ends by asserting it left no mount and no loop device
//! under its own directory; its [`Host`] guard cleans up even when it fails.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use rds_csi::csi::volume_capability::access_mode::Mode;
use rds_csi::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use rds_csi::csi::*;
use tonic::Code;

use crate::support::host::{root_or_skip, wait_released, Host};
use crate::support::*;

const MIB: i64 = 1 << 20;

pub fn mount_cap(mode: Mode, fs: &str, flags: &[&str]) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|f| f.to_string()).collect(),
            volume_mount_group: String::new(),
        })),
    }
}

/// A driver (node id n1, all services) whose files and mount points live under one [`Host`].
pub struct Node {
    pub d: Driver,
    // Dropped after the driver: the guard unmounts and detaches once the driver is gone.
    pub host: Host,
}

impl Node {
    pub async fn start(extra: &[&str]) -> Node {
        let host = Host::new();
        let d = Driver::start_in(host.driver_dir(), &[], &host.kubelet_args(extra)).await;
        Node { d, host }
    }

    /// Kills the driver with SIGKILL and starts a new one in the same directory.
    pub async fn crash_and_restart(self, extra: &[&str]) -> Node {
        let Node { mut d, host } = self;
        d.kill9();
        let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().unwrap());
        let d = Driver::start_in(dir, &[], &host.kubelet_args(extra)).await;
        Node { d, host }
    }

    pub async fn create(&self, name: &str, bytes: i64, cap: VolumeCapability) {
        self.d
            .controller()
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap],
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// ControllerPublishVolume to n1: the publish_context the node then receives.
    pub async fn attach(&self, volume: &str, cap: VolumeCapability) -> HashMap<String, String> {
        let ctx = self.d.publish(volume, "n1", cap).await.unwrap();
        // So every stage below also receives the controller's attach instant, a key the node
        // service does not use and must ignore.
        assert!(ctx.contains_key("rds.csi.srvlab.io/attached-at"), "{ctx:?}");
        ctx
    }

    /// NodeStageVolume at `staging` under the host dir, created first as the CO does.
    pub async fn stage(
        &self,
        volume: &str,
        staging: &str,
        cap: VolumeCapability,
        publish_context: HashMap<String, String>,
    ) -> Result<(), tonic::Status> {
        let path = self.host.at(staging);
        std::fs::create_dir_all(&path).unwrap();
        self.stage_raw(volume, &path, cap, publish_context).await
    }

    pub async fn stage_raw(
        &self,
        volume: &str,
        staging: &str,
        cap: VolumeCapability,
        publish_context: HashMap<String, String>,
    ) -> Result<(), tonic::Status> {
        self.d
            .node()
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: volume.into(),
                publish_context,
                staging_target_path: staging.into(),
                volume_capability: Some(cap),
                secrets: HashMap::new(),
                volume_context: HashMap::new(),
            })
            .await
            .map(|_| ())
    }

    pub async fn publish(
        &self,
        volume: &str,
        staging: &str,
        target: &str,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.publish_raw(
            volume,
            &self.host.at(staging),
            &self.host.at(target),
            cap,
            readonly,
        )
        .await
    }

    pub async fn publish_raw(
        &self,
        volume: &str,
        staging: &str,
        target: &str,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.d
            .node()
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: volume.into(),
                publish_context: HashMap::new(),
                staging_target_path: staging.into(),
                target_path: target.into(),
                volume_capability: Some(cap),
                readonly,
                secrets: HashMap::new(),
                volume_context: HashMap::new(),
            })
            .await
            .map(|_| ())
    }

    pub async fn unpublish(&self, volume: &str, target: &str) -> Result<(), tonic::Status> {
        self.d
            .node()
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume.into(),
                target_path: self.host.at(target),
            })
            .await
            .map(|_| ())
    }

    pub async fn unstage(&self, volume: &str, staging: &str) -> Result<(), tonic::Status> {
        self.d
            .node()
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume.into(),
                staging_target_path: self.host.at(staging),
            })
            .await
            .map(|_| ())
    }

    pub async fn stats(
        &self,
        volume: &str,
        path: &str,
    ) -> Result<NodeGetVolumeStatsResponse, tonic::Status> {
        self.d
            .node()
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: volume.into(),
                volume_path: path.into(),
                staging_target_path: String::new(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn expand(&self, volume: &str, bytes: i64, path: &str) -> Result<i64, tonic::Status> {
        let controller = self
            .d
            .controller()
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: volume.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await?
            .into_inner();
        assert_eq!(controller.capacity_bytes, bytes);
        assert!(controller.node_expansion_required);
        self.d
            .node()
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: volume.into(),
                volume_path: path.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().capacity_bytes)
    }

    /// The loop devices backing this test's images.
    pub fn loops(&self) -> Vec<String> {
        self.host.loops()
    }

    /// Mount points under this test's directory.
    pub fn mount_count(&self, rel: &str) -> usize {
        let p = self.host.path().join(rel);
        self.host.mounts().iter().filter(|m| **m == p).count()
    }
}

fn bytes_of(stats: &NodeGetVolumeStatsResponse, unit: volume_usage::Unit) -> &VolumeUsage {
    stats
        .usage
        .iter()
        .find(|u| u.unit == unit as i32)
        .unwrap_or_else(|| panic!("no {unit:?} usage in {stats:?}"))
}

fn condition(stats: &NodeGetVolumeStatsResponse) -> (bool, String) {
    let c = stats.volume_condition.clone().expect("volume_condition");
    (c.abnormal, c.message)
}

fn expect_code(result: Result<(), tonic::Status>, code: Code, needle: &str) {
    let err = result.expect_err("expected an error");
    assert_eq!(err.code(), code, "{}", err.message());
    assert!(
        err.message().contains(needle),
        "message {:?} should mention {needle:?}",
        err.message()
    );
}

/// The full mount lifecycle twice over: data written in the first round is read back after
/// unstage and a fresh stage (the second stage must not format).
async fn mount_lifecycle(fs: &str, size: i64) {
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, fs, &["noatime"]);
    n.create("data", size, cap.clone()).await;
    let ctx = n.attach("data", cap.clone()).await;
    n.stage("data", "stage", cap.clone(), ctx.clone())
        .await
        .unwrap();
    n.publish("data", "stage", "target", cap.clone(), false)
        .await
        .unwrap();
    let file = n.host.path().join("target/hello.txt");
    std::fs::write(&file, b"written before unstage").unwrap();
    let stats = n.stats("data", &n.host.at("target")).await.unwrap();
    assert!(bytes_of(&stats, volume_usage::Unit::Bytes).total > 0);
    assert!(bytes_of(&stats, volume_usage::Unit::Inodes).used > 0);
    assert_eq!(condition(&stats), (false, "volume is healthy".into()));

    n.unpublish("data", "target").await.unwrap();
    assert!(
        !n.host.path().join("target").exists(),
        "unpublish removes the target"
    );
    n.unstage("data", "stage").await.unwrap();
    assert!(
        n.loops().is_empty() && n.host.mounts().is_empty(),
        "unstage undoes everything"
    );

    n.stage("data", "stage", cap.clone(), ctx).await.unwrap();
    n.publish("data", "stage", "target", cap, false)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"written before unstage");
    n.unpublish("data", "target").await.unwrap();
    n.unstage("data", "stage").await.unwrap();
    n.d.unpublish("data", "n1").await.unwrap();
    n.host.assert_clean();
    // Logged after any formatting line of this volume's stage.
    let log = n.d.wait_for_log("unstaged").await;
    assert_eq!(
        log.matches("formatting an empty device").count(),
        1,
        "formatted exactly once"
    );
}

#[tokio::test]
async fn ext4_lifecycle_keeps_data_across_unstage_and_stage() {
    if root_or_skip("ext4_lifecycle") {
        mount_lifecycle("ext4", 64 * MIB).await;
    }
}

#[tokio::test]
async fn xfs_lifecycle_keeps_data_across_unstage_and_stage() {
    if root_or_skip("xfs_lifecycle") {
        mount_lifecycle("xfs", 512 * MIB).await;
    }
}

#[tokio::test]
async fn block_lifecycle_exposes_a_device_node_and_keeps_data() {
    if !root_or_skip("block_lifecycle") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = rwo_block();
    n.create("raw", 16 * MIB, cap.clone()).await;
    let ctx = n.attach("raw", cap.clone()).await;
    n.stage("raw", "stage", cap.clone(), ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        n.host.mounts(),
        Vec::<std::path::PathBuf>::new(),
        "block staging mounts nothing"
    );
    std::fs::create_dir_all(n.host.path().join("pod")).unwrap();
    n.publish("raw", "stage", "pod/dev", cap.clone(), false)
        .await
        .unwrap();
    let node = n.host.path().join("pod/dev");
    let meta = std::fs::symlink_metadata(&node).unwrap();
    assert!(meta.file_type().is_block_device());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let loops = n.loops();
    assert_eq!(loops.len(), 1);
    let dev = std::fs::read_to_string(format!("/sys/block/{}/dev", loops[0])).unwrap();
    assert_eq!(
        format!("{}:{}", libc::major(meta.rdev()), libc::minor(meta.rdev())),
        dev.trim(),
        "the node is the loop device's"
    );
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&node).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(b"raw block data").unwrap();
        f.sync_all().unwrap();
    }
    let stats = n.stats("raw", &node.display().to_string()).await.unwrap();
    assert_eq!(bytes_of(&stats, volume_usage::Unit::Bytes).total, 16 * MIB);
    assert!(!condition(&stats).0);

    n.unpublish("raw", "pod/dev").await.unwrap();
    assert!(!node.exists(), "unpublish removes the device node");
    n.unstage("raw", "stage").await.unwrap();
    assert!(n.loops().is_empty());

    n.stage("raw", "stage", cap.clone(), ctx).await.unwrap();
    n.publish("raw", "stage", "pod/dev", cap, true)
        .await
        .unwrap();
    let meta = std::fs::symlink_metadata(&node).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o440,
        "read-only publish: 0440"
    );
    let mut buf = [0u8; 14];
    let mut f = std::fs::File::open(&node).unwrap();
    f.seek(SeekFrom::Start(4096)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"raw block data");
    drop(f);
    n.unpublish("raw", "pod/dev").await.unwrap();
    n.unstage("raw", "stage").await.unwrap();
    n.host.assert_clean();
}

#[tokio::test]
async fn xfs_grows_online_while_mounted() {
    if !root_or_skip("xfs_grows_online") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "xfs", &[]);
    n.create("grow", 512 * MIB, cap.clone()).await;
    let ctx = n.attach("grow", cap.clone()).await;
    n.stage("grow", "stage", cap.clone(), ctx).await.unwrap();
    n.publish("grow", "stage", "target", cap, false)
        .await
        .unwrap();
    let target = n.host.at("target");
    let before = bytes_of(
        &n.stats("grow", &target).await.unwrap(),
        volume_usage::Unit::Bytes,
    )
    .total;
    std::fs::write(n.host.path().join("target/keep"), b"still here").unwrap();
    let node_bytes = n.expand("grow", 1024 * MIB, &target).await.unwrap();
    assert_eq!(node_bytes, 1024 * MIB);
    let after = bytes_of(
        &n.stats("grow", &target).await.unwrap(),
        volume_usage::Unit::Bytes,
    )
    .total;
    assert!(
        after > before + 400 * MIB,
        "the mounted filesystem sees the new size: {before} -> {after}"
    );
    assert_eq!(
        std::fs::read(n.host.path().join("target/keep")).unwrap(),
        b"still here"
    );
    let shrink =
        n.d.controller()
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: "grow".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 512 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_eq!(shrink.code(), Code::OutOfRange, "{}", shrink.message());
    n.unpublish("grow", "target").await.unwrap();
    n.unstage("grow", "stage").await.unwrap();
    n.host.assert_clean();
}

/// ext4's online resize needs CAP_SYS_RESOURCE. Where the process has it, the filesystem
/// grows; where it does not (some sandboxes), the answer says exactly that, and the device has
/// grown all the same.
#[tokio::test]
async fn ext4_grows_online_or_names_the_missing_capability() {
    if !root_or_skip("ext4_grows_online") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("grow", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("grow", cap.clone()).await;
    n.stage("grow", "stage", cap.clone(), ctx).await.unwrap();
    n.publish("grow", "stage", "target", cap, false)
        .await
        .unwrap();
    let target = n.host.at("target");
    let before = bytes_of(
        &n.stats("grow", &target).await.unwrap(),
        volume_usage::Unit::Bytes,
    )
    .total;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let can = rds_csi::node::filesystem::has_capability(
        &status,
        rds_csi::node::filesystem::CAP_SYS_RESOURCE,
    );
    match n.expand("grow", 128 * MIB, &target).await {
        Ok(bytes) => {
            assert!(can, "grew without CAP_SYS_RESOURCE?");
            assert_eq!(bytes, 128 * MIB);
            let after = bytes_of(
                &n.stats("grow", &target).await.unwrap(),
                volume_usage::Unit::Bytes,
            )
            .total;
            assert!(after > before + 50 * MIB, "{before} -> {after}");
        }
        Err(e) => {
            assert!(!can, "failed with CAP_SYS_RESOURCE: {}", e.message());
            assert_eq!(e.code(), Code::FailedPrecondition);
            assert!(e.message().contains("CAP_SYS_RESOURCE"), "{}", e.message());
            let loops = n.loops();
            let sectors: i64 = std::fs::read_to_string(format!("/sys/block/{}/size", loops[0]))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_eq!(sectors * 512, 128 * MIB, "the device has grown");
        }
    }
    n.unpublish("grow", "target").await.unwrap();
    n.unstage("grow", "stage").await.unwrap();
    n.host.assert_clean();
}

#[tokio::test]
async fn block_expansion_refreshes_the_device_size() {
    if !root_or_skip("block_expansion") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = rwo_block();
    n.create("raw", 16 * MIB, cap.clone()).await;
    let ctx = n.attach("raw", cap.clone()).await;
    n.stage("raw", "stage", cap.clone(), ctx).await.unwrap();
    n.publish("raw", "stage", "dev", cap, false).await.unwrap();
    let dev = n.host.at("dev");
    assert_eq!(n.expand("raw", 48 * MIB, &dev).await.unwrap(), 48 * MIB);
    let stats = n.stats("raw", &dev).await.unwrap();
    assert_eq!(bytes_of(&stats, volume_usage::Unit::Bytes).total, 48 * MIB);
    n.unpublish("raw", "dev").await.unwrap();
    n.unstage("raw", "stage").await.unwrap();
    n.host.assert_clean();
}

#[tokio::test]
async fn repeats_are_idempotent_and_other_capabilities_already_exist() {
    if !root_or_skip("repeats_are_idempotent") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("v", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("v", cap.clone()).await;
    for _ in 0..3 {
        n.stage("v", "stage", cap.clone(), ctx.clone())
            .await
            .unwrap();
        n.publish("v", "stage", "t", cap.clone(), false)
            .await
            .unwrap();
    }
    assert_eq!(n.loops().len(), 1, "one loop device");
    assert_eq!(n.mount_count("stage"), 1, "one staging mount");
    assert_eq!(n.mount_count("t"), 1, "one publish mount");

    let xfs = mount_cap(Mode::SingleNodeWriter, "xfs", &[]);
    expect_code(
        n.stage("v", "stage", xfs, ctx.clone()).await,
        Code::AlreadyExists,
        "already staged",
    );
    let reader = mount_cap(Mode::SingleNodeReaderOnly, "ext4", &[]);
    expect_code(
        n.stage("v", "stage", reader, ctx.clone()).await,
        Code::AlreadyExists,
        "already staged",
    );
    expect_code(
        n.stage("v", "stage2", cap.clone(), ctx.clone()).await,
        Code::AlreadyExists,
        "already staged at",
    );
    expect_code(
        n.publish("v", "stage", "t", cap.clone(), true).await,
        Code::AlreadyExists,
        "already published",
    );

    // A second, read-only target of the same stage.
    n.publish("v", "stage", "ro", cap.clone(), true)
        .await
        .unwrap();
    let err = std::fs::write(n.host.path().join("ro/x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "read-only publish");
    std::fs::write(n.host.path().join("t/x"), b"x").unwrap();

    expect_code(
        n.unstage("v", "stage").await,
        Code::FailedPrecondition,
        "still published",
    );
    assert_eq!(
        n.mount_count("stage"),
        1,
        "a refused unstage changes nothing"
    );
    for target in ["t", "ro"] {
        n.unpublish("v", target).await.unwrap();
        n.unpublish("v", target).await.unwrap();
    }
    n.unstage("v", "stage").await.unwrap();
    n.unstage("v", "stage").await.unwrap();
    n.host.assert_clean();
}

#[tokio::test]
async fn bad_requests_get_the_specs_codes_and_leave_nothing_behind() {
    if !root_or_skip("bad_requests") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("v", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("v", cap.clone()).await;
    let staging = n.host.at("stage");
    std::fs::create_dir_all(&staging).unwrap();
    let mut node = n.d.node();

    let long_id = "v".repeat(129);
    let cases: Vec<(&str, NodeStageVolumeRequest, &str)> = vec![
        (
            "no volume id",
            NodeStageVolumeRequest {
                volume_id: "".into(),
                staging_target_path: staging.clone(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            },
            "volume_id",
        ),
        (
            "huge volume id",
            NodeStageVolumeRequest {
                volume_id: long_id.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            },
            "volume_id",
        ),
        (
            "odd volume id",
            NodeStageVolumeRequest {
                volume_id: "../../etc".into(),
                staging_target_path: staging.clone(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            },
            "volume_id",
        ),
        (
            "no staging path",
            NodeStageVolumeRequest {
                volume_id: "v".into(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            },
            "staging_target_path",
        ),
        (
            "relative staging path",
            NodeStageVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: "stage".into(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            },
            "staging_target_path",
        ),
        (
            "dot-dot staging path",
            NodeStageVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: format!("{staging}/../stage"),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            },
            "staging_target_path",
        ),
        (
            "no capability",
            NodeStageVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: staging.clone(),
                ..Default::default()
            },
            "volume_capability",
        ),
        (
            "RWX mount",
            NodeStageVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: staging.clone(),
                volume_capability: Some(rwx_mount()),
                ..Default::default()
            },
            "RWX requires volumeMode: Block",
        ),
        (
            "unsupported fs",
            NodeStageVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: staging.clone(),
                volume_capability: Some(mount_cap(Mode::SingleNodeWriter, "btrfs", &[])),
                ..Default::default()
            },
            "fs_type",
        ),
        (
            "unsafe mount flag",
            NodeStageVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: staging.clone(),
                volume_capability: Some(mount_cap(Mode::SingleNodeWriter, "ext4", &["suid"])),
                ..Default::default()
            },
            "mount_flags",
        ),
        (
            "foreign image",
            NodeStageVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: staging.clone(),
                volume_capability: Some(cap.clone()),
                publish_context: [("imagePath".to_string(), "/etc/passwd".to_string())].into(),
                ..Default::default()
            },
            "publish_context",
        ),
    ];
    for (what, req, field) in cases {
        let err = node.node_stage_volume(req).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{what}: {}",
            err.message()
        );
        assert!(
            err.message().contains(field),
            "{what}: {:?} should name {field}",
            err.message()
        );
    }
    let unknown = n
        .stage("nope", "stage", cap.clone(), HashMap::new())
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{}", unknown.message());
    assert!(
        n.loops().is_empty() && n.host.mounts().is_empty(),
        "no stage left half-done"
    );

    // Publish before stage; then bad publish input on a staged volume.
    expect_code(
        n.publish("v", "stage", "t", cap.clone(), false).await,
        Code::FailedPrecondition,
        "not staged",
    );
    n.stage("v", "stage", cap.clone(), ctx).await.unwrap();
    let t = n.host.at("t");
    let bad_publish: Vec<(&str, &str, &str, Option<VolumeCapability>, &str)> = vec![
        ("no target", "v", "", Some(cap.clone()), "target_path"),
        (
            "relative target",
            "v",
            "t",
            Some(cap.clone()),
            "target_path",
        ),
        ("no capability", "v", &t, None, "volume_capability"),
        ("no volume id", "", &t, Some(cap.clone()), "volume_id"),
    ];
    for (what, vol, target, c, field) in bad_publish {
        let err = node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: staging.clone(),
                target_path: target.into(),
                volume_capability: c,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{what}: {}",
            err.message()
        );
        assert!(err.message().contains(field), "{what}: {:?}", err.message());
    }
    let err = n
        .publish("v", "elsewhere", "t", cap.clone(), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    expect_code(
        n.publish("v", "stage", "t", rwo_block(), false).await,
        Code::FailedPrecondition,
        "staged as",
    );
    assert!(
        !n.host.path().join("t").exists(),
        "a refused publish creates nothing"
    );

    // Unpublish / unstage / stats / expand input.
    for (what, vol, target, code) in [
        ("no volume id", "", t.as_str(), Code::InvalidArgument),
        ("no target", "v", "", Code::InvalidArgument),
        ("relative target", "v", "t", Code::InvalidArgument),
    ] {
        let err = node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: vol.into(),
                target_path: target.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "unpublish {what}: {}", err.message());
    }
    for (what, vol, path, code) in [
        ("no volume id", "", staging.as_str(), Code::InvalidArgument),
        ("no staging path", "v", "", Code::InvalidArgument),
    ] {
        let err = node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: vol.into(),
                staging_target_path: path.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "unstage {what}: {}", err.message());
    }
    // Nothing left to undo is OK, not NOT_FOUND: the kubelet retries NOT_FOUND forever.
    node.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: "nope".into(),
        target_path: t.clone(),
    })
    .await
    .expect("unpublish of a volume the node has nothing of");
    node.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: "nope".into(),
        staging_target_path: staging.clone(),
    })
    .await
    .expect("unstage of a volume the node has nothing of");
    for (what, vol, path, code) in [
        ("no volume id", "", staging.as_str(), Code::InvalidArgument),
        ("no path", "v", "", Code::InvalidArgument),
        ("relative path", "v", "some/path", Code::NotFound),
        ("unknown volume", "nope", "some/path", Code::NotFound),
        ("not its path", "v", "/tmp", Code::NotFound),
    ] {
        let err = n.stats(vol, path).await.unwrap_err();
        assert_eq!(err.code(), code, "stats {what}: {}", err.message());
        let err = node
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: vol.into(),
                volume_path: path.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "expand {what}: {}", err.message());
    }
    n.unstage("v", "stage").await.unwrap();
    n.host.assert_clean();
}

#[tokio::test]
async fn a_symlink_planted_at_a_target_is_never_followed() {
    if !root_or_skip("symlink_target") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("v", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("v", cap.clone()).await;
    n.stage("v", "stage", cap.clone(), ctx).await.unwrap();
    let victim = n.host.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("precious"), b"keep").unwrap();
    std::os::unix::fs::symlink(&victim, n.host.path().join("t")).unwrap();
    expect_code(
        n.publish("v", "stage", "t", cap.clone(), false).await,
        Code::InvalidArgument,
        "symbolic link",
    );
    expect_code(
        n.unpublish("v", "t").await,
        Code::InvalidArgument,
        "symbolic link",
    );
    assert_eq!(
        n.mount_count("victim"),
        0,
        "nothing mounted through the link"
    );
    assert_eq!(std::fs::read(victim.join("precious")).unwrap(), b"keep");
    // The same for a block publish and for a staging path.
    let block = rwo_block();
    n.create("b", 16 * MIB, block.clone()).await;
    let bctx = n.attach("b", block.clone()).await;
    n.stage("b", "bstage", block.clone(), bctx.clone())
        .await
        .unwrap();
    expect_code(
        n.publish("b", "bstage", "t", block.clone(), false).await,
        Code::InvalidArgument,
        "symbolic link",
    );
    std::os::unix::fs::symlink(&victim, n.host.path().join("lstage")).unwrap();
    n.create("c", 64 * MIB, cap.clone()).await;
    let cctx = n.attach("c", cap.clone()).await;
    expect_code(
        n.stage_raw("c", &n.host.at("lstage"), cap.clone(), cctx)
            .await,
        Code::InvalidArgument,
        "symbolic link",
    );
    assert!(std::fs::symlink_metadata(n.host.path().join("t"))
        .unwrap()
        .file_type()
        .is_symlink());
    n.unstage("b", "bstage").await.unwrap();
    n.unstage("v", "stage").await.unwrap();
    n.host.assert_clean();
}

/// A driver whose `--kubelet-dir` is `kubelet/` under its host dir, so `out/` beside it is
/// outside the root and still cleaned by the [`Host`] guard.
async fn node_with_kubelet_subdir() -> Node {
    let host = Host::new();
    let kubelet = host.at("kubelet");
    std::fs::create_dir(&kubelet).unwrap();
    std::fs::create_dir(host.path().join("out")).unwrap();
    let d = Driver::start_in(host.driver_dir(), &[], &["--kubelet-dir", &kubelet]).await;
    Node { d, host }
}

async fn unpublish_raw(n: &Node, volume: &str, target: &str) -> Result<(), tonic::Status> {
    n.d.node()
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: volume.into(),
            target_path: target.into(),
        })
        .await
        .map(|_| ())
}

/// Catches dropping the `confined` checks at the top of stage, publish and unpublish
/// (plugin.rs) or the target == staging refusal: a path outside `--kubelet-dir` is
/// INVALID_ARGUMENT, and nothing is mounted, created or removed there.
#[tokio::test]
async fn a_staging_path_outside_the_kubelet_root_is_refused() {
    if !root_or_skip("outside_kubelet_root") {
        return;
    }
    let n = node_with_kubelet_subdir().await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("v", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("v", cap.clone()).await;
    let out = n.host.path().join("out");
    std::fs::create_dir(out.join("stage")).unwrap();
    std::fs::create_dir(out.join("keep")).unwrap();
    expect_code(
        n.stage_raw("v", &n.host.at("out/stage"), cap.clone(), ctx.clone())
            .await,
        Code::InvalidArgument,
        "--kubelet-dir",
    );
    n.stage("v", "kubelet/stage", cap.clone(), ctx)
        .await
        .unwrap();
    let staging = n.host.at("kubelet/stage");
    expect_code(
        n.publish_raw("v", &staging, &n.host.at("out/t"), cap.clone(), false)
            .await,
        Code::InvalidArgument,
        "--kubelet-dir",
    );
    expect_code(
        unpublish_raw(&n, "v", &n.host.at("out/keep")).await,
        Code::InvalidArgument,
        "--kubelet-dir",
    );
    expect_code(
        n.publish_raw("v", &staging, &staging, cap.clone(), false)
            .await,
        Code::InvalidArgument,
        "staging_target_path",
    );
    assert_eq!(n.mount_count("out/stage"), 0);
    assert!(!out.join("t").exists(), "no target made outside the root");
    assert!(
        out.join("keep").is_dir(),
        "nothing removed outside the root"
    );
    n.unstage("v", "kubelet/stage").await.unwrap();
    n.host.assert_clean();
}

/// Catches resolving a request's path by name (only the last component `O_NOFOLLOW`):
/// a symlink among the parents — to a directory inside the root or outside it — is refused
/// by stage, publish (mount and block) and unpublish, and nothing is made or removed where it
/// points.
#[tokio::test]
async fn a_symlinked_parent_is_refused() {
    if !root_or_skip("symlinked_parent") {
        return;
    }
    let n = node_with_kubelet_subdir().await;
    let (kubelet, out) = (n.host.path().join("kubelet"), n.host.path().join("out"));
    std::fs::create_dir_all(kubelet.join("real/stage")).unwrap();
    std::fs::create_dir(out.join("keep")).unwrap();
    std::os::unix::fs::symlink(kubelet.join("real"), kubelet.join("inner")).unwrap();
    std::os::unix::fs::symlink(&out, kubelet.join("escape")).unwrap();
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("v", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("v", cap.clone()).await;
    expect_code(
        n.stage_raw(
            "v",
            &n.host.at("kubelet/inner/stage"),
            cap.clone(),
            ctx.clone(),
        )
        .await,
        Code::InvalidArgument,
        "symbolic link",
    );
    assert_eq!(
        n.mount_count("kubelet/real/stage"),
        0,
        "nothing mounted through the link"
    );
    n.stage("v", "kubelet/stage", cap.clone(), ctx)
        .await
        .unwrap();
    let staging = n.host.at("kubelet/stage");
    for target in ["kubelet/inner/t", "kubelet/escape/t"] {
        expect_code(
            n.publish_raw("v", &staging, &n.host.at(target), cap.clone(), false)
                .await,
            Code::InvalidArgument,
            "symbolic link",
        );
    }
    expect_code(
        unpublish_raw(&n, "v", &n.host.at("kubelet/escape/keep")).await,
        Code::InvalidArgument,
        "symbolic link",
    );
    let block = rwo_block();
    n.create("b", 16 * MIB, block.clone()).await;
    let bctx = n.attach("b", block.clone()).await;
    n.stage("b", "kubelet/bstage", block.clone(), bctx)
        .await
        .unwrap();
    expect_code(
        n.publish_raw(
            "b",
            &n.host.at("kubelet/bstage"),
            &n.host.at("kubelet/escape/dev"),
            block.clone(),
            false,
        )
        .await,
        Code::InvalidArgument,
        "symbolic link",
    );
    assert!(
        !kubelet.join("real/t").exists() && !out.join("t").exists() && !out.join("dev").exists()
    );
    assert!(
        out.join("keep").is_dir(),
        "nothing removed through the link"
    );
    n.unstage("b", "kubelet/bstage").await.unwrap();
    n.unstage("v", "kubelet/stage").await.unwrap();
    n.host.assert_clean();
}

#[tokio::test]
async fn a_busy_target_is_refused_clearly_and_never_lazily_unmounted() {
    if !root_or_skip("busy_target") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("v", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("v", cap.clone()).await;
    n.stage("v", "stage", cap.clone(), ctx).await.unwrap();
    n.publish("v", "stage", "t", cap, false).await.unwrap();
    // A process working inside the volume keeps it busy.
    let mut holder = std::process::Command::new("sleep")
        .arg("600")
        .current_dir(n.host.path().join("t"))
        .spawn()
        .unwrap();
    expect_code(
        n.unpublish("v", "t").await,
        Code::FailedPrecondition,
        "busy",
    );
    assert_eq!(n.mount_count("t"), 1, "still mounted: no lazy unmount");
    holder.kill().unwrap();
    holder.wait().unwrap();
    n.unpublish("v", "t").await.unwrap();
    n.unstage("v", "stage").await.unwrap();
    n.host.assert_clean();
}

/// Formats the image of `volume` by hand (as if an earlier user had), through a loop device
/// the test makes and removes itself.
fn prepare_image(n: &Node, volume: &str, prepare: impl FnOnce(&str)) {
    let image = n.d.dir.path().join(format!("volumes/{volume}.img"));
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success());
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    prepare(&dev);
    assert!(std::process::Command::new("losetup")
        .args(["--detach", &dev])
        .status()
        .unwrap()
        .success());
}

fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_damaged_or_foreign_device_is_never_formatted_or_mounted() {
    if !root_or_skip("damaged_or_foreign") {
        return;
    }
    let n = Node::start(&[]).await;
    let ext4 = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    // Damaged: the root inode cleared and the superblock marked as having errors.
    n.create("damaged", 64 * MIB, ext4.clone()).await;
    prepare_image(&n, "damaged", |dev| {
        run("mkfs.ext4", &["-F", "-q", dev]);
        run("debugfs", &["-w", "-R", "clri <2>", dev]);
        run("debugfs", &["-w", "-R", "ssv state 2", dev]);
    });
    let ctx = n.attach("damaged", ext4.clone()).await;
    expect_code(
        n.stage("damaged", "s1", ext4.clone(), ctx).await,
        Code::FailedPrecondition,
        "damaged",
    );
    // Another filesystem than the one asked for.
    n.create("xfsvol", 512 * MIB, ext4.clone()).await;
    prepare_image(&n, "xfsvol", |dev| run("mkfs.xfs", &["-q", dev]));
    let ctx = n.attach("xfsvol", ext4.clone()).await;
    expect_code(
        n.stage("xfsvol", "s2", ext4.clone(), ctx).await,
        Code::FailedPrecondition,
        "holds a xfs filesystem",
    );
    // Bytes no tool recognises.
    n.create("noise", 64 * MIB, ext4.clone()).await;
    {
        let image = n.d.dir.path().join("volumes/noise.img");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all(&[0x5a; 8192]).unwrap();
    }
    let ctx = n.attach("noise", ext4.clone()).await;
    expect_code(
        n.stage("noise", "s3", ext4.clone(), ctx).await,
        Code::FailedPrecondition,
        "refusing to format",
    );
    // Nothing was changed: the xfs is still there and the noise is intact.
    let blkid = std::process::Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(n.d.dir.path().join("volumes/xfsvol.img"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&blkid.stdout).trim(), "xfs");
    let mut head = [0u8; 8192];
    std::fs::File::open(n.d.dir.path().join("volumes/noise.img"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert!(head.iter().all(|b| *b == 0x5a));
    // Each refused stage detaches its loop device after any formatting it did.
    let log = n.d.wait_for_log_count("detached loop device", 3).await;
    assert!(!log.contains("formatting an empty device"));
    n.host.assert_clean();
}

/// SHA-256 of the whole file at `path`.
fn file_sha256(path: &std::path::Path) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut hasher).unwrap();
    hasher.finalize().into()
}

/// An XFS whose allocation-group 0 free-space header (AGF, the sector after the superblock)
/// has lost its `XAGF` magic: blkid still recognises the XFS superblock, `xfs_repair -n`
/// reports the corruption (exit 1) and changes nothing. NodeStageVolume is FAILED_PRECONDITION
/// naming the damage, and the image is byte for byte what it was before the stage.
/// Catches: removing `-n` from the xfs_repair invocation in src/node/filesystem.rs `check`
/// (xfs_repair then rewrites the AGF and exits 0, so the stage mounts a filesystem it changed).
#[tokio::test]
async fn a_damaged_xfs_is_refused_and_left_byte_for_byte_unchanged() {
    if !root_or_skip("damaged_xfs") {
        return;
    }
    let n = Node::start(&[]).await;
    let xfs = mount_cap(Mode::SingleNodeWriter, "xfs", &[]);
    n.create("badxfs", 512 * MIB, xfs.clone()).await;
    prepare_image(&n, "badxfs", |dev| run("mkfs.xfs", &["-q", dev]));
    let image = n.d.dir.path().join("volumes/badxfs.img");
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .unwrap();
        // The superblock's sb_sectsize (big-endian u16 at byte 102); the AGF is sector 1.
        let mut sectsize = [0u8; 2];
        f.seek(SeekFrom::Start(102)).unwrap();
        f.read_exact(&mut sectsize).unwrap();
        let agf = u64::from(u16::from_be_bytes(sectsize));
        let mut magic = [0u8; 4];
        f.seek(SeekFrom::Start(agf)).unwrap();
        f.read_exact(&mut magic).unwrap();
        assert_eq!(&magic, b"XAGF", "AG 0's AGF at byte {agf}");
        f.seek(SeekFrom::Start(agf)).unwrap();
        f.write_all(&[0; 4]).unwrap();
        f.sync_all().unwrap();
    }
    let before = file_sha256(&image);
    let ctx = n.attach("badxfs", xfs.clone()).await;
    expect_code(
        n.stage("badxfs", "s1", xfs.clone(), ctx).await,
        Code::FailedPrecondition,
        "is damaged",
    );
    n.d.wait_for_log_count("detached loop device", 1).await;
    assert_eq!(n.mount_count("s1"), 0, "the damaged xfs was mounted");
    assert!(
        file_sha256(&image) == before,
        "the damaged xfs image changed during the stage: the check wrote to it"
    );
    n.host.assert_clean();
}

/// An XFS whose node crashed while it was mounted: its last changes are in the log only
/// (written and synced, then the filesystem shut down as a power loss leaves it).
/// `xfs_repair -n` ignores the log and, exiting 1, reports what replaying it resolves; the
/// stage must not call that damage: it mounts, the mount replays the log, and the files are
/// there. Catches: dropping the `xfs_log_needs_replay` arm of src/node/filesystem.rs `check`
/// (the stage is FAILED_PRECONDITION "is damaged").
#[tokio::test]
async fn an_xfs_left_with_a_dirty_log_by_a_crash_is_staged_and_its_log_replayed() {
    if !root_or_skip("dirty_xfs_log") {
        return;
    }
    let n = Node::start(&[]).await;
    let xfs = mount_cap(Mode::SingleNodeWriter, "xfs", &[]);
    n.create("crashed", 512 * MIB, xfs.clone()).await;
    let before_crash = n.host.path().join("before-crash");
    std::fs::create_dir(&before_crash).unwrap();
    prepare_image(&n, "crashed", |dev| {
        run("mkfs.xfs", &["-q", dev]);
        let at = before_crash.to_str().unwrap();
        run("mount", &[dev, at]);
        for i in 0..20 {
            std::fs::write(before_crash.join(format!("f{i}")), format!("{i}\n")).unwrap();
        }
        run("sync", &["-f", at]);
        run("xfs_io", &["-x", "-c", "shutdown", at]);
        run("umount", &[at]);
        let check = std::process::Command::new("xfs_repair")
            .args(["-n", dev])
            .output()
            .unwrap();
        assert_eq!(
            check.status.code(),
            Some(1),
            "the premise: xfs_repair -n reports the unreplayed log as inconsistencies"
        );
        assert!(
            String::from_utf8_lossy(&check.stderr).contains("valuable metadata changes in a log"),
            "the premise: xfs_repair -n says the log needs replaying"
        );
    });
    let ctx = n.attach("crashed", xfs.clone()).await;
    n.stage("crashed", "s1", xfs.clone(), ctx).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(n.host.path().join("s1/f19")).unwrap(),
        "19\n",
        "the log was replayed by the mount"
    );
    n.unstage("crashed", "s1").await.unwrap();
    n.host.assert_clean();
}

/// Stage and publish an ext4 volume, then detach its loop device out from under the mounts
/// (`losetup --detach` of a busy device only marks it autoclear: the plugin no longer finds
/// the volume's device, the mounts keep its number, as after an NVMe `ctrl_loss_tmo`).
/// NodeUnpublish and NodeUnstage know the mounts from the record's device history, unmount
/// them and succeed, and so do their retries; nothing is left mounted or attached. Fails with
/// FAILED_PRECONDITION "not volume v" when unpublish compares the target's mount only with the
/// device the backing resolves to now (none), and leaves the staging mount behind when unstage
/// skips the staging path for a device it cannot find.
#[tokio::test]
async fn an_unpublish_after_the_device_vanished_unmounts_and_succeeds() {
    if !root_or_skip("vanished_device") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("v", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("v", cap.clone()).await;
    n.stage("v", "stage", cap.clone(), ctx).await.unwrap();
    n.publish("v", "stage", "t", cap, false).await.unwrap();
    let loops = n.loops();
    assert_eq!(loops.len(), 1, "{loops:?}");
    run("losetup", &["--detach", &format!("/dev/{}", loops[0])]);

    n.unpublish("v", "t").await.unwrap();
    assert_eq!(n.mount_count("t"), 0);
    assert!(!n.host.path().join("t").exists(), "the target is removed");
    n.unpublish("v", "t").await.unwrap();
    n.unstage("v", "stage").await.unwrap();
    assert_eq!(n.mount_count("stage"), 0);
    n.unstage("v", "stage").await.unwrap();
    eventually(
        "the autoclear loop device is freed with its last mount",
        || async { n.loops().is_empty() },
    )
    .await;
    n.host.assert_clean();
}

/// With `V1` staged, every node call for `v1` is FAILED_PRECONDITION naming both ids and
/// touches nothing (on the RDS both spellings are one NQN; the node refuses the second rather
/// than keep two records). Once `V1` is unstaged, `v1` gets its ordinary answers again. Fails
/// when the plugin's `record_of` does not look for another spelling (the unstage of `v1`
/// answers OK, the stage NOT_FOUND).
#[tokio::test]
async fn ids_differing_only_by_case_are_refused_while_one_is_staged() {
    if !root_or_skip("case_ids") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("V1", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("V1", cap.clone()).await;
    n.stage("V1", "stage", cap.clone(), ctx).await.unwrap();
    let both = |r: Result<(), tonic::Status>| {
        let err = r.expect_err("the other spelling is refused");
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        assert!(
            err.message().contains("V1") && err.message().contains("v1"),
            "{}",
            err.message()
        );
    };
    both(n.stage("v1", "stage-2", cap.clone(), HashMap::new()).await);
    both(n.publish("v1", "stage", "t", cap.clone(), false).await);
    both(n.unpublish("v1", "t").await);
    both(n.unstage("v1", "stage").await);
    assert_eq!(n.mount_count("stage"), 1, "V1's staging mount is untouched");
    n.unstage("V1", "stage").await.unwrap();
    n.unstage("v1", "stage").await.unwrap();
    n.host.assert_clean();
}

#[tokio::test]
async fn stats_report_abnormal_when_the_mount_is_gone() {
    if !root_or_skip("stats_abnormal") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("v", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("v", cap.clone()).await;
    n.stage("v", "stage", cap.clone(), ctx).await.unwrap();
    n.publish("v", "stage", "t", cap, false).await.unwrap();
    let t = n.host.at("t");
    assert!(!condition(&n.stats("v", &t).await.unwrap()).0);
    // Someone unmounts the target behind the plugin's back.
    rustix::mount::unmount(t.as_str(), rustix::mount::UnmountFlags::empty()).unwrap();
    let (abnormal, message) = condition(&n.stats("v", &t).await.unwrap());
    assert!(abnormal, "{message}");
    assert!(message.contains("no longer mounted"), "{message}");
    std::fs::remove_dir(&t).unwrap();
    let gone = n.stats("v", &t).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{}", gone.message());
    n.unpublish("v", "t").await.unwrap();
    n.unstage("v", "stage").await.unwrap();
    n.host.assert_clean();
}

#[tokio::test]
async fn concurrent_stages_of_one_volume_make_one_device_and_one_mount() {
    if !root_or_skip("concurrent_stages") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    let mut ctxs = Vec::new();
    for v in ["a", "b", "c"] {
        n.create(v, 64 * MIB, cap.clone()).await;
        ctxs.push((v, n.attach(v, cap.clone()).await));
    }
    let stagings: Vec<String> = ctxs.iter().map(|(v, _)| format!("stage-{v}")).collect();
    let mut calls = Vec::new();
    for ((v, ctx), staging) in ctxs.iter().zip(&stagings) {
        for _ in 0..8 {
            calls.push(n.stage(v, staging, cap.clone(), ctx.clone()));
        }
    }
    for r in futures::future::join_all(calls).await {
        r.unwrap();
    }
    assert_eq!(n.loops().len(), 3, "one loop device per volume");
    for v in ["a", "b", "c"] {
        assert_eq!(n.mount_count(&format!("stage-{v}")), 1, "{v}: one mount");
    }
    let log =
        n.d.wait_for_log_count("formatting an empty device", 3)
            .await;
    assert_eq!(log.matches("formatting an empty device").count(), 3);
    let unstages: Vec<_> = ctxs
        .iter()
        .zip(&stagings)
        .flat_map(|((v, _), s)| (0..4).map(move |_| (*v, s.as_str())))
        .map(|(v, s)| n.unstage(v, s))
        .collect();
    for r in futures::future::join_all(unstages).await {
        r.unwrap();
    }
    n.host.assert_clean();
}

/// kill -9 with volumes staged and published (mount and block); the restarted plugin adopts
/// what is there: a repeat stage reuses the loop device, and unpublish + unstage leave nothing.
#[tokio::test]
async fn after_kill_9_the_restarted_plugin_adopts_and_cleans_up() {
    if !root_or_skip("kill_9") {
        return;
    }
    let n = Node::start(&[]).await;
    let fs = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    let block = rwo_block();
    n.create("m", 64 * MIB, fs.clone()).await;
    n.create("b", 16 * MIB, block.clone()).await;
    let mctx = n.attach("m", fs.clone()).await;
    let bctx = n.attach("b", block.clone()).await;
    n.stage("m", "ms", fs.clone(), mctx.clone()).await.unwrap();
    n.publish("m", "ms", "mt", fs.clone(), false).await.unwrap();
    std::fs::write(n.host.path().join("mt/f"), b"before the crash").unwrap();
    n.stage("b", "bs", block.clone(), bctx.clone())
        .await
        .unwrap();
    n.publish("b", "bs", "bt", block.clone(), false)
        .await
        .unwrap();
    let loops_before = n.loops();
    assert_eq!(loops_before.len(), 2);

    let n = n.crash_and_restart(&[]).await;
    n.d.wait_for_log("found a volume staged by an earlier process")
        .await;
    n.stage("m", "ms", fs.clone(), mctx).await.unwrap();
    n.stage("b", "bs", block.clone(), bctx).await.unwrap();
    n.publish("m", "ms", "mt", fs, false).await.unwrap();
    n.publish("b", "bs", "bt", block, false).await.unwrap();
    assert_eq!(n.loops(), loops_before, "the same loop devices, none added");
    assert_eq!(
        n.mount_count("ms") + n.mount_count("mt"),
        2,
        "no mount doubled"
    );
    assert_eq!(
        std::fs::read(n.host.path().join("mt/f")).unwrap(),
        b"before the crash"
    );

    // A second crash, then only cleanup from the fresh process.
    let n = n.crash_and_restart(&[]).await;
    n.unpublish("m", "mt").await.unwrap();
    n.unpublish("b", "bt").await.unwrap();
    n.unstage("m", "ms").await.unwrap();
    n.unstage("b", "bs").await.unwrap();
    n.host.assert_clean();
    assert!(!n.host.path().join("bt").exists() && !n.host.path().join("mt").exists());
}

/// The README's laptop walk-through, through `rds-csi ctl`: stage + publish-node, write,
/// unpublish-node + unstage, again, read back.
#[tokio::test]
async fn ctl_mounts_a_volume_in_two_commands() {
    if !root_or_skip("ctl_node") {
        return;
    }
    let n = Node::start(&[]).await;
    let endpoint = format!("unix://{}", n.d.socket.display());
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .arg("ctl")
            .arg("--endpoint")
            .arg(&endpoint)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let (stage, target) = (n.host.at("stage"), n.host.at("mnt"));
    ctl(&["create", "laptop", "--size", "64MiB"]);
    ctl(&["stage", "laptop", &stage]);
    ctl(&["publish-node", "laptop", &stage, &target]);
    std::fs::write(format!("{target}/note"), b"hello").unwrap();
    let stats = ctl(&["stats", "laptop", &target, "--json"]);
    assert!(stats.contains("\"condition\": \"normal\""), "{stats}");
    ctl(&["unpublish-node", "laptop", &target]);
    ctl(&["unstage", "laptop", &stage]);
    n.host.assert_clean();
    ctl(&["stage", "laptop", &stage]);
    ctl(&["publish-node", "laptop", &stage, &target]);
    assert_eq!(std::fs::read(format!("{target}/note")).unwrap(), b"hello");
    ctl(&["unpublish-node", "laptop", &target]);
    ctl(&["unstage", "laptop", &stage]);
    ctl(&["delete", "laptop"]);
    n.host.assert_clean();
}

/// This driver's per-mount options of the mount at `rel` under the host dir (the topmost).
fn mount_options_at(n: &Node, rel: &str) -> Vec<String> {
    let p = n.host.path().join(rel);
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    rds_csi::node::mountinfo::parse(&text)
        .unwrap()
        .into_iter()
        .rfind(|m| m.mount_point == p)
        .unwrap_or_else(|| panic!("nothing mounted at {}", p.display()))
        .options
}

/// PVs written for the Go driver carry fstab words mount(8) consumes itself. Catches any of
/// `_netdev`, `defaults`, `nofail`, ... reaching mount(2), which answers EINVAL.
#[tokio::test]
async fn userspace_only_mount_options_are_dropped_and_the_stage_succeeds() {
    if !root_or_skip("userspace_options") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(
        Mode::SingleNodeWriter,
        "ext4",
        &[
            "_netdev,defaults,nofail",
            "auto",
            "user",
            "nouser",
            "x-systemd.device-timeout=30",
            "noatime",
        ],
    );
    n.create("v", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("v", cap.clone()).await;
    n.stage("v", "stage", cap.clone(), ctx).await.unwrap();
    let staged = mount_options_at(&n, "stage");
    assert!(staged.iter().any(|o| o == "noatime"), "{staged:?}");
    n.publish("v", "stage", "t", cap, false).await.unwrap();
    std::fs::write(n.host.path().join("t/f"), b"ok").unwrap();
    n.unpublish("v", "t").await.unwrap();
    n.unstage("v", "stage").await.unwrap();
    n.host.assert_clean();
}

/// Catches accepting `exec` (Go refuses it): at stage it is refused before anything is done,
/// at publish before the target is made.
#[tokio::test]
async fn exec_is_refused_at_stage_and_publish() {
    if !root_or_skip("exec_refused") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    let exec = mount_cap(Mode::SingleNodeWriter, "ext4", &["noatime,exec"]);
    n.create("v", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("v", cap.clone()).await;
    expect_code(
        n.stage("v", "stage", exec.clone(), ctx.clone()).await,
        Code::InvalidArgument,
        "\"exec\"",
    );
    assert!(n.loops().is_empty() && n.host.mounts().is_empty());
    n.stage("v", "stage", cap.clone(), ctx).await.unwrap();
    expect_code(
        n.publish("v", "stage", "t", exec, false).await,
        Code::InvalidArgument,
        "\"exec\"",
    );
    assert!(!n.host.path().join("t").exists(), "no target made");
    n.unstage("v", "stage").await.unwrap();
    n.host.assert_clean();
}

/// Catches an option that points the filesystem at another block device reaching the
/// kernel, or being refused only after the device was attached, formatted or recorded.
#[tokio::test]
async fn options_naming_another_device_are_refused_before_anything_is_done() {
    if !root_or_skip("device_options") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("v", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("v", cap.clone()).await;
    let bad = [
        "journal_path=/dev/x",
        "journal_dev=259:7",
        "logdev=/dev/x",
        "rtdev=/dev/x",
    ];
    for option in bad {
        let c = mount_cap(Mode::SingleNodeWriter, "ext4", &["noatime", option]);
        expect_code(
            n.stage("v", "stage", c, ctx.clone()).await,
            Code::InvalidArgument,
            option,
        );
    }
    assert!(
        n.loops().is_empty() && n.host.mounts().is_empty(),
        "nothing attached or mounted"
    );
    let mut head = vec![0u8; 1 << 20];
    std::fs::File::open(n.d.dir.path().join("volumes/v.img"))
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert!(head.iter().all(|b| *b == 0), "nothing formatted");
    let records = std::fs::read_dir(n.d.dir.path().join("node-state"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(records, 0, "no record written");

    n.stage("v", "stage", cap.clone(), ctx).await.unwrap();
    for option in bad {
        let c = mount_cap(Mode::SingleNodeWriter, "ext4", &[option]);
        expect_code(
            n.publish("v", "stage", "t", c, false).await,
            Code::InvalidArgument,
            option,
        );
    }
    assert!(!n.host.path().join("t").exists(), "no target made");
    assert_eq!(n.mount_count("t"), 0);
    n.unstage("v", "stage").await.unwrap();
    n.host.assert_clean();
}

/// Catches a pod's bind mount without `nosuid,nodev,noexec` or without the PV's per-mount
/// flags: the MS_REMOUNT|MS_BIND that applies them replaces every per-mount flag, so one
/// left out of it is gone. Read back from mountinfo's per-mount options.
#[tokio::test]
async fn a_pods_bind_mount_is_nosuid_nodev_noexec_with_the_pvs_flags() {
    if !root_or_skip("bind_flags") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &["noatime,nodiratime"]);
    n.create("v", 64 * MIB, cap.clone()).await;
    let ctx = n.attach("v", cap.clone()).await;
    n.stage("v", "stage", cap.clone(), ctx).await.unwrap();
    n.publish("v", "stage", "rw", cap.clone(), false)
        .await
        .unwrap();
    n.publish("v", "stage", "ro", cap.clone(), true)
        .await
        .unwrap();
    for (target, mode) in [("rw", "rw"), ("ro", "ro")] {
        let options = mount_options_at(&n, target);
        for want in [mode, "nosuid", "nodev", "noexec", "noatime", "nodiratime"] {
            assert!(
                options.iter().any(|o| o == want),
                "{target}: {want} missing from {options:?}"
            );
        }
    }
    // An idempotent repeat changes nothing.
    n.publish("v", "stage", "ro", cap.clone(), true)
        .await
        .unwrap();
    assert!(mount_options_at(&n, "ro").iter().any(|o| o == "noexec"));
    // noexec is the pods' mounts' own: the staging mount keeps the PV's flags only.
    let staged = mount_options_at(&n, "stage");
    assert!(
        staged.iter().any(|o| o == "nosuid") && !staged.iter().any(|o| o == "noexec"),
        "{staged:?}"
    );
    // A PV mounted `ro` gives read-only binds, and a repeat of such a publish is the same
    // publish, not another one (ALREADY_EXISTS).
    let ro_pv = mount_cap(Mode::SingleNodeWriter, "ext4", &["ro", "noatime"]);
    n.create("r", 64 * MIB, ro_pv.clone()).await;
    let rctx = n.attach("r", ro_pv.clone()).await;
    n.stage("r", "rstage", ro_pv.clone(), rctx).await.unwrap();
    for _ in 0..2 {
        n.publish("r", "rstage", "rt", ro_pv.clone(), false)
            .await
            .unwrap();
    }
    let options = mount_options_at(&n, "rt");
    for want in ["ro", "noexec", "noatime"] {
        assert!(options.iter().any(|o| o == want), "{want}: {options:?}");
    }
    n.unpublish("r", "rt").await.unwrap();
    n.unstage("r", "rstage").await.unwrap();
    for target in ["rw", "ro"] {
        n.unpublish("v", target).await.unwrap();
    }
    n.unstage("v", "stage").await.unwrap();
    n.host.assert_clean();
}

/// Stages `volume` as the Go node plugin does, with no record of ours: its image attached to a
/// loop device (the stand-in for the NVMe namespace of its NQN) and, with `mkfs`, formatted
/// and mounted at `staging`. Returns the loop device. The [`Host`] guard detaches and
/// unmounts it if the test fails.
fn go_stage(n: &Node, volume: &str, staging: &str, mkfs: Option<&str>) -> String {
    let dev = attach_by_hand(&n.d.dir.path().join(format!("volumes/{volume}.img")));
    let path = n.host.at(staging);
    std::fs::create_dir_all(&path).unwrap();
    if let Some(fs) = mkfs {
        run(&format!("mkfs.{fs}"), &["-q", &dev]);
        run("mount", &["-t", fs, &dev, &path]);
    }
    dev
}

fn attach_by_hand(image: &std::path::Path) -> String {
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Detaches a loop device the test attached and waits (bounded, [`wait_released`]) until the
/// kernel has let it go: a device a probe still holds open (just after an unmount, say) is only
/// marked to clear itself. A device still bound after the bound fails the test.
fn detach_by_hand(dev: &str) {
    run("losetup", &["--detach", dev]);
    let left = wait_released(&[dev.trim_start_matches("/dev/").to_string()]);
    assert!(
        left.is_empty(),
        "{dev} is still bound after losetup --detach"
    );
}

/// `rds_csi_node_adoptions_total{result="adopted"}` and `{result="refused"}`.
async fn adoptions(n: &Node) -> (f64, f64) {
    let scrape = n.d.scrape().await;
    (
        sample(&scrape, r#"rds_csi_node_adoptions_total{result="adopted"}"#),
        sample(&scrape, r#"rds_csi_node_adoptions_total{result="refused"}"#),
    )
}

/// The node record of `volume`, if one was written.
fn record_of(n: &Node, volume: &str) -> Option<String> {
    std::fs::read_to_string(n.d.dir.path().join(format!("node-state/{volume}.json"))).ok()
}

fn major_minor(dev: &str) -> (u64, u64) {
    let rdev = std::fs::metadata(dev).unwrap().rdev();
    (libc::major(rdev) as u64, libc::minor(rdev) as u64)
}

/// A filesystem volume the Go node plugin staged (its device mounted at the staging path, no
/// record): the kubelet's NodePublish alone adopts it and writes the record, then stats,
/// expand, unpublish and unstage work as for a volume we staged, and leave nothing. Fails
/// without the `self.adopt(..)` call in `NodePlugin::publish` (FAILED_PRECONDITION "not
/// staged"), and without the record it writes (stats and expand answer NOT_FOUND).
#[tokio::test]
async fn a_volume_the_go_plugin_staged_is_adopted_by_node_publish() {
    if !root_or_skip("go_staged_publish") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("gov", 64 * MIB, cap.clone()).await;
    n.attach("gov", cap.clone()).await;
    go_stage(&n, "gov", "stage", Some("ext4"));
    std::fs::write(n.host.path().join("stage/from-go"), b"written under Go").unwrap();
    assert_eq!(record_of(&n, "gov"), None);

    n.publish("gov", "stage", "target", cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(n.host.path().join("target/from-go")).unwrap(),
        b"written under Go"
    );
    let record = record_of(&n, "gov").expect("publish wrote the record");
    assert!(
        record.contains("\"adopted\"") && record.contains("NodePublishVolume"),
        "{record}"
    );
    assert!(record.contains(&n.host.at("stage")), "{record}");
    let log =
        n.d.wait_for_log("adopted a volume staged without a record")
            .await;
    assert_eq!(log.matches("adopted a volume staged").count(), 1);
    assert_eq!(n.loops().len(), 1, "no second loop device");
    // A repeat is the usual idempotent publish: no second adoption, no second mount.
    n.publish("gov", "stage", "target", cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(n.mount_count("target"), 1);
    assert_eq!(adoptions(&n).await, (1.0, 0.0));

    let target = n.host.at("target");
    let stats = n.stats("gov", &target).await.unwrap();
    assert_eq!(condition(&stats), (false, "volume is healthy".into()));
    assert!(bytes_of(&stats, volume_usage::Unit::Bytes).total > 0);
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let can = rds_csi::node::filesystem::has_capability(
        &status,
        rds_csi::node::filesystem::CAP_SYS_RESOURCE,
    );
    match n.expand("gov", 128 * MIB, &target).await {
        Ok(bytes) => {
            assert!(can, "grew without CAP_SYS_RESOURCE?");
            assert_eq!(bytes, 128 * MIB);
        }
        // Past the record: the refusal is ext4's, not NOT_FOUND.
        Err(e) => {
            assert!(!can, "failed with CAP_SYS_RESOURCE: {}", e.message());
            assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
            assert!(e.message().contains("CAP_SYS_RESOURCE"), "{}", e.message());
        }
    }

    n.unpublish("gov", "target").await.unwrap();
    n.unstage("gov", "stage").await.unwrap();
    assert_eq!(record_of(&n, "gov"), None, "unstage forgot the record");
    n.d.unpublish("gov", "n1").await.unwrap();
    n.host.assert_clean();
}

/// NodeGetVolumeStats and NodeExpandVolume on a volume the Go plugin staged and published
/// (bind mount at the pod's target), before any NodePublish of ours: stats answer from the
/// kernel (read-only, no record: the request carries no capability to record), expand with
/// `staging_target_path` and `volume_capability` adopts and writes the record, and the Go
/// plugin's own target then unpublishes. Fails without `unrecorded` in `stats` (NOT_FOUND)
/// and without the `adopt` call in `expand` (NOT_FOUND).
#[tokio::test]
async fn stats_and_expand_adopt_a_volume_the_go_plugin_staged_and_published() {
    if !root_or_skip("go_staged_stats_expand") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "xfs", &[]);
    n.create("gox", 512 * MIB, cap.clone()).await;
    n.attach("gox", cap.clone()).await;
    go_stage(&n, "gox", "stage", Some("xfs"));
    let target = n.host.at("gotarget");
    std::fs::create_dir(&target).unwrap();
    run("mount", &["--bind", &n.host.at("stage"), &target]);

    let stats = n.stats("gox", &target).await.unwrap();
    assert_eq!(condition(&stats), (false, "volume is healthy".into()));
    let before = bytes_of(&stats, volume_usage::Unit::Bytes).total;
    assert!(before > 0);
    assert_eq!(record_of(&n, "gox"), None, "stats write nothing");

    let controller =
        n.d.controller()
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: "gox".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 1024 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert!(controller.node_expansion_required);
    let expand = |staging: String, capability: Option<VolumeCapability>| NodeExpandVolumeRequest {
        volume_id: "gox".into(),
        volume_path: target.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: 1024 * MIB,
            limit_bytes: 0,
        }),
        staging_target_path: staging,
        volume_capability: capability,
        ..Default::default()
    };
    // Without the staging path there is nothing to record: today's NOT_FOUND.
    let refused =
        n.d.node()
            .node_expand_volume(expand(String::new(), Some(cap.clone())))
            .await
            .unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{}", refused.message());
    assert_eq!(record_of(&n, "gox"), None);
    let bytes =
        n.d.node()
            .node_expand_volume(expand(n.host.at("stage"), Some(cap.clone())))
            .await
            .unwrap()
            .into_inner()
            .capacity_bytes;
    assert_eq!(bytes, 1024 * MIB);
    let record = record_of(&n, "gox").expect("expand wrote the record");
    assert!(record.contains("NodeExpandVolume"), "{record}");
    let after = bytes_of(
        &n.stats("gox", &target).await.unwrap(),
        volume_usage::Unit::Bytes,
    )
    .total;
    assert!(after > before * 3 / 2, "{before} -> {after}");

    n.unpublish("gox", "gotarget").await.unwrap();
    n.unstage("gox", "stage").await.unwrap();
    assert_eq!(record_of(&n, "gox"), None);
    n.host.assert_clean();
}

/// Another device mounted at the staging path is never adopted: NodePublish is
/// FAILED_PRECONDITION naming what is mounted there, nothing is recorded, mounted or
/// detached, and stats and expand refuse it the same way. Fails without the major:minor
/// comparison in `adopt` (the foreign mount would be adopted and bind-mounted).
#[tokio::test]
async fn a_staging_path_with_another_device_mounted_is_never_adopted() {
    if !root_or_skip("go_staged_foreign") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("mine", 64 * MIB, cap.clone()).await;
    n.attach("mine", cap.clone()).await;
    // The volume's own device is attached (as Go leaves it connected) ...
    let own = go_stage(&n, "mine", "stage", None);
    // ... but another filesystem is mounted at its staging path.
    let other_image = n.host.path().join("other.img");
    std::fs::File::create(&other_image)
        .unwrap()
        .set_len(64 * MIB as u64)
        .unwrap();
    let other = attach_by_hand(&other_image);
    run("mkfs.ext4", &["-q", &other]);
    run("mount", &[&other, &n.host.at("stage")]);
    let (major, minor) = major_minor(&other);

    let err = n
        .publish("mine", "stage", "target", cap.clone(), false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains(&other) && err.message().contains(&format!("{major}:{minor}")),
        "names what is mounted there: {}",
        err.message()
    );
    assert_eq!(record_of(&n, "mine"), None, "nothing recorded");
    assert!(!n.host.path().join("target").exists(), "no target made");
    assert_eq!(n.mount_count("stage"), 1);

    let stage = n.host.at("stage");
    let err = n.stats("mine", &stage).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains(&other), "{}", err.message());
    let err =
        n.d.node()
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: "mine".into(),
                volume_path: stage.clone(),
                staging_target_path: stage.clone(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains(&other), "{}", err.message());
    assert_eq!(record_of(&n, "mine"), None);
    assert_eq!(n.loops().len(), 2, "neither loop device was detached");
    // NodePublish and NodeExpand refused an adoption; stats adopt nothing, so count nothing.
    assert_eq!(adoptions(&n).await, (0.0, 2.0));

    run("umount", &[&stage]);
    detach_by_hand(&other);
    detach_by_hand(&own);
    n.host.assert_clean();
}

/// Nothing mounted at the staging path keeps today's answers, device attached or not:
/// NodePublish FAILED_PRECONDITION "NodeStageVolume it first", stats and expand NOT_FOUND,
/// and nothing recorded. Guards the `Ok(None)` arms of `adopt` (adopting an attached but
/// unmounted filesystem volume would publish an empty directory).
#[tokio::test]
async fn nothing_mounted_at_the_staging_path_keeps_todays_errors() {
    if !root_or_skip("go_staged_nothing") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = mount_cap(Mode::SingleNodeWriter, "ext4", &[]);
    n.create("bare", 64 * MIB, cap.clone()).await;
    n.attach("bare", cap.clone()).await;
    std::fs::create_dir(n.host.path().join("stage")).unwrap();
    let stage = n.host.at("stage");
    for attached in [None, Some(go_stage(&n, "bare", "stage", None))] {
        expect_code(
            n.publish("bare", "stage", "target", cap.clone(), false)
                .await,
            Code::FailedPrecondition,
            "NodeStageVolume it first",
        );
        let err = n.stats("bare", &stage).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{}", err.message());
        let err =
            n.d.node()
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id: "bare".into(),
                    volume_path: stage.clone(),
                    staging_target_path: stage.clone(),
                    volume_capability: Some(cap.clone()),
                    ..Default::default()
                })
                .await
                .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{}", err.message());
        assert_eq!(record_of(&n, "bare"), None, "attached: {attached:?}");
        assert!(!n.host.path().join("target").exists());
        if let Some(dev) = attached {
            detach_by_hand(&dev);
        }
    }
    assert_eq!(
        adoptions(&n).await,
        (0.0, 0.0),
        "nothing to adopt is not counted"
    );
    n.host.assert_clean();
}

/// A block volume the Go plugin staged: its device attached, nothing at the staging path (Go
/// creates nothing there for block). NodePublish adopts it, makes the device node of that very
/// device, and unpublish + unstage detach it and leave nothing. Fails without the block arm
/// of `adopt` (FAILED_PRECONDITION "not staged").
#[tokio::test]
async fn a_block_volume_the_go_plugin_attached_is_adopted_by_node_publish() {
    if !root_or_skip("go_staged_block") {
        return;
    }
    let n = Node::start(&[]).await;
    let cap = rwo_block();
    n.create("gob", 16 * MIB, cap.clone()).await;
    n.attach("gob", cap.clone()).await;
    let dev = go_stage(&n, "gob", "stage", None);
    n.publish("gob", "stage", "node", cap.clone(), false)
        .await
        .unwrap();
    let node = n.host.path().join("node");
    let meta = std::fs::metadata(&node).unwrap();
    assert!(meta.file_type().is_block_device());
    assert_eq!(
        (
            libc::major(meta.rdev()) as u64,
            libc::minor(meta.rdev()) as u64
        ),
        major_minor(&dev)
    );
    let record = record_of(&n, "gob").expect("publish wrote the record");
    assert!(record.contains("\"adopted\""), "{record}");
    assert_eq!(adoptions(&n).await, (1.0, 0.0));
    let stats = n.stats("gob", &n.host.at("node")).await.unwrap();
    assert_eq!(bytes_of(&stats, volume_usage::Unit::Bytes).total, 16 * MIB);
    n.unpublish("gob", "node").await.unwrap();
    n.unstage("gob", "stage").await.unwrap();
    assert_eq!(record_of(&n, "gob"), None);
    n.host.assert_clean();
}

/// Catches dropping the `LOOP_GET_STATUS64` check in `LoopDevices::detach` (device.rs): a
/// loop device that sysfs listed as the volume's image, but that was freed and re-bound to
/// another image before the detach, stays bound to that other image. Real loop devices on this
/// test's own images; the [`Host`] guard detaches them even if it fails.
#[tokio::test]
async fn loop_detach_refuses_a_loop_rebound_to_another_image() {
    use rds_csi::node::command::SystemRunner;
    use rds_csi::node::device::{DeviceSource, LoopDevices};
    if !root_or_skip("loop_rebound") {
        return;
    }
    let host = Host::new();
    let root = host.path().join("volumes");
    std::fs::create_dir(&root).unwrap();
    let (ours, theirs) = (root.join("v1.img"), root.join("x.img"));
    for image in [&ours, &theirs] {
        std::fs::File::create(image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    let loops = LoopDevices::new(SystemRunner, &root, "/sys").unwrap();
    let volume = rds_csi::ids::VolumeId::try_from("v1").unwrap();
    let backing = loops
        .locate(&volume, &HashMap::new(), &HashMap::new())
        .unwrap();
    let dev = loops.attach(&backing).await.unwrap();
    let (path, other) = (dev.path.to_string(), theirs.display().to_string());
    loops.before_next_detach_check(move || {
        run("losetup", &["--detach", &path]);
        run("losetup", &[&path, &other]);
    });
    loops.detach(&backing).await.unwrap();
    let bound = std::fs::read_to_string(format!("/sys/block/{}/loop/backing_file", dev.name()))
        .expect("the re-bound loop device is still bound");
    assert_eq!(bound.trim_end(), theirs.display().to_string());
    run("losetup", &["--detach", &dev.path.to_string()]);
    host.assert_clean();
}
