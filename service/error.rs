//! The one error type, below every layer.
//!
//! Every variant maps to exactly one gRPC status code (see `api::error`), and
//! carries a stable UPPER_SNAKE `reason` that callers can match on; every
//! reason is a named constant in [`reason`], so one reason is spelled once.
//! Unexpected failures are `Internal`: they keep their full chain for the
//! logs, and the caller gets a generic message.
//!
//! The store returns this type with the generic database mapping only
//! ([`From<sqlx::Error>`]); what a constraint violation *means* (an email
//! taken, a team missing) is decided above it, with [`Error::on_constraint`].

use std::{collections::BTreeMap, fmt, time::Duration};

/// The `ErrorInfo.reason` of every error this service returns, and the event
/// names of the log lines operators alert on.
pub mod reason {
    // Requests.
    pub const INVALID_ARGUMENT: &str = "INVALID_ARGUMENT";
    pub const INTERNAL: &str = "INTERNAL";
    // Callers.
    pub const MISSING_CREDENTIALS: &str = "MISSING_CREDENTIALS";
    pub const INVALID_CREDENTIALS: &str = "INVALID_CREDENTIALS";
    pub const READER_ROLE_REQUIRED: &str = "READER_ROLE_REQUIRED";
    pub const WRITER_ROLE_REQUIRED: &str = "WRITER_ROLE_REQUIRED";
    pub const CERTIFICATE_IDENTITY_MISSING: &str = "CERTIFICATE_IDENTITY_MISSING";
    // Callers with a JWT (`auth::jwt`).
    pub const TOKEN_EXPIRED: &str = "TOKEN_EXPIRED";
    pub const TOKEN_NOT_YET_VALID: &str = "TOKEN_NOT_YET_VALID";
    pub const TOKEN_AUDIENCE_MISMATCH: &str = "TOKEN_AUDIENCE_MISMATCH";
    pub const TOKEN_ISSUER_MISMATCH: &str = "TOKEN_ISSUER_MISMATCH";
    pub const TOKEN_SIGNATURE_INVALID: &str = "TOKEN_SIGNATURE_INVALID";
    pub const TOKEN_ALGORITHM_REFUSED: &str = "TOKEN_ALGORITHM_REFUSED";
    pub const TOKEN_KEY_UNKNOWN: &str = "TOKEN_KEY_UNKNOWN";
    pub const TOKEN_MALFORMED: &str = "TOKEN_MALFORMED";
    pub const ADMIN_ROLE_REQUIRED: &str = "ADMIN_ROLE_REQUIRED";
    /// A method the authorization table does not list: open to no one.
    pub const METHOD_NOT_AUTHORIZED: &str = "METHOD_NOT_AUTHORIZED";
    pub const QUOTA_EXCEEDED: &str = "QUOTA_EXCEEDED";
    // Deadlines and dependencies.
    pub const DEADLINE_EXCEEDED: &str = "DEADLINE_EXCEEDED";
    pub const QUERY_TIMEOUT: &str = "QUERY_TIMEOUT";
    pub const DEPENDENCY_UNAVAILABLE: &str = "DEPENDENCY_UNAVAILABLE";
    pub const LOCK_TIMEOUT: &str = "LOCK_TIMEOUT";
    pub const TRANSACTION_CONFLICT: &str = "TRANSACTION_CONFLICT";
    pub const MONGODB_NOT_CONFIGURED: &str = "MONGODB_NOT_CONFIGURED";
    // Load.
    pub const OVERLOADED: &str = "OVERLOADED";
    // Concurrency.
    pub const VERSION_CONFLICT: &str = "VERSION_CONFLICT";
    pub const IDEMPOTENCY_KEY_REUSED: &str = "IDEMPOTENCY_KEY_REUSED";
    pub const REFRESH_IN_PROGRESS: &str = "REFRESH_IN_PROGRESS";
    // Users and teams.
    pub const USER_NOT_FOUND: &str = "USER_NOT_FOUND";
    pub const EMAIL_ALREADY_EXISTS: &str = "EMAIL_ALREADY_EXISTS";
    pub const USERNAME_ALREADY_EXISTS: &str = "USERNAME_ALREADY_EXISTS";
    pub const TEAM_NOT_FOUND: &str = "TEAM_NOT_FOUND";
    pub const TEAM_NAME_ALREADY_EXISTS: &str = "TEAM_NAME_ALREADY_EXISTS";
    pub const TEAM_MEMBER_NOT_FOUND: &str = "TEAM_MEMBER_NOT_FOUND";
    pub const TEAM_MEMBER_ALREADY_EXISTS: &str = "TEAM_MEMBER_ALREADY_EXISTS";
    // Catalog and orders.
    pub const PRODUCT_NOT_FOUND: &str = "PRODUCT_NOT_FOUND";
    pub const SKU_ALREADY_EXISTS: &str = "SKU_ALREADY_EXISTS";
    pub const INSUFFICIENT_INVENTORY: &str = "INSUFFICIENT_INVENTORY";
    pub const ORDER_NOT_FOUND: &str = "ORDER_NOT_FOUND";
    pub const ORDER_STATE_CONFLICT: &str = "ORDER_STATE_CONFLICT";
    // Analyses.
    pub const MARKET_ANALYSIS_NOT_FOUND: &str = "MARKET_ANALYSIS_NOT_FOUND";
    // Diagnostics (AdminService).
    /// A PostgreSQL extension the RPC needs is not installed in the database
    /// (metadata `extension`).
    pub const EXTENSION_MISSING: &str = "EXTENSION_MISSING";
    pub const STATEMENT_NOT_FOUND: &str = "STATEMENT_NOT_FOUND";
    pub const BACKEND_NOT_FOUND: &str = "BACKEND_NOT_FOUND";
    /// A backend that is not one of the service's own: not cancelled.
    pub const BACKEND_NOT_OWNED: &str = "BACKEND_NOT_OWNED";
    pub const TABLE_NOT_FOUND: &str = "TABLE_NOT_FOUND";
    pub const INDEX_ALREADY_EXISTS: &str = "INDEX_ALREADY_EXISTS";
    /// The service's database user lacks a privilege the RPC needs (e.g.
    /// owning a table to index it).
    pub const DATABASE_PRIVILEGE_MISSING: &str = "DATABASE_PRIVILEGE_MISSING";
    // Log events (the `event` field), not error reasons.
    pub const SLOW_QUERY: &str = "SLOW_QUERY";
    pub const N_PLUS_ONE_DETECTED: &str = "N_PLUS_ONE_DETECTED";
    pub const CONNECTION_LIMIT_REACHED: &str = "CONNECTION_LIMIT_REACHED";
}

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
    /// Whether the same work, done again at once, may succeed: the failure
    /// was the database's or the connection's, not the request's (set only
    /// by the database mapping, see [`Error::is_transient`]). The call path
    /// retries these (`retry`); the caller never sees the flag.
    pub transient: bool,
}

