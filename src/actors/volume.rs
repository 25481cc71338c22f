//! Owns the attachment state of one volume; nothing else mutates it.
//!
//! The actor is glue: it runs the cluster and backend checks a message needs, calls the pure
//! rules in [`super::state`], arms or cancels its two timers, and hands side effects to metrics
//! and the cluster sink. Handlers that await I/O use `AtomicResponse`, so the mailbox stays
//! blocked and operations on one volume never interleave.
//!
//! Publish asks the backend about its volume once, then answers from what it kept: the volume
//! is deleted only through this actor, so what it kept is true until its own Delete.
//!
//! Each actor serves one term of this controller (see [`crate::role`]): a Publish, Unpublish or
//! Delete admitted in another term is refused with UNAVAILABLE before anything changes. A
//! Publish's backend read and live checks share one deadline; past it nothing changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use actix::prelude::*;
use tokio::time::Instant;

use super::messages::{
    Delete, Describe, DropStale, GraceExpired, Holders, MigrationTimeout, Publish, Published,
    Reaped, Settled, StandDown, Traced, Unpublish,
};
use super::state::{Attachment, DropReason, Effect, MigrationResult, PublishRequest, VolumeState};
use super::{other_term, VolumeDeps, LIVE_CHECK_BUDGET};
use crate::domain::{attach_instant_text, PUBLISH_ATTACHED_AT_KEY, PUBLISH_READONLY_KEY};
use crate::ids::{NodeId, VolumeId};
use crate::kube::{ClusterEvent, HolderStatus};
use crate::role::Term;
use crate::Error;

/// At most one AttachmentConflict event per volume per this interval.
const CONFLICT_EVENT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a volume actor retired (stopped on purpose with nothing left to keep). The actor sets
/// it before it stops; the supervisor reads it when it finds the actor's address disconnected, to
/// tell a retirement from a death (see the supervisor's module docs). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Retirement(Arc<AtomicBool>);

