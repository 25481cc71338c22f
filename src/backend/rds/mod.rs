//! The RDS backend: volumes are file disks on a MikroTik ROSE Data Server, exported over
//! NVMe/TCP, driven over SSH with the Go driver's exact RouterOS commands, so a cluster can
//! switch drivers without touching a volume (same ids, slots, file paths, NQNs and StorageClass
//! parameters).
//!
//! Owns the translation between CSI volumes and snapshots and RouterOS disks; the SSH link is
//! [`ssh`], the commands [`command`], their output [`parse`], and every value that may enter a
//! command is a validated type from [`values`] first. Knows nothing of attachments.
//!
//! Snapshots are the Go driver's: a non-exported file disk copied from the volume
//! (`copy-from`), its slot `snap-<uuid5(name)>-at-<hex>` derived from the CSI name, so a
//! CreateSnapshot retried after any restart finds the same slot, and the Go driver's snapshots
//! are listed and restorable. RouterOS keeps no record of what a disk was copied from (the Go
//! driver reads a `source-volume` field that RouterOS never prints), so each copy's `/disk add`
//! gives the disk a `comment` saying so ([`values::Provenance`]), which RouterOS keeps and
//! prints. A disk without one (the Go driver's, or one some other add made) is matched by its
//! slot, that is by name, and the source it is then asked for is recorded with `/disk set`,
//! after the one check RouterOS allows: a snapshot is never larger than its source. The same
//! comment keeps a digest of a volume's StorageClass parameters and capabilities
//! ([`values::Record`]), given on the volume's `/disk add` too, so a repeated CreateVolume is
//! held to the first as the file backend holds it to its metadata; a volume without one (the
//! Go driver's) takes the first request's. Because the record is a property of the add, a
//! disk this driver makes is never seen without it, and a fresh volume costs one write.

pub mod command;
pub mod monitor;
pub mod parse;
mod reads;
pub mod snmp;
pub mod ssh;
pub mod values;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;

use self::command::{Listing, RosCommand};
use self::parse::{Disk, Failure};
use self::ssh::{SshError, SshPool};
use self::values::{
    nvme_timings, MadeWith, NqnPrefix, Provenance, Record, RosPath, RosSize, Slot,
    SNAPSHOT_SLOT_PREFIX,
};
use super::locks::{Key, Locks, Mode};
use super::{
    BackendError, ContentSource, CreateRequest, SnapshotInfo, SnapshotRequest, VolumeBackend,
    VolumeInfo,
};
use crate::domain::{
    rds_keys as keys, AccessType, Capability, FsType, CSI_FS_TYPE_KEY, FS_TYPE_KEY,
    MIGRATION_TIMEOUT_KEY, PUBLISH_BACKEND_KEY,
};
use crate::ids::{SnapshotId, VolumeId};
use crate::metrics::Metrics;
use crate::Error;

/// The StorageClass parameters the Go driver gives a meaning: those its controller reads, and
/// `fsType`, which the external-provisioner reads for it. Any other key, bar the
/// provisioner's own `csi.storage.k8s.io/…`, is accepted and ignored, as the Go driver
/// ignores it (`sshPort` and `nqnPrefix` included: it declares them and never reads them).
const GO_PARAMETERS: [&str; 9] = [
    keys::RDS_ADDRESS,
    keys::NVME_ADDRESS,
    keys::NVME_PORT,
    keys::VOLUME_PATH,
    keys::CTRL_LOSS_TMO,
    keys::RECONNECT_DELAY,
    keys::KEEP_ALIVE_TMO,
    MIGRATION_TIMEOUT_KEY,
    FS_TYPE_KEY,
];

/// The prefix of the parameters the external-provisioner reads or adds itself
/// (`csi.storage.k8s.io/fstype`, `…/pvc/name`, `…/pv/name`, ...).
const PROVISIONER_PREFIX: &str = "csi.storage.k8s.io/";

/// How many distinct StorageClasses' ignored parameters are remembered for warning once.
const WARNED_CAP: usize = 1024;

/// Defaults a StorageClass may override.
#[derive(Clone, Debug)]
pub struct RdsDefaults {
    /// The address `nvme connect` dials when a StorageClass names none.
    pub nvme_address: Option<IpAddr>,
    pub nvme_port: u16,
    pub volume_path: RosPath,
    pub nqn_prefix: NqnPrefix,
}

pub struct RdsBackend {
    pool: SshPool,
    /// `--rds-address`'s host: the volume context's `rdsAddress` when a StorageClass names
    /// none, as the Go driver writes it.
    host: String,
    defaults: RdsDefaults,
    /// The StorageClasses (by their parameters) whose ignored parameters were warned about.
    warned: Mutex<HashSet<u64>>,
    metrics: Option<Arc<Metrics>>,
    /// Keeps a restore and the delete of its snapshot (or a clone and the delete of its
    /// volume) apart, and two creates of one slot.
    locks: Locks,
    /// Lookups of volume disks waiting for a session, answered by one command ([`reads`]).
    reads: reads::Coalescer,
}

/// A StorageClass's parameters with the Go driver's meaning, validated.
struct Params {
    /// The StorageClass's `rdsAddress`, else `--rds-address`'s host: only echoed into the
    /// volume context.
    rds_address: String,
    /// `nvmeAddress`, else `rdsAddress`, else `--rds-nvme-address`. `None` only when listing
    /// (CreateVolume requires it).
    nvme_address: Option<IpAddr>,
    nvme_port: u16,
    volume_path: RosPath,
    /// Always `--rds-nqn-prefix`: the Go driver ignores a StorageClass's `nqnPrefix`.
    nqn_prefix: NqnPrefix,
    timings: (i32, u32, u32),
    /// Seconds, as the Go driver writes it: clamped to 30..3600, 300 when absent or not a
    /// positive integer.
    migration_timeout: u64,
    /// `fsType` / `csi.storage.k8s.io/fstype`, kept in the volume context for the node.
    extra: BTreeMap<String, String>,
}

