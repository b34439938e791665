//! `market_analyses` in MongoDB: one document per analysis, claimed by
//! workers with a lease.
//!
//! **Claiming.** `findOneAndUpdate` moves the oldest analysis that is
//! pending, or running with an expired lease, to running with this worker as
//! the lease owner and a new expiry, in one atomic step: two workers never
//! hold one analysis at once, and an analysis whose worker died is taken over
//! once its lease expires. Every later write by a worker (renewing the
//! lease, storing the result) is conditional on still owning the lease, so a
//! worker that lost it cannot overwrite its successor's work.
//!
//! Times are epoch milliseconds (see `documents::price_history`), but for
//! `finished_at`, a BSON date set when an analysis finishes: MongoDB's TTL
//! monitor deletes finished analyses `analysis.retention` after it (TTL
//! indexes expire only dates).
//!
//! **Indexes** ([`indexes`]), one per query:
//! - the claim (`status` pending, or running with an expired lease, oldest
//!   first): `{status, created_ms}`, each branch of the `$or` an index range
//!   already in `created_ms` order;
//! - the list (a caller's analyses, optionally of one status, newest first
//!   by `(created_ms, _id)`): `{caller, created_ms}` and
//!   `{caller, status, created_ms}` (`_id` is left out of the keys: the test
//!   server, nx-27017, refuses writes to a collection with `_id` in a
//!   compound index; only analyses created in the same millisecond are
//!   sorted by `_id` after the index scan);
//! - the dedupe (`params_hash`, created since, not failed, newest first):
//!   `{params_hash, created_ms}`;
//! - the retention: a TTL index on `finished_at`.

use std::time::Duration;

use mongodb::{
    IndexModel,
    bson::{DateTime, Document, doc},
    options::{IndexOptions, ReturnDocument},
};

use super::mongo::Mongo;
use crate::{error::Result, model::market_analyses::AnalysisDoc};

pub const MARKET_ANALYSES: &str = "market_analyses";

/// The name of the TTL index (its `expireAfterSeconds` is changed in place
/// when `analysis.retention` changes).
pub const RETENTION_INDEX: &str = "finished_at_ttl";

/// The indexes of `market_analyses` (see the module doc), finished analyses
/// kept for `retention` (whole seconds, at least one).
pub fn indexes(retention: Duration) -> Vec<IndexModel> {
    let named = |keys: Document, name: &str| {
        IndexModel::builder()
            .keys(keys)
            .options(IndexOptions::builder().name(name.to_owned()).build())
            .build()
    };
    vec![
        named(doc! { "status": 1, "created_ms": 1 }, "claim"),
        named(doc! { "caller": 1, "created_ms": -1 }, "list_by_caller"),
        named(
            doc! { "caller": 1, "status": 1, "created_ms": -1 },
            "list_by_caller_and_status",
        ),
        named(doc! { "params_hash": 1, "created_ms": -1 }, "dedupe"),
        IndexModel::builder()
            .keys(doc! { "finished_at": 1 })
            .options(
                IndexOptions::builder()
                    .name(RETENTION_INDEX.to_owned())
                    .expire_after(Duration::from_secs(retention.as_secs().max(1)))
                    .build(),
            )
            .build(),
    ]
}

fn collection(mongo: &Mongo) -> mongodb::Collection<AnalysisDoc> {
    mongo.collection(MARKET_ANALYSES)
}

/// The newest analysis with these parameters created since `since_ms` that
/// did not fail.
pub async fn find_recent(
    mongo: &Mongo,
    params_hash: &str,
    since_ms: i64,
) -> Result<Option<AnalysisDoc>> {
    mongo
        .run(
            "find_one",
            MARKET_ANALYSES,
            collection(mongo)
                .find_one(doc! {
                    "params_hash": params_hash,
                    "created_ms": { "$gte": since_ms },
                    "status": { "$in": ["pending", "running", "completed"] },
                })
                .sort(doc! { "created_ms": -1 })
                .max_time(mongo.max_time()),
        )
        .await
}

