//! CSI Controller service. Each handler validates its request into a typed message, sends it to
//! the volume's actor (attachments, delete) or the backend (create, list, capacity, snapshots),
//! and maps the answer. The role decides what is served: until it is first decided (boot
//! seeding, or the Lease not seen yet) every RPC answers UNAVAILABLE; ControllerPublish/Unpublish
//! are served only by the active controller, carry the term they were admitted in to the
//! volume's actor (so does DeleteVolume), and are answered only within it; a standby answers
//! DeleteVolume from live VolumeAttachment reads and
//! everything else as usual.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{capability, to_proto};
use crate::actors::messages::{Delete, Publish, Unpublish};
use crate::actors::state::PublishRequest;
use crate::actors::Router;
use crate::backend::{ContentSource, CreateRequest, SnapshotInfo, SnapshotRequest, VolumeBackend};
use crate::csi::controller_server::Controller;
use crate::csi::controller_service_capability::{rpc, Rpc, Type as CapType};
use crate::csi::*;
use crate::domain::{migration_timeout, Capability, MIGRATION_TIMEOUT_KEY};
use crate::ids::{NodeId, NodeIdRules, SnapshotId, VolumeId};
use crate::metrics::Metrics;
use crate::role::{DeletePath, Role};
use crate::Error;

const TOKEN_PREFIX: &str = "v1:";
/// ListSnapshots tokens: the id of the first snapshot of the next page.
const SNAPSHOT_TOKEN_PREFIX: &str = "s1:";

pub struct ControllerService {
    pub router: Router,
    pub backend: Arc<dyn VolumeBackend>,
    pub role: Arc<Role>,
    pub metrics: Arc<Metrics>,
    /// Kubernetes mode refuses node ids that cannot be Node names, before any API call.
    pub node_ids: NodeIdRules,
}

/// A validated ControllerPublishVolumeRequest.
pub struct PublishCall {
    pub volume: VolumeId,
    pub req: PublishRequest,
}

/// Standalone rules for node ids; the controller uses [`PublishCall::parse`].
impl TryFrom<ControllerPublishVolumeRequest> for PublishCall {
    type Error = Error;

    fn try_from(req: ControllerPublishVolumeRequest) -> Result<Self, Error> {
        Self::parse(req, NodeIdRules::Standalone)
    }
}

impl PublishCall {
    /// Validates `req` (rules, Publish step 1) with `node_ids` deciding which node ids pass.
    pub fn parse(
        req: ControllerPublishVolumeRequest,
        node_ids: NodeIdRules,
    ) -> Result<Self, Error> {
        let volume = VolumeId::try_from(req.volume_id.as_str())?;
        let node = node_ids.parse(&req.node_id, "node_id")?;
        let capability = capability(req.volume_capability.as_ref(), "volume_capability")?;
        let raw_timeout = req
            .volume_context
            .get(MIGRATION_TIMEOUT_KEY)
            .map(String::as_str);
        let (migration_timeout, unparsable) = migration_timeout(raw_timeout);
        if let Some(raw) = unparsable {
            tracing::warn!(volume_id = %volume, value = %raw, "unparsable {MIGRATION_TIMEOUT_KEY}; using the default");
        }
        Ok(Self {
            volume,
            req: PublishRequest {
                node,
                capability,
                readonly: req.readonly,
                migration_timeout,
            },
        })
    }
}

/// A validated ControllerUnpublishVolumeRequest; an empty node_id means every node.
pub struct UnpublishCall {
    pub volume: VolumeId,
    /// `None`: every node.
    pub node: Option<NodeId>,
}

/// Standalone rules for node ids; the controller uses [`UnpublishCall::parse`].
impl TryFrom<ControllerUnpublishVolumeRequest> for UnpublishCall {
    type Error = Error;

    fn try_from(req: ControllerUnpublishVolumeRequest) -> Result<Self, Error> {
        Self::parse(req, NodeIdRules::Standalone)
    }
}

