//! The term a call was admitted in, at the actor level on tokio's paused clock (rules, "High
//! availability").

use super::*;
use crate::actors::messages::{Delete, Dismiss};
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
