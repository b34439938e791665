//! AdminService's diagnostics: what the service's own database engineers
//! would look at. Slow and running statements, index health, index advice
//! measured with hypothetical indexes, building an advised index, table
//! sizes with their growth (from samples this service takes), and the
//! health of the database, the replica, Redis and the pools.
//!
//! An RPC that needs an extension the database lacks answers
//! FAILED_PRECONDITION `EXTENSION_MISSING`; the service starts without
//! them (the migration creates them only where it can).

use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::{Connection as _, PgConnection, PgPool};

use crate::{
    cache::Cache,
    config::DiagnosticsSettings,
    error::{Detail, Error, Result, reason},
    model::diagnostics::{
        ActiveStatement, Advice, AdviceTarget, DatabaseHealth, IndexCandidate, IndexHealth,
        IndexSpec, SlowStatement, TableSize,
    },
    retry, statements,
    store::{
        self, diagnostics,
        postgres::{APPLICATION_NAMES, Reads},
    },
};

pub const PG_STAT_STATEMENTS: &str = "pg_stat_statements";
pub const HYPOPG: &str = "hypopg";

/// How long a diagnostics session's statements may take outside a call
/// (inside one, the call's deadline).
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Diagnostics {
    db: PgPool,
    reads: Reads,
    cache: Cache,
    settings: DiagnosticsSettings,
}

/// FAILED_PRECONDITION `EXTENSION_MISSING` for `extension`.
fn extension_missing(extension: &str, what: &str) -> Error {
    Error::FailedPrecondition(
        Detail::new(
            reason::EXTENSION_MISSING,
            format!(
                "the PostgreSQL extension {extension} is not installed in the service's database; \
                 {what} needs it (CREATE EXTENSION {extension}, as a user allowed to)"
            ),
        )
        .with("extension", extension),
    )
}

/// The SQLSTATE of a database error inside `error`, if it is one.
fn sqlstate(error: &Error) -> Option<String> {
    match error {
        Error::Internal(e) => e
            .downcast_ref::<sqlx::Error>()
            .and_then(|e| e.as_database_error())
            .and_then(|db| db.code())
            .map(|code| code.into_owned()),
        _ => None,
    }
}

/// The database's message inside `error`, if it is a database error.
fn database_message(error: &Error) -> Option<String> {
    match error {
        Error::Internal(e) => e
            .downcast_ref::<sqlx::Error>()
            .and_then(|e| e.as_database_error())
            .map(|db| db.message().to_owned()),
        _ => None,
    }
}

impl Diagnostics {
    pub fn new(db: PgPool, reads: Reads, cache: Cache, settings: DiagnosticsSettings) -> Self {
        Self {
            db,
            reads,
            cache,
            settings,
        }
    }

    async fn require(&self, conn: &mut PgConnection, extension: &str, what: &str) -> Result<()> {
        if diagnostics::has_extension(conn, extension).await? {
            Ok(())
        } else {
            Err(extension_missing(extension, what))
        }
    }

    /// The top `limit` statements by total and by mean execution time.
    #[tracing::instrument(skip_all, fields(limit))]
    pub async fn slow_statements(
        &self,
        limit: i64,
    ) -> Result<(Vec<SlowStatement>, Vec<SlowStatement>)> {
        let lists = retry::postgres(|| async {
            let mut conn = store::postgres::acquire(&self.db).await?;
            self.require(&mut conn, PG_STAT_STATEMENTS, "ListSlowStatements")
                .await?;
            Ok((
                diagnostics::slow_statements(&mut conn, false, limit).await?,
                diagnostics::slow_statements(&mut conn, true, limit).await?,
            ))
        })
        .await
        // Installed but not in shared_preload_libraries: it cannot answer.
        .map_err(|e| match sqlstate(&e).as_deref() {
            Some("55000") => extension_missing(PG_STAT_STATEMENTS, "ListSlowStatements"),
            _ => e,
        })?;
        let normalize = |list: Vec<SlowStatement>| {
            list.into_iter()
                .map(|s| SlowStatement {
                    query: statements::normalize(&s.query),
                    ..s
                })
                .collect()
        };
        Ok((normalize(lists.0), normalize(lists.1)))
    }

