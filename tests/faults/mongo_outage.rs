//! MongoDB killed (SIGKILL) and started again on the same port and data
//! directory, under a paced load of profile reads (the user in PostgreSQL,
//! then the profile in MongoDB) and user reads (PostgreSQL only). While it
//! is down the profile reads fail fast with UNAVAILABLE
//! `DEPENDENCY_UNAVAILABLE` and `RetryInfo` (the fail-fast gate of
//! `documents::mongo`), never INTERNAL or a hang, and the user reads go on;
//! once it is back the profile reads succeed again, the profile written
//! before the outage included.
//!
//! While the server is down a listener on its port accepts and drops each
//! connection, so the service's reconnection attempts can be counted (a
//! refused connection on a closed port leaves no trace).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use datagate::proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt as _;

use crate::support::{
    Deps, Load, Mongo, Postgres, Service, figure,
    load::{Sample, Samples},
    service::arrange_catalog,
    wait_until,
};

const SCENARIO: &str = "mongo_outage";
/// Callers of each kind (profile reads, user reads), each pausing
/// [`PAUSE`] between calls: at most about 100 MongoDB reads a second.
const CALLERS: usize = 2;
const PAUSE: Duration = Duration::from_millis(20);
const BEFORE: Duration = Duration::from_secs(2);
/// How long the server stays dead.
const DOWN: Duration = Duration::from_secs(4);
const AFTER: Duration = Duration::from_secs(3);
/// Profile reads made one by one while the server is down, each checked
/// for its details.
const PROBES: usize = 20;

