//! GetUser through the cache: hits against misses (latency percentiles and
//! throughput at a fixed concurrency), then the hit ratio of a skewed (Zipf)
//! workload on a cold cache, all in one run against the real Redis and
//! PostgreSQL, through the domain layer the RPC calls.
//!
//!   make bench-cache         (starts PostgreSQL and Redis if needed)
//!
//! Hits and misses alternate in rounds so machine noise hits both alike. A
//! miss is a cold key: MGET, fill lock, the PostgreSQL read, fenced fill.
//! Creates and drops its own database and Redis namespace.

// The service's futures nest deeper than the default limit (128) lets
// the compiler prove `Send` (the service's own crate raises it too).
#![recursion_limit = "256"]

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use datagate::{
    cache::Cache,
    config::Settings,
    domain::{passwords::PasswordHasher, users::Users, write::Writes},
    model::{Id, consistency::Consistency, paging::PageTokens},
    statements::{self, RequestLog},
};
use secrecy::SecretString;
use sqlx::{Connection as _, PgConnection, PgPool};

#[path = "support/stats.rs"]
#[allow(dead_code)] // each benchmark uses part of it
mod stats;

use stats::{Rng, percentile};

const USERS: i64 = 60_000;
const HOT_KEYS: i64 = 1_000;
const CONCURRENCY: usize = 16;
const ROUNDS: usize = 5;
const ROUND: Duration = Duration::from_millis(1500);
const ZIPF_EXPONENT: f64 = 1.0;
const ZIPF_REQUESTS: usize = 40_000;

/// Zipf ranks 1..=n by inverse CDF over a precomputed table.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for k in 1..=n {
            total += 1.0 / (k as f64).powf(s);
            cdf.push(total);
        }
        Self(cdf.into_iter().map(|c| c / total).collect())
    }

    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.next_f64();
        self.0.partition_point(|c| *c < u) + 1
    }
}

struct Phase {
    latencies: Vec<Duration>,
    requests: usize,
    elapsed: Duration,
}

