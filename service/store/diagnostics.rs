//! The SQL of AdminService's diagnostics: PostgreSQL's statistics views
//! (`pg_stat_statements`, `pg_stat_activity`, `pg_stat_user_*`,
//! `pg_stat_database`), the catalog, `hypopg`'s hypothetical indexes, and
//! the table-size samples.
//!
//! Every read is scoped to the connection's database (and its current
//! schema for tables and indexes). Names that reach SQL text come from the
//! catalog or are [`Identifier`]s, and are quoted; values are bound.
//! Statement text a caller gives is only ever prepared over the extended
//! protocol, which refuses more than one statement, inside a read-only
//! transaction on a connection of its own ([`session`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Connection as _, Executor as _, PgConnection, PgPool, Row as _, postgres::PgRow};

use crate::{
    error::Result,
    model::diagnostics::{
        ActiveStatement, Identifier, IndexSpec, InvalidIndex, RedundantIndex, SequentialScanTable,
        SlowStatement, TableSize, UnusedIndex,
    },
};

/// The most rows each index-health list returns.
pub const MAX_ROWS: i64 = 200;

/// The name of the statement AdviseIndexes prepares on its session.
const PREPARED: &str = "datagate_advice";

/// Whether `extension` is installed in this database.
pub async fn has_extension(conn: &mut PgConnection, extension: &str) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = $1)")
            .bind(extension)
            .fetch_one(conn)
            .await?,
    )
}

/// The top `limit` statements of this database by total (or mean) execution
/// time, their text as `pg_stat_statements` keeps it.
pub async fn slow_statements(
    conn: &mut PgConnection,
    by_mean: bool,
    limit: i64,
) -> Result<Vec<SlowStatement>> {
    let order = if by_mean {
        "mean_exec_time"
    } else {
        "total_exec_time"
    };
    let rows = sqlx::query(&format!(
        "SELECT queryid, query, calls, rows, total_exec_time, mean_exec_time, \
                shared_blks_hit, shared_blks_read \
         FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND queryid IS NOT NULL \
         ORDER BY {order} DESC, queryid \
         LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|row| {
            let hit: i64 = row.try_get("shared_blks_hit")?;
            let read: i64 = row.try_get("shared_blks_read")?;
            Ok(SlowStatement {
                query_id: row.try_get("queryid")?,
                query: row
                    .try_get::<Option<String>, _>("query")?
                    .unwrap_or_default(),
                calls: row.try_get("calls")?,
                rows: row.try_get("rows")?,
                total_time_ms: row.try_get("total_exec_time")?,
                mean_time_ms: row.try_get("mean_exec_time")?,
                shared_buffer_hit_ratio: (hit + read > 0).then(|| hit as f64 / (hit + read) as f64),
            })
        })
        .collect()
}

/// The text `pg_stat_statements` keeps for `query_id` in this database.
pub async fn statement_text(conn: &mut PgConnection, query_id: i64) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT query FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND queryid = $1 \
         LIMIT 1",
    )
    .bind(query_id)
    .fetch_optional(conn)
    .await?
    .flatten())
}

/// Whether the backend is one of the service's own: this database (checked
/// by the callers' filters), this user, and an application name in `own`.
const OWN: &str = "(a.usename = current_user AND a.application_name = ANY($1))";

