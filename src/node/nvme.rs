//! The RDS backend's volumes as NVMe/TCP namespaces: a [`DeviceSource`] beside the loop
//! devices, on the same seams (external `nvme` by argument vector, sysfs read from an
//! injectable root).
//!
//! Owns connecting, finding and disconnecting NVMe-oF subsystems of this driver's NQN prefix,
//! and nothing else: it never disconnects an NQN outside `--rds-nqn-prefix` (a host's own
//! NVMe-oF root disk, say). The kernel is the record: a subsystem is found by its NQN under
//! `class/nvme/*/subsysnqn`, its block device by the namespaces under that controller
//! (`nvmeXcYnZ` is the multipath hidden path of `nvmeXnZ`), never by a guessed `/dev` name.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::command::{Cmd, CommandRunner, LONG_TIMEOUT};
use super::device::{Backing, DeviceSource};
use super::paths::{AbsPath, BlockDevice, CommandArg};
use super::work::{self, Pool};
use super::NodeError;
use crate::backend::rds::values::{Nqn, NqnPrefix, NvmeTarget, Slot};
use crate::domain::PUBLISH_BACKEND_KEY;
use crate::ids::VolumeId;
use crate::metrics::{outcome, Metrics};

/// How long a connected namespace may take to appear as a block device.
pub const DEVICE_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
/// How often a wait for a namespace asks the controller to rescan (`nvme ns-rescan`): a
/// namespace the target adds after the connect shows only once the host rescans.
const RESCAN_EVERY: Duration = Duration::from_secs(1);

/// The kernel's `state` of a controller that serves I/O. `new`, `resetting` and `connecting`
/// are on the way there (the kernel retries until `ctrl_loss_tmo`); `deleting`,
/// `deleting (no IO)` and `dead` are on the way out.
pub const LIVE: &str = "live";

/// Whether a controller in `state` is being torn down: as good as gone.
pub fn going(state: &str) -> bool {
    state.starts_with("deleting") || state == "dead"
}

/// Where `nvme connect` reads the host's NQN, which the target uses to know this node.
pub const HOST_NQN_FILE: &str = "/etc/nvme/hostnqn";

/// This node's NVMe host NQN, read from [`HOST_NQN_FILE`]: `nqn.` and up to 223 bytes of
/// printable ASCII, as the NVMe base specification (§4.5) allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostNqn(String);

impl HostNqn {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for HostNqn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads the host NQN from `file`. Without one, `nvme connect` makes one up per call (or
/// from the machine's DMI data, the same on every clone of an image), and the RDS would see
/// two nodes as one host: FAILED_PRECONDITION, saying how to make one.
pub fn read_host_nqn(file: &std::path::Path) -> Result<HostNqn, NodeError> {
    let fix = "run `nvme gen-hostnqn > /etc/nvme/hostnqn` on the node (unique per node)";
    let text = std::fs::read_to_string(file).map_err(|e| {
        NodeError::FailedPrecondition(format!(
            "no NVMe host NQN: cannot read {}: {e}; {fix}",
            file.display()
        ))
    })?;
    let nqn = text.trim();
    let ok =
        nqn.starts_with("nqn.") && nqn.len() <= 223 && nqn.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(NodeError::FailedPrecondition(format!(
            "{} holds {:?}, not an NVMe host NQN (nqn.YYYY-MM.domain:name); {fix}",
            file.display(),
            nqn.chars().take(64).collect::<String>()
        )));
    }
    Ok(HostNqn(nqn.to_string()))
}

impl CommandArg for Nqn {
    fn to_arg(&self) -> OsString {
        OsString::from(self.as_str())
    }
}

/// A number or an address: formatted by Rust, never text from a request.
struct Num(String);

impl CommandArg for Num {
    fn to_arg(&self) -> OsString {
        OsString::from(&self.0)
    }
}

fn num(v: impl std::fmt::Display) -> Num {
    Num(v.to_string())
}

fn addr(a: IpAddr) -> Num {
    Num(a.to_string())
}

pub struct NvmeDevices<R> {
    runner: R,
    kernel: Kernel,
    /// Where the sysfs and `/proc` reads run: never on an async worker, since a read of a
    /// dead NVMe path's attributes can block in the kernel.
    pool: &'static Pool,
    prefix: NqnPrefix,
    device_wait: Duration,
    metrics: Arc<Metrics>,
}

/// The kernel's view, read synchronously: sysfs for controllers, namespaces and holders,
/// `/proc` for the mount table and open file descriptors. Every method blocks; the source
/// calls them only inside a job on its [`Pool`], one job per logical read.
#[derive(Clone, Debug)]
struct Kernel {
    sysfs: PathBuf,
    /// `/proc` normally: open file descriptors (`*/fd`) and the mount table (`self/mountinfo`)
    /// are read there before a disconnect.
    proc: PathBuf,
}

/// An NVMe-oF controller as sysfs shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Controller {
    pub name: String,
    pub nqn: String,
    pub state: String,
    /// Block devices of its namespaces (`nvme3n1`), resolved from the entries under it.
    pub namespaces: Vec<String>,
}

/// `nvme3c3n1` → `nvme3n1`; `nvme3n1` stays; anything else is not a namespace.
pub fn namespace_device(entry: &str) -> Option<String> {
    let rest = entry.strip_prefix("nvme")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (subsys, tail) = rest.split_at(rest.find(|c: char| !c.is_ascii_digit())?);
    if !digits(subsys) {
        return None;
    }
    let ns = if let Some(t) = tail.strip_prefix('c') {
        let (ctrl, n) = t.split_once('n')?;
        if !digits(ctrl) {
            return None;
        }
        n
    } else {
        tail.strip_prefix('n')?
    };
    digits(ns).then(|| format!("nvme{subsys}n{ns}"))
}

