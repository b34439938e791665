//! A caller that gives up mid-statement (RST_STREAM): the statement it
//! started must stop waiting in PostgreSQL, and the service keep serving.
//! A write is cancelled by its backend's pid; a read's connection is closed
//! and PostgreSQL aborts the statement at its next client check.

use std::time::Duration;

use datagate::proto::v1 as pb;
use sqlx::PgPool;
use tokio::task::JoinHandle;

use crate::support::{
    Postgres, Service, figure,
    service::{arrange_catalog, one_unit},
    wait_until,
};

const SCENARIO: &str = "client_cancel";

/// Waits until `call` waits on a lock, aborts it (the caller cancels:
/// dropping the call resets its stream), and returns how many datagate
/// backends still wait 2 s later (0 as soon as none does), printing how
/// long that took as `what`.
async fn cancel_when_waiting<T>(
    pg: &Postgres,
    db: &PgPool,
    call: JoinHandle<T>,
    what: &str,
) -> i64 {
    wait_until(
        "the call's statement waits on the lock",
        Duration::from_secs(10),
        async || pg.datagate_lock_waiters(db).await == 1,
    )
    .await;
    call.abort();
    let cancelled = std::time::Instant::now();
    let mut waiting = 1;
    while cancelled.elapsed() < Duration::from_secs(2) {
        waiting = pg.datagate_lock_waiters(db).await;
        if waiting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    figure(
        SCENARIO,
        &format!("{what}: backend still waiting 2 s after the cancel"),
        waiting,
    );
    if waiting == 0 {
        figure(
            SCENARIO,
            &format!("{what}: ms until it stopped"),
            cancelled.elapsed().as_millis(),
        );
    }
    waiting
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_stops_its_statement_in_postgres() {
    let _serial = crate::support::serial().await;
    let pg = Postgres::start().await;
    let service = Service::on(&pg, None).await;
    let (user, products) = arrange_catalog(&service, 1, 100).await;
    let product = products[0];
    let db = pg.pool().await;
    let holder = pg.lock_inventory(&db, product).await;

    // A call without a deadline, blocked on the lock.
    let mut orders = service.orders();
    let call = tokio::spawn(async move { orders.create_order(one_unit(user, product)).await });
    let waiting = cancel_when_waiting(&pg, &db, call, "write").await;
    holder.rollback().await.unwrap();
    let stock: i32 = sqlx::query_scalar("SELECT quantity FROM inventory WHERE product_id = $1")
        .bind(product)
        .fetch_one(&db)
        .await
        .unwrap();

    assert_eq!(waiting, 0, "the cancelled call's statement stopped waiting");
    assert_eq!(stock, 100, "the cancelled order took no stock");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_read_stops_its_statement_in_postgres() {
    let _serial = crate::support::serial().await;
    let pg = Postgres::start().await;
    // No Redis: GetUser reads PostgreSQL.
    let service = Service::on(&pg, None).await;
    let (user, _) = arrange_catalog(&service, 0, 0).await;
    let db = pg.pool().await;
    // Reads wait for nothing but a lock that conflicts with ACCESS SHARE.
    let mut holder = db.begin().await.unwrap();
    sqlx::query("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();

    let mut users = service.users();
    let call = tokio::spawn(async move {
        users
            .get_user(pb::GetUserRequest {
                id: user,
                ..Default::default()
            })
            .await
    });
    let waiting = cancel_when_waiting(&pg, &db, call, "read").await;
    holder.rollback().await.unwrap();

    // The service reads normally afterwards: its pool replaced the
    // closed connection.
    let mut users = service.users();
    for _ in 0..3 {
        users
            .get_user(pb::GetUserRequest {
                id: user,
                ..Default::default()
            })
            .await
            .expect("reads succeed after the cancel");
    }
    assert_eq!(waiting, 0, "the cancelled read's statement stopped waiting");
    service.stop().await;
}
