//! A reference model of one volume's attachment state, written from `ATTACHMENT_RULES.md` alone,
//! and a property test that runs random operation sequences against [`VolumeState`] and the
//! model side by side.
//!
//! The model does not read `state.rs`: each branch cites the rule it encodes (Publish 3, 4,
//! 5.1 to 5.5, Unpublish, Boot seeding 3, High availability). It keeps its own clock (a
//! `Duration` on the model's time line), its own holders in attach order, its own migration and
//! grace records, and its own count of migrations started and counted. The test drives the
//! state the way the volume actor does (a holderless volume adopts what a live read found, each
//! blocking holder is dropped on its 5.1/5.2 verdict, then the rules run) and after every
//! operation compares the answer (OK or each refusal), the effects (as a multiset: the rules
//! order none of them), the holders, the migration and grace records, the timer deadlines and
//! the migrations counted.
//!
//! Generated starts cover what boot seeding can build: one to three holders of either access
//! class (a missing PV counts as exclusive), none of them with a known capability, with and
//! without recorded attach instants, ordered or tied (unknown direction), and any age, so a
//! migration may already be past its timeout. Where the rules leave a choice the model takes the
//! safe one, and the branch says so with "Reading:".

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use tokio::time::Instant;

use super::state::{
    Attachment, DropReason, Effect, MigrationResult, PublishRequest, Published, VolumeState,
};
use crate::domain::{migration_timeout, AccessClass, AccessMode, AccessType, Capability};
use crate::ids::NodeId;
use crate::Error;

const GRACE: Duration = Duration::from_secs(30);
const VOLS: usize = 3;
const NODES: usize = 4;
/// Where the operations start on the model's time line, so seeded VolumeAttachments up to
/// `MAX_AGE` seconds old have an attach time on it.
const START: Duration = Duration::from_secs(3_600);
const MAX_AGE: u64 = 400;

/// Wall time of the model's instant zero.
fn wall_at(t: Duration) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_323_045) + t
}

fn label(i: usize) -> NodeId {
    NodeId::try_from(format!("n{i}").as_str()).expect("a node name")
}

fn labels(nodes: &[usize]) -> Vec<NodeId> {
    nodes.iter().copied().map(label).collect()
}

// ---- the rules' vocabulary -----------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Exclusive,
    Migratable,
}

impl Class {
    fn of_impl(self) -> AccessClass {
        match self {
            Class::Exclusive => AccessClass::Exclusive,
            Class::Migratable => AccessClass::Migratable,
        }
    }
}

/// The capabilities a Publish may carry after step 1: three exclusive ones (so "same class,
/// other capability" happens) and the migratable one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cap {
    RwoMount,
    RwoBlock,
    SingleMultiBlock,
    RwxBlock,
}

impl Cap {
    fn capability(self) -> Capability {
        match self {
            Cap::RwoMount => Capability::new(
                AccessMode::SingleNodeWriter,
                AccessType::Mount {
                    fs_type: "ext4".into(),
                    mount_flags: vec![],
                },
            )
            .expect("a supported capability"),
            Cap::RwoBlock => Capability::block(AccessMode::SingleNodeWriter),
            Cap::SingleMultiBlock => Capability::block(AccessMode::SingleNodeMultiWriter),
            Cap::RwxBlock => Capability::block(AccessMode::MultiNodeMultiWriter),
        }
    }

    /// Vocabulary: "Exclusive: any SINGLE_NODE_* access mode"; "Migratable:
    /// MULTI_NODE_MULTI_WRITER with block access type".
    fn class(self) -> Class {
        match self {
            Cap::RwxBlock => Class::Migratable,
            Cap::RwoMount | Cap::RwoBlock | Cap::SingleMultiBlock => Class::Exclusive,
        }
    }
}

/// Publish 5.5: `migrationTimeoutSeconds`, default 300 s, clamped to [30 s, 3600 s]; an
/// unparsable value takes the default. (Boot seeding 3 takes the PV's value the same way.)
fn timeout_of(raw: Option<&str>) -> Duration {
    let secs = match raw {
        Some(text) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => text
            .parse::<u64>()
            .expect("the generator's numbers fit")
            .clamp(30, 3_600),
        _ => 300,
    };
    Duration::from_secs(secs)
}

/// What Publish 5.1 and 5.2 find for one holder, from live reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Live,
    /// 5.1: its Node object is deleted.
    NodeGone,
    /// 5.2: its VolumeAttachment is absent or being deleted.
    Released,
}

// ---- the model -----------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Holder {
    node: usize,
    class: Class,
    /// `None` for a holder rebuilt from a VolumeAttachment, which records no capability.
    cap: Option<Cap>,
    readonly: bool,
    /// Its attach; for a seeded holder its VolumeAttachment's creationTimestamp.
    attached: Duration,
    /// The last instant an answer said this node holds the volume: its attach, or a later OK.
    confirmed: Duration,
    /// The attach instant publish_context carries; `None` when its VolumeAttachment recorded
    /// none (Boot seeding 3: never invented).
    instant: Option<SystemTime>,
}