impl Detail {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            metadata: BTreeMap::new(),
            transient: false,
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
    /// This instance has no room for the call now (admission control shed
    /// it); retrying after `retry_after`, ideally elsewhere, may succeed.
    #[error("{detail}")]
    ResourceExhausted {
        detail: Detail,
        retry_after: Duration,
    },
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
            Self::ResourceExhausted {
                detail,
                retry_after,
            } => Self::ResourceExhausted {
                detail: detail.clone(),
                retry_after: *retry_after,
            },
            Self::Internal(e) => Self::Internal(anyhow::anyhow!("{e:#}")),
        }
    }

    /// This error, or the domain error `map` gives the name of the database
    /// constraint it violated (a unique email, a missing team): the store
    /// reports what the database said, the caller decides what it means.
    pub fn on_constraint(self, map: impl FnOnce(&str) -> Option<Error>) -> Self {
        let constraint = match &self {
            Self::Internal(e) => e
                .downcast_ref::<sqlx::Error>()
                .and_then(|e| e.as_database_error())
                .and_then(|db| db.constraint()),
            _ => None,
        };
        constraint.and_then(map).unwrap_or(self)
    }

    /// [`on_constraint`](Self::on_constraint) for one unique constraint:
    /// ALREADY_EXISTS with `reason` and `message` when `constraint` was
    /// violated, this error otherwise.
    pub fn on_unique(self, constraint: &str, reason: &'static str, message: &str) -> Self {
        self.on_constraint(|c| (c == constraint).then(|| Self::already_exists(reason, message)))
    }

    /// ABORTED: the row is at another version than the caller read.
    pub fn version_conflict(
        what: &str,
        id: impl fmt::Display,
        expected: i64,
        current: i64,
    ) -> Self {
        Self::Aborted(
            Detail::new(
                reason::VERSION_CONFLICT,
                format!(
                    "{what} {id} is at version {current}, not {expected}: it changed since you read it; read it again and retry"
                ),
            )
            .with(&format!("{what}_id"), id)
            .with("current_version", current),
        )
    }

    /// UNAVAILABLE: partition maintenance gave up waiting for a table lock
    /// (its own `lock_timeout`); the next round retries.
    pub fn maintenance_lock_timeout() -> Self {
        Self::Unavailable {
            detail: Detail::new(
                reason::LOCK_TIMEOUT,
                "a table this call needs is locked by maintenance; retry shortly",
            ),
            retry_after: Duration::from_secs(1),
        }
    }

    /// Whether doing the same work again at once may succeed: a
    /// serialization failure or deadlock (40001, 40P01), the server ending
    /// the connection as it shuts down, crashes or starts (57P01, 57P02,
    /// 57P03), or the connection reset, refused, aborted or closed under
    /// the statement. Never the call's deadline (`QUERY_TIMEOUT`,
    /// DEADLINE_EXCEEDED), a constraint violation or other outcome, a
    /// saturated pool, or the availability gate's refusal while the server
    /// is down (that is the fail-fast path).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Aborted(detail) | Self::Unavailable { detail, .. } => detail.transient,
            _ => false,
        }
    }

    /// This error, not to be retried: the work behind it must not be done
    /// twice (a commit whose outcome is unknown), or it has had its retries.
    pub fn not_transient(mut self) -> Self {
        if let Self::Aborted(detail) | Self::Unavailable { detail, .. } = &mut self {
            detail.transient = false;
        }
        self
    }

    pub fn deadline_exceeded() -> Self {
        Self::DeadlineExceeded(Detail::new(
            reason::DEADLINE_EXCEEDED,
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
/// is transient (UNAVAILABLE), and so is a server that ends the connection
/// as it shuts down, crashes or starts (57P01-57P03); a statement cancelled
/// by its timeout (57014) or a lock wait past its `lock_timeout` (55P03) is
/// the call's deadline (both are set from it, see `store::postgres`:
/// DEADLINE_EXCEEDED `QUERY_TIMEOUT`; partition maintenance maps its own lock
/// timeout to UNAVAILABLE `LOCK_TIMEOUT` itself); a serialization failure or
/// deadlock is a retryable conflict, and anything else is internal. A
/// constraint violation becomes `Internal` here too, keeping the sqlx error
/// inside: the domain turns the ones that are outcomes into their own errors
/// with [`Error::on_constraint`]. The failures worth repeating at once are
/// marked [`Detail::transient`] (see [`Error::is_transient`]).
impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        let transient = is_transient(&e);
        let unavailable = |message: &str| Self::Unavailable {
            detail: Detail {
                transient,
                ..Detail::new(reason::DEPENDENCY_UNAVAILABLE, message)
                    .with("dependency", "postgres")
            },
            retry_after: Duration::from_secs(1),
        };
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                unavailable("the database is unavailable or saturated; retry with backoff")
            }
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("57014" | "55P03") => Self::DeadlineExceeded(Detail::new(
                    reason::QUERY_TIMEOUT,
                    "the database query was cancelled at the call's deadline",
                )),
                Some("40001" | "40P01") => Self::Aborted(Detail {
                    transient,
                    ..Detail::new(
                        reason::TRANSACTION_CONFLICT,
                        "the change conflicted with a concurrent one; retry",
                    )
                }),
                Some("57P01" | "57P02" | "57P03") => unavailable(
                    "the database server is shutting down or restarting; retry with backoff",
                ),
                _ => Self::Internal(anyhow::Error::new(e).context("database error")),
            },
            _ => Self::Internal(anyhow::Error::new(e).context("database error")),
        }
    }
}

