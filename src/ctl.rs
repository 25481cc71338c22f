//! `rds-csi ctl`: a small CSI client over the unix socket, for trying the driver from a shell and
//! for tests. Prints plain text, or JSON with `--json`. Exits 1 on a gRPC error, printing its code.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::csi::controller_client::ControllerClient;
use crate::csi::identity_client::IdentityClient;
use crate::csi::node_client::NodeClient;
use crate::csi::volume_capability::{
    access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
};
use crate::csi::*;
use crate::grpc::server::parse_endpoint;

#[derive(Args)]
pub struct CtlArgs {
    /// CSI endpoint of the running driver.
    #[arg(long, env = "RDS_CSI_ENDPOINT", default_value = "unix://./csi.sock")]
    pub endpoint: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Args, Clone)]
pub struct CapabilityArgs {
    /// RWX block (MULTI_NODE_MULTI_WRITER): migratable between two nodes.
    #[arg(long, conflicts_with_all = ["block", "fs_type"])]
    pub rwx_block: bool,
    /// RWO raw block (SINGLE_NODE_WRITER, block).
    #[arg(long)]
    pub block: bool,
    /// Filesystem for an RWO mount volume.
    #[arg(long, default_value = "ext4")]
    pub fs_type: String,
}

#[derive(Subcommand)]
pub enum CtlCommand {
    /// Plugin name, version and readiness.
    Probe,
    /// Create a volume: empty, restored from a snapshot, or a clone of a volume.
    Create {
        name: String,
        /// Size, e.g. 10GiB, 512MiB or bytes (default 1GiB; from a source, the source's size).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        #[command(flatten)]
        cap: CapabilityArgs,
        /// Restore this snapshot into the new volume.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Clone this volume into the new volume.
        #[arg(long)]
        from_volume: Option<String>,
    },
    /// Snapshots: create, list, delete.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Delete a volume.
    Delete { volume: String },
    /// ControllerPublishVolume.
    Publish {
        volume: String,
        node: String,
        #[command(flatten)]
        cap: CapabilityArgs,
        #[arg(long)]
        readonly: bool,
        /// volume_context migrationTimeoutSeconds.
        #[arg(long)]
        migration_timeout: Option<String>,
    },
    /// ControllerUnpublishVolume; without NODE, from every node.
    Unpublish {
        volume: String,
        node: Option<String>,
    },
    /// List volumes.
    List,
    /// Attach to this node and stage: ControllerPublishVolume to the driver's own node, then
    /// NodeStageVolume at STAGING (created if missing). A mount volume is formatted only if
    /// empty, then mounted there.
    Stage {
        volume: String,
        staging: PathBuf,
        #[command(flatten)]
        cap: CapabilityArgs,
        #[arg(long)]
        readonly: bool,
    },
    /// NodePublishVolume: bind-mount the staged volume at TARGET (a device node for block).
    PublishNode {
        volume: String,
        staging: PathBuf,
        target: PathBuf,
        #[command(flatten)]
        cap: CapabilityArgs,
        #[arg(long)]
        readonly: bool,
    },
    /// NodeUnpublishVolume: unmount TARGET (or remove the device node) and delete it.
    UnpublishNode { volume: String, target: PathBuf },
    /// NodeUnstageVolume at STAGING, then ControllerUnpublishVolume from the driver's node.
    Unstage { volume: String, staging: PathBuf },
    /// NodeGetVolumeStats of a staged or published PATH.
    Stats { volume: String, path: PathBuf },
    /// ControllerExpandVolume to SIZE; with --path, also NodeExpandVolume there.
    Expand {
        volume: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// A staged or published path of the volume on this node.
        #[arg(long)]
        path: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// CreateSnapshot NAME of the volume SOURCE; the same name again gives the same snapshot.
    Create { name: String, source: String },
    /// ListSnapshots, every page; --source keeps the snapshots of one volume.
    List {
        #[arg(long)]
        source: Option<String>,
    },
    /// DeleteSnapshot ID.
    Delete { id: String },
}

/// Parses "10GiB", "512MiB", "1G", "4096".
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let num: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 10GiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    num.checked_mul(mult)
        .ok_or_else(|| format!("{text:?} is too large"))
}

