//! The term a call was admitted in, the one deadline of a Publish, and the first lease duration
//! of a term, at the actor level on tokio's paused clock (rules, "High availability" and
//! "Limits and readiness").

use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use tokio::time::Instant;

use super::*;
use crate::actors::messages::{Delete, Dismiss};
use crate::actors::{holders_of, LIVE_CHECK_BUDGET, MAILBOX_TIMEOUT};
use crate::domain::AccessClass::Exclusive;
use crate::kube::{AttachmentAuthority, HolderStatus, KubeError};

/// A call admitted in term t reaches the volume after this controller was dismissed and seeded
/// for t+1 (forced: admitted, then dismiss and seed, then delivered): the stale Unpublish is
/// refused with UNAVAILABLE and the seeded holder stays, before any actor starts for it.
///
/// Catches the removal of the supervisor's term check in `Handler<Route>`
/// (`if term.is_some_and(|term| term != serving)`): without it the parked volume is woken for
/// the stale call (the parked gauge drops), and with the actor's own check removed too, the
/// holder is dropped.
#[test]
fn a_stale_unpublish_of_the_previous_term_leaves_the_seeded_holder() {
    paused(|| async {
        let h = harness(&["v"]).await;
        let t = Term::FIRST;
        h.router
            .send(&vol("v"), publish_in(t, "a", exclusive()))
            .await
            .unwrap();
        // Admitted in t; the term ends before it is delivered.
        let stale = unpublish_in(t, "a");
        let supervisor = h.router.supervisor().clone();
        supervisor.send(Dismiss).await.unwrap();
        let next = t.next();
        supervisor
            .send(seed_in(
                next,
                vec![seed_volume("v", &[("a", 5)], Exclusive)],
            ))
            .await
            .unwrap();
        assert_eq!(h.metrics.parked_volumes.get(), 1);

        let err = h.router.send(&vol("v"), stale).await.unwrap_err();
        assert!(matches!(err, Error::NotActive(_)), "{err}");
        assert_eq!(
            h.metrics.parked_volumes.get(),
            1,
            "refused by the supervisor: no actor woke for a call of another term"
        );
        assert_eq!(holders_of(&h.router, "v").await, ["a"]);
        let err = h
            .router
            .send(&vol("v"), publish_in(next, "b", exclusive()))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Conflict { holders, .. } if holders[0].as_str() == "a"),
            "{err}"
        );
    });
}

/// The same stale calls delivered straight to an actor seeded for t+1 (as a router that
/// remembered its address would): Unpublish, Publish and Delete of t are refused with
/// UNAVAILABLE and change nothing.
///
/// Catches the removal of the actor's term checks: `if msg.term != self.term` in
/// `Handler<Unpublish>` (the holder is dropped), `if term != self.term` in
/// `VolumeActor::publish` (b gets FAILED_PRECONDITION instead, or attaches), and
/// `if term != self.term` in `Handler<Delete>` (the volume is deleted).
#[test]
fn an_actor_seeded_for_the_next_term_refuses_calls_of_the_previous_one() {
    paused(|| async {
        let h = harness(&["v", "d"]).await;
        let (t, next) = (Term::FIRST, Term::FIRST.next());
        let supervisor = h.router.supervisor().clone();
        supervisor.send(Dismiss).await.unwrap();
        supervisor
            .send(seed_in(
                next,
                vec![seed_volume("v", &[("a", 5)], Exclusive)],
            ))
            .await
            .unwrap();
        let v = h.actor_of("v").await;
        let d = h.actor_of("d").await;

        let err = v.send(unpublish_in(t, "a")).await.unwrap().unwrap_err();
        assert!(matches!(err, Error::NotActive(_)), "{err}");
        let err = v
            .send(publish_in(t, "b", rwx()))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, Error::NotActive(_)), "{err}");
        assert_eq!(holders_of(&h.router, "v").await, ["a"]);

        let err = d.send(Delete(t)).await.unwrap().unwrap_err();
        assert!(matches!(err, Error::NotActive(_)), "{err}");
        h.router
            .send(&vol("d"), publish_in(next, "b", exclusive()))
            .await
            .expect("d was not deleted");
        assert_eq!(holders_of(&h.router, "d").await, ["b"]);
    });
}

/// A backend whose `get` waits until the test opens its gate; everything else is the file
/// backend's.
struct GatedGet {
    inner: Arc<FileBackend>,
    asked: tokio::sync::Notify,
    gate: tokio::sync::Semaphore,
}