/// `CONCURRENCY` workers call `users.get(next_id())` for `duration`.
async fn drive(
    users: &Users,
    duration: Duration,
    next_id: Arc<dyn Fn() -> i64 + Send + Sync>,
) -> Phase {
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let users = users.clone();
        let next_id = next_id.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while started.elapsed() < duration {
                let id = Id::parse(next_id()).unwrap();
                let t = Instant::now();
                users
                    .get(id, Consistency::Strong)
                    .await
                    .expect("user exists");
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await.unwrap());
    }
    Phase {
        requests: latencies.len(),
        latencies,
        elapsed: started.elapsed(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    tracing_subscriber::registry()
        .with(statements::StatementLayer::filtered(Duration::from_secs(
            10,
        )))
        .init();
    let admin_url = std::env::var("DATABASE_URL")
        .map_err(|_| anyhow::anyhow!("set DATABASE_URL (make bench-cache does)"))?;
    let redis_url = std::env::var("REDIS_URL")
        .map_err(|_| anyhow::anyhow!("set REDIS_URL (make bench-cache does)"))?;
    let name = format!("datagate_bench_{}", std::process::id());
    let mut admin = PgConnection::connect(&admin_url).await?;
    sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
        .execute(&mut admin)
        .await?;
    let result = run(
        &datagate::store::postgres::url_with_database(&admin_url, &name),
        &redis_url,
        &name,
    )
    .await;
    sqlx::query(&format!(r#"DROP DATABASE "{name}" WITH (FORCE)"#))
        .execute(&mut admin)
        .await?;
    result
}

async fn run(url: &str, redis_url: &str, namespace: &str) -> anyhow::Result<()> {
    let db = PgPool::connect(url).await?;
    datagate::store::postgres::migrate_up(&db).await?;
    sqlx::query("INSERT INTO users (email, username, display_name) SELECT 'u' || g || '@example.com', 'user' || g, 'User ' || g FROM generate_series(1, $1) g")
        .bind(USERS)
        .execute(&db)
        .await?;
    sqlx::query("ANALYZE users").execute(&db).await?;

    let mut settings = Settings::load_with_overrides(None, &[("database.url", url)])?;
    settings.redis.url = redis_url.to_owned().into();
    let pages = PageTokens::new(&SecretString::from("b".repeat(32)));
    let users_in = |prefix: String| -> anyhow::Result<Users> {
        let mut redis = settings.redis.clone();
        redis.key_prefix = prefix;
        let writes = Writes::new(db.clone(), Cache::new(&redis)?);
        Ok(Users::new(&writes, pages.clone(), PasswordHasher::new(2)))
    };
    let users = users_in(format!("{namespace}-hitmiss"))?;

    // Warm the hot keys; misses take fresh keys above them, never reused.
    for id in 1..=HOT_KEYS {
        users
            .get(
                Id::parse(id).map_err(anyhow::Error::msg)?,
                Consistency::Strong,
            )
            .await?;
    }
    let cold = Arc::new(AtomicUsize::new(HOT_KEYS as usize + 1));
    let hot = Arc::new(AtomicUsize::new(0));
    let (mut hits, mut misses) = (Vec::new(), Vec::new());
    let (mut hit_requests, mut miss_requests) = (0, 0);
    let (mut hit_time, mut miss_time) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..ROUNDS {
        let h = hot.clone();
        let phase = drive(
            &users,
            ROUND,
            Arc::new(move || 1 + (h.fetch_add(1, Ordering::Relaxed) as i64 % HOT_KEYS)),
        )
        .await;
        hits.extend(phase.latencies);
        hit_requests += phase.requests;
        hit_time += phase.elapsed;
        let c = cold.clone();
        let phase = drive(
            &users,
            ROUND,
            Arc::new(move || {
                let id = c.fetch_add(1, Ordering::Relaxed) as i64;
                assert!(
                    id <= USERS,
                    "raise USERS: the miss phase ran out of cold keys"
                );
                id
            }),
        )
        .await;
        misses.extend(phase.latencies);
        miss_requests += phase.requests;
        miss_time += phase.elapsed;
    }
    hits.sort();
    misses.sort();
    let hit_rps = hit_requests as f64 / hit_time.as_secs_f64();
    let miss_rps = miss_requests as f64 / miss_time.as_secs_f64();

    // Zipf over all users, on a cold namespace: the hit ratio a skewed
    // workload reaches from empty.
    let zipf_users = users_in(format!("{namespace}-zipf"))?;
    let zipf = Zipf::new(USERS as usize, ZIPF_EXPONENT);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut ids: Vec<i64> = (0..ZIPF_REQUESTS)
        .map(|_| zipf.sample(&mut rng) as i64)
        .collect();
    ids.reverse();
    let queue = Arc::new(std::sync::Mutex::new(ids));
    let (hit_count, total) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (users, queue, hit_count, total) = (
            zipf_users.clone(),
            queue.clone(),
            hit_count.clone(),
            total.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let Some(id) = queue.lock().unwrap().pop() else {
                    return;
                };
                let log = Arc::new(RequestLog::default());
                statements::scope(
                    log.clone(),
                    users.get(Id::parse(id).unwrap(), Consistency::Strong),
                )
                .await
                .unwrap();
                total.fetch_add(1, Ordering::Relaxed);
                if log.cache_hit() == Some(true) {
                    hit_count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let zipf_rps = ZIPF_REQUESTS as f64 / started.elapsed().as_secs_f64();
    let hit_ratio = hit_count.load(Ordering::Relaxed) as f64 / total.load(Ordering::Relaxed) as f64;

    println!(
        "GetUser through the cache, {CONCURRENCY} concurrent callers, {ROUNDS} alternating rounds of {ROUND:?} per path"
    );
    println!("| path | requests | rps | p50 ms | p95 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (path, sorted, requests, rps) in [
        ("hit", &hits, hit_requests, hit_rps),
        ("miss (cold key)", &misses, miss_requests, miss_rps),
    ] {
        println!(
            "| {path} | {requests} | {rps:.0} | {:.3} | {:.3} | {:.3} | {:.3} |",
            percentile(sorted, 0.50),
            percentile(sorted, 0.95),
            percentile(sorted, 0.99),
            percentile(sorted, 1.0)
        );
    }
    println!(
        "| miss / hit | | {:.2}x fewer | {:.1}x | {:.1}x | {:.1}x | |",
        hit_rps / miss_rps,
        percentile(&misses, 0.50) / percentile(&hits, 0.50),
        percentile(&misses, 0.95) / percentile(&hits, 0.95),
        percentile(&misses, 0.99) / percentile(&hits, 0.99),
    );
    println!();
    println!(
        "Zipf(s={ZIPF_EXPONENT}) over {USERS} users, {ZIPF_REQUESTS} requests from a cold cache: hit ratio {:.1}%, {zipf_rps:.0} rps",
        hit_ratio * 100.0
    );
    db.close().await;
    Ok(())
}
