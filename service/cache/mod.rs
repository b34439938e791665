//! Redis cache-aside. Redis is never the source of truth: every failure,
//! timeout or open circuit turns into a read from PostgreSQL.
//!
//! **Keys** are `<prefix>:v1:<entity>:<id>` (`dg:v1:user:42`); `v1` is the
//! value format, bumped when a cached type changes shape. On a Redis Cluster
//! (`redis.mode = "cluster"`) what follows `v1:` is a hash tag
//! (`dg:v1:{user:42}`, `dg:v1:{search}:<hash>`), so a key, its generation
//! and its lock share a slot, as the scripts below require. Single mode keeps
//! the untagged keys, so switching modes starts with an empty cache rather
//! than changing the keys an existing deployment uses. Values are
//! `V` + postcard (a compact, serde-based binary encoding: no field names, so
//! a user is a third of its JSON size, and no schema to maintain next to the
//! Rust types), or `N` for a remembered "not found" (short TTL). TTLs carry
//! ± jitter so entries written together do not expire together.
//!
//! **Invalidation fence.** Each key has a generation counter, `<key>:gen`.
//! A reader that misses remembers the generation it saw; after loading from
//! PostgreSQL it fills the key only if the generation is unchanged (one Lua
//! script). A writer, after its transaction commits, increments the
//! generation and deletes the value (one script). So a read that loaded the
//! old row before a write committed cannot put it back after the delete.
//! Generations expire after ten minutes, far beyond any call's deadline;
//! an expired generation reads as `0`, which never matches a reader that saw
//! one, so expiry can only refuse a fill, never admit a stale one.
//!
//! **Writes never fail because of Redis.** An invalidation that cannot reach
//! Redis is queued (bounded; on overflow the whole namespace is flushed
//! instead) and replayed before this process uses Redis again, and by the
//! background probe, so a Redis that comes back with its old data serves
//! nothing stale to this replica.
//!
//! **Query results** (search pages) depend on many rows, so no row's write
//! can name their keys. They belong to a [`Family`] with one generation
//! counter, `<prefix>:v1:<family>:gen`, which every write that can change a
//! result increments (after commit, queued and replayed like any
//! invalidation). An entry is keyed by a hash of the normalized query and
//! stores the generation it was computed at; it is a hit only while that
//! generation is current, and it is filled only if the generation is still
//! the one seen before computing it. Stale entries are never served; they
//! expire with the query TTL.
//!
//! **Stampedes.** Concurrent misses on one key share one load in-process
//! (single flight), and across replicas a short `SET NX PX` lock lets one
//! replica load while the others poll the key until it is filled or the lock
//! is gone. Batch reads use one `MGET` and one database query for the misses.
//!
//! **Cluster.** `MGET` and `UNLINK` across slots are split per slot by the
//! cluster client. A script's keys must share a slot, so batch fills and
//! invalidations send one script call per key there (concurrently, on one
//! multiplexed connection). Each query family lives in one slot (its entries
//! must be fenced by its one generation): entries are short-lived and small,
//! but a very hot family loads a single primary. Reads go to primaries only:
//! a lagging replica's generation would open the fence. A namespace flush
//! scans every primary.
//!
//! **Fail-open.** Every command, pool wait included, is bounded by
//! `command_timeout`. After `breaker_failures` consecutive failures the
//! circuit opens for `breaker_open_for`; then one probe decides. Health
//! reports the `redis` entry NOT_SERVING meanwhile; the service stays SERVING.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use deadpool_redis::{
    Runtime, Timeouts,
    cluster::ClusterConnection,
    redis::{
        self, Script, ScriptInvocation,
        aio::ConnectionLike,
        cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo},
    },
};
use secrecy::ExposeSecret as _;
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::OnceCell;

use crate::{
    config::{RedisMode, RedisSettings},
    domain::error::Result,
    statements,
};

const FORMAT: &str = "v1";
const GENERATION_TTL: Duration = Duration::from_secs(600);
const MAX_PENDING: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entity {
    User,
    Product,
    Order,
}

impl Entity {
    pub fn name(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Product => "product",
            Self::Order => "order",
        }
    }
}

/// Query results invalidated together (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// SearchProducts pages: product ids in order and the next page token.
    Search,
    /// Analytics answers, made stale by each refresh of the sales view.
    Analytics,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Self::Search => "search",
            Self::Analytics => "analytics",
        }
    }
}

/// The names hit and miss counters are kept under.
const COUNTED: [&str; 5] = ["user", "product", "order", "search", "analytics"];

