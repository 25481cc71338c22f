//! Volume actors and the supervisor on tokio's paused clock: timers fire by advancing virtual
//! time, never by sleeping for real.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;

use super::messages::{Describe, ListActors, Lookup, Publish, Unpublish};
use super::state::PublishRequest;
use super::supervisor::Supervisor;
use super::{Router, VolumeDeps};
use crate::backend::file::{testing::Stall, FileBackend, Step};
use crate::backend::{BackendError, CreateRequest, VolumeBackend, VolumeInfo};
use crate::domain::{AccessMode, Capability};
use crate::ids::{NodeId, VolumeId};
use crate::kube::Standalone;
use crate::metrics::Metrics;
use crate::role::Term;
use crate::Error;

const GRACE: Duration = Duration::from_secs(30);

fn paused<F: Future<Output = ()>>(test: impl FnOnce() -> F) {
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    });
    system.block_on(test());
}

struct Harness {
    router: Router,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

async fn harness(volumes: &[&str]) -> Harness {
    harness_limited(volumes, 0).await
}

fn create_request(volume: &str) -> CreateRequest {
    CreateRequest {
        id: VolumeId::try_from(volume).unwrap(),
        name: volume.to_string(),
        required_bytes: 1 << 20,
        limit_bytes: 0,
        capabilities: vec![rwx()],
        parameters: BTreeMap::new(),
        source: None,
    }
}

async fn harness_limited(volumes: &[&str], max_per_node: u64) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FileBackend::open(dir.path()).unwrap());
    for v in volumes {
        backend.create(create_request(v)).await.unwrap();
    }
    harness_on(backend, dir, max_per_node)
}

/// Actors over `backend`, on nodes a, b and c.
fn harness_on(
    backend: Arc<dyn VolumeBackend>,
    dir: tempfile::TempDir,
    max_per_node: u64,
) -> Harness {
    let deps = deps_on(backend, max_per_node);
    let metrics = deps.metrics.clone();
    let supervisor = Supervisor::new(deps, Vec::new()).start();
    Harness {
        router: Router::new(supervisor, Duration::from_secs(5)),
        metrics,
        _dir: dir,
    }
}

/// What every actor needs, over `backend`, with standalone nodes a, b and c.
fn deps_on(backend: Arc<dyn VolumeBackend>, max_per_node: u64) -> Arc<VolumeDeps> {
    let cluster = Arc::new(Standalone::new(
        ["a", "b", "c"].map(|n| NodeId::try_from(n).unwrap()),
    ));
    Arc::new(VolumeDeps {
        backend,
        nodes: cluster.clone(),
        authority: cluster.clone(),
        sink: cluster,
        metrics: Arc::new(Metrics::new()),
        grace_period: GRACE,
        node_limit: super::NodeLimit::new(max_per_node),
    })
}

fn rwx() -> Capability {
    Capability::block(AccessMode::MultiNodeMultiWriter)
}

fn publish(node: &str, capability: Capability) -> Publish {
    publish_in(Term::FIRST, node, capability)
}

fn publish_in(term: Term, node: &str, capability: Capability) -> Publish {
    Publish {
        req: PublishRequest {
            node: NodeId::try_from(node).unwrap(),
            capability,
            readonly: false,
            migration_timeout: Duration::from_secs(60),
        },
        term,
    }
}

fn unpublish(node: &str) -> Unpublish {
    unpublish_in(Term::FIRST, node)
}

fn unpublish_in(term: Term, node: &str) -> Unpublish {
    Unpublish {
        node: Some(NodeId::try_from(node).unwrap()),
        term,
    }
}

fn seed_in(term: Term, volumes: Vec<crate::kube::seed::SeedVolume>) -> super::messages::Seed {
    super::messages::Seed { term, volumes }
}

fn vol(v: &str) -> VolumeId {
    VolumeId::try_from(v).unwrap()
}

impl Harness {
    fn migrations(&self, result: &str) -> u64 {
        self.metrics
            .migrations_total
            .with_label_values(&[result])
            .get()
    }

    /// The volume's actor, as the supervisor routes to it (started if it has none).
    async fn actor_of(&self, volume: &str) -> Addr<super::volume::VolumeActor> {
        self.router
            .supervisor()
            .send(super::messages::Route {
                volume: vol(volume),
                term: None,
                caller: None,
            })
            .await
            .unwrap()
            .unwrap()
    }

    async fn actors(&self) -> usize {
        self.router
            .supervisor()
            .send(ListActors::first(usize::MAX))
            .await
            .unwrap()
            .actors
            .len()
    }
}

#[test]
fn migration_timeout_fires_once() {
    paused(|| async {
        let h = harness(&["v"]).await;
        h.router.send(&vol("v"), publish("a", rwx())).await.unwrap();
        h.router.send(&vol("v"), publish("b", rwx())).await.unwrap();
        assert_eq!(h.metrics.active_migrations.get(), 1);
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(h.migrations("timeout"), 0, "not before the deadline");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(h.migrations("timeout"), 1);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(h.migrations("timeout"), 1, "fires once");
        let view = h.router.send(&vol("v"), Describe).await.unwrap().unwrap();
        assert_eq!(
            view["nodes"].as_array().unwrap().len(),
            2,
            "stays dual-attached"
        );
        assert_eq!(view["migration"]["timed_out"], true);
        h.router.send(&vol("v"), unpublish("a")).await.unwrap();
        assert_eq!(
            (
                h.migrations("success"),
                h.migrations("failed"),
                h.migrations("timeout")
            ),
            (0, 0, 1)
        );
        assert_eq!(h.metrics.active_migrations.get(), 0);
    });
}

