//! A caller that gives up mid-statement (RST_STREAM): the statement it
//! started must stop waiting in PostgreSQL, and its connection come back.

use std::time::Duration;

use crate::support::{
    Postgres, Service, figure,
    service::{arrange_catalog, one_unit},
    wait_until,
};

const SCENARIO: &str = "client_cancel";

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
    wait_until(
        "the call's statement waits on the lock",
        Duration::from_secs(10),
        async || pg.datagate_lock_waiters(&db).await == 1,
    )
    .await;

    // The caller cancels: dropping the call resets its stream.
    call.abort();
    let cancelled = std::time::Instant::now();
    let mut waiting = 1;
    while cancelled.elapsed() < Duration::from_secs(2) {
        waiting = pg.datagate_lock_waiters(&db).await;
        if waiting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    figure(
        SCENARIO,
        "backend still waiting 2 s after the cancel",
        waiting,
    );
    if waiting == 0 {
        figure(
            SCENARIO,
            "ms until it stopped",
            cancelled.elapsed().as_millis(),
        );
    }
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
