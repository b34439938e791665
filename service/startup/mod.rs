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
//! - `tls.rs`: TLS on the gRPC port, its certificate reloads and the
//!   handshakes;
//! - `connections.rs`: the connection limit, socket options and the idle
//!   timeout, in the IO type every connection is served over (below TLS);
//! - here: the server itself, its tower stack and HTTP/2 settings, and the
//!   plaintext health port (`server.health_port`: the kubelet's gRPC probes
//!   cannot speak TLS).

mod background;
pub mod connections;
mod health;
mod services;
mod shutdown;
pub mod tls;

use std::{future::Future, net::SocketAddr, pin::Pin};

use anyhow::Context as _;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{service::Routes, transport::Server};
use tonic_health::pb::health_server::{Health, HealthServer};
use tower::ServiceBuilder;

use self::{
    background::{Background, Tasks},
    connections::{CallsInFlight, Limits},
    services::Services,
    tls::Tls,
};
pub use self::{
    health::{LIVENESS_HEALTH, MONGODB_HEALTH, REDIS_HEALTH, REPLICA_HEALTH},
    services::RPC_ROLES,
};
use crate::{
    auth::{PeerStore, Policy, TokenStore, jwt::JwtVerifier},
    cache::Cache,
    config::{ServerSettings, Settings},
    documents::Mongo,
    metrics,
    middleware::{Admission, Auth, Deadlines, Middleware as _, Quotas, Rpc},
    store::{self, postgres::Reads},
};

pub struct Application {
    settings: Settings,
    grpc: TcpListener,
    metrics: TcpListener,
    /// The plaintext health port, when configured.
    health: Option<TcpListener>,
    /// `None` when TLS is off.
    tls: Option<Tls>,
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
    /// Binds the listeners, reads the TLS files and builds the pools.
    /// Nothing is served yet.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        metrics::export_known_series();
        let tls = settings
            .server
            .tls
            .enabled
            .then(|| Tls::load(&settings.server.tls))
            .transpose()?;
        let db =
            store::postgres::pool_for_calls(&settings.database, settings.server.request_timeout)?;
        crate::statements::set_postgres_server(secrecy::ExposeSecret::expose_secret(
            &settings.database.url,
        ));
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
        let health = match settings.server.health_addr()? {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the health port {addr}"))?,
            ),
            None => None,
        };
        Ok(Self {
            settings,
            grpc,
            metrics,
            health,
            tls,
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

    /// The plaintext health port's address, when there is one.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().map(|listener| {
            listener
                .local_addr()
                .expect("a bound listener has an address")
        })
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
            health: health_listener,
            tls,
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
        if let Some(tls) = &tls {
            tasks
                .tracker
                .spawn(tls.clone().watch(tasks.stopping.clone()));
        }
        let health_server = health_listener.map(|listener| (listener, health_service.clone()));
        let services = Services::build(&settings, &pools, health_service, &tasks)?;
        let mut background =
            Background::start(tasks, &settings, &pools, &services, health.clone(), metrics);
        let Services {
            routes, search_log, ..
        } = services;

        let stop_serving = CancellationToken::new();
        let addr = grpc.local_addr()?;
        let tls_on = tls.is_some();
        let server = serve(&settings, jwt, routes, grpc, tls, stop_serving.clone());
        let server = with_health_port(server, health_server);
        tokio::pin!(server);
        tracing::info!(%addr, tls = tls_on, "serving gRPC");

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