impl Retirement {
    pub fn is_retired(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    fn mark(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

pub struct VolumeActor {
    id: VolumeId,
    /// The term this actor serves; messages of any other are refused.
    term: Term,
    state: VolumeState,
    deps: Arc<VolumeDeps>,
    supervisor: Recipient<Reaped>,
    migration_timer: Option<(Instant, SpawnHandle)>,
    grace_timer: Option<(Instant, SpawnHandle)>,
    /// Set once the actor decided to stop; every later message answers `Error::Retired`.
    retired: bool,
    /// `retired`, as the supervisor sees it.
    retirement: Retirement,
    last_conflict_event: Option<Instant>,
    /// Effects found while seeding, applied once the actor runs.
    pending: Vec<Effect>,
    /// Woken from a parked record, whose attachment the connections gauge already counts.
    unparked: bool,
    /// The volume's publish_context, once the backend has confirmed the volume exists. Dropped
    /// when a Delete fails (the volume may be half gone); a Delete that succeeds retires the
    /// actor.
    publish_context: Option<HashMap<String, String>>,
}

impl VolumeActor {
    pub fn new(
        id: VolumeId,
        term: Term,
        state: VolumeState,
        deps: Arc<VolumeDeps>,
        supervisor: Recipient<Reaped>,
    ) -> Self {
        Self {
            id,
            term,
            state,
            deps,
            supervisor,
            migration_timer: None,
            grace_timer: None,
            retired: false,
            retirement: Retirement::default(),
            last_conflict_event: None,
            pending: Vec::new(),
            unparked: false,
            publish_context: None,
        }
    }

    /// An actor rebuilt from VolumeAttachments; `effects` are what seeding found (migrations in
    /// flight, over-attachment) and are applied when it starts.
    pub fn seeded(
        id: VolumeId,
        term: Term,
        state: VolumeState,
        effects: Vec<Effect>,
        deps: Arc<VolumeDeps>,
        supervisor: Recipient<Reaped>,
    ) -> Self {
        let mut actor = Self::new(id, term, state, deps, supervisor);
        actor.pending = effects;
        actor
    }

    /// The actor of a volume the supervisor parked at seeding (one settled attachment), started
    /// by the first message for it.
    pub fn unparked(
        id: VolumeId,
        term: Term,
        state: VolumeState,
        deps: Arc<VolumeDeps>,
        supervisor: Recipient<Reaped>,
    ) -> Self {
        let mut actor = Self::new(id, term, state, deps, supervisor);
        actor.unparked = true;
        actor
    }

    /// What the supervisor keeps to tell, once this actor stopped, whether it retired.
    pub fn retirement(&self) -> Retirement {
        self.retirement.clone()
    }

    fn class_label(&self) -> &'static str {
        match (self.state.nodes().len(), self.state.migration().is_some()) {
            (0, _) if self.state.grace().is_some() => "grace",
            (0, _) => "idle",
            (_, true) => "migrating",
            _ => "attached",
        }
    }

    /// Re-labels this actor in the volume_actors gauge and the attached-volumes gauge.
    fn track(&self, before: &'static str, was_attached: bool) {
        let after = if self.retired {
            "stopped"
        } else {
            self.class_label()
        };
        if before != after {
            let m = &self.deps.metrics;
            let gauge = |state| m.volume_actors_in(state);
            if before != "stopped" {
                gauge(before).dec();
            }
            if after != "stopped" {
                gauge(after).inc();
            }
        }
        let attached = !self.state.nodes().is_empty();
        match (was_attached, attached) {
            (false, true) => self.deps.metrics.nvme_connections_active.inc(),
            (true, false) => self.deps.metrics.nvme_connections_active.dec(),
            _ => {}
        }
    }

    /// Arms, re-arms or cancels the timers so they match the state's deadlines.
    fn sync_timers(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let want = self.state.migration_deadline();
        if self.migration_timer.as_ref().map(|(at, _)| *at) != want {
            if let Some((_, handle)) = self.migration_timer.take() {
                ctx.cancel_future(handle);
            }
            if let Some(at) = want {
                let handle = ctx.notify_later(MigrationTimeout, at.saturating_duration_since(now));
                self.migration_timer = Some((at, handle));
            }
        }
        // A grace timer stays armed when the grace ends (a Publish) or moves later (another
        // Unpublish): its handler reads the state and re-arms for what is left. So a volume that
        // attaches and detaches many times within a grace period arms one timer, not one per
        // detach. One that would fire after the new deadline is replaced.
        let want = self.state.grace_deadline();
        let armed = self.grace_timer.as_ref().map(|(at, _)| *at);
        let keep = match (armed, want) {
            (Some(at), Some(want)) => at <= want,
            (Some(_), None) => true,
            (None, want) => want.is_none(),
        };
        if !keep {
            if let Some((_, handle)) = self.grace_timer.take() {
                ctx.cancel_future(handle);
            }
            if let Some(at) = want {
                let handle = ctx.notify_later(GraceExpired, at.saturating_duration_since(now));
                self.grace_timer = Some((at, handle));
            }
        }
    }

    /// Stops the actor for good and tells the supervisor, which forgets this address. Marks the
    /// retirement first, so whoever sees this address disconnected knows it retired.
    fn retire(&mut self, ctx: &mut Context<Self>) {
        if self.retired {
            return;
        }
        let before = self.class_label();
        self.retired = true;
        self.retirement.mark();
        self.track(before, !self.state.nodes().is_empty());
        self.supervisor.do_send(Reaped {
            volume: self.id.clone(),
            addr: ctx.address(),
        });
        ctx.stop();
    }

    /// After a message: re-arm timers, and retire if nothing is left worth keeping.
    fn settle(&mut self, ctx: &mut Context<Self>) {
        self.sync_timers(ctx);
        if self.state.is_idle() {
            self.retire(ctx);
        }
    }

    fn apply(&mut self, effects: Vec<Effect>) {
        if effects.is_empty() {
            return;
        }
        let m = &self.deps.metrics;
        let sink = &self.deps.sink;
        let id = &self.id;
        let mut membership_changed = false;
        for effect in effects {
            match effect {
                Effect::Attached { node } => {
                    membership_changed = true;
                    m.attach_series.attached.inc();
                    tracing::info!(volume_id = %id, node_id = %node, "attached");
                    sink.event(id, ClusterEvent::VolumeAttached { node });
                }
                Effect::Handoff { from } => {
                    m.grace_period_used_total.inc();
                    tracing::info!(volume_id = %id, from = %from, "handoff from a released node");
                }
                Effect::StaleCleared { node } => {
                    membership_changed = true;
                    m.stale_cleared_total.inc();
                    m.attachment_reconcile_total
                        .with_label_values(&[crate::metrics::RECONCILE_CLEAR_STALE])
                        .inc();
                    tracing::warn!(volume_id = %id, node_id = %node, "cleared attachment to deleted node");
                    sink.event(id, ClusterEvent::StaleAttachmentCleared { node });
                }
                Effect::Detached { node, remaining } => {
                    membership_changed = true;
                    m.attach_series.detached.inc();
                    tracing::info!(volume_id = %id, node_id = %node, remaining = remaining.len(), "detached");
                    if remaining.is_empty() {
                        sink.event(id, ClusterEvent::VolumeDetached { node });
                    }
                }
                Effect::MigrationStarted {
                    source,
                    target,
                    timeout,
                } => {
                    m.active_migrations.inc();
                    tracing::info!(volume_id = %id, %source, %target, timeout_s = timeout.as_secs(), "migration started");
                    sink.event(id, ClusterEvent::MigrationStarted { source, target });
                }
                Effect::MigrationEnded {
                    source,
                    target,
                    detached,
                    result,
                    elapsed,
                    counted,
                } => {
                    m.active_migrations.dec();
                    tracing::info!(volume_id = %id, %source, %target, %detached, result = result.label(), counted,
                        elapsed_s = elapsed.as_secs_f64(), "migration ended");
                    if counted {
                        m.migrations_total
                            .with_label_values(&[result.label()])
                            .inc();
                        match result {
                            MigrationResult::Success => {
                                m.migration_duration.observe(elapsed.as_secs_f64());
                                sink.event(id, ClusterEvent::MigrationCompleted { source, target });
                            }
                            MigrationResult::Failed | MigrationResult::Timeout => {
                                sink.event(
                                    id,
                                    ClusterEvent::MigrationFailed {
                                        source,
                                        target,
                                        timed_out: false,
                                        direction_known: true,
                                    },
                                );
                            }
                            MigrationResult::Unknown => {
                                let stayed = if detached == source { target } else { source };
                                sink.event(id, ClusterEvent::MigrationEnded { detached, stayed });
                            }
                        }
                    }
                }
                Effect::MigrationTimedOut {
                    source,
                    target,
                    direction_known,
                } => {
                    m.migrations_total
                        .with_label_values(&[MigrationResult::Timeout.label()])
                        .inc();
                    tracing::warn!(volume_id = %id, %source, %target, direction_known, "migration timed out; both nodes stay attached until one detaches");
                    sink.event(
                        id,
                        ClusterEvent::MigrationFailed {
                            source,
                            target,
                            timed_out: true,
                            direction_known,
                        },
                    );
                }
                Effect::MigrationDirectionUnknown { nodes } => {
                    tracing::warn!(volume_id = %id, nodes = ?nodes,
                        "rebuilt a live migration whose direction is unknown: its VolumeAttachments share one \
                         creationTimestamp second without attach instants on both to order them; when one \
                         side detaches it is counted as result \"unknown\"");
                }
                Effect::OverAttached { nodes } => {
                    m.over_attached_total.inc();
                    tracing::warn!(volume_id = %id, nodes = ?nodes, "volume is attached to more nodes than its access class allows; keeping all and refusing more");
                    sink.event(id, ClusterEvent::OverAttached { nodes });
                }
            }
        }
        if membership_changed {
            match self.state.nodes().first() {
                Some(primary) => sink.annotate(id, Some((&primary.node, primary.attached_wall))),
                None => sink.annotate(id, None),
            }
        }
    }

    /// The nodes holding the volume, when the per-node limit needs them.
    fn holders(&self) -> Vec<crate::ids::NodeId> {
        if !self.deps.node_limit.enabled() {
            return Vec::new();
        }
        self.state.nodes().iter().map(|a| a.node.clone()).collect()
    }

    /// Gives back the per-node slots of holders that are gone since `before`.
    fn release_dropped(&self, before: &[crate::ids::NodeId]) {
        for node in before {
            if !self.state.nodes().iter().any(|a| a.node == *node) {
                self.deps.node_limit.release(node);
            }
        }
    }

    /// Runs the publish rule; with a per-node limit, a publish that would add a holder first
    /// runs on a copy of the state and is committed only once the node's slot is reserved, so
    /// the rules' own refusals keep their precedence and a refused publish changes nothing.
    fn publish_within_limit(
        &mut self,
        req: &super::state::PublishRequest,
        now: Instant,
    ) -> Result<super::state::Published, Error> {
        let limit = &self.deps.node_limit;
        let adds = limit.enabled() && !self.state.nodes().iter().any(|a| a.node == req.node);
        if !adds {
            return self.state.publish(req, now, SystemTime::now());
        }
        let mut trial = self.state.clone();
        let outcome = trial.publish(req, now, SystemTime::now())?;
        limit.reserve(&req.node)?;
        self.state = trial;
        Ok(outcome)
    }

    fn refused(&mut self, err: &Error) {
        if let Error::Conflict { .. } | Error::MigrationLimit { .. } = err {
            self.deps.metrics.conflicts_total.inc();
            tracing::info!(volume_id = %self.id, error = %err, "publish refused");
            let now = Instant::now();
            let due = self
                .last_conflict_event
                .is_none_or(|last| now.saturating_duration_since(last) >= CONFLICT_EVENT_INTERVAL);
            if due {
                self.last_conflict_event = Some(now);
                self.deps.sink.event(
                    &self.id,
                    ClusterEvent::AttachmentConflict {
                        message: err.to_string(),
                    },
                );
            }
        }
    }
}

impl Actor for VolumeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.deps
            .metrics
            .volume_actors
            .with_label_values(&[self.class_label()])
            .inc();
        if !self.state.nodes().is_empty() && !self.unparked {
            self.deps.metrics.nvme_connections_active.inc();
        }
        if self.state.migration().is_some() {
            self.deps.metrics.active_migrations.inc();
        }
        let pending = std::mem::take(&mut self.pending);
        self.apply(pending);
        self.sync_timers(ctx);
    }
}

