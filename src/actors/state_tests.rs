//! Unit tests of the pure attachment rules: one case per rule, then a property test that runs
//! random operation sequences against a tiny reference model.

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use tokio::time::Instant;

use super::*;
use crate::domain::fixtures::rwo_ext4 as rwo;
use crate::domain::{
    migration_timeout, AccessMode, AccessType, DEFAULT_MIGRATION_TIMEOUT, MAX_MIGRATION_TIMEOUT,
    MIN_MIGRATION_TIMEOUT,
};

const GRACE: Duration = Duration::from_secs(30);

fn node(n: &str) -> NodeId {
    NodeId::try_from(n).unwrap()
}

fn rwx() -> Capability {
    Capability::block(AccessMode::MultiNodeMultiWriter)
}

fn req(n: &str, capability: Capability) -> PublishRequest {
    PublishRequest {
        node: node(n),
        capability,
        readonly: false,
        migration_timeout: Duration::from_secs(60),
    }
}

struct Fixture {
    state: VolumeState,
    t0: Instant,
    now: Instant,
}

impl Fixture {
    fn new() -> Self {
        let t0 = Instant::now();
        Self {
            state: VolumeState::new(GRACE),
            t0,
            now: t0,
        }
    }

    fn publish(&mut self, r: &PublishRequest) -> Result<Published, Error> {
        self.state.publish(r, self.now, SystemTime::now())
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    fn holders(&self) -> Vec<String> {
        self.state
            .nodes()
            .iter()
            .map(|a| a.node.to_string())
            .collect()
    }
}

#[test]
fn rwx_mount_is_refused_at_construction() {
    let err = Capability::new(
        AccessMode::MultiNodeMultiWriter,
        AccessType::Mount {
            fs_type: "xfs".into(),
            mount_flags: vec![],
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("RWX requires volumeMode: Block"),
        "{err}"
    );
}

#[test]
fn republish_same_capability_is_idempotent_without_effects() {
    let mut f = Fixture::new();
    f.publish(&req("a", rwo())).unwrap();
    let first_wall = f.state.nodes()[0].attached_wall;
    let again = f.publish(&req("a", rwo())).unwrap();
    assert_eq!(
        again,
        Published {
            effects: vec![],
            idempotent: true,
            attached_at: Some(first_wall),
        }
    );
}

/// The attach instant publish_context carries is the one recorded at the attach, for every
/// repeat, whatever the clock says then; a new attach after a detach records a new one.
#[test]
fn the_attach_instant_is_stable_across_repeats() {
    let t0 = Instant::now();
    let wall = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_323_045_000 + ms);
    let mut state = VolumeState::new(GRACE);
    let first = state.publish(&req("a", rwx()), t0, wall(200)).unwrap();
    assert_eq!(first.attached_at, Some(wall(200)));
    let target = state.publish(&req("b", rwx()), t0, wall(700)).unwrap();
    assert_eq!(target.attached_at, Some(wall(700)));
    for later in [wall(900), wall(5_000)] {
        let again = state.publish(&req("a", rwx()), t0, later).unwrap();
        assert!(again.idempotent);
        assert_eq!(again.attached_at, Some(wall(200)), "a's repeat");
        let again = state.publish(&req("b", rwx()), t0, later).unwrap();
        assert_eq!(again.attached_at, Some(wall(700)), "b's repeat");
    }
    assert_eq!(
        state.migration().map(|m| m.started_wall),
        Some(wall(700)),
        "the migration started at the target's attach instant"
    );
    state.unpublish(Some(&node("a")), t0);
    state.unpublish(Some(&node("b")), t0);
    let anew = state.publish(&req("b", rwx()), t0, wall(9_000)).unwrap();
    assert_eq!(
        anew.attached_at,
        Some(wall(9_000)),
        "a new attach, a new instant"
    );
}

/// A holder rebuilt from a VolumeAttachment answers with the instant that VA recorded, and
/// with none when it recorded none: seeding never invents one from a creationTimestamp.
#[test]
fn a_seeded_holder_answers_with_the_instant_its_va_recorded_or_none() {
    let t0 = Instant::now();
    let recorded = SystemTime::UNIX_EPOCH + Duration::new(1_767_323_045, 123_456_789);
    let created = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_323_045);
    let holder = |n: &str, wall: SystemTime, recorded_instant: bool| Attachment {
        node: node(n),
        attached_at: t0,
        confirmed_at: t0,
        attached_wall: wall,
        recorded_instant,
        class: AccessClass::Migratable,
        capability: None,
        readonly: false,
    };
    let (mut state, _) = VolumeState::seeded(
        GRACE,
        vec![holder("a", created, false), holder("b", recorded, true)],
        DEFAULT_MIGRATION_TIMEOUT,
        true,
    );
    let now = SystemTime::now();
    let a = state.publish(&req("a", rwx()), t0, now).unwrap();
    assert!(a.idempotent);
    assert_eq!(a.attached_at, None, "a's VA recorded no instant");
    let b = state.publish(&req("b", rwx()), t0, now).unwrap();
    assert_eq!(b.attached_at, Some(recorded));
    assert_eq!(
        state.describe(t0, now)["migration"]["started_at"],
        "2026-01-02T03:04:05.123456789Z",
        "started exactly at the target's instant"
    );
}