impl UnpublishCall {
    /// Validates `req` with `node_ids` deciding which node ids pass; empty is every node.
    pub fn parse(
        req: ControllerUnpublishVolumeRequest,
        node_ids: NodeIdRules,
    ) -> Result<Self, Error> {
        let volume = VolumeId::try_from(req.volume_id.as_str())?;
        let node = match req.node_id.as_str() {
            "" => None,
            raw => Some(node_ids.parse(raw, "node_id")?),
        };
        Ok(Self { volume, node })
    }
}

impl TryFrom<CreateVolumeRequest> for CreateRequest {
    type Error = Error;

    fn try_from(req: CreateVolumeRequest) -> Result<Self, Error> {
        let id = VolumeId::for_name(&req.name)?;
        if req.volume_capabilities.is_empty() {
            return Err(Error::InvalidArgument {
                field: "volume_capabilities",
                reason: "must not be empty".into(),
            });
        }
        let capabilities = req
            .volume_capabilities
            .iter()
            .map(|c| capability(Some(c), "volume_capabilities"))
            .collect::<Result<Vec<Capability>, Error>>()?;
        use crate::csi::volume_content_source::Type;
        let source = match req.volume_content_source {
            None => None,
            Some(VolumeContentSource { r#type: None }) => {
                return Err(Error::InvalidArgument {
                    field: "volume_content_source",
                    reason: "names neither a snapshot nor a volume".into(),
                })
            }
            Some(VolumeContentSource {
                r#type: Some(Type::Snapshot(s)),
            }) => Some(ContentSource::Snapshot(SnapshotId::parse_field(
                &s.snapshot_id,
                "volume_content_source.snapshot.snapshot_id",
            )?)),
            Some(VolumeContentSource {
                r#type: Some(Type::Volume(v)),
            }) => Some(ContentSource::Volume(VolumeId::parse_field(
                &v.volume_id,
                "volume_content_source.volume.volume_id",
            )?)),
        };
        let (required_bytes, limit_bytes) = capacity_range(req.capacity_range)?;
        Ok(CreateRequest {
            id,
            name: req.name,
            required_bytes,
            limit_bytes,
            capabilities,
            parameters: req.parameters.into_iter().collect::<BTreeMap<_, _>>(),
            source,
        })
    }
}

/// The CSI form of a volume's content source.
fn content_source(source: &Option<ContentSource>) -> Option<VolumeContentSource> {
    use crate::csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    source.as_ref().map(|s| VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.to_string(),
            }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.to_string(),
            }),
        }),
    })
}

impl TryFrom<CreateSnapshotRequest> for SnapshotRequest {
    type Error = Error;

    fn try_from(req: CreateSnapshotRequest) -> Result<Self, Error> {
        let id = SnapshotId::for_name(&req.name)?;
        let source = VolumeId::parse_field(&req.source_volume_id, "source_volume_id")?;
        Ok(SnapshotRequest {
            id,
            name: req.name,
            source,
            parameters: req.parameters.into_iter().collect(),
        })
    }
}

/// The CSI form of a snapshot.
fn snapshot(info: SnapshotInfo) -> Snapshot {
    Snapshot {
        size_bytes: i64::try_from(info.size_bytes).unwrap_or(i64::MAX),
        snapshot_id: info.id.to_string(),
        source_volume_id: info.source.map(|v| v.to_string()).unwrap_or_default(),
        creation_time: info.created_at.map(prost_types::Timestamp::from),
        ready_to_use: info.ready,
        group_snapshot_id: String::new(),
    }
}

