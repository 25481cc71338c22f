//! The CSI unix socket: endpoint parsing, safe binding (stale sockets removed, live ones refused,
//! mode 0660) and graceful serving (in-flight RPCs finish, then the socket file is removed).
//!
//! Where connections are served: with actor arbiters (the controller's default, one per core),
//! each accepted connection is handed whole to one arbiter, round robin, and served there by that
//! arbiter's own gRPC server; the supervisor starts a volume's actor on the arbiter its first
//! caller runs on (`crate::actors::placement`). A publish then reaches its actor, and the answer
//! its handler, on one thread: no wake-up of another thread, which is what a Probe costs and an
//! attach did not. Without arbiters (`--arbiters 0`, or the node plugin alone) the connections
//! are served on the tokio runtime's workers.

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix_rt::ArbiterHandle;
use futures::StreamExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::{UnboundedReceiverStream, UnixListenerStream};
use tonic::transport::Server;

use super::controller::ControllerService;
use super::identity::IdentityService;
use super::node::NodeService;
use crate::csi::controller_server::ControllerServer;
use crate::csi::identity_server::IdentityServer;
use crate::csi::node_server::NodeServer;

/// Socket file mode: owner and group (the sidecars) only.
pub const SOCKET_MODE: u32 = 0o660;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("endpoint {0:?} is not supported: use unix://PATH")]
    Endpoint(String),
    #[error("{0} is in use by another process (a connection to it succeeded); stop it or choose another --endpoint")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    #[error("socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("an arbiter serving gRPC connections stopped")]
    Arbiter,
}

/// `unix://PATH` (or `unix:PATH`) to a path. Relative paths stay relative to the working dir.
pub fn parse_endpoint(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ServeError::Endpoint(endpoint.to_string()))?;
    Ok(PathBuf::from(path))
}

/// Binds the socket. A leftover socket nobody answers on is removed; one that answers is
/// refused, as is any path that is not a socket.
pub async fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let io = |source| ServeError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path).await {
            Ok(_) => return Err(ServeError::InUse(path.to_path_buf())),
            Err(e)
                if e.kind() == ErrorKind::ConnectionRefused || e.kind() == ErrorKind::NotFound =>
            {
                tracing::info!(path = %path.display(), "removing stale socket");
                std::fs::remove_file(path).map_err(io)?;
            }
            Err(e) => return Err(io(e)),
        },
        Ok(_) => return Err(ServeError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(io)?;
    Ok(listener)
}

pub struct Services {
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    pub identity: IdentityService,
    pub controller: Option<ControllerService>,
    pub node: Option<NodeService>,
}

/// The services, shared by every server that serves a share of the connections.
#[derive(Clone)]
struct Shared {
    metrics: Arc<crate::metrics::Metrics>,
    identity: Arc<IdentityService>,
    controller: Option<Arc<ControllerService>>,
    node: Option<Arc<NodeService>>,
}

impl From<Services> for Shared {
    fn from(s: Services) -> Self {
        Self {
            metrics: s.metrics,
            identity: Arc::new(s.identity),
            controller: s.controller.map(Arc::new),
            node: s.node.map(Arc::new),
        }
    }
}

impl Shared {
    /// One gRPC server over `incoming`, with the layers every RPC goes through, until `stop`;
    /// then it lets its connections' in-flight RPCs finish.
    async fn serve<I>(
        self,
        incoming: I,
        stop: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error>
    where
        I: futures::Stream<Item = std::io::Result<UnixStream>>,
    {
        Server::builder()
            .layer(super::observe::GrpcMetricsLayer::new(self.metrics))
            .layer(crate::deadline::DeadlineLayer)
            .add_service(IdentityServer::from_arc(self.identity))
            .add_optional_service(self.controller.map(ControllerServer::from_arc))
            .add_optional_service(self.node.map(NodeServer::from_arc))
            .serve_with_incoming_shutdown(incoming, stop)
            .await
    }
}

/// Serves until `shutdown` resolves, lets in-flight RPCs finish (for at most `drain`: a client
/// that keeps an idle connection open must not hold the process hostage), then removes the
/// socket file. With `arbiters`, each connection is served on one of them (see the module docs);
/// without, on the current runtime.
pub async fn serve(
    listener: UnixListener,
    path: &Path,
    services: Services,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    arbiters: &[ArbiterHandle],
) -> Result<(), ServeError> {
    let shared = Shared::from(services);
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    };
    let drained = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(drain).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let server = async {
        if arbiters.is_empty() {
            shared
                .serve(UnixListenerStream::new(listener), shutdown)
                .await
                .map_err(ServeError::from)
        } else {
            serve_on(arbiters, listener, shared, shutdown).await
        }
    };
    let result = tokio::select! {
        result = server => result,
        () = drained => {
            tracing::warn!(drain_s = drain.as_secs_f64(), "connections still open after the drain timeout; exiting anyway");
            Ok(())
        }
    };
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "could not remove socket");
    }
    result
}

/// Accepts here and hands each connection to the next arbiter's server, round robin, until
/// `shutdown`; then stops every server and waits for their connections to finish.
async fn serve_on(
    arbiters: &[ArbiterHandle],
    listener: UnixListener,
    shared: Shared,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut lanes = Vec::with_capacity(arbiters.len());
    let mut finished = Vec::with_capacity(arbiters.len());
    for arbiter in arbiters {
        let (lane, accepted) =
            tokio::sync::mpsc::unbounded_channel::<std::os::unix::net::UnixStream>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let shared = shared.clone();
        let mut stop = stop_rx.clone();
        let spawned = arbiter.spawn(async move {
            // Registered with this arbiter's reactor, so its I/O wakes this thread only.
            let incoming = UnboundedReceiverStream::new(accepted).map(UnixStream::from_std);
            let stop = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            let _ = done_tx.send(shared.serve(incoming, stop).await);
        });
        if !spawned {
            return Err(ServeError::Arbiter);
        }
        lanes.push(lane);
        finished.push(done_rx);
    }
    let mut shutdown = std::pin::pin!(shutdown);
    let mut next = 0;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let stream = match accepted.and_then(|(stream, _)| stream.into_std()) {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::debug!(error = %e, "error accepting a connection");
                        continue;
                    }
                };
                if lanes[next].send(stream).is_err() {
                    return Err(ServeError::Arbiter);
                }
                next = (next + 1) % lanes.len();
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(lanes);
    for done in finished {
        done.await.map_err(|_| ServeError::Arbiter)??;
    }
    Ok(())
}
