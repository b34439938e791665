//! `datagate-bench`: drives a running datagate through the generated gRPC
//! client and reports latency percentiles (HDR histograms), throughput and
//! errors by status code, per scenario and concurrency level.
//!
//! ```text
//! datagate-bench --addr http://127.0.0.1:50051 --token $TOKEN \
//!     --concurrency 1,4,16 --duration 10s --warmup 2s
//! ```
//!
//! It creates its own fixtures through the API (users, products, orders),
//! then runs each scenario at each concurrency for the duration after a
//! warm-up, and writes `bench/results/latest.json`.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use datagate::proto::v1::{
    self as pb, analytics_service_client::AnalyticsServiceClient,
    catalog_service_client::CatalogServiceClient, order_service_client::OrderServiceClient,
    user_service_client::UserServiceClient,
};
use hdrhistogram::Histogram;
use serde::Serialize;
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

#[derive(Debug, Parser)]
#[command(version, about = "Load generator for datagate")]
struct Args {
    /// The service's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// A bearer token (`datagate token new`).
    #[arg(long, env = "DATAGATE_BENCH_TOKEN")]
    token: String,
    /// Scenarios to run, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Users created as fixtures (the cold keys of `get_user_miss`).
    #[arg(long, default_value_t = 5_000)]
    users: usize,
    #[arg(long, default_value = "bench/results")]
    out: std::path::PathBuf,
}

const SCENARIOS: [&str; 10] = [
    "get_user_hit",
    "get_user_miss",
    "batch_get_users",
    "list_users_with_orders",
    "list_users_with_orders_naive",
    "search_uncached",
    "search_cached",
    "create_order",
    "category_metrics",
    "get_product",
];

