//! Owns the map from volume id to volume actor, and nothing of any live volume's state.
//!
//! Starts an actor on first use, on its first caller's arbiter or else the one the volume id
//! hashes to ([`super::placement`]); seeds actors at boot, spread by hash; forgets an actor once
//! it retired. A caller that found an actor stopping asks again, and gets a new actor: that is
//! how no message is lost to a reap.
//!
//! Fail closed when an actor dies. A volume actor stops in one planned way only: it retires (idle,
//! grace expired, or deleted, so no node holds the volume), marking its [`Retirement`] and sending
//! [`Reaped`] before it stops. Only such an actor is replaced by a fresh one. Any other stop is a
//! panic in one of its handlers, and the holders it knew died with it: serving that volume from
//! empty state would give an exclusive volume to a second node. Two layers keep that from
//! happening:
//! - release builds abort on a panic (`panic = "abort"` in Cargo.toml's release profile): a
//!   production controller dies with the bug, and its restart re-seeds every volume from the
//!   VolumeAttachments, which is the only source of truth;
//! - builds that unwind (tests, debug builds, any profile that overrides the abort) keep running.
//!   There the supervisor finds the dead actor's address disconnected and not retired, and marks
//!   the volume poisoned: logged at error once, counted in `rds_csi_attachment_poisoned_volumes`,
//!   and every later Route or Lookup for it answers `Error::Unavailable` (UNAVAILABLE) until the
//!   process restarts. The Router treats that answer as final. Other volumes are unaffected.
//!
//! Aborting alone would leave unwinding builds serving empty state; poisoning alone would leave a
//! production controller running with a volume that only a restart can heal, and a panic can
//! leave shared state (the per-node counts) half updated. Hence both.
//!
//! Why the [`Retirement`] flag and not `Reaped` alone: `Reaped` is queued before any retry by a
//! caller that met the retired actor, but a Route or Lookup from someone else can be queued ahead
//! of it and find the address already disconnected. The flag is set before the actor stops, so a
//! disconnected address without it is a death, never a retirement whose `Reaped` is still queued.
//!
//! Standing down: when this controller stops serving attachments (another pod's csi-attacher
//! holds the leader Lease), [`Dismiss`] stops every actor without any effect, forgets parked and
//! poisoned volumes, and refuses every route until the next [`Seed`] rebuilds state from the
//! VolumeAttachments. So a call admitted before the stand-down never starts an actor from empty
//! state, and a poisoned volume is healed by the next term's seeding. A [`Seed`] names the term
//! it seeds for: from then on `Route` serves calls of that term only, and every actor started
//! (seeded, woken from a parked record, or fresh) serves it and refuses a call of another, so a
//! call admitted in an earlier term never changes the state a later one rebuilt.
//!
//! Parking: a volume seeded with one settled attachment (no migration, no over-attachment, so
//! no timer and no pending effect) has nothing to do until a message arrives. It is kept as a
//! [`Parked`] record, about a tenth of an actor's memory, and the first message for it starts
//! its actor with exactly the state seeding rebuilt. The record is never changed or consulted for
//! a decision: every change to a volume's state still happens in its one actor.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;

use super::messages::{
    ClearStale, Dismiss, DropStale, HolderNodes, ListActors, ListHolders, Listing, Lookup, Reaped,
    Route, Seed, Settled, ShareAddresses, StandDown,
};
use super::placement::{Arbiters, Caller};
use super::state::{Attachment, Effect, VolumeState};
use super::volume::{Retirement, VolumeActor};
use super::{other_term, AddressCache, VolumeDeps};
use crate::domain::AccessClass;
use crate::ids::{NodeId, VolumeId};
use crate::role::Term;
use crate::Error;

/// Longer than any migration timeout or grace period.
const SEED_AGE_CAP: std::time::Duration = std::time::Duration::from_secs(2 * 3600);

/// A seeded volume attached to one node and otherwise settled, waiting for its first message.
struct Parked {
    node: NodeId,
    attached_at: tokio::time::Instant,
    attached_wall: SystemTime,
    recorded_instant: bool,
    class: AccessClass,
}

