//! The graceful shutdown, once the shutdown signal has come (SIGTERM or
//! SIGINT in `main`, a token in the tests):
//!
//! 1. the background tasks are told to stop, and the readiness watcher is
//!    waited for, so that nothing sets health after step 2;
//! 2. health turns NOT_SERVING (overall and per service; `liveness` stays
//!    SERVING: a draining process is not restarted);
//! 3. calls are still accepted for `server.shutdown_readiness_delay`, while
//!    load balancers and clients notice;
//! 4. the listener closes: new connections are refused;
//! 5. in-flight calls get `server.drain_timeout` to finish; past it they are
//!    abandoned, still a clean exit;
//!
//! then [`release`], the last step of every exit, a failed server's too:
//!
//! 6. the background tasks are waited for (the task tracker closes);
//! 7. the search log writes out what the served searches buffered;
//! 8. the pools close.

use std::{future::Future, pin::Pin, time::Duration};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use super::{Pools, background::Background, health};
use crate::{config::ServerSettings, search_log::SearchLogWriter};

/// How long shutdown waits for the search log to be written out.
const SEARCH_LOG_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Steps 1 to 5: from the shutdown signal until `server` has stopped (or
/// the drain bound has passed).
pub(super) async fn drain<F>(
    mut server: Pin<&mut F>,
    settings: &ServerSettings,
    health: &HealthReporter,
    background: &mut Background,
    stop_serving: &CancellationToken,
) -> anyhow::Result<()>
where
    F: Future<Output = Result<(), tonic::transport::Error>>,
{
    tracing::info!("shutting down: health is NOT_SERVING");
    background.stop().await;
    health::set_all(health, ServingStatus::NotServing).await;
    if !settings.shutdown_readiness_delay.is_zero() {
        tokio::select! {
            result = server.as_mut() => {
                return result.context("the gRPC server stopped unexpectedly");
            }
            () = tokio::time::sleep(settings.shutdown_readiness_delay) => {}
        }
    }

    tracing::info!(drain_timeout = ?settings.drain_timeout, "refusing new calls; draining in-flight calls");
    stop_serving.cancel();
    match tokio::time::timeout(settings.drain_timeout, server).await {
        Ok(result) => result.context("the gRPC server failed while draining"),
        Err(_) => {
            tracing::warn!("drain timeout elapsed; abandoning the calls still in flight");
            Ok(())
        }
    }
}

/// Steps 6 to 8: once nothing is served any more.
pub(super) async fn release(background: Background, search_log: SearchLogWriter, pools: &Pools) {
    background.wait().await;
    // Searches served until now are in the log's buffer: write them out.
    search_log.close(SEARCH_LOG_CLOSE_TIMEOUT).await;
    pools.close().await;
}