    /// Backends running (or idle in a transaction) for at least
    /// `min_duration`, their text normalized.
    pub async fn active_statements(&self, min_duration: Duration) -> Result<Vec<ActiveStatement>> {
        let mut list = retry::postgres(|| async {
            let mut conn = store::postgres::acquire(&self.db).await?;
            diagnostics::active_statements(
                &mut conn,
                &APPLICATION_NAMES,
                min_duration.as_secs_f64() * 1000.0,
            )
            .await
        })
        .await?;
        for statement in &mut list {
            statement.query = statements::normalize(&statement.query);
        }
        Ok(list)
    }

    /// Cancels what backend `pid` runs, if it is one of the service's own.
    #[tracing::instrument(skip_all, fields(pid))]
    pub async fn cancel(&self, pid: i32) -> Result<bool> {
        let mut conn = store::postgres::acquire(&self.db).await?;
        match diagnostics::backend_is_own(&mut conn, &APPLICATION_NAMES, pid).await? {
            None => Err(Error::not_found(
                reason::BACKEND_NOT_FOUND,
                format!("no backend with pid {pid} is connected to the service's database"),
            )),
            Some(false) => Err(Error::PermissionDenied(
                Detail::new(
                    reason::BACKEND_NOT_OWNED,
                    format!(
                        "backend {pid} is not one of the service's own (another user or application); \
                         the service cancels only its own statements"
                    ),
                )
                .with("pid", pid),
            )),
            Some(true) => {
                let cancelled = diagnostics::cancel_backend(&mut conn, pid).await?;
                tracing::info!(pid, cancelled, "statement cancel requested by an admin");
                Ok(cancelled)
            }
        }
    }

    pub async fn index_health(&self) -> Result<IndexHealth> {
        retry::postgres(|| async {
            let mut conn = store::postgres::acquire(&self.db).await?;
            Ok(IndexHealth {
                unused: diagnostics::unused_indexes(&mut conn).await?,
                sequential_scans: diagnostics::sequential_scan_tables(&mut conn).await?,
                redundant: diagnostics::redundant_indexes(&mut conn).await?,
                invalid: diagnostics::invalid_indexes(&mut conn).await?,
            })
        })
        .await
    }

    /// A session of its own for work that leaves state on it, bounded by
    /// the call's deadline.
    async fn session(&self) -> Result<PgConnection> {
        let timeout = store::postgres::current_budget()?.unwrap_or(SESSION_TIMEOUT);
        diagnostics::session(&self.db, timeout).await
    }

    /// Plans the statement, then again with a hypothetical index per
    /// candidate (see [`candidates`]), and reports the costs.
    #[tracing::instrument(skip_all)]
    pub async fn advise(&self, target: AdviceTarget) -> Result<Advice> {
        let mut conn = self.session().await?;
        let advice = self.advise_on(&mut conn, target).await;
        // Closed, never pooled: the prepared statement and the hypothetical
        // indexes end with it.
        let _ = conn.close().await;
        advice
    }

    async fn advise_on(&self, conn: &mut PgConnection, target: AdviceTarget) -> Result<Advice> {
        self.require(conn, HYPOPG, "AdviseIndexes").await?;
        let statement = match target {
            AdviceTarget::Statement(text) => text,
            AdviceTarget::QueryId(id) => {
                self.require(conn, PG_STAT_STATEMENTS, "AdviseIndexes by query_id")
                    .await?;
                diagnostics::statement_text(conn, id)
                    .await?
                    .ok_or_else(|| {
                        Error::not_found(
                            reason::STATEMENT_NOT_FOUND,
                            format!(
                                "pg_stat_statements has no statement {id} in the service's database"
                            ),
                        )
                    })?
            }
        };
        // A statement run through SQL's PREPARE / EXECUTE (psql, some
        // drivers) is kept as its PREPARE: plan what it prepares.
        let statement = prepared_body(&statement).to_owned();
        diagnostics::begin_planning(conn).await?;
        let params = diagnostics::prepare(conn, &statement).await.map_err(|e| {
            match (sqlstate(&e), database_message(&e)) {
                // Syntax errors, unknown tables or columns, wrong types, a
                // statement that cannot be prepared (42xxx, 0A000).
                (Some(code), Some(message)) if code.starts_with("42") || code == "0A000" => {
                    Error::invalid("statement", format!("PostgreSQL cannot plan it: {message}"))
                }
                _ => e,
            }
        })?;
        let plan = diagnostics::generic_plan(conn, params).await?;
        diagnostics::deallocate(conn).await?;
        let cost_before = total_cost(&plan).unwrap_or_default();
        let mut candidates = Vec::new();
        for (table, filter) in sequential_scans(&plan) {
            let Some(columns) = diagnostics::columns_of(conn, &table).await? else {
                continue;
            };
            for key in candidate_keys(&filter, &columns) {
                let (definition, index_name) =
                    diagnostics::hypothetical_index(conn, &table, &key).await?;
                diagnostics::prepare(conn, &statement).await?;
                let with_index = diagnostics::generic_plan(conn, params).await?;
                diagnostics::deallocate(conn).await?;
                let cost_after = total_cost(&with_index).unwrap_or(cost_before);
                candidates.push(IndexCandidate {
                    table: table.clone(),
                    columns: key,
                    definition,
                    cost_after,
                    improvement: if cost_before > 0.0 {
                        (cost_before - cost_after) / cost_before
                    } else {
                        0.0
                    },
                    used: uses_index(&with_index, &index_name),
                });
            }
        }
        candidates.sort_by(|a, b| a.cost_after.total_cmp(&b.cost_after));
        Ok(Advice {
            statement: statements::normalize(&statement),
            cost_before,
            candidates,
        })
    }