#[async_trait]
impl VolumeBackend for GatedGet {
    fn kind(&self) -> &'static str {
        "gated"
    }
    async fn create(&self, req: CreateRequest) -> Result<VolumeInfo, BackendError> {
        self.inner.create(req).await
    }
    async fn delete(&self, id: &VolumeId) -> Result<(), BackendError> {
        self.inner.delete(id).await
    }
    async fn get(&self, id: &VolumeId) -> Result<Option<VolumeInfo>, BackendError> {
        self.asked.notify_one();
        let _open = self.gate.acquire().await.unwrap();
        self.inner.get(id).await
    }
    async fn list(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        self.inner.list().await
    }
    async fn list_owned(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        self.inner.list_owned().await
    }
    async fn capacity(&self) -> Result<u64, BackendError> {
        self.inner.capacity().await
    }
    async fn expand(&self, id: &VolumeId, bytes: u64) -> Result<u64, BackendError> {
        self.inner.expand(id, bytes).await
    }
    fn publish_context(&self, volume: &VolumeInfo) -> HashMap<String, String> {
        self.inner.publish_context(volume)
    }
}

/// Rules, "Limits and readiness": the backend read and the live checks share one budget; a
/// backend read that outlasts it (an RDS pool wait and a slow command) is abandoned at the
/// budget's end, the Publish answers UNAVAILABLE then, and nothing changes, even once the
/// backend answers later.
///
/// Catches the backend read moved back out of `timeout_at(deadline, checks)` in
/// `VolumeActor::publish`: the answer then waits for the backend, and the volume is attached
/// after its caller gave up.
#[test]
fn a_backend_read_that_outlasts_the_budget_answers_unavailable_and_changes_nothing() {
    paused(|| async {
        let dir = tempfile::tempdir().unwrap();
        let inner = Arc::new(FileBackend::open(dir.path()).unwrap());
        inner.create(create_request("v")).await.unwrap();
        let backend = Arc::new(GatedGet {
            inner,
            asked: Default::default(),
            gate: tokio::sync::Semaphore::new(0),
        });
        let h = harness_on(backend.clone(), dir, 0);
        let router = Router::new(h.router.supervisor().clone(), MAILBOX_TIMEOUT);
        let t0 = Instant::now();
        let publish = actix_rt::spawn({
            let router = router.clone();
            async move { router.send(&vol("v"), publish("a", exclusive())).await }
        });
        backend.asked.notified().await;
        tokio::time::sleep_until(t0 + LIVE_CHECK_BUDGET + Duration::from_secs(1)).await;
        assert!(
            publish.is_finished(),
            "answered when the budget ran out, not when the backend answers"
        );
        backend.gate.add_permits(1);
        let err = publish.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err}");
        tokio::task::yield_now().await;
        assert_eq!(holders_of(&router, "v").await, Vec::<String>::new());
        assert_eq!(
            h.metrics.attach_total.with_label_values(&["success"]).get(),
            0
        );
    });
}

/// The budget never outlasts the caller's own gRPC deadline, and past it nothing changes even
/// when every check has already answered: a Publish whose caller's deadline is up by the time
/// the actor decides is refused, and the migration it would start does not start.
///
/// Catches the removal of `if now >= deadline { return Err(past_deadline()) }` in
/// `VolumeActor::publish` (the checks here answer at once, so only that line refuses), and the
/// caller's deadline (`reply_by`) dropped on its way from the Router to the actor.
#[test]
fn past_the_callers_deadline_a_publish_changes_nothing() {
    paused(|| async {
        let h = harness(&["v"]).await;
        h.router.send(&vol("v"), publish("a", rwx())).await.unwrap();
        let v = vol("v");
        let send = h.router.send(&v, publish("b", rwx()));
        let err = crate::deadline::scope(Some(Instant::now()), send)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err}");
        assert_eq!(holders_of(&h.router, "v").await, ["a"]);
        assert_eq!(h.metrics.active_migrations.get(), 0);
        h.router
            .send(&vol("v"), publish("b", rwx()))
            .await
            .expect("with time left, the same publish starts the migration");
    });
}

/// A cluster whose live read of a volume's VolumeAttachments shows `attached` (or fails), and
/// counts how often it was asked. The Nodes in `gone` are deleted (rule 5.1); every other
/// holder is live.
struct Elsewhere {
    attached: Mutex<Result<Vec<NodeId>, String>>,
    gone: Vec<NodeId>,
    asked: AtomicUsize,
}

