//! SIGTERM to the real binary under load: every call in flight finishes,
//! and the process exits 0. Callers stop starting calls when the signal is
//! sent (as they would once readiness drops); the service keeps accepting
//! for `shutdown_readiness_delay` (500 ms here, as behind a load balancer),
//! so a call sent just before the signal is in flight, not refused.

use std::time::{Duration, Instant};

use crate::support::{
    Load, Postgres, Redis, Service, figure,
    service::{arrange_catalog, read_or_order},
};

const SCENARIO: &str = "sigterm";
const CALLERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_fails_no_in_flight_call_and_exits_zero() {
    let _serial = crate::support::serial().await;
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let mut service =
        Service::binary_on(&pg, &redis, &[("server.shutdown_readiness_delay", "500ms")]).await;
    let (user, products) = arrange_catalog(&service, 4, 1_000_000).await;
    let (users, orders) = (service.users(), service.orders());
    let load = Load::start(CALLERS, Duration::from_secs(60), move |caller, n| {
        let product = products[caller % products.len()];
        read_or_order(users.clone(), orders.clone(), user, product, n)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let signalled_at = load.now();
    service.sigterm();
    let signalled = Instant::now();
    let samples = load.finish().await;
    let status = service.wait_exit(Duration::from_secs(30)).await;
    let exit_ms = signalled.elapsed().as_millis();

    let in_flight = samples
        .0
        .iter()
        .filter(|s| s.started < signalled_at && s.started + s.latency > signalled_at)
        .count();
    figure(SCENARIO, "calls", samples.summary());
    figure(SCENARIO, "in flight at SIGTERM", in_flight);
    figure(SCENARIO, "exit after SIGTERM ms", exit_ms);
    figure(SCENARIO, "exit status", format!("{status:?}"));
    assert!(samples.len() > 50, "the load ran: {}", samples.summary());
    assert_eq!(
        samples.failed(),
        0,
        "no in-flight call fails: {}",
        samples.summary()
    );
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        service.log()
    );
}
