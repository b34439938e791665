//! The outbox relay: applies changes committed in PostgreSQL to MongoDB.
//!
//! Writers add rows to `mongo_outbox` in their own transaction; a trigger
//! notifies `mongo_outbox` on commit. Every replica runs one relay, which
//! LISTENs for that and also polls every `mongodb.outbox_interval`. A pass
//! claims the oldest rows with `FOR UPDATE SKIP LOCKED` (so replicas share
//! the work and never apply a row twice at once), applies them in id order,
//! and deletes the applied rows in the same transaction. A row that fails
//! (MongoDB down) ends the pass and stays for the next one: changes are
//! delayed, never lost. Applying is idempotent (a price measurement carries
//! its outbox id), so a row applied but not yet deleted when a relay died is
//! harmless when applied again.

use std::time::Duration;

use sqlx::{PgPool, postgres::PgListener};
use tokio_util::sync::CancellationToken;

use crate::{
    documents::{Mongo, price_history, profiles},
    error::Result,
    model::outbox::Change,
    retry,
    store::outbox,
};

const BATCH: i64 = 100;

pub struct OutboxRelay {
    db: PgPool,
    mongo: Option<Mongo>,
    bucket_capacity: i64,
    interval: Duration,
}

impl OutboxRelay {
    pub fn new(db: PgPool, mongo: Option<Mongo>, bucket_capacity: i64, interval: Duration) -> Self {
        Self {
            db,
            mongo,
            bucket_capacity,
            interval,
        }
    }

    /// Runs until `stopping` is cancelled.
    pub async fn run(self, stopping: CancellationToken) {
        let mut listener = match PgListener::connect_with(&self.db).await {
            Ok(mut listener) => match listener.listen("mongo_outbox").await {
                Ok(()) => Some(listener),
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay cannot LISTEN; polling only");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay cannot LISTEN; polling only");
                None
            }
        };
        loop {
            // A failed pass keeps its rows; the next round applies them.
            // Stopping ends the retries (the rows stay for the next start).
            tokio::select! {
                () = stopping.cancelled() => return,
                _ = retry::background("the outbox relay", || self.drain()) => {}
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => {
                        let _ = l.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stopping.cancelled() => return,
                () = notified => {}
                () = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// Applies everything waiting, batch by batch, until the outbox is
    /// empty or a change fails.
    pub async fn drain(&self) -> Result<()> {
        loop {
            let mut tx = self.db.begin().await?;
            let batch = outbox::claim(&mut tx, BATCH).await?;
            if batch.is_empty() {
                tx.commit().await?;
                return Ok(());
            }
            let mut applied = Vec::with_capacity(batch.len());
            let mut failure = None;
            for (id, change) in &batch {
                match self.apply(*id, change).await {
                    Ok(()) => applied.push(*id),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            outbox::remove(&mut tx, &applied).await?;
            tx.commit().await?;
            metrics::counter!("mongo_outbox_applied_total").increment(applied.len() as u64);
            if let Some(e) = failure {
                metrics::counter!("mongo_outbox_failures_total").increment(1);
                return Err(e);
            }
        }
    }

    async fn apply(&self, id: i64, change: &Change) -> Result<()> {
        let Some(mongo) = &self.mongo else {
            // No document store in this deployment: nothing to keep in step.
            return Ok(());
        };
        match change {
            Change::PriceMeasurement {
                product_id,
                price_cents,
                at,
            } => {
                price_history::append(
                    mongo,
                    self.bucket_capacity,
                    *product_id,
                    *price_cents,
                    *at,
                    id,
                )
                .await?;
            }
            Change::DeleteProfile { user_id } => profiles::delete(mongo, *user_id).await?,
        }
        Ok(())
    }
}
