//! Prometheus metrics: the process-wide recorder and the `/metrics` HTTP
//! endpoint. Gauges that describe a pool are sampled when scraped, so they are
//! never stale and cost nothing between scrapes.
//!
//! **Exported from start-up.** A counter that appears only when it first
//! moves hides that first increase from `rate()` and `increase()`, which
//! need two samples: an alert on the first N+1 detection or the first
//! internal error would never fire. [`export_known_series`] therefore
//! registers, at zero, every series whose label values are known at
//! start-up (the RPC methods, the cache's entities and operations, the
//! background tasks, ...); series whose labels come from traffic (a
//! statement's operation, a caller's quota bucket) are registered by their
//! module for the values its configuration names. `tests/api/process.rs`
//! scrapes a fresh process for them.

use std::{future::Future, sync::OnceLock};

use axum::{Router, extract::State, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::{
    cache,
    cache::Cache,
    documents::Mongo,
    model::diagnostics::PoolStats,
    proto,
    store::postgres::{Reads, pool_stats},
};

/// Latency buckets in seconds, from a cache hit to a slow analytic query.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// `rpc_latency_seconds` buckets: fine around the latency objectives (p95
/// under 100 ms for search, 200 ms for standard calls, 500 ms for
/// analysis; `deploy/monitoring/rules/datagate.rules.yml`), each of which is
/// a bucket bound, so "slower than the objective" is exact.
pub const RPC_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The global recorder. It is installed once per process (tests build many
/// applications in one process and share it).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // A full-name matcher takes precedence over a suffix.
            PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("rpc_latency_seconds".into()),
                    RPC_LATENCY_BUCKETS,
                )
                .expect("the RPC latency bucket list is not empty")
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("the latency bucket list is not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

/// Every gRPC status code but UNIMPLEMENTED (counted under method
/// `unknown`), by the name `rpc_requests_total{code}` uses.
const CODES: [&str; 16] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The cache's Redis operations (the `op` label) and why a read was loaded
/// from the database by this process itself (`cause`).
const CACHE_OPS: [&str; 6] = ["mget", "fill", "lock", "unlock", "invalidate", "ping"];
const CACHE_OWN_LOAD_CAUSES: [&str; 2] = ["noticed_late", "pool_busy"];

/// The tasks `retry::background` reports failures of.
const BACKGROUND_TASKS: [&str; 5] = [
    "partition maintenance",
    "refreshing the sales analytics",
    "sweeping expired idempotency keys",
    "the outbox relay",
    "writing the search log",
];

/// Counters without labels.
const PLAIN_COUNTERS: [&str; 8] = [
    "grpc_connections_refused_total",
    "grpc_connections_idle_closed_total",
    "mongo_outbox_applied_total",
    "mongo_outbox_failures_total",
    "search_log_written_total",
    "abandoned_reads_closed_total",
    "abandoned_statement_cancels_total",
    "idempotency_keys_expired_total",
];

/// `(service, method)` of every RPC of the datagate services, from the
/// descriptors the build embeds.
pub fn rpc_methods() -> Vec<(String, String)> {
    let set =
        <prost_types::FileDescriptorSet as prost::Message>::decode(proto::FILE_DESCRIPTOR_SET)
            .expect("the embedded descriptor set decodes");
    let mut methods = Vec::new();
    for file in &set.file {
        for service in &file.service {
            let service_name = format!("{}.{}", file.package(), service.name());
            for method in &service.method {
                methods.push((service_name.clone(), method.name().to_owned()));
            }
        }
    }
    methods
}

/// Registers at zero every series with labels known at start-up (see the
/// module's doc). Adding zero leaves a series that already moved as it is
/// (tests build many applications in one process).
pub fn export_known_series() {
    handle();
    for (service, method) in rpc_methods() {
        for code in CODES {
            metrics::counter!(
                "rpc_requests_total",
                "service" => service.clone(),
                "method" => method.clone(),
                "code" => code
            )
            .increment(0);
        }
        // Latency is mostly about successful calls; the error codes' series
        // appear with their first call.
        let _ = metrics::histogram!(
            "rpc_latency_seconds",
            "service" => service.clone(),
            "method" => method.clone(),
            "code" => "OK"
        );
        metrics::counter!("n_plus_one_detected_total", "operation" => format!("{service}/{method}"))
            .increment(0);
    }
    for entity in cache::COUNTED {
        for name in [
            "cache_hits_total",
            "cache_misses_total",
            "cache_bypassed_total",
            "cache_fills_total",
            "cache_decode_failures_total",
        ] {
            metrics::counter!(name, "entity" => entity).increment(0);
        }
    }
    for op in CACHE_OPS {
        metrics::counter!("cache_errors_total", "op" => op).increment(0);
        metrics::counter!("cache_deadline_cutoffs_total", "op" => op).increment(0);
        for cause in CACHE_OWN_LOAD_CAUSES {
            metrics::counter!("cache_own_load_misses_total", "op" => op, "cause" => cause)
                .increment(0);
        }
    }
    for &operation in crate::statements::OPERATIONS.iter().chain(&["OTHER"]) {
        metrics::counter!("slow_query_count", "database_type" => "postgres", "operation" => operation)
            .increment(0);
        let _ = metrics::histogram!(
            "query_latency_seconds",
            "database_type" => "postgres",
            "operation" => operation
        );
    }
    for task in BACKGROUND_TASKS {
        metrics::counter!("background_task_failures_total", "task" => task).increment(0);
    }
    for outcome in ["retried", "budget_exhausted"] {
        metrics::counter!("call_retries_total", "outcome" => outcome).increment(0);
    }
    for reason in ["buffer_full", "write_failed"] {
        metrics::counter!("search_log_dropped_total", "reason" => reason).increment(0);
    }
    for op in ["hash", "verify"] {
        metrics::counter!("password_hash_operations_total", "op" => op).increment(0);
    }
    for name in PLAIN_COUNTERS {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!("grpc_connections_open").increment(0.0);
}

#[derive(Clone)]
struct MetricsState {
    handle: PrometheusHandle,
    db: PgPool,
    reads: Reads,
    cache: Cache,
    mongo: Option<Mongo>,
}

/// Serves `/metrics` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    db: PgPool,
    reads: Reads,
    cache: Cache,
    mongo: Option<Mongo>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = MetricsState {
        handle: handle(),
        db,
        reads,
        cache,
        mongo,
    };
    let app = Router::new()
        .route("/metrics", get(render))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn render(State(state): State<MetricsState>) -> String {
    record_pool_usage(&pool_stats("postgres", &state.db));
    if let Some(replica) = state.reads.replica() {
        record_pool_usage(&pool_stats("postgres_replica", replica));
    }
    record_replication_lag(&state.reads).await;
    if let Some(redis) = state.cache.pool_stats() {
        record_pool_usage(&redis);
    }
    state.cache.record_gauges();
    if let Some(mongo) = &state.mongo {
        record_pool_usage(&mongo.pool_stats());
    }
    state.handle.run_upkeep();
    state.handle.render()
}

/// `connection_pool_connections{pool,state}`, `connection_pool_max{pool}` and
/// `connection_pool_usage{pool}` (in use / max, 0 to 1).
fn record_pool_usage(stats: &PoolStats) {
    let pool = stats.pool;
    let (max, size, idle) = (stats.max as f64, stats.size as f64, stats.idle as f64);
    let in_use = (size - idle).max(0.0);
    metrics::gauge!("connection_pool_connections", "pool" => pool, "state" => "idle").set(idle);
    metrics::gauge!("connection_pool_connections", "pool" => pool, "state" => "in_use").set(in_use);
    metrics::gauge!("connection_pool_max", "pool" => pool).set(max);
    metrics::gauge!("connection_pool_usage", "pool" => pool).set(if max > 0.0 {
        in_use / max
    } else {
        0.0
    });
}

/// How long a scrape waits for the replica's answer.
const REPLICA_LAG_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// `replication_lag_seconds{pool="postgres_replica"}`, asked of the replica
/// at each scrape (when there is one). A replica that does not answer (in
/// time) sets it to NaN, unknown, so that a stale value cannot pass for a
/// healthy one.
async fn record_replication_lag(reads: &Reads) {
    let lag = tokio::time::timeout(REPLICA_LAG_WAIT, reads.replication_lag()).await;
    let gauge = || metrics::gauge!("replication_lag_seconds", "pool" => "postgres_replica");
    match lag {
        Ok(Ok(Some(seconds))) => gauge().set(seconds),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cannot read the replica's replication lag");
            gauge().set(f64::NAN);
        }
        Err(_) => {
            tracing::debug!("the replica did not tell its replication lag in time");
            gauge().set(f64::NAN);
        }
    }
}
