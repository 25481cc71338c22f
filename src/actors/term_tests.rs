//! The term a call was admitted in, and the one deadline of a Publish, at the actor level on
//! tokio's paused clock (rules, "High availability" and "Limits and readiness").

use async_trait::async_trait;
use tokio::time::Instant;

use super::*;
use crate::actors::messages::{Delete, Dismiss};
use crate::actors::{LIVE_CHECK_BUDGET, MAILBOX_TIMEOUT};
use crate::domain::AccessClass::Exclusive;

/// A volume's holders as [`Describe`] shows them (empty when idle).
async fn holders_of(router: &Router, volume: &str) -> Vec<String> {
    let view = router.send(&vol(volume), Describe).await.unwrap();
    view.map_or_else(Vec::new, |view| {
        view["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["node"].as_str().unwrap().to_string())
            .collect()
    })
}

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