/// Seeding that cannot order two holders rebuilds their migration with its direction unknown:
/// it is kept and limited like any other, and either side detaching ends it, counted once as
/// `Unknown`, naming the node that left.
#[test]
fn a_migration_of_unknown_direction_ends_as_unknown_on_either_side() {
    let t0 = Instant::now();
    let created = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_323_045);
    let holder = |n: &str| Attachment {
        node: node(n),
        attached_at: t0,
        confirmed_at: t0,
        attached_wall: created,
        recorded_instant: false,
        class: AccessClass::Migratable,
        capability: None,
        readonly: false,
    };
    for leaving in ["a", "b"] {
        let (mut state, effects) = VolumeState::seeded(
            GRACE,
            vec![holder("a"), holder("b")],
            DEFAULT_MIGRATION_TIMEOUT,
            false,
        );
        assert_eq!(
            effects,
            [Effect::MigrationDirectionUnknown {
                nodes: vec![node("a"), node("b")]
            }]
        );
        assert_eq!(
            state.describe(t0, created)["migration"]["direction_known"],
            false
        );
        assert!(matches!(
            state.publish(&req("c", rwx()), t0, created),
            Err(Error::MigrationLimit { .. })
        ));
        let effects = state.unpublish(Some(&node(leaving)), t0 + Duration::from_secs(5));
        assert!(
            effects.contains(&Effect::MigrationEnded {
                source: node("a"),
                target: node("b"),
                detached: node(leaving),
                result: MigrationResult::Unknown,
                elapsed: Duration::from_secs(5),
                counted: true,
            }),
            "{effects:?}"
        );
        assert!(state.migration().is_none());
    }
    // Timed out first: the timeout counts it, and names no direction either.
    let (mut state, _) = VolumeState::seeded(
        GRACE,
        vec![holder("a"), holder("b")],
        Duration::from_secs(30),
        false,
    );
    assert_eq!(
        state.migration_timeout(t0 + Duration::from_secs(30)),
        [Effect::MigrationTimedOut {
            source: node("a"),
            target: node("b"),
            direction_known: false,
        }]
    );
    let effects = state.unpublish(Some(&node("b")), t0 + Duration::from_secs(40));
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::MigrationEnded {
            result: MigrationResult::Unknown,
            counted: false,
            ..
        }
    )));
}

#[test]
fn republish_other_capability_or_readonly_is_already_exists() {
    let mut f = Fixture::new();
    f.publish(&req("a", rwo())).unwrap();
    let mut ro = req("a", rwo());
    ro.readonly = true;
    assert!(matches!(f.publish(&ro), Err(Error::AlreadyExists(m)) if m.contains("readonly")));
    let block = req("a", Capability::block(AccessMode::SingleNodeWriter));
    assert!(matches!(f.publish(&block), Err(Error::AlreadyExists(m)) if m.contains("capability")));
    assert_eq!(f.holders(), ["a"]);
}

#[test]
fn exclusive_conflict_names_the_holder() {
    let mut f = Fixture::new();
    f.publish(&req("a", rwo())).unwrap();
    let err = f.publish(&req("b", rwo())).unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }));
    assert!(err.to_string().contains("node a"), "{err}");
    assert_eq!(f.holders(), ["a"]);
}

#[test]
fn different_access_class_conflicts() {
    let mut f = Fixture::new();
    f.publish(&req("a", rwx())).unwrap();
    let err = f.publish(&req("b", rwo())).unwrap_err();
    assert!(err.to_string().contains("node a"), "{err}");
}

