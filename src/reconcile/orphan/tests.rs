//! The orphan reconciler on tokio's paused clock (a 24 h grace passes in no time), over an
//! in-memory backend, the real supervisor and volume actors, and a PV catalog the test sets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::SystemTime;

use actix::Actor;
use async_trait::async_trait;

use super::*;
use crate::actors::messages::Publish;
use crate::actors::state::PublishRequest;
use crate::actors::supervisor::Supervisor;
use crate::actors::{NodeLimit, VolumeDeps};
use crate::backend::{BackendError, CreateRequest, VolumeInfo};
use crate::domain::{AccessMode, Capability};
use crate::ids::NodeId;
use crate::kube::{KubeError, Standalone};
use crate::role::Term;

const HOUR: Duration = Duration::from_secs(3600);
const GRACE: Duration = Duration::from_secs(24 * 3600);

fn vol(v: &str) -> VolumeId {
    VolumeId::try_from(v).unwrap()
}

#[test]
fn the_tracker_counts_the_grace_from_first_sight_and_resets_it_on_a_pv() {
    let t0 = Instant::now();
    let mut t = Tracker::new(GRACE);
    let all = [vol("a"), vol("b")];
    let no_pv = |_: &VolumeId| false;
    let found = t.observe(&all, no_pv, t0);
    assert_eq!(found.new, all);
    assert!(found.past_grace.is_empty());
    let found = t.observe(&all, no_pv, t0 + GRACE - Duration::from_secs(1));
    assert!(found.new.is_empty() && found.past_grace.is_empty());
    // b's PV shows up just before its grace ends.
    let found = t.observe(
        &all,
        |v| v.as_str() == "b",
        t0 + GRACE - Duration::from_millis(1),
    );
    assert_eq!(found.adopted, [vol("b")]);
    let found = t.observe(&all, no_pv, t0 + GRACE);
    assert_eq!(found.past_grace, [vol("a")]);
    assert_eq!(found.newly_past, [vol("a")]);
    assert_eq!(found.new, [vol("b")], "b's grace starts over");
    let found = t.observe(&all, no_pv, t0 + GRACE + HOUR);
    assert_eq!(found.past_grace, [vol("a")]);
    assert!(found.newly_past.is_empty(), "reported once");
    // A volume gone from the backend is forgotten; if it comes back, it starts over.
    t.observe(&[vol("b")], no_pv, t0 + 2 * GRACE);
    let found = t.observe(&all, no_pv, t0 + 3 * GRACE);
    assert_eq!(found.new, [vol("a")]);
    assert_eq!(found.past_grace, [vol("b")]);
}

/// Volumes in memory: every call answers at once (a file backend's blocking I/O would let the
/// paused clock run ahead while it waits). The second set holds the volumes of another driver
/// instance sharing the storage: listed, never owned.
#[derive(Default)]
struct Memory(
    Mutex<BTreeMap<VolumeId, VolumeInfo>>,
    Mutex<HashSet<VolumeId>>,
);

impl Memory {
    fn has(&self, v: &str) -> bool {
        self.0.lock().unwrap().contains_key(&vol(v))
    }

    fn add(&self, v: &str) {
        let info = VolumeInfo {
            id: vol(v),
            name: v.into(),
            capacity_bytes: 1 << 20,
            capabilities: vec![],
            parameters: BTreeMap::new(),
            created_at: SystemTime::UNIX_EPOCH,
            source: None,
        };
        self.0.lock().unwrap().insert(vol(v), info);
    }
}

