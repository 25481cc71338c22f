//! The operator's HTTP endpoint on `--metrics-address`: `/metrics` (Prometheus text), `/healthz`
//! (the process answers), `/readyz` (attachment state rebuilt) and `/debug/attachments` (live
//! attachment state as JSON; `?volume=ID` for one volume). Read-only: it never changes state.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::Addr;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::actors::messages::{Describe, ListActors, Lookup};
use crate::actors::supervisor::Supervisor;
use crate::ids::VolumeId;
use crate::metrics::Metrics;

pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    /// Absent in node mode: there is no attachment state to show.
    pub supervisor: Option<Addr<Supervisor>>,
    /// The controller's storage: `/readyz` is 503 while it cannot be reached.
    pub backend: Option<Arc<dyn crate::backend::VolumeBackend>>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/debug/attachments", get(attachments))
        .with_state(Arc::new(state));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(s): State<Arc<HttpState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(s): State<Arc<HttpState>>) -> Response {
    if s.backend.as_ref().is_some_and(|b| !b.ready()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the storage backend cannot be reached\n",
        )
            .into_response();
    }
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "attachment state is still being rebuilt\n",
        )
            .into_response()
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    let body = serde_json::to_string_pretty(&value).unwrap_or_default() + "\n";
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error(status: StatusCode, message: String) -> Response {
    json(status, serde_json::json!({ "error": message }))
}

/// Every volume with an attachment or a grace record, sorted by id; or one with `?volume=ID`.
async fn attachments(
    State(s): State<Arc<HttpState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(supervisor) = &s.supervisor else {
        return error(
            StatusCode::NOT_FOUND,
            "this process runs no controller".into(),
        );
    };
    if let Some(raw) = query.get("volume") {
        let volume = match VolumeId::try_from(raw.as_str()) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let view = match supervisor.send(Lookup(volume.clone())).await {
            Ok(Ok(Some(addr))) => addr
                .send(Describe)
                .await
                .ok()
                .and_then(Result::ok)
                .flatten(),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "supervisor stopped".into()),
        };
        return match view {
            Some(v) => json(StatusCode::OK, with_id(&volume, v)),
            None => error(
                StatusCode::NOT_FOUND,
                format!("volume {volume} is not attached and has no grace record"),
            ),
        };
    }
    let Ok(listing) = supervisor.send(ListActors).await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "supervisor stopped".into());
    };
    let views =
        futures::future::join_all(listing.actors.into_iter().map(|(volume, addr)| async move {
            let view = addr
                .send(Describe)
                .await
                .ok()
                .and_then(Result::ok)
                .flatten();
            view.map(|v| (volume, v))
        }))
        .await;
    let mut volumes: Vec<_> = views.into_iter().flatten().chain(listing.parked).collect();
    volumes.sort_by(|a, b| a.0.cmp(&b.0));
    let count = volumes.len();
    let volumes: Vec<_> = volumes.into_iter().map(|(id, v)| with_id(&id, v)).collect();
    json(
        StatusCode::OK,
        serde_json::json!({ "count": count, "volumes": volumes }),
    )
}

fn with_id(volume: &VolumeId, mut view: serde_json::Value) -> serde_json::Value {
    if let Some(map) = view.as_object_mut() {
        map.insert("volume_id".into(), volume.as_str().into());
    }
    view
}
