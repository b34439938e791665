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

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{Layer, filter::Targets, layer::Context};

use crate::error::reason;

tokio::task_local! {
    static CURRENT: Arc<RequestLog>;
}

const SQLX_TARGET: &str = "sqlx::query";

/// What one request did: its statements by normalized shape, and its cache
/// lookups.
#[derive(Debug, Default)]
pub struct RequestLog {
    counts: Mutex<HashMap<String, u32>>,
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

    fn record(&self, shape: String) {
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
            .map(|(s, n)| (s.clone(), *n))
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

/// The statement metrics and the per-request counting; see the module docs.
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

#[derive(Default)]
struct StatementFields {
    summary: String,
    statement: String,
    elapsed_secs: f64,
}

impl Visit for StatementFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "summary" => self.summary = value.to_owned(),
            "db.statement" => self.statement = value.to_owned(),
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
        // sqlx sends the whole SQL only when it is longer than its summary.
        let sql = if fields.statement.trim().is_empty() {
            fields.summary.as_str()
        } else {
            fields.statement.as_str()
        };
        let shape = normalize(sql);
        let operation = shape
            .split_whitespace()
            .next()
            .unwrap_or("UNKNOWN")
            .to_ascii_uppercase();
        metrics::histogram!("query_latency_seconds", "database_type" => "postgres", "operation" => operation.clone())
            .record(fields.elapsed_secs);
        if fields.elapsed_secs >= self.slow.as_secs_f64() {
            metrics::counter!("slow_query_count", "database_type" => "postgres", "operation" => operation.clone())
                .increment(1);
            tracing::warn!(
                event = reason::SLOW_QUERY,
                database_type = "postgres",
                operation = %operation,
                query_time_ms = fields.elapsed_secs * 1000.0,
                shape = %shape,
                "SLOW_QUERY: a statement ran longer than the slow-query threshold"
            );
        }
        let _ = CURRENT.try_with(|log| log.record(shape));
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
