//! rds-csi: a CSI driver for KubeVirt VMs on MikroTik ROSE Data Server NVMe/TCP volumes.
//!
//! Module map:
//! - [`actors`]: the attachment state (pure rules in `state`, one `VolumeActor` per volume, the
//!   `Supervisor` that starts, seeds and reaps them);
//! - [`grpc`]: CSI Identity, Controller and Node services, translation only;
//! - [`node`]: the node plugin's volumes (devices, filesystems, mounts) behind small seams;
//! - [`deadline`]: the caller's deadline (`grpc-timeout`), carried down to what waits on it;
//! - [`domain`]: the shared vocabulary (capabilities, access classes, context keys);
//! - [`backend`]: where volumes live (`file` is the embedded default);
//! - [`kube`]: the cluster behind small traits (standalone implementations included);
//! - [`metrics`], [`telemetry`]: Prometheus registry and logs;
//! - [`role`]: whether this controller serves attachments (active, standby), following the
//!   csi-attacher's leader Lease, and the switch between the two;
//! - [`reconcile`]: the active controller's reconcilers (stale attachments, orphan volumes);
//! - [`keyed`]: async locks by key (per volume, per snapshot), shared by `node` and `backend`;
//! - [`http`]: `/metrics`, `/healthz`, `/readyz` and `/debug/attachments`;
//! - [`ctl`]: a small CSI client over the socket for humans.

pub mod actors;
pub mod backend;
pub mod ctl;
pub mod deadline;
pub mod domain;
pub mod grpc;
pub mod http;
pub mod ids;
pub mod keyed;
pub mod kube;
pub mod metrics;
pub mod node;
pub mod reconcile;
pub mod role;
pub mod telemetry;

use std::time::SystemTime;

pub use backend::BackendError;
pub use ids::{NodeId, SnapshotId, VolumeId};

/// The generated CSI v1 types, client and server.
pub mod csi {
    #![allow(clippy::all)]
    tonic::include_proto!("csi.v1");
}

/// Default driver name, shared with the Go driver so this one is a drop-in replacement.
pub const DEFAULT_DRIVER_NAME: &str = "rds.csi.srvlab.io";

/// Every way a request can fail. `grpc::status` maps each variant to a CSI status code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field} {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("volume {0} does not exist")]
    VolumeNotFound(VolumeId),
    #[error("node {0} is not known")]
    NodeNotFound(NodeId),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{}", conflict_message(holders, requested, *exclusive))]
    Conflict {
        holders: Vec<NodeId>,
        requested: NodeId,
        exclusive: bool,
    },
    #[error("migration limit: attached to {}", join_and(nodes))]
    MigrationLimit { nodes: Vec<NodeId> },
    #[error("volume {volume} is still published to {}", join_and(nodes))]
    StillPublished {
        volume: VolumeId,
        nodes: Vec<NodeId>,
    },
    #[error(
        "node {node} already holds {held} volumes, the most --max-volumes-per-node ({max}) allows"
    )]
    NodeFull { node: NodeId, held: u64, max: u64 },
    #[error("the driver is not ready yet: attachment state is still being rebuilt")]
    NotReady,
    /// A standby controller (another pod's csi-attacher holds the leader Lease), or an active
    /// one whose term ended before it answered.
    #[error("not the active controller: {0}")]
    NotActive(String),
    #[error("{0}")]
    Unavailable(String),
    /// The volume actor is being reaped; the caller retries through the supervisor.
    #[error("volume actor is stopping")]
    Retired,
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Aborted(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl Error {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::VolumeNotFound(_) | Self::NodeNotFound(_) => "not_found",
            Self::AlreadyExists(_) => "already_exists",
            Self::Conflict { .. } => "conflict",
            Self::MigrationLimit { .. } => "migration_limit",
            Self::StillPublished { .. } => "still_published",
            Self::NodeFull { .. } => "node_full",
            Self::NotReady => "not_ready",
            Self::NotActive(_) => "not_active",
            Self::Unavailable(_) | Self::Retired => "unavailable",
            Self::DeadlineExceeded(_) => "deadline_exceeded",
            Self::Aborted(_) => "aborted",
            Self::Backend(e) => e.metric_label(),
        }
    }
}

fn conflict_message(holders: &[NodeId], requested: &NodeId, exclusive: bool) -> String {
    let why = if exclusive {
        "an exclusive (SINGLE_NODE_*) volume can be on one node only"
    } else if holders.len() >= 2 {
        "it is already on more nodes than its access class allows"
    } else {
        "the request's access class differs from the attached one"
    };
    format!(
        "volume is attached to node {}; cannot attach to {requested}: {why}",
        join_and(holders)
    )
}

fn join_and(nodes: &[NodeId]) -> String {
    match nodes {
        [] => "no node".into(),
        [one] => one.to_string(),
        [init @ .., last] => {
            let init: Vec<String> = init.iter().map(|n| n.to_string()).collect();
            format!("{} and {last}", init.join(", "))
        }
    }
}

/// RFC 3339 with second precision in UTC, as the PV annotations and the debug view use.
pub fn rfc3339(at: SystemTime) -> String {
    let t = time::OffsetDateTime::from(at)
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::from(at));
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
