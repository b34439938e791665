//! Server assembly, in one place: pools, domain services, the gRPC server
//! with its tower stack, health, reflection, the metrics endpoint, and the
//! shutdown sequence. `main` and the tests build the same [`Application`].

use std::{future::Future, net::SocketAddr, time::Duration};

use anyhow::Context as _;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{server::NamedService, transport::Server};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::{
        admin::{AdminApi, AdminServiceServer},
        analytics::{AnalyticsApi, AnalyticsServiceServer},
        catalog::{CatalogApi, CatalogServiceServer},
        orders::{OrderApi, OrderServiceServer},
        users::{UserApi, UserServiceServer},
    },
    auth::TokenStore,
    cache::Cache,
    config::Settings,
    domain::{
        analytics::Analytics, catalog::Catalog, market_analyses::MarketAnalyses, orders::Orders,
        paging::PageTokens, partitions::Partitions, passwords::PasswordHasher,
        price_history::PriceHistory, profiles::Profiles, search::ProductSearch, teams::Teams,
        users::Users,
    },
    metrics,
    middleware::{AuthLayer, DeadlineLayer, RpcLayer},
    outbox::OutboxRelay,
    proto,
    search_log::SearchLog,
    store::{self, mongo::Mongo, postgres::Reads},
};

/// How often readiness checks the database and Redis, and how long a check may take.
const READINESS_INTERVAL: Duration = Duration::from_secs(2);
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long shutdown waits for the search log to be written out.
const SEARCH_LOG_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The health entry of the process itself: SERVING from start-up until the
/// process exits, whatever its dependencies do, so that a liveness probe
/// restarts only a process that no longer serves (a database outage makes
/// every replica unready, never restarted).
pub const LIVENESS_HEALTH: &str = "liveness";

/// The services whose health is reported, besides the overall "" entry.
const SERVICES: &[&str] = &[
    <UserServiceServer<UserApi> as NamedService>::NAME,
    <CatalogServiceServer<CatalogApi> as NamedService>::NAME,
    <OrderServiceServer<OrderApi> as NamedService>::NAME,
    <AdminServiceServer<AdminApi> as NamedService>::NAME,
    <AnalyticsServiceServer<AnalyticsApi> as NamedService>::NAME,
];

pub struct Application {
    settings: Settings,
    grpc: TcpListener,
    metrics: TcpListener,
    db: PgPool,
    reads: Reads,
    cache: Cache,
    mongo: Option<Mongo>,
}

impl Application {
    /// Binds the listeners and builds the pools. Nothing is served yet.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let db = store::postgres::pool(&settings.database)?;
        let reads = Reads::new(&settings.database, &db)?;
        let cache = Cache::new(&settings.redis)?;
        let mongo = Mongo::connect(&settings.mongodb).await?;
        let grpc_addr = settings.server.grpc_addr()?;
        let grpc = TcpListener::bind(grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC port {grpc_addr}"))?;
        let metrics_addr = settings.metrics.addr()?;
        let metrics = TcpListener::bind(metrics_addr)
            .await
            .with_context(|| format!("binding the metrics port {metrics_addr}"))?;
        Ok(Self {
            settings,
            grpc,
            metrics,
            db,
            reads,
            cache,
            mongo,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn db(&self) -> &PgPool {
        &self.db
    }

    /// Serves until `shutdown` completes, then: health turns NOT_SERVING,
    /// calls are still accepted for `shutdown_readiness_delay` (while load
    /// balancers notice), new calls are refused, and in-flight calls get
    /// `drain_timeout` to finish.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let Self {
            settings,
            grpc,
            metrics: metrics_listener,
            db,
            reads,
            cache,
            mongo,
        } = self;
        let server_settings = &settings.server;
        let max_message = server_settings.max_message_bytes;

        let pages = PageTokens::new(&settings.pagination.token_secret);
        let users = Users::new(
            db.clone(),
            pages.clone(),
            PasswordHasher::for_this_machine(),
            cache.clone(),
        );
        let teams = Teams::new(db.clone(), pages.clone());
        let orders = Orders::new(db.clone(), pages.clone(), users.clone(), cache.clone());
        let profiles = Profiles::new(users.clone(), mongo.clone());
        let user_api = UserServiceServer::new(UserApi::new(users, teams, profiles))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let (search_log, search_log_writer) = SearchLog::start(db.clone(), &settings.search_log);
        let search = ProductSearch::new(
            db.clone(),
            reads.clone(),
            cache.clone(),
            pages.clone(),
            search_log,
        );
        let prices = PriceHistory::new(db.clone(), cache.clone(), mongo.clone());
        let catalog_api = CatalogServiceServer::new(CatalogApi::new(
            Catalog::new(db.clone(), cache.clone()),
            search,
            prices,
        ))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
        let partitions = Partitions::new(db.clone(), settings.partitions.clone());
        let analytics = Analytics::new(db.clone(), reads.clone(), cache.clone());
        // Market analyses only read PostgreSQL.
        let analyses = MarketAnalyses::new(
            reads.pool().clone(),
            mongo.clone(),
            settings.analysis.clone(),
            pages.clone(),
        );
        let admin_api =
            AdminServiceServer::new(AdminApi::new(partitions.clone(), analytics.clone()))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message);
        let analytics_api =
            AnalyticsServiceServer::new(AnalyticsApi::new(analytics.clone(), analyses.clone()))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message);
        let order_api = OrderServiceServer::new(OrderApi::new(orders))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(LIVENESS_HEALTH, ServingStatus::Serving)
            .await;
        // Each reflection version lists every service, the other version
        // included, and describes the google.rpc error details so that tools
        // such as grpcurl can decode them.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .build_v1()
            .context("building reflection v1")?;
        let reflection_v1alpha = reflection()
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("building reflection v1alpha")?;

