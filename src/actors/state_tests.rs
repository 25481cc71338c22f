//! Unit tests of the pure attachment rules: one case per rule, then a property test that runs
//! random operation sequences against a tiny reference model.

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use tokio::time::Instant;

use super::*;
use crate::domain::{
    migration_timeout, AccessMode, AccessType, DEFAULT_MIGRATION_TIMEOUT, MAX_MIGRATION_TIMEOUT,
    MIN_MIGRATION_TIMEOUT,
};

const GRACE: Duration = Duration::from_secs(30);

fn node(n: &str) -> NodeId {
    NodeId::try_from(n).unwrap()
}

fn rwo() -> Capability {
    Capability::new(
        AccessMode::SingleNodeWriter,
        AccessType::Mount {
            fs_type: "ext4".into(),
            mount_flags: vec![],
        },
    )
    .unwrap()
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
    let again = f.publish(&req("a", rwo())).unwrap();
    assert_eq!(
        again,
        Published {
            effects: vec![],
            idempotent: true
        }
    );
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

#[test]
fn seeding_rebuilds_migration_from_the_newer_holder() {
    let t0 = Instant::now();
    let holder = |n: &str, at: Instant| Attachment {
        node: node(n),
        attached_at: at,
        attached_wall: SystemTime::now(),
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
        attached_wall: SystemTime::now(),
        class: AccessClass::Exclusive,
        capability: None,
        readonly: false,
    };
    let (mut state, _) = VolumeState::seeded(GRACE, vec![holder], DEFAULT_MIGRATION_TIMEOUT);
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

#[derive(Clone, Debug)]
enum Op {
    Publish {
        vol: usize,
        node: usize,
        migratable: bool,
    },
    Unpublish {
        vol: usize,
        node: Option<usize>,
    },
    Advance {
        secs: u64,
    },
    MigrationTimer {
        vol: usize,
    },
    GraceTimer {
        vol: usize,
    },
}

const VOLS: usize = 3;
const NODES: usize = 4;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..VOLS, 0..NODES, any::<bool>()).prop_map(|(vol, node, migratable)| Op::Publish { vol, node, migratable }),
        3 => (0..VOLS, proptest::option::weighted(0.9, 0..NODES)).prop_map(|(vol, node)| Op::Unpublish { vol, node }),
        1 => (0u64..90).prop_map(|secs| Op::Advance { secs }),
        1 => (0..VOLS).prop_map(|vol| Op::MigrationTimer { vol }),
        1 => (0..VOLS).prop_map(|vol| Op::GraceTimer { vol }),
    ]
}

/// The reference model: just the node list, the access class and one migration flag.
#[derive(Default, Clone)]
struct Model {
    nodes: Vec<(usize, bool)>,
    migration: Option<(Duration, bool)>, // (started at, counted)
}

#[derive(Debug, PartialEq)]
enum Expect {
    Ok,
    AlreadyExists,
    Refused,
}

impl Model {
    fn publish(&mut self, node: usize, migratable: bool, now: Duration) -> Expect {
        if let Some(&(_, m)) = self.nodes.iter().find(|(n, _)| *n == node) {
            return if m == migratable {
                Expect::Ok
            } else {
                Expect::AlreadyExists
            };
        }
        match self.nodes.as_slice() {
            [] => {
                self.nodes.push((node, migratable));
                Expect::Ok
            }
            [(_, true)] if migratable => {
                self.nodes.push((node, true));
                self.migration = Some((now, false));
                Expect::Ok
            }
            _ => Expect::Refused,
        }
    }

    /// Returns how many migrations this detach counted.
    fn unpublish(&mut self, node: usize) -> u32 {
        let Some(pos) = self.nodes.iter().position(|(n, _)| *n == node) else {
            return 0;
        };
        self.nodes.remove(pos);
        match self.migration.take() {
            Some((_, false)) => 1,
            _ => 0,
        }
    }
}

