//! The kube-rs side of the cluster traits: connecting, the PV, Node and VolumeAttachment
//! projections kept by watchers, the boot list of VolumeAttachments, the live lookups seeding
//! needs (PVs the projection misses, the API server's clock), the live checks of Publish 5.1
//! and 5.2, and the bounded live reads a standby decides DeleteVolume from.
//!
//! Caches hold only the projection the driver uses (never whole objects). Nothing here changes
//! attachment state; it only answers questions.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch, Semaphore};

use super::lean;
use super::seed::{NodeNames, PvView, VaView};
use super::{
    AttachmentAuthority, HolderStatus, KubeError, NodeDirectory, NodeLiveness, PublishedNodes,
    PvCatalog,
};
use crate::domain::AccessClass;
use crate::ids::{NodeId, VolumeId};

/// Objects per list page: a 100k-object list arrives in bounded pieces.
pub const PAGE_SIZE: u32 = 500;

/// `--kubernetes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KubernetesMode {
    Auto,
    On,
    Off,
}

/// Where Kubernetes mounts a pod's service-account token: its presence says this process runs
/// in a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What says this process runs inside a Kubernetes cluster, whether or not a config loads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InClusterSigns {
    /// `KUBERNETES_SERVICE_HOST`, which the kubelet sets in every pod, when set and not empty.
    pub service_host: Option<String>,
    /// The service-account directory, when it exists.
    pub service_account_dir: Option<PathBuf>,
}

impl InClusterSigns {
    /// Reads `KUBERNETES_SERVICE_HOST` and looks for `service_account_dir` (normally
    /// [`SERVICE_ACCOUNT_DIR`]).
    pub fn detect(service_account_dir: &Path) -> Self {
        Self {
            service_host: std::env::var("KUBERNETES_SERVICE_HOST")
                .ok()
                .filter(|h| !h.is_empty()),
            service_account_dir: service_account_dir
                .exists()
                .then(|| service_account_dir.to_path_buf()),
        }
    }

    /// The signs found, in words; `None` when there are none.
    fn describe(&self) -> Option<String> {
        let signs: Vec<String> = [
            self.service_host
                .as_ref()
                .map(|h| format!("KUBERNETES_SERVICE_HOST={h} is set")),
            self.service_account_dir
                .as_ref()
                .map(|d| format!("{} exists", d.display())),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!signs.is_empty()).then(|| signs.join(" and "))
    }
}

/// `--kubernetes auto` when no config loads. With no sign of a cluster this is a laptop:
/// standalone, with a warning saying why. Inside a pod (a broken service-account mount, say)
/// standalone would serve Publish from empty state, without the VolumeAttachments that say who
/// holds what, so that is an error instead.
fn standalone_or_refuse(
    signs: &InClusterSigns,
    no_config: &dyn std::fmt::Display,
) -> Result<Option<Client>, KubeError> {
    match signs.describe() {
        Some(signs) => Err(KubeError::Config(format!(
            "this looks like a Kubernetes pod ({signs}) but no usable Kubernetes config was \
             found ({no_config}); refusing to run standalone, which would serve Publish without \
             the cluster's VolumeAttachments (fix the service-account mount, or pass \
             --kubernetes off to run standalone on purpose)"
        ))),
        None => {
            tracing::warn!(reason = %no_config, "no Kubernetes config found and no sign of running in a cluster; running standalone");
            Ok(None)
        }
    }
}

/// A client per `mode`: `Off` gives none; `On` requires a config and an API server that
/// answers, or fails; `Auto` gives one when a kubeconfig or in-cluster config loads, none when
/// nothing loads and `signs` are empty, and fails when nothing loads but `signs` say this runs
/// in a cluster.
pub async fn connect(
    mode: KubernetesMode,
    signs: &InClusterSigns,
) -> Result<Option<Client>, KubeError> {
    let api = |action: &str, e: &dyn std::fmt::Display| KubeError::Api {
        action: action.into(),
        message: e.to_string(),
    };
    let config = match mode {
        KubernetesMode::Off => return Ok(None),
        KubernetesMode::Auto => match kube::Config::infer().await {
            Ok(config) => config,
            Err(e) => return standalone_or_refuse(signs, &e),
        },
        KubernetesMode::On => kube::Config::infer()
            .await
            .map_err(|e| api("loading the Kubernetes config", &e))?,
    };
    let mut config = config;
    // Retries are ours to decide: watchers back off on their own, writes are requeued, and the
    // live checks on the publish path must fail closed promptly instead of retrying for minutes.
    config.default_retry = false;
    let client = Client::try_from(config).map_err(|e| api("building the Kubernetes client", &e))?;
    if mode == KubernetesMode::On {
        let version = client
            .apiserver_version()
            .await
            .map_err(|e| api("reaching the API server", &e))?;
        tracing::info!(version = %version.git_version, "Kubernetes API reachable");
    }
    Ok(Some(client))
}

/// The name Kubernetes gives the VolumeAttachment of `volume` on `node` for `driver`.
pub fn va_name(volume: &str, driver: &str, node: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(volume.as_bytes());
    hash.update(driver.as_bytes());
    hash.update(node.as_bytes());
    format!("csi-{}", hex::encode(hash.finalize()))
}

/// The PVC a PV is bound to, for events.
#[derive(Clone, Debug, PartialEq)]
pub struct Claim {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

/// One PV of this driver, keyed elsewhere by its name: the volume handle, the claim and the
/// migration timeout attribute in a single allocation, because 100k of them stay resident.
#[derive(Clone, Debug, PartialEq)]
struct PvEntry {
    /// Volume handle, claim namespace, claim name, claim uid and `migrationTimeoutSeconds`, back
    /// to back; `ends[i]` is where part `i` stops.
    text: Box<str>,
    ends: [u32; 5],
    /// Which optional parts exist (`HAS_*`).
    has: u8,
    class: AccessClass,
}

const HAS_CLAIM: u8 = 1;
const HAS_UID: u8 = 2;
const HAS_TIMEOUT: u8 = 4;

impl PvEntry {
    fn new(
        handle: &str,
        claim: Option<(&str, &str, Option<&str>)>,
        timeout: Option<&str>,
        class: AccessClass,
    ) -> Self {
        let (namespace, claim_name, uid) = claim.unwrap_or_default();
        let parts = [
            handle,
            namespace,
            claim_name,
            uid.unwrap_or_default(),
            timeout.unwrap_or_default(),
        ];
        let mut text = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        let mut ends = [0u32; 5];
        for (end, part) in ends.iter_mut().zip(parts) {
            text.push_str(part);
            *end = u32::try_from(text.len()).unwrap_or(u32::MAX);
        }
        let flag = |present: bool, bit: u8| if present { bit } else { 0 };
        Self {
            text: text.into_boxed_str(),
            ends,
            has: flag(claim.is_some(), HAS_CLAIM)
                | flag(uid.is_some(), HAS_UID)
                | flag(timeout.is_some(), HAS_TIMEOUT),
            class,
        }
    }

    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text
            .get(start..self.ends[i] as usize)
            .unwrap_or_default()
    }

