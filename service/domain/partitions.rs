//! Partition maintenance of the log tables: create ahead, retire by
//! retention, and report rows stranded in DEFAULT partitions. Time comes in
//! as a date, so callers (and tests) decide what "today" is.

use chrono::NaiveDate;
use sqlx::PgPool;

use crate::{
    config::PartitionSettings,
    error::Result,
    model::partitions::Partition,
    retry,
    store::{
        self,
        partitions::{self, AUDIT_LOG, PRODUCT_SEARCHES},
    },
};

#[derive(Clone)]
pub struct Partitions {
    db: PgPool,
    settings: PartitionSettings,
}

impl Partitions {
    pub fn new(db: PgPool, settings: PartitionSettings) -> Self {
        Self { db, settings }
    }

    pub async fn list(&self) -> Result<(Vec<Partition>, Vec<(&'static str, i64)>)> {
        retry::postgres(|| async {
            let mut conn = store::postgres::acquire(&self.db).await?;
            Ok((
                partitions::list(&mut conn).await?,
                partitions::default_rows(&mut conn).await?,
            ))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(%today), err(level = "info", Debug))]
    pub async fn ensure(&self, today: NaiveDate) -> Result<Vec<String>> {
        partitions::ensure(&self.db, today, self.settings.months_ahead).await
    }

    #[tracing::instrument(skip_all, fields(%today), err(level = "info", Debug))]
    pub async fn retire(&self, today: NaiveDate) -> Result<Vec<String>> {
        let mut dropped = partitions::retire(
            &self.db,
            PRODUCT_SEARCHES,
            today,
            self.settings.search_retention_months,
        )
        .await?;
        dropped.extend(
            partitions::retire(
                &self.db,
                AUDIT_LOG,
                today,
                self.settings.audit_retention_months,
            )
            .await?,
        );
        Ok(dropped)
    }

    /// One maintenance round: create ahead, retire, then report DEFAULT rows
    /// (gauge `partition_default_rows{table}`, and a warning when non-zero).
    pub async fn maintain(&self, today: NaiveDate) -> Result<()> {
        self.ensure(today).await?;
        self.retire(today).await?;
        let mut conn = store::postgres::acquire(&self.db).await?;
        for (table, rows) in partitions::default_rows(&mut conn).await? {
            metrics::gauge!("partition_default_rows", "table" => table).set(rows as f64);
            if rows > 0 {
                tracing::warn!(
                    table,
                    rows,
                    "rows in the DEFAULT partition: their months have no partition yet; they move into it when it is created"
                );
            }
        }
        Ok(())
    }
}
