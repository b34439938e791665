//! Batched loading: constant statement counts, the N+1 detector, the
//! loaders' per-key, error and cancellation semantics, and the same for
//! point reads batched across calls (with their deadlines).

use std::{future::Future, pin::Pin, sync::Arc, task::Poll, time::Duration};

use datagate::{
    cache::Cache,
    domain::{orders::Orders, passwords::PasswordHasher, users::Users, write::Writes},
    error::Error,
    loaders::{BatchLoader, LiveUsers, PointReads, ProductsById, UserLoader, UsersById},
    model::{
        Id,
        deadline::Deadline,
        paging::{PageRequest, PageSize, PageTokens},
    },
    statements::{self, RequestLog},
};
use secrecy::SecretString;
use sqlx::PgPool;

use crate::support::{TestApp, api_test, wait_for_lock_waiter};

#[path = "../../benches/support/naive.rs"]
mod naive;

fn services(db: &PgPool) -> (Users, Orders) {
    let pages = PageTokens::new(&SecretString::from("p".repeat(32)));
    let writes = Writes::new(db.clone(), Cache::disabled());
    let users = Users::new(&writes, pages.clone(), PasswordHasher::new(2));
    let orders = Orders::new(&writes, pages, users.clone());
    (users, orders)
}

/// `users` users with 3 orders of 2 items each, in set-based SQL.
async fn seed(db: &PgPool, users: i64) {
    for sql in [
        "INSERT INTO users (email, username) \
         SELECT 'u' || g || '@example.com', 'user' || g FROM generate_series(1, $1) g",
        "INSERT INTO products (sku, title, category, price) \
         SELECT 'P' || g, 'Product ' || g, 'tools', 10 FROM generate_series(1, 20) g",
        "INSERT INTO inventory (product_id, quantity) SELECT id, 1000 FROM products",
        "INSERT INTO orders (user_id, total) SELECT u.id, 20 FROM users u, generate_series(1, 3)",
        "INSERT INTO order_items (order_id, product_id, quantity, unit_price) \
         SELECT o.id, 1 + (o.id + k) % 20, 1, 10 FROM orders o, generate_series(0, 1) k",
    ] {
        let query = sqlx::query(sql);
        let query = if sql.contains("$1") {
            query.bind(users)
        } else {
            query
        };
        query.execute(db).await.unwrap();
    }
}

fn page(size: i32) -> PageRequest {
    PageRequest {
        size: PageSize::parse(size).unwrap(),
        token: None,
    }
}

#[api_test]
async fn list_users_with_orders_runs_the_same_few_statements_for_10_and_100_users() {
    let app = TestApp::spawn().await;
    seed(&app.db, 100).await;
    let (_, orders) = services(&app.db);

    let mut counts = Vec::new();
    for size in [10, 100] {
        let log = Arc::new(RequestLog::default());
        let listed = statements::scope(log.clone(), orders.list_users_with_orders(page(size), 5))
            .await
            .unwrap();
        assert_eq!(listed.items.len(), size as usize);
        assert!(listed.items.iter().all(|u| u.recent_orders.len() == 3));
        assert!(
            listed
                .items
                .iter()
                .flat_map(|u| &u.recent_orders)
                .all(|o| o.items.len() == 2 && o.items.iter().all(|i| i.product.is_some()))
        );
        counts.push(log.total());
        assert_eq!(log.max_repeats(), 1, "no shape repeats: {:?}", log.shapes());
    }
    assert_eq!(
        counts[0], counts[1],
        "statement count independent of page size"
    );
    assert!(counts[0] <= 5, "page query + at most 4: {}", counts[0]);
}

#[api_test]
async fn the_naive_per_user_path_trips_the_n_plus_one_detector() {
    let app = TestApp::spawn().await;
    seed(&app.db, 10).await;
    let (users, orders) = services(&app.db);

    let operation = "test.naive_list_users_with_orders";
    let reported = async || {
        app.metric("n_plus_one_detected_total", &[("operation", operation)])
            .await
    };
    let reported_before = reported().await;
    let log = Arc::new(RequestLog::default());
    let naive = statements::scope(
        log.clone(),
        naive::list_users_with_orders_naively(&app.db, &users, page(10), 5),
    )
    .await
    .unwrap();
    let detected = statements::report_n_plus_one(&log, 5, operation);
    assert!(!detected.is_empty(), "shapes: {:?}", log.shapes());
    assert!(
        detected
            .iter()
            .any(|(shape, n)| shape.contains("FROM orders") && *n == 10)
    );
    assert!(
        log.total() > 100,
        "10 users × 3 orders × 2 items, one by one: {}",
        log.total()
    );
    assert_eq!(
        reported().await - reported_before,
        detected.len() as f64,
        "one count per repeated shape"
    );

    // The batched path answers the same, without tripping it.
    let batched_log = Arc::new(RequestLog::default());
    let batched = statements::scope(
        batched_log.clone(),
        orders.list_users_with_orders(page(10), 5),
    )
    .await
    .unwrap();
    assert!(statements::report_n_plus_one(&batched_log, 5, "test.batched").is_empty());
    let summary =
        |rows: &[datagate::model::orders::UserWithOrders]| -> Vec<(Id, Vec<(Id, usize)>)> {
            rows.iter()
                .map(|u| {
                    (
                        u.user.id,
                        u.recent_orders
                            .iter()
                            .map(|o| (o.header.id, o.items.len()))
                            .collect(),
                    )
                })
                .collect()
        };
    assert_eq!(summary(&batched.items), summary(&naive));
}

