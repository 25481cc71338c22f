//! [`NodePlugin`]: the node's volume operations, CSI §4.5 (NodeStage/Unstage/Publish/Unpublish,
//! NodeGetVolumeStats, NodeExpandVolume), on top of the device source, the mounter, the command
//! runner and the records.
//!
//! Every operation is idempotent as the spec requires: a repeat with the same arguments is OK
//! and changes nothing; a repeat with another capability is ALREADY_EXISTS. An operation that
//! fails undoes what it did itself (a loop device it attached, a directory it created, a
//! record it wrote), so nothing is left half-done. What an earlier process made is found in
//! the kernel (sysfs, mountinfo) and adopted, never made twice.
//!
//! What at a path is the volume's is never decided here: every call asks
//! [`super::ownership::decide`] through `identity.rs`'s `judge`. Volumes with no record live in
//! `adoption.rs`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::command::CommandRunner;
use super::confine::{ConfineError, KubeletRoot, PathLocks};
use super::device::{Backing, DeviceSource};
use super::filesystem::{self, Content};
use super::locks::VolumeLocks;
use super::mounter::{MountOptions, Mounter};
use super::mountinfo::MountEntry;
use super::ownership::{self, AtPath, DeviceNumber, Known, Verdict};
use super::paths::{AbsPath, BlockDevice, Found};
use super::records::{Origin, PublishRecord, Records, StageRecord};
use super::work;
use super::NodeError;
use crate::domain::{AccessMode, AccessType, Capability, FsType, PUBLISH_READONLY_KEY};
use crate::ids::VolumeId;
use crate::metrics::{outcome, Metrics, MOUNT, UNMOUNT};

/// A validated NodeStageVolumeRequest.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    pub volume: VolumeId,
    pub staging: AbsPath,
    pub capability: Capability,
    /// The capability's mount options, validated (default for block access).
    pub options: MountOptions,
    pub publish_context: HashMap<String, String>,
    pub volume_context: HashMap<String, String>,
}

/// A validated NodeUnstageVolumeRequest.
#[derive(Clone, Debug, PartialEq)]
pub struct Unstage {
    pub volume: VolumeId,
    pub staging: AbsPath,
}

/// A validated NodePublishVolumeRequest.
#[derive(Clone, Debug, PartialEq)]
pub struct Publish {
    pub volume: VolumeId,
    pub staging: AbsPath,
    pub target: AbsPath,
    pub capability: Capability,
    /// The capability's mount options, validated: their per-mount flags go on the bind mount.
    pub options: MountOptions,
    pub readonly: bool,
    pub publish_context: HashMap<String, String>,
    pub volume_context: HashMap<String, String>,
}

/// A validated NodeUnpublishVolumeRequest.
#[derive(Clone, Debug, PartialEq)]
pub struct Unpublish {
    pub volume: VolumeId,
    pub target: AbsPath,
}

/// A volume path from NodeGetVolumeStats or NodeExpandVolume. A path that is not absolute
/// and clean cannot name anything the node made, so it is NOT_FOUND, as the spec answers for
/// a volume path that does not exist.
#[derive(Clone, Debug, PartialEq)]
pub enum VolumePath {
    Valid(AbsPath),
    Invalid { raw: String, reason: String },
}

impl VolumePath {
    pub fn parse(raw: &str, field: &'static str) -> Result<Self, NodeError> {
        if raw.is_empty() {
            return Err(NodeError::invalid(field, "must not be empty"));
        }
        Ok(match AbsPath::parse_field(raw, field) {
            Ok(p) => Self::Valid(p),
            Err(e) => Self::Invalid {
                raw: raw.chars().take(256).collect(),
                reason: e.to_string(),
            },
        })
    }

    fn valid(&self, volume: &VolumeId) -> Result<&AbsPath, NodeError> {
        match self {
            Self::Valid(p) => Ok(p),
            Self::Invalid { raw, reason } => Err(NodeError::NotFound(format!(
                "volume {volume} is not at {raw:?}: {reason}"
            ))),
        }
    }
}

/// A validated NodeGetVolumeStatsRequest.
#[derive(Clone, Debug)]
pub struct Stats {
    pub volume: VolumeId,
    pub path: VolumePath,
}

/// What NodeGetVolumeStats reports.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeStats {
    pub total_bytes: u64,
    pub available_bytes: Option<u64>,
    pub used_bytes: Option<u64>,
    /// (total, available, used) inodes, for filesystems.
    pub inodes: Option<(u64, u64, u64)>,
    /// `None`: healthy; `Some(why)`: abnormal.
    pub abnormal: Option<String>,
}

/// A validated NodeExpandVolumeRequest.
#[derive(Clone, Debug, PartialEq)]
pub struct Expand {
    pub volume: VolumeId,
    pub path: VolumePath,
    /// The request's `staging_target_path` and `volume_capability` (both optional in CSI; the
    /// kubelet sends both). With both, a volume staged without a record is adopted.
    pub staging: Option<AbsPath>,
    pub capability: Option<Capability>,
    pub required_bytes: u64,
    pub limit_bytes: u64,
}

/// The seams the plugin works through.
pub struct NodeDeps {
    pub source: Arc<dyn DeviceSource>,
    pub mounter: Arc<dyn Mounter>,
    pub runner: Arc<dyn CommandRunner>,
    pub records: Records,
    /// Where mounts, stale mounts and recoveries are counted (`NodeMetrics`).
    pub metrics: Arc<Metrics>,
    /// `--kubelet-dir`: every staging path and target lies beneath it.
    pub root: Arc<KubeletRoot>,
}

pub struct NodePlugin {
    source: Arc<dyn DeviceSource>,
    mounter: Arc<dyn Mounter>,
    runner: Arc<dyn CommandRunner>,
    records: Arc<Records>,
    locks: Arc<VolumeLocks>,
    metrics: Arc<Metrics>,
    root: Arc<KubeletRoot>,
    /// Per staging path and target, taken after the volume's lock.
    paths: PathLocks,
}