#[test]
fn migratable_second_node_starts_migration_third_is_refused() {
    let mut f = Fixture::new();
    f.publish(&req("a", rwx())).unwrap();
    let started = f.publish(&req("b", rwx())).unwrap();
    assert!(started.effects.iter().any(
        |e| matches!(e, Effect::MigrationStarted { source, target, .. }
        if source.as_str() == "a" && target.as_str() == "b")
    ));
    assert_eq!(
        f.state.migration_deadline(),
        Some(f.t0 + Duration::from_secs(60))
    );
    let err = f.publish(&req("c", rwx())).unwrap_err();
    assert_eq!(err.to_string(), "migration limit: attached to a and b");
}

#[test]
fn grace_window_handoff_is_counted_and_never_allows_two_exclusive_holders() {
    let mut f = Fixture::new();
    f.publish(&req("a", rwo())).unwrap();
    f.state.unpublish(Some(&node("a")), f.now);
    f.advance(Duration::from_secs(5));
    let p = f.publish(&req("b", rwo())).unwrap();
    assert!(p.effects.contains(&Effect::Handoff { from: node("a") }));
    // Inside a fresh grace window of nobody: a third node is still refused while b holds it.
    assert!(matches!(
        f.publish(&req("c", rwo())),
        Err(Error::Conflict { .. })
    ));
    // Re-attach to the same node inside the window is not a handoff.
    f.state.unpublish(Some(&node("b")), f.now);
    let p = f.publish(&req("b", rwo())).unwrap();
    assert!(!p
        .effects
        .iter()
        .any(|e| matches!(e, Effect::Handoff { .. })));
}

#[test]
fn grace_expires_only_after_the_period_and_only_when_detached() {
    let mut f = Fixture::new();
    f.publish(&req("a", rwo())).unwrap();
    f.state.unpublish(Some(&node("a")), f.now);
    assert_eq!(f.state.grace_deadline(), Some(f.t0 + GRACE));
    f.advance(GRACE - Duration::from_secs(1));
    assert!(!f.state.grace_expired(f.now));
    f.advance(Duration::from_secs(1));
    assert!(f.state.grace_expired(f.now));
    assert!(f.state.is_idle());
}

#[test]
fn unpublish_of_a_node_not_holding_is_a_no_op() {
    let mut f = Fixture::new();
    assert!(f.state.unpublish(Some(&node("x")), f.now).is_empty());
    f.publish(&req("a", rwo())).unwrap();
    assert!(f.state.unpublish(Some(&node("x")), f.now).is_empty());
    assert_eq!(f.holders(), ["a"]);
}

#[test]
fn source_detach_is_success_with_duration() {
    let mut f = Fixture::new();
    f.publish(&req("a", rwx())).unwrap();
    f.publish(&req("b", rwx())).unwrap();
    f.advance(Duration::from_secs(42));
    let effects = f.state.unpublish(Some(&node("a")), f.now);
    assert!(effects.contains(&Effect::MigrationEnded {
        source: node("a"),
        target: node("b"),
        detached: node("a"),
        result: MigrationResult::Success,
        elapsed: Duration::from_secs(42),
        counted: true,
    }));
    assert_eq!(f.holders(), ["b"]);
    assert!(f.state.migration().is_none() && f.state.migration_deadline().is_none());
}

#[test]
fn target_detach_is_failed_rollback() {
    let mut f = Fixture::new();
    f.publish(&req("a", rwx())).unwrap();
    f.publish(&req("b", rwx())).unwrap();
    let effects = f.state.unpublish(Some(&node("b")), f.now);
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::MigrationEnded {
            result: MigrationResult::Failed,
            counted: true,
            ..
        }
    )));
    assert_eq!(f.holders(), ["a"]);
}

#[test]
fn timeout_counts_once_and_later_resolution_does_not_count_again() {
    let mut f = Fixture::new();
    f.publish(&req("a", rwx())).unwrap();
    f.publish(&req("b", rwx())).unwrap();
    f.advance(Duration::from_secs(59));
    assert!(
        f.state.migration_timeout(f.now).is_empty(),
        "early timer does nothing"
    );
    f.advance(Duration::from_secs(1));
    assert_eq!(f.state.migration_timeout(f.now).len(), 1);
    assert!(f.state.migration_timeout(f.now).is_empty(), "fires once");
    assert_eq!(
        f.state.migration_deadline(),
        None,
        "no timer after timing out"
    );
    assert_eq!(f.holders(), ["a", "b"], "stays dual-attached");
    assert!(matches!(
        f.publish(&req("c", rwx())),
        Err(Error::MigrationLimit { .. })
    ));
    let effects = f.state.unpublish(Some(&node("a")), f.now);
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::MigrationEnded { counted: false, .. })));
}

