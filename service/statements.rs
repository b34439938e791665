//! Per-request statement accounting and N+1 detection.
//!
//! sqlx reports every statement it runs as a `tracing` event (target
//! `sqlx::query`, with the SQL and its duration), from the task that runs it.
//! [`StatementLayer`] turns those events into metrics (`query_latency_seconds`,
//! `slow_query_count`, `SLOW_QUERY` log lines) and, when the task runs inside
//! a [`scope`], counts the statement by shape in that scope's
//! [`RequestLog`]. The gRPC layer opens one scope per call, so every
//! statement of a call (its loaders' batches included) is counted, with no
//! change to the code that runs them. The layer must be part of the
//! subscriber: `telemetry::init` installs it, and so does the test harness.
//!
//! Counted are the statements sqlx sends through its query path, COMMIT and
//! ROLLBACK included; BEGIN is pipelined with a transaction's first statement
//! and not counted.
//!
//! At the end of a call, [`report_n_plus_one`] logs `N_PLUS_ONE_DETECTED` for
//! each shape repeated more than the threshold and counts it in
//! `n_plus_one_detected_total`.
//!
//! Each statement is also a client span ([`crate::telemetry::DbSpan`]:
//! `db.query.text` is its shape), made from the same event, with its start
//! set back by the elapsed time sqlx reports.
//!
//! **Cost.** A statement's shape (its normalized text, operation and table)
//! is worked out once per distinct statement text and kept in a bounded
//! map ([`MAX_SHAPES`]); each execution looks its text up without
//! allocating and counts a shared `Arc<str>`.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, LazyLock, Mutex, OnceLock, RwLock,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{Layer, filter::Targets, layer::Context};

use crate::{
    error::reason,
    telemetry::{DbOperation, DbSpan, DbSystem, Peer},
};

tokio::task_local! {
    static CURRENT: Arc<RequestLog>;
}

const SQLX_TARGET: &str = "sqlx::query";

/// What one request did: its statements by normalized shape, and its cache
/// lookups.
#[derive(Debug, Default)]
pub struct RequestLog {
    counts: Mutex<HashMap<Arc<str>, u32>>,
    cache_hits: AtomicU32,
    cache_misses: AtomicU32,
}

/// Records a cache lookup of the current request (all keys hit, or not).
pub fn record_cache_lookup(hit: bool) {
    let _ = CURRENT.try_with(|log| {
        let counter = if hit {
            &log.cache_hits
        } else {
            &log.cache_misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
    });
}

impl RequestLog {
    /// `Some(true)` if every cache lookup of the request hit, `Some(false)`
    /// if any missed, `None` if it made none.
    pub fn cache_hit(&self) -> Option<bool> {
        let hits = self.cache_hits.load(Ordering::Relaxed);
        let misses = self.cache_misses.load(Ordering::Relaxed);
        (hits + misses > 0).then_some(misses == 0)
    }

    fn record(&self, shape: Arc<str>) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry(shape).or_default() += 1;
    }

    pub fn total(&self) -> u32 {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }

    /// Shapes and how often each ran, most frequent first.
    pub fn shapes(&self) -> Vec<(String, u32)> {
        let mut shapes: Vec<(String, u32)> = self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(s, n)| (s.to_string(), *n))
            .collect();
        shapes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        shapes
    }

    /// The most any one shape was repeated.
    pub fn max_repeats(&self) -> u32 {
        self.shapes().first().map_or(0, |(_, n)| *n)
    }
}

/// Runs `work` with the statements it issues (in this task) counted in `log`.
pub async fn scope<F: Future>(log: Arc<RequestLog>, work: F) -> F::Output {
    CURRENT.scope(log, work).await
}

/// The log of the request running on this task, to carry into a task it
/// spawns for the request (see [`scope`]).
pub fn current() -> Option<Arc<RequestLog>> {
    CURRENT.try_with(Arc::clone).ok()
}

