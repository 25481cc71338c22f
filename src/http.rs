//! The operator's HTTP endpoints. On `--metrics-address`: `/metrics` (Prometheus text),
//! `/healthz` (the process answers) and `/readyz` (attachment state rebuilt), which Prometheus
//! and the kubelet must reach. On its own listener, `--debug-address` (loopback by default, a
//! controller only): `/debug/attachments`, live attachment state as JSON, a page at a time
//! (`?limit=N&after=ID`, [`DEFAULT_PAGE`] and at most [`MAX_PAGE`] volumes; `next` names the
//! following page's `after`), or `?volume=ID` for one volume. It names nodes and volumes, so it
//! is not served where the metrics are. Read-only: nothing here changes state, and the debug
//! view never waits on a busy volume actor past [`DESCRIBE_DEADLINE`].

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
    /// The controller's storage: `/readyz` is 503 while it cannot be reached.
    pub backend: Option<Arc<dyn crate::backend::VolumeBackend>>,
}

/// `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(state));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// `/debug/attachments` on `listener` until `shutdown`: the controller's attachment state.
pub async fn serve_debug(
    listener: tokio::net::TcpListener,
    supervisor: Addr<Supervisor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/debug/attachments", get(attachments))
        .with_state(supervisor);
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

/// Volumes one page lists unless `?limit=` says otherwise.
pub const DEFAULT_PAGE: usize = 1000;
/// The most one page lists: a page is described at once, on the supervisor's thread.
pub const MAX_PAGE: usize = 5000;

/// One page of the volumes with an attachment or a grace record, sorted by id: `count` and
/// `volumes` (those listed), `unanswered` (the volumes of this page whose actor did not answer
/// within [`DESCRIBE_DEADLINE`], busy with an operation, whose state is therefore not listed)
/// and `next` (the last volume id of this page when more follow, else null: pass it as
/// `?after=`). `?limit=` of 1 to [`MAX_PAGE`]; 400 for anything else, or an `after` that is
/// not a volume id. With `?volume=ID`, that volume; 503 if its actor did not answer in time.
async fn attachments(
    State(supervisor): State<Addr<Supervisor>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let supervisor = &supervisor;
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
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => DEFAULT_PAGE,
        Some(Ok(l)) if (1..=MAX_PAGE).contains(&l) => l,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("limit must be a whole number from 1 to {MAX_PAGE}"),
            )
        }
    };
    let after = match query.get("after").map(|a| VolumeId::try_from(a.as_str())) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("after: {e}")),
    };
    let page = ListActors { after, limit };
    let listing = match timeout_at(deadline, supervisor.send(page)).await {
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
    let next = listing.next.as_ref().map(VolumeId::as_str);
    json(
        StatusCode::OK,
        serde_json::json!({ "count": count, "volumes": volumes, "unanswered": unanswered, "next": next }),
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
