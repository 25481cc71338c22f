//! The CSI unix socket: endpoint parsing, safe binding (stale sockets removed, live ones refused,
//! mode 0660) and graceful serving (in-flight RPCs finish, then the socket file is removed).

use std::future::Future;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
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

/// Serves until `shutdown` resolves, lets in-flight RPCs finish (for at most `drain`: a client
/// that keeps an idle connection open must not hold the process hostage), then removes the
/// socket file.
pub async fn serve(
    listener: UnixListener,
    path: &Path,
    services: Services,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> Result<(), ServeError> {
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .layer(super::observe::GrpcMetricsLayer::new(services.metrics))
        .layer(crate::deadline::DeadlineLayer)
        .add_service(IdentityServer::new(services.identity))
        .add_optional_service(services.controller.map(ControllerServer::new))
        .add_optional_service(services.node.map(NodeServer::new))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            shutdown.await;
            let _ = stopping_tx.send(());
        });
    let drained = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(drain).await;
        } else {
            std::future::pending::<()>().await;
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
    result.map_err(ServeError::from)
}