#[derive(Clone, Debug)]
struct Migration {
    source: usize,
    target: usize,
    started: Duration,
    timeout: Duration,
    timed_out: bool,
    direction_known: bool,
}

#[derive(Clone, Debug)]
struct Grace {
    last: usize,
    detached: Duration,
}

/// One volume as the rules describe it ("Who owns what": the attached nodes in attach order,
/// the access class, the migration record and the grace record).
#[derive(Clone, Debug, Default)]
struct Model {
    holders: Vec<Holder>,
    migration: Option<Migration>,
    grace: Option<Grace>,
    /// Migrations started (or found in flight), and migrations counted. "Every migration is
    /// counted exactly once."
    started: u32,
    counted: u32,
}

/// What the model says a Publish answers.
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    Ok {
        idempotent: bool,
        instant: Option<SystemTime>,
    },
    AlreadyExists,
    Conflict {
        holders: Vec<NodeId>,
        exclusive: bool,
    },
    MigrationLimit(Vec<NodeId>),
}

impl Answer {
    fn of(requested: &NodeId, got: &Result<Published, Error>) -> Result<Self, String> {
        Ok(match got {
            Ok(p) => {
                if p.idempotent && !p.effects.is_empty() {
                    return Err(format!("an idempotent OK with effects: {p:?}"));
                }
                Answer::Ok {
                    idempotent: p.idempotent,
                    instant: p.attached_at,
                }
            }
            Err(Error::AlreadyExists(_)) => Answer::AlreadyExists,
            Err(Error::Conflict {
                holders,
                requested: r,
                exclusive,
            }) if r == requested => Answer::Conflict {
                holders: holders.clone(),
                exclusive: *exclusive,
            },
            Err(Error::MigrationLimit { nodes }) => Answer::MigrationLimit(nodes.clone()),
            Err(e) => return Err(format!("an answer the rules never give here: {e:?}")),
        })
    }
}

/// A volume as boot seeding finds it: its attached VolumeAttachments, oldest first.
#[derive(Clone, Debug)]
struct Seed {
    /// From the PV: ReadWriteMany Block is migratable, anything else (or no PV) exclusive.
    class: Class,
    vas: Vec<SeedVa>,
    /// False when two VolumeAttachments tie and nothing orders them.
    order_known: bool,
    /// The PV's `migrationTimeoutSeconds`.
    timeout: Option<&'static str>,
}

#[derive(Clone, Debug)]
struct SeedVa {
    node: usize,
    /// Seconds between its creationTimestamp and the start of the operations.
    age: u64,
    /// The attach instant it recorded, as nanoseconds into its creation second.
    instant_nanos: Option<u32>,
}

impl SeedVa {
    fn attached(&self) -> Duration {
        START - Duration::from_secs(self.age)
    }

    fn created_wall(&self) -> SystemTime {
        wall_at(self.attached())
    }

    fn instant(&self) -> Option<SystemTime> {
        self.instant_nanos
            .map(|n| self.created_wall() + Duration::from_nanos(u64::from(n)))
    }
}

impl Model {
    fn ids(&self) -> Vec<NodeId> {
        self.holders.iter().map(|h| label(h.node)).collect()
    }

    fn holds(&self, node: usize) -> bool {
        self.holders.iter().any(|h| h.node == node)
    }

    /// Boot seeding 3, for one volume's attached VolumeAttachments, oldest first.
    fn seeded(seed: &Seed) -> (Self, Vec<Effect>) {
        let holders = seed
            .vas
            .iter()
            .map(|va| Holder {
                node: va.node,
                class: seed.class,
                cap: None,
                readonly: false,
                attached: va.attached(),
                confirmed: va.attached(),
                instant: va.instant(),
            })
            .collect();
        let mut model = Model::default();
        let effects = model.take_holders(
            holders,
            seed.class,
            timeout_of(seed.timeout),
            seed.order_known,
        );
        (model, effects)
    }

    /// Boot seeding 3: "The oldest is primary." "Two attached VAs mean a migration is in
    /// progress": source the older, target the newer, started at the newer's creation, with
    /// its direction unknown on an exact tie. "More than two (or two on an exclusive volume):
    /// keep them all", and say so.
    fn take_holders(
        &mut self,
        holders: Vec<Holder>,
        class: Class,
        timeout: Duration,
        order_known: bool,
    ) -> Vec<Effect> {
        let nodes: Vec<NodeId> = holders.iter().map(|h| label(h.node)).collect();
        let mut effects = Vec::new();
        self.grace = None;
        self.migration = None;
        if holders.len() == 2 && class == Class::Migratable {
            self.migration = Some(Migration {
                source: holders[0].node,
                target: holders[1].node,
                started: holders[1].attached,
                timeout,
                timed_out: false,
                direction_known: order_known,
            });
            self.started += 1;
            if !order_known {
                effects.push(Effect::MigrationDirectionUnknown { nodes });
            }
        } else if holders.len() > 2 || (holders.len() == 2 && class == Class::Exclusive) {
            effects.push(Effect::OverAttached { nodes });
        }
        self.holders = holders;
        effects
    }

