//! The near cache and its consistency contract, on two replicas sharing one
//! database and one Redis namespace: strong reads (the default) are never
//! stale; a bounded read (`max_staleness`) is never staler than its bound,
//! also while the invalidation channel is severed, and a severed channel
//! flushes the tier.

use std::time::{Duration, Instant};

use deadpool_redis::redis::{self, AsyncCommands as _};
use tonic::Code;

use crate::support::{
    TestApp, api_test, assert_error, observe::wait_until, redis::redis_url, unique, violated_fields,
};
use datagate::proto::v1 as pb;

/// The largest bound the apps accept (long, so that only invalidations and
/// flushes, never age, make an entry go in these tests).
const MAX: Duration = Duration::from_secs(30);

async fn spawn() -> TestApp {
    TestApp::spawn_with(|s| s.redis.near_max_staleness = MAX).await
}

fn staleness(bound: Duration) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: bound.as_secs() as i64,
        nanos: bound.subsec_nanos() as i32,
    })
}

async fn get_user(app: &TestApp, id: i64, bound: Option<Duration>) -> pb::User {
    app.users()
        .await
        .get_user(pb::GetUserRequest {
            id,
            max_staleness: bound.and_then(staleness),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Renames a user behind the service's back: in PostgreSQL, and its Redis
/// entry deleted without an invalidation message, as if the write's
/// message were lost. Only the near cache can still answer the old name.
async fn rename_unannounced(app: &TestApp, id: i64) -> String {
    let name = format!("unannounced {}", uuid::Uuid::new_v4().simple());
    sqlx::query("UPDATE users SET display_name = $2 WHERE id = $1")
        .bind(id)
        .bind(&name)
        .execute(&app.db)
        .await
        .unwrap();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: u64 = conn.del(app.cache_key("user", id)).await.unwrap();
    name
}

/// Waits until `app`'s near cache serves bounded reads of user `id`: a
/// bounded read fills it, an unannounced rename follows, and a second
/// bounded read still answers the first name. Returns the name the near
/// cache holds; PostgreSQL has another.
async fn wait_for_near(app: &TestApp, id: i64) -> String {
    let mut held = String::new();
    wait_until(
        "the near cache serves bounded reads",
        Duration::from_secs(20),
        async || {
            let before = get_user(app, id, Some(MAX)).await.display_name;
            rename_unannounced(app, id).await;
            held = before.clone();
            get_user(app, id, Some(MAX)).await.display_name == before
        },
    )
    .await;
    held
}

async fn create_user(app: &TestApp) -> pb::User {
    let (email, username) = unique("near");
    app.create_user(&email, &username).await
}

async fn rename(app: &TestApp, user: &pb::User, name: &str) -> pb::User {
    app.users()
        .await
        .update_user(pb::UpdateUserRequest {
            id: user.id,
            version: user.version,
            user: Some(pb::UserPatch {
                display_name: name.to_owned(),
                ..Default::default()
            }),
            update_mask: crate::support::mask(&["display_name"]),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Bounded reads on `app` until one answers `name`: any earlier answer must
/// come from a read that started within `bound` of `written` (when the
/// write was acknowledged).
async fn fresh_within(app: &TestApp, id: i64, name: &str, bound: Duration, written: Instant) {
    wait_until(
        "a bounded read answers the write",
        Duration::from_secs(20),
        async || {
            let started = Instant::now();
            let read = get_user(app, id, Some(bound)).await.display_name;
            if read == name {
                return true;
            }
            assert!(
                started.saturating_duration_since(written) <= bound,
                "{read:?} served {:?} after the write, beyond the bound {bound:?}",
                started.saturating_duration_since(written)
            );
            false
        },
    )
    .await;
}

#[api_test]
async fn a_strong_read_is_never_stale_across_two_replicas_even_beside_a_near_entry() {
    let first = spawn().await;
    let second = first.spawn_replica().await;
    let mut user = create_user(&first).await;
    let held = wait_for_near(&second, user.id).await;
    let current = get_user(&second, user.id, None).await;
    assert_ne!(
        current.display_name, held,
        "a strong read skips the near cache"
    );
    user.version = current.version;

    for round in 0..5 {
        let name = format!("round {round}");
        let (writer, reader) = if round % 2 == 0 {
            (&first, &second)
        } else {
            (&second, &first)
        };
        get_user(reader, user.id, Some(MAX)).await;
        user = rename(writer, &user, &name).await;
        assert_eq!(get_user(reader, user.id, None).await, user, "round {round}");
    }
}

#[api_test]
async fn a_bounded_read_after_a_write_on_another_replica_is_fresh_within_its_bound() {
    let first = spawn().await;
    let second = first.spawn_replica().await;
    let user = create_user(&first).await;
    let held = wait_for_near(&second, user.id).await;

    let renamed = rename(&first, &user, "written on the first").await;
    let written = Instant::now();

    assert_ne!(held, renamed.display_name);
    fresh_within(
        &second,
        user.id,
        &renamed.display_name,
        Duration::from_secs(2),
        written,
    )
    .await;
}

/// The apps' invalidation subscribers (named after their key prefix): id
/// and whether subscribed, from `CLIENT LIST`.
async fn subscribers(app: &TestApp) -> Vec<(String, bool)> {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    let name = format!("name={}:v1:near:", app.settings.redis.key_prefix);
    list.lines()
        .filter(|line| line.split(' ').any(|field| field.starts_with(&name)))
        .map(|line| {
            let field = |key: &str| {
                line.split(' ')
                    .find_map(|f| f.strip_prefix(key))
                    .unwrap_or_default()
                    .to_owned()
            };
            (field("id="), field("sub=") != "0")
        })
        .collect()
}

/// Kills every invalidation subscriber of the apps' namespace (this test's
/// own only); their ids.
async fn sever(app: &TestApp) -> Vec<String> {
    let killed: Vec<String> = subscribers(app)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for id in &killed {
        let _: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    killed
}

#[api_test]
async fn a_severed_invalidation_channel_flushes_the_tier_and_never_serves_beyond_the_bound() {
    let first = spawn().await;
    let second = first.spawn_replica().await;
    let user = create_user(&first).await;
    let held = wait_for_near(&second, user.id).await;
    let killed = sever(&second).await;
    assert_eq!(killed.len(), 2, "one subscriber per replica: {killed:?}");

    // Both resubscribe, on new connections, and what the tier held is gone.
    wait_until(
        "both replicas resubscribed",
        Duration::from_secs(20),
        async || {
            let now = subscribers(&second).await;
            now.len() == 2
                && now
                    .iter()
                    .all(|(id, subscribed)| *subscribed && !killed.contains(id))
        },
    )
    .await;
    let read = get_user(&second, user.id, Some(MAX)).await;
    assert_ne!(read.display_name, held, "flushed when the channel dropped");

    // A write while the channels are down: bounded reads on the other
    // replica answer it within their bound.
    assert_eq!(sever(&second).await.len(), 2);
    let renamed = rename(&first, &read, "written while severed").await;
    let written = Instant::now();
    fresh_within(
        &second,
        user.id,
        &renamed.display_name,
        Duration::from_secs(2),
        written,
    )
    .await;
}

#[api_test]
async fn a_bounded_get_product_is_served_from_the_near_cache_and_a_strong_one_is_not() {
    let app = spawn().await;
    let product = app.create_product(1000, 5).await;
    let catalog = async |bound: Option<Duration>| {
        app.catalog()
            .await
            .get_product(pb::GetProductRequest {
                id: product.id,
                max_staleness: bound.and_then(staleness),
            })
            .await
            .unwrap()
            .into_inner()
            .price_cents
    };
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut price = 1000;
    wait_until(
        "the near cache serves bounded reads",
        Duration::from_secs(20),
        async || {
            let before = catalog(Some(MAX)).await;
            price += 1;
            sqlx::query("UPDATE products SET price = $2::numeric / 100 WHERE id = $1")
                .bind(product.id)
                .bind(price)
                .execute(&app.db)
                .await
                .unwrap();
            let _: u64 = conn
                .del(app.cache_key("product", product.id))
                .await
                .unwrap();
            catalog(Some(MAX)).await == before
        },
    )
    .await;

    assert_eq!(
        catalog(None).await,
        price,
        "a strong read sees the database"
    );
}

#[api_test]
async fn a_negative_or_too_large_max_staleness_is_invalid_argument() {
    let app = spawn().await;
    for bound in [
        prost_types::Duration {
            seconds: -1,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: MAX.as_secs() as i64 + 1,
            nanos: 0,
        },
    ] {
        let status = app
            .users()
            .await
            .get_user(pb::GetUserRequest {
                id: 1,
                max_staleness: Some(bound),
            })
            .await
            .unwrap_err();
        assert_error(&status, Code::InvalidArgument, "INVALID_ARGUMENT");
        assert_eq!(violated_fields(&status), ["max_staleness"]);
        let status = app
            .catalog()
            .await
            .get_product(pb::GetProductRequest {
                id: 1,
                max_staleness: Some(bound),
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&status), ["max_staleness"]);
    }
}