    /// Builds the index with `CREATE INDEX CONCURRENTLY`; returns its name,
    /// definition and how long the build took.
    #[tracing::instrument(skip_all, fields(table = spec.table.as_str()))]
    pub async fn create_index(&self, spec: IndexSpec) -> Result<(String, String, Duration)> {
        let mut conn = self.session().await?;
        let created = self.create_index_on(&mut conn, &spec).await;
        let _ = conn.close().await;
        created
    }

    async fn create_index_on(
        &self,
        conn: &mut PgConnection,
        spec: &IndexSpec,
    ) -> Result<(String, String, Duration)> {
        let table = spec.table.as_str();
        match diagnostics::relation_kind(conn, table).await?.as_deref() {
            Some("r") => {}
            Some("p") => {
                return Err(Error::invalid(
                    "table",
                    "is a partitioned table: PostgreSQL cannot index it concurrently; index its partitions",
                ));
            }
            _ => {
                return Err(Error::not_found(
                    reason::TABLE_NOT_FOUND,
                    format!("the service's schema has no table {table}"),
                ));
            }
        }
        let known = diagnostics::columns_of(conn, table)
            .await?
            .unwrap_or_default();
        let mut violations = crate::error::Violations::default();
        for (i, column) in spec.columns.iter().enumerate() {
            if !known.iter().any(|k| k == column.as_str()) {
                violations.add(
                    format!("columns[{i}]"),
                    format!("{table} has no column {}", column.as_str()),
                );
            } else if spec.columns[..i].contains(column) {
                violations.add(format!("columns[{i}]"), "is listed twice");
            }
        }
        violations.into_result()?;
        let name = spec.name();
        let exists = |index: &str| {
            Error::AlreadyExists(
                Detail::new(
                    reason::INDEX_ALREADY_EXISTS,
                    format!("the index {index} already covers these columns"),
                )
                .with("index", index),
            )
        };
        if diagnostics::relation_kind(conn, name.as_str())
            .await?
            .is_some()
        {
            return Err(exists(name.as_str()));
        }
        if let Some(existing) = diagnostics::index_on(conn, &spec.table, &spec.columns).await? {
            return Err(exists(&existing));
        }
        let started = Instant::now();
        let definition = diagnostics::create_index_concurrently(conn, spec, &name)
            .await
            .map_err(|e| match sqlstate(&e).as_deref() {
                // Another caller built it meanwhile.
                Some("42P07") => exists(name.as_str()),
                // Indexing needs the table's owner, which the service's
                // role is not where the migrations' role owns the tables.
                Some("42501") => Error::FailedPrecondition(
                    Detail::new(
                        reason::DATABASE_PRIVILEGE_MISSING,
                        format!(
                            "the service's database user may not index {table} (it must own the table); \
                             build the index as the table's owner"
                        ),
                    )
                    .with("table", table),
                ),
                _ => e,
            })?;
        tracing::info!(index = name.as_str(), "index created by an admin");
        Ok((name.as_str().to_owned(), definition, started.elapsed()))
    }

    /// Every table's size, with its growth over the last `window`.
    pub async fn table_sizes(&self, window: Duration) -> Result<Vec<TableSize>> {
        let since = Utc::now()
            - chrono::Duration::from_std(window).map_err(|e| Error::Internal(e.into()))?;
        retry::postgres(|| async {
            let mut conn = store::postgres::acquire(&self.db).await?;
            diagnostics::table_sizes(&mut conn, since).await
        })
        .await
    }

