//! Orphan volumes: backend volumes that no PersistentVolume of this driver names. Reported
//! (log, `rds_csi_orphan_volumes`) once a volume has had no PV for longer than the grace, and
//! deleted only in delete mode; dry run is the default.
//!
//! Candidates are only this driver instance's volumes ([`VolumeBackend::list_owned`]: on RDS,
//! the disks under its `--rds-volume-path` with its `--rds-nqn-prefix`). Another cluster or
//! driver instance on the same storage has PVs this one never sees, so its volumes would all
//! look orphaned here.
//!
//! Why a volume with a PV is never deleted, including one whose PV is being created
//! (CreateVolume answered, the external-provisioner about to write the PV):
//! - the grace runs from when *this process* first saw the volume without a PV, which is never
//!   earlier than the volume's creation, and is reset whenever the volume is seen with a PV. It
//!   is kept in memory only, so a restart (or a new term) starts every grace over: that can
//!   delay a deletion, never hasten it. The volume's own age is never used (the Go driver faked
//!   it as twice the grace, so its grace never applied);
//! - before deleting, a live list of PVs (never the cache) must not name the volume either;
//! - the deletion goes through the volume's actor, which refuses a volume that is published.
//!
//! So a volume is deleted only if no PV named it at any pass over at least the whole grace, nor
//! in the API's own answer a moment before. A PV whose creation takes longer than the grace
//! (24 h by default) is the one case left, and with dry run, the default, even that is only
//! reported.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::{count, LIVE_READ_TIMEOUT, ORPHAN};
use crate::actors::messages::Delete;
use crate::actors::Router;
use crate::backend::VolumeBackend;
use crate::ids::VolumeId;
use crate::kube::PvCatalog;
use crate::metrics::Metrics;
use crate::role::Term;

/// The shortest `--orphan-grace` that `--orphan-delete` accepts; the driver refuses to start
/// with less. The grace is what keeps a volume whose PersistentVolume is still on its way from
/// being deleted: the external-provisioner writes the PV only after CreateVolume answered,
/// retrying a failed write with a backoff that tops out at its `--retry-interval-max` (5 minutes
/// by default), and the PV watch then has
/// to deliver it. An hour covers that several times over, and a short API outage besides; a
/// grace of seconds (or `0s`) would delete such a volume at the next pass.
pub const MIN_DELETE_GRACE: Duration = Duration::from_secs(3600);

/// `--orphan-interval`, `--orphan-grace`, `--orphan-delete`.
#[derive(Clone, Copy, Debug)]
pub struct OrphanConfig {
    pub interval: Duration,
    pub grace: Duration,
    pub delete: bool,
}

/// What one pass found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Seen without a PV for the first time (their grace starts now).
    pub new: Vec<VolumeId>,
    /// Seen with a PV again (their grace is forgotten).
    pub adopted: Vec<VolumeId>,
    /// Without a PV for at least the grace.
    pub past_grace: Vec<VolumeId>,
    /// Those of `past_grace` that just got there.
    pub newly_past: Vec<VolumeId>,
}

/// When each volume was first seen without a PV, by this process.
#[derive(Debug)]
pub struct Tracker {
    grace: Duration,
    first_seen: HashMap<VolumeId, Instant>,
    reported: HashSet<VolumeId>,
}

impl Tracker {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            first_seen: HashMap::new(),
            reported: HashSet::new(),
        }
    }

    /// One look at the backend's `volumes`; `has_pv` says whether a PV names one.
    pub fn observe(
        &mut self,
        volumes: &[VolumeId],
        has_pv: impl Fn(&VolumeId) -> bool,
        now: Instant,
    ) -> Found {
        let mut found = Found::default();
        let listed: HashSet<&VolumeId> = volumes.iter().collect();
        self.first_seen.retain(|v, _| listed.contains(v));
        self.reported.retain(|v| listed.contains(v));
        for volume in volumes {
            if has_pv(volume) {
                if self.first_seen.remove(volume).is_some() {
                    found.adopted.push(volume.clone());
                }
                self.reported.remove(volume);
                continue;
            }
            let first = *self.first_seen.entry(volume.clone()).or_insert_with(|| {
                found.new.push(volume.clone());
                now
            });
            if now.saturating_duration_since(first) >= self.grace {
                found.past_grace.push(volume.clone());
                if self.reported.insert(volume.clone()) {
                    found.newly_past.push(volume.clone());
                }
            }
        }
        found
    }

    /// The volume is gone, or has a PV after all: its grace starts over if it is ever seen
    /// without one again.
    pub fn forget(&mut self, volume: &VolumeId) {
        self.first_seen.remove(volume);
        self.reported.remove(volume);
    }
}