impl Kernel {
    /// Every NVMe controller sysfs lists.
    fn controllers(&self) -> Vec<Controller> {
        let dir = self.sysfs.join("class/nvme");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = dir.join(&name);
            let read = |f: &str| {
                std::fs::read_to_string(path.join(f))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default()
            };
            let nqn = read("subsysnqn");
            if nqn.is_empty() {
                continue;
            }
            let mut namespaces: Vec<String> = std::fs::read_dir(&path)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| namespace_device(&e.file_name().to_string_lossy()))
                .filter(|dev| {
                    self.sysfs
                        .join("class/block")
                        .join(dev)
                        .join("dev")
                        .exists()
                })
                .collect();
            namespaces.sort();
            namespaces.dedup();
            out.push(Controller {
                name,
                nqn,
                state: read("state"),
                namespaces,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The controllers of exactly `nqn`, in any state.
    fn controllers_of(&self, nqn: &Nqn) -> Vec<Controller> {
        self.controllers()
            .into_iter()
            .filter(|c| c.nqn == nqn.as_str())
            .collect()
    }

    fn block_device(&self, name: &str) -> Result<BlockDevice, NodeError> {
        let dev = std::fs::read_to_string(self.sysfs.join("class/block").join(name).join("dev"))
            .map_err(|source| NodeError::Io {
                action: format!("reading the device number of {name}"),
                source,
            })?;
        let (major, minor) = dev
            .trim()
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| NodeError::Io {
                action: format!("reading the device number of {name}"),
                source: std::io::Error::other(format!("{:?} is not major:minor", dev.trim())),
            })?;
        let path = AbsPath::try_from(PathBuf::from(format!("/dev/{name}"))).map_err(|reason| {
            NodeError::Io {
                action: format!("naming {name}"),
                source: std::io::Error::other(reason),
            }
        })?;
        Ok(BlockDevice { path, major, minor })
    }

    /// See [`NvmeDevices::resolve`].
    fn resolve(&self, nqn: &Nqn, live: bool) -> Result<Option<BlockDevice>, NodeError> {
        for c in self.controllers_of(nqn) {
            if going(&c.state) || (live && c.state != LIVE) {
                continue;
            }
            if let Some(ns) = c.namespaces.first() {
                return self.block_device(ns).map(Some);
            }
        }
        Ok(None)
    }

    /// The block devices of every namespace of `nqn`'s controllers.
    fn devices_of(&self, nqn: &Nqn) -> Result<Vec<BlockDevice>, NodeError> {
        let mut devices: Vec<BlockDevice> = Vec::new();
        for c in self.controllers_of(nqn) {
            for ns in &c.namespaces {
                if !devices.iter().any(|d| d.name() == *ns) {
                    devices.push(self.block_device(ns)?);
                }
            }
        }
        Ok(devices)
    }

    /// A holder stacked on one of `devices` (`/sys/class/block/<dev>/holders/*`), or a mount
    /// of one of them or of its `/dev` node (`<proc>/self/mountinfo`). An unreadable mount
    /// table is an error, never "not in use".
    fn held_or_mounted(&self, devices: &[BlockDevice]) -> Result<Option<String>, NodeError> {
        for d in devices {
            let holders = self
                .sysfs
                .join("class/block")
                .join(d.name())
                .join("holders");
            let held: Vec<String> = std::fs::read_dir(&holders)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !held.is_empty() {
                return Ok(Some(format!("{d} is held by {}", held.join(", "))));
            }
        }
        let table = self.proc.join("self/mountinfo");
        let text = std::fs::read_to_string(&table).map_err(|source| NodeError::Io {
            action: format!("reading {}", table.display()),
            source,
        })?;
        let mounts = super::mountinfo::parse(&text).map_err(|e| NodeError::Io {
            action: format!("parsing {}", table.display()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        for d in devices {
            // A filesystem on the device, or its /dev node bind-mounted somewhere (the Go node
            // plugin publishes a block volume so, and the kubelet binds that target again).
            let node = std::path::Path::new("/").join(d.name());
            if let Some(m) = mounts.iter().find(|m| {
                (m.major == d.major && m.minor == d.minor)
                    || (m.fs_type == "devtmpfs" && m.root == node)
            }) {
                return Ok(Some(format!(
                    "{d} is mounted at {}",
                    m.mount_point.display()
                )));
            }
        }
        Ok(None)
    }

    /// A process holding one of `devices` open (`<proc>/<pid>/fd/*` naming `/dev/<dev>`).
    fn open_in(&self, devices: &[BlockDevice]) -> Result<Option<String>, NodeError> {
        let procs = std::fs::read_dir(&self.proc).map_err(|source| NodeError::Io {
            action: format!("listing {}", self.proc.display()),
            source,
        })?;
        for p in procs.flatten() {
            let pid = p.file_name().to_string_lossy().into_owned();
            if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            // A process that exits meanwhile, or one we may not look into, holds nothing we
            // could wait for.
            let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
                continue;
            };
            for fd in fds.flatten() {
                let Ok(target) = std::fs::read_link(fd.path()) else {
                    continue;
                };
                if let Some(d) = devices.iter().find(|d| target == d.path.as_path()) {
                    return Ok(Some(format!("{d} is open in process {pid}")));
                }
            }
        }
        Ok(None)
    }

    /// The size of `device` in bytes, from its sysfs `size` (in 512-byte sectors).
    fn size(&self, device: &BlockDevice) -> Result<u64, NodeError> {
        let sectors = std::fs::read_to_string(
            self.sysfs
                .join("class/block")
                .join(device.name())
                .join("size"),
        )
        .map_err(|source| NodeError::Io {
            action: format!("reading the size of {device}"),
            source,
        })?;
        Ok(sectors
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
            .saturating_mul(512))
    }
}

impl<R: CommandRunner> NvmeDevices<R> {
    pub fn new(runner: R, sysfs: impl Into<PathBuf>, prefix: NqnPrefix) -> Self {
        Self {
            runner,
            kernel: Kernel {
                sysfs: sysfs.into(),
                proc: PathBuf::from("/proc"),
            },
            pool: work::pool(),
            prefix,
            device_wait: DEVICE_WAIT,
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Counts connects (`rds_csi_nvme_connects_total`, `..._connect_duration_seconds`) and
    /// orphans cleaned (`rds_csi_orphans_cleaned_total`) in `metrics`; without it they go to
    /// a registry nobody serves.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn with_device_wait(mut self, wait: Duration) -> Self {
        self.device_wait = wait;
        self
    }

    /// Reads open file descriptors and the mount table under `proc` instead of `/proc`.
    pub fn with_proc(mut self, proc: impl Into<PathBuf>) -> Self {
        self.kernel.proc = proc.into();
        self
    }

    /// Runs the sysfs and `/proc` reads on `pool` instead of the process's
    /// ([`work::pool`]).
    pub fn with_pool(mut self, pool: &'static Pool) -> Self {
        self.pool = pool;
        self
    }

    /// The NQN prefix this source manages.
    pub fn prefix(&self) -> &NqnPrefix {
        &self.prefix
    }

    /// Runs `read` on the kernel's view in one job on the pool, labelled `what`.
    async fn read<T: Send + 'static>(
        &self,
        what: String,
        read: impl FnOnce(&Kernel) -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, NodeError> {
        let kernel = self.kernel.clone();
        self.pool.run(what, move || read(&kernel)).await
    }

    /// Every NVMe controller sysfs lists.
    pub async fn controllers(&self) -> Result<Vec<Controller>, NodeError> {
        self.read("listing NVMe controllers in sysfs".into(), |k| {
            Ok(k.controllers())
        })
        .await
    }

    /// The controllers of exactly `nqn`, in any state.
    pub async fn controllers_of(&self, nqn: &Nqn) -> Result<Vec<Controller>, NodeError> {
        let n = nqn.clone();
        self.read(
            format!("listing the NVMe controllers of {nqn} in sysfs"),
            move |k| Ok(k.controllers_of(&n)),
        )
        .await
    }

    /// The namespace device of `nqn`: through a `live` controller if `live`, else through any
    /// controller not being deleted (a reconnecting controller's namespace is still the
    /// volume's device: with native multipath the head keeps its number while paths come and
    /// go).
    async fn resolve(&self, nqn: &Nqn, live: bool) -> Result<Option<BlockDevice>, NodeError> {
        let n = nqn.clone();
        self.read(
            format!("finding the namespace device of {nqn} in sysfs"),
            move |k| k.resolve(&n, live),
        )
        .await
    }

    fn target<'a>(&self, backing: &'a Backing) -> Result<&'a NvmeTarget, NodeError> {
        match backing {
            Backing::Nvme(t) => Ok(t),
            other => Err(NodeError::FailedPrecondition(format!(
                "{other} is not an NVMe/TCP volume; this node serves the RDS backend"
            ))),
        }
    }

    fn guard(&self, nqn: &Nqn) -> Result<(), NodeError> {
        if self.prefix.owns(nqn) {
            Ok(())
        } else {
            Err(NodeError::FailedPrecondition(format!(
                "NQN {nqn} is not under --rds-nqn-prefix {}; this node never connects or \
                 disconnects a subsystem it does not manage",
                self.prefix
            )))
        }
    }

    /// Why `nqn`'s devices are in use, if they are: a holder stacked on a namespace
    /// (`/sys/class/block/<dev>/holders/*`), a mount of it or of its `/dev` node
    /// (`<proc>/self/mountinfo`), or a process holding it open (`<proc>/<pid>/fd/*` naming
    /// `/dev/<dev>`). An unreadable mount table is an error, never "not in use". Three jobs on
    /// the pool: the namespaces, their holders and the mount table, then the scan of every
    /// process's descriptors (the longest: thousands of links on a busy node).
    pub async fn in_use(&self, nqn: &Nqn) -> Result<Option<String>, NodeError> {
        let n = nqn.clone();
        let devices = self
            .read(
                format!("finding the namespaces of {nqn} in sysfs"),
                move |k| k.devices_of(&n),
            )
            .await?;
        if devices.is_empty() {
            return Ok(None);
        }
        let names = devices
            .iter()
            .map(|d| d.path.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let (ds, proc) = (devices.clone(), self.kernel.proc.display().to_string());
        if let Some(why) = self
            .read(
                format!("reading the holders and mounts of {names} ({proc}/self/mountinfo)"),
                move |k| k.held_or_mounted(&ds),
            )
            .await?
        {
            return Ok(Some(why));
        }
        self.open_in(devices, names).await
    }

    /// A process holding one of `devices` open, scanned on the pool.
    async fn open_in(
        &self,
        devices: Vec<BlockDevice>,
        names: String,
    ) -> Result<Option<String>, NodeError> {
        let proc = self.kernel.proc.display().to_string();
        self.read(format!("scanning {proc}/*/fd for {names}"), move |k| {
            k.open_in(&devices)
        })
        .await
    }

    /// Disconnects every controller of exactly `nqn` (`nvme disconnect -n` matches the whole
    /// NQN), only if it is under the prefix and nothing uses its devices ([`Self::in_use`]):
    /// else FAILED_PRECONDITION and nothing is run.
    pub async fn disconnect(&self, nqn: &Nqn) -> Result<(), NodeError> {
        self.guard(nqn)?;
        if let Some(why) = self.in_use(nqn).await? {
            return Err(NodeError::FailedPrecondition(format!(
                "not disconnecting {nqn}: {why}"
            )));
        }
        let cmd = Cmd::new("nvme")
            .arg("disconnect")
            .arg("-n")
            .arg(nqn.clone());
        let out = self.runner.run(&cmd).await?;
        if !out.success() && !self.controllers_of(nqn).await?.is_empty() {
            return Err(NodeError::Tool {
                command: cmd.to_string(),
                code: out.code,
                message: out.message(),
            });
        }
        tracing::info!(nqn = %nqn, "disconnected NVMe/TCP subsystem");
        Ok(())
    }

    async fn connect(&self, t: &NvmeTarget) -> Result<(), NodeError> {
        let address = t.address.ok_or_else(|| {
            NodeError::invalid(
                "volume_context",
                format!("names no nvmeAddress (or rdsAddress) for {}", t.nqn),
            )
        })?;
        let mut cmd = Cmd::new("nvme")
            .arg("connect")
            .arg("-t")
            .arg("tcp")
            .arg("-a")
            .arg(addr(address))
            .arg("-s")
            .arg(num(t.port))
            .arg("-n")
            .arg(t.nqn.clone());
        if t.ctrl_loss_tmo != 0 {
            cmd = cmd.arg("-l").arg(num(t.ctrl_loss_tmo));
        }
        if t.reconnect_delay > 0 {
            cmd = cmd.arg("-c").arg(num(t.reconnect_delay));
        }
        if t.keep_alive_tmo > 0 {
            cmd = cmd.arg("-k").arg(num(t.keep_alive_tmo));
        }
        let cmd = cmd.timeout(LONG_TIMEOUT.min(Duration::from_secs(60)));
        tracing::info!(nqn = %t.nqn, address = %address, port = t.port, "connecting NVMe/TCP");
        let out = self.runner.run(&cmd).await?;
        if !out.success() && !out.message().contains("already connected") {
            return Err(NodeError::Tool {
                command: cmd.to_string(),
                code: out.code,
                message: out.message(),
            });
        }
        Ok(())
    }

    /// Asks each live controller of `nqn` to rescan its namespaces. A failure is logged: the
    /// wait goes on and decides.
    async fn rescan(&self, nqn: &Nqn) {
        let controllers = match self.controllers_of(nqn).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(nqn = %nqn, error = %e, "cannot list controllers to rescan");
                return;
            }
        };
        for c in controllers {
            if c.state != LIVE {
                continue;
            }
            let Ok(ctrl) = AbsPath::try_from(PathBuf::from(format!("/dev/{}", c.name))) else {
                continue;
            };
            let cmd = Cmd::new("nvme").arg("ns-rescan").arg(ctrl);
            match self.runner.run(&cmd).await {
                Ok(out) if out.success() => {}
                Ok(out) => {
                    tracing::warn!(nqn = %nqn, command = %cmd, message = %out.message(), "namespace rescan failed")
                }
                Err(e) => {
                    tracing::warn!(nqn = %nqn, command = %cmd, error = %e, "namespace rescan failed")
                }
            }
        }
    }

    /// Polls sysfs until the namespace appears behind a live controller (a reconnect may
    /// renumber the controller: each poll resolves afresh), for at most the device wait,
    /// rescanning namespaces every [`RESCAN_EVERY`] and showing progress every few seconds.
    async fn wait_for_device(&self, nqn: &Nqn) -> Result<Option<BlockDevice>, NodeError> {
        let started = tokio::time::Instant::now();
        let mut next_note = started + Duration::from_secs(5);
        let mut next_rescan = started;
        loop {
            if let Some(dev) = self.resolve(nqn, true).await? {
                return Ok(Some(dev));
            }
            let now = tokio::time::Instant::now();
            if now.duration_since(started) >= self.device_wait {
                return Ok(None);
            }
            if now >= next_rescan {
                self.rescan(nqn).await;
                next_rescan = now + RESCAN_EVERY;
            }
            if now >= next_note {
                tracing::info!(nqn = %nqn, waited_s = now.duration_since(started).as_secs(), "waiting for the NVMe namespace to appear");
                next_note = now + Duration::from_secs(5);
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[async_trait]
impl<R: CommandRunner> DeviceSource for NvmeDevices<R> {
    fn kind(&self) -> &'static str {
        "rds"
    }

    fn locate(
        &self,
        volume: &VolumeId,
        publish_context: &HashMap<String, String>,
        volume_context: &HashMap<String, String>,
    ) -> Result<Backing, NodeError> {
        if let Some(backend) = publish_context.get(PUBLISH_BACKEND_KEY) {
            if backend != self.kind() {
                return Err(NodeError::invalid(
                    "publish_context",
                    format!("names backend {backend:?}, but this node serves the \"rds\" backend"),
                ));
            }
        }
        let target =
            NvmeTarget::from_context(volume_context, || self.prefix.nqn(&Slot::of(volume)?))?;
        self.guard(&target.nqn)
            .map_err(|e| NodeError::invalid("volume_context", e.to_string()))?;
        Ok(Backing::Nvme(target))
    }

    /// The node cannot see the RDS's disks; whether the volume exists shows when it connects.
    async fn exists(&self, _: &Backing) -> Result<bool, NodeError> {
        Ok(true)
    }

    async fn find(&self, backing: &Backing) -> Result<Option<BlockDevice>, NodeError> {
        self.resolve(&self.target(backing)?.nqn, false).await
    }

    async fn attach(&self, backing: &Backing) -> Result<BlockDevice, NodeError> {
        let t = self.target(backing)?;
        self.guard(&t.nqn)?;
        if let Some(dev) = self.resolve(&t.nqn, true).await? {
            tracing::debug!(nqn = %t.nqn, device = %dev, "already connected");
            return Ok(dev);
        }
        let present: Vec<Controller> = self
            .controllers_of(&t.nqn)
            .await?
            .into_iter()
            .filter(|c| !going(&c.state))
            .collect();
        if let Some(c) = present.iter().find(|c| c.state != LIVE) {
            // The kernel is reconnecting it (until ctrl_loss_tmo): a connect would be refused
            // and a disconnect would end the kernel's own recovery. Wait for it, boundedly.
            tracing::info!(nqn = %t.nqn, controller = %c.name, state = %c.state, "waiting for the kernel to reconnect the controller");
            if let Some(dev) = self.wait_for_device(&t.nqn).await? {
                return Ok(dev);
            }
            return Err(NodeError::FailedPrecondition(format!(
                "controller {} of {} is still {} after {}s; the kernel keeps reconnecting it",
                c.name,
                t.nqn,
                c.state,
                self.device_wait.as_secs()
            )));
        }
        if !present.is_empty() {
            // Connected, but no namespace device: reconnect rather than wait on a dead path.
            tracing::warn!(nqn = %t.nqn, "subsystem connected without a namespace device; reconnecting");
            self.disconnect(&t.nqn).await?;
            self.metrics.node.orphans_cleaned_total.inc();
        }
        let started = tokio::time::Instant::now();
        let connected = match self.connect(t).await {
            Ok(()) => self.wait_for_device(&t.nqn).await,
            Err(e) => Err(e),
        };
        let node = &self.metrics.node;
        node.nvme_connects_total
            .with_label_values(&[outcome(matches!(connected, Ok(Some(_))))])
            .inc();
        if let Ok(Some(_)) = connected {
            node.nvme_connect_duration
                .observe(started.elapsed().as_secs_f64());
        }
        match connected? {
            Some(dev) => {
                tracing::info!(nqn = %t.nqn, device = %dev, "NVMe/TCP namespace attached");
                Ok(dev)
            }
            None => {
                if let Err(e) = self.disconnect(&t.nqn).await {
                    tracing::warn!(nqn = %t.nqn, error = %e, "could not disconnect after no namespace appeared");
                }
                Err(NodeError::FailedPrecondition(format!(
                    "connected to {} but no namespace appeared within {}s; disconnected again",
                    t.nqn,
                    self.device_wait.as_secs()
                )))
            }
        }
    }

    async fn detach(&self, backing: &Backing) -> Result<(), NodeError> {
        let t = self.target(backing)?;
        self.guard(&t.nqn)?;
        if self.controllers_of(&t.nqn).await?.is_empty() {
            return Ok(());
        }
        self.disconnect(&t.nqn).await
    }

    async fn refresh_size(
        &self,
        backing: &Backing,
        device: &BlockDevice,
    ) -> Result<u64, NodeError> {
        let t = self.target(backing)?;
        for c in self.controllers_of(&t.nqn).await? {
            let ctrl = AbsPath::try_from(PathBuf::from(format!("/dev/{}", c.name)))
                .map_err(|reason| NodeError::invalid("controller", reason))?;
            let cmd = Cmd::new("nvme").arg("ns-rescan").arg(ctrl);
            let out = self.runner.run(&cmd).await?;
            if !out.success() {
                return Err(NodeError::Tool {
                    command: cmd.to_string(),
                    code: out.code,
                    message: out.message(),
                });
            }
        }
        let dev = device.clone();
        self.read(format!("reading the size of {device} in sysfs"), move |k| {
            k.size(&dev)
        })
        .await
    }

    async fn healthy(&self, backing: &Backing, device: &BlockDevice) -> Result<bool, NodeError> {
        let t = self.target(backing)?;
        Ok(self
            .controllers_of(&t.nqn)
            .await?
            .iter()
            .any(|c| c.state == LIVE && c.namespaces.iter().any(|n| *n == device.name())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::command::Output;
    use crate::node::fakes::RecordingRunner;

    use crate::node::fake_sysfs::{FakeProc, FakeSysfs};

    /// Controller `nvme{ctrl}` of `nqn` in the kernel's layout, with the namespace `entry`
    /// names: `nvmeScCnN` is a hidden multipath path (subsystem `S`, head `nvmeSnN` with
    /// device `dev`), `nvmeCnN` a namespace without multipath, which the kernel names after
    /// the controller. Without a multipath entry the subsystem is `nvme-subsys{ctrl + 10}`,
    /// founded by a controller since gone: no fixture has a subsystem numbered as its
    /// controller unless it says so.
    fn controller(fs: &FakeSysfs, ctrl: u32, nqn: &str, ns: Option<(&str, &str)>) {
        let digits = |s: &str| s.parse::<u32>().unwrap();
        match ns {
            None => fs.connect(ctrl, ctrl + 10, nqn),
            Some((entry, dev)) => {
                let rest = entry.strip_prefix("nvme").unwrap();
                let (minor_major, minor) = dev.split_once(':').unwrap();
                let path = format!("{minor_major}:{}", digits(minor) + 1000);
                match rest.split_once('c') {
                    Some((subsys, tail)) => {
                        let (c, nsid) = tail.split_once('n').unwrap();
                        assert_eq!(digits(c), ctrl);
                        fs.connect(ctrl, digits(subsys), nqn);
                        fs.multipath_namespace(ctrl, digits(nsid), dev, &path);
                    }
                    None => {
                        let (c, nsid) = rest.split_once('n').unwrap();
                        assert_eq!(digits(c), ctrl);
                        fs.connect(ctrl, ctrl + 10, nqn);
                        fs.plain_namespace(ctrl, digits(nsid), dev);
                    }
                }
            }
        }
    }

    const NQN: &str = "nqn.2000-02.com.mikrotik:pvc-0f923194-922a-5dd8-b376-c2c6ccb56dd8";

    fn ctx() -> HashMap<String, String> {
        HashMap::from([
            ("nqn".to_string(), NQN.to_string()),
            ("nvmeAddress".to_string(), "10.42.68.1".to_string()),
            ("nvmePort".to_string(), "4420".to_string()),
            ("ctrlLossTmo".to_string(), "-1".to_string()),
            ("reconnectDelay".to_string(), "5".to_string()),
            ("keepAliveTmo".to_string(), "0".to_string()),
            (
                "volumePath".to_string(),
                "/storage-pool/metal-csi/x.img".to_string(),
            ),
            ("rdsAddress".to_string(), "10.42.241.3".to_string()),
        ])
    }

    fn vol() -> VolumeId {
        VolumeId::try_from("pvc-0f923194-922a-5dd8-b376-c2c6ccb56dd8").unwrap()
    }

    fn ok() -> Result<Output, crate::node::command::CommandError> {
        Ok(Output {
            code: Some(0),
            ..Output::default()
        })
    }

    #[test]
    fn namespace_names() {
        assert_eq!(namespace_device("nvme3c3n1").as_deref(), Some("nvme3n1"));
        assert_eq!(namespace_device("nvme0n12").as_deref(), Some("nvme0n12"));
        for not in [
            "nvme3",
            "nvme3c3",
            "nvmeXn1",
            "nvme3n",
            "power",
            "subsysnqn",
            "nvme3c3n1p1",
        ] {
            assert_eq!(namespace_device(not), None, "{not}");
        }
    }

    #[tokio::test]
    async fn stage_connects_with_the_go_drivers_argument_vector_and_finds_the_device_by_nqn() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().to_path_buf();
        let fs = FakeSysfs::new(&sys);
        controller(
            &fs,
            0,
            "nqn.2014-08.org.nvmexpress:uuid:host-root",
            Some(("nvme0c0n1", "259:0")),
        );
        let runner = RecordingRunner::default();
        let fs2 = fs.clone();
        runner.on("nvme connect", move |_| {
            // The kernel numbers the new controller 4 in subsystem 6; the namespace shows as
            // a hidden path named after both.
            controller(&fs2, 4, NQN, Some(("nvme6c4n1", "259:7")));
            ok()
        });
        let nvme = NvmeDevices::new(runner.clone(), &sys, NqnPrefix::default());
        let backing = nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        let dev = nvme.attach(&backing).await.unwrap();
        assert_eq!(
            (dev.path.to_string(), dev.major, dev.minor),
            ("/dev/nvme6n1".into(), 259, 7)
        );
        assert_eq!(
            runner.calls(),
            vec![format!(
                "nvme connect -t tcp -a 10.42.68.1 -s 4420 -n {NQN} -l -1 -c 5"
            )]
        );
        // A repeated stage is a no-op: found in sysfs, nothing run.
        nvme.attach(&backing).await.unwrap();
        assert_eq!(runner.calls().len(), 1);
    }

    #[tokio::test]
    async fn a_renumbered_controller_is_resolved_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().to_path_buf();
        let fs = FakeSysfs::new(&sys);
        controller(&fs, 2, NQN, Some(("nvme2c2n1", "259:3")));
        let nvme = NvmeDevices::new(RecordingRunner::default(), &sys, NqnPrefix::default());
        let backing = nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        assert_eq!(
            nvme.find(&backing).await.unwrap().unwrap().name(),
            "nvme2n1"
        );
        fs.delete_controller(2);
        controller(&fs, 5, NQN, Some(("nvme7c5n1", "259:9")));
        let dev = nvme.find(&backing).await.unwrap().unwrap();
        assert_eq!((dev.name(), dev.minor), ("nvme7n1".to_string(), 9));
    }

    /// A subsystem of ours connected without a namespace device is an orphaned connection: it
    /// is disconnected and connected again; the disconnect counts in
    /// `rds_csi_orphans_cleaned_total`, the reconnect as a connect.
    #[tokio::test]
    async fn an_orphaned_subsystem_is_reconnected_and_counted_as_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().to_path_buf();
        let fs = FakeSysfs::new(&sys);
        controller(&fs, 1, NQN, None);
        let runner = RecordingRunner::default();
        let fs2 = fs.clone();
        runner.on("nvme disconnect", move |_| {
            fs2.delete_controller(1);
            ok()
        });
        let fs3 = fs.clone();
        runner.on("nvme connect", move |_| {
            controller(&fs3, 1, NQN, Some(("nvme3c1n1", "259:1")));
            ok()
        });
        let metrics = Arc::new(Metrics::new());
        let nvme = NvmeDevices::new(runner.clone(), &sys, NqnPrefix::default())
            .with_metrics(metrics.clone());
        let backing = nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        assert_eq!(nvme.attach(&backing).await.unwrap().name(), "nvme3n1");
        assert_eq!(scraped(&metrics, "rds_csi_orphans_cleaned_total"), 1.0);
        assert_eq!(scraped(&metrics, CONNECTS_OK), 1.0);
        let calls = runner.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0], format!("nvme disconnect -n {NQN}"));
        assert!(calls[1].starts_with("nvme connect "));
    }

    #[tokio::test]
    async fn a_foreign_nqn_is_never_connected_or_disconnected() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().to_path_buf();
        let fs = FakeSysfs::new(&sys);
        let foreign = "nqn.2014-08.org.nvmexpress:uuid:host-root";
        controller(&fs, 0, foreign, Some(("nvme0n1", "259:0")));
        let runner = RecordingRunner::default();
        let nvme = NvmeDevices::new(runner.clone(), &sys, NqnPrefix::default());
        let mut c = ctx();
        c.insert("nqn".into(), foreign.into());
        let err = nvme.locate(&vol(), &HashMap::new(), &c).unwrap_err();
        assert!(matches!(err, NodeError::InvalidArgument { .. }), "{err}");
        let backing = Backing::Nvme(NvmeTarget::from_context(&c, || unreachable!()).unwrap());
        assert!(matches!(
            nvme.detach(&backing).await,
            Err(NodeError::FailedPrecondition(_))
        ));
        assert!(matches!(
            nvme.attach(&backing).await,
            Err(NodeError::FailedPrecondition(_))
        ));
        assert!(
            runner.calls().is_empty(),
            "nothing was run: {:?}",
            runner.calls()
        );
        assert!(sys.join("class/nvme/nvme0").exists());
    }

    #[tokio::test]
    async fn unstage_disconnects_only_what_is_connected() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().to_path_buf();
        let fs = FakeSysfs::new(&sys);
        let runner = RecordingRunner::default();
        let nvme = NvmeDevices::new(runner.clone(), &sys, NqnPrefix::default());
        // After a restart the node knows only the volume id: the NQN is derived from it.
        let backing = nvme
            .locate(&vol(), &HashMap::new(), &HashMap::new())
            .unwrap();
        nvme.detach(&backing).await.unwrap();
        assert!(runner.calls().is_empty());
        controller(&fs, 3, NQN, Some(("nvme3n1", "259:4")));
        let fs2 = fs.clone();
        runner.on("nvme disconnect", move |_| {
            fs2.delete_controller(3);
            ok()
        });
        nvme.detach(&backing).await.unwrap();
        assert_eq!(runner.calls(), vec![format!("nvme disconnect -n {NQN}")]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_namespace_that_never_appears_is_an_error_and_is_disconnected() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().to_path_buf();
        let fs = FakeSysfs::new(&sys);
        let runner = RecordingRunner::default();
        let fs2 = fs.clone();
        runner.on("nvme connect", move |_| {
            controller(&fs2, 6, NQN, None);
            ok()
        });
        runner.ok("nvme ns-rescan /dev/nvme6");
        runner.disconnects_in(&fs);
        let nvme = NvmeDevices::new(runner.clone(), &sys, NqnPrefix::default());
        let backing = nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        let err = nvme.attach(&backing).await.unwrap_err();
        assert!(
            matches!(&err, NodeError::FailedPrecondition(m) if m.contains("no namespace appeared")),
            "{err}"
        );
        assert_eq!(
            runner.calls().last().unwrap(),
            &format!("nvme disconnect -n {NQN}")
        );
    }

    /// The value of one series in `metrics`' scrape text.
    fn scraped(metrics: &Metrics, series: &str) -> f64 {
        let text = metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
            .parse()
            .unwrap()
    }

    const CONNECTS_OK: &str = r#"rds_csi_nvme_connects_total{status="success"}"#;
    const CONNECTS_FAILED: &str = r#"rds_csi_nvme_connects_total{status="failure"}"#;
    const CONNECT_TIMED: &str = "rds_csi_nvme_connect_duration_seconds_count";

    /// A connect whose namespace appears counts one success and is timed; a stage that finds
    /// the namespace already there runs no connect and counts none. Catches the
    /// `nvme_connects_total` and `nvme_connect_duration` lines in `attach`.
    #[tokio::test]
    async fn a_connect_is_counted_and_timed_once_and_an_existing_one_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().to_path_buf();
        let fs = FakeSysfs::new(&sys);
        let runner = RecordingRunner::default();
        let fs2 = fs.clone();
        runner.on("nvme connect", move |_| {
            controller(&fs2, 4, NQN, Some(("nvme6c4n1", "259:7")));
            ok()
        });
        let metrics = Arc::new(Metrics::new());
        let nvme = NvmeDevices::new(runner.clone(), &sys, NqnPrefix::default())
            .with_metrics(metrics.clone());
        let backing = nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        nvme.attach(&backing).await.unwrap();
        nvme.attach(&backing).await.unwrap();
        assert_eq!(runner.calls().len(), 1, "{:?}", runner.calls());
        assert_eq!(scraped(&metrics, CONNECTS_OK), 1.0);
        assert_eq!(scraped(&metrics, CONNECTS_FAILED), 0.0);
        assert_eq!(scraped(&metrics, CONNECT_TIMED), 1.0);
        assert_eq!(scraped(&metrics, "rds_csi_orphans_cleaned_total"), 0.0);
    }