impl Parked {
    /// The state its actor starts with: what `VolumeState::seeded` rebuilds from one holder.
    fn state(&self, grace_period: Duration) -> VolumeState {
        let holder = Attachment {
            node: self.node.clone(),
            attached_at: self.attached_at,
            confirmed_at: self.attached_at,
            attached_wall: self.attached_wall,
            recorded_instant: self.recorded_instant,
            class: self.class,
            capability: None,
            readonly: false,
        };
        // One holder is never a migration and never over-attached, so there are no effects and
        // the timeout is unused.
        let (state, effects) =
            VolumeState::seeded(grace_period, vec![holder], Duration::ZERO, true);
        debug_assert!(effects.is_empty() && state.migration().is_none());
        state
    }
}

/// A started actor: its address, and whether it retired.
struct Slot {
    addr: Addr<VolumeActor>,
    retirement: Retirement,
}

/// What the supervisor knows of a volume's actor.
enum Found {
    Live(Addr<VolumeActor>),
    /// No actor, or one that retired: a fresh (or woken) actor may take over.
    Vacant,
}

pub struct Supervisor {
    actors: HashMap<VolumeId, Slot>,
    /// Never holds a volume that is also in `actors`.
    parked: HashMap<VolumeId, Parked>,
    /// Volumes whose actor died without retiring; never in `actors` or `parked`.
    poisoned: HashSet<VolumeId>,
    /// The routers' address caches, cleaned when an actor is reaped.
    routers: Vec<std::sync::Weak<AddressCache>>,
    /// One arbiter per core. Empty: actors run on the supervisor's own arbiter (tests).
    arbiters: Arbiters,
    deps: Arc<VolumeDeps>,
    /// The term served: set by [`Seed`], cleared by [`Dismiss`]. Every actor started here
    /// serves it; with none, no actor starts.
    term: Option<Term>,
}

impl Supervisor {
    pub fn new(deps: Arc<VolumeDeps>, arbiters: Vec<ArbiterHandle>) -> Self {
        Self {
            actors: HashMap::new(),
            parked: HashMap::new(),
            poisoned: HashSet::new(),
            routers: Vec::new(),
            arbiters: Arbiters::new(arbiters),
            deps,
            term: Some(Term::FIRST),
        }
    }

    /// Starts `actor` and records it as `volume`'s actor, on `caller`'s arbiter if it runs on
    /// one of ours (see [`super::placement`]).
    fn spawn(
        &mut self,
        actor: VolumeActor,
        volume: &VolumeId,
        caller: Option<Caller>,
    ) -> Addr<VolumeActor> {
        let retirement = actor.retirement();
        let addr = match self.arbiters.choose(volume, caller) {
            Some(arbiter) => VolumeActor::start_in_arbiter(arbiter, move |_| actor),
            None => actor.start(),
        };
        let slot = Slot {
            addr: addr.clone(),
            retirement,
        };
        self.actors.insert(volume.clone(), slot);
        addr
    }

    /// The volume's actor if it is live; `Vacant` if there is none or it retired (forgotten
    /// here); `Unavailable` if the volume is poisoned, including when this call finds its actor
    /// dead.
    fn find(&mut self, volume: &VolumeId) -> Result<Found, Error> {
        if self.poisoned.contains(volume) {
            return Err(poisoned(volume));
        }
        let Some(slot) = self.actors.get(volume) else {
            return Ok(Found::Vacant);
        };
        if slot.retirement.is_retired() {
            self.actors.remove(volume);
            return Ok(Found::Vacant);
        }
        if slot.addr.connected() {
            return Ok(Found::Live(slot.addr.clone()));
        }
        self.poison(volume);
        Err(poisoned(volume))
    }

    /// Marks a volume whose actor stopped without retiring: its state is lost, so the volume is
    /// refused until the process restarts and re-seeds.
    fn poison(&mut self, volume: &VolumeId) {
        let Some(slot) = self.actors.remove(volume) else {
            return;
        };
        self.poisoned.insert(volume.clone());
        self.deps.metrics.poisoned_volumes.inc();
        tracing::error!(volume_id = %volume,
            "volume actor stopped unexpectedly (a panic); its attachment state is lost, so the volume \
             answers UNAVAILABLE until the controller restarts and re-seeds from VolumeAttachments");
        self.forget(volume, &slot.addr);
    }

