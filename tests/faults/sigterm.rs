//! SIGTERM to the real binary under load: every call in flight finishes,
//! and the process exits 0. Callers stop starting calls when the signal is
//! sent (as they would once readiness drops); the service keeps accepting
//! for `shutdown_readiness_delay` (500 ms here, as behind a load balancer),
//! so a call sent just before the signal is in flight, not refused.

use std::time::{Duration, Instant};

use datagate::proto::v1 as pb;

use crate::support::{Deps, Load, Postgres, Redis, Service, figure, service::arrange_catalog};

const SCENARIO: &str = "sigterm";
const CALLERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_fails_no_in_flight_call_and_exits_zero() {
    let _serial = crate::support::serial().await;
    let pg = Postgres::start().await;
    let redis = Redis::start().await;
    let (url, redis_url) = (pg.url(), redis.url());
    let mut service = Service::binary(Deps {
        database_url: &url,
        redis_url: Some(&redis_url),
        overrides: &[("server.shutdown_readiness_delay", "500ms")],
    })
    .await;
    let (user, products) = arrange_catalog(&service, 4, 1_000_000).await;
    let (users, orders) = (service.users(), service.orders());
    let load = Load::start(CALLERS, Duration::from_secs(60), move |caller, n| {
        let (mut users, mut orders) = (users.clone(), orders.clone());
        let product = products[caller % products.len()];
        async move {
            if n % 2 == 0 {
                users
                    .get_user(pb::GetUserRequest { id: user })
                    .await
                    .map(|_| ())
            } else {
                orders
                    .create_order(pb::CreateOrderRequest {
                        user_id: user,
                        items: vec![pb::OrderLine {
                            product_id: product,
                            quantity: 1,
                        }],
                        request_id: String::new(),
                    })
                    .await
                    .map(|_| ())
            }
        }
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
