//! The cluster, behind small traits. Actors and the supervisor depend on these traits only;
//! the kube-rs implementations live beside them, and [`Standalone`] serves a laptop with no
//! cluster: a fixed list of known nodes, no VolumeAttachment authority, no annotations, no events.
//!
//! Writes (annotations, events) are queued by their implementations and never awaited by callers.

pub mod cluster;
mod lean;
pub mod lease;
pub mod seed;
pub mod sink;

use std::collections::HashSet;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::ids::{NodeId, VolumeId};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes API error while {action}: {message}")]
    Api { action: String, message: String },
    /// Signs of running inside a cluster, but no configuration to reach it.
    #[error("{0}")]
    Config(String),
}

impl KubeError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Api { .. } => "api_error",
            Self::Config(_) => "config",
        }
    }
}

/// Whether a node exists (rules, Publish step 2). Callers on the publish path bound it with
/// [`crate::actors::LIVE_CHECK_BUDGET`].
#[async_trait]
pub trait NodeDirectory: Send + Sync + 'static {
    async fn exists(&self, node: &NodeId) -> Result<bool, KubeError>;
}

/// What the cluster says about a node that holds a volume (rules, Publish 5.1 and 5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HolderStatus {
    /// The node exists and its VolumeAttachment stands: a real conflict.
    Live,
    /// The Node object is deleted: the attachment is stale.
    NodeGone,
    /// The VolumeAttachment is absent or being deleted: the node is being released.
    Released,
}

/// Live checks on a blocking holder. Implementations must ask the API, not a cache: a lagging
/// cache must never cause a handoff. Any error fails the publish closed, and so does running
/// past [`crate::actors::LIVE_CHECK_BUDGET`], which the caller enforces.
#[async_trait]
pub trait AttachmentAuthority: Send + Sync + 'static {
    async fn check(&self, volume: &VolumeId, node: &NodeId) -> Result<HolderStatus, KubeError>;

    /// Rules, "High availability": for the first leaseDuration of a term, before a volume with
    /// no holder is given to `node`, the other nodes whose VolumeAttachment of `volume` a live
    /// read shows attached (`status.attached`, no deletionTimestamp). An OK the previous term
    /// answered late may be missing from the list this term was seeded from. Sorted, no
    /// duplicates, never `node` itself. Any error fails the publish closed.
    async fn attached_elsewhere(
        &self,
        volume: &VolumeId,
        node: &NodeId,
    ) -> Result<Vec<NodeId>, KubeError>;
}

/// Whether a Node object is gone, by a live GET (never a cache): the stale-attachment
/// reconciler drops a node's attachments only on this answer.
#[async_trait]
pub trait NodeLiveness: Send + Sync + 'static {
    async fn gone(&self, node: &NodeId) -> Result<bool, KubeError>;
}

/// This driver's PersistentVolumes, as the orphan reconciler needs them: the watched projection
/// for every pass, and a live list before anything is deleted.
#[async_trait]
pub trait PvCatalog: Send + Sync + 'static {
    /// Whether a PV of this driver names `handle`, by the PV projection.
    fn has_pv(&self, handle: &str) -> bool;
    /// The volume handles of this driver's PVs, by a live, paged list (never the cache).
    async fn live_handles(&self) -> Result<HashSet<String>, KubeError>;
}

/// "Still published?" for a controller without attachment state (a standby): the nodes of the
/// VolumeAttachments of this driver that name the volume, by live reads bounded in time and
/// number (never a list per call). Any of them counts, attached or not, being deleted or not:
/// the active controller may be attaching or detaching it right now. Any error, or no answer in
/// time, fails the delete closed (UNAVAILABLE).
#[async_trait]
pub trait PublishedNodes: Send + Sync + 'static {
    async fn published_nodes(&self, volume: &VolumeId) -> Result<Vec<NodeId>, KubeError>;
}

/// Events posted on the volume's PVC.
#[derive(Clone, Debug, PartialEq)]
pub enum ClusterEvent {
    VolumeAttached {
        node: NodeId,
    },
    VolumeDetached {
        node: NodeId,
    },
    MigrationStarted {
        source: NodeId,
        target: NodeId,
    },
    MigrationCompleted {
        source: NodeId,
        target: NodeId,
    },
    MigrationFailed {
        source: NodeId,
        target: NodeId,
        timed_out: bool,
        /// False for a migration seeded without a known direction: `source` and `target` are
        /// then only its two nodes.
        direction_known: bool,
    },
    /// A migration whose direction is unknown ended: `detached` left, `stayed` holds the
    /// volume. Whether that was its completion or its rollback cannot be told.
    MigrationEnded {
        detached: NodeId,
        stayed: NodeId,
    },
    AttachmentConflict {
        message: String,
    },
    StaleAttachmentCleared {
        node: NodeId,
    },
    OverAttached {
        nodes: Vec<NodeId>,
    },
}

/// Queues informational writes. Never blocks, never fails the caller.
pub trait ClusterSink: Send + Sync + 'static {
    /// Sets `<driver>/attached-node` and `<driver>/attached-at`, or clears them with `None`.
    fn annotate(&self, volume: &VolumeId, attached: Option<(&NodeId, SystemTime)>);
    fn event(&self, volume: &VolumeId, event: ClusterEvent);
}

/// No cluster: the known nodes are `--node-id` plus `--known-node` extras.
pub struct Standalone {
    known: HashSet<NodeId>,
}

impl Standalone {
    pub fn new(known: impl IntoIterator<Item = NodeId>) -> Self {
        Self {
            known: known.into_iter().collect(),
        }
    }
}

#[async_trait]
impl NodeDirectory for Standalone {
    async fn exists(&self, node: &NodeId) -> Result<bool, KubeError> {
        Ok(self.known.contains(node))
    }
}

#[async_trait]
impl AttachmentAuthority for Standalone {
    async fn check(&self, _volume: &VolumeId, _node: &NodeId) -> Result<HolderStatus, KubeError> {
        Ok(HolderStatus::Live)
    }

    /// No VolumeAttachments and no terms: this process's state is all there is.
    async fn attached_elsewhere(
        &self,
        _volume: &VolumeId,
        _node: &NodeId,
    ) -> Result<Vec<NodeId>, KubeError> {
        Ok(Vec::new())
    }
}

impl ClusterSink for Standalone {
    fn annotate(&self, _volume: &VolumeId, _attached: Option<(&NodeId, SystemTime)>) {}
    fn event(&self, _volume: &VolumeId, _event: ClusterEvent) {}
}
