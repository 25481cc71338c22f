//! Stale attachments: a node whose Node object is deleted will never detach anything, so its
//! attachments would block other nodes until a publish trips over them (rule 5.1). This
//! reconciler drops them ahead of that: at once when the Node watch reports a deletion, and
//! every interval for deletions the watch missed. A node is dropped only once a live GET
//! confirms its Node is gone (404): a cache or a watch event alone never drops anything, and a
//! Node that is merely NotReady is not gone. Each node is cleared right after its own 404, and
//! only of attachments made before its GET was sent ([`GoneNode`]): a Node that re-registered
//! under the same name and was published to meanwhile keeps what it was given.
//!
//! It changes only the driver's attachment state, through the volume actors (so each drop is
//! counted once and evented once, as in a publish). VolumeAttachment objects belong to the
//! attach-detach controller and the external-attacher; it never touches them.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio::time::MissedTickBehavior;

use super::{count, LIVE_READ_TIMEOUT, STALE};
use crate::actors::messages::{ClearStale, GoneNode, Holders, ListHolders};
use crate::actors::supervisor::Supervisor;
use crate::ids::NodeId;
use crate::kube::NodeLiveness;
use crate::metrics::{Metrics, RECONCILE_NODE_WATCHER};

/// Actors asked for their holders at once.
const CONCURRENT_ASKS: usize = 256;

/// Nodes checked live at once: a pass over many holders is not serialized behind one slow GET,
/// and the API server sees a bounded burst.
const CONCURRENT_NODE_CHECKS: usize = 8;

pub struct StaleAttachments {
    pub supervisor: Addr<Supervisor>,
    pub nodes: Arc<dyn NodeLiveness>,
    pub metrics: Arc<Metrics>,
}

impl StaleAttachments {
    /// Every interval (the first one interval after the term began, when seeding has just read
    /// the VolumeAttachments), and for every deletion the Node watch reports.
    pub async fn run(self, interval: Duration, mut deletions: broadcast::Receiver<String>) {
        let start = tokio::time::Instant::now() + interval;
        let mut tick = tokio::time::interval_at(start, interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut watching = true;
        loop {
            let mut closed = false;
            tokio::select! {
                _ = tick.tick() => {
                    let started = tokio::time::Instant::now();
                    let ok = self.pass().await;
                    count(&self.metrics, STALE, ok);
                    self.metrics
                        .attachment_operation_duration
                        .with_label_values(&["reconcile"])
                        .observe(started.elapsed().as_secs_f64());
                }
                deleted = deletions.recv(), if watching => match deleted {
                    Ok(name) => match NodeId::try_from(name.as_str()) {
                        Ok(node) => {
                            self.metrics
                                .attachment_reconcile_total
                                .with_label_values(&[RECONCILE_NODE_WATCHER])
                                .inc();
                            self.clear_if_gone(vec![node]).await;
                        }
                        Err(_) => tracing::debug!(node = %name, "a deleted Node whose name is no node id; nothing holds it"),
                    },
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::info!(missed, "missed Node deletions; checking every holder now");
                        let ok = self.pass().await;
                        count(&self.metrics, STALE, ok);
                    }
                    Err(broadcast::error::RecvError::Closed) => closed = true,
                },
            }
            if closed {
                tracing::warn!("Node deletions are no longer reported; the interval passes go on");
                watching = false;
            }
        }
    }

    /// One pass: every node holding a volume is checked live. Returns false if any check
    /// failed (those nodes keep their attachments until a later pass confirms).
    pub async fn pass(&self) -> bool {
        let Ok(listing) = self.supervisor.send(ListHolders).await else {
            return false;
        };
        let mut holders: HashSet<NodeId> = listing.parked;
        let mut answers = futures::stream::iter(listing.actors)
            .map(|actor| async move { actor.send(Holders).await.unwrap_or_default() })
            .buffer_unordered(CONCURRENT_ASKS);
        while let Some(nodes) = answers.next().await {
            holders.extend(nodes);
        }
        let mut holders: Vec<NodeId> = holders.into_iter().collect();
        holders.sort();
        self.clear_if_gone(holders).await
    }

