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
//! warm-up, and writes `latest.json`, `latest.md`, `latency.svg` and
//! `throughput.svg` into `--out` (see `report`). Given `--service-pid`, it
//! also records the service's resident memory, idle and under load.

mod baselines;
mod references;
mod report;

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
use indicatif::{ProgressBar, ProgressStyle};
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    baselines::Baseline,
    report::{Measurement, Memory, Report},
};

#[derive(Debug, Parser)]
#[command(version, about = "Load generator for datagate")]
struct Args {
    /// The service's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// A bearer token (`datagate token new`).
    #[arg(long, env = "DATAGATE_BENCH_TOKEN")]
    token: Option<String>,
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
    /// Users created as fixtures. `get_user_miss` reads each user once:
    /// these and any the database already holds (up to `--cold-users`).
    #[arg(long, default_value_t = 5_000)]
    users: usize,
    /// At most this many users, listed through the API, are cold keys.
    #[arg(long, default_value_t = 200_000)]
    cold_users: usize,
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
    /// What `search_cached` and `search_uncached` search for.
    #[arg(long, default_value = "widget")]
    query: String,
    /// The service's process id, to record its resident memory (Linux).
    #[arg(long)]
    service_pid: Option<u32>,
    /// Run nothing: redraw `latest.md` and the plots in `--out` from its
    /// `latest.json`.
    #[arg(long)]
    redraw: bool,
    /// The same service with its cache off, for `get_user_uncached`.
    #[arg(long)]
    uncached_addr: Option<String>,
    /// A reference server doing one Redis GET per GetUser
    /// (`--serve-reference redis-get`): `get_user_hit` reads as a ratio to it.
    #[arg(long)]
    reference_get: Option<String>,
    /// A reference server doing one primary-key SELECT per GetUser:
    /// `get_user_miss` and `get_user_uncached` read as a ratio to it.
    #[arg(long)]
    reference_select: Option<String>,
    /// A reference server answering ListUsersWithOrders with one nested
    /// json_agg statement: `list_users_with_orders` reads as a ratio to it.
    #[arg(long)]
    reference_json_agg: Option<String>,
    /// Run nothing else: serve this reference on `--listen` (see
    /// `references`).
    #[arg(long, value_enum)]
    serve_reference: Option<references::Kind>,
    /// Where `--serve-reference` listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// The PostgreSQL database of `--serve-reference primary-key-select` and
    /// `json-agg` (the service's).
    #[arg(long, env = "DATAGATE_BENCH_DATABASE_URL")]
    database_url: Option<String>,
    /// The Redis of `--serve-reference redis-get` (the service's).
    #[arg(long, env = "DATAGATE_BENCH_REDIS_URL")]
    redis_url: Option<String>,
    /// The service's `redis.key_prefix`, whose user keys `redis-get` reads.
    #[arg(long, default_value = "dg")]
    redis_key_prefix: String,
    /// Run nothing else: write a GetUser request body for this id (the
    /// 5-byte gRPC frame header and the protobuf message) to stdout, for
    /// h2load's `-d`.
    #[arg(long)]
    grpc_body_get_user: Option<i64>,
}

const SCENARIOS: [&str; 12] = [
    "get_user_hit",
    "get_user_near",
    "get_user_miss",
    "get_user_uncached",
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

/// The reference server a scenario is read against, if any (see
/// `references`): the pseudo-scenario that calls it.
fn reference_of(scenario: &str) -> Option<&'static str> {
    match scenario {
        "get_user_hit" => Some("reference_redis_get"),
        "get_user_miss" | "get_user_uncached" => Some("reference_select"),
        "list_users_with_orders" => Some("reference_json_agg"),
        _ => None,
    }
}