    /// Drops `addr` from the routers' caches.
    fn forget(&mut self, volume: &VolumeId, addr: &Addr<VolumeActor>) {
        self.routers.retain(|router| {
            let Some(cache) = router.upgrade() else {
                return false;
            };
            let mut cache = cache.write().unwrap_or_else(|p| p.into_inner());
            if cache.get(volume) == Some(addr) {
                cache.remove(volume);
            }
            true
        });
    }

    fn start_fresh(
        &mut self,
        volume: &VolumeId,
        term: Term,
        caller: Option<Caller>,
        ctx: &mut Context<Self>,
    ) -> Addr<VolumeActor> {
        let actor = VolumeActor::new(
            volume.clone(),
            term,
            VolumeState::new(self.deps.grace_period),
            self.deps.clone(),
            ctx.address().recipient(),
        );
        self.spawn(actor, volume, caller)
    }

    /// Starts an actor of `term` holding rebuilt state (seeding). Replaces nothing: seeding runs
    /// before any RPC is served, at boot or after a [`Dismiss`] emptied the maps.
    pub fn seed(
        &mut self,
        volume: VolumeId,
        term: Term,
        state: VolumeState,
        effects: Vec<Effect>,
        ctx: &mut Context<Self>,
    ) -> Addr<VolumeActor> {
        let actor = VolumeActor::seeded(
            volume.clone(),
            term,
            state,
            effects,
            self.deps.clone(),
            ctx.address().recipient(),
        );
        self.spawn(actor, &volume, None)
    }

    /// Starts the actor of a parked volume, handing it the seeded state. Parked records exist
    /// only while a term is served (a [`Dismiss`] drops them), and the actor serves that term.
    fn wake(
        &mut self,
        volume: &VolumeId,
        caller: Option<Caller>,
        ctx: &mut Context<Self>,
    ) -> Option<Addr<VolumeActor>> {
        let term = self.term?;
        let parked = self.parked.remove(volume)?;
        self.deps.metrics.parked_volumes.dec();
        let actor = VolumeActor::unparked(
            volume.clone(),
            term,
            parked.state(self.deps.grace_period),
            self.deps.clone(),
            ctx.address().recipient(),
        );
        Some(self.spawn(actor, volume, caller))
    }

    fn park(&mut self, volume: VolumeId, parked: Parked) {
        debug_assert!(!self.actors.contains_key(&volume));
        let metrics = &self.deps.metrics;
        if self.parked.insert(volume, parked).is_none() {
            metrics.parked_volumes.inc();
            metrics.nvme_connections_active.inc();
        }
    }

    /// Live actors.
    pub fn len(&self) -> usize {
        self.actors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.actors.is_empty()
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Routing is on every RPC's path; never let the mailbox cap stall it.
        ctx.set_mailbox_capacity(1 << 16);
    }
}

/// The answer for a volume whose actor died.
fn poisoned(volume: &VolumeId) -> Error {
    Error::Unavailable(format!(
        "volume {volume}'s actor stopped unexpectedly; its attachment state is unknown until the \
         controller restarts and re-seeds from VolumeAttachments"
    ))
}

impl Handler<Route> for Supervisor {
    type Result = Result<Addr<VolumeActor>, Error>;

    fn handle(&mut self, route: Route, ctx: &mut Context<Self>) -> Self::Result {
        let Route {
            volume,
            term,
            caller,
        } = route;
        let Some(serving) = self.term else {
            return Err(Error::NotActive(
                "attachment state was dropped when this controller stood down".into(),
            ));
        };
        if term.is_some_and(|term| term != serving) {
            return Err(other_term());
        }
        if let Found::Live(addr) = self.find(&volume)? {
            return Ok(addr);
        }
        if let Some(addr) = self.wake(&volume, caller, ctx) {
            return Ok(addr);
        }
        Ok(self.start_fresh(&volume, serving, caller, ctx))
    }
}