    /// One sampling round (background): every table's size, unless another
    /// replica sampled in the last half interval; old samples deleted.
    pub async fn sample_sizes(&self) -> Result<u64> {
        let mut conn = store::postgres::acquire(&self.db).await?;
        diagnostics::sample_sizes(
            &mut conn,
            self.settings.size_sample_interval / 2,
            self.settings.size_sample_retention,
        )
        .await
    }

    pub fn size_sample_interval(&self) -> Duration {
        self.settings.size_sample_interval
    }

    pub async fn database_health(&self) -> Result<DatabaseHealth> {
        let (hit, read, connections) = retry::postgres(|| async {
            let mut conn = store::postgres::acquire(&self.db).await?;
            let (hit, read) = diagnostics::buffer_cache(&mut conn).await?;
            Ok((
                hit,
                read,
                diagnostics::connections_by_state(&mut conn).await?,
            ))
        })
        .await?;
        // The definition the `replication_lag_seconds` gauge uses.
        let replication_lag_seconds = self.reads.replication_lag().await.unwrap_or_else(|e| {
            tracing::warn!(error = ?e, "the read replica's lag could not be read");
            None
        });
        let mut pools = vec![store::postgres::pool_stats("postgres", &self.db)];
        if let Some(replica) = self.reads.replica() {
            pools.push(store::postgres::pool_stats("postgres-reads", replica));
        }
        pools.extend(self.cache.pool_stats());
        Ok(DatabaseHealth {
            buffer_cache_hit_ratio: (hit + read > 0).then(|| hit as f64 / (hit + read) as f64),
            connections,
            replication_lag_seconds,
            redis: self.cache.info().await,
            pools,
        })
    }
}

/// The statement a `PREPARE name [(types)] AS statement` prepares; any
/// other text as it is.
fn prepared_body(text: &str) -> &str {
    let trimmed = text.trim_start();
    let Some(rest) = trimmed
        .get(..8)
        .filter(|p| p.eq_ignore_ascii_case("PREPARE "))
        .map(|_| &trimmed[8..])
    else {
        return text;
    };
    // The first `AS` word after the name and its parameter types (neither
    // can contain one as a word of its own).
    let bytes = rest.as_bytes();
    let boundary = |i: usize| {
        bytes
            .get(i)
            .is_none_or(|b| b.is_ascii_whitespace() || *b == b')')
    };
    (1..rest.len().saturating_sub(2))
        .find(|&i| {
            rest.get(i..i + 2)
                .is_some_and(|w| w.eq_ignore_ascii_case("as"))
                && boundary(i - 1)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_whitespace)
        })
        .map_or(text, |i| rest[i + 2..].trim_start())
}

/// The top plan node's total cost, from EXPLAIN's JSON.
fn total_cost(plan: &serde_json::Value) -> Option<f64> {
    plan.get(0)?.get("Plan")?.get("Total Cost")?.as_f64()
}

/// Every plan node, depth first.
fn nodes(plan: &serde_json::Value) -> Vec<&serde_json::Value> {
    fn walk<'a>(node: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        out.push(node);
        if let Some(children) = node.get("Plans").and_then(|p| p.as_array()) {
            for child in children {
                walk(child, out);
            }
        }
    }
    let mut out = Vec::new();
    if let Some(root) = plan.get(0).and_then(|p| p.get("Plan")) {
        walk(root, &mut out);
    }
    out
}

/// The relations the plan reads by sequential scan with a filter, with the
/// filter's text (each relation once, its filters joined).
fn sequential_scans(plan: &serde_json::Value) -> Vec<(String, String)> {
    let mut scans: Vec<(String, String)> = Vec::new();
    for node in nodes(plan) {
        if node.get("Node Type").and_then(|t| t.as_str()) != Some("Seq Scan") {
            continue;
        }
        let (Some(relation), Some(filter)) = (
            node.get("Relation Name").and_then(|r| r.as_str()),
            node.get("Filter").and_then(|f| f.as_str()),
        ) else {
            continue;
        };
        match scans.iter_mut().find(|(r, _)| r == relation) {
            Some((_, filters)) => {
                filters.push_str(" AND ");
                filters.push_str(filter);
            }
            None => scans.push((relation.to_owned(), filter.to_owned())),
        }
    }
    scans
}

/// Whether any node of the plan scans the index `name`.
fn uses_index(plan: &serde_json::Value, name: &str) -> bool {
    nodes(plan)
        .iter()
        .any(|node| node.get("Index Name").and_then(|n| n.as_str()) == Some(name))
}