    /// A connect the tool refuses, and one whose namespace never appears, each count one
    /// failure and are not timed (the Go driver times successes only).
    #[tokio::test(start_paused = true)]
    async fn failed_connects_are_counted_as_failures_and_not_timed() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().to_path_buf();
        let fs = FakeSysfs::new(&sys);
        let runner = RecordingRunner::default();
        runner.on("nvme connect", |_| {
            Ok(Output {
                code: Some(1),
                stderr: "could not connect: Connection refused".into(),
                ..Output::default()
            })
        });
        let metrics = Arc::new(Metrics::new());
        let nvme = NvmeDevices::new(runner.clone(), &sys, NqnPrefix::default())
            .with_metrics(metrics.clone());
        let backing = nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        assert!(matches!(
            nvme.attach(&backing).await,
            Err(NodeError::Tool { .. })
        ));
        let fs2 = fs.clone();
        runner.on("nvme connect", move |_| {
            controller(&fs2, 6, NQN, None);
            ok()
        });
        runner.ok("nvme ns-rescan /dev/nvme6");
        runner.disconnects_in(&fs);
        assert!(matches!(
            nvme.attach(&backing).await,
            Err(NodeError::FailedPrecondition(_))
        ));
        assert_eq!(scraped(&metrics, CONNECTS_FAILED), 2.0);
        assert_eq!(scraped(&metrics, CONNECTS_OK), 0.0);
        assert_eq!(scraped(&metrics, CONNECT_TIMED), 0.0);
    }

    /// A fake sysfs and /proc under one temporary directory, and a source reading them.
    struct Host {
        _dir: tempfile::TempDir,
        sys: FakeSysfs,
        proc: FakeProc,
        runner: RecordingRunner,
        nvme: NvmeDevices<RecordingRunner>,
    }

    fn host() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let sys = FakeSysfs::new(&dir.path().join("sys"));
        let proc = FakeProc::new(&dir.path().join("proc"));
        let runner = RecordingRunner::default();
        let nvme = NvmeDevices::new(runner.clone(), sys.root(), NqnPrefix::default())
            .with_proc(proc.root());
        Host {
            _dir: dir,
            sys,
            proc,
            runner,
            nvme,
        }
    }

    /// Subsystem and controller are numbered apart (`nvme-subsys3` holds controller `nvme1`)
    /// and native multipath names the visible namespace after the subsystem (`nvme3n1`), the
    /// controller holding only the hidden path `nvme3c1n1` with a number of its own: the
    /// volume's device is the head, never `nvme1n1` and never the hidden path's number.
    #[tokio::test]
    async fn the_device_is_the_subsystems_head_not_the_controllers_hidden_path() {
        let h = host();
        h.sys.connect(1, 3, NQN);
        h.sys.multipath_namespace(1, 1, "259:7", "259:8");
        let backing = h.nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        let dev = h.nvme.find(&backing).await.unwrap().unwrap();
        assert_eq!(
            (dev.path.to_string(), dev.major, dev.minor),
            ("/dev/nvme3n1".into(), 259, 7)
        );
        assert!(h.nvme.healthy(&backing, &dev).await.unwrap());
        // Without multipath the namespace is the controller's own.
        h.sys.connect(4, 5, &format!("{NQN}x"));
        h.sys.plain_namespace(4, 1, "259:9");
        let other = Backing::Nvme(
            NvmeTarget::from_context(
                &HashMap::from([("nqn".to_string(), format!("{NQN}x"))]),
                || unreachable!(),
            )
            .unwrap(),
        );
        assert_eq!(
            h.nvme.find(&other).await.unwrap().unwrap().name(),
            "nvme4n1"
        );
    }

    /// A host as the kernel numbers it after some reconnects: the boot disk's subsystem
    /// `nvme-subsys0` with its founding controller `nvme0`; another volume's `nvme-subsys2`
    /// reached through `nvme5`; this volume's `nvme-subsys3` reached through `nvme1` and
    /// `nvme4` (two paths, one head). Each volume is its own subsystem's head (`nvme3n1`,
    /// `nvme2n1`), with the head's device number, never a hidden path's. Catches: building the
    /// block device name from the controller's number instead of the subsystem's
    /// (`nvme{ctrl}n{ns}` for the path `nvme{subsys}c{ctrl}n{ns}` in `namespace_device`).
    #[tokio::test]
    async fn each_volume_is_its_subsystems_head_on_a_host_of_several_subsystems() {
        let h = host();
        h.sys
            .connect(0, 0, "nqn.2014-08.org.nvmexpress:uuid:boot-disk");
        h.sys.multipath_namespace(0, 1, "259:0", "259:1");
        let other = format!("{NQN}x");
        h.sys.connect(5, 2, &other);
        h.sys.multipath_namespace(5, 1, "259:2", "259:3");
        h.sys.connect(1, 3, NQN);
        h.sys.multipath_namespace(1, 1, "259:4", "259:5");
        h.sys.connect(4, 3, NQN);
        h.sys.multipath_namespace(4, 1, "259:4", "259:6");

        let device = |d: Option<BlockDevice>| d.map(|d| (d.path.to_string(), d.major, d.minor));
        let ours = h.nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        assert_eq!(
            device(h.nvme.find(&ours).await.unwrap()),
            Some(("/dev/nvme3n1".to_string(), 259, 4)),
            "this volume's device"
        );
        let theirs = Backing::Nvme(
            NvmeTarget::from_context(
                &HashMap::from([("nqn".to_string(), other)]),
                || unreachable!(),
            )
            .unwrap(),
        );
        assert_eq!(
            device(h.nvme.find(&theirs).await.unwrap()),
            Some(("/dev/nvme2n1".to_string(), 259, 2)),
            "the other volume's device"
        );
        assert!(h.runner.calls().is_empty(), "{:?}", h.runner.calls());
    }

    /// A namespace the kernel shows only after a rescan: the wait after connect runs
    /// `nvme ns-rescan` on the new controller and finds it, instead of failing. Catches the
    /// `self.rescan(nqn)` call in `wait_for_device`.
    #[tokio::test(start_paused = true)]
    async fn a_late_namespace_is_found_after_ns_rescan() {
        let h = host();
        let sys = h.sys.clone();
        h.runner.on("nvme connect", move |_| {
            sys.connect(1, 3, NQN);
            ok()
        });
        let sys = h.sys.clone();
        h.runner.on("nvme ns-rescan /dev/nvme1", move |_| {
            sys.multipath_namespace(1, 1, "259:7", "259:8");
            ok()
        });
        let backing = h.nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        let dev = h.nvme.attach(&backing).await.unwrap();
        assert_eq!((dev.name(), dev.minor), ("nvme3n1".to_string(), 7));
        let calls = h.runner.calls();
        assert!(calls[0].starts_with("nvme connect "), "{calls:?}");
        assert_eq!(calls[1..], ["nvme ns-rescan /dev/nvme1".to_string()]);
    }

    /// A controller the kernel is reconnecting (`connecting`, `resetting`) is not live: its
    /// namespace is not healthy, and a stage neither returns its device at once nor connects
    /// or disconnects (which would end the kernel's own recovery); it waits, boundedly, and
    /// says why. Its device is still the volume's (`find`), so nothing calls it stale. Catches
    /// the `live` argument of `resolve` in `attach` and the wait for a reconnecting controller.
    #[tokio::test(start_paused = true)]
    async fn a_connecting_controller_is_not_treated_as_live() {
        for state in ["connecting", "resetting"] {
            let h = host();
            h.sys.connect(1, 3, NQN);
            h.sys.multipath_namespace(1, 1, "259:7", "259:8");
            h.sys.set_state(1, state);
            let backing = h.nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
            let dev = h.nvme.find(&backing).await.unwrap().unwrap();
            assert_eq!(dev.name(), "nvme3n1");
            assert!(!h.nvme.healthy(&backing, &dev).await.unwrap(), "{state}");
            let err = h.nvme.attach(&backing).await.unwrap_err();
            assert!(
                matches!(&err, NodeError::FailedPrecondition(m) if m.contains(state)),
                "{state}: {err}"
            );
            assert!(
                h.runner.calls().is_empty(),
                "{state}: {:?}",
                h.runner.calls()
            );
        }
    }

    /// A controller the kernel is `deleting` is as good as gone: its namespace is not the
    /// volume's device any more, and a stage connects anew (the kernel adds a controller to
    /// the same subsystem) rather than waiting on it. Catches `going` in `resolve` and
    /// `attach`.
    #[tokio::test]
    async fn a_deleting_controller_counts_as_gone() {
        let h = host();
        h.sys.connect(1, 3, NQN);
        h.sys.multipath_namespace(1, 1, "259:7", "259:8");
        h.sys.set_state(1, "deleting");
        let backing = h.nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        assert_eq!(h.nvme.find(&backing).await.unwrap(), None);
        let sys = h.sys.clone();
        h.runner.on("nvme connect", move |_| {
            sys.connect(5, 3, NQN);
            sys.multipath_namespace(5, 1, "259:7", "259:9");
            ok()
        });
        let dev = h.nvme.attach(&backing).await.unwrap();
        assert_eq!((dev.name(), dev.minor), ("nvme3n1".to_string(), 7));
        assert_eq!(h.runner.calls().len(), 1, "{:?}", h.runner.calls());
    }

    /// A controller deleted after `ctrl_loss_tmo` takes its namespace with it: no device, and
    /// an unstage has nothing to disconnect.
    #[tokio::test]
    async fn a_controller_deleted_after_ctrl_loss_tmo_leaves_no_device() {
        let h = host();
        h.sys.connect(1, 3, NQN);
        h.sys.multipath_namespace(1, 1, "259:7", "259:8");
        let backing = h.nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        assert!(h.nvme.find(&backing).await.unwrap().is_some());
        h.sys.delete_controller(1);
        assert_eq!(h.nvme.find(&backing).await.unwrap(), None);
        h.nvme.detach(&backing).await.unwrap();
        assert!(h.runner.calls().is_empty());
    }

    /// Before a disconnect the device must be unused: a holder stacked on it, a mount of it,
    /// its `/dev` node bind-mounted (a block volume the Go plugin published) or a process
    /// holding it open each refuse the disconnect (FAILED_PRECONDITION naming
    /// it) and nothing is run; with none of them it is disconnected. Catches the `in_use`
    /// check in `disconnect`, and each of its three probes.
    #[tokio::test]
    async fn a_disconnect_is_refused_while_the_device_is_held_mounted_or_open() {
        type Use = fn(&Host);
        let uses: [(&str, Use); 4] = [
            ("held by dm-0", |h| h.sys.add_holder("nvme3n1", "dm-0")),
            ("mounted at /mnt/x", |h| {
                std::fs::write(
                    h.proc.root().join("self/mountinfo"),
                    "30 1 259:7 / /mnt/x rw,nosuid,nodev - ext4 /dev/nvme3n1 rw\n",
                )
                .unwrap()
            }),
            ("mounted at /var/lib/kubelet/pods/p/dev", |h| {
                std::fs::write(
                    h.proc.root().join("self/mountinfo"),
                    "31 1 0:5 /nvme3n1 /var/lib/kubelet/pods/p/dev rw,nosuid - devtmpfs udev rw\n",
                )
                .unwrap()
            }),
            ("open in process 4242", |h| {
                h.proc.open_fd(4242, 9, "/dev/nvme3n1")
            }),
        ];
        for (why, make) in uses {
            let h = host();
            h.sys.connect(1, 3, NQN);
            h.sys.multipath_namespace(1, 1, "259:7", "259:8");
            // Unrelated use that must not count: another process with another device open.
            h.proc.open_fd(7, 3, "/dev/nvme30n1");
            make(&h);
            let backing = h.nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
            let err = h.nvme.detach(&backing).await.unwrap_err();
            assert!(
                matches!(&err, NodeError::FailedPrecondition(m) if m.contains(why)),
                "{why}: {err}"
            );
            assert!(h.runner.calls().is_empty(), "{why}: {:?}", h.runner.calls());
        }
        let h = host();
        h.sys.connect(1, 3, NQN);
        h.sys.multipath_namespace(1, 1, "259:7", "259:8");
        h.proc.open_fd(7, 3, "/dev/nvme30n1");
        let sys = h.sys.clone();
        h.runner.on("nvme disconnect", move |_| {
            sys.delete_controller(1);
            ok()
        });
        let backing = h.nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        h.nvme.detach(&backing).await.unwrap();
        assert_eq!(h.runner.calls(), vec![format!("nvme disconnect -n {NQN}")]);
    }

    /// A pool of one slot that a job holds until the test lets it go.
    struct HeldPool {
        pool: &'static Pool,
        holder: tokio::task::JoinHandle<Result<(), NodeError>>,
        release: std::sync::mpsc::Sender<()>,
        started: tokio::sync::oneshot::Receiver<()>,
    }

    fn held_pool() -> HeldPool {
        let gauge = prometheus::IntGauge::new("stuck", "test").unwrap();
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(1, Duration::from_secs(30), gauge)));
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let holder = tokio::spawn(pool.run("holding the only slot", move || {
            started_tx.send(()).unwrap();
            wait.recv().unwrap();
            Ok(())
        }));
        HeldPool {
            pool,
            holder,
            release,
            started,
        }
    }

    /// The scan of every process's open descriptors (`/proc/*/fd`) runs as a job on the
    /// pool, labelled with what it looks for: with the pool's only slot taken, the scan does
    /// not answer at once (it would, run on the async worker) but waits, and is BUSY naming
    /// "scanning <proc>/*/fd for /dev/nvme3n1" when no slot frees; once the slot frees it
    /// finds the process. Catches the `self.read(..)` around `k.open_in` in
    /// `NvmeDevices::open_in`.
    #[tokio::test(start_paused = true)]
    async fn the_scan_of_open_descriptors_runs_on_the_blocking_pool() {
        let h = host();
        h.sys.connect(1, 3, NQN);
        h.sys.multipath_namespace(1, 1, "259:7", "259:8");
        h.proc.open_fd(4242, 9, "/dev/nvme3n1");
        let HeldPool {
            pool,
            holder,
            release,
            started,
        } = held_pool();
        let nvme = NvmeDevices::new(h.runner.clone(), h.sys.root(), NqnPrefix::default())
            .with_proc(h.proc.root())
            .with_pool(pool);
        let dev = nvme.kernel.block_device("nvme3n1").unwrap();
        started.await.unwrap();

        let scan = nvme.open_in(vec![dev.clone()], dev.path.to_string());
        tokio::pin!(scan);
        assert!(
            futures::poll!(&mut scan).is_pending(),
            "the /proc scan answered without a pool slot: it ran on the async worker"
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        let label = format!("scanning {}/*/fd for /dev/nvme3n1", h.proc.root().display());
        match scan.await {
            Err(NodeError::Busy(m)) => assert!(m.starts_with(&label), "{m}"),
            other => panic!("{other:?}"),
        }

        assert!(matches!(holder.await.unwrap(), Err(NodeError::Stuck(_))));
        release.send(()).unwrap();
        assert_eq!(
            nvme.open_in(vec![dev], "/dev/nvme3n1".into())
                .await
                .unwrap(),
            Some("/dev/nvme3n1 (259:7) is open in process 4242".to_string())
        );
    }

    /// Every sysfs read of a disconnect waits for the pool: with its only slot taken, a
    /// detach runs no command and is BUSY naming the first read ("listing the NVMe
    /// controllers of <nqn> in sysfs"), never reading sysfs on the async worker. Catches a
    /// `controllers_of`/`resolve` that reads `Kernel` directly.
    #[tokio::test(start_paused = true)]
    async fn a_detach_reads_sysfs_on_the_blocking_pool() {
        let h = host();
        h.sys.connect(1, 3, NQN);
        h.sys.multipath_namespace(1, 1, "259:7", "259:8");
        let HeldPool {
            pool,
            holder,
            release,
            started,
        } = held_pool();
        let nvme = NvmeDevices::new(h.runner.clone(), h.sys.root(), NqnPrefix::default())
            .with_proc(h.proc.root())
            .with_pool(pool);
        let backing = nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        started.await.unwrap();
        let detach = nvme.detach(&backing);
        tokio::pin!(detach);
        assert!(futures::poll!(&mut detach).is_pending());
        tokio::time::advance(Duration::from_secs(31)).await;
        match detach.await {
            Err(NodeError::Busy(m)) => assert!(
                m.starts_with(&format!("listing the NVMe controllers of {NQN} in sysfs")),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(h.runner.calls().is_empty(), "{:?}", h.runner.calls());
        assert!(matches!(holder.await.unwrap(), Err(NodeError::Stuck(_))));
        release.send(()).unwrap();
    }

    /// The RDS node plugin does not start without a host NQN: a missing, empty or malformed
    /// `/etc/nvme/hostnqn` is FAILED_PRECONDITION saying how to make one; a real one is read
    /// (trimmed). `main` calls this before building the RDS node plugin.
    #[test]
    fn the_rds_node_plugin_refuses_to_start_without_a_host_nqn() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hostnqn");
        let refused = |file: &std::path::Path| match read_host_nqn(file) {
            Err(NodeError::FailedPrecondition(m)) => assert!(m.contains("nvme gen-hostnqn"), "{m}"),
            other => panic!("{other:?}"),
        };
        refused(&file);
        for bad in [
            "",
            "\n",
            "not-an-nqn\n",
            "nqn.2014-08.org.nvmexpress:uuid:a b\n",
        ] {
            std::fs::write(&file, bad).unwrap();
            refused(&file);
        }
        let good = "nqn.2014-08.org.nvmexpress:uuid:4c4c4544-0042-4b10-8050-b4c04f4b4b32";
        std::fs::write(&file, format!("{good}\n")).unwrap();
        assert_eq!(read_host_nqn(&file).unwrap().as_str(), good);
    }

    #[test]
    fn context_values_are_validated_before_any_command() {
        let dir = tempfile::tempdir().unwrap();
        let nvme = NvmeDevices::new(RecordingRunner::default(), dir.path(), NqnPrefix::default());
        for (key, bad) in [
            ("nvmeAddress", "10.0.0.1; reboot"),
            ("nvmeAddress", "rds.example"),
            ("nvmePort", "99999"),
            ("nqn", "nqn.2000-02.com.mikrotik:PVC\n"),
            ("ctrlLossTmo", "-2"),
            ("reconnectDelay", "0"),
            ("keepAliveTmo", "x"),
        ] {
            let mut c = ctx();
            c.insert(key.into(), bad.into());
            let err = nvme.locate(&vol(), &HashMap::new(), &c).unwrap_err();
            assert!(
                matches!(err, NodeError::InvalidArgument { .. }),
                "{key}={bad:?}: {err}"
            );
        }
    }

    /// The controller's publish_context carries keys the node does not use (the attach
    /// instant, the Go driver's nvme_* keys, readonly): they change nothing about the target.
    #[test]
    fn publish_context_keys_the_node_does_not_use_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let nvme = NvmeDevices::new(RecordingRunner::default(), dir.path(), NqnPrefix::default());
        let bare = nvme.locate(&vol(), &HashMap::new(), &ctx()).unwrap();
        let publish_context = HashMap::from(
            [
                (PUBLISH_BACKEND_KEY, "rds"),
                (
                    crate::domain::PUBLISH_ATTACHED_AT_KEY,
                    "2026-01-02T03:04:05.123456789Z",
                ),
                ("nvme_address", "10.42.68.1"),
                ("readonly", "true"),
                ("somethingElse", "ignored"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let located = nvme.locate(&vol(), &publish_context, &ctx()).unwrap();
        assert_eq!(located, bare);
    }
}
