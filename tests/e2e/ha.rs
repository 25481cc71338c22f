//! Controller high availability: driver processes follow the csi-attacher's leader Lease in the
//! fake API server. The tests write that Lease as csi-lib-utils would (acquire, renew, move), and
//! play the external-attacher as in `kubernetes.rs`: VolumeAttachments first, then the call.
//!
//! Nothing here measures time: every wait is `eventually` with a generous deadline, and whether
//! a driver is active or standby is read from what it answers and what it exports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rds_csi::csi::controller_client::ControllerClient;
use rds_csi::csi::volume_capability::access_mode::Mode;
use rds_csi::csi::{
    ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest, GetCapacityRequest,
    VolumeCapability,
};
use serde_json::json;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::fake_apiserver::FakeApiServer;
use crate::support::cluster::{Cluster, DRIVER, LEASE, LEASE_NAMESPACE};
use crate::support::*;

/// A controller that follows the Lease as `identity` (its pod name, in a cluster).
pub async fn start_ha(c: &Cluster, identity: &str, volumes: &[&str], extra: &[&str]) -> Driver {
    let dir = tempfile::tempdir().unwrap();
    precreate(dir.path(), volumes).await;
    let mut args = vec![
        "--leader-election",
        "--leader-election-namespace",
        LEASE_NAMESPACE,
        "--leader-election-identity",
        identity,
    ];
    args.extend_from_slice(extra);
    Driver::start_kube_in(dir, &c.kubeconfig, &args).await
}

pub fn transitions(scrape: &str, to: &str) -> f64 {
    sample(
        scrape,
        &format!("rds_csi_leader_transitions_total{{to=\"{to}\"}}"),
    )
}

/// Serving attachments: ready, and the leader gauge says so.
pub async fn is_active(d: &Driver) -> bool {
    d.ready().await && d.metric("rds_csi_leader_active").await == 1.0
}

/// A standby: ready (a healthy standby is never restarted), and not serving attachments.
pub async fn is_standby(d: &Driver) -> bool {
    d.ready().await && d.metric("rds_csi_leader_active").await == 0.0
}

pub fn not_active<T: std::fmt::Debug>(answer: &Result<T, Status>) -> bool {
    matches!(answer, Err(s) if s.code() == Code::Unavailable
        && s.message().contains("not the active controller"))
}

fn refused_by(answer: Result<impl std::fmt::Debug, Status>, holder: &str) {
    let err = answer.expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains(&format!("node {holder}")),
        "{}",
        err.message()
    );
}

/// One ControllerPublish or ControllerUnpublish answer, as the test heard it: which replica
/// answered, who the Lease named when the request was sent and when its answer came (the term
/// it could have been answered in), and the request's start and end.
#[derive(Clone, Debug)]
struct Heard {
    replica: String,
    publish: bool,
    volume: String,
    node: String,
    exclusive: bool,
    start: Instant,
    end: Instant,
    holder_at_start: String,
    holder_at_end: String,
    answer: Result<(), (Code, String)>,
}

impl Heard {
    fn ok(&self) -> bool {
        self.answer.is_ok()
    }
}

/// Every Publish and Unpublish answer of a test, from every replica, in the order they came.
#[derive(Clone)]
struct Record {
    api: FakeApiServer,
    heard: Arc<Mutex<Vec<Heard>>>,
}

impl Record {
    fn new(c: &Cluster) -> Record {
        Record {
            api: c.api.clone(),
            heard: Arc::default(),
        }
    }

    fn holder(&self) -> String {
        self.api
            .get("leases", Some(LEASE_NAMESPACE), LEASE)
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
            .unwrap_or_default()
    }

    /// Sends one Publish (`cap` is `Some`) or Unpublish through `client` and records its answer.
    async fn call(
        &self,
        replica: &str,
        client: &mut ControllerClient<Channel>,
        volume: &str,
        node: &str,
        cap: Option<VolumeCapability>,
    ) -> Result<HashMap<String, String>, Status> {
        let holder_at_start = self.holder();
        let start = Instant::now();
        let exclusive = cap.as_ref().is_some_and(|c| {
            c.access_mode
                .as_ref()
                .is_some_and(|m| m.mode != Mode::MultiNodeMultiWriter as i32)
        });
        let publish = cap.is_some();
        let answer = match cap {
            Some(cap) => client
                .controller_publish_volume(ControllerPublishVolumeRequest {
                    volume_id: volume.into(),
                    node_id: node.into(),
                    volume_capability: Some(cap),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().publish_context),
            None => client
                .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                    volume_id: volume.into(),
                    node_id: node.into(),
                    ..Default::default()
                })
                .await
                .map(|_| HashMap::new()),
        };
        let end = Instant::now();
        let heard = Heard {
            replica: replica.into(),
            publish,
            volume: volume.into(),
            node: node.into(),
            exclusive,
            start,
            end,
            holder_at_start,
            holder_at_end: self.holder(),
            answer: answer
                .as_ref()
                .map(|_| ())
                .map_err(|s| (s.code(), s.message().to_string())),
        };
        self.heard.lock().unwrap().push(heard);
        answer
    }

    fn heard(&self) -> Vec<Heard> {
        self.heard.lock().unwrap().clone()
    }

    /// How many answers each replica gave, by outcome and by who the Lease named around them.
    fn summary(&self) -> String {
        let mut by: std::collections::BTreeMap<String, usize> = Default::default();
        for h in self.heard() {
            let outcome = match &h.answer {
                Ok(()) => "OK".to_string(),
                Err((code, _)) => format!("{code:?}"),
            };
            let key = format!(
                "{} {} {} (Lease: {} -> {})",
                h.replica,
                if h.publish { "publish" } else { "unpublish" },
                outcome,
                h.holder_at_start,
                h.holder_at_end
            );
            *by.entry(key).or_default() += 1;
        }
        by.iter().map(|(k, n)| format!("{n:6} {k}\n")).collect()
    }

    /// Never two OKs for one exclusive volume to different nodes without an OK Unpublish of the
    /// first node between them, over every answer recorded. Requests overlap in time, so
    /// "between" is read generously: the Unpublish could have taken effect after the first
    /// publish's attach and before the second's (it ended after the first started, and started
    /// before the second ended). Anything less is two nodes holding the volume at once.
    fn check_exclusive(&self) {
        let heard = self.heard();
        let oks: Vec<&Heard> = heard
            .iter()
            .filter(|h| h.publish && h.exclusive && h.ok())
            .collect();
        for first in &oks {
            for second in &oks {
                if first.volume != second.volume
                    || first.node == second.node
                    || first.start > second.start
                {
                    continue;
                }
                let released = heard.iter().any(|u| {
                    !u.publish
                        && u.ok()
                        && u.volume == first.volume
                        && u.node == first.node
                        && u.end > first.start
                        && u.start < second.end
                });
                assert!(
                    released,
                    "{}two OKs for exclusive {} to {} and {} with no Unpublish of {} between \
                     them:\n{first:?}\n{second:?}\n({} answers recorded)",
                    self.summary(),
                    first.volume,
                    first.node,
                    second.node,
                    first.node,
                    heard.len()
                );
            }
        }
    }
}

