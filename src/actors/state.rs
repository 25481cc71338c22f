//! The attachment state machine of one volume: the rules of ATTACHMENT_RULES.md as plain functions.
//!
//! Owns which nodes hold the volume, its access class, the migration record and the grace record.
//! It has no actix, no I/O and no clock of its own: every function takes `now`, and everything the
//! outside world must learn (metrics, events, annotations) comes back as [`Effect`]s. Timers are
//! derived by the caller from [`VolumeState::migration_deadline`] and [`VolumeState::grace_deadline`].

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::domain::{attach_instant_text, AccessClass, Capability};
use crate::ids::NodeId;
use crate::Error;

/// One node holding the volume.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub node: NodeId,
    pub attached_at: Instant,
    /// The last instant a Publish for this node answered OK: its attach, or a later idempotent
    /// repeat (which confirmed the node exists). A seeded holder starts at `attached_at`. The
    /// stale reconciler drops the holder only if this is older than its Node's 404
    /// ([`VolumeState::drop_stale`]).
    pub confirmed_at: Instant,
    pub attached_wall: SystemTime,
    /// Whether `attached_wall` is this driver's own attach instant, which publish_context
    /// carries under [`crate::domain::PUBLISH_ATTACHED_AT_KEY`]. False only for a holder rebuilt
    /// from a VolumeAttachment that recorded none: `attached_wall` is then the VA's
    /// creationTimestamp (whole seconds), and no instant is invented for its publish_context.
    pub recorded_instant: bool,
    pub class: AccessClass,
    /// `None` for an attachment rebuilt from a VolumeAttachment, which does not record the
    /// capability: the first re-publish from the same node supplies it (rules, Publish 3).
    pub capability: Option<Capability>,
    pub readonly: bool,
}

#[derive(Clone, Debug)]
pub struct Migration {
    pub source: NodeId,
    pub target: NodeId,
    pub started_at: Instant,
    /// `started_at` on the wall clock: the target's attach time.
    pub started_wall: SystemTime,
    pub timeout: Duration,
    pub timed_out: bool,
    /// False when seeding could not tell source from target (rules, Boot seeding 3): `source`
    /// and `target` are then only the two holders, and the end is counted as `Unknown`.
    pub direction_known: bool,
}

#[derive(Clone, Debug)]
pub struct Grace {
    pub last_node: NodeId,
    pub detached_at: Instant,
}

/// A validated ControllerPublishVolume, after the existence checks of step 2.
#[derive(Clone, Debug)]
pub struct PublishRequest {
    pub node: NodeId,
    pub capability: Capability,
    pub readonly: bool,
    pub migration_timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationResult {
    Success,
    Failed,
    Timeout,
    /// One side of a migration whose direction is unknown detached: a success if it was the
    /// source, a rollback if it was the target, and nothing says which.
    Unknown,
}

impl MigrationResult {
    pub fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Unknown => "unknown",
        }
    }
}

/// Why a node was dropped before a publish could go ahead (rules, Publish 5.1 and 5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The node's Node object is gone.
    Stale,
    /// The node's VolumeAttachment is absent or being deleted.
    Released,
}

/// Something the outside world must learn about. Applying effects never changes the state.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    Attached {
        node: NodeId,
    },
    /// Another node takes over from `from`, inside its grace window or because its
    /// VolumeAttachment was released (counts grace_period_used).
    Handoff {
        from: NodeId,
    },
    StaleCleared {
        node: NodeId,
    },
    /// `node` detached. `remaining` is who still holds the volume; empty means fully detached.
    Detached {
        node: NodeId,
        remaining: Vec<NodeId>,
    },
    MigrationStarted {
        source: NodeId,
        target: NodeId,
        timeout: Duration,
    },
    /// A migration ended because `detached` left it. `counted` is false when its timeout
    /// already counted it.
    MigrationEnded {
        source: NodeId,
        target: NodeId,
        detached: NodeId,
        result: MigrationResult,
        elapsed: Duration,
        counted: bool,
    },
    /// The migration timer fired: counted once as `timeout`; the volume stays dual-attached.
    MigrationTimedOut {
        source: NodeId,
        target: NodeId,
        direction_known: bool,
    },
    /// Seeding rebuilt a migration whose direction it cannot tell: its VolumeAttachments
    /// share one creationTimestamp second without attach instants on both to order them.
    MigrationDirectionUnknown {
        nodes: Vec<NodeId>,
    },
    /// Seeding found more holders than the access class allows; kept because it is reality.
    OverAttached {
        nodes: Vec<NodeId>,
    },
}

