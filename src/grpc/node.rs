//! CSI Node service: validates each request into the node layer's types, asks
//! [`crate::node::NodePlugin`], and maps the answer. Owns no state and touches no device.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::capability;
use crate::csi::node_server::Node;
use crate::csi::node_service_capability::{rpc, Rpc, Type as CapType};
use crate::csi::*;
use crate::domain::{AccessType, Capability};
use crate::ids::VolumeId;
use crate::metrics::Metrics;
use crate::node::mounter::MountOptions;
use crate::node::paths::AbsPath;
use crate::node::plugin::{self, VolumePath};
use crate::node::{NodeError, NodePlugin};

pub struct NodeService {
    pub node_id: String,
    /// NodeGetInfo's `max_volumes_per_node`; 0 is unlimited.
    pub max_volumes_per_node: u64,
    pub plugin: Arc<NodePlugin>,
    /// `rds_csi_volume_operations_total{operation="stage"|"unstage"}`, as the Go node counts.
    pub metrics: Arc<Metrics>,
}

/// Counts and times one NodeStage or NodeUnstage by its outcome, under the Go driver's
/// operation names.
fn record<T>(metrics: &Metrics, operation: &str, started: Instant, result: &Result<T, NodeError>) {
    let status = match result {
        Ok(_) => "success",
        Err(e) => e.metric_label(),
    };
    metrics
        .volume_operations_total
        .with_label_values(&[operation, status])
        .inc();
    metrics
        .volume_operation_duration
        .with_label_values(&[operation])
        .observe(started.elapsed().as_secs_f64());
}

fn volume(raw: &str) -> Result<VolumeId, NodeError> {
    Ok(VolumeId::try_from(raw)?)
}

fn path(raw: &str, field: &'static str) -> Result<AbsPath, NodeError> {
    Ok(AbsPath::parse_field(raw, field)?)
}

/// The capability's mount options as mount(8) would take them. A refused option (`exec`, one
/// naming another device, ...) is INVALID_ARGUMENT naming it, before the node does anything;
/// options only mount(8) understands are dropped with one debug line.
fn mount_options(cap: &Capability) -> Result<MountOptions, NodeError> {
    let AccessType::Mount { mount_flags, .. } = cap.access_type() else {
        return Ok(MountOptions::default());
    };
    let options = MountOptions::parse(mount_flags)
        .map_err(|e| NodeError::invalid("volume_capability.mount.mount_flags", e.to_string()))?;
    if !options.dropped.is_empty() {
        tracing::debug!(dropped = ?options.dropped, "mount options mount(8) handles itself are not passed to the kernel");
    }
    Ok(options)
}

impl TryFrom<NodeStageVolumeRequest> for plugin::Stage {
    type Error = NodeError;
    fn try_from(r: NodeStageVolumeRequest) -> Result<Self, NodeError> {
        // The volume id first, then the path, then the capability: the first missing field
        // is the one named, as the CSI spec lists them.
        let volume = volume(&r.volume_id)?;
        let staging = path(&r.staging_target_path, "staging_target_path")?;
        let capability = capability(r.volume_capability.as_ref(), "volume_capability")?;
        Ok(Self {
            volume,
            staging,
            options: mount_options(&capability)?,
            capability,
            publish_context: r.publish_context,
            volume_context: r.volume_context,
        })
    }
}

impl TryFrom<NodeUnstageVolumeRequest> for plugin::Unstage {
    type Error = NodeError;
    fn try_from(r: NodeUnstageVolumeRequest) -> Result<Self, NodeError> {
        Ok(Self {
            volume: volume(&r.volume_id)?,
            staging: path(&r.staging_target_path, "staging_target_path")?,
        })
    }
}

impl TryFrom<NodePublishVolumeRequest> for plugin::Publish {
    type Error = NodeError;
    fn try_from(r: NodePublishVolumeRequest) -> Result<Self, NodeError> {
        let volume = volume(&r.volume_id)?;
        let target = path(&r.target_path, "target_path")?;
        let capability = capability(r.volume_capability.as_ref(), "volume_capability")?;
        let options = mount_options(&capability)?;
        // This plugin advertises STAGE_UNSTAGE_VOLUME, so the CO always names the stage.
        let staging = path(&r.staging_target_path, "staging_target_path")?;
        Ok(Self {
            volume,
            staging,
            target,
            capability,
            options,
            readonly: r.readonly,
            publish_context: r.publish_context,
            volume_context: r.volume_context,
        })
    }
}

impl TryFrom<NodeUnpublishVolumeRequest> for plugin::Unpublish {
    type Error = NodeError;
    fn try_from(r: NodeUnpublishVolumeRequest) -> Result<Self, NodeError> {
        Ok(Self {
            volume: volume(&r.volume_id)?,
            target: path(&r.target_path, "target_path")?,
        })
    }
}

impl TryFrom<NodeGetVolumeStatsRequest> for plugin::Stats {
    type Error = NodeError;
    fn try_from(r: NodeGetVolumeStatsRequest) -> Result<Self, NodeError> {
        Ok(Self {
            volume: volume(&r.volume_id)?,
            path: VolumePath::parse(&r.volume_path, "volume_path")?,
        })
    }
}