/// A replica whose Publish and Unpublish answers all go into the test's [`Record`].
struct Replica<'a> {
    driver: &'a Driver,
    name: &'static str,
    record: Record,
}

impl<'a> Replica<'a> {
    fn new(driver: &'a Driver, name: &'static str, record: &Record) -> Self {
        Replica {
            driver,
            name,
            record: record.clone(),
        }
    }

    async fn publish(
        &self,
        volume: &str,
        node: &str,
        cap: VolumeCapability,
    ) -> Result<HashMap<String, String>, Status> {
        let mut client = self.driver.controller();
        self.record
            .call(self.name, &mut client, volume, node, Some(cap))
            .await
    }

    async fn unpublish(&self, volume: &str, node: &str) -> Result<(), Status> {
        let mut client = self.driver.controller();
        self.record
            .call(self.name, &mut client, volume, node, None)
            .await
            .map(|_| ())
    }
}

impl std::ops::Deref for Replica<'_> {
    type Target = Driver;

    fn deref(&self) -> &Driver {
        self.driver
    }
}

/// What one prober heard.
#[derive(Clone, Debug, Default)]
struct Tally {
    ok: usize,
    not_active: usize,
    not_ready: usize,
    refused: usize,
    other: Vec<String>,
}

/// Publishes `volume` to `node` on a replica again and again until stopped, as a csi-attacher
/// retrying would: each answer is recorded and tallied, and the next request is sent as soon
/// as it came.
struct Prober {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    fn start(r: &Replica<'_>, volume: &str, node: &str, cap: VolumeCapability) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let mut client = r.driver.controller();
        let (record, name) = (r.record.clone(), r.name);
        let (volume, node) = (volume.to_string(), node.to_string());
        let (stopped, tallied) = (stop.clone(), tally.clone());
        let task = tokio::spawn(async move {
            while !stopped.load(Ordering::Relaxed) {
                let answer = record
                    .call(name, &mut client, &volume, &node, Some(cap.clone()))
                    .await;
                let mut tally = tallied.lock().unwrap();
                match &answer {
                    Ok(_) => tally.ok += 1,
                    _ if not_active(&answer) => tally.not_active += 1,
                    Err(s) if s.code() == Code::Unavailable => tally.not_ready += 1,
                    Err(s) if s.code() == Code::FailedPrecondition => tally.refused += 1,
                    Err(s) => tally.other.push(format!("{:?}: {}", s.code(), s.message())),
                }
            }
        });
        Prober { stop, tally, task }
    }

    fn tally(&self) -> Tally {
        self.tally.lock().unwrap().clone()
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let tally = self.tally.lock().unwrap().clone();
        tally
    }
}

