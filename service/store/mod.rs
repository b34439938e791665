//! Storage: everything that speaks SQL. Nothing here knows about protobuf.
//!
//! Functions take a `&mut PgConnection` (a pooled connection or a
//! transaction) and domain types, and return domain types or domain errors.

pub mod analytics;
pub mod audit;
pub mod market_analyses;
pub mod mongo;
pub mod orders;
pub mod outbox;
pub mod partitions;
pub mod postgres;
pub mod price_history;
pub mod products;
pub mod profiles;
pub mod search;
pub mod teams;
pub mod users;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, QueryBuilder};

use crate::domain::error::{Error, Result};

/// The time of a keyset cursor (µs since the epoch), or INVALID_ARGUMENT on
/// `page_token` for a position no row can have.
pub(crate) fn cursor_time(micros: i64) -> Result<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_micros(micros)
        .ok_or_else(|| Error::invalid("page_token", "holds an impossible position"))
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
            .push_bind(cursor_time(micros)?)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    Ok(())
}

/// Maps a constraint violation to a domain error by constraint name; any
/// other error goes through the generic database mapping.
pub(crate) fn on_constraint(e: sqlx::Error, map: impl FnOnce(&str) -> Option<Error>) -> Error {
    if let sqlx::Error::Database(db) = &e
        && let Some(mapped) = db.constraint().and_then(map)
    {
        return mapped;
    }
    Error::from(e)
}