/// Fills keys whose generation is unchanged. KEYS: value, its generation
/// key (per key); ARGV: expected generation, payload, ttl in ms (per key).
const FILL: &str = r"
local filled = 0
for i = 1, #KEYS, 2 do
  local j = (i - 1) / 2 * 3
  if (redis.call('GET', KEYS[i + 1]) or '0') == ARGV[j + 1] then
    redis.call('SET', KEYS[i], ARGV[j + 2], 'PX', ARGV[j + 3])
    filled = filled + 1
  end
end
return filled";

/// Bumps each key's generation and deletes its value. KEYS: value,
/// generation (per key); ARGV[1]: generation ttl in ms.
const INVALIDATE: &str = r"
for i = 1, #KEYS, 2 do
  redis.call('INCR', KEYS[i + 1])
  redis.call('PEXPIRE', KEYS[i + 1], ARGV[1])
  redis.call('DEL', KEYS[i])
end
return #KEYS / 2";

/// Releases a fill lock only if this process still holds it.
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";

/// A loaded entry, shared by the callers of one single flight.
#[derive(Clone)]
enum Fetched {
    Found(Arc<Vec<u8>>),
    Missing,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct Pending {
    keys: HashSet<(Entity, i64)>,
    families: HashSet<Family>,
    overflowed: bool,
}

#[derive(Debug)]
enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { since: Instant },
}

struct Breaker {
    state: Mutex<BreakerState>,
    failures_to_open: u32,
    open_for: Duration,
}

impl Breaker {
    /// Whether to call Redis now. After the open period, one caller (the
    /// probe) is let through; if it never reports, another is let through
    /// after another period.
    fn allow(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match *state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until } | BreakerState::HalfOpen { since: until }
                if now >= until =>
            {
                *state = BreakerState::HalfOpen {
                    since: now + self.open_for,
                };
                true
            }
            _ => false,
        }
    }

    fn success(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*state, BreakerState::Closed { .. }) {
            tracing::info!(dependency = "redis", "circuit closed: Redis answers again");
        }
        *state = BreakerState::Closed { failures: 0 };
    }

    fn failure(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let open = |state: &mut BreakerState| {
            *state = BreakerState::Open {
                until: Instant::now() + self.open_for,
            };
        };
        match *state {
            BreakerState::Closed { failures } if failures + 1 >= self.failures_to_open => {
                tracing::warn!(
                    dependency = "redis",
                    failures = failures + 1,
                    "circuit open: reads go to PostgreSQL"
                );
                open(&mut state);
            }
            BreakerState::Closed { failures } => {
                *state = BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            BreakerState::HalfOpen { .. } => open(&mut state),
            BreakerState::Open { .. } => {}
        }
    }

    fn is_closed(&self) -> bool {
        matches!(
            *self.state.lock().unwrap_or_else(|e| e.into_inner()),
            BreakerState::Closed { .. }
        )
    }
}

/// Connections to one Redis, or to a Redis Cluster.
enum Pool {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

impl Pool {
    async fn get(&self) -> std::result::Result<Conn, String> {
        Ok(match self {
            Self::Single(pool) => Conn::Single(pool.get().await.map_err(|e| e.to_string())?),
            Self::Cluster(pool) => Conn::Cluster(pool.get().await.map_err(|e| e.to_string())?),
        })
    }