/// `(required_bytes, limit_bytes)` of an optional CapacityRange; negative values are invalid.
fn capacity_range(range: Option<CapacityRange>) -> Result<(u64, u64), Error> {
    let range = range.unwrap_or_default();
    let non_negative = |v: i64, field| {
        u64::try_from(v).map_err(|_| Error::InvalidArgument {
            field,
            reason: format!("{v} is negative"),
        })
    };
    Ok((
        non_negative(range.required_bytes, "capacity_range.required_bytes")?,
        non_negative(range.limit_bytes, "capacity_range.limit_bytes")?,
    ))
}

impl ControllerService {
    /// The calls that need no attachment state.
    fn ready(&self) -> Result<(), Status> {
        self.role.volumes().map_err(Status::from)
    }

    /// DeleteVolume on a standby: refused while any VolumeAttachment of this driver names the
    /// volume, as the role tells from live reads (its own state is empty, and says nothing).
    async fn delete_on_standby(&self, volume: &VolumeId) -> Result<(), Error> {
        self.role.unpublished_everywhere(volume).await?;
        self.backend.delete(volume).await.map_err(Error::from)
    }

    /// Starts counting and timing one operation; see [`Operation`].
    fn operation(&self, name: &'static str) -> Operation<'_> {
        Operation {
            metrics: &self.metrics,
            name,
            started: Instant::now(),
            status: None,
        }
    }
}

/// One counted and timed operation. It is recorded when dropped, so an RPC whose client goes
/// away before the answer (hyper then drops the handler's future) is still counted, with the
/// status `cancelled` and timed up to the cancellation. Its effect is unknown at that point:
/// a publish already inside its volume actor runs to completion without a caller.
struct Operation<'a> {
    metrics: &'a Metrics,
    name: &'static str,
    started: Instant,
    status: Option<&'static str>,
}

impl Operation<'_> {
    /// Records the outcome and turns an error into a status.
    fn finish<T>(mut self, result: Result<T, Error>) -> Result<Response<T>, Status> {
        self.status = Some(match &result {
            Ok(_) => "success",
            Err(e) => e.metric_label(),
        });
        result.map(Response::new).map_err(Status::from)
    }
}

impl Drop for Operation<'_> {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let status = self.status.unwrap_or("cancelled");
        let m = self.metrics;
        // The Go driver's operation names for the same two RPCs, and their resolved series.
        let (attachment, series) = match self.name {
            "publish" => (Some("attach"), Some(&m.attach_series.publish)),
            "unpublish" => (Some("detach"), Some(&m.attach_series.unpublish)),
            _ => (None, None),
        };
        let labels = [self.name, status];
        let total = || m.volume_operations_total.with_label_values(&labels);
        let duration = || m.volume_operation_duration.with_label_values(&[self.name]);
        match series {
            Some(series) if status == "success" => series.succeeded.get_or_init(total).inc(),
            _ => total().inc(),
        }
        match series {
            Some(series) => series.duration.get_or_init(duration).observe(elapsed),
            None => duration().observe(elapsed),
        }
        if let (Some(operation), Some(series)) = (attachment, series) {
            series
                .attachment_duration
                .get_or_init(|| {
                    m.attachment_operation_duration
                        .with_label_values(&[operation])
                })
                .observe(elapsed);
        }
    }
}

/// The span every volume RPC runs in. Raw request strings are logged escaped (`?`), as they
/// are not validated yet.
fn rpc_span(rpc: &'static str, volume_id: &str, node_id: &str) -> tracing::Span {
    tracing::info_span!("rpc", rpc, volume_id = ?volume_id, node_id = ?node_id)
}

fn capabilities(types: &[rpc::Type]) -> Vec<ControllerServiceCapability> {
    types
        .iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(CapType::Rpc(Rpc { r#type: *t as i32 })),
        })
        .collect()
}

/// The id after `prefix` in a starting token this driver issued (ListVolumes' or
/// ListSnapshots'); an empty token is the start. Anything else is ABORTED, as CSI asks.
fn parse_token<Id: for<'a> TryFrom<&'a str>>(
    token: &str,
    prefix: &str,
) -> Result<Option<Id>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(prefix)
        .and_then(|id| Id::try_from(id).ok())
        .map(Some)
        .ok_or_else(|| {
            Error::Aborted(format!(
                "starting_token {token:?} was not issued by this driver"
            ))
        })
}

