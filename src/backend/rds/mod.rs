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
//! driver reads a `source-volume` field that RouterOS never prints), so after each copy the
//! driver writes it into the disk's `comment` ([`values::Provenance`]), which RouterOS does keep
//! and print. A disk without one (the Go driver's, or one whose copy finished just before a
//! crash) is matched by its slot, that is by name, and the source it is then asked for is
//! recorded, after the one check RouterOS allows: a snapshot is never larger than its source.

pub mod command;
pub mod monitor;
pub mod parse;
pub mod snmp;
pub mod ssh;
pub mod values;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::SystemTime;

use async_trait::async_trait;

use self::command::{Listing, RosCommand};
use self::parse::{Disk, Failure};
use self::ssh::{SshError, SshPool};
use self::values::{
    nvme_timings, NqnPrefix, Provenance, RosPath, RosSize, Slot, SNAPSHOT_SLOT_PREFIX,
};
use super::locks::{Key, Locks, Mode};
use super::{
    BackendError, ContentSource, CreateRequest, SnapshotInfo, SnapshotRequest, VolumeBackend,
    VolumeInfo,
};
use crate::domain::{rds_keys as keys, FsType, PUBLISH_BACKEND_KEY};
use crate::ids::{SnapshotId, VolumeId};
use crate::Error;

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
    /// `--rds-address`'s host, as StorageClasses' `rdsAddress` must name it.
    host: String,
    ssh_port: u16,
    defaults: RdsDefaults,
    /// Keeps a restore and the delete of its snapshot (or a clone and the delete of its
    /// volume) apart, and two creates of one slot.
    locks: Locks,
}

