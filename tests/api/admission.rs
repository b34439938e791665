//! Admission control through the front door: a tiny fixed limit, calls held
//! busy on a row lock, and what the calls beyond the limit and its queue get.

use std::time::Duration;

use datagate::{config::Settings, proto::v1 as pb};
use tokio::task::JoinSet;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt as _;

use crate::support::{
    RowLock, TestApp, api_test, assert_error, clients::UserClient, health_of, rename,
};

/// A fixed limit of 2 (min = max) with a queue of one call that waits long
/// enough for the test to decide its fate.
fn tiny_limit(s: &mut Settings, caller_share: f64) {
    let admission = &mut s.admission;
    admission.enabled = true;
    admission.min_limit = 2;
    admission.initial_limit = 2;
    admission.max_limit = 2;
    admission.queue_length = 1;
    admission.max_queue_wait = Duration::from_secs(10);
    admission.caller_share = caller_share;
    admission.retry_after = Duration::from_millis(250);
    // A fixed RetryInfo: no pushback.
    admission.max_retry_after = admission.retry_after;
}

/// Waits until `n` statements in the app's database wait for a lock: `n`
/// calls are in flight, held by the row lock.
async fn wait_for_lock_waiters(app: &TestApp, n: i64) {
    crate::support::observe::wait_until(
        &format!("{n} calls waiting for the row lock"),
        Duration::from_secs(10),
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&app.db)
            .await
            .unwrap();
            waiting >= n
        },
    )
    .await;
}

/// Starts `n` renames of `user` (held by a row lock on it).
fn renames(
    calls: &mut JoinSet<Result<(), Status>>,
    client: &UserClient,
    user: &pb::User,
    n: usize,
) {
    for i in 0..n {
        let mut client = client.clone();
        let request = rename(user, &format!("rename {i}"));
        calls.spawn(async move { client.update_user(request).await.map(drop) });
    }
}

/// The next `n` answers, which must come before `within`.
async fn next_answers(
    calls: &mut JoinSet<Result<(), Status>>,
    n: usize,
    within: Duration,
) -> Vec<Result<(), Status>> {
    let mut answers = Vec::new();
    for _ in 0..n {
        let answer = tokio::time::timeout(within, calls.join_next())
            .await
            .expect("answered in time")
            .expect("a call is left");
        answers.push(answer.unwrap());
    }
    answers
}

#[track_caller]
fn assert_shed(answer: &Result<(), Status>) {
    let status = answer.as_ref().expect_err("shed");
    assert_error(status, Code::ResourceExhausted, "OVERLOADED");
    let retry = status.get_error_details().retry_info().cloned();
    assert_eq!(
        retry.and_then(|r| r.retry_delay),
        Some(Duration::from_millis(250)),
        "{status:?}"
    );
}

/// Answered by the handler, not shed: a rename of one version succeeds once
/// and is a version conflict after that.
#[track_caller]
fn assert_handled(answer: &Result<(), Status>) {
    if let Err(status) = answer {
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
    }
}

#[api_test]
async fn calls_beyond_the_limit_and_the_queue_are_shed_while_health_and_admin_calls_still_answer() {
    let app = TestApp::spawn_with(|s| tiny_limit(s, 1.0)).await;
    let user = app.create_user("held@example.com", "held").await;
    let shed_before = app
        .metric("admission_rejected_total", &[("reason", "queue_full")])
        .await;
    let lock = RowLock::on_user(&app.db, user.id).await;
    let client = app.users_as(Some(&app.writer_token)).await;

    // Arrange: the limit's two calls in flight, held by the lock.
    let mut calls = JoinSet::new();
    renames(&mut calls, &client, &user, 2);
    wait_for_lock_waiters(&app, 2).await;

    // Act: four more; one of them gets the queue's place.
    let mut excess = JoinSet::new();
    renames(&mut excess, &client, &user, 4);

    // Assert: three are shed at once, with RetryInfo.
    for answer in next_answers(&mut excess, 3, Duration::from_secs(5)).await {
        assert_shed(&answer);
    }
    assert!(
        app.metric("admission_rejected_total", &[("reason", "queue_full")])
            .await
            >= shed_before + 3.0
    );
    // Probes and operators still get answers.
    assert_eq!(
        health_of(&app, "", ServingStatus::Serving).await,
        ServingStatus::Serving
    );
    app.admin_as(&app.token)
        .await
        .list_partitions(pb::ListPartitionsRequest {})
        .await
        .expect("AdminService is never shed");

    // Once the load goes, the queued call runs and new calls are admitted.
    lock.release().await;
    for answer in next_answers(&mut calls, 2, Duration::from_secs(10)).await {
        assert_handled(&answer);
    }
    for answer in next_answers(&mut excess, 1, Duration::from_secs(10)).await {
        assert_handled(&answer);
    }
    app.users_as(Some(&app.writer_token))
        .await
        .get_user(pb::GetUserRequest {
            id: user.id,
            ..Default::default()
        })
        .await
        .expect("admitted again");
}