fn retired<T: 'static>() -> AtomicResponse<VolumeActor, Result<T, Error>> {
    AtomicResponse::new(Box::pin(actix::fut::ready(Err(Error::Retired))))
}

/// Runs the inner message's handler inside the caller's span.
macro_rules! traced {
    ($($msg:ty),*) => {$(
        impl Handler<Traced<$msg>> for VolumeActor {
            type Result = <VolumeActor as Handler<$msg>>::Result;

            fn handle(&mut self, traced: Traced<$msg>, ctx: &mut Context<Self>) -> Self::Result {
                let _entered = traced.span.enter();
                <Self as Handler<$msg>>::handle(self, traced.msg, ctx)
            }
        }
    )*};
}
traced!(Unpublish, Delete, Describe);

/// What the live checks of one Publish found.
struct Checked {
    /// Nodes a live read shows attached to a holderless volume whose Node and
    /// VolumeAttachment rules 5.1 and 5.2 confirm (see [`live_checks`]): they are taken as
    /// holders.
    found: Vec<NodeId>,
    /// Rules 5.1 and 5.2 for each blocking holder.
    verdicts: Vec<(NodeId, HolderStatus)>,
}

/// Publish step 2 (the node exists); with `recheck` (a holderless volume inside its term's first
/// lease duration, rules "High availability"), the other nodes a live read of its
/// VolumeAttachments shows attached, which then block like holders; and for each holder in
/// `blockers` and each node found, rules 5.1 and 5.2. Each may be a live API call; the caller
/// bounds them all with one deadline. Any error fails the publish closed (UNAVAILABLE).
///
/// A node found whose Node is gone or whose VolumeAttachment is released is not taken: it was
/// never a holder of this term, so nothing is cleared (no stale count, no event). The stale
/// reconciler may already have cleared and counted that very attachment in this term, when it
/// was a seeded holder.
async fn live_checks(
    deps: &VolumeDeps,
    id: &VolumeId,
    node: NodeId,
    blockers: Vec<NodeId>,
    recheck: bool,
) -> Result<Checked, Error> {
    let known = deps
        .nodes
        .exists(&node)
        .await
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    if !known {
        return Err(Error::NodeNotFound(node));
    }
    let found = if recheck {
        deps.authority
            .attached_elsewhere(id, &node)
            .await
            .map_err(|e| {
                Error::Unavailable(format!(
                    "cannot read which other nodes hold volume {id} (this controller's term \
                     began less than a lease duration ago): {e}"
                ))
            })?
    } else {
        Vec::new()
    };
    let check = |holder: NodeId| async move {
        match deps.authority.check(id, &holder).await {
            Ok(status) => Ok((holder, status)),
            Err(e) => Err(Error::Unavailable(format!(
                "cannot confirm node {holder} still holds volume {id}: {e}"
            ))),
        }
    };
    let mut verdicts = Vec::with_capacity(blockers.len());
    for holder in blockers {
        verdicts.push(check(holder).await?);
    }
    let mut taken = Vec::with_capacity(found.len());
    for node in found {
        match check(node).await? {
            (node, HolderStatus::Live) => taken.push(node),
            (node, status) => tracing::info!(volume_id = %id, node_id = %node, ?status,
                "a live read shows this volume attached to a node rules 5.1/5.2 rule out; not taken"),
        }
    }
    Ok(Checked {
        found: taken,
        verdicts,
    })
}

