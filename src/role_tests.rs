//! The role on tokio's paused clock, with a Lease the test writes into a channel and a takeover
//! that records what it is asked to do: leases expire by advancing virtual time, never by
//! sleeping for real.

use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use super::*;
use crate::kube::lease::LeaseView;
use crate::kube::KubeError;

fn paused<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(test());
}

/// Wall time that moves with the paused clock.
struct Clock {
    base: SystemTime,
    start: Instant,
}

impl Clock {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            base: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            start: Instant::now(),
        })
    }

    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }

    fn wall(self: &Arc<Self>) -> WallClock {
        let this = self.clone();
        Arc::new(move || this.now())
    }
}

struct FakeLease {
    tx: watch::Sender<Option<Seen>>,
    /// What a live read answers; `None`: the same as the watch.
    fetch: Mutex<Option<Result<Option<LeaseView>, String>>>,
    restarts: AtomicUsize,
}

impl FakeLease {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            tx: watch::channel(None).0,
            fetch: Mutex::new(None),
            restarts: AtomicUsize::new(0),
        })
    }

    fn show(&self, clock: &Clock, lease: Option<LeaseView>) {
        self.tx.send_replace(Some(Seen {
            lease,
            at: clock.now(),
            at_mono: Instant::now(),
        }));
    }

    fn restarts(&self) -> usize {
        self.restarts.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl LeaseSource for FakeLease {
    fn subscribe(&self) -> watch::Receiver<Option<Seen>> {
        self.tx.subscribe()
    }

    async fn fetch(&self) -> Result<Option<LeaseView>, KubeError> {
        match self.fetch.lock().unwrap().clone() {
            Some(answer) => answer.map_err(|message| KubeError::Api {
                action: "get".into(),
                message,
            }),
            None => Ok(self.tx.borrow().as_ref().and_then(|s| s.lease.clone())),
        }
    }

    fn restart(&self) {
        self.restarts.fetch_add(1, Ordering::SeqCst);
    }
}

/// Records dismiss/seed/reconcilers; seeding waits for a permit when `gated`.
struct Recorder {
    log: Mutex<Vec<&'static str>>,
    /// The term each seeding and each start of the reconcilers was for.
    terms: Mutex<Vec<Term>>,
    gate: Option<Semaphore>,
    /// Reconciler tasks that are still running.
    running: Arc<AtomicUsize>,
}

impl Recorder {
    fn new(gated: bool) -> Arc<Self> {
        Arc::new(Self {
            log: Mutex::new(Vec::new()),
            terms: Mutex::new(Vec::new()),
            gate: gated.then(|| Semaphore::new(0)),
            running: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn log(&self) -> Vec<&'static str> {
        self.log.lock().unwrap().clone()
    }
}

struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Takeover for Recorder {
    async fn dismiss(&self) {
        self.log.lock().unwrap().push("dismiss");
    }

    async fn seed(&self, term: Term) {
        self.terms.lock().unwrap().push(term);
        self.log.lock().unwrap().push("seed");
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        self.log.lock().unwrap().push("seeded");
    }

    fn start_reconcilers(&self, term: Term) -> Vec<JoinHandle<()>> {
        self.terms.lock().unwrap().push(term);
        self.log.lock().unwrap().push("reconcilers");
        self.running.fetch_add(1, Ordering::SeqCst);
        let running = Running(self.running.clone());
        vec![tokio::spawn(async move {
            let _running = running;
            std::future::pending::<()>().await
        })]
    }
}

fn lease(holder: &str, clock: &Clock, duration: u64, acquired: u64) -> LeaseView {
    LeaseView {
        holder: Some(holder.into()),
        duration: Some(Duration::from_secs(duration)),
        renewed: Some(clock.now()),
        acquired: Some(clock.base + Duration::from_secs(acquired)),
        transitions: Some(acquired as i32),
    }
}

struct Harness {
    role: Arc<Role>,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    lease: Arc<FakeLease>,
    takeover: Arc<Recorder>,
    clock: Arc<Clock>,
}

fn start(gated: bool) -> Harness {
    let ready = Arc::new(AtomicBool::new(true));
    let metrics = Arc::new(Metrics::new());
    let role = Role::new(ready.clone(), metrics.clone());
    let lease = FakeLease::new();
    let takeover = Recorder::new(gated);
    let clock = Clock::new();
    tokio::spawn(follow(
        role.clone(),
        lease.clone(),
        takeover.clone(),
        crate::kube::lease::HolderIdentity::of("me"),
        clock.wall(),
    ));
    Harness {
        role,
        ready,
        metrics,
        lease,
        takeover,
        clock,
    }
}

impl Harness {
    fn transitions(&self, to: &str) -> u64 {
        self.metrics
            .leader_transitions
            .with_label_values(&[to])
            .get()
    }

    fn show(&self, lease: Option<LeaseView>) {
        self.lease.show(&self.clock, lease);
    }
}

/// Lets the follower run (virtual time moves only as far as asked).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[test]
fn not_ready_until_the_lease_is_seen_then_standby_or_active() {
    paused(|| async {
        let h = start(false);
        settle().await;
        assert!(!h.ready.load(Ordering::Acquire), "nothing decided yet");
        assert!(matches!(h.role.admit(), Err(Error::NotReady)));
        assert!(matches!(h.role.volumes(), Err(Error::NotReady)));
        h.show(Some(lease("other", &h.clock, 15, 0)));
        settle().await;
        assert_eq!(h.role.phase(), Phase::Standby);
        assert!(h.ready.load(Ordering::Acquire), "a standby is ready");
        assert!(h.role.volumes().is_ok());
        let Err(Error::NotActive(why)) = h.role.admit() else {
            panic!("a standby admits no attachment call");
        };
        assert!(why.contains("held by other"), "{why}");
        assert_eq!(h.role.delete_path().unwrap(), DeletePath::Live);
        assert_eq!(
            h.takeover.log(),
            Vec::<&str>::new(),
            "nothing to drop at start"
        );
        assert_eq!((h.transitions("active"), h.transitions("standby")), (0, 1));
    });
}

/// a → b → a: every takeover drops state, re-seeds, then serves; every stand-down drops state
/// and stops the term's reconcilers.
#[test]
fn each_takeover_reseeds_and_each_stand_down_drops_state() {
    paused(|| async {
        let h = start(false);
        h.show(Some(lease("me", &h.clock, 15, 0)));
        settle().await;
        assert_eq!(h.role.phase(), Phase::Active);
        assert_eq!(h.metrics.leader_active.get(), 1);
        let first = h.role.admit().unwrap();
        assert_eq!(
            h.takeover.log(),
            ["dismiss", "seed", "seeded", "reconcilers"]
        );
        assert_eq!(h.takeover.running.load(Ordering::SeqCst), 1);

        h.show(Some(lease("other", &h.clock, 15, 5)));
        settle().await;
        assert_eq!(h.role.phase(), Phase::Standby);
        assert_eq!(h.metrics.leader_active.get(), 0);
        assert!(h.role.confirm(first).is_err(), "no answer from a past term");
        assert_eq!(
            h.takeover.running.load(Ordering::SeqCst),
            0,
            "reconcilers stopped"
        );

        h.show(Some(lease("me", &h.clock, 15, 10)));
        settle().await;
        let second = h.role.admit().unwrap();
        assert_ne!(first, second);
        assert!(h.role.confirm(first).is_err());
        assert!(h.role.confirm(second).is_ok());
        assert_eq!(
            h.takeover.log(),
            [
                "dismiss",
                "seed",
                "seeded",
                "reconcilers",
                "dismiss",
                "dismiss",
                "seed",
                "seeded",
                "reconcilers"
            ]
        );
        assert_eq!((h.transitions("active"), h.transitions("standby")), (2, 1));
    });
}

/// Renewals extend the term; without one, the term ends at renewTime + duration - margin
/// whether or not anything else happens, and admit() refuses from that instant on even before
/// the follower notices.
#[test]
fn an_unrenewed_lease_expires_into_standby_with_no_event_at_all() {
    paused(|| async {
        let h = start(false);
        h.show(Some(lease("me", &h.clock, 15, 0)));
        settle().await;
        let term = h.role.admit().unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        h.show(Some(lease("me", &h.clock, 15, 0)));
        settle().await;
        assert_eq!(h.role.admit().unwrap(), term, "a renewal is the same term");
        assert_eq!(h.takeover.log().iter().filter(|e| **e == "seed").count(), 1);

        // 13 s after that renewal (15 s less the margin), with no event in between.
        tokio::time::sleep(Duration::from_millis(12_990)).await;
        assert!(h.role.confirm(term).is_ok());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(h.role.phase(), Phase::Standby);
        assert!(matches!(h.role.admit(), Err(Error::NotActive(_))));
        assert!(h.role.confirm(term).is_err());
        assert_eq!(h.takeover.log().last(), Some(&"dismiss"));
        assert!(h.ready.load(Ordering::Acquire));
    });
}

#[test]
fn a_silent_watch_is_started_over_after_the_lease_duration() {
    paused(|| async {
        let h = start(false);
        h.show(Some(lease("other", &h.clock, 15, 0)));
        settle().await;
        assert_eq!(h.lease.restarts(), 0);
        tokio::time::sleep(Duration::from_secs(14)).await;
        assert_eq!(h.lease.restarts(), 0);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(h.lease.restarts(), 1);
        h.show(Some(lease("other", &h.clock, 15, 0)));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(h.lease.restarts(), 1, "an event resets the silence");
    });
}

/// The watch names us, a live read does not: no takeover, no transition. A failing read is no
/// confirmation either.
#[test]
fn a_takeover_needs_the_live_read_to_agree() {
    paused(|| async {
        let h = start(false);
        h.show(Some(lease("other", &h.clock, 15, 0)));
        settle().await;
        *h.lease.fetch.lock().unwrap() = Some(Ok(Some(lease("other", &h.clock, 15, 0))));
        h.show(Some(lease("me", &h.clock, 15, 1)));
        settle().await;
        assert_eq!(h.role.phase(), Phase::Standby);
        *h.lease.fetch.lock().unwrap() = Some(Err("503".into()));
        h.show(Some(lease("me", &h.clock, 15, 2)));
        settle().await;
        assert_eq!(h.role.phase(), Phase::Standby);
        assert_eq!(h.takeover.log(), Vec::<&str>::new());
        assert_eq!((h.transitions("active"), h.transitions("standby")), (0, 1));
        *h.lease.fetch.lock().unwrap() = None;
        h.show(Some(lease("me", &h.clock, 15, 3)));
        settle().await;
        assert_eq!(h.role.phase(), Phase::Active);
    });
}

/// UNAVAILABLE while seeding; a Lease that moves (or expires) during seeding abandons the
/// takeover, and it never serves from the half-built state.
#[test]
fn a_takeover_is_abandoned_when_the_lease_moves_while_seeding() {
    paused(|| async {
        let h = start(true);
        h.show(Some(lease("me", &h.clock, 15, 0)));
        settle().await;
        assert_eq!(h.role.phase(), Phase::Seeding);
        assert!(!h.ready.load(Ordering::Acquire), "not ready while seeding");
        assert!(matches!(h.role.admit(), Err(Error::NotReady)));
        h.show(Some(lease("other", &h.clock, 15, 1)));
        settle().await;
        assert_eq!(h.role.phase(), Phase::Standby);
        assert_eq!(h.takeover.log(), ["dismiss", "seed", "dismiss"]);

        // Seeding that outlasts the Lease: abandoned at its deadline.
        h.show(Some(lease("me", &h.clock, 15, 2)));
        settle().await;
        assert_eq!(h.role.phase(), Phase::Seeding);
        tokio::time::sleep(Duration::from_secs(14)).await;
        assert_eq!(h.role.phase(), Phase::Standby);
        assert!(h.lease.restarts() >= 1);
        h.takeover.gate.as_ref().unwrap().add_permits(10);
        settle().await;
        assert_eq!(h.role.phase(), Phase::Standby);
        assert_eq!(h.transitions("active"), 0);
    });
}

#[test]
fn without_leader_election_one_term_after_seeding() {
    paused(|| async {
        let ready = Arc::new(AtomicBool::new(true));
        let metrics = Arc::new(Metrics::new());
        let role = Role::new(ready.clone(), metrics.clone());
        let takeover = Recorder::new(true);
        tokio::spawn(serve_always(
            role.clone(),
            takeover.clone(),
            std::time::Instant::now(),
        ));
        settle().await;
        assert!(!ready.load(Ordering::Acquire));
        assert!(matches!(role.volumes(), Err(Error::NotReady)));
        let served = Instant::now();
        takeover.gate.as_ref().unwrap().add_permits(1);
        settle().await;
        let term = role.admit().unwrap();
        let window = term.recheck_until().expect("a first-lease-duration window");
        assert!(
            window >= served + RECHECK_WITHOUT_LEASE
                && window <= Instant::now() + RECHECK_WITHOUT_LEASE,
            "without a Lease, the window is {RECHECK_WITHOUT_LEASE:?} from serving"
        );
        assert_eq!(*takeover.terms.lock().unwrap(), [term, term]);
        tokio::time::sleep(Duration::from_secs(86_400 * 365)).await;
        assert!(role.confirm(term).is_ok(), "no deadline");
        assert_eq!(takeover.log(), ["seed", "seeded", "reconcilers"]);
        assert_eq!(metrics.leader_active.get(), 1);
    });
}

/// A term is seeded for, and its reconcilers run in, the very term its calls are admitted in
/// (the supervisor and the actors refuse any other). Its first-lease-duration window is the
/// Lease's duration counted from when it began serving, after seeding: it covers a whole lease
/// duration after the seeding list was read, however long seeding took.
///
/// Catches the window counted from the term's beginning (before seeding), or taken from
/// anything but the Lease's duration.
#[test]
fn a_term_is_seeded_in_what_it_admits_and_rechecks_for_one_lease_duration_after_seeding() {
    paused(|| async {
        let h = start(true);
        h.show(Some(lease("me", &h.clock, 40, 0)));
        settle().await;
        assert_eq!(h.takeover.log(), ["dismiss", "seed"]);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let served = Instant::now();
        h.takeover.gate.as_ref().unwrap().add_permits(1);
        settle().await;
        let term = h.role.admit().unwrap();
        let window = term.recheck_until().expect("a first-lease-duration window");
        let lease_duration = Duration::from_secs(40);
        assert!(
            window >= served + lease_duration && window <= Instant::now() + lease_duration,
            "{:?} after serving",
            window - served
        );
        assert_eq!(*h.takeover.terms.lock().unwrap(), [term, term]);
    });
}

/// Standalone: one term, the first, with no window (no VolumeAttachments to read).
#[test]
fn a_standalone_controller_serves_the_first_term_without_a_window() {
    paused(|| async {
        let role = Role::new(Arc::new(AtomicBool::new(false)), Arc::new(Metrics::new()));
        role.serve_standalone(std::time::Instant::now());
        let term = role.admit().unwrap();
        assert_eq!(term, Term::FIRST);
        assert_eq!(term.recheck_until(), None);
    });
}

/// Serves without leader election, watching `lease` as this pod ("me").
fn unelected(gated: bool) -> Harness {
    let ready = Arc::new(AtomicBool::new(true));
    let metrics = Arc::new(Metrics::new());
    let role = Role::new(ready.clone(), metrics.clone());
    let lease = FakeLease::new();
    let takeover = Recorder::new(gated);
    tokio::spawn(serve_unelected(
        role.clone(),
        takeover.clone(),
        std::time::Instant::now(),
        Some(Unelected {
            lease: lease.clone(),
            identity: HolderIdentity::of("me"),
        }),
    ));
    Harness {
        role,
        ready,
        metrics,
        lease,
        takeover,
        clock: Clock::new(),
    }
}

/// Without `--leader-election`, a csi-attacher Lease held live by another pod means the
/// attachers run an election and another replica may serve, while this one's state is never
/// re-seeded: it stops serving attachments for good (UNAVAILABLE naming the flag, not ready),
/// stops its reconcilers and drops its state; a later Lease naming it changes nothing. A Lease
/// naming this pod, or an expired one, changes nothing. Catches removing the refusal in
/// `serve_unelected`'s watch (the Lease would be ignored and stale state served).
#[test]
fn without_leader_election_a_live_lease_held_elsewhere_stops_attachments_for_good() {
    paused(|| async {
        let h = unelected(false);
        settle().await;
        let term = h.role.admit().expect("serving once seeded");
        h.show(Some(lease("me", &h.clock, 15, 0)));
        settle().await;
        assert!(
            h.role.confirm(term).is_ok(),
            "this pod's csi-attacher leads"
        );
        let mut expired = lease("other", &h.clock, 15, 1);
        expired.renewed = Some(h.clock.now() - Duration::from_secs(60));
        h.show(Some(expired));
        settle().await;
        assert!(
            h.role.confirm(term).is_ok(),
            "an expired Lease is no election"
        );
        assert_eq!(h.takeover.log(), ["seed", "seeded", "reconcilers"]);

        h.show(Some(lease("other", &h.clock, 15, 2)));
        settle().await;
        let Err(Error::NotActive(why)) = h.role.admit() else {
            panic!("attachments are refused");
        };
        assert!(
            why.contains("held by other") && why.contains("--leader-election"),
            "{why}"
        );
        assert!(h.role.confirm(term).is_err(), "the term ended");
        assert!(!h.ready.load(Ordering::Acquire), "not ready");
        assert_eq!(h.metrics.leader_active.get(), 0);
        assert_eq!(
            h.takeover.log(),
            ["seed", "seeded", "reconcilers", "dismiss"]
        );
        assert_eq!(h.takeover.running.load(Ordering::SeqCst), 0);
        assert!(h.role.volumes().is_ok(), "volumes are still served");
        assert_eq!(h.role.delete_path().unwrap(), DeletePath::Live);

        h.show(Some(lease("me", &h.clock, 15, 3)));
        settle().await;
        assert!(h.role.admit().is_err(), "until restarted");
        assert!(!h.ready.load(Ordering::Acquire));
    });
}

/// The same Lease seen before seeding ends: attachments are never served at all. Catches
/// removing the check before `serve` in `serve_unelected`.
#[test]
fn without_leader_election_a_lease_held_elsewhere_at_start_means_never_serving() {
    paused(|| async {
        let h = unelected(true);
        settle().await;
        h.show(Some(lease("other", &h.clock, 15, 0)));
        settle().await;
        h.takeover.gate.as_ref().unwrap().add_permits(1);
        settle().await;
        assert!(matches!(h.role.admit(), Err(Error::NotActive(_))));
        assert!(!h.ready.load(Ordering::Acquire));
        assert_eq!(h.transitions("active"), 0, "never active");
        assert_eq!(h.takeover.log(), ["seed", "seeded", "dismiss"]);
    });
}