#[test]
fn empty_node_detaches_everything_rolling_back_first() {
    let mut f = Fixture::new();
    f.publish(&req("a", rwx())).unwrap();
    f.publish(&req("b", rwx())).unwrap();
    let effects = f.state.unpublish(None, f.now);
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::MigrationEnded {
            result: MigrationResult::Failed,
            ..
        }
    )));
    assert!(f.state.nodes().is_empty());
    assert_eq!(
        f.state.grace().map(|g| g.last_node.to_string()),
        Some("a".into())
    );
}

#[test]
fn stale_and_released_holders_are_dropped_before_publish() {
    let mut f = Fixture::new();
    f.publish(&req("a", rwo())).unwrap();
    assert_eq!(f.state.blockers(&node("b")), vec![node("a")]);
    assert!(f.state.blockers(&node("a")).is_empty());
    let effects = f.state.drop_holder(&node("a"), DropReason::Stale, f.now);
    assert_eq!(effects, vec![Effect::StaleCleared { node: node("a") }]);
    f.publish(&req("b", rwo())).unwrap();
    let effects = f.state.drop_holder(&node("b"), DropReason::Released, f.now);
    assert_eq!(effects, vec![Effect::Handoff { from: node("b") }]);
    let p = f.publish(&req("c", rwo())).unwrap();
    assert!(
        !p.effects
            .iter()
            .any(|e| matches!(e, Effect::Handoff { .. })),
        "handoff counted once, at the drop"
    );
}

/// The stale reconciler drops a holder only if its attachment is strictly older than the
/// instant its Node's 404 GET was sent: one attached at or after it, or answered OK again by an
/// idempotent repeat after it, may be a Node that re-registered under the same name. Catches
/// `a.confirmed_at < asked_at` in `drop_stale` (without it every holder of that name is dropped)
/// and `existing.confirmed_at = ...` in `publish` step 3 (without it the repeat is dropped).
#[test]
fn a_stale_drop_keeps_holders_confirmed_at_or_after_the_404() {
    let mut f = Fixture::new();
    let asked_at = f.t0 + Duration::from_secs(10);
    f.advance(Duration::from_secs(10));
    f.publish(&req("a", rwo())).unwrap();
    assert!(f.state.drop_stale(&node("a"), asked_at, f.now).is_empty());
    assert_eq!(f.holders(), ["a"], "attached at the GET's instant: kept");
    let later = asked_at + Duration::from_millis(1);
    let effects = f.state.drop_stale(&node("a"), later, f.now);
    assert_eq!(effects, vec![Effect::StaleCleared { node: node("a") }]);
    assert!(f.holders().is_empty());

    let mut f = Fixture::new();
    f.publish(&req("b", rwo())).unwrap();
    f.advance(Duration::from_secs(20));
    assert!(f.publish(&req("b", rwo())).unwrap().idempotent);
    let asked_at = f.t0 + Duration::from_secs(10);
    assert!(f.state.drop_stale(&node("b"), asked_at, f.now).is_empty());
    assert_eq!(
        f.holders(),
        ["b"],
        "answered OK after the GET was sent: kept"
    );
    assert!(f.state.drop_stale(&node("c"), f.now, f.now).is_empty());
}

#[test]
fn seeding_rebuilds_migration_from_the_newer_holder() {
    let t0 = Instant::now();
    let holder = |n: &str, at: Instant| Attachment {
        node: node(n),
        attached_at: at,
        confirmed_at: at,
        attached_wall: SystemTime::now(),
        recorded_instant: true,
        class: AccessClass::Migratable,
        capability: None,
        readonly: false,
    };
    let (state, effects) = VolumeState::seeded(
        GRACE,
        vec![
            holder("old", t0),
            holder("new", t0 + Duration::from_secs(10)),
        ],
        Duration::from_secs(100),
        true,
    );
    assert!(effects.is_empty());
    let m = state.migration().unwrap();
    assert_eq!((m.source.as_str(), m.target.as_str()), ("old", "new"));
    assert_eq!(
        state.migration_deadline(),
        Some(t0 + Duration::from_secs(110))
    );
    let (state, effects) = VolumeState::seeded(
        GRACE,
        vec![holder("a", t0), holder("b", t0), holder("c", t0)],
        Duration::from_secs(100),
        true,
    );
    assert_eq!(effects.len(), 1);
    assert!(state.migration().is_none());
    let mut state = state;
    assert!(state
        .publish(&req("d", rwx()), t0, SystemTime::now())
        .is_err());
}

