//! Queued, retried, never-awaited writes to the cluster: the informational PV annotations and
//! the events on each volume's PVC.
//!
//! Annotations are coalesced per PV (only the newest value is ever written, and the last write
//! to land is always the newest value), events are a bounded FIFO. A failed write is counted and
//! retried with capped backoff; it never fails or undoes an attach. A PV found deleted ends its
//! annotation writes. Nothing anywhere reads the annotations back.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, PersistentVolume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use tokio::sync::Notify;

use super::cluster::{Claim, KubeCluster};
use super::{ClusterEvent, ClusterSink};
use crate::ids::{NodeId, VolumeId};
use crate::metrics::Metrics;

/// Most PVs with an annotation write pending, and most events waiting to be posted.
pub const MAX_PENDING: usize = 65_536;
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A write with no answer after this long is abandoned and retried: a hung API call must not
/// stall the queue behind it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one API write under [`WRITE_TIMEOUT`]; a timeout counts as reason `timeout`.
async fn bounded<T>(
    write: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, &'static str> {
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(kube_reason(&e)),
        Err(_) => Err("timeout"),
    }
}
/// An event still failing after this many attempts is dropped (and counted).
const EVENT_ATTEMPTS: u32 = 8;

fn backoff(attempt: u32) -> Duration {
    (Duration::from_millis(200) * 2u32.saturating_pow(attempt.min(10))).min(MAX_BACKOFF)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `Some((node, rfc3339))` sets the annotations; `None` clears them.
type AnnotationValue = Option<(String, String)>;

/// How one annotation write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Written,
    /// 404: the PV is deleted.
    Gone,
    Failed,
}

/// What the writer does after [`AnnotationQueue::finished`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    Nothing,
    /// The PV is gone and leaves the queue.
    Ended,
    /// Try this generation again after the backoff, through [`AnnotationQueue::retry_due`].
    Retry(Duration),
}

/// One PV's newest wanted annotation value and where its write stands.
struct PvWrite {
    generation: u64,
    value: AnnotationValue,
    /// Failed attempts at this generation.
    attempt: u32,
    /// In `due`.
    queued: bool,
    /// The writer is writing some generation of it now.
    in_flight: bool,
}

/// The per-PV coalescing queue of annotation writes, without I/O. Only the newest value of a PV
/// is kept, and a write always takes the value that is newest when it starts, so the last write
/// that lands is the newest state: a value that was retried never follows a newer one. A PV
/// leaves the queue once its newest value is written, or once it turns out to be deleted.
struct AnnotationQueue {
    pvs: HashMap<String, PvWrite>,
    /// PVs whose write is due, in the order they came due; each at most once.
    due: VecDeque<String>,
    next_generation: u64,
    capacity: usize,
}

impl AnnotationQueue {
    fn new(capacity: usize) -> Self {
        Self {
            pvs: HashMap::new(),
            due: VecDeque::new(),
            next_generation: 0,
            capacity,
        }
    }