    fn status(&self) -> deadpool_redis::Status {
        match self {
            Self::Single(pool) => pool.status(),
            Self::Cluster(pool) => pool.status(),
        }
    }
}

/// A pooled connection. On a cluster each command goes to the primary of
/// its keys' slot (split per slot for `MGET` and `UNLINK`).
enum Conn {
    Single(deadpool_redis::Connection),
    Cluster(deadpool_redis::cluster::Connection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

impl Conn {
    /// Runs `script` over `items` (`add` gives an item's keys and arguments,
    /// `tail` the arguments after all of them), summing its integer replies.
    /// One call on one Redis. On a cluster a script's keys must share a slot,
    /// and only one item's keys do: one call per item, concurrently, on
    /// clones of the multiplexed connection.
    async fn invoke_each<T>(
        &mut self,
        script: &Script,
        items: &[T],
        add: impl Fn(&mut ScriptInvocation<'_>, &T),
        tail: Option<u64>,
    ) -> redis::RedisResult<u64> {
        let invocation = |items: &[T]| {
            let mut invocation = script.prepare_invoke();
            for item in items {
                add(&mut invocation, item);
            }
            if let Some(arg) = tail {
                invocation.arg(arg);
            }
            invocation
        };
        match self {
            Self::Single(conn) => invocation(items).invoke_async(conn).await,
            Self::Cluster(conn) => {
                let cluster: &ClusterConnection = conn;
                let calls = items.chunks(1).map(|item| {
                    let invocation = invocation(item);
                    let mut conn = cluster.clone();
                    async move { invocation.invoke_async::<u64>(&mut conn).await }
                });
                Ok(futures_util::future::try_join_all(calls)
                    .await?
                    .into_iter()
                    .sum())
            }
        }
    }
}

/// The cache; cheap to clone. Built without a URL it is off, and every read
/// goes straight to its loader.
#[derive(Clone)]
pub struct Cache {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    pool: Pool,
    /// Keys carry hash tags (see the module documentation).
    cluster: bool,
    prefix: String,
    command_timeout: Duration,
    ttl: Duration,
    jitter: f64,
    negative_ttl: Duration,
    query_ttl: Duration,
    analytics_ttl: Duration,
    lock_ttl: Duration,
    breaker: Breaker,
    flights: Mutex<HashMap<String, Arc<OnceCell<Fetched>>>>,
    pending: Mutex<Pending>,
    counters: HashMap<&'static str, Counters>,
    fill: Script,
    invalidate: Script,
    unlock: Script,
}

impl Cache {
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    pub fn new(settings: &RedisSettings) -> anyhow::Result<Self> {
        let url = settings.url.expose_secret().trim();
        if url.is_empty() {
            return Ok(Self::disabled());
        }
        let mut pool_config = deadpool_redis::PoolConfig::new(settings.pool_size);
        pool_config.timeouts = Timeouts {
            wait: Some(settings.wait_timeout),
            create: Some(settings.create_timeout),
            recycle: Some(settings.recycle_timeout),
        };
        let invalid =
            |e: &dyn std::fmt::Display| anyhow::anyhow!("invalid configuration: redis.url: {e}");
        let pool = match settings.mode {
            RedisMode::Single => {
                let mut config = deadpool_redis::Config::from_url(url);
                config.pool = Some(pool_config);
                Pool::Single(
                    config
                        .create_pool(Some(Runtime::Tokio1))
                        .map_err(|e| invalid(&e))?,
                )
            }
            RedisMode::Cluster => {
                let urls: Vec<String> = url
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .collect();
                let mut config = deadpool_redis::cluster::Config::from_urls(urls);
                config.pool = Some(pool_config);
                // Primaries only: a lagging replica's generation would let a
                // stale fill or read through the fence.
                config.read_from_replicas = false;
                Pool::Cluster(
                    config
                        .create_pool(Some(Runtime::Tokio1))
                        .map_err(|e| invalid(&e))?,
                )
            }
        };
        Ok(Self {
            inner: Some(Arc::new(Inner {
                pool,
                cluster: settings.mode == RedisMode::Cluster,
                prefix: format!("{}:{FORMAT}", settings.key_prefix),
                command_timeout: settings.command_timeout,
                ttl: settings.ttl,
                jitter: settings.ttl_jitter,
                negative_ttl: settings.negative_ttl,
                query_ttl: settings.query_ttl,
                analytics_ttl: settings.analytics_ttl,
                lock_ttl: settings.lock_ttl,
                breaker: Breaker {
                    state: Mutex::new(BreakerState::Closed { failures: 0 }),
                    failures_to_open: settings.breaker_failures.max(1),
                    open_for: settings.breaker_open_for,
                },
                flights: Mutex::default(),
                pending: Mutex::default(),
                counters: COUNTED
                    .iter()
                    .map(|name| (*name, Counters::default()))
                    .collect(),
                fill: Script::new(FILL),
                invalidate: Script::new(INVALIDATE),
                unlock: Script::new(UNLOCK),
            })),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Cache-aside read of one entity: a hit, or one load per key across
    /// concurrent callers (and replicas), then a fenced fill.
    pub async fn get_or_load<T, F, Fut>(
        &self,
        entity: Entity,
        id: i64,
        load: F,
    ) -> Result<Option<T>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        let Some(inner) = &self.inner else {
            return load().await;
        };
        let key = inner.key(entity, id);
        let generation = match inner
            .lookup(entity.name(), std::slice::from_ref(&key))
            .await
        {
            Some(mut found) => match found.pop() {
                Some(Lookup::Hit(bytes)) => return Ok(decode(&bytes)),
                Some(Lookup::Missing) => return Ok(None),
                Some(Lookup::Miss(generation)) => Some(generation),
                None => None,
            },
            None => None,
        };

        let flight = inner.flight(&key);
        let fetched = flight
            .get_or_try_init(|| inner.load_once(entity, &key, generation, load))
            .await;
        inner.end_flight(&key, &flight);
        Ok(match fetched? {
            Fetched::Found(bytes) => decode(bytes),
            Fetched::Missing => None,
        })
    }

    /// Cache-aside read of many entities: one `MGET`, then one `load` of all
    /// the misses, then one fenced fill. Missing ids map to `None`.
    pub async fn get_many_or_load<T, F, Fut>(
        &self,
        entity: Entity,
        ids: &[i64],
        load: F,
    ) -> Result<HashMap<i64, Option<T>>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(Vec<i64>) -> Fut,
        Fut: Future<Output = Result<HashMap<i64, T>>>,
    {
        let unique: Vec<i64> = ids
            .iter()
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let Some(inner) = &self.inner else {
            let mut found = load(unique.clone()).await?;
            return Ok(unique
                .into_iter()
                .map(|id| (id, found.remove(&id)))
                .collect());
        };
        let keys: Vec<String> = unique.iter().map(|id| inner.key(entity, *id)).collect();
        let lookups = inner.lookup(entity.name(), &keys).await;
        let mut result = HashMap::with_capacity(unique.len());
        let mut misses = Vec::new();
        let mut generations = HashMap::new();
        match lookups {
            Some(lookups) => {
                for ((id, key), lookup) in unique.iter().zip(keys).zip(lookups) {
                    match lookup {
                        Lookup::Hit(bytes) => {
                            result.insert(*id, decode(&bytes));
                        }
                        Lookup::Missing => {
                            result.insert(*id, None);
                        }
                        Lookup::Miss(generation) => {
                            misses.push(*id);
                            generations.insert(*id, (key, generation));
                        }
                    }
                }
            }
            None => misses = unique.clone(),
        }
        if misses.is_empty() {
            return Ok(result);
        }
        let mut loaded = load(misses.clone()).await?;
        let mut fills = Vec::with_capacity(generations.len());
        for id in misses {
            let value = loaded.remove(&id);
            if let Some((key, generation)) = generations.remove(&id) {
                fills.push(Fill::entity(key, generation, inner.encode(value.as_ref())?));
            }
            result.insert(id, value);
        }
        inner.fill(entity.name(), fills).await;
        Ok(result)
    }

    /// Cache-aside read of a query result of `family`, keyed by `params` (the
    /// normalized query, which must determine the result): a hit while the
    /// family's generation is unchanged, else one computation per key across
    /// concurrent callers in this process, then a fenced fill.
    pub async fn get_or_compute<T, F, Fut>(
        &self,
        family: Family,
        params: &str,
        compute: F,
    ) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let Some(inner) = &self.inner else {
            return compute().await;
        };
        let key = inner.query_key(family, params);
        let generation_key = inner.generation_key(family);
        let lookup = inner.lookup_query(family, &key, &generation_key).await;
        let generation = match lookup {
            Some(QueryLookup::Hit(value)) => {
                if let Some(value) = decode_query(&value) {
                    return Ok(value);
                }
                None
            }
            Some(QueryLookup::Miss(generation)) => Some(generation),
            None => None,
        };
        let flight = inner.flight(&key);
        let fetched = flight
            .get_or_try_init(|| async {
                let value = compute().await?;
                let payload =
                    postcard::to_extend(&(generation.unwrap_or(0), &value), vec![b'V'])
                        .map_err(|e| anyhow::anyhow!("encoding a cached query result: {e}"))?;
                if let Some(generation) = generation {
                    let ttl = inner.ttl_with_jitter(match family {
                        Family::Search => inner.query_ttl,
                        Family::Analytics => inner.analytics_ttl,
                    });
                    let fill = Fill {
                        key: key.clone(),
                        generation_key: generation_key.clone(),
                        generation: generation.to_string(),
                        payload: payload.clone(),
                        ttl_ms: ttl,
                    };
                    inner.fill(family.name(), vec![fill]).await;
                }
                Ok::<_, crate::domain::error::Error>(Fetched::Found(Arc::new(payload)))
            })
            .await;
        inner.end_flight(&key, &flight);
        match fetched? {
            Fetched::Found(bytes) => decode_query(bytes.as_slice())
                .ok_or_else(|| anyhow::anyhow!("a query result did not decode").into()),
            Fetched::Missing => Err(anyhow::anyhow!("a query result cannot be missing").into()),
        }
    }

    /// Makes every cached result of `family` stale. Call after the
    /// transaction commits; never fails (queued when Redis is unreachable).
    pub async fn invalidate_family(&self, family: Family) {
        let Some(inner) = &self.inner else { return };
        inner.forget_flights(&inner.query_key_prefix(family));
        let generation_key = inner.generation_key(family);
        let bumped = inner
            .guarded("invalidate", async |conn| {
                redis::cmd("INCR")
                    .arg(&generation_key)
                    .query_async::<u64>(conn)
                    .await
            })
            .await;
        if bumped.is_none() {
            let mut pending = inner.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.families.insert(family);
            tracing::warn!(
                family = family.name(),
                "cache invalidation queued until Redis answers"
            );
        }
    }

    /// Deletes the entries of entities whose rows changed. Call after the
    /// transaction commits. Never fails: when Redis is unreachable the keys
    /// are queued and replayed before Redis is used again.
    pub async fn invalidate(&self, entries: &[(Entity, i64)]) {
        let Some(inner) = &self.inner else { return };
        if entries.is_empty() {
            return;
        }
        for (entity, id) in entries {
            inner.forget_flight(&inner.key(*entity, *id));
        }
        if !inner.apply_invalidations(entries).await {
            inner.queue(entries);
        }
    }

    /// Replays queued invalidations and checks Redis (for the readiness
    /// loop). `None` when caching is off, else whether Redis is usable.
    pub async fn probe(&self) -> Option<bool> {
        let inner = self.inner.as_ref()?;
        let ok = inner
            .guarded("ping", async |conn| {
                redis::cmd("PING").query_async::<String>(conn).await
            })
            .await
            .is_some();
        Some(ok && inner.breaker.is_closed())
    }

    /// Pool usage and the hit rate per entity, for the metrics endpoint.
    pub fn record_gauges(&self) {
        let Some(inner) = &self.inner else { return };
        let status = inner.pool.status();
        let (max, size, available) = (
            status.max_size as f64,
            status.size as f64,
            status.available as f64,
        );
        let in_use = (size - available).max(0.0);
        metrics::gauge!("connection_pool_connections", "pool" => "redis", "state" => "idle")
            .set(available);
        metrics::gauge!("connection_pool_connections", "pool" => "redis", "state" => "in_use")
            .set(in_use);
        metrics::gauge!("connection_pool_max", "pool" => "redis").set(max);
        metrics::gauge!("connection_pool_usage", "pool" => "redis").set(if max > 0.0 {
            in_use / max
        } else {
            0.0
        });
        for (name, counters) in &inner.counters {
            let hits = counters.hits.load(Ordering::Relaxed) as f64;
            let total = hits + counters.misses.load(Ordering::Relaxed) as f64;
            if total > 0.0 {
                metrics::gauge!("cache_hit_rate", "entity" => *name).set(hits / total);
            }
        }
    }
}

enum Lookup {
    Hit(Vec<u8>),
    Missing,
    /// Not cached; the key's generation when looked up.
    Miss(String),
}

/// A value to store if its generation is still the one seen before loading.
struct Fill {
    key: String,
    generation_key: String,
    generation: String,
    payload: Vec<u8>,
    ttl_ms: u64,
}

impl Fill {
    /// An entity's fill: its generation key is `<key>:gen`.
    fn entity(key: String, generation: String, (payload, ttl_ms): (Vec<u8>, u64)) -> Self {
        Self {
            generation_key: format!("{key}:gen"),
            key,
            generation,
            payload,
            ttl_ms,
        }
    }
}

enum QueryLookup {
    /// The stored entry, computed at the current generation.
    Hit(Vec<u8>),
    /// Absent or stale; the family's generation when looked up.
    Miss(u64),
}

/// A query entry is `V` + postcard of (generation, value).
fn decode_query<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    postcard::from_bytes::<(u64, T)>(bytes.get(1..)?)
        .ok()
        .map(|(_, value)| value)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    // Only `V` payloads reach here; a payload that no longer decodes (a type
    // changed without a format bump) would be a bug, and reads as missing.
    postcard::from_bytes(bytes.get(1..)?).ok()
}

impl Inner {
    fn key(&self, entity: Entity, id: i64) -> String {
        if self.cluster {
            format!("{}:{{{}:{id}}}", self.prefix, entity.name())
        } else {
            format!("{}:{}:{id}", self.prefix, entity.name())
        }
    }

    fn counters(&self, name: &'static str) -> &Counters {
        &self.counters[name]
    }

    fn query_key_prefix(&self, family: Family) -> String {
        if self.cluster {
            format!("{}:{{{}}}:", self.prefix, family.name())
        } else {
            format!("{}:{}:", self.prefix, family.name())
        }
    }

    /// `<prefix>:v1:<family>:<sha-256 of params, 128 bits in hex>` (the
    /// family in braces on a cluster).
    fn query_key(&self, family: Family, params: &str) -> String {
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(params.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}{hex}", self.query_key_prefix(family))
    }

    fn generation_key(&self, family: Family) -> String {
        format!("{}gen", self.query_key_prefix(family))
    }

    /// Looks a query entry up with its family's generation, in one MGET.
    async fn lookup_query(
        &self,
        family: Family,
        key: &str,
        generation_key: &str,
    ) -> Option<QueryLookup> {
        let values: Option<(Option<Vec<u8>>, Option<u64>)> = self
            .guarded("mget", async |conn| {
                redis::cmd("MGET")
                    .arg(key)
                    .arg(generation_key)
                    .query_async(conn)
                    .await
            })
            .await;
        let Some((value, generation)) = values else {
            statements::record_cache_lookup(false);
            return None;
        };
        let generation = generation.unwrap_or(0);
        let stored_at = value
            .as_deref()
            .filter(|v| v.first() == Some(&b'V'))
            .and_then(|v| postcard::take_from_bytes::<u64>(&v[1..]).ok())
            .map(|(stored_at, _)| stored_at);
        let hit = stored_at == Some(generation);
        self.count_lookups(family.name(), u64::from(hit), u64::from(!hit));
        Some(match value {
            Some(value) if hit => QueryLookup::Hit(value),
            _ => QueryLookup::Miss(generation),
        })
    }

    fn ttl_with_jitter(&self, base: Duration) -> u64 {
        let mut bytes = [0u8; 4];
        let unit = if getrandom::fill(&mut bytes).is_ok() {
            f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX)
        } else {
            0.5
        };
        let factor = 1.0 + self.jitter * (2.0 * unit - 1.0);
        (base.as_secs_f64() * factor * 1000.0).max(1.0) as u64
    }

    /// The stored form of a value (`V` + postcard) or of "not found" (`N`),
    /// with its TTL. Cached types are plain structs, so encoding only fails
    /// on a programming error (such as `#[serde(flatten)]`, which postcard
    /// cannot encode): that is an internal error, never a "not found".
    fn encode<T: Serialize>(&self, value: Option<&T>) -> Result<(Vec<u8>, u64)> {
        Ok(match value {
            Some(value) => {
                let bytes = postcard::to_extend(value, vec![b'V'])
                    .map_err(|e| anyhow::anyhow!("encoding a cache value: {e}"))?;
                (bytes, self.ttl_with_jitter(self.ttl))
            }
            None => (vec![b'N'], self.ttl_with_jitter(self.negative_ttl)),
        })
    }

    /// Runs one Redis operation under the breaker and the command timeout,
    /// after replaying queued invalidations. `None` when Redis is not usable.
    async fn guarded<T>(
        &self,
        op: &'static str,
        run: impl AsyncFnOnce(&mut Conn) -> redis::RedisResult<T>,
    ) -> Option<T> {
        if !self.breaker.allow() {
            return None;
        }
        let result = tokio::time::timeout(self.command_timeout, async {
            let mut conn = self.pool.get().await?;
            self.replay(&mut conn).await.map_err(|e| e.to_string())?;
            run(&mut conn).await.map_err(|e| e.to_string())
        })
        .await;
        match result {
            Ok(Ok(value)) => {
                self.breaker.success();
                Some(value)
            }
            Ok(Err(error)) => {
                self.report_failure(op, &error);
                None
            }
            Err(_) => {
                self.report_failure(op, "timed out");
                None
            }
        }
    }

    fn report_failure(&self, op: &'static str, error: &str) {
        self.breaker.failure();
        metrics::counter!("cache_errors_total", "op" => op).increment(1);
        tracing::warn!(
            database_type = "redis",
            operation = op,
            error,
            "cache unavailable; using PostgreSQL"
        );
    }

    /// Looks keys up with their generations, in one MGET.
    async fn lookup(&self, name: &'static str, keys: &[String]) -> Option<Vec<Lookup>> {
        let mut args = Vec::with_capacity(keys.len() * 2);
        for key in keys {
            args.push(key.clone());
            args.push(format!("{key}:gen"));
        }
        let values: Option<Vec<Option<Vec<u8>>>> = self
            .guarded("mget", async |conn| {
                redis::cmd("MGET").arg(&args).query_async(conn).await
            })
            .await;
        let Some(values) = values else {
            statements::record_cache_lookup(false);
            return None;
        };
        let lookups: Vec<Lookup> = values
            .chunks(2)
            .map(|pair| {
                let generation = pair
                    .get(1)
                    .cloned()
                    .flatten()
                    .and_then(|g| String::from_utf8(g).ok())
                    .unwrap_or_else(|| "0".to_owned());
                match pair.first().cloned().flatten() {
                    Some(bytes) if bytes.first() == Some(&b'V') => Lookup::Hit(bytes),
                    Some(bytes) if bytes.as_slice() == b"N" => Lookup::Missing,
                    _ => Lookup::Miss(generation),
                }
            })
            .collect();
        let hits = lookups
            .iter()
            .filter(|l| !matches!(l, Lookup::Miss(_)))
            .count() as u64;
        self.count_lookups(name, hits, lookups.len() as u64 - hits);
        Some(lookups)
    }

    /// Counts a lookup's hits and misses (hit rate gauge, metrics, and the
    /// call's `cache_hit`: true only when nothing missed).
    fn count_lookups(&self, name: &'static str, hits: u64, misses: u64) {
        let counters = self.counters(name);
        counters.hits.fetch_add(hits, Ordering::Relaxed);
        counters.misses.fetch_add(misses, Ordering::Relaxed);
        metrics::counter!("cache_hits_total", "entity" => name).increment(hits);
        metrics::counter!("cache_misses_total", "entity" => name).increment(misses);
        statements::record_cache_lookup(misses == 0);
    }

    /// Fills keys whose generation is unchanged (one script call on one Redis).
    async fn fill(&self, name: &'static str, fills: Vec<Fill>) {
        if fills.is_empty() {
            return;
        }
        let add = |invocation: &mut ScriptInvocation<'_>, fill: &Fill| {
            invocation
                .key(&fill.key)
                .key(&fill.generation_key)
                .arg(&fill.generation)
                .arg(&fill.payload)
                .arg(fill.ttl_ms);
        };
        let filled: Option<u64> = self
            .guarded("fill", async |conn| {
                conn.invoke_each(&self.fill, &fills, add, None).await
            })
            .await;
        if let Some(filled) = filled {
            metrics::counter!("cache_fills_total", "entity" => name).increment(filled);
        }
    }

    fn flight(&self, key: &str) -> Arc<OnceCell<Fetched>> {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        flights.entry(key.to_owned()).or_default().clone()
    }

    fn end_flight(&self, key: &str, flight: &Arc<OnceCell<Fetched>>) {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            flights.remove(key);
        }
    }

