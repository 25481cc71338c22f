//! A tower layer that counts every gRPC request: started, handled (by status code) and in flight,
//! per service and method. A request the client cancels is counted as handled with `Canceled`.
//! Method labels come only from CSI paths, so a client sending junk paths cannot blow up label
//! cardinality.
//!
//! The CSI methods' series are resolved once each, when a label lookup would first have made
//! them (so the exposition is the same: no series for a method never called, no OK series
//! before a method's first OK), not per request: a label lookup hashes both labels and takes
//! the family's lock, and four of them were a visible part of an attach RPC's cost.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use prometheus::{IntCounter, IntGauge};
use tonic::codegen::http;
use tower::{Layer, Service};

use crate::metrics::Metrics;

/// The methods of the vendored `csi.proto`, by service (a test holds this to the proto).
const CSI_METHODS: &[(&str, &[&str])] = &[
    (
        "csi.v1.Identity",
        &["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    ),
    (
        "csi.v1.Controller",
        &[
            "CreateVolume",
            "DeleteVolume",
            "ControllerPublishVolume",
            "ControllerUnpublishVolume",
            "ValidateVolumeCapabilities",
            "ListVolumes",
            "GetCapacity",
            "ControllerGetCapabilities",
            "CreateSnapshot",
            "DeleteSnapshot",
            "ListSnapshots",
            "GetSnapshot",
            "ControllerExpandVolume",
            "ControllerGetVolume",
            "ControllerModifyVolume",
        ],
    ),
    (
        "csi.v1.GroupController",
        &[
            "GroupControllerGetCapabilities",
            "CreateVolumeGroupSnapshot",
            "DeleteVolumeGroupSnapshot",
            "GetVolumeGroupSnapshot",
        ],
    ),
    (
        "csi.v1.Node",
        &[
            "NodeStageVolume",
            "NodeUnstageVolume",
            "NodePublishVolume",
            "NodeUnpublishVolume",
            "NodeGetVolumeStats",
            "NodeExpandVolume",
            "NodeGetCapabilities",
            "NodeGetInfo",
        ],
    ),
];

#[derive(Clone)]
pub struct GrpcMetricsLayer {
    table: Arc<Table>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let mut by_path = HashMap::new();
        let mut methods = Vec::new();
        for (service, names) in CSI_METHODS {
            for method in *names {
                by_path.insert(format!("/{service}/{method}"), methods.len());
                methods.push(Method {
                    service,
                    method,
                    series: OnceLock::new(),
                });
            }
        }
        Self {
            table: Arc::new(Table {
                metrics,
                by_path,
                methods,
            }),
        }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            table: self.table.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    table: Arc<Table>,
}

/// The CSI methods and their series; read without a lock once built.
struct Table {
    metrics: Arc<Metrics>,
    by_path: HashMap<String, usize>,
    methods: Vec<Method>,
}

struct Method {
    service: &'static str,
    method: &'static str,
    series: OnceLock<Series>,
}

/// One method's series: those every request of it touches. The OK series is made on the
/// method's first OK answer, not before, as a label lookup would make it.
struct Series {
    started: IntCounter,
    in_flight: IntGauge,
    handled_ok: OnceLock<IntCounter>,
}

impl Table {
    /// The index of the method at `path` and its series, made on its first request.
    fn method(&self, path: &str) -> Option<(usize, &Series)> {
        let index = *self.by_path.get(path)?;
        let method = &self.methods[index];
        let series = method.series.get_or_init(|| {
            let m = &self.metrics;
            let labels = [method.service, method.method];
            Series {
                started: m.grpc_started.with_label_values(&labels),
                in_flight: m.grpc_in_flight.with_label_values(&labels),
                handled_ok: OnceLock::new(),
            }
        });
        Some((index, series))
    }
}

/// `/csi.v1.Controller/ControllerPublishVolume` → ("csi.v1.Controller", "ControllerPublishVolume").
fn labels(path: &str) -> (String, String) {
    let known = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .filter(|(service, method)| {
            service.starts_with("csi.v1.")
                && service.len() < 64
                && !method.is_empty()
                && method.len() < 64
                && method.chars().all(|c| c.is_ascii_alphanumeric())
        });
    match known {
        Some((service, method)) => (service.to_string(), method.to_string()),
        None => ("unknown".into(), "unknown".into()),
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let in_flight = InFlight::enter(self.table.clone(), req.uri().path());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            // tonic answers errors "trailers-only", with grpc-status in the headers; a response
            // without it in the headers carries OK in its trailers.
            in_flight.answered(match &result {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(tonic::Code::from_i32)
                    .unwrap_or(tonic::Code::Ok),
                Err(_) => tonic::Code::Unknown,
            });
            result
        })
    }
}