    fn handle(&self) -> &str {
        self.part(0)
    }

    fn claim(&self) -> Option<Claim> {
        (self.has & HAS_CLAIM != 0).then(|| Claim {
            namespace: self.part(1).into(),
            name: self.part(2).into(),
            uid: (self.has & HAS_UID != 0).then(|| self.part(3).into()),
        })
    }

    fn migration_timeout(&self) -> Option<&str> {
        (self.has & HAS_TIMEOUT != 0).then(|| self.part(4))
    }

    /// Seeding's view of this PV, borrowed.
    fn view(&self) -> PvView<'_> {
        PvView {
            handle: Some(self.handle()),
            class: self.class,
            migration_timeout: self.migration_timeout(),
        }
    }
}

/// PVs of this driver that seeding looked up live because the PV projection did not hold them,
/// by name.
#[derive(Default)]
pub struct LivePvs(HashMap<Arc<str>, PvEntry>);

/// Live GETs of PVs the projection misses, at most this many at once.
pub const LOOKUP_CONCURRENCY: usize = 16;

/// How long one live GET of seeding or of a standby's delete decision may take before it counts
/// as failed (and the caller retries, or answers UNAVAILABLE).
pub const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Live GETs in flight at once across every standby DeleteVolume and `attached_elsewhere`
/// call: 100 provisioner workers deleting at once never open 100 × candidates requests.
pub const LIVE_READ_CONCURRENCY: usize = 32;

/// How long one decision from the VolumeAttachment projection and its live GETs may take,
/// waiting for its turn included: past it the answer is an error (UNAVAILABLE; the provisioner
/// retries a DeleteVolume).
pub const LIVE_READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(8);

/// This driver's VolumeAttachments, projected by a watcher: for each source (a PV name, or an
/// inline volume handle) the nodes that have one. A VolumeAttachment's spec is immutable, so an
/// update never moves one; a node is listed once per source. About a hundred bytes a
/// VolumeAttachment, its source's name and map slot: no VolumeAttachment names, no status (the
/// live GETs read those), each node name allocated once for the whole index, and a source's
/// only node kept inline.
#[derive(Default)]
struct VaIndex {
    by_pv: BySource,
    inline: BySource,
    /// The node names the sources list, each allocated once and shared.
    names: NodeNames,
}

/// Source (PV name or inline handle) → the nodes with a VolumeAttachment of it.
type BySource = HashMap<Box<str>, Nodes>;

/// The nodes with a VolumeAttachment of one source, each once and never none. Nearly every
/// source has one (two only during a live migration), so one is kept inline, without an
/// allocation of its own.
#[derive(Clone, Debug)]
enum Nodes {
    One(Arc<str>),
    Many(Box<[Arc<str>]>),
}

impl Nodes {
    fn as_slice(&self) -> &[Arc<str>] {
        match self {
            Self::One(node) => std::slice::from_ref(node),
            Self::Many(nodes) => nodes,
        }
    }

    fn from_vec(mut nodes: Vec<Arc<str>>) -> Option<Self> {
        match nodes.len() {
            0 => None,
            1 => nodes.pop().map(Self::One),
            _ => Some(Self::Many(nodes.into_boxed_slice())),
        }
    }
}

impl VaIndex {
    /// Which map (inline or not), source and node `va` is kept under; `None` for another
    /// driver's or one with no node or no source.
    fn slot<'v>(va: &'v lean::VolumeAttachment, driver: &str) -> Option<(bool, &'v str, &'v str)> {
        if va.spec.attacher != driver || va.spec.node_name.is_empty() {
            return None;
        }
        let node = va.spec.node_name.as_str();
        let source = &va.spec.source;
        match (&source.persistent_volume_name, &source.inline_volume_spec) {
            (Some(pv), _) => Some((false, pv.as_str(), node)),
            (None, Some(inline)) => Some((true, inline.csi.as_ref()?.volume_handle.as_str(), node)),
            (None, None) => None,
        }
    }

    fn map(&mut self, inline: bool) -> &mut BySource {
        if inline {
            &mut self.inline
        } else {
            &mut self.by_pv
        }
    }

    fn add(&mut self, va: &lean::VolumeAttachment, driver: &str) {
        let Some((inline, source, node)) = Self::slot(va, driver) else {
            return;
        };
        let node = self.names.intern(node);
        let map = self.map(inline);
        match map.get_mut(source) {
            None => {
                map.insert(source.into(), Nodes::One(node));
            }
            Some(nodes) if nodes.as_slice().contains(&node) => {}
            Some(nodes) => {
                let mut more = nodes.as_slice().to_vec();
                more.push(node);
                *nodes = Nodes::Many(more.into_boxed_slice());
            }
        }
    }

    fn remove(&mut self, va: &lean::VolumeAttachment, driver: &str) {
        let Some((inline, source, node)) = Self::slot(va, driver) else {
            return;
        };
        let map = self.map(inline);
        let Some(nodes) = map.get_mut(source) else {
            return;
        };
        let mut left = nodes.as_slice().to_vec();
        left.retain(|n| &**n != node);
        match Nodes::from_vec(left) {
            Some(left) => *nodes = left,
            None => {
                map.remove(source);
            }
        }
        self.names.forget_unused(node);
    }
}

/// This driver's PVs by name, and which PV each volume handle was last seen on. Every PV stays
/// resolvable by name even when two name the same handle, so seeding never skips a
/// VolumeAttachment because another PV shares its volume; and a handle stays resolvable while
/// any PV names it. A PV's name is allocated once, shared by both maps: 100k of them stay
/// resident.
#[derive(Default)]
struct PvIndex {
    by_name: HashMap<Arc<str>, PvEntry>,
    /// The PV each handle was last seen on.
    by_handle: HashMap<Box<str>, Arc<str>>,
    /// Only for handles more than one PV names (a volume re-bound by hand while its old PV
    /// lingers; rare): every such PV, oldest first, so the common case costs one name.
    shared: HashMap<Box<str>, Vec<Arc<str>>>,
}

impl PvIndex {
    fn insert(&mut self, (name, entry): (Arc<str>, PvEntry)) {
        self.remove(&name);
        let handle = entry.handle();
        if let Some(other) = self.by_handle.get(handle) {
            self.shared
                .entry(handle.into())
                .or_insert_with(|| vec![other.clone()])
                .push(name.clone());
        }
        self.by_handle.insert(handle.into(), name.clone());
        self.by_name.insert(name, entry);
    }