#[test]
fn resolved_migration_cancels_its_timer() {
    paused(|| async {
        let h = harness(&["v"]).await;
        h.router.send(&vol("v"), publish("a", rwx())).await.unwrap();
        h.router.send(&vol("v"), publish("b", rwx())).await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        h.router.send(&vol("v"), unpublish("a")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!((h.migrations("success"), h.migrations("timeout")), (1, 0));
        assert_eq!(h.metrics.migration_duration.get_sample_count(), 1);
        assert_eq!(h.metrics.migration_duration.get_sample_sum(), 10.0);
    });
}

#[test]
fn grace_expiry_reaps_the_actor() {
    paused(|| async {
        let h = harness(&["v"]).await;
        h.router.send(&vol("v"), publish("a", rwx())).await.unwrap();
        h.router.send(&vol("v"), unpublish("a")).await.unwrap();
        assert_eq!(h.actors().await, 1);
        tokio::time::sleep(GRACE - Duration::from_secs(1)).await;
        assert_eq!(h.actors().await, 1, "kept inside the grace window");
        assert_eq!(h.router.remembered_len(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(h.actors().await, 0, "reaped after the grace period");
        assert_eq!(
            h.router.remembered_len(),
            0,
            "the router forgets a reaped actor"
        );
        assert_eq!(
            h.metrics.volume_actors.with_label_values(&["grace"]).get(),
            0
        );
    });
}

/// The grace timer of a first detach stays armed through a republish and a second detach (it
/// is not re-armed per detach); when it fires, the handler reads the state: the second grace
/// period still runs, so the actor is kept until that one ends.
#[test]
fn a_grace_timer_left_from_an_earlier_detach_does_not_reap_early() {
    paused(|| async {
        let h = harness(&["v"]).await;
        h.router.send(&vol("v"), publish("a", rwx())).await.unwrap();
        h.router.send(&vol("v"), unpublish("a")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        h.router.send(&vol("v"), publish("a", rwx())).await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        h.router.send(&vol("v"), unpublish("a")).await.unwrap();
        // The first detach's timer fires at GRACE; the second detach's grace ends at 20 s + GRACE.
        tokio::time::sleep(GRACE - Duration::from_secs(20) + Duration::from_secs(1)).await;
        assert_eq!(h.actors().await, 1, "kept: the second grace period runs");
        assert_eq!(
            h.metrics.volume_actors.with_label_values(&["grace"]).get(),
            1
        );
        tokio::time::sleep(Duration::from_secs(18)).await;
        assert_eq!(h.actors().await, 1, "kept until 20 s + GRACE");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            h.actors().await,
            0,
            "reaped when the second grace period ends"
        );
        assert_eq!(
            h.metrics.volume_actors.with_label_values(&["grace"]).get(),
            0
        );
    });
}

#[test]
fn handoff_inside_the_grace_window_is_counted() {
    paused(|| async {
        let h = harness(&["v"]).await;
        h.router.send(&vol("v"), publish("a", rwx())).await.unwrap();
        h.router.send(&vol("v"), unpublish("a")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        h.router.send(&vol("v"), publish("b", rwx())).await.unwrap();
        assert_eq!(h.metrics.grace_period_used_total.get(), 1);
    });
}

#[test]
fn a_publish_that_races_the_reap_still_succeeds() {
    paused(|| async {
        let h = harness(&["v"]).await;
        h.router.send(&vol("v"), publish("a", rwx())).await.unwrap();
        h.router.send(&vol("v"), unpublish("a")).await.unwrap();
        // The router now remembers the actor's address; let the grace timer reap that actor.
        let doomed = h.actor_of("v").await;
        tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
        assert_eq!(h.actors().await, 0);
        // Sent straight to the reaped actor, the message would be lost...
        let direct = doomed.send(publish("b", rwx())).await;
        assert!(
            matches!(direct, Err(MailboxError::Closed) | Ok(Err(Error::Retired))),
            "the reaped actor must not accept work: {direct:?}"
        );
        // ...through the router it is retried on a fresh actor and succeeds.
        h.router.send(&vol("v"), publish("b", rwx())).await.unwrap();
        let view = h.router.send(&vol("v"), Describe).await.unwrap().unwrap();
        assert_eq!(view["nodes"][0]["node"], "b");
        assert_eq!(h.actors().await, 1);
    });
}

#[test]
fn publishes_at_the_reap_instant_are_never_lost() {
    paused(|| async {
        let h = harness(&["v"]).await;
        for round in 0..50u64 {
            h.router.send(&vol("v"), publish("a", rwx())).await.unwrap();
            h.router.send(&vol("v"), unpublish("a")).await.unwrap();
            // Land the publish exactly when the grace timer fires, give or take a few ms.
            let skew = Duration::from_millis(round % 5);
            let router = h.router.clone();
            let racer = actix_rt::spawn(async move {
                tokio::time::sleep(GRACE - Duration::from_millis(2) + skew).await;
                router.send(&vol("v"), publish("b", rwx())).await
            });
            racer.await.unwrap().unwrap();
            let view = h
                .router
                .send(&vol("v"), Describe)
                .await
                .unwrap()
                .expect("b holds the volume");
            assert_eq!(view["nodes"][0]["node"], "b", "round {round}");
            h.router.send(&vol("v"), unpublish("b")).await.unwrap();
            tokio::time::sleep(GRACE * 2).await;
        }
    });
}

#[test]
fn publish_to_a_missing_volume_or_unknown_node_is_not_found_and_leaves_no_actor() {
    paused(|| async {
        let h = harness(&["v"]).await;
        let err = h
            .router
            .send(&vol("nope"), publish("a", rwx()))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::VolumeNotFound(_)), "{err}");
        let err = h
            .router
            .send(&vol("v"), publish("zz", rwx()))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NodeNotFound(_)), "{err}");
        tokio::task::yield_now().await;
        assert_eq!(h.actors().await, 0, "idle actors retire at once");
    });
}