    /// PVs with a write pending, due, in flight or waiting to be retried.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.pvs.len()
    }

    /// Wants `value` on `pv`, replacing any older value not yet written. `false`: the queue is
    /// full and `pv` is not in it; the value is dropped.
    fn set(&mut self, pv: &str, value: AnnotationValue) -> bool {
        if !self.pvs.contains_key(pv) && self.pvs.len() >= self.capacity {
            return false;
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        let entry = self.pvs.entry(pv.to_string()).or_insert(PvWrite {
            generation,
            value: None,
            attempt: 0,
            queued: false,
            in_flight: false,
        });
        entry.generation = generation;
        entry.value = value;
        entry.attempt = 0;
        // In flight: queued again when that write finishes. Waiting for a retry: due now.
        if !entry.in_flight && !entry.queued {
            entry.queued = true;
            self.due.push_back(pv.to_string());
        }
        true
    }

    /// The next write to make: PV, generation and its newest value.
    fn next(&mut self) -> Option<(String, u64, AnnotationValue)> {
        while let Some(pv) = self.due.pop_front() {
            if let Some(entry) = self.pvs.get_mut(&pv) {
                entry.queued = false;
                entry.in_flight = true;
                let (generation, value) = (entry.generation, entry.value.clone());
                return Some((pv, generation, value));
            }
        }
        None
    }

    /// Records how the write of `generation` on `pv` ended.
    fn finished(&mut self, pv: &str, generation: u64, outcome: Outcome) -> After {
        let Some(entry) = self.pvs.get_mut(pv) else {
            return After::Nothing;
        };
        entry.in_flight = false;
        if entry.generation != generation {
            // A newer value came meanwhile: it is written next, whatever happened to this one.
            entry.queued = true;
            self.due.push_back(pv.to_string());
            return After::Nothing;
        }
        match outcome {
            Outcome::Written => {
                self.pvs.remove(pv);
                After::Nothing
            }
            Outcome::Gone => {
                self.pvs.remove(pv);
                After::Ended
            }
            Outcome::Failed => {
                let wait = backoff(entry.attempt);
                entry.attempt += 1;
                After::Retry(wait)
            }
        }
    }

    /// A retry's backoff passed: `generation` of `pv` is due again, unless something newer
    /// replaced it (and is written or due already). `true` if it was queued.
    fn retry_due(&mut self, pv: &str, generation: u64) -> bool {
        match self.pvs.get_mut(pv) {
            Some(entry) if entry.generation == generation && !entry.in_flight && !entry.queued => {
                entry.queued = true;
                self.due.push_back(pv.to_string());
                true
            }
            _ => false,
        }
    }
}

struct PendingEvent {
    claim: Claim,
    reason: &'static str,
    kind: &'static str,
    message: String,
    attempt: u32,
}

pub struct KubeSink {
    cluster: Arc<KubeCluster>,
    metrics: Arc<Metrics>,
    annotations: Mutex<AnnotationQueue>,
    annotations_ready: Notify,
    events: Mutex<VecDeque<PendingEvent>>,
    events_ready: Notify,
}

impl KubeSink {
    /// Starts the two writer tasks.
    pub fn start(cluster: Arc<KubeCluster>, metrics: Arc<Metrics>) -> Arc<Self> {
        let sink = Arc::new(Self {
            cluster,
            metrics,
            annotations: Mutex::new(AnnotationQueue::new(MAX_PENDING)),
            annotations_ready: Notify::new(),
            events: Default::default(),
            events_ready: Notify::new(),
        });
        tokio::spawn(sink.clone().annotation_writer());
        tokio::spawn(sink.clone().event_writer());
        sink
    }

    fn queue_annotation(&self, pv: String, value: AnnotationValue) {
        if !lock(&self.annotations).set(&pv, value) {
            self.metrics
                .annotation_write_failures
                .with_label_values(&["queue_full"])
                .inc();
            tracing::warn!(pv = %pv, "annotation queue full; dropping this write");
            return;
        }
        self.annotations_ready.notify_one();
    }