#[derive(Clone)]
struct Bearer(Arc<str>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let value = MetadataValue::try_from(format!("Bearer {}", self.0))
            .map_err(|_| Status::invalid_argument("the token is not valid metadata"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

type Svc = InterceptedService<Channel, Bearer>;

/// The clients and the fixtures every scenario draws on.
#[derive(Clone)]
struct World {
    users: UserServiceClient<Svc>,
    catalog: CatalogServiceClient<Svc>,
    orders: OrderServiceClient<Svc>,
    analytics: AnalyticsServiceClient<Svc>,
    user_ids: Arc<Vec<i64>>,
    product_ids: Arc<Vec<i64>>,
    /// The next cold user for `get_user_miss`.
    cold: Arc<AtomicU64>,
    /// Distinct values that make searches miss the cache.
    unique: Arc<AtomicU64>,
}

#[derive(Debug, Serialize)]
struct Result_ {
    scenario: String,
    concurrency: usize,
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: BTreeMap<String, u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channel = Endpoint::from_shared(args.addr.clone())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    let bearer = Bearer(args.token.as_str().into());
    let world = setup(&channel, &bearer, args.users).await?;
    let scenarios: Vec<String> = if args.scenarios.is_empty() {
        SCENARIOS.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.scenarios.clone()
    };
    for s in &scenarios {
        anyhow::ensure!(
            SCENARIOS.contains(&s.as_str()),
            "unknown scenario {s:?}; known: {SCENARIOS:?}"
        );
    }
    let mut results = Vec::new();
    for scenario in &scenarios {
        for &concurrency in &args.concurrency {
            run(&world, scenario, concurrency, args.warmup).await; // warm-up, discarded
            let result = run(&world, scenario, concurrency, args.duration).await;
            eprintln!(
                "{scenario:>30} x{concurrency:<3} {:>9.0} rps  p50 {:>8.3} ms  p95 {:>8.3} ms  p99 {:>8.3} ms  errors {:?}",
                result.rps, result.p50_ms, result.p95_ms, result.p99_ms, result.errors
            );
            results.push(result);
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("latest.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({ "results": results }))?,
    )?;
    println!("| scenario | concurrency | rps | p50 ms | p95 ms | p99 ms | max ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for r in &results {
        println!(
            "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:?} |",
            r.scenario, r.concurrency, r.rps, r.p50_ms, r.p95_ms, r.p99_ms, r.max_ms, r.errors
        );
    }
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// Fixtures: users, products with plenty of stock, one order per user for
/// the first page of users.
async fn setup(channel: &Channel, bearer: &Bearer, users: usize) -> anyhow::Result<World> {
    let svc = |c: &Channel| InterceptedService::new(c.clone(), bearer.clone());
    let mut user_client = UserServiceClient::new(svc(channel));
    let mut catalog = CatalogServiceClient::new(svc(channel));
    let mut orders = OrderServiceClient::new(svc(channel));
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let progress = indicatif::ProgressBar::new(users as u64 + 100);
    let mut user_ids = Vec::with_capacity(users);
    for i in 0..users {
        let user = user_client
            .create_user(pb::CreateUserRequest {
                email: format!("bench-{run}-{i}@example.com"),
                username: format!("b{run}_{i}"),
                display_name: format!("Bench {i}"),
                ..Default::default()
            })
            .await?
            .into_inner();
        user_ids.push(user.id);
        progress.inc(1);
    }
    let mut product_ids = Vec::new();
    for i in 0..100 {
        let product = catalog
            .create_product(pb::CreateProductRequest {
                sku: format!("BENCH-{run}-{i}"),
                title: format!("Bench widget {i}"),
                category: "bench".into(),
                price_cents: 500 + i * 10,
                inventory: 1_000_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        product_ids.push(product.id);
        progress.inc(1);
    }
    progress.finish_and_clear();
    for (i, user_id) in user_ids.iter().take(200).enumerate() {
        orders
            .create_order(pb::CreateOrderRequest {
                user_id: *user_id,
                items: vec![pb::OrderLine {
                    product_id: product_ids[i % product_ids.len()],
                    quantity: 1,
                }],
                request_id: String::new(),
            })
            .await?;
    }
    Ok(World {
        users: user_client,
        catalog,
        orders,
        analytics: AnalyticsServiceClient::new(svc(channel)),
        // The first 100 users are the warm keys of `get_user_hit`; the rest
        // are cold until `get_user_miss` reads them.
        cold: Arc::new(AtomicU64::new(100)),
        user_ids: Arc::new(user_ids),
        product_ids: Arc::new(product_ids),
        unique: Arc::new(AtomicU64::new(1)),
    })
}

/// One call of `scenario`; `i` is the call's sequence number.
async fn call(world: &mut World, scenario: &str, i: u64) -> Result<(), Status> {
    let users = &world.user_ids;
    let pick = |n: u64| users[(n as usize * 7919) % users.len()];
    match scenario {
        "get_user_hit" => {
            let id = users[(i % 100) as usize];
            world
                .users
                .get_user(pb::GetUserRequest { id })
                .await
                .map(drop)
        }
        "get_user_miss" => {
            let n = world.cold.fetch_add(1, Ordering::Relaxed) as usize;
            let id = *users
                .get(n)
                .ok_or_else(|| Status::resource_exhausted("out of cold users: raise --users"))?;
            world
                .users
                .get_user(pb::GetUserRequest { id })
                .await
                .map(drop)
        }
        "batch_get_users" => {
            let ids = (0..100).map(|k| pick(i * 100 + k)).collect();
            world
                .users
                .batch_get_users(pb::BatchGetUsersRequest {
                    ids,
                    skip_missing: false,
                })
                .await
                .map(drop)
        }
        "list_users_with_orders" => world
            .orders
            .list_users_with_orders(pb::ListUsersWithOrdersRequest {
                page_size: 20,
                ..Default::default()
            })
            .await
            .map(drop),
        "list_users_with_orders_naive" => {
            let page = world
                .users
                .list_users(pb::ListUsersRequest {
                    page_size: 20,
                    ..Default::default()
                })
                .await?
                .into_inner();
            for user in page.users {
                world
                    .orders
                    .list_orders(pb::ListOrdersRequest {
                        user_id: user.id,
                        page_size: 5,
                        ..Default::default()
                    })
                    .await?;
            }
            Ok(())
        }
        "search_cached" | "search_uncached" => {
            // A distinct price bound makes every uncached search a cache miss.
            let max_price_cents = if scenario == "search_uncached" {
                Some(1_000_000 + world.unique.fetch_add(1, Ordering::Relaxed) as i64)
            } else {
                None
            };
            world
                .catalog
                .search_products(pb::SearchProductsRequest {
                    query: "widget".into(),
                    max_price_cents,
                    ..Default::default()
                })
                .await
                .map(drop)
        }
        "create_order" => {
            let products = &world.product_ids;
            let items = (0..3)
                .map(|k| pb::OrderLine {
                    product_id: products[((i * 3 + k) as usize) % products.len()],
                    quantity: 1,
                })
                .collect();
            world
                .orders
                .create_order(pb::CreateOrderRequest {
                    user_id: pick(i),
                    items,
                    request_id: String::new(),
                })
                .await
                .map(drop)
        }
        "category_metrics" => world
            .analytics
            .get_category_metrics(pb::GetCategoryMetricsRequest {
                window_days: 90,
                categories: vec![],
            })
            .await
            .map(drop),
        "get_product" => {
            let products = &world.product_ids;
            let id = products[(i as usize) % products.len()];
            world
                .catalog
                .get_product(pb::GetProductRequest { id })
                .await
                .map(drop)
        }
        other => Err(Status::invalid_argument(format!(
            "unknown scenario {other}"
        ))),
    }
}

/// Runs `scenario` with `concurrency` workers for `duration`.
async fn run(world: &World, scenario: &str, concurrency: usize, duration: Duration) -> Result_ {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (mut world, next, scenario) = (world.clone(), next.clone(), scenario.to_owned());
        workers.push(tokio::spawn(async move {
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            while started.elapsed() < duration {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let outcome = call(&mut world, &scenario, i).await;
                let micros = t.elapsed().as_micros().clamp(1, 60_000_000) as u64;
                match outcome {
                    Ok(()) => histogram.saturating_record(micros),
                    Err(status) => {
                        let exhausted = status.code() == tonic::Code::ResourceExhausted;
                        *errors.entry(format!("{:?}", status.code())).or_default() += 1;
                        if exhausted {
                            break;
                        }
                    }
                }
            }
            (histogram, errors)
        }));
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for worker in workers {
        let (h, e) = worker.await.expect("a bench worker panicked");
        histogram.add(h).expect("same bounds");
        for (code, n) in e {
            *errors.entry(code).or_default() += n;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Result_ {
        scenario: scenario.to_owned(),
        concurrency,
        requests: histogram.len(),
        rps: histogram.len() as f64 / elapsed,
        p50_ms: ms(0.50),
        p95_ms: ms(0.95),
        p99_ms: ms(0.99),
        max_ms: histogram.max() as f64 / 1000.0,
        errors,
    }
}