/// Moves the Lease from `old` to `new` while `old` is asked, over and over, to publish the
/// exclusive `volume` to `old_node` (which holds it) and `new` to publish it to `new_node`.
/// Returns once `new` serves and `old` is a standby, each prober having heard the answers of
/// both sides of the move; never did both answer OK (checked over every answer recorded).
async fn move_under_fire(
    c: &Cluster,
    (old, old_node): (&Replica<'_>, &str),
    (new, new_node): (&Replica<'_>, &str),
    volume: &str,
    to: &str,
) {
    let old_probe = Prober::start(old, volume, old_node, rwo());
    let new_probe = Prober::start(new, volume, new_node, rwo());
    eventually("both probers were answered before the move", || async {
        old_probe.tally().ok > 0 && new_probe.tally().not_active > 0
    })
    .await;
    c.move_lease(to);
    eventually(
        "the new holder serves and the old one is a standby",
        || async { is_active(new).await && is_standby(old).await },
    )
    .await;
    // The new holder's first answer that is not "not active" decides: a refusal, or an OK the
    // record check below reports.
    eventually("both probers were answered after the move", || async {
        let new = new_probe.tally();
        old_probe.tally().not_active > 0 && new.refused + new.ok > 0
    })
    .await;
    let (old_tally, new_tally) = (old_probe.finish().await, new_probe.finish().await);
    println!("old holder ({old_node}): {old_tally:?}\nnew holder ({new_node}): {new_tally:?}");
    old.record.check_exclusive();
    assert_eq!(
        new_tally.ok, 0,
        "{new_node} never gets {volume}: {old_node} holds it"
    );
    assert!(
        new_tally.refused > 0,
        "the new holder refused once seeded: {new_tally:?}"
    );
    assert!(
        old_tally.other.is_empty() && new_tally.other.is_empty(),
        "{old_tally:?} / {new_tally:?}"
    );
}

// ---- Must show 1: a → b → a -----------------------------------------------------------------

/// Two controllers, identities a and b. The test moves the Lease a → b → a, as the csi-attachers
/// of the two pods would. After each move the new holder re-seeds from VolumeAttachments and
/// serves what the other one left (including its own stale memory, for a coming back); the
/// standby answers UNAVAILABLE for attachments and keeps serving everything else; and while the
/// Lease moves, with both asked again and again for one exclusive volume on different nodes,
/// never do both answer OK. Every Publish and Unpublish answer of the test, from both replicas,
/// is recorded with the Lease holder around it, and "never two OKs for one exclusive volume to
/// different nodes without an Unpublish OK between them" is checked over the whole record.
///
/// Catches: the new holder serving from state that does not know the old holder's attachment,
/// i.e. seeding handing the supervisor no volumes (`main.rs` `seed`) together with the
/// first-lease-duration recheck forced off (`let recheck = ...` in `VolumeActor::publish`);
/// either layer alone keeps the promise here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_moves_a_b_a_and_each_new_holder_serves_from_the_volume_attachments() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    c.pv("pv-x", "vol-x", false, None, json!({}));
    c.pv("pv-y", "vol-y", false, None, json!({}));
    c.pv("pv-m", "vol-m", true, None, json!({}));
    c.pv("pv-z", "vol-z", false, None, json!({}));
    c.pv("pv-probe", "vol-probe", false, None, json!({}));
    c.lease("a", 3600);
    let volumes = ["vol-x", "vol-y", "vol-m", "vol-z", "vol-free"];
    let (a, b) = (
        start_ha(&c, "a", &volumes, &[]).await,
        start_ha(&c, "b", &volumes, &[]).await,
    );
    let record = Record::new(&c);
    let (a, b) = (
        Replica::new(&a, "a", &record),
        Replica::new(&b, "b", &record),
    );
    eventually("a serves, b stands by", || async {
        is_active(&a).await && is_standby(&b).await
    })
    .await;

    // a serves: x on n1, and a live migration of m from n1 to n2.
    let x1 = c.va("pv-x", "vol-x", "n1", false, Duration::ZERO);
    assert!(not_active(&b.publish("vol-x", "n1", rwo()).await));
    a.publish("vol-x", "n1", rwo()).await.unwrap();
    c.attach(&x1);
    let m1 = c.va("pv-m", "vol-m", "n1", false, Duration::ZERO);
    // The attacher records each publish_context (with its attach instant) in the VA: the two
    // VAs share a creation second, so only the instants tell b the migration's direction.
    let ctx = a.publish("vol-m", "n1", rwx()).await.unwrap();
    c.mark_attached(&m1, &ctx);
    let m2 = c.va("pv-m", "vol-m", "n2", false, Duration::from_secs(0));
    let ctx = a.publish("vol-m", "n2", rwx()).await.unwrap();
    c.mark_attached(&m2, &ctx);
    let z1 = c.va("pv-z", "vol-z", "n1", false, Duration::ZERO);
    a.publish("vol-z", "n1", rwo()).await.unwrap();
    c.attach(&z1);

    // b, the standby: attachments are refused, everything else works.
    assert!(not_active(&b.unpublish("vol-x", "n1").await));
    assert!(b.ready().await, "a healthy standby is ready");
    let readyz = http_get(&format!("{}/readyz", b.metrics_url().await)).await;
    assert_eq!(readyz.trim(), "ready");
    b.create("made-on-b", rwo()).await;
    assert!(b.volume_ids().await.unwrap().contains(&"made-on-b".into()));
    b.controller()
        .get_capacity(GetCapacityRequest::default())
        .await
        .expect("GetCapacity on a standby");
    // DeleteVolume on a standby asks the API, not its (empty) memory: candidates from its
    // VolumeAttachment projection, confirmed live. That projection is fed by one watch stream,
    // in order, so once it has seen a VolumeAttachment created after those above it has seen
    // them too; a probe's refusal says so (refused: nothing is deleted).
    // (`vol-probe` is in no backend: an early OK deletes nothing.)
    let probe = c.va("pv-probe", "vol-probe", "n3", false, Duration::ZERO);
    eventually("b's VolumeAttachment projection has caught up", || async {
        matches!(b.delete("vol-probe").await, Err(s) if s.code() == Code::FailedPrecondition)
    })
    .await;
    c.remove_va(&probe);
    let err = b.delete("vol-x").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("n1"), "{}", err.message());
    b.delete("vol-free")
        .await
        .expect("no VolumeAttachment names it");
    assert!(!b.volume_ids().await.unwrap().contains(&"vol-free".into()));

    // a → b.
    move_under_fire(&c, (&a, "n1"), (&b, "n2"), "vol-x", "b").await;
    // b serves what a did: x on n1, m migrating from n1 to n2.
    refused_by(b.publish("vol-x", "n2", rwo()).await, "n1");
    let err = b.publish("vol-m", "n3", rwx()).await.unwrap_err();
    assert!(
        err.message()
            .contains("migration limit: attached to n1 and n2"),
        "{}",
        err.message()
    );
    assert!(not_active(&a.publish("vol-x", "n1", rwo()).await));
    assert!(not_active(&a.unpublish("vol-x", "n1").await));
    // b moves the world on: x leaves n1 for n2, y attaches to n3, m's migration completes.
    b.unpublish("vol-x", "n1").await.unwrap();
    c.remove_va(&x1);
    let x2 = c.va("pv-x", "vol-x", "n2", false, Duration::ZERO);
    b.publish("vol-x", "n2", rwo()).await.unwrap();
    c.attach(&x2);
    let y3 = c.va("pv-y", "vol-y", "n3", false, Duration::ZERO);
    b.publish("vol-y", "n3", rwo()).await.unwrap();
    c.attach(&y3);
    b.unpublish("vol-m", "n1").await.unwrap();
    c.remove_va(&m1);
    b.unpublish("vol-z", "n1").await.unwrap();
    c.remove_va(&z1);
    assert_eq!(
        b.metric(r#"rds_csi_migration_migrations_total{result="success"}"#)
            .await,
        1.0
    );

    // b → a. a's own memory still said x on n1: it must have dropped it.
    move_under_fire(&c, (&b, "n2"), (&a, "n1"), "vol-x", "a").await;
    refused_by(a.publish("vol-x", "n1", rwo()).await, "n2");
    refused_by(a.publish("vol-y", "n1", rwo()).await, "n3");
    let m = a.debug("vol-m").await;
    assert_eq!(holders(&m), ["n2"], "{m}");
    assert!(m["migration"].is_null(), "{m}");
    let z = a.debug("vol-z").await;
    assert!(
        z["error"].is_string(),
        "z left n1 while b served: a's memory of it is gone: {z}"
    );
    assert!(not_active(&b.publish("vol-x", "n2", rwo()).await));
    // a serves: y leaves n3.
    a.unpublish("vol-y", "n3").await.unwrap();
    c.remove_va(&y3);

    let (ma, mb) = (a.scrape().await, b.scrape().await);
    assert_eq!(
        (transitions(&ma, "active"), transitions(&ma, "standby")),
        (2.0, 1.0)
    );
    assert_eq!(
        (transitions(&mb, "active"), transitions(&mb, "standby")),
        (1.0, 2.0),
        "b: standby at start, active, standby"
    );
    // a seeded twice: nothing at its first term, then the three attached VolumeAttachments b
    // left (x on n2, y on n3, m on n2); b once, from what a left (x and z on n1, m on n1 and
    // n2).
    assert_eq!(
        sample(&ma, "rds_csi_seeding_volumeattachments_seen_total"),
        3.0
    );
    assert_eq!(
        sample(&mb, "rds_csi_seeding_volumeattachments_seen_total"),
        4.0
    );
    assert_eq!(sample(&ma, "rds_csi_leader_active"), 1.0);
    assert_eq!(sample(&mb, "rds_csi_leader_active"), 0.0);
    // Neither process ever writes the Lease.
    let lease_writes: Vec<_> = c
        .api
        .calls()
        .into_iter()
        .filter(|call| {
            call.resource == "leases" && !["get", "list", "watch"].contains(&call.verb.as_str())
        })
        .collect();
    assert!(lease_writes.is_empty(), "{lease_writes:?}");
    record.check_exclusive();
    println!("{}", record.summary());
}

// ---- An answer across a move ------------------------------------------------------------------

/// A publish admitted while a was active is still deciding (its live check of the holder hangs)
/// when the Lease moves to b. The check then finds the holder released, so a's actor attaches;
/// but a's term ended before the answer, so a answers UNAVAILABLE, never OK: b, seeded after
/// the holder's VolumeAttachment went, may give the volume to another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_decided_across_a_lease_move_is_never_ok() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    c.pv("pv-x", "vol-x", false, None, json!({}));
    let x1 = c.va("pv-x", "vol-x", "n1", true, Duration::from_secs(60));
    c.lease("a", 3600);
    let a = start_ha(&c, "a", &["vol-x"], &[]).await;
    let b = start_ha(&c, "b", &["vol-x"], &[]).await;
    eventually("a serves, b stands by", || async {
        is_active(&a).await && is_standby(&b).await
    })
    .await;

    c.api.clear_calls();
    let hang = c.api.hang("get", "nodes");
    c.va("pv-x", "vol-x", "n2", false, Duration::ZERO);
    let mut client = a.controller();
    let publish = tokio::spawn(async move {
        client
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: "vol-x".into(),
                node_id: "n2".into(),
                volume_capability: Some(rwo()),
                ..Default::default()
            })
            .await
    });
    eventually("a's live check of n1 is in flight", || async {
        c.api
            .calls_matching("get", "nodes")
            .iter()
            .any(|call| call.name.as_deref() == Some("n1") && call.in_flight())
    })
    .await;
    c.remove_va(&x1);
    c.move_lease("b");
    eventually("a stood down", || async {
        a.metric("rds_csi_leader_active").await == 0.0
    })
    .await;
    c.api.remove_fault(hang);
    let answer = publish.await.unwrap();
    assert!(
        matches!(&answer, Err(s) if s.code() == Code::Unavailable && s.message().contains("term ended")),
        "{answer:?}"
    );
    eventually("b serves", || is_active(&b)).await;
    c.va("pv-x", "vol-x", "n3", false, Duration::ZERO);
    b.publish("vol-x", "n3", rwo())
        .await
        .expect("b, seeded after n1's VolumeAttachment went, sees no holder");
}