impl Elsewhere {
    fn showing(nodes: &[&str]) -> Arc<Self> {
        let nodes = nodes
            .iter()
            .map(|n| NodeId::try_from(*n).unwrap())
            .collect();
        Arc::new(Self {
            attached: Mutex::new(Ok(nodes)),
            gone: Vec::new(),
            asked: AtomicUsize::new(0),
        })
    }

    fn asked(&self) -> usize {
        self.asked.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl AttachmentAuthority for Elsewhere {
    async fn check(&self, _: &VolumeId, node: &NodeId) -> Result<HolderStatus, KubeError> {
        Ok(if self.gone.contains(node) {
            HolderStatus::NodeGone
        } else {
            HolderStatus::Live
        })
    }

    async fn attached_elsewhere(
        &self,
        _volume: &VolumeId,
        node: &NodeId,
    ) -> Result<Vec<NodeId>, KubeError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        match &*self.attached.lock().unwrap() {
            Ok(nodes) => Ok(nodes.iter().filter(|n| *n != node).cloned().collect()),
            Err(message) => Err(KubeError::Api {
                action: "listing VolumeAttachments".into(),
                message: message.clone(),
            }),
        }
    }
}

/// Actors over the file backend with volumes `volumes`, nodes a, b and c, and `authority`.
async fn harness_asking(volumes: &[&str], authority: Arc<Elsewhere>) -> Harness {
    harness_limited(volumes, authority, 0).await
}

/// [`harness_asking`] with `--max-volumes-per-node` `limit`.
async fn harness_limited(volumes: &[&str], authority: Arc<Elsewhere>, limit: u64) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FileBackend::open(dir.path()).unwrap());
    for v in volumes {
        backend.create(create_request(v)).await.unwrap();
    }
    let cluster = Arc::new(Standalone::new(
        ["a", "b", "c"].map(|n| NodeId::try_from(n).unwrap()),
    ));
    let metrics = Arc::new(Metrics::new());
    let deps = Arc::new(VolumeDeps {
        backend,
        nodes: cluster.clone(),
        authority,
        sink: cluster,
        metrics: metrics.clone(),
        grace_period: GRACE,
        node_limit: super::super::NodeLimit::new(limit),
    });
    let supervisor = Supervisor::new(deps, Vec::new()).start();
    Harness {
        router: Router::new(supervisor, Duration::from_secs(5)),
        metrics,
        _dir: dir,
    }
}

/// The term as `Role::admit` gives it right after a takeover with a 15 s Lease: its
/// first-lease-duration window ends 15 s from now.
fn fresh_term() -> Term {
    Term::FIRST.rechecked_until(Instant::now() + Duration::from_secs(15))
}

/// Rules, "High availability": for the first lease duration of a term, a holderless volume is
/// given to a node only after a live read of its other VolumeAttachments; a node found attached
/// (an OK of the previous term the seeding list missed) is taken as a holder, as seeding would
/// take it, and the rules decide: an exclusive volume is refused naming it. The live read is
/// made once: from then on the volume has a holder.
///
/// Catches the removal of the window check (`let recheck = ...` in `VolumeActor::publish`
/// forced to false): b is then given a volume a holds.
#[test]
fn inside_the_first_lease_duration_a_holderless_volume_is_given_only_after_a_live_read() {
    paused(|| async {
        let cluster = Elsewhere::showing(&["a"]);
        let h = harness_asking(&["v"], cluster.clone()).await;
        let term = fresh_term();
        let err = h
            .router
            .send(&vol("v"), publish_in(term, "b", exclusive()))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Conflict { holders, .. } if holders[0].as_str() == "a"),
            "{err}"
        );
        assert_eq!(cluster.asked(), 1);
        assert_eq!(holders_of(&h.router, "v").await, ["a"]);
        assert_eq!(
            h.metrics.attach_total.with_label_values(&["success"]).get(),
            0
        );
        let err = h
            .router
            .send(&vol("v"), publish_in(term, "c", exclusive()))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "{err}");
        assert_eq!(cluster.asked(), 1, "the volume has a holder now");
    });
}