/// Through the Router: the budget runs from when the Router sent it, and ends no later than the
/// caller's own deadline.
impl Handler<Traced<Publish>> for VolumeActor {
    type Result = AtomicResponse<Self, Result<Published, Error>>;

    fn handle(&mut self, traced: Traced<Publish>, _ctx: &mut Context<Self>) -> Self::Result {
        let _entered = traced.span.enter();
        let budget = traced.sent + LIVE_CHECK_BUDGET;
        let deadline = traced.reply_by.map_or(budget, |by| by.min(budget));
        self.publish(traced.msg, deadline)
    }
}

/// Sent straight to the actor: the budget runs from now.
impl Handler<Publish> for VolumeActor {
    type Result = AtomicResponse<Self, Result<Published, Error>>;

    fn handle(&mut self, msg: Publish, _ctx: &mut Context<Self>) -> Self::Result {
        self.publish(msg, Instant::now() + LIVE_CHECK_BUDGET)
    }
}

impl VolumeActor {
    /// Runs the checks Publish needs until `deadline` (the backend read, the live checks, and
    /// inside the term's first-lease-duration window the live read of a holderless volume's
    /// other VolumeAttachments), then the rules. A Publish of another term, an error in any
    /// check, or reaching `deadline` before the rules ran, fails closed: UNAVAILABLE, nothing
    /// changed.
    fn publish(
        &mut self,
        Publish { req, term }: Publish,
        deadline: Instant,
    ) -> AtomicResponse<Self, Result<Published, Error>> {
        if self.retired {
            return retired();
        }
        if term != self.term {
            return AtomicResponse::new(Box::pin(actix::fut::ready(Err(other_term()))));
        }
        let deps = self.deps.clone();
        let id = self.id.clone();
        let node = req.node.clone();
        let blockers = self.state.blockers(&node);
        let kept = self.publish_context.clone();
        // Rules, "High availability": an OK the previous term answered late may be missing from
        // the list this term was seeded from.
        let recheck = self.state.nodes().is_empty()
            && term
                .recheck_until()
                .is_some_and(|until| Instant::now() < until);
        let checks = async move {
            let publish_context = match kept {
                Some(context) => context,
                None => {
                    let volume = deps
                        .backend
                        .get(&id)
                        .await?
                        .ok_or_else(|| Error::VolumeNotFound(id.clone()))?;
                    deps.backend.publish_context(&volume)
                }
            };
            let checked = live_checks(&deps, &id, node, blockers, recheck).await?;
            Ok((publish_context, checked))
        };
        let checks = async move {
            tokio::time::timeout_at(deadline, checks)
                .await
                .map_err(|_| past_deadline())?
        };
        // The backend's waits (an RDS reconnect) know this publish's deadline too.
        let checks = crate::deadline::scope(Some(deadline), checks);
        let span = tracing::Span::current();
        AtomicResponse::new(Box::pin(checks.into_actor(self).map(
            move |checked, act, ctx| {
                let _entered = span.enter();
                let before = act.class_label();
                let was_attached = !act.state.nodes().is_empty();
                let holders_before = act.holders();
                let result = checked.and_then(|(mut publish_context, checked)| {
                    if act.publish_context.is_none() {
                        act.publish_context = Some(publish_context.clone());
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(past_deadline());
                    }
                    let mut effects = Vec::new();
                    if !checked.found.is_empty() {
                        effects.extend(act.adopt(checked.found, &req, now));
                    }
                    for (holder, status) in checked.verdicts {
                        let reason = match status {
                            HolderStatus::Live => continue,
                            HolderStatus::NodeGone => DropReason::Stale,
                            HolderStatus::Released => DropReason::Released,
                        };
                        effects.extend(act.state.drop_holder(&holder, reason, now));
                    }
                    let outcome = act.publish_within_limit(&req, now);
                    act.apply(effects);
                    let published = outcome.inspect_err(|e| act.refused(e))?;
                    act.apply(published.effects);
                    if req.readonly {
                        publish_context.insert(PUBLISH_READONLY_KEY.into(), "true".into());
                    }
                    if let Some(at) = published.attached_at {
                        publish_context
                            .insert(PUBLISH_ATTACHED_AT_KEY.into(), attach_instant_text(at));
                    }
                    Ok(Published { publish_context })
                });
                if result.is_err() {
                    act.deps
                        .metrics
                        .attach_total
                        .with_label_values(&["failed"])
                        .inc();
                }
                act.release_dropped(&holders_before);
                act.track(before, was_attached);
                act.settle(ctx);
                result
            },
        )))
    }