#[api_test]
async fn a_missing_key_is_not_found_for_that_key_only() {
    let app = TestApp::spawn().await;
    let user = app.create_user("loaded@example.com", "loaded").await;
    let loader = UserLoader::new(UsersById(app.db.clone()));
    let found = Id::parse(user.id).unwrap();
    let missing = Id::parse(987_654).unwrap();
    let results = loader.load_many(&[found, missing]).await.unwrap();
    assert_eq!(results[&found].as_ref().map(|u| u.id), Some(found));
    assert!(results[&missing].is_none());
    assert!(
        loader.load(missing).await.unwrap().is_none(),
        "no panic on a missing key"
    );
}

#[api_test]
async fn a_failed_batch_reaches_every_waiter() {
    let app = TestApp::spawn().await;
    // A closed pool: every acquire fails, as with a database that is down.
    let pool = app.db.clone();
    pool.close().await;
    let loader = UserLoader::new(UsersById(pool));
    let (a, b) = tokio::join!(
        loader.load(Id::parse(1).unwrap()),
        loader.load(Id::parse(2).unwrap())
    );
    for result in [a, b] {
        assert!(
            matches!(result, Err(Error::Unavailable { .. })),
            "{result:?}"
        );
    }
}

#[api_test]
async fn a_caller_cancelled_mid_batch_does_not_break_the_other_waiters() {
    let app = TestApp::spawn().await;
    let first = app.create_product(100, 1).await;
    let second = app.create_product(200, 1).await;
    let loader = BatchLoader::new(ProductsById {
        db: app.db.clone(),
        cache: Cache::disabled(),
    });

    // Hold the products table so that the batch blocks in the database.
    let mut blocker = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();

    // Poll A, then B, in lockstep: A queues its key first and is the caller
    // that runs the batch (both keys) inside its own future.
    let mut a: Pin<Box<dyn Future<Output = _>>> =
        Box::pin(loader.load(Id::parse(first.id).unwrap()));
    let mut b: Pin<Box<dyn Future<Output = _>>> =
        Box::pin(loader.load(Id::parse(second.id).unwrap()));
    let blocked = async {
        loop {
            std::future::poll_fn(|cx| {
                assert!(
                    a.as_mut().poll(cx).is_pending(),
                    "A waits for the blocked batch"
                );
                assert!(b.as_mut().poll(cx).is_pending(), "B waits for A's batch");
                Poll::Ready(())
            })
            .await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        _ = blocked => unreachable!(),
        () = wait_for_lock_waiter(&app.db) => {}
    }

    drop(a); // A's caller goes away mid-batch.
    blocker.rollback().await.unwrap();
    let product = tokio::time::timeout(Duration::from_secs(10), b)
        .await
        .expect("B is answered")
        .expect("B is not failed by A's cancellation");
    assert_eq!(product.map(|p| p.id.get()), Some(second.id));
}

// --- Point reads batched across calls -----------------------------------------

type Read = tokio::task::JoinHandle<datagate::error::Result<Option<datagate::model::users::User>>>;

/// A read of `id` on its own task, as from a call of its own with a
/// deadline `timeout` from now.
fn read_user(reads: &PointReads<LiveUsers>, id: i64, timeout: Duration) -> Read {
    let reads = reads.clone();
    let id = Id::parse(id).unwrap();
    tokio::spawn(Deadline::after(timeout).scope(async move { reads.load(id).await }))
}

const LONG: Duration = Duration::from_secs(30);

/// Holds `users` so that every read of it waits in the database.
async fn lock_users(db: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut blocker = db.begin().await.unwrap();
    sqlx::query("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    blocker
}

/// Waits until `n` reads are queued (not yet in a batch).
async fn until_queued(reads: &PointReads<LiveUsers>, n: usize) {
    for _ in 0..400 {
        if reads.queued() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{} reads queued, not {n}", reads.queued());
}

async fn lock_waiters(db: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(db)
    .await
    .unwrap()
}

#[api_test]
async fn point_reads_queued_while_a_batch_runs_share_the_next_query_with_per_key_results() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            app.create_user(&format!("point{i}@example.com"), &format!("point{i}"))
                .await
                .id,
        );
    }
    let missing = 987_654;
    let reads = PointReads::<LiveUsers>::with_in_flight(app.db.clone(), 1);
    let blocker = lock_users(&app.db).await;

    // The first read's batch waits in the database; the others, from other
    // callers, queue meanwhile.
    let first = read_user(&reads, ids[0], LONG);
    wait_for_lock_waiter(&app.db).await;
    let rest: Vec<(i64, Read)> = ids[1..]
        .iter()
        .chain([&missing])
        .map(|id| (*id, read_user(&reads, *id, LONG)))
        .collect();
    until_queued(&reads, 5).await;
    assert_eq!(
        lock_waiters(&app.db).await,
        1,
        "one statement for six reads so far"
    );

    blocker.rollback().await.unwrap();
    let found = first.await.unwrap().unwrap().expect("the first user");
    assert_eq!(found.id.get(), ids[0]);
    for (id, read) in rest {
        let found = read.await.unwrap().unwrap();
        if id == missing {
            assert!(
                found.is_none(),
                "a missing row is not found for its id only"
            );
        } else {
            assert_eq!(found.map(|u| u.id.get()), Some(id));
        }
    }
    assert_eq!(reads.batches(), 2, "the five queued reads shared one query");
}