impl Handler<Reaped> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: Reaped, _ctx: &mut Context<Self>) {
        if self.actors.get(&msg.volume).map(|s| &s.addr) == Some(&msg.addr) {
            self.actors.remove(&msg.volume);
        }
        self.forget(&msg.volume, &msg.addr);
    }
}

impl Handler<ShareAddresses> for Supervisor {
    type Result = ();

    fn handle(&mut self, ShareAddresses(cache): ShareAddresses, _ctx: &mut Context<Self>) {
        self.routers.push(cache);
    }
}

impl Handler<ListActors> for Supervisor {
    type Result = MessageResult<ListActors>;

    fn handle(&mut self, page: ListActors, _ctx: &mut Context<Self>) -> Self::Result {
        let (now, wall) = (tokio::time::Instant::now(), SystemTime::now());
        let mut ids = page_of(
            self.actors.keys().chain(self.parked.keys()),
            page.after.as_ref(),
            page.limit,
        );
        let next = if ids.len() > page.limit {
            ids.truncate(page.limit);
            ids.last().cloned()
        } else {
            None
        };
        let mut listing = Listing {
            actors: Vec::new(),
            parked: Vec::new(),
            next,
        };
        for volume in ids {
            if let Some(p) = self.parked.get(&volume) {
                let view = p.state(self.deps.grace_period).describe(now, wall);
                listing.parked.push((volume, view));
            } else if let Ok(Found::Live(addr)) = self.find(&volume) {
                listing.actors.push((volume, addr));
            }
        }
        MessageResult(listing)
    }
}

/// The first `limit + 1` of `ids` after `after`, in order: one more than a page, to tell
/// whether another page follows. A bounded heap, so a page costs one pass over the ids and
/// memory for one page.
fn page_of<'a>(
    ids: impl Iterator<Item = &'a VolumeId>,
    after: Option<&VolumeId>,
    limit: usize,
) -> Vec<VolumeId> {
    let keep = limit.saturating_add(1);
    let mut heap: std::collections::BinaryHeap<&VolumeId> = std::collections::BinaryHeap::new();
    for id in ids.filter(|id| after.is_none_or(|a| *id > a)) {
        if heap.len() < keep {
            heap.push(id);
        } else if heap.peek().is_some_and(|top| id < *top) {
            heap.pop();
            heap.push(id);
        }
    }
    let mut page: Vec<VolumeId> = heap.into_iter().cloned().collect();
    page.sort();
    page
}

impl Handler<Lookup> for Supervisor {
    type Result = Result<Option<Addr<VolumeActor>>, Error>;

    fn handle(&mut self, Lookup(volume): Lookup, ctx: &mut Context<Self>) -> Self::Result {
        match self.find(&volume)? {
            Found::Live(addr) => Ok(Some(addr)),
            Found::Vacant => Ok(self.wake(&volume, None, ctx)),
        }
    }
}

impl Handler<Seed> for Supervisor {
    type Result = ResponseFuture<usize>;

