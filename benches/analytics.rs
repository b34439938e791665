//! GetCategoryMetrics over 90 days and GetRevenueTrend over 12 months, with
//! two million orders over one million products: uncached (PostgreSQL) and
//! cached (Redis) latency percentiles, against a primary key lookup measured
//! in the same run as the baseline.
//!
//!   make bench-analytics       (starts PostgreSQL and Redis if needed)
//!
//! The catalog is `benches/support/catalog.rs`'s million products; this
//! benchmark adds 100,000 users and 2,000,000 orders over two years once
//! (`datagate::generate`: 80 % completed; 1 to 5 lines each, products drawn
//! with a heavy skew toward popular ones) and refreshes the views.

// The service's futures nest deeper than the default limit (128) lets
// the compiler prove `Send` (the service's own crate raises it too).
#![recursion_limit = "256"]

use std::time::{Duration, Instant};

use datagate::{
    cache::Cache,
    config::Settings,
    domain::{analytics::Analytics, catalog::Catalog, write::Writes},
    model::{Id, consistency::Consistency},
    store::postgres::Reads,
};
use sqlx::PgPool;

#[path = "support/catalog.rs"]
mod catalog;
#[path = "support/stats.rs"]
#[allow(dead_code)] // each benchmark uses part of it
mod stats;

use catalog::{PRODUCTS, prepare};
use stats::percentile;

const ORDERS: i64 = 2_000_000;
const USERS: i64 = 100_000;
const CONCURRENCY: [usize; 2] = [1, 4];
const ROUNDS: usize = 3;
const ROUND: Duration = Duration::from_secs(3);