/// Client backends of this database, but for this one, running (or idle in
/// a transaction) for at least `min_duration_ms`; their text as PostgreSQL
/// shows it.
pub async fn active_statements(
    conn: &mut PgConnection,
    own_applications: &[&str],
    min_duration_ms: f64,
) -> Result<Vec<ActiveStatement>> {
    let rows = sqlx::query(&format!(
        "SELECT pid, coalesce(usename::text, '') AS usename, \
                coalesce(application_name, '') AS application_name, \
                coalesce(state, '') AS state, coalesce(wait_event_type, '') AS wait_event_type, \
                coalesce(wait_event, '') AS wait_event, coalesce(query, '') AS query, \
                pg_blocking_pids(pid) AS blocked_by, {OWN} AS own, ms \
         FROM pg_stat_activity a, \
              LATERAL (SELECT extract(epoch FROM clock_timestamp() - \
                         CASE WHEN state = 'active' THEN query_start ELSE state_change END \
                       )::float8 * 1000 AS ms) since \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
           AND backend_type = 'client backend' AND state IS DISTINCT FROM 'idle' \
           AND ms >= $2 \
         ORDER BY ms DESC, pid"
    ))
    .bind(own_applications)
    .bind(min_duration_ms)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(ActiveStatement {
                pid: row.try_get("pid")?,
                user: row.try_get("usename")?,
                application_name: row.try_get("application_name")?,
                state: row.try_get("state")?,
                wait_event_type: row.try_get("wait_event_type")?,
                wait_event: row.try_get("wait_event")?,
                duration_ms: row.try_get("ms")?,
                query: row.try_get("query")?,
                blocked_by: row.try_get("blocked_by")?,
                own: row.try_get("own")?,
            })
        })
        .collect()
}

/// Whether backend `pid`, connected to this database, is one of the
/// service's own; `None` when no such backend is connected here.
pub async fn backend_is_own(
    conn: &mut PgConnection,
    own_applications: &[&str],
    pid: i32,
) -> Result<Option<bool>> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT {OWN} FROM pg_stat_activity a \
         WHERE a.pid = $2 AND a.datname = current_database()"
    ))
    .bind(own_applications)
    .bind(pid)
    .fetch_optional(conn)
    .await?)
}

/// `pg_cancel_backend(pid)`: whether the signal was sent.
pub async fn cancel_backend(conn: &mut PgConnection, pid: i32) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT pg_cancel_backend($1)")
        .bind(pid)
        .fetch_one(conn)
        .await?)
}

pub async fn unused_indexes(conn: &mut PgConnection) -> Result<Vec<UnusedIndex>> {
    first_rows(
        conn,
        "SELECT s.relname::text AS \"table\", s.indexrelname::text AS \"index\", \
                pg_relation_size(s.indexrelid) AS size_bytes \
         FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid \
         WHERE s.schemaname = current_schema() AND s.idx_scan = 0 \
           AND NOT i.indisunique AND NOT i.indisprimary \
         ORDER BY 3 DESC, 2 \
         LIMIT $1",
    )
    .await
}

/// Tables with sequential scans and more than one for every ten index scans
/// (or no index scan at all).
pub async fn sequential_scan_tables(conn: &mut PgConnection) -> Result<Vec<SequentialScanTable>> {
    first_rows(
        conn,
        "SELECT relname::text AS \"table\", seq_scan, coalesce(idx_scan, 0) AS idx_scan, \
                seq_tup_read, n_live_tup AS live_rows \
         FROM pg_stat_user_tables \
         WHERE schemaname = current_schema() AND seq_scan > 0 \
           AND (coalesce(idx_scan, 0) = 0 OR seq_scan::float8 / idx_scan > 0.1) \
         ORDER BY seq_tup_read DESC, relname \
         LIMIT $1",
    )
    .await
}

/// Plain B-tree indexes (no expression, no predicate) whose key, operator
/// classes included, equals or is a prefix of another's on the same table.
/// A unique index is never the redundant one (it enforces a constraint); of
/// two equal non-unique ones, the newer is.
pub async fn redundant_indexes(conn: &mut PgConnection) -> Result<Vec<RedundantIndex>> {
    first_rows(
        conn,
        "SELECT t.relname::text AS \"table\", ca.relname::text AS \"index\", \
                cb.relname::text AS covered_by, a.indkey::text = b.indkey::text AS duplicate \
         FROM pg_index a \
         JOIN pg_index b ON b.indrelid = a.indrelid AND b.indexrelid <> a.indexrelid \
         JOIN pg_class ca ON ca.oid = a.indexrelid \
         JOIN pg_class cb ON cb.oid = b.indexrelid \
         JOIN pg_class t ON t.oid = a.indrelid \
         JOIN pg_am am ON am.oid = ca.relam AND am.amname = 'btree' \
         WHERE t.relnamespace = current_schema()::regnamespace \
           AND cb.relam = ca.relam \
           AND a.indexprs IS NULL AND b.indexprs IS NULL \
           AND a.indpred IS NULL AND b.indpred IS NULL \
           AND a.indisvalid AND b.indisvalid \
           AND NOT a.indisunique \
           AND (b.indkey::text || ' ') LIKE (a.indkey::text || ' %') \
           AND (b.indclass::text || ' ') LIKE (a.indclass::text || ' %') \
           AND (a.indkey::text <> b.indkey::text OR b.indisunique \
                OR a.indexrelid > b.indexrelid) \
         ORDER BY 1, 2, 3 \
         LIMIT $1",
    )
    .await
}