    /// Takes the nodes a live read found attached to this holderless volume as its holders, as
    /// seeding would have (rules, Boot seeding 3): counted on their nodes, in the request's
    /// access class (the PV's, which the CO's capability carries), in an order nothing tells
    /// (the read gives names, not ages). The rules then decide the Publish as for any holder,
    /// 5.1 and 5.2 first.
    fn adopt(&mut self, nodes: Vec<NodeId>, req: &PublishRequest, now: Instant) -> Vec<Effect> {
        tracing::warn!(volume_id = %self.id, nodes = ?nodes,
            "a live read shows this volume attached to nodes the seeding list did not (an OK \
             answered late by the previous term); taking them as holders");
        let wall = SystemTime::now();
        let holders: Vec<Attachment> = nodes
            .into_iter()
            .map(|node| Attachment {
                node,
                attached_at: now,
                confirmed_at: now,
                attached_wall: wall,
                recorded_instant: false,
                class: req.capability.class(),
                capability: None,
                readonly: false,
            })
            .collect();
        for holder in &holders {
            self.deps.node_limit.add(&holder.node);
        }
        let effects = self.state.adopt(holders, req.migration_timeout);
        if self.state.migration().is_some() {
            self.deps.metrics.active_migrations.inc();
        }
        effects
    }
}