#[test]
fn a_seeded_holder_adopts_the_capability_of_its_first_republish() {
    let t0 = Instant::now();
    let holder = Attachment {
        node: node("a"),
        attached_at: t0,
        confirmed_at: t0,
        attached_wall: SystemTime::now(),
        recorded_instant: false,
        class: AccessClass::Exclusive,
        capability: None,
        readonly: false,
    };
    let (mut state, _) = VolumeState::seeded(GRACE, vec![holder], DEFAULT_MIGRATION_TIMEOUT, true);
    let p = state
        .publish(&req("a", rwo()), t0, SystemTime::now())
        .unwrap();
    assert!(p.idempotent && p.effects.is_empty());
    let block = req("a", Capability::block(AccessMode::SingleNodeWriter));
    assert!(matches!(
        state.publish(&block, t0, SystemTime::now()),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        state.publish(&req("b", rwo()), t0, SystemTime::now()),
        Err(Error::Conflict { .. })
    ));
}

#[test]
fn migration_timeout_parsing_defaults_and_clamps() {
    assert_eq!(migration_timeout(None), (DEFAULT_MIGRATION_TIMEOUT, None));
    assert_eq!(migration_timeout(Some("120")).0, Duration::from_secs(120));
    assert_eq!(migration_timeout(Some("1")).0, MIN_MIGRATION_TIMEOUT);
    assert_eq!(migration_timeout(Some("99999")).0, MAX_MIGRATION_TIMEOUT);
    assert_eq!(
        migration_timeout(Some("soon")),
        (DEFAULT_MIGRATION_TIMEOUT, Some("soon".into()))
    );
    assert_eq!(migration_timeout(Some("-5")).0, DEFAULT_MIGRATION_TIMEOUT);
}

// ---- property test -------------------------------------------------------------------------
//
// Random operation sequences on three volumes and four nodes, checked step by step against a
// reference model that knows only the rules: its own clock (a Duration since the start), its
// own migration and grace records, and its own deadlines. It never asks the state under test
// when anything is due; it predicts every answer, effect and deadline, and the state must match.

const VOLS: usize = 3;
const NODES: usize = 4;

/// The capabilities a publish may ask for: two exclusive ones (so "same class, other
/// capability" happens) and the migratable one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cap {
    RwoMount,
    RwoBlock,
    RwxBlock,
}

impl Cap {
    fn capability(self) -> Capability {
        match self {
            Cap::RwoMount => rwo(),
            Cap::RwoBlock => Capability::block(AccessMode::SingleNodeWriter),
            Cap::RwxBlock => rwx(),
        }
    }

    fn migratable(self) -> bool {
        self == Cap::RwxBlock
    }
}

