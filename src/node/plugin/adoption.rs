//! Volumes the node has no record of: adopting one the kernel shows staged (by the Go node
//! plugin, which writes no records, or an earlier process whose record is lost), and answering
//! read-only calls for one from the kernel's view. `src/node/mod.rs` states the adoption rule.
//!
//! Never adopts a mount of another device: what is at a path is judged by
//! [`crate::node::ownership::decide`] against the device the volume's backing resolves to now.

use std::collections::{BTreeMap, HashMap};

use super::{is_block, mounts_at, number, NodePlugin};
use crate::domain::{Capability, FsType};
use crate::ids::VolumeId;
use crate::metrics::{ADOPTED, REFUSED};
use crate::node::device::Backing;
use crate::node::ownership::{self, AtPath, Known, Verdict};
use crate::node::paths::{AbsPath, BlockDevice, Found};
use crate::node::records::{Origin, StageRecord};
use crate::node::NodeError;

impl NodePlugin {
    /// Adopts a volume staged with no record of ours: by the Go node plugin (which writes
    /// none), or by an earlier process whose record is lost. The kernel must show it staged
    /// as `capability` says: for mount access the volume's own device (the one its backing
    /// resolves to now) mounted at `staging`; for block access that device attached and
    /// nothing mounted at `staging` (the Go plugin leaves nothing there). Then the record is
    /// written as NodeStageVolume would have, so unpublish and unstage work as usual.
    ///
    /// `Ok(None)`: nothing is staged there (the caller keeps its usual answer).
    /// FAILED_PRECONDITION: something else is mounted at `staging`; nothing is recorded.
    pub(super) async fn adopt(
        &self,
        volume: &VolumeId,
        staging: &AbsPath,
        capability: &Capability,
        backing: &Backing,
        call: &'static str,
    ) -> Result<Option<StageRecord>, NodeError> {
        let device = self.source.find(backing).await?;
        let mounts = self.mounts().await?;
        let stacked = mounts_at(&self.root, &mounts, staging);
        let top = stacked.last().copied();
        // No record, so no history: only the device the backing resolves to now is ours.
        let known = Known {
            history: &[],
            current: device.as_ref().map(number),
            recorded: false,
        };
        let verdict = ownership::decide(&AtPath::Directory(stacked), &known);
        let (device, fs, readonly) = match (device, &verdict, top) {
            (None, Verdict::Empty, _) => return Ok(None),
            (Some(d), Verdict::Ours { .. }, Some(top)) if !is_block(capability) => {
                let Some(fs) = FsType::parse(&top.fs_type) else {
                    self.count_adoption(REFUSED);
                    return Err(NodeError::FailedPrecondition(format!(
                        "volume {volume} is mounted at {staging} as {}, not a filesystem this driver stages; not adopting it",
                        top.fs_type
                    )));
                };
                (d, Some(fs), top.read_only())
            }
            (Some(d), Verdict::Empty, _) if is_block(capability) => (d, None, false),
            (Some(_), Verdict::Empty, _) => return Ok(None),
            (device, verdict, top) => {
                self.count_adoption(REFUSED);
                let what = match (verdict, top) {
                    (Verdict::Foreign(what), _) => what.clone(),
                    (_, Some(top)) => format!(
                        "a mount of {} ({}:{}, {})",
                        top.source, top.major, top.minor, top.fs_type
                    ),
                    (_, None) => "nothing".to_string(),
                };
                return Err(NodeError::FailedPrecondition(format!(
                    "staging_target_path {staging} holds {what}, not {}; not adopting it as volume {volume}",
                    match &device {
                        Some(d) if is_block(capability) => format!(
                            "nothing ({d} is a block volume, staged without a mount)"
                        ),
                        Some(d) => format!("its device {d}"),
                        None => "its device (not attached)".to_string(),
                    }
                )));
            }
        };
        let record = StageRecord {
            volume: volume.clone(),
            staging: staging.clone(),
            capability: capability.clone(),
            fs,
            readonly,
            backing: backing.clone(),
            device: Some(device.clone()),
            devices: vec![number(&device)],
            publishes: BTreeMap::new(),
            origin: Origin::Adopted { call: call.into() },
        };
        self.save(&record).await?;
        self.count_adoption(ADOPTED);
        tracing::info!(volume_id = %volume, staging = %staging, device = %device,
            fs = fs.map(FsType::as_str).unwrap_or("none (block)"), readonly, call,
            "adopted a volume staged without a record (by the Go node plugin or an earlier process)");
        Ok(Some(record))
    }

