//! Idempotent creates: claim the caller's key, or replay what the first call
//! with it answered.
//!
//! The key's row is inserted first, in the write's own transaction: a
//! concurrent call with the same key waits on that row, and then reads the
//! response this call stores before committing. So a retry returns the
//! first response, and a failed call (rolled back) leaves no key behind: it
//! is not remembered, and the same key may be tried again. That is what
//! makes the write path's retry of a keyed write safe even when its commit
//! went unanswered (`write`, "Retries"). A key is bound to the fingerprint
//! of the request it was first used for; reusing it for a different request
//! is FAILED_PRECONDITION.
//!
//! Keys expire: [`KeySweeper`] deletes the keys older than the retention in
//! small batches (a replay within the retention still replays; after it, a
//! key not yet swept still does, a swept one is new again).

use chrono::{DateTime, Utc};
use serde::{Serialize, de::DeserializeOwned};

use super::write::{WriteTx, Writes};
use crate::{
    config::IdempotencySettings,
    error::{Detail, Error, Result, reason},
    model::{audit::Actor, idempotency::RequestKey},
    store,
};

/// A caller's idempotency key and the request it stands for.
pub struct Idempotency<'a> {
    caller: &'a str,
    key: &'a RequestKey,
    fingerprint: String,
}

/// What a write does after claiming its key.
pub enum Claim<T> {
    /// The key is new: do the work, then [`Idempotency::save`] the response.
    Proceed,
    /// The key was used before for this request: answer this.
    Replay(T),
}

impl<'a> Idempotency<'a> {
    pub fn new(caller: &'a str, key: &'a RequestKey, fingerprint: String) -> Self {
        Self {
            caller,
            key,
            fingerprint,
        }
    }

    /// Claims the key in `tx`, or returns the response stored under it.
    pub async fn claim<T: DeserializeOwned>(&self, tx: &mut WriteTx) -> Result<Claim<T>> {
        let key = self.key.as_str();
        // A taken key may be swept (expired) between the two statements:
        // then it is free, and claiming it again succeeds.
        let mut stored = None;
        for _ in 0..2 {
            if store::idempotency::claim(tx, self.caller, key, &self.fingerprint).await? {
                // The key commits with the write: a repeat of a write whose
                // commit went unanswered replays it (see `write`).
                tx.claimed_key();
                return Ok(Claim::Proceed);
            }
            stored = store::idempotency::stored(tx, self.caller, key).await?;
            if stored.is_some() {
                break;
            }
        }
        let (fingerprint, response) = stored.ok_or_else(|| {
            anyhow::anyhow!("idempotency key {key:?} was taken and gone twice in a row")
        })?;
        if fingerprint != self.fingerprint {
            return Err(Error::FailedPrecondition(
                Detail::new(
                    reason::IDEMPOTENCY_KEY_REUSED,
                    "this request_id was already used for a different request; use a new request_id for a new one",
                )
                .with("request_id", key),
            ));
        }
        let response = serde_json::from_value(response)
            .map_err(|e| anyhow::anyhow!("stored idempotent response is unreadable: {e}"))?;
        Ok(Claim::Replay(response))
    }

    /// Stores the response under the key, in the same transaction as the work.
    pub async fn save<T: Serialize>(&self, tx: &mut WriteTx, response: &T) -> Result<()> {
        let response = serde_json::to_value(response)
            .map_err(|e| anyhow::anyhow!("serializing an idempotent response: {e}"))?;
        store::idempotency::save_response(tx, self.caller, self.key.as_str(), &response).await
    }
}

/// The most batches one sweep deletes; the rest waits for the next round,
/// so a large backlog never holds a worker for long.
const MAX_BATCHES_PER_SWEEP: usize = 100;

/// Deletes expired idempotency keys.
#[derive(Clone)]
pub struct KeySweeper {
    writes: Writes,
    settings: IdempotencySettings,
}

impl KeySweeper {
    pub fn new(writes: Writes, settings: IdempotencySettings) -> Self {
        Self { writes, settings }
    }

    /// Deletes the keys created before `now - retention`, a batch per short
    /// transaction under an advisory lock (one replica sweeps at a time);
    /// how many it deleted.
    #[tracing::instrument(skip_all, err(level = "info", Debug))]
    pub async fn sweep(&self, now: DateTime<Utc>) -> Result<u64> {
        let retention = chrono::Duration::from_std(self.settings.retention)
            .map_err(|e| anyhow::anyhow!("idempotency.retention is out of range: {e}"))?;
        let before = now - retention;
        let batch = self.settings.sweep_batch.max(1);
        let actor = Actor::system("idempotency-sweep");
        let mut deleted = 0;
        for _ in 0..MAX_BATCHES_PER_SWEEP {
            let mut tx = self.writes.begin(&actor).await?;
            if !store::idempotency::try_lock_sweep(&mut tx).await? {
                break;
            }
            let n = store::idempotency::delete_expired(&mut tx, before, batch).await?;
            tx.commit().await?;
            deleted += n;
            if n < batch as u64 {
                break;
            }
        }
        metrics::counter!("idempotency_keys_expired_total").increment(deleted);
        if deleted > 0 {
            tracing::info!(deleted, "expired idempotency keys swept");
        }
        Ok(deleted)
    }
}