// ---- The holder as the csi-attacher writes it -------------------------------------------------

/// csi-lib-utils sanitizes the identity before writing it as the Lease's holder: a pod whose
/// name has a `.` (`ctrl-0.rds`) is held as `ctrl-0-rds`. The driver with that identity serves.
/// Catches the comparison of the raw identity in `lease::assess`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_naming_the_sanitized_identity_makes_its_pod_active() {
    let c = Cluster::new(&["n1"]).await;
    c.pv("pv-x", "vol-x", false, None, json!({}));
    c.lease("ctrl-0-rds", 3600);
    let d = start_ha(&c, "ctrl-0.rds", &["vol-x"], &[]).await;
    eventually("the pod named by the sanitized holder serves", || {
        is_active(&d)
    })
    .await;
    let x1 = c.va("pv-x", "vol-x", "n1", false, Duration::ZERO);
    d.publish("vol-x", "n1", rwo()).await.unwrap();
    c.attach(&x1);
}

// ---- An OK of the previous term that the new term's list missed -------------------------------

/// a answers OK for x on n1, and the Lease moves to b before the external-attacher records it
/// (the VolumeAttachment still says `attached: false` when b lists them, so b seeds x with no
/// holder). The attacher's write lands after b serves. Inside b's first lease duration, b gives
/// the holderless x to n2 only after a live read of x's other VolumeAttachments: it finds n1
/// and refuses n2 naming it (rules, "High availability").
///
/// Catches the removal of the window check in `VolumeActor::publish` (`let recheck = ...`
/// forced to false): b then answers OK for n2 while n1 holds x.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ok_of_the_previous_term_recorded_after_the_takeover_blocks_another_node() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv-x", "vol-x", false, None, json!({}));
    c.lease("a", 3600);
    let a = start_ha(&c, "a", &["vol-x"], &[]).await;
    let b = start_ha(&c, "b", &["vol-x"], &[]).await;
    eventually("a serves, b stands by", || async {
        is_active(&a).await && is_standby(&b).await
    })
    .await;
    let x1 = c.va("pv-x", "vol-x", "n1", false, Duration::ZERO);
    a.publish("vol-x", "n1", rwo()).await.unwrap();

    c.move_lease("b");
    eventually("b serves, a stands by", || async {
        is_active(&b).await && is_standby(&a).await
    })
    .await;
    assert_eq!(
        sample(
            &b.scrape().await,
            "rds_csi_seeding_volumeattachments_seen_total"
        ),
        1.0,
        "b listed n1's VolumeAttachment while it was still pending"
    );
    c.attach(&x1);
    c.va("pv-x", "vol-x", "n2", false, Duration::ZERO);
    refused_by(b.publish("vol-x", "n2", rwo()).await, "n1");
    let x = b.debug("vol-x").await;
    assert_eq!(holders(&x), ["n1"], "{x}");
    b.publish("vol-x", "n1", rwo())
        .await
        .expect("n1 holds x: its repeat is OK");
}

