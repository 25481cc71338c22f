//! Volume actors and the supervisor on tokio's paused clock: timers fire by advancing virtual
//! time, never by sleeping for real.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::messages::{Describe, ListActors, Publish, Unpublish};
use super::state::PublishRequest;
use super::supervisor::Supervisor;
use super::{Router, VolumeDeps};
use crate::backend::file::FileBackend;
use crate::backend::{CreateRequest, VolumeBackend};
use crate::domain::{AccessMode, Capability};
use crate::ids::{NodeId, VolumeId};
use crate::kube::Standalone;
use crate::metrics::Metrics;
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

async fn harness_limited(volumes: &[&str], max_per_node: u64) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FileBackend::open(dir.path()).unwrap());
    for v in volumes {
        backend
            .create(CreateRequest {
                id: VolumeId::try_from(*v).unwrap(),
                name: v.to_string(),
                required_bytes: 1 << 20,
                limit_bytes: 0,
                capabilities: vec![rwx()],
                parameters: BTreeMap::new(),
            })
            .await
            .unwrap();
    }
    let cluster = Arc::new(Standalone::new(
        ["a", "b", "c"].map(|n| NodeId::try_from(n).unwrap()),
    ));
    let metrics = Arc::new(Metrics::new());
    let deps = Arc::new(VolumeDeps {
        backend,
        nodes: cluster.clone(),
        authority: cluster.clone(),
        sink: cluster,
        metrics: metrics.clone(),
        grace_period: GRACE,
        node_limit: super::NodeLimit::new(max_per_node),
    });
    let supervisor = Supervisor::new(deps, Vec::new()).start();
    Harness {
        router: Router::new(supervisor, Duration::from_secs(5)),
        metrics,
        _dir: dir,
    }
}

fn rwx() -> Capability {
    Capability::block(AccessMode::MultiNodeMultiWriter)
}

fn publish(node: &str, capability: Capability) -> Publish {
    Publish(PublishRequest {
        node: NodeId::try_from(node).unwrap(),
        capability,
        readonly: false,
        migration_timeout: Duration::from_secs(60),
    })
}

fn unpublish(node: &str) -> Unpublish {
    Unpublish {
        node: Some(NodeId::try_from(node).unwrap()),
    }
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

    async fn actors(&self) -> usize {
        self.router
            .supervisor()
            .send(ListActors)
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
        let doomed = h
            .router
            .supervisor()
            .send(super::messages::Route {
                volume: vol("v"),
                stale: None,
            })
            .await
            .unwrap();
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
            .map(|(n, age)| {
                (
                    NodeId::try_from(*n).unwrap(),
                    now - Duration::from_secs(*age),
                )
            })
            .collect(),
        class,
        migration_timeout: Duration::from_secs(600),
    }
}

impl Harness {
    fn actors_in(&self, state: &str) -> i64 {
        self.metrics.volume_actors.with_label_values(&[state]).get()
    }
}

#[test]
fn seeded_settled_volumes_are_parked_until_their_first_message() {
    use super::messages::Seed;
    use crate::domain::AccessClass::{Exclusive, Migratable};
    paused(|| async {
        let h = harness(&["x", "m", "d"]).await;
        let seeded = h
            .router
            .supervisor()
            .send(Seed(vec![
                seed_volume("x", &[("a", 100)], Exclusive),
                seed_volume("m", &[("a", 100)], Migratable),
                seed_volume("d", &[("a", 100), ("b", 10)], Migratable),
            ]))
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
        let listing = h.router.supervisor().send(ListActors).await.unwrap();
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
                        Publish(PublishRequest {
                            node,
                            capability: cap,
                            readonly: false,
                            migration_timeout: Duration::from_secs(60),
                        }),
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
            .send(&VolumeId::try_from("v1").unwrap(), Unpublish { node: None })
            .await
            .unwrap();
        publish("v3", "b", exclusive()).await.unwrap();
        h.router
            .send(&VolumeId::try_from("v3").unwrap(), Unpublish { node: None })
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
