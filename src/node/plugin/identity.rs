//! Which volume a request is about, and what of it is at a path: the glue between the plugin's
//! calls and [`crate::node::ownership`]. Holds a request's contexts to the storage its volume
//! id derives, refuses a second spelling of a recorded id, turns what the kernel shows at a
//! path into an [`ownership::Verdict`], and says when the kernel contradicts a record.
//!
//! Owns no rule of its own (the rule is `ownership::decide`) and changes nothing: it reads
//! records, sysfs through the device source, and the mount table.

use std::collections::HashMap;

use super::{blocking, mounts_at, number, NodePlugin};
use crate::ids::VolumeId;
use crate::node::device::{Backing, DeviceSource};
use crate::node::ownership::{self, AtPath, DeviceNumber, Known, Verdict};
use crate::node::paths::{AbsPath, Found};
use crate::node::records::StageRecord;
use crate::node::work;
use crate::node::NodeError;

impl NodePlugin {
    /// The volume's record. A volume with no record whose id differs only by letter case from
    /// a recorded one is FAILED_PRECONDITION naming both.
    ///
    /// **Refused, not folded into one volume**, because the backends disagree on case: the
    /// RDS derives one NQN for both spellings (the id in lowercase, as the Go driver's
    /// `VolumeIDToNQN` does; its ids are lowercase `pvc-<uuid>`), while the file backend's
    /// images are files on a case-sensitive filesystem, where `PVC-1.img` and `pvc-1.img` are
    /// two volumes. Folding would merge two real file volumes; keeping both would give one
    /// NVMe device two records and two owners. Refusing the second spelling is right for
    /// both, and needs no knowledge of whether RouterOS compares slot names by case. The
    /// per-volume lock is taken on the lowercase id, so the two spellings never run at once
    /// and this check cannot race.
    pub(super) async fn record_of(
        &self,
        volume: &VolumeId,
    ) -> Result<Option<StageRecord>, NodeError> {
        let record = self.load(volume).await?;
        if record.is_some() {
            return Ok(record);
        }
        let (records, v) = (self.records.clone(), volume.clone());
        match blocking(move || records.spelled_otherwise(&v)).await? {
            None => Ok(None),
            Some(other) => Err(NodeError::FailedPrecondition(format!(
                "volume {volume} differs only by letter case from volume {other}, which is \
                 staged on this node; ids that differ only by case name one RDS volume (one \
                 NQN), so this node refuses the second spelling"
            ))),
        }
    }

    /// Where `volume` lives, as the request's contexts say, checked against where its id
    /// alone says it lives: a context naming another volume's storage (another NQN in
    /// `volume_context["nqn"]`, another image) is INVALID_ARGUMENT naming both, so one volume
    /// id never reaches another volume's device. One job on the blocking pool: a source may
    /// look at the filesystem to compare what a context names (the file backend resolves
    /// `publish_context["imagePath"]`), which must not block an async worker.
    pub(super) async fn locate(
        &self,
        volume: &VolumeId,
        publish_context: &HashMap<String, String>,
        volume_context: &HashMap<String, String>,
    ) -> Result<Backing, NodeError> {
        let source = self.source.clone();
        let (v, publish, provision) = (
            volume.clone(),
            publish_context.clone(),
            volume_context.clone(),
        );
        work::blocking(
            format!("locating volume {volume}'s storage from the request's contexts"),
            move || located(&*source, &v, &publish, &provision),
        )
        .await
    }

    /// Judges what is at `path` (already looked at: `found`) for a volume known by `known`'s
    /// devices; reads the mount table for a directory. The one place node calls ask.
    pub(super) async fn judge(
        &self,
        path: &AbsPath,
        found: &Found,
        known: Known<'_>,
    ) -> Result<Verdict, NodeError> {
        let mounts;
        let at = match found {
            Found::Nothing => AtPath::Nothing,
            Found::Directory => {
                mounts = self.mounts().await?;
                AtPath::Directory(mounts_at(&self.root, &mounts, path))
            }
            Found::BlockDevice { major, minor, .. } => AtPath::DeviceNode(DeviceNumber {
                major: *major,
                minor: *minor,
            }),
            Found::RegularFile { len: 0 } => AtPath::EmptyFile,
            other => AtPath::Other(format!("{other:?}, which this plugin did not create")),
        };
        Ok(ownership::decide(&at, &known))
    }

    /// Whether the kernel contradicts `record`'s stage (after a reboot, or a detach behind the
    /// plugin's back): nothing is mounted at its staging path and its backing resolves to no
    /// device it was ever seen with. Such a record is replaced by the next stage rather than
    /// answering for a volume that is no longer staged.
    pub(super) async fn contradicted(&self, record: &StageRecord) -> Result<bool, NodeError> {
        let known = record.known_devices();
        if let Some(current) = self.source.find(&record.backing).await? {
            if known.contains(&number(&current)) {
                return Ok(false);
            }
        }
        let mounts = self.mounts().await?;
        Ok(mounts_at(&self.root, &mounts, &record.staging).is_empty())
    }
}

/// [`NodePlugin::locate`]'s check, run on the blocking pool.
fn located(
    source: &dyn DeviceSource,
    volume: &VolumeId,
    publish_context: &HashMap<String, String>,
    volume_context: &HashMap<String, String>,
) -> Result<Backing, NodeError> {
    let requested = source.locate(volume, publish_context, volume_context)?;
    let derived = source.locate(volume, &HashMap::new(), &HashMap::new())?;
    if !ownership::same_storage(&requested, &derived) {
        return Err(NodeError::invalid(
            "volume_context",
            format!(
                "names {requested}, but volume {volume} is {derived}; refusing to use \
                 another volume's storage"
            ),
        ));
    }
    Ok(requested)
}