#[api_test]
async fn a_caller_flooding_the_service_cannot_starve_another() {
    // Half the limit each, once there are two callers.
    let app = TestApp::spawn_with(|s| tiny_limit(s, 0.5)).await;
    let held = app.create_user("flood@example.com", "flood").await;
    let other = app.create_user("other@example.com", "other").await;
    let lock = RowLock::on_user(&app.db, held.id).await;

    // The flooder, alone, takes the whole limit; one more call is queued,
    // the rest are shed.
    let flooder = app.users_as(Some(&app.writer_token)).await;
    let mut flood = JoinSet::new();
    renames(&mut flood, &flooder, &held, 2);
    wait_for_lock_waiters(&app, 2).await;
    renames(&mut flood, &flooder, &held, 4);
    for answer in next_answers(&mut flood, 3, Duration::from_secs(5)).await {
        assert_shed(&answer);
    }

    // Another caller is admitted at once, beside the flood: the flooder
    // holds more than its share.
    let answered = tokio::time::timeout(
        Duration::from_secs(5),
        app.users().await.get_user(pb::GetUserRequest {
            id: other.id,
            ..Default::default()
        }),
    )
    .await
    .expect("the other caller is not queued behind the flood")
    .expect("the other caller is admitted");
    assert_eq!(answered.into_inner().id, other.id);

    // Once the flood's calls end, its queued call runs and the flooder is
    // admitted again.
    lock.release().await;
    for answer in next_answers(&mut flood, 3, Duration::from_secs(10)).await {
        assert_handled(&answer);
    }
    flooder
        .clone()
        .get_user(pb::GetUserRequest {
            id: held.id,
            ..Default::default()
        })
        .await
        .expect("admitted again");
}

/// One load phase's answers: latencies of admitted calls and of shed ones.
#[derive(Default)]
struct Phase {
    admitted: Vec<Duration>,
    shed: Vec<Duration>,
    other: usize,
}

impl Phase {
    fn report(&mut self, name: &str, seconds: f64) {
        let pct = |v: &mut Vec<Duration>, p: f64| {
            v.sort();
            v.get(((v.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        println!(
            "{name}: admitted {} ({:.0}/s) p50 {:.1} ms p99 {:.1} ms; shed {} p50 {:.2} ms p99 {:.2} ms (client side); other errors {}",
            self.admitted.len(),
            self.admitted.len() as f64 / seconds,
            pct(&mut self.admitted, 0.5),
            pct(&mut self.admitted, 0.99),
            self.shed.len(),
            pct(&mut self.shed, 0.5),
            pct(&mut self.shed, 0.99),
            self.other,
        );
    }
}

/// `workers` callers of ListUsersWithOrders (one token) for `duration`; a
/// shed caller waits its RetryInfo delay, as a well-behaved client does.
async fn load(app: &TestApp, workers: usize, duration: Duration) -> Phase {
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(app.orders().await);
    }
    let end = tokio::time::Instant::now() + duration;
    let mut calls = JoinSet::new();
    for i in 0..workers {
        let mut client = clients[i % clients.len()].clone();
        calls.spawn(async move {
            let mut phase = Phase::default();
            while tokio::time::Instant::now() < end {
                let started = std::time::Instant::now();
                let answer = client
                    .list_users_with_orders(pb::ListUsersWithOrdersRequest {
                        page_size: 20,
                        page_token: String::new(),
                        orders_per_user: 5,
                    })
                    .await;
                let elapsed = started.elapsed();
                match answer {
                    Ok(_) => phase.admitted.push(elapsed),
                    Err(status) if status.code() == Code::ResourceExhausted => {
                        phase.shed.push(elapsed);
                        let delay = status.get_error_details().retry_info().cloned();
                        let delay = delay.and_then(|r| r.retry_delay).unwrap_or_default();
                        tokio::time::sleep(delay).await;
                    }
                    Err(_) => phase.other += 1,
                }
            }
            phase
        });
    }
    let mut total = Phase::default();
    while let Some(phase) = calls.join_next().await {
        let phase = phase.unwrap();
        total.admitted.extend(phase.admitted);
        total.shed.extend(phase.shed);
        total.other += phase.other;
    }
    total
}

/// Server-side latency of shed ListUsersWithOrders calls: how many of them
/// (since `before`) took at most each bound, and how many in all.
fn shed_latencies(before: &str, after: &str) -> Vec<(String, f64)> {
    let labels = |le: &'static str| {
        [
            ("service", "datagate.v1.OrderService"),
            ("method", "ListUsersWithOrders"),
            ("code", "RESOURCE_EXHAUSTED"),
            ("le", le),
        ]
    };
    let name = "rpc_latency_seconds_bucket";
    ["0.001", "0.0025", "0.005", "0.01", "+Inf"]
        .into_iter()
        .map(|le| {
            let delta = crate::support::observe::series(after, name, &labels(le))
                - crate::support::observe::series(before, name, &labels(le));
            (format!("<= {le} s"), delta)
        })
        .collect()
}

/// Not a test: a bounded overload measurement (about 20 s), run with
/// `cargo test --test api admission::overload_measurement -- --ignored --nocapture`.
#[api_test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn overload_measurement() {
    let app = TestApp::spawn_with(|s| {
        s.admission.enabled = true;
        s.database.max_connections = 20;
    })
    .await;
    let product = app.create_product(500, 100_000).await;
    for i in 0..20 {
        let user = app
            .create_user(&format!("load{i}@example.com"), &format!("load{i}"))
            .await;
        for _ in 0..2 {
            app.create_order(user.id, product.id, 1).await;
        }
    }
    let seconds = 5.0;
    let duration = Duration::from_secs_f64(seconds);
    load(&app, 16, duration)
        .await
        .report("16 callers, admission on", seconds);
    let before = app.metrics().await;
    load(&app, 256, duration)
        .await
        .report("256 callers, admission on", seconds);
    let after = app.metrics().await;
    println!(
        "server-side latency of shed calls: {:?}; limit at the end: {}",
        shed_latencies(&before, &after),
        crate::support::observe::series(&after, "admission_limit", &[])
    );
    let mut off = app.settings.clone();
    off.admission.enabled = false;
    let without = app.spawn_replica_with(off).await;
    load(&without, 256, duration)
        .await
        .report("256 callers, admission off", seconds);
}
