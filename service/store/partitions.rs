//! Monthly range partitions of the high-volume log tables: list, create
//! ahead, retire, and watch the DEFAULT partition.
//!
//! Partitions are named `<table>_pYYYYMM` and cover [first of the month,
//! first of the next) in UTC. Each partition is created or retired in a
//! transaction of its own under a transaction-scoped advisory lock, so
//! replicas running the maintenance at the same time take turns, and each
//! step checks what exists first: running it twice changes nothing. Table and
//! partition names come from the constants below and from dates, never from
//! input.
//!
//! **Locks.** Writers insert into these tables all the time (the audit log is
//! written by triggers in every write transaction). A writer locks the parent
//! table, then the partition its row is routed to. Maintenance takes its
//! locks in the same order and never holds one table's lock while waiting for
//! another's:
//! - one partition per transaction: a transaction that created one partition
//!   (and so locked DEFAULT) and then waited for the parent to create the
//!   next would deadlock with a writer holding the parent and routing a row
//!   to DEFAULT;
//! - the parent is locked ACCESS EXCLUSIVE first, for the few milliseconds a
//!   step takes. A weaker lock (ATTACH alone takes SHARE UPDATE EXCLUSIVE)
//!   would let a writer that already routed a row to DEFAULT insert it after
//!   the new partition's range was carved out of DEFAULT, and fail;
//! - `lock_timeout` bounds each wait, so a long-running writer makes a round
//!   fail and retry at the next interval instead of queueing every writer
//!   behind it.
//!
//! When a month's partition is created while the DEFAULT partition holds rows
//! of that month (they arrived before the partition existed), PostgreSQL
//! would refuse the new partition. The rows are moved instead, in the same
//! transaction: the partition is created detached, the rows are copied into
//! it and deleted from DEFAULT, and the partition is attached.

use chrono::{DateTime, Datelike as _, Months, NaiveDate, TimeZone as _, Utc};
use sqlx::{PgConnection, PgPool};

use crate::{
    error::{Error, Result},
    model::partitions::Partition,
};

/// A partitioned table and its partition key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionedTable {
    pub table: &'static str,
    pub column: &'static str,
}

pub const PRODUCT_SEARCHES: PartitionedTable = PartitionedTable {
    table: "product_searches",
    column: "searched_at",
};
pub const AUDIT_LOG: PartitionedTable = PartitionedTable {
    table: "audit_log",
    column: "changed_at",
};
pub const TABLES: [PartitionedTable; 2] = [PRODUCT_SEARCHES, AUDIT_LOG];

/// Serializes partition maintenance across replicas.
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('datagate.partitions'))";
/// How long a maintenance step waits for a table lock before giving up (the
/// round is retried at the next interval).
///
/// Maintenance statements themselves have no statement timeout: moving a
/// month's rows out of DEFAULT may take longer than the per-call default
/// the serving pool's connections carry (`server.request_timeout`).
const LOCK_TIMEOUT: &str =
    "SELECT set_config('lock_timeout', '5s', true), set_config('statement_timeout', '0', true)";

/// A maintenance statement's error: its own lock timeout (55P03, from
/// [`LOCK_TIMEOUT`]) is UNAVAILABLE `LOCK_TIMEOUT` (retry the round), not a
/// call's deadline as elsewhere.
fn maintenance(e: sqlx::Error) -> Error {
    match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03") => {
            Error::maintenance_lock_timeout()
        }
        _ => e.into(),
    }
}

/// A maintenance transaction: lock timeout set, advisory lock held.
async fn begin(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK_TIMEOUT).execute(&mut *tx).await?;
    sqlx::query(LOCK)
        .execute(&mut *tx)
        .await
        .map_err(maintenance)?;
    Ok(tx)
}

async fn exists(conn: &mut PgConnection, name: &str) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(name)
        .fetch_one(conn)
        .await?)
}

pub fn first_of_month(day: NaiveDate) -> NaiveDate {
    day.with_day(1).expect("every month has a first day")
}

fn partition_name(table: &str, month: NaiveDate) -> String {
    format!("{table}_p{:04}{:02}", month.year(), month.month())
}

fn month_of(table: &str, name: &str) -> Option<NaiveDate> {
    let digits = name.strip_prefix(table)?.strip_prefix("_p")?;
    if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    NaiveDate::from_ymd_opt(digits[..4].parse().ok()?, digits[4..].parse().ok()?, 1)
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

fn literal(day: NaiveDate) -> String {
    format!("'{}'", midnight(day).format("%Y-%m-%d %H:%M:%S+00"))
}

pub async fn list(conn: &mut PgConnection) -> Result<Vec<Partition>> {
    let rows: Vec<(String, String, String, f32)> = sqlx::query_as(
        "SELECT parent.relname::text, child.relname::text, \
                pg_get_expr(child.relpartbound, child.oid), child.reltuples \
         FROM pg_inherits i \
         JOIN pg_class parent ON parent.oid = i.inhparent \
         JOIN pg_class child ON child.oid = i.inhrelid \
         WHERE parent.relname = ANY($1) \
         ORDER BY parent.relname, child.relname",
    )
    .bind(TABLES.iter().map(|t| t.table).collect::<Vec<_>>())
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(table, name, bound, reltuples)| Partition {
            month: month_of(&table, &name),
            is_default: bound == "DEFAULT",
            estimated_rows: reltuples as i64,
            table,
            name,
            bound,
        })
        .collect())
}

