//! The caller's deadline reaches PostgreSQL, and a call that ends leaves
//! nothing running there: the locked-row scenario of the fault study, a client
//! cancel mid-statement, a read under a short deadline, and pool waits.

use std::time::{Duration, Instant};

use datagate::{
    cache::{Cache, Entity},
    model::deadline::Deadline,
    proto::v1 as pb,
};
use sqlx::{PgPool, Postgres, Transaction};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt as _;

use crate::support::{RedisProxy, TestApp, api_test, assert_error, unique};

fn order(user_id: i64, product_id: i64) -> pb::CreateOrderRequest {
    pb::CreateOrderRequest {
        user_id,
        items: vec![pb::OrderLine {
            product_id,
            quantity: 1,
        }],
        request_id: String::new(),
    }
}

fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Holds `FOR UPDATE` on the product's inventory row from a connection of
/// the test's own; returns the transaction and its backend's pid.
async fn lock_inventory(db: &PgPool, product_id: i64) -> (Transaction<'static, Postgres>, i32) {
    let mut tx = db.begin().await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT quantity FROM inventory WHERE product_id = $1 FOR UPDATE")
        .bind(product_id)
        .execute(&mut *tx)
        .await
        .unwrap();
    (tx, pid)
}

/// The app's backends (not the test's locking session) waiting on a lock.
async fn backends_waiting_on_locks(db: &PgPool, except: i32) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'datagate' \
           AND wait_event_type = 'Lock' AND pid <> $1",
    )
    .bind(except)
    .fetch_one(db)
    .await
    .unwrap()
}

