//! Analytics over the catalog and its use: search insights, category
//! metrics and the revenue trend. Category metrics and the revenue trend come
//! from views refreshed on a schedule, and are cached (the `analytics` cache
//! family, stale after each refresh, and after `redis.analytics_ttl`).

use std::time::Duration;

use chrono::{DateTime, Datelike as _, Months, NaiveDate, Utc};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    cache::{Cache, Family},
    error::Result,
    model::{
        analytics::{CategoryMetrics, MonthlyRevenue},
        search::SearchInsights,
    },
    retry,
    store::{self, postgres::Reads},
};

/// The longest window one insights call may cover.
pub const MAX_WINDOW_DAYS: i64 = 366;
pub const DEFAULT_LIMIT: u32 = 10;
pub const MAX_LIMIT: u32 = 100;
pub const MAX_METRICS_DAYS: u32 = 365;
pub const DEFAULT_TREND_MONTHS: u32 = 12;
pub const MAX_TREND_MONTHS: u32 = 36;

#[derive(Clone)]
pub struct Analytics {
    /// The primary, for refreshes.
    db: PgPool,
    /// Every other read.
    reads: Reads,
    cache: Cache,
    /// Where a refresh's wait for the read replica runs, and what ends it
    /// early (then cached answers are dropped at once).
    tasks: TaskTracker,
    stopping: CancellationToken,
}

/// How long a refresh waits for the read replica to replay it before cached
/// answers are made stale (they are made stale anyway, with a warning).
const REPLICA_CATCH_UP: Duration = Duration::from_secs(30);

impl Analytics {
    pub fn new(db: PgPool, reads: Reads, cache: Cache) -> Self {
        Self {
            db,
            reads,
            cache,
            tasks: TaskTracker::new(),
            stopping: CancellationToken::new(),
        }
    }

    /// Runs the replica waits on the application's tracker, ended by its
    /// shutdown token, so that none outlives the application.
    pub fn with_tasks(self, tasks: TaskTracker, stopping: CancellationToken) -> Self {
        Self {
            tasks,
            stopping,
            ..self
        }
    }

    /// Top and zero-result queries over [start, end).
    #[tracing::instrument(skip_all, fields(%start, %end, limit), err(level = "info", Debug))]
    pub async fn search_insights(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        limit: u32,
    ) -> Result<SearchInsights> {
        retry::postgres(|| async {
            let mut conn = store::postgres::acquire(self.reads.pool()).await?;
            store::search::insights(&mut conn, start, end, limit.into()).await
        })
        .await
    }

    /// Per category over the last `window_days` UTC days, today included.
    #[tracing::instrument(skip_all, fields(window_days), err(level = "info", Debug))]
    pub async fn category_metrics(
        &self,
        window_days: u32,
        categories: &[String],
        today: NaiveDate,
    ) -> Result<Vec<CategoryMetrics>> {
        let first_day = today - chrono::Duration::days(i64::from(window_days) - 1);
        let key = format!("category_metrics|{first_day}|{}", categories.join("\u{1f}"));
        self.cache
            .get_or_compute(Family::Analytics, &key, || {
                retry::postgres(|| async {
                    let mut conn = store::postgres::acquire(self.reads.pool()).await?;
                    store::analytics::category_metrics(&mut conn, first_day, categories).await
                })
            })
            .await
    }

    /// Monthly revenue over the last `months` months, this one included.
    #[tracing::instrument(skip_all, fields(months), err(level = "info", Debug))]
    pub async fn revenue_trend(
        &self,
        months: u32,
        category: Option<&str>,
        today: NaiveDate,
    ) -> Result<Vec<MonthlyRevenue>> {
        let last = today.with_day(1).expect("every month has a first day");
        let first = last - Months::new(months - 1);
        let key = format!(
            "revenue_trend|{first}|{last}|{}",
            category.unwrap_or_default()
        );
        self.cache
            .get_or_compute(Family::Analytics, &key, || async {
                let rows = retry::postgres(|| async {
                    let mut conn = store::postgres::acquire(self.reads.pool()).await?;
                    store::analytics::monthly_revenue(&mut conn, first, last, category).await
                })
                .await?;
                Ok(with_growth(rows))
            })
            .await
    }

    /// Refreshes the analytics views and drops cached analytics. False when
    /// another replica was refreshing them already.
    ///
    /// With a read replica, cached answers are dropped only once the replica
    /// has replayed the refresh (at most `REPLICA_CATCH_UP` later, in the
    /// background): dropped earlier, they would be filled again from the
    /// replica's old views and kept for the whole analytics TTL.
    #[tracing::instrument(skip_all, err(level = "info", Debug))]
    pub async fn refresh(&self) -> Result<bool> {
        let refreshed = store::analytics::refresh(&self.db).await?;
        if !refreshed {
            return Ok(false);
        }
        if self.reads.replica().is_none() {
            self.cache.invalidate_family(Family::Analytics).await;
            return Ok(true);
        }
        let (db, reads, cache) = (self.db.clone(), self.reads.clone(), self.cache.clone());
        let stopping = self.stopping.clone();
        self.tasks.spawn(async move {
            let caught_up = tokio::select! {
                caught_up = reads.catch_up(&db, REPLICA_CATCH_UP) => caught_up,
                // Shutting down: drop the cached answers now rather than never.
                () = stopping.cancelled() => Ok(true),
            };
            match caught_up {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    timeout = ?REPLICA_CATCH_UP,
                    "the read replica has not replayed the analytics refresh in time; cached analytics are dropped anyway"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot tell whether the read replica has replayed the analytics refresh; cached analytics are dropped anyway"
                ),
            }
            cache.invalidate_family(Family::Analytics).await;
        });
        Ok(true)
    }
}

/// Each month's growth against the month before (none after a month
/// without revenue).
fn with_growth(rows: Vec<(NaiveDate, i64)>) -> Vec<MonthlyRevenue> {
    let mut previous: Option<i64> = None;
    rows.into_iter()
        .map(|(month, revenue_cents)| {
            let growth_rate = previous
                .filter(|p| *p > 0)
                .map(|p| (revenue_cents - p) as f64 / p as f64);
            previous = Some(revenue_cents);
            MonthlyRevenue {
                month,
                revenue_cents,
                growth_rate,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_against_the_previous_month_with_revenue() {
        let d = |m| NaiveDate::from_ymd_opt(2026, m, 1).unwrap();
        let trend = with_growth(vec![(d(1), 100), (d(2), 150), (d(3), 0), (d(4), 50)]);
        let rates: Vec<Option<f64>> = trend.iter().map(|m| m.growth_rate).collect();
        assert_eq!(rates, [None, Some(0.5), Some(-1.0), None]);
    }
}