/// What a successful publish returns.
#[derive(Debug, PartialEq)]
pub struct Published {
    pub effects: Vec<Effect>,
    /// True when the node already held the volume with the same capability: no side effects.
    pub idempotent: bool,
    /// The node's attach instant, for publish_context: the same for every repeat. `None` for a
    /// holder rebuilt from a VolumeAttachment that recorded none.
    pub attached_at: Option<SystemTime>,
}

/// The attachment state of one volume.
#[derive(Clone, Debug)]
pub struct VolumeState {
    nodes: Vec<Attachment>,
    migration: Option<Migration>,
    grace: Option<Grace>,
    grace_period: Duration,
}

impl VolumeState {
    pub fn new(grace_period: Duration) -> Self {
        Self {
            nodes: Vec::new(),
            migration: None,
            grace: None,
            grace_period,
        }
    }

    /// Rebuilds state from attached VolumeAttachments (rules, Boot seeding 3). `holders` must be
    /// sorted oldest first; the oldest is primary. Two holders on a migratable volume are a
    /// migration that started at the newer one's time. `order_known` is false when nothing
    /// orders the holders (seeding found them tied): a migration is then rebuilt with its
    /// direction unknown, and its end is counted as [`MigrationResult::Unknown`].
    pub fn seeded(
        grace_period: Duration,
        holders: Vec<Attachment>,
        migration_timeout: Duration,
        order_known: bool,
    ) -> (Self, Vec<Effect>) {
        let mut state = Self::new(grace_period);
        let mut effects = Vec::new();
        let all_migratable = holders.iter().all(|a| a.class == AccessClass::Migratable);
        if holders.len() == 2 && all_migratable {
            state.migration = Some(Migration {
                source: holders[0].node.clone(),
                target: holders[1].node.clone(),
                started_at: holders[1].attached_at,
                started_wall: holders[1].attached_wall,
                timeout: migration_timeout,
                timed_out: false,
                direction_known: order_known,
            });
            if !order_known {
                effects.push(Effect::MigrationDirectionUnknown {
                    nodes: holders.iter().map(|a| a.node.clone()).collect(),
                });
            }
        } else if holders.len() > 2 || (holders.len() == 2 && !all_migratable) {
            effects.push(Effect::OverAttached {
                nodes: holders.iter().map(|a| a.node.clone()).collect(),
            });
        }
        state.nodes = holders;
        (state, effects)
    }

    /// Takes holders a live read found attached, for a volume with none, as seeding takes them
    /// (rules, Boot seeding 3 and "High availability"). Nothing orders them (the read gives
    /// names, not ages), so two on a migratable volume are a migration of unknown direction.
    /// The grace record goes: the volume is held.
    pub fn adopt(&mut self, holders: Vec<Attachment>, migration_timeout: Duration) -> Vec<Effect> {
        debug_assert!(self.nodes.is_empty());
        let order_known = holders.len() < 2;
        let (state, effects) =
            Self::seeded(self.grace_period, holders, migration_timeout, order_known);
        *self = state;
        effects
    }

    pub fn nodes(&self) -> &[Attachment] {
        &self.nodes
    }

    pub fn migration(&self) -> Option<&Migration> {
        self.migration.as_ref()
    }

