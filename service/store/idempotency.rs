//! SQL for `idempotency_keys`: a caller's key, the fingerprint of the request
//! it was first used for, and the response stored in the same transaction.

use sqlx::PgConnection;

use crate::error::Result;

/// Inserts the key's row; false if the key is already taken. Waits for a
/// concurrent transaction holding the same key to finish first.
pub async fn claim(
    conn: &mut PgConnection,
    caller: &str,
    key: &str,
    fingerprint: &str,
) -> Result<bool> {
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys (caller, key, fingerprint) VALUES ($1, $2, $3) \
         ON CONFLICT (caller, key) DO NOTHING",
    )
    .bind(caller)
    .bind(key)
    .bind(fingerprint)
    .execute(conn)
    .await?;
    Ok(claimed.rows_affected() == 1)
}

/// The fingerprint and response stored under a taken key; `None` if the key
/// is gone (swept since it was found taken).
pub async fn stored(
    conn: &mut PgConnection,
    caller: &str,
    key: &str,
) -> Result<Option<(String, serde_json::Value)>> {
    let row: Option<(String, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT fingerprint, response FROM idempotency_keys WHERE caller = $1 AND key = $2",
    )
    .bind(caller)
    .bind(key)
    .fetch_optional(conn)
    .await?;
    row.map(|(fingerprint, response)| {
        let response = response.ok_or_else(|| {
            anyhow::anyhow!("idempotency key {key:?} committed without a response")
        })?;
        Ok((fingerprint, response))
    })
    .transpose()
}

pub async fn save_response(
    conn: &mut PgConnection,
    caller: &str,
    key: &str,
    response: &serde_json::Value,
) -> Result<()> {
    sqlx::query("UPDATE idempotency_keys SET response = $3 WHERE caller = $1 AND key = $2")
        .bind(caller)
        .bind(key)
        .bind(response)
        .execute(conn)
        .await?;
    Ok(())
}

/// Deletes at most `batch` keys created before `before`, oldest first, in
/// one statement; how many. Rows another sweeper is deleting are skipped.
pub async fn delete_expired(
    conn: &mut PgConnection,
    before: chrono::DateTime<chrono::Utc>,
    batch: i64,
) -> Result<u64> {
    let done = sqlx::query(
        "DELETE FROM idempotency_keys WHERE (caller, key) IN ( \
           SELECT caller, key FROM idempotency_keys WHERE created_at < $1 \
           ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(before)
    .bind(batch)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Takes the sweep's advisory lock for the current transaction; false when
/// another replica is sweeping.
pub async fn try_lock_sweep(conn: &mut PgConnection) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT pg_try_advisory_xact_lock(hashtext('datagate.idempotency_sweep'))",
    )
    .fetch_one(conn)
    .await?)
}