    /// A write makes the current flight's answer old: later readers start a new one.
    fn forget_flight(&self, key: &str) {
        self.flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// [`forget_flight`](Self::forget_flight) for every key under `prefix`.
    fn forget_flights(&self, prefix: &str) {
        self.flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| !key.starts_with(prefix));
    }

    /// The leader of a single flight: take the cross-replica lock (or wait
    /// for the replica holding it to fill the key), load, fill, unlock.
    async fn load_once<T, F, Fut>(
        &self,
        entity: Entity,
        key: &str,
        generation: Option<String>,
        load: F,
    ) -> Result<Fetched>
    where
        T: Serialize,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        let lock_key = format!("{key}:lock");
        let token = uuid::Uuid::new_v4().to_string();
        let lock_ms = self.lock_ttl.as_millis() as u64;
        // Without a generation the lookup failed: Redis is not usable now.
        let locked: Option<Option<String>> = match generation {
            Some(_) => {
                self.guarded("lock", async |conn| {
                    redis::cmd("SET")
                        .arg(&lock_key)
                        .arg(&token)
                        .arg("NX")
                        .arg("PX")
                        .arg(lock_ms)
                        .query_async(conn)
                        .await
                })
                .await
            }
            None => None,
        };
        if let Some(None) = locked
            && let Some(fetched) = self.wait_for_fill(key, &lock_key).await
        {
            return Ok(fetched);
        }