/// Logs `N_PLUS_ONE_DETECTED` and bumps `n_plus_one_detected_total` for each
/// shape of `log` repeated more than `threshold` times; returns those shapes.
pub fn report_n_plus_one(log: &RequestLog, threshold: u32, operation: &str) -> Vec<(String, u32)> {
    let repeated: Vec<(String, u32)> = log
        .shapes()
        .into_iter()
        .filter(|(_, n)| *n > threshold)
        .collect();
    for (shape, count) in &repeated {
        tracing::warn!(
            event = reason::N_PLUS_ONE_DETECTED,
            operation,
            shape = %shape,
            count,
            threshold,
            "N_PLUS_ONE_DETECTED: one statement shape ran {count} times in one request; batch it"
        );
        metrics::counter!("n_plus_one_detected_total", "operation" => operation.to_owned())
            .increment(1);
    }
    repeated
}

/// The shape of a statement: whitespace collapsed, literals replaced by `?`.
/// datagate binds every value, so shapes are few and stable; literals are
/// replaced anyway so that a hand-written query never leaks a value.
pub fn normalize(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    let mut last_space = true;
    let mut prev_word_char = false;
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            if !last_space {
                out.push(' ');
                last_space = true;
            }
            prev_word_char = false;
            continue;
        }
        last_space = false;
        if c == '\'' {
            // A string literal ('' escapes a quote).
            while let Some(d) = chars.next() {
                if d == '\'' {
                    if chars.peek() == Some(&'\'') {
                        chars.next();
                    } else {
                        break;
                    }
                }
            }
            out.push('?');
            prev_word_char = false;
        } else if c.is_ascii_digit() && !prev_word_char && !out.ends_with('$') {
            while chars
                .peek()
                .is_some_and(|d| d.is_ascii_digit() || *d == '.')
            {
                chars.next();
            }
            out.push('?');
            prev_word_char = false;
        } else {
            prev_word_char = c.is_alphanumeric() || c == '_' || c == '$';
            out.push(c);
        }
    }
    out.trim_end().to_owned()
}

/// How many distinct statement texts keep their shape. The service's own
/// statements are a few hundred at most; texts with literals in them (the
/// `SET LOCAL statement_timeout = <ms>` of a short deadline) are many, so
/// a full map is emptied and refills with what runs.
pub const MAX_SHAPES: usize = 1024;

/// What is derived once from a statement's text.
#[derive(Debug)]
struct Shape {
    /// [`normalize`]d.
    text: Arc<str>,
    /// The first keyword, upper case (`SELECT`, `WITH`, `COMMIT`...).
    operation: &'static str,
    /// The first table after FROM, INTO or UPDATE.
    table: Option<Arc<str>>,
}

/// Shapes by statement text, at most `MAX_SHAPES`.
#[derive(Default)]
struct Shapes(RwLock<HashMap<Box<str>, Arc<Shape>>>);

impl Shapes {
    /// The shape of `sql`, from the map or worked out (and kept) now.
    fn of(&self, sql: &str) -> Arc<Shape> {
        if let Some(shape) = self.0.read().unwrap_or_else(|e| e.into_inner()).get(sql) {
            return shape.clone();
        }
        let shape = Arc::new(Shape::of(sql));
        let mut shapes = self.0.write().unwrap_or_else(|e| e.into_inner());
        if shapes.len() >= MAX_SHAPES {
            shapes.clear();
        }
        shapes.insert(sql.into(), shape.clone());
        shape
    }
}

static SHAPES: LazyLock<Shapes> = LazyLock::new(Shapes::default);

/// The shape of `sql` (see [`Shapes`]).
fn shape_of(sql: &str) -> Arc<Shape> {
    SHAPES.of(sql)
}

/// The statement keywords the metrics and spans name; anything else is
/// `OTHER` (a label from a fixed set).
pub const OPERATIONS: &[&str] = &[
    "SELECT",
    "INSERT",
    "UPDATE",
    "DELETE",
    "WITH",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SET",
    "CREATE",
    "DROP",
    "ALTER",
    "REFRESH",
    "LOCK",
    "TRUNCATE",
    "COPY",
    "VACUUM",
    "ANALYZE",
    "EXPLAIN",
    "CALL",
    "DO",
    "SAVEPOINT",
    "RELEASE",
    "SHOW",
    "VALUES",
    "MERGE",
];

