//! The audit log's write side is in the database: row triggers on the
//! audited tables (migration `..._audit_triggers`) insert into `audit_log`.
//! This module names the actor of a transaction for those triggers.

use sqlx::{PgPool, Postgres, Transaction};

use crate::{error::Result, model::audit::Actor};

/// Begins a write transaction on behalf of `actor`: every audited row it
/// changes is recorded with the actor's caller and request id.
pub async fn begin(db: &PgPool, actor: &Actor) -> Result<Transaction<'static, Postgres>> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "SELECT set_config('datagate.actor', $1, true), \
                set_config('datagate.request_id', $2, true)",
    )
    .bind(actor.caller())
    .bind(actor.request_id().unwrap_or_default())
    .execute(&mut *tx)
    .await?;
    Ok(tx)
}
