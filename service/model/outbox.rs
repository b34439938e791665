//! The changes a PostgreSQL write hands to MongoDB through the outbox, in the
//! same transaction (see `store::outbox` and the outbox relay).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A change to apply to MongoDB.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "payload", rename_all = "snake_case")]
pub enum Change {
    /// Append to a product's price history.
    PriceMeasurement {
        product_id: i64,
        price_cents: i64,
        at: DateTime<Utc>,
    },
    /// Remove a deleted user's profile.
    DeleteProfile { user_id: i64 },
}

impl Change {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PriceMeasurement { .. } => "price_measurement",
            Self::DeleteProfile { .. } => "delete_profile",
        }
    }
}