// ---- The expired Lease whose holder did not change ------------------------------------------

/// The holder's csi-attacher stops renewing (it died, or cannot reach the API): once the Lease
/// has expired, its holder is a standby although the Lease still names it, because another
/// csi-attacher may take it at any moment. When renewals resume, it re-seeds before serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_makes_its_unchanged_holder_a_standby_until_renewed() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv-x", "vol-x", false, None, json!({}));
    let x1 = c.va("pv-x", "vol-x", "n1", true, Duration::from_secs(60));
    c.lease("a", 6);
    let attacher = c.keep_renewing(Duration::from_millis(500));
    let a = start_ha(&c, "a", &["vol-x"], &[]).await;
    eventually("a serves", || is_active(&a)).await;
    a.publish("vol-x", "n1", rwo()).await.unwrap();

    drop(attacher);
    eventually("the expired Lease makes a a standby", || async {
        not_active(&a.publish("vol-x", "n1", rwo()).await)
    })
    .await;
    let lease = c.api.get("leases", Some(LEASE_NAMESPACE), LEASE).unwrap();
    assert_eq!(
        lease["spec"]["holderIdentity"], "a",
        "the holder never changed"
    );
    assert!(is_standby(&a).await);

    // While nobody served, x moved from n1 to n2 (as if another controller had held it).
    c.remove_va(&x1);
    c.va("pv-x", "vol-x", "n2", true, Duration::from_secs(1));
    let _attacher = c.keep_renewing(Duration::from_millis(500));
    eventually("renewed: a serves again", || is_active(&a)).await;
    refused_by(a.publish("vol-x", "n1", rwo()).await, "n2");
    let m = a.scrape().await;
    assert_eq!(
        (transitions(&m, "active"), transitions(&m, "standby")),
        (2.0, 1.0)
    );
}

// ---- Must show 2: the Lease watch lost, the API down ------------------------------------------