/// One request in flight. Dropping it ends the request in the metrics, so a future dropped
/// before it resolves (the client reset the stream or closed its connection, and hyper dropped
/// the handler) is still taken out of the gauge and counted as handled, with `Canceled` as its
/// code, as go-grpc-prometheus counts a handler that returned on a cancelled context.
struct InFlight {
    table: Arc<Table>,
    labels: Labels,
    /// The answer's code, once the inner service has answered.
    code: Option<tonic::Code>,
}

/// Which series a request counts in: a CSI method's (index into the table) or, for any other
/// path, the labels [`labels`] gives it.
enum Labels {
    Csi(usize),
    Other(String, String),
}

impl InFlight {
    fn enter(table: Arc<Table>, path: &str) -> Self {
        let labels = match table.method(path) {
            Some((index, series)) => {
                series.started.inc();
                series.in_flight.inc();
                Labels::Csi(index)
            }
            None => {
                let (service, method) = labels(path);
                let m = &table.metrics;
                m.grpc_started.with_label_values(&[&service, &method]).inc();
                m.grpc_in_flight
                    .with_label_values(&[&service, &method])
                    .inc();
                Labels::Other(service, method)
            }
        };
        Self {
            table,
            labels,
            code: None,
        }
    }

    /// Ends the request with the code it was answered with.
    fn answered(mut self, code: tonic::Code) {
        self.code = Some(code);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        let m = &self.table.metrics;
        let (service, method) = match &self.labels {
            Labels::Csi(i) => {
                let method = &self.table.methods[*i];
                let series = method.series.get().expect("made when the request entered");
                series.in_flight.dec();
                if code == tonic::Code::Ok {
                    series
                        .handled_ok
                        .get_or_init(|| {
                            m.grpc_handled
                                .with_label_values(&[method.service, method.method, "OK"])
                        })
                        .inc();
                    return;
                }
                (method.service, method.method)
            }
            Labels::Other(service, method) => {
                m.grpc_in_flight.with_label_values(&[service, method]).dec();
                (service.as_str(), method.as_str())
            }
        };
        m.grpc_handled
            .with_label_values(&[service, method, &code_name(code)])
            .inc();
    }
}