    /// Holder ages (the API server's now minus the VolumeAttachment's creationTimestamp, never
    /// this process's wall clock) map onto the monotonic clock, so a migration's deadline keeps
    /// counting from the newer VolumeAttachment's creation (rules, "Boot seeding" 3). A volume
    /// with one holder is parked; any other starts its actor now (a migration has a timer to
    /// arm, an over-attachment an event to post).
    ///
    /// Answers once each started actor answered a [`Settled`]: actors start on their arbiters,
    /// and the caller turns ready on this answer, so until then a seeded migration would be
    /// missing from `migration_active_migrations` and the actor gauges of a ready driver. The
    /// supervisor keeps serving other messages meanwhile. An actor that stopped before
    /// answering (a [`Dismiss`] in between) is not waited for.
    fn handle(&mut self, Seed { term, volumes }: Seed, ctx: &mut Context<Self>) -> Self::Result {
        self.term = Some(term);
        let now = tokio::time::Instant::now();
        // Ages beyond two hours all mean "every deadline has passed"; clamping keeps the
        // subtraction inside the monotonic clock's range.
        let monotonic = |age: Duration| now.checked_sub(age.min(SEED_AGE_CAP)).unwrap_or(now);
        let count = volumes.len();
        self.parked.reserve(count);
        let mut started = Vec::new();
        for v in volumes {
            for h in &v.holders {
                self.deps.node_limit.add(&h.node);
            }
            if let [h] = &v.holders[..] {
                let parked = Parked {
                    node: h.node.clone(),
                    attached_at: monotonic(h.age),
                    attached_wall: h.attached,
                    recorded_instant: h.recorded_instant,
                    class: v.class,
                };
                self.park(v.volume, parked);
                continue;
            }
            let holders = v
                .holders
                .into_iter()
                .map(|h| Attachment {
                    node: h.node,
                    attached_at: monotonic(h.age),
                    confirmed_at: monotonic(h.age),
                    attached_wall: h.attached,
                    recorded_instant: h.recorded_instant,
                    class: v.class,
                    capability: None,
                    readonly: false,
                })
                .collect();
            let (state, effects) = VolumeState::seeded(
                self.deps.grace_period,
                holders,
                v.migration_timeout,
                v.order_known,
            );
            started.push(self.seed(v.volume, term, state, effects, ctx));
        }
        Box::pin(async move {
            let settled = futures::future::join_all(started.iter().map(|a| a.send(Settled)));
            for answer in settled.await {
                if let Err(e) = answer {
                    tracing::debug!(error = %e, "a seeded actor stopped before it settled");
                }
            }
            count
        })
    }
}

impl Handler<Dismiss> for Supervisor {
    type Result = usize;

    /// Every actor is told to stand down (its own gauges and per-node slots go with it), every
    /// parked record is dropped with what it counted, poisoned volumes get a fresh start at the
    /// next seeding, and the routers forget every address.
    fn handle(&mut self, _: Dismiss, _ctx: &mut Context<Self>) -> usize {
        self.term = None;
        let metrics = &self.deps.metrics;
        let dropped = self.actors.len() + self.parked.len() + self.poisoned.len();
        for (_, slot) in self.actors.drain() {
            slot.addr.do_send(StandDown);
        }
        for (_, parked) in self.parked.drain() {
            metrics.parked_volumes.dec();
            metrics.nvme_connections_active.dec();
            self.deps.node_limit.release(&parked.node);
        }
        metrics.poisoned_volumes.sub(self.poisoned.len() as i64);
        self.poisoned.clear();
        self.routers.retain(|router| {
            let Some(cache) = router.upgrade() else {
                return false;
            };
            cache.write().unwrap_or_else(|p| p.into_inner()).clear();
            true
        });
        dropped
    }
}

impl Handler<ListHolders> for Supervisor {
    type Result = MessageResult<ListHolders>;

    fn handle(&mut self, _: ListHolders, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(HolderNodes {
            parked: self.parked.values().map(|p| p.node.clone()).collect(),
            actors: self
                .actors
                .values()
                .filter(|s| !s.retirement.is_retired() && s.addr.connected())
                .map(|s| s.addr.clone())
                .collect(),
        })
    }
}

impl Handler<ClearStale> for Supervisor {
    type Result = usize;

    /// A parked volume is woken only if its holder is the gone node and was attached before the
    /// 404's GET was sent (a parked record is confirmed at its attach: any later Publish woke
    /// it); its actor then makes the same check as every live one.
    fn handle(&mut self, ClearStale(gone): ClearStale, ctx: &mut Context<Self>) -> usize {
        if self.term.is_none() {
            return 0;
        }
        let held: Vec<VolumeId> = self
            .parked
            .iter()
            .filter(|(_, p)| p.node == gone.node && p.attached_at < gone.asked_at)
            .map(|(v, _)| v.clone())
            .collect();
        for volume in &held {
            self.wake(volume, None, ctx);
        }
        let mut sent = 0;
        for slot in self.actors.values() {
            if !slot.retirement.is_retired() && slot.addr.connected() {
                slot.addr.do_send(DropStale(gone.clone()));
                sent += 1;
            }
        }
        sent
    }
}