/// Runs `call` (see [`stats::drive`]): latencies and the time taken.
async fn drive<F, Fut>(concurrency: usize, duration: Duration, call: F) -> (Vec<Duration>, Duration)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (timed, elapsed) = stats::drive(concurrency, duration, call).await;
    (
        timed.into_iter().map(|(_, latency)| latency).collect(),
        elapsed,
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let admin_url = std::env::var("DATABASE_URL")
        .map_err(|_| anyhow::anyhow!("set DATABASE_URL (make bench-analytics does)"))?;
    let redis_url = std::env::var("REDIS_URL")
        .map_err(|_| anyhow::anyhow!("set REDIS_URL (make bench-analytics does)"))?;
    let url = datagate::store::postgres::url_with_database(&admin_url, catalog::DATABASE);
    let db = prepare(&admin_url, &url).await?;
    orders(&db).await?;

    let settings = Settings::load_with_overrides(None, &[("database.url", url.as_str())])?;
    let uncached = Analytics::new(db.clone(), Reads::primary(&db), Cache::disabled());
    let mut redis = settings.redis.clone();
    redis.url = redis_url.into();
    redis.key_prefix = format!("dgbench-analytics-{}", std::process::id());
    let cached = Analytics::new(db.clone(), Reads::primary(&db), Cache::new(&redis)?);
    let catalog = Catalog::new(&Writes::new(db.clone(), Cache::disabled()));
    let today = chrono::Utc::now().date_naive();

    // Warm PostgreSQL's buffers and the cache.
    uncached.category_metrics(90, &[], today).await?;
    cached.category_metrics(90, &[], today).await?;
    cached.revenue_trend(12, None, today).await?;
    let sample = uncached.category_metrics(90, &[], today).await?;
    let trend = uncached.revenue_trend(12, None, today).await?;

    type Path = (&'static str, Analytics, bool);
    let paths: [Path; 4] = [
        (
            "GetCategoryMetrics 90 days, uncached",
            uncached.clone(),
            true,
        ),
        ("GetCategoryMetrics 90 days, cached", cached.clone(), true),
        (
            "GetRevenueTrend 12 months, uncached",
            uncached.clone(),
            false,
        ),
        ("GetRevenueTrend 12 months, cached", cached.clone(), false),
    ];
    let mut results: Vec<(usize, &str, Vec<Duration>, usize, Duration)> = Vec::new();
    for _ in 0..ROUNDS {
        for concurrency in CONCURRENCY {
            for (name, analytics, metrics) in paths.iter().cloned() {
                let (latencies, elapsed) = drive(concurrency, ROUND, move |_| {
                    let analytics = analytics.clone();
                    async move {
                        if metrics {
                            analytics
                                .category_metrics(90, &[], today)
                                .await
                                .expect("metrics");
                        } else {
                            analytics
                                .revenue_trend(12, None, today)
                                .await
                                .expect("trend");
                        }
                    }
                })
                .await;
                record(&mut results, concurrency, name, latencies, elapsed);
            }
            let c = catalog.clone();
            let (latencies, elapsed) = drive(concurrency, ROUND, move |i| {
                let c = c.clone();
                async move {
                    let id = Id::parse(1 + (i as i64 * 7919) % PRODUCTS).unwrap();
                    c.get(id, Consistency::Strong).await.expect("product");
                }
            })
            .await;
            record(
                &mut results,
                concurrency,
                "baseline: GetProduct by id, uncached",
                latencies,
                elapsed,
            );
        }
    }

    println!();
    println!(
        "{ORDERS} orders, {PRODUCTS} products; {ROUNDS} alternating rounds of {ROUND:?} per path and concurrency"
    );
    println!("| callers | path | requests | rps | p50 ms | p95 ms | p99 ms | max ms |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for (concurrency, name, latencies, requests, elapsed) in results.iter_mut() {
        latencies.sort();
        println!(
            "| {concurrency} | {name} | {requests} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
            *requests as f64 / elapsed.as_secs_f64(),
            percentile(latencies, 0.50),
            percentile(latencies, 0.95),
            percentile(latencies, 0.99),
            percentile(latencies, 1.0)
        );
    }
    for concurrency in CONCURRENCY {
        let p = |name: &str, q: f64| {
            let (_, _, l, _, _) = results
                .iter()
                .find(|r| r.0 == concurrency && r.1 == name)
                .unwrap();
            percentile(l, q)
        };
        let base = "baseline: GetProduct by id, uncached";
        println!(
            "{concurrency} caller(s), ratios to the baseline at p50/p95: GetCategoryMetrics uncached {:.0}x/{:.0}x, cached {:.2}x/{:.2}x",
            p("GetCategoryMetrics 90 days, uncached", 0.5) / p(base, 0.5),
            p("GetCategoryMetrics 90 days, uncached", 0.95) / p(base, 0.95),
            p("GetCategoryMetrics 90 days, cached", 0.5) / p(base, 0.5),
            p("GetCategoryMetrics 90 days, cached", 0.95) / p(base, 0.95),
        );
    }
    println!();
    println!("category metrics, 90 days (first 3 of {}):", sample.len());
    for m in sample.iter().take(3) {
        println!("    {m:?}");
    }
    println!("revenue trend (last 3 months):");
    for m in trend.iter().rev().take(3).rev() {
        println!("    {m:?}");
    }

    let explain: Vec<String> = sqlx::query_scalar(
        "EXPLAIN (ANALYZE, BUFFERS) SELECT category, products, price_cents_sum, rating_sum, prices_cents \
         FROM category_daily_listings WHERE day >= (now() AT TIME ZONE 'UTC')::date - 89",
    )
    .fetch_all(&db)
    .await?;
    println!();
    println!("EXPLAIN (ANALYZE, BUFFERS) of the listings read of GetCategoryMetrics:");
    for line in explain {
        println!("    {line}");
    }
    db.close().await;
    Ok(())
}

fn record<'a>(
    results: &mut Vec<(usize, &'a str, Vec<Duration>, usize, Duration)>,
    concurrency: usize,
    name: &'a str,
    latencies: Vec<Duration>,
    elapsed: Duration,
) {
    match results
        .iter_mut()
        .find(|r| r.0 == concurrency && r.1 == name)
    {
        Some(r) => {
            r.3 += latencies.len();
            r.2.extend(latencies);
            r.4 += elapsed;
        }
        None => results.push((
            concurrency,
            name,
            latencies.clone(),
            latencies.len(),
            elapsed,
        )),
    }
}

/// Users and orders, generated once (by `datagate::generate`, seed 42).
async fn orders(db: &PgPool) -> anyhow::Result<()> {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(db)
        .await?;
    if count == ORDERS {
        println!("using the {ORDERS} orders in {}", catalog::DATABASE);
        return Ok(());
    }
    anyhow::ensure!(
        count == 0,
        "the bench database holds {count} orders; run with BENCH_REBUILD=1"
    );
    let started = Instant::now();
    datagate::generate::users(db, USERS as u64, 42).await?;
    datagate::generate::orders(db, ORDERS as u64, 42).await?;
    for statement in [
        "VACUUM ANALYZE users",
        "VACUUM ANALYZE orders",
        "VACUUM ANALYZE order_items",
        "REFRESH MATERIALIZED VIEW category_daily_sales",
        "REFRESH MATERIALIZED VIEW category_daily_listings",
    ] {
        sqlx::query(statement).execute(db).await?;
    }
    println!(
        "generated {USERS} users and {ORDERS} orders in {:.0?}",
        started.elapsed()
    );
    Ok(())
}
