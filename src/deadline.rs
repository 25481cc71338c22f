//! The caller's deadline, carried with the call down to the code that waits on the network.
//!
//! Owns reading a gRPC request's `grpc-timeout` header into an instant by which the answer must
//! be on its way, and keeping that instant in a task-local for the request's handler, so a
//! layer far below (the RDS's SSH pool) can decide whether waiting for something (a reconnect)
//! is worth it. It is the caller's own budget, not a second one: a call that comes without a
//! deadline gets none here, and each layer keeps its own bound (`--rds-command-timeout`).
//! Knows nothing of what is waited on.
//!
//! A task-local reaches only what runs inside the request's task; work handed to an actor runs
//! elsewhere and carries its own deadline ([`scope`] around it), as Publish does with its
//! live-check budget.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;
use tonic::codegen::http;
use tower::{Layer, Service};

tokio::task_local! {
    static REPLY_BY: Instant;
}

/// The most of a caller's deadline kept back for the answer to travel, and for it to beat
/// tonic's own timer (armed when the request arrived, a moment before ours): a tenth of the
/// timeout, at most this.
const REPLY_MARGIN_CAP: Duration = Duration::from_secs(1);

/// When the current call's answer must leave, if its caller set a deadline.
pub fn current() -> Option<Instant> {
    REPLY_BY.try_with(|at| *at).ok()
}

/// Runs `f` with `reply_by` as its deadline (or with the one it already has, if `None`). A
/// nested deadline never extends an outer one.
pub async fn scope<F: Future>(reply_by: Option<Instant>, f: F) -> F::Output {
    let at = match (current(), reply_by) {
        (Some(outer), Some(inner)) => Some(outer.min(inner)),
        (outer, inner) => inner.or(outer),
    };
    match at {
        Some(at) => REPLY_BY.scope(at, f).await,
        None => f.await,
    }
}

/// The instant by which to answer a call received at `received` with `timeout`: the deadline,
/// less a tenth of the timeout (at most [`REPLY_MARGIN_CAP`]). `None` for a timeout too far
/// ahead for the clock to hold, which is as good as none.
pub fn reply_by(received: Instant, timeout: Duration) -> Option<Instant> {
    received.checked_add(timeout - (timeout / 10).min(REPLY_MARGIN_CAP))
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimeoutError {
    #[error("grpc-timeout {0:?} is not 1 to 8 digits and a unit (H, M, S, m, u, n)")]
    Malformed(String),
}

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits and a unit, `H`ours, `M`inutes,
/// `S`econds, `m`illis, `u`micros or `n`anos (gRPC over HTTP/2, "Requests").
pub fn parse_grpc_timeout(value: &str) -> Result<Duration, TimeoutError> {
    let malformed = || TimeoutError::Malformed(value.chars().take(16).collect());
    let split = value.len().checked_sub(1).ok_or_else(malformed)?;
    if !value.is_char_boundary(split) {
        return Err(malformed());
    }
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    let n: u64 = digits.parse().map_err(|_| malformed())?;
    Ok(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(malformed()),
    })
}

/// Puts each request's deadline (from `grpc-timeout`) in the task-local its handler sees. A
/// request without the header, or with a malformed one (tonic ignores those too), runs with
/// none.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = WithDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WithDeadline { inner }
    }
}

#[derive(Clone, Debug)]
pub struct WithDeadline<S> {
    inner: S,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for WithDeadline<S>
where
    S: Service<http::Request<ReqBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let at = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_grpc_timeout(v).ok())
            .and_then(|timeout| reply_by(Instant::now(), timeout));
        let fut = self.inner.call(req);
        Box::pin(scope(at, fut))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_unit_of_the_grpc_spec_parses() {
        for (value, want) in [
            ("2H", Duration::from_secs(7200)),
            ("3M", Duration::from_secs(180)),
            ("30S", Duration::from_secs(30)),
            ("14999m", Duration::from_millis(14999)),
            ("99999999u", Duration::from_micros(99_999_999)),
            ("5n", Duration::from_nanos(5)),
        ] {
            assert_eq!(parse_grpc_timeout(value), Ok(want), "{value}");
        }
    }

    #[test]
    fn malformed_timeouts_are_refused() {
        for value in [
            "",
            "S",
            "10",
            "123456789S",
            "1.5S",
            "-1S",
            "10s",
            "10 S",
            "+1S",
            "1é",
        ] {
            assert!(parse_grpc_timeout(value).is_err(), "{value:?}");
        }
    }

    /// Catches the margin dropped from `reply_by` (the answer would race tonic's timer) or
    /// grown past the cap (a long deadline would be cut short).
    #[test]
    fn the_answer_leaves_before_the_deadline_by_a_tenth_at_most_a_second() {
        let t0 = Instant::now();
        assert_eq!(
            reply_by(t0, Duration::from_secs(5)),
            Some(t0 + Duration::from_millis(4500))
        );
        assert_eq!(
            reply_by(t0, Duration::from_secs(30)),
            Some(t0 + Duration::from_secs(29))
        );
        assert_eq!(reply_by(t0, Duration::ZERO), Some(t0));
    }

    /// Catches a nested scope that replaces, rather than narrows, the outer deadline.
    #[tokio::test]
    async fn a_nested_deadline_only_ever_narrows() {
        let t0 = Instant::now();
        let (near, far) = (t0 + Duration::from_secs(1), t0 + Duration::from_secs(9));
        assert_eq!(current(), None);
        let seen = scope(Some(near), scope(Some(far), async { current() })).await;
        assert_eq!(seen, Some(near));
        let seen = scope(Some(far), scope(Some(near), async { current() })).await;
        assert_eq!(seen, Some(near));
        let seen = scope(Some(far), scope(None, async { current() })).await;
        assert_eq!(seen, Some(far));
    }

    proptest! {
        /// Any text: a value or a typed error, never a panic; what parses ends in a unit.
        #[test]
        fn parsing_never_panics(s in "\\PC{0,12}") {
            if parse_grpc_timeout(&s).is_ok() {
                prop_assert!(s.ends_with(['H', 'M', 'S', 'm', 'u', 'n']), "{:?}", s);
            }
        }

        #[test]
        fn digits_and_a_unit_round_trip(n in 0u64..100_000_000, unit in "[HMSmun]") {
            let d = parse_grpc_timeout(&format!("{n}{unit}")).unwrap();
            let nanos = match unit.as_str() {
                "H" => n as u128 * 3_600_000_000_000,
                "M" => n as u128 * 60_000_000_000,
                "S" => n as u128 * 1_000_000_000,
                "m" => n as u128 * 1_000_000,
                "u" => n as u128 * 1_000,
                _ => n as u128,
            };
            prop_assert_eq!(d.as_nanos(), nanos);
        }
    }
}