/// The columns of `columns` a filter names, in the order it first names
/// them (string literals skipped, `"quoted"` names unquoted).
fn filter_columns(filter: &str, columns: &[String]) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut chars = filter.chars().peekable();
    let mut word = String::new();
    let flush = |word: &mut String, found: &mut Vec<String>| {
        if !word.is_empty() {
            if columns.iter().any(|c| c == word) && !found.contains(word) {
                found.push(word.clone());
            }
            word.clear();
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                flush(&mut word, &mut found);
                while let Some(d) = chars.next() {
                    if d == '\'' && chars.peek() != Some(&'\'') {
                        break;
                    }
                    if d == '\'' {
                        chars.next();
                    }
                }
            }
            '"' => {
                flush(&mut word, &mut found);
                for d in chars.by_ref() {
                    if d == '"' {
                        break;
                    }
                    word.push(d);
                }
                flush(&mut word, &mut found);
            }
            c if c.is_alphanumeric() || c == '_' => word.push(c),
            // `x::type`: the type's name is no column.
            ':' if chars.peek() == Some(&':') => {
                flush(&mut word, &mut found);
                chars.next();
                while chars
                    .peek()
                    .is_some_and(|d| d.is_alphanumeric() || *d == '_')
                {
                    chars.next();
                }
            }
            _ => flush(&mut word, &mut found),
        }
    }
    flush(&mut word, &mut found);
    found
}

/// The index keys worth trying for a filter: each column it names alone,
/// and all of them together (in the order named) when there are several.
fn candidate_keys(filter: &str, columns: &[String]) -> Vec<Vec<String>> {
    let named = filter_columns(filter, columns);
    let mut keys: Vec<Vec<String>> = named.iter().map(|c| vec![c.clone()]).collect();
    if named.len() > 1 {
        keys.push(named);
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn filter_columns_are_the_table_columns_a_filter_names() {
        let columns = cols(&["id", "code", "n", "text"]);
        assert_eq!(
            filter_columns("((n > $2) AND (code = $1))", &columns),
            cols(&["n", "code"])
        );
        assert_eq!(
            filter_columns("((code)::text = 'n id'::text)", &columns),
            cols(&["code"]),
            "literals and type names are no columns"
        );
        assert_eq!(
            filter_columns("(\"code\" = 'it''s n')", &columns),
            cols(&["code"])
        );
    }

    #[test]
    fn a_prepare_is_planned_as_the_statement_it_prepares() {
        assert_eq!(
            prepared_body("PREPARE q(text, int) AS SELECT * FROM t WHERE a = $1"),
            "SELECT * FROM t WHERE a = $1"
        );
        assert_eq!(prepared_body("prepare alias_q as\n  SELECT 1"), "SELECT 1");
        assert_eq!(
            prepared_body("SELECT a AS b FROM t"),
            "SELECT a AS b FROM t"
        );
        assert_eq!(prepared_body("PREPARE q"), "PREPARE q");
    }

    #[test]
    fn candidates_are_each_column_and_all_together() {
        let columns = cols(&["a", "b"]);
        assert_eq!(
            candidate_keys("((b = $1) AND (a = $2))", &columns),
            vec![cols(&["b"]), cols(&["a"]), cols(&["b", "a"])]
        );
        assert_eq!(candidate_keys("(a = $1)", &columns), vec![cols(&["a"])]);
        assert!(candidate_keys("($1 = 1)", &columns).is_empty());
    }

    #[test]
    fn sequential_scans_and_index_use_are_read_from_the_plan() {
        let plan = serde_json::json!([{"Plan": {
            "Node Type": "Hash Join", "Total Cost": 120.5,
            "Plans": [
                {"Node Type": "Seq Scan", "Relation Name": "orders", "Filter": "(status = $1)"},
                {"Node Type": "Index Scan", "Relation Name": "users", "Index Name": "<1>btree_users_id"},
                {"Node Type": "Seq Scan", "Relation Name": "products"}
            ]
        }}]);
        assert_eq!(total_cost(&plan), Some(120.5));
        assert_eq!(
            sequential_scans(&plan),
            vec![("orders".to_owned(), "(status = $1)".to_owned())]
        );
        assert!(uses_index(&plan, "<1>btree_users_id"));
        assert!(!uses_index(&plan, "<2>btree_orders_status"));
    }
}
