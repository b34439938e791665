//! Storage: everything that speaks SQL. Nothing here knows about protobuf.
//!
//! Functions take a `&mut PgConnection` (a pooled connection or a
//! transaction) and domain types, and return domain types or domain errors.

pub mod cache;
pub mod orders;
pub mod partitions;
pub mod postgres;
pub mod products;
pub mod teams;
pub mod users;

use crate::domain::error::Error;

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