#[derive(Clone, Debug)]
enum Op {
    Publish {
        vol: usize,
        node: usize,
        cap: Cap,
        readonly: bool,
        timeout_secs: u64,
    },
    Unpublish {
        vol: usize,
        node: Option<usize>,
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
    let cap =
        prop_oneof![2 => Just(Cap::RwoMount), 1 => Just(Cap::RwoBlock), 3 => Just(Cap::RwxBlock)];
    let timeout = prop_oneof![Just(30u64), Just(60), Just(90), 30u64..=300];
    prop_oneof![
        4 => (0..VOLS, 0..NODES, cap, proptest::bool::weighted(0.15), timeout).prop_map(
            |(vol, node, cap, readonly, timeout_secs)| Op::Publish { vol, node, cap, readonly, timeout_secs }
        ),
        3 => (0..VOLS, proptest::option::weighted(0.9, 0..NODES)).prop_map(|(vol, node)| Op::Unpublish { vol, node }),
        2 => prop_oneof![Just(GRACE.as_secs()), 0u64..90].prop_map(|secs| Op::Advance { secs }),
        1 => (0..VOLS).prop_map(|vol| Op::MigrationTimer { vol }),
        1 => (0..VOLS).prop_map(|vol| Op::GraceTimer { vol }),
    ]
}

#[derive(Clone, Debug)]
struct ModelHolder {
    node: usize,
    cap: Cap,
    readonly: bool,
    /// The wall time of its attach: what every repeat must answer.
    wall: SystemTime,
}

#[derive(Clone, Debug)]
struct ModelMigration {
    source: usize,
    target: usize,
    started: Duration,
    timeout: Duration,
    timed_out: bool,
}

#[derive(Clone, Debug)]
struct ModelGrace {
    last: usize,
    detached: Duration,
}

/// One volume as the rules describe it. Times are Durations on the model's own clock.
#[derive(Default, Clone, Debug)]
struct Model {
    holders: Vec<ModelHolder>,
    migration: Option<ModelMigration>,
    grace: Option<ModelGrace>,
    /// Migrations started, and migrations counted (resolved or timed out).
    started: u32,
    counted: u32,
}

/// What the model says a publish answers.
#[derive(Debug)]
enum Expect {
    Attached(Vec<Effect>),
    /// With the attach instant recorded at the first publish.
    Idempotent(SystemTime),
    AlreadyExists,
    /// Refused: exclusive, or another access class (rules 5.3), naming the holders.
    Conflict(Vec<NodeId>),
    /// Refused: a migratable volume already on two nodes (rule 5.4).
    MigrationLimit(Vec<NodeId>),
}

impl Model {
    fn holder_ids(&self) -> Vec<NodeId> {
        self.holders.iter().map(|h| label(h.node)).collect()
    }

    fn publish(
        &mut self,
        node: usize,
        cap: Cap,
        readonly: bool,
        timeout: Duration,
        now: Duration,
        wall: SystemTime,
    ) -> Expect {
        // 3: already on this node.
        if let Some(h) = self.holders.iter().find(|h| h.node == node) {
            return if h.cap == cap && h.readonly == readonly {
                Expect::Idempotent(h.wall)
            } else {
                Expect::AlreadyExists
            };
        }
        let holder = ModelHolder {
            node,
            cap,
            readonly,
            wall,
        };
        // 4: on no node; a different node inside the grace window is a handoff.
        if self.holders.is_empty() {
            let mut effects = Vec::new();
            if let Some(g) = self.grace.take() {
                if now - g.detached < GRACE && g.last != node {
                    effects.push(Effect::Handoff {
                        from: label(g.last),
                    });
                }
            }
            self.holders.push(holder);
            effects.push(Effect::Attached { node: label(node) });
            return Expect::Attached(effects);
        }
        // 5.3, then 5.4.
        if !self.holders[0].cap.migratable() || !cap.migratable() {
            return Expect::Conflict(self.holder_ids());
        }
        if self.holders.len() >= 2 {
            return Expect::MigrationLimit(self.holder_ids());
        }
        // 5.5: a migration starts now.
        let source = self.holders[0].node;
        self.holders.push(holder);
        self.migration = Some(ModelMigration {
            source,
            target: node,
            started: now,
            timeout,
            timed_out: false,
        });
        self.started += 1;
        Expect::Attached(vec![
            Effect::Attached { node: label(node) },
            Effect::MigrationStarted {
                source: label(source),
                target: label(node),
                timeout,
            },
        ])
    }

    fn unpublish(&mut self, node: Option<usize>, now: Duration) -> Vec<Effect> {
        match node {
            Some(n) => self.unpublish_one(n, now),
            // Every node, newest first.
            None => {
                let order: Vec<usize> = self.holders.iter().rev().map(|h| h.node).collect();
                order
                    .into_iter()
                    .flat_map(|n| self.unpublish_one(n, now))
                    .collect()
            }
        }
    }

    fn unpublish_one(&mut self, node: usize, now: Duration) -> Vec<Effect> {
        let Some(pos) = self.holders.iter().position(|h| h.node == node) else {
            return Vec::new();
        };
        self.holders.remove(pos);
        let mut effects = Vec::new();
        if let Some(m) = self
            .migration
            .take_if(|m| m.source == node || m.target == node)
        {
            // The source leaving is a success, the target leaving a rollback; counted once.
            if !m.timed_out {
                self.counted += 1;
            }
            effects.push(Effect::MigrationEnded {
                source: label(m.source),
                target: label(m.target),
                detached: label(node),
                result: if m.source == node {
                    MigrationResult::Success
                } else {
                    MigrationResult::Failed
                },
                elapsed: now - m.started,
                counted: !m.timed_out,
            });
        }
        if self.holders.is_empty() {
            self.grace = Some(ModelGrace {
                last: node,
                detached: now,
            });
        }
        effects.push(Effect::Detached {
            node: label(node),
            remaining: self.holder_ids(),
        });
        effects
    }