impl TryFrom<NodeExpandVolumeRequest> for plugin::Expand {
    type Error = NodeError;
    fn try_from(r: NodeExpandVolumeRequest) -> Result<Self, NodeError> {
        let volume = volume(&r.volume_id)?;
        let volume_path = VolumePath::parse(&r.volume_path, "volume_path")?;
        let range = r.capacity_range.unwrap_or_default();
        let bytes = |v: i64, field| {
            u64::try_from(v).map_err(|_| NodeError::invalid(field, format!("{v} is negative")))
        };
        let staging = match r.staging_target_path.as_str() {
            "" => None,
            raw => Some(path(raw, "staging_target_path")?),
        };
        let capability = match r.volume_capability.as_ref() {
            None => None,
            some => Some(capability(some, "volume_capability")?),
        };
        Ok(Self {
            volume,
            path: volume_path,
            staging,
            capability,
            required_bytes: bytes(range.required_bytes, "capacity_range.required_bytes")?,
            limit_bytes: bytes(range.limit_bytes, "capacity_range.limit_bytes")?,
        })
    }
}

/// The span every node volume RPC runs in; raw strings are logged escaped.
fn span(rpc: &'static str, volume_id: &str, path: &str) -> tracing::Span {
    tracing::info_span!("rpc", rpc, volume_id = ?volume_id, path = ?path)
}

fn usage(available: u64, total: u64, used: u64, unit: volume_usage::Unit) -> VolumeUsage {
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    VolumeUsage {
        available: int(available),
        total: int(total),
        used: int(used),
        unit: unit as i32,
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    /// CSI §4.5 NodeStageVolume; idempotent, ALREADY_EXISTS for another capability.
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = req.get_ref();
        let span = span("NodeStageVolume", &r.volume_id, &r.staging_target_path);
        async {
            let started = Instant::now();
            let stage = plugin::Stage::try_from(req.into_inner())?;
            let staged = self.plugin.stage(stage).await;
            record(&self.metrics, "stage", started, &staged);
            staged?;
            Ok(Response::new(NodeStageVolumeResponse {}))
        }
        .instrument(span)
        .await
    }

    /// CSI §4.5 NodeUnstageVolume; nothing staged is OK.
    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = req.get_ref();
        let span = span("NodeUnstageVolume", &r.volume_id, &r.staging_target_path);
        async {
            let started = Instant::now();
            let unstage = plugin::Unstage::try_from(req.into_inner())?;
            let unstaged = self.plugin.unstage(unstage).await;
            record(&self.metrics, "unstage", started, &unstaged);
            unstaged?;
            Ok(Response::new(NodeUnstageVolumeResponse {}))
        }
        .instrument(span)
        .await
    }

    /// CSI §4.5 NodePublishVolume; FAILED_PRECONDITION when not staged.
    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = req.get_ref();
        let span = span("NodePublishVolume", &r.volume_id, &r.target_path);
        async {
            let publish = plugin::Publish::try_from(req.into_inner())?;
            self.plugin.publish(publish).await?;
            Ok(Response::new(NodePublishVolumeResponse {}))
        }
        .instrument(span)
        .await
    }

    /// CSI §4.5 NodeUnpublishVolume; a target already gone is OK.
    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = req.get_ref();
        let span = span("NodeUnpublishVolume", &r.volume_id, &r.target_path);
        async {
            let unpublish = plugin::Unpublish::try_from(req.into_inner())?;
            self.plugin.unpublish(unpublish).await?;
            Ok(Response::new(NodeUnpublishVolumeResponse {}))
        }
        .instrument(span)
        .await
    }

    /// CSI §4.5 NodeGetVolumeStats, with VolumeCondition.
    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let stats = plugin::Stats::try_from(req.into_inner())?;
        let s = self.plugin.stats(stats).await?;
        let mut out = vec![usage(
            s.available_bytes.unwrap_or(0),
            s.total_bytes,
            s.used_bytes.unwrap_or(0),
            volume_usage::Unit::Bytes,
        )];
        if let Some((total, free, used)) = s.inodes {
            out.push(usage(free, total, used, volume_usage::Unit::Inodes));
        }
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage: out,
            volume_condition: Some(VolumeCondition {
                abnormal: s.abnormal.is_some(),
                message: s.abnormal.unwrap_or_else(|| "volume is healthy".into()),
            }),
        }))
    }

    /// CSI §4.5 NodeExpandVolume: refresh the device, grow the filesystem online.
    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = req.get_ref();
        let span = span("NodeExpandVolume", &r.volume_id, &r.volume_path);
        async {
            let expand = plugin::Expand::try_from(req.into_inner())?;
            let bytes = self.plugin.expand(expand).await?;
            Ok(Response::new(NodeExpandVolumeResponse {
                capacity_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
            }))
        }
        .instrument(span)
        .await
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use rpc::Type::*;
        let capabilities = [
            StageUnstageVolume,
            GetVolumeStats,
            VolumeCondition,
            ExpandVolume,
        ]
        .iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(CapType::Rpc(Rpc { r#type: *t as i32 })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: i64::try_from(self.max_volumes_per_node).unwrap_or(i64::MAX),
            accessible_topology: None,
        }))
    }
}
