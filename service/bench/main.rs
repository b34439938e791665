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
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

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
    /// Skip the baselines (a bare tonic service, pgbench, redis-benchmark).
    #[arg(long)]
    no_baselines: bool,
    /// A PostgreSQL database pgbench may initialize and read (`pgbench -S`).
    #[arg(long, env = "DATAGATE_BENCH_PGBENCH_URL")]
    pgbench_url: Option<String>,
    /// host:port of a Redis for `redis-benchmark -t get`.
    #[arg(long, env = "DATAGATE_BENCH_REDIS")]
    redis: Option<String>,
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
    /// The bare tonic service of the baseline, when measuring it.
    health: Option<HealthClient<Channel>>,
    user_ids: Arc<Vec<i64>>,
    product_ids: Arc<Vec<i64>>,
    /// The next cold user for `get_user_miss`.
    cold: Arc<AtomicU64>,
    /// Distinct values that make searches miss the cache.
    unique: Arc<AtomicU64>,
}

/// A baseline measured in the same run at one concurrency.
#[derive(Debug, Serialize)]
struct Baseline {
    name: String,
    concurrency: usize,
    rps: f64,
    p50_ms: Option<f64>,
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
    /// This scenario's throughput over the bare tonic service's, and its p50
    /// over the bare service's, at the same concurrency.
    rps_vs_tonic: Option<f64>,
    p50_vs_tonic: Option<f64>,
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
    let mut baselines = Vec::new();
    let mut tonic = BTreeMap::new();
    if !args.no_baselines {
        // A bare tonic service (health checks) on this machine, driven by
        // the same client code: the ceiling of any tonic service here.
        let echo = bare_tonic_service().await?;
        for &concurrency in &args.concurrency {
            let mut world = world.clone();
            world.health = Some(echo.clone());
            run(&world, "tonic_bare", concurrency, args.warmup).await;
            let r = run(&world, "tonic_bare", concurrency, args.duration).await;
            eprintln!(
                "{:>30} x{concurrency:<3} {:>9.0} rps  p50 {:>8.3} ms",
                "baseline: tonic", r.rps, r.p50_ms
            );
            tonic.insert(concurrency, (r.rps, r.p50_ms));
            baselines.push(Baseline {
                name: "tonic_bare".into(),
                concurrency,
                rps: r.rps,
                p50_ms: Some(r.p50_ms),
            });
        }
        for &concurrency in &args.concurrency {
            if let Some(url) = &args.pgbench_url {
                match pgbench(url, concurrency, args.duration) {
                    Ok(b) => baselines.push(b),
                    Err(e) => eprintln!("pgbench baseline skipped: {e:#}"),
                }
            }
            if let Some(redis) = &args.redis {
                match redis_benchmark(redis, concurrency) {
                    Ok(b) => baselines.push(b),
                    Err(e) => eprintln!("redis-benchmark baseline skipped: {e:#}"),
                }
            }
        }
    }
    let mut results = Vec::new();
    for scenario in &scenarios {
        for &concurrency in &args.concurrency {
            run(&world, scenario, concurrency, args.warmup).await; // warm-up, discarded
            let mut result = run(&world, scenario, concurrency, args.duration).await;
            if let Some((rps, p50)) = tonic.get(&concurrency) {
                result.rps_vs_tonic = Some(result.rps / rps);
                result.p50_vs_tonic = Some(result.p50_ms / p50);
            }
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
        serde_json::to_string_pretty(&serde_json::json!({
            "results": results,
            "baselines": baselines,
        }))?,
    )?;
    println!(
        "| scenario | concurrency | rps | p50 ms | p95 ms | p99 ms | max ms | rps vs tonic | p50 vs tonic | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let ratio = |r: Option<f64>| r.map_or(String::new(), |r| format!("{r:.2}x"));
    for r in &results {
        println!(
            "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {:?} |",
            r.scenario,
            r.concurrency,
            r.rps,
            r.p50_ms,
            r.p95_ms,
            r.p99_ms,
            r.max_ms,
            ratio(r.rps_vs_tonic),
            ratio(r.p50_vs_tonic),
            r.errors
        );
    }
    if !baselines.is_empty() {
        println!();
        println!("| baseline | concurrency | rps | p50 ms |");
        println!("|---|---:|---:|---:|");
        for b in &baselines {
            println!(
                "| {} | {} | {:.0} | {} |",
                b.name,
                b.concurrency,
                b.rps,
                b.p50_ms.map_or(String::new(), |p| format!("{p:.3}"))
            );
        }
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
        health: None,
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
        "tonic_bare" => {
            let health = world
                .health
                .as_mut()
                .ok_or_else(|| Status::failed_precondition("no bare service"))?;
            health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
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
        rps_vs_tonic: None,
        p50_vs_tonic: None,
    }
}

/// A tonic server with only the health service, on an ephemeral port, and a
/// client of it.
async fn bare_tonic_service() -> anyhow::Result<HealthClient<Channel>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (reporter, service) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        let _reporter = reporter;
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(datagate::startup::incoming(listener))
            .await;
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(HealthClient::new(channel))
}

/// `pgbench -S` (PostgreSQL's select-only limit) at `concurrency` clients.
fn pgbench(url: &str, concurrency: usize, duration: Duration) -> anyhow::Result<Baseline> {
    let init = std::process::Command::new("pgbench")
        .args(["-i", "-s", "5", "-q", url])
        .output()
        .context("running pgbench (install postgresql-contrib)")?;
    anyhow::ensure!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let secs = duration.as_secs().max(1).to_string();
    let clients = concurrency.to_string();
    let threads = concurrency.min(2).to_string();
    let out = std::process::Command::new("pgbench")
        .args(["-S", "-n", "-c", &clients, "-j", &threads, "-T", &secs, url])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pgbench -S: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .context("no tps in pgbench's output")?;
    Ok(Baseline {
        name: "pgbench_select_only".into(),
        concurrency,
        rps: tps,
        p50_ms: None,
    })
}

/// `redis-benchmark -t get` (Redis's own limit) at `concurrency` clients.
fn redis_benchmark(host_port: &str, concurrency: usize) -> anyhow::Result<Baseline> {
    let (host, port) = host_port.rsplit_once(':').context("--redis is host:port")?;
    let clients = concurrency.to_string();
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-h", host, "-p", port, "-t", "get", "-n", "50000", "-c", &clients, "-q",
        ])
        .output()
        .context("running redis-benchmark (install redis-tools)")?;
    anyhow::ensure!(out.status.success(), "redis-benchmark failed");
    // The last line reads "GET: 81300.81 requests per second, p50=0.311 msec".
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .flat_map(|l| l.split('\r'))
        .rfind(|l| l.contains("requests per second"))
        .context("no GET result in redis-benchmark's output")?;
    let after = |marker: &str| {
        line.split_once(marker)
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.trim_end_matches(',').parse::<f64>().ok())
    };
    Ok(Baseline {
        name: "redis_benchmark_get".into(),
        concurrency,
        rps: after("GET:").context("no requests per second")?,
        p50_ms: after("p50="),
    })
}