    /// The migration timer, judged by the model's own clock: it counts a migration once, at or
    /// after started + timeout, and leaves both nodes attached.
    fn migration_timer(&mut self, now: Duration) -> Vec<Effect> {
        match self.migration.as_mut() {
            Some(m) if !m.timed_out && now >= m.started + m.timeout => {
                m.timed_out = true;
                self.counted += 1;
                vec![Effect::MigrationTimedOut {
                    source: label(m.source),
                    target: label(m.target),
                    direction_known: true,
                }]
            }
            _ => Vec::new(),
        }
    }

    /// The grace timer: true (reap) when the volume is detached and its window is over.
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

fn label(i: usize) -> NodeId {
    node(&format!("n{i}"))
}

/// The case count: `PROPTEST_CASES` when set (a number, or the test fails), else 10 000.
fn parse_cases(raw: Option<&str>) -> Result<u32, String> {
    match raw {
        None => Ok(10_000),
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
fn proptest_cases_default_to_ten_thousand_and_garbage_is_an_error() {
    assert_eq!(parse_cases(None), Ok(10_000));
    assert_eq!(parse_cases(Some("250")), Ok(250));
    assert!(parse_cases(Some("10k")).is_err());
    assert!(parse_cases(Some("")).is_err());
}

/// Checks one volume's state against its model: holders with their capability and readonly
/// flag, the migration and grace records, and the deadlines the actor would arm.
fn same(s: &VolumeState, m: &Model, t0: Instant, vol: usize) -> Result<(), TestCaseError> {
    let got: Vec<(NodeId, Option<Capability>, bool)> = s
        .nodes()
        .iter()
        .map(|a| (a.node.clone(), a.capability.clone(), a.readonly))
        .collect();
    let want: Vec<(NodeId, Option<Capability>, bool)> = m
        .holders
        .iter()
        .map(|h| (label(h.node), Some(h.cap.capability()), h.readonly))
        .collect();
    prop_assert_eq!(got, want, "holders of volume {}", vol);
    match s.class() {
        Some(AccessClass::Exclusive) => {
            prop_assert!(s.nodes().len() <= 1, "two nodes on an exclusive volume")
        }
        Some(AccessClass::Migratable) => {
            prop_assert!(s.nodes().len() <= 2, "three nodes on a migratable volume")
        }
        None => prop_assert!(s.nodes().is_empty()),
    }
    let got = s.migration().map(|x| {
        (
            x.source.clone(),
            x.target.clone(),
            x.started_at,
            x.timeout,
            x.timed_out,
        )
    });
    let want = m.migration.as_ref().map(|x| {
        (
            label(x.source),
            label(x.target),
            t0 + x.started,
            x.timeout,
            x.timed_out,
        )
    });
    prop_assert_eq!(got, want, "migration of volume {}", vol);
    let got = s.grace().map(|g| (g.last_node.clone(), g.detached_at));
    let want = m.grace.as_ref().map(|g| (label(g.last), t0 + g.detached));
    prop_assert_eq!(got, want, "grace record of volume {}", vol);
    prop_assert_eq!(
        s.migration_deadline(),
        m.migration_deadline().map(|d| t0 + d),
        "migration deadline of volume {}",
        vol
    );
    prop_assert_eq!(
        s.grace_deadline(),
        m.grace_deadline().map(|d| t0 + d),
        "grace deadline of volume {}",
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

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_interleavings_match_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let t0 = Instant::now();
        let mut elapsed = Duration::ZERO;
        let mut states: Vec<VolumeState> = (0..VOLS).map(|_| VolumeState::new(GRACE)).collect();
        let mut models: Vec<Model> = vec![Model::default(); VOLS];
        let mut counted = [0u32; VOLS];
        for (i, op) in ops.iter().enumerate() {
            let now = t0 + elapsed;
            match *op {
                Op::Publish { vol, node, cap, readonly, timeout_secs } => {
                    let timeout = Duration::from_secs(timeout_secs);
                    let r = PublishRequest { node: label(node), capability: cap.capability(), readonly, migration_timeout: timeout };
                    // A wall time of its own for every operation, so a repeat that answered
                    // the clock's time instead of the recorded one would show.
                    let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_323_045) + elapsed + Duration::from_nanos(i as u64);
                    let got = states[vol].publish(&r, now, wall);
                    let want = models[vol].publish(node, cap, readonly, timeout, elapsed, wall);
                    match (&got, &want) {
                        (Ok(p), Expect::Attached(effects)) => {
                            prop_assert!(!p.idempotent, "{:?}", op);
                            prop_assert_eq!(&p.effects, effects, "{:?}", op);
                            prop_assert_eq!(p.attached_at, Some(wall), "{:?}", op);
                        }
                        (Ok(p), Expect::Idempotent(recorded)) => {
                            prop_assert!(p.idempotent && p.effects.is_empty(), "{:?}: {:?}", op, p);
                            prop_assert_eq!(p.attached_at, Some(*recorded), "{:?}: the instant of the attach", op);
                        }
                        (Err(Error::AlreadyExists(_)), Expect::AlreadyExists) => {}
                        (Err(Error::Conflict { holders, requested, .. }), Expect::Conflict(want)) => {
                            prop_assert_eq!(holders, want, "{:?}", op);
                            prop_assert_eq!(requested, &label(node));
                        }
                        (Err(Error::MigrationLimit { nodes }), Expect::MigrationLimit(want)) => {
                            prop_assert_eq!(nodes, want, "{:?}", op);
                        }
                        _ => prop_assert!(false, "{:?}: state answered {:?}, the model {:?}", op, got, want),
                    }
                }
                Op::Unpublish { vol, node } => {
                    let effects = states[vol].unpublish(node.map(label).as_ref(), now);
                    prop_assert_eq!(&effects, &models[vol].unpublish(node, elapsed), "{:?}", op);
                    counted[vol] += count_resolutions(&effects);
                }
                Op::Advance { secs } => elapsed += Duration::from_secs(secs),
                Op::MigrationTimer { vol } => {
                    let effects = states[vol].migration_timeout(now);
                    prop_assert_eq!(&effects, &models[vol].migration_timer(elapsed), "{:?} at {:?}", op, elapsed);
                    counted[vol] += count_resolutions(&effects);
                }
                Op::GraceTimer { vol } => {
                    let reaped = states[vol].grace_expired(now);
                    prop_assert_eq!(reaped, models[vol].grace_timer(elapsed), "{:?} at {:?}", op, elapsed);
                    if reaped {
                        prop_assert!(states[vol].is_idle());
                    }
                }
            }
            for vol in 0..VOLS {
                same(&states[vol], &models[vol], t0, vol)?;
                prop_assert_eq!(counted[vol], models[vol].counted, "migrations counted on volume {}", vol);
            }
        }
        // Drain: each pending migration timer fires at the deadline the model computed, then
        // everything detaches. Every migration that ever started is counted exactly once.
        for vol in 0..VOLS {
            if let Some(deadline) = models[vol].migration_deadline() {
                let effects = states[vol].migration_timeout(t0 + deadline);
                prop_assert_eq!(&effects, &models[vol].migration_timer(deadline));
                counted[vol] += count_resolutions(&effects);
            }
            let end = elapsed.max(models[vol].grace_deadline().unwrap_or_default());
            let effects = states[vol].unpublish(None, t0 + end);
            prop_assert_eq!(&effects, &models[vol].unpublish(None, end));
            counted[vol] += count_resolutions(&effects);
            prop_assert_eq!(counted[vol], models[vol].started, "volume {}: every migration counted exactly once", vol);
            prop_assert_eq!(models[vol].counted, models[vol].started);
            prop_assert!(states[vol].nodes().is_empty());
        }
    }
}

#[test]
fn describe_shows_nodes_and_time_left() {
    let mut f = Fixture::new();
    f.publish(&req("a", rwx())).unwrap();
    f.publish(&req("b", rwx())).unwrap();
    f.advance(Duration::from_secs(10));
    let view = f.state.describe(f.now, SystemTime::now());
    assert_eq!(view["nodes"].as_array().unwrap().len(), 2);
    assert_eq!(view["migration"]["time_left_seconds"].as_f64(), Some(50.0));
    assert_eq!(view["access_class"], "migratable");
}
