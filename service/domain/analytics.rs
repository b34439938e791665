//! Analytics over the catalog and its use.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::error::Result;
use crate::store::{self, search::SearchInsights};

/// The longest window one insights call may cover.
pub const MAX_WINDOW_DAYS: i64 = 366;
pub const DEFAULT_LIMIT: u32 = 10;
pub const MAX_LIMIT: u32 = 100;

#[derive(Clone)]
pub struct Analytics {
    db: PgPool,
}

impl Analytics {
    pub fn new(db: PgPool) -> Self {
        Self { db }
    }

    /// Top and zero-result queries over [start, end).
    #[tracing::instrument(skip_all, fields(%start, %end, limit), err(Debug))]
    pub async fn search_insights(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        limit: u32,
    ) -> Result<SearchInsights> {
        let mut conn = self.db.acquire().await?;
        store::search::insights(&mut conn, start, end, limit.into()).await
    }
}