#[tonic::async_trait]
impl Controller for ControllerService {
    /// CSI §4.3 CreateVolume: idempotent by name; ALREADY_EXISTS on an incompatible repeat.
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        self.ready()?;
        let op = self.operation("create");
        let span = rpc_span("CreateVolume", &req.get_ref().name, "");
        let result = async {
            let mut create = CreateRequest::try_from(req.into_inner())?;
            create.id = self.backend.volume_id_for(&create.name)?;
            let info = self.backend.create(create).await?;
            Ok(CreateVolumeResponse {
                volume: Some(Volume {
                    capacity_bytes: info.capacity_bytes as i64,
                    volume_id: info.id.to_string(),
                    // What exists, which on a repeat is what the first call stored.
                    volume_context: info.parameters.into_iter().collect(),
                    content_source: content_source(&info.source),
                    accessible_topology: Vec::new(),
                }),
            })
        }
        .instrument(span)
        .await;
        op.finish(result)
    }

    /// CSI §4.3 DeleteVolume: idempotent; FAILED_PRECONDITION while published.
    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        self.ready()?;
        let op = self.operation("delete");
        let span = rpc_span("DeleteVolume", &req.get_ref().volume_id, "");
        let result = async {
            let volume = VolumeId::try_from(req.get_ref().volume_id.as_str())?;
            match self.role.delete_path()? {
                DeletePath::Actors(term) => {
                    self.router.send(&volume, Delete(term)).await?;
                    self.role.confirm(term)?;
                }
                DeletePath::Live => self.delete_on_standby(&volume).await?,
            }
            Ok(DeleteVolumeResponse {})
        }
        .instrument(span)
        .await;
        op.finish(result)
    }

    /// CSI §4.3 ControllerPublishVolume, per ATTACHMENT_RULES.md "Publish".
    async fn controller_publish_volume(
        &self,
        req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        self.ready()?;
        let op = self.operation("publish");
        let span = rpc_span(
            "ControllerPublishVolume",
            &req.get_ref().volume_id,
            &req.get_ref().node_id,
        );
        let result = async {
            let call = PublishCall::parse(req.into_inner(), self.node_ids)?;
            let term = self.role.admit()?;
            let msg = Publish {
                req: call.req,
                term,
            };
            let published = self.router.send(&call.volume, msg).await?;
            self.role.confirm(term)?;
            Ok(ControllerPublishVolumeResponse {
                publish_context: published.publish_context,
            })
        }
        .instrument(span)
        .await;
        op.finish(result)
    }

    /// CSI §4.3 ControllerUnpublishVolume, per ATTACHMENT_RULES.md "Unpublish".
    async fn controller_unpublish_volume(
        &self,
        req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        self.ready()?;
        let op = self.operation("unpublish");
        let span = rpc_span(
            "ControllerUnpublishVolume",
            &req.get_ref().volume_id,
            &req.get_ref().node_id,
        );
        let result = async {
            let call = UnpublishCall::parse(req.into_inner(), self.node_ids)?;
            let term = self.role.admit()?;
            let msg = Unpublish {
                node: call.node,
                term,
            };
            self.router.send(&call.volume, msg).await?;
            self.role.confirm(term)?;
            Ok(ControllerUnpublishVolumeResponse {})
        }
        .instrument(span)
        .await;
        op.finish(result)
    }

    /// Confirms only supported capabilities; NOT_FOUND for an unknown volume.
    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        self.ready()?;
        let req = req.into_inner();
        let volume = VolumeId::try_from(req.volume_id.as_str())?;
        if req.volume_capabilities.is_empty() {
            return Err(Error::InvalidArgument {
                field: "volume_capabilities",
                reason: "must not be empty".into(),
            }
            .into());
        }
        self.backend
            .get(&volume)
            .await
            .map_err(Error::from)?
            .ok_or(Error::VolumeNotFound(volume))?;
        let checked: Result<Vec<_>, Error> = req
            .volume_capabilities
            .iter()
            .map(|c| capability(Some(c), "volume_capabilities"))
            .collect();
        Ok(Response::new(match checked {
            Ok(caps) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: caps.iter().map(to_proto).collect(),
                    parameters: req.parameters,
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            },
            Err(e) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            },
        }))
    }

    /// Pages through volumes in id order; a token this driver did not issue is ABORTED.
    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        self.ready()?;
        let req = req.into_inner();
        let max = usize::try_from(req.max_entries).map_err(|_| Error::InvalidArgument {
            field: "max_entries",
            reason: "must not be negative".into(),
        })?;
        let start: Option<VolumeId> = parse_token(&req.starting_token, TOKEN_PREFIX)?;
        let all = self.backend.list().await.map_err(Error::from)?;
        let from = start.map_or(0, |id| all.partition_point(|v| v.id < id));
        let take = if max == 0 { usize::MAX } else { max };
        let page: Vec<_> = all[from..].iter().take(take).collect();
        let next_token = all
            .get(from + page.len())
            .filter(|_| page.len() == take)
            .map(|v| format!("{TOKEN_PREFIX}{}", v.id))
            .unwrap_or_default();
        let entries = page
            .into_iter()
            .map(|v| list_volumes_response::Entry {
                volume: Some(Volume {
                    capacity_bytes: v.capacity_bytes as i64,
                    volume_id: v.id.to_string(),
                    volume_context: v.parameters.clone().into_iter().collect(),
                    content_source: content_source(&v.source),
                    accessible_topology: Vec::new(),
                }),
                status: None,
            })
            .collect();
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        self.ready()?;
        for c in &req.get_ref().volume_capabilities {
            capability(Some(c), "volume_capabilities")?;
        }
        let parameters = req.get_ref().parameters.clone().into_iter().collect();
        let available = self
            .backend
            .capacity_for(&parameters)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: i64::try_from(available).unwrap_or(i64::MAX),
            maximum_volume_size: None,
            minimum_volume_size: None,
        }))
    }

    /// Advertises only what works end to end in this controller.
    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use rpc::Type::*;
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: capabilities(&[
                CreateDeleteVolume,
                PublishUnpublishVolume,
                ListVolumes,
                GetCapacity,
                PublishReadonly,
                SingleNodeMultiWriter,
                ExpandVolume,
                CreateDeleteSnapshot,
                ListSnapshots,
                CloneVolume,
            ]),
        }))
    }

    /// CSI §4.3 CreateSnapshot: answers once the snapshot is complete (`ready_to_use`).
    /// Idempotent by name: the id is derived from the name, so a retry (after a restart too)
    /// finds the same snapshot; the same name with another source is ALREADY_EXISTS. A missing
    /// source is NOT_FOUND.
    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        self.ready()?;
        let op = self.operation("create_snapshot");
        let span = rpc_span("CreateSnapshot", &req.get_ref().source_volume_id, "");
        let result = async {
            let mut create = SnapshotRequest::try_from(req.into_inner())?;
            create.id = self.backend.snapshot_id_for(&create.name)?;
            let info = self.backend.create_snapshot(create).await?;
            Ok(CreateSnapshotResponse {
                snapshot: Some(snapshot(info)),
            })
        }
        .instrument(span)
        .await;
        op.finish(result)
    }

    /// CSI §4.3 DeleteSnapshot: idempotent (an id that does not exist is OK); waits for
    /// restores from the snapshot to finish. Volumes made from it are independent copies.
    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        self.ready()?;
        let op = self.operation("delete_snapshot");
        let span = rpc_span("DeleteSnapshot", &req.get_ref().snapshot_id, "");
        let result = async {
            let id = SnapshotId::try_from(req.get_ref().snapshot_id.as_str())?;
            self.backend.delete_snapshot(&id).await?;
            Ok(DeleteSnapshotResponse {})
        }
        .instrument(span)
        .await;
        op.finish(result)
    }

    /// CSI §4.3 ListSnapshots: by snapshot id, by source volume, or all, in id order, paged;
    /// an id or source that does not exist lists nothing; a token this driver did not issue is
    /// ABORTED.
    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        self.ready()?;
        let req = req.into_inner();
        let max = usize::try_from(req.max_entries).map_err(|_| Error::InvalidArgument {
            field: "max_entries",
            reason: "must not be negative".into(),
        })?;
        let start: Option<SnapshotId> = parse_token(&req.starting_token, SNAPSHOT_TOKEN_PREFIX)?;
        let mut all = if req.snapshot_id.is_empty() {
            self.backend.list_snapshots().await.map_err(Error::from)?
        } else {
            match SnapshotId::try_from(req.snapshot_id.as_str()) {
                Ok(id) => self
                    .backend
                    .get_snapshot(&id)
                    .await
                    .map_err(Error::from)?
                    .into_iter()
                    .collect(),
                Err(_) => Vec::new(),
            }
        };
        if !req.source_volume_id.is_empty() {
            all.retain(|s| {
                s.source
                    .as_ref()
                    .is_some_and(|v| v.as_str() == req.source_volume_id)
            });
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        let from = start.map_or(0, |id| all.partition_point(|s| s.id < id));
        let take = if max == 0 { usize::MAX } else { max };
        let next_token = all
            .get(from.saturating_add(take))
            .map(|s| format!("{SNAPSHOT_TOKEN_PREFIX}{}", s.id))
            .unwrap_or_default();
        let entries = all
            .into_iter()
            .skip(from)
            .take(take)
            .map(|s| list_snapshots_response::Entry {
                snapshot: Some(snapshot(s)),
            })
            .collect();
        Ok(Response::new(ListSnapshotsResponse {
            entries,
            next_token,
        }))
    }
    async fn get_snapshot(
        &self,
        _: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        Err(Status::unimplemented(
            "GetSnapshot is not supported (GET_SNAPSHOT is not advertised): use ListSnapshots with snapshot_id",
        ))
    }
    /// CSI §4.3 ControllerExpandVolume: grows the backing volume (online: it may be
    /// published); the node then refreshes the device and grows the filesystem, so
    /// `node_expansion_required` is always true. Shrinking is OUT_OF_RANGE; asking for the
    /// current size again is OK.
    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        self.ready()?;
        let op = self.operation("expand");
        let span = rpc_span("ControllerExpandVolume", &req.get_ref().volume_id, "");
        let result = async {
            let req = req.into_inner();
            let volume = VolumeId::try_from(req.volume_id.as_str())?;
            let (required, limit) = capacity_range(req.capacity_range)?;
            if required == 0 {
                return Err(Error::InvalidArgument {
                    field: "capacity_range.required_bytes",
                    reason: "must be greater than zero".into(),
                });
            }
            if limit != 0 && required > limit {
                return Err(Error::Backend(crate::BackendError::OutOfRange(format!(
                    "capacity_range.required_bytes ({required}) exceeds limit_bytes ({limit})"
                ))));
            }
            let bytes = self.backend.expand(&volume, required).await?;
            tracing::info!(bytes, "volume expanded");
            Ok(ControllerExpandVolumeResponse {
                capacity_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
                node_expansion_required: true,
            })
        }
        .instrument(span)
        .await;
        op.finish(result)
    }
    async fn controller_get_volume(
        &self,
        _: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerGetVolume is not supported",
        ))
    }
    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerModifyVolume is not supported",
        ))
    }
}