/// The active driver loses sight of the Lease (every Lease request fails; then the whole API
/// is down) while its csi-attacher keeps renewing it: it becomes a standby once what it last saw
/// expires, and serves again only after re-seeding, from VolumeAttachments that changed while
/// it could not see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_lease_watch_or_the_api_makes_the_holder_a_standby_until_it_has_reseeded() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    c.pv("pv-x", "vol-x", false, None, json!({}));
    let x1 = c.va("pv-x", "vol-x", "n1", true, Duration::from_secs(60));
    c.lease("a", 6);
    let _attacher = c.keep_renewing(Duration::from_millis(500));
    let a = start_ha(&c, "a", &["vol-x"], &[]).await;
    eventually("a serves", || is_active(&a)).await;
    a.publish("vol-x", "n1", rwo()).await.unwrap();

    // 1. The Lease watch is lost: every request for Leases fails, nothing else does.
    let fault = c.api.fail("*", "leases", 503);
    c.api.drop_watches();
    eventually("blind to the Lease: a standby", || async {
        not_active(&a.publish("vol-x", "n1", rwo()).await)
    })
    .await;
    assert!(is_standby(&a).await);
    assert_eq!(transitions(&a.scrape().await, "standby"), 1.0);
    c.remove_va(&x1);
    let x2 = c.va("pv-x", "vol-x", "n2", true, Duration::from_secs(1));
    c.api.remove_fault(fault);
    eventually("the Lease is seen again: a serves", || is_active(&a)).await;
    refused_by(a.publish("vol-x", "n1", rwo()).await, "n2");

    // 2. The API is down.
    let fault = c.api.fail("*", "*", 503);
    c.api.drop_watches();
    eventually("the API is down: a standby", || async {
        not_active(&a.publish("vol-x", "n2", rwo()).await)
    })
    .await;
    assert!(is_standby(&a).await);
    c.remove_va(&x2);
    c.va("pv-x", "vol-x", "n3", true, Duration::from_secs(1));
    c.api.remove_fault(fault);
    eventually("the API is back: a serves", || is_active(&a)).await;
    refused_by(a.publish("vol-x", "n2", rwo()).await, "n3");

    let m = a.scrape().await;
    assert_eq!(
        (transitions(&m, "active"), transitions(&m, "standby")),
        (3.0, 2.0)
    );
    assert_eq!(
        sample(&m, "rds_csi_seeding_volumeattachments_seen_total"),
        3.0,
        "seeded three times, one attached VolumeAttachment each"
    );
}

// ---- A watch event the API does not confirm ---------------------------------------------------

/// The watch says the Lease moved to b, but a live read says a still holds it (a forged event:
/// a cache that lies). b confirms before it serves, so it never does; a, told it lost the Lease,
/// stands down at once (stepping down needs no confirmation) and serves again, after re-seeding,
/// at the next renewal it sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_event_the_api_does_not_confirm_never_makes_a_driver_active() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv-x", "vol-x", false, None, json!({}));
    c.va("pv-x", "vol-x", "n1", true, Duration::from_secs(60));
    c.lease("a", 3600);
    let a = start_ha(&c, "a", &["vol-x"], &[]).await;
    let b = start_ha(&c, "b", &["vol-x"], &[]).await;
    eventually("a serves, b stands by", || async {
        is_active(&a).await && is_standby(&b).await
    })
    .await;
    eventually("both watch the Lease", || async {
        c.api.open_watches(Some("leases")) >= 2
    })
    .await;

    c.api.clear_calls();
    let mut forged = c.api.get("leases", Some(LEASE_NAMESPACE), LEASE).unwrap();
    forged["spec"]["holderIdentity"] = json!("b");
    forged["spec"]["renewTime"] = json!(crate::support::cluster::micro_now());
    assert_eq!(c.api.forge_watch_event("leases", "MODIFIED", forged), 2);
    eventually("b reacted to the forged event", || async {
        c.api.count_calls("get", "leases") >= 1 || transitions(&b.scrape().await, "active") > 0.0
    })
    .await;
    assert_eq!(
        transitions(&b.scrape().await, "active"),
        0.0,
        "b confirms with a live read before it serves"
    );
    eventually("a stood down", || is_standby(&a)).await;
    assert!(is_standby(&b).await);
    assert!(not_active(&b.publish("vol-x", "n2", rwo()).await));
    assert_eq!(transitions(&b.scrape().await, "active"), 0.0);

    c.renew_lease();
    eventually("a serves again", || is_active(&a)).await;
    refused_by(a.publish("vol-x", "n2", rwo()).await, "n1");
    assert_eq!(transitions(&b.scrape().await, "active"), 0.0);
}

// ---- Flags --------------------------------------------------------------------------------

/// Leader election follows a Lease in a cluster: without Kubernetes it is refused at start, as
/// is a namespace nobody told the driver (no flag, no POD_NAMESPACE, no service account).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_needs_kubernetes_and_a_namespace() {
    let c = Cluster::new(&["n1"]).await;
    let cases: [(&[&str], Option<&std::path::Path>, &str); 2] = [
        (
            &["--kubernetes", "off", "--leader-election"],
            None,
            "--leader-election needs Kubernetes mode",
        ),
        (
            &["--kubernetes", "on", "--leader-election"],
            Some(c.kubeconfig.as_path()),
            "pass --leader-election-namespace",
        ),
    ];
    for (args, kubeconfig, says) in cases {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("csi.sock");
        let sa_flag = format!(
            "--service-account-dir={}",
            dir.path().join("no-service-account").display()
        );
        let mut args = args.to_vec();
        args.push(&sa_flag);
        let mut child = Driver::spawn_with(dir.path(), &socket, &[], &args, kubeconfig);
        let mut status = None;
        eventually("the driver exits", || {
            status = child.try_wait().unwrap();
            std::future::ready(status.is_some())
        })
        .await;
        assert!(!status.unwrap().success(), "{args:?}");
        let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap();
        assert!(log.contains(says), "{args:?}: {log}");
        assert!(!socket.exists(), "{args:?}: served nothing");
    }
}

