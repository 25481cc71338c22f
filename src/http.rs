//! The operator's HTTP endpoint on `--metrics-address`: `/metrics` (Prometheus text), `/healthz`
//! (the process answers), `/readyz` (attachment state rebuilt) and `/debug/attachments` (live
//! attachment state as JSON; `?volume=ID` for one volume). Read-only: it never changes state, and
//! it never waits on a busy volume actor past [`DESCRIBE_DEADLINE`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::time::{timeout_at, Instant};

use crate::actors::messages::{Describe, ListActors, Lookup};
use crate::actors::supervisor::Supervisor;
use crate::actors::volume::VolumeActor;
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

/// How long `/debug/attachments` waits for volume actors, all of them asked at once. An actor
/// busy with a publish whose live checks await the API answers only when that I/O ends, so
/// the listing does not wait for it: it reports the volume as unanswered instead.
pub const DESCRIBE_DEADLINE: Duration = Duration::from_secs(2);

/// Every volume with an attachment or a grace record, sorted by id, and `unanswered`: the
/// volumes whose actor did not answer within [`DESCRIBE_DEADLINE`] (busy with an operation),
/// whose state is therefore not listed. With `?volume=ID`, that volume; 503 if its actor did
/// not answer in time.
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
    let deadline = Instant::now() + DESCRIBE_DEADLINE;
    let supervisor_late = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the supervisor did not answer within {DESCRIBE_DEADLINE:?}"),
        )
    };
    if let Some(raw) = query.get("volume") {
        let volume = match VolumeId::try_from(raw.as_str()) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let view = match timeout_at(deadline, supervisor.send(Lookup(volume.clone()))).await {
            Ok(Ok(Ok(Some(addr)))) => match describe(addr, deadline).await {
                Answer::View(view) => view,
                Answer::Gone => None,
                Answer::Late => {
                    return json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({
                            "error": format!("volume {volume} did not answer within {DESCRIBE_DEADLINE:?}: an operation on it is in progress"),
                            "unanswered": [volume.as_str()],
                        }),
                    )
                }
            },
            Ok(Ok(Ok(None))) => None,
            Ok(Ok(Err(e))) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            Ok(Err(_)) => {
                return error(StatusCode::SERVICE_UNAVAILABLE, "supervisor stopped".into())
            }
            Err(_) => return supervisor_late(),
        };
        return match view {
            Some(v) => json(StatusCode::OK, with_id(&volume, v)),
            None => error(
                StatusCode::NOT_FOUND,
                format!("volume {volume} is not attached and has no grace record"),
            ),
        };
    }
    let listing = match timeout_at(deadline, supervisor.send(ListActors)).await {
        Ok(Ok(listing)) => listing,
        Ok(Err(_)) => return error(StatusCode::SERVICE_UNAVAILABLE, "supervisor stopped".into()),
        Err(_) => return supervisor_late(),
    };
    let answers = futures::future::join_all(
        listing
            .actors
            .into_iter()
            .map(|(volume, addr)| async move { (volume, describe(addr, deadline).await) }),
    )
    .await;
    let mut volumes = listing.parked;
    let mut unanswered = Vec::new();
    for (volume, answer) in answers {
        match answer {
            Answer::View(Some(view)) => volumes.push((volume, view)),
            Answer::View(None) | Answer::Gone => {}
            Answer::Late => unanswered.push(volume),
        }
    }
    volumes.sort_by(|a, b| a.0.cmp(&b.0));
    unanswered.sort();
    let count = volumes.len();
    let volumes: Vec<_> = volumes.into_iter().map(|(id, v)| with_id(&id, v)).collect();
    let unanswered: Vec<_> = unanswered.iter().map(VolumeId::as_str).collect();
    json(
        StatusCode::OK,
        serde_json::json!({ "count": count, "volumes": volumes, "unanswered": unanswered }),
    )
}

/// What a volume actor said when asked to describe itself.
enum Answer {
    /// Its view; `None` when it has neither attachment nor grace record.
    View(Option<serde_json::Value>),
    /// It retired or stopped between the listing and the question.
    Gone,
    /// No answer by the deadline.
    Late,
}

async fn describe(addr: Addr<VolumeActor>, deadline: Instant) -> Answer {
    // Dropping the request at the deadline withdraws the question: actix skips a message
    // whose asker has gone, so a busy actor does not describe itself to nobody later.
    match timeout_at(deadline, addr.send(Describe)).await {
        Ok(Ok(Ok(view))) => Answer::View(view),
        Ok(Ok(Err(_)) | Err(_)) => Answer::Gone,
        Err(_) => Answer::Late,
    }
}

fn with_id(volume: &VolumeId, mut view: serde_json::Value) -> serde_json::Value {
    if let Some(map) = view.as_object_mut() {
        map.insert("volume_id".into(), volume.as_str().into());
    }
    view
}