#[async_trait]
impl VolumeBackend for Memory {
    fn kind(&self) -> &'static str {
        "memory"
    }
    async fn create(&self, req: CreateRequest) -> Result<VolumeInfo, BackendError> {
        self.add(req.id.as_str());
        Ok(self.0.lock().unwrap()[&req.id].clone())
    }
    async fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        self.0.lock().unwrap().remove(id);
        Ok(())
    }
    async fn get(&self, id: &VolumeId) -> Result<Option<VolumeInfo>, BackendError> {
        Ok(self.0.lock().unwrap().get(id).cloned())
    }
    async fn list(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        Ok(self.0.lock().unwrap().values().cloned().collect())
    }
    async fn list_owned(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        let mut all = self.list().await?;
        let foreign = self.1.lock().unwrap();
        all.retain(|v| !foreign.contains(&v.id));
        Ok(all)
    }
    async fn capacity(&self) -> Result<u64, BackendError> {
        Ok(u64::MAX)
    }
    async fn expand(&self, _: &VolumeId, bytes: u64) -> Result<u64, BackendError> {
        Ok(bytes)
    }
    fn publish_context(&self, _: &VolumeInfo) -> HashMap<String, String> {
        HashMap::new()
    }
}

/// PVs as the projection (cache) and a live list see them.
#[derive(Default)]
struct Catalog {
    cached: Mutex<HashSet<String>>,
    live: Mutex<HashSet<String>>,
}

impl Catalog {
    fn pv(&self, handle: &str, present: bool) {
        for set in [&self.cached, &self.live] {
            let mut set = set.lock().unwrap();
            if present {
                set.insert(handle.into());
            } else {
                set.remove(handle);
            }
        }
    }
}

#[async_trait]
impl PvCatalog for Catalog {
    fn has_pv(&self, handle: &str) -> bool {
        self.cached.lock().unwrap().contains(handle)
    }
    async fn live_handles(&self) -> Result<HashSet<String>, KubeError> {
        Ok(self.live.lock().unwrap().clone())
    }
}

struct Harness {
    backend: Arc<Memory>,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    router: Router,
}

fn harness(volumes: &[&str]) -> Harness {
    let backend = Arc::new(Memory::default());
    for v in volumes {
        backend.add(v);
    }
    let metrics = Arc::new(Metrics::new());
    let nodes = Arc::new(Standalone::new([NodeId::try_from("n1").unwrap()]));
    let deps = Arc::new(VolumeDeps {
        backend: backend.clone(),
        nodes: nodes.clone(),
        authority: nodes.clone(),
        sink: nodes,
        metrics: metrics.clone(),
        grace_period: Duration::from_secs(30),
        node_limit: NodeLimit::new(0),
    });
    let supervisor = Supervisor::new(deps, Vec::new()).start();
    Harness {
        backend,
        catalog: Arc::new(Catalog::default()),
        metrics,
        router: Router::new(supervisor, Duration::from_secs(5)),
    }
}

impl Harness {
    fn start(&self, delete: bool) -> tokio::task::JoinHandle<()> {
        let reconciler = OrphanVolumes {
            backend: self.backend.clone(),
            pvs: self.catalog.clone(),
            router: self.router.clone(),
            term: Term::FIRST,
            metrics: self.metrics.clone(),
            config: OrphanConfig {
                interval: HOUR,
                grace: GRACE,
                delete,
            },
        };
        tokio::spawn(reconciler.run())
    }
}

fn paused(test: impl std::future::Future<Output = ()>) {
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    });
    system.block_on(test);
}

/// Sleeps until `h` hours (and a minute) after `t0`.
async fn at(t0: Instant, h: u32) {
    tokio::time::sleep_until(t0 + HOUR * h + Duration::from_secs(60)).await;
}