    /// Confirms each node's deletion with a live GET, a few nodes at a time, and clears each
    /// confirmed node right after its own 404. Returns false if any check (or clear) failed.
    async fn clear_if_gone(&self, nodes: Vec<NodeId>) -> bool {
        futures::stream::iter(nodes)
            .map(|node| self.clear_if_gone_one(node))
            .buffer_unordered(CONCURRENT_NODE_CHECKS)
            .fold(true, |ok, one| async move { ok && one })
            .await
    }

    /// One node: the instant taken just before its GET is sent travels with its clear, so the
    /// volume actors drop only attachments older than it (a Node that re-registered after the
    /// 404 and was published to meanwhile keeps its attachment).
    async fn clear_if_gone_one(&self, node: NodeId) -> bool {
        let asked_at = tokio::time::Instant::now();
        match tokio::time::timeout(LIVE_READ_TIMEOUT, self.nodes.gone(&node)).await {
            Ok(Ok(true)) => {
                tracing::info!(node_id = %node, "Node confirmed deleted: dropping its attachments made before the check");
                self.supervisor
                    .send(ClearStale(GoneNode { node, asked_at }))
                    .await
                    .is_ok()
            }
            Ok(Ok(false)) => true,
            Ok(Err(e)) => {
                tracing::warn!(node_id = %node, error = %e, "cannot confirm whether the Node is gone; its attachments stay");
                false
            }
            Err(_) => {
                tracing::warn!(node_id = %node, "the API did not say in time whether the Node is gone; its attachments stay");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::SystemTime;

    use actix::Actor;
    use async_trait::async_trait;

    use super::*;
    use crate::actors::holders_of;
    use crate::actors::messages::Seed;
    use crate::actors::{NodeLimit, Router, VolumeDeps};
    use crate::backend::file::FileBackend;
    use crate::domain::AccessClass;
    use crate::ids::VolumeId;
    use crate::kube::seed::{SeedHolder, SeedVolume};
    use crate::kube::{ClusterEvent, ClusterSink, KubeError, Standalone};

    /// Which Nodes a live GET finds.
    struct Nodes(Mutex<HashMap<String, bool>>);

    #[async_trait]
    impl NodeLiveness for Nodes {
        async fn gone(&self, node: &NodeId) -> Result<bool, KubeError> {
            let known = self.0.lock().unwrap();
            match known.get(node.as_str()) {
                Some(exists) => Ok(!exists),
                None => Err(KubeError::Api {
                    action: "get".into(),
                    message: "unknown to the test".into(),
                }),
            }
        }
    }

    #[derive(Default)]
    struct Events(Mutex<Vec<(VolumeId, ClusterEvent)>>);

    impl ClusterSink for Events {
        fn annotate(&self, _: &VolumeId, _: Option<(&NodeId, SystemTime)>) {}
        fn event(&self, volume: &VolumeId, event: ClusterEvent) {
            self.0.lock().unwrap().push((volume.clone(), event));
        }
    }

    fn node(n: &str) -> NodeId {
        NodeId::try_from(n).unwrap()
    }

    fn vol(v: &str) -> VolumeId {
        VolumeId::try_from(v).unwrap()
    }

    const INTERVAL: Duration = Duration::from_secs(300);

    /// On tokio's paused clock: volume a on n1 (parked), b on n2, c migrating from n1 to n3.
    /// n1's Node is deleted where no watch sees it; n2 is merely NotReady (it exists). The pass
    /// one interval in clears n1 from a and c, counted and evented once each, and nothing else,
    /// then and at every later pass.
    #[test]
    fn an_interval_pass_clears_a_deleted_node_once_and_nothing_else() {
        let system = actix_rt::System::with_tokio_rt(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap()
        });
        system.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let metrics = Arc::new(Metrics::new());
            let events = Arc::new(Events::default());
            let standalone = Arc::new(Standalone::new([node("n1"), node("n2"), node("n3")]));
            let deps = Arc::new(VolumeDeps {
                backend: Arc::new(FileBackend::open(dir.path()).unwrap()),
                nodes: standalone.clone(),
                authority: standalone,
                sink: events.clone(),
                metrics: metrics.clone(),
                grace_period: Duration::from_secs(30),
                node_limit: NodeLimit::new(0),
            });
            let supervisor = Supervisor::new(deps, Vec::new()).start();
            let now = SystemTime::now();
            let seed = |v: &str, holders: &[&str], class| SeedVolume {
                volume: vol(v),
                holders: holders
                    .iter()
                    .map(|n| SeedHolder {
                        node: node(n),
                        attached: now,
                        recorded_instant: true,
                        age: Duration::ZERO,
                    })
                    .collect(),
                class,
                migration_timeout: Duration::from_secs(3600),
                order_known: true,
            };
            supervisor
                .send(Seed {
                    term: crate::role::Term::FIRST,
                    volumes: vec![
                        seed("a", &["n1"], AccessClass::Exclusive),
                        seed("b", &["n2"], AccessClass::Exclusive),
                        seed("c", &["n1", "n3"], AccessClass::Migratable),
                    ],
                })
                .await
                .unwrap();
            let cluster = Arc::new(Nodes(Mutex::new(HashMap::from([
                ("n1".to_string(), false),
                ("n2".to_string(), true),
                ("n3".to_string(), true),
            ]))));
            let (_deleted, deletions) = broadcast::channel(16);
            let reconciler = StaleAttachments {
                supervisor: supervisor.clone(),
                nodes: cluster,
                metrics: metrics.clone(),
            };
            tokio::spawn(reconciler.run(INTERVAL, deletions));
            let router = Router::new(supervisor, Duration::from_secs(5));
            let holders = |v: &'static str| {
                let router = router.clone();
                async move { holders_of(&router, v).await }
            };
            let runs = || {
                metrics
                    .reconciler_runs
                    .with_label_values(&[STALE, "success"])
                    .get()
            };

            tokio::time::sleep(INTERVAL - Duration::from_secs(1)).await;
            assert_eq!(runs(), 0);
            assert_eq!(
                metrics.stale_cleared_total.get(),
                0,
                "not before the interval"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(runs(), 1, "one pass within one interval");
            assert_eq!(metrics.stale_cleared_total.get(), 2, "n1 from a and from c");
            tokio::time::sleep(INTERVAL * 3).await;
            assert_eq!(runs(), 4);
            assert_eq!(
                metrics
                    .attachment_operation_duration
                    .with_label_values(&["reconcile"])
                    .get_sample_count(),
                4,
                "each interval pass is timed, as the Go driver's reconcile operation"
            );
            assert_eq!(metrics.stale_cleared_total.get(), 2, "counted once");

            assert_eq!(holders("a").await, Vec::<String>::new());
            assert_eq!(holders("b").await, ["n2"], "NotReady, not deleted");
            assert_eq!(holders("c").await, ["n3"], "the migration resolved to n3");
            let events = events.0.lock().unwrap().clone();
            let mut stale: Vec<(String, String)> = events
                .iter()
                .filter_map(|(v, e)| match e {
                    ClusterEvent::StaleAttachmentCleared { node } => {
                        Some((v.to_string(), node.to_string()))
                    }
                    _ => None,
                })
                .collect();
            stale.sort();
            assert_eq!(
                stale,
                [("a".into(), "n1".into()), ("c".into(), "n1".into())],
                "evented once each: {events:?}"
            );
        });
    }

