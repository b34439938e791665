//! One row locked by another session, and CreateOrder calls for it with
//! short deadlines: the calls end at their deadline, and so must their work.

use std::time::Duration;

use datagate::proto::v1 as pb;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{
    Postgres, Service, figure,
    service::{arrange_catalog, one_unit},
};

const SCENARIO: &str = "locked_row";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_row_and_short_deadlines_leave_no_backend_waiting_and_readiness_serving() {
    let _serial = crate::support::serial().await;
    // Arrange: the service (production pool size) and a session that holds
    // one inventory row.
    let pg = Postgres::start().await;
    let service = Service::on(&pg, None).await;
    let (user, products) = arrange_catalog(&service, 2, 1_000).await;
    let (locked, other) = (products[0], products[1]);
    let db = pg.pool().await;
    let holder = pg.lock_inventory(&db, locked).await;

    // Readiness is watched throughout.
    let watch = {
        let mut statuses = Vec::new();
        let service_port = service.port;
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let health = tokio::spawn(async move {
            let probe = crate::support::channel(service_port);
            let mut client = tonic_health::pb::health_client::HealthClient::new(probe);
            while !stopped.is_cancelled() {
                let answer = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    }),
                )
                .await;
                statuses.push(match answer {
                    Ok(Ok(r)) => Some(r.into_inner().status()),
                    _ => None,
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            statuses
        });
        (stop, health)
    };

    // Act: 30 CreateOrder for the locked product, 200 ms deadlines, 10 at a time.
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..3 {
        let calls: Vec<_> = (0..10)
            .map(|_| {
                let mut orders = service.orders();
                async move {
                    let mut request = tonic::Request::new(one_unit(user, locked));
                    request.set_timeout(Duration::from_millis(200));
                    match orders.create_order(request).await {
                        Ok(_) => "Ok".to_owned(),
                        Err(s) => format!("{:?}", s.code()),
                    }
                }
            })
            .collect();
        for code in futures_util::future::join_all(calls).await {
            *codes.entry(code).or_default() += 1;
        }
    }
    // Give cancellation its promised 100 ms, and some.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = pg.datagate_lock_waiters(&db).await;

    // Unrelated calls: a read and an order for another product.
    let started = std::time::Instant::now();
    let read = service
        .users()
        .get_user(pb::GetUserRequest {
            id: user,
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|s| s.code());
    let other_order = service
        .orders()
        .create_order(one_unit(user, other))
        .await
        .map(|_| ())
        .map_err(|s| s.code());
    let unrelated_ms = started.elapsed().as_secs_f64() * 1e3;
    tokio::time::sleep(Duration::from_secs(3)).await;
    watch.0.cancel();
    let statuses = watch.1.await.unwrap();
    holder.rollback().await.unwrap();

    figure(SCENARIO, "codes of the 30 calls", format!("{codes:?}"));
    figure(
        SCENARIO,
        "datagate backends waiting on a lock after",
        waiting,
    );
    figure(
        SCENARIO,
        "unrelated GetUser, CreateOrder",
        format!("{read:?}, {other_order:?} in {unrelated_ms:.0} ms"),
    );
    let not_serving = statuses
        .iter()
        .filter(|s| **s != Some(ServingStatus::Serving))
        .count();
    figure(
        SCENARIO,
        "health checks not SERVING",
        format!("{not_serving} of {}", statuses.len()),
    );

    // Assert.
    // The server answers DEADLINE_EXCEEDED; the client's own timer, racing
    // it, may end the call first as CANCELLED.
    let ended = codes.get("DeadlineExceeded").unwrap_or(&0) + codes.get("Cancelled").unwrap_or(&0);
    assert_eq!(
        ended, 30,
        "every locked call ends at its deadline: {codes:?}"
    );
    assert_eq!(
        waiting, 0,
        "no datagate backend is left waiting on the lock"
    );
    assert_eq!(read, Ok(()), "an unrelated read succeeds");
    assert_eq!(other_order, Ok(()), "an order for another product succeeds");
    assert_eq!(not_serving, 0, "readiness stays SERVING: {statuses:?}");
    service.stop().await;
}