        let stopping = CancellationToken::new();
        let stop_serving = CancellationToken::new();
        let readiness = tokio::spawn(watch_readiness(
            db.clone(),
            reads.clone(),
            cache.clone(),
            mongo.clone(),
            health.clone(),
            stopping.clone(),
        ));
        let maintenance = tokio::spawn(maintain_partitions(
            partitions,
            settings.partitions.interval,
            stopping.clone(),
        ));
        if let Some(mongo) = mongo.clone() {
            tokio::spawn(ensure_indexes(mongo, stopping.clone()));
        }
        let workers = analyses.spawn_workers(settings.analysis.workers, stopping.clone());
        let refresher = tokio::spawn(refresh_analytics(
            analytics.clone(),
            settings.analytics.refresh_interval,
            stopping.clone(),
        ));
        let relay = tokio::spawn(
            OutboxRelay::new(
                db.clone(),
                mongo.clone(),
                settings.mongodb.price_bucket_capacity,
                settings.mongodb.outbox_interval,
            )
            .run(stopping.clone()),
        );
        let metrics_server = tokio::spawn(metrics::serve(
            metrics_listener,
            db.clone(),
            reads.clone(),
            cache.clone(),
            stopping.clone().cancelled_owned(),
        ));

        let addr = grpc.local_addr()?;
        let mut builder = Server::builder();
        if !server_settings.max_connection_age.is_zero() {
            // Graceful only: no `max_connection_age_grace`, with which tonic
            // skips the GOAWAY and cuts the connection at age + grace. Calls
            // in flight are bounded by the request timeout anyway.
            builder = builder.max_connection_age(server_settings.max_connection_age);
        }
        let server = builder
            .layer(RpcLayer::new(settings.telemetry.n_plus_one_threshold))
            .layer(AuthLayer::new(TokenStore::from_settings(&settings.auth)))
            .layer(DeadlineLayer::new(server_settings.request_timeout))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(user_api)
            .add_service(catalog_api)
            .add_service(order_api)
            .add_service(admin_api)
            .add_service(analytics_api)
            .serve_with_incoming_shutdown(incoming(grpc), stop_serving.clone().cancelled_owned());
        tokio::pin!(server);
        tracing::info!(%addr, "serving gRPC");

        tokio::select! {
            result = &mut server => {
                stopping.cancel();
                search_log_writer.close(SEARCH_LOG_CLOSE_TIMEOUT).await;
                return result.context("the gRPC server stopped unexpectedly");
            }
            () = shutdown => {}
        }

        tracing::info!("shutting down: health is NOT_SERVING");
        stopping.cancel();
        let _ = readiness.await;
        let _ = maintenance.await;
        let _ = relay.await;
        let _ = refresher.await;
        for worker in workers {
            let _ = worker.await;
        }
        set_all(&health, ServingStatus::NotServing).await;
        if !server_settings.shutdown_readiness_delay.is_zero() {
            tokio::select! {
                result = &mut server => {
                    search_log_writer.close(SEARCH_LOG_CLOSE_TIMEOUT).await;
                    return result.context("the gRPC server stopped unexpectedly");
                }
                () = tokio::time::sleep(server_settings.shutdown_readiness_delay) => {}
            }
        }

        tracing::info!(drain_timeout = ?server_settings.drain_timeout, "refusing new calls; draining in-flight calls");
        stop_serving.cancel();
        let drained = match tokio::time::timeout(server_settings.drain_timeout, &mut server).await {
            Ok(result) => result.context("the gRPC server failed while draining"),
            Err(_) => {
                tracing::warn!("drain timeout elapsed; abandoning the calls still in flight");
                Ok(())
            }
        };
        // Searches served until now are in the log's buffer: write them out.
        search_log_writer.close(SEARCH_LOG_CLOSE_TIMEOUT).await;
        if let Ok(Err(e)) = metrics_server.await {
            tracing::warn!(error = %e, "the metrics endpoint failed");
        }
        db.close().await;
        reads.pool().close().await;
        drained?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The connections of `listener`, with `TCP_NODELAY` set: otherwise Nagle's
/// algorithm holds every response larger than a segment until the client's
/// delayed ACK, ~40 ms a call.
pub fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|stream| {
        if let Ok(stream) = &stream
            && let Err(e) = stream.set_nodelay(true)
        {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        stream
    })
}

