//! The `grpc.health.v1.Health` entries and who sets them.
//!
//! - `liveness` ([`LIVENESS_HEALTH`]) is SERVING from start-up until the
//!   process exits, whatever its dependencies do;
//! - the overall `""` entry and one per gRPC service follow PostgreSQL
//!   (readiness): without it no RPC can succeed;
//! - `redis`, `mongodb` and `postgres_replica` follow their dependency: down,
//!   they degrade the features that use it, never the service.
//!
//! Until the watcher's first round (right after start-up) `""` has tonic's
//! initial SERVING and the per-service entries are unknown (NOT_FOUND).
//! While serving, [`watch_readiness`] (a background task) is the only writer;
//! on shutdown it is stopped first and the shutdown sequence sets
//! NOT_SERVING, so the two never race.

use std::time::Duration;

use sqlx::{Connection as _, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tonic_health::{
    ServingStatus,
    pb::health_server::{Health, HealthServer},
    server::HealthReporter,
};

use super::services::SERVICES;
use crate::{
    cache::Cache,
    documents::Mongo,
    store::{availability, postgres::Reads},
};

/// How often readiness checks the database and Redis, and how long a check may take.
const READINESS_INTERVAL: Duration = Duration::from_secs(2);
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// The health entry of the process itself: SERVING from start-up until the
/// process exits, whatever its dependencies do, so that a liveness probe
/// restarts only a process that no longer serves (a database outage makes
/// every replica unready, never restarted).
pub const LIVENESS_HEALTH: &str = "liveness";

/// The health entry of MongoDB: NOT_SERVING degrades the document features
/// only (they answer UNAVAILABLE), never the service. Its ping goes through
/// the calls' fail-fast gate (`documents::mongo`), so the entry follows the
/// gate: NOT_SERVING at once while it is closed, and a ping that is the
/// period's trial can open it.
pub const MONGODB_HEALTH: &str = "mongodb";

/// The health entry of the read replica (`database.read_url`, when set): down,
/// the lag-tolerant reads fail (search, insights, analytics), the rest serves.
pub const REPLICA_HEALTH: &str = "postgres_replica";

/// The health entry of the cache dependency. Redis down means degraded
/// (this entry NOT_SERVING), never the service: reads fall back to PostgreSQL.
pub const REDIS_HEALTH: &str = "redis";

/// The health service, with `liveness`, the overall entry and every
/// service's SERVING until the readiness watcher's first round decides; the
/// dependencies' entries are unknown until then.
pub(super) async fn start() -> (HealthReporter, HealthServer<impl Health>) {
    let (health, service) = tonic_health::server::health_reporter();
    health
        .set_service_status(LIVENESS_HEALTH, ServingStatus::Serving)
        .await;
    // tonic starts the overall entry SERVING; the services' entries say the
    // same from the first moment (instead of "not registered"), and the
    // readiness watcher's first round corrects them all together.
    set_all(&health, ServingStatus::Serving).await;
    (health, service)
}

/// Sets the overall entry and every gRPC service's.
pub(super) async fn set_all(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    for service in SERVICES {
        health.set_service_status(*service, status).await;
    }
}

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

/// Whether a PostgreSQL server answers, asked over a connection of its own
/// (opened with the pool's options): a pool whose connections are all busy
/// with slow calls is overload, not an outage, and must not take the
/// instance out of rotation. A failed check drops the connection; the next
/// check opens a new one, so the probe reconnects at most once a round.
struct Probe {
    pool: PgPool,
    conn: Option<PgConnection>,
}

impl Probe {
    fn new(pool: &PgPool) -> Self {
        Self {
            pool: pool.clone(),
            conn: None,
        }
    }

    /// The server answers `SELECT 1` within the readiness timeout.
    async fn answers(&mut self) -> bool {
        let checked = tokio::time::timeout(READINESS_TIMEOUT, async {
            let conn = match &mut self.conn {
                Some(conn) => conn,
                none => {
                    none.insert(PgConnection::connect_with(&self.pool.connect_options()).await?)
                }
            };
            sqlx::query("SELECT 1").execute(conn).await.map(|_| ())
        })
        .await;
        // The calls' fail-fast gate learns of an outage, and of the
        // server's return, from the probe too (without waiting for a call).
        // A slow answer is not an outage: only a failed connection closes it.
        let gate = availability::gate(&self.pool);
        match &checked {
            Ok(Ok(())) => gate.up(),
            Ok(Err(sqlx::Error::Io(_) | sqlx::Error::Tls(_))) => {
                gate.down(std::time::Instant::now())
            }
            _ => {}
        }
        let ok = matches!(checked, Ok(Ok(())));
        if !ok {
            // A half-open or timed-out connection is not reused.
            self.conn = None;
        }
        ok
    }
}

/// Readiness follows the database: without PostgreSQL no RPC can succeed, so
/// the instance reports NOT_SERVING until it answers again (asked over the
/// probe's own connection, not whether the pool has one free). The `redis`
/// entry follows the cache; probing it also replays queued invalidations and
/// lets a recovered Redis close the circuit without waiting for traffic.
pub(super) async fn watch_readiness(
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
    let mut primary = Probe::new(&db);
    let mut replica = reads.replica().map(Probe::new);
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
        if let Some(replica) = &mut replica {
            let ok = replica.answers().await;
            report_dependency(&health, REPLICA_HEALTH, ok, &mut replica_ready).await;
        }
        let ok = primary.answers().await;
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