/// The value of one series in the Prometheus text that `/metrics` serves. An absent series
/// fails the test: a misspelled name must never read as 0.
fn scraped(metrics: &Metrics, series: &str) -> f64 {
    let text = metrics.render();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.parse().unwrap())
        .unwrap_or_else(|| panic!("series {series} is absent from:\n{text}"))
}

#[test]
#[should_panic(
    expected = "series rds_csi_migration_migrations_total{result=\"timed_out\"} is absent"
)]
fn a_series_missing_from_the_exposition_is_an_error_not_zero() {
    scraped(
        &Metrics::new(),
        r#"rds_csi_migration_migrations_total{result="timed_out"}"#,
    );
}

#[test]
fn a_timed_out_migration_is_counted_once_in_the_exposition() {
    paused(|| async {
        let h = harness(&["v"]).await;
        let timeout = r#"rds_csi_migration_migrations_total{result="timeout"}"#;
        let success = r#"rds_csi_migration_migrations_total{result="success"}"#;
        let failed = r#"rds_csi_migration_migrations_total{result="failed"}"#;
        h.router.send(&vol("v"), publish("a", rwx())).await.unwrap();
        h.router.send(&vol("v"), publish("b", rwx())).await.unwrap();
        assert_eq!(
            scraped(&h.metrics, "rds_csi_migration_active_migrations"),
            1.0
        );
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(scraped(&h.metrics, timeout), 1.0);
        assert_eq!(
            scraped(&h.metrics, "rds_csi_migration_active_migrations"),
            1.0,
            "still dual-attached"
        );
        h.router.send(&vol("v"), unpublish("b")).await.unwrap();
        assert_eq!(
            (
                scraped(&h.metrics, timeout),
                scraped(&h.metrics, success),
                scraped(&h.metrics, failed)
            ),
            (1.0, 0.0, 0.0),
            "the later rollback does not count again"
        );
        assert_eq!(
            scraped(&h.metrics, "rds_csi_migration_active_migrations"),
            0.0
        );
        assert_eq!(
            scraped(&h.metrics, "rds_csi_migration_duration_seconds_count"),
            0.0
        );
    });
}

fn seed_volume(
    volume: &str,
    holders: &[(&str, u64)],
    class: crate::domain::AccessClass,
) -> crate::kube::seed::SeedVolume {
    let now = std::time::SystemTime::now();
    crate::kube::seed::SeedVolume {
        volume: vol(volume),
        holders: holders
            .iter()
            .map(|(n, age)| crate::kube::seed::SeedHolder {
                node: NodeId::try_from(*n).unwrap(),
                attached: now - Duration::from_secs(*age),
                recorded_instant: false,
                age: Duration::from_secs(*age),
            })
            .collect(),
        class,
        migration_timeout: Duration::from_secs(600),
        order_known: true,
    }
}

/// The attach instant is per holder, never part of the volume's cached publish_context: a
/// seeded holder whose VolumeAttachment recorded none answers without one even after the other
/// holder's answer carried its own, and a parked holder answers with the one its VA recorded.
#[test]
fn each_holder_answers_with_its_own_attach_instant() {
    use crate::domain::{attach_instant_text, AccessClass, PUBLISH_ATTACHED_AT_KEY as KEY};
    use crate::kube::seed::SeedHolder;
    paused(|| async {
        let h = harness(&["m", "p"]).await;
        let recorded = std::time::SystemTime::UNIX_EPOCH + Duration::new(1_767_323_045, 5);
        let holder = |n: &str, recorded_instant: bool| SeedHolder {
            node: NodeId::try_from(n).unwrap(),
            attached: recorded,
            recorded_instant,
            age: std::time::SystemTime::now()
                .duration_since(recorded)
                .unwrap_or_default(),
        };
        let mut migration = seed_volume("m", &[], AccessClass::Migratable);
        migration.holders = vec![holder("a", false), holder("b", true)];
        let mut parked = seed_volume("p", &[], AccessClass::Migratable);
        parked.holders = vec![holder("c", true)];
        h.router
            .supervisor()
            .send(seed_in(Term::FIRST, vec![migration, parked]))
            .await
            .unwrap();
        let ctx = |node: &str, volume: &str| {
            let router = h.router.clone();
            let (node, volume) = (node.to_string(), vol(volume));
            async move {
                router
                    .send(&volume, publish(&node, rwx()))
                    .await
                    .unwrap()
                    .publish_context
            }
        };
        let b = ctx("b", "m").await;
        assert_eq!(b[KEY], attach_instant_text(recorded));
        let a = ctx("a", "m").await;
        assert_eq!(a.get(KEY), None, "a's VA recorded no instant: {a:?}");
        assert_eq!(a["imagePath"], b["imagePath"]);
        assert_eq!(ctx("b", "m").await, b, "a repeat answers the same");
        assert_eq!(ctx("c", "p").await[KEY], attach_instant_text(recorded));
    });
}

