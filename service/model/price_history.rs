//! Price history: single price measurements, and a product's prices over a
//! range, raw or per day.

use chrono::{DateTime, Utc};

/// The longest range one call may ask for.
pub const MAX_RANGE_DAYS: i64 = 366;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Measurements,
    Daily,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DailyPrice {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub measurements: i64,
    pub min_cents: i64,
    pub max_cents: i64,
    pub average_cents: f64,
    pub open_cents: i64,
    pub close_cents: i64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct History {
    /// (time, price in cents), oldest first.
    pub measurements: Vec<(DateTime<Utc>, i64)>,
    pub days: Vec<DailyPrice>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// The outbox id that recorded it: appending is idempotent by it.
    pub seq: i64,
    /// Epoch milliseconds.
    pub at_ms: i64,
    pub price_cents: i64,
}
