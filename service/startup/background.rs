//! The work the service does besides answering calls, every task of it
//! spawned on one [`TaskTracker`] and stopped by one [`CancellationToken`]:
//! nothing is detached, so once [`Background::wait`] returns no task of this
//! process still uses the pools.
//!
//! | task | what it does | on `stopping` |
//! |---|---|---|
//! | readiness watcher | sets the health entries (`health.rs`) | ends its round |
//! | partition maintenance | creates partitions ahead and retires old ones, at start-up and every interval | ends its round |
//! | table-size sampler | samples table and partition sizes (for AdminService's growth), at start-up and every interval | ends its round |
//! | MongoDB indexes | created at start-up, retried until they are | gives up at once |
//! | analysis workers | run pending market analyses | end the analysis they run |
//! | analytics refresher | refreshes the sales view every interval | ends its refresh |
//! | idempotency sweep | deletes idempotency keys past their retention, at start-up and every interval | ends its round |
//! | outbox relay | applies the outbox (price history, profile deletes) to MongoDB | ends its pass |
//! | replica catch-up | after an analytics refresh, waits for the read replica, then drops cached analytics | drops them at once |
//! | metrics server | `/metrics` on its own port | stops accepting, ends open requests |
//! | TLS reload | reads the certificate files every `server.tls.reload_interval` (`tls.rs`; spawned by `Application::run_until_stopped`) | ends at once |
//! | near cache subscriber | keeps the near cache's invalidation subscription up (`cache::near`) | unsubscribes, ends at once |
//! | JWT key refresh | fetches the issuer's key set every interval (`auth::jwt`; spawned in `startup`) | ends at once |
//!
//! The search log writer is not here: it must outlive the drain, so it has
//! its own close step (see `shutdown.rs`).

use std::{future::Future, time::Duration};

use backon::{ExponentialBuilder, Retryable as _};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic_health::server::HealthReporter;

use super::{Pools, health, services::Services};
use crate::{config::Settings, documents::Mongo, metrics, outbox::OutboxRelay, retry};

/// The tracker every background task runs on, and the token that stops them;
/// made first, so that the services can start tasks on it too.
pub(super) struct Tasks {
    pub tracker: TaskTracker,
    pub stopping: CancellationToken,
}

impl Tasks {
    pub fn new() -> Self {
        Self {
            tracker: TaskTracker::new(),
            stopping: CancellationToken::new(),
        }
    }
}

pub(super) struct Background {
    tracker: TaskTracker,
    stopping: CancellationToken,
    /// The readiness watcher writes health: shutdown waits for it alone
    /// before it sets NOT_SERVING, so that the watcher cannot undo it.
    readiness: Option<JoinHandle<()>>,
}

