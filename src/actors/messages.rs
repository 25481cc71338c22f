//! Messages between the gRPC layer, the supervisor and the volume actors. Each is validated
//! before it is built: an actor never sees an unchecked id or an unsupported capability.

use std::collections::HashMap;

use actix::prelude::*;

use super::state::PublishRequest;
use super::volume::VolumeActor;
use crate::ids::{NodeId, VolumeId};
use crate::role::Term;
use crate::Error;

/// A message that changes attachment state, and the term it was admitted in. The [`super::Router`]
/// routes it in that term only, and the volume actor refuses it if it serves another.
pub trait InTerm {
    /// `None` for a message that changes nothing (a [`Describe`]): routed in whatever term
    /// the supervisor serves.
    fn term(&self) -> Option<Term>;
}

/// ControllerPublishVolume for one volume (rules, Publish steps 2 to 6).
///
/// Idempotent: the same node, capability and readonly answer OK with the same publish_context.
/// Errors: `VolumeNotFound`/`NodeNotFound` (NOT_FOUND), `AlreadyExists`, `Conflict` and
/// `MigrationLimit` (FAILED_PRECONDITION), `Unavailable` when a cluster check fails or the
/// backend read and the checks outrun their deadline ([`super::LIVE_CHECK_BUDGET`], or the
/// caller's own deadline if sooner), `NotActive` (UNAVAILABLE) when the actor serves another
/// term. Every refusal changes nothing.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<Published, Error>")]
pub struct Publish {
    pub req: PublishRequest,
    pub term: Term,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    pub publish_context: HashMap<String, String>,
}

/// ControllerUnpublishVolume. `None` detaches from every node. Detaching a node that does not
/// hold the volume succeeds with no side effects. `NotActive` (UNAVAILABLE), nothing changed,
/// when the actor serves another term.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<(), Error>")]
pub struct Unpublish {
    pub node: Option<NodeId>,
    pub term: Term,
}

/// DeleteVolume, serialized with the volume's publishes. FAILED_PRECONDITION (`StillPublished`)
/// while any node holds it; deleting a missing volume succeeds. `NotActive` (UNAVAILABLE),
/// nothing deleted, when the actor serves another term.
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<(), Error>")]
pub struct Delete(pub Term);

impl InTerm for Publish {
    fn term(&self) -> Option<Term> {
        Some(self.term)
    }
}

impl InTerm for Unpublish {
    fn term(&self) -> Option<Term> {
        Some(self.term)
    }
}

impl InTerm for Delete {
    fn term(&self) -> Option<Term> {
        Some(self.0)
    }
}

impl InTerm for Describe {
    fn term(&self) -> Option<Term> {
        None
    }
}

/// The migration timer of the current migration fired.
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub struct MigrationTimeout;

/// The detach grace timer fired.
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub struct GraceExpired;

/// Volume actor: answers once the actor has started, so its gauges are raised, the effects it
/// was seeded with are applied and its timers armed. Changes nothing.
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub struct Settled;

/// The volume's attachment state as JSON (`None` when idle).
#[derive(Clone, Debug, Message)]
#[rtype(result = "Result<Option<serde_json::Value>, Error>")]
pub struct Describe;

/// Supervisor: the live actor for the volume, started (or woken from its parked record) if it
/// has none or its actor retired. A caller that found its actor stopping simply asks again.
/// `Unavailable` if the volume's actor died without retiring (poisoned): that answer is final
/// until the process restarts. `NotActive` (UNAVAILABLE), no actor started or woken, unless the
/// supervisor serves `term` (any term, for `None`; never after a [`Dismiss`]).
#[derive(Message)]
#[rtype(result = "Result<Addr<VolumeActor>, Error>")]
pub struct Route {
    pub volume: VolumeId,
    pub term: Option<Term>,
    /// The arbiter the sender runs on, where a new actor for the volume starts
    /// ([`super::placement`]).
    pub caller: Option<super::placement::Caller>,
}

/// Supervisor: a volume actor retired itself (grace expired, idle, or deleted). Sent before the
/// actor stops.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reaped {
    pub volume: VolumeId,
    pub addr: Addr<VolumeActor>,
}

/// Supervisor: a router's address cache, so reaped actors are dropped from it too.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ShareAddresses(pub std::sync::Weak<super::AddressCache>);

/// Supervisor: one page of the debug view. Of the volumes with a live actor or a parked
/// record whose ids sort after `after`, the first `limit` in id order: their actors, and a
/// description of the parked ones. A page at a time, so the supervisor never describes every
/// volume at once (100k parked views would hold its thread and its memory).
#[derive(Message)]
#[rtype(result = "Listing")]
pub struct ListActors {
    pub after: Option<VolumeId>,
    pub limit: usize,
}