    /// Publish 5: the nodes whose Node and VolumeAttachment must be checked live before
    /// `node` can have the volume: every holder, unless `node` is one (step 3 decides then).
    fn blockers(&self, node: usize) -> Vec<usize> {
        if self.holds(node) {
            return Vec::new();
        }
        self.holders.iter().map(|h| h.node).collect()
    }

    /// Publish, steps 3 to 5, with what the live checks found: `found` are the nodes a live
    /// read shows attached (read only inside a term's first lease duration, and only for a
    /// holderless volume), `verdicts` what 5.1 and 5.2 found for each node.
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &mut self,
        node: usize,
        cap: Cap,
        readonly: bool,
        timeout: Duration,
        found: &[usize],
        verdicts: &[Verdict; NODES],
        now: Duration,
        wall: SystemTime,
    ) -> (Vec<Effect>, Answer) {
        let mut effects = Vec::new();
        // 3. Volume already on node_id.
        if let Some(h) = self.holders.iter_mut().find(|h| h.node == node) {
            // Reading: a holder rebuilt from a VolumeAttachment has no recorded capability,
            // only the PV's access class. A re-publish in that class is the CO repeating what
            // it published before the restart, and fixes the capability and readonly flag; one
            // of another access class is not the same capability: ALREADY_EXISTS.
            let same = match h.cap {
                Some(held) => held == cap && h.readonly == readonly,
                None => h.class == cap.class(),
            };
            if !same {
                return (effects, Answer::AlreadyExists);
            }
            if h.cap.is_none() {
                h.cap = Some(cap);
                h.readonly = readonly;
            }
            h.confirmed = h.confirmed.max(now);
            let instant = h.instant;
            return (
                effects,
                Answer::Ok {
                    idempotent: true,
                    instant,
                },
            );
        }
        // High availability: in a term's first lease duration a holderless volume goes to a
        // node only after a live read of its other VolumeAttachments. Reading: the nodes it
        // shows attached are holders, taken as Boot seeding 3 takes them, in the request's
        // access class (the PV's), in no known order; the volume is held, so its grace record
        // ends. They then face 5.1 and 5.2 like any holder.
        if self.holders.is_empty() && !found.is_empty() {
            let holders = found
                .iter()
                .map(|&n| Holder {
                    node: n,
                    class: cap.class(),
                    cap: None,
                    readonly: false,
                    attached: now,
                    confirmed: now,
                    instant: None,
                })
                .collect();
            effects.extend(self.take_holders(holders, cap.class(), timeout, found.len() < 2));
        }
        // 5.1 and 5.2, for each other node N holding the volume.
        for n in self.blockers(node) {
            match verdicts[n] {
                Verdict::Live => {}
                // 5.1: "drop N ("stale") ... and go on as if N was never there."
                Verdict::NodeGone => effects.extend(self.drop_holder(n, DropReason::Stale, now)),
                // 5.2: "Drop N as a handoff, count attachment_grace_period_used_total."
                Verdict::Released => effects.extend(self.drop_holder(n, DropReason::Released, now)),
            }
        }
        let holder = Holder {
            node,
            class: cap.class(),
            cap: Some(cap),
            readonly,
            attached: now,
            confirmed: now,
            instant: Some(wall),
        };
        let attached = Answer::Ok {
            idempotent: false,
            instant: Some(wall),
        };
        // 4. Volume on no node (never attached, detached, or every holder dropped by 5.1/5.2):
        // attach as primary; a different node than last_node inside the grace window is a
        // handoff.
        if self.holders.is_empty() {
            if let Some(g) = self.grace.take() {
                let inside = now - g.detached < GRACE;
                if inside && g.last != node {
                    effects.push(Effect::Handoff {
                        from: label(g.last),
                    });
                }
            }
            self.holders.push(holder);
            effects.push(Effect::Attached { node: label(node) });
            return (effects, attached);
        }
        let class = self.holders[0].class;
        // 5.3. "Exclusive volume, or a request of a different access class": a conflict naming
        // the holders.
        if class == Class::Exclusive || cap.class() != class {
            let holders = self.ids();
            return (
                effects,
                Answer::Conflict {
                    holders,
                    exclusive: class == Class::Exclusive,
                },
            );
        }
        // Boot seeding 3: a volume on more nodes than its class allows "refuses any further
        // node". Reading: the Vocabulary allows a migratable volume two nodes "only for the
        // duration of a live migration", so two holders with no migration record (three seeded,
        // one since detached) are over-attached too; 5.4's "migration limit" names a migration.
        // Either way the refusal is FAILED_PRECONDITION, an attachment conflict to an operator.
        let migrating = self.migration.is_some();
        if self.holders.len() > 2 || (self.holders.len() == 2 && !migrating) {
            let holders = self.ids();
            return (
                effects,
                Answer::Conflict {
                    holders,
                    exclusive: false,
                },
            );
        }
        // 5.4. Migratable, already on two nodes.
        if self.holders.len() == 2 {
            return (effects, Answer::MigrationLimit(self.ids()));
        }
        // 5.5. Migratable, on one node: node_id is the target of a migration starting now.
        let source = self.holders[0].node;
        self.holders.push(holder);
        self.migration = Some(Migration {
            source,
            target: node,
            started: now,
            timeout,
            timed_out: false,
            direction_known: true,
        });
        self.started += 1;
        effects.push(Effect::Attached { node: label(node) });
        effects.push(Effect::MigrationStarted {
            source: label(source),
            target: label(node),
            timeout,
        });
        (effects, attached)
    }

    /// Ends the migration `node` takes part in, as the Unpublish rules resolve it: the source
    /// leaving is a success, the target leaving a rollback (failed), either side of one whose
    /// direction is unknown `unknown` (Boot seeding 3). Counted exactly once: not again if its
    /// timer already counted it.
    fn resolve(&mut self, node: usize, now: Duration) -> Option<Effect> {
        let m = self
            .migration
            .take_if(|m| m.source == node || m.target == node)?;
        let result = if !m.direction_known {
            MigrationResult::Unknown
        } else if m.source == node {
            MigrationResult::Success
        } else {
            MigrationResult::Failed
        };
        if !m.timed_out {
            self.counted += 1;
        }
        Some(Effect::MigrationEnded {
            source: label(m.source),
            target: label(m.target),
            detached: label(node),
            result,
            elapsed: now - m.started,
            counted: !m.timed_out,
        })
    }

    /// Publish 5.1 and 5.2: N goes "as if N was never there". Reading: a migration N took part
    /// in ends as if N had detached (so it is counted once); no grace record, since nobody
    /// detached.
    fn drop_holder(&mut self, node: usize, reason: DropReason, now: Duration) -> Vec<Effect> {
        let Some(pos) = self.holders.iter().position(|h| h.node == node) else {
            return Vec::new();
        };
        self.holders.remove(pos);
        let mut effects: Vec<Effect> = self.resolve(node, now).into_iter().collect();
        effects.push(match reason {
            DropReason::Stale => Effect::StaleCleared { node: label(node) },
            DropReason::Released => Effect::Handoff { from: label(node) },
        });
        effects
    }

    /// High availability: the stale reconciler drops a holder only for a Node confirmed
    /// deleted by a live 404 (seen after `asked_at`), and only attachments made before it.
    /// Reading: a later OK for that node (step 2 found its Node) counts as made after it.
    fn drop_stale(&mut self, node: usize, asked_at: Duration, now: Duration) -> Vec<Effect> {
        let older = self
            .holders
            .iter()
            .any(|h| h.node == node && h.confirmed < asked_at);
        if !older {
            return Vec::new();
        }
        self.drop_holder(node, DropReason::Stale, now)
    }

    /// Unpublish. "Empty node_id means detach from every node." Reading: the rules give that
    /// no order; a migration in flight is not completed by it, so the newest holder (its
    /// target) leaves first and the migration counts as rolled back.
    fn unpublish(&mut self, node: Option<usize>, now: Duration) -> Vec<Effect> {
        match node {
            Some(n) => self.unpublish_one(n, now),
            None => {
                let newest_first: Vec<usize> = self.holders.iter().rev().map(|h| h.node).collect();
                newest_first
                    .into_iter()
                    .flat_map(|n| self.unpublish_one(n, now))
                    .collect()
            }
        }
    }

    fn unpublish_one(&mut self, node: usize, now: Duration) -> Vec<Effect> {
        // "Not attached to node_id: OK, with no side effects."
        let Some(pos) = self.holders.iter().position(|h| h.node == node) else {
            return Vec::new();
        };
        self.holders.remove(pos);
        // "Migrating, node_id is the source / the target."
        let mut effects: Vec<Effect> = self.resolve(node, now).into_iter().collect();
        // "Attached only to node_id: the volume becomes detached": the grace record.
        if self.holders.is_empty() {
            self.grace = Some(Grace {
                last: node,
                detached: now,
            });
        }
        effects.push(Effect::Detached {
            node: label(node),
            remaining: self.ids(),
        });
        effects
    }

    /// The migration timer, due at started + timeout: counts the migration once as `timeout`,
    /// sets `timed_out`, and leaves both nodes attached. Before it is due it does nothing.
    fn migration_timer(&mut self, now: Duration) -> Vec<Effect> {
        match self.migration.as_mut() {
            Some(m) if !m.timed_out && now >= m.started + m.timeout => {
                m.timed_out = true;
                self.counted += 1;
                vec![Effect::MigrationTimedOut {
                    source: label(m.source),
                    target: label(m.target),
                    direction_known: m.direction_known,
                }]
            }
            _ => Vec::new(),
        }
    }

    /// "When the grace timer expires and the volume is still detached, the actor is reaped."
    fn grace_timer(&mut self, now: Duration) -> bool {
        if !self.holders.is_empty() {
            return false;
        }
        if self
            .grace
            .as_ref()
            .is_some_and(|g| now - g.detached < GRACE)
        {
            return false;
        }
        self.grace = None;
        true
    }

    fn migration_deadline(&self) -> Option<Duration> {
        self.migration
            .as_ref()
            .filter(|m| !m.timed_out)
            .map(|m| m.started + m.timeout)
    }

    fn grace_deadline(&self) -> Option<Duration> {
        self.grace.as_ref().map(|g| g.detached + GRACE)
    }
}

