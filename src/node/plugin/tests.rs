//! The plugin's ownership and identity rules against the real NVMe/TCP device source over a
//! fake sysfs (renumber a namespace by rewriting its `dev`, delete a controller as
//! `ctrl_loss_tmo` does) and the kernel-like mount table of [`FakeMounter`]: unmounting a path
//! that is not a mount point is EINVAL, and every mount carries its device's number.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::backend::rds::values::{NqnPrefix, NvmeTarget};
use crate::domain::fixtures::rwo_ext4;
use crate::node::fake_sysfs::{kernel_view, FakeMounter, FakeProc, FakeSysfs};
use crate::node::fakes::{staged_ext4, RecordingRunner};
use crate::node::nvme::NvmeDevices;

const NQN1: &str = "nqn.2000-02.com.mikrotik:pvc-1";
const NQN2: &str = "nqn.2000-02.com.mikrotik:pvc-2";

struct World {
    dir: tempfile::TempDir,
    mounts: FakeMounter,
    plugin: Arc<NodePlugin>,
    records: Records,
    sysfs: FakeSysfs,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let sysfs = FakeSysfs::new(&sys);
        let mounts = FakeMounter::new(&FakeProc::new(&dir.path().join("proc")));
        let runner = RecordingRunner::default();
        runner.disconnects_in(&sysfs);
        let plugin = Arc::new(NodePlugin::new(NodeDeps {
            source: Arc::new(NvmeDevices::new(runner.clone(), &sys, NqnPrefix::default())),
            mounter: Arc::new(mounts.clone()),
            runner: Arc::new(runner),
            records: Records::open(&dir.path().join("state")).unwrap(),
            metrics: Arc::new(Metrics::new()),
            root: Arc::new(KubeletRoot::new(
                AbsPath::try_from(dir.path().to_path_buf()).unwrap(),
            )),
        }));
        let records = Records::open(&dir.path().join("state")).unwrap();
        World {
            dir,
            mounts,
            plugin,
            records,
            sysfs,
        }
    }

    fn sys(&self) -> PathBuf {
        self.dir.path().join("sys")
    }

    /// NodeUnpublishVolume of `volume` at `target`.
    async fn unpublish(&self, volume: &str, target: &AbsPath) -> Result<(), NodeError> {
        self.plugin
            .unpublish(Unpublish {
                volume: vol(volume),
                target: target.clone(),
            })
            .await
    }

    /// NodeUnstageVolume of `volume` at `staging`.
    async fn unstage(&self, volume: &str, staging: &AbsPath) -> Result<(), NodeError> {
        self.plugin
            .unstage(Unstage {
                volume: vol(volume),
                staging: staging.clone(),
            })
            .await
    }

    /// NodeStageVolume of `volume` at `staging` as `capability`, with no context.
    async fn stage(
        &self,
        volume: &str,
        staging: &AbsPath,
        capability: Capability,
    ) -> Result<(), NodeError> {
        self.plugin
            .stage(Stage {
                volume: vol(volume),
                staging: staging.clone(),
                capability,
                options: MountOptions::default(),
                publish_context: HashMap::new(),
                volume_context: HashMap::new(),
            })
            .await
    }

    /// NodePublishVolume of `volume` from `staging` to `target`, read-write, with
    /// `volume_context`.
    async fn publish(
        &self,
        volume: &str,
        staging: &AbsPath,
        target: &AbsPath,
        capability: Capability,
        volume_context: HashMap<String, String>,
    ) -> Result<(), NodeError> {
        self.plugin
            .publish(Publish {
                volume: vol(volume),
                staging: staging.clone(),
                target: target.clone(),
                capability,
                options: MountOptions::default(),
                readonly: false,
                publish_context: HashMap::new(),
                volume_context,
            })
            .await
    }

    /// A directory under the test's root, created.
    fn path(&self, name: &str) -> AbsPath {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        AbsPath::try_from(p).unwrap()
    }

    /// Connects `nqn` as controller `ctrl` in subsystem `ctrl + 10` (founded by a controller
    /// since gone) with namespace device `nvme<ctrl>n1` at `dev`: without native multipath
    /// the kernel names the namespace after the controller.
    fn connect(&self, ctrl: u32, nqn: &str, dev: &str) {
        self.sysfs.connect(ctrl, ctrl + 10, nqn);
        self.sysfs.plain_namespace(ctrl, 1, dev);
    }

    /// A reconnect that gave the namespace a new minor: the controller deleted and connected
    /// again under its NQN.
    fn renumber(&self, ctrl: u32, dev: &str) {
        let nqn =
            std::fs::read_to_string(self.sys().join(format!("class/nvme/nvme{ctrl}/subsysnqn")))
                .unwrap();
        self.sysfs.delete_controller(ctrl);
        self.connect(ctrl, nqn.trim(), dev);
    }

    /// The controller deleted after `ctrl_loss_tmo`.
    fn vanish(&self, ctrl: u32) {
        self.sysfs.delete_controller(ctrl);
    }
}