pub async fn invalid_indexes(conn: &mut PgConnection) -> Result<Vec<InvalidIndex>> {
    first_rows(
        conn,
        "SELECT t.relname::text AS \"table\", c.relname::text AS \"index\" \
         FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_class t ON t.oid = i.indrelid \
         WHERE t.relnamespace = current_schema()::regnamespace AND NOT i.indisvalid \
         ORDER BY 1, 2 \
         LIMIT $1",
    )
    .await
}

/// The first [`MAX_ROWS`] rows of a catalog query whose `$1` is the limit,
/// its columns named as `T`'s fields.
async fn first_rows<T>(conn: &mut PgConnection, sql: &'static str) -> Result<Vec<T>>
where
    T: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
{
    Ok(sqlx::query_as(sql).bind(MAX_ROWS).fetch_all(conn).await?)
}

/// A connection of its own on `pool`'s database, outside the pool: for the
/// work that leaves state on its session (a prepared statement,
/// hypothetical indexes) or cannot run in a transaction (`CREATE INDEX
/// CONCURRENTLY`). Its statements are bounded by `timeout`; the caller
/// closes it when done (dropping it closes it too).
pub async fn session(pool: &PgPool, timeout: Duration) -> Result<PgConnection> {
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    let ms = super::postgres::millis(timeout);
    conn.execute(sqlx::raw_sql(&format!(
        "SET statement_timeout = {ms}; SET lock_timeout = {ms}"
    )))
    .await?;
    Ok(conn)
}

/// Starts the read-only transaction advice plans in: generic plans (so a
/// statement's `$n` parameters are planned as parameters, whatever values
/// EXECUTE passes).
pub async fn begin_planning(conn: &mut PgConnection) -> Result<()> {
    conn.execute(sqlx::raw_sql(
        "BEGIN READ ONLY; SET LOCAL plan_cache_mode = force_generic_plan",
    ))
    .await?;
    Ok(())
}

/// Prepares `statement` (one statement: the extended protocol refuses
/// more) under [`PREPARED`]; returns how many parameters it takes.
pub async fn prepare(conn: &mut PgConnection, statement: &str) -> Result<usize> {
    sqlx::query(&format!("PREPARE {PREPARED} AS {statement}"))
        .persistent(false)
        .execute(&mut *conn)
        .await?;
    let params: i32 = sqlx::query_scalar(
        "SELECT coalesce(cardinality(parameter_types), 0) \
         FROM pg_prepared_statements WHERE name = $1",
    )
    .bind(PREPARED)
    .fetch_one(&mut *conn)
    .await?;
    Ok(usize::try_from(params).unwrap_or_default())
}

/// The generic plan of the prepared statement, as EXPLAIN's JSON.
pub async fn generic_plan(conn: &mut PgConnection, params: usize) -> Result<serde_json::Value> {
    let args = vec!["NULL"; params].join(", ");
    let execute = if params == 0 {
        format!("EXECUTE {PREPARED}")
    } else {
        format!("EXECUTE {PREPARED}({args})")
    };
    Ok(
        sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {execute}"))
            .persistent(false)
            .fetch_one(conn)
            .await?,
    )
}

pub async fn deallocate(conn: &mut PgConnection) -> Result<()> {
    sqlx::query(&format!("DEALLOCATE {PREPARED}"))
        .persistent(false)
        .execute(conn)
        .await?;
    Ok(())
}

/// The columns of `table` in the current schema, in order; `None` when it
/// is not a table there.
pub async fn columns_of(conn: &mut PgConnection, table: &str) -> Result<Option<Vec<String>>> {
    let columns: Vec<(Option<String>,)> = sqlx::query_as(
        "SELECT a.attname::text FROM pg_class c \
         LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace \
           AND c.relkind IN ('r', 'p') \
         ORDER BY a.attnum",
    )
    .bind(table)
    .fetch_all(conn)
    .await?;
    if columns.is_empty() {
        return Ok(None);
    }
    Ok(Some(columns.into_iter().filter_map(|(c,)| c).collect()))
}

/// Drops every hypothetical index, then creates one on `table (columns)`
/// (a table of the current schema); returns its definition and the name
/// plans call it by.
pub async fn hypothetical_index(
    conn: &mut PgConnection,
    table: &str,
    columns: &[String],
) -> Result<(String, String)> {
    sqlx::query("SELECT hypopg_reset()")
        .execute(&mut *conn)
        .await?;
    Ok(sqlx::query_as(
        "WITH ddl AS ( \
           SELECT format('CREATE INDEX ON %I.%I (%s)', current_schema(), $1::text, \
                         (SELECT string_agg(quote_ident(c), ', ' ORDER BY o) \
                          FROM unnest($2::text[]) WITH ORDINALITY AS u(c, o))) AS text) \
         SELECT ddl.text, h.indexname::text FROM ddl, hypopg_create_index(ddl.text) h",
    )
    .bind(table)
    .bind(columns)
    .fetch_one(conn)
    .await?)
}

/// The kind of relation `table` is in the current schema (`r` table, `p`
/// partitioned table, ...), `None` when there is none.
pub async fn relation_kind(conn: &mut PgConnection, name: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT relkind::text FROM pg_class \
         WHERE relname = $1 AND relnamespace = current_schema()::regnamespace",
    )
    .bind(name)
    .fetch_optional(conn)
    .await?)
}