    /// Answers 404 for every Node, but holds the GET of `held` between two barriers: the test
    /// learns the GET was sent, and says when its 404 may come back.
    struct HeldGet {
        held: NodeId,
        sent: tokio::sync::Barrier,
        answer: tokio::sync::Barrier,
    }

    #[async_trait]
    impl NodeLiveness for HeldGet {
        async fn gone(&self, node: &NodeId) -> Result<bool, KubeError> {
            if *node == self.held {
                self.sent.wait().await;
                self.answer.wait().await;
            }
            Ok(true)
        }
    }

    /// On tokio's paused clock, the order is forced: the pass sends n1's GET (a on n1 is its
    /// only holder), a second passes, then, before the 404 comes back and is cleared, n1
    /// re-registers and a Publish attaches b to n1, and a second later the 404 comes back. The
    /// pass drops a (attached before the GET) and keeps b, which Publish answered OK after it.
    /// Catches `VolumeState::drop_stale`'s `a.confirmed_at < asked_at` (without it the clear
    /// drops every holder named n1, b included, and b looks free) and `asked_at` taken before
    /// the GET in `clear_if_gone_one` (taken after it, b is older and dropped).
    #[test]
    fn a_publish_between_the_404_and_its_clear_keeps_its_holder() {
        use crate::actors::messages::Publish;
        use crate::actors::state::PublishRequest;
        use crate::backend::{CreateRequest, VolumeBackend};
        use crate::domain::{AccessMode, Capability};
        let system = actix_rt::System::with_tokio_rt(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .unwrap()
        });
        system.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let backend = Arc::new(FileBackend::open(dir.path()).unwrap());
            let exclusive = Capability::block(AccessMode::SingleNodeWriter);
            backend
                .create(CreateRequest {
                    id: vol("b"),
                    name: "b".into(),
                    required_bytes: 1 << 20,
                    limit_bytes: 0,
                    capabilities: vec![exclusive.clone()],
                    parameters: Default::default(),
                    source: None,
                })
                .await
                .unwrap();
            let metrics = Arc::new(Metrics::new());
            let standalone = Arc::new(Standalone::new([node("n1"), node("n2")]));
            let deps = Arc::new(VolumeDeps {
                backend,
                nodes: standalone.clone(),
                authority: standalone.clone(),
                sink: standalone,
                metrics: metrics.clone(),
                grace_period: Duration::from_secs(30),
                node_limit: NodeLimit::new(0),
            });
            let supervisor = Supervisor::new(deps, Vec::new()).start();
            supervisor
                .send(Seed {
                    term: crate::role::Term::FIRST,
                    volumes: vec![SeedVolume {
                        volume: vol("a"),
                        holders: vec![SeedHolder {
                            node: node("n1"),
                            attached: SystemTime::now() - Duration::from_secs(60),
                            age: Duration::from_secs(60),
                            recorded_instant: true,
                        }],
                        class: AccessClass::Exclusive,
                        migration_timeout: Duration::from_secs(3600),
                        order_known: true,
                    }],
                })
                .await
                .unwrap();
            let liveness = Arc::new(HeldGet {
                held: node("n1"),
                sent: tokio::sync::Barrier::new(2),
                answer: tokio::sync::Barrier::new(2),
            });
            let reconciler = StaleAttachments {
                supervisor: supervisor.clone(),
                nodes: liveness.clone(),
                metrics: metrics.clone(),
            };
            let pass = tokio::spawn(async move { reconciler.pass().await });
            liveness.sent.wait().await;
            tokio::time::advance(Duration::from_secs(1)).await;

            let router = Router::new(supervisor, Duration::from_secs(5));
            let publish = Publish {
                req: PublishRequest {
                    node: node("n1"),
                    capability: exclusive,
                    readonly: false,
                    migration_timeout: Duration::from_secs(60),
                },
                term: crate::role::Term::FIRST,
            };
            router.send(&vol("b"), publish).await.unwrap();
            tokio::time::advance(Duration::from_secs(1)).await;
            liveness.answer.wait().await;
            assert!(pass.await.unwrap(), "the pass succeeded");

            let holders = |v: &'static str| {
                let router = router.clone();
                async move { holders_of(&router, v).await.len() }
            };
            assert_eq!(holders("a").await, 0, "attached before the GET: dropped");
            assert_eq!(
                holders("b").await,
                1,
                "published after the GET was sent: kept"
            );
            assert_eq!(metrics.stale_cleared_total.get(), 1);
        });
    }
}
