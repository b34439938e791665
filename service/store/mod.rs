//! PostgreSQL: everything that speaks SQL, and nothing else. Nothing here
//! knows about protobuf or decides a business outcome.
//!
//! Functions take a `&mut PgConnection` (a pooled connection or a
//! transaction) and model types, and return rows as model types, `Option`,
//! counts or booleans; errors are the generic database mapping of
//! [`crate::error::Error`]. Whether a missing row is "not found" or a
//! constraint violation is "already exists" is the domain's decision.

pub mod analytics;
pub mod audit;
pub mod availability;
pub mod idempotency;
pub mod orders;
pub mod outbox;
pub mod partitions;
pub mod postgres;
pub mod products;
pub mod search;
pub mod teams;
pub mod users;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, QueryBuilder};

use crate::{
    error::Result,
    model::{Id, paging::keyset_time},
};

/// A `what` id read from the database; one that is not positive breaks an
/// invariant of the schema (an internal error).
pub(crate) fn row_id(what: &str, raw: i64) -> Result<Id> {
    Id::parse(raw).map_err(|e| anyhow::anyhow!("{what} id {raw} in the database: {e}").into())
}

/// The raw values of `ids`, to bind as a `bigint[]`.
pub(crate) fn raw_ids(ids: &[Id]) -> Vec<i64> {
    ids.iter().map(|id| id.get()).collect()
}

/// Appends the `[after, before)` window on `created_at` and the keyset
/// condition past `cursor` (created_at µs, id): after it in ascending order,
/// before it when listing newest first.
pub(crate) fn push_created_window(
    q: &mut QueryBuilder<'_, Postgres>,
    after: Option<DateTime<Utc>>,
    before: Option<DateTime<Utc>>,
    cursor: Option<(i64, i64)>,
    newest_first: bool,
) -> Result<()> {
    if let Some(t) = after {
        q.push(" AND created_at >= ").push_bind(t);
    }
    if let Some(t) = before {
        q.push(" AND created_at < ").push_bind(t);
    }
    if let Some((micros, id)) = cursor {
        let op = if newest_first { "<" } else { ">" };
        q.push(format!(" AND (created_at, id) {op} ("))
            .push_bind(keyset_time(micros)?)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    Ok(())
}
