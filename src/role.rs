//! Whether this controller serves attachments, and the switch between serving and not.
//!
//! Owns the role: *starting* (nothing decided yet), *seeding* (a term began; attachment state
//! is being rebuilt), *active* (a numbered term, which ends at a monotonic deadline when it
//! follows a Lease) or *standby*. Only the drivers in this module ([`follow`], [`serve_always`],
//! [`serve_unelected`], [`Role::serve_standalone`]) change it; the gRPC handlers, Probe and `/readyz` read it. It never
//! touches attachment state itself: its [`Takeover`] drops that state when a term ends and
//! rebuilds it, exactly as at boot, when one begins.
//!
//! The rules, in the order they matter:
//! - ControllerPublish and ControllerUnpublish are served only while active ([`Role::admit`]),
//!   and an answer is given only if the term it was decided in still holds ([`Role::confirm`]):
//!   a controller never answers OK after its Lease could have passed to another pod. The
//!   [`Term`] travels with the call to the volume actor, which refuses a call of another term.
//! - For the first lease duration of a term, a volume with no holder is given to a node only
//!   after a live check of its other VolumeAttachments ([`Term::recheck_until`]).
//! - A term begins by dropping whatever state the process held and re-seeding from the
//!   VolumeAttachments, failing closed (UNAVAILABLE) until that is done; A → B → A re-seeds too.
//! - Stepping down needs no confirmation; stepping up is confirmed by a live read of the Lease.
//! - Probe and `/readyz` say ready when active-and-seeded or standby (a healthy standby must not
//!   be restarted), not while starting or seeding.
//! - Without `--leader-election` there is one term for life, which cannot follow an election:
//!   if the csi-attacher's Lease shows another pod holding it live, the attachers run one and
//!   another replica may serve, so this controller stops serving attachments for good and says
//!   it is not ready ([`serve_unelected`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::ids::VolumeId;
use crate::kube::lease::{
    assess, HolderIdentity, LeaseSource, Seen, TermKey, Verdict, Why, QUIET_DEFAULT, SKEW_MARGIN,
};
use crate::kube::PublishedNodes;
use crate::metrics::Metrics;
use crate::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Seeding,
    Active,
    Standby,
}

/// One period of serving attachments. A call admitted in one term is answered only if that term
/// still holds, and it travels with the call to the supervisor and the volume actor, which refuse
/// it (UNAVAILABLE, nothing changed) once they serve another term. Two values are the same term
/// when their numbers match; the one [`Role::admit`] gives also says until when the term's
/// first-lease-duration window lasts.
#[derive(Clone, Copy, Debug)]
pub struct Term {
    id: u64,
    /// Rules, "High availability": until this instant a volume with no holder is given to a node
    /// only after a live check of its other VolumeAttachments. `None`: no such window (a
    /// standalone controller, or a term whose window is not known yet).
    recheck_until: Option<Instant>,
}

impl PartialEq for Term {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Term {}

impl Term {
    /// The first term a [`Role`] begins, and the only one of a standalone controller: a new
    /// supervisor serves it until a [`crate::actors::messages::Dismiss`] or a seeding says
    /// otherwise.
    pub const FIRST: Term = Term {
        id: 1,
        recheck_until: None,
    };

    /// The end of this term's first-lease-duration window, if it has one (see [`Term`]).
    pub fn recheck_until(&self) -> Option<Instant> {
        self.recheck_until
    }

    /// The term after this one, as the role's next [`Takeover::seed`] would see it.
    #[cfg(test)]
    pub(crate) fn next(self) -> Self {
        Self {
            id: self.id + 1,
            recheck_until: None,
        }
    }

