//! Idempotency keys expire: the sweep deletes keys older than the retention,
//! in batches, and keeps the younger ones, whose replays still answer the
//! first response; keys are per caller, so two callers with one request id
//! get an order each.

use std::time::Duration;

use chrono::Utc;
use datagate::proto::v1 as pb;
use datagate::{
    config::IdempotencySettings,
    domain::{idempotency::KeySweeper, write::Writes},
};

use crate::support::{TestApp, api_test, unique};

/// An app whose own background sweep is off, so that only the test sweeps.
async fn app() -> TestApp {
    TestApp::spawn_with(|s| s.idempotency.sweep_interval = Duration::ZERO).await
}

fn sweeper(app: &TestApp, batch: i64) -> KeySweeper {
    KeySweeper::new(
        Writes::new(app.db.clone(), datagate::cache::Cache::disabled()),
        IdempotencySettings {
            retention: Duration::from_secs(24 * 3600),
            sweep_interval: Duration::ZERO,
            sweep_batch: batch,
        },
    )
}

/// `CreateOrder` for one unit of `product_id` as the admin.
async fn order(app: &TestApp, user_id: i64, product_id: i64, request_id: &str) -> pb::Order {
    order_as(app, &app.token, user_id, product_id, request_id).await
}

async fn keys(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar("SELECT key FROM idempotency_keys ORDER BY key")
        .fetch_all(&app.db)
        .await
        .unwrap()
}

/// Makes the key look `hours` old.
async fn age(app: &TestApp, key: &str, hours: i32) {
    sqlx::query(
        "UPDATE idempotency_keys SET created_at = now() - make_interval(hours => $2) WHERE key = $1",
    )
    .bind(key)
    .bind(hours)
    .execute(&app.db)
    .await
    .unwrap();
}

#[api_test]
async fn keys_past_the_retention_are_swept_and_younger_ones_still_replay() {
    let app = app().await;
    let (email, username) = unique("sweep");
    let user = app.create_user(&email, &username).await;
    let product = app.create_product(100, 10).await;
    let first_old = order(&app, user.id, product.id, "old-key").await;
    let first_young = order(&app, user.id, product.id, "young-key").await;
    age(&app, "old-key", 25).await;
    age(&app, "young-key", 23).await;

    let deleted = sweeper(&app, 1000).sweep(Utc::now()).await.unwrap();

    assert_eq!(deleted, 1);
    assert_eq!(keys(&app).await, ["young-key"]);
    let replay = order(&app, user.id, product.id, "young-key").await;
    assert_eq!(
        replay.id, first_young.id,
        "a key within the retention replays"
    );
    let again = order(&app, user.id, product.id, "old-key").await;
    assert_ne!(again.id, first_old.id, "a swept key is new again");
    assert_eq!(app.inventory_of(product.id).await, 7);
}

#[api_test]
async fn a_sweep_deletes_a_backlog_in_batches() {
    let app = app().await;
    sqlx::query(
        "INSERT INTO idempotency_keys (caller, key, fingerprint, created_at) \
         SELECT 'test', 'k' || n, 'f', now() - interval '2 days' FROM generate_series(1, 25) n",
    )
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (caller, key, fingerprint) VALUES ('test', 'fresh', 'f')",
    )
    .execute(&app.db)
    .await
    .unwrap();

    let deleted = sweeper(&app, 10).sweep(Utc::now()).await.unwrap();

    assert_eq!(deleted, 25, "three batches of at most 10");
    assert_eq!(keys(&app).await, ["fresh"]);
    assert_eq!(sweeper(&app, 10).sweep(Utc::now()).await.unwrap(), 0);
}

/// `CreateOrder` for one unit of `product_id` as the caller of `token`.
async fn order_as(
    app: &TestApp,
    token: &str,
    user_id: i64,
    product_id: i64,
    request_id: &str,
) -> pb::Order {
    pb::order_service_client::OrderServiceClient::with_interceptor(
        app.channel().await,
        crate::support::Bearer(Some(token.into())),
    )
    .create_order(pb::CreateOrderRequest {
        user_id,
        items: vec![pb::OrderLine {
            product_id,
            quantity: 1,
        }],
        request_id: request_id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

#[api_test]
async fn two_callers_with_one_request_id_do_not_share_a_response() {
    let app = app().await;
    let (email, username) = unique("twin");
    let user = app.create_user(&email, &username).await;
    let product = app.create_product(100, 10).await;
    let request_id = "checkout-7f3a";

    let admins = order(&app, user.id, product.id, request_id).await;
    let writers = order_as(&app, &app.writer_token, user.id, product.id, request_id).await;
    assert_ne!(
        admins.id, writers.id,
        "the writer's call made its own order"
    );
    assert_eq!(
        app.inventory_of(product.id).await,
        8,
        "two orders, two units"
    );

    // Each caller's retry replays its own first response.
    let admins_retry = order(&app, user.id, product.id, request_id).await;
    let writers_retry = order_as(&app, &app.writer_token, user.id, product.id, request_id).await;
    assert_eq!(admins_retry, admins);
    assert_eq!(writers_retry, writers);
    assert_eq!(
        app.inventory_of(product.id).await,
        8,
        "replays take nothing"
    );

    // The audit log names each order's caller.
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT actor FROM audit_log \
         WHERE table_name = 'orders' AND action = 'insert' ORDER BY record_id",
    )
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(actors, ["test-admin", "test-writer"]);
}