/// Delete mode, grace 24 h, a pass every hour from t0:
/// - `orphan` never has a PV: kept at 23 h, deleted by the pass at 24 h;
/// - `late` is made by CreateVolume at t0 and its PV is written at 23 h: never deleted, and
///   when that PV goes at 30 h, a whole new grace begins (deleted at 55 h, not at 54 h);
/// - `hidden` has a PV the cache has not seen: past its grace by the cache, kept by the live
///   list;
/// - `busy` has no PV but is published: its actor refuses the deletion.
#[test]
fn delete_mode_deletes_only_past_the_grace_and_never_a_volume_with_a_pv() {
    paused(async {
        let h = harness(&["orphan", "late", "hidden", "busy"]);
        h.catalog.live.lock().unwrap().insert("hidden".into());
        h.router
            .send(
                &vol("busy"),
                Publish {
                    req: PublishRequest {
                        node: NodeId::try_from("n1").unwrap(),
                        capability: Capability::block(AccessMode::SingleNodeWriter),
                        readonly: false,
                        migration_timeout: Duration::from_secs(300),
                    },
                    term: Term::FIRST,
                },
            )
            .await
            .unwrap();
        let t0 = Instant::now();
        let _run = h.start(true);

        at(t0, 23).await;
        h.catalog.pv("late", true);
        for v in ["orphan", "late", "hidden", "busy"] {
            assert!(h.backend.has(v), "{v} kept before its grace");
        }
        assert_eq!(h.metrics.orphan_volumes.get(), 0);
        at(t0, 24).await;
        assert!(!h.backend.has("orphan"), "deleted by the pass at 24 h");
        assert_eq!(h.metrics.orphan_deleted.get(), 1);
        assert!(h.backend.has("late") && h.backend.has("hidden") && h.backend.has("busy"));
        assert_eq!(h.metrics.orphan_volumes.get(), 1, "busy: reported, refused");

        at(t0, 30).await;
        h.catalog.pv("late", false);
        at(t0, 54).await;
        assert!(h.backend.has("late"), "its grace began again at 31 h");
        at(t0, 55).await;
        assert!(!h.backend.has("late"));
        at(t0, 100).await;
        assert!(h.backend.has("hidden"), "the live list names it");
        assert!(h.backend.has("busy"), "published");
        assert_eq!(h.metrics.orphan_deleted.get(), 2);
        let runs = h
            .metrics
            .reconciler_runs
            .with_label_values(&[ORPHAN, "success"])
            .get();
        assert_eq!(runs, 101, "a pass at t0 and every hour");
    });
}

/// A restart at 12 h (a new process, or a new term: a fresh tracker) starts the grace over: an
/// orphan that the first run would have deleted at 24 h goes at 36 h, never before.
#[test]
fn a_restart_never_shortens_the_grace() {
    paused(async {
        let h = harness(&["orphan"]);
        let t0 = Instant::now();
        let first = h.start(true);
        at(t0, 12).await;
        first.abort();
        let _second = h.start(true);
        // The restarted run passes at 12 h 1 min and every hour after.
        tokio::time::sleep_until(t0 + HOUR * 35 + HOUR / 2).await;
        assert!(
            h.backend.has("orphan"),
            "35 h after creation, 23 h after the restart"
        );
        tokio::time::sleep_until(t0 + HOUR * 36 + HOUR / 2).await;
        assert!(!h.backend.has("orphan"));
    });
}

/// A volume of another driver instance on the same storage (the backend lists it, but it is
/// not this instance's) is never a candidate: in delete mode, ten graces on, it is neither
/// reported nor deleted, while this instance's orphan goes at 24 h. Catches `list_owned` in
/// `pass` (with `list` the foreign volume is deleted at 24 h too).
#[test]
fn another_instances_volume_is_never_a_candidate() {
    paused(async {
        let h = harness(&["orphan", "theirs"]);
        h.backend.1.lock().unwrap().insert(vol("theirs"));
        let t0 = Instant::now();
        let _run = h.start(true);
        at(t0, 24).await;
        assert!(!h.backend.has("orphan"));
        at(t0, 240).await;
        assert!(h.backend.has("theirs"));
        assert_eq!(h.metrics.orphan_deleted.get(), 1);
        assert_eq!(h.metrics.orphan_volumes.get(), 0, "not even reported");
    });
}

/// Dry run reports (once past the grace) and never deletes.
#[test]
fn dry_run_reports_and_never_deletes() {
    paused(async {
        let h = harness(&["orphan", "kept"]);
        h.catalog.pv("kept", true);
        let t0 = Instant::now();
        let _run = h.start(false);
        at(t0, 23).await;
        assert_eq!(h.metrics.orphan_volumes.get(), 0);
        at(t0, 24).await;
        assert_eq!(h.metrics.orphan_volumes.get(), 1);
        at(t0, 240).await;
        assert!(h.backend.has("orphan") && h.backend.has("kept"));
        assert_eq!(h.metrics.orphan_deleted.get(), 0);
        assert_eq!(h.metrics.orphan_volumes.get(), 1);
    });
}
