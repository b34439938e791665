//! A call's PostgreSQL work that fails for a transient reason is done again
//! inside the call: a read whose backend is terminated under it, and a
//! write whose transaction a deadlock rolled back. Each call answers OK,
//! its own log lines show the retry, and `call_retries_total` moved.

use std::time::Duration;

use datagate::proto::v1 as pb;
use secrecy::ExposeSecret as _;
use sqlx::{Connection as _, PgConnection};

use crate::support::{
    TestApp, api_test, app_backend_waiting_for_lock,
    observe::{Logs, wait_until, with_request_id},
    unique,
};

const RETRIED: [(&str, &str); 1] = [("outcome", "retried")];

/// Whether the call's lines hold a retry of a failure whose text names
/// `reason`.
fn retried_after(lines: &[serde_json::Value], reason: &str) -> bool {
    lines.iter().any(|l| {
        l["message"] == "transient database failure; retrying"
            && l["error"].as_str().is_some_and(|e| e.contains(reason))
    })
}

#[api_test]
async fn a_read_whose_backend_is_terminated_mid_statement_is_retried_and_answers() {
    // Arrange: a user, and the users table locked by a session of the
    // test's own, so that the call's read waits there until terminated.
    let app = TestApp::spawn().await;
    let (email, username) = unique("terminated");
    let user = app.create_user(&email, &username).await;
    let retried_before = app.metric("call_retries_total", &RETRIED).await;
    let logs = Logs::capture();
    let mut locker = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();

    // Act: ListUsers waits for the lock; its backend is terminated (57P01,
    // as in a server shutdown) and gone before the lock is released.
    let (request, request_id) = with_request_id(pb::ListUsersRequest::default());
    let mut users = app.users().await;
    let call = tokio::spawn(async move { users.list_users(request).await });
    let pid = app_backend_waiting_for_lock(&app.db).await;
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert!(terminated, "backend {pid} was signalled");
    wait_until(
        "the terminated backend is gone",
        Duration::from_secs(10),
        || async {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
                    .bind(pid)
                    .fetch_one(&app.db)
                    .await
                    .unwrap();
            left == 0
        },
    )
    .await;
    locker.rollback().await.unwrap();

    // Assert: the call answers, after a retry of its own.
    let page = call
        .await
        .unwrap()
        .expect("the read is retried on a fresh connection")
        .into_inner();
    assert_eq!(
        page.users.iter().map(|u| u.id).collect::<Vec<_>>(),
        vec![user.id]
    );
    let lines = logs.of_finished_request(&request_id).await;
    assert!(
        retried_after(&lines, "DEPENDENCY_UNAVAILABLE"),
        "the call's lines show the retry: {lines:#?}"
    );
    let retried_after_call = app.metric("call_retries_total", &RETRIED).await;
    assert!(
        retried_after_call > retried_before,
        "call_retries_total{{outcome=\"retried\"}} {retried_before} -> {retried_after_call}"
    );
}

#[api_test]
async fn a_write_rolled_back_by_a_deadlock_is_retried_whole_and_creates_one_order() {
    // Arrange: a session of the test's own holds the product's inventory
    // row. The call's backend will have waited longer, so its deadlock
    // check runs first and its transaction is the one aborted; a long
    // timeout here (where the role may set it) only widens that gap.
    let app = TestApp::spawn().await;
    let (email, username) = unique("deadlock");
    let user = app.create_user(&email, &username).await;
    let product = app.create_product(1000, 10).await;
    let retried_before = app.metric("call_retries_total", &RETRIED).await;
    let logs = Logs::capture();
    let mut session = PgConnection::connect(app.settings.database.url.expose_secret())
        .await
        .unwrap();
    let _ = sqlx::query("SET deadlock_timeout = '30s'")
        .execute(&mut session)
        .await;
    let mut locker = session.begin().await.unwrap();
    sqlx::query("SELECT quantity FROM inventory WHERE product_id = $1 FOR UPDATE")
        .bind(product.id)
        .execute(&mut *locker)
        .await
        .unwrap();

    // Act: CreateOrder locks the user (FOR SHARE) and waits for the
    // inventory row; then the session asks for the user row: a deadlock,
    // which PostgreSQL ends by rolling the call's transaction back (40P01).
    let (request, request_id) = with_request_id(pb::CreateOrderRequest {
        user_id: user.id,
        items: vec![pb::OrderLine {
            product_id: product.id,
            quantity: 1,
        }],
        request_id: String::new(),
    });
    let mut orders = app.orders().await;
    let call = tokio::spawn(async move { orders.create_order(request).await });
    app_backend_waiting_for_lock(&app.db).await;
    sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR UPDATE")
        .bind(user.id)
        .execute(&mut *locker)
        .await
        .expect("the call's transaction, not this session's, is the deadlock's victim");
    locker.commit().await.unwrap();
    session.close().await.unwrap();

    // Assert: the order exists once, its stock taken once, after a retry
    // of the whole transaction.
    let order = call
        .await
        .unwrap()
        .expect("the rolled-back write is retried whole")
        .into_inner();
    assert_eq!(order.items.len(), 1);
    let orders_of_user: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE user_id = $1")
        .bind(user.id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(orders_of_user, 1);
    assert_eq!(
        app.inventory_of(product.id).await,
        9,
        "the stock is taken once"
    );
    let lines = logs.of_finished_request(&request_id).await;
    assert!(
        retried_after(&lines, "TRANSACTION_CONFLICT"),
        "the call's lines show the retry: {lines:#?}"
    );
    let retried_after_call = app.metric("call_retries_total", &RETRIED).await;
    assert!(
        retried_after_call > retried_before,
        "call_retries_total{{outcome=\"retried\"}} {retried_before} -> {retried_after_call}"
    );
}