    /// Every PV name that names `handle`, oldest first.
    fn names_for_handle(&self, handle: &str) -> Vec<&str> {
        match self.shared.get(handle) {
            Some(names) => names.iter().map(|n| &**n).collect(),
            None => self
                .by_handle
                .get(handle)
                .map(|n| &**n)
                .into_iter()
                .collect(),
        }
    }

    fn remove(&mut self, name: &str) {
        let Some(old) = self.by_name.remove(name) else {
            return;
        };
        let handle = old.handle();
        let remaining = self.shared.get_mut(handle).and_then(|names| {
            names.retain(|n| &**n != name);
            names.last().cloned()
        });
        match remaining {
            Some(last) => {
                if self.shared.get(handle).is_some_and(|n| n.len() < 2) {
                    self.shared.remove(handle);
                }
                if self.by_handle.get(handle).map(|n| &**n) == Some(name) {
                    self.by_handle.insert(handle.into(), last);
                }
            }
            None => {
                self.shared.remove(handle);
                if self.by_handle.get(handle).map(|n| &**n) == Some(name) {
                    self.by_handle.remove(handle);
                }
            }
        }
    }

    /// Seeding's view of PV `name`, borrowed from the index.
    fn view(&self, name: &str) -> Option<PvView<'_>> {
        self.by_name.get(name).map(PvEntry::view)
    }

    /// The PV name and entry of a volume handle.
    fn for_handle(&self, handle: &str) -> Option<(&str, &PvEntry)> {
        let name = self.by_handle.get(handle)?;
        Some((name, self.by_name.get(name)?))
    }
}

/// This driver's PVs, projected: handle, access class, migration timeout, claim.
/// Keyed by PV name.
fn project_pv(pv: &lean::PersistentVolume, driver: &str) -> Option<(Arc<str>, PvEntry)> {
    let name = pv.metadata.name.as_deref()?;
    let spec = pv.spec.as_ref()?;
    let csi = spec.csi.as_ref().filter(|c| c.driver == driver)?;
    let rwx = spec
        .access_modes
        .iter()
        .flatten()
        .any(|m| m == "ReadWriteMany");
    let block = spec.volume_mode.as_deref() == Some("Block");
    let claim = spec.claim_ref.as_ref().and_then(|c| {
        Some((
            c.namespace.as_deref()?,
            c.name.as_deref()?,
            c.uid.as_deref(),
        ))
    });
    let timeout = csi.volume_attributes.as_ref().and_then(|a| {
        a.get(crate::domain::MIGRATION_TIMEOUT_KEY)
            .map(String::as_str)
    });
    let class = if rwx && block {
        AccessClass::Migratable
    } else {
        AccessClass::Exclusive
    };
    Some((
        name.into(),
        PvEntry::new(&csi.volume_handle, claim, timeout, class),
    ))
}

/// This driver's VolumeAttachments, projected for seeding; `nodes` shares node names across
/// one list.
pub fn project_va(
    va: &lean::VolumeAttachment,
    driver: &str,
    nodes: &mut NodeNames,
) -> Option<VaView> {
    if va.spec.attacher != driver {
        return None;
    }
    Some(VaView {
        name: va.metadata.name.as_deref().unwrap_or_default().into(),
        pv_name: va.spec.source.persistent_volume_name.as_deref().map(Into::into),
        inline_handle: va
            .spec
            .source
            .inline_volume_spec
            .as_ref()
            .and_then(|s| s.csi.as_ref())
            .map(|c| c.volume_handle.as_str().into()),
        node: nodes.intern(&va.spec.node_name),
        attached: va.status.as_ref().is_some_and(|s| s.attached),
        created: va
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| SystemTime::from(t.0))
            .unwrap_or_else(SystemTime::now),
        attached_at: va
            .status
            .as_ref()
            .and_then(|s| s.attached_at.as_deref())
            .and_then(|text| {
                let at = crate::domain::parse_attach_instant(text);
                if at.is_none() {
                    tracing::warn!(volume_attachment = ?va.metadata.name, value = ?text,
                        "unreadable attach instant in status.attachmentMetadata; ordering this VolumeAttachment by its creationTimestamp");
                }
                at
            }),
    })
}

pub struct KubeCluster {
    client: Client,
    driver: String,
    pvs: Arc<RwLock<PvIndex>>,
    nodes: Arc<RwLock<HashSet<String>>>,
    pvs_ready: watch::Receiver<bool>,
    nodes_ready: watch::Receiver<bool>,
    /// Names of Nodes the watch saw deleted, for the stale-attachment reconciler.
    node_deletions: broadcast::Sender<String>,
    vas: Arc<RwLock<VaIndex>>,
    vas_ready: watch::Receiver<bool>,
    /// Bounds the live GETs of every standby DeleteVolume and `attached_elsewhere` together.
    live_reads: Arc<Semaphore>,
    /// The VolumeAttachment watcher's first complete list, projected for seeding, when
    /// [`KubeCluster::start_with_boot_list`] asked for it.
    boot_list: Arc<BootList>,
}

/// The VolumeAttachment watcher's first complete list, kept for the one seeding that may use
/// it (see [`KubeCluster::boot_attachments`]), so a boot does not list every VolumeAttachment
/// twice. Nothing is kept unless it was asked for at start, and it is given away once.
#[derive(Default)]
struct BootList {
    state: std::sync::Mutex<BootListState>,
    /// Set when the first list is complete (or was never asked for).
    done: tokio::sync::Notify,
    /// Failed attempts at the first list, for the seeding retry count.
    failures: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
enum BootListState {
    /// Not asked for, or already given away.
    #[default]
    Off,
    /// Asked for; the watcher's first list has not completed yet.
    Wanted,
    Ready(Vec<VaView>),
}

impl BootList {
    fn lock(&self) -> std::sync::MutexGuard<'_, BootListState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wanted(&self) -> bool {
        matches!(*self.lock(), BootListState::Wanted)
    }