    /// This term with a first-lease-duration window ending at `at`, as [`Role::admit`] gives it.
    #[cfg(test)]
    pub(crate) fn rechecked_until(self, at: Instant) -> Self {
        Self {
            recheck_until: Some(at),
            ..self
        }
    }
}

/// The first-lease-duration window of a term when there is no Lease to read it from
/// ([`serve_always`]) or the Lease gives none: the csi-attacher's default
/// `--leader-election-lease-duration`, which is also its default `--timeout`. An OK answered late
/// by a process of this driver that served before this one (a rolling update with several
/// replicas and no leader election) was answered to a call the attacher sent at most that long
/// before; the attacher records `attached: true` right after such an answer, so a window this
/// long covers the writes the seeding list can miss. The window costs one live read for the
/// first Publish of each holderless volume, never a refusal of its own.
pub const RECHECK_WITHOUT_LEASE: Duration = Duration::from_secs(15);

/// How DeleteVolume decides "still published?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeletePath {
    /// Through the volume's actor, serialized with its publishes.
    Actors(Term),
    /// A standby has no attachment state: from live VolumeAttachment reads
    /// ([`Role::unpublished_everywhere`]).
    Live,
}

struct State {
    phase: Phase,
    term: u64,
    /// When the active term ends unless the Lease is seen renewed; `None`: never (no Lease).
    until: Option<Instant>,
    /// The end of the active term's first-lease-duration window (see [`Term`]).
    recheck_until: Option<Instant>,
    why: Why,
    /// Active or standby at least once: the calls that need no attachment state are served.
    decided: bool,
}

pub struct Role {
    state: Mutex<State>,
    /// What Probe and `/readyz` read.
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// What a standby asks before deleting a volume; set once, with a cluster.
    published: OnceLock<Arc<dyn PublishedNodes>>,
}

impl Role {
    pub fn new(ready: Arc<AtomicBool>, metrics: Arc<Metrics>) -> Arc<Self> {
        ready.store(false, Ordering::Release);
        metrics.leader_active.set(0);
        Arc::new(Self {
            state: Mutex::new(State {
                phase: Phase::Starting,
                term: 0,
                until: None,
                recheck_until: None,
                why: Why::NoLease,
                decided: false,
            }),
            ready,
            metrics,
            published: OnceLock::new(),
        })
    }

    /// With a cluster: where a standby's DeleteVolume asks whether the volume is still
    /// published. Set once; later calls change nothing.
    pub fn decide_standby_deletes_by(&self, published: Arc<dyn PublishedNodes>) {
        let _ = self.published.set(published);
    }