    pub fn grace(&self) -> Option<&Grace> {
        self.grace.as_ref()
    }

    pub fn class(&self) -> Option<AccessClass> {
        self.nodes.first().map(|a| a.class)
    }

    /// No holders and no grace record: nothing would be lost if this state were dropped.
    pub fn is_idle(&self) -> bool {
        self.nodes.is_empty() && self.grace.is_none()
    }

    /// When the migration timer must fire, if one must be armed.
    pub fn migration_deadline(&self) -> Option<Instant> {
        self.migration
            .as_ref()
            .filter(|m| !m.timed_out)
            .map(|m| m.started_at + m.timeout)
    }

    /// When the grace timer must fire, if one must be armed.
    pub fn grace_deadline(&self) -> Option<Instant> {
        self.grace
            .as_ref()
            .map(|g| g.detached_at + self.grace_period)
    }

    pub fn holds(&self, node: &NodeId) -> bool {
        self.nodes.iter().any(|a| &a.node == node)
    }

    /// The nodes that stand between `node` and a publish, to be checked against the cluster
    /// (rules, Publish 5.1 and 5.2) before [`Self::publish`] runs. Empty when `node` already
    /// holds the volume: that case never needs the cluster.
    pub fn blockers(&self, node: &NodeId) -> Vec<NodeId> {
        if self.holds(node) {
            return Vec::new();
        }
        self.nodes.iter().map(|a| a.node.clone()).collect()
    }

    /// Drops a holder the cluster says is gone (5.1) or released (5.2), "as if it was never
    /// there". A migration involving it resolves here (source gone: success; target gone:
    /// failed), counted unless its timeout already counted it.
    pub fn drop_holder(&mut self, node: &NodeId, reason: DropReason, now: Instant) -> Vec<Effect> {
        let Some(pos) = self.nodes.iter().position(|a| &a.node == node) else {
            return Vec::new();
        };
        self.nodes.remove(pos);
        let mut effects: Vec<Effect> = self.end_migration(node, now).into_iter().collect();
        match reason {
            DropReason::Stale => effects.push(Effect::StaleCleared { node: node.clone() }),
            DropReason::Released => effects.push(Effect::Handoff { from: node.clone() }),
        }
        effects
    }

    /// The stale reconciler's drop (rules, High availability): `node`'s Node answered 404 to a
    /// GET sent just after `asked_at`. Drops `node` as [`Self::drop_holder`] does only if its
    /// attachment was last confirmed strictly before `asked_at`; a holder attached or answered OK
    /// at or after it may be a Node that re-registered under the same name, and is kept.
    pub fn drop_stale(&mut self, node: &NodeId, asked_at: Instant, now: Instant) -> Vec<Effect> {
        let older = self
            .nodes
            .iter()
            .any(|a| &a.node == node && a.confirmed_at < asked_at);
        if !older {
            return Vec::new();
        }
        self.drop_holder(node, DropReason::Stale, now)
    }