    /// Hands over the first complete list, if it is still wanted.
    fn complete(&self, mut views: Vec<VaView>) {
        // Grown by doubling: up to half its capacity is unused, and it is kept until seeded.
        views.shrink_to_fit();
        let mut state = self.lock();
        if matches!(*state, BootListState::Wanted) {
            *state = BootListState::Ready(views);
            self.done.notify_waiters();
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Feeds one projection from a watcher: rebuilt on every (re)list, patched by each event.
async fn follow<K, F>(api: Api<K>, what: &'static str, apply: F)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
    F: FnMut(Event<K>),
{
    follow_counting(api, what, apply, || {}).await
}

/// [`follow`], calling `failed` on every failed list or watch.
async fn follow_counting<K, F>(
    api: Api<K>,
    what: &'static str,
    mut apply: F,
    mut failed: impl FnMut(),
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
    F: FnMut(Event<K>),
{
    let mut stream = watcher(api, watcher::Config::default().page_size(PAGE_SIZE))
        .default_backoff()
        .boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => apply(event),
            Err(e) => {
                failed();
                tracing::warn!(error = %e, "watching {what} failed; retrying with backoff")
            }
        }
    }
}

impl KubeCluster {
    /// Starts the PV, VolumeAttachment and Node watchers.
    pub fn start(client: Client, driver: String) -> Arc<Self> {
        Self::started(client, driver, false)
    }

    /// [`KubeCluster::start`], and keeps the VolumeAttachment watcher's first complete list
    /// for [`KubeCluster::boot_attachments`]: for a controller whose first term begins at
    /// process start (no leader election).
    pub fn start_with_boot_list(client: Client, driver: String) -> Arc<Self> {
        Self::started(client, driver, true)
    }

    fn started(client: Client, driver: String, boot_list: bool) -> Arc<Self> {
        let (ready_tx, pvs_ready) = watch::channel(false);
        let (nodes_ready_tx, nodes_ready) = watch::channel(false);
        let (node_deletions, _) = broadcast::channel(1024);
        let (vas_ready_tx, vas_ready) = watch::channel(false);
        let cluster = Arc::new(Self {
            client: client.clone(),
            driver: driver.clone(),
            pvs: Default::default(),
            nodes: Default::default(),
            pvs_ready,
            nodes_ready,
            node_deletions: node_deletions.clone(),
            vas: Default::default(),
            vas_ready,
            live_reads: Arc::new(Semaphore::new(LIVE_READ_CONCURRENCY)),
            boot_list: Arc::new(BootList {
                state: std::sync::Mutex::new(if boot_list {
                    BootListState::Wanted
                } else {
                    BootListState::Off
                }),
                ..BootList::default()
            }),
        });
        let va_driver = driver.clone();
        let pvs = cluster.pvs.clone();
        tokio::spawn(async move {
            let mut buffer: Option<PvIndex> = None;
            follow(
                Api::<lean::PersistentVolume>::all(client.clone()),
                "PersistentVolumes",
                |event| match event {
                    Event::Init => buffer = Some(PvIndex::default()),
                    Event::InitApply(pv) => {
                        if let (Some(b), Some(r)) = (buffer.as_mut(), project_pv(&pv, &driver)) {
                            b.insert(r);
                        }
                    }
                    Event::InitDone => {
                        *write(&pvs) = buffer.take().unwrap_or_default();
                        let _ = ready_tx.send(true);
                    }
                    Event::Apply(pv) => match project_pv(&pv, &driver) {
                        Some(r) => write(&pvs).insert(r),
                        None => write(&pvs).remove(pv.metadata.name.as_deref().unwrap_or_default()),
                    },
                    Event::Delete(pv) => {
                        write(&pvs).remove(pv.metadata.name.as_deref().unwrap_or_default())
                    }
                },
            )
            .await;
        });
        let vas = cluster.vas.clone();
        let va_client = cluster.client.clone();
        let boot = cluster.boot_list.clone();
        let boot_failures = cluster.boot_list.clone();
        tokio::spawn(async move {
            let mut buffer: Option<VaIndex> = None;
            // Seeding's views of the list in progress, while the boot list is wanted.
            let mut views: Option<(Vec<VaView>, NodeNames)> = None;
            follow_counting(
                Api::<lean::VolumeAttachment>::all(va_client),
                "VolumeAttachments",
                |event| match event {
                    Event::Init => {
                        buffer = Some(VaIndex::default());
                        views = boot.wanted().then(Default::default);
                    }
                    Event::InitApply(va) => {
                        if let Some(b) = buffer.as_mut() {
                            b.add(&va, &va_driver);
                        }
                        if let Some((v, nodes)) = views.as_mut() {
                            v.extend(project_va(&va, &va_driver, nodes));
                        }
                    }
                    Event::InitDone => {
                        *write(&vas) = buffer.take().unwrap_or_default();
                        let _ = vas_ready_tx.send(true);
                        if let Some((v, _)) = views.take() {
                            boot.complete(v);
                        }
                    }
                    Event::Apply(va) => write(&vas).add(&va, &va_driver),
                    Event::Delete(va) => write(&vas).remove(&va, &va_driver),
                },
                || {
                    if boot_failures.wanted() {
                        boot_failures
                            .failures
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                },
            )
            .await;
        });
        let nodes = cluster.nodes.clone();
        let node_client = cluster.client.clone();
        tokio::spawn(async move {
            let mut buffer: Option<HashSet<String>> = None;
            follow(
                Api::<Node>::all(node_client),
                "Nodes",
                |event| match event {
                    Event::Init => buffer = Some(HashSet::new()),
                    Event::InitApply(n) => {
                        if let (Some(b), Some(name)) = (buffer.as_mut(), n.metadata.name) {
                            b.insert(name);
                        }
                    }
                    Event::InitDone => {
                        *write(&nodes) = buffer.take().unwrap_or_default();
                        let _ = nodes_ready_tx.send(true);
                    }
                    Event::Apply(n) => {
                        write(&nodes).extend(n.metadata.name);
                    }
                    Event::Delete(n) => {
                        let name = n.metadata.name.unwrap_or_default();
                        write(&nodes).remove(&name);
                        let _ = node_deletions.send(name);
                    }
                },
            )
            .await;
        });
        cluster
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn driver(&self) -> &str {
        &self.driver
    }

    /// Waits for the first complete PV list.
    pub async fn pvs_ready(&self) {
        let mut rx = self.pvs_ready.clone();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Waits for the first complete Node list. Until then a node's existence (Publish step 2)
    /// would cost a live GET on every Publish.
    pub async fn nodes_ready(&self) {
        let mut rx = self.nodes_ready.clone();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Node deletions as the watch reports them (unconfirmed: a watch can be told wrong).
    pub fn node_deletions(&self) -> broadcast::Receiver<String> {
        self.node_deletions.subscribe()
    }

    /// Whether the first complete Node list has arrived.
    pub fn nodes_synced(&self) -> bool {
        *self.nodes_ready.borrow()
    }

    /// PV name and claim of a volume handle, from the PV projection.
    pub fn pv_for_handle(&self, handle: &str) -> Option<(String, Option<Claim>)> {
        let index = read(&self.pvs);
        let (name, entry) = index.for_handle(handle)?;
        Some((name.to_string(), entry.claim()))
    }

    /// The seed plan for `vas`, against the PV projection (read in place, not copied) and the
    /// PVs `looked_up` live because the projection did not hold them.
    pub fn plan_seed(
        &self,
        vas: &[VaView],
        looked_up: &LivePvs,
        server_now: SystemTime,
    ) -> super::seed::SeedPlan {
        let index = read(&self.pvs);
        super::seed::plan(vas, server_now, |name| {
            index
                .view(name)
                .or_else(|| looked_up.0.get(name).map(PvEntry::view))
        })
    }

    /// The API server's clock now (rules, "Boot seeding" 3: seeded ages come from the API
    /// server's timestamps), from the `Date` header of a live `GET /version`. An HTTP date has
    /// whole seconds, truncated; the response's travel time adds to that. So an age measured
    /// against it is within about one second of the truth: the same resolution as the
    /// creationTimestamps it is subtracted from.
    pub async fn server_now(&self) -> Result<SystemTime, KubeError> {
        let failed = |message: String| KubeError::Api {
            action: "reading the API server's clock".into(),
            message,
        };
        let request = axum::http::Request::get("/version")
            .body(kube::client::Body::from(Vec::new()))
            .map_err(|e| failed(e.to_string()))?;
        let response = tokio::time::timeout(LOOKUP_TIMEOUT, self.client.send(request))
            .await
            .map_err(|_| failed(format!("no answer within {LOOKUP_TIMEOUT:?}")))?
            .map_err(|e| failed(e.to_string()))?;
        let date = response
            .headers()
            .get(axum::http::header::DATE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| failed("the response has no Date header".into()))?;
        parse_http_date(date).ok_or_else(|| failed(format!("unreadable Date header {date:?}")))
    }

    /// Rules, "Boot seeding" 1: the PVs `vas` name that the PV projection does not hold (at a
    /// takeover it can be behind the API), each by a live GET, at most [`LOOKUP_CONCURRENCY`]
    /// at once and each within [`LOOKUP_TIMEOUT`]. A 404 leaves the PV out (seeding then skips
    /// its VolumeAttachments as `unknown_pv`), and so does a PV of another driver; any other
    /// answer, or a GET past its timeout, is an error, and the caller must decide nothing.
    pub async fn look_up_unknown_pvs(&self, vas: &[VaView]) -> Result<LivePvs, KubeError> {
        let unknown: HashSet<String> = {
            let index = read(&self.pvs);
            vas.iter()
                .filter_map(|va| va.pv_name.as_deref())
                .filter(|name| !index.by_name.contains_key(*name))
                .map(str::to_string)
                .collect()
        };
        let mut lookups = tokio::task::JoinSet::new();
        let mut found = HashMap::new();
        for name in unknown {
            if lookups.len() >= LOOKUP_CONCURRENCY {
                if let Some(done) = lookups.join_next().await {
                    found.extend(joined(done)??);
                }
            }
            let api = Api::<lean::PersistentVolume>::all(self.client.clone());
            let driver = self.driver.clone();
            lookups.spawn(async move {
                let pv =
                    tokio::time::timeout(LOOKUP_TIMEOUT, live_get(api, &name, "PersistentVolume"))
                        .await
                        .map_err(|_| KubeError::Api {
                            action: format!("getting PersistentVolume {name}"),
                            message: format!("no answer within {LOOKUP_TIMEOUT:?}"),
                        })??;
                Ok::<_, KubeError>(pv.and_then(|pv| project_pv(&pv, &driver)))
            });
        }
        while let Some(done) = lookups.join_next().await {
            found.extend(joined(done)??);
        }
        Ok(LivePvs(found))
    }

    /// The VolumeAttachment watcher's first complete list of this driver's VolumeAttachments,
    /// once, if [`KubeCluster::start_with_boot_list`] kept it: waits for it, and answers with
    /// how many attempts at it failed. `None` when it was not kept or was already given: the
    /// caller lists afresh ([`KubeCluster::list_attachments`]).
    ///
    /// For the term that begins at process start and only for it: that list began when this
    /// process did, and no term of this process served anything before it. Any later term must
    /// see the VolumeAttachments as they are once it begins, so it lists afresh.
    pub async fn boot_attachments(&self) -> Option<(Vec<VaView>, u64)> {
        loop {
            let done = self.boot_list.done.notified();
            tokio::pin!(done);
            // Registered before the state is read, so a list completed in between wakes it.
            done.as_mut().enable();
            let taken = {
                let mut state = self.boot_list.lock();
                match *state {
                    BootListState::Wanted => None,
                    _ => Some(std::mem::take(&mut *state)),
                }
            };
            match taken {
                None => done.await,
                Some(BootListState::Ready(views)) => {
                    let failures = self
                        .boot_list
                        .failures
                        .load(std::sync::atomic::Ordering::Relaxed);
                    return Some((views, failures));
                }
                Some(_) => return None,
            }
        }
    }

    /// The first complete list of this driver's VolumeAttachments (those of other drivers are
    /// dropped as they arrive), paginated. Failures are logged and retried with capped backoff;
    /// this returns only with a complete list.
    pub async fn list_attachments(&self, mut on_error: impl FnMut(&str)) -> Vec<VaView> {
        let api = Api::<lean::VolumeAttachment>::all(self.client.clone());
        let mut stream = watcher(api, watcher::Config::default().page_size(PAGE_SIZE))
            .default_backoff()
            .boxed();
        let mut buffer = Vec::new();
        let mut nodes = NodeNames::default();
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => buffer.clear(),
                Ok(Event::InitApply(va)) => {
                    buffer.extend(project_va(&va, &self.driver, &mut nodes))
                }
                Ok(Event::InitDone) => {
                    // Grown by doubling: up to half its capacity is unused.
                    buffer.shrink_to_fit();
                    break;
                }
                Ok(Event::Apply(_) | Event::Delete(_)) => {}
                Err(e) => {
                    let message = e.to_string();
                    tracing::warn!(error = %message, "listing VolumeAttachments failed; staying not ready and retrying");
                    on_error(&message);
                }
            }
        }
        buffer
    }
}

/// Every object of `api`, by a live, paged list (500 a page; never the watch cache).
async fn list_all<K>(api: &Api<K>, what: &str) -> Result<Vec<K>, KubeError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut items = Vec::new();
    let mut params = kube::api::ListParams::default().limit(PAGE_SIZE);
    loop {
        let page = api
            .list(&params)
            .await
            .map_err(api_error(format!("listing {what}")))?;
        items.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(items),
        }
    }
}

/// An HTTP date in its preferred form (RFC 9110 IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`),
/// the only one servers may send.
fn parse_http_date(text: &str) -> Option<SystemTime> {
    let [_weekday, day, month, year, clock, "GMT"] = text.split(' ').collect::<Vec<_>>()[..] else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)?;
    let month = time::Month::try_from(u8::try_from(month + 1).ok()?).ok()?;
    let date = time::Date::from_calendar_date(year.parse().ok()?, month, day.parse().ok()?).ok()?;
    let [h, m, s] = clock.split(':').collect::<Vec<_>>()[..] else {
        return None;
    };
    let clock = time::Time::from_hms(h.parse().ok()?, m.parse().ok()?, s.parse().ok()?).ok()?;
    Some(SystemTime::from(date.with_time(clock).assume_utc()))
}

/// A lookup task's result; a task that panicked is an error like any other.
fn joined<T>(done: Result<T, tokio::task::JoinError>) -> Result<T, KubeError> {
    done.map_err(|e| KubeError::Api {
        action: "a live lookup".into(),
        message: e.to_string(),
    })
}

fn api_error(action: String) -> impl FnOnce(kube::Error) -> KubeError {
    move |e| KubeError::Api {
        action,
        message: e.to_string(),
    }
}

/// A live GET; `None` for a 404. Unbounded here: the publish path bounds all of its live GETs
/// together with [`crate::actors::LIVE_CHECK_BUDGET`].
async fn live_get<K>(api: Api<K>, name: &str, what: &str) -> Result<Option<K>, KubeError>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name)
        .await
        .map_err(api_error(format!("getting {what} {name}")))
}

