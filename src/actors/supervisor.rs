//! Owns the map from volume id to volume actor, and nothing of any volume's state.
//!
//! Starts an actor on first use, on the arbiter chosen by the volume id's hash so one slow
//! volume never stalls the others; seeds actors at boot; forgets an actor once it retired. A
//! caller that found an actor stopping hands back its address as `stale`, and gets a new actor:
//! that is how no message is lost to a reap.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use actix::prelude::*;

use super::messages::{ListActors, Lookup, Reaped, Route, Seed};
use super::state::{Attachment, Effect, VolumeState};
use super::volume::VolumeActor;
use super::VolumeDeps;
use crate::ids::VolumeId;

/// Longer than any migration timeout or grace period.
const SEED_AGE_CAP: std::time::Duration = std::time::Duration::from_secs(2 * 3600);

pub struct Supervisor {
    actors: HashMap<VolumeId, Addr<VolumeActor>>,
    /// One arbiter per core. Empty: actors run on the supervisor's own arbiter (tests).
    arbiters: Vec<ArbiterHandle>,
    hasher: std::collections::hash_map::RandomState,
    deps: Arc<VolumeDeps>,
}

impl Supervisor {
    pub fn new(deps: Arc<VolumeDeps>, arbiters: Vec<ArbiterHandle>) -> Self {
        Self {
            actors: HashMap::new(),
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
        MessageResult(self.start_fresh(&msg.volume, ctx))
    }
}

impl Handler<Reaped> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: Reaped, _ctx: &mut Context<Self>) {
        if self.actors.get(&msg.volume) == Some(&msg.addr) {
            self.actors.remove(&msg.volume);
        }
    }
}

impl Handler<ListActors> for Supervisor {
    type Result = MessageResult<ListActors>;

    fn handle(&mut self, _: ListActors, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.actors
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }
}

impl Handler<Lookup> for Supervisor {
    type Result = Option<Addr<VolumeActor>>;

    fn handle(&mut self, Lookup(volume): Lookup, _ctx: &mut Context<Self>) -> Self::Result {
        self.actors.get(&volume).filter(|a| a.connected()).cloned()
    }
}

impl Handler<Seed> for Supervisor {
    type Result = usize;

    /// Holder times are wall-clock creation times; they map onto the monotonic clock so a
    /// migration's deadline keeps counting from the newer VolumeAttachment's creation.
    fn handle(&mut self, Seed(volumes): Seed, ctx: &mut Context<Self>) -> usize {
        let now = tokio::time::Instant::now();
        let wall = std::time::SystemTime::now();
        let count = volumes.len();
        for v in volumes {
            let holders = v
                .holders
                .into_iter()
                .map(|(node, created)| Attachment {
                    node,
                    // Ages beyond two hours all mean "every deadline has passed"; clamping keeps
                    // the subtraction inside the monotonic clock's range.
                    attached_at: now
                        .checked_sub(
                            wall.duration_since(created)
                                .unwrap_or_default()
                                .min(SEED_AGE_CAP),
                        )
                        .unwrap_or(now),
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