/// Runs blocking work on the node's bounded pool ([`super::work`]), labelled with where it was
/// asked for; the syscalls that can wedge (mount, unmount, mknod, statvfs) say what they do.
#[track_caller]
fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> impl std::future::Future<Output = Result<T, NodeError>> {
    let at = std::panic::Location::caller();
    work::blocking(format!("node work at {}:{}", at.file(), at.line()), f)
}

fn same_device(entry: &MountEntry, device: &BlockDevice) -> bool {
    entry.major == device.major && entry.minor == device.minor
}

fn number(device: &BlockDevice) -> DeviceNumber {
    DeviceNumber {
        major: device.major,
        minor: device.minor,
    }
}

/// The mounts stacked at `path`, oldest first.
fn mounts_at<'a>(
    root: &KubeletRoot,
    mounts: &'a [MountEntry],
    path: &AbsPath,
) -> Vec<&'a MountEntry> {
    let view = root.kernel_view(path);
    mounts.iter().filter(|m| m.mount_point == view).collect()
}

fn is_block(cap: &Capability) -> bool {
    matches!(cap.access_type(), AccessType::Block)
}

fn describe(cap: &Capability) -> String {
    match cap.access_type() {
        AccessType::Block => format!("{:?} block", cap.mode()),
        AccessType::Mount {
            fs_type,
            mount_flags,
        } => format!(
            "{:?} mount (fs_type {:?}, mount_flags {:?})",
            cap.mode(),
            fs_type,
            mount_flags
        ),
    }
}

impl NodePlugin {
    pub fn new(deps: NodeDeps) -> Self {
        Self {
            source: deps.source,
            mounter: deps.mounter,
            runner: deps.runner,
            records: Arc::new(deps.records),
            locks: Arc::default(),
            metrics: deps.metrics,
            root: deps.root,
            paths: PathLocks::default(),
        }
    }

    async fn load(&self, volume: &VolumeId) -> Result<Option<StageRecord>, NodeError> {
        let records = self.records.clone();
        let volume = volume.clone();
        blocking(move || records.load(&volume)).await
    }

    async fn save(&self, record: &StageRecord) -> Result<(), NodeError> {
        let records = self.records.clone();
        let record = record.clone();
        blocking(move || records.save(&record)).await
    }

    async fn forget(&self, volume: &VolumeId) -> Result<(), NodeError> {
        let records = self.records.clone();
        let volume = volume.clone();
        blocking(move || records.remove(&volume)).await
    }

    async fn mounts(&self) -> Result<Vec<MountEntry>, NodeError> {
        let mounter = self.mounter.clone();
        blocking(move || mounter.mounts().map_err(NodeError::from)).await
    }

    /// What is at `path`, resolved beneath `--kubelet-dir`. A path outside it holds nothing
    /// of a volume's (NOT_FOUND, as for a volume path that does not exist); a symlink among
    /// its parents is INVALID_ARGUMENT.
    async fn look(&self, path: &AbsPath) -> Result<Found, NodeError> {
        let (root, p) = (self.root.clone(), path.clone());
        blocking(move || {
            root.inspect(&p).map_err(|e| match e {
                ConfineError::Outside { .. } => NodeError::NotFound(e.to_string()),
                e => confine_error("path", e),
            })
        })
        .await
    }

    /// INVALID_ARGUMENT unless `path` (the request's `field`) lies beneath `--kubelet-dir`
    /// with no symlink among its parents.
    async fn confined(&self, path: &AbsPath, field: &'static str) -> Result<(), NodeError> {
        let (root, p) = (self.root.clone(), path.clone());
        blocking(move || root.check(&p).map_err(|e| confine_error(field, e))).await
    }

    /// NOT_FOUND unless the volume's storage exists.
    async fn require_volume(&self, volume: &VolumeId, backing: &Backing) -> Result<(), NodeError> {
        if self.source.exists(backing).await? {
            Ok(())
        } else {
            Err(NodeError::NotFound(format!(
                "volume {volume} does not exist on this node ({backing} is missing)"
            )))
        }
    }

