//! The one error type of the domain layer.
//!
//! Every variant maps to exactly one gRPC status code (see `api::error`), and
//! carries a stable UPPER_SNAKE `reason` that callers can match on. Unexpected
//! failures are `Internal`: they keep their full chain for the logs, and the
//! caller gets a generic message.

use std::{collections::BTreeMap, fmt, time::Duration};

/// One problem with one request field, e.g. `email`: "must contain exactly one @".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// The details a caller can act on: a reason, a message, and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detail {
    pub reason: &'static str,
    pub message: String,
    pub metadata: BTreeMap<String, String>,
}

impl Detail {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            metadata: BTreeMap::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl ToString) -> Self {
        self.metadata.insert(key.to_owned(), value.to_string());
        self
    }
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("{0}")]
    NotFound(Detail),
    #[error("{0}")]
    AlreadyExists(Detail),
    /// A concurrency conflict (stale version): re-read and retry.
    #[error("{0}")]
    Aborted(Detail),
    #[error("{0}")]
    FailedPrecondition(Detail),
    #[error("{0}")]
    Unauthenticated(Detail),
    #[error("{0}")]
    PermissionDenied(Detail),
    /// A dependency is unreachable or saturated; retrying later may succeed.
    #[error("{detail}")]
    Unavailable {
        detail: Detail,
        retry_after: Duration,
    },
    #[error("{0}")]
    DeadlineExceeded(Detail),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation {
            field: field.into(),
            description: description.into(),
        }])
    }

    pub fn not_found(reason: &'static str, message: impl Into<String>) -> Self {
        Self::NotFound(Detail::new(reason, message))
    }

    pub fn already_exists(reason: &'static str, message: impl Into<String>) -> Self {
        Self::AlreadyExists(Detail::new(reason, message))
    }

    /// A copy for another waiter of a shared result (a loader's batch).
    /// An internal error keeps its message chain, not its source.
    pub fn duplicate(&self) -> Self {
        match self {
            Self::InvalidArgument(v) => Self::InvalidArgument(v.clone()),
            Self::NotFound(d) => Self::NotFound(d.clone()),
            Self::AlreadyExists(d) => Self::AlreadyExists(d.clone()),
            Self::Aborted(d) => Self::Aborted(d.clone()),
            Self::FailedPrecondition(d) => Self::FailedPrecondition(d.clone()),
            Self::Unauthenticated(d) => Self::Unauthenticated(d.clone()),
            Self::PermissionDenied(d) => Self::PermissionDenied(d.clone()),
            Self::Unavailable {
                detail,
                retry_after,
            } => Self::Unavailable {
                detail: detail.clone(),
                retry_after: *retry_after,
            },
            Self::DeadlineExceeded(d) => Self::DeadlineExceeded(d.clone()),
            Self::Internal(e) => Self::Internal(anyhow::anyhow!("{e:#}")),
        }
    }

    pub fn deadline_exceeded() -> Self {
        Self::DeadlineExceeded(Detail::new(
            "DEADLINE_EXCEEDED",
            "the call did not finish before its deadline; retry with a longer deadline or a smaller request",
        ))
    }
}

/// Collects every violation of a request before failing, so a caller sees all
/// of its mistakes at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Keeps the value of a successful parse, or records the violation.
    pub fn check<T>(&mut self, field: &str, parsed: Result<T, String>) -> Option<T> {
        parsed
            .map_err(|description| self.add(field, description))
            .ok()
    }

    pub fn into_result(self) -> Result<(), Error> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidArgument(self.0))
        }
    }
}

/// Database failures that are not a domain outcome: a broken or exhausted pool
/// is transient (UNAVAILABLE), as is a lock wait that timed out (partition
/// maintenance sets `lock_timeout`), a cancelled statement is a deadline, a
/// serialization failure or deadlock is a retryable conflict, and anything
/// else is internal. Constraint violations that are domain outcomes are mapped
/// by the store before they get here.
impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                Self::Unavailable {
                    detail: Detail::new(
                        "DEPENDENCY_UNAVAILABLE",
                        "the database is unavailable or saturated; retry with backoff",
                    )
                    .with("dependency", "postgres"),
                    retry_after: Duration::from_secs(1),
                }
            }
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("57014") => Self::DeadlineExceeded(Detail::new(
                    "QUERY_TIMEOUT",
                    "the database query was cancelled at the call's deadline",
                )),
                Some("55P03") => Self::Unavailable {
                    detail: Detail::new(
                        "LOCK_TIMEOUT",
                        "a table this call needs is locked by maintenance; retry shortly",
                    ),
                    retry_after: Duration::from_secs(1),
                },
                Some("40001" | "40P01") => Self::Aborted(Detail::new(
                    "TRANSACTION_CONFLICT",
                    "the change conflicted with a concurrent one; retry",
                )),
                _ => Self::Internal(anyhow::Error::new(e).context("database error")),
            },
            _ => Self::Internal(anyhow::Error::new(e).context("database error")),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
