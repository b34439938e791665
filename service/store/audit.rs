//! The audit log's write side is in the database: row triggers on the
//! audited tables (migration `..._audit_triggers`) insert into `audit_log`.
//! This module names the actor of a transaction for those triggers, and, in
//! the same statement, bounds the transaction by the call's deadline and
//! learns its backend's pid (see `store::postgres`: zero extra round trips).

use sqlx::{PgPool, Postgres, Row as _, Transaction};

use super::postgres::{self, millis};
use crate::{error::Result, model::audit::Actor};

/// A write transaction and the pid of its backend (to cancel it by).
pub struct Begun {
    pub tx: Transaction<'static, Postgres>,
    pub pid: i32,
}

/// Begins a write transaction on behalf of `actor`: every audited row it
/// changes is recorded with the actor's caller and request id. Inside a
/// call, the pool wait is bounded by the call's deadline and every statement
/// of the transaction by `statement_timeout` and `lock_timeout` set `LOCAL`
/// to the call's budget; outside one, the connection's defaults stand.
pub async fn begin(db: &PgPool, actor: &Actor) -> Result<Begun> {
    let mut tx = postgres::begin(db).await?;
    // After the pool wait and `BEGIN`: what is left now. NULL keeps the
    // current setting (the connection's default).
    let timeout = postgres::current_budget()?.map(|b| format!("{}ms", millis(b)));
    let row = sqlx::query(
        "SELECT pg_backend_pid(), \
                set_config('datagate.actor', $1, true), \
                set_config('datagate.request_id', $2, true), \
                set_config('statement_timeout', \
                           COALESCE($3, current_setting('statement_timeout')), true), \
                set_config('lock_timeout', \
                           COALESCE($3, current_setting('lock_timeout')), true)",
    )
    .bind(actor.caller())
    .bind(actor.request_id().unwrap_or_default())
    .bind(timeout)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Begun {
        tx,
        pid: row.try_get(0)?,
    })
}