    /// Logs what the node finds at start: every recorded stage, checked against the kernel.
    /// Nothing is changed; the next RPC for a volume adopts or repairs what is there.
    pub async fn survey(&self) -> Result<usize, NodeError> {
        let status =
            blocking(|| Ok(std::fs::read_to_string("/proc/self/status").unwrap_or_default()))
                .await?;
        if !filesystem::has_capability(&status, filesystem::CAP_SYS_RESOURCE) {
            tracing::warn!("this process lacks CAP_SYS_RESOURCE: growing an ext4 filesystem online will fail (xfs and block volumes are not affected)");
        }
        let records = self.records.clone();
        let all = blocking(move || records.all()).await?;
        let mounts = self.mounts().await?;
        let mut count = 0;
        for record in all {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable node record left as it is");
                    continue;
                }
            };
            count += 1;
            let device = self.source.find(&record.backing).await?;
            let history = record.known_devices();
            let known = Known {
                history: &history,
                current: device.as_ref().map(number),
                recorded: true,
            };
            let staged_mount = ownership::decide(
                &AtPath::Directory(mounts_at(&self.root, &mounts, &record.staging)),
                &known,
            );
            tracing::info!(
                volume_id = %record.volume,
                staging = %record.staging,
                device = device.as_ref().map(|d| d.path.to_string()).unwrap_or_else(|| "none".into()),
                staging_mounted = ?staged_mount,
                publishes = record.publishes.len(),
                "found a volume staged by an earlier process; adopting it"
            );
        }
        Ok(count)
    }

    /// CSI NodeStageVolume. Mount access: attach, probe, format only an empty device, check an
    /// existing filesystem read-only, mount `nosuid,nodev` at the staging path. Block access:
    /// attach only.
    pub async fn stage(self: &Arc<Self>, req: Stage) -> Result<(), NodeError> {
        let (this, volume) = (self.clone(), req.volume.clone());
        let calls = &self.locks.calls.stage;
        (self.locks)
            .run(calls, &volume, req, |req| async move {
                this.stage_now(req).await
            })
            .await
    }

    async fn stage_now(&self, req: Stage) -> Result<(), NodeError> {
        let _turn = self.locks.lock(&req.volume).await;
        self.confined(&req.staging, "staging_target_path").await?;
        let _path = self.paths.lock(&req.staging).await;
        let readonly = req.capability.mode() == AccessMode::SingleNodeReaderOnly
            || req
                .publish_context
                .get(PUBLISH_READONLY_KEY)
                .map(String::as_str)
                == Some("true");
        let (fs, options) = match req.capability.access_type() {
            AccessType::Block => (None, MountOptions::default()),
            AccessType::Mount { fs_type, .. } => {
                let fs = FsType::resolve(fs_type, &req.volume_context)?;
                let mut options = req.options.clone();
                if readonly {
                    options.flags |= rustix::mount::MountFlags::RDONLY;
                }
                (Some(fs), options)
            }
        };
        let backing = self
            .locate(&req.volume, &req.publish_context, &req.volume_context)
            .await?;
        let (existing, stale) = match self.record_of(&req.volume).await? {
            Some(rec) if self.contradicted(&rec).await? => {
                tracing::info!(volume_id = %req.volume, staged_at = %rec.staging,
                    "the record says staged, but nothing of the volume is mounted and its device \
                     is gone or another: replacing the record with this stage");
                (None, Some(rec))
            }
            other => (other, None),
        };
        match &existing {
            Some(rec) if rec.staging != req.staging => {
                return Err(NodeError::AlreadyExists(format!(
                    "volume {} is already staged at {}; unstage it there first",
                    req.volume, rec.staging
                )))
            }
            Some(rec)
                if rec.capability != req.capability || rec.readonly != readonly || rec.fs != fs =>
            {
                return Err(NodeError::AlreadyExists(format!(
                    "volume {} is already staged at {} as {}{}, not as {}{}",
                    req.volume,
                    rec.staging,
                    describe(&rec.capability),
                    if rec.readonly { " (read-only)" } else { "" },
                    describe(&req.capability),
                    if readonly { " (read-only)" } else { "" },
                )))
            }
            Some(rec) if rec.backing != backing => {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume {} is staged from {}, but now names {}",
                    req.volume, rec.backing, backing
                )))
            }
            Some(_) => {}
            None => self.require_volume(&req.volume, &backing).await?,
        }
        match self.look(&req.staging).await? {
            Found::Directory => {}
            Found::Symlink => {
                return Err(NodeError::invalid(
                    "staging_target_path",
                    format!("{} is a symbolic link; refusing to follow it", req.staging),
                ))
            }
            Found::Nothing => {
                return Err(NodeError::NotFound(format!(
                    "staging_target_path {} does not exist; the CO creates it",
                    req.staging
                )))
            }
            other => {
                return Err(NodeError::invalid(
                    "staging_target_path",
                    format!("{} is not a directory ({other:?})", req.staging),
                ))
            }
        }

        let was_attached = self.source.find(&backing).await?;
        let mut record = existing.clone().unwrap_or_else(|| StageRecord {
            volume: req.volume.clone(),
            staging: req.staging.clone(),
            capability: req.capability.clone(),
            fs,
            readonly,
            backing: backing.clone(),
            device: None,
            // A replaced record's paths and devices stay the volume's: what is left at its
            // targets must still be recognised by the unpublish that cleans it up.
            devices: stale
                .as_ref()
                .map(|s| s.known_devices())
                .unwrap_or_default(),
            publishes: stale
                .as_ref()
                .map(|s| s.publishes.clone())
                .unwrap_or_default(),
            origin: Origin::Staged,
        });
        let result = async {
            if existing.is_none() {
                self.save(&record).await?;
            }
            let device = self.source.attach(&backing).await?;
            if record.saw(&device) {
                self.save(&record).await?;
            }
            if let Some(fs) = fs {
                self.mount_staged(&req, &device, fs, &options, readonly)
                    .await?;
            }
            Ok::<_, NodeError>(device)
        }
        .await;
        if (existing.is_some() || stale.is_some()) && was_attached.is_none() {
            // Staged before, but its device was gone: this stage re-attached it.
            self.metrics
                .node
                .stale_recoveries_total
                .with_label_values(&[outcome(result.is_ok())])
                .inc();
        }
        match result {
            Ok(device) => {
                tracing::info!(volume_id = %req.volume, staging = %req.staging, device = %device, "staged");
                Ok(())
            }
            Err(e) => {
                // Undo what this call did; what an earlier call made stays.
                if was_attached.is_none() && existing.is_none() {
                    if let Err(undo) = self.source.detach(&backing).await {
                        tracing::warn!(volume_id = %req.volume, error = %undo, "could not detach after a failed stage");
                    }
                }
                match (&existing, &stale) {
                    (Some(_), _) => {}
                    (None, Some(stale)) => self.save(stale).await?,
                    (None, None) => self.forget(&req.volume).await?,
                }
                Err(e)
            }
        }
    }

    async fn mount_staged(
        &self,
        req: &Stage,
        device: &BlockDevice,
        fs: FsType,
        options: &MountOptions,
        readonly: bool,
    ) -> Result<(), NodeError> {
        let mounts = self.mounts().await?;
        let stacked = mounts_at(&self.root, &mounts, &req.staging);
        if let Some(top) = stacked.last() {
            let known = Known {
                history: &[],
                current: Some(number(device)),
                recorded: true,
            };
            if let Verdict::Ours { live: true, .. } =
                ownership::decide(&AtPath::Directory(stacked.clone()), &known)
            {
                return Ok(());
            }
            self.metrics.node.stale_mounts_detected_total.inc();
            return Err(NodeError::FailedPrecondition(format!(
                "staging_target_path {} is already a mount point of {} ({}:{}), not of {device}",
                req.staging, top.source, top.major, top.minor
            )));
        }
        match filesystem::probe(self.runner.as_ref(), device).await? {
            Content::Empty if readonly => {
                return Err(NodeError::FailedPrecondition(format!(
                "volume {} holds no filesystem and is staged read-only, so it cannot be formatted",
                req.volume
            )))
            }
            Content::Empty => filesystem::format(self.runner.as_ref(), device, fs).await?,
            Content::Filesystem(found) if FsType::parse(&found) == Some(fs) => {
                filesystem::check(self.runner.as_ref(), device, fs).await?
            }
            Content::Filesystem(found) => {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume {} holds a {found} filesystem, but {fs} was asked for; it is neither \
                     formatted nor mounted",
                    req.volume
                )))
            }
            Content::Other(what) => {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume {} holds {what}; refusing to format or mount it",
                    req.volume
                )))
            }
        }
        let (mounter, device, staging, options) = (
            self.mounter.clone(),
            device.clone(),
            req.staging.clone(),
            options.clone(),
        );
        let mounted = work::blocking(format!("mount {device} at {staging}"), move || {
            mounter
                .mount_device(&device, &staging, fs, &options)
                .map_err(NodeError::from)
        })
        .await;
        self.metrics.node.mount_op(MOUNT, mounted.is_ok());
        mounted
    }

    /// CSI NodeUnstageVolume (§4.5.2): unmount what of the volume is mounted at the staging
    /// path, detach the device, forget the record. Idempotent: nothing left to undo is OK
    /// (never NOT_FOUND, which the kubelet retries forever). A mount of any device the volume
    /// was ever seen with is its own, so a device that vanished (NVMe `ctrl_loss_tmo`, a loop
    /// detached behind our back) or was renumbered does not block the cleanup. The record is
    /// forgotten only once nothing is mounted at the staging path. FAILED_PRECONDITION: still
    /// published, another device's mount at the staging path, or its device mounted elsewhere.
    pub async fn unstage(self: &Arc<Self>, req: Unstage) -> Result<(), NodeError> {
        let (this, volume) = (self.clone(), req.volume.clone());
        let calls = &self.locks.calls.unstage;
        (self.locks)
            .run(calls, &volume, req, |req| async move {
                this.unstage_now(req).await
            })
            .await
    }

    async fn unstage_now(&self, req: Unstage) -> Result<(), NodeError> {
        let _turn = self.locks.lock(&req.volume).await;
        self.confined(&req.staging, "staging_target_path").await?;
        let _path = self.paths.lock(&req.staging).await;
        let record = self.record_of(&req.volume).await?;
        let backing = match &record {
            Some(r) => r.backing.clone(),
            None => {
                self.locate(&req.volume, &HashMap::new(), &HashMap::new())
                    .await?
            }
        };
        if let Some(r) = &record {
            if r.staging != req.staging {
                tracing::info!(volume_id = %req.volume, staged_at = %r.staging, asked = %req.staging,
                    "unstage of a path the volume is not staged at: nothing to do");
                return Ok(());
            }
            let mut live = Vec::new();
            for target in r.publishes.keys() {
                if self.look(target).await? != Found::Nothing {
                    live.push(target.to_string());
                }
            }
            if !live.is_empty() {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume {} is still published at {}; NodeUnpublishVolume it first",
                    req.volume,
                    live.join(", ")
                )));
            }
        }
        let device = self.source.find(&backing).await?;
        if record.is_none() && device.is_none() {
            // No record and no device: nothing at the staging path can be proved ours, and
            // nothing is left to undo.
            tracing::info!(volume_id = %req.volume, staging = %req.staging,
                "unstage with nothing staged: nothing to undo");
            return Ok(());
        }
        let history = record
            .as_ref()
            .map(|r| r.known_devices())
            .unwrap_or_default();
        let known = Known {
            history: &history,
            current: device.as_ref().map(number),
            recorded: record.is_some(),
        };
        let found = self.look(&req.staging).await?;
        if found == Found::Symlink {
            return Err(NodeError::invalid(
                "staging_target_path",
                format!("{} is a symbolic link; refusing to follow it", req.staging),
            ));
        }
        if found == Found::Directory {
            match self.judge(&req.staging, &found, known).await? {
                Verdict::Foreign(what) => {
                    return Err(NodeError::FailedPrecondition(format!(
                        "staging_target_path {} holds {what}, not volume {}; not unmounting it",
                        req.staging, req.volume
                    )))
                }
                Verdict::Empty => {}
                Verdict::Ours { mounts, .. } => {
                    for _ in 0..mounts {
                        self.unmount(&req.staging, "staging_target_path").await?;
                    }
                }
            }
        }
        let mounts = self.mounts().await?;
        if let Some(left) = mounts_at(&self.root, &mounts, &req.staging).last() {
            return Err(NodeError::FailedPrecondition(format!(
                "staging_target_path {} is still a mount point of {} ({}:{}); keeping volume \
                 {}'s record",
                req.staging, left.source, left.major, left.minor, req.volume
            )));
        }
        if let Some(device) = &device {
            if let Some(elsewhere) = mounts.iter().find(|m| same_device(m, device)) {
                return Err(NodeError::FailedPrecondition(format!(
                    "{device} is still mounted at {}; not detaching it",
                    elsewhere.mount_point.display()
                )));
            }
        }
        self.source.detach(&backing).await?;
        self.forget(&req.volume).await?;
        tracing::info!(volume_id = %req.volume, staging = %req.staging, "unstaged");
        Ok(())
    }

    async fn unmount(&self, path: &AbsPath, field: &'static str) -> Result<(), NodeError> {
        let (mounter, p) = (self.mounter.clone(), path.clone());
        let unmounted = work::blocking(format!("unmount {p}"), move || {
            mounter.unmount(&p).map_err(|e| {
                if e.busy() {
                    NodeError::FailedPrecondition(format!(
                        "{field} {p} is busy (a process still uses it); not unmounting it lazily, \
                         retry once it is released"
                    ))
                } else {
                    NodeError::from(e)
                }
            })
        })
        .await;
        self.metrics.node.mount_op(UNMOUNT, unmounted.is_ok());
        unmounted
    }

    /// CSI NodePublishVolume. Mount: bind mount staging → target, `nosuid,nodev,noexec` plus
    /// the capability's per-mount flags (read-only when asked).
    /// Block: a device node at the target file (0660, or 0440 read-only).
    /// A volume with no record is adopted first when the kernel shows it staged
    /// (`adopt`); nothing staged is FAILED_PRECONDITION "NodeStageVolume it first".
    pub async fn publish(self: &Arc<Self>, req: Publish) -> Result<(), NodeError> {
        let (this, volume) = (self.clone(), req.volume.clone());
        let calls = &self.locks.calls.publish;
        (self.locks)
            .run(calls, &volume, req, |req| async move {
                this.publish_now(req).await
            })
            .await
    }

    async fn publish_now(&self, req: Publish) -> Result<(), NodeError> {
        if req.target == req.staging {
            return Err(NodeError::invalid(
                "target_path",
                format!(
                    "{} is the staging_target_path; a volume is published elsewhere",
                    req.target
                ),
            ));
        }
        let _turn = self.locks.lock(&req.volume).await;
        self.confined(&req.staging, "staging_target_path").await?;
        self.confined(&req.target, "target_path").await?;
        let _path = self.paths.lock(&req.target).await;
        let backing = self
            .locate(&req.volume, &req.publish_context, &req.volume_context)
            .await?;
        let record = match self.record_of(&req.volume).await? {
            Some(r) => Some(r),
            None => {
                self.adopt(
                    &req.volume,
                    &req.staging,
                    &req.capability,
                    &backing,
                    "NodePublishVolume",
                )
                .await?
            }
        };
        let Some(mut record) = record else {
            self.require_volume(&req.volume, &backing).await?;
            return Err(NodeError::FailedPrecondition(format!(
                "volume {} is not staged at {}; NodeStageVolume it first",
                req.volume, req.staging
            )));
        };
        if record.staging != req.staging {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {} is staged at {}, not at {}",
                req.volume, record.staging, req.staging
            )));
        }
        if !ownership::same_storage(&record.backing, &backing) {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {} is staged from {}, but the request names {}; publishing only what \
                 was staged",
                req.volume, record.backing, backing
            )));
        }
        if is_block(&record.capability) != is_block(&req.capability)
            || record.capability.mode() != req.capability.mode()
        {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {} is staged as {}; it cannot be published as {}",
                req.volume,
                describe(&record.capability),
                describe(&req.capability)
            )));
        }
        // A PV mounted `ro` gives read-only binds: the repeat of such a publish must compare
        // equal to it.
        let readonly = req.readonly || record.readonly || req.options.read_only();
        let wanted = PublishRecord {
            capability: req.capability.clone(),
            readonly,
        };
        if let Some(existing) = record.publishes.get(&req.target) {
            if *existing != wanted {
                return Err(NodeError::AlreadyExists(format!(
                    "volume {} is already published at {} as {}{}; the request asks for {}{}",
                    req.volume,
                    req.target,
                    describe(&existing.capability),
                    if existing.readonly { " read-only" } else { "" },
                    describe(&req.capability),
                    if readonly { " read-only" } else { "" },
                )));
            }
        }
        // The recorded backing, not the request's: the device published is the one staged.
        let Some(device) = self.source.find(&record.backing).await? else {
            if !is_block(&record.capability)
                && !mounts_at(&self.root, &self.mounts().await?, &req.staging).is_empty()
            {
                // Still mounted at the staging path, but its device is gone.
                self.metrics.node.stale_mounts_detected_total.inc();
            }
            return Err(NodeError::FailedPrecondition(format!(
                "volume {}'s device is no longer attached; stage it again",
                req.volume
            )));
        };
        if record.saw(&device) {
            self.save(&record).await?;
        }
        if is_block(&req.capability) {
            self.publish_block(&req, &device, readonly, &mut record, wanted)
                .await
        } else {
            self.publish_mount(&req, &device, readonly, &mut record, wanted)
                .await
        }
    }

    async fn publish_mount(
        &self,
        req: &Publish,
        device: &BlockDevice,
        readonly: bool,
        record: &mut StageRecord,
        wanted: PublishRecord,
    ) -> Result<(), NodeError> {
        let mounts = self.mounts().await?;
        let history = record.known_devices();
        let known = |recorded| Known {
            history: &history,
            current: Some(number(device)),
            recorded,
        };
        // Bind only from a staging mount of the live device: a mount left by an earlier
        // device of the volume is its own but stale.
        let staged = ownership::decide(
            &AtPath::Directory(mounts_at(&self.root, &mounts, &req.staging)),
            &known(true),
        );
        if !matches!(staged, Verdict::Ours { live: true, .. }) {
            if staged != Verdict::Empty {
                self.metrics.node.stale_mounts_detected_total.inc();
            }
            return Err(NodeError::FailedPrecondition(format!(
                "volume {} is not mounted at its staging path {}; stage it again",
                req.volume, req.staging
            )));
        }
        let created = match self.look(&req.target).await? {
            Found::Directory => false,
            Found::Nothing => {
                let (root, t) = (self.root.clone(), req.target.clone());
                blocking(move || root.mkdir(&t).map_err(|e| confine_error("target_path", e)))
                    .await?;
                true
            }
            Found::Symlink => {
                return Err(NodeError::invalid(
                    "target_path",
                    format!("{} is a symbolic link; refusing to follow it", req.target),
                ))
            }
            other => {
                return Err(NodeError::FailedPrecondition(format!(
                    "target_path {} exists and is not a directory ({other:?})",
                    req.target
                )))
            }
        };
        let at_target = mounts_at(&self.root, &mounts, &req.target);
        if let Some(top) = at_target.last() {
            match ownership::decide(
                &AtPath::Directory(at_target.clone()),
                &known(record.publishes.contains_key(&req.target)),
            ) {
                Verdict::Ours { live: true, .. } => {}
                Verdict::Ours { .. } => {
                    return Err(NodeError::FailedPrecondition(format!(
                        "target_path {} holds a mount of volume {}'s earlier device; \
                         NodeUnpublishVolume it first",
                        req.target, req.volume
                    )))
                }
                Verdict::Foreign(what) => {
                    return Err(NodeError::FailedPrecondition(format!(
                        "target_path {} is already a mount point: it holds {what}",
                        req.target
                    )))
                }
                Verdict::Empty => {}
            }
            if top.read_only() != readonly {
                return Err(NodeError::AlreadyExists(format!(
                    "volume {} is already mounted at {} {}",
                    req.volume,
                    req.target,
                    if top.read_only() {
                        "read-only"
                    } else {
                        "read-write"
                    }
                )));
            }
            return self.remember_publish(req, record, wanted).await;
        }
        self.remember_publish(req, record, wanted).await?;
        let (mounter, staging, target) = (
            self.mounter.clone(),
            req.staging.clone(),
            req.target.clone(),
        );
        let flags = req.options.bind_flags(readonly);
        let bound = work::blocking(format!("bind mount {staging} at {target}"), move || {
            mounter
                .bind(&staging, &target, flags)
                .map_err(NodeError::from)
        })
        .await;
        self.metrics.node.mount_op(MOUNT, bound.is_ok());
        if let Err(e) = bound {
            record.publishes.remove(&req.target);
            self.save(record).await?;
            if created {
                let (root, t) = (self.root.clone(), req.target.clone());
                if let Err(undo) =
                    blocking(move || root.rmdir(&t).map_err(|e| confine_error("target_path", e)))
                        .await
                {
                    tracing::warn!(target = %req.target, error = %undo, "could not remove the target directory this call created");
                }
            }
            return Err(e);
        }
        tracing::info!(volume_id = %req.volume, target = %req.target, readonly, "published (bind mount)");
        Ok(())
    }

    async fn remember_publish(
        &self,
        req: &Publish,
        record: &mut StageRecord,
        wanted: PublishRecord,
    ) -> Result<(), NodeError> {
        if record.publishes.get(&req.target) != Some(&wanted) {
            record.publishes.insert(req.target.clone(), wanted);
            self.save(record).await?;
        }
        Ok(())
    }

    async fn publish_block(
        &self,
        req: &Publish,
        device: &BlockDevice,
        readonly: bool,
        record: &mut StageRecord,
        wanted: PublishRecord,
    ) -> Result<(), NodeError> {
        let mode = if readonly { 0o440 } else { 0o660 };
        match self.look(&req.target).await? {
            Found::Nothing => {}
            Found::BlockDevice {
                major,
                minor,
                mode: have,
            } if (major, minor) == (device.major, device.minor) => {
                if have != mode {
                    return Err(NodeError::AlreadyExists(format!(
                        "volume {} is already published at {} with mode {have:o}, not {mode:o}",
                        req.volume, req.target
                    )));
                }
                return self.remember_publish(req, record, wanted).await;
            }
            Found::BlockDevice { major, minor, .. } => {
                return Err(NodeError::FailedPrecondition(format!(
                    "target_path {} is the device node of another device ({major}:{minor})",
                    req.target
                )))
            }
            Found::Symlink => {
                return Err(NodeError::invalid(
                    "target_path",
                    format!("{} is a symbolic link; refusing to follow it", req.target),
                ))
            }
            other => {
                return Err(NodeError::FailedPrecondition(format!(
                    "target_path {} exists ({other:?}); a block volume is published as a device \
                     node the plugin creates",
                    req.target
                )))
            }
        }
        self.remember_publish(req, record, wanted).await?;
        let (mounter, target, dev) = (self.mounter.clone(), req.target.clone(), device.clone());
        let made = work::blocking(format!("mknod {target}"), move || {
            mounter
                .make_device_node(&target, &dev, readonly)
                .map_err(NodeError::from)
        })
        .await;
        if let Err(e) = made {
            let e = match e {
                NodeError::Mount(m) if m.source.raw_os_error() == Some(libc::EEXIST) => {
                    NodeError::FailedPrecondition(format!(
                        "target_path {} was created by another call meanwhile; not touching it",
                        req.target
                    ))
                }
                e => e,
            };
            // Nothing of this call's is at the target: the device node is made under a
            // temporary name and only renamed onto the target with RENAME_NOREPLACE. What is
            // there now (another call's node, say) is left as it is.
            record.publishes.remove(&req.target);
            self.save(record).await?;
            return Err(e);
        }
        tracing::info!(volume_id = %req.volume, target = %req.target, device = %device, readonly, "published (device node)");
        Ok(())
    }

    /// CSI NodeUnpublishVolume (§4.5.4): unmount and remove the target directory, or remove
    /// the device node. Idempotent: a target already gone, or a volume with nothing left to
    /// undo, is OK (never NOT_FOUND, which the kubelet retries forever). What is at the target
    /// is the volume's when [`ownership::decide`] says so: a mount of any device the volume
    /// was ever seen with (its device may have vanished or been renumbered since), or at a
    /// recorded target a node or empty file the plugin made. Anything else is
    /// FAILED_PRECONDITION and is left alone; a symlink is INVALID_ARGUMENT.
    pub async fn unpublish(self: &Arc<Self>, req: Unpublish) -> Result<(), NodeError> {
        let (this, volume) = (self.clone(), req.volume.clone());
        let calls = &self.locks.calls.unpublish;
        (self.locks)
            .run(calls, &volume, req, |req| async move {
                this.unpublish_now(req).await
            })
            .await
    }

    async fn unpublish_now(&self, req: Unpublish) -> Result<(), NodeError> {
        let _turn = self.locks.lock(&req.volume).await;
        self.confined(&req.target, "target_path").await?;
        let _path = self.paths.lock(&req.target).await;
        let mut record = self.record_of(&req.volume).await?;
        let backing = match &record {
            Some(r) => r.backing.clone(),
            None => {
                self.locate(&req.volume, &HashMap::new(), &HashMap::new())
                    .await?
            }
        };
        let device = self.source.find(&backing).await?;
        let history = record
            .as_ref()
            .map(|r| r.known_devices())
            .unwrap_or_default();
        let known = Known {
            history: &history,
            current: device.as_ref().map(number),
            recorded: record
                .as_ref()
                .is_some_and(|r| r.publishes.contains_key(&req.target)),
        };
        let found = self.look(&req.target).await?;
        if found == Found::Symlink {
            return Err(NodeError::invalid(
                "target_path",
                format!("{} is a symbolic link; refusing to follow it", req.target),
            ));
        }
        let mounts = match self.judge(&req.target, &found, known).await? {
            Verdict::Foreign(what) => {
                return Err(NodeError::FailedPrecondition(format!(
                    "target_path {} holds {what}, not volume {}; not removing it",
                    req.target, req.volume
                )))
            }
            Verdict::Empty => 0,
            Verdict::Ours { mounts, .. } => mounts,
        };
        match found {
            Found::Nothing => {}
            Found::Directory => {
                for _ in 0..mounts {
                    self.unmount(&req.target, "target_path").await?;
                }
                let (root, t) = (self.root.clone(), req.target.clone());
                blocking(move || match root.rmdir(&t) {
                    Ok(_) => Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                        Err(NodeError::FailedPrecondition(format!(
                            "target_path {t} is not a mount point and is not empty; refusing to \
                             delete it"
                        )))
                    }
                    Err(e) => Err(confine_error("target_path", e)),
                })
                .await?;
            }
            _ => self.remove_file(&req.target).await?,
        }
        if let Some(r) = record.as_mut() {
            if r.publishes.remove(&req.target).is_some() {
                self.save(r).await?;
            }
        }
        tracing::info!(volume_id = %req.volume, target = %req.target, "unpublished");
        Ok(())
    }

    /// Removes the device node (or empty file) at the target; already gone is OK.
    async fn remove_file(&self, path: &AbsPath) -> Result<(), NodeError> {
        let (root, p) = (self.root.clone(), path.clone());
        blocking(move || {
            root.unlink(&p)
                .map(|_| ())
                .map_err(|e| confine_error("target_path", e))
        })
        .await
    }

    /// CSI NodeGetVolumeStats: bytes and inodes of a mounted filesystem, bytes of a block
    /// device; abnormal when the mount or the device is gone. A volume with no record is
    /// measured when the kernel shows its own device at the path, and nothing is recorded.
    pub async fn stats(&self, req: Stats) -> Result<VolumeStats, NodeError> {
        let _turn = self.locks.lock(&req.volume).await;
        let path = req.path.valid(&req.volume)?.clone();
        let (backing, history) = match self.record_of(&req.volume).await? {
            Some(record) => {
                let record = self.known_path(&req.volume, &path, record).await?;
                let history = record.known_devices();
                (record.backing, history)
            }
            None => (self.unrecorded(&req.volume, &path).await?, Vec::new()),
        };
        let device = self.source.find(&backing).await?;
        let healthy = match &device {
            Some(d) => self.source.healthy(&backing, d).await?,
            None => false,
        };
        let found = self.look(&path).await?;
        let known = Known {
            history: &history,
            current: device.as_ref().map(number),
            recorded: true,
        };
        let verdict = self.judge(&path, &found, known).await?;
        // Measured only when what is there is the volume's live device.
        let live = matches!(verdict, Verdict::Ours { live: true, .. });
        match found {
            Found::Nothing => Err(NodeError::NotFound(format!(
                "volume_path {path} does not exist"
            ))),
            Found::Directory => {
                let mounted = live;
                if verdict != Verdict::Empty && !(mounted && healthy) {
                    // Mounted, but not by the volume's live device.
                    self.metrics.node.stale_mounts_detected_total.inc();
                }
                let abnormal = if !healthy {
                    Some(format!("volume {}'s device is gone", req.volume))
                } else if !mounted {
                    Some(format!(
                        "volume {} is no longer mounted at {path}",
                        req.volume
                    ))
                } else {
                    None
                };
                if abnormal.is_some() {
                    return Ok(VolumeStats {
                        total_bytes: 0,
                        available_bytes: None,
                        used_bytes: None,
                        inodes: None,
                        abnormal,
                    });
                }
                let p = path.clone();
                let st = work::blocking(format!("statvfs {p}"), move || {
                    rustix::fs::statvfs(p.as_path()).map_err(|e| NodeError::Io {
                        action: format!("statvfs {p}"),
                        source: e.into(),
                    })
                })
                .await?;
                let frsize = st.f_frsize;
                Ok(VolumeStats {
                    total_bytes: st.f_blocks * frsize,
                    available_bytes: Some(st.f_bavail * frsize),
                    used_bytes: Some((st.f_blocks - st.f_bfree) * frsize),
                    inodes: Some((st.f_files, st.f_ffree, st.f_files - st.f_ffree)),
                    abnormal: None,
                })
            }
            Found::BlockDevice { .. } => {
                let ours = live;
                let size = if ours && healthy {
                    let p = path.clone();
                    blocking(move || device_size(&p)).await?
                } else {
                    0
                };
                Ok(VolumeStats {
                    total_bytes: size,
                    available_bytes: None,
                    used_bytes: None,
                    inodes: None,
                    abnormal: (!(ours && healthy))
                        .then(|| format!("volume {}'s device is gone", req.volume)),
                })
            }
            other => Err(NodeError::NotFound(format!(
                "volume_path {path} is {other:?}, not a volume"
            ))),
        }
    }

    /// CSI NodeExpandVolume: the device learns its new size, then a filesystem grows online.
    /// Returns the size the volume now has. A volume with no record is adopted first when the
    /// request names its staging path and capability and the kernel shows it staged there;
    /// otherwise NOT_FOUND, as before.
    pub async fn expand(self: &Arc<Self>, req: Expand) -> Result<u64, NodeError> {
        let (this, volume) = (self.clone(), req.volume.clone());
        let calls = &self.locks.calls.expand;
        (self.locks)
            .run(calls, &volume, req, |req| async move {
                this.expand_now(req).await
            })
            .await
    }

    async fn expand_now(&self, req: Expand) -> Result<u64, NodeError> {
        let _turn = self.locks.lock(&req.volume).await;
        let path = req.path.valid(&req.volume)?.clone();
        let record = match self.record_of(&req.volume).await? {
            Some(r) => Some(r),
            None => match (&req.staging, &req.capability) {
                (Some(staging), Some(capability)) => {
                    let backing =
                        self.source
                            .locate(&req.volume, &HashMap::new(), &HashMap::new())?;
                    self.adopt(
                        &req.volume,
                        staging,
                        capability,
                        &backing,
                        "NodeExpandVolume",
                    )
                    .await?
                }
                _ => None,
            },
        };
        let Some(record) = record else {
            self.unrecorded(&req.volume, &path).await?;
            return Err(NodeError::NotFound(format!(
                "volume {} has no record on this node; NodeExpandVolume adopts it only with \
                 staging_target_path and volume_capability",
                req.volume
            )));
        };
        let record = self.known_path(&req.volume, &path, record).await?;
        if self.look(&path).await? == Found::Nothing {
            return Err(NodeError::NotFound(format!(
                "volume_path {path} does not exist"
            )));
        }
        let device = self.source.find(&record.backing).await?.ok_or_else(|| {
            NodeError::FailedPrecondition(format!(
                "volume {}'s device is no longer attached",
                req.volume
            ))
        })?;
        let size = self.source.refresh_size(&record.backing, &device).await?;
        if size < req.required_bytes {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {} is {size} bytes, less than the {} asked for; ControllerExpandVolume \
                 must grow it first",
                req.volume, req.required_bytes
            )));
        }
        if req.limit_bytes != 0 && size > req.limit_bytes {
            return Err(NodeError::OutOfRange(format!(
                "volume {} is {size} bytes, more than limit_bytes {}",
                req.volume, req.limit_bytes
            )));
        }
        if let Some(fs) = record.fs {
            let found = Found::Directory;
            let known = Known {
                history: &record.known_devices(),
                current: Some(number(&device)),
                recorded: true,
            };
            let mounted = self.judge(&record.staging, &found, known).await?;
            if !matches!(mounted, Verdict::Ours { live: true, .. }) {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume {}'s filesystem is not mounted at {}; it grows online only",
                    req.volume, record.staging
                )));
            }
            filesystem::grow(self.runner.as_ref(), &device, &record.staging, fs).await?;
        }
        tracing::info!(volume_id = %req.volume, bytes = size, "expanded on the node");
        Ok(size)
    }

    /// For [`super::freeze`]: the volume's turn (held until the guard is dropped, so no node
    /// call on it runs meanwhile), its record, and the device its backing is attached as now.
    pub(crate) async fn hold_staged(
        &self,
        volume: &VolumeId,
    ) -> Result<(Turn, Option<(StageRecord, Option<BlockDevice>)>), NodeError> {
        let turn = self.locks.lock(volume).await;
        let Some(record) = self.load(volume).await? else {
            return Ok((turn, None));
        };
        let device = self.source.find(&record.backing).await?;
        Ok((turn, Some((record, device))))
    }
}