/// The node found is a holder like any: on a migratable volume the Publish starts a
/// migration from it.
#[test]
fn a_node_found_attached_inside_the_window_is_a_migration_source() {
    paused(|| async {
        let cluster = Elsewhere::showing(&["a"]);
        let h = harness_asking(&["v"], cluster.clone()).await;
        h.router
            .send(&vol("v"), publish_in(fresh_term(), "b", rwx()))
            .await
            .unwrap();
        let view = h.router.send(&vol("v"), Describe).await.unwrap().unwrap();
        assert_eq!(view["migration"]["source"], "a", "{view}");
        assert_eq!(view["migration"]["target"], "b", "{view}");
        assert_eq!(h.metrics.active_migrations.get(), 1);
    });
}

/// After the window, a holderless volume is given without asking.
#[test]
fn after_the_first_lease_duration_a_holderless_volume_is_given_without_asking() {
    paused(|| async {
        let cluster = Elsewhere::showing(&["a"]);
        let h = harness_asking(&["v"], cluster.clone()).await;
        let term = fresh_term();
        tokio::time::sleep(Duration::from_secs(15)).await;
        h.router
            .send(&vol("v"), publish_in(term, "b", exclusive()))
            .await
            .unwrap();
        assert_eq!(cluster.asked(), 0);
        assert_eq!(holders_of(&h.router, "v").await, ["b"]);
    });
}

/// A failed live read inside the window fails closed: UNAVAILABLE, nothing changed.
///
/// Catches the error of `attached_elsewhere` ignored (taken as "no other node") in
/// `VolumeActor::publish`.
#[test]
fn a_failed_live_read_inside_the_window_fails_closed() {
    paused(|| async {
        let cluster = Arc::new(Elsewhere {
            attached: Mutex::new(Err("connection refused".into())),
            gone: Vec::new(),
            asked: AtomicUsize::new(0),
        });
        let h = harness_asking(&["v"], cluster.clone()).await;
        let err = h
            .router
            .send(&vol("v"), publish_in(fresh_term(), "b", exclusive()))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Unavailable(m) if m.contains("connection refused")),
            "{err}"
        );
        assert_eq!(holders_of(&h.router, "v").await, Vec::<String>::new());
    });
}

/// A node found attached goes through rules 5.1 and 5.2 before it is taken: the
/// VolumeAttachment of a deleted Node stays attached until the attach-detach controller removes
/// it, and that node is not taken, so the Publish is OK. It was never a holder of this term, so
/// nothing is cleared: the stale reconciler may already have counted that very attachment once
/// (`a_deleted_node_clears_the_stale_attachment` in the e2e suite forces that order).
///
/// Catches the nodes found taken without their check (the `HolderStatus::Live` filter in
/// `live_checks`): the deleted node would then block the volume for the whole window; and a
/// found node counted as cleared (stale_cleared_total 1).
#[test]
fn a_node_found_attached_whose_node_is_deleted_is_not_taken() {
    paused(|| async {
        let cluster = Arc::new(Elsewhere {
            attached: Mutex::new(Ok(vec![NodeId::try_from("a").unwrap()])),
            gone: vec![NodeId::try_from("a").unwrap()],
            asked: AtomicUsize::new(0),
        });
        let h = harness_asking(&["v"], cluster.clone()).await;
        h.router
            .send(&vol("v"), publish_in(fresh_term(), "b", exclusive()))
            .await
            .unwrap();
        assert_eq!(holders_of(&h.router, "v").await, ["b"]);
        assert_eq!(h.metrics.stale_cleared_total.get(), 0);
        assert_eq!(cluster.asked(), 1);
    });
}

/// A node found attached whose Node is deleted takes no per-node slot: with
/// `--max-volumes-per-node 1`, a can take another volume afterwards.
///
/// Catches a found node adopted before rules 5.1/5.2 ruled it out (taken in `live_checks`
/// whatever its status): a's slot stays taken and w answers RESOURCE_EXHAUSTED.
#[test]
fn a_found_node_whose_node_is_deleted_takes_no_slot() {
    paused(|| async {
        let cluster = Arc::new(Elsewhere {
            attached: Mutex::new(Ok(vec![NodeId::try_from("a").unwrap()])),
            gone: vec![NodeId::try_from("a").unwrap()],
            asked: AtomicUsize::new(0),
        });
        let h = harness_limited(&["v", "w"], cluster.clone(), 1).await;
        h.router
            .send(&vol("v"), publish_in(fresh_term(), "b", exclusive()))
            .await
            .unwrap();
        assert_eq!(holders_of(&h.router, "v").await, ["b"]);
        h.router
            .send(&vol("w"), publish_in(Term::FIRST, "a", exclusive()))
            .await
            .expect("a holds nothing: its slot is free");
    });
}