/// Creates the MongoDB indexes, retrying until it works (MongoDB may start
/// after the service).
async fn ensure_indexes(mongo: Mongo, stopping: CancellationToken) {
    let mut pause = Duration::from_millis(500);
    loop {
        match mongo.ensure_indexes().await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = ?e, "creating MongoDB indexes failed; retrying"),
        }
        tokio::select! {
            () = stopping.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// Refreshes the sales view every `interval` (never if zero). A failed
/// refresh is logged and retried at the next interval.
async fn refresh_analytics(analytics: Analytics, interval: Duration, stopping: CancellationToken) {
    if interval.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval(interval);
    ticks.tick().await; // not at start-up: the view is as fresh as the last refresh
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(e) = analytics.refresh().await {
            tracing::error!(error = ?e, "refreshing the sales analytics failed; retrying at the next interval");
        }
    }
}

/// Partition maintenance at start-up and every `interval` (never if zero).
/// A failed round is logged and retried at the next one.
async fn maintain_partitions(
    partitions: Partitions,
    interval: Duration,
    stopping: CancellationToken,
) {
    if interval.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval(interval);
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(e) = partitions.maintain(chrono::Utc::now().date_naive()).await {
            tracing::error!(error = %e, "partition maintenance failed; retrying at the next interval");
        }
    }
}

async fn set_all(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    for service in SERVICES {
        health.set_service_status(*service, status).await;
    }
}

/// The health entry of MongoDB: NOT_SERVING degrades the document features
/// only (they answer UNAVAILABLE), never the service.
pub const MONGODB_HEALTH: &str = "mongodb";

/// Sets a dependency's health entry when its state changes.
async fn report_dependency(health: &HealthReporter, name: &str, ok: bool, last: &mut Option<bool>) {
    if *last == Some(ok) {
        return;
    }
    let status = if ok {
        ServingStatus::Serving
    } else {
        tracing::warn!(
            dependency = name,
            "dependency unreachable: its health entry is NOT_SERVING"
        );
        ServingStatus::NotServing
    };
    health.set_service_status(name, status).await;
    *last = Some(ok);
}

/// PostgreSQL answers `SELECT 1` on `pool` within the readiness timeout.
async fn answers(pool: &PgPool) -> bool {
    matches!(
        tokio::time::timeout(READINESS_TIMEOUT, sqlx::query("SELECT 1").execute(pool)).await,
        Ok(Ok(_))
    )
}

/// The health entry of the read replica (`database.read_url`, when set): down,
/// the lag-tolerant reads fail (search, insights, analytics), the rest serves.
pub const REPLICA_HEALTH: &str = "postgres_replica";

/// The health entry of the cache dependency. Redis down means degraded
/// (this entry NOT_SERVING), never the service: reads fall back to PostgreSQL.
pub const REDIS_HEALTH: &str = "redis";

/// Readiness follows the database: without PostgreSQL no RPC can succeed, so
/// the instance reports NOT_SERVING until it answers again. The `redis`
/// entry follows the cache; probing it also replays queued invalidations and
/// lets a recovered Redis close the circuit without waiting for traffic.
async fn watch_readiness(
    db: PgPool,
    reads: Reads,
    cache: Cache,
    mongo: Option<Mongo>,
    health: HealthReporter,
    stopping: CancellationToken,
) {
    let mut ready = None;
    let mut redis_ready = None;
    let mut mongo_ready = None;
    let mut replica_ready = None;
    let mut ticks = tokio::time::interval(READINESS_INTERVAL);
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Some(ok) = cache.probe().await {
            report_dependency(&health, REDIS_HEALTH, ok, &mut redis_ready).await;
        }
        if let Some(mongo) = &mongo {
            let ok = matches!(
                tokio::time::timeout(READINESS_TIMEOUT, mongo.ping()).await,
                Ok(true)
            );
            report_dependency(&health, MONGODB_HEALTH, ok, &mut mongo_ready).await;
        }
        if let Some(replica) = reads.replica() {
            let ok = answers(replica).await;
            report_dependency(&health, REPLICA_HEALTH, ok, &mut replica_ready).await;
        }
        let ok = answers(&db).await;
        if ready != Some(ok) {
            if ok {
                tracing::info!("database reachable: SERVING");
            } else {
                tracing::warn!("database unreachable: NOT_SERVING");
            }
            set_all(
                &health,
                if ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                },
            )
            .await;
            ready = Some(ok);
        }
    }
}