impl Harness {
    fn actors_in(&self, state: &str) -> i64 {
        self.metrics.volume_actors.with_label_values(&[state]).get()
    }
}

#[test]
fn seeded_settled_volumes_are_parked_until_their_first_message() {
    use crate::domain::AccessClass::{Exclusive, Migratable};
    paused(|| async {
        let h = harness(&["x", "m", "d"]).await;
        let seeded = h
            .router
            .supervisor()
            .send(seed_in(
                Term::FIRST,
                vec![
                    seed_volume("x", &[("a", 100)], Exclusive),
                    seed_volume("m", &[("a", 100)], Migratable),
                    seed_volume("d", &[("a", 100), ("b", 10)], Migratable),
                ],
            ))
            .await
            .unwrap();
        assert_eq!(seeded, 3);
        tokio::task::yield_now().await;
        // Only the migration needs an actor (it has a timer); the two settled volumes are
        // compact records, but still count as attached.
        assert_eq!(h.actors().await, 1);
        assert_eq!(h.metrics.parked_volumes.get(), 2);
        assert_eq!(h.metrics.nvme_connections_active.get(), 3);
        assert_eq!((h.actors_in("attached"), h.actors_in("migrating")), (0, 1));
        let listing = h
            .router
            .supervisor()
            .send(ListActors::first(usize::MAX))
            .await
            .unwrap();
        let mut parked: Vec<_> = listing
            .parked
            .iter()
            .map(|(v, view)| (v.as_str(), view["nodes"][0]["node"].as_str().unwrap()))
            .collect();
        parked.sort();
        assert_eq!(parked, vec![("m", "a"), ("x", "a")]);

        // A parked exclusive volume refuses a second node exactly as an actor would.
        let exclusive = Capability::block(AccessMode::SingleNodeWriter);
        let err = h
            .router
            .send(&vol("x"), publish("b", exclusive.clone()))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Conflict { holders, .. } if holders[0].as_str() == "a"),
            "{err}"
        );
        assert_eq!(h.actors().await, 2, "the first message started its actor");
        assert_eq!(h.metrics.parked_volumes.get(), 1);
        assert_eq!(h.metrics.nvme_connections_active.get(), 3);
        assert_eq!(h.actors_in("attached"), 1);

        // The holder's re-publish is idempotent; a second node on the migratable one migrates.
        h.router.send(&vol("m"), publish("a", rwx())).await.unwrap();
        assert_eq!(h.metrics.parked_volumes.get(), 0);
        h.router.send(&vol("m"), publish("b", rwx())).await.unwrap();
        assert_eq!(h.metrics.active_migrations.get(), 2);
        let view = h.router.send(&vol("m"), Describe).await.unwrap().unwrap();
        assert_eq!(view["nodes"].as_array().unwrap().len(), 2);

        // The woken exclusive volume detaches normally.
        h.router.send(&vol("x"), unpublish("a")).await.unwrap();
        assert_eq!(h.metrics.nvme_connections_active.get(), 2);
        assert_eq!(h.actors_in("grace"), 1);
    });
}