fn backend_error(e: SshError) -> BackendError {
    match e {
        SshError::Unavailable(m) | SshError::HostKey(m) | SshError::Auth(m) => {
            BackendError::Unavailable(m)
        }
    }
}

impl RdsBackend {
    pub fn new(pool: SshPool, defaults: RdsDefaults) -> Self {
        let host = pool.config().host.clone();
        Self {
            pool,
            host,
            defaults,
            warned: Mutex::new(HashSet::new()),
            metrics: None,
            locks: Locks::default(),
            reads: reads::Coalescer::default(),
        }
    }

    /// Counts ignored StorageClass parameters in `metrics`
    /// (`rds_csi_storageclass_parameters_ignored_total`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn pool(&self) -> &SshPool {
        &self.pool
    }

    /// Runs a command; RouterOS's failure text (often with exit status 0) becomes an error.
    async fn run(&self, command: &RosCommand) -> Result<String, RunError> {
        let out = self.pool.run(command).await.map_err(RunError::Link)?;
        checked(out)
    }

    /// The disk in `slot`, if there is one. A volume's lookup that arrives while another waits
    /// for a session joins it ([`reads`]); any other is its own command.
    async fn disk(&self, slot: &Slot) -> Result<Option<Disk>, BackendError> {
        if !reads::listed(slot) {
            let text = self
                .run(&RosCommand::Get { slot: slot.clone() })
                .await
                .map_err(|e| e.into_backend("looking up the disk"))?;
            let disks = parse::disks(&text).map_err(|e| BackendError::Corrupt(e.to_string()))?;
            return Ok(disks.into_iter().find(|d| d.slot == slot.as_str()));
        }
        // A member's own caller's deadline bounds its wait, whoever leads; a leader cut off
        // by it disbands its batch, whose members then look up again.
        match crate::deadline::current() {
            Some(by) => tokio::time::timeout_at(by, self.coalesced(slot))
                .await
                .map_err(|_| {
                    BackendError::Unavailable(format!(
                        "the RDS did not answer the lookup of {slot} by this call's deadline"
                    ))
                })?,
            None => self.coalesced(slot).await,
        }
    }

    /// A volume's lookup through [`reads`]: joins the open batch, or leads one, closing it when
    /// a session is had.
    async fn coalesced(&self, slot: &Slot) -> Result<Option<Disk>, BackendError> {
        loop {
            let entered = self.reads.enter(slot);
            if let Some(lead) = entered.lead {
                let mut closed = None;
                let ran = self
                    .pool
                    .run_chosen(|| {
                        let batch = lead.close();
                        let command = batch.command();
                        closed = Some(batch);
                        command
                    })
                    .await;
                let Some(batch) = closed else {
                    // No session came: the batch was disbanded unsent.
                    return Err(backend_error(ran.expect_err("no command, no output")));
                };
                let lookups = batch.len();
                let disks = ran
                    .map_err(RunError::Link)
                    .and_then(|(_, out)| checked(out))
                    .map_err(|e| {
                        e.into_backend(&if lookups == 1 {
                            "looking up the disk".to_string()
                        } else {
                            format!("looking up {lookups} disks at once")
                        })
                    })
                    .and_then(|text| {
                        parse::disks(&text).map_err(|e| BackendError::Corrupt(e.to_string()))
                    });
                batch.answer(disks);
            }
            match entered.answer.await {
                Ok(answer) => return answer,
                // The batch's leader was dropped (its caller gave up) before answering.
                Err(_) => continue,
            }
        }
    }

    /// Reads a StorageClass's parameters as the Go driver does. `capabilities` are the
    /// CreateVolume's (none when listing): `fsType` is checked only when a filesystem volume
    /// will use it. INVALID_ARGUMENT names the parameter.
    fn params(
        &self,
        raw: &BTreeMap<String, String>,
        capabilities: &[Capability],
    ) -> Result<Params, Error> {
        let rds_address = match raw.get(keys::RDS_ADDRESS) {
            Some(a) => values::host(a, "parameters[rdsAddress]")?,
            None => self.host.clone(),
        };
        let nvme_address = match (raw.get(keys::NVME_ADDRESS), raw.get(keys::RDS_ADDRESS)) {
            (Some(a), _) => Some(values::ip(a, "parameters[nvmeAddress]")?),
            // The Go driver's fallback; its node dials only an IP address.
            (None, Some(a)) => Some(values::ip(a, "parameters[rdsAddress]").map_err(
                |e| match e {
                    Error::InvalidArgument { field, reason } => Error::InvalidArgument {
                        field,
                        reason: format!("{reason}, and no nvmeAddress is set for nodes to dial"),
                    },
                    other => other,
                },
            )?),
            (None, None) => self.defaults.nvme_address,
        };
        let nvme_port = match raw.get(keys::NVME_PORT) {
            Some(p) => values::leading_port(p, "parameters[nvmePort]")?,
            None => None,
        }
        .unwrap_or(self.defaults.nvme_port);
        let volume_path = match raw.get(keys::VOLUME_PATH) {
            Some(p) => RosPath::parse(p, "parameters[volumePath]")?,
            None => self.defaults.volume_path.clone(),
        };
        let timings = nvme_timings(|k| raw.get(k).cloned())?;
        let migration_timeout = match raw.get(MIGRATION_TIMEOUT_KEY) {
            Some(v) if v.trim().parse::<u64>().is_ok_and(|s| s > 0) => {
                crate::domain::migration_timeout(Some(v)).0.as_secs()
            }
            _ => crate::domain::DEFAULT_MIGRATION_TIMEOUT.as_secs(),
        };
        let filesystem = capabilities
            .iter()
            .any(|c| matches!(c.access_type(), AccessType::Mount { .. }));
        let mut extra = BTreeMap::new();
        for key in [FS_TYPE_KEY, CSI_FS_TYPE_KEY] {
            let Some(v) = raw.get(key).filter(|v| !v.is_empty()) else {
                continue;
            };
            match FsType::parse(v) {
                Some(_) => {
                    extra.insert(key.to_string(), v.clone());
                }
                // A block volume never reads it, as with the Go driver.
                None if !filesystem => {}
                None => {
                    return Err(Error::InvalidArgument {
                        field: if key == FS_TYPE_KEY {
                            "parameters[fsType]"
                        } else {
                            "parameters[csi.storage.k8s.io/fstype]"
                        },
                        reason: format!(
                            "{v:?} is not a filesystem the node plugin formats (ext4, ext3 \
                             or xfs, as the Go driver's)"
                        ),
                    })
                }
            }
        }
        Ok(Params {
            rds_address,
            nvme_address,
            nvme_port,
            volume_path,
            nqn_prefix: self.defaults.nqn_prefix.clone(),
            timings,
            migration_timeout,
            extra,
        })
    }

    /// Warns once per StorageClass about the parameters the Go driver ignores (and so does
    /// this driver), and counts every CreateVolume that carries one. A StorageClass is known
    /// by its parameters without the provisioner's `csi.storage.k8s.io/…` ones, which change
    /// with every claim.
    fn note_ignored(&self, raw: &BTreeMap<String, String>) {
        use std::hash::{Hash, Hasher};
        let class: Vec<(&String, &String)> = raw
            .iter()
            .filter(|(k, _)| !k.starts_with(PROVISIONER_PREFIX))
            .collect();
        // An `nvmePort` with no number in it: the Go driver takes its default, and so do we.
        let ignored: Vec<&str> = class
            .iter()
            .filter(|(k, v)| {
                !GO_PARAMETERS.contains(&k.as_str())
                    || (k.as_str() == keys::NVME_PORT
                        && values::leading_port(v, "nvmePort").is_ok_and(|p| p.is_none()))
            })
            .map(|(k, _)| k.as_str())
            .collect();
        if ignored.is_empty() {
            return;
        }
        if let Some(m) = &self.metrics {
            for key in &ignored {
                m.storageclass_parameters_ignored
                    .with_label_values(&[parameter_label(key)])
                    .inc();
            }
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        class.hash(&mut hasher);
        let first = {
            let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
            if warned.len() >= WARNED_CAP {
                warned.clear();
            }
            warned.insert(hasher.finish())
        };
        if first {
            tracing::warn!(
                parameters = ?ignored,
                "StorageClass parameters the Go driver ignores are ignored: {}; this is said \
                 once per StorageClass",
                ignored.join(", ")
            );
        }
    }

    /// The volumes (`pvc-*` disks) that `keep` keeps, sorted by id.
    async fn volumes(&self, keep: impl Fn(&Disk) -> bool) -> Result<Vec<VolumeInfo>, BackendError> {
        let text = self
            .run(&RosCommand::List(Listing::Volumes))
            .await
            .map_err(|e| e.into_backend("listing disks"))?;
        let params = self.params(&BTreeMap::new(), &[])?;
        let mut out: Vec<VolumeInfo> = parse::disks(&text)
            .map_err(|e| BackendError::Corrupt(e.to_string()))?
            .iter()
            .filter(|d| d.slot.starts_with("pvc-") && keep(d))
            .filter_map(|d| {
                let id = VolumeId::try_from(d.slot.as_str()).ok()?;
                Some(self.info(&id, d, self.context(d, &params)))
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Whether `disk` is where this instance's defaults put a volume in its slot (see
    /// `list_owned`). A disk with no backing file or no NQN is not.
    fn owns(&self, disk: &Disk) -> bool {
        let Ok(slot) = Slot::parse(&disk.slot, "slot") else {
            return false;
        };
        let (Ok(path), Ok(nqn)) = (
            self.defaults.volume_path.image(&slot),
            self.defaults.nqn_prefix.nqn(&slot),
        ) else {
            return false;
        };
        let relative = |p: &str| p.trim_start_matches('/').to_string();
        disk.file_path.as_deref().map(relative) == Some(relative(path.as_str()))
            && disk.nqn.as_deref() == Some(nqn.as_str())
    }

    /// The volume context a node needs, with the Go driver's keys (and `volumePath` holding
    /// the image's full path, as it writes it).
    fn context(&self, disk: &Disk, params: &Params) -> BTreeMap<String, String> {
        let mut ctx = params.extra.clone();
        let (ctrl, delay, keep) = params.timings;
        ctx.insert(keys::RDS_ADDRESS.into(), params.rds_address.clone());
        if let Some(addr) = params.nvme_address {
            ctx.insert(keys::NVME_ADDRESS.into(), addr.to_string());
        }
        ctx.insert(
            keys::NVME_PORT.into(),
            disk.nvme_port.unwrap_or(params.nvme_port).to_string(),
        );
        if let Some(nqn) = &disk.nqn {
            ctx.insert(keys::NQN.into(), nqn.clone());
        }
        if let Some(path) = &disk.file_path {
            ctx.insert(keys::VOLUME_PATH.into(), path.clone());
        }
        ctx.insert(keys::CTRL_LOSS_TMO.into(), ctrl.to_string());
        ctx.insert(keys::RECONNECT_DELAY.into(), delay.to_string());
        ctx.insert(keys::KEEP_ALIVE_TMO.into(), keep.to_string());
        ctx.insert(
            MIGRATION_TIMEOUT_KEY.into(),
            params.migration_timeout.to_string(),
        );
        ctx
    }

    fn info(&self, id: &VolumeId, disk: &Disk, context: BTreeMap<String, String>) -> VolumeInfo {
        VolumeInfo {
            id: id.clone(),
            name: id.to_string(),
            capacity_bytes: disk.size.unwrap_or(0),
            capabilities: Vec::new(),
            parameters: context,
            created_at: SystemTime::now(),
            source: provenance(disk).and_then(|p| content_source(&p.source)),
        }
    }

    /// Writes `record` into the disk's comment.
    async fn write_record(&self, slot: &Slot, record: Record) -> Result<(), BackendError> {
        self.run(&RosCommand::SetComment {
            slot: slot.clone(),
            comment: record,
        })
        .await
        .map_err(|e| e.into_backend("recording what the disk was made from"))?;
        Ok(())
    }

    /// Checks that an existing volume's disk was created for this request's parameters and
    /// capabilities (CreateVolume idempotency, as the file backend checks its metadata); a
    /// disk with no record of them (the Go driver's, or one some other add made) gets this
    /// request's recorded.
    async fn check_made(
        &self,
        req: &CreateRequest,
        slot: &Slot,
        disk: &Disk,
    ) -> Result<(), BackendError> {
        let record = record_of(disk);
        let want = MadeWith::of(&req.parameters, &req.capabilities);
        match record.made {
            Some(have) if have == want => Ok(()),
            Some(have) => Err(BackendError::AlreadyExists(format!(
                "volume {} exists on the RDS, created for other parameters or capabilities \
                 (recorded {have}; these are {want})",
                req.id
            ))),
            None => {
                self.write_record(
                    slot,
                    Record {
                        made: Some(want),
                        ..record
                    },
                )
                .await
            }
        }
    }

    /// Checks that an existing disk was made from `wanted` (idempotency by name); a disk with
    /// no record of its source (the Go driver's, or one some other add made) gets `wanted`
    /// recorded. `what` names it in errors.
    async fn check_source(
        &self,
        what: &str,
        slot: &Slot,
        disk: &Disk,
        wanted: Option<&Slot>,
    ) -> Result<Option<Provenance>, BackendError> {
        let recorded = provenance(disk);
        match (recorded.as_ref().map(|p| &p.source), wanted) {
            (Some(have), Some(want)) if have == want => Ok(recorded),
            (None, None) => Ok(None),
            (None, Some(want)) => {
                let provenance = copied_now(want);
                self.write_record(
                    slot,
                    Record {
                        provenance: Some(provenance.clone()),
                        made: record_of(disk).made,
                    },
                )
                .await?;
                Ok(Some(provenance))
            }
            (have, want) => {
                let show =
                    |s: Option<&Slot>| s.map_or_else(|| "nothing".to_string(), |s| s.to_string());
                Err(BackendError::AlreadyExists(format!(
                    "{what} exists on the RDS, made from {}, not from {}",
                    show(have),
                    show(want)
                )))
            }
        }
    }

    /// Checks that the existing disk of a volume made from `from` records that source and this
    /// request's parameters ([`Self::check_source`], [`Self::check_made`]), recording what it
    /// lacks; answers the disk as it is after that. A disk that already records both costs no
    /// command.
    async fn check_copied(
        &self,
        req: &CreateRequest,
        slot: &Slot,
        disk: Disk,
        from: Option<&Slot>,
    ) -> Result<Disk, BackendError> {
        let record = record_of(&disk);
        let want = MadeWith::of(&req.parameters, &req.capabilities);
        let recorded_source = record.provenance.as_ref().map(|p| &p.source);
        if from.is_some() && recorded_source == from && record.made.as_ref() == Some(&want) {
            return Ok(disk);
        }
        let what = format!("volume {}", req.id);
        self.check_source(&what, slot, &disk, from).await?;
        let disk = self.disk(slot).await?.unwrap_or(disk);
        self.check_made(req, slot, &disk).await?;
        Ok(disk)
    }

    /// Removes the disk in `slot` and its backing file (idempotent), holding `key` (the
    /// volume or snapshot it is) exclusively. Answers the file's path if there was a disk.
    async fn remove_disk(&self, key: Key, slot: &Slot) -> Result<Option<RosPath>, BackendError> {
        let _held = self.locks.acquire([(key, Mode::Exclusive)]).await;
        let disk = self.disk(slot).await?;
        let disk = disk.as_ref();
        if disk.is_some() {
            match self.run(&RosCommand::Remove { slot: slot.clone() }).await {
                Ok(_) | Err(RunError::Failed(Failure::NoSuchItem(_))) => {}
                Err(e) => return Err(e.into_backend("removing the disk")),
            }
        }
        // The backing file outlives its disk on RouterOS; remove it too (again on a retry, in
        // case an earlier attempt lost it).
        let path = match disk.and_then(|d| d.file_path.as_deref()) {
            Some(p) => RosPath::parse(p, "file-path")?,
            None => self.defaults.volume_path.image(slot)?,
        };
        match self
            .run(&RosCommand::RemoveFile { path: path.clone() })
            .await
        {
            Ok(_) | Err(RunError::Failed(Failure::NoSuchItem(_))) => {}
            Err(e) => return Err(e.into_backend("removing the backing file")),
        }
        Ok(disk.map(|_| path))
    }

    fn snapshot_info(&self, id: SnapshotId, disk: &Disk) -> SnapshotInfo {
        let recorded = provenance(disk);
        SnapshotInfo {
            id,
            source: recorded
                .as_ref()
                .and_then(|p| VolumeId::try_from(p.source.as_str()).ok()),
            size_bytes: disk.size.unwrap_or(0),
            created_at: recorded.as_ref().map(Provenance::time),
            ready: true,
        }
    }

    /// A volume made from a snapshot or a volume: the Go driver's restore command, with
    /// `copy-from` naming a volume's slot for a clone.
    async fn create_from(
        &self,
        req: CreateRequest,
        params: Params,
        source: ContentSource,
    ) -> Result<VolumeInfo, BackendError> {
        let (key, from) = match &source {
            ContentSource::Snapshot(s) => (Key::Snapshot(s.clone()), snapshot_slot(s)),
            ContentSource::Volume(v) => (Key::Volume(v.clone()), volume_slot(v)),
        };
        let not_found = || match &source {
            ContentSource::Snapshot(s) => BackendError::SnapshotNotFound(s.clone()),
            ContentSource::Volume(v) => BackendError::NotFound(v.clone()),
        };
        let slot = Slot::of(&req.id)?;
        let mut wanted = vec![(Key::Volume(req.id.clone()), Mode::Exclusive)];
        if key != wanted[0].0 {
            wanted.push((key, Mode::Shared));
        }
        let _held = self.locks.acquire(wanted).await;
        let path = params.volume_path.image(&slot)?;
        if let Some(disk) = self.disk(&slot).await? {
            self.check_existing(&req, &disk, &params)?;
            let disk = self.check_copied(&req, &slot, disk, from.as_ref()).await?;
            return Ok(self.info(&req.id, &disk, self.context(&disk, &params)));
        }
        let from = from.ok_or_else(not_found)?;
        let source_disk = self.disk(&from).await?.ok_or_else(not_found)?;
        let size = req.size_from(source_disk.size.unwrap_or(0))?;
        let size = RosSize::for_request(size, req.limit_bytes)?;
        let copy = RosCommand::CopyVolume {
            source: from.clone(),
            path: path.clone(),
            size,
            slot: slot.clone(),
            port: params.nvme_port,
            nqn: params.nqn_prefix.nqn(&slot)?,
            record: Record {
                provenance: Some(copied_now(&from)),
                made: Some(MadeWith::of(&req.parameters, &req.capabilities)),
            },
        };
        match self.run(&copy).await {
            Ok(_) => {}
            // A copy that raced another (or a retry of one that completed): what is there is
            // checked below as an existing disk is.
            Err(RunError::Failed(Failure::Other(m))) if m.contains("exists") => {}
            Err(RunError::Failed(Failure::NoSuchItem(_))) => return Err(not_found()),
            Err(e) => return Err(e.into_backend("copying the disk")),
        }
        let disk = self.disk(&slot).await?.ok_or_else(|| {
            BackendError::Rejected(format!(
                "the RDS accepted the copy for {} but does not list it",
                req.id
            ))
        })?;
        self.check_existing(&req, &disk, &params)?;
        if !disk.nvme_export {
            return Err(BackendError::Rejected(format!(
                "the RDS created {} without its NVMe/TCP export",
                req.id
            )));
        }
        // The record came with the copy; only a disk some other add made lacks it.
        let disk = self.check_copied(&req, &slot, disk, Some(&from)).await?;
        tracing::info!(volume_id = %req.id, %source, bytes = size.bytes(), path = %path, "copied on the RDS");
        Ok(self.info(&req.id, &disk, self.context(&disk, &params)))
    }

    /// The free bytes of the pool (RouterOS mount point) `path` is on.
    async fn pool_free(&self, path: &RosPath) -> Result<u64, BackendError> {
        let text = self
            .run(&RosCommand::Capacity {
                volume_path: path.clone(),
            })
            .await
            .map_err(|e| e.into_backend("reading the pool's capacity"))?;
        let (_, free) = parse::capacity(&text)
            .map_err(|e| BackendError::Corrupt(e.to_string()))?
            .ok_or_else(|| {
                BackendError::Corrupt(format!(
                    "the RDS printed no size and free for mount point {:?}",
                    path.mount_point()
                ))
            })?;
        Ok(free)
    }

    /// Checks that an existing disk is what a CreateVolume asks for (idempotency), with the
    /// file backend's checks ([`CreateRequest::check_capacity`],
    /// [`CreateRequest::check_parameters`]) on what RouterOS shows of a volume: its size, and
    /// the parameters that shape the disk (`volumePath`, as the file's path, and `nvmePort`),
    /// so the error names them. The rest (addresses, timings, capabilities) is compared
    /// through the disk's record ([`Self::check_made`]).
    fn check_existing(
        &self,
        req: &CreateRequest,
        disk: &Disk,
        params: &Params,
    ) -> Result<(), BackendError> {
        req.check_capacity(disk.size.unwrap_or(0))?;
        let path = params.volume_path.image(&Slot::of(&req.id)?)?;
        req.check_parameters(
            &disk_parameters(disk.file_path.as_deref(), disk.nvme_port),
            &disk_parameters(Some(path.as_str()), Some(params.nvme_port)),
        )
    }
}

/// The parameters a disk shows: `volumePath` (its file) and `nvmePort`.
fn disk_parameters(file_path: Option<&str>, nvme_port: Option<u16>) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            keys::VOLUME_PATH.to_string(),
            file_path.unwrap_or("(no file)").to_string(),
        ),
        (
            keys::NVME_PORT.to_string(),
            nvme_port.map_or_else(|| "(not exported)".to_string(), |p| p.to_string()),
        ),
    ])
}

