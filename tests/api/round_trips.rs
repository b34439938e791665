//! How many commands a cache read sends to Redis, counted by Redis itself
//! (`MONITOR`, filtered to a key prefix of the test's own): a miss is the
//! lookup script and the fill script, a hit the lookup script alone.

use std::time::Duration;

use datagate::{
    cache::{Cache, Entity},
    config::{RedisMode, Settings},
};
use deadpool_redis::redis::{self, AsyncCommands as _};
use futures_util::StreamExt as _;

use crate::support::{
    api_test,
    redis::{redis_cluster_urls, redis_url},
};

fn settings(prefix: &str, mode: RedisMode, url: String) -> Settings {
    let mut settings =
        Settings::load_with_overrides(None, &[("database.url", "postgres://unused/unused")])
            .unwrap();
    settings.redis.mode = mode;
    settings.redis.url = url.into();
    settings.redis.key_prefix = prefix.to_owned();
    settings.redis.command_timeout = Duration::from_secs(2);
    settings.redis.wait_timeout = Duration::from_secs(2);
    settings
}

/// The commands clients (not scripts) sent to `monitored` with `prefix` in
/// them while `read` ran, by name: after `read`, a `GET end` through
/// `marker` (a key of the slot being watched, on a cluster) closes the list.
async fn commands_of(
    monitored: &str,
    prefix: &str,
    end: &str,
    marker: &mut redis::aio::MultiplexedConnection,
    read: impl AsyncFnOnce(),
) -> Vec<String> {
    let client = redis::Client::open(monitored).unwrap();
    let mut lines = client
        .get_async_monitor()
        .await
        .unwrap()
        .into_on_message::<String>();
    read().await;
    let _: Option<String> = marker.get(end).await.unwrap();
    let mut commands = Vec::new();
    let collect = async {
        while let Some(line) = lines.next().await {
            if !line.contains(prefix) || line.contains(" lua]") {
                continue;
            }
            if line.contains(&format!("\"{end}\"")) {
                return;
            }
            // `<time> [<db> <client>] "COMMAND" "arg" ...`
            let command = line
                .split_once("] \"")
                .and_then(|(_, rest)| rest.split('"').next())
                .unwrap_or_default();
            commands.push(command.to_lowercase());
        }
    };
    tokio::time::timeout(Duration::from_secs(30), collect)
        .await
        .expect("MONITOR shows the marker");
    commands
}

async fn a_miss_then_a_hit(cache: &Cache, id: i64) {
    for _ in 0..2 {
        let read = cache
            .get_or_load(Entity::User, id, || async {
                Ok(Some(format!("user {id}")))
            })
            .await
            .unwrap();
        assert_eq!(read, Some(format!("user {id}")));
    }
}

/// Counts the commands of a miss and of a hit of user `id`, whose key is
/// `key`, on the node holding it (`monitored`).
async fn count(
    cache: &Cache,
    monitored: &str,
    prefix: &str,
    (id, key): (i64, &str),
) -> (Vec<String>, Vec<String>) {
    let client = redis::Client::open(monitored).unwrap();
    let mut marker = client.get_multiplexed_async_connection().await.unwrap();
    let end = format!("{key}:end");
    let load = || async move { Ok(Some(format!("user {id}"))) };
    let miss = commands_of(monitored, prefix, &end, &mut marker, async || {
        cache.get_or_load(Entity::User, id, load).await.unwrap();
    })
    .await;
    let hit = commands_of(monitored, prefix, &end, &mut marker, async || {
        cache.get_or_load(Entity::User, id, load).await.unwrap();
    })
    .await;
    (miss, hit)
}

#[api_test]
async fn a_miss_costs_two_redis_commands_and_a_hit_one() {
    let prefix = format!("dgtest-{}", uuid::Uuid::new_v4().simple());
    let url = redis_url();
    let cache = Cache::new(&settings(&prefix, RedisMode::Single, url.clone()).redis).unwrap();
    // The first use of each script may load it (NOSCRIPT, then EVAL).
    a_miss_then_a_hit(&cache, 1).await;

    let key = format!("{prefix}:v1:user:2");
    let (miss, hit) = count(&cache, &url, &prefix, (2, &key)).await;

    assert_eq!(miss, ["evalsha", "evalsha"], "lookup, then fill and unlock");
    assert_eq!(hit, ["evalsha"], "the lookup");
}

#[api_test]
async fn on_a_cluster_a_miss_costs_two_redis_commands_and_a_hit_one() {
    let prefix = format!("dgtest-{}", uuid::Uuid::new_v4().simple());
    let urls = redis_cluster_urls();
    let cache = Cache::new(&settings(&prefix, RedisMode::Cluster, urls.clone()).redis).unwrap();
    let key = format!("{prefix}:v1:{{user:2}}");
    // The primary holding the key (and, by its hash tag, its generation
    // and lock): the one that answers for it without a redirection.
    let mut holder = None;
    for url in urls.split(',') {
        let client = redis::Client::open(url.trim()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let answered: redis::RedisResult<Option<String>> = conn.get(&key).await;
        if answered.is_ok() {
            holder = Some(url.trim().to_owned());
        }
    }
    let holder = holder.expect("a node serves the key's slot");
    a_miss_then_a_hit(&cache, 1).await;
    a_miss_then_a_hit(&cache, 3).await;

    // The marker is a key of the same slot, sent to the holder directly.
    let (miss, hit) = count(&cache, &holder, &prefix, (2, &key)).await;

    assert_eq!(miss, ["evalsha", "evalsha"], "lookup, then fill and unlock");
    assert_eq!(hit, ["evalsha"], "the lookup");
}
