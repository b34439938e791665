//! PostgreSQL restarted immediately (no checkpoint, crash recovery) under
//! load: calls during the outage fail with UNAVAILABLE, never INTERNAL or a
//! hang, and succeed again after. The connection attempts the service makes
//! while the server recovers are counted from its log (`log_connections`);
//! refused attempts on the closed port leave no trace there.

use std::time::{Duration, Instant};

use crate::support::{
    Load, Postgres, Service, figure,
    service::{arrange_catalog, read_or_order},
};

const SCENARIO: &str = "postgres_restart";
const CALLERS: usize = 8;
const BEFORE: Duration = Duration::from_secs(2);
/// How long the port stays closed.
const DOWN: Duration = Duration::from_secs(3);
const AFTER: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_during_a_postgres_restart_fail_with_unavailable_and_succeed_after() {
    let _serial = crate::support::serial().await;
    // No Redis: every read reaches PostgreSQL.
    let pg = Postgres::start().await;
    let service = Service::on(&pg, None).await;
    let (user, products) = arrange_catalog(&service, 4, 1_000_000).await;
    let (users, orders) = (service.users(), service.orders());
    let load = Load::start(CALLERS, Duration::from_secs(60), move |caller, n| {
        let product = products[caller % products.len()];
        read_or_order(users.clone(), orders.clone(), user, product, n)
    });
    tokio::time::sleep(BEFORE).await;

    // The outage: stop immediately, keep the port closed, then start (crash
    // recovery, during which the server refuses connections as starting up).
    let outage_start = load.now();
    pg.stop_immediate().await;
    tokio::time::sleep(DOWN).await;
    let recovery_start = load.now();
    let log_before = pg.log().len();
    let recovery = Instant::now();
    pg.start_again().await;
    let recovery_ms = recovery.elapsed().as_millis();
    let serving = Instant::now();
    service.wait_serving().await;
    let back = load.now();
    let log = pg.log();
    let logged = log[log_before.min(log.len())..]
        .lines()
        .filter(|l| l.contains("connection received"))
        .count();
    let logged_secs = recovery.elapsed().as_secs_f64();
    let serving_ms = serving.elapsed().as_millis();
    tokio::time::sleep(AFTER).await;
    let samples = load.finish().await;

    // Calls over before the outage; calls started while the port was closed;
    // and while the server recovered, until readiness said SERVING.
    let before = crate::support::load::Samples(
        samples
            .0
            .iter()
            .filter(|s| s.started + s.latency < outage_start)
            .cloned()
            .collect(),
    );
    let closed = samples.started_between(outage_start, recovery_start);
    let recovering = samples.started_between(recovery_start, back);
    let during = samples.started_between(outage_start, back);
    // A second after readiness returns, everything succeeds.
    let after = samples.started_between(back + Duration::from_secs(1), Duration::MAX);
    figure(SCENARIO, "before", before.summary());
    figure(SCENARIO, "while the port was closed", closed.summary());
    figure(
        SCENARIO,
        "while recovering, until SERVING",
        recovering.summary(),
    );
    figure(SCENARIO, "from 1 s after SERVING again", after.summary());
    figure(
        SCENARIO,
        "connection attempts/s logged from restart to SERVING",
        format!(
            "{:.1} ({logged} in {logged_secs:.1} s)",
            logged as f64 / logged_secs
        ),
    );
    figure(SCENARIO, "pg_ctl start (crash recovery) ms", recovery_ms);
    figure(SCENARIO, "SERVING again after start ms", serving_ms);

    assert_eq!(
        before.failed(),
        0,
        "before the outage: {}",
        before.summary()
    );
    during.assert_failed_only_unavailable("during the outage");
    assert!(after.len() > 0, "calls were made after recovery");
    assert_eq!(after.failed(), 0, "after recovery: {}", after.summary());
    service.stop().await;
}
