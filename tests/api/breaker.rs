//! The Redis circuit breaker, through a TCP proxy the test controls: it
//! counts what reaches Redis and can freeze traffic (as a stopped Redis
//! would: bytes are held, not lost). So a test can tell a call that tried
//! Redis from one the open breaker kept away.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use datagate::{
    cache::{Cache, Entity},
    proto::v1 as pb,
};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{RedisProxy, TestApp, api_test, health_of, observe::wait_until, unique};

#[api_test]
async fn the_breaker_opens_after_n_failures_and_the_first_probe_after_the_open_period_closes_it() {
    const FAILURES: u32 = 3;
    let proxy = RedisProxy::start().await;
    // Generous bounds: only the frozen proxy may make a command fail.
    let settings = proxy.cache_settings(Duration::from_secs(1), FAILURES, Duration::from_secs(2));
    let cache = Cache::new(&settings.redis).unwrap();
    let counted = AtomicU64::new(0);
    let loads = &counted;
    let read = async || {
        cache
            .get_or_load(Entity::User, 42, || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(Some("from postgres".to_owned()))
            })
            .await
            .unwrap()
    };
    assert_eq!(read().await.as_deref(), Some("from postgres"));
    assert_eq!(read().await.as_deref(), Some("from postgres"));
    assert_eq!(loads.load(Ordering::SeqCst), 1, "a miss, then a hit");

    proxy.freeze();
    for failure in 1..=FAILURES {
        let sent = proxy.received();
        assert_eq!(read().await.as_deref(), Some("from postgres"));
        assert!(proxy.received() > sent, "failure {failure} tried Redis");
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1 + u64::from(FAILURES));
    let sent = proxy.received();
    let started = Instant::now();
    assert_eq!(read().await.as_deref(), Some("from postgres"));
    assert_eq!(cache.probe().await, Some(false), "open");
    assert_eq!(proxy.received(), sent, "open: nothing is sent to Redis");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "and nothing waits for it"
    );

    // Back: probes inside the open period send nothing; the first after it
    // is let through, and its success closes the circuit.
    proxy.thaw();
    let mut probes = Vec::new();
    wait_until(
        "a probe closes the circuit",
        Duration::from_secs(10),
        async || {
            let sent = proxy.received();
            let answer = cache.probe().await;
            probes.push((answer, proxy.received() > sent));
            answer == Some(true)
        },
    )
    .await;
    let (last, earlier) = probes.split_last().unwrap();
    assert_eq!(*last, (Some(true), true), "{probes:?}");
    assert!(
        earlier.iter().all(|p| *p == (Some(false), false)),
        "one probe reached Redis: {probes:?}"
    );
    let (loaded, sent) = (loads.load(Ordering::SeqCst), proxy.received());
    assert_eq!(read().await.as_deref(), Some("from postgres"));
    assert!(proxy.received() > sent, "closed: reads use Redis again");
    assert_eq!(
        loads.load(Ordering::SeqCst),
        loaded,
        "a hit on the entry cached before"
    );
}