/// The debug view's listing comes a page at a time, so the supervisor never describes every
/// volume at once: across pages smaller than the whole, every volume with an actor or a parked
/// record is listed exactly once, in id order, and the last page says nothing follows.
#[test]
fn the_listing_pages_through_every_volume_exactly_once() {
    use crate::domain::AccessClass::Exclusive;
    paused(|| async {
        let names: Vec<String> = (0..23).map(|i| format!("v{i:02}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let h = harness(&refs).await;
        // v00..v16 seeded (parked); v03, v07 and v11 woken into actors; v17..v22 published
        // fresh (actors only).
        let seeded = names[..17]
            .iter()
            .map(|v| seed_volume(v, &[("a", 100)], Exclusive))
            .collect();
        h.router
            .supervisor()
            .send(seed_in(Term::FIRST, seeded))
            .await
            .unwrap();
        for v in ["v03", "v07", "v11"]
            .into_iter()
            .chain(refs[17..].iter().copied())
        {
            h.router
                .send(&vol(v), publish("a", exclusive()))
                .await
                .unwrap();
        }
        assert_eq!(h.metrics.parked_volumes.get(), 14);
        let mut listed = Vec::new();
        let mut pages = 0;
        let mut after = None;
        loop {
            let page = h
                .router
                .supervisor()
                .send(ListActors { after, limit: 4 })
                .await
                .unwrap();
            pages += 1;
            let mut ids: Vec<String> = page
                .actors
                .iter()
                .map(|(v, _)| v.as_str().to_string())
                .chain(page.parked.iter().map(|(v, _)| v.as_str().to_string()))
                .collect();
            assert!(ids.len() <= 4, "page {pages}: {ids:?}");
            ids.sort();
            listed.extend(ids);
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(listed, names, "every volume once, in order");
        assert_eq!(pages, 6);
    });
}

fn exclusive() -> Capability {
    Capability::block(AccessMode::SingleNodeWriter)
}

#[test]
fn a_node_at_its_volume_limit_is_refused_until_one_detaches() {
    paused(|| async {
        let h = harness_limited(&["v1", "v2", "v3", "held"], 2).await;
        let publish = |v: &str, n: &str, cap: Capability| {
            let (router, id, node) = (
                h.router.clone(),
                VolumeId::try_from(v).unwrap(),
                NodeId::try_from(n).unwrap(),
            );
            async move {
                router
                    .send(
                        &id,
                        Publish {
                            req: PublishRequest {
                                node,
                                capability: cap,
                                readonly: false,
                                migration_timeout: Duration::from_secs(60),
                            },
                            term: Term::FIRST,
                        },
                    )
                    .await
            }
        };
        publish("held", "b", exclusive()).await.unwrap();
        publish("v1", "a", exclusive()).await.unwrap();
        publish("v2", "a", exclusive()).await.unwrap();
        publish("v2", "a", exclusive())
            .await
            .expect("an idempotent repeat at the limit is OK");
        let full = publish("v3", "a", exclusive()).await.unwrap_err();
        assert!(
            matches!(
                &full,
                Error::NodeFull {
                    held: 2,
                    max: 2,
                    ..
                }
            ),
            "{full}"
        );
        // The rules' own refusal keeps its precedence over the limit.
        let conflict = publish("held", "a", exclusive()).await.unwrap_err();
        assert!(matches!(conflict, Error::Conflict { .. }), "{conflict}");
        // The refused publish changed nothing: v3 is on no node, so b can take it.
        publish("v3", "b", exclusive()).await.unwrap();
        h.router
            .send(
                &VolumeId::try_from("v1").unwrap(),
                Unpublish {
                    node: None,
                    term: Term::FIRST,
                },
            )
            .await
            .unwrap();
        publish("v3", "b", exclusive()).await.unwrap();
        h.router
            .send(
                &VolumeId::try_from("v3").unwrap(),
                Unpublish {
                    node: None,
                    term: Term::FIRST,
                },
            )
            .await
            .unwrap();
        publish("v3", "a", exclusive())
            .await
            .expect("a slot freed by the detach");
        assert!(matches!(
            publish("v1", "a", exclusive()).await,
            Err(Error::NodeFull { .. })
        ));
    });
}

/// Test only: a handler bug. The panic stops the actor without retiring it, as any panic in a
/// real handler would in a build that unwinds.
struct Explode;

impl Message for Explode {
    type Result = ();
}

impl Handler<Explode> for super::volume::VolumeActor {
    type Result = ();

    fn handle(&mut self, _: Explode, _: &mut Context<Self>) {
        panic!("test: a bug in a volume actor's handler");
    }
}

#[test]
fn a_volume_whose_actor_died_is_unavailable_never_served_from_empty_state() {
    paused(|| async {
        let h = harness(&["v", "other"]).await;
        h.router
            .send(&vol("v"), publish("a", exclusive()))
            .await
            .unwrap();
        let addr = h.actor_of("v").await;
        assert!(
            addr.send(Explode).await.is_err(),
            "the actor dies answering nothing"
        );
        tokio::task::yield_now().await;
        assert!(!addr.connected());

        // Node a still holds v in reality; the state that said so died with the actor.
        let err = h
            .router
            .send(&vol("v"), publish("b", exclusive()))
            .await
            .expect_err("an exclusive volume held by a must never be given to b");
        assert!(
            matches!(&err, Error::Unavailable(m) if m.contains("stopped unexpectedly")),
            "{err}"
        );
        for attempt in 0..3 {
            let err = h.router.send(&vol("v"), unpublish("a")).await.unwrap_err();
            assert!(matches!(err, Error::Unavailable(_)), "{attempt}: {err}");
        }
        let lookup = h.router.supervisor().send(Lookup(vol("v"))).await.unwrap();
        assert!(
            matches!(&lookup, Err(Error::Unavailable(m)) if m.contains("re-seeds")),
            "the debug view says so too: {lookup:?}"
        );
        assert_eq!(
            scraped(&h.metrics, "rds_csi_attachment_poisoned_volumes"),
            1.0,
            "counted once"
        );
        // Every other volume is served as before.
        h.router
            .send(&vol("other"), publish("b", exclusive()))
            .await
            .unwrap();
    });
}

#[test]
fn an_actor_that_retires_while_a_lookup_is_queued_is_not_taken_for_dead() {
    paused(|| async {
        let h = harness(&["v"]).await;
        for round in 0..2 {
            // A fresh actor with nothing to keep: the no-op detach below makes it retire.
            let addr = h.actor_of("v").await;
            // Queued in this order, the actor retires and stops before the supervisor reads the
            // Lookup, whose turn comes before the actor's Reaped.
            let detach = addr.send(unpublish("a"));
            let lookup = h.router.supervisor().send(Lookup(vol("v")));
            let (detach, lookup) = futures::join!(detach, lookup);
            assert!(
                matches!(detach, Ok(Ok(()))),
                "round {round}: the actor answered, then retired: {detach:?}"
            );
            assert!(
                matches!(lookup, Ok(Ok(None))),
                "round {round}: a retired actor is no actor, not a dead one: {lookup:?}"
            );
            assert!(!addr.connected(), "round {round}: the actor stopped");
        }
        h.router
            .send(&vol("v"), publish("a", exclusive()))
            .await
            .unwrap();
        assert_eq!(
            scraped(&h.metrics, "rds_csi_attachment_poisoned_volumes"),
            0.0
        );
    });
}

/// A backend whose reads wait for a write in progress (one lock held across the write, as a
/// backend that guards its index and its I/O with one lock does), and whose `create` stays in
/// progress until the test releases it.
#[derive(Default)]
struct StallingBackend {
    volumes: tokio::sync::RwLock<BTreeMap<VolumeId, VolumeInfo>>,
    creating: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl StallingBackend {
    fn info(req: CreateRequest) -> VolumeInfo {
        VolumeInfo {
            id: req.id,
            name: req.name,
            capacity_bytes: req.required_bytes,
            capabilities: req.capabilities,
            parameters: req.parameters,
            created_at: std::time::SystemTime::UNIX_EPOCH,
            source: req.source,
        }
    }
}

#[async_trait::async_trait]
impl VolumeBackend for StallingBackend {
    fn kind(&self) -> &'static str {
        "stalling"
    }
    async fn create(&self, req: CreateRequest) -> Result<VolumeInfo, BackendError> {
        let mut volumes = self.volumes.write().await;
        self.creating.notify_one();
        self.release.notified().await;
        let info = Self::info(req);
        volumes.insert(info.id.clone(), info.clone());
        Ok(info)
    }
    async fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        self.volumes.write().await.remove(id);
        Ok(())
    }
    async fn get(&self, id: &VolumeId) -> Result<Option<VolumeInfo>, BackendError> {
        Ok(self.volumes.read().await.get(id).cloned())
    }
    async fn list(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        Ok(self.volumes.read().await.values().cloned().collect())
    }
    async fn list_owned(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        self.list().await
    }
    async fn capacity(&self) -> Result<u64, BackendError> {
        Ok(u64::MAX)
    }
    async fn expand(&self, _: &VolumeId, bytes: u64) -> Result<u64, BackendError> {
        Ok(bytes)
    }
    fn publish_context(&self, volume: &VolumeInfo) -> HashMap<String, String> {
        HashMap::from([("volume".to_string(), volume.id.to_string())])
    }
}

#[test]
fn an_attached_volume_publishes_without_waiting_for_a_create_in_the_backend() {
    paused(|| async {
        let backend = Arc::new(StallingBackend::default());
        let v = StallingBackend::info(create_request("v"));
        backend.volumes.write().await.insert(v.id.clone(), v);
        let h = harness_on(backend.clone(), tempfile::tempdir().unwrap(), 0);
        h.router.send(&vol("v"), publish("a", rwx())).await.unwrap();

        let done = Arc::new(Mutex::new(Vec::new()));
        let create = actix_rt::spawn({
            let (backend, done) = (backend.clone(), done.clone());
            async move {
                backend.create(create_request("new")).await.unwrap();
                done.lock().unwrap().push("create");
            }
        });
        backend.creating.notified().await;
        // v's next attach (a live migration to b) while the create holds the backend.
        let migrate = actix_rt::spawn({
            let (router, done) = (h.router.clone(), done.clone());
            async move {
                let published = router.send(&vol("v"), publish("b", rwx())).await;
                done.lock().unwrap().push("publish");
                published
            }
        });
        // On the paused clock this sleep ends only once every other task waits: the create is
        // released when nothing else can make progress.
        tokio::time::sleep(Duration::from_secs(1)).await;
        backend.release.notify_one();
        let context = migrate.await.unwrap().unwrap().publish_context;
        create.await.unwrap();
        assert_eq!(context["volume"], "v");
        assert_eq!(*done.lock().unwrap(), ["publish", "create"]);
    });
}

#[test]
fn a_file_backend_create_stuck_in_its_io_does_not_delay_a_publish() {
    paused(|| async {
        let dir = tempfile::tempdir().unwrap();
        let (stall, release, stalled) = Stall::new(Step::CreateRenameImage, "new");
        let backend = Arc::new(FileBackend::open_with_faults(dir.path(), Arc::new(stall)).unwrap());
        backend.create(create_request("v")).await.unwrap();
        let h = harness_on(backend.clone(), dir, 0);

        let done = Arc::new(Mutex::new(Vec::new()));
        let create = actix_rt::spawn({
            let (backend, done) = (backend.clone(), done.clone());
            async move {
                backend.create(create_request("new")).await.unwrap();
                done.lock().unwrap().push("create");
            }
        });
        stalled.await.unwrap();
        // v's first publish: its actor starts and asks the backend about v.
        let published = h.router.send(&vol("v"), publish("a", rwx())).await;
        done.lock().unwrap().push("publish");
        release.send(()).unwrap_or_default();
        create.await.unwrap();
        assert!(published.unwrap().publish_context["imagePath"].ends_with("/v.img"));
        assert_eq!(*done.lock().unwrap(), ["publish", "create"]);
    });
}

/// Standing down (Dismiss) drops every volume's state with everything it counted, events
/// nothing, refuses routes until the next Seed (no call of the old term starts an actor from
/// empty state), and the next Seed serves exactly what it rebuilt, poisoned volumes included.
#[test]
fn dismissing_drops_all_state_and_refuses_until_the_next_seed() {
    use super::messages::Dismiss;
    use crate::domain::AccessClass::{Exclusive, Migratable};
    paused(|| async {
        let h = harness_limited(&["x", "m", "v", "p"], 8).await;
        let supervisor = h.router.supervisor().clone();
        supervisor
            .send(seed_in(
                Term::FIRST,
                vec![
                    seed_volume("x", &[("a", 100)], Exclusive),
                    seed_volume("m", &[("a", 100), ("b", 10)], Migratable),
                ],
            ))
            .await
            .unwrap();
        h.router
            .send(&vol("v"), publish("c", exclusive()))
            .await
            .unwrap();
        h.router
            .send(&vol("p"), publish("c", exclusive()))
            .await
            .unwrap();
        let dead = h.actor_of("p").await;
        assert!(dead.send(Explode).await.is_err());
        tokio::task::yield_now().await;
        assert!(
            h.router.send(&vol("p"), Describe).await.is_err(),
            "poisoned"
        );
        let m = &h.metrics;
        assert_eq!(
            (
                m.parked_volumes.get(),
                m.active_migrations.get(),
                m.poisoned_volumes.get()
            ),
            (1, 1, 1)
        );

        assert_eq!(supervisor.send(Dismiss).await.unwrap(), 4);
        tokio::task::yield_now().await;
        let gauges = || {
            (
                m.parked_volumes.get(),
                m.nvme_connections_active.get(),
                m.active_migrations.get(),
                m.poisoned_volumes.get(),
                h.actors_in("attached") + h.actors_in("migrating") + h.actors_in("grace"),
            )
        };
        // p's actor died with its counts in the attached-volumes and actors gauges (as before
        // this change, a dead actor gives nothing back); everything live is given back.
        assert_eq!(gauges(), (0, 1, 0, 0, 1), "all state dropped");
        assert_eq!(m.detach_total.with_label_values(&["success"]).get(), 0);
        assert_eq!(m.migrations_total.with_label_values(&["failed"]).get(), 0);
        let route = supervisor
            .send(super::messages::Route {
                volume: vol("x"),
                term: Some(Term::FIRST),
                caller: None,
            })
            .await
            .unwrap();
        assert!(
            matches!(&route, Err(Error::NotActive(m)) if m.contains("stood down")),
            "no actor starts from empty state: {:?}",
            route.map(|_| ())
        );
        let err = h
            .router
            .send(&vol("v"), publish("d", exclusive()))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotActive(_)), "{err}");

        // The next term: only what the VolumeAttachments say now.
        let next = Term::FIRST.next();
        supervisor
            .send(seed_in(
                next,
                vec![seed_volume("v", &[("b", 5)], Exclusive)],
            ))
            .await
            .unwrap();
        let fresh = h
            .router
            .send(&vol("x"), publish_in(next, "b", exclusive()))
            .await;
        assert!(fresh.is_ok(), "x has no holder now: {fresh:?}");
        let err = h
            .router
            .send(&vol("v"), publish_in(next, "c", exclusive()))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Conflict { holders, .. } if holders[0].as_str() == "b"),
            "{err}"
        );
        h.router
            .send(&vol("p"), publish_in(next, "a", exclusive()))
            .await
            .expect("re-seeded: no longer poisoned");
    });
}