/// gRPC's canonical code names, as Go's `codes.Code.String()` spells them, so dashboards built
/// on go-grpc-prometheus match.
fn code_name(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".into(),
        tonic::Code::Cancelled => "Canceled".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

    use tonic::codegen::http;
    use tower::{Layer, Service};

    use super::{labels, GrpcMetricsLayer, CSI_METHODS};
    use crate::metrics::Metrics;

    const PUBLISH: [&str; 2] = ["csi.v1.Controller", "ControllerPublishVolume"];

    fn request() -> http::Request<()> {
        http::Request::builder()
            .uri("/csi.v1.Controller/ControllerPublishVolume")
            .body(())
            .unwrap()
    }

    fn counts(metrics: &Metrics) -> (i64, u64, u64) {
        let handled = |code: &str| {
            metrics
                .grpc_handled
                .with_label_values(&[PUBLISH[0], PUBLISH[1], code])
                .get()
        };
        (
            metrics.grpc_in_flight.with_label_values(&PUBLISH).get(),
            handled("OK"),
            handled("Canceled"),
        )
    }

    #[test]
    fn a_request_dropped_before_its_answer_leaves_the_gauge_and_is_handled_as_canceled() {
        let metrics = Arc::new(Metrics::new());
        let mut service = GrpcMetricsLayer::new(metrics.clone()).layer(tower::service_fn(
            |_: http::Request<()>| std::future::pending::<Result<http::Response<()>, Infallible>>(),
        ));
        let mut pending = service.call(request());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(pending.as_mut().poll(&mut cx).is_pending());
        assert_eq!(counts(&metrics), (1, 0, 0));
        drop(pending);
        assert_eq!(counts(&metrics), (0, 0, 1));
        // Dropped before it was ever polled: the same.
        drop(service.call(request()));
        assert_eq!(counts(&metrics), (0, 0, 2));
    }

    #[test]
    fn an_answered_request_is_handled_with_its_code() {
        let metrics = Arc::new(Metrics::new());
        let mut service = GrpcMetricsLayer::new(metrics.clone()).layer(tower::service_fn(
            |_: http::Request<()>| async { Ok::<_, Infallible>(http::Response::new(())) },
        ));
        let mut answered = service.call(request());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(
            answered.as_mut().poll(&mut cx),
            Poll::Ready(Ok(_))
        ));
        drop(answered);
        assert_eq!(counts(&metrics), (0, 1, 0));
    }

    #[test]
    fn the_method_table_is_every_rpc_of_the_vendored_proto() {
        let proto = include_str!("../../proto/csi.proto");
        let mut from_proto: Vec<(String, Vec<String>)> = Vec::new();
        for line in proto.lines().map(str::trim) {
            if let Some(service) = line.strip_prefix("service ") {
                let name = service.trim_end_matches('{').trim();
                from_proto.push((format!("csi.v1.{name}"), Vec::new()));
            } else if let Some(rpc) = line.strip_prefix("rpc ") {
                let name = rpc.split('(').next().unwrap().trim().to_string();
                from_proto
                    .last_mut()
                    .expect("an rpc inside a service")
                    .1
                    .push(name);
            }
        }
        let table: Vec<(String, Vec<String>)> = CSI_METHODS
            .iter()
            .map(|(s, ms)| (s.to_string(), ms.iter().map(|m| m.to_string()).collect()))
            .collect();
        assert_eq!(table, from_proto);
    }

    #[test]
    fn a_failed_csi_request_and_an_unlisted_path_count_under_their_own_labels() {
        let metrics = Arc::new(Metrics::new());
        let mut service = GrpcMetricsLayer::new(metrics.clone()).layer(tower::service_fn(
            |_: http::Request<()>| async {
                Ok::<_, Infallible>(
                    http::Response::builder()
                        .header("grpc-status", "9")
                        .body(())
                        .unwrap(),
                )
            },
        ));
        let mut cx = Context::from_waker(Waker::noop());
        for uri in [
            "/csi.v1.Controller/ControllerPublishVolume",
            "/csi.v1.Controller/NotInTheProto",
        ] {
            let mut call = service.call(http::Request::builder().uri(uri).body(()).unwrap());
            assert!(call.as_mut().poll(&mut cx).is_ready());
        }
        let handled = |method: &str, code: &str| {
            metrics
                .grpc_handled
                .with_label_values(&["csi.v1.Controller", method, code])
                .get()
        };
        let started = |method: &str| {
            metrics
                .grpc_started
                .with_label_values(&["csi.v1.Controller", method])
                .get()
        };
        let in_flight = |method: &str| {
            metrics
                .grpc_in_flight
                .with_label_values(&["csi.v1.Controller", method])
                .get()
        };
        // Read before the lookups below make series: nothing was answered OK, so no OK
        // series exists (a scrape shows none), for the listed method as for the other.
        let codes: Vec<String> = prometheus::core::Collector::collect(&metrics.grpc_handled)
            .iter()
            .flat_map(|family| family.get_metric().to_vec())
            .flat_map(|m| m.get_label().to_vec())
            .filter(|l| l.name() == "grpc_code")
            .map(|l| l.value().to_string())
            .collect();
        assert_eq!(codes, ["FailedPrecondition", "FailedPrecondition"]);
        for method in ["ControllerPublishVolume", "NotInTheProto"] {
            assert_eq!(started(method), 1, "{method}");
            assert_eq!(in_flight(method), 0, "{method}");
            assert_eq!(handled(method, "FailedPrecondition"), 1, "{method}");
            assert_eq!(handled(method, "OK"), 0, "{method}");
        }
    }

    #[test]
    fn only_csi_paths_become_labels() {
        assert_eq!(
            labels("/csi.v1.Identity/Probe"),
            ("csi.v1.Identity".into(), "Probe".into())
        );
        assert_eq!(
            labels("/evil.Service/x"),
            ("unknown".into(), "unknown".into())
        );
        assert_eq!(
            labels("/csi.v1.Controller/a-b"),
            ("unknown".into(), "unknown".into())
        );
        assert_eq!(labels("nonsense"), ("unknown".into(), "unknown".into()));
    }
}