    /// A standby's DeleteVolume decision (rules, "High availability": from live
    /// VolumeAttachment reads, never from its empty state). Ok when no VolumeAttachment of this
    /// driver names `volume`; StillPublished (FAILED_PRECONDITION) naming the nodes of those
    /// that do, attached or not, being deleted or not (the active controller may be attaching
    /// or detaching right now); Unavailable when that cannot be told (no cluster, an API error,
    /// a projection not synced, the deadline).
    pub async fn unpublished_everywhere(&self, volume: &VolumeId) -> Result<(), Error> {
        let published = self.published.get().ok_or_else(|| {
            Error::Unavailable("no cluster to ask whether the volume is published".into())
        })?;
        let nodes = published.published_nodes(volume).await.map_err(|e| {
            Error::Unavailable(format!(
                "cannot tell whether volume {volume} is still published: {e}"
            ))
        })?;
        if nodes.is_empty() {
            Ok(())
        } else {
            Err(Error::StillPublished {
                volume: volume.clone(),
                nodes,
            })
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// ControllerPublish and ControllerUnpublish: the term the call runs in. NotReady
    /// (UNAVAILABLE) while starting or seeding; NotActive (UNAVAILABLE) on a standby, and on an
    /// active controller whose Lease deadline passed before it noticed.
    pub fn admit(&self) -> Result<Term, Error> {
        let s = self.lock();
        match s.phase {
            Phase::Starting | Phase::Seeding => Err(Error::NotReady),
            Phase::Standby => Err(Error::NotActive(s.why.to_string())),
            Phase::Active if s.until.is_some_and(|u| Instant::now() >= u) => {
                Err(Error::NotActive(Why::Expired.to_string()))
            }
            Phase::Active => Ok(Term {
                id: s.term,
                recheck_until: s.recheck_until,
            }),
        }
    }

    /// Whether an answer decided in `term` may still be given: the same term, still active,
    /// its deadline ahead. Otherwise NotActive, and the caller's client retries (with the
    /// controller that holds the Lease now).
    pub fn confirm(&self, term: Term) -> Result<(), Error> {
        let s = self.lock();
        let holds = s.phase == Phase::Active
            && s.term == term.id
            && s.until.is_none_or(|u| Instant::now() < u);
        if holds {
            Ok(())
        } else {
            Err(Error::NotActive(
                "this controller's term ended before the call was answered; retry".into(),
            ))
        }
    }

    /// DeleteVolume: through the actors while active, from a live list on a standby.
    pub fn delete_path(&self) -> Result<DeletePath, Error> {
        match self.phase() {
            Phase::Standby => Ok(DeletePath::Live),
            _ => self.admit().map(DeletePath::Actors),
        }
    }

    /// CreateVolume, ListVolumes, GetCapacity, ValidateVolumeCapabilities, ExpandVolume: they
    /// need no attachment state, so they are served once the role was first decided, by a
    /// standby and during a takeover too. NotReady before.
    pub fn volumes(&self) -> Result<(), Error> {
        if self.lock().decided {
            Ok(())
        } else {
            Err(Error::NotReady)
        }
    }

    /// A term begins: attachment state is about to be rebuilt.
    fn begin(&self) -> Term {
        let mut s = self.lock();
        s.term += 1;
        s.phase = Phase::Seeding;
        s.until = None;
        s.recheck_until = None;
        self.ready.store(false, Ordering::Release);
        self.metrics.leader_active.set(0);
        Term {
            id: s.term,
            recheck_until: None,
        }
    }

    /// The term's state is rebuilt: serve, until `until` unless extended. `since` is when the
    /// term began (or the process started), for `seeding_seconds_to_ready`. `recheck` is the
    /// term's first-lease-duration window, counted from now: from when the first call can be
    /// admitted, so it covers at least a lease duration after the seeding list was read.
    fn serve(
        &self,
        term: Term,
        until: Option<Instant>,
        since: std::time::Instant,
        recheck: Option<Duration>,
    ) {
        let mut s = self.lock();
        debug_assert_eq!(s.term, term.id);
        s.phase = Phase::Active;
        s.until = until;
        s.recheck_until = recheck.map(|window| Instant::now() + window);
        s.decided = true;
        self.ready.store(true, Ordering::Release);
        self.metrics.leader_active.set(1);
        self.metrics
            .leader_transitions
            .with_label_values(&["active"])
            .inc();
        self.metrics
            .seeding_seconds_to_ready
            .set(since.elapsed().as_secs_f64());
    }

    /// The Lease was seen renewed.
    fn extend(&self, term: Term, until: Instant) {
        let mut s = self.lock();
        if s.term == term.id && s.phase == Phase::Active {
            s.until = Some(until);
        }
    }

    /// Standby (again), ready: returns the phase it left.
    fn stand_by(&self, why: Why) -> Phase {
        self.stand_by_as(why, true)
    }

    /// Attachments refused for good, and not ready: a standby that will never take over
    /// (only a restart ends it). The calls that need no attachment state are still served.
    fn refuse(&self, why: Why) {
        self.stand_by_as(why, false);
    }

    fn stand_by_as(&self, why: Why, ready: bool) -> Phase {
        let mut s = self.lock();
        let was = s.phase;
        s.phase = Phase::Standby;
        s.until = None;
        s.why = why;
        s.decided = true;
        self.ready.store(ready, Ordering::Release);
        self.metrics.leader_active.set(0);
        if was != Phase::Standby {
            self.metrics
                .leader_transitions
                .with_label_values(&["standby"])
                .inc();
        }
        was
    }

    /// No cluster: nothing to rebuild and nobody to defer to; active for good.
    pub fn serve_standalone(&self, since: std::time::Instant) {
        let term = self.begin();
        debug_assert_eq!(term, Term::FIRST);
        self.serve(term, None, since, None);
    }

    /// The active term's deadline, if it has one.
    fn deadline(&self) -> Option<Instant> {
        let s = self.lock();
        (s.phase == Phase::Active).then_some(s.until).flatten()
    }
}

/// What a term's beginning and end do to attachment state and the reconcilers.
#[async_trait]
pub trait Takeover: Send + Sync + 'static {
    /// Drops all attachment state: every volume actor stops, nothing is evented or annotated
    /// (a controller standing down is not a detach).
    async fn dismiss(&self);
    /// Rebuilds attachment state for `term` from the VolumeAttachments, exactly as at boot;
    /// returns once done (retrying its reads meanwhile).
    async fn seed(&self, term: Term);
    /// The reconcilers of the active `term`; aborted when it ends.
    fn start_reconcilers(&self, term: Term) -> Vec<JoinHandle<()>>;
}

/// Without leader election: one term, for the life of the process, once seeded. Its
/// first-lease-duration window is [`RECHECK_WITHOUT_LEASE`].
pub async fn serve_always(role: Arc<Role>, takeover: Arc<dyn Takeover>, since: std::time::Instant) {
    serve_unelected(role, takeover, since, None).await;
}

/// The csi-attacher's Lease, watched by a controller that runs without `--leader-election`.
pub struct Unelected {
    pub lease: Arc<dyn LeaseSource>,
    /// This pod, as the Lease would name it.
    pub identity: HolderIdentity,
}

/// Without leader election: one term, for the life of the process, once seeded; with
/// `watch`, only until the Lease shows another pod holding it live (an election among the
/// csi-attachers, so another replica may serve while this one's state goes stale). Then
/// attachments are refused for good (UNAVAILABLE, not ready, reconcilers stopped, state
/// dropped), before serving if it is seen by then. A Lease naming this pod, an expired one or
/// none changes nothing.
pub async fn serve_unelected(
    role: Arc<Role>,
    takeover: Arc<dyn Takeover>,
    since: std::time::Instant,
    watch: Option<Unelected>,
) {
    let mut rx = watch.as_ref().map(|w| w.lease.subscribe());
    let term = role.begin();
    takeover.seed(term).await;
    let (Some(watch), Some(rx)) = (watch, rx.as_mut()) else {
        role.serve(term, None, since, Some(RECHECK_WITHOUT_LEASE));
        for task in takeover.start_reconcilers(term) {
            drop(task);
        }
        return;
    };
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let mut serving = false;
    loop {
        let elsewhere = rx
            .borrow_and_update()
            .as_ref()
            .and_then(|seen| held_elsewhere(seen, &watch.identity));
        if let Some(holder) = elsewhere {
            tracing::error!(holder = %holder, identity = %watch.identity,
                "the csi-attacher's leader Lease is held by another pod: the csi-attachers run an election, so another controller replica may serve attachments while this one, without --leader-election, never re-seeds. ControllerPublish/Unpublish now answer UNAVAILABLE and this controller is not ready until it is restarted with --leader-election");
            for task in tasks.drain(..) {
                task.abort();
            }
            role.refuse(Why::Unelected(holder));
            takeover.dismiss().await;
            return;
        }
        if !serving {
            role.serve(term, None, since, Some(RECHECK_WITHOUT_LEASE));
            tasks = takeover.start_reconcilers(term);
            serving = true;
        }
        if rx.changed().await.is_err() {
            // The watch ended (the process is stopping): nothing more to follow.
            return;
        }
    }
}

/// The holder of a live Lease that is not `me`, as the attacher compares them.
fn held_elsewhere(seen: &Seen, me: &HolderIdentity) -> Option<String> {
    let lease = seen.lease.as_ref()?;
    let Verdict::Standby(Why::Held(holder)) =
        assess(Some(lease), seen.at, me, seen.at, SKEW_MARGIN)
    else {
        return None;
    };
    let (renewed, duration) = (lease.renewed?, lease.duration?);
    (renewed.min(seen.at) + duration > seen.at).then_some(holder)
}

/// The wall clock, injected so tests can pair it with tokio's paused clock.
pub type WallClock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

pub fn system_clock() -> WallClock {
    Arc::new(SystemTime::now)
}

/// Follows the Lease for the life of the process: active while it names `identity` and has not
/// expired, standby otherwise.
pub async fn follow(
    role: Arc<Role>,
    lease: Arc<dyn LeaseSource>,
    takeover: Arc<dyn Takeover>,
    identity: HolderIdentity,
    clock: WallClock,
) {
    let rx = lease.subscribe();
    let mut follower = Follower {
        role,
        lease,
        takeover,
        identity,
        clock,
        rx,
        serving: None,
    };
    follower.run().await;
}

/// What an active term keeps.
struct Serving {
    term: Term,
    key: TermKey,
    tasks: Vec<JoinHandle<()>>,
}

/// What the Lease makes us, with the deadline on the monotonic clock.
enum Judged {
    Active { until: Instant, key: TermKey },
    Standby(Why),
}

/// Why a takeover in progress stopped.
enum Abandon {
    Standby(Why),
    /// The Lease was acquired anew (by us) meanwhile: start over.
    Again,
}

struct Follower {
    role: Arc<Role>,
    lease: Arc<dyn LeaseSource>,
    takeover: Arc<dyn Takeover>,
    identity: HolderIdentity,
    clock: WallClock,
    rx: tokio::sync::watch::Receiver<Option<Seen>>,
    serving: Option<Serving>,
}

impl Follower {
    async fn run(&mut self) {
        loop {
            let seen = self.rx.borrow_and_update().clone();
            if !self.step(seen).await {
                continue;
            }
            self.wait().await;
        }
    }