/// A stale drop carries the instant just before its Node's 404 GET was sent, and only holders
/// older than it go: x (parked, attached long before) is woken and dropped, y (attached to the
/// same node name after that instant: the Node re-registered and a Publish answered OK) keeps
/// its holder, and p (seeded after that instant) is not even woken. Catches
/// `a.confirmed_at < asked_at` in `VolumeState::drop_stale` (y would be dropped) and
/// `p.attached_at < gone.asked_at` in the supervisor's `ClearStale` (p would be woken).
#[test]
fn a_stale_drop_keeps_holders_attached_after_the_404() {
    use super::messages::{ClearStale, GoneNode};
    use crate::domain::AccessClass::Exclusive;
    paused(|| async {
        let h = harness(&["x", "y", "p"]).await;
        let supervisor = h.router.supervisor().clone();
        supervisor
            .send(seed_in(
                Term::FIRST,
                vec![seed_volume("x", &[("a", 100)], Exclusive)],
            ))
            .await
            .unwrap();
        let asked_at = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        h.router
            .send(&vol("y"), publish("a", exclusive()))
            .await
            .unwrap();
        supervisor
            .send(seed_in(
                Term::FIRST,
                vec![seed_volume("p", &[("a", 0)], Exclusive)],
            ))
            .await
            .unwrap();
        assert_eq!(h.metrics.parked_volumes.get(), 2);

        let gone = GoneNode {
            node: NodeId::try_from("a").unwrap(),
            asked_at,
        };
        supervisor.send(ClearStale(gone)).await.unwrap();
        let holders = |v: &'static str| {
            let router = h.router.clone();
            async move { super::holders_of(&router, v).await.len() }
        };
        assert_eq!(holders("x").await, 0, "attached before the GET: dropped");
        assert_eq!(
            holders("y").await,
            1,
            "attached after the GET was sent: kept"
        );
        assert_eq!(h.metrics.stale_cleared_total.get(), 1);
        assert_eq!(h.metrics.parked_volumes.get(), 1, "p stays parked");
        assert_eq!(holders("p").await, 1);
    });
}

