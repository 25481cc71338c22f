//! Owns the map from volume id to volume actor, and nothing of any live volume's state.
//!
//! Starts an actor on first use, on the arbiter chosen by the volume id's hash so one slow
//! volume never stalls the others; seeds actors at boot; forgets an actor once it retired. A
//! caller that found an actor stopping hands back its address as `stale`, and gets a new actor:
//! that is how no message is lost to a reap.
//!
//! Parking: a volume seeded with one settled attachment (no migration, no over-attachment, so
//! no timer and no pending effect) has nothing to do until a message arrives. It is kept as a
//! [`Parked`] record, about a tenth of an actor's memory, and the first message for it starts
//! its actor with exactly the state seeding rebuilt. The record is never changed or consulted for
//! a decision: every change to a volume's state still happens in its one actor.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;

use super::messages::{ListActors, Listing, Lookup, Reaped, Route, Seed, ShareAddresses};
use super::state::{Attachment, Effect, VolumeState};
use super::volume::VolumeActor;
use super::{AddressCache, VolumeDeps};
use crate::domain::AccessClass;
use crate::ids::{NodeId, VolumeId};

/// Longer than any migration timeout or grace period.
const SEED_AGE_CAP: std::time::Duration = std::time::Duration::from_secs(2 * 3600);

/// A seeded volume attached to one node and otherwise settled, waiting for its first message.
struct Parked {
    node: NodeId,
    attached_at: tokio::time::Instant,
    attached_wall: SystemTime,
    class: AccessClass,
}

impl Parked {
    /// The state its actor starts with: what `VolumeState::seeded` rebuilds from one holder.
    fn state(&self, grace_period: Duration) -> VolumeState {
        let holder = Attachment {
            node: self.node.clone(),
            attached_at: self.attached_at,
            attached_wall: self.attached_wall,
            class: self.class,
            capability: None,
            readonly: false,
        };
        // One holder is never a migration and never over-attached, so there are no effects and
        // the timeout is unused.
        let (state, effects) = VolumeState::seeded(grace_period, vec![holder], Duration::ZERO);
        debug_assert!(effects.is_empty() && state.migration().is_none());
        state
    }
}

pub struct Supervisor {
    actors: HashMap<VolumeId, Addr<VolumeActor>>,
    /// Never holds a volume that is also in `actors`.
    parked: HashMap<VolumeId, Parked>,
    /// The routers' address caches, cleaned when an actor is reaped.
    routers: Vec<std::sync::Weak<AddressCache>>,
    /// One arbiter per core. Empty: actors run on the supervisor's own arbiter (tests).
    arbiters: Vec<ArbiterHandle>,
    hasher: std::collections::hash_map::RandomState,
    deps: Arc<VolumeDeps>,
}

impl Supervisor {
    pub fn new(deps: Arc<VolumeDeps>, arbiters: Vec<ArbiterHandle>) -> Self {
        Self {
            actors: HashMap::new(),
            parked: HashMap::new(),
            routers: Vec::new(),
            arbiters,
            hasher: Default::default(),
            deps,
        }
    }

    fn arbiter_for(&self, volume: &VolumeId) -> Option<&ArbiterHandle> {
        if self.arbiters.is_empty() {
            return None;
        }
        let slot = self.hasher.hash_one(volume) % self.arbiters.len() as u64;
        Some(&self.arbiters[slot as usize])
    }

    fn spawn(&self, actor: VolumeActor, volume: &VolumeId) -> Addr<VolumeActor> {
        match self.arbiter_for(volume) {
            Some(arbiter) => VolumeActor::start_in_arbiter(arbiter, move |_| actor),
            None => actor.start(),
        }
    }

    fn start_fresh(&mut self, volume: &VolumeId, ctx: &mut Context<Self>) -> Addr<VolumeActor> {
        let actor = VolumeActor::new(
            volume.clone(),
            VolumeState::new(self.deps.grace_period),
            self.deps.clone(),
            ctx.address().recipient(),
        );
        let addr = self.spawn(actor, volume);
        self.actors.insert(volume.clone(), addr.clone());
        addr
    }

    /// Starts an actor holding rebuilt state (boot seeding). Replaces nothing: seeding runs
    /// before any RPC is served.
    pub fn seed(
        &mut self,
        volume: VolumeId,
        state: VolumeState,
        effects: Vec<Effect>,
        ctx: &mut Context<Self>,
    ) {
        let actor = VolumeActor::seeded(
            volume.clone(),
            state,
            effects,
            self.deps.clone(),
            ctx.address().recipient(),
        );
        let addr = self.spawn(actor, &volume);
        self.actors.insert(volume, addr);
    }