/// The answer of a Publish whose deadline passed before its rules ran.
fn past_deadline() -> Error {
    Error::Unavailable(format!(
        "this publish's backend read and live checks did not finish within their budget \
         ({LIVE_CHECK_BUDGET:?}, or the caller's deadline if sooner); nothing changed, retry"
    ))
}

impl Handler<Unpublish> for VolumeActor {
    type Result = Result<(), Error>;

    fn handle(&mut self, msg: Unpublish, ctx: &mut Context<Self>) -> Self::Result {
        if self.retired {
            return Err(Error::Retired);
        }
        if msg.term != self.term {
            return Err(other_term());
        }
        let before = self.class_label();
        let was_attached = !self.state.nodes().is_empty();
        let holders_before = self.holders();
        let effects = self.state.unpublish(msg.node.as_ref(), Instant::now());
        self.apply(effects);
        self.release_dropped(&holders_before);
        self.track(before, was_attached);
        self.settle(ctx);
        Ok(())
    }
}

impl Handler<Delete> for VolumeActor {
    type Result = AtomicResponse<Self, Result<(), Error>>;

    fn handle(&mut self, Delete(term): Delete, _ctx: &mut Context<Self>) -> Self::Result {
        if self.retired {
            return retired();
        }
        if term != self.term {
            return AtomicResponse::new(Box::pin(actix::fut::ready(Err(other_term()))));
        }
        if !self.state.nodes().is_empty() {
            let nodes = self.state.nodes().iter().map(|a| a.node.clone()).collect();
            return AtomicResponse::new(Box::pin(actix::fut::ready(Err(Error::StillPublished {
                volume: self.id.clone(),
                nodes,
            }))));
        }
        let deps = self.deps.clone();
        let id = self.id.clone();
        let delete = async move { deps.backend.delete(&id).await.map_err(Error::from) };
        AtomicResponse::new(Box::pin(delete.into_actor(self).map(|result, act, ctx| {
            if result.is_ok() {
                act.retire(ctx);
            } else {
                act.publish_context = None;
                act.settle(ctx);
            }
            result
        })))
    }
}