pub async fn insert(mongo: &Mongo, analysis: &AnalysisDoc) -> Result<()> {
    mongo
        .run(
            "insert_one",
            MARKET_ANALYSES,
            collection(mongo).insert_one(analysis),
        )
        .await?;
    Ok(())
}

pub async fn find(mongo: &Mongo, id: &str) -> Result<Option<AnalysisDoc>> {
    mongo
        .run(
            "find_one",
            MARKET_ANALYSES,
            collection(mongo)
                .find_one(doc! { "_id": id })
                .max_time(mongo.max_time()),
        )
        .await
}

/// A caller's analyses newest first, after the keyset cursor (created ms,
/// id), optionally of one status; at most `limit`.
pub async fn list(
    mongo: &Mongo,
    caller: &str,
    status: Option<&str>,
    after: Option<(i64, String)>,
    limit: i64,
) -> Result<Vec<AnalysisDoc>> {
    let mut filter = doc! { "caller": caller };
    if let Some(status) = status {
        filter.insert("status", status);
    }
    if let Some((created_ms, id)) = after {
        filter.insert(
            "$or",
            vec![
                doc! { "created_ms": { "$lt": created_ms } },
                doc! { "created_ms": created_ms, "_id": { "$lt": id } },
            ],
        );
    }
    mongo
        .find_all(
            MARKET_ANALYSES,
            collection(mongo)
                .find(filter)
                .sort(doc! { "created_ms": -1, "_id": -1 })
                .limit(limit)
                .max_time(mongo.max_time()),
        )
        .await
}

/// Claims the oldest claimable analysis for `worker` until `now_ms + lease_ms`.
pub async fn claim(
    mongo: &Mongo,
    worker: &str,
    now_ms: i64,
    lease_ms: i64,
) -> Result<Option<AnalysisDoc>> {
    mongo
        .run(
            "find_one_and_update",
            MARKET_ANALYSES,
            collection(mongo)
                .find_one_and_update(
                    doc! { "$or": [
                        { "status": "pending" },
                        { "status": "running", "lease_expires_ms": { "$lt": now_ms } },
                    ] },
                    doc! {
                        "$set": {
                            "status": "running",
                            "lease_owner": worker,
                            "lease_expires_ms": now_ms + lease_ms,
                            "started_ms": now_ms,
                        },
                        "$inc": { "attempts": 1 },
                    },
                )
                .sort(doc! { "created_ms": 1 })
                .return_document(ReturnDocument::After)
                .max_time(mongo.max_time()),
        )
        .await
}

/// Extends the lease while `worker` still holds it; false once it does not.
pub async fn renew(mongo: &Mongo, id: &str, worker: &str, until_ms: i64) -> Result<bool> {
    update_leased(
        mongo,
        id,
        worker,
        doc! { "$set": { "lease_expires_ms": until_ms } },
    )
    .await
}

/// Stores the outcome if `worker` still holds the lease; false otherwise
/// (another worker took the analysis over).
pub async fn finish(
    mongo: &Mongo,
    id: &str,
    worker: &str,
    now_ms: i64,
    outcome: Result<(Document, Document), String>,
) -> Result<bool> {
    let finished_at = DateTime::from_millis(now_ms);
    let set = match outcome {
        Ok((results, timings)) => doc! {
            "status": "completed", "results": results, "timings_ms": timings,
            "finished_ms": now_ms, "finished_at": finished_at,
        },
        Err(reason) => doc! {
            "status": "failed", "error": reason, "finished_ms": now_ms, "finished_at": finished_at,
        },
    };
    update_leased(
        mongo,
        id,
        worker,
        doc! { "$set": set, "$unset": { "lease_owner": "", "lease_expires_ms": "" } },
    )
    .await
}

/// Applies `update` to the analysis if `worker` still holds its lease;
/// whether it did.
async fn update_leased(mongo: &Mongo, id: &str, worker: &str, update: Document) -> Result<bool> {
    let updated = mongo
        .run(
            "update_one",
            MARKET_ANALYSES,
            collection(mongo).update_one(
                doc! { "_id": id, "status": "running", "lease_owner": worker },
                update,
            ),
        )
        .await?;
    Ok(updated.matched_count == 1)
}