/// A plain valid-or-not B-tree index on exactly `columns` of `table` (no
/// expression, no predicate), by name.
pub async fn index_on(
    conn: &mut PgConnection,
    table: &Identifier,
    columns: &[Identifier],
) -> Result<Option<String>> {
    let columns: Vec<&str> = columns.iter().map(Identifier::as_str).collect();
    Ok(sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_class t ON t.oid = i.indrelid \
         JOIN pg_am am ON am.oid = c.relam AND am.amname = 'btree' \
         WHERE t.relname = $1 AND t.relnamespace = current_schema()::regnamespace \
           AND i.indexprs IS NULL AND i.indpred IS NULL \
           AND i.indnkeyatts = cardinality($2::text[]) \
           AND ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, o) \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n \
                     WHERE k.o <= i.indnkeyatts ORDER BY k.o) = $2::text[] \
         ORDER BY 1 LIMIT 1",
    )
    .bind(table.as_str())
    .bind(columns)
    .fetch_optional(conn)
    .await?)
}

/// `CREATE INDEX CONCURRENTLY name ON schema.table (columns)`, outside any
/// transaction; returns the definition PostgreSQL reports.
pub async fn create_index_concurrently(
    conn: &mut PgConnection,
    spec: &IndexSpec,
    name: &Identifier,
) -> Result<String> {
    let schema: String = sqlx::query_scalar("SELECT quote_ident(current_schema())")
        .fetch_one(&mut *conn)
        .await?;
    let columns: Vec<String> = spec.columns.iter().map(Identifier::quoted).collect();
    conn.execute(sqlx::raw_sql(&format!(
        "CREATE INDEX CONCURRENTLY {} ON {schema}.{} ({})",
        name.quoted(),
        spec.table.quoted(),
        columns.join(", ")
    )))
    .await?;
    Ok(sqlx::query_scalar(
        "SELECT pg_get_indexdef(c.oid) FROM pg_class c \
         WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace",
    )
    .bind(name.as_str())
    .fetch_one(conn)
    .await?)
}

