//! The one mapping from domain errors to gRPC statuses, with `google.rpc`
//! details: `ErrorInfo` (reason, domain, metadata) on every error,
//! `BadRequest` field violations for invalid input, `RetryInfo` where retrying
//! helps. Internal errors are logged here with their chain; the caller only
//! learns that something went wrong.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::error::{Detail, Error, FieldViolation, reason};

/// The `ErrorInfo.domain` of every error this service returns.
pub const ERROR_DOMAIN: &str = "datagate.v1";

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument(violations) => {
                let message = error_message(&violations);
                let mut details = ErrorDetails::with_error_info(
                    reason::INVALID_ARGUMENT,
                    ERROR_DOMAIN,
                    HashMap::<String, String>::new(),
                );
                for v in violations {
                    details.add_bad_request_violation(v.field, v.description);
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::NotFound(d) => with_detail(Code::NotFound, d),
            Error::AlreadyExists(d) => with_detail(Code::AlreadyExists, d),
            Error::Aborted(d) => with_detail(Code::Aborted, d),
            Error::FailedPrecondition(d) => with_detail(Code::FailedPrecondition, d),
            Error::Unauthenticated(d) => with_detail(Code::Unauthenticated, d),
            Error::PermissionDenied(d) => with_detail(Code::PermissionDenied, d),
            Error::DeadlineExceeded(d) => with_detail(Code::DeadlineExceeded, d),
            Error::Unavailable {
                detail,
                retry_after,
            } => {
                tracing::warn!(reason = detail.reason, "dependency unavailable");
                let mut details = info(&detail);
                details.set_retry_info(Some(retry_after));
                Status::with_error_details(Code::Unavailable, detail.message, details)
            }
            // Shed calls are counted by admission control; no log line per
            // call, which would add to the overload.
            Error::ResourceExhausted {
                detail,
                retry_after,
            } => {
                let mut details = info(&detail);
                details.set_retry_info(Some(retry_after));
                Status::with_error_details(Code::ResourceExhausted, detail.message, details)
            }
            Error::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                Status::with_error_details(
                    Code::Internal,
                    "internal error; it has been logged with the request id",
                    ErrorDetails::with_error_info(
                        reason::INTERNAL,
                        ERROR_DOMAIN,
                        HashMap::<String, String>::new(),
                    ),
                )
            }
        }
    }
}

fn with_detail(code: Code, detail: Detail) -> Status {
    let details = info(&detail);
    Status::with_error_details(code, detail.message, details)
}

fn info(detail: &Detail) -> ErrorDetails {
    ErrorDetails::with_error_info(
        detail.reason,
        ERROR_DOMAIN,
        detail
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<HashMap<_, _>>(),
    )
}

fn error_message(violations: &[FieldViolation]) -> String {
    let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
    match violations {
        [one] => format!("invalid {}: {}", one.field, one.description),
        _ => format!(
            "invalid request: {} (see the BadRequest details)",
            fields.join(", ")
        ),
    }
}
