//! A tower layer that counts every gRPC request: started, handled (by status code) and in flight,
//! per service and method. A request the client cancels is counted as handled with `Canceled`.
//! Method labels come only from CSI paths, so a client sending junk paths cannot blow up label
//! cardinality.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tower::{Layer, Service};

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
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
        let (service, method) = labels(req.uri().path());
        self.metrics
            .grpc_started
            .with_label_values(&[&service, &method])
            .inc();
        let in_flight = InFlight::enter(self.metrics.clone(), service, method);
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
    metrics: Arc<Metrics>,
    service: String,
    method: String,
    /// The answer's code, once the inner service has answered.
    code: Option<tonic::Code>,
}

impl InFlight {
    fn enter(metrics: Arc<Metrics>, service: String, method: String) -> Self {
        metrics
            .grpc_in_flight
            .with_label_values(&[&service, &method])
            .inc();
        Self {
            metrics,
            service,
            method,
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
        let labels = [self.service.as_str(), self.method.as_str()];
        self.metrics.grpc_in_flight.with_label_values(&labels).dec();
        let code = code_name(self.code.unwrap_or(tonic::Code::Cancelled));
        self.metrics
            .grpc_handled
            .with_label_values(&[labels[0], labels[1], &code])
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

    use super::{labels, GrpcMetricsLayer};
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