#[api_test]
async fn through_the_front_door_a_frozen_redis_turns_the_redis_entry_not_serving_until_a_probe_succeeds()
 {
    const FAILURES: u32 = 3;
    let proxy = RedisProxy::start().await;
    let app = TestApp::spawn_with(|s| {
        s.redis.url = proxy.url().into();
        s.redis.command_timeout = Duration::from_millis(500);
        s.redis.create_timeout = Duration::from_secs(1);
        s.redis.recycle_timeout = Duration::from_secs(1);
        s.redis.breaker_failures = FAILURES;
        s.redis.breaker_open_for = Duration::from_secs(2);
        // Every timeout counts, however late this busy test process notices it.
        s.redis.breaker_ignore_late_by = Duration::ZERO;
    })
    .await;
    let (email, username) = unique("breaker");
    let user = app.create_user(&email, &username).await;
    let mut users = app.users().await;
    let get = pb::GetUserRequest {
        id: user.id,
        ..Default::default()
    };
    users.get_user(get).await.unwrap();
    assert!(
        app.redis_get(&app.cache_key("user", user.id))
            .await
            .is_some()
    );
    assert_eq!(
        health_of(&app, "redis", ServingStatus::Serving).await,
        ServingStatus::Serving
    );

    // Frozen: reads go on from PostgreSQL; after FAILURES failures (the
    // readiness probe's count too) a read no longer tries Redis.
    proxy.freeze();
    let mut tried = 0;
    for _ in 0..2 * FAILURES {
        let sent = proxy.received();
        assert_eq!(users.get_user(get).await.unwrap().into_inner(), user);
        if proxy.received() == sent {
            break;
        }
        tried += 1;
    }
    assert!(
        (1..=FAILURES).contains(&tried),
        "{tried} reads tried Redis before the circuit opened"
    );
    assert_eq!(
        health_of(&app, "redis", ServingStatus::NotServing).await,
        ServingStatus::NotServing
    );
    // A read while the circuit is open bypasses the cache and is counted
    // (the hit rate counts it as a miss).
    let bypassed = app
        .metric("cache_bypassed_total", &[("entity", "user")])
        .await;
    assert_eq!(users.get_user(get).await.unwrap().into_inner(), user);
    assert!(
        app.metric("cache_bypassed_total", &[("entity", "user")])
            .await
            >= bypassed + 1.0
    );

    // Thawed: with no call made, the readiness probe alone closes it.
    proxy.thaw();
    assert_eq!(
        health_of(&app, "redis", ServingStatus::Serving).await,
        ServingStatus::Serving
    );
    sqlx::query("UPDATE users SET display_name = 'behind the cache' WHERE id = $1")
        .bind(user.id)
        .execute(&app.db)
        .await
        .unwrap();
    let sent = proxy.received();
    assert_eq!(
        users.get_user(get).await.unwrap().into_inner(),
        user,
        "a hit on the entry cached before the outage"
    );
    assert!(proxy.received() > sent);
}

/// `reads` reads of a cache behind a frozen proxy, each one's timeout
/// (50 ms) noticed late: the cache runs on a runtime of one thread, which
/// is blocked past the timeout while the command waits, as on a starved
/// machine (the proxy runs on the test's runtime and keeps counting).
/// Returns, per read, whether it tried Redis (the breaker let it through).
async fn late_timeouts(ignore_late_by: Duration, failures: u32, reads: u32) -> Vec<bool> {
    let proxy = std::sync::Arc::new(RedisProxy::start().await);
    let mut settings =
        proxy.cache_settings(Duration::from_millis(50), failures, Duration::from_secs(60));
    settings.redis.breaker_ignore_late_by = ignore_late_by;
    proxy.freeze();
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let cache = std::sync::Arc::new(Cache::new(&settings.redis).unwrap());
            let mut tried = Vec::new();
            for _ in 0..reads {
                let sent = proxy.received();
                let cache = cache.clone();
                let read = tokio::spawn(async move {
                    cache
                        .get_or_load(Entity::User, 42, || async {
                            Ok(Some("from postgres".to_owned()))
                        })
                        .await
                        .unwrap()
                });
                // The command is sent and its timer armed; then the only
                // worker is busy for four times the timeout.
                tokio::time::sleep(Duration::from_millis(10)).await;
                std::thread::sleep(Duration::from_millis(200));
                assert_eq!(read.await.unwrap().as_deref(), Some("from postgres"));
                tried.push(proxy.received() > sent);
            }
            tried
        })
    })
    .await
    .unwrap()
}

#[api_test]
async fn a_timeout_noticed_late_because_this_process_was_busy_does_not_open_the_breaker() {
    const FAILURES: u32 = 2;
    // Past the failure count, every read still tries Redis: closed.
    assert_eq!(
        late_timeouts(Duration::from_millis(20), FAILURES, FAILURES + 2).await,
        vec![true; FAILURES as usize + 2]
    );
    // Counting every timeout, the same reads open it after FAILURES.
    assert_eq!(
        late_timeouts(Duration::ZERO, FAILURES, FAILURES + 2).await,
        [true, true, false, false]
    );
}