// ---- generators ----------------------------------------------------------------------------

/// `migrationTimeoutSeconds` as a volume context or PV may carry it.
const TIMEOUTS: &[Option<&str>] = &[
    None,
    Some("0"),
    Some("29"),
    Some("30"),
    Some("31"),
    Some("45"),
    Some("90"),
    Some("300"),
    Some("3600"),
    Some("3601"),
    Some("86400"),
    Some("soon"),
    Some(""),
    Some("1.5"),
    Some("-5"),
];

fn raw_timeout() -> impl Strategy<Value = Option<&'static str>> {
    proptest::sample::select(TIMEOUTS)
}

fn class() -> impl Strategy<Value = Class> {
    prop_oneof![Just(Class::Exclusive), Just(Class::Migratable)]
}

fn seed() -> impl Strategy<Value = Seed> {
    let va = |node: usize| {
        (
            prop_oneof![Just(0u64), Just(30), Just(300), 0..=MAX_AGE],
            proptest::option::of(0u32..1_000_000_000),
        )
            .prop_map(move |(age, instant_nanos)| SeedVa {
                node,
                age,
                instant_nanos,
            })
    };
    let nodes = proptest::sample::subsequence((0..NODES).collect::<Vec<_>>(), 1..=3)
        .prop_shuffle()
        .prop_flat_map(move |nodes| nodes.into_iter().map(va).collect::<Vec<_>>());
    (class(), nodes, proptest::bool::weighted(0.7), raw_timeout()).prop_map(
        |(class, mut vas, order_known, timeout)| {
            vas.sort_by_key(|va| std::cmp::Reverse(va.age));
            Seed {
                class,
                vas,
                order_known,
                timeout,
            }
        },
    )
}