impl ListActors {
    /// The first page.
    pub fn first(limit: usize) -> Self {
        Self { after: None, limit }
    }
}

pub struct Listing {
    pub actors: Vec<(VolumeId, Addr<VolumeActor>)>,
    /// Parked volumes (seeded, one settled attachment, no actor yet), described as an actor
    /// would describe them.
    pub parked: Vec<(VolumeId, serde_json::Value)>,
    /// The last volume of this page, when more follow: the next page's `after`.
    pub next: Option<VolumeId>,
}

/// Supervisor: the live actor for `volume`, if any. Starts one only for a parked volume, which
/// has state to show; never for an unknown one. `Unavailable` for a poisoned volume, as `Route`.
#[derive(Message)]
#[rtype(result = "Result<Option<Addr<VolumeActor>>, Error>")]
pub struct Lookup(pub VolumeId);

/// A message with the caller's tracing span, so what the actor logs carries the RPC's span
/// (volume_id, node_id) although it runs on another thread, the time the caller first sent it,
/// from which a Publish's [`super::LIVE_CHECK_BUDGET`] runs, and the caller's own gRPC
/// deadline if it has one ([`crate::deadline::current`]), which that budget never outlasts.
pub struct Traced<M> {
    pub msg: M,
    pub span: tracing::Span,
    pub sent: tokio::time::Instant,
    pub reply_by: Option<tokio::time::Instant>,
}

impl<M: Message> Message for Traced<M> {
    type Result = M::Result;
}

/// Supervisor: rebuild volume actors from VolumeAttachments for `term` (at boot, or when a term
/// begins). From then on the supervisor and every actor it starts serve `term` only. Answers
/// how many volumes were seeded, once every actor it started has started (a caller that turns
/// ready on the answer shows the seeded migrations in its gauges).
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Seed {
    pub term: Term,
    pub volumes: Vec<crate::kube::seed::SeedVolume>,
}

/// Supervisor: this controller stopped serving attachments (it stood down, or a new term is
/// about to be seeded). Every volume actor stops without any effect (no event, no annotation:
/// standing down is not a detach), parked and poisoned volumes are forgotten, and the routers'
/// caches are emptied. Until the next [`Seed`], `Route` answers `NotActive`, so no call admitted
/// in the old term starts an actor from empty state; after it, only calls of the seeded term are
/// routed. Answers how many volumes were dropped.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Dismiss;

/// Volume actor: stop now, dropping this volume's state (see [`Dismiss`]).
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub struct StandDown;

/// Supervisor: the nodes that hold parked volumes, and every live actor (to ask with
/// [`Holders`]), for the stale-attachment reconciler.
#[derive(Message)]
#[rtype(result = "HolderNodes")]
pub struct ListHolders;

pub struct HolderNodes {
    pub parked: std::collections::HashSet<NodeId>,
    pub actors: Vec<Addr<VolumeActor>>,
}

/// Volume actor: the nodes holding this volume (empty once retired).
#[derive(Clone, Debug, Message)]
#[rtype(result = "Vec<NodeId>")]
pub struct Holders;

/// A Node confirmed deleted: a live GET of it answered 404. `asked_at` is the monotonic instant
/// taken just before that GET was sent. Only an attachment confirmed strictly before it is
/// certainly older than the 404; one made (or answered OK again) at or after it may belong to a
/// Node that re-registered under the same name meanwhile, and is kept (rules, High
/// availability: "only attachments made before that 404 was seen").
#[derive(Clone, Debug)]
pub struct GoneNode {
    pub node: NodeId,
    pub asked_at: tokio::time::Instant,
}

/// Supervisor: one node's Node object is confirmed deleted. Wakes the parked volumes it held
/// from before `asked_at`, and sends [`DropStale`] to every live actor. Answers how many actors
/// it was sent to; ignored (0) while dismissed.
#[derive(Clone, Debug, Message)]
#[rtype(result = "usize")]
pub struct ClearStale(pub GoneNode);

/// Volume actor: drop the node if it holds the volume from before `asked_at`, as rule 5.1 does
/// (counted once, StaleAttachmentCleared posted, a migration involving it resolved). A volume
/// the node does not hold, or holds from `asked_at` on, is untouched.
#[derive(Clone, Debug, Message)]
#[rtype(result = "()")]
pub struct DropStale(pub GoneNode);