/// Seeding answers only once every actor it started has started: readiness follows the
/// answer, so by then each seeded migration is counted in `migration_active_migrations`, each
/// actor in its class gauge, and its timer armed. The actor's arbiter is held busy, so its
/// `started` cannot run until the test lets it: an answer before that is the bug.
///
/// Catches: the supervisor's Seed handler answering without awaiting the seeded actors'
/// `Settled` replies.
#[test]
fn seeding_answers_after_the_seeded_actors_started() {
    actix_rt::System::new().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(FileBackend::open(dir.path()).unwrap());
        let deps = deps_on(backend, 0);
        let metrics = deps.metrics.clone();
        let arbiter = actix_rt::Arbiter::new();
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let (busy, is_busy) = tokio::sync::oneshot::channel();
        arbiter.spawn_fn(move || {
            busy.send(()).unwrap();
            // Also released when the test ends early (the sender dropped).
            held.recv().unwrap_or(());
        });
        is_busy.await.unwrap();
        let supervisor = Supervisor::new(deps, vec![arbiter.handle()]).start();
        use crate::domain::AccessClass::Migratable;
        let mut seeded = std::pin::pin!(supervisor.send(seed_in(
            Term::FIRST,
            vec![seed_volume("m", &[("a", 20), ("b", 10)], Migratable)],
        )));
        // Queued behind the Seed: once it is answered, the Seed was handled.
        supervisor.send(ListActors::first(1)).await.unwrap();
        assert!(
            futures::poll!(seeded.as_mut()).is_pending(),
            "seeding answered while its migration's actor had not started"
        );
        assert_eq!(metrics.active_migrations.get(), 0);
        hold.send(()).unwrap();
        assert_eq!(seeded.await.unwrap(), 1);
        assert_eq!(
            metrics.active_migrations.get(),
            1,
            "seeding answered before its migration was counted"
        );
        arbiter.stop();
    });
}