/// A StorageClass's parameters, validated.
struct Params {
    /// `None` only when listing (CreateVolume requires it).
    nvme_address: Option<IpAddr>,
    nvme_port: u16,
    volume_path: RosPath,
    nqn_prefix: NqnPrefix,
    timings: (i32, u32, u32),
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
        let (host, ssh_port) = (pool.config().host.clone(), pool.config().port);
        Self {
            pool,
            host,
            ssh_port,
            defaults,
            locks: Locks::default(),
        }
    }

    pub fn pool(&self) -> &SshPool {
        &self.pool
    }

    /// Runs a command; RouterOS's failure text (often with exit status 0) becomes an error.
    async fn run(&self, command: &RosCommand) -> Result<String, RunError> {
        let out = self.pool.run(command).await.map_err(RunError::Link)?;
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

    async fn disk(&self, slot: &Slot) -> Result<Option<Disk>, BackendError> {
        let text = self
            .run(&RosCommand::Get { slot: slot.clone() })
            .await
            .map_err(|e| e.into_backend("looking up the disk"))?;
        let disks = parse::disks(&text).map_err(|e| BackendError::Corrupt(e.to_string()))?;
        Ok(disks.into_iter().find(|d| d.slot == slot.as_str()))
    }

    fn params(&self, raw: &BTreeMap<String, String>) -> Result<Params, Error> {
        if let Some(addr) = raw.get(keys::RDS_ADDRESS) {
            let same = addr == &self.host
                || (addr.parse::<IpAddr>().ok())
                    .zip(self.host.parse::<IpAddr>().ok())
                    .is_some_and(|(a, b)| a == b);
            if !same {
                return Err(Error::InvalidArgument {
                    field: "parameters[rdsAddress]",
                    reason: format!(
                        "{addr:?} names another RDS than this controller's ({}); one driver \
                         drives one RDS",
                        self.host
                    ),
                });
            }
        }
        if let Some(port) = raw.get(keys::SSH_PORT) {
            let port = values::port(port, "parameters[sshPort]")?;
            if port != self.ssh_port {
                return Err(Error::InvalidArgument {
                    field: "parameters[sshPort]",
                    reason: format!(
                        "{port} is not this controller's RDS SSH port ({})",
                        self.ssh_port
                    ),
                });
            }
        }
        let nvme_address = match raw.get(keys::NVME_ADDRESS).or(raw.get(keys::RDS_ADDRESS)) {
            Some(a) => Some(values::ip(a, "parameters[nvmeAddress]")?),
            None => self.defaults.nvme_address,
        };
        let nvme_port = match raw.get(keys::NVME_PORT) {
            Some(p) => values::port(p, "parameters[nvmePort]")?,
            None => self.defaults.nvme_port,
        };
        let volume_path = match raw.get(keys::VOLUME_PATH) {
            Some(p) => RosPath::parse(p, "parameters[volumePath]")?,
            None => self.defaults.volume_path.clone(),
        };
        let nqn_prefix = match raw.get(keys::NQN_PREFIX) {
            Some(p) => NqnPrefix::parse(p, "parameters[nqnPrefix]")?,
            None => self.defaults.nqn_prefix.clone(),
        };
        let timings = nvme_timings(|k| raw.get(k).cloned())?;
        FsType::resolve(
            "",
            &raw.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        )?;
        let mut extra = BTreeMap::new();
        for key in [
            crate::domain::MIGRATION_TIMEOUT_KEY,
            crate::domain::FS_TYPE_KEY,
            crate::domain::CSI_FS_TYPE_KEY,
        ] {
            if let Some(v) = raw.get(key) {
                extra.insert(key.to_string(), v.clone());
            }
        }
        Ok(Params {
            nvme_address,
            nvme_port,
            volume_path,
            nqn_prefix,
            timings,
            extra,
        })
    }

    /// The volume context a node needs, with the Go driver's keys (and `volumePath` holding
    /// the image's full path, as it writes it).
    fn context(&self, disk: &Disk, params: &Params) -> BTreeMap<String, String> {
        let mut ctx = params.extra.clone();
        let (ctrl, delay, keep) = params.timings;
        ctx.insert(keys::RDS_ADDRESS.into(), self.host.clone());
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

    /// Records in a disk's comment what it was made from, now.
    async fn record(&self, slot: &Slot, source: &Slot) -> Result<Provenance, BackendError> {
        let comment = Provenance {
            source: source.clone(),
            at: SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        self.run(&RosCommand::SetComment {
            slot: slot.clone(),
            comment: comment.clone(),
        })
        .await
        .map_err(|e| e.into_backend("recording what the disk was made from"))?;
        Ok(comment)
    }

    /// Checks that an existing disk was made from `wanted` (idempotency by name); a disk with
    /// no record of its source (the Go driver's, or an interrupted copy's) gets `wanted`
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
            (None, Some(want)) => Ok(Some(self.record(slot, want).await?)),
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
            self.check_existing(&req, &disk, &path)?;
            let what = format!("volume {}", req.id);
            self.check_source(&what, &slot, &disk, from.as_ref())
                .await?;
            let disk = self.disk(&slot).await?.unwrap_or(disk);
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
        };
        match self.run(&copy).await {
            Ok(_) => {}
            Err(RunError::Failed(Failure::Other(m))) if m.contains("exists") => {}
            Err(RunError::Failed(Failure::NoSuchItem(_))) => return Err(not_found()),
            Err(e) => return Err(e.into_backend("copying the disk")),
        }
        self.record(&slot, &from).await?;
        let disk = self.disk(&slot).await?.ok_or_else(|| {
            BackendError::Rejected(format!(
                "the RDS accepted the copy for {} but does not list it",
                req.id
            ))
        })?;
        self.check_existing(&req, &disk, &path)?;
        if !disk.nvme_export {
            return Err(BackendError::Rejected(format!(
                "the RDS created {} without its NVMe/TCP export",
                req.id
            )));
        }
        tracing::info!(volume_id = %req.id, %source, bytes = size.bytes(), path = %path, "copied on the RDS");
        Ok(self.info(&req.id, &disk, self.context(&disk, &params)))
    }

    /// Checks that an existing disk is what a CreateVolume asks for (idempotency).
    fn check_existing(
        &self,
        req: &CreateRequest,
        disk: &Disk,
        path: &RosPath,
    ) -> Result<(), BackendError> {
        let size = disk.size.unwrap_or(0);
        let fits = size >= req.required_bytes && (req.limit_bytes == 0 || size <= req.limit_bytes);
        if !fits {
            return Err(BackendError::AlreadyExists(format!(
                "volume {} exists on the RDS with {size} bytes, outside the requested range",
                req.id
            )));
        }
        if disk.file_path.as_deref() != Some(path.as_str()) {
            return Err(BackendError::AlreadyExists(format!(
                "volume {} exists on the RDS at {}, not at {path}",
                req.id,
                disk.file_path.as_deref().unwrap_or("(no file)")
            )));
        }
        Ok(())
    }
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

/// What a disk's comment says it was made from, if this driver wrote it.
fn provenance(disk: &Disk) -> Option<Provenance> {
    disk.comment.as_deref().and_then(Provenance::parse)
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
        let params = self.params(&req.parameters)?;
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
            self.check_existing(&req, &disk, &path)?;
            if let Some(p) = provenance(&disk) {
                return Err(BackendError::AlreadyExists(format!(
                    "volume {} exists on the RDS, made from {}, not empty",
                    req.id, p.source
                )));
            }
            return Ok(self.info(&req.id, &disk, self.context(&disk, &params)));
        }
        let nqn = params.nqn_prefix.nqn(&slot)?;
        let add = RosCommand::CreateVolume {
            path: path.clone(),
            size,
            slot: slot.clone(),
            port: params.nvme_port,
            nqn,
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
        self.check_existing(&req, &disk, &path)?;
        if !disk.nvme_export {
            return Err(BackendError::Rejected(format!(
                "the RDS created {} without its NVMe/TCP export",
                req.id
            )));
        }
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
        let params = self.params(&BTreeMap::new())?;
        Ok(Some(self.info(id, &disk, self.context(&disk, &params))))
    }

    async fn list(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        let text = self
            .run(&RosCommand::List(Listing::Volumes))
            .await
            .map_err(|e| e.into_backend("listing disks"))?;
        let params = self.params(&BTreeMap::new())?;
        let mut out: Vec<VolumeInfo> = parse::disks(&text)
            .map_err(|e| BackendError::Corrupt(e.to_string()))?
            .iter()
            .filter(|d| d.slot.starts_with("pvc-"))
            .filter_map(|d| {
                let id = VolumeId::try_from(d.slot.as_str()).ok()?;
                Some(self.info(&id, d, self.context(d, &params)))
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn capacity(&self) -> Result<u64, BackendError> {
        let text = self
            .run(&RosCommand::Capacity {
                volume_path: self.defaults.volume_path.clone(),
            })
            .await
            .map_err(|e| e.into_backend("reading the pool's capacity"))?;
        let (_, free) = parse::capacity(&text)
            .map_err(|e| BackendError::Corrupt(e.to_string()))?
            .ok_or_else(|| {
                BackendError::Corrupt(format!(
                    "the RDS printed no size and free for mount point {:?}",
                    self.defaults.volume_path.mount_point()
                ))
            })?;
        Ok(free)
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

    /// The Go driver's CreateSnapshot command, then the source recorded in the disk's comment.
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
            if provenance(&disk).is_none() {
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
            let disk = self.disk(&slot).await?.unwrap_or(disk);
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
        };
        match self.run(&add).await {
            Ok(_) => {}
            Err(RunError::Failed(Failure::Other(m))) if m.contains("exists") => {}
            Err(RunError::Failed(Failure::NoSuchItem(_))) => {
                return Err(BackendError::NotFound(req.source.clone()))
            }
            Err(e) => return Err(e.into_backend("copying the disk into a snapshot")),
        }
        self.record(&slot, &source).await?;
        let disk = self.disk(&slot).await?.ok_or_else(|| {
            BackendError::Rejected(format!(
                "the RDS accepted snapshot {} but does not list it",
                req.id
            ))
        })?;
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