/// The clients and the fixtures every scenario draws on.
#[derive(Clone)]
struct World {
    users: UserServiceClient<Svc>,
    catalog: CatalogServiceClient<Svc>,
    orders: OrderServiceClient<Svc>,
    analytics: AnalyticsServiceClient<Svc>,
    /// The bare tonic service of the baseline, when measuring it.
    health: Option<HealthClient<Channel>>,
    /// The service with its cache off (`--uncached-addr`).
    uncached: Option<UserServiceClient<Svc>>,
    /// The reference servers given (`--reference-*`).
    reference_get: Option<UserServiceClient<Svc>>,
    reference_select: Option<UserServiceClient<Svc>>,
    reference_json_agg: Option<OrderServiceClient<Svc>>,
    user_ids: Arc<Vec<i64>>,
    /// The first `fixtures` of `user_ids` were made by this run.
    fixtures: usize,
    product_ids: Arc<Vec<i64>>,
    /// The next cold user for `get_user_miss`.
    cold: Arc<AtomicU64>,
    /// Distinct values that make searches miss the cache.
    unique: Arc<AtomicU64>,
    query: Arc<str>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(id) = args.grpc_body_get_user {
        use std::io::Write as _;
        let message = prost::Message::encode_to_vec(&pb::GetUserRequest {
            id,
            ..Default::default()
        });
        let mut body = vec![0u8];
        body.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
        body.extend_from_slice(&message);
        std::io::stdout().write_all(&body)?;
        return Ok(());
    }
    if let Some(kind) = args.serve_reference {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let sources = references::Sources {
            database_url: args.database_url.as_deref(),
            redis_url: args.redis_url.as_deref(),
            redis_key_prefix: &args.redis_key_prefix,
        };
        return references::serve(kind, sources, listener).await;
    }
    if args.redraw {
        let json = std::fs::read(args.out.join("latest.json"))
            .with_context(|| format!("reading latest.json in {}", args.out.display()))?;
        let report: Report = serde_json::from_slice(&json).context("parsing latest.json")?;
        return report.write(&args.out);
    }
    let channel = Endpoint::from_shared(args.addr.clone())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.addr))?;
    let scenarios: Vec<String> = if args.scenarios.is_empty() {
        SCENARIOS
            .iter()
            .filter(|s| **s != "get_user_uncached" || args.uncached_addr.is_some())
            .map(|s| (*s).to_owned())
            .collect()
    } else {
        args.scenarios.clone()
    };
    for s in &scenarios {
        anyhow::ensure!(
            SCENARIOS.contains(&s.as_str()),
            "unknown scenario {s:?}; known: {SCENARIOS:?}"
        );
    }
    let rss = Rss(args.service_pid);
    let mut memory = Memory {
        idle_rss_mib: rss.read(),
        ..Memory::default()
    };
    let token = args
        .token
        .as_deref()
        .context("--token (or DATAGATE_BENCH_TOKEN) is required")?;
    let bearer = Bearer(token.into());
    let mut world = setup(&channel, &bearer, &args).await?;
    let connect = |addr: Option<&String>| {
        let bearer = bearer.clone();
        let addr = addr.cloned();
        async move {
            let Some(addr) = addr else {
                return anyhow::Ok(None);
            };
            let channel = Endpoint::from_shared(addr.clone())?
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            Ok(Some(InterceptedService::new(channel, bearer)))
        }
    };
    world.uncached = connect(args.uncached_addr.as_ref())
        .await?
        .map(UserServiceClient::new);
    world.reference_get = connect(args.reference_get.as_ref())
        .await?
        .map(UserServiceClient::new);
    world.reference_select = connect(args.reference_select.as_ref())
        .await?
        .map(UserServiceClient::new);
    world.reference_json_agg = connect(args.reference_json_agg.as_ref())
        .await?
        .map(OrderServiceClient::new);

    let references = scenarios
        .iter()
        .filter(|s| reference_of(s).is_some_and(|r| world.has(r)))
        .count();
    let runs =
        (scenarios.len() + references + usize::from(!args.no_baselines)) * args.concurrency.len();
    let progress = ProgressBar::new(runs as u64).with_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} runs, about {eta} left  {msg}",
        )?
        .progress_chars("=> "),
    );
    let mut baselines = Vec::new();
    let mut tonic = BTreeMap::new();
    if !args.no_baselines {
        // A bare tonic service (health checks) on this machine, driven by
        // the same client code: the ceiling of any tonic service here.
        let echo = baselines::bare_tonic_service().await?;
        for &concurrency in &args.concurrency {
            progress.set_message(format!("baseline: tonic x{concurrency}"));
            let mut world = world.clone();
            world.health = Some(echo.clone());
            run(&world, "tonic_bare", concurrency, args.warmup, &Rss(None)).await;
            let r = run(&world, "tonic_bare", concurrency, args.duration, &Rss(None)).await;
            say(
                &progress,
                format!(
                    "{:>30} x{concurrency:<3} {:>9.0} rps  p50 {:>8.3} ms",
                    "baseline: tonic", r.rps, r.p50_ms
                ),
            );
            tonic.insert(concurrency, (r.rps, r.p50_ms));
            baselines.push(Baseline {
                name: "tonic_bare".into(),
                concurrency,
                rps: r.rps,
                p50_ms: Some(r.p50_ms),
            });
            if let Some(url) = &args.pgbench_url {
                progress.set_message(format!("baseline: pgbench -S x{concurrency}"));
                match baselines::pgbench(url, concurrency, args.duration) {
                    Ok(b) => baselines.push(b),
                    Err(e) => say(&progress, format!("pgbench baseline skipped: {e:#}")),
                }
            }
            if let Some(redis) = &args.redis {
                progress.set_message(format!("baseline: redis-benchmark x{concurrency}"));
                match baselines::redis_benchmark(redis, concurrency) {
                    Ok(b) => baselines.push(b),
                    Err(e) => say(
                        &progress,
                        format!("redis-benchmark baseline skipped: {e:#}"),
                    ),
                }
            }
            progress.inc(1);
        }
    }
    let mut results = Vec::new();
    for scenario in &scenarios {
        for &concurrency in &args.concurrency {
            progress.set_message(format!("{scenario} x{concurrency}"));
            run(&world, scenario, concurrency, args.warmup, &rss).await; // warm-up, discarded
            // The matching reference right before the scenario's measured
            // run, after its warm-up (which fills the keys a Redis reference
            // reads), so both see the machine in the same state.
            let reference = match reference_of(scenario).filter(|r| world.has(r)) {
                Some(name) => {
                    progress.set_message(format!("{name} x{concurrency}"));
                    run(&world, name, concurrency, args.warmup, &Rss(None)).await;
                    let r = run(&world, name, concurrency, args.duration, &Rss(None)).await;
                    say(
                        &progress,
                        format!(
                            "{name:>30} x{concurrency:<3} {:>9.0} rps  p50 {:>8.3} ms  errors {:?}",
                            r.rps, r.p50_ms, r.errors
                        ),
                    );
                    baselines.push(Baseline {
                        name: name.into(),
                        concurrency,
                        rps: r.rps,
                        p50_ms: Some(r.p50_ms),
                    });
                    progress.inc(1);
                    Some((name, r))
                }
                None => None,
            };
            progress.set_message(format!("{scenario} x{concurrency}"));
            let mut result = run(&world, scenario, concurrency, args.duration, &rss).await;
            if let Some((rps, p50)) = tonic.get(&concurrency) {
                result.rps_vs_tonic = Some(result.rps / rps);
                result.p50_vs_tonic = Some(result.p50_ms / p50);
            }
            if let Some((name, r)) = reference {
                result.reference = Some(name.into());
                result.rps_vs_reference = Some(result.rps / r.rps);
                result.p50_vs_reference = Some(result.p50_ms / r.p50_ms);
            }
            memory.peak_rss_mib = larger(memory.peak_rss_mib, result.service_rss_mib);
            say(
                &progress,
                format!(
                    "{scenario:>30} x{concurrency:<3} {:>9.0} rps  p50 {:>8.3} ms  p95 {:>8.3} ms  p99 {:>8.3} ms  errors {:?}",
                    result.rps, result.p50_ms, result.p95_ms, result.p99_ms, result.errors
                ),
            );
            results.push(result);
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    tokio::time::sleep(Duration::from_secs(1)).await;
    memory.after_rss_mib = rss.read();
    let report = Report {
        finished_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        settings: report::Settings {
            duration_ms: args.duration.as_millis(),
            warmup_ms: args.warmup.as_millis(),
            concurrency: args.concurrency.clone(),
            fixture_users: args.users,
        },
        service_memory: memory,
        results,
        baselines,
    };
    report.write(&args.out)?;
    println!("{}", report.markdown());
    eprintln!(
        "wrote latest.json, latest.md, latency.svg and throughput.svg in {}",
        args.out.display()
    );
    Ok(())
}

/// A line on stderr above the progress bar (shown even when the bar is
/// hidden because stderr is not a terminal).
fn say(progress: &ProgressBar, line: String) {
    progress.suspend(|| eprintln!("{line}"));
}

/// The larger of two optional readings.
fn larger(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// The resident memory of a process, read from `/proc/<pid>/status`.
#[derive(Clone, Copy)]
struct Rss(Option<u32>);

impl Rss {
    fn read(self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0?)).ok()?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }
}

