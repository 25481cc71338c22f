//! Queued, retried, never-awaited writes to the cluster: the informational PV annotations and
//! the events on each volume's PVC.
//!
//! Annotations are coalesced per PV (only the newest value is ever written), events are a
//! bounded FIFO. A failed write is counted and retried with capped backoff; it never fails or
//! undoes an attach. Nothing anywhere reads the annotations back.

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

#[derive(Default)]
struct Annotations {
    /// PV name → (generation, value, attempt).
    pending: HashMap<String, (u64, AnnotationValue, u32)>,
    /// PV name → newest generation written successfully.
    written: HashMap<String, u64>,
    next_generation: u64,
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
    annotations: Mutex<Annotations>,
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
            annotations: Default::default(),
            annotations_ready: Notify::new(),
            events: Default::default(),
            events_ready: Notify::new(),
        });
        tokio::spawn(sink.clone().annotation_writer());
        tokio::spawn(sink.clone().event_writer());
        sink
    }

    fn queue_annotation(
        &self,
        pv: String,
        value: AnnotationValue,
        attempt: u32,
        generation: Option<u64>,
    ) {
        let mut a = lock(&self.annotations);
        let generation = match generation {
            // A retry: only if nothing newer was queued or written meanwhile.
            Some(g) => {
                let newer_written = a.written.get(&pv).is_some_and(|w| *w >= g);
                let newer_pending = a.pending.get(&pv).is_some_and(|(p, _, _)| *p > g);
                if newer_written || newer_pending {
                    return;
                }
                g
            }
            None => {
                a.next_generation += 1;
                a.next_generation
            }
        };
        if a.pending.len() >= MAX_PENDING && !a.pending.contains_key(&pv) {
            drop(a);
            self.metrics
                .annotation_write_failures
                .with_label_values(&["queue_full"])
                .inc();
            tracing::warn!(pv = %pv, "annotation queue full; dropping this write");
            return;
        }
        a.pending.insert(pv, (generation, value, attempt));
        drop(a);
        self.annotations_ready.notify_one();
    }

    async fn annotation_writer(self: Arc<Self>) {
        let api = Api::<PersistentVolume>::all(self.cluster.client().clone());
        let prefix = self.cluster.driver().to_string();
        loop {
            let batch: Vec<_> = lock(&self.annotations).pending.drain().collect();
            if batch.is_empty() {
                self.annotations_ready.notified().await;
                continue;
            }
            for (pv, (generation, value, attempt)) in batch {
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
                match bounded(api.patch(&pv, &PatchParams::default(), &Patch::Merge(&patch))).await
                {
                    Ok(_) => {
                        let mut a = lock(&self.annotations);
                        let w = a.written.entry(pv).or_default();
                        *w = (*w).max(generation);
                    }
                    Err(reason) => {
                        self.metrics
                            .annotation_write_failures
                            .with_label_values(&[reason])
                            .inc();
                        tracing::debug!(pv = %pv, reason, attempt, "annotation write failed; will retry");
                        let sink = self.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(backoff(attempt)).await;
                            sink.queue_annotation(pv, value, attempt + 1, Some(generation));
                        });
                    }
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
            if let Err(failure) = bounded(api.create(&PostParams::default(), &event)).await {
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

/// A short label for a failed API call.
fn kube_reason(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.code == 409 => "conflict",
        kube::Error::Api(s) if s.code == 404 => "not_found",
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
        MigrationFailed { source, target, timed_out: true } => (
            "MigrationFailed",
            "Warning",
            format!("live migration from {source} to {target} failed: reason timeout; both nodes stay attached until one detaches"),
        ),
        MigrationFailed { source, target, timed_out: false } => (
            "MigrationFailed",
            "Warning",
            format!("live migration from {source} to {target} failed: reason failed; rolled back to {source}"),
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
        self.queue_annotation(pv, value, 0, None);
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