    async fn annotation_writer(self: Arc<Self>) {
        let api = Api::<PersistentVolume>::all(self.cluster.client().clone());
        let prefix = self.cluster.driver().to_string();
        loop {
            let next = lock(&self.annotations).next();
            let Some((pv, generation, value)) = next else {
                self.annotations_ready.notified().await;
                continue;
            };
            let (node, at) = match &value {
                Some((n, t)) => (
                    serde_json::Value::from(n.as_str()),
                    serde_json::Value::from(t.as_str()),
                ),
                None => (serde_json::Value::Null, serde_json::Value::Null),
            };
            let patch = serde_json::json!({"metadata": {"annotations": {
                format!("{prefix}/attached-node"): node,
                format!("{prefix}/attached-at"): at,
            }}});
            let outcome =
                match bounded(api.patch(&pv, &PatchParams::default(), &Patch::Merge(&patch))).await
                {
                    Ok(_) => Outcome::Written,
                    Err(NOT_FOUND) => Outcome::Gone,
                    Err(reason) => {
                        self.metrics
                            .annotation_write_failures
                            .with_label_values(&[reason])
                            .inc();
                        tracing::debug!(pv = %pv, reason, "annotation write failed; will retry");
                        Outcome::Failed
                    }
                };
            let after = lock(&self.annotations).finished(&pv, generation, outcome);
            match after {
                After::Nothing => {}
                After::Ended => {
                    self.metrics
                        .annotation_write_failures
                        .with_label_values(&["pv_deleted"])
                        .inc();
                    tracing::info!(pv = %pv, "PV is gone; its annotation writes end here");
                }
                After::Retry(wait) => {
                    let sink = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        if lock(&sink.annotations).retry_due(&pv, generation) {
                            sink.annotations_ready.notify_one();
                        } else {
                            tracing::info!(pv = %pv, "annotation retry dropped: a newer value replaced the one that failed");
                        }
                    });
                }
            }
        }
    }

    fn queue_event(&self, event: PendingEvent) {
        let mut q = lock(&self.events);
        if q.len() >= MAX_PENDING {
            q.pop_front();
            self.metrics
                .event_write_failures
                .with_label_values(&["queue_full"])
                .inc();
        }
        q.push_back(event);
        drop(q);
        self.events_ready.notify_one();
    }

    async fn event_writer(self: Arc<Self>) {
        loop {
            let next = lock(&self.events).pop_front();
            let Some(e) = next else {
                self.events_ready.notified().await;
                continue;
            };
            let now = Time(
                k8s_openapi::jiff::Timestamp::try_from(SystemTime::now())
                    .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            );
            let event = Event {
                metadata: ObjectMeta {
                    generate_name: Some(format!("{}.", e.claim.name)),
                    namespace: Some(e.claim.namespace.clone()),
                    ..Default::default()
                },
                involved_object: ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("PersistentVolumeClaim".into()),
                    name: Some(e.claim.name.clone()),
                    namespace: Some(e.claim.namespace.clone()),
                    uid: e.claim.uid.clone(),
                    ..Default::default()
                },
                reason: Some(e.reason.into()),
                message: Some(e.message.clone()),
                type_: Some(e.kind.into()),
                source: Some(EventSource {
                    component: Some(self.cluster.driver().to_string()),
                    host: None,
                }),
                reporting_component: Some(self.cluster.driver().to_string()),
                first_timestamp: Some(now.clone()),
                last_timestamp: Some(now),
                count: Some(1),
                ..Default::default()
            };
            let api = Api::<Event>::namespaced(self.cluster.client().clone(), &e.claim.namespace);
            let posted = bounded(api.create(&PostParams::default(), &event)).await;
            if posted.is_ok() {
                self.metrics
                    .events_posted_total
                    .with_label_values(&[e.reason])
                    .inc();
            }
            if let Err(failure) = posted {
                self.metrics
                    .event_write_failures
                    .with_label_values(&[failure])
                    .inc();
                if e.attempt + 1 >= EVENT_ATTEMPTS {
                    tracing::warn!(
                        reason = e.reason,
                        failure,
                        "giving up on an event after {EVENT_ATTEMPTS} attempts"
                    );
                    continue;
                }
                let sink = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(backoff(e.attempt)).await;
                    sink.queue_event(PendingEvent {
                        attempt: e.attempt + 1,
                        ..e
                    });
                });
            }
        }
    }
}

/// [`kube_reason`] of a 404.
const NOT_FOUND: &str = "not_found";

/// A short label for a failed API call.
fn kube_reason(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.code == 409 => "conflict",
        kube::Error::Api(s) if s.code == 404 => NOT_FOUND,
        kube::Error::Api(s) if s.code >= 500 => "server_error",
        kube::Error::Api(_) => "api_error",
        _ => "transport",
    }
}