#[async_trait]
impl NodeDirectory for KubeCluster {
    /// From the Node projection; a miss asks the API, so a node added a moment ago is known.
    async fn exists(&self, node: &NodeId) -> Result<bool, KubeError> {
        if read(&self.nodes).contains(node.as_str()) {
            return Ok(true);
        }
        Ok(
            live_get(Api::<Node>::all(self.client.clone()), node.as_str(), "Node")
                .await?
                .is_some(),
        )
    }
}

#[async_trait]
impl AttachmentAuthority for KubeCluster {
    /// Live GETs, never the cache: the Node (5.1), then the node's VolumeAttachment (5.2).
    async fn check(&self, volume: &VolumeId, node: &NodeId) -> Result<HolderStatus, KubeError> {
        let found = live_get(Api::<Node>::all(self.client.clone()), node.as_str(), "Node").await?;
        if found.is_none() {
            return Ok(HolderStatus::NodeGone);
        }
        let name = va_name(volume.as_str(), &self.driver, node.as_str());
        let va = live_get(
            Api::<VolumeAttachment>::all(self.client.clone()),
            &name,
            "VolumeAttachment",
        )
        .await?;
        Ok(match va {
            Some(va) if va.metadata.deletion_timestamp.is_none() => HolderStatus::Live,
            _ => HolderStatus::Released,
        })
    }