fn label(i: usize) -> NodeId {
    node(&format!("n{i}"))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(10_000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_interleavings_match_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let t0 = Instant::now();
        let mut elapsed = Duration::ZERO;
        let mut states: Vec<VolumeState> = (0..VOLS).map(|_| VolumeState::new(GRACE)).collect();
        let mut models: Vec<Model> = vec![Model::default(); VOLS];
        let mut started = [0u32; VOLS];
        let mut counted = [0u32; VOLS];
        let mut model_counted = [0u32; VOLS];
        for op in ops {
            let now = t0 + elapsed;
            match op {
                Op::Publish { vol, node, migratable } => {
                    let cap = if migratable { rwx() } else { rwo() };
                    let r = PublishRequest { node: label(node), capability: cap, readonly: false, migration_timeout: Duration::from_secs(60) };
                    let got = states[vol].publish(&r, now, SystemTime::now());
                    let want = models[vol].publish(node, migratable, elapsed);
                    match (&got, &want) {
                        (Ok(p), Expect::Ok) => {
                            started[vol] += p.effects.iter().filter(|e| matches!(e, Effect::MigrationStarted { .. })).count() as u32;
                        }
                        (Err(Error::AlreadyExists(_)), Expect::AlreadyExists) => {}
                        (Err(Error::Conflict { holders, .. }), Expect::Refused) => {
                            prop_assert!(!holders.is_empty());
                        }
                        (Err(Error::MigrationLimit { nodes }), Expect::Refused) => prop_assert_eq!(nodes.len(), 2),
                        _ => prop_assert!(false, "publish {:?}: state said {:?}, model {:?}", op_name(vol, node), got, want),
                    }
                }
                Op::Unpublish { vol, node } => {
                    let targets: Vec<usize> = match node {
                        Some(n) => vec![n],
                        None => models[vol].nodes.iter().rev().map(|(n, _)| *n).collect(),
                    };
                    let effects = states[vol].unpublish(node.map(label).as_ref(), now);
                    counted[vol] += count_resolutions(&effects);
                    for n in targets {
                        model_counted[vol] += models[vol].unpublish(n);
                    }
                }
                Op::Advance { secs } => elapsed += Duration::from_secs(secs),
                Op::MigrationTimer { vol } => {
                    // A timer only fires at or after its deadline, as the actor arms it.
                    if let Some(deadline) = states[vol].migration_deadline() {
                        if deadline <= now {
                            let effects = states[vol].migration_timeout(now);
                            counted[vol] += count_resolutions(&effects);
                            if let Some((_, c)) = models[vol].migration.as_mut() {
                                prop_assert!(!*c);
                                *c = true;
                                model_counted[vol] += 1;
                            }
                        }
                    }
                    // A timer firing that belongs to nothing must do nothing.
                    prop_assert!(states[vol].migration_timeout(now).is_empty() || states[vol].migration_deadline().is_some());
                }
                Op::GraceTimer { vol } => {
                    if let Some(deadline) = states[vol].grace_deadline() {
                        if deadline <= now {
                            prop_assert!(states[vol].grace_expired(now));
                            prop_assert!(states[vol].is_idle());
                        }
                    }
                }
            }
            for vol in 0..VOLS {
                let s = &states[vol];
                let nodes: Vec<NodeId> = s.nodes().iter().map(|a| a.node.clone()).collect();
                let want: Vec<NodeId> = models[vol].nodes.iter().map(|(n, _)| label(*n)).collect();
                prop_assert_eq!(&nodes, &want, "holders of volume {}", vol);
                match s.class() {
                    Some(AccessClass::Exclusive) => prop_assert!(nodes.len() <= 1, "two nodes on an exclusive volume"),
                    Some(AccessClass::Migratable) => prop_assert!(nodes.len() <= 2, "three nodes on a migratable volume"),
                    None => prop_assert!(nodes.is_empty()),
                }
                prop_assert_eq!(s.migration().is_some(), nodes.len() == 2);
                prop_assert!(counted[vol] <= started[vol], "a migration counted twice");
                prop_assert_eq!(counted[vol], model_counted[vol]);
            }
        }
        // Drain: expire every pending migration timer, then detach everything. Every migration
        // that ever started is now counted exactly once.
        let end = t0 + elapsed + MAX_MIGRATION_TIMEOUT;
        for vol in 0..VOLS {
            if states[vol].migration_deadline().is_some() {
                counted[vol] += count_resolutions(&states[vol].migration_timeout(end));
            }
            counted[vol] += count_resolutions(&states[vol].unpublish(None, end));
            prop_assert_eq!(counted[vol], started[vol], "volume {}: every migration counted exactly once", vol);
            prop_assert!(states[vol].nodes().is_empty());
        }
    }
}

fn op_name(vol: usize, node: usize) -> String {
    format!("v{vol}->n{node}")
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
