//! The outermost middleware: what every call gets, rejected calls included.
//!
//! - a request id: the caller's `x-request-id` when it is short visible
//!   ASCII, a new UUID otherwise; in the request's extensions ([`RequestId`],
//!   for the audit actor) and returned in the response headers;
//! - one `rpc` tracing span, a child of the caller's W3C trace context, with
//!   the OpenTelemetry RPC attributes;
//! - the call's statement log (`statements::scope`), for N+1 detection;
//! - when the response body ends (or is dropped: the caller went away), one
//!   [`CallRecord`]: `rpc_requests_total` and `rpc_latency_seconds` by
//!   service, method and code, the span's final fields, and one log line.
//!
//! Health and reflection calls pass through it too (counted, logged at debug).

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, OnceLock},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request};
use http_body::Frame;
use tonic::{Code, Status, body::Body};
use tracing::{Instrument as _, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::{CallFuture, HeldBody, HeldUntilEnd, Inner, Middleware, is_infrastructure};
use crate::{
    statements::{self, RequestLog},
    telemetry::HeaderExtractor,
};

pub const REQUEST_ID_HEADER: &str = "x-request-id";
const MAX_REQUEST_ID_LEN: usize = 128;

pub use crate::model::audit::RequestId;

/// Request id, span, metrics and the per-call log line.
#[derive(Clone, Copy, Debug)]
pub struct Rpc {
    /// More repeats of one statement shape than this in a call is an N+1.
    n_plus_one_threshold: u32,
}

impl Rpc {
    pub fn new(n_plus_one_threshold: u32) -> Self {
        Self {
            n_plus_one_threshold,
        }
    }
}

impl Middleware for Rpc {
    const SKIPS_INFRASTRUCTURE: bool = false;

    fn handle<S: Inner>(&self, mut request: Request<Body>, inner: &mut S) -> CallFuture<S::Error> {
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
        // ERROR, the most severe level, so that the span is enabled whatever
        // the log filter lets through: a WARN line under a `warn` filter
        // still carries the call's request id and caller. Its own events
        // have their own levels.
        // The values are `&str`, not `%` (Display): a string is recorded as
        // it is, where a Display value is formatted into a new String first.
        let span = tracing::error_span!(
            "rpc",
            otel.name = path.trim_start_matches('/'),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            request_id = request_id.as_str(),
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
            series: KNOWN_METHODS.get(path.as_str()),
            infrastructure: is_infrastructure(&path),
            path,
            start: Instant::now(),
            code: None,
            statements: Arc::new(RequestLog::default()),
            n_plus_one_threshold: self.n_plus_one_threshold,
        };
        let response = span.in_scope(|| inner.call(request));
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
                Ok(HeldBody::wrap(response, call))
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

/// The `rpc_requests_total` and `rpc_latency_seconds` handles of one
/// method, one pair per status code, resolved by the recorder on the first
/// call that ends with that code and kept: a call's end costs no label
/// lookup.
struct MethodSeries {
    service: &'static str,
    method: &'static str,
    by_code: [OnceLock<(metrics::Counter, metrics::Histogram)>; 17],
}

impl MethodSeries {
    fn of(&self, code: Code) -> &(metrics::Counter, metrics::Histogram) {
        self.by_code[code as usize].get_or_init(|| series(self.service, self.method, code))
    }
}

fn series(service: &str, method: &str, code: Code) -> (metrics::Counter, metrics::Histogram) {
    let labels = [
        ("service", service.to_owned()),
        ("method", method.to_owned()),
        ("code", code_name(code).to_owned()),
    ];
    (
        metrics::counter!("rpc_requests_total", &labels),
        metrics::histogram!("rpc_latency_seconds", &labels),
    )
}

/// The datagate services' methods by path (`/datagate.v1.UserService/GetUser`).
/// Other paths (health, reflection, unknown methods) resolve their series
/// per call.
static KNOWN_METHODS: LazyLock<HashMap<String, MethodSeries>> = LazyLock::new(|| {
    // Handles taken before the recorder is installed would go nowhere.
    crate::metrics::handle();
    crate::metrics::rpc_methods()
        .into_iter()
        .map(|(service, method)| {
            let path = format!("/{service}/{method}");
            let series = MethodSeries {
                service: Box::leak(service.into_boxed_str()),
                method: Box::leak(method.into_boxed_str()),
                by_code: Default::default(),
            };
            (path, series)
        })
        .collect()
});

/// Records a call's outcome exactly once: when its response body ends, or
/// when the body is dropped early (the caller went away: CANCELLED).
struct CallRecord {
    span: Span,
    /// `/service/method`.
    path: String,
    series: Option<&'static MethodSeries>,
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
        let (service, method) = split_path(&self.path);
        match self.series {
            Some(known) if code != Code::Unimplemented => {
                let (calls, latency) = known.of(code);
                calls.increment(1);
                latency.record(elapsed.as_secs_f64());
            }
            _ => {
                // Unknown methods must not mint new label values.
                let method = if code == Code::Unimplemented {
                    "unknown"
                } else {
                    method
                };
                let (calls, latency) = series(service, method, code);
                calls.increment(1);
                latency.record(elapsed.as_secs_f64());
            }
        }

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
                self.path.trim_start_matches('/'),
            );
        }
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        // Shed calls (RESOURCE_EXHAUSTED) come by the thousand exactly when
        // the instance is overloaded: they are counted (`rpc_requests_total`,
        // `admission_rejected_total`), and a line each would be a log flood
        // that costs the admitted calls their CPU.
        if self.infrastructure || code == Code::ResourceExhausted {
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
fn code_name(code: Code) -> &'static str {
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

/// The response body holds the call's record, reading the final status from
/// the trailers (or the error), and finishes it when the body ends.
impl HeldUntilEnd for CallRecord {
    fn frame(&mut self, frame: &Result<Frame<Bytes>, Status>) {
        match frame {
            Ok(frame) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.code = Some(code);
                }
            }
            Err(status) => self.code = Some(status.code()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