    /// Candidates from the VolumeAttachment projection ([`KubeCluster::live_attachments`]),
    /// each confirmed by a live GET of its deterministic name: attached, and no
    /// deletionTimestamp.
    async fn attached_elsewhere(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<Vec<NodeId>, KubeError> {
        let found = self.live_attachments(volume, Some(node)).await?;
        Ok(found
            .into_iter()
            .filter(|(_, va)| va.metadata.deletion_timestamp.is_none())
            .filter(|(_, va)| va.status.as_ref().is_some_and(|s| s.attached))
            .map(|(node, _)| node)
            .collect())
    }
}

#[async_trait]
impl NodeLiveness for KubeCluster {
    async fn gone(&self, node: &NodeId) -> Result<bool, KubeError> {
        let found = live_get(Api::<Node>::all(self.client.clone()), node.as_str(), "Node").await?;
        Ok(found.is_none())
    }
}

#[async_trait]
impl PvCatalog for KubeCluster {
    fn has_pv(&self, handle: &str) -> bool {
        read(&self.pvs).for_handle(handle).is_some()
    }

    async fn live_handles(&self) -> Result<HashSet<String>, KubeError> {
        let api = Api::<lean::PersistentVolume>::all(self.client.clone());
        let pvs = list_all(&api, "PersistentVolumes").await?;
        Ok(pvs
            .iter()
            .filter_map(|pv| project_pv(pv, &self.driver))
            .map(|(_, entry)| entry.handle().to_string())
            .collect())
    }
}

#[async_trait]
impl PublishedNodes for KubeCluster {
    /// Candidates from the VolumeAttachment projection, each confirmed by a live GET of its
    /// deterministic name; any that exists counts ([`KubeCluster::live_attachments`]).
    async fn published_nodes(&self, volume: &VolumeId) -> Result<Vec<NodeId>, KubeError> {
        let found = self.live_attachments(volume, None).await?;
        Ok(found.into_iter().map(|(node, _)| node).collect())
    }
}

impl KubeCluster {
    /// The VolumeAttachments of `volume` (on any node but `except`) that exist now: candidates
    /// from the VolumeAttachment projection, each confirmed by a live GET of the name Kubernetes
    /// gives it ([`va_name`]). Sorted by node, no duplicates. The GETs share the process-wide
    /// [`LIVE_READ_CONCURRENCY`] permits, and the whole answer must come within
    /// [`LIVE_READ_DEADLINE`].
    ///
    /// Errors (the caller answers UNAVAILABLE): a projection (PVs or VolumeAttachments) that has
    /// not synced yet; a GET that fails; the deadline.
    ///
    /// What the projection can miss, and so this too: a VolumeAttachment created after the
    /// last watch event this process has seen (the watch lags the API by its delivery time,
    /// longer while it re-lists). The live GETs only confirm candidates; they cannot find a
    /// VolumeAttachment the projection has not heard of, nor one named other than Kubernetes
    /// names it. For DeleteVolume this is the window between a VolumeAttachment's creation
    /// and its event; Kubernetes creates none for a volume whose claim is gone, which is when
    /// the provisioner deletes it.
    pub async fn live_attachments(
        &self,
        volume: &VolumeId,
        except: Option<&NodeId>,
    ) -> Result<Vec<(NodeId, lean::VolumeAttachment)>, KubeError> {
        let decide = async {
            let mut nodes = self.va_candidates(volume).await?;
            nodes.retain(|n| Some(n.as_str()) != except.map(NodeId::as_str));
            let names: Vec<(String, NodeId)> = nodes
                .into_iter()
                .map(|n| (va_name(volume.as_str(), &self.driver, n.as_str()), n))
                .collect();
            let found = self
                .get_all::<lean::VolumeAttachment, NodeId>(names, "VolumeAttachment")
                .await?;
            let mut found: Vec<(NodeId, lean::VolumeAttachment)> = found
                .into_iter()
                .filter_map(|(node, va)| Some((node, va?)))
                .collect();
            found.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(found)
        };
        tokio::time::timeout(LIVE_READ_DEADLINE, decide)
            .await
            .map_err(|_| KubeError::Api {
                action: format!("reading the VolumeAttachments of volume {volume}"),
                message: format!("no complete answer within {LIVE_READ_DEADLINE:?}"),
            })?
    }

