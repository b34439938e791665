//! The tower stack in front of every gRPC service, outermost first:
//!
//! 1. [`RpcLayer`]: the request id (`x-request-id` accepted or generated,
//!    returned), one tracing span per call (a child of the caller's W3C trace
//!    context), and when the call ends, its metrics and one log line with the
//!    final status code. It is outermost so that rejected calls are counted
//!    and logged too.
//! 2. [`AuthLayer`]: the caller's identity from the bearer token, recorded in
//!    the span and attached to the request; health and reflection are open.
//! 3. [`DeadlineLayer`]: the shorter of the caller's `grpc-timeout` and the
//!    server's bound; past it the call is dropped (which cancels its queries)
//!    and answered with DEADLINE_EXCEEDED.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};
use tracing::{Instrument as _, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{
    auth::{Caller, TokenStore},
    error::{Detail, Error},
    statements::{self, RequestLog},
    telemetry::HeaderExtractor,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
const MAX_REQUEST_ID_LEN: usize = 128;

/// The request id of the current call, in the request's extensions.
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

/// When the current call must be finished, in the request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(pub Instant);

/// Health checks and reflection need no token and no deadline: probes and
/// tools call them, and health `Watch` streams stay open.
fn is_infrastructure(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

fn status_response(error: Error) -> Response<Body> {
    Status::from(error).into_http()
}

// ---------------------------------------------------------------------------
// Request id, span, metrics and the per-call log line.

#[derive(Clone, Copy, Debug)]
pub struct RpcLayer {
    n_plus_one_threshold: u32,
}

impl RpcLayer {
    pub fn new(n_plus_one_threshold: u32) -> Self {
        Self {
            n_plus_one_threshold,
        }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = Rpc<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rpc {
            inner,
            n_plus_one_threshold: self.n_plus_one_threshold,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Rpc<S> {
    inner: S,
    n_plus_one_threshold: u32,
}

impl<S> Service<Request<Body>> for Rpc<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let request_id = request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|id| is_valid_request_id(id))
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        let request_id_header =
            HeaderValue::from_str(&request_id).expect("request ids are visible ASCII");
        request
            .headers_mut()
            .insert(REQUEST_ID_HEADER, request_id_header.clone());
        request
            .extensions_mut()
            .insert(RequestId(request_id.as_str().into()));

        let path = request.uri().path().to_owned();
        let (service, method) = split_path(&path);
        let span = tracing::info_span!(
            "rpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
            request_id = %request_id,
            caller = Empty,
            db.statements = Empty,
            db.max_repeats = Empty,
            cache_hit = Empty,
        );
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(request.headers()))
        });
        let _ = span.set_parent(parent);

        let mut call = CallRecord {
            span: span.clone(),
            service: service.to_owned(),
            method: method.to_owned(),
            infrastructure: is_infrastructure(&path),
            start: Instant::now(),
            code: None,
            statements: Arc::new(RequestLog::default()),
            n_plus_one_threshold: self.n_plus_one_threshold,
        };
        let response = span.in_scope(|| self.inner.call(request));
        let statements = call.statements.clone();
        Box::pin(
            async move {
                let mut response = statements::scope(statements, response).await?;
                response
                    .headers_mut()
                    .insert(REQUEST_ID_HEADER, request_id_header);
                // A trailers-only response (an error) has its status in the
                // headers; otherwise it comes in the trailers.
                call.code = grpc_status(response.headers());
                Ok(response.map(|inner| {
                    Body::new(ObservedBody {
                        inner,
                        call: Some(call),
                    })
                }))
            }
            .instrument(span),
        )
    }
}

fn is_valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

/// `/datagate.v1.UserService/GetUser` → (`datagate.v1.UserService`, `GetUser`).
fn split_path(path: &str) -> (&str, &str) {
    path.trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("unknown", "unknown"))
}

fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

/// Records a call's outcome exactly once: when its response body ends, or
/// when the body is dropped early (the caller went away: CANCELLED).
struct CallRecord {
    span: Span,
    service: String,
    method: String,
    infrastructure: bool,
    start: Instant,
    code: Option<Code>,
    /// The statements the call ran, counted while its handler ran.
    statements: Arc<RequestLog>,
    n_plus_one_threshold: u32,
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(Code::Cancelled);
        let elapsed = self.start.elapsed();
        let code_name = code_name(code);
        // Unknown methods must not mint new label values.
        let method = if code == Code::Unimplemented {
            "unknown".to_owned()
        } else {
            self.method.clone()
        };
        let labels = [
            ("service", self.service.clone()),
            ("method", method),
            ("code", code_name.to_owned()),
        ];
        metrics::counter!("rpc_requests_total", &labels).increment(1);
        metrics::histogram!("rpc_latency_seconds", &labels).record(elapsed.as_secs_f64());