    /// ControllerPublishVolume, steps 3 to 5 of the rules (5.3 onwards: blockers have already
    /// been resolved by the caller).
    ///
    /// Errors: `AlreadyExists` (same node, other capability or readonly), `Conflict`
    /// (exclusive, or another access class) and `MigrationLimit` (two nodes already).
    pub fn publish(
        &mut self,
        req: &PublishRequest,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Published, Error> {
        // Step 3: already on this node.
        if let Some(existing) = self.nodes.iter_mut().find(|a| a.node == req.node) {
            if existing.capability.is_none() && existing.class == req.capability.class() {
                existing.capability = Some(req.capability.clone());
                existing.readonly = req.readonly;
            }
            if existing.capability.as_ref() == Some(&req.capability)
                && existing.readonly == req.readonly
            {
                existing.confirmed_at = existing.confirmed_at.max(now);
                return Ok(Published {
                    effects: Vec::new(),
                    idempotent: true,
                    attached_at: existing.recorded_instant.then_some(existing.attached_wall),
                });
            }
            return Err(Error::AlreadyExists(format!(
                "already published to node {} with a different {}",
                req.node,
                if existing.readonly != req.readonly {
                    "readonly flag"
                } else {
                    "volume capability"
                }
            )));
        }
        let attachment = Attachment {
            node: req.node.clone(),
            attached_at: now,
            confirmed_at: now,
            attached_wall: wall,
            recorded_instant: true,
            class: req.capability.class(),
            capability: Some(req.capability.clone()),
            readonly: req.readonly,
        };
        // Step 4: on no node.
        if self.nodes.is_empty() {
            let mut effects = Vec::new();
            if let Some(grace) = self.grace.take() {
                let inside = now.saturating_duration_since(grace.detached_at) < self.grace_period;
                if inside && grace.last_node != req.node {
                    effects.push(Effect::Handoff {
                        from: grace.last_node,
                    });
                }
            }
            self.nodes.push(attachment);
            effects.push(Effect::Attached {
                node: req.node.clone(),
            });
            return Ok(Published {
                effects,
                idempotent: false,
                attached_at: Some(wall),
            });
        }
        // Step 5.3: exclusive, or a different access class.
        let held_class = self.nodes[0].class;
        let overfull = self.nodes.len() > 2 || (self.nodes.len() == 2 && self.migration.is_none());
        if held_class == AccessClass::Exclusive || req.capability.class() != held_class || overfull
        {
            return Err(Error::Conflict {
                holders: self.nodes.iter().map(|a| a.node.clone()).collect(),
                requested: req.node.clone(),
                exclusive: held_class == AccessClass::Exclusive,
            });
        }
        // Step 5.4: migratable, already on two nodes.
        if self.nodes.len() >= 2 {
            return Err(Error::MigrationLimit {
                nodes: self.nodes.iter().map(|a| a.node.clone()).collect(),
            });
        }
        // Step 5.5: migratable on one node: start a migration.
        let source = self.nodes[0].node.clone();
        self.nodes.push(attachment);
        self.migration = Some(Migration {
            source: source.clone(),
            target: req.node.clone(),
            started_at: now,
            started_wall: wall,
            timeout: req.migration_timeout,
            timed_out: false,
            direction_known: true,
        });
        Ok(Published {
            effects: vec![
                Effect::Attached {
                    node: req.node.clone(),
                },
                Effect::MigrationStarted {
                    source,
                    target: req.node.clone(),
                    timeout: req.migration_timeout,
                },
            ],
            idempotent: false,
            attached_at: Some(wall),
        })
    }

    /// ControllerUnpublishVolume. `None` detaches from every node, newest first, so a migration
    /// in flight is rolled back before the source goes. Never fails: detaching a node that does
    /// not hold the volume is a successful no-op.
    pub fn unpublish(&mut self, node: Option<&NodeId>, now: Instant) -> Vec<Effect> {
        match node {
            Some(node) => self.unpublish_one(node, now),
            None => {
                let order: Vec<NodeId> = self.nodes.iter().rev().map(|a| a.node.clone()).collect();
                order
                    .iter()
                    .flat_map(|n| self.unpublish_one(n, now))
                    .collect()
            }
        }
    }

    fn unpublish_one(&mut self, node: &NodeId, now: Instant) -> Vec<Effect> {
        let Some(pos) = self.nodes.iter().position(|a| &a.node == node) else {
            return Vec::new();
        };
        self.nodes.remove(pos);
        let mut effects: Vec<Effect> = self.end_migration(node, now).into_iter().collect();
        if self.nodes.is_empty() {
            self.grace = Some(Grace {
                last_node: node.clone(),
                detached_at: now,
            });
        }
        effects.push(Effect::Detached {
            node: node.clone(),
            remaining: self.nodes.iter().map(|a| a.node.clone()).collect(),
        });
        effects
    }

    /// Ends the migration `node` takes part in, if any: its source leaving is a success, its
    /// target leaving a rollback, either side of one whose direction is unknown leaving is
    /// `Unknown`. Counted unless its timeout already counted it.
    fn end_migration(&mut self, node: &NodeId, now: Instant) -> Option<Effect> {
        let m = self
            .migration
            .take_if(|m| &m.source == node || &m.target == node)?;
        Some(Effect::MigrationEnded {
            result: if !m.direction_known {
                MigrationResult::Unknown
            } else if &m.source == node {
                MigrationResult::Success
            } else {
                MigrationResult::Failed
            },
            elapsed: now.saturating_duration_since(m.started_at),
            counted: !m.timed_out,
            detached: node.clone(),
            source: m.source,
            target: m.target,
        })
    }

    /// The migration timer fired. Counts the migration once as `timeout`; it stays dual-attached
    /// until the CO detaches one side. A timer that outlived its migration does nothing.
    pub fn migration_timeout(&mut self, now: Instant) -> Vec<Effect> {
        match self.migration.as_mut() {
            Some(m) if !m.timed_out && now >= m.started_at + m.timeout => {
                m.timed_out = true;
                vec![Effect::MigrationTimedOut {
                    source: m.source.clone(),
                    target: m.target.clone(),
                    direction_known: m.direction_known,
                }]
            }
            _ => Vec::new(),
        }
    }

    /// The grace timer fired. Returns true when the volume is still detached and its grace
    /// record is cleared: the actor may be reaped.
    pub fn grace_expired(&mut self, now: Instant) -> bool {
        if !self.nodes.is_empty() {
            return false;
        }
        if let Some(g) = &self.grace {
            if now.saturating_duration_since(g.detached_at) < self.grace_period {
                return false;
            }
        }
        self.grace = None;
        true
    }

    /// A JSON view for `/debug/attachments` and `ctl`.
    pub fn describe(&self, now: Instant, wall: SystemTime) -> serde_json::Value {
        let to_wall = |at: Instant| {
            wall.checked_sub(now.saturating_duration_since(at))
                .unwrap_or(wall)
        };
        let nodes: Vec<_> = self
            .nodes
            .iter()
            .map(|a| {
                serde_json::json!({
                    "node": a.node.as_str(),
                    "attached_at": attach_instant_text(a.attached_wall),
                    "attached_at_exact": a.recorded_instant,
                    "readonly": a.readonly,
                    "access_mode": a.capability.as_ref().map_or("unknown (rebuilt from a VolumeAttachment)".to_string(), |c| format!("{:?}", c.mode())),
                })
            })
            .collect();
        let migration = self.migration.as_ref().map(|m| {
            let left = (m.started_at + m.timeout).saturating_duration_since(now);
            serde_json::json!({
                "source": m.source.as_str(),
                "target": m.target.as_str(),
                "direction_known": m.direction_known,
                "started_at": attach_instant_text(m.started_wall),
                "timeout_seconds": m.timeout.as_secs(),
                "time_left_seconds": left.as_secs_f64(),
                "timed_out": m.timed_out,
            })
        });
        let grace = self.grace.as_ref().map(|g| {
            let left = (g.detached_at + self.grace_period).saturating_duration_since(now);
            serde_json::json!({
                "last_node": g.last_node.as_str(),
                "detached_at": crate::rfc3339(to_wall(g.detached_at)),
                "time_left_seconds": left.as_secs_f64(),
            })
        });
        let mut out = BTreeMap::new();
        out.insert("nodes", serde_json::Value::Array(nodes));
        out.insert(
            "access_class",
            serde_json::to_value(self.class()).unwrap_or_default(),
        );
        out.insert("migration", migration.unwrap_or_default());
        out.insert("grace", grace.unwrap_or_default());
        serde_json::to_value(out).unwrap_or_default()
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