impl Handler<MigrationTimeout> for VolumeActor {
    type Result = ();

    fn handle(&mut self, _: MigrationTimeout, ctx: &mut Context<Self>) {
        self.migration_timer = None;
        if self.retired {
            return;
        }
        let effects = self.state.migration_timeout(Instant::now());
        self.apply(effects);
        self.sync_timers(ctx);
    }
}

impl Handler<GraceExpired> for VolumeActor {
    type Result = ();

    fn handle(&mut self, _: GraceExpired, ctx: &mut Context<Self>) {
        self.grace_timer = None;
        if self.retired {
            return;
        }
        let before = self.class_label();
        if self.state.grace_expired(Instant::now()) {
            self.track(before, false);
            self.retire(ctx);
        } else {
            self.sync_timers(ctx);
        }
    }
}

impl Handler<Describe> for VolumeActor {
    type Result = Result<Option<serde_json::Value>, Error>;

    fn handle(&mut self, _: Describe, _ctx: &mut Context<Self>) -> Self::Result {
        if self.retired {
            return Err(Error::Retired);
        }
        if self.state.is_idle() {
            return Ok(None);
        }
        Ok(Some(self.state.describe(Instant::now(), SystemTime::now())))
    }
}

impl Handler<Settled> for VolumeActor {
    type Result = ();

    /// A mailbox is read only after `started` returned, so the answer alone is the proof.
    fn handle(&mut self, _: Settled, _ctx: &mut Context<Self>) {}
}

impl Handler<StandDown> for VolumeActor {
    type Result = ();

    /// The controller stood down: the state goes, with everything it counted (the actor gauge,
    /// the attached-volumes gauge, an active migration, per-node slots), and nothing is evented
    /// or annotated. Marked retired first, so nobody takes the stop for a death; the supervisor
    /// has already forgotten this actor.
    fn handle(&mut self, _: StandDown, ctx: &mut Context<Self>) {
        if self.retired {
            return;
        }
        let before = self.class_label();
        let was_attached = !self.state.nodes().is_empty();
        let holders_before = self.holders();
        if self.state.migration().is_some() {
            self.deps.metrics.active_migrations.dec();
        }
        self.state = VolumeState::new(self.deps.grace_period);
        self.release_dropped(&holders_before);
        self.retired = true;
        self.retirement.mark();
        self.track(before, was_attached);
        ctx.stop();
    }
}

impl Handler<Holders> for VolumeActor {
    type Result = Vec<NodeId>;

    fn handle(&mut self, _: Holders, _ctx: &mut Context<Self>) -> Vec<NodeId> {
        if self.retired {
            return Vec::new();
        }
        self.state.nodes().iter().map(|a| a.node.clone()).collect()
    }
}

impl Handler<DropStale> for VolumeActor {
    type Result = ();

    fn handle(&mut self, DropStale(gone): DropStale, ctx: &mut Context<Self>) {
        if self.retired || !self.state.holds(&gone.node) {
            return;
        }
        let before = self.class_label();
        let was_attached = !self.state.nodes().is_empty();
        let holders_before = self.holders();
        let effects = self
            .state
            .drop_stale(&gone.node, gone.asked_at, Instant::now());
        self.apply(effects);
        self.release_dropped(&holders_before);
        self.track(before, was_attached);
        self.settle(ctx);
    }
}
