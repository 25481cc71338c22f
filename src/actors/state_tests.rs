//! Unit tests of the pure attachment rules: one case per rule. The property test against a
//! reference model written from the rules lives in `actors/model_tests.rs`.

use std::time::{Duration, SystemTime};

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