        let value = load().await?;
        let (payload, ttl) = self.encode(value.as_ref())?;
        let fetched = if value.is_some() {
            Fetched::Found(Arc::new(payload.clone()))
        } else {
            Fetched::Missing
        };
        if let Some(generation) = generation {
            let fill = Fill::entity(key.to_owned(), generation, (payload, ttl));
            self.fill(entity.name(), vec![fill]).await;
        }
        if let Some(Some(_)) = locked {
            let _: Option<u64> = self
                .guarded("unlock", async |conn| {
                    self.unlock
                        .key(&lock_key)
                        .arg(&token)
                        .invoke_async(conn)
                        .await
                })
                .await;
        }
        Ok(fetched)
    }

    /// Another replica holds the fill lock: poll until it fills the key, or
    /// until its lock is gone or expires (then the caller loads itself).
    async fn wait_for_fill(&self, key: &str, lock_key: &str) -> Option<Fetched> {
        let deadline = Instant::now() + self.lock_ttl;
        let mut pause = Duration::from_millis(5);
        while Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
            let values: Vec<Option<Vec<u8>>> = self
                .guarded("poll", async |conn| {
                    redis::cmd("MGET")
                        .arg(key)
                        .arg(lock_key)
                        .query_async(conn)
                        .await
                })
                .await?;
            match (
                values.first().cloned().flatten(),
                values.get(1).cloned().flatten(),
            ) {
                (Some(bytes), _) if bytes.first() == Some(&b'V') => {
                    return Some(Fetched::Found(Arc::new(bytes)));
                }
                (Some(bytes), _) if bytes.as_slice() == b"N" => return Some(Fetched::Missing),
                (None, None) => return None,
                _ => {}
            }
        }
        None
    }

    /// Bumps the generation and deletes the value of each entry (one script
    /// call on one Redis).
    async fn run_invalidations(
        &self,
        conn: &mut Conn,
        entries: &[(Entity, i64)],
    ) -> redis::RedisResult<u64> {
        let add = |invocation: &mut ScriptInvocation<'_>, (entity, id): &(Entity, i64)| {
            let key = self.key(*entity, *id);
            invocation.key(&key).key(format!("{key}:gen"));
        };
        let ttl = GENERATION_TTL.as_millis() as u64;
        conn.invoke_each(&self.invalidate, entries, add, Some(ttl))
            .await
    }

    async fn apply_invalidations(&self, entries: &[(Entity, i64)]) -> bool {
        self.guarded("invalidate", async |conn| {
            self.run_invalidations(conn, entries).await
        })
        .await
        .is_some()
    }

    fn queue(&self, entries: &[(Entity, i64)]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.keys.len() + entries.len() > MAX_PENDING {
            pending.overflowed = true;
            pending.keys.clear();
        } else if !pending.overflowed {
            pending.keys.extend(entries.iter().copied());
        }
        tracing::warn!(
            queued = pending.keys.len(),
            overflowed = pending.overflowed,
            "cache invalidation queued until Redis answers"
        );
    }

    /// Applies queued invalidations on `conn`; an error leaves them queued.
    async fn replay(&self, conn: &mut Conn) -> redis::RedisResult<()> {
        let (entries, families, overflowed) = {
            let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.keys.is_empty() && pending.families.is_empty() && !pending.overflowed {
                return Ok(());
            }
            (
                pending.keys.iter().copied().collect::<Vec<_>>(),
                pending.families.iter().copied().collect::<Vec<_>>(),
                pending.overflowed,
            )
        };
        for family in &families {
            redis::cmd("INCR")
                .arg(self.generation_key(*family))
                .query_async::<u64>(&mut *conn)
                .await?;
        }
        if overflowed {
            self.flush_values(conn).await?;
        } else {
            for chunk in entries.chunks(500) {
                self.run_invalidations(conn, chunk).await?;
            }
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for entry in &entries {
            pending.keys.remove(entry);
        }
        for family in &families {
            pending.families.remove(family);
        }
        if overflowed {
            pending.overflowed = false;
        }
        tracing::info!(
            replayed = entries.len(),
            flushed = overflowed,
            "queued cache invalidations applied"
        );
        Ok(())
    }

    /// Deletes every cached value of this namespace (generations stay, so
    /// in-flight fills stay fenced). `SCAN` walks one node: on a cluster,
    /// each primary is walked in turn.
    async fn flush_values(&self, conn: &mut Conn) -> redis::RedisResult<()> {
        let Conn::Cluster(cluster) = conn else {
            return self.flush_node(conn, None).await;
        };
        let primaries = cluster
            .route_command(
                redis::cmd("PING"),
                RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
            )
            .await?;
        // One reply per primary, keyed by its "host:port".
        let primaries: HashMap<String, redis::Value> = redis::from_redis_value(primaries)?;
        for address in primaries.keys() {
            let node = address
                .rsplit_once(':')
                .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)))
                .ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "a cluster node address without a port",
                        address.clone(),
                    ))
                })?;
            self.flush_node(conn, Some(node)).await?;
        }
        Ok(())
    }

    /// [`flush_values`](Self::flush_values) on one node (`node`: its host
    /// and port, on a cluster).
    async fn flush_node(
        &self,
        conn: &mut Conn,
        node: Option<(String, u16)>,
    ) -> redis::RedisResult<()> {
        let pattern = format!("{}:*", self.prefix);
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let reply = match (&mut *conn, &node) {
                (Conn::Cluster(cluster), Some((host, port))) => {
                    let at = SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port: *port,
                    };
                    cluster
                        .route_command(scan, RoutingInfo::SingleNode(at))
                        .await?
                }
                (conn, _) => scan.query_async(conn).await?,
            };
            let (next, keys): (u64, Vec<String>) = redis::from_redis_value(reply)?;
            let values: Vec<&String> = keys.iter().filter(|k| !k.ends_with(":gen")).collect();
            if !values.is_empty() {
                redis::cmd("UNLINK")
                    .arg(values)
                    .query_async::<u64>(&mut *conn)
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}