/// The tables, partitions and partitioned tables of the current schema
/// with their total size (a partitioned table's: its leaf partitions').
const SIZES: &str = "sizes AS ( \
    SELECT c.relname::text AS name, p.relname::text AS parent, c.reltuples, \
           (CASE WHEN c.relkind = 'p' \
                 THEN (SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0) \
                       FROM pg_partition_tree(c.oid) t WHERE t.isleaf) \
                 ELSE pg_total_relation_size(c.oid) END)::bigint AS total \
    FROM pg_class c \
    LEFT JOIN pg_inherits i ON i.inhrelid = c.oid \
    LEFT JOIN pg_class p ON p.oid = i.inhparent \
    WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p'))";

/// Every table's size now, with the oldest sample taken since `since`.
pub async fn table_sizes(conn: &mut PgConnection, since: DateTime<Utc>) -> Result<Vec<TableSize>> {
    #[allow(clippy::type_complexity)]
    let rows: Vec<(
        String,
        Option<String>,
        i64,
        f32,
        Option<i64>,
        Option<DateTime<Utc>>,
    )> = sqlx::query_as(&format!(
        "WITH {SIZES} \
         SELECT s.name, s.parent, s.total, s.reltuples, o.total_bytes, o.sampled_at \
         FROM sizes s LEFT JOIN LATERAL ( \
           SELECT total_bytes, sampled_at FROM table_size_samples t \
           WHERE t.table_name = s.name AND t.sampled_at >= $1 \
           ORDER BY sampled_at LIMIT 1) o ON true \
         ORDER BY s.total DESC, s.name"
    ))
    .bind(since)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(table, parent, total_bytes, reltuples, sampled, at)| TableSize {
                table,
                parent,
                total_bytes,
                estimated_rows: reltuples as i64,
                growth: sampled.zip(at).map(|(bytes, at)| (total_bytes - bytes, at)),
            },
        )
        .collect())
}

/// How long the sampler waits for a table's lock (sizing a table takes
/// ACCESS SHARE on it: a migration or partition maintenance holding ACCESS
/// EXCLUSIVE must not keep a pooled connection waiting for long). The round
/// is retried.
const SAMPLE_LOCK_TIMEOUT: &str = "SELECT set_config('lock_timeout', '5s', true)";

/// Samples every table's size, unless a sample was taken within `skip_within`
/// (another replica's round), and deletes samples older than `retention`.
/// Returns how many rows were sampled.
pub async fn sample_sizes(
    conn: &mut PgConnection,
    skip_within: Duration,
    retention: Duration,
) -> Result<u64> {
    let mut tx = conn.begin().await?;
    sqlx::query(SAMPLE_LOCK_TIMEOUT).execute(&mut *tx).await?;
    let sampled = sqlx::query(&format!(
        "WITH {SIZES} \
         INSERT INTO table_size_samples (table_name, sampled_at, total_bytes) \
         SELECT name, now(), total FROM sizes \
         WHERE NOT EXISTS (SELECT 1 FROM table_size_samples \
                           WHERE sampled_at > now() - make_interval(secs => $1)) \
         ON CONFLICT DO NOTHING"
    ))
    .bind(skip_within.as_secs_f64())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(
        "DELETE FROM table_size_samples WHERE sampled_at < now() - make_interval(secs => $1)",
    )
    .bind(retention.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(sampled)
}

/// Shared-buffer hits and reads of this database since its statistics were
/// reset.
pub async fn buffer_cache(conn: &mut PgConnection) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT coalesce(blks_hit, 0), coalesce(blks_read, 0) \
         FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_optional(conn)
    .await?
    .unwrap_or((0, 0)))
}

/// Client backends of this database by state.
pub async fn connections_by_state(conn: &mut PgConnection) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT coalesce(state, 'unknown'), count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND backend_type = 'client backend' \
         GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(conn)
    .await?)
}