#[path = "term_tests.rs"]
mod term;

/// Which thread runs an actor: the test's window onto placement.
struct ThreadOf;

impl Message for ThreadOf {
    type Result = std::thread::ThreadId;
}

impl Handler<ThreadOf> for super::volume::VolumeActor {
    type Result = MessageResult<ThreadOf>;

    fn handle(&mut self, _: ThreadOf, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(std::thread::current().id())
    }
}

/// A volume's actor starts on the arbiter its first caller runs on, so the caller's messages and
/// the actor's answers never wake another thread; a caller on no arbiter of the supervisor's
/// (here the test's own thread) gets the arbiter the volume hashes to, which spreads volumes
/// over all of them. Placement is only where an actor runs: each volume still has one actor,
/// whoever asks first.
///
/// Catches: the Router not saying where its caller runs, or the supervisor starting every
/// actor on the hashed arbiter.
#[test]
fn a_volumes_actor_starts_on_its_first_callers_arbiter() {
    actix_rt::System::new().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(FileBackend::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..2).map(|_| actix_rt::Arbiter::new()).collect();
        let handles: Vec<_> = threads.iter().map(|a| a.handle()).collect();
        let supervisor = Supervisor::new(deps_on(backend, 0), handles.clone()).start();
        let router = Router::new(supervisor, Duration::from_secs(5));
        let thread_of = |arbiter: &actix_rt::ArbiterHandle| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            arbiter.spawn_fn(move || tx.send(std::thread::current().id()).unwrap());
            rx
        };
        let arbiter_threads = [
            thread_of(&handles[0]).await.unwrap(),
            thread_of(&handles[1]).await.unwrap(),
        ];
        // From each arbiter in turn, the first message for volumes no one asked for yet.
        let ask = |arbiter: &actix_rt::ArbiterHandle, volume: String| {
            let router = router.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            arbiter.spawn(async move {
                let volume = vol(&volume);
                router.send(&volume, Describe).await.unwrap();
                let actor = router.supervisor().send(super::messages::Route {
                    volume,
                    term: None,
                    caller: None,
                });
                let actor = actor.await.unwrap().unwrap();
                tx.send(actor.send(ThreadOf).await.unwrap()).unwrap();
            });
            rx
        };
        for i in 0..8 {
            for (slot, arbiter) in handles.iter().enumerate() {
                let ran_on = ask(arbiter, format!("v-{slot}-{i}")).await.unwrap();
                assert_eq!(
                    ran_on, arbiter_threads[slot],
                    "v-{slot}-{i}'s first caller ran on arbiter {slot}; its actor did not"
                );
            }
        }
        // The same volume asked again from the other arbiter keeps its one actor.
        let again = ask(&handles[1], "v-0-0".into()).await.unwrap();
        assert_eq!(
            again, arbiter_threads[0],
            "one actor per volume, wherever it runs"
        );
        // From no arbiter of the set: spread by hash over both.
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..32 {
            let volume = vol(&format!("w-{i}"));
            router.send(&volume, Describe).await.unwrap();
            let actor = router.supervisor().send(super::messages::Route {
                volume,
                term: None,
                caller: None,
            });
            let ran_on = actor.await.unwrap().unwrap().send(ThreadOf).await.unwrap();
            assert!(
                arbiter_threads.contains(&ran_on),
                "an actor ran off the arbiters"
            );
            seen.insert(format!("{ran_on:?}"));
        }
        assert_eq!(
            seen.len(),
            2,
            "32 volumes asked from elsewhere all landed on one arbiter"
        );
        for a in threads {
            a.stop();
        }
    });
}