impl Background {
    /// Spawns every background task.
    pub fn start(
        Tasks { tracker, stopping }: Tasks,
        settings: &Settings,
        pools: &Pools,
        services: &Services,
        health: HealthReporter,
        metrics_listener: TcpListener,
    ) -> Self {
        let readiness = tracker.spawn(health::watch_readiness(
            pools.db.clone(),
            pools.reads.clone(),
            pools.cache.clone(),
            pools.mongo.clone(),
            health,
            stopping.clone(),
        ));
        match pools.cache.near_subscriber(stopping.clone()) {
            Ok(Some(subscriber)) => {
                tracker.spawn(subscriber);
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(error = %error, "no near cache subscriber"),
        }
        let partitions = services.partitions.clone();
        tracker.spawn(every(
            "partition maintenance",
            settings.partitions.interval,
            true,
            stopping.clone(),
            move || {
                let partitions = partitions.clone();
                async move { partitions.maintain(chrono::Utc::now().date_naive()).await }
            },
        ));
        let diagnostics = services.diagnostics.clone();
        tracker.spawn(every(
            "sampling table sizes",
            diagnostics.size_sample_interval(),
            true,
            stopping.clone(),
            move || {
                let diagnostics = diagnostics.clone();
                async move { diagnostics.sample_sizes().await }
            },
        ));
        if let Some(mongo) = pools.mongo.clone() {
            tracker.spawn(ensure_indexes(
                mongo,
                settings.analysis.retention,
                stopping.clone(),
            ));
        }
        services
            .analyses
            .spawn_workers(settings.analysis.workers, &tracker, stopping.clone());
        // Not at start-up: the view is as fresh as the last refresh.
        let analytics = services.analytics.clone();
        tracker.spawn(every(
            "refreshing the sales analytics",
            settings.analytics.refresh_interval,
            false,
            stopping.clone(),
            move || {
                let analytics = analytics.clone();
                async move { analytics.refresh().await }
            },
        ));
        let sweeper = services.key_sweeper.clone();
        tracker.spawn(every(
            "sweeping expired idempotency keys",
            settings.idempotency.sweep_interval,
            true,
            stopping.clone(),
            move || {
                let sweeper = sweeper.clone();
                async move { sweeper.sweep(chrono::Utc::now()).await }
            },
        ));
        tracker.spawn(
            OutboxRelay::new(
                pools.db.clone(),
                pools.mongo.clone(),
                settings.mongodb.price_bucket_capacity,
                settings.mongodb.outbox_interval,
            )
            .run(stopping.clone()),
        );
        let metrics_server = metrics::serve(
            metrics_listener,
            pools.db.clone(),
            pools.reads.clone(),
            pools.cache.clone(),
            pools.mongo.clone(),
            stopping.clone().cancelled_owned(),
        );
        tracker.spawn(async move {
            if let Err(e) = metrics_server.await {
                tracing::warn!(error = %e, "the metrics endpoint failed");
            }
        });

        Self {
            tracker,
            stopping,
            readiness: Some(readiness),
        }
    }

    /// Tells every task to stop, and waits until the readiness watcher has:
    /// from then on the health entries are the caller's to set. The other
    /// tasks end in their own time; [`Background::wait`] waits for them.
    pub async fn stop(&mut self) {
        self.stopping.cancel();
        if let Some(readiness) = self.readiness.take() {
            let _ = readiness.await;
        }
    }

    /// Stops every task and waits until all have ended.
    pub async fn wait(mut self) {
        self.stop().await;
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Creates the MongoDB indexes, retrying until it works (MongoDB may start
/// after the service): exponential backoff from 500 ms with jitter, capped
/// at 30 s, without a limit on attempts. Shutdown abandons an attempt in
/// flight: creating an index is idempotent, and a MongoDB that is down must
/// not hold it up.
async fn ensure_indexes(mongo: Mongo, analysis_retention: Duration, stopping: CancellationToken) {
    let until_created = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .without_max_times()
        .with_jitter();
    let created = (|| mongo.ensure_indexes(analysis_retention))
        .retry(until_created)
        .sleep(tokio::time::sleep)
        .notify(|e, _| tracing::warn!(error = ?e, "creating MongoDB indexes failed; retrying"));
    tokio::select! {
        () = stopping.cancelled() => {}
        _ = created => {}
    }
}

/// Runs `round` every `interval` (never if zero), first at start-up when
/// `at_start`. A failing round is retried under the background policy
/// (`retry.rs`), then reported as `what` and tried again at the next round.
async fn every<F, Fut, T>(
    what: &'static str,
    interval: Duration,
    at_start: bool,
    stopping: CancellationToken,
    mut round: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = crate::error::Result<T>>,
{
    if interval.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval(interval);
    if !at_start {
        ticks.tick().await; // the first tick is immediate
    }
    loop {
        tokio::select! {
            () = stopping.cancelled() => return,
            _ = ticks.tick() => {}
        }
        tokio::select! {
            () = stopping.cancelled() => return,
            _ = retry::background(what, &mut round) => {}
        }
    }
}