impl Shape {
    fn of(sql: &str) -> Self {
        let text = normalize(sql);
        let first = text
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .trim_end_matches(';');
        let operation = OPERATIONS
            .iter()
            .find(|op| op.eq_ignore_ascii_case(first))
            .copied()
            .unwrap_or("OTHER");
        let table = first_table(&text).map(Arc::from);
        Self {
            text: text.into(),
            operation,
            table,
        }
    }
}

/// The first table a (normalized) statement names after FROM, INTO, UPDATE
/// or JOIN, without quotes; a function (`unnest($1)`), a subquery or
/// `LATERAL` is passed over.
fn first_table(shape: &str) -> Option<&str> {
    let mut words = shape.split_whitespace().peekable();
    while let Some(word) = words.next() {
        if !["FROM", "INTO", "UPDATE", "JOIN"]
            .iter()
            .any(|k| k.eq_ignore_ascii_case(word))
        {
            continue;
        }
        let Some(next) = words.peek() else {
            break;
        };
        let name = next.trim_end_matches([',', ';', ')']).trim_matches('"');
        let is_identifier = !name.is_empty()
            && !["LATERAL", "ONLY", "SELECT"]
                .iter()
                .any(|k| k.eq_ignore_ascii_case(name))
            && name
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '.');
        if is_identifier {
            return Some(name);
        }
    }
    None
}

/// The PostgreSQL server of the statement spans (`server.address`,
/// `server.port`): the primary's, set once at start-up.
static POSTGRES: OnceLock<Peer> = OnceLock::new();

/// Names the server in the statement spans from the primary's URL (the
/// first call wins). Statements on a read replica name the primary too: the
/// event sqlx reports does not say which pool ran it.
pub fn set_postgres_server(url: &str) {
    if let Some(peer) = Peer::from_url(DbSystem::Postgres, url) {
        let _ = POSTGRES.set(peer);
    }
}

/// The statement metrics, spans and per-request counting; see the module
/// docs.
#[derive(Debug, Clone)]
pub struct StatementLayer {
    slow: Duration,
}

impl StatementLayer {
    pub fn new(slow_threshold: Duration) -> Self {
        Self {
            slow: slow_threshold,
        }
    }

    /// The layer with a filter that lets through sqlx's statement events
    /// (emitted at DEBUG, or WARN when slow) and nothing else.
    pub fn filtered<S>(slow_threshold: Duration) -> impl Layer<S>
    where
        S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        Self::new(slow_threshold)
            .with_filter(Targets::new().with_target(SQLX_TARGET, tracing::Level::DEBUG))
    }
}

/// Reads a statement event: the shape is looked up while the field is
/// borrowed, so nothing is copied.
#[derive(Default)]
struct StatementFields {
    shape: Option<Arc<Shape>>,
    elapsed_secs: f64,
}

impl Visit for StatementFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            // sqlx sends the whole SQL only when it is longer than its
            // summary (its first four words, then " …"); a summary without
            // the ellipsis is the whole statement.
            "summary" if !value.ends_with(" …") => self.shape = Some(shape_of(value.trim())),
            "db.statement" if !value.trim().is_empty() => {
                self.shape = Some(shape_of(value.trim()));
            }
            _ => {}
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.elapsed_secs = value;
        }
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