    pub(super) fn count_adoption(&self, result: &'static str) {
        self.metrics
            .node
            .adoptions_total
            .with_label_values(&[result])
            .inc();
    }

    /// `record`, if its volume is staged or published at `path`; NOT_FOUND otherwise. For an
    /// adopted volume, a path the kernel shows its device mounted at also counts: the Go
    /// plugin's own publishes are in no record.
    pub(super) async fn known_path(
        &self,
        volume: &VolumeId,
        path: &AbsPath,
        record: StageRecord,
    ) -> Result<StageRecord, NodeError> {
        if record.staging == *path || record.publishes.contains_key(path) {
            return Ok(record);
        }
        if matches!(record.origin, Origin::Adopted { .. }) {
            if let Some(device) = self.source.find(&record.backing).await? {
                if self.holds(path, &device).await? == Holds::Ours {
                    return Ok(record);
                }
            }
        }
        Err(NodeError::NotFound(format!(
            "volume {volume} is not staged or published at {path}"
        )))
    }

    /// The backing of a volume with no record, when the kernel shows its own device at `path`
    /// (staged or published with no record: by the Go node plugin). Read-only callers
    /// (NodeGetVolumeStats) answer from it without writing a record: they carry no capability
    /// to record; the next NodePublishVolume or NodeExpandVolume adopts the volume.
    /// NOT_FOUND when nothing of the volume is there; FAILED_PRECONDITION when another
    /// device is mounted there.
    pub(super) async fn unrecorded(
        &self,
        volume: &VolumeId,
        path: &AbsPath,
    ) -> Result<Backing, NodeError> {
        let backing = self
            .source
            .locate(volume, &HashMap::new(), &HashMap::new())?;
        self.require_volume(volume, &backing).await?;
        let not_staged = || {
            NodeError::NotFound(format!(
                "volume {volume} is not staged or published on this node"
            ))
        };
        let Some(device) = self.source.find(&backing).await? else {
            return Err(not_staged());
        };
        match self.holds(path, &device).await? {
            Holds::Ours => {
                tracing::info!(volume_id = %volume, path = %path, device = %device,
                    "answering for a volume staged without a record, from the kernel's view");
                Ok(backing)
            }
            Holds::Nothing => Err(not_staged()),
            Holds::Other(what) => Err(NodeError::FailedPrecondition(format!(
                "{path} holds {what}, not volume {volume}'s device {device}"
            ))),
        }
    }

    /// What the kernel shows at `path` compared with `device`: the top mount of a directory,
    /// or a device node.
    pub(super) async fn holds(
        &self,
        path: &AbsPath,
        device: &BlockDevice,
    ) -> Result<Holds, NodeError> {
        let found = self.look(path).await?;
        if !matches!(found, Found::Directory | Found::BlockDevice { .. }) {
            return Ok(Holds::Nothing);
        }
        let known = Known {
            history: &[],
            current: Some(number(device)),
            recorded: false,
        };
        Ok(match self.judge(path, &found, known).await? {
            Verdict::Ours { .. } => Holds::Ours,
            Verdict::Empty => Holds::Nothing,
            Verdict::Foreign(what) => Holds::Other(what),
        })
    }
}

/// What is at a path, measured against a volume's device.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Holds {
    Ours,
    Nothing,
    /// Another device's mount or node, described for the error.
    Other(String),
}