impl CapabilityArgs {
    pub fn to_proto(&self) -> VolumeCapability {
        let (mode, access_type) = if self.rwx_block {
            (
                Mode::MultiNodeMultiWriter,
                AccessType::Block(BlockVolume {}),
            )
        } else if self.block {
            (Mode::SingleNodeWriter, AccessType::Block(BlockVolume {}))
        } else {
            (
                Mode::SingleNodeWriter,
                AccessType::Mount(MountVolume {
                    fs_type: self.fs_type.clone(),
                    mount_flags: Vec::new(),
                    volume_mount_group: String::new(),
                }),
            )
        };
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(access_type),
        }
    }
}

/// Connects to a CSI unix socket.
pub async fn connect(endpoint: &str) -> Result<Channel, Box<dyn std::error::Error + Send + Sync>> {
    let path: PathBuf = parse_endpoint(endpoint)?;
    let channel = Endpoint::try_from("http://[::1]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(channel)
}

/// Runs one ctl command and returns the process exit code.
pub async fn run(args: CtlArgs) -> i32 {
    let channel = match connect(&args.endpoint).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot connect to {}: {e}", args.endpoint);
            return 2;
        }
    };
    match execute(channel, &args.command).await {
        Ok(value) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&value).unwrap_or_default()
                );
            } else {
                print_text(&value);
            }
            0
        }
        Err(status) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"error": {"code": format!("{:?}", status.code()), "message": status.message()}})
                );
            } else {
                eprintln!("error: {:?}: {}", status.code(), status.message());
            }
            1
        }
    }
}

fn print_text(value: &serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) => println!("{k}: {s}"),
                    serde_json::Value::Array(items) => {
                        println!("{k}:");
                        for item in items {
                            println!(
                                "  {}",
                                item.as_str()
                                    .map(str::to_string)
                                    .unwrap_or_else(|| item.to_string())
                            );
                        }
                    }
                    other => println!("{k}: {other}"),
                }
            }
        }
        other => println!("{other}"),
    }
}

