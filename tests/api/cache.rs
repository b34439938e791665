//! The Redis cache against a real Redis: hits, invalidation on every write
//! path, replicas, stampedes, Redis failures, and namespace isolation; and
//! against a real Redis Cluster: hash-tagged keys, per-slot fills and
//! invalidations, the search family, and flushing every primary.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use datagate::{
    cache::{Cache, Entity},
    config::{RedisMode, Settings},
    proto::v1 as pb,
};
use prost_types::FieldMask;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{
    TestApp, api_test, assert_error, health_of,
    redis::{OwnCluster, OwnRedis, redis_cluster_connection, redis_cluster_urls, redis_url},
    unique,
};

fn mask(path: &str) -> Option<FieldMask> {
    Some(FieldMask {
        paths: vec![path.to_owned()],
    })
}

async fn get_user(app: &TestApp, id: i64) -> Result<pb::User, tonic::Status> {
    app.users()
        .await
        .get_user(pb::GetUserRequest {
            id,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn get_product(app: &TestApp, id: i64) -> pb::Product {
    app.catalog()
        .await
        .get_product(pb::GetProductRequest {
            id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Changes a row behind the service's back: only a cache miss can see it.
async fn sneak(app: &TestApp, sql: &str, id: i64) {
    sqlx::query(sql).bind(id).execute(&app.db).await.unwrap();
}

#[api_test]
async fn a_read_after_a_miss_is_served_from_the_cache() {
    let app = TestApp::spawn().await;
    let (email, username) = unique("cached");
    let user = app.create_user(&email, &username).await;
    let counters = async || {
        let scrape = app.metrics().await;
        [
            "cache_hits_total",
            "cache_misses_total",
            "cache_fills_total",
        ]
        .map(|name| crate::support::observe::series(&scrape, name, &[("entity", "user")]))
    };
    let before = counters().await;

    assert_eq!(get_user(&app, user.id).await.unwrap(), user);
    let stored = app
        .redis_get(&app.cache_key("user", user.id))
        .await
        .expect("filled");
    assert_eq!(stored[0], b'V');
    sneak(
        &app,
        "UPDATE users SET display_name = 'changed behind the cache' WHERE id = $1",
        user.id,
    )
    .await;
    assert_eq!(
        get_user(&app, user.id).await.unwrap().display_name,
        user.display_name,
        "the second read is a hit"
    );

    // One miss, one fill, one hit. The counters are process-wide (other
    // tests only add to them); the gauges are this app's, set as it is
    // scraped.
    let after = counters().await;
    for (name, (after, before)) in ["hits", "misses", "fills"]
        .iter()
        .zip(after.iter().zip(before))
    {
        assert!(after - before >= 1.0, "{name}: {before} -> {after}");
    }
    // Gauges are process-wide too: another app's scrape may set one between
    // this app's setting and rendering it, so poll instead of trusting one.
    crate::support::observe::wait_until("a hit rate of 0.5", Duration::from_secs(5), async || {
        app.metric("cache_hit_rate", &[("entity", "user")]).await == 0.5
    })
    .await;
    let metrics = app.metrics().await;
    let gauge = |name, labels| crate::support::observe::series(&metrics, name, labels);
    assert_eq!(
        gauge("connection_pool_max", &[("pool", "redis")]),
        app.settings.redis.pool_size as f64
    );
    let usage = gauge("connection_pool_usage", &[("pool", "redis")]);
    assert!((0.0..=1.0).contains(&usage), "{usage}");
}

#[api_test]
async fn a_not_found_is_cached_briefly_and_a_create_clears_it() {
    let app = TestApp::spawn().await;
    let next_id: i64 = sqlx::query_scalar("SELECT COALESCE(max(id), 0) + 1 FROM users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_error(
        &get_user(&app, next_id).await.unwrap_err(),
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    assert_eq!(
        app.redis_get(&app.cache_key("user", next_id))
            .await
            .as_deref(),
        Some(&b"N"[..])
    );

    let (email, username) = unique("fresh");
    let created = app.create_user(&email, &username).await;
    assert_eq!(created.id, next_id);
    assert_eq!(
        get_user(&app, next_id).await.unwrap().id,
        next_id,
        "not a stale NOT_FOUND"
    );
}

/// The value of one counter series in a `/metrics` scrape (0 when absent:
/// the recorder is process-wide, so tests compare before and after).
fn counter(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Writes a raw value into the app's (single) Redis.
async fn redis_set(key: &str, value: &[u8]) {
    let client = deadpool_redis::redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = deadpool_redis::redis::AsyncCommands::set(&mut conn, key, value)
        .await
        .unwrap();
}

#[api_test]
async fn a_cached_value_that_no_longer_decodes_is_a_miss_read_from_postgres_and_refilled() {
    let app = TestApp::spawn().await;
    let failures = r#"cache_decode_failures_total{entity="user"}"#;
    let mut users = Vec::new();
    for _ in 0..2 {
        let (email, username) = unique("undecodable");
        users.push(app.create_user(&email, &username).await);
    }
    // A `V` payload no build can decode (a varint that never ends), as a
    // type that changed shape without a format bump would leave.
    let junk = b"V\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff";
    for user in &users {
        redis_set(&app.cache_key("user", user.id), junk).await;
    }
    let before = counter(&app.metrics().await, failures);

    assert_eq!(
        get_user(&app, users[0].id).await.expect("not NOT_FOUND"),
        users[0]
    );
    let batch = app
        .users()
        .await
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![users[1].id],
            skip_missing: false,
        })
        .await
        .expect("not NOT_FOUND")
        .into_inner();
    assert_eq!(batch.users, std::slice::from_ref(&users[1]));

    assert!(
        counter(&app.metrics().await, failures) >= before + 2.0,
        "{failures} counts both"
    );
    for user in &users {
        let refilled = app
            .redis_get(&app.cache_key("user", user.id))
            .await
            .expect("refilled");
        assert_eq!(refilled[0], b'V');
        assert_ne!(refilled, junk, "the junk is replaced");
    }
    sneak(
        &app,
        "UPDATE users SET display_name = 'changed behind the cache' WHERE id = $1",
        users[0].id,
    )
    .await;
    assert_eq!(
        get_user(&app, users[0].id).await.unwrap().display_name,
        users[0].display_name,
        "the refilled value is a hit"
    );
}

#[api_test]
async fn every_user_write_invalidates_the_cached_user() {
    let app = TestApp::spawn().await;
    let (email, username) = unique("writer");
    let user = app.create_user(&email, &username).await;
    get_user(&app, user.id).await.unwrap();

    let updated = app
        .users()
        .await
        .update_user(pb::UpdateUserRequest {
            id: user.id,
            version: user.version,
            user: Some(pb::UserPatch {
                display_name: "after update".into(),
                ..Default::default()
            }),
            update_mask: mask("display_name"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(get_user(&app, user.id).await.unwrap(), updated);

    let mut users = app.users().await;
    let batch = users
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![user.id],
            skip_missing: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.users, std::slice::from_ref(&updated));

    users
        .delete_user(pb::DeleteUserRequest {
            id: user.id,
            version: 0,
        })
        .await
        .unwrap();
    assert_error(
        &get_user(&app, user.id).await.unwrap_err(),
        Code::NotFound,
        "USER_NOT_FOUND",
    );
    let status = users
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![user.id],
            skip_missing: false,
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "USER_NOT_FOUND");
}

#[api_test]
async fn batch_reads_mix_hits_and_misses_and_fill_the_misses() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let (email, username) = unique("batch");
        ids.push(app.create_user(&email, &username).await.id);
    }
    get_user(&app, ids[0]).await.unwrap();
    get_user(&app, ids[2]).await.unwrap();
    let response = app
        .users()
        .await
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![ids[3], ids[2], ids[1], ids[0], 999_999],
            skip_missing: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        response.users.iter().map(|u| u.id).collect::<Vec<_>>(),
        [ids[3], ids[2], ids[1], ids[0]]
    );
    assert_eq!(response.missing_ids, [999_999]);
    for id in &ids {
        assert!(
            app.redis_get(&app.cache_key("user", *id)).await.is_some(),
            "user {id} cached"
        );
    }
    assert_eq!(
        app.redis_get(&app.cache_key("user", 999_999))
            .await
            .as_deref(),
        Some(&b"N"[..])
    );
}

#[api_test]
async fn product_and_order_writes_invalidate_prices_stock_and_status() {
    let app = TestApp::spawn().await;
    let (email, username) = unique("shopper");
    let user = app.create_user(&email, &username).await;
    let product = app.create_product(1000, 10).await;
    let mut catalog = app.catalog().await;
    let mut orders = app.orders().await;
    get_product(&app, product.id).await;

    let repriced = catalog
        .update_product(pb::UpdateProductRequest {
            id: product.id,
            version: product.version,
            product: Some(pb::ProductPatch {
                price_cents: 1200,
                ..Default::default()
            }),
            update_mask: mask("price_cents"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        get_product(&app, product.id).await.price_cents,
        1200,
        "price change"
    );

    catalog
        .adjust_inventory(pb::AdjustInventoryRequest {
            product_id: product.id,
            delta: 5,
        })
        .await
        .unwrap();
    assert_eq!(
        get_product(&app, product.id).await.inventory,
        15,
        "inventory change"
    );

    let order = app.create_order(user.id, product.id, 3).await;
    assert_eq!(
        get_product(&app, product.id).await.inventory,
        12,
        "an order takes stock"
    );
    let get_order = |id| pb::GetOrderRequest { id };
    assert_eq!(
        orders
            .get_order(get_order(order.id))
            .await
            .unwrap()
            .into_inner()
            .status(),
        pb::OrderStatus::Pending
    );

    orders
        .update_order_status(pb::UpdateOrderStatusRequest {
            id: order.id,
            status: pb::OrderStatus::Cancelled.into(),
            version: 0,
        })
        .await
        .unwrap();
    let cancelled = orders
        .get_order(get_order(order.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cancelled.status(),
        pb::OrderStatus::Cancelled,
        "status change"
    );
    assert_eq!(
        get_product(&app, product.id).await.inventory,
        15,
        "cancel returns stock"
    );

    // Cached orders hold no product summaries: a later price change shows.
    catalog
        .update_product(pb::UpdateProductRequest {
            id: product.id,
            version: repriced.version,
            product: Some(pb::ProductPatch {
                price_cents: 1500,
                ..Default::default()
            }),
            update_mask: mask("price_cents"),
        })
        .await
        .unwrap();
    let reread = orders
        .get_order(get_order(order.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reread.items[0].product.as_ref().unwrap().price_cents, 1500);
    assert_eq!(
        reread.items[0].unit_price_cents, 1200,
        "the price paid stays"
    );
}

#[api_test]
async fn a_write_on_one_replica_is_read_on_another() {
    let first = TestApp::spawn().await;
    let second = first.spawn_replica().await;
    let (email, username) = unique("replica");
    let user = first.create_user(&email, &username).await;
    get_user(&first, user.id).await.unwrap();
    get_user(&second, user.id).await.unwrap();

    let updated = second
        .users()
        .await
        .update_user(pb::UpdateUserRequest {
            id: user.id,
            version: user.version,
            user: Some(pb::UserPatch {
                display_name: "written on the second".into(),
                ..Default::default()
            }),
            update_mask: mask("display_name"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(get_user(&first, user.id).await.unwrap(), updated);
}

#[api_test]
async fn namespaces_keep_apps_on_one_redis_apart() {
    let a = TestApp::spawn().await;
    let b = TestApp::spawn().await;
    let user_a = a.create_user("a@example.com", "usera").await;
    let user_b = b.create_user("b@example.com", "userb").await;
    assert_eq!(
        user_a.id, user_b.id,
        "fresh databases hand out the same ids"
    );
    assert_eq!(
        get_user(&a, user_a.id).await.unwrap().email,
        "a@example.com"
    );
    assert_eq!(
        get_user(&b, user_b.id).await.unwrap().email,
        "b@example.com"
    );
    assert_eq!(
        get_user(&a, user_a.id).await.unwrap().email,
        "a@example.com"
    );
}

fn cache_settings(prefix: &str) -> Settings {
    let mut settings =
        Settings::load_with_overrides(None, &[("database.url", "postgres://unused/unused")])
            .unwrap();
    settings.redis.url = redis_url().into();
    settings.redis.key_prefix = prefix.to_owned();
    settings.redis.command_timeout = Duration::from_secs(2);
    settings.redis.wait_timeout = Duration::from_secs(2);
    settings
}

#[api_test]
async fn a_read_that_loaded_before_a_write_cannot_put_the_old_value_back() {
    let prefix = format!("dgtest-{}", uuid::Uuid::new_v4().simple());
    let cache = Cache::new(&cache_settings(&prefix).redis).unwrap();

    // The reader misses, loads the old row, and, before it fills, a writer
    // commits and invalidates the key.
    let stale = cache
        .get_or_load(Entity::User, 11, || async {
            cache.invalidate(&[(Entity::User, 11)]).await;
            Ok(Some("old row".to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(
        stale.as_deref(),
        Some("old row"),
        "the reader itself answers what it read"
    );

    let key = format!("{prefix}:v1:user:11");
    let client = deadpool_redis::redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let cached: Option<Vec<u8>> = deadpool_redis::redis::AsyncCommands::get(&mut conn, &key)
        .await
        .unwrap();
    assert_eq!(cached, None, "the fill was refused");

    let fresh = cache
        .get_or_load(Entity::User, 11, || async {
            Ok(Some("new row".to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(
        fresh.as_deref(),
        Some("new row"),
        "the next reader loads the new row"
    );
    let cached: Option<Vec<u8>> = deadpool_redis::redis::AsyncCommands::get(&mut conn, &key)
        .await
        .unwrap();
    assert!(cached.is_some(), "and fills it");
}

#[api_test]
async fn a_hundred_concurrent_misses_on_one_key_load_it_once_across_two_replicas() {
    let prefix = format!("dgtest-{}", uuid::Uuid::new_v4().simple());
    let settings = cache_settings(&prefix);
    let replicas = [
        Cache::new(&settings.redis).unwrap(),
        Cache::new(&settings.redis).unwrap(),
    ];
    let loads = Arc::new(AtomicUsize::new(0));
    let asked = Arc::new(AtomicUsize::new(0));

    let mut readers = Vec::new();
    for i in 0..100 {
        let cache = replicas[i % 2].clone();
        let (loads, asked) = (loads.clone(), asked.clone());
        readers.push(tokio::spawn(async move {
            asked.fetch_add(1, Ordering::SeqCst);
            cache
                .get_or_load(Entity::User, 7, || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    // Held until every reader has asked, and a while for
                    // their lookups to land (a window: what a reader does
                    // inside the cache cannot be observed from here).
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    while asked.load(Ordering::SeqCst) < 100 {
                        assert!(std::time::Instant::now() < deadline, "every reader asks");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Ok(Some("loaded once".to_owned()))
                })
                .await
        }));
    }
    for reader in readers {
        assert_eq!(
            reader.await.unwrap().unwrap().as_deref(),
            Some("loaded once")
        );
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "one database load for 100 misses"
    );
}

#[api_test]
async fn empty_batches_never_open_the_breaker_and_caching_keeps_working() {
    let app = TestApp::spawn_with(|s| {
        s.redis.breaker_failures = 2;
        // Long enough that an opened circuit would still be open below.
        s.redis.breaker_open_for = Duration::from_secs(60);
    })
    .await;
    let (email, username) = unique("empty_batch");
    let user = app.create_user(&email, &username).await;

    let (mut users, mut catalog) = (app.users().await, app.catalog().await);
    for _ in 0..3 * app.settings.redis.breaker_failures {
        let batch = users
            .batch_get_users(pb::BatchGetUsersRequest {
                ids: vec![],
                skip_missing: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(batch.users.is_empty() && batch.missing_ids.is_empty());
        let batch = catalog
            .batch_get_products(pb::BatchGetProductsRequest {
                ids: vec![],
                skip_missing: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(batch.products.is_empty());
    }

    // A miss fills, and the next read is a hit: the circuit is closed.
    assert_eq!(get_user(&app, user.id).await.unwrap(), user);
    assert!(
        app.redis_get(&app.cache_key("user", user.id))
            .await
            .is_some(),
        "filled"
    );
    sneak(
        &app,
        "UPDATE users SET display_name = 'changed behind the cache' WHERE id = $1",
        user.id,
    )
    .await;
    assert_eq!(
        get_user(&app, user.id).await.unwrap().display_name,
        user.display_name,
        "the second read is a hit"
    );
    assert_eq!(
        health_of(&app, "redis", ServingStatus::Serving).await,
        ServingStatus::Serving
    );
}

#[api_test]
async fn a_command_error_is_a_miss_for_its_call_and_leaves_the_breaker_closed() {
    let prefix = format!("dgtest-{}", uuid::Uuid::new_v4().simple());
    let mut settings = cache_settings(&prefix);
    settings.redis.breaker_failures = 1;
    settings.redis.breaker_open_for = Duration::from_secs(60);
    let cache = Cache::new(&settings.redis).unwrap();

    // Empty batches send nothing.
    for _ in 0..3 {
        let found = cache
            .get_many_or_load(Entity::User, &[], |ids| async move {
                assert!(ids.is_empty());
                Ok(std::collections::HashMap::<i64, String>::new())
            })
            .await
            .unwrap();
        assert!(found.is_empty());
    }
    assert_eq!(
        cache.probe().await,
        Some(true),
        "closed after empty batches"
    );

    // A generation that is not a counter makes the fill script fail with
    // WRONGTYPE: Redis answered, so only this call misses.
    let key = format!("{prefix}:v1:user:5");
    let client = deadpool_redis::redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: u64 = deadpool_redis::redis::AsyncCommands::rpush(&mut conn, format!("{key}:gen"), "x")
        .await
        .unwrap();
    let loaded = cache
        .get_or_load(Entity::User, 5, || async {
            Ok(Some("from postgres".to_owned()))
        })
        .await
        .unwrap();
    assert_eq!(loaded.as_deref(), Some("from postgres"));
    let cached: Option<Vec<u8>> = deadpool_redis::redis::AsyncCommands::get(&mut conn, &key)
        .await
        .unwrap();
    assert_eq!(cached, None, "the fill failed");
    assert_eq!(
        cache.probe().await,
        Some(true),
        "one command error with breaker_failures = 1: still closed"
    );

    // And the cache goes on caching other keys.
    cache
        .get_or_load(Entity::User, 6, || async { Ok(Some("six".to_owned())) })
        .await
        .unwrap();
    let cached: Option<Vec<u8>> =
        deadpool_redis::redis::AsyncCommands::get(&mut conn, format!("{prefix}:v1:user:6"))
            .await
            .unwrap();
    assert!(cached.is_some(), "filled");
}

#[api_test]
async fn reads_and_writes_survive_a_stopped_then_killed_redis_and_caching_resumes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = OwnRedis::start(port).await;
    let app = TestApp::spawn_with(|s| {
        s.redis.url = format!("redis://127.0.0.1:{port}").into();
        // Commands fail only while Redis is frozen, not on a busy machine.
        s.redis.command_timeout = Duration::from_millis(500);
        s.redis.breaker_failures = 2;
        s.redis.breaker_open_for = Duration::from_millis(300);
        // Every timeout counts, however late this busy test process notices it.
        s.redis.breaker_ignore_late_by = Duration::ZERO;
    })
    .await;
    let (email, username) = unique("outage");
    let user = app.create_user(&email, &username).await;
    let key = app.cache_key("user", user.id);
    get_user(&app, user.id).await.unwrap();
    assert!(app.redis_get(&key).await.is_some());
    let rename = |version, name: &str| pb::UpdateUserRequest {
        id: user.id,
        version,
        user: Some(pb::UserPatch {
            display_name: name.into(),
            ..Default::default()
        }),
        update_mask: mask("display_name"),
    };

    // Frozen: commands time out. Reads fall back, writes succeed.
    redis.signal("-STOP").await;
    assert_eq!(
        get_user(&app, user.id).await.unwrap().display_name,
        user.display_name
    );
    let during = app
        .users()
        .await
        .update_user(rename(user.version, "written while frozen"))
        .await;
    let during = during
        .expect("a write never fails because of Redis")
        .into_inner();
    assert_eq!(
        get_user(&app, user.id).await.unwrap().display_name,
        "written while frozen"
    );
    assert_eq!(
        health_of(&app, "redis", ServingStatus::NotServing).await,
        ServingStatus::NotServing
    );
    let mut health = HealthClient::new(app.channel().await);
    let overall = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(
        overall.into_inner().status(),
        ServingStatus::Serving,
        "degraded, not down"
    );

    // Thawed with its old entry: the queued invalidation is replayed before
    // the cache is used, so the old name never comes back.
    redis.signal("-CONT").await;
    for _ in 0..30 {
        assert_eq!(
            get_user(&app, user.id).await.unwrap().display_name,
            "written while frozen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        health_of(&app, "redis", ServingStatus::Serving).await,
        ServingStatus::Serving
    );

    // Killed: reads and writes go on.
    redis.signal("-KILL").await;
    let _ = redis.child.wait().await;
    let after = app
        .users()
        .await
        .update_user(rename(during.version, "written while dead"))
        .await;
    let after = after
        .expect("a write never fails because of Redis")
        .into_inner();
    assert_eq!(
        get_user(&app, user.id).await.unwrap().display_name,
        "written while dead"
    );

    // Back: caching resumes.
    let _redis = OwnRedis::start(port).await;
    let mut cached = None;
    for _ in 0..100 {
        assert_eq!(get_user(&app, user.id).await.unwrap(), after);
        cached = app.redis_get(&key).await;
        if cached.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        cached.map(|v| v[0]),
        Some(b'V'),
        "the entry is cached again"
    );
    assert_eq!(
        health_of(&app, "redis", ServingStatus::Serving).await,
        ServingStatus::Serving
    );
}

// --- Redis Cluster ---------------------------------------------------------

/// The app caching on the shared test cluster, in a namespace of its own.
async fn spawn_on_cluster() -> TestApp {
    TestApp::spawn_with(|s| {
        s.redis.mode = RedisMode::Cluster;
        s.redis.url = redis_cluster_urls().into();
        s.redis.key_prefix = format!("dgtest-{}", uuid::Uuid::new_v4().simple());
        s.redis.command_timeout = Duration::from_secs(2);
        s.redis.wait_timeout = Duration::from_secs(2);
    })
    .await
}

/// The hash slots of `keys` (to show a test spans several).
async fn slots_of(urls: &str, keys: &[String]) -> HashSet<u16> {
    let mut conn = redis_cluster_connection(urls).await;
    let mut slots = HashSet::new();
    for key in keys {
        let slot: u16 = deadpool_redis::redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        slots.insert(slot);
    }
    slots
}

#[api_test]
async fn on_a_cluster_a_read_after_a_miss_is_served_from_the_cache() {
    let app = spawn_on_cluster().await;
    let (email, username) = unique("cluster");
    let user = app.create_user(&email, &username).await;

    assert_eq!(get_user(&app, user.id).await.unwrap(), user);
    let key = app.cache_key("user", user.id);
    assert!(key.contains('{'), "a hash-tagged key: {key}");
    let stored = app.redis_get(&key).await.expect("filled");
    assert_eq!(stored[0], b'V');
    sneak(
        &app,
        "UPDATE users SET display_name = 'changed behind the cache' WHERE id = $1",
        user.id,
    )
    .await;
    assert_eq!(
        get_user(&app, user.id).await.unwrap().display_name,
        user.display_name,
        "the second read is a hit"
    );
}

#[api_test]
async fn on_a_cluster_user_writes_invalidate_and_batch_reads_fill_every_slot() {
    let app = spawn_on_cluster().await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        let (email, username) = unique("cluster_batch");
        ids.push(app.create_user(&email, &username).await.id);
    }
    let keys: Vec<String> = ids.iter().map(|id| app.cache_key("user", *id)).collect();
    assert!(
        slots_of(&redis_cluster_urls(), &keys).await.len() > 1,
        "the batch spans slots"
    );

    // One batch: every miss is filled, each in its own slot.
    let mut users = app.users().await;
    let mut requested = ids.clone();
    requested.push(999_999);
    let batch = users
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: requested,
            skip_missing: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.users.iter().map(|u| u.id).collect::<Vec<_>>(), ids);
    for key in &keys {
        assert_eq!(app.redis_get(key).await.map(|v| v[0]), Some(b'V'), "{key}");
    }
    assert_eq!(
        app.redis_get(&app.cache_key("user", 999_999))
            .await
            .as_deref(),
        Some(&b"N"[..])
    );

    // Writes delete what they change, and bump its generation beside it.
    let user = &batch.users[0];
    let updated = users
        .update_user(pb::UpdateUserRequest {
            id: user.id,
            version: user.version,
            user: Some(pb::UserPatch {
                display_name: "after update".into(),
                ..Default::default()
            }),
            update_mask: mask("display_name"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        app.redis_get(&format!("{}:gen", keys[0])).await.is_some(),
        "the generation sits beside the key"
    );
    assert_eq!(get_user(&app, user.id).await.unwrap(), updated);
    users
        .delete_user(pb::DeleteUserRequest {
            id: user.id,
            version: 0,
        })
        .await
        .unwrap();
    assert_error(
        &get_user(&app, user.id).await.unwrap_err(),
        Code::NotFound,
        "USER_NOT_FOUND",
    );
}

#[api_test]
async fn on_a_cluster_search_pages_are_cached_until_a_product_write() {
    let app = spawn_on_cluster().await;
    let mut catalog = app.catalog().await;
    let search = async |catalog: &mut crate::support::CatalogClient| {
        let page = catalog
            .search_products(pb::SearchProductsRequest {
                query: "lathe".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        page.products.iter().map(|p| p.id).collect::<Vec<_>>()
    };
    let first = catalog
        .create_product(pb::CreateProductRequest {
            sku: format!("L-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            title: "Wood lathe".into(),
            category: "tools".into(),
            price_cents: 30000,
            inventory: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(search(&mut catalog).await, [first.id]);

    // Written behind the service's back: the cached page does not show it.
    sqlx::query(
        "WITH p AS (INSERT INTO products (sku, title, category, price) \
                    VALUES ('SNEAKY-LATHE', 'Metal lathe', 'tools', 10) RETURNING id) \
         INSERT INTO inventory (product_id, quantity) SELECT id, 1 FROM p",
    )
    .execute(&app.db)
    .await
    .unwrap();
    assert_eq!(
        search(&mut catalog).await,
        [first.id],
        "served from the cache"
    );

    // A product write through the service bumps the family's generation.
    catalog
        .update_product(pb::UpdateProductRequest {
            id: first.id,
            version: first.version,
            product: Some(pb::ProductPatch {
                price_cents: 31000,
                ..Default::default()
            }),
            update_mask: mask("price_cents"),
        })
        .await
        .unwrap();
    assert_eq!(search(&mut catalog).await.len(), 2, "the page is stale");
}

#[api_test]
async fn on_a_cluster_an_overflowed_invalidation_queue_flushes_every_primary() {
    let cluster = OwnCluster::start().await;
    let prefix = format!("dgtest-{}", uuid::Uuid::new_v4().simple());
    let mut settings = cache_settings(&prefix);
    settings.redis.mode = RedisMode::Cluster;
    settings.redis.url = cluster.urls.clone().into();
    settings.redis.command_timeout = Duration::from_secs(1);
    settings.redis.breaker_failures = 1;
    settings.redis.breaker_open_for = Duration::from_millis(200);
    let cache = Cache::new(&settings.redis).unwrap();
    let ids: Vec<i64> = (1..=30).collect();
    let keys: Vec<String> = ids
        .iter()
        .map(|id| format!("{prefix}:v1:{{user:{id}}}"))
        .collect();
    for id in &ids {
        cache
            .get_or_load(Entity::User, *id, || async {
                Ok(Some(format!("user {id}")))
            })
            .await
            .unwrap();
    }
    let mut conn = redis_cluster_connection(&cluster.urls).await;
    let cached = async |conn: &mut deadpool_redis::cluster::ClusterConnection| {
        let values: Vec<Option<Vec<u8>>> = deadpool_redis::redis::cmd("MGET")
            .arg(&keys)
            .query_async(conn)
            .await
            .unwrap();
        values.iter().flatten().count()
    };
    assert_eq!(cached(&mut conn).await, ids.len(), "all filled");
    let other = "dgtest-other:v1:{user:1}";
    let () = deadpool_redis::redis::cmd("SET")
        .arg(other)
        .arg("another namespace")
        .query_async(&mut conn)
        .await
        .unwrap();

    // Frozen: more invalidations than the queue holds.
    for node in &cluster.nodes {
        node.signal("-STOP").await;
    }
    let many: Vec<(Entity, i64)> = (1_000..12_000).map(|id| (Entity::User, id)).collect();
    cache.invalidate(&many).await;
    for node in &cluster.nodes {
        node.signal("-CONT").await;
    }

    // Thawed: the namespace is flushed on every primary before Redis is used.
    let mut usable = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        usable = cache.probe().await == Some(true);
        if usable {
            break;
        }
    }
    assert!(usable, "the cache is usable again");
    assert_eq!(
        cached(&mut conn).await,
        0,
        "no value survives on any primary"
    );
    let kept: Option<String> = deadpool_redis::redis::AsyncCommands::get(&mut conn, other)
        .await
        .unwrap();
    assert_eq!(kept.as_deref(), Some("another namespace"));
}