pub struct OrphanVolumes {
    pub backend: Arc<dyn VolumeBackend>,
    pub pvs: Arc<dyn PvCatalog>,
    /// Deletions go through the volume actors, like DeleteVolume.
    pub router: Router,
    /// The term this reconciler runs in: its deletions are refused in any other.
    pub term: Term,
    pub metrics: Arc<Metrics>,
    pub config: OrphanConfig,
}

impl OrphanVolumes {
    /// A pass at once, then every interval, for the life of the term.
    pub async fn run(self) {
        let mut tracker = Tracker::new(self.config.grace);
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let ok = self.pass(&mut tracker).await;
            count(&self.metrics, ORPHAN, ok);
        }
    }

    /// One pass. Returns false if the backend or the live PV list could not be read (nothing
    /// is deleted then).
    pub async fn pass(&self, tracker: &mut Tracker) -> bool {
        let volumes = match self.backend.list_owned().await {
            Ok(list) => list.into_iter().map(|v| v.id).collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(error = %e, "orphan volumes: cannot list the backend's volumes");
                return false;
            }
        };
        let grace = self.config.grace;
        let found = tracker.observe(&volumes, |v| self.pvs.has_pv(v.as_str()), Instant::now());
        for volume in &found.new {
            tracing::info!(volume_id = %volume, grace = %humantime::format_duration(grace),
                "volume has no PersistentVolume of this driver; reported as an orphan if that lasts longer than --orphan-grace");
        }
        for volume in &found.adopted {
            tracing::info!(volume_id = %volume, "volume has a PersistentVolume again; it is no orphan");
        }
        for volume in &found.newly_past {
            if self.config.delete {
                tracing::warn!(volume_id = %volume, grace = %humantime::format_duration(grace),
                    "orphan volume: no PersistentVolume has named it for longer than --orphan-grace; deleting it (--orphan-delete)");
            } else {
                tracing::warn!(volume_id = %volume, grace = %humantime::format_duration(grace),
                    "orphan volume: no PersistentVolume has named it for longer than --orphan-grace; dry run, not deleted (--orphan-delete deletes orphans)");
            }
        }
        let mut orphans = found.past_grace.len();
        let mut ok = true;
        if self.config.delete && !found.past_grace.is_empty() {
            match tokio::time::timeout(LIVE_READ_TIMEOUT, self.pvs.live_handles()).await {
                Ok(Ok(live)) => {
                    for volume in &found.past_grace {
                        if live.contains(volume.as_str()) {
                            tracing::info!(volume_id = %volume,
                                "orphan candidate has a PersistentVolume in the live list (the cache had not seen it); not deleted");
                            tracker.forget(volume);
                            orphans -= 1;
                            continue;
                        }
                        match self.router.send(volume, Delete(self.term)).await {
                            Ok(()) => {
                                tracing::warn!(volume_id = %volume, "deleted orphan volume");
                                self.metrics.orphan_deleted.inc();
                                tracker.forget(volume);
                                orphans -= 1;
                            }
                            Err(e) => {
                                tracing::warn!(volume_id = %volume, error = %e, "orphan volume not deleted");
                            }
                        }
                    }
                }
                Ok(Err(e)) => {
                    ok = false;
                    tracing::warn!(error = %e, "orphan volumes: the live PV list failed; nothing deleted");
                }
                Err(_) => {
                    ok = false;
                    tracing::warn!(
                        "orphan volumes: the live PV list did not answer in time; nothing deleted"
                    );
                }
            }
        }
        self.metrics.orphan_volumes.set(orphans as i64);
        ok
    }
}

#[cfg(test)]
mod tests;
