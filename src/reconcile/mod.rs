//! The active controller's reconcilers. Each runs only during an active term (the role starts
//! them with the term and aborts them when it ends) and changes attachment state only through
//! the volume actors, and volumes only through their actor's Delete.
//!
//! - [`stale`]: attachments held by nodes whose Node object is gone are dropped (rule 5.1,
//!   applied ahead of the next publish), on the Node watch's deletions and every interval.
//! - [`orphan`]: backend volumes no PersistentVolume names for longer than a grace are
//!   reported, and deleted only when asked.

pub mod orphan;
pub mod stale;

/// Labels of `rds_csi_reconciler_runs_total{reconciler}`.
pub const STALE: &str = "stale_attachments";
pub const ORPHAN: &str = "orphan_volumes";

/// How long one live API read of a reconciler may take before the pass counts it failed.
pub const LIVE_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn count(metrics: &crate::metrics::Metrics, reconciler: &str, ok: bool) {
    metrics
        .reconciler_runs
        .with_label_values(&[reconciler, if ok { "success" } else { "error" }])
        .inc();
}