/// Creates the partitions of the month of `today` and `months_ahead` months
/// after it, for every table. Returns the names created.
pub async fn ensure(pool: &PgPool, today: NaiveDate, months_ahead: u32) -> Result<Vec<String>> {
    let mut created = Vec::new();
    for table in TABLES {
        for ahead in 0..=months_ahead {
            let month = first_of_month(today) + Months::new(ahead);
            let name = partition_name(table.table, month);
            if exists(&mut *pool.acquire().await?, &name).await? {
                continue;
            }
            let mut tx = begin(pool).await?;
            // Another replica may have created it while this one waited.
            if exists(&mut tx, &name).await? {
                continue;
            }
            let moved = create_partition(&mut tx, table, &name, month).await?;
            tx.commit().await?;
            tracing::info!(partition = %name, moved_from_default = moved, "partition created");
            created.push(name);
        }
    }
    Ok(created)
}

/// Creates one month's partition, moving that month's rows out of DEFAULT.
/// Returns how many rows were moved.
async fn create_partition(
    conn: &mut PgConnection,
    table: PartitionedTable,
    name: &str,
    month: NaiveDate,
) -> Result<i64> {
    let (from, to) = (literal(month), literal(month + Months::new(1)));
    let PartitionedTable { table, column } = table;
    sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *conn)
        .await
        .map_err(maintenance)?;
    let in_month = format!("{column} >= {from} AND {column} < {to}");
    let waiting: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table}_default WHERE {in_month}"
    ))
    .fetch_one(&mut *conn)
    .await
    .map_err(maintenance)?;
    if waiting == 0 {
        sqlx::query(&format!(
            "CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM ({from}) TO ({to})"
        ))
        .execute(&mut *conn)
        .await
        .map_err(maintenance)?;
        return Ok(0);
    }
    for statement in [
        format!("CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"),
        format!("INSERT INTO {name} SELECT * FROM {table}_default WHERE {in_month}"),
        format!("DELETE FROM {table}_default WHERE {in_month}"),
        format!("ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES FROM ({from}) TO ({to})"),
    ] {
        sqlx::query(&statement)
            .execute(&mut *conn)
            .await
            .map_err(maintenance)?;
    }
    tracing::warn!(partition = %name, rows = waiting, "rows moved out of the DEFAULT partition");
    Ok(waiting)
}

/// Detaches and drops the monthly partitions of `table` that end on or
/// before the first of the month `retention_months` before `today`'s.
/// Returns the names dropped.
pub async fn retire(
    pool: &PgPool,
    table: PartitionedTable,
    today: NaiveDate,
    retention_months: u32,
) -> Result<Vec<String>> {
    let cutoff = first_of_month(today) - Months::new(retention_months);
    let mut dropped = Vec::new();
    let partitions = list(&mut *pool.acquire().await?).await?;
    for partition in partitions {
        let Some(month) = partition.month.filter(|_| partition.table == table.table) else {
            continue;
        };
        if month + Months::new(1) > cutoff {
            continue;
        }
        let mut tx = begin(pool).await?;
        if !exists(&mut tx, &partition.name).await? {
            continue;
        }
        sqlx::query(&format!(
            "ALTER TABLE {} DETACH PARTITION {}",
            table.table, partition.name
        ))
        .execute(&mut *tx)
        .await
        .map_err(maintenance)?;
        sqlx::query(&format!("DROP TABLE {}", partition.name))
            .execute(&mut *tx)
            .await
            .map_err(maintenance)?;
        tx.commit().await.map_err(maintenance)?;
        tracing::info!(partition = %partition.name, "partition retired");
        dropped.push(partition.name);
    }
    Ok(dropped)
}

/// Rows in each table's DEFAULT partition: rows whose month has no partition.
pub async fn default_rows(conn: &mut PgConnection) -> Result<Vec<(&'static str, i64)>> {
    let mut counts = Vec::new();
    for table in TABLES {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}_default", table.table))
            .fetch_one(&mut *conn)
            .await?;
        counts.push((table.table, n));
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_encode_their_month() {
        let month = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
        let name = partition_name("audit_log", month);
        assert_eq!(name, "audit_log_p202603");
        assert_eq!(month_of("audit_log", &name), Some(month));
        assert_eq!(month_of("audit_log", "audit_log_default"), None);
        assert_eq!(month_of("product_searches", &name), None);
    }

    #[test]
    fn bounds_are_utc_midnights() {
        let month = NaiveDate::from_ymd_opt(2026, 12, 1).unwrap();
        assert_eq!(literal(month + Months::new(1)), "'2027-01-01 00:00:00+00'");
    }
}