fn profile_of(user_id: i64) -> pb::GetUserProfileRequest {
    pb::GetUserProfileRequest { user_id }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_need_mongodb_fail_fast_while_it_is_down_and_the_rest_serve() {
    let _serial = crate::support::serial().await;
    // No Redis: every user read reaches PostgreSQL.
    let pg = Postgres::start().await;
    let mut mongo = Mongo::start().await;
    let (database_url, mongo_url) = (pg.url(), mongo.url());
    let service = Service::in_process(Deps {
        database_url: &database_url,
        redis_url: None,
        overrides: &[("mongodb.url", &mongo_url), ("mongodb.database", "faults")],
    })
    .await;
    let health = async |want: ServingStatus| {
        wait_until(
            &format!("the mongodb health entry is {want:?}"),
            Duration::from_secs(20),
            async || service.health("mongodb").await == Some(want),
        )
        .await;
    };
    health(ServingStatus::Serving).await;
    let (user, _) = arrange_catalog(&service, 0, 0).await;
    let mut users = service.users();
    users
        .update_user_profile(pb::UpdateUserProfileRequest {
            user_id: user,
            profile: Some(pb::UserProfile {
                given_name: "Ada".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["given_name".into()],
            }),
        })
        .await
        .expect("a profile written while MongoDB is up");

    let profile_reads = Load::paced(CALLERS, Duration::from_secs(60), PAUSE, {
        let users = users.clone();
        move |_, _| {
            let mut users = users.clone();
            async move { users.get_user_profile(profile_of(user)).await.map(|_| ()) }
        }
    });
    let user_reads = Load::paced(CALLERS, Duration::from_secs(60), PAUSE, {
        let users = users.clone();
        move |_, _| {
            let mut users = users.clone();
            async move {
                users
                    .get_user(pb::GetUserRequest {
                        id: user,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
            }
        }
    });
    tokio::time::sleep(BEFORE).await;

    // The outage.
    let killed = Instant::now();
    mongo.kill().await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", mongo.port))
        .await
        .expect("the dead server's port is free");
    let attempts = Arc::new(AtomicUsize::new(0));
    let counting = Instant::now();
    let counter = tokio::spawn({
        let attempts = attempts.clone();
        async move {
            while let Ok((connection, _)) = listener.accept().await {
                attempts.fetch_add(1, Ordering::Relaxed);
                drop(connection);
            }
        }
    });
    wait_until(
        "a profile read fails",
        Duration::from_secs(10),
        async || {
            users
                .clone()
                .get_user_profile(profile_of(user))
                .await
                .is_err()
        },
    )
    .await;
    let seen_ms = killed.elapsed().as_millis();
    // One by one, with their details.
    let mut refused = Vec::new();
    for _ in 0..PROBES {
        let started = Instant::now();
        let status = users
            .get_user_profile(profile_of(user))
            .await
            .expect_err("MongoDB is down");
        refused.push(Sample {
            started: started - killed,
            latency: started.elapsed(),
            code: format!("{:?}", status.code()),
        });
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(
            status.message(),
            "the document store is unreachable; retry with backoff",
            "refused by the gate, not after a server selection: {status:?}"
        );
        let details = status.get_error_details();
        let info = details
            .error_info()
            .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
        assert_eq!(info.reason, "DEPENDENCY_UNAVAILABLE", "{status:?}");
        assert_eq!(
            info.metadata.get("dependency").map(String::as_str),
            Some("mongodb"),
            "{status:?}"
        );
        assert!(
            details.retry_info().and_then(|r| r.retry_delay).is_some(),
            "a refusal says when to retry: {status:?}"
        );
        tokio::time::sleep(PAUSE).await;
    }
    users
        .get_user(pb::GetUserRequest {
            id: user,
            ..Default::default()
        })
        .await
        .expect("a PostgreSQL-only call serves while MongoDB is down");
    health(ServingStatus::NotServing).await;
    tokio::time::sleep(DOWN.saturating_sub(killed.elapsed())).await;
    counter.abort();
    let _ = counter.await;
    let (attempted, counted_secs) = (
        attempts.load(Ordering::Relaxed),
        counting.elapsed().as_secs_f64(),
    );

    // Back on the same port and data directory.
    mongo.start_again().await;
    let listening = Instant::now();
    wait_until(
        "a profile read succeeds again",
        Duration::from_secs(20),
        async || {
            users
                .clone()
                .get_user_profile(profile_of(user))
                .await
                .is_ok()
        },
    )
    .await;
    let back = Instant::now();
    let back_ms = (back - listening).as_millis();
    health(ServingStatus::Serving).await;
    let kept = users
        .get_user_profile(profile_of(user))
        .await
        .expect("MongoDB is back")
        .into_inner();
    tokio::time::sleep(AFTER).await;
    let (profile_start, user_start) = (profile_reads.start, user_reads.start);
    let (profiles, plain) = (profile_reads.finish().await, user_reads.finish().await);

    let since = |start: Instant, at: Instant| at.saturating_duration_since(start);
    let before = Samples(
        profiles
            .0
            .iter()
            .filter(|s| s.started + s.latency < since(profile_start, killed))
            .cloned()
            .collect(),
    );
    let in_flight = Samples(
        profiles
            .0
            .iter()
            .filter(|s| {
                s.started < since(profile_start, killed)
                    && s.started + s.latency >= since(profile_start, killed)
            })
            .cloned()
            .collect(),
    );
    let during = profiles.started_between(
        since(profile_start, killed),
        since(profile_start, listening),
    );
    let after = profiles.started_between(
        since(profile_start, back + Duration::from_secs(1)),
        Duration::MAX,
    );
    let plain_during =
        plain.started_between(since(user_start, killed), since(user_start, listening));
    figure(SCENARIO, "profile reads before", before.summary());
    figure(
        SCENARIO,
        "profile reads in flight at the kill",
        in_flight.summary(),
    );
    figure(SCENARIO, "profile reads while down", during.summary());
    figure(
        SCENARIO,
        "profile reads one by one while down",
        Samples(refused).summary(),
    );
    figure(
        SCENARIO,
        "profile reads from 1 s after the first success",
        after.summary(),
    );
    figure(SCENARIO, "user reads while down", plain_during.summary());
    figure(SCENARIO, "user reads, whole run", plain.summary());
    // About `server_selection_timeout` when that read found its pooled
    // connection broken: the driver retries it once, and the retry waits
    // out server selection (every call after it finds the gate closed).
    figure(
        SCENARIO,
        "first failed profile read after the kill ms",
        seen_ms,
    );
    figure(
        SCENARIO,
        "connection attempts/s while down",
        format!(
            "{:.1} ({attempted} in {counted_secs:.1} s)",
            attempted as f64 / counted_secs
        ),
    );
    figure(SCENARIO, "first profile read OK after restart ms", back_ms);

    assert_eq!(
        before.failed(),
        0,
        "before the outage: {}",
        before.summary()
    );
    assert!(
        in_flight
            .0
            .iter()
            .all(|s| s.ok() || s.code == "Unavailable"),
        "a call in flight at the kill succeeds or is UNAVAILABLE: {}",
        in_flight.summary()
    );
    during.assert_failed_only_unavailable("while MongoDB is down its");
    assert_eq!(
        plain.failed(),
        0,
        "PostgreSQL-only calls never fail: {}",
        plain.summary()
    );
    assert!(plain_during.len() > 0, "user reads were made while down");
    assert!(after.len() > 0, "profile reads were made after recovery");
    assert_eq!(after.failed(), 0, "after recovery: {}", after.summary());
    assert_eq!(kept.given_name, "Ada", "the profile outlived the restart");
    service.stop().await;
}