/// A parameter name as a metric label: itself when it could be a StorageClass's (1 to 63
/// bytes of letters, digits, `.`, `_`, `-`, `/`), else `invalid`, so junk sent straight to
/// the socket cannot mint label values.
fn parameter_label(key: &str) -> &str {
    let ok = (1..=63).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    if ok {
        key
    } else {
        "invalid"
    }
}

/// What a command printed, or RouterOS's failure text (often with exit status 0) as an error.
fn checked(out: ssh::CommandOutput) -> Result<String, RunError> {
    let all = format!("{}\n{}", out.stdout, out.stderr);
    if let Some(failure) = parse::failure(&all) {
        return Err(RunError::Failed(failure));
    }
    if out.exit_status.is_some_and(|s| s != 0) {
        let text = if out.stderr.trim().is_empty() {
            &out.stdout
        } else {
            &out.stderr
        };
        return Err(RunError::Failed(Failure::Other(format!(
            "exit status {}: {}",
            out.exit_status.unwrap_or_default(),
            text.trim()
        ))));
    }
    Ok(out.stdout)
}

/// How running a command went wrong: the link, or RouterOS said no.
enum RunError {
    Link(SshError),
    Failed(Failure),
}

impl RunError {
    fn into_backend(self, doing: &str) -> BackendError {
        match self {
            Self::Link(e) => backend_error(e),
            Self::Failed(Failure::NoSpace(m)) => {
                BackendError::ResourceExhausted(format!("the RDS has not enough space ({m})"))
            }
            Self::Failed(Failure::Rejected(m)) => {
                BackendError::Rejected(format!("the RDS rejected the command {doing}: {m}"))
            }
            Self::Failed(f @ (Failure::NoSuchItem(_) | Failure::Other(_))) => {
                BackendError::Rejected(format!("the RDS failed {doing}: {}", f.message()))
            }
        }
    }
}