async fn execute(
    channel: Channel,
    command: &CtlCommand,
) -> Result<serde_json::Value, tonic::Status> {
    use serde_json::json;
    let mut identity = IdentityClient::new(channel.clone());
    let mut controller = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    Ok(match command {
        CtlCommand::Probe => {
            let info = identity
                .get_plugin_info(GetPluginInfoRequest {})
                .await?
                .into_inner();
            let probe = identity.probe(ProbeRequest {}).await?.into_inner();
            json!({"name": info.name, "version": info.vendor_version, "ready": probe.ready.unwrap_or(false)})
        }
        CtlCommand::Create {
            name,
            size,
            cap,
            from_snapshot,
            from_volume,
        } => {
            use crate::csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
            let source = match (from_snapshot, from_volume) {
                (Some(id), _) => Some(Type::Snapshot(SnapshotSource {
                    snapshot_id: id.clone(),
                })),
                (None, Some(id)) => Some(Type::Volume(VolumeSource {
                    volume_id: id.clone(),
                })),
                (None, None) => None,
            };
            let default_size = if source.is_some() { 0 } else { 1 << 30 };
            let volume = controller
                .create_volume(CreateVolumeRequest {
                    name: name.clone(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: size.unwrap_or(default_size) as i64,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![cap.to_proto()],
                    volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .volume
                .unwrap_or_default();
            let mut out =
                json!({"volume_id": volume.volume_id, "capacity_bytes": volume.capacity_bytes});
            match volume.content_source.and_then(|s| s.r#type) {
                Some(Type::Snapshot(s)) => out["from_snapshot"] = json!(s.snapshot_id),
                Some(Type::Volume(v)) => out["from_volume"] = json!(v.volume_id),
                None => {}
            }
            out
        }
        CtlCommand::Snapshot(SnapshotCommand::Create { name, source }) => {
            let snap = controller
                .create_snapshot(CreateSnapshotRequest {
                    name: name.clone(),
                    source_volume_id: source.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .snapshot
                .unwrap_or_default();
            snapshot_json(&snap)
        }
        CtlCommand::Snapshot(SnapshotCommand::List { source }) => {
            let mut snapshots = Vec::new();
            let mut token = String::new();
            loop {
                let page = controller
                    .list_snapshots(ListSnapshotsRequest {
                        max_entries: 100,
                        starting_token: token,
                        source_volume_id: source.clone().unwrap_or_default(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                for e in page.entries {
                    let s = e.snapshot.unwrap_or_default();
                    snapshots.push(format!(
                        "{} of {} {} bytes{}",
                        s.snapshot_id,
                        if s.source_volume_id.is_empty() {
                            "(source not recorded)"
                        } else {
                            &s.source_volume_id
                        },
                        s.size_bytes,
                        if s.ready_to_use { "" } else { " (not ready)" }
                    ));
                }
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
            json!({"snapshots": snapshots})
        }
        CtlCommand::Snapshot(SnapshotCommand::Delete { id }) => {
            controller
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                    secrets: HashMap::new(),
                })
                .await?;
            json!({"deleted_snapshot": id})
        }
        CtlCommand::Delete { volume } => {
            controller
                .delete_volume(DeleteVolumeRequest {
                    volume_id: volume.clone(),
                    secrets: HashMap::new(),
                })
                .await?;
            json!({"deleted": volume})
        }
        CtlCommand::Publish {
            volume,
            node,
            cap,
            readonly,
            migration_timeout,
        } => {
            let mut volume_context = HashMap::new();
            if let Some(t) = migration_timeout {
                volume_context.insert("migrationTimeoutSeconds".to_string(), t.clone());
            }
            let resp = controller
                .controller_publish_volume(ControllerPublishVolumeRequest {
                    volume_id: volume.clone(),
                    node_id: node.clone(),
                    volume_capability: Some(cap.to_proto()),
                    readonly: *readonly,
                    secrets: HashMap::new(),
                    volume_context,
                })
                .await?
                .into_inner();
            let context: std::collections::BTreeMap<_, _> =
                resp.publish_context.into_iter().collect();
            json!({"published": volume, "node": node, "publish_context": context})
        }
        CtlCommand::Unpublish { volume, node } => {
            controller
                .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                    volume_id: volume.clone(),
                    node_id: node.clone().unwrap_or_default(),
                    secrets: HashMap::new(),
                })
                .await?;
            json!({"unpublished": volume, "node": node.clone().unwrap_or_else(|| "(every node)".into())})
        }
        CtlCommand::List => {
            let mut volumes = Vec::new();
            let mut token = String::new();
            loop {
                let page = controller
                    .list_volumes(ListVolumesRequest {
                        max_entries: 100,
                        starting_token: token,
                    })
                    .await?
                    .into_inner();
                for e in page.entries {
                    let v = e.volume.unwrap_or_default();
                    volumes.push(format!("{} {} bytes", v.volume_id, v.capacity_bytes));
                }
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
            json!({"volumes": volumes})
        }
        CtlCommand::Stage {
            volume,
            staging,
            cap,
            readonly,
        } => {
            let node_id = node
                .node_get_info(NodeGetInfoRequest {})
                .await?
                .into_inner()
                .node_id;
            let publish_context = controller
                .controller_publish_volume(ControllerPublishVolumeRequest {
                    volume_id: volume.clone(),
                    node_id: node_id.clone(),
                    volume_capability: Some(cap.to_proto()),
                    readonly: *readonly,
                    secrets: HashMap::new(),
                    volume_context: HashMap::new(),
                })
                .await?
                .into_inner()
                .publish_context;
            // The CO creates the staging directory; here ctl is the CO.
            std::fs::create_dir_all(staging).map_err(|e| {
                tonic::Status::failed_precondition(format!("creating {}: {e}", staging.display()))
            })?;
            let staging = absolute(staging)?;
            node.node_stage_volume(NodeStageVolumeRequest {
                volume_id: volume.clone(),
                publish_context,
                staging_target_path: staging.clone(),
                volume_capability: Some(cap.to_proto()),
                secrets: HashMap::new(),
                volume_context: HashMap::new(),
            })
            .await?;
            json!({"staged": volume, "node": node_id, "staging": staging})
        }
        CtlCommand::PublishNode {
            volume,
            staging,
            target,
            cap,
            readonly,
        } => {
            let (staging, target) = (absolute(staging)?, absolute(target)?);
            node.node_publish_volume(NodePublishVolumeRequest {
                volume_id: volume.clone(),
                publish_context: HashMap::new(),
                staging_target_path: staging,
                target_path: target.clone(),
                volume_capability: Some(cap.to_proto()),
                readonly: *readonly,
                secrets: HashMap::new(),
                volume_context: HashMap::new(),
            })
            .await?;
            json!({"published": volume, "target": target})
        }
        CtlCommand::UnpublishNode { volume, target } => {
            let target = absolute(target)?;
            node.node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume.clone(),
                target_path: target.clone(),
            })
            .await?;
            json!({"unpublished": volume, "target": target})
        }
        CtlCommand::Unstage { volume, staging } => {
            let staging = absolute(staging)?;
            let node_id = node
                .node_get_info(NodeGetInfoRequest {})
                .await?
                .into_inner()
                .node_id;
            node.node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume.clone(),
                staging_target_path: staging.clone(),
            })
            .await?;
            controller
                .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                    volume_id: volume.clone(),
                    node_id: node_id.clone(),
                    secrets: HashMap::new(),
                })
                .await?;
            json!({"unstaged": volume, "node": node_id, "staging": staging})
        }
        CtlCommand::Stats { volume, path } => {
            let path = absolute(path)?;
            let stats = node
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id: volume.clone(),
                    volume_path: path.clone(),
                    staging_target_path: String::new(),
                })
                .await?
                .into_inner();
            let mut out = serde_json::Map::new();
            out.insert("volume_id".into(), json!(volume));
            out.insert("path".into(), json!(path));
            for u in stats.usage {
                let unit = match volume_usage::Unit::try_from(u.unit) {
                    Ok(volume_usage::Unit::Inodes) => "inodes",
                    _ => "bytes",
                };
                out.insert(
                    unit.into(),
                    json!({"total": u.total, "used": u.used, "available": u.available}),
                );
            }
            if let Some(c) = stats.volume_condition {
                out.insert(
                    "condition".into(),
                    json!(if c.abnormal {
                        format!("abnormal: {}", c.message)
                    } else {
                        "normal".to_string()
                    }),
                );
            }
            serde_json::Value::Object(out)
        }
        CtlCommand::Expand { volume, size, path } => {
            let grown = controller
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: volume.clone(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: *size as i64,
                        limit_bytes: 0,
                    }),
                    secrets: HashMap::new(),
                    volume_capability: None,
                })
                .await?
                .into_inner();
            let mut out = json!({"expanded": volume, "capacity_bytes": grown.capacity_bytes});
            if let Some(path) = path {
                let path = absolute(path)?;
                let node_bytes = node
                    .node_expand_volume(NodeExpandVolumeRequest {
                        volume_id: volume.clone(),
                        volume_path: path,
                        capacity_range: Some(CapacityRange {
                            required_bytes: *size as i64,
                            limit_bytes: 0,
                        }),
                        staging_target_path: String::new(),
                        volume_capability: None,
                        secrets: HashMap::new(),
                    })
                    .await?
                    .into_inner()
                    .capacity_bytes;
                out["node_capacity_bytes"] = json!(node_bytes);
            }
            out
        }
    })
}

fn snapshot_json(s: &Snapshot) -> serde_json::Value {
    let created = s
        .creation_time
        .as_ref()
        .and_then(|t| {
            let at = std::time::UNIX_EPOCH
                + std::time::Duration::new(u64::try_from(t.seconds).ok()?, t.nanos as u32);
            Some(crate::rfc3339(at))
        })
        .unwrap_or_default();
    serde_json::json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "ready_to_use": s.ready_to_use,
        "creation_time": created,
    })
}

/// CSI paths are absolute: a relative path given to ctl is taken from the working directory.
fn absolute(path: &std::path::Path) -> Result<String, tonic::Status> {
    std::path::absolute(path)
        .map(|p| p.display().to_string())
        .map_err(|e| tonic::Status::invalid_argument(format!("{}: {e}", path.display())))
}