fn vol(id: &str) -> VolumeId {
    VolumeId::try_from(id).unwrap()
}

fn nqn_context(nqn: &str) -> HashMap<String, String> {
    HashMap::from([("nqn".to_string(), nqn.to_string())])
}

fn target(nqn: &str) -> Backing {
    Backing::Nvme(NvmeTarget::from_context(&nqn_context(nqn), || unreachable!()).unwrap())
}

/// Writes the record a stage of `volume` (ext4 at `staging`, device 259:`minor`) leaves,
/// published at `published`, and mounts it as the kernel would show it.
fn staged(w: &World, volume: &str, nqn: &str, staging: &AbsPath, published: &AbsPath, minor: u32) {
    let device = BlockDevice {
        path: AbsPath::try_from(PathBuf::from("/dev/nvme1n1")).unwrap(),
        major: 259,
        minor,
    };
    w.records
        .save(&staged_ext4(
            volume,
            target(nqn),
            staging,
            published,
            &device,
        ))
        .unwrap();
    w.mounts.preload_ext4(&device, &[staging, published]);
}

/// A reconnect gave the namespace a new minor (259:1 → 259:5); the mounts still show 259:1.
/// Unpublish and unstage recognise them as the volume's from the record's device history,
/// unmount them and succeed. Fails (FAILED_PRECONDITION "not volume pvc-1") when `decide`
/// ignores the history and compares with the current device only.
#[tokio::test]
async fn mounts_showing_a_renumbered_devices_old_minor_are_still_the_volumes() {
    let w = World::new();
    let (staging, published) = (w.path("stage"), w.path("pod"));
    w.connect(1, NQN1, "259:1");
    staged(&w, "pvc-1", NQN1, &staging, &published, 1);
    w.renumber(1, "259:5");

    w.unpublish("pvc-1", &published).await.unwrap();
    assert!(w.mounts.at(&published).is_empty());
    assert!(
        !published.as_path().exists(),
        "the target directory is removed"
    );
    w.unstage("pvc-1", &staging).await.unwrap();
    assert!(w.mounts.at(&staging).is_empty());
    assert_eq!(w.records.load(&vol("pvc-1")).unwrap(), None);
}

/// The controller was deleted after `ctrl_loss_tmo`: the backing resolves to no device, the
/// mounts keep the old number. Unpublish and unstage unmount and succeed, and the record goes
/// only with the last mount. Fails when `unpublish` requires the current device to match.
#[tokio::test]
async fn an_unpublish_and_unstage_after_the_controller_was_deleted_unmount_and_succeed() {
    let w = World::new();
    let (staging, published) = (w.path("stage"), w.path("pod"));
    w.connect(1, NQN1, "259:1");
    staged(&w, "pvc-1", NQN1, &staging, &published, 1);
    w.vanish(1);

    w.unpublish("pvc-1", &published).await.unwrap();
    w.unstage("pvc-1", &staging).await.unwrap();
    assert!(
        w.mounts.mounts().unwrap().is_empty(),
        "nothing left mounted"
    );
    assert_eq!(w.records.load(&vol("pvc-1")).unwrap(), None);
}