// ---- A standby's DeleteVolume ------------------------------------------------------------------

/// Rules, "High availability": a standby decides DeleteVolume from live VolumeAttachment reads,
/// bounded: candidates from its VolumeAttachment projection, each confirmed by a live GET of
/// the name Kubernetes gives it, and never a list of every VolumeAttachment per call. Any
/// VolumeAttachment still there (attached, pending, or being deleted) refuses with
/// FAILED_PRECONDITION naming its node; a failing GET or an unsynced projection is UNAVAILABLE
/// and deletes nothing. The list-per-call decision this replaced hangs at the first delete
/// (the VolumeAttachment list is held) and fails the no-list count; deciding from the
/// projection alone (`published_nodes` without `live_attachments`' GETs) fails at `vol-gone`,
/// whose VolumeAttachment was deleted behind the watch's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_deletes_by_live_gets_of_its_projections_candidates() {
    let c = Cluster::new(&["n1", "n2", "n3"]).await;
    for (pv, vol) in [
        ("pv-attached", "vol-attached"),
        ("pv-pending", "vol-pending"),
        ("pv-leaving", "vol-leaving"),
        ("pv-free", "vol-free"),
        ("pv-gone", "vol-gone"),
    ] {
        c.pv(pv, vol, false, None, json!({}));
    }
    c.va(
        "pv-attached",
        "vol-attached",
        "n1",
        true,
        Duration::from_secs(60),
    );
    c.va(
        "pv-pending",
        "vol-pending",
        "n2",
        false,
        Duration::from_secs(60),
    );
    let leaving = c.va(
        "pv-leaving",
        "vol-leaving",
        "n3",
        true,
        Duration::from_secs(60),
    );
    c.lease("someone-else", 3600);
    let held = c.api.hang("list", "volumeattachments");
    let volumes = [
        "vol-attached",
        "vol-pending",
        "vol-leaving",
        "vol-free",
        "vol-gone",
    ];
    let b = start_ha(&c, "b", &volumes, &[]).await;
    eventually("b stands by", || is_standby(&b)).await;
    let err = b.delete("vol-free").await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unavailable,
        "projection not synced: {}",
        err.message()
    );
    c.api.remove_fault(held);
    eventually("the VolumeAttachment projection has synced", || async {
        c.api.open_watches(Some("volumeattachments")) >= 1
    })
    .await;
    // Being deleted (the attacher's finalizer holds it): still there.
    let _ = c.api.delete("volumeattachments", None, &leaving);
    // A VolumeAttachment the projection saw, deleted behind its back: the live GET says 404.
    let gone = c.va("pv-gone", "vol-gone", "n1", true, Duration::ZERO);
    eventually("b's projection saw it", || async {
        let answer = b.delete("vol-gone").await;
        matches!(answer, Err(s) if s.code() == Code::FailedPrecondition)
    })
    .await;
    c.api
        .delete_unwatched("volumeattachments", None, &gone)
        .unwrap();

    c.api.clear_calls();
    for (volume, node) in [
        ("vol-attached", "n1"),
        ("vol-pending", "n2"),
        ("vol-leaving", "n3"),
    ] {
        let err = b.delete(volume).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::FailedPrecondition,
            "{volume}: {}",
            err.message()
        );
        assert!(err.message().contains(node), "{volume}: {}", err.message());
        assert!(b.volume_ids().await.unwrap().contains(&volume.to_string()));
    }
    b.delete("vol-free")
        .await
        .expect("no VolumeAttachment names it");
    b.delete("vol-gone")
        .await
        .expect("its VolumeAttachment is gone");
    let ids = b.volume_ids().await.unwrap();
    assert!(!ids.contains(&"vol-free".into()) && !ids.contains(&"vol-gone".into()));
    let vas_listed = c.api.count_calls("list", "volumeattachments");
    assert_eq!(vas_listed, 0, "no VolumeAttachment list per DeleteVolume");
    let gets = c.api.count_calls("get", "volumeattachments");
    assert_eq!(gets, 4, "one GET per candidate, none for vol-free");

    let fault = c.api.fail("get", "volumeattachments", 500);
    let err = b.delete("vol-attached").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    c.api.remove_fault(fault);
    assert!(b
        .volume_ids()
        .await
        .unwrap()
        .contains(&"vol-attached".into()));
}

