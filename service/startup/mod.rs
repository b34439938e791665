//! Server assembly, in one place. `main` and the tests build the same
//! [`Application`]: [`Application::build`] binds the listeners and makes the
//! pools; [`Application::run_until_stopped`] puts the rest together and
//! serves until the shutdown signal:
//!
//! - `services.rs`: the domain services and every gRPC service, built once,
//!   with the message limits;
//! - `health.rs`: the health entries and the readiness watcher;
//! - `background.rs`: every background task, on one task tracker stopped
//!   by one token;
//! - `shutdown.rs`: the graceful shutdown, step by step;
//! - here: the server itself, its tower stack and connection settings.

mod background;
mod health;
mod services;
mod shutdown;

use std::{future::Future, net::SocketAddr};

use anyhow::Context as _;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{service::Routes, transport::Server};
use tower::ServiceBuilder;

pub use self::health::{LIVENESS_HEALTH, MONGODB_HEALTH, REDIS_HEALTH, REPLICA_HEALTH};
use self::{
    background::{Background, Tasks},
    services::Services,
};
use crate::{
    auth::{TokenStore, jwt::JwtVerifier},
    cache::Cache,
    config::Settings,
    documents::Mongo,
    middleware::{Admission, Auth, Deadlines, Middleware as _, Rpc},
    store::{self, postgres::Reads},
};

pub struct Application {
    settings: Settings,
    grpc: TcpListener,
    metrics: TcpListener,
    pools: Pools,
    /// Loaded at build, so that keys that cannot be loaded fail the start.
    jwt: Option<JwtVerifier>,
}

/// The connections every part of the service shares (cheap handles).
struct Pools {
    db: PgPool,
    /// The read replica for lag-tolerant reads, or the primary.
    reads: Reads,
    cache: Cache,
    /// `None` when no MongoDB is configured: the document features answer
    /// UNAVAILABLE.
    mongo: Option<Mongo>,
}

impl Pools {
    async fn close(&self) {
        self.db.close().await;
        self.reads.pool().close().await;
    }
}

impl Application {
    /// Binds the listeners and builds the pools. Nothing is served yet.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let db =
            store::postgres::pool_for_calls(&settings.database, settings.server.request_timeout)?;
        let reads = Reads::new(&settings.database, &db)?;
        let cache = Cache::new(&settings.redis)?;
        let mongo = Mongo::connect(&settings.mongodb).await?;
        let jwt = match &settings.auth.jwt {
            Some(jwt) => Some(JwtVerifier::load(jwt).await?),
            None => None,
        };
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
            pools: Pools {
                db,
                reads,
                cache,
                mongo,
            },
            jwt,
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
        &self.pools.db
    }

    /// Serves until `shutdown` completes, then shuts down gracefully (see
    /// `shutdown.rs`): health turns NOT_SERVING, calls are still accepted
    /// for `shutdown_readiness_delay` (while load balancers notice), new
    /// calls are refused, and in-flight calls get `drain_timeout` to finish.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let Self {
            settings,
            grpc,
            metrics,
            pools,
            jwt,
        } = self;
        let (health, health_service) = health::start().await;
        let tasks = Tasks::new();
        if let Some(jwt) = &jwt {
            tasks
                .tracker
                .spawn(jwt.clone().refresh_periodically(tasks.stopping.clone()));
        }
        let services = Services::build(&settings, &pools, health_service, &tasks)?;
        let mut background =
            Background::start(tasks, &settings, &pools, &services, health.clone(), metrics);
        let Services {
            routes, search_log, ..
        } = services;

        let stop_serving = CancellationToken::new();
        let addr = grpc.local_addr()?;
        let server = serve(&settings, jwt, routes, grpc, stop_serving.clone());
        tokio::pin!(server);
        tracing::info!(%addr, "serving gRPC");

        let served = tokio::select! {
            result = &mut server => {
                result.context("the gRPC server stopped unexpectedly")
            }
            () = shutdown => {
                shutdown::drain(server, &settings.server, &health, &mut background, &stop_serving).await
            }
        };
        shutdown::release(background, search_log, &pools).await;
        served?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The gRPC server over `routes` behind the tower stack, until
/// `stop_serving`: then it stops accepting and waits for its calls.
fn serve(
    settings: &Settings,
    jwt: Option<JwtVerifier>,
    routes: Routes,
    listener: TcpListener,
    stop_serving: CancellationToken,
) -> impl Future<Output = Result<(), tonic::transport::Error>> + Send {
    // Outermost first; see `middleware` for what each layer does.
    let stack = ServiceBuilder::new()
        .layer(Rpc::new(settings.telemetry.n_plus_one_threshold).into_layer())
        .layer(Auth::new(TokenStore::from_settings(&settings.auth), jwt).into_layer())
        .layer(Deadlines::new(settings.server.request_timeout).into_layer())
        .option_layer(
            settings
                .admission
                .enabled
                .then(|| Admission::new(&settings.admission).into_layer()),
        );
    let mut builder = Server::builder();
    if !settings.server.max_connection_age.is_zero() {
        // Graceful only: no `max_connection_age_grace`, with which tonic
        // skips the GOAWAY and cuts the connection at age + grace. Calls
        // in flight are bounded by the request timeout anyway.
        builder = builder.max_connection_age(settings.server.max_connection_age);
    }
    builder
        .layer(stack)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming(listener), stop_serving.cancelled_owned())
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