    /// The nodes the VolumeAttachment projection says have a VolumeAttachment of `volume`: by
    /// its inline handle, or by any PV the PV projection says names it. A VolumeAttachment
    /// naming a PV the PV projection does not know has that PV looked up live (rules, "Boot
    /// seeding" 1, as for seeding): only a 404 rules it out.
    async fn va_candidates(&self, volume: &VolumeId) -> Result<Vec<NodeId>, KubeError> {
        if !*self.pvs_ready.borrow() || !*self.vas_ready.borrow() {
            return Err(KubeError::Api {
                action: format!("reading the VolumeAttachments of volume {volume}"),
                message: "the PersistentVolume or VolumeAttachment list has not synced yet".into(),
            });
        }
        let handle = volume.as_str();
        let (mut nodes, unknown): (Vec<Arc<str>>, Vec<(String, Nodes)>) = {
            let pvs = read(&self.pvs);
            let vas = read(&self.vas);
            let mut nodes: Vec<Arc<str>> = vas
                .inline
                .get(handle)
                .map(|n| n.as_slice().to_vec())
                .unwrap_or_default();
            for pv in pvs.names_for_handle(handle) {
                nodes.extend(
                    vas.by_pv
                        .get(pv)
                        .map(Nodes::as_slice)
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
            }
            let unknown = vas
                .by_pv
                .iter()
                .filter(|(pv, _)| !pvs.by_name.contains_key(&***pv))
                .map(|(pv, nodes)| (pv.to_string(), nodes.clone()))
                .collect();
            (nodes, unknown)
        };
        let found = self
            .get_all::<lean::PersistentVolume, Nodes>(unknown, "PersistentVolume")
            .await?;
        for (their_nodes, pv) in found {
            let names_it = pv
                .as_ref()
                .and_then(|pv| project_pv(pv, &self.driver))
                .is_some_and(|(_, entry)| entry.handle() == handle);
            if names_it {
                nodes.extend(their_nodes.as_slice().iter().cloned());
            }
        }
        let mut nodes: Vec<NodeId> = nodes
            .iter()
            .filter_map(|n| NodeId::try_from(&**n).ok())
            .collect();
        nodes.sort();
        nodes.dedup();
        Ok(nodes)
    }

    /// Live GETs of `names` (each with a tag handed back beside its answer, `None` for a 404),
    /// in parallel under the shared [`LIVE_READ_CONCURRENCY`] permits. The first error wins;
    /// the other GETs are abandoned.
    async fn get_all<K, T>(
        &self,
        names: Vec<(String, T)>,
        what: &'static str,
    ) -> Result<Vec<(T, Option<K>)>, KubeError>
    where
        K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + 'static,
        T: Send + 'static,
    {
        let mut gets = tokio::task::JoinSet::new();
        for (name, tag) in names {
            let api = Api::<K>::all(self.client.clone());
            let permits = self.live_reads.clone();
            gets.spawn(async move {
                let _permit = permits.acquire_owned().await.map_err(|e| KubeError::Api {
                    action: format!("getting {what} {name}"),
                    message: e.to_string(),
                })?;
                Ok::<_, KubeError>((tag, live_get(api, &name, what).await?))
            });
        }
        let mut found = Vec::with_capacity(gets.len());
        while let Some(done) = gets.join_next().await {
            found.push(joined(done)??);
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lean_pv(value: serde_json::Value) -> lean::PersistentVolume {
        serde_json::from_value(value).unwrap()
    }

    fn pv_json(name: &str, handle: &str, driver: &str) -> serde_json::Value {
        serde_json::json!({
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteMany"], "volumeMode": "Block",
                     "csi": {"driver": driver, "volumeHandle": handle,
                             "volumeAttributes": {"migrationTimeoutSeconds": "900"}},
                     "claimRef": {"namespace": "vms", "name": "disk", "uid": "u-1"}}
        })
    }

    fn lean_va(name: &str, pv: &str, node: &str) -> lean::VolumeAttachment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"attacher": "d", "nodeName": node, "source": {"persistentVolumeName": pv}},
            "status": {"attached": true}
        }))
        .unwrap()
    }

    /// The VolumeAttachment projection holds 100k sources at boot: a node's name is stored
    /// once for the whole index, a source's only node is kept inline (no allocation of its
    /// own), and a name nothing lists any more is let go. Catches a name copied per
    /// VolumeAttachment, or a list allocated per source.
    #[test]
    fn the_va_projection_stores_each_node_name_once_and_a_lone_node_inline() {
        let mut index = VaIndex::default();
        for (va, pv, node) in [
            ("a", "pv-1", "n1"),
            ("b", "pv-2", "n1"),
            ("c", "pv-1", "n2"),
        ] {
            index.add(&lean_va(va, pv, node), "d");
        }
        index.add(&lean_va("b", "pv-2", "n1"), "d");
        let nodes = |pv: &str| -> Vec<String> {
            index.by_pv.get(pv).map_or(Vec::new(), |n| {
                n.as_slice().iter().map(|n| n.to_string()).collect()
            })
        };
        assert_eq!(nodes("pv-1"), ["n1", "n2"]);
        assert_eq!(nodes("pv-2"), ["n1"], "listed once, however often added");
        let (Some(Nodes::Many(one)), Some(Nodes::One(two))) =
            (index.by_pv.get("pv-1"), index.by_pv.get("pv-2"))
        else {
            panic!("a lone node is kept inline, two in a list");
        };
        assert!(Arc::ptr_eq(&one[0], two), "one allocation for node n1");

        index.remove(&lean_va("c", "pv-1", "n2"), "d");
        assert!(matches!(index.by_pv.get("pv-1"), Some(Nodes::One(n)) if &**n == "n1"));
        assert!(
            !index.names.contains("n2"),
            "a name nothing lists is let go"
        );
        index.remove(&lean_va("a", "pv-1", "n1"), "d");
        assert!(!index.by_pv.contains_key("pv-1"));
        assert!(index.names.contains("n1"), "pv-2 still lists n1");
    }

    /// The boot list is kept from the end of the VolumeAttachment list until seeding takes it:
    /// without the capacity its doubling left unused. Catches dropping the `shrink_to_fit`.
    #[test]
    fn the_boot_list_is_handed_over_without_unused_capacity() {
        let boot = BootList {
            state: std::sync::Mutex::new(BootListState::Wanted),
            ..BootList::default()
        };
        let mut nodes = NodeNames::default();
        let mut views = Vec::new();
        for i in 0..5 {
            views.extend(project_va(
                &lean_va(&format!("va-{i}"), "pv", "n"),
                "d",
                &mut nodes,
            ));
        }
        assert!(views.capacity() > views.len());
        boot.complete(views);
        let BootListState::Ready(views) = std::mem::take(&mut *boot.lock()) else {
            panic!("the list was wanted");
        };
        assert_eq!((views.len(), views.capacity()), (5, 5));
    }

    #[test]
    fn the_pv_projection_keeps_name_claim_class_and_timeout() {
        let (name, entry) = project_pv(&lean_pv(pv_json("pv-1", "h-1", "d")), "d").unwrap();
        assert_eq!(&*name, "pv-1");
        assert_eq!(entry.handle(), "h-1");
        assert_eq!(entry.class, AccessClass::Migratable);
        assert_eq!(entry.migration_timeout(), Some("900"));
        assert_eq!(
            entry.claim(),
            Some(Claim {
                namespace: "vms".into(),
                name: "disk".into(),
                uid: Some("u-1".into())
            })
        );
        assert!(project_pv(&lean_pv(pv_json("pv-1", "h-1", "other")), "d").is_none());

        // Absent parts stay absent, and empty ones stay present.
        let bare = lean_pv(serde_json::json!({
            "metadata": {"name": "pv-2"},
            "spec": {"accessModes": ["ReadWriteOnce"],
                     "csi": {"driver": "d", "volumeHandle": "h-2", "volumeAttributes": {"migrationTimeoutSeconds": ""}},
                     "claimRef": {"namespace": "vms", "name": "disk"}}
        }));
        let (_, entry) = project_pv(&bare, "d").unwrap();
        assert_eq!(entry.class, AccessClass::Exclusive);
        assert_eq!(entry.migration_timeout(), Some(""));
        assert_eq!(entry.claim().unwrap().uid, None);
        let entry = PvEntry::new("h-3", None, None, AccessClass::Exclusive);
        assert_eq!(
            (entry.handle(), entry.claim(), entry.migration_timeout()),
            ("h-3", None, None)
        );
    }

    #[test]
    fn the_pv_index_serves_lookups_by_handle_and_seeding_by_name() {
        let mut index = PvIndex::default();
        for (name, handle) in [("pv-a", "h-a"), ("pv-b", "h-b")] {
            index.insert(project_pv(&lean_pv(pv_json(name, handle, "d")), "d").unwrap());
        }
        assert_eq!(index.view("pv-a").unwrap().handle, Some("h-a"));
        assert_eq!(index.view("pv-b").unwrap().migration_timeout, Some("900"));
        assert_eq!(index.for_handle("h-b").unwrap().0, "pv-b");
        let (name, _) = index.by_name.get_key_value("pv-b").unwrap();
        assert!(
            Arc::ptr_eq(name, &index.by_handle["h-b"]),
            "a PV's name is stored once for both maps"
        );

        // Two PVs naming one handle (a volume re-bound by hand while its old PV lingers): both
        // still resolve for seeding, so a VolumeAttachment of either is never skipped; the
        // later one answers lookups by handle, and deleting the earlier keeps it.
        index.insert(project_pv(&lean_pv(pv_json("pv-c", "h-a", "d")), "d").unwrap());
        assert_eq!(index.view("pv-a").unwrap().handle, Some("h-a"));
        assert_eq!(index.view("pv-c").unwrap().handle, Some("h-a"));
        assert_eq!(index.for_handle("h-a").unwrap().0, "pv-c");
        index.remove("pv-a");
        assert_eq!(index.for_handle("h-a").unwrap().0, "pv-c");
        index.remove("pv-c");
        assert!(index.for_handle("h-a").is_none());
        index.remove("pv-b");
        assert!(index.by_name.is_empty() && index.by_handle.is_empty());
    }

    #[test]
    fn http_dates_are_read_in_their_preferred_form_only() {
        let at = |secs| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(at(784_111_777))
        );
        assert_eq!(
            parse_http_date("Fri, 04 Dec 2026 23:01:28 GMT"),
            Some(at(1_796_425_288))
        );
        for bad in [
            "",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 31 Feb 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad:?}");
        }
    }

    /// Removing the PV a handle is indexed under, while another PV still names that handle,
    /// keeps the handle resolvable (to the remaining PV). Catches `remove` dropping the
    /// by-handle entry without falling back to the PVs that share it.
    #[test]
    fn removing_the_indexed_pv_of_a_shared_handle_keeps_the_other() {
        let mut index = PvIndex::default();
        for name in ["pv-a", "pv-b", "pv-c"] {
            index.insert(project_pv(&lean_pv(pv_json(name, "h", "d")), "d").unwrap());
        }
        assert_eq!(index.for_handle("h").unwrap().0, "pv-c");
        assert_eq!(index.names_for_handle("h"), ["pv-a", "pv-b", "pv-c"]);
        index.remove("pv-c");
        assert_eq!(index.for_handle("h").unwrap().0, "pv-b");
        index.remove("pv-a");
        assert_eq!(index.for_handle("h").unwrap().0, "pv-b");
        assert_eq!(index.names_for_handle("h"), ["pv-b"]);
        // Re-applying a PV with a new handle moves it.
        index.insert(project_pv(&lean_pv(pv_json("pv-b", "h2", "d")), "d").unwrap());
        assert!(index.for_handle("h").is_none());
        assert_eq!(index.for_handle("h2").unwrap().0, "pv-b");
        index.remove("pv-b");
        assert!(index.by_name.is_empty() && index.by_handle.is_empty() && index.shared.is_empty());
    }

    #[test]
    fn auto_without_config_is_standalone_only_outside_a_cluster() {
        let none = InClusterSigns::default();
        assert!(matches!(
            standalone_or_refuse(&none, &"no kubeconfig"),
            Ok(None)
        ));
        let in_pod = [
            InClusterSigns {
                service_host: Some("10.96.0.1".into()),
                service_account_dir: None,
            },
            InClusterSigns {
                service_host: None,
                service_account_dir: Some(SERVICE_ACCOUNT_DIR.into()),
            },
        ];
        for signs in in_pod {
            let Err(err) = standalone_or_refuse(&signs, &"no token") else {
                panic!("standalone despite {signs:?}");
            };
            let message = err.to_string();
            assert!(message.contains("refusing to run standalone"), "{message}");
            assert!(message.contains("no token"), "{message}");
            assert!(
                message.contains("KUBERNETES_SERVICE_HOST=10.96.0.1")
                    || message.contains(SERVICE_ACCOUNT_DIR),
                "{message}"
            );
        }
    }

    #[test]
    fn in_cluster_signs_look_for_the_service_account_dir() {
        let dir = tempfile::tempdir().unwrap();
        let signs = InClusterSigns::detect(dir.path());
        assert_eq!(signs.service_account_dir.as_deref(), Some(dir.path()));
        let signs = InClusterSigns::detect(&dir.path().join("absent"));
        assert_eq!(signs.service_account_dir, None);
    }

    #[test]
    fn va_names_follow_kubernetes() {
        // sha256("vol-1" + "rds.csi.srvlab.io" + "node-a"), computed independently with sha256sum.
        assert_eq!(
            va_name("vol-1", "rds.csi.srvlab.io", "node-a"),
            "csi-9e762bf7c7f476aa718b5dea50ae8023c7cee2303db9ff09490f486aecf4eedc"
        );
    }
}
