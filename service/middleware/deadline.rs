//! The call's deadline: the shorter of the caller's `grpc-timeout` and the
//! server's bound (`server.request_timeout`). The rest of the call runs
//! inside [`Deadline::scope`], so the code it runs can read the deadline
//! with [`Deadline::current`] (and it is in the request's extensions for
//! handlers); past it the call's future is dropped, which cancels what it
//! awaits, and the call is answered DEADLINE_EXCEEDED. Health and reflection
//! have no deadline: health `Watch` streams stay open.

use std::time::Duration;

use http::{HeaderMap, Request};
use tonic::body::Body;

use super::{CallFuture, Inner, Middleware, status_response};
use crate::{error::Error, model::deadline::Deadline};

/// Bounds every call by its deadline.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// The longest any call may run, whatever its caller asks.
    max: Duration,
}

impl Deadlines {
    pub fn new(max: Duration) -> Self {
        Self { max }
    }
}

impl Middleware for Deadlines {
    const SKIPS_INFRASTRUCTURE: bool = true;

    fn handle<S: Inner>(&self, mut request: Request<Body>, inner: &mut S) -> CallFuture<S::Error> {
        let timeout =
            parse_grpc_timeout(request.headers()).map_or(self.max, |caller| caller.min(self.max));
        let deadline = Deadline::after(timeout);
        request.extensions_mut().insert(deadline);
        let response = deadline.scope(inner.call(request));
        Box::pin(async move {
            match tokio::time::timeout_at(deadline.instant(), response).await {
                Ok(response) => response,
                Err(_elapsed) => Ok(status_response(Error::deadline_exceeded())),
            }
        })
    }
}

/// Parses `grpc-timeout` (gRPC over HTTP/2: up to 8 digits and a unit).
/// A malformed header is ignored, as other gRPC servers do.
pub fn parse_grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::{HeaderValue, Response};
    use tonic::Code;
    use tower::{Layer as _, ServiceExt as _, service_fn};

    use super::*;

    /// Calls `path` through the deadline middleware (bound `max`, the
    /// caller's `grpc-timeout` if any) in front of a handler that takes
    /// `work`; returns the deadline the handler saw (and the one in the
    /// request's extensions) and the grpc-status of the answer, if the
    /// middleware answered.
    async fn call(
        path: &str,
        max: Duration,
        grpc_timeout: Option<&str>,
        work: Duration,
    ) -> (Option<(Option<Deadline>, Option<Deadline>)>, Option<Code>) {
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let handler = service_fn(move |request: Request<Body>| {
            let seen_tx = seen_tx.clone();
            async move {
                let _ = seen_tx.send((
                    Deadline::current(),
                    request.extensions().get::<Deadline>().copied(),
                ));
                tokio::time::sleep(work).await;
                Ok::<_, Infallible>(Response::new(Body::empty()))
            }
        });
        let mut request = Request::builder().uri(path);
        if let Some(timeout) = grpc_timeout {
            request = request.header("grpc-timeout", timeout);
        }
        let response = Deadlines::new(max)
            .into_layer()
            .layer(handler)
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let code = response
            .headers()
            .get("grpc-status")
            .map(|v| Code::from_i32(v.to_str().unwrap().parse().unwrap()));
        (seen_rx.try_recv().ok(), code)
    }

    const SERVICE_CALL: &str = "/datagate.v1.UserService/GetUser";

    #[tokio::test]
    async fn the_handler_runs_under_the_callers_deadline_bounded_by_the_server() {
        for (max, grpc_timeout, expected) in [
            (Duration::from_secs(30), None, Duration::from_secs(30)),
            (Duration::from_secs(30), Some("2S"), Duration::from_secs(2)),
            (Duration::from_secs(5), Some("1M"), Duration::from_secs(5)),
        ] {
            let (seen, code) = call(SERVICE_CALL, max, grpc_timeout, Duration::ZERO).await;
            let (current, extension) = seen.expect("the handler ran");
            let current = current.expect("the handler sees the call's deadline");
            assert_eq!(
                extension,
                Some(current),
                "the same deadline in the extensions"
            );
            let remaining = current.remaining();
            assert!(
                remaining <= expected && remaining > expected - Duration::from_secs(1),
                "{grpc_timeout:?} under {max:?}: {remaining:?} left"
            );
            assert_eq!(code, None, "answered by the handler");
        }
    }

    #[tokio::test]
    async fn a_handler_past_the_deadline_is_answered_deadline_exceeded() {
        let (seen, code) = call(
            SERVICE_CALL,
            Duration::from_secs(30),
            Some("20m"),
            Duration::from_secs(30),
        )
        .await;
        assert!(seen.is_some(), "the handler started");
        assert_eq!(code, Some(Code::DeadlineExceeded));
    }

    #[tokio::test]
    async fn health_checks_have_no_deadline() {
        let (seen, code) = call(
            "/grpc.health.v1.Health/Watch",
            Duration::from_millis(20),
            None,
            Duration::from_millis(60),
        )
        .await;
        assert_eq!(seen, Some((None, None)));
        assert_eq!(code, None, "not cut off by the server's bound");
    }

    fn headers(timeout: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_str(timeout).unwrap());
        h
    }

    #[test]
    fn grpc_timeouts_parse_every_unit() {
        for (header, expected) in [
            ("2H", Duration::from_secs(7200)),
            ("3M", Duration::from_secs(180)),
            ("4S", Duration::from_secs(4)),
            ("250m", Duration::from_millis(250)),
            ("7u", Duration::from_micros(7)),
            ("9n", Duration::from_nanos(9)),
        ] {
            assert_eq!(
                parse_grpc_timeout(&headers(header)),
                Some(expected),
                "{header}"
            );
        }
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for bad in ["", "S", "10", "123456789S", "-1S", "10x", "1.5S"] {
            assert_eq!(parse_grpc_timeout(&headers(bad)), None, "{bad:?}");
        }
    }
}
