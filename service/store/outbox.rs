//! The MongoDB outbox table (see the migration `..._mongo_outbox`).

use sqlx::PgConnection;

use crate::{error::Result, model::outbox::Change};

/// Adds `change` in the caller's transaction.
pub async fn push(conn: &mut PgConnection, change: &Change) -> Result<()> {
    let payload = match serde_json::to_value(change)
        .map_err(|e| anyhow::anyhow!("encoding an outbox change: {e}"))?
    {
        serde_json::Value::Object(mut map) => map.remove("payload").unwrap_or_default(),
        _ => serde_json::Value::Null,
    };
    sqlx::query("INSERT INTO mongo_outbox (kind, payload) VALUES ($1, $2)")
        .bind(change.kind())
        .bind(payload)
        .execute(conn)
        .await?;
    Ok(())
}

/// Up to `limit` of the oldest changes, locked (other relays skip them).
pub async fn claim(conn: &mut PgConnection, limit: i64) -> Result<Vec<(i64, Change)>> {
    let rows: Vec<(i64, String, serde_json::Value)> = sqlx::query_as(
        "SELECT id, kind, payload FROM mongo_outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(id, kind, payload)| {
            let change =
                serde_json::from_value(serde_json::json!({ "kind": kind, "payload": payload }))
                    .map_err(|e| anyhow::anyhow!("outbox row {id} is unreadable: {e}"))?;
            Ok((id, change))
        })
        .collect()
}

pub async fn remove(conn: &mut PgConnection, ids: &[i64]) -> Result<()> {
    sqlx::query("DELETE FROM mongo_outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}