        self.span.record("rpc.grpc.status_code", code as i32);
        self.span.record("db.statements", self.statements.total());
        self.span
            .record("db.max_repeats", self.statements.max_repeats());
        if let Some(hit) = self.statements.cache_hit() {
            self.span.record("cache_hit", hit);
        }
        let server_fault = is_server_fault(code);
        if server_fault {
            self.span.record("otel.status_code", "ERROR");
        }
        let _entered = self.span.enter();
        if self.statements.max_repeats() > self.n_plus_one_threshold {
            statements::report_n_plus_one(
                &self.statements,
                self.n_plus_one_threshold,
                &format!("{}/{}", self.service, self.method),
            );
        }
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        if self.infrastructure {
            tracing::debug!(code = code_name, duration_ms, "rpc finished");
        } else if server_fault {
            tracing::warn!(code = code_name, duration_ms, "rpc finished");
        } else {
            tracing::info!(code = code_name, duration_ms, "rpc finished");
        }
    }
}

fn is_server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

/// The canonical upper-case name of a status code, as used in metrics.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

pin_project_lite::pin_project! {
    /// Passes the response body through and reads the final status from the
    /// trailers.
    struct ObservedBody {
        #[pin]
        inner: Body,
        call: Option<CallRecord>,
    }
}

impl http_body::Body for ObservedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(call)) = (frame.trailers_ref(), this.call.as_mut())
                    && let Some(code) = grpc_status(trailers)
                {
                    call.code = Some(code);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                if let Some(call) = this.call.as_mut() {
                    call.code = Some(status.code());
                }
            }
            Poll::Ready(None) => drop(this.call.take()),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

// ---------------------------------------------------------------------------
// Caller identity.

#[derive(Clone)]
pub struct AuthLayer {
    tokens: TokenStore,
}

impl AuthLayer {
    pub fn new(tokens: TokenStore) -> Self {
        Self { tokens }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: TokenStore,
}

impl<S> Service<Request<Body>> for Auth<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        if is_infrastructure(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        match self.authenticate(request.headers()) {
            Ok(caller) => {
                Span::current().record("caller", caller.name());
                request.extensions_mut().insert(caller);
                Box::pin(self.inner.call(request))
            }
            Err(error) => Box::pin(std::future::ready(Ok(status_response(error)))),
        }
    }
}

impl<S> Auth<S> {
    fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, Error> {
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::Unauthenticated(Detail::new(
                    "MISSING_CREDENTIALS",
                    "missing bearer token: send `authorization: Bearer <token>` metadata",
                ))
            })?;
        self.tokens.authenticate(token).ok_or_else(|| {
            Error::Unauthenticated(Detail::new(
                "INVALID_CREDENTIALS",
                "unknown bearer token: check the token configured for this caller",
            ))
        })
    }
}

// ---------------------------------------------------------------------------
// Deadlines.

#[derive(Clone, Copy, Debug)]
pub struct DeadlineLayer {
    max: Duration,
}

impl DeadlineLayer {
    pub fn new(max: Duration) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            inner,
            max: self.max,
        }
    }
}

#[derive(Clone, Debug)]
pub struct DeadlineService<S> {
    inner: S,
    max: Duration,
}

impl<S> Service<Request<Body>> for DeadlineService<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        if is_infrastructure(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        let timeout =
            parse_grpc_timeout(request.headers()).map_or(self.max, |caller| caller.min(self.max));
        let deadline = Instant::now() + timeout;
        request.extensions_mut().insert(Deadline(deadline));
        let response = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline.into(), response).await {
                Ok(response) => response,
                Err(_elapsed) => Ok(status_response(Error::deadline_exceeded())),
            }
        })
    }
}

/// Parses `grpc-timeout` (gRPC over HTTP/2: up to 8 digits and a unit).
/// A malformed header is ignored, as other gRPC servers do.
fn parse_grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
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
    use super::*;

    fn headers(timeout: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_str(timeout).unwrap());
        h
    }

    #[test]
    fn grpc_timeouts_parse_every_unit() {
        assert_eq!(
            parse_grpc_timeout(&headers("2H")),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(
            parse_grpc_timeout(&headers("3M")),
            Some(Duration::from_secs(180))
        );
        assert_eq!(
            parse_grpc_timeout(&headers("4S")),
            Some(Duration::from_secs(4))
        );
        assert_eq!(
            parse_grpc_timeout(&headers("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse_grpc_timeout(&headers("7u")),
            Some(Duration::from_micros(7))
        );
        assert_eq!(
            parse_grpc_timeout(&headers("9n")),
            Some(Duration::from_nanos(9))
        );
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for bad in ["", "S", "10", "123456789S", "-1S", "10x", "1.5S"] {
            assert_eq!(parse_grpc_timeout(&headers(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn request_ids_must_be_short_visible_ascii() {
        assert!(is_valid_request_id("abc-123"));
        assert!(!is_valid_request_id(""));
        assert!(!is_valid_request_id("has space"));
        assert!(!is_valid_request_id(&"x".repeat(129)));
    }

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/datagate.v1.UserService/GetUser"),
            ("datagate.v1.UserService", "GetUser")
        );
        assert_eq!(split_path("/"), ("unknown", "unknown"));
    }
}
