//! The driver's Prometheus metrics, in one private registry (never the global default).
//!
//! Names match the Go driver (`rds_csi_` namespace, `attachment_*` and `migration_*` subsystems)
//! so existing dashboards keep working. Only this module defines metrics; everyone else records.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

const NAMESPACE: &str = "rds_csi";

/// `rds_csi_attachment_operation_duration_seconds`: every bound the Go driver's dashboards can
/// name (0.01 … 5 s), plus finer ones below 10 ms, where an in-memory attach answers.
const ATTACHMENT_BUCKETS: [f64; 13] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// `rds_csi_volume_operation_duration_seconds` and `rds_csi_nvme_connect_duration_seconds`:
/// the Go driver's bounds (0.1 … 60 s), plus 1 ms and 10 ms for the file backend.
const VOLUME_OPERATION_BUCKETS: [f64; 11] =
    [0.001, 0.01, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The `status` of the Go driver's success-or-failure counters.
pub fn outcome(ok: bool) -> &'static str {
    if ok {
        "success"
    } else {
        "failure"
    }
}

pub struct Metrics {
    registry: Registry,
    pub attach_total: IntCounterVec,
    pub detach_total: IntCounterVec,
    pub conflicts_total: IntCounter,
    pub grace_period_used_total: IntCounter,
    pub stale_cleared_total: IntCounter,
    pub over_attached_total: IntCounter,
    pub attachment_operation_duration: HistogramVec,
    pub migrations_total: IntCounterVec,
    pub migration_duration: Histogram,
    pub active_migrations: IntGauge,
    pub volume_operations_total: IntCounterVec,
    pub volume_operation_duration: HistogramVec,
    pub nvme_connections_active: IntGauge,
    pub volume_actors: IntGaugeVec,
    pub parked_volumes: IntGauge,
    pub poisoned_volumes: IntGauge,
    pub grpc_started: IntCounterVec,
    pub grpc_handled: IntCounterVec,
    pub grpc_in_flight: IntGaugeVec,
    pub seeding_seen: IntCounter,
    pub seeding_skipped: IntCounterVec,
    pub seeding_retries: IntCounterVec,
    pub seeding_seconds_to_ready: prometheus::Gauge,
    pub annotation_write_failures: IntCounterVec,
    pub event_write_failures: IntCounterVec,
    pub leader_active: IntGauge,
    pub leader_transitions: IntCounterVec,
    pub reconciler_runs: IntCounterVec,
    pub orphan_volumes: IntGauge,
    pub orphan_deleted: IntCounter,
    pub events_posted_total: IntCounterVec,
    pub attachment_reconcile_total: IntCounterVec,
    /// CreateVolumes carrying a StorageClass parameter the Go driver ignores, by parameter.
    pub storageclass_parameters_ignored: IntCounterVec,
    /// `{result}`: [`FREEZE_THAWED`], [`FREEZE_EXPIRED`] or [`FREEZE_FAILED`]; ours.
    pub snapshot_freezes: IntCounterVec,
    pub rds: RdsMetrics,
    pub node: NodeMetrics,
    /// The series every publish and unpublish touches, resolved once (see [`AttachSeries`]).
    pub attach_series: AttachSeries,
}

/// The series of one of the two attachment RPCs that its success path touches, each made by its
/// first use (exactly when a label lookup would have made it, so the exposition is the same) and
/// then kept: a label lookup hashes the labels and takes the family's lock, and the attach path
/// made about six of them per RPC.
pub struct OperationSeries {
    /// `volume_operations_total{operation, status="success"}`.
    pub succeeded: OnceLock<IntCounter>,
    /// `volume_operation_duration_seconds{operation}`.
    pub duration: OnceLock<Histogram>,
    /// `attachment_operation_duration_seconds{operation}` under the Go driver's name.
    pub attachment_duration: OnceLock<Histogram>,
}

impl OperationSeries {
    const fn new() -> Self {
        Self {
            succeeded: OnceLock::new(),
            duration: OnceLock::new(),
            attachment_duration: OnceLock::new(),
        }
    }
}

/// The attach path's series. The ones made at start (`attach_total` and `detach_total`
/// `{status="success"}`, `volume_actors{state}` for attached, migrating and grace) are held
/// directly; the others are made on first use, as in [`OperationSeries`].
pub struct AttachSeries {
    pub publish: OperationSeries,
    pub unpublish: OperationSeries,
    pub attached: IntCounter,
    pub detached: IntCounter,
    actors_attached: IntGauge,
    actors_migrating: IntGauge,
    actors_grace: IntGauge,
    actors_idle: OnceLock<IntGauge>,
}

impl Metrics {
    /// The `volume_actors{state}` series of `state`: held for the states the attach path moves
    /// between, a label lookup for any other.
    pub fn volume_actors_in(&self, state: &str) -> Cow<'_, IntGauge> {
        let held = &self.attach_series;
        match state {
            "attached" => Cow::Borrowed(&held.actors_attached),
            "migrating" => Cow::Borrowed(&held.actors_migrating),
            "grace" => Cow::Borrowed(&held.actors_grace),
            "idle" => Cow::Borrowed(
                held.actors_idle
                    .get_or_init(|| self.volume_actors.with_label_values(&["idle"])),
            ),
            other => Cow::Owned(self.volume_actors.with_label_values(&[other])),
        }
    }
}

