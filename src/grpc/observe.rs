//! A tower layer that counts every gRPC request: started, handled (by status code) and in flight,
//! per service and method. Method labels come only from CSI paths, so a client sending junk paths
//! cannot blow up label cardinality.

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
        let metrics = self.metrics.clone();
        metrics
            .grpc_started
            .with_label_values(&[&service, &method])
            .inc();
        let in_flight = metrics
            .grpc_in_flight
            .with_label_values(&[&service, &method]);
        in_flight.inc();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            in_flight.dec();
            // tonic answers errors "trailers-only", with grpc-status in the headers; a response
            // without it in the headers carries OK in its trailers.
            let code = match &result {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(tonic::Code::from_i32)
                    .unwrap_or(tonic::Code::Ok),
                Err(_) => tonic::Code::Unknown,
            };
            metrics
                .grpc_handled
                .with_label_values(&[&service, &method, &code_name(code)])
                .inc();
            result
        })
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
    use super::labels;

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
