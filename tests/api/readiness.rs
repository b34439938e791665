//! Readiness follows whether PostgreSQL answers, not whether the pool has a
//! free connection: slow calls holding every pooled connection are overload,
//! and must not take the instance out of rotation.

use std::time::{Duration, Instant};

use datagate::proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{RowLock, TestApp, api_test, rename, unique};

/// How many of the app's statements wait for a lock now.
async fn lock_waiters(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap()
}

#[api_test]
async fn readiness_stays_serving_while_slow_calls_hold_every_pooled_connection() {
    let app = TestApp::spawn_with(|s| {
        s.database.min_connections = 0;
        s.database.max_connections = 2;
        s.database.acquire_timeout = Duration::from_secs(1);
        s.redis.url = String::new().into();
    })
    .await;
    let mut users = Vec::new();
    for _ in 0..4 {
        let (email, username) = unique("ready");
        users.push(app.create_user(&email, &username).await);
    }
    // Updates wait on row locks, each holding a pooled connection while it
    // waits, until none is left (the outbox relay's listener may hold one).
    let mut locks = Vec::new();
    let mut blocked = Vec::new();
    for user in &users[..3] {
        locks.push(RowLock::on_user(&app.db, user.id).await);
        let mut client = app.users().await;
        let request = rename(user, "renamed while blocked");
        blocked.push(tokio::spawn(
            async move { client.update_user(request).await },
        ));
    }
    let started = Instant::now();
    while lock_waiters(&app).await < 1 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no update blocked"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // The pool is exhausted: a read finds no connection.
    let exhausted = app
        .users()
        .await
        .get_user(pb::GetUserRequest {
            id: users[3].id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(exhausted.code(), Code::Unavailable, "{exhausted:?}");

    // Yet over several readiness rounds (every 2 s) the instance stays ready.
    let mut health = HealthClient::new(app.channel().await);
    let watched = Instant::now();
    let mut checks = 0;
    while watched.elapsed() < Duration::from_secs(5) {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(
            status,
            ServingStatus::Serving,
            "after {:?}",
            watched.elapsed()
        );
        checks += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(checks >= 10, "{checks} checks");

    for lock in locks {
        lock.release().await;
    }
    // The blocked calls end once the locks go (renamed, or UNAVAILABLE if
    // their wait for a connection outlasted the acquire timeout).
    for call in blocked {
        if let Err(status) = call.await.unwrap() {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
    }
}