/// The first-leaseDuration check's read (`AttachmentAuthority::attached_elsewhere`): candidates
/// from the VolumeAttachment projection, confirmed by live GETs; only attached ones without a
/// deletionTimestamp count, never the asking node, and no VolumeAttachment is listed per call.
/// A failing GET is an error. Deciding from the projection alone fails at n4, deleted behind
/// the watch's back; dropping the attached filter fails at n2, the deletion filter at n3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_elsewhere_confirms_the_projections_candidates_live() {
    use rds_csi::ids::{NodeId, VolumeId};
    use rds_csi::kube::AttachmentAuthority;

    let c = Cluster::new(&["n1", "n2", "n3", "n4", "n5"]).await;
    c.pv("pv", "vol", true, None, json!({}));
    c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    c.va("pv", "vol", "n2", false, Duration::from_secs(60));
    let leaving = c.va("pv", "vol", "n3", true, Duration::from_secs(60));
    let _ = c.api.delete("volumeattachments", None, &leaving);
    let gone = c.va("pv", "vol", "n4", true, Duration::from_secs(60));
    let kubeconfig = kube::config::Kubeconfig::read_from(&c.kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let cluster = rds_csi::kube::cluster::KubeCluster::start(client, DRIVER.into());
    let volume = VolumeId::try_from("vol").unwrap();
    let node = |n: &str| NodeId::try_from(n).unwrap();
    eventually("the projections have synced", || async {
        cluster
            .attached_elsewhere(&volume, &node("n5"))
            .await
            .is_ok()
    })
    .await;
    c.api
        .delete_unwatched("volumeattachments", None, &gone)
        .unwrap();
    c.api.clear_calls();
    let others = cluster
        .attached_elsewhere(&volume, &node("n5"))
        .await
        .unwrap();
    assert_eq!(others, [node("n1")]);
    let others = cluster
        .attached_elsewhere(&volume, &node("n1"))
        .await
        .unwrap();
    assert!(others.is_empty(), "never the asking node: {others:?}");
    assert_eq!(c.api.count_calls("list", "volumeattachments"), 0);
    assert_eq!(c.api.count_calls("get", "volumeattachments"), 4 + 3);
    let fault = c.api.fail("get", "volumeattachments", 500);
    assert!(cluster
        .attached_elsewhere(&volume, &node("n5"))
        .await
        .is_err());
    c.api.remove_fault(fault);
}

/// Rules, "Boot seeding" 1, for a standby's DeleteVolume: a VolumeAttachment naming a PV the
/// PV projection does not know has that PV looked up live; a PV that names the volume makes the
/// VolumeAttachment a candidate (refused), a failing lookup is UNAVAILABLE, and both delete
/// nothing. Catches the removal of the unknown-PV lookup in `va_candidates`: the volume's only
/// VolumeAttachment is then no candidate and the delete answers OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_looks_up_a_pv_its_cache_missed_before_deleting() {
    let c = Cluster::new(&["n1"]).await;
    c.lease("someone-else", 3600);
    c.pv("pv-probe", "vol-probe", false, None, json!({}));
    c.api.hang("watch", "persistentvolumes");
    let b = start_ha(&c, "b", &["vol"], &[]).await;
    eventually("b stands by, its projections synced", || async {
        is_standby(&b).await && c.api.open_watches(Some("volumeattachments")) >= 1
    })
    .await;
    // The PV arrives while b's PV watch is held; its VolumeAttachment reaches b's projection,
    // and so has every earlier one once a later probe's is refused (one stream, in order;
    // `vol-probe` is in no backend, so an early OK deletes nothing).
    c.pv("pv", "vol", false, None, json!({}));
    c.va("pv", "vol", "n1", true, Duration::from_secs(60));
    c.va("pv-probe", "vol-probe", "n1", false, Duration::ZERO);
    eventually("b's VolumeAttachment projection has caught up", || async {
        matches!(b.delete("vol-probe").await, Err(s) if s.code() == Code::FailedPrecondition)
    })
    .await;
    let err = b.delete("vol").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("n1"), "{}", err.message());
    let gets: Vec<_> = c
        .api
        .calls_matching("get", "persistentvolumes")
        .into_iter()
        .map(|call| (call.name.unwrap_or_default(), call.status))
        .collect();
    assert!(gets.contains(&("pv".into(), Some(200))), "{gets:?}");
    let fault = c.api.fail("get", "persistentvolumes", 500);
    let err = b.delete("vol").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    c.api.remove_fault(fault);
    assert!(b.volume_ids().await.unwrap().contains(&"vol".into()));
}

/// Kubernetes mode without `--leader-election`: the driver serves as the only controller until
/// the csi-attacher's Lease shows another pod holding it (the attachers run an election, so
/// another replica may serve while this one never re-seeds); then Publish and Unpublish answer
/// UNAVAILABLE naming the flag, Probe says not ready, and the log says why. Catches main.rs not
/// starting the Lease watch without `--leader-election`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_leader_election_a_lease_held_elsewhere_stops_attachments() {
    let c = Cluster::new(&["n1", "n2"]).await;
    c.pv("pv-x", "vol-x", false, None, json!({}));
    let dir = tempfile::tempdir().unwrap();
    precreate(dir.path(), &["vol-x"]).await;
    let args = [
        "--leader-election-namespace",
        LEASE_NAMESPACE,
        "--leader-election-identity",
        "me",
    ];
    let d = Driver::start_kube_in(dir, &c.kubeconfig, &args).await;
    d.wait_ready().await;
    let x1 = c.va("pv-x", "vol-x", "n1", false, Duration::ZERO);
    d.publish("vol-x", "n1", rwo()).await.unwrap();
    c.attach(&x1);
    c.lease("me", 15);
    let _renewing = c.keep_renewing(Duration::from_secs(2));
    d.publish("vol-x", "n1", rwo())
        .await
        .expect("this pod's csi-attacher leads: still served");

    c.move_lease("other");
    eventually("attachments refused", || async {
        matches!(d.unpublish("vol-x", "n1").await,
            Err(s) if s.code() == Code::Unavailable && s.message().contains("--leader-election"))
    })
    .await;
    let err = d.publish("vol-x", "n2", rwo()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(!d.ready().await, "not ready until restarted");
    d.wait_for_log("held by another pod").await;
    assert!(not_active(&d.unpublish("vol-x", "n1").await));
}