#[api_test]
async fn a_failed_point_read_batch_fails_each_of_its_waiters() {
    let app = TestApp::spawn().await;
    // A closed pool: every acquire fails, as with a database that is down.
    let pool = app.db.clone();
    pool.close().await;
    let reads = PointReads::<LiveUsers>::with_in_flight(pool, 1);
    let blocked = read_user(&reads, 1, LONG);
    let (a, b) = (read_user(&reads, 2, LONG), read_user(&reads, 3, LONG));
    for result in [blocked.await.unwrap(), a.await.unwrap(), b.await.unwrap()] {
        assert!(
            matches!(result, Err(Error::Unavailable { .. })),
            "{result:?}"
        );
    }
}

#[api_test]
async fn a_point_read_caller_that_goes_away_does_not_cancel_the_batch_for_the_others() {
    let app = TestApp::spawn().await;
    let a = app.create_user("gone@example.com", "gone").await;
    let b = app.create_user("stays@example.com", "stays").await;
    let reads = PointReads::<LiveUsers>::with_in_flight(app.db.clone(), 1);
    let blocker = lock_users(&app.db).await;

    // A and B queue behind a first read, then share the next batch, which
    // waits in the database once the first read's caller has gone.
    let first = read_user(&reads, a.id, LONG);
    wait_for_lock_waiter(&app.db).await;
    let (gone, stays) = (read_user(&reads, a.id, LONG), read_user(&reads, b.id, LONG));
    until_queued(&reads, 2).await;
    first.abort();
    until_queued(&reads, 0).await;
    assert_eq!(reads.batches(), 2);
    wait_for_lock_waiter(&app.db).await;

    gone.abort();
    blocker.rollback().await.unwrap();
    let found = tokio::time::timeout(Duration::from_secs(10), stays)
        .await
        .expect("B is answered")
        .unwrap()
        .expect("B is not failed by A going away");
    assert_eq!(found.map(|u| u.id.get()), Some(b.id));
}

#[api_test]
async fn a_point_read_batch_whose_callers_all_left_stops_its_statement() {
    let app = TestApp::spawn().await;
    let user = app.create_user("left@example.com", "left").await;
    // The service's own pool: its connections ask PostgreSQL to check the
    // client while a statement runs.
    let pool = datagate::store::postgres::pool_for_calls(
        &app.settings.database,
        app.settings.server.request_timeout,
    )
    .unwrap();
    let reads = PointReads::<LiveUsers>::with_in_flight(pool, 1);
    let blocker = lock_users(&app.db).await;

    let read = read_user(&reads, user.id, LONG);
    wait_for_lock_waiter(&app.db).await;
    read.abort();
    // Its connection is closed: PostgreSQL ends the statement while the
    // lock is still held.
    let mut waiting = lock_waiters(&app.db).await;
    for _ in 0..400 {
        if waiting == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        waiting = lock_waiters(&app.db).await;
    }
    assert_eq!(waiting, 0, "the abandoned batch's statement still waits");
    blocker.rollback().await.unwrap();
}

#[api_test]
async fn a_shared_point_read_batch_runs_to_its_longest_deadline_and_each_waiter_to_its_own() {
    let app = TestApp::spawn().await;
    let user = app.create_user("deadline@example.com", "deadline").await;
    let reads = PointReads::<LiveUsers>::with_in_flight(app.db.clone(), 1);
    let blocker = lock_users(&app.db).await;

    // Both queue behind a first read, whose caller then goes away: they
    // share the next batch, which waits for the lock.
    let first = read_user(&reads, user.id, LONG);
    wait_for_lock_waiter(&app.db).await;
    let short = read_user(&reads, user.id, Duration::from_millis(300));
    let long = read_user(&reads, user.id, Duration::from_millis(1500));
    until_queued(&reads, 2).await;
    first.abort();

    let short = short.await.unwrap();
    assert!(
        matches!(&short, Err(Error::DeadlineExceeded(d)) if d.reason == "DEADLINE_EXCEEDED"),
        "the short waiter ends at its own deadline: {short:?}"
    );
    let long = long.await.unwrap();
    assert!(
        matches!(&long, Err(Error::DeadlineExceeded(d)) if d.reason == "QUERY_TIMEOUT"),
        "the statement ran on for the longer waiter, then timed out in PostgreSQL: {long:?}"
    );
    assert_eq!(reads.batches(), 2);
    blocker.rollback().await.unwrap();
}
