//! Price history: measurements appended to MongoDB buckets (see
//! `documents::price_history`) through the outbox, read back raw or per day.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{catalog::product_not_found, profiles::mongodb_not_configured};
use crate::{
    cache::Cache,
    documents::{Mongo, price_history},
    error::Result,
    loaders::cached_products,
    model::{
        Id,
        price_history::{DailyPrice, Granularity, History},
    },
};

#[derive(Clone)]
pub struct PriceHistory {
    db: PgPool,
    cache: Cache,
    mongo: Option<Mongo>,
}

impl PriceHistory {
    pub fn new(db: PgPool, cache: Cache, mongo: Option<Mongo>) -> Self {
        Self { db, cache, mongo }
    }

    /// The product's prices over [start, end).
    #[tracing::instrument(skip_all, fields(product_id = %id), err(level = "info", Debug))]
    pub async fn get(
        &self,
        id: Id,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        granularity: Granularity,
    ) -> Result<History> {
        let mongo = self.mongo.as_ref().ok_or_else(mongodb_not_configured)?;
        if cached_products(&self.db, &self.cache, &[id])
            .await?
            .is_empty()
        {
            return Err(product_not_found(id));
        }
        let last_day = (end - chrono::Duration::microseconds(1)).date_naive();
        let buckets = price_history::buckets(mongo, id.get(), start.date_naive(), last_day).await?;
        Ok(match granularity {
            Granularity::Measurements => {
                let measurements = price_history::in_order(&buckets)
                    .into_iter()
                    .filter_map(|m| {
                        DateTime::from_timestamp_millis(m.at_ms).map(|at| (at, m.price_cents))
                    })
                    .filter(|(at, _)| (start..end).contains(at))
                    .collect();
                History {
                    measurements,
                    days: Vec::new(),
                }
            }
            Granularity::Daily => {
                // Several buckets of one day (after an overflow) make one day.
                let mut days: BTreeMap<String, Vec<&price_history::Bucket>> = BTreeMap::new();
                for bucket in &buckets {
                    days.entry(bucket.day.clone()).or_default().push(bucket);
                }
                let days = days
                    .into_iter()
                    .map(|(day, buckets)| {
                        let count: i64 = buckets.iter().map(|b| b.count).sum();
                        let sum: i64 = buckets.iter().map(|b| b.sum).sum();
                        let all = buckets.iter().flat_map(|b| b.measurements());
                        let open = all.clone().min_by_key(|m| (m.at_ms, m.seq));
                        let close = all.max_by_key(|m| (m.at_ms, m.seq));
                        DailyPrice {
                            day,
                            measurements: count,
                            min_cents: buckets.iter().map(|b| b.min).min().unwrap_or_default(),
                            max_cents: buckets.iter().map(|b| b.max).max().unwrap_or_default(),
                            average_cents: if count > 0 {
                                sum as f64 / count as f64
                            } else {
                                0.0
                            },
                            open_cents: open.map_or(0, |m| m.price_cents),
                            close_cents: close.map_or(0, |m| m.price_cents),
                        }
                    })
                    .collect();
                History {
                    measurements: Vec::new(),
                    days,
                }
            }
        })
    }
}