    /// Reads the Lease as of when it was seen: the wall clock only compares renewTime with the
    /// moment of sight; the deadline then runs on the monotonic clock, so a clock step later
    /// cannot stretch it.
    fn judge(&self, seen: &Seen) -> Judged {
        match assess(
            seen.lease.as_ref(),
            seen.at,
            &self.identity,
            seen.at,
            SKEW_MARGIN,
        ) {
            Verdict::Standby(why) => Judged::Standby(why),
            Verdict::Active { until, term } => {
                let left = until.duration_since(seen.at).unwrap_or_default();
                let until = seen.at_mono + left;
                if Instant::now() >= until {
                    Judged::Standby(Why::Expired)
                } else {
                    Judged::Active { until, key: term }
                }
            }
        }
    }

    /// Acts on what the Lease says now. Returns false when it must look again at once (a
    /// takeover was abandoned for a new one).
    async fn step(&mut self, seen: Option<Seen>) -> bool {
        let Some(seen) = seen else {
            return true;
        };
        match self.judge(&seen) {
            Judged::Standby(why) => {
                self.stand_down(why).await;
                true
            }
            Judged::Active { until, key } => {
                if let Some(serving) = &self.serving {
                    if serving.key == key {
                        self.role.extend(serving.term, until);
                        return true;
                    }
                    tracing::warn!("the csi-attacher's Lease was acquired anew: dropping attachment state and re-seeding");
                    self.stand_down(Why::NewTerm).await;
                }
                self.take_over().await
            }
        }
    }