impl<S: Subscriber> Layer<S> for StatementLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != SQLX_TARGET {
            return;
        }
        let mut fields = StatementFields::default();
        event.record(&mut fields);
        let Some(shape) = fields.shape else {
            return;
        };
        let elapsed = Duration::try_from_secs_f64(fields.elapsed_secs).unwrap_or_default();
        drop(DbSpan::start(POSTGRES.get(), Some(elapsed), || {
            DbOperation {
                operation: shape.operation,
                collection: shape.table.clone(),
                query: Some(shape.text.clone()),
            }
        }));
        let operation = shape.operation;
        metrics::histogram!("query_latency_seconds", "database_type" => "postgres", "operation" => operation)
            .record(fields.elapsed_secs);
        if fields.elapsed_secs >= self.slow.as_secs_f64() {
            metrics::counter!("slow_query_count", "database_type" => "postgres", "operation" => operation)
                .increment(1);
            tracing::warn!(
                event = reason::SLOW_QUERY,
                database_type = "postgres",
                operation,
                query_time_ms = fields.elapsed_secs * 1000.0,
                shape = %shape.text,
                "SLOW_QUERY: a statement ran longer than the slow-query threshold"
            );
        }
        let _ = CURRENT.try_with(|log| log.record(shape.text.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_fold_whitespace_and_hide_literals_but_keep_placeholders() {
        assert_eq!(
            normalize("SELECT *\n  FROM users\tWHERE id = $1 AND name = 'o''brien' LIMIT 10"),
            "SELECT * FROM users WHERE id = $1 AND name = ? LIMIT ?"
        );
        assert_eq!(
            normalize("SELECT col1, t2.x FROM t2"),
            "SELECT col1, t2.x FROM t2"
        );
        assert_eq!(normalize("SELECT 1.5 + $12"), "SELECT ? + $12");
    }

    #[test]
    fn a_shape_names_its_operation_and_first_table_once_per_text() {
        let sql = "SELECT id\n  FROM orders WHERE user_id = ANY($1) AND status = 'done'";
        let shapes = Shapes::default();
        let shape = shapes.of(sql);
        assert_eq!(
            &*shape.text,
            "SELECT id FROM orders WHERE user_id = ANY($1) AND status = ?"
        );
        assert_eq!(shape.operation, "SELECT");
        assert_eq!(shape.table.as_deref(), Some("orders"));
        assert!(Arc::ptr_eq(&shape, &shapes.of(sql)), "worked out once");

        let insert = Shape::of("insert into \"audit_log\" (a) values ($1)");
        assert_eq!(
            (insert.operation, insert.table.as_deref()),
            ("INSERT", Some("audit_log"))
        );
        let update = Shape::of("UPDATE users SET version = version + 1 WHERE id = $1");
        assert_eq!(update.table.as_deref(), Some("users"));
        let commit = Shape::of("COMMIT");
        assert_eq!(
            (commit.operation, commit.table.as_deref()),
            ("COMMIT", None)
        );
        let subquery = Shape::of("SELECT count(*) FROM (SELECT 1) s");
        assert_eq!(subquery.table, None);
        let lateral = Shape::of(
            "SELECT o.* FROM unnest($1::bigint[]) AS u(id) \
             CROSS JOIN LATERAL ( SELECT id FROM orders WHERE user_id = u.id) o",
        );
        assert_eq!(lateral.table.as_deref(), Some("orders"));
        assert_eq!(Shape::of("NOTIFY x").operation, "OTHER");
        assert_eq!(Shape::of("BEGIN; SET LOCAL x = 1").operation, "BEGIN");
    }

    #[test]
    fn the_shape_map_stays_bounded() {
        let shapes = Shapes::default();
        for ms in 0..MAX_SHAPES + 10 {
            shapes.of(&format!("SET LOCAL statement_timeout = {ms}"));
        }
        assert_eq!(shapes.0.read().unwrap().len(), 10, "emptied once full");
    }

    #[tokio::test]
    async fn a_scope_reports_only_shapes_repeated_beyond_the_threshold() {
        let log = Arc::new(RequestLog::default());
        scope(log.clone(), async {
            for _ in 0..4 {
                CURRENT.with(|l| l.record("SELECT a".into()));
            }
            CURRENT.with(|l| l.record("SELECT b".into()));
        })
        .await;
        assert_eq!(log.total(), 5);
        assert_eq!(log.max_repeats(), 4);
        assert_eq!(
            report_n_plus_one(&log, 3, "test"),
            [("SELECT a".to_owned(), 4)]
        );
        assert!(report_n_plus_one(&log, 4, "test").is_empty());
    }
}