type Served = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// The gRPC server over `routes` behind the tower stack, over TLS when
/// `tls` is given, until `stop_serving`: then it stops accepting and waits
/// for its calls.
fn serve(
    settings: &Settings,
    jwt: Option<JwtVerifier>,
    routes: Routes,
    listener: TcpListener,
    tls: Option<Tls>,
    stop_serving: CancellationToken,
) -> Served {
    let server = &settings.server;
    // Outermost first; see `middleware` for what each layer does.
    // `CallsInFlight` is outermost so that a call counts for its
    // connection's idle timeout for as long as any layer holds it.
    let auth = Auth::new(
        TokenStore::from_settings(&settings.auth),
        jwt,
        Policy::new(RPC_ROLES),
    )
    .with_peers(
        PeerStore::from_settings(&settings.auth),
        connections::peer_certificates,
    );
    let stack = ServiceBuilder::new()
        .option_layer((!server.idle_timeout.is_zero()).then(|| CallsInFlight.into_layer()))
        .layer(Rpc::new(settings.telemetry.n_plus_one_threshold).into_layer())
        .layer(auth.into_layer())
        .layer(
            Quotas::new(
                &settings.quotas,
                settings
                    .auth
                    .tokens
                    .iter()
                    .map(|t| t.caller.clone())
                    .chain(settings.auth.peers.iter().map(|p| p.identity.clone())),
            )
            .into_layer(),
        )
        .layer(Deadlines::new(server.request_timeout).into_layer())
        .option_layer(
            settings
                .admission
                .enabled
                .then(|| Admission::new(&settings.admission).into_layer()),
        );
    let router = http2_limits(Server::builder(), server)
        .layer(stack)
        .add_routes(routes);
    let connections = connections::incoming(listener, Limits::from_settings(server));
    let stopped = stop_serving.cancelled_owned();
    match tls {
        Some(tls) => {
            let handshakes = tls::accept(connections, tls, server.tls.handshake_timeout);
            Box::pin(router.serve_with_incoming_shutdown(handshakes, stopped))
        }
        None => Box::pin(router.serve_with_incoming_shutdown(connections, stopped)),
    }
}

/// h2's limit on streams a client resets before the server accepted them
/// (CVE-2023-44487, "rapid reset"), past which the connection gets a GOAWAY;
/// h2's own default, set so that an upgrade cannot quietly drop it.
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// hyper's limit on streams the server itself resets because of what the
/// client sent (a flood of provoked stream errors, "MadeYouReset"), past
/// which it sends a GOAWAY; hyper's own default, set for the same reason.
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// The HTTP/2 side of connection hardening (the TCP side is
/// `connections.rs`): streams and header bytes per connection, keepalive
/// PINGs, the reset-flood limits, and the connection age.
fn http2_limits(builder: Server, server: &ServerSettings) -> Server {
    let nonzero = |d: std::time::Duration| (!d.is_zero()).then_some(d);
    let mut builder = builder
        .max_concurrent_streams(server.max_concurrent_streams)
        .http2_max_header_list_size(server.max_header_list_bytes)
        .http2_keepalive_interval(nonzero(server.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(server.http2_keepalive_timeout))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS));
    if !server.max_connection_age.is_zero() {
        // Graceful only: no `max_connection_age_grace`, with which tonic
        // skips the GOAWAY and cuts the connection at age + grace. Calls
        // in flight are bounded by the request timeout anyway.
        builder = builder.max_connection_age(server.max_connection_age);
    }
    builder
}

/// `server`, and beside it the health service alone, in plaintext, on the
/// health port when there is one. The health port serves until `server`
/// has finished draining, so the probes see NOT_SERVING (readiness) and
/// SERVING `liveness` throughout the shutdown instead of a closed port.
/// The health port is the kubelet's, which opens a connection per probe
/// and sends `Check`: a few connections, each closed once idle, so that
/// nothing else reaching the pod can hold it open (it has no auth).
const HEALTH_PORT_LIMITS: Limits = Limits {
    max_connections: Some(64),
    idle_timeout: Some(std::time::Duration::from_secs(60)),
    tcp_keepalive: Some(std::time::Duration::from_secs(60)),
};

fn with_health_port(
    server: Served,
    health: Option<(TcpListener, HealthServer<impl Health>)>,
) -> Served {
    let Some((listener, health)) = health else {
        return server;
    };
    Box::pin(async move {
        let addr = listener.local_addr();
        let drained = CancellationToken::new();
        let probes = Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(
                connections::incoming(listener, HEALTH_PORT_LIMITS),
                drained.clone().cancelled_owned(),
            );
        if let Ok(addr) = addr {
            tracing::info!(%addr, "serving health checks in plaintext");
        }
        let server = async move {
            let served = server.await;
            drained.cancel();
            served
        };
        let (served, probed) = tokio::join!(server, probes);
        served.and(probed)
    })
}
