//! Prometheus metrics: the process-wide recorder and the `/metrics` HTTP
//! endpoint. Gauges that describe a pool are sampled when scraped, so they are
//! never stale and cost nothing between scrapes.

use std::{future::Future, sync::OnceLock};

use axum::{Router, extract::State, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::{cache::Cache, store::postgres::Reads};

/// Latency buckets in seconds, from a cache hit to a slow analytic query.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The global recorder. It is installed once per process (tests build many
/// applications in one process and share it).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("the latency bucket list is not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

#[derive(Clone)]
struct MetricsState {
    handle: PrometheusHandle,
    db: PgPool,
    reads: Reads,
    cache: Cache,
}

/// Serves `/metrics` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    db: PgPool,
    reads: Reads,
    cache: Cache,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = MetricsState {
        handle: handle(),
        db,
        reads,
        cache,
    };
    let app = Router::new()
        .route("/metrics", get(render))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn render(State(state): State<MetricsState>) -> String {
    record_pool_usage("postgres", &state.db);
    if let Some(replica) = state.reads.replica() {
        record_pool_usage("postgres_replica", replica);
    }
    state.cache.record_gauges();
    state.handle.run_upkeep();
    state.handle.render()
}

/// `connection_pool_connections{pool,state}`, `connection_pool_max{pool}` and
/// `connection_pool_usage{pool}` (in use / max, 0 to 1).
fn record_pool_usage(pool: &'static str, db: &PgPool) {
    let size = db.size() as f64;
    let idle = db.num_idle() as f64;
    let max = f64::from(db.options().get_max_connections());
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