/// A volume's turn, from [`NodePlugin::hold_staged`].
pub(crate) use super::locks::Turn;

/// A refused or failed confined operation on the request's `field`: a path outside the
/// kubelet directory or through a symlink is INVALID_ARGUMENT; an I/O failure stays one.
fn confine_error(field: &'static str, e: ConfineError) -> NodeError {
    match e {
        ConfineError::Outside { .. } | ConfineError::SymlinkInPath { .. } => {
            NodeError::invalid(field, e.to_string())
        }
        ConfineError::Exists { .. } => NodeError::FailedPrecondition(format!("{field} {e}")),
        ConfineError::Io {
            action,
            path,
            source,
        } => NodeError::Io {
            action: format!("{action} {field} {path}"),
            source,
        },
    }
}

/// The size of the block device at `path` (its end, found by seeking).
fn device_size(path: &AbsPath) -> Result<u64, NodeError> {
    use std::io::{Seek, SeekFrom};
    let io = |source| NodeError::Io {
        action: format!("reading the size of {path}"),
        source,
    };
    let mut f = std::fs::File::open(PathBuf::from(path.as_path())).map_err(io)?;
    f.seek(SeekFrom::End(0)).map_err(io)
}

impl NodePlugin {
    /// The per-volume locks the node RPCs take, for the node reconciler: it repairs a volume
    /// only holding the same lock, so a repair never interleaves with an RPC of that volume.
    pub fn volume_locks(&self) -> Arc<VolumeLocks> {
        self.locks.clone()
    }
}

mod adoption;
mod identity;
#[cfg(test)]
mod tests;