/// With the device gone and another device's mount over the volume's at the staging path,
/// unstage unmounts nothing and keeps the record. Fails when unstage checks the staging
/// mounts only while the device still resolves (the old code skipped them and forgot the
/// record), or when a foreign mount anywhere in the stack does not refuse the unstage.
#[tokio::test]
async fn an_unstage_never_forgets_a_record_while_something_is_mounted_at_its_path() {
    let w = World::new();
    let (staging, published) = (w.path("stage"), w.path("pod"));
    w.connect(1, NQN1, "259:1");
    staged(&w, "pvc-1", NQN1, &staging, &published, 1);
    w.unpublish("pvc-1", &published).await.unwrap();
    w.vanish(1);
    w.mounts
        .preload(8, 0, "/dev/sda", &kernel_view(&staging), "ext4");
    let err = w.unstage("pvc-1", &staging).await.unwrap_err();
    assert!(matches!(err, NodeError::FailedPrecondition(_)), "{err}");
    assert_eq!(w.mounts.at(&staging), vec![(259, 1), (8, 0)]);
    assert!(w.records.load(&vol("pvc-1")).unwrap().is_some());
}

/// pvc-1 is staged; a NodePublish of pvc-1 whose volume_context names pvc-2's NQN (connected,
/// 259:2) is INVALID_ARGUMENT naming both NQNs, and nothing is made at the target. Fails when
/// publish trusts `source.locate` of the request (pvc-2's raw disk is mknod'ed at the target).
#[tokio::test]
async fn a_publish_naming_another_volumes_nqn_is_refused() {
    let w = World::new();
    let staging = w.path("stage");
    w.connect(1, NQN1, "259:1");
    w.connect(2, NQN2, "259:2");
    let mut record = StageRecord {
        volume: vol("pvc-1"),
        staging: staging.clone(),
        capability: Capability::block(AccessMode::SingleNodeWriter),
        fs: None,
        readonly: false,
        backing: target(NQN1),
        device: None,
        devices: Vec::new(),
        publishes: BTreeMap::new(),
        origin: Origin::Staged,
    };
    record.saw(&BlockDevice {
        path: AbsPath::try_from(PathBuf::from("/dev/nvme1n1")).unwrap(),
        major: 259,
        minor: 1,
    });
    w.records.save(&record).unwrap();
    let pod = AbsPath::try_from(w.dir.path().join("pod-dev")).unwrap();
    let err = w
        .publish(
            "pvc-1",
            &staging,
            &pod,
            Capability::block(AccessMode::SingleNodeWriter),
            nqn_context(NQN2),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::InvalidArgument { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(NQN1) && message.contains(NQN2),
        "{message}"
    );
    assert!(w.mounts.calls().is_empty(), "{:?}", w.mounts.calls());
    assert!(!pod.as_path().exists());
}

/// `PVC-1` and `pvc-1` name one NQN: with `pvc-1` staged, every call for `PVC-1` is
/// FAILED_PRECONDITION naming both ids, and nothing of `pvc-1` is touched. Fails when `load`
/// does not look for another spelling (the unstage of `PVC-1` answers OK with nothing done,
/// and a stage of it would make a second record over the same device).
#[tokio::test]
async fn ids_differing_only_by_case_are_refused_not_kept_as_two_volumes() {
    let w = World::new();
    let (staging, published) = (w.path("stage"), w.path("pod"));
    w.connect(1, NQN1, "259:1");
    staged(&w, "pvc-1", NQN1, &staging, &published, 1);
    let other = w.path("stage-upper");
    let stage = w.stage("PVC-1", &other, rwo_ext4()).await;
    let unstage = w.unstage("PVC-1", &staging).await;
    for result in [stage, unstage] {
        let err = result.unwrap_err();
        assert!(matches!(err, NodeError::FailedPrecondition(_)), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("PVC-1") && message.contains("pvc-1"),
            "{message}"
        );
    }
    assert_eq!(w.records.load(&vol("PVC-1")).unwrap(), None);
    assert_eq!(w.mounts.at(&staging), vec![(259, 1)]);
    assert!(w.mounts.calls().is_empty(), "{:?}", w.mounts.calls());
}

/// NodeUnpublish and NodeUnstage of a volume the node has nothing of answer OK (the kubelet
/// retries NOT_FOUND forever). Fails when either keeps its old NOT_FOUND.
#[tokio::test]
async fn an_unpublish_or_unstage_with_nothing_to_undo_is_ok() {
    let w = World::new();
    let staging = w.path("stage");
    let gone = AbsPath::try_from(w.dir.path().join("never-published")).unwrap();
    w.unpublish("pvc-9", &gone).await.unwrap();
    w.unstage("pvc-9", &staging).await.unwrap();
    assert!(w.mounts.calls().is_empty(), "{:?}", w.mounts.calls());
}

/// After a reboot the record says pvc-1 is staged as ext4 at 259:1, but nothing is mounted at
/// its staging path and its NQN now resolves to 259:7. A NodeStage as block is not
/// ALREADY_EXISTS against that record: the record is replaced (block, the new device), and it
/// keeps the old number in its history and the old target. Fails with ALREADY_EXISTS when
/// `stage` lets a record the kernel contradicts win (`contradicted` removed).
#[tokio::test]
async fn a_stale_record_the_kernel_contradicts_is_replaced_by_a_fresh_stage() {
    let w = World::new();
    let (staging, published) = (w.path("stage"), w.path("pod"));
    w.connect(1, NQN1, "259:1");
    staged(&w, "pvc-1", NQN1, &staging, &published, 1);
    // The reboot: no mounts, the namespace back under another minor.
    w.mounts.reboot();
    w.renumber(1, "259:7");

    w.stage(
        "pvc-1",
        &staging,
        Capability::block(AccessMode::SingleNodeWriter),
    )
    .await
    .unwrap();
    let record = w.records.load(&vol("pvc-1")).unwrap().unwrap();
    assert_eq!(
        record.capability,
        Capability::block(AccessMode::SingleNodeWriter)
    );
    assert_eq!(record.fs, None);
    assert_eq!(
        record.known_devices(),
        vec![
            DeviceNumber {
                major: 259,
                minor: 1
            },
            DeviceNumber {
                major: 259,
                minor: 7
            }
        ]
    );
    assert!(record.publishes.contains_key(&published));
    assert!(w.mounts.calls().is_empty(), "{:?}", w.mounts.calls());
}

/// The same record with its staging mount still there (259:1, its device gone) is not
/// contradicted: the stage keeps answering against it (ALREADY_EXISTS for another
/// capability), so a live mount is never orphaned by a replaced record.
#[tokio::test]
async fn a_record_whose_mount_is_still_there_is_not_replaced() {
    let w = World::new();
    let (staging, published) = (w.path("stage"), w.path("pod"));
    w.connect(1, NQN1, "259:1");
    staged(&w, "pvc-1", NQN1, &staging, &published, 1);
    w.vanish(1);
    let err = w
        .stage(
            "pvc-1",
            &staging,
            Capability::block(AccessMode::SingleNodeWriter),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::AlreadyExists(_)), "{err:?}");
    assert_eq!(
        w.records.load(&vol("pvc-1")).unwrap().unwrap().capability,
        rwo_ext4()
    );
}

/// The staging mount still shows 259:1 but the namespace is now 259:5: the mount is the
/// volume's (unpublish and unstage may undo it) but stale, so NodePublish refuses to bind
/// from it and binds nothing. Fails when `publish_mount` accepts any mount `decide` calls the
/// volume's instead of only a live one.
#[tokio::test]
async fn a_publish_never_binds_from_a_staging_mount_of_an_earlier_device() {
    let w = World::new();
    let (staging, published) = (w.path("stage"), w.path("pod"));
    w.connect(1, NQN1, "259:1");
    staged(&w, "pvc-1", NQN1, &staging, &published, 1);
    w.renumber(1, "259:5");
    let second = AbsPath::try_from(w.dir.path().join("pod-2")).unwrap();
    let err = w
        .publish("pvc-1", &staging, &second, rwo_ext4(), HashMap::new())
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::FailedPrecondition(_)), "{err:?}");
    assert!(err.to_string().contains("stage it again"), "{err}");
    assert!(w.mounts.calls().is_empty(), "{:?}", w.mounts.calls());
    assert!(w.mounts.at(&second).is_empty());
}