    async fn stand_down(&mut self, why: Why) {
        let was = self.role.stand_by(why.clone());
        if let Some(serving) = self.serving.take() {
            for task in serving.tasks {
                task.abort();
            }
        }
        match was {
            Phase::Standby => {}
            Phase::Starting => {
                tracing::info!(reason = %why, "standby: ControllerPublish/Unpublish answer UNAVAILABLE until the csi-attacher's Lease names this pod");
            }
            Phase::Seeding | Phase::Active => {
                tracing::warn!(reason = %why, "standby: dropping attachment state; ControllerPublish/Unpublish answer UNAVAILABLE");
                self.takeover.dismiss().await;
            }
        }
    }

    /// The Lease names us: confirm with a live read, drop state, re-seed, serve. Returns false
    /// if it must look again at once.
    async fn take_over(&mut self) -> bool {
        let began = std::time::Instant::now();
        let fetched = self.lease.fetch().await;
        let recheck = fetched
            .as_ref()
            .ok()
            .and_then(Option::as_ref)
            .and_then(|lease| lease.duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(RECHECK_WITHOUT_LEASE);
        let confirmed = match fetched {
            Ok(lease) => self.judge(&Seen {
                lease,
                at: (self.clock)(),
                at_mono: Instant::now(),
            }),
            Err(e) => Judged::Standby(Why::Unreadable(e.to_string())),
        };
        let (mut until, key) = match confirmed {
            Judged::Active { until, key } => (until, key),
            Judged::Standby(why) => {
                tracing::info!(reason = %why, "the Lease watch named this pod, but a live read does not confirm it; staying a standby");
                self.stand_down(why).await;
                return true;
            }
        };
        tracing::info!(identity = %self.identity, "the csi-attacher's Lease names this pod: rebuilding attachment state from VolumeAttachments before serving");
        let term = self.role.begin();
        self.takeover.dismiss().await;
        let takeover = self.takeover.clone();
        let abandoned = {
            let seeding = takeover.seed(term);
            tokio::pin!(seeding);
            loop {
                tokio::select! {
                    () = &mut seeding => break None,
                    changed = self.rx.changed() => {
                        if changed.is_err() {
                            break Some(Abandon::Standby(Why::NoLease));
                        }
                        let seen = self.rx.borrow_and_update().clone();
                        match seen.map(|s| self.judge(&s)) {
                            None => {}
                            Some(Judged::Active { until: later, key: k }) if k == key => until = later,
                            Some(Judged::Active { .. }) => break Some(Abandon::Again),
                            Some(Judged::Standby(why)) => break Some(Abandon::Standby(why)),
                        }
                    }
                    () = tokio::time::sleep_until(until) => {
                        self.lease.restart();
                        break Some(Abandon::Standby(Why::Expired));
                    }
                }
            }
        };
        let abandoned = abandoned
            .or_else(|| (Instant::now() >= until).then_some(Abandon::Standby(Why::Expired)));
        match abandoned {
            None => {}
            Some(Abandon::Standby(why)) => {
                self.stand_down(why).await;
                return true;
            }
            Some(Abandon::Again) => {
                self.stand_down(Why::NewTerm).await;
                return false;
            }
        }
        self.role.serve(term, Some(until), began, Some(recheck));
        tracing::info!(
            seconds = began.elapsed().as_secs_f64(),
            "active: attachment state rebuilt; serving ControllerPublish/Unpublish"
        );
        let tasks = self.takeover.start_reconcilers(term);
        self.serving = Some(Serving { term, key, tasks });
        true
    }

    /// Until the Lease changes, the active term's deadline, or the watch has been silent for
    /// longer than the Lease could live (then it is started over).
    async fn wait(&mut self) {
        let quiet = self
            .rx
            .borrow()
            .as_ref()
            .and_then(|s| s.lease.as_ref())
            .and_then(|l| l.duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(QUIET_DEFAULT);
        let deadline = self.role.deadline();
        tokio::select! {
            changed = self.rx.changed() => {
                if changed.is_err() {
                    tracing::error!("the Lease watch ended; standing by for good");
                    self.stand_down(Why::NoLease).await;
                    std::future::pending::<()>().await;
                }
            }
            () = tokio::time::sleep(quiet) => self.lease.restart(),
            () = sleep_until_some(deadline) => {}
        }
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[path = "role_tests.rs"]
mod tests;