/// `rds_csi_snapshot_freezes_total` results: frozen for a copy and thawed once it ended (it
/// succeeded or failed), thawed because the freeze window passed first, or not frozen at all.
pub const FREEZE_THAWED: &str = "thawed";
pub const FREEZE_EXPIRED: &str = "expired";
pub const FREEZE_FAILED: &str = "failed";

fn opts(subsystem: &str, name: &str, help: &str) -> Opts {
    Opts::new(name, help)
        .namespace(NAMESPACE)
        .subsystem(subsystem)
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let attach_total = IntCounterVec::new(
            opts(
                "attachment",
                "attach_total",
                "ControllerPublishVolume outcomes.",
            ),
            &["status"],
        )
        .expect("valid metric");
        let detach_total = IntCounterVec::new(
            opts(
                "attachment",
                "detach_total",
                "Detaches of a volume from a node.",
            ),
            &["status"],
        )
        .expect("valid metric");
        let conflicts_total = IntCounter::with_opts(opts(
            "attachment",
            "conflicts_total",
            "Publishes refused because another node holds the volume.",
        ))
        .expect("valid metric");
        let grace_period_used_total = IntCounter::with_opts(opts(
            "attachment",
            "grace_period_used_total",
            "Handoffs to another node inside the detach grace period or after its VolumeAttachment was released.",
        ))
        .expect("valid metric");
        let stale_cleared_total = IntCounter::with_opts(opts(
            "attachment",
            "stale_cleared_total",
            "Attachments dropped because their node was deleted.",
        ))
        .expect("valid metric");
        let over_attached_total = IntCounter::with_opts(opts(
            "attachment",
            "over_attached_total",
            "Volumes found on more nodes than their access class allows.",
        ))
        .expect("valid metric");
        let attachment_operation_duration = HistogramVec::new(
            HistogramOpts::from(opts(
                "attachment",
                "operation_duration_seconds",
                "Time to answer ControllerPublishVolume and ControllerUnpublishVolume.",
            ))
            .buckets(ATTACHMENT_BUCKETS.to_vec()),
            &["operation"],
        )
        .expect("valid metric");
        let migrations_total = IntCounterVec::new(
            opts(
                "migration",
                "migrations_total",
                "KubeVirt live migrations by result, each counted once.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let migration_duration = Histogram::with_opts(
            HistogramOpts::from(opts(
                "migration",
                "duration_seconds",
                "Duration of successful live migrations, from the target attach to the source detach.",
            ))
            .buckets(vec![15.0, 30.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0]),
        )
        .expect("valid metric");
        let active_migrations = IntGauge::with_opts(opts(
            "migration",
            "active_migrations",
            "Volumes attached to two nodes for a live migration right now.",
        ))
        .expect("valid metric");
        let volume_operations_total = IntCounterVec::new(
            opts(
                "volume",
                "operations_total",
                "Volume operations by kind and outcome.",
            ),
            &["operation", "status"],
        )
        .expect("valid metric");
        let volume_operation_duration = HistogramVec::new(
            HistogramOpts::from(opts(
                "volume",
                "operation_duration_seconds",
                "Duration of volume operations.",
            ))
            .buckets(VOLUME_OPERATION_BUCKETS.to_vec()),
            &["operation"],
        )
        .expect("valid metric");
        let nvme_connections_active = IntGauge::with_opts(opts(
            "nvme",
            "connections_active",
            "Volumes currently attached to at least one node.",
        ))
        .expect("valid metric");
        let volume_actors = IntGaugeVec::new(
            opts(
                "attachment",
                "volume_actors",
                "Live volume actors by attachment state.",
            ),
            &["state"],
        )
        .expect("valid metric");
        let parked_volumes = IntGauge::with_opts(opts(
            "attachment",
            "parked_volumes",
            "Volumes seeded at boot with one settled attachment and no actor yet; each gets its actor on its first message.",
        ))
        .expect("valid metric");
        let poisoned_volumes = IntGauge::with_opts(opts(
            "attachment",
            "poisoned_volumes",
            "Volumes whose actor stopped without retiring (a panic); each answers UNAVAILABLE until the controller restarts and re-seeds from VolumeAttachments.",
        ))
        .expect("valid metric");
        let grpc_started = IntCounterVec::new(
            opts(
                "grpc",
                "server_started_total",
                "gRPC requests started, by service and method.",
            ),
            &["grpc_service", "grpc_method"],
        )
        .expect("valid metric");
        let grpc_handled = IntCounterVec::new(
            opts(
                "grpc",
                "server_handled_total",
                "gRPC requests completed, by service, method and status code.",
            ),
            &["grpc_service", "grpc_method", "grpc_code"],
        )
        .expect("valid metric");
        let grpc_in_flight = IntGaugeVec::new(
            opts(
                "grpc",
                "server_in_flight_requests",
                "gRPC requests being handled now, by service and method.",
            ),
            &["grpc_service", "grpc_method"],
        )
        .expect("valid metric");
        let seeding_seen = IntCounter::with_opts(opts(
            "seeding",
            "volumeattachments_seen_total",
            "VolumeAttachments of this driver read while rebuilding attachment state at boot.",
        ))
        .expect("valid metric");
        let seeding_skipped = IntCounterVec::new(
            opts(
                "seeding",
                "volumeattachments_skipped_total",
                "VolumeAttachments ignored at boot, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let seeding_retries = IntCounterVec::new(
            opts(
                "seeding",
                "retries_total",
                "Reads seeding retried before deciding anything, by step (the VolumeAttachment list, a live PV lookup, the API server's clock).",
            ),
            &["step"],
        )
        .expect("valid metric");
        for step in ["volumeattachment_list", "pv_lookup", "server_time"] {
            seeding_retries.with_label_values(&[step]);
        }
        let seeding_seconds_to_ready = prometheus::Gauge::with_opts(opts(
            "seeding",
            "seconds_to_ready",
            "Seconds from process start until attachment state was rebuilt and the driver became ready.",
        ))
        .expect("valid metric");
        let annotation_write_failures = IntCounterVec::new(
            opts(
                "kube",
                "annotation_write_failures_total",
                "Failed PV annotation writes, by reason; each is retried, except reason pv_deleted (the PV is gone: its writes end).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let event_write_failures = IntCounterVec::new(
            opts(
                "kube",
                "event_write_failures_total",
                "Failed Kubernetes event posts (each is retried), by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let leader_active = IntGauge::with_opts(opts(
            "leader",
            "active",
            "1 while this controller serves ControllerPublish/Unpublish (it follows the csi-attacher's leader Lease and was seeded, or runs without leader election and was seeded), else 0.",
        ))
        .expect("valid metric");
        let leader_transitions = IntCounterVec::new(
            opts(
                "leader",
                "transitions_total",
                "Times this controller became active (after re-seeding) or standby, the first decision at start included.",
            ),
            &["to"],
        )
        .expect("valid metric");
        let reconciler_runs = IntCounterVec::new(
            opts(
                "reconciler",
                "runs_total",
                "Reconciler passes of the active controller, by reconciler and result.",
            ),
            &["reconciler", "result"],
        )
        .expect("valid metric");
        let orphan_volumes = IntGauge::with_opts(Opts::new(
            "rds_csi_orphan_volumes",
            "Backend volumes no PersistentVolume of this driver has named for longer than --orphan-grace (reported; deleted only with --orphan-delete).",
        ))
        .expect("valid metric");
        let orphan_deleted = IntCounter::with_opts(Opts::new(
            "rds_csi_orphan_volumes_deleted_total",
            "Orphan volumes deleted by the orphan reconciler (--orphan-delete).",
        ))
        .expect("valid metric");
        let events_posted_total = IntCounterVec::new(
            opts(
                "events",
                "posted_total",
                "Kubernetes events this driver created, by reason (a failed post counts once it succeeds).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let attachment_reconcile_total = IntCounterVec::new(
            opts(
                "attachment",
                "reconcile_total",
                "Stale-attachment reconciler actions: clear_stale (an attachment to a deleted Node dropped), node_watcher_trigger (a Node deletion seen by the watch and checked).",
            ),
            &["action"],
        )
        .expect("valid metric");
        let storageclass_parameters_ignored = IntCounterVec::new(
            opts(
                "storageclass",
                "parameters_ignored_total",
                "CreateVolume calls carrying a StorageClass parameter the Go driver ignores (and so does this one), by parameter.",
            ),
            &["parameter"],
        )
        .expect("valid metric");
        let snapshot_freezes = IntCounterVec::new(
            opts(
                "snapshot",
                "freezes_total",
                "Staged filesystems frozen for a snapshot or clone copy without reflinks (--mode all, file backend), by result: thawed after the copy, thawed when the freeze window expired, or could not be frozen.",
            ),
            &["result"],
        )
        .expect("valid metric");
        for result in [FREEZE_THAWED, FREEZE_EXPIRED, FREEZE_FAILED] {
            snapshot_freezes.with_label_values(&[result]);
        }
        for c in [
            Box::new(storageclass_parameters_ignored.clone())
                as Box<dyn prometheus::core::Collector>,
            Box::new(snapshot_freezes.clone()),
            Box::new(attach_total.clone()),
            Box::new(detach_total.clone()),
            Box::new(conflicts_total.clone()),
            Box::new(grace_period_used_total.clone()),
            Box::new(stale_cleared_total.clone()),
            Box::new(over_attached_total.clone()),
            Box::new(attachment_operation_duration.clone()),
            Box::new(migrations_total.clone()),
            Box::new(migration_duration.clone()),
            Box::new(active_migrations.clone()),
            Box::new(volume_operations_total.clone()),
            Box::new(volume_operation_duration.clone()),
            Box::new(nvme_connections_active.clone()),
            Box::new(volume_actors.clone()),
            Box::new(parked_volumes.clone()),
            Box::new(poisoned_volumes.clone()),
            Box::new(grpc_started.clone()),
            Box::new(grpc_handled.clone()),
            Box::new(grpc_in_flight.clone()),
            Box::new(seeding_seen.clone()),
            Box::new(seeding_skipped.clone()),
            Box::new(seeding_retries.clone()),
            Box::new(seeding_seconds_to_ready.clone()),
            Box::new(annotation_write_failures.clone()),
            Box::new(event_write_failures.clone()),
            Box::new(leader_active.clone()),
            Box::new(leader_transitions.clone()),
            Box::new(reconciler_runs.clone()),
            Box::new(orphan_volumes.clone()),
            Box::new(orphan_deleted.clone()),
            Box::new(events_posted_total.clone()),
            Box::new(attachment_reconcile_total.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        // Pre-create the label values dashboards expect, so series exist at zero.
        for status in ["success", "failed"] {
            attach_total.with_label_values(&[status]);
            detach_total.with_label_values(&[status]);
        }
        for result in ["success", "failed", "timeout", "unknown"] {
            migrations_total.with_label_values(&[result]);
        }
        for state in ["attached", "migrating", "grace"] {
            volume_actors.with_label_values(&[state]);
        }
        for to in ["active", "standby"] {
            leader_transitions.with_label_values(&[to]);
        }
        for reconciler in ["stale_attachments", "orphan_volumes"] {
            for result in ["success", "error"] {
                reconciler_runs.with_label_values(&[reconciler, result]);
            }
        }
        for action in [RECONCILE_CLEAR_STALE, RECONCILE_NODE_WATCHER] {
            attachment_reconcile_total.with_label_values(&[action]);
        }
        let rds = RdsMetrics::new(&registry);
        let node = NodeMetrics::new(&registry);
        let attach_series = AttachSeries {
            publish: OperationSeries::new(),
            unpublish: OperationSeries::new(),
            attached: attach_total.with_label_values(&["success"]),
            detached: detach_total.with_label_values(&["success"]),
            actors_attached: volume_actors.with_label_values(&["attached"]),
            actors_migrating: volume_actors.with_label_values(&["migrating"]),
            actors_grace: volume_actors.with_label_values(&["grace"]),
            actors_idle: OnceLock::new(),
        };
        Self {
            attach_series,
            registry,
            rds,
            node,
            events_posted_total,
            attachment_reconcile_total,
            attach_total,
            detach_total,
            conflicts_total,
            grace_period_used_total,
            stale_cleared_total,
            over_attached_total,
            attachment_operation_duration,
            migrations_total,
            migration_duration,
            active_migrations,
            volume_operations_total,
            volume_operation_duration,
            nvme_connections_active,
            volume_actors,
            parked_volumes,
            poisoned_volumes,
            grpc_started,
            grpc_handled,
            grpc_in_flight,
            seeding_seen,
            seeding_skipped,
            seeding_retries,
            seeding_seconds_to_ready,
            annotation_write_failures,
            event_write_failures,
            leader_active,
            leader_transitions,
            reconciler_runs,
            orphan_volumes,
            orphan_deleted,
            storageclass_parameters_ignored,
            snapshot_freezes,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails on valid metrics");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

/// `rds_csi_attachment_reconcile_total{action}` values (the Go driver's).
pub const RECONCILE_CLEAR_STALE: &str = "clear_stale";
pub const RECONCILE_NODE_WATCHER: &str = "node_watcher_trigger";

/// The SSH link to the RDS (`rds_csi_rds_*`), registered with the rest. The connection-state
/// and reconnect names are the Go driver's.
pub struct RdsMetrics {
    pub connection_state: IntGaugeVec,
    pub reconnect_total: IntCounterVec,
    pub reconnect_duration: Histogram,
    pub commands_total: IntCounterVec,
    pub command_duration: HistogramVec,
}

impl RdsMetrics {
    fn new(registry: &Registry) -> Self {
        let connection_state = IntGaugeVec::new(
            opts(
                "rds",
                "connection_state",
                "RDS SSH connection state (1=connected, 0=disconnected); host_key says whether the RDS's host key is verified.",
            ),
            &["address", "host_key"],
        )
        .expect("valid metric");
        let reconnect_total = IntCounterVec::new(
            opts(
                "rds",
                "reconnect_total",
                "RDS SSH connection attempts by status.",
            ),
            &["status"],
        )
        .expect("valid metric");
        // The Go driver's family: no labels, its buckets, one sample per outage.
        let reconnect_duration = Histogram::with_opts(
            HistogramOpts::from(opts(
                "rds",
                "reconnect_duration_seconds",
                "Time from losing the RDS's SSH link to being connected again.",
            ))
            .buckets(vec![0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]),
        )
        .expect("valid metric");
        let commands_total = IntCounterVec::new(
            opts(
                "rds",
                "commands_total",
                "RouterOS commands sent to the RDS, by command and result.",
            ),
            &["command", "result"],
        )
        .expect("valid metric");
        let command_duration = HistogramVec::new(
            HistogramOpts::from(opts(
                "rds",
                "command_duration_seconds",
                "Time from sending a RouterOS command to its answer.",
            ))
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["command"],
        )
        .expect("valid metric");
        for c in [
            Box::new(connection_state.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconnect_total.clone()),
            Box::new(reconnect_duration.clone()),
            Box::new(commands_total.clone()),
            Box::new(command_duration.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Self {
            connection_state,
            reconnect_total,
            reconnect_duration,
            commands_total,
            command_duration,
        }
    }
}

/// The node plugin's families, the Go driver's names and labels: NVMe/TCP connects, mounts,
/// stale mounts and orphaned NVMe connections. The node records them where it does the work.
pub struct NodeMetrics {
    /// `{status}`: success or failure of each `nvme connect` this node ran.
    pub nvme_connects_total: IntCounterVec,
    /// From running `nvme connect` to the namespace's block device appearing; successes only.
    pub nvme_connect_duration: Histogram,
    /// `{operation,status}`: operation `mount` (a staging mount or a publish bind mount) or
    /// `unmount`.
    pub mount_operations_total: IntCounterVec,
    pub stale_mounts_detected_total: IntCounter,
    /// `{status}`.
    pub stale_recoveries_total: IntCounterVec,
    pub orphans_cleaned_total: IntCounter,
    /// `{result}`: [`ADOPTED`] or [`REFUSED`]; ours, the Go driver has no such family.
    pub adoptions_total: IntCounterVec,
}

impl NodeMetrics {
    fn new(registry: &Registry) -> Self {
        let nvme_connects_total = IntCounterVec::new(
            opts(
                "nvme",
                "connects_total",
                "nvme connect runs of the node plugin, by status (failure: the tool failed or no namespace appeared).",
            ),
            &["status"],
        )
        .expect("valid metric");
        let nvme_connect_duration = Histogram::with_opts(
            HistogramOpts::from(opts(
                "nvme",
                "connect_duration_seconds",
                "Time from running nvme connect to the namespace's block device appearing, for successful connects.",
            ))
            .buckets(VOLUME_OPERATION_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let mount_operations_total = IntCounterVec::new(
            opts(
                "mount",
                "operations_total",
                "Mounts (staging mounts and publish bind mounts) and unmounts the node plugin made, by status.",
            ),
            &["operation", "status"],
        )
        .expect("valid metric");
        let stale_mounts_detected_total = IntCounter::with_opts(opts(
            "stale",
            "mounts_detected_total",
            "Mounts of a volume found whose device is gone or is no longer the volume's.",
        ))
        .expect("valid metric");
        let stale_recoveries_total = IntCounterVec::new(
            opts(
                "stale",
                "recoveries_total",
                "Recoveries of a staged volume whose device was gone or renumbered, by status: by NodeStageVolume, or by the node reconciler (RDS backend), which also remounts it.",
            ),
            &["status"],
        )
        .expect("valid metric");
        let orphans_cleaned_total = IntCounter::with_opts(opts(
            "orphans",
            "cleaned_total",
            "NVMe/TCP subsystems of this driver disconnected as orphans: connected without a namespace device (found by a stage), or staged by no record and used by nothing (found by the node reconciler).",
        ))
        .expect("valid metric");
        let adoptions_total = IntCounterVec::new(
            opts(
                "node",
                "adoptions_total",
                "Volumes found staged with no record of this plugin (by the Go node plugin): adopted, or refused because another device is mounted at the staging path.",
            ),
            &["result"],
        )
        .expect("valid metric");
        for c in [
            Box::new(nvme_connects_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(nvme_connect_duration.clone()),
            Box::new(mount_operations_total.clone()),
            Box::new(stale_mounts_detected_total.clone()),
            Box::new(stale_recoveries_total.clone()),
            Box::new(orphans_cleaned_total.clone()),
            Box::new(adoptions_total.clone()),
            // The blocking pool's gauge is the process's, as the pool is (`node::work`).
            Box::new(crate::node::work::STUCK.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        for result in [ADOPTED, REFUSED] {
            adoptions_total.with_label_values(&[result]);
        }
        for ok in [true, false] {
            nvme_connects_total.with_label_values(&[outcome(ok)]);
            stale_recoveries_total.with_label_values(&[outcome(ok)]);
            for op in [MOUNT, UNMOUNT] {
                mount_operations_total.with_label_values(&[op, outcome(ok)]);
            }
        }
        Self {
            nvme_connects_total,
            nvme_connect_duration,
            mount_operations_total,
            stale_mounts_detected_total,
            stale_recoveries_total,
            orphans_cleaned_total,
            adoptions_total,
        }
    }

    /// Counts one mount or unmount (`MOUNT` / `UNMOUNT`).
    pub fn mount_op(&self, operation: &'static str, ok: bool) {
        self.mount_operations_total
            .with_label_values(&[operation, outcome(ok)])
            .inc();
    }
}

/// `rds_csi_mount_operations_total{operation}` values (the Go driver's).
pub const MOUNT: &str = "mount";
pub const UNMOUNT: &str = "unmount";

/// `rds_csi_node_adoptions_total{result}` values.
pub const ADOPTED: &str = "adopted";
pub const REFUSED: &str = "refused";

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The storage side of the RDS, with the Go driver's families: `rds_disk_*` (one disk's
/// traffic, const label `slot`) and `rds_hardware_*` (health over SNMP), all gauges. Registered
/// only by [`Metrics::storage`], which the RDS backend's controller calls when it starts its
/// poller, so a driver that cannot fill them does not serve them. The poller writes them in the
/// background; a scrape only reads them.
pub struct StorageMetrics {
    pub disk: DiskGauges,
    /// `None` when SNMP is off (no `--snmp-address`).
    pub hardware: Option<HardwareGauges>,
    /// `rds_csi_storage_poll_failures_total{source}`.
    pub poll_failures: IntCounterVec,
    /// `rds_csi_storage_poll_age_seconds{source}`.
    pub poll_age: PollAge,
}

/// `rds_disk_*`: one sample of `/disk monitor-traffic <slot> once`, plus the pool's size and
/// use from the same SSH poll.
pub struct DiskGauges {
    pub read_ops_per_second: Gauge,
    pub write_ops_per_second: Gauge,
    pub read_bytes_per_second: Gauge,
    pub write_bytes_per_second: Gauge,
    pub read_latency_milliseconds: Gauge,
    pub write_latency_milliseconds: Gauge,
    pub wait_latency_milliseconds: Gauge,
    pub in_flight_operations: Gauge,
    pub active_time_milliseconds: Gauge,
    /// `rds_hardware_disk_pool_size_bytes`: read over SSH (the pool partition's `size`).
    pub pool_size_bytes: Gauge,
    /// `rds_hardware_disk_pool_used_bytes`: `size - free` of the pool partition.
    pub pool_used_bytes: Gauge,
}

/// The eight `rds_hardware_*` gauges read over SNMP.
pub struct HardwareGauges {
    pub cpu_temperature_celsius: Gauge,
    pub board_temperature_celsius: Gauge,
    pub fan1_speed_rpm: Gauge,
    pub fan2_speed_rpm: Gauge,
    pub psu1_power_watts: Gauge,
    pub psu2_power_watts: Gauge,
    pub psu1_temperature_celsius: Gauge,
    pub psu2_temperature_celsius: Gauge,
}

/// The two storage poll sources, as the `source` label names them.
pub const STORAGE_SOURCES: [&str; 2] = ["disk", "hardware"];

/// Seconds since each source's last successful poll, computed when scraped (so it grows
/// between polls, and while a poll hangs), from tokio's clock (so tests can pause it). Until a
/// source first succeeds it counts from when its poller started.
#[derive(Clone)]
pub struct PollAge {
    gauge: GaugeVec,
    since: Arc<Mutex<BTreeMap<&'static str, tokio::time::Instant>>>,
}

impl PollAge {
    /// Starts counting for `source` (no-op when it already counts).
    pub fn start(&self, source: &'static str) {
        self.lock()
            .entry(source)
            .or_insert_with(tokio::time::Instant::now);
    }

    /// `source` just polled successfully: its age restarts from zero.
    pub fn succeeded(&self, source: &'static str) {
        self.lock().insert(source, tokio::time::Instant::now());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, tokio::time::Instant>> {
        self.since.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl prometheus::core::Collector for PollAge {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let now = tokio::time::Instant::now();
        for (source, since) in self.lock().iter() {
            self.gauge
                .with_label_values(&[source])
                .set(now.saturating_duration_since(*since).as_secs_f64());
        }
        self.gauge.collect()
    }
}

impl Metrics {
    /// Registers the storage families for the disk `slot` (`rds_hardware_*` from SNMP only
    /// when `snmp`). Call once: a second call is an error.
    pub fn storage(&self, slot: &str, snmp: bool) -> prometheus::Result<StorageMetrics> {
        let disk_gauge = |name: &str, help: &str| {
            Gauge::with_opts(
                Opts::new(name, help)
                    .namespace("rds")
                    .subsystem("disk")
                    .const_label("slot", slot),
            )
        };
        let hw_gauge = |name: &str, help: &str| {
            Gauge::with_opts(Opts::new(name, help).namespace("rds").subsystem("hardware"))
        };
        let traffic = "in the last sample of /disk monitor-traffic (SSH)";
        let disk = DiskGauges {
            read_ops_per_second: disk_gauge("read_ops_per_second", &format!("Read operations per second {traffic}."))?,
            write_ops_per_second: disk_gauge("write_ops_per_second", &format!("Write operations per second {traffic}."))?,
            read_bytes_per_second: disk_gauge("read_bytes_per_second", &format!("Bytes read per second {traffic} (RouterOS prints bits per second)."))?,
            write_bytes_per_second: disk_gauge("write_bytes_per_second", &format!("Bytes written per second {traffic} (RouterOS prints bits per second)."))?,
            read_latency_milliseconds: disk_gauge("read_latency_milliseconds", &format!("Read time in milliseconds {traffic}."))?,
            write_latency_milliseconds: disk_gauge("write_latency_milliseconds", &format!("Write time in milliseconds {traffic}."))?,
            wait_latency_milliseconds: disk_gauge("wait_latency_milliseconds", &format!("Time requests waited in the queue, in milliseconds, {traffic}."))?,
            in_flight_operations: disk_gauge("in_flight_operations", &format!("Operations in flight (queue depth) {traffic}."))?,
            active_time_milliseconds: disk_gauge("active_time_milliseconds", &format!("Time the disk was busy, in milliseconds, {traffic}."))?,
            pool_size_bytes: hw_gauge("disk_pool_size_bytes", "Size in bytes of the storage pool holding the volumes (its partition's size in /disk print, SSH).")?,
            pool_used_bytes: hw_gauge("disk_pool_used_bytes", "Bytes used on the storage pool holding the volumes (its partition's size minus free in /disk print, SSH).")?,
        };
        let hardware = if snmp {
            Some(HardwareGauges {
                cpu_temperature_celsius: hw_gauge("cpu_temperature_celsius", "Temperature in degrees Celsius, MIKROTIK-MIB mtxrHlTemperature (SNMP).")?,
                board_temperature_celsius: hw_gauge("board_temperature_celsius", "Temperature in degrees Celsius, MIKROTIK-MIB mtxrHlProcessorTemperature (SNMP).")?,
                fan1_speed_rpm: hw_gauge("fan1_speed_rpm", "Fan 1 speed in revolutions per minute, MIKROTIK-MIB mtxrHlFanSpeed1 (SNMP).")?,
                fan2_speed_rpm: hw_gauge("fan2_speed_rpm", "Fan 2 speed in revolutions per minute, MIKROTIK-MIB mtxrHlFanSpeed2 (SNMP).")?,
                psu1_power_watts: hw_gauge("psu1_power_watts", "Estimated power in watts: MIKROTIK-MIB mtxrHlVoltage in volts times 10 A, as the Go driver estimates it (SNMP).")?,
                psu2_power_watts: hw_gauge("psu2_power_watts", "Estimated power in watts from MIKROTIK-MIB mtxrHlActiveFan, times 10 when it reads as a number, as the Go driver estimates it (SNMP).")?,
                psu1_temperature_celsius: hw_gauge("psu1_temperature_celsius", "The Go driver's PSU 1 reading: MIKROTIK-MIB mtxrHlPower, scaled by its 0.1 unit (SNMP).")?,
                psu2_temperature_celsius: hw_gauge("psu2_temperature_celsius", "The Go driver's PSU 2 reading: MIKROTIK-MIB mtxrHlCurrent, as the agent gives it (SNMP).")?,
            })
        } else {
            None
        };
        let poll_failures = IntCounterVec::new(
            opts(
                "storage",
                "poll_failures_total",
                "Background polls of the RDS's storage metrics that failed or timed out, by source (disk: SSH, hardware: SNMP).",
            ),
            &["source"],
        )?;
        let poll_age = PollAge {
            gauge: GaugeVec::new(
                opts(
                    "storage",
                    "poll_age_seconds",
                    "Seconds since the last successful poll of this source (since the poller started, until one succeeds); the rds_disk_* and rds_hardware_* values are that old.",
                ),
                &["source"],
            )?,
            since: Arc::default(),
        };
        let d = &disk;
        let mut collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(d.read_ops_per_second.clone()),
            Box::new(d.write_ops_per_second.clone()),
            Box::new(d.read_bytes_per_second.clone()),
            Box::new(d.write_bytes_per_second.clone()),
            Box::new(d.read_latency_milliseconds.clone()),
            Box::new(d.write_latency_milliseconds.clone()),
            Box::new(d.wait_latency_milliseconds.clone()),
            Box::new(d.in_flight_operations.clone()),
            Box::new(d.active_time_milliseconds.clone()),
            Box::new(d.pool_size_bytes.clone()),
            Box::new(d.pool_used_bytes.clone()),
            Box::new(poll_failures.clone()),
            Box::new(poll_age.clone()),
        ];
        if let Some(h) = &hardware {
            collectors.extend([
                Box::new(h.cpu_temperature_celsius.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(h.board_temperature_celsius.clone()),
                Box::new(h.fan1_speed_rpm.clone()),
                Box::new(h.fan2_speed_rpm.clone()),
                Box::new(h.psu1_power_watts.clone()),
                Box::new(h.psu2_power_watts.clone()),
                Box::new(h.psu1_temperature_celsius.clone()),
                Box::new(h.psu2_temperature_celsius.clone()),
            ]);
        }
        for c in collectors {
            self.registry.register(c)?;
        }
        let sources: &[&str] = if snmp {
            &STORAGE_SOURCES
        } else {
            &STORAGE_SOURCES[..1]
        };
        for source in sources {
            poll_failures.with_label_values(&[source]);
        }
        Ok(StorageMetrics {
            disk,
            hardware,
            poll_failures,
            poll_age,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::proto::MetricType;

    /// The Go driver's families (pkg/observability/prometheus.go) that this process serves:
    /// name, type, label names. `rds_csi_rds_reconnect_duration_seconds` and the storage side
    /// (`rds_disk_*`, `rds_hardware_*`) belong to the RDS backend's poller and pool.
    const GO_FAMILIES: &[(&str, MetricType, &[&str])] = &[
        (
            "rds_csi_volume_operations_total",
            MetricType::COUNTER,
            &["operation", "status"],
        ),
        (
            "rds_csi_volume_operation_duration_seconds",
            MetricType::HISTOGRAM,
            &["operation"],
        ),
        (
            "rds_csi_nvme_connects_total",
            MetricType::COUNTER,
            &["status"],
        ),
        (
            "rds_csi_nvme_connect_duration_seconds",
            MetricType::HISTOGRAM,
            &[],
        ),
        ("rds_csi_nvme_connections_active", MetricType::GAUGE, &[]),
        (
            "rds_csi_mount_operations_total",
            MetricType::COUNTER,
            &["operation", "status"],
        ),
        (
            "rds_csi_stale_mounts_detected_total",
            MetricType::COUNTER,
            &[],
        ),
        (
            "rds_csi_stale_recoveries_total",
            MetricType::COUNTER,
            &["status"],
        ),
        ("rds_csi_orphans_cleaned_total", MetricType::COUNTER, &[]),
        (
            "rds_csi_events_posted_total",
            MetricType::COUNTER,
            &["reason"],
        ),
        (
            "rds_csi_attachment_attach_total",
            MetricType::COUNTER,
            &["status"],
        ),
        (
            "rds_csi_attachment_detach_total",
            MetricType::COUNTER,
            &["status"],
        ),
        (
            "rds_csi_attachment_conflicts_total",
            MetricType::COUNTER,
            &[],
        ),
        (
            "rds_csi_attachment_reconcile_total",
            MetricType::COUNTER,
            &["action"],
        ),
        (
            "rds_csi_attachment_operation_duration_seconds",
            MetricType::HISTOGRAM,
            &["operation"],
        ),
        (
            "rds_csi_attachment_grace_period_used_total",
            MetricType::COUNTER,
            &[],
        ),
        (
            "rds_csi_attachment_stale_cleared_total",
            MetricType::COUNTER,
            &[],
        ),
        (
            "rds_csi_migration_migrations_total",
            MetricType::COUNTER,
            &["result"],
        ),
        (
            "rds_csi_migration_duration_seconds",
            MetricType::HISTOGRAM,
            &[],
        ),
        (
            "rds_csi_migration_active_migrations",
            MetricType::GAUGE,
            &[],
        ),
        // Ours adds `host_key`; a query by `address` finds the same series.
        (
            "rds_csi_rds_connection_state",
            MetricType::GAUGE,
            &["address", "host_key"],
        ),
        (
            "rds_csi_rds_reconnect_total",
            MetricType::COUNTER,
            &["status"],
        ),
    ];

    /// Metrics with one sample in each labelled family, so every family is gathered.
    fn touched() -> Metrics {
        let m = Metrics::new();
        m.volume_operations_total
            .with_label_values(&["stage", "success"]);
        m.volume_operation_duration.with_label_values(&["stage"]);
        m.events_posted_total.with_label_values(&["VolumeAttached"]);
        m.attachment_operation_duration
            .with_label_values(&["attach"]);
        m.rds
            .connection_state
            .with_label_values(&["10.42.68.1:22", "verified"]);
        m.rds.reconnect_total.with_label_values(&["success"]);
        m
    }

    /// Every Go family is served with the Go driver's name, type and label names; removing a
    /// family's registration, or renaming a label, fails here.
    #[test]
    fn every_go_family_has_the_go_drivers_name_type_and_labels() {
        let gathered = touched().registry().gather();
        for (name, kind, labels) in GO_FAMILIES {
            let family = gathered
                .iter()
                .find(|f| f.name() == *name)
                .unwrap_or_else(|| panic!("{name} is not served"));
            assert_eq!(family.get_field_type(), *kind, "{name}");
            let metric = &family.get_metric()[0];
            let mut have: Vec<&str> = metric.get_label().iter().map(|l| l.name()).collect();
            have.sort();
            let mut want = labels.to_vec();
            want.sort();
            assert_eq!(have, want, "{name}");
        }
    }

    /// Every bucket bound a Go dashboard can name (`le="2.5"`) exists here too.
    #[test]
    fn histograms_keep_every_go_bucket_bound() {
        let go: &[(&str, &[f64])] = &[
            (
                "rds_csi_volume_operation_duration_seconds",
                &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            ),
            (
                "rds_csi_nvme_connect_duration_seconds",
                &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            ),
            (
                "rds_csi_attachment_operation_duration_seconds",
                &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
            ),
            (
                "rds_csi_migration_duration_seconds",
                &[15.0, 30.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0],
            ),
        ];
        let gathered = touched().registry().gather();
        for (name, bounds) in go {
            let family = gathered.iter().find(|f| f.name() == *name).unwrap();
            let ours: Vec<f64> = family.get_metric()[0]
                .get_histogram()
                .get_bucket()
                .iter()
                .map(|b| b.upper_bound())
                .collect();
            for b in *bounds {
                assert!(ours.contains(b), "{name} lacks le={b}: {ours:?}");
            }
        }
    }

    /// The success-or-failure families start at zero for both outcomes, under the Go
    /// driver's label values, so a dashboard's rate() sees the first failure.
    #[test]
    fn outcome_series_exist_at_zero_with_the_go_label_values() {
        let text = Metrics::new().render();
        for series in [
            r#"rds_csi_nvme_connects_total{status="failure"} 0"#,
            r#"rds_csi_nvme_connects_total{status="success"} 0"#,
            r#"rds_csi_mount_operations_total{operation="mount",status="failure"} 0"#,
            r#"rds_csi_mount_operations_total{operation="unmount",status="success"} 0"#,
            r#"rds_csi_stale_recoveries_total{status="failure"} 0"#,
            r#"rds_csi_attachment_reconcile_total{action="clear_stale"} 0"#,
            r#"rds_csi_attachment_reconcile_total{action="node_watcher_trigger"} 0"#,
            "rds_csi_stale_mounts_detected_total 0",
            "rds_csi_orphans_cleaned_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == series),
                "{series} missing:\n{text}"
            );
        }
    }

    /// The attach path's held series are the families' own series, and a lazy one appears in
    /// the exposition only once used, as a label lookup would have made it.
    #[test]
    fn the_attach_paths_resolved_series_are_the_families_series() {
        let m = Metrics::new();
        let a = &m.attach_series;
        a.attached.inc();
        a.detached.inc_by(2);
        for state in ["attached", "migrating", "grace", "idle", "stopped-by-test"] {
            m.volume_actors_in(state).add(3);
        }
        let text = m.render();
        assert!(!text.contains(r#"operation="publish""#), "{text}");
        a.publish
            .succeeded
            .get_or_init(|| {
                m.volume_operations_total
                    .with_label_values(&["publish", "success"])
            })
            .inc();
        a.publish
            .succeeded
            .get_or_init(|| unreachable!("resolved once"))
            .inc();
        let text = m.render();
        for series in [
            r#"rds_csi_attachment_attach_total{status="success"} 1"#,
            r#"rds_csi_attachment_detach_total{status="success"} 2"#,
            r#"rds_csi_attachment_volume_actors{state="attached"} 3"#,
            r#"rds_csi_attachment_volume_actors{state="migrating"} 3"#,
            r#"rds_csi_attachment_volume_actors{state="grace"} 3"#,
            r#"rds_csi_attachment_volume_actors{state="idle"} 3"#,
            r#"rds_csi_attachment_volume_actors{state="stopped-by-test"} 3"#,
            r#"rds_csi_volume_operations_total{operation="publish",status="success"} 2"#,
        ] {
            assert!(
                text.lines().any(|l| l == series),
                "{series} missing:
{text}"
            );
        }
    }
}