fn describe(event: &ClusterEvent) -> (&'static str, &'static str, String) {
    use ClusterEvent::*;
    match event {
        VolumeAttached { node } => ("VolumeAttached", "Normal", format!("attached to node {node}")),
        VolumeDetached { node } => ("VolumeDetached", "Normal", format!("detached from node {node}")),
        MigrationStarted { source, target } => {
            ("MigrationStarted", "Normal", format!("live migration started from {source} to {target}"))
        }
        MigrationCompleted { source, target } => {
            ("MigrationCompleted", "Normal", format!("live migration from {source} to {target} completed"))
        }
        MigrationFailed { source, target, timed_out: true, direction_known: true } => (
            "MigrationFailed",
            "Warning",
            format!("live migration from {source} to {target} failed: reason timeout; both nodes stay attached until one detaches"),
        ),
        MigrationFailed { source, target, timed_out: true, direction_known: false } => (
            "MigrationFailed",
            "Warning",
            format!("live migration between {source} and {target} (direction unknown) failed: reason timeout; both nodes stay attached until one detaches"),
        ),
        MigrationFailed { source, target, timed_out: false, .. } => (
            "MigrationFailed",
            "Warning",
            format!("live migration from {source} to {target} failed: reason failed; rolled back to {source}"),
        ),
        MigrationEnded { detached, stayed } => (
            "MigrationEnded",
            "Normal",
            format!(
                "live migration between {detached} and {stayed} ended: {detached} detached, {stayed} holds the volume; \
                 whether it completed or rolled back is unknown (its VolumeAttachments were created in the same \
                 second without attach instants to order them)"
            ),
        ),
        AttachmentConflict { message } => ("AttachmentConflict", "Warning", message.clone()),
        StaleAttachmentCleared { node } => {
            ("StaleAttachmentCleared", "Warning", format!("cleared the attachment to deleted node {node}"))
        }
        OverAttached { nodes } => (
            "OverAttached",
            "Warning",
            format!(
                "attached to {} nodes ({}), more than its access class allows; further nodes are refused",
                nodes.len(),
                nodes.iter().map(NodeId::to_string).collect::<Vec<_>>().join(", ")
            ),
        ),
    }
}

impl ClusterSink for KubeSink {
    fn annotate(&self, volume: &VolumeId, attached: Option<(&NodeId, SystemTime)>) {
        let Some((pv, _)) = self.cluster.pv_for_handle(volume.as_str()) else {
            tracing::debug!(volume_id = %volume, "no PV known for this volume; annotation skipped");
            return;
        };
        let value = attached.map(|(n, at)| (n.to_string(), crate::rfc3339(at)));
        self.queue_annotation(pv, value);
    }

