//! `price_history`: one document per product and UTC day (the bucket
//! pattern), holding at most `capacity` measurements; a full bucket
//! overflows into a new one for the same day. Each bucket keeps running
//! `count`, `min`, `max` and `sum`, so daily aggregates need no scan of the
//! measurements. One measurement is one upsert.
//!
//! Measurements are stored as three parallel arrays (`seqs`, `at_ms`,
//! `prices_cents`), a columnar layout like MongoDB's own time-series
//! buckets, with times as epoch milliseconds. (It also keeps to what the
//! MongoDB-compatible test server handles correctly: it stringifies
//! sub-documents pushed onto an existing array, and dates written by update
//! operators.)

use chrono::{DateTime, NaiveDate, Utc};
use mongodb::bson::{self, doc, oid::ObjectId};
use serde::{Deserialize, Serialize};

use super::mongo::{Mongo, PRICE_HISTORY};
use crate::{error::Result, model::price_history::Measurement};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    #[serde(rename = "_id")]
    pub id: ObjectId,
    pub product_id: i64,
    /// `YYYY-MM-DD` (UTC): sorts as it reads.
    pub day: String,
    pub count: i64,
    pub min: i64,
    pub max: i64,
    pub sum: i64,
    pub first_ms: i64,
    pub last_ms: i64,
    pub seqs: Vec<i64>,
    pub at_ms: Vec<i64>,
    pub prices_cents: Vec<i64>,
}

impl Bucket {
    pub fn measurements(&self) -> impl Iterator<Item = Measurement> + Clone + '_ {
        self.seqs
            .iter()
            .zip(&self.at_ms)
            .zip(&self.prices_cents)
            .map(|((seq, at_ms), price_cents)| Measurement {
                seq: *seq,
                at_ms: *at_ms,
                price_cents: *price_cents,
            })
    }
}

/// Every measurement of `buckets`, oldest first (ties by sequence).
pub fn in_order(buckets: &[Bucket]) -> Vec<Measurement> {
    let mut measurements: Vec<Measurement> =
        buckets.iter().flat_map(Bucket::measurements).collect();
    measurements.sort_by_key(|m| (m.at_ms, m.seq));
    measurements
}

pub fn day_key(day: NaiveDate) -> String {
    day.format("%Y-%m-%d").to_string()
}

/// Appends one measurement to the product's bucket of that day (a new
/// bucket when there is none with room). Returns false when the measurement
/// was already recorded (a replayed outbox row).
pub async fn append(
    mongo: &Mongo,
    capacity: i64,
    product_id: i64,
    price_cents: i64,
    at: DateTime<Utc>,
    seq: i64,
) -> Result<bool> {
    let buckets = mongo.collection::<bson::Document>(PRICE_HISTORY);
    let seen = mongo
        .run(
            "find_one",
            PRICE_HISTORY,
            buckets
                .find_one(doc! { "product_id": product_id, "seqs": seq })
                .projection(doc! { "_id": 1 })
                .max_time(mongo.max_time()),
        )
        .await?;
    if seen.is_some() {
        return Ok(false);
    }
    let day = day_key(at.date_naive());
    let at_ms = at.timestamp_millis();
    mongo
        .run(
            "update_one",
            PRICE_HISTORY,
            buckets
                .update_one(
                    doc! { "product_id": product_id, "day": &day, "count": { "$lt": capacity } },
                    doc! {
                        "$push": { "seqs": seq, "at_ms": at_ms, "prices_cents": price_cents },
                        "$inc": { "count": 1_i64, "sum": price_cents },
                        "$min": { "min": price_cents, "first_ms": at_ms },
                        "$max": { "max": price_cents, "last_ms": at_ms },
                    },
                )
                .upsert(true),
        )
        .await?;
    Ok(true)
}

/// The product's buckets of the days `from` to `to` (inclusive), in order.
pub async fn buckets(
    mongo: &Mongo,
    product_id: i64,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<Bucket>> {
    let collection = mongo.collection::<Bucket>(PRICE_HISTORY);
    mongo
        .find_all(
            PRICE_HISTORY,
            collection
                .find(doc! {
                    "product_id": product_id,
                    "day": { "$gte": day_key(from), "$lte": day_key(to) },
                })
                .sort(doc! { "day": 1, "first_ms": 1 })
                .max_time(mongo.max_time()),
        )
        .await
}