/// The database failures [`Error::is_transient`] names, as sqlx reports
/// them. The I/O errors are those of a connection that broke under a
/// statement (reset, aborted, closed: `BrokenPipe` on writing,
/// `UnexpectedEof` on reading) or could not be made (refused).
fn is_transient(e: &sqlx::Error) -> bool {
    use std::io::ErrorKind;
    match e {
        sqlx::Error::Io(io) => matches!(
            io.kind(),
            ErrorKind::ConnectionReset
                | ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionAborted
                | ErrorKind::BrokenPipe
                | ErrorKind::UnexpectedEof
        ),
        sqlx::Error::Database(db) => matches!(
            db.code().as_deref(),
            Some("40001" | "40P01" | "57P01" | "57P02" | "57P03")
        ),
        _ => false,
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Database errors as PostgreSQL reports them, for the unit tests of what
/// the code makes of them.
#[cfg(test)]
pub mod testing {
    use std::{borrow::Cow, error::Error as StdError};

    use sqlx::error::{DatabaseError, ErrorKind};

    /// A database error with this SQLSTATE.
    pub fn sqlstate(code: &'static str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Sqlstate(code)))
    }

    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl StdError for Sqlstate {}

    impl DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn StdError + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn StdError + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> ErrorKind {
            match self.0 {
                "23505" => ErrorKind::UniqueViolation,
                "23503" => ErrorKind::ForeignKeyViolation,
                _ => ErrorKind::Other,
            }
        }
    }
}