    fn event(&self, volume: &VolumeId, event: ClusterEvent) {
        let Some((_, Some(claim))) = self.cluster.pv_for_handle(volume.as_str()) else {
            tracing::debug!(volume_id = %volume, "no bound PVC known for this volume; event skipped");
            return;
        };
        let (reason, kind, message) = describe(&event);
        self.queue_event(PendingEvent {
            claim,
            reason,
            kind,
            message,
            attempt: 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events about a migration of unknown direction name its nodes without claiming which was
    /// the source.
    #[test]
    fn events_of_a_migration_of_unknown_direction_claim_no_direction() {
        let n = |s: &str| NodeId::try_from(s).unwrap();
        let (reason, kind, message) = describe(&ClusterEvent::MigrationEnded {
            detached: n("n1"),
            stayed: n("n2"),
        });
        assert_eq!((reason, kind), ("MigrationEnded", "Normal"));
        assert!(
            message.contains("n1 detached, n2 holds the volume"),
            "{message}"
        );
        assert!(
            !message.contains("from n") && !message.contains("completed;"),
            "{message}"
        );
        let (reason, _, message) = describe(&ClusterEvent::MigrationFailed {
            source: n("n1"),
            target: n("n2"),
            timed_out: true,
            direction_known: false,
        });
        assert_eq!(reason, "MigrationFailed");
        assert!(
            message.starts_with(
                "live migration between n1 and n2 (direction unknown) failed: reason timeout"
            ),
            "{message}"
        );
    }

    fn attached(node: &str) -> AnnotationValue {
        Some((node.into(), "2026-01-01T00:00:00Z".into()))
    }

    #[test]
    fn a_failed_write_never_follows_a_newer_value() {
        let mut q = AnnotationQueue::new(8);
        assert!(q.set("pv", attached("n1")));
        let (pv, g1, value) = q.next().unwrap();
        assert_eq!((pv.as_str(), value), ("pv", attached("n1")));
        // Detached while the first write is in flight, then the first write fails.
        assert!(q.set("pv", None));
        assert!(q.next().is_none(), "one write per PV at a time");
        assert_eq!(q.finished("pv", g1, Outcome::Failed), After::Nothing);
        let (_, g2, value) = q.next().unwrap();
        assert_eq!(
            value, None,
            "the newest value is written, not the failed one"
        );
        // The failed write's retry comes due while the newer one is in flight: nothing to do.
        assert!(!q.retry_due("pv", g1));
        assert_eq!(q.finished("pv", g2, Outcome::Written), After::Nothing);
        assert!(!q.retry_due("pv", g1));
        assert!(q.next().is_none());
        assert_eq!(q.len(), 0, "a written PV leaves the queue");
    }

    #[test]
    fn a_failed_write_is_retried_with_its_value_unless_replaced() {
        let mut q = AnnotationQueue::new(8);
        q.set("pv", attached("n1"));
        let (_, g1, _) = q.next().unwrap();
        assert_eq!(
            q.finished("pv", g1, Outcome::Failed),
            After::Retry(backoff(0))
        );
        assert!(q.next().is_none(), "waits for its backoff");
        assert!(q.retry_due("pv", g1));
        assert!(!q.retry_due("pv", g1), "queued once");
        let (_, again, value) = q.next().unwrap();
        assert_eq!((again, value), (g1, attached("n1")));
        assert_eq!(
            q.finished("pv", g1, Outcome::Failed),
            After::Retry(backoff(1))
        );
        // A newer value while waiting is due at once; the old retry then finds nothing to do.
        q.set("pv", attached("n2"));
        let (_, g2, value) = q.next().unwrap();
        assert_eq!(value, attached("n2"));
        assert!(!q.retry_due("pv", g1));
        assert_eq!(q.finished("pv", g2, Outcome::Written), After::Nothing);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn a_deleted_pv_ends_its_queue() {
        let mut q = AnnotationQueue::new(8);
        q.set("pv", attached("n1"));
        let (_, g1, _) = q.next().unwrap();
        assert_eq!(q.finished("pv", g1, Outcome::Gone), After::Ended);
        assert_eq!(q.len(), 0);
        assert!(!q.retry_due("pv", g1));
        assert!(q.next().is_none());
        // A value that came while the 404 was in flight is still tried.
        q.set("pv", attached("n1"));
        let (_, g2, _) = q.next().unwrap();
        q.set("pv", None);
        assert_eq!(q.finished("pv", g2, Outcome::Gone), After::Nothing);
        let (_, g3, value) = q.next().unwrap();
        assert_eq!(value, None);
        assert_eq!(q.finished("pv", g3, Outcome::Gone), After::Ended);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn pvs_are_written_in_the_order_they_came_due_and_the_queue_is_bounded() {
        let mut q = AnnotationQueue::new(2);
        assert!(q.set("a", attached("n1")));
        assert!(q.set("b", attached("n1")));
        assert!(!q.set("c", attached("n1")), "full");
        assert!(
            q.set("a", None),
            "a PV already queued is replaced, not added"
        );
        let order: Vec<String> = std::iter::from_fn(|| q.next().map(|(pv, _, _)| pv)).collect();
        assert_eq!(order, ["a", "b"]);
    }
}