/// Fixtures: users, products with plenty of stock, one order per user for
/// the first page of users.
async fn setup(channel: &Channel, bearer: &Bearer, args: &Args) -> anyhow::Result<World> {
    let users = args.users;
    anyhow::ensure!(users >= 100, "--users must be at least 100 (the warm keys)");
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
    // Every other user the database holds is a cold key too, after the
    // fixtures (the first 100 fixtures are the warm keys).
    let mut page_token = String::new();
    let mut known: std::collections::HashSet<i64> = user_ids.iter().copied().collect();
    while user_ids.len() < args.cold_users {
        let page = user_client
            .list_users(pb::ListUsersRequest {
                page_size: 500,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        user_ids.extend(
            page.users
                .iter()
                .map(|u| u.id)
                .filter(|id| known.insert(*id)),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    user_ids.truncate(args.cold_users.max(users));
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
        uncached: None,
        reference_get: None,
        reference_select: None,
        reference_json_agg: None,
        // The first 100 users are the warm keys of `get_user_hit`; the rest
        // are cold until `get_user_miss` reads them.
        cold: Arc::new(AtomicU64::new(100)),
        user_ids: Arc::new(user_ids),
        fixtures: users,
        product_ids: Arc::new(product_ids),
        unique: Arc::new(AtomicU64::new(1)),
        query: args.query.as_str().into(),
    })
}

impl World {
    /// Whether the reference pseudo-scenario `name` has its server.
    fn has(&self, name: &str) -> bool {
        match name {
            "reference_redis_get" => self.reference_get.is_some(),
            "reference_select" => self.reference_select.is_some(),
            "reference_json_agg" => self.reference_json_agg.is_some(),
            _ => false,
        }
    }
}

/// One call of `scenario`; `i` is the call's sequence number.
async fn call(world: &mut World, scenario: &str, i: u64) -> Result<(), Status> {
    let users = &world.user_ids;
    // Batches and orders draw on the fixtures only, whatever else exists.
    let pick = |n: u64| users[(n as usize * 7919) % world.fixtures];
    match scenario {
        "get_user_uncached" | "reference_select" => {
            let client = if scenario == "get_user_uncached" {
                world.uncached.as_mut()
            } else {
                world.reference_select.as_mut()
            };
            client
                .ok_or_else(|| Status::failed_precondition("no such server"))?
                .get_user(pb::GetUserRequest {
                    id: pick(i),
                    ..Default::default()
                })
                .await
                .map(drop)
        }
        "reference_redis_get" => world
            .reference_get
            .as_mut()
            .ok_or_else(|| Status::failed_precondition("no such server"))?
            .get_user(pb::GetUserRequest {
                id: users[(i % 100) as usize],
                ..Default::default()
            })
            .await
            .map(drop),
        "reference_json_agg" => world
            .reference_json_agg
            .as_mut()
            .ok_or_else(|| Status::failed_precondition("no such server"))?
            .list_users_with_orders(pb::ListUsersWithOrdersRequest {
                page_size: 20,
                ..Default::default()
            })
            .await
            .map(drop),
        "get_user_hit" | "get_user_miss" => {
            let id = if scenario == "get_user_hit" {
                users[(i % 100) as usize]
            } else {
                let n = world.cold.fetch_add(1, Ordering::Relaxed) as usize;
                *users
                    .get(n)
                    .ok_or_else(|| Status::resource_exhausted("out of cold users: raise --users"))?
            };
            world
                .users
                .get_user(pb::GetUserRequest {
                    id,
                    ..Default::default()
                })
                .await
                .map(drop)
        }
        // The warm keys of `get_user_hit`, read with a bounded staleness
        // of one second: served by the near cache (no Redis round trip).
        "get_user_near" => world
            .users
            .get_user(pb::GetUserRequest {
                id: users[(i % 100) as usize],
                max_staleness: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
            })
            .await
            .map(drop),
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
                    query: world.query.to_string(),
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
                .get_product(pb::GetProductRequest {
                    id,
                    ..Default::default()
                })
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

/// A histogram of call latencies in µs (1 µs to 60 s); the workers' and the
/// total must share these bounds to be added up.
fn latencies() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Runs `scenario` with `concurrency` workers for `duration`, sampling the
/// service's resident memory every 100 ms.
async fn run(
    world: &World,
    scenario: &str,
    concurrency: usize,
    duration: Duration,
    rss: &Rss,
) -> Measurement {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let rss = *rss;
    let sampler = tokio::spawn(async move {
        let mut peak = rss.read();
        while started.elapsed() < duration {
            tokio::time::sleep(Duration::from_millis(100)).await;
            peak = larger(peak, rss.read());
        }
        peak
    });
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (mut world, next, scenario) = (world.clone(), next.clone(), scenario.to_owned());
        workers.push(tokio::spawn(async move {
            let mut histogram = latencies();
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
    let mut histogram = latencies();
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
    Measurement {
        service_rss_mib: sampler.await.ok().flatten(),
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
        reference: None,
        rps_vs_reference: None,
        p50_vs_reference: None,
    }
}