/// Polls until no app backend waits on a lock; how long that took, or
/// `None` if some still wait after `bound`.
async fn until_none_waiting(db: &PgPool, except: i32, bound: Duration) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if backends_waiting_on_locks(db, except).await == 0 {
            return Some(started.elapsed());
        }
        if started.elapsed() > bound {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn overall_health(app: &TestApp) -> ServingStatus {
    HealthClient::new(app.channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

#[api_test]
async fn a_locked_row_under_short_deadlines_leaves_no_backend_waiting_and_the_rest_answering() {
    // Arrange: a pool small enough that 30 stuck statements would exhaust it.
    let app = TestApp::spawn_with(|s| s.database.max_connections = 5).await;
    let (email, username) = unique("locked");
    let user = app.create_user(&email, &username).await;
    let locked = app.create_product(1000, 100).await;
    let other = app.create_product(1000, 100).await;
    let (locker, locker_pid) = lock_inventory(&app.db, locked.id).await;

    // Act: 30 orders for the locked product, 200 ms deadline each.
    let started = Instant::now();
    let client = app.orders().await;
    let calls: Vec<_> = (0..30)
        .map(|_| {
            let mut client = client.clone();
            let request = order(user.id, locked.id);
            tokio::spawn(async move {
                client
                    .create_order(with_timeout(request, Duration::from_millis(200)))
                    .await
            })
        })
        .collect();
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for call in calls {
        let status = call.await.unwrap().expect_err("the row is locked");
        // The server answers DEADLINE_EXCEEDED 50 ms before the deadline,
        // unless the client's own timer fired first (on a loaded machine),
        // which tonic reports as CANCELLED "Timeout expired".
        let reason = if status.code() == Code::Cancelled {
            assert_eq!(status.message(), "Timeout expired", "{status:?}");
            "client timer".to_owned()
        } else {
            assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
            let reason = status
                .get_error_details()
                .error_info()
                .map(|info| info.reason.clone())
                .unwrap_or_default();
            assert!(
                ["QUERY_TIMEOUT", "DEADLINE_EXCEEDED"].contains(&reason.as_str()),
                "{status:?}"
            );
            reason
        };
        *reasons.entry(reason).or_default() += 1;
    }
    let flood = started.elapsed();

    // Assert: nothing of theirs is left waiting in PostgreSQL ...
    let cleared = until_none_waiting(&app.db, locker_pid, Duration::from_millis(100)).await;
    eprintln!(
        "locked row: 30 calls in {flood:?}, answers {reasons:?}, backends clear after {cleared:?}"
    );
    assert!(
        cleared.is_some(),
        "{} app backends still wait on the lock",
        backends_waiting_on_locks(&app.db, locker_pid).await
    );
    // ... unrelated calls answer at once, while the row is still locked ...
    let unrelated = Instant::now();
    app.users()
        .await
        .get_user(with_timeout(
            pb::GetUserRequest {
                id: user.id,
                ..Default::default()
            },
            Duration::from_secs(2),
        ))
        .await
        .expect("GetUser answers");
    app.orders()
        .await
        .create_order(with_timeout(
            order(user.id, other.id),
            Duration::from_secs(2),
        ))
        .await
        .expect("an order for another product succeeds");
    let unrelated = unrelated.elapsed();
    eprintln!("locked row: GetUser + CreateOrder(other) took {unrelated:?}");
    assert!(unrelated < Duration::from_secs(1), "{unrelated:?}");
    // ... readiness never noticed ...
    assert_eq!(overall_health(&app).await, ServingStatus::Serving);
    // ... and once the lock is gone, the product sells: every failed order
    // rolled back, and the connections went back to the pool healthy.
    locker.rollback().await.unwrap();
    app.orders()
        .await
        .create_order(order(user.id, locked.id))
        .await
        .expect("the product sells once the row is free");
    assert_eq!(app.inventory_of(locked.id).await, 99);
}

#[api_test]
async fn a_call_cancelled_by_its_caller_has_its_statement_cancelled_in_postgres() {
    let app = TestApp::spawn().await;
    let (email, username) = unique("cancel");
    let user = app.create_user(&email, &username).await;
    let product = app.create_product(1000, 10).await;
    let (locker, locker_pid) = lock_inventory(&app.db, product.id).await;

    // A call with a long deadline waits on the lock ...
    let mut orders = app.orders().await;
    let request = order(user.id, product.id);
    let call = tokio::spawn(async move {
        orders
            .create_order(with_timeout(request, Duration::from_secs(20)))
            .await
    });
    let waiting = Instant::now();
    while backends_waiting_on_locks(&app.db, locker_pid).await == 0 {
        assert!(
            waiting.elapsed() < Duration::from_secs(5),
            "the call never reached the lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // ... until its caller drops it (RST_STREAM).
    call.abort();
    let _ = call.await;
    let cleared = until_none_waiting(&app.db, locker_pid, Duration::from_secs(2)).await;
    eprintln!("client cancel: backend clear after {cleared:?}");
    let cleared = cleared.expect("the abandoned statement was cancelled");
    assert!(cleared < Duration::from_millis(500), "{cleared:?}");

    // The transaction rolled back and the connection serves again.
    locker.rollback().await.unwrap();
    assert_eq!(app.inventory_of(product.id).await, 10);
    app.orders()
        .await
        .create_order(order(user.id, product.id))
        .await
        .expect("an order succeeds after the cancel");
}

#[api_test]
async fn a_read_under_a_short_deadline_times_out_in_postgres_as_query_timeout() {
    let app = TestApp::spawn().await;
    let (email, username) = unique("reader");
    let user = app.create_user(&email, &username).await;
    // Uncached reads of users wait for this lock.
    let mut locker = app.db.begin().await.unwrap();
    let locker_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *locker)
        .await
        .unwrap();
    sqlx::query("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();

    let status = app
        .users()
        .await
        .get_user(with_timeout(
            pb::GetUserRequest {
                id: user.id + 1_000,
                ..Default::default()
            },
            Duration::from_millis(500),
        ))
        .await
        .expect_err("the table is locked");

    assert_error(&status, Code::DeadlineExceeded, "QUERY_TIMEOUT");
    assert!(
        until_none_waiting(&app.db, locker_pid, Duration::from_millis(100))
            .await
            .is_some(),
        "the read's statement ended with its timeout"
    );
    locker.rollback().await.unwrap();
}

#[api_test]
async fn a_pool_wait_ends_at_the_deadline_and_a_saturated_pool_within_it_is_unavailable() {
    let app = TestApp::spawn_with(|s| {
        // One for the outbox relay's listener, which keeps it; one for calls.
        s.database.max_connections = 2;
        s.database.acquire_timeout = Duration::from_secs(1);
        // Nothing in the background competes for the calls' connection.
        s.partitions.interval = Duration::ZERO;
        s.analytics.refresh_interval = Duration::ZERO;
        s.idempotency.sweep_interval = Duration::ZERO;
    })
    .await;
    let (email, username) = unique("pool");
    let user = app.create_user(&email, &username).await;
    let product = app.create_product(1000, 10).await;
    let (locker, locker_pid) = lock_inventory(&app.db, product.id).await;
    // The calls' connection waits on the lock for up to 5 s.
    let mut orders = app.orders().await;
    let request = order(user.id, product.id);
    let holder = tokio::spawn(async move {
        orders
            .create_order(with_timeout(request, Duration::from_secs(5)))
            .await
    });
    while backends_waiting_on_locks(&app.db, locker_pid).await == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The caller's deadline (150 ms) ends the wait first: DEADLINE_EXCEEDED.
    let started = Instant::now();
    let status = app
        .users()
        .await
        .get_user(with_timeout(
            pb::GetUserRequest {
                id: user.id + 1_000,
                ..Default::default()
            },
            Duration::from_millis(100),
        ))
        .await
        .expect_err("no connection is free");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_millis(300));
    // The pool's acquire timeout (1 s) ends it within a 3 s deadline:
    // the pool is saturated, UNAVAILABLE.
    let status = app
        .users()
        .await
        .get_user(with_timeout(
            pb::GetUserRequest {
                id: user.id + 1_001,
                ..Default::default()
            },
            Duration::from_secs(3),
        ))
        .await
        .expect_err("no connection is free");
    assert_error(&status, Code::Unavailable, "DEPENDENCY_UNAVAILABLE");

    locker.rollback().await.unwrap();
    holder
        .await
        .unwrap()
        .expect("the held order completes once the row is free");
}

#[api_test]
async fn a_redis_command_cut_short_by_the_callers_deadline_is_not_held_against_redis() {
    // A breaker that one counted failure would open for a minute.
    let proxy = RedisProxy::start().await;
    let settings = proxy.cache_settings(Duration::from_secs(2), 1, Duration::from_secs(60));
    let cache = Cache::new(&settings.redis).unwrap();
    let read = async || {
        cache
            .get_or_load(Entity::User, 7, || async {
                Ok(Some("from postgres".to_owned()))
            })
            .await
            .unwrap()
    };
    assert_eq!(read().await.as_deref(), Some("from postgres"), "warm up");

    // Redis stops answering; calls with 100 ms left give up on it at their
    // deadline, well inside command_timeout, and read PostgreSQL.
    proxy.freeze();
    for _ in 0..3 {
        let started = Instant::now();
        let value = Deadline::after(Duration::from_millis(100))
            .scope(read())
            .await;
        assert_eq!(value.as_deref(), Some("from postgres"));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    // The breaker stayed closed: the next read goes to Redis.
    proxy.thaw();
    let sent = proxy.received();
    assert_eq!(read().await.as_deref(), Some("from postgres"));
    assert!(proxy.received() > sent, "the breaker did not open");
}