/// What a disk's comment says it was made from and for, as far as this driver wrote it.
fn record_of(disk: &Disk) -> Record {
    disk.comment
        .as_deref()
        .map(Record::parse)
        .unwrap_or_default()
}

/// What a disk's comment says it was copied from, if this driver wrote it.
fn provenance(disk: &Disk) -> Option<Provenance> {
    record_of(disk).provenance
}

/// A copy of `source` made now.
fn copied_now(source: &Slot) -> Provenance {
    Provenance {
        source: source.clone(),
        at: SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

/// The content source a recorded source slot names: a snapshot's slot or a volume's.
fn content_source(source: &Slot) -> Option<ContentSource> {
    if source.as_str().starts_with(SNAPSHOT_SLOT_PREFIX) {
        SnapshotId::try_from(source.as_str())
            .ok()
            .map(ContentSource::Snapshot)
    } else {
        VolumeId::try_from(source.as_str())
            .ok()
            .map(ContentSource::Volume)
    }
}

/// The slot of a snapshot id, if it can be one of this driver's (or the Go driver's)
/// snapshots: a RouterOS slot starting with `snap-`. Any other id names no snapshot, so a
/// snapshot call can never reach a volume's disk.
fn snapshot_slot(id: &SnapshotId) -> Option<Slot> {
    Slot::parse(id.as_str(), "snapshot_id")
        .ok()
        .filter(|s| s.as_str().starts_with(SNAPSHOT_SLOT_PREFIX))
}

/// The slot of a volume id, if it can be a volume's: a slot that is not a snapshot's, so a
/// volume call can never reach a snapshot's disk.
fn volume_slot(id: &VolumeId) -> Option<Slot> {
    Slot::of(id)
        .ok()
        .filter(|s| !s.as_str().starts_with(SNAPSHOT_SLOT_PREFIX))
}

/// `pvc-` and a UUID-shaped digest of `name`: the slot of a CreateVolume name that is not
/// already a `pvc-…` slot. Every volume slot then starts with `pvc`, which is how the Go
/// driver lists volumes (`slot~"pvc"`).
fn hashed_slot(name: &str) -> String {
    use sha2::Digest;
    let h = hex::encode(sha2::Sha256::digest(name.as_bytes()));
    format!(
        "pvc-{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[async_trait]
impl VolumeBackend for RdsBackend {
    fn kind(&self) -> &'static str {
        "rds"
    }

    /// The name itself when it is a `pvc-…` RouterOS slot (Kubernetes' names, the Go driver's
    /// ids), else a `pvc-` slot derived from it.
    fn volume_id_for(&self, name: &str) -> Result<VolumeId, Error> {
        VolumeId::for_name(name)?;
        if name.starts_with("pvc-") && Slot::parse(name, "name").is_ok() {
            return VolumeId::try_from(name);
        }
        VolumeId::try_from(hashed_slot(name).as_str())
    }

    fn ready(&self) -> bool {
        self.pool.connected()
    }

    async fn create(&self, req: CreateRequest) -> Result<VolumeInfo, BackendError> {
        let params = self.params(&req.parameters, &req.capabilities)?;
        self.note_ignored(&req.parameters);
        if params.nvme_address.is_none() {
            return Err(BackendError::InvalidArgument {
                field: "parameters[nvmeAddress]",
                reason: "is required: --rds-address is not an IP address and no \
                         --rds-nvme-address is set"
                    .into(),
            });
        }
        if let Some(source) = req.source.clone() {
            return self.create_from(req, params, source).await;
        }
        let slot = Slot::of(&req.id)?;
        let size = RosSize::for_request(req.required_bytes, req.limit_bytes)?;
        let path = params.volume_path.image(&slot)?;
        if let Some(disk) = self.disk(&slot).await? {
            self.check_existing(&req, &disk, &params)?;
            if let Some(p) = provenance(&disk) {
                return Err(BackendError::AlreadyExists(format!(
                    "volume {} exists on the RDS, made from {}, not empty",
                    req.id, p.source
                )));
            }
            // What the answer is made of (size, file, export, NQN, provenance) is what was
            // just read; a record written now changes none of it.
            self.check_made(&req, &slot, &disk).await?;
            return Ok(self.info(&req.id, &disk, self.context(&disk, &params)));
        }
        let nqn = params.nqn_prefix.nqn(&slot)?;
        let add = RosCommand::CreateVolume {
            path: path.clone(),
            size,
            slot: slot.clone(),
            port: params.nvme_port,
            nqn,
            record: Record {
                provenance: None,
                made: Some(MadeWith::of(&req.parameters, &req.capabilities)),
            },
        };
        match self.run(&add).await {
            Ok(_) => {}
            // A create that raced another (or a retry of one that completed): check what is
            // there instead of failing.
            Err(RunError::Failed(Failure::Other(m))) if m.contains("exists") => {}
            Err(e) => return Err(e.into_backend("creating the disk")),
        }
        let disk = self.disk(&slot).await?.ok_or_else(|| {
            BackendError::Rejected(format!(
                "the RDS accepted the disk for {} but does not list it",
                req.id
            ))
        })?;
        self.check_existing(&req, &disk, &params)?;
        if !disk.nvme_export {
            return Err(BackendError::Rejected(format!(
                "the RDS created {} without its NVMe/TCP export",
                req.id
            )));
        }
        self.check_made(&req, &slot, &disk).await?;
        tracing::info!(volume_id = %req.id, bytes = size.bytes(), path = %path, "created on the RDS");
        Ok(self.info(&req.id, &disk, self.context(&disk, &params)))
    }

    async fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        let Some(slot) = volume_slot(id) else {
            return Ok(());
        };
        if let Some(path) = self.remove_disk(Key::Volume(id.clone()), &slot).await? {
            tracing::info!(volume_id = %id, path = %path, "deleted from the RDS");
        }
        Ok(())
    }

    async fn get(&self, id: &VolumeId) -> Result<Option<VolumeInfo>, BackendError> {
        let Some(slot) = volume_slot(id) else {
            return Ok(None);
        };
        let Some(disk) = self.disk(&slot).await? else {
            return Ok(None);
        };
        let params = self.params(&BTreeMap::new(), &[])?;
        Ok(Some(self.info(id, &disk, self.context(&disk, &params))))
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        self.volumes(|_| true).await
    }

    /// Only the disks this instance would have made for a volume with its own defaults: the
    /// backing file is `<--rds-volume-path>/<slot>.img` and the NQN `<--rds-nqn-prefix>:<slot>`.
    /// Another cluster or driver instance on the same RDS (its own volume path and NQN prefix)
    /// is never a candidate, nor is a disk under a StorageClass's own `volumePath` (another
    /// instance may use that path as its default). Exact matches, not prefixes: `/pool/a` does
    /// not own `/pool/a/b/…`, nor a prefix `nqn.x` the NQNs of a prefix `nqn.x:b`.
    async fn list_owned(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        self.volumes(|d| self.owns(d)).await
    }

    async fn capacity(&self) -> Result<u64, BackendError> {
        self.pool_free(&self.defaults.volume_path).await
    }

    /// The free bytes of the pool the StorageClass's `volumePath` is on (else
    /// `--rds-volume-path`'s), as the Go driver asks.
    async fn capacity_for(
        &self,
        parameters: &BTreeMap<String, String>,
    ) -> Result<u64, BackendError> {
        match parameters.get(keys::VOLUME_PATH) {
            Some(p) => {
                self.pool_free(&RosPath::parse(p, "parameters[volumePath]")?)
                    .await
            }
            None => self.capacity().await,
        }
    }

    async fn expand(&self, id: &VolumeId, bytes: u64) -> Result<u64, BackendError> {
        let slot = volume_slot(id).ok_or_else(|| BackendError::NotFound(id.clone()))?;
        let disk = self
            .disk(&slot)
            .await?
            .ok_or_else(|| BackendError::NotFound(id.clone()))?;
        let current = disk.size.unwrap_or(0);
        let size = RosSize::for_request(bytes, 0)?;
        if bytes < current {
            return Err(BackendError::OutOfRange(format!(
                "volume {id} is {current} bytes; shrinking it to {bytes} is not supported"
            )));
        }
        if size.bytes() <= current {
            return Ok(current);
        }
        self.run(&RosCommand::Resize {
            slot: slot.clone(),
            size,
        })
        .await
        .map_err(|e| e.into_backend("growing the disk"))?;
        let grown = self
            .disk(&slot)
            .await?
            .and_then(|d| d.size)
            .ok_or_else(|| BackendError::NotFound(id.clone()))?;
        if grown < bytes {
            return Err(BackendError::Rejected(format!(
                "the RDS reports {grown} bytes for {id} after growing it to {size}"
            )));
        }
        tracing::info!(volume_id = %id, bytes = grown, "grown on the RDS");
        Ok(grown)
    }

    fn publish_context(&self, volume: &VolumeInfo) -> HashMap<String, String> {
        let mut ctx = HashMap::from([(PUBLISH_BACKEND_KEY.to_string(), "rds".to_string())]);
        let p = &volume.parameters;
        for (from, to) in [
            (keys::NVME_ADDRESS, keys::PUBLISH_NVME_ADDRESS),
            (keys::NVME_PORT, keys::PUBLISH_NVME_PORT),
            (keys::NQN, keys::PUBLISH_NVME_NQN),
        ] {
            if let Some(v) = p.get(from) {
                ctx.insert(to.to_string(), v.clone());
            }
        }
        let fs = p
            .get(crate::domain::FS_TYPE_KEY)
            .cloned()
            .unwrap_or_else(|| "ext4".into());
        ctx.insert(keys::PUBLISH_FS_TYPE.to_string(), fs);
        ctx
    }

    /// The Go driver's CreateSnapshot command, with the source recorded in the disk's comment.
    /// The snapshot's directory is the VolumeSnapshotClass's `volumePath`, else
    /// `--rds-volume-path`.
    async fn create_snapshot(&self, req: SnapshotRequest) -> Result<SnapshotInfo, BackendError> {
        let slot = snapshot_slot(&req.id).ok_or_else(|| BackendError::InvalidArgument {
            field: "name",
            reason: format!(
                "gives the snapshot id {}, which is not a RouterOS slot",
                req.id
            ),
        })?;
        let source =
            volume_slot(&req.source).ok_or_else(|| BackendError::NotFound(req.source.clone()))?;
        let dir = match req.parameters.get(keys::VOLUME_PATH) {
            Some(p) => RosPath::parse(p, "parameters[volumePath]")?,
            None => self.defaults.volume_path.clone(),
        };
        let _held = self
            .locks
            .acquire([
                (Key::Snapshot(req.id.clone()), Mode::Exclusive),
                (Key::Volume(req.source.clone()), Mode::Shared),
            ])
            .await;
        let what = format!("snapshot {:?}", req.name);
        if let Some(disk) = self.disk(&slot).await? {
            let recorded = provenance(&disk).is_some();
            if !recorded {
                // Nothing recorded: all RouterOS lets us check is that a snapshot is never
                // larger than its source, which exists.
                let source_disk = self
                    .disk(&source)
                    .await?
                    .ok_or_else(|| BackendError::NotFound(req.source.clone()))?;
                if disk.size.unwrap_or(0) > source_disk.size.unwrap_or(0) {
                    return Err(BackendError::AlreadyExists(format!(
                        "{what} exists on the RDS and is larger than volume {}",
                        req.source
                    )));
                }
            }
            self.check_source(&what, &slot, &disk, Some(&source))
                .await?;
            // Read again only if the check just recorded the source.
            let disk = if recorded {
                disk
            } else {
                self.disk(&slot).await?.unwrap_or(disk)
            };
            return Ok(self.snapshot_info(req.id, &disk));
        }
        if self.disk(&source).await?.is_none() {
            return Err(BackendError::NotFound(req.source.clone()));
        }
        let path = dir.image(&slot)?;
        let add = RosCommand::CreateSnapshot {
            source: source.clone(),
            path: path.clone(),
            slot: slot.clone(),
            record: Record {
                provenance: Some(copied_now(&source)),
                made: None,
            },
        };
        match self.run(&add).await {
            Ok(_) => {}
            // A copy that raced another (or a retry of one that completed): its source is
            // checked below.
            Err(RunError::Failed(Failure::Other(m))) if m.contains("exists") => {}
            Err(RunError::Failed(Failure::NoSuchItem(_))) => {
                return Err(BackendError::NotFound(req.source.clone()))
            }
            Err(e) => return Err(e.into_backend("copying the disk into a snapshot")),
        }
        let listed = || {
            BackendError::Rejected(format!(
                "the RDS accepted snapshot {} but does not list it",
                req.id
            ))
        };
        let mut disk = self.disk(&slot).await?.ok_or_else(listed)?;
        if provenance(&disk).map(|p| p.source) != Some(source.clone()) {
            // The record came with the copy; only a disk some other add made lacks it.
            self.check_source(&what, &slot, &disk, Some(&source))
                .await?;
            disk = self.disk(&slot).await?.ok_or_else(listed)?;
        }
        tracing::info!(snapshot_id = %req.id, volume_id = %req.source, path = %path, "snapshot taken on the RDS");
        Ok(self.snapshot_info(req.id, &disk))
    }

    /// Removes the snapshot's disk and file, after the restores from it.
    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), BackendError> {
        let Some(slot) = snapshot_slot(id) else {
            return Ok(());
        };
        if let Some(path) = self.remove_disk(Key::Snapshot(id.clone()), &slot).await? {
            tracing::info!(snapshot_id = %id, path = %path, "snapshot deleted from the RDS");
        }
        Ok(())
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<SnapshotInfo>, BackendError> {
        let Some(slot) = snapshot_slot(id) else {
            return Ok(None);
        };
        Ok(self
            .disk(&slot)
            .await?
            .map(|d| self.snapshot_info(id.clone(), &d)))
    }

    /// `/disk print detail where slot~"snap-"`, as the Go driver lists them.
    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, BackendError> {
        let text = self
            .run(&RosCommand::List(Listing::Snapshots))
            .await
            .map_err(|e| e.into_backend("listing snapshots"))?;
        let mut out: Vec<SnapshotInfo> = parse::disks(&text)
            .map_err(|e| BackendError::Corrupt(e.to_string()))?
            .iter()
            .filter(|d| d.slot.starts_with(SNAPSHOT_SLOT_PREFIX))
            .filter_map(|d| {
                let id = SnapshotId::try_from(d.slot.as_str()).ok()?;
                Some(self.snapshot_info(id, d))
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_pvc_slots() {
        assert_eq!(hashed_slot("sanity-vol+1").len(), 40);
        assert!(hashed_slot("x").starts_with("pvc-"));
        assert_ne!(hashed_slot("a"), hashed_slot("b"));
        assert!(Slot::parse(&hashed_slot("../etc"), "n").is_ok());
    }
}