    /// Starts the actor of a parked volume, handing it the seeded state.
    fn wake(&mut self, volume: &VolumeId, ctx: &mut Context<Self>) -> Option<Addr<VolumeActor>> {
        let parked = self.parked.remove(volume)?;
        self.deps.metrics.parked_volumes.dec();
        let actor = VolumeActor::unparked(
            volume.clone(),
            parked.state(self.deps.grace_period),
            self.deps.clone(),
            ctx.address().recipient(),
        );
        let addr = self.spawn(actor, volume);
        self.actors.insert(volume.clone(), addr.clone());
        Some(addr)
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

impl Handler<Route> for Supervisor {
    type Result = MessageResult<Route>;

    fn handle(&mut self, msg: Route, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(addr) = self.actors.get(&msg.volume) {
            let stale = msg.stale.as_ref() == Some(addr);
            if !stale && addr.connected() {
                return MessageResult(addr.clone());
            }
        }
        if let Some(addr) = self.wake(&msg.volume, ctx) {
            return MessageResult(addr);
        }
        MessageResult(self.start_fresh(&msg.volume, ctx))
    }
}

impl Handler<Reaped> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: Reaped, _ctx: &mut Context<Self>) {
        if self.actors.get(&msg.volume) == Some(&msg.addr) {
            self.actors.remove(&msg.volume);
        }
        self.routers.retain(|router| {
            let Some(cache) = router.upgrade() else {
                return false;
            };
            let mut cache = cache.write().unwrap_or_else(|p| p.into_inner());
            if cache.get(&msg.volume) == Some(&msg.addr) {
                cache.remove(&msg.volume);
            }
            true
        });
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

    fn handle(&mut self, _: ListActors, _ctx: &mut Context<Self>) -> Self::Result {
        let (now, wall) = (tokio::time::Instant::now(), SystemTime::now());
        MessageResult(Listing {
            actors: self
                .actors
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            parked: self
                .parked
                .iter()
                .map(|(k, p)| {
                    let view = p.state(self.deps.grace_period).describe(now, wall);
                    (k.clone(), view)
                })
                .collect(),
        })
    }
}

impl Handler<Lookup> for Supervisor {
    type Result = Option<Addr<VolumeActor>>;

    fn handle(&mut self, Lookup(volume): Lookup, ctx: &mut Context<Self>) -> Self::Result {
        match self.actors.get(&volume).filter(|a| a.connected()) {
            Some(addr) => Some(addr.clone()),
            None => self.wake(&volume, ctx),
        }
    }
}

impl Handler<Seed> for Supervisor {
    type Result = usize;

    /// Holder times are wall-clock creation times; they map onto the monotonic clock so a
    /// migration's deadline keeps counting from the newer VolumeAttachment's creation. A volume
    /// with one holder is parked; any other starts its actor now (a migration has a timer to
    /// arm, an over-attachment an event to post).
    fn handle(&mut self, Seed(volumes): Seed, ctx: &mut Context<Self>) -> usize {
        let now = tokio::time::Instant::now();
        let wall = std::time::SystemTime::now();
        // Ages beyond two hours all mean "every deadline has passed"; clamping keeps the
        // subtraction inside the monotonic clock's range.
        let monotonic = |created: SystemTime| {
            now.checked_sub(
                wall.duration_since(created)
                    .unwrap_or_default()
                    .min(SEED_AGE_CAP),
            )
            .unwrap_or(now)
        };
        let count = volumes.len();
        self.parked.reserve(count);
        for v in volumes {
            for (node, _) in &v.holders {
                self.deps.node_limit.add(node);
            }
            if let [(node, created)] = &v.holders[..] {
                let parked = Parked {
                    node: node.clone(),
                    attached_at: monotonic(*created),
                    attached_wall: *created,
                    class: v.class,
                };
                self.park(v.volume, parked);
                continue;
            }
            let holders = v
                .holders
                .into_iter()
                .map(|(node, created)| Attachment {
                    node,
                    attached_at: monotonic(created),
                    attached_wall: created,
                    class: v.class,
                    capability: None,
                    readonly: false,
                })
                .collect();
            let (state, effects) =
                VolumeState::seeded(self.deps.grace_period, holders, v.migration_timeout);
            self.seed(v.volume, state, effects, ctx);
        }
        count
    }
}
