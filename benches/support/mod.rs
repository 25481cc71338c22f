//! What the actor benches share: an in-memory backend in which every volume exists, standalone
//! cluster adapters, and an actix system on a multi-thread tokio runtime with N arbiters, as
//! `main.rs` builds it.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::prelude::*;
use async_trait::async_trait;
use rds_csi::actors::messages::{Publish, Unpublish};
use rds_csi::actors::state::PublishRequest;
use rds_csi::actors::supervisor::Supervisor;
use rds_csi::actors::{Router, VolumeDeps};
use rds_csi::backend::{BackendError, CreateRequest, VolumeBackend, VolumeInfo};
use rds_csi::domain::{AccessMode, Capability};
use rds_csi::kube::Standalone;
use rds_csi::metrics::Metrics;
use rds_csi::role::Term;
use rds_csi::{NodeId, VolumeId};

pub const GRACE: Duration = Duration::from_secs(30);

/// Every volume id exists, 1 GiB, RWO and RWX block. `get` clones a record, as the file backend
/// does from its index, so the actor's backend check costs about the same, with no disk.
pub struct MemBackend {
    template: VolumeInfo,
}

impl MemBackend {
    pub fn new() -> Self {
        Self {
            template: VolumeInfo {
                id: VolumeId::try_from("template").unwrap(),
                name: String::new(),
                capacity_bytes: 1 << 30,
                capabilities: vec![
                    Capability::block(AccessMode::SingleNodeWriter),
                    Capability::block(AccessMode::MultiNodeMultiWriter),
                ],
                parameters: BTreeMap::new(),
                created_at: SystemTime::UNIX_EPOCH,
                source: None,
            },
        }
    }
}

#[async_trait]
impl VolumeBackend for MemBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }
    async fn create(&self, req: CreateRequest) -> Result<VolumeInfo, BackendError> {
        Ok(VolumeInfo {
            id: req.id,
            name: req.name,
            ..self.template.clone()
        })
    }
    async fn delete(&self, _id: &VolumeId) -> Result<(), BackendError> {
        Ok(())
    }
    async fn get(&self, id: &VolumeId) -> Result<Option<VolumeInfo>, BackendError> {
        Ok(Some(VolumeInfo {
            id: id.clone(),
            ..self.template.clone()
        }))
    }
    async fn list(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        Ok(Vec::new())
    }
    async fn list_owned(&self) -> Result<Vec<VolumeInfo>, BackendError> {
        Ok(Vec::new())
    }
    async fn capacity(&self) -> Result<u64, BackendError> {
        Ok(u64::MAX)
    }
    async fn expand(&self, _id: &VolumeId, bytes: u64) -> Result<u64, BackendError> {
        Ok(bytes)
    }
    fn publish_context(&self, volume: &VolumeInfo) -> HashMap<String, String> {
        HashMap::from([
            ("backend".to_string(), "memory".to_string()),
            ("volume".to_string(), volume.id.to_string()),
        ])
    }
}

pub fn node(name: &str) -> NodeId {
    NodeId::try_from(name).unwrap()
}

pub fn volume(i: usize) -> VolumeId {
    VolumeId::try_from(format!("vol-{i}").as_str()).unwrap()
}

pub fn deps() -> Arc<VolumeDeps> {
    let cluster = Arc::new(Standalone::new([node("node-a"), node("node-b")]));
    Arc::new(VolumeDeps {
        backend: Arc::new(MemBackend::new()),
        nodes: cluster.clone(),
        authority: cluster.clone(),
        sink: cluster,
        metrics: Arc::new(Metrics::new()),
        grace_period: GRACE,
        node_limit: rds_csi::actors::NodeLimit::new(0),
    })
}

/// An actix system on a multi-thread tokio runtime, as the driver runs.
pub fn system() -> actix_rt::SystemRunner {
    actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// A supervisor with `arbiters` arbiter threads (0: actors on the supervisor's own arbiter),
/// and a router in front of it. Call inside the system.
pub struct Actors {
    pub arbiters: Vec<Arbiter>,
    pub supervisor: Addr<Supervisor>,
    pub router: Router,
}

impl Actors {
    pub fn start(arbiters: usize) -> Self {
        let arbiters: Vec<Arbiter> = (0..arbiters).map(|_| Arbiter::new()).collect();
        let handles = arbiters.iter().map(|a| a.handle()).collect();
        let supervisor = Supervisor::new(deps(), handles).start();
        Self {
            router: Router::new(supervisor.clone(), Duration::from_secs(30)),
            supervisor,
            arbiters,
        }
    }

    /// Resolves once every arbiter has run everything queued on it before this call (such as
    /// the start of actors the supervisor placed there).
    pub async fn drain_arbiters(&self) {
        let waits: Vec<_> = self
            .arbiters
            .iter()
            .map(|a| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                a.spawn(async move {
                    let _ = tx.send(());
                });
                rx
            })
            .collect();
        for rx in waits {
            let _ = rx.await;
        }
    }

    /// Stops the arbiter threads and waits for them (their actors go with them).
    pub fn stop(self) {
        for a in self.arbiters {
            a.stop();
            let _ = a.join();
        }
    }
}

pub fn rwo_publish(node: &NodeId) -> Publish {
    Publish {
        req: PublishRequest {
            node: node.clone(),
            capability: Capability::block(AccessMode::SingleNodeWriter),
            readonly: false,
            migration_timeout: Duration::from_secs(300),
        },
        term: Term::FIRST,
    }
}

pub fn unpublish(node: &NodeId) -> Unpublish {
    Unpublish {
        node: Some(node.clone()),
        term: Term::FIRST,
    }
}

/// One publish then unpublish of `volume` from `node` through the router; panics on an error,
/// since a bench that measures failures measures the wrong thing.
pub async fn cycle(router: &Router, volume: &VolumeId, node: &NodeId) {
    router
        .send(volume, rwo_publish(node))
        .await
        .expect("publish");
    router
        .send(volume, unpublish(node))
        .await
        .expect("unpublish");
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// 1, 2 and the core count, without repeats.
pub fn arbiter_counts() -> Vec<usize> {
    let mut counts = vec![1, 2, cores()];
    counts.sort_unstable();
    counts.dedup();
    counts
}