fn start() -> impl Strategy<Value = Option<Seed>> {
    proptest::option::weighted(0.6, seed())
}

fn cap() -> impl Strategy<Value = Cap> {
    prop_oneof![
        2 => Just(Cap::RwoMount),
        1 => Just(Cap::RwoBlock),
        1 => Just(Cap::SingleMultiBlock),
        4 => Just(Cap::RwxBlock),
    ]
}

fn verdict() -> impl Strategy<Value = Verdict> {
    prop_oneof![
        8 => Just(Verdict::Live),
        1 => Just(Verdict::NodeGone),
        1 => Just(Verdict::Released),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Publish {
        vol: usize,
        node: usize,
        cap: Cap,
        readonly: bool,
        timeout: Option<&'static str>,
        /// Non-empty: inside the term's first lease duration, a live read of a holderless
        /// volume's VolumeAttachments shows these nodes attached (the requester is left out).
        found: Vec<usize>,
        /// What 5.1 and 5.2 find for each node.
        verdicts: [Verdict; NODES],
    },
    Unpublish {
        vol: usize,
        node: Option<usize>,
    },
    /// The stale reconciler saw `node`'s Node answer 404 to a GET sent `asked_back` seconds ago.
    DropStale {
        vol: usize,
        node: usize,
        asked_back: u64,
    },
    Advance {
        secs: u64,
    },
    /// The volume's migration timer fires now (early, on time or late: the state must judge).
    MigrationTimer {
        vol: usize,
    },
    /// The volume's grace timer fires now.
    GraceTimer {
        vol: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let found = prop_oneof![
        4 => Just(Vec::new()),
        1 => proptest::sample::subsequence((0..NODES).collect::<Vec<_>>(), 1..=3),
    ];
    let publish = (
        0..VOLS,
        0..NODES,
        cap(),
        proptest::bool::weighted(0.15),
        raw_timeout(),
        found,
        proptest::array::uniform4(verdict()),
    )
        .prop_map(
            |(vol, node, cap, readonly, timeout, found, verdicts)| Op::Publish {
                vol,
                node,
                cap,
                readonly,
                timeout,
                found: found.into_iter().filter(|&n| n != node).collect(),
                verdicts,
            },
        );
    prop_oneof![
        5 => publish,
        3 => (0..VOLS, proptest::option::weighted(0.9, 0..NODES))
            .prop_map(|(vol, node)| Op::Unpublish { vol, node }),
        1 => (0..VOLS, 0..NODES, 0u64..=60)
            .prop_map(|(vol, node, asked_back)| Op::DropStale { vol, node, asked_back }),
        2 => prop_oneof![Just(GRACE.as_secs()), Just(30u64), Just(300), 0u64..90]
            .prop_map(|secs| Op::Advance { secs }),
        1 => (0..VOLS).prop_map(|vol| Op::MigrationTimer { vol }),
        1 => (0..VOLS).prop_map(|vol| Op::GraceTimer { vol }),
    ]
}

// ---- the harness ---------------------------------------------------------------------------

/// The case count: `PROPTEST_CASES` when set (a number, or the test fails), else 512.
fn parse_cases(raw: Option<&str>) -> Result<u32, String> {
    match raw {
        None => Ok(512),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|e| format!("PROPTEST_CASES={v:?} is not a case count: {e}")),
    }
}

fn cases() -> u32 {
    let raw = match std::env::var("PROPTEST_CASES") {
        Ok(v) => Some(v),
        Err(std::env::VarError::NotPresent) => None,
        Err(e) => panic!("PROPTEST_CASES: {e}"),
    };
    parse_cases(raw.as_deref()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn proptest_cases_default_to_512_and_garbage_is_an_error() {
    assert_eq!(parse_cases(None), Ok(512));
    assert_eq!(parse_cases(Some("250")), Ok(250));
    assert!(parse_cases(Some("10k")).is_err());
    assert!(parse_cases(Some("")).is_err());
}

/// The model's own timeout parse against the one the driver uses, on every generated value
/// (Publish 5.5). Catches: removing the clamp in `domain::migration_timeout`.
#[test]
fn the_migration_timeout_follows_rule_5_5() {
    for raw in TIMEOUTS {
        assert_eq!(migration_timeout(*raw).0, timeout_of(*raw), "{raw:?}");
    }
}

/// Equal as multisets: the rules order no effects within one operation.
fn same_effects(got: &[Effect], want: &[Effect]) -> bool {
    let mut rest: Vec<&Effect> = want.iter().collect();
    got.len() == want.len()
        && got.iter().all(|g| match rest.iter().position(|w| *w == g) {
            Some(i) => {
                rest.swap_remove(i);
                true
            }
            None => false,
        })
}

/// The attachments the volume actor builds from a live read (and seeding from the
/// VolumeAttachments): no capability, and an instant only where one was recorded.
fn seeded_state(seed: &Seed, origin: Instant) -> (VolumeState, Vec<Effect>) {
    let holders = seed
        .vas
        .iter()
        .map(|va| Attachment {
            node: label(va.node),
            attached_at: origin + va.attached(),
            confirmed_at: origin + va.attached(),
            attached_wall: va.instant().unwrap_or(va.created_wall()),
            recorded_instant: va.instant_nanos.is_some(),
            class: seed.class.of_impl(),
            capability: None,
            readonly: false,
        })
        .collect();
    VolumeState::seeded(
        GRACE,
        holders,
        migration_timeout(seed.timeout).0,
        seed.order_known,
    )
}

/// Every part of one volume's state against its model.
fn same(s: &VolumeState, m: &Model, origin: Instant, vol: usize) -> Result<(), TestCaseError> {
    let got: Vec<_> = s
        .nodes()
        .iter()
        .map(|a| {
            (
                a.node.clone(),
                a.class,
                a.capability.clone(),
                a.readonly,
                a.attached_at,
            )
        })
        .collect();
    let want: Vec<_> = m
        .holders
        .iter()
        .map(|h| {
            (
                label(h.node),
                h.class.of_impl(),
                h.cap.map(Cap::capability),
                h.readonly,
                origin + h.attached,
            )
        })
        .collect();
    prop_assert_eq!(
        got,
        want,
        "holders of volume {} (left: the state, right: the model)",
        vol
    );
    prop_assert_eq!(
        s.class(),
        m.holders.first().map(|h| h.class.of_impl()),
        "access class of volume {}",
        vol
    );
    let got = s.migration().map(|x| {
        (
            x.source.clone(),
            x.target.clone(),
            x.started_at,
            x.timeout,
            x.timed_out,
            x.direction_known,
        )
    });
    let want = m.migration.as_ref().map(|x| {
        (
            label(x.source),
            label(x.target),
            origin + x.started,
            x.timeout,
            x.timed_out,
            x.direction_known,
        )
    });
    prop_assert_eq!(
        got,
        want,
        "migration of volume {} (left: the state, right: the model)",
        vol
    );
    let got = s.grace().map(|g| (g.last_node.clone(), g.detached_at));
    let want = m
        .grace
        .as_ref()
        .map(|g| (label(g.last), origin + g.detached));
    prop_assert_eq!(got, want, "grace record of volume {}", vol);
    prop_assert_eq!(
        s.migration_deadline(),
        m.migration_deadline().map(|d| origin + d),
        "migration deadline of volume {}",
        vol
    );
    prop_assert_eq!(
        s.grace_deadline(),
        m.grace_deadline().map(|d| origin + d),
        "grace deadline of volume {}",
        vol
    );
    prop_assert_eq!(
        s.is_idle(),
        m.holders.is_empty() && m.grace.is_none(),
        "idle (reapable) volume {}",
        vol
    );
    Ok(())
}

fn count_resolutions(effects: &[Effect]) -> u32 {
    effects
        .iter()
        .filter(|e| {
            matches!(
                e,
                Effect::MigrationEnded { counted: true, .. } | Effect::MigrationTimedOut { .. }
            )
        })
        .count() as u32
}

/// One Publish as the volume actor runs it: a holderless volume adopts what the live read
/// found, each blocker is dropped on its verdict, then the rules.
fn publish_like_the_actor(
    s: &mut VolumeState,
    req: &PublishRequest,
    found: &[usize],
    verdicts: &[Verdict; NODES],
    now: Instant,
    wall: SystemTime,
) -> (Vec<Effect>, Result<Published, Error>) {
    let mut effects = Vec::new();
    let mut blockers = s.blockers(&req.node);
    if s.nodes().is_empty() && !found.is_empty() {
        let holders = found
            .iter()
            .map(|&n| Attachment {
                node: label(n),
                attached_at: now,
                confirmed_at: now,
                attached_wall: wall,
                recorded_instant: false,
                class: req.capability.class(),
                capability: None,
                readonly: false,
            })
            .collect();
        effects.extend(s.adopt(holders, req.migration_timeout));
        blockers.extend(labels(found));
    }
    for holder in blockers {
        let n: usize = holder.as_str()[1..].parse().expect("a generated node");
        let reason = match verdicts[n] {
            Verdict::Live => continue,
            Verdict::NodeGone => DropReason::Stale,
            Verdict::Released => DropReason::Released,
        };
        effects.extend(s.drop_holder(&holder, reason, now));
    }
    let result = s.publish(req, now, wall);
    if let Ok(p) = &result {
        effects.extend(p.effects.iter().cloned());
    }
    (effects, result)
}

fn run(starts: Vec<Option<Seed>>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let origin = Instant::now();
    let mut now = START;
    let mut states = Vec::with_capacity(VOLS);
    let mut models = Vec::with_capacity(VOLS);
    let mut counted = [0u32; VOLS];
    for (vol, start) in starts.iter().enumerate() {
        let (state, model) = match start {
            None => (VolumeState::new(GRACE), Model::default()),
            Some(seed) => {
                let (state, got) = seeded_state(seed, origin);
                let (model, want) = Model::seeded(seed);
                prop_assert!(
                    same_effects(&got, &want),
                    "seeding volume {}: state {:?}, model {:?}",
                    vol,
                    got,
                    want
                );
                (state, model)
            }
        };
        same(&state, &model, origin, vol)?;
        states.push(state);
        models.push(model);
    }
    for (i, op) in ops.iter().enumerate() {
        let at = origin + now;
        match op {
            Op::Publish {
                vol,
                node,
                cap,
                readonly,
                timeout,
                found,
                verdicts,
            } => {
                let (vol, node) = (*vol, *node);
                let m = &mut models[vol];
                prop_assert_eq!(
                    labels(&m.blockers(node)),
                    states[vol].blockers(&label(node)),
                    "{:?}: the holders to check live",
                    op
                );
                let found: &[usize] = if m.holders.is_empty() { found } else { &[] };
                // A wall time of its own for every operation, so a repeat that answered the
                // clock's time instead of the recorded one would show.
                let wall = wall_at(now) + Duration::from_nanos(i as u64);
                let req = PublishRequest {
                    node: label(node),
                    capability: cap.capability(),
                    readonly: *readonly,
                    migration_timeout: migration_timeout(*timeout).0,
                };
                let (got_effects, got) =
                    publish_like_the_actor(&mut states[vol], &req, found, verdicts, at, wall);
                let (want_effects, want) = m.publish(
                    node,
                    *cap,
                    *readonly,
                    timeout_of(*timeout),
                    found,
                    verdicts,
                    now,
                    wall,
                );
                let answer = Answer::of(&req.node, &got).map_err(TestCaseError::fail)?;
                prop_assert_eq!(
                    &answer,
                    &want,
                    "{:?}: the state (left) answered {:?}, the rules' model (right)",
                    op,
                    got
                );
                // Vocabulary, independent of the model: a publish never takes a volume beyond
                // one node (exclusive) or two (migratable); only seeding keeps more.
                if let Answer::Ok {
                    idempotent: false, ..
                } = answer
                {
                    let allowed = match cap.class() {
                        Class::Exclusive => 1,
                        Class::Migratable => 2,
                    };
                    prop_assert!(
                        states[vol].nodes().len() <= allowed,
                        "{:?}: attached to {:?}",
                        op,
                        states[vol]
                            .nodes()
                            .iter()
                            .map(|a| a.node.as_str())
                            .collect::<Vec<_>>()
                    );
                }
                prop_assert!(
                    same_effects(&got_effects, &want_effects),
                    "{:?}: the state's effects {:?}, the model's {:?}",
                    op,
                    got_effects,
                    want_effects
                );
                counted[vol] += count_resolutions(&got_effects);
            }
            Op::Unpublish { vol, node } => {
                let effects = states[*vol].unpublish(node.map(label).as_ref(), at);
                let want = models[*vol].unpublish(*node, now);
                prop_assert!(
                    same_effects(&effects, &want),
                    "{:?}: the state's effects {:?}, the model's {:?}",
                    op,
                    effects,
                    want
                );
                counted[*vol] += count_resolutions(&effects);
            }
            Op::DropStale {
                vol,
                node,
                asked_back,
            } => {
                let asked_at = now - Duration::from_secs(*asked_back);
                let effects = states[*vol].drop_stale(&label(*node), origin + asked_at, at);
                let want = models[*vol].drop_stale(*node, asked_at, now);
                prop_assert!(
                    same_effects(&effects, &want),
                    "{:?} at {:?}: the state's effects {:?}, the model's {:?}",
                    op,
                    now,
                    effects,
                    want
                );
                counted[*vol] += count_resolutions(&effects);
            }
            Op::Advance { secs } => now += Duration::from_secs(*secs),
            Op::MigrationTimer { vol } => {
                let effects = states[*vol].migration_timeout(at);
                let want = models[*vol].migration_timer(now);
                prop_assert_eq!(
                    &effects,
                    &want,
                    "{:?} at {:?} (left: the state, right: the model)",
                    op,
                    now
                );
                counted[*vol] += count_resolutions(&effects);
            }
            Op::GraceTimer { vol } => {
                let reaped = states[*vol].grace_expired(at);
                prop_assert_eq!(
                    reaped,
                    models[*vol].grace_timer(now),
                    "{:?} at {:?} (left: the state, right: the model)",
                    op,
                    now
                );
            }
        }
        for vol in 0..VOLS {
            same(&states[vol], &models[vol], origin, vol)?;
            prop_assert_eq!(
                counted[vol],
                models[vol].counted,
                "migrations counted on volume {}",
                vol
            );
        }
    }
    // Drain: a pending migration timer fires at its deadline (or now, if that passed), then
    // everything detaches. Every migration that ever started is counted exactly once.
    for vol in 0..VOLS {
        if let Some(deadline) = models[vol].migration_deadline() {
            let at = deadline.max(now);
            let effects = states[vol].migration_timeout(origin + at);
            prop_assert_eq!(&effects, &models[vol].migration_timer(at));
            counted[vol] += count_resolutions(&effects);
            now = at;
        }
        let effects = states[vol].unpublish(None, origin + now);
        let want = models[vol].unpublish(None, now);
        prop_assert!(
            same_effects(&effects, &want),
            "draining volume {}: {:?}, the model's {:?}",
            vol,
            effects,
            want
        );
        counted[vol] += count_resolutions(&effects);
        prop_assert_eq!(
            counted[vol],
            models[vol].started,
            "volume {}: every migration counted exactly once",
            vol
        );
        prop_assert_eq!(models[vol].counted, models[vol].started);
        prop_assert!(states[vol].nodes().is_empty());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    })]

    /// Random starts (fresh or seeded) and operations on three volumes and four nodes; the
    /// state must give every answer, effect, record and deadline the rules' model gives.
    ///
    /// Catches, in `state.rs` (each shown failing in every one of 20 runs):
    /// - step 3: dropping `existing.class == req.capability.class()` (a seeded holder
    ///   re-published in another access class answers OK instead of ALREADY_EXISTS), and
    ///   dropping the `confirmed_at` update (a stale drop takes a holder confirmed after the 404);
    /// - 5.3: dropping `held_class == AccessClass::Exclusive` (an exclusive volume starts a
    ///   migration), dropping `req.capability.class() != held_class` (a migratable volume takes an
    ///   exclusive second node), dropping `overfull` or only its two-holders-without-a-migration
    ///   half (an over-attached volume answers "migration limit");
    /// - step 4: dropping `inside` (a handoff counted after the grace window);
    /// - `seeded`: dropping `all_migratable` (two holders of an exclusive volume become a
    ///   migration); `adopt`: `order_known = true` (a live read's two holders get a direction);
    /// - `end_migration`: dropping `!m.direction_known` (an unknown migration counted as success or
    ///   failed); `unpublish(None)` oldest first (a migration counted as a success);
    /// - `migration_timeout`: dropping `now >= started_at + timeout` (a timer that fires early
    ///   counts a timeout); `grace_expired`: dropping the period check (reaped inside the window);
    /// - `drop_stale`: dropping `a.confirmed_at < asked_at` (a holder attached after the 404 is
    ///   dropped);
    /// - `domain::migration_timeout`: dropping the clamp (a 3601 s migration timeout).
    #[test]
    fn the_state_follows_the_rules_model(
        starts in proptest::collection::vec(start(), VOLS),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        run(starts, ops)?;
    }
}
