//! ListUsersWithOrders for 100 users: the batched loaders against the naive
//! per-user path, measured in one run on the same data, interleaved so that
//! machine noise hits both alike. Reports statements per call and latency
//! percentiles, and the naive/batched ratios.
//!
//!   make bench-n1            (starts PostgreSQL if needed)
//!   DATABASE_URL=... cargo bench --bench list_users_with_orders
//!
//! Creates and drops its own database (`datagate_bench_<pid>`).

// The service's futures nest deeper than the default limit (128) lets
// the compiler prove `Send` (the service's own crate raises it too).
#![recursion_limit = "256"]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use datagate::{
    cache::Cache,
    domain::{orders::Orders, passwords::PasswordHasher, users::Users, write::Writes},
    model::paging::{PageRequest, PageSize, PageTokens},
    statements::{self, RequestLog},
};
use secrecy::SecretString;
use sqlx::{Connection as _, PgConnection, PgPool};

#[path = "support/naive.rs"]
mod naive;
#[path = "support/stats.rs"]
#[allow(dead_code)] // each benchmark uses part of it
mod stats;

use stats::percentile;

const USERS: i64 = 100;
const ORDERS_PER_USER: u32 = 5;
const ITEMS_PER_ORDER: i64 = 3;
const WARMUP: usize = 5;
const ITERATIONS: usize = 200;

struct Sample {
    latencies: Vec<Duration>,
    statements: Vec<u32>,
}

impl Sample {
    fn new() -> Self {
        Self {
            latencies: Vec::new(),
            statements: Vec::new(),
        }
    }

    fn summary(&mut self) -> (f64, f64, f64, f64, f64) {
        self.latencies.sort();
        let statements = self.statements.iter().map(|&n| f64::from(n)).sum::<f64>()
            / self.statements.len() as f64;
        (
            statements,
            percentile(&self.latencies, 0.50),
            percentile(&self.latencies, 0.95),
            percentile(&self.latencies, 0.99),
            self.latencies
                .iter()
                .map(Duration::as_secs_f64)
                .sum::<f64>()
                * 1000.0
                / self.latencies.len() as f64,
        )
    }
}

async fn measure<F, Fut>(sample: &mut Sample, run: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let log = Arc::new(RequestLog::default());
    let started = Instant::now();
    let users = statements::scope(log.clone(), run()).await;
    sample.latencies.push(started.elapsed());
    sample.statements.push(log.total());
    assert_eq!(users as i64, USERS);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    tracing_subscriber::registry()
        .with(datagate::statements::StatementLayer::filtered(
            Duration::from_secs(10),
        ))
        .init();

    let admin_url = std::env::var("DATABASE_URL")
        .map_err(|_| anyhow::anyhow!("set DATABASE_URL (make bench-n1 does)"))?;
    let name = format!("datagate_bench_{}", std::process::id());
    let mut admin = PgConnection::connect(&admin_url).await?;
    sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
        .execute(&mut admin)
        .await?;
    let url = datagate::store::postgres::url_with_database(&admin_url, &name);
    let result = run(&url).await;
    sqlx::query(&format!(r#"DROP DATABASE "{name}" WITH (FORCE)"#))
        .execute(&mut admin)
        .await?;
    result
}

async fn run(url: &str) -> anyhow::Result<()> {
    let db = PgPool::connect(url).await?;
    datagate::store::postgres::migrate_up(&db).await?;
    for sql in [
        "INSERT INTO users (email, username) SELECT 'u' || g || '@example.com', 'user' || g FROM generate_series(1, $1) g",
        "INSERT INTO products (sku, title, category, price) SELECT 'P' || g, 'Product ' || g, 'c' || g % 10, 1 + g % 90 FROM generate_series(1, 500) g",
        "INSERT INTO inventory (product_id, quantity) SELECT id, 1000 FROM products",
        "INSERT INTO orders (user_id, total, created_at) SELECT u.id, 0, now() - g * interval '1 hour' FROM users u, generate_series(1, 8) g",
        "INSERT INTO order_items (order_id, product_id, quantity, unit_price) SELECT o.id, 1 + (o.id * 7 + k * 13) % 500, 1, 10 FROM orders o, generate_series(1, $2) k",
        "ANALYZE",
    ] {
        let q = sqlx::query(sql);
        let q = if sql.contains("$2") {
            q.bind(USERS).bind(ITEMS_PER_ORDER)
        } else if sql.contains("$1") {
            q.bind(USERS)
        } else {
            q
        };
        q.execute(&db).await?;
    }
    let pages = PageTokens::new(&SecretString::from("b".repeat(32)));
    let writes = Writes::new(db.clone(), Cache::disabled());
    let users = Users::new(&writes, pages.clone(), PasswordHasher::new(2));
    let orders = Orders::new(&writes, pages, users.clone());
    let page = || PageRequest {
        size: PageSize::parse(USERS as i32).unwrap(),
        token: None,
    };

    let mut batched = Sample::new();
    let mut naive = Sample::new();
    for i in 0..WARMUP + ITERATIONS {
        let (mut b, mut n) = (Sample::new(), Sample::new());
        measure(&mut b, || async {
            orders
                .list_users_with_orders(page(), ORDERS_PER_USER)
                .await
                .unwrap()
                .items
                .len()
        })
        .await;
        measure(&mut n, || async {
            naive::list_users_with_orders_naively(&db, &users, page(), ORDERS_PER_USER)
                .await
                .unwrap()
                .len()
        })
        .await;
        if i >= WARMUP {
            batched.latencies.extend(b.latencies);
            batched.statements.extend(b.statements);
            naive.latencies.extend(n.latencies);
            naive.statements.extend(n.statements);
        }
    }

    let (bs, b50, b95, b99, bmean) = batched.summary();
    let (ns, n50, n95, n99, nmean) = naive.summary();
    println!(
        "ListUsersWithOrders, {USERS} users x {ORDERS_PER_USER} recent orders x {ITEMS_PER_ORDER} items, {ITERATIONS} calls each (interleaved, after {WARMUP} warm-up)"
    );
    println!("| path | statements/call | p50 ms | p95 ms | p99 ms | mean ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!("| batched (loaders) | {bs:.0} | {b50:.2} | {b95:.2} | {b99:.2} | {bmean:.2} |");
    println!("| naive per-user | {ns:.0} | {n50:.2} | {n95:.2} | {n99:.2} | {nmean:.2} |");
    println!(
        "| naive / batched | {:.0}x | {:.1}x | {:.1}x | {:.1}x | {:.1}x |",
        ns / bs,
        n50 / b50,
        n95 / b95,
        n99 / b99,
        nmean / bmean
    );
    db.close().await;
    Ok(())
}
