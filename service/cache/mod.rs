//! Redis cache-aside. Redis is never the source of truth: every failure,
//! timeout or open circuit turns into a read from PostgreSQL.
//!
//! This file is the public API ([`Cache`], [`Entity`], [`Family`]) and the
//! orchestration of one read or write; each concern it composes has a file:
//!
//! - [`keys`]: key names and cluster hash tags;
//! - [`codec`]: the stored forms (`V` + postcard, `N` for "not found") and
//!   TTL jitter;
//! - [`scripts`]: the Lua scripts of the **invalidation fence**, by which a
//!   read that loaded the old row before a write committed cannot put it
//!   back after the write's delete;
//! - [`connection`]: one Redis or a Redis Cluster behind one pool;
//! - [`breaker`]: the circuit breaker (**fail-open**);
//! - [`flight`]: single flight within this process;
//! - [`queue`]: the invalidation queue (**writes never fail because of
//!   Redis**).
//!
//! **Query results** (search pages) depend on many rows, so no row's write
//! can name their keys. They belong to a [`Family`] with one generation
//! counter, `<prefix>:v1:<family>:gen`, which every write that can change a
//! result increments (after commit, queued and replayed like any
//! invalidation). An entry is keyed by a hash of the normalized query and
//! stores the generation it was computed at; it is a hit only while that
//! generation is current, and it is filled only if the generation is still
//! the one seen before computing it. Stale entries are never served; they
//! expire with the query TTL. Each family lives in one cluster slot (its
//! entries must be fenced by its one generation): entries are short-lived
//! and small, but a very hot family loads a single primary.
//!
//! **Stampedes.** Concurrent misses on one key share one load in-process
//! (single flight), and across replicas a short `SET NX PX` lock lets one
//! replica load while the others poll the key until it is filled or the lock
//! is gone. Batch reads use one `MGET` and one database query for the misses.
//!
//! **Fail-open.** Every command, pool wait included, is bounded by
//! `command_timeout`, and runs under the circuit breaker.

mod breaker;
mod codec;
mod connection;
mod flight;
mod keys;
mod queue;
mod scripts;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use deadpool_redis::redis;
use secrecy::ExposeSecret as _;
use serde::{Serialize, de::DeserializeOwned};

use self::{
    breaker::Breaker,
    connection::{Conn, Pool},
    flight::{Fetched, Flights},
    keys::Keys,
    queue::{MAX_PENDING, Queue},
    scripts::{Fill, Scripts},
};
use crate::{
    config::{RedisMode, RedisSettings},
    domain::error::Result,
    statements,
};

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

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
}

/// The cache; cheap to clone. Built without a URL it is off, and every read
/// goes straight to its loader.
#[derive(Clone)]
pub struct Cache {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    pool: Pool,
    keys: Keys,
    command_timeout: Duration,
    ttl: Duration,
    jitter: f64,
    negative_ttl: Duration,
    query_ttl: Duration,
    analytics_ttl: Duration,
    lock_ttl: Duration,
    breaker: Breaker,
    flights: Flights,
    pending: Queue,
    counters: HashMap<&'static str, Counters>,
    scripts: Scripts,
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
        Ok(Self {
            inner: Some(Arc::new(Inner {
                pool: Pool::new(settings, url)?,
                keys: Keys::new(&settings.key_prefix, settings.mode == RedisMode::Cluster),
                command_timeout: settings.command_timeout,
                ttl: settings.ttl,
                jitter: settings.ttl_jitter,
                negative_ttl: settings.negative_ttl,
                query_ttl: settings.query_ttl,
                analytics_ttl: settings.analytics_ttl,
                lock_ttl: settings.lock_ttl,
                breaker: Breaker::new(settings.breaker_failures, settings.breaker_open_for),
                flights: Flights::default(),
                pending: Queue::new(MAX_PENDING),
                counters: COUNTED
                    .iter()
                    .map(|name| (*name, Counters::default()))
                    .collect(),
                scripts: Scripts::new(),
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
        let key = inner.keys.entity(entity, id);
        let generation = match inner
            .lookup(entity.name(), std::slice::from_ref(&key))
            .await
        {
            Some(mut found) => match found.pop() {
                Some(Lookup::Hit(bytes)) => return Ok(codec::decode(&bytes)),
                Some(Lookup::Missing) => return Ok(None),
                Some(Lookup::Miss(generation)) => Some(generation),
                None => None,
            },
            None => None,
        };

        let fetched = inner
            .flights
            .run(&key, || inner.load_once(entity, &key, generation, load))
            .await?;
        Ok(match fetched {
            Fetched::Found(bytes) => codec::decode(&bytes),
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
        let keys: Vec<String> = unique
            .iter()
            .map(|id| inner.keys.entity(entity, *id))
            .collect();
        let lookups = inner.lookup(entity.name(), &keys).await;
        let mut result = HashMap::with_capacity(unique.len());
        let mut misses = Vec::new();
        let mut generations = HashMap::new();
        match lookups {
            Some(lookups) => {
                for ((id, key), lookup) in unique.iter().zip(keys).zip(lookups) {
                    match lookup {
                        Lookup::Hit(bytes) => {
                            result.insert(*id, codec::decode(&bytes));
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
                let (payload, ttl_ms) = inner.encode(value.as_ref())?;
                fills.push(Fill::entity(key, generation, payload, ttl_ms));
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
        let key = inner.keys.query(family, params);
        let generation_key = inner.keys.family_generation(family);
        let lookup = inner.lookup_query(family, &key, &generation_key).await;
        let generation = match lookup {
            Some(QueryLookup::Hit(value)) => {
                if let Some(value) = codec::decode_query(&value) {
                    return Ok(value);
                }
                None
            }
            Some(QueryLookup::Miss(generation)) => Some(generation),
            None => None,
        };
        let fetched = inner
            .flights
            .run(&key, || async {
                let value = compute().await?;
                let payload = codec::encode_query(generation.unwrap_or(0), &value)?;
                if let Some(generation) = generation {
                    let ttl_ms = codec::ttl_ms(
                        match family {
                            Family::Search => inner.query_ttl,
                            Family::Analytics => inner.analytics_ttl,
                        },
                        inner.jitter,
                    );
                    let fill = Fill {
                        key: key.clone(),
                        generation_key: generation_key.clone(),
                        generation: generation.to_string(),
                        payload: payload.clone(),
                        ttl_ms,
                    };
                    inner.fill(family.name(), vec![fill]).await;
                }
                Ok::<_, crate::domain::error::Error>(Fetched::Found(Arc::new(payload)))
            })
            .await?;
        match fetched {
            Fetched::Found(bytes) => codec::decode_query(bytes.as_slice())
                .ok_or_else(|| anyhow::anyhow!("a query result did not decode").into()),
            Fetched::Missing => Err(anyhow::anyhow!("a query result cannot be missing").into()),
        }
    }

    /// Makes every cached result of `family` stale. Call after the
    /// transaction commits; never fails (queued when Redis is unreachable).
    pub async fn invalidate_family(&self, family: Family) {
        let Some(inner) = &self.inner else { return };
        inner
            .flights
            .forget_prefix(&inner.keys.query_prefix(family));
        let generation_key = inner.keys.family_generation(family);
        let bumped = inner
            .guarded("invalidate", async |conn| {
                redis::cmd("INCR")
                    .arg(&generation_key)
                    .query_async::<u64>(conn)
                    .await
            })
            .await;
        if bumped.is_none() {
            inner.pending.push_family(family);
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
        let keys = inner.entity_keys(entries);
        for key in &keys {
            inner.flights.forget(key);
        }
        let applied = inner
            .guarded("invalidate", async |conn| {
                inner.scripts.invalidate(conn, &keys).await
            })
            .await;
        if applied.is_none() {
            inner.pending.push(entries);
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

enum QueryLookup {
    /// The stored entry, computed at the current generation.
    Hit(Vec<u8>),
    /// Absent or stale; the family's generation when looked up.
    Miss(u64),
}

impl Inner {
    fn entity_keys(&self, entries: &[(Entity, i64)]) -> Vec<String> {
        entries
            .iter()
            .map(|(entity, id)| self.keys.entity(*entity, *id))
            .collect()
    }

    /// The stored form of an entity's loaded row (or of its "not found"),
    /// with the jittered TTL of its kind.
    fn encode<T: Serialize>(&self, value: Option<&T>) -> Result<(Vec<u8>, u64)> {
        let ttl = if value.is_some() {
            self.ttl
        } else {
            self.negative_ttl
        };
        Ok((codec::encode(value)?, codec::ttl_ms(ttl, self.jitter)))
    }

    /// Runs one Redis operation under the breaker and the command timeout,
    /// after replaying queued invalidations. `None` when Redis is not usable.
    async fn guarded<T>(
        &self,
        op: &'static str,
        run: impl AsyncFnOnce(&mut Conn) -> redis::RedisResult<T>,
    ) -> Option<T> {
        if !self.breaker.allow(Instant::now()) {
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
        self.breaker.failure(Instant::now());
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
            args.push(keys::generation_of(key));
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
                    Some(bytes) if codec::is_value(&bytes) => Lookup::Hit(bytes),
                    Some(bytes) if codec::is_not_found(&bytes) => Lookup::Missing,
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
        let hit = value.as_deref().and_then(codec::query_generation) == Some(generation);
        self.count_lookups(family.name(), u64::from(hit), u64::from(!hit));
        Some(match value {
            Some(value) if hit => QueryLookup::Hit(value),
            _ => QueryLookup::Miss(generation),
        })
    }

    /// Counts a lookup's hits and misses (hit rate gauge, metrics, and the
    /// call's `cache_hit`: true only when nothing missed).
    fn count_lookups(&self, name: &'static str, hits: u64, misses: u64) {
        let counters = &self.counters[name];
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
        let filled: Option<u64> = self
            .guarded("fill", async |conn| self.scripts.fill(conn, &fills).await)
            .await;
        if let Some(filled) = filled {
            metrics::counter!("cache_fills_total", "entity" => name).increment(filled);
        }
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
        let lock_key = keys::lock_of(key);
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
        let (payload, ttl_ms) = self.encode(value.as_ref())?;
        let fetched = if value.is_some() {
            Fetched::Found(Arc::new(payload.clone()))
        } else {
            Fetched::Missing
        };
        if let Some(generation) = generation {
            let fill = Fill::entity(key.to_owned(), generation, payload, ttl_ms);
            self.fill(entity.name(), vec![fill]).await;
        }
        if let Some(Some(_)) = locked {
            let _: Option<u64> = self
                .guarded("unlock", async |conn| {
                    self.scripts.unlock(conn, &lock_key, &token).await
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
                (Some(bytes), _) if codec::is_value(&bytes) => {
                    return Some(Fetched::Found(Arc::new(bytes)));
                }
                (Some(bytes), _) if codec::is_not_found(&bytes) => return Some(Fetched::Missing),
                (None, None) => return None,
                _ => {}
            }
        }
        None
    }

    /// Applies queued invalidations on `conn`; an error leaves them queued.
    async fn replay(&self, conn: &mut Conn) -> redis::RedisResult<()> {
        let Some(replay) = self.pending.to_replay() else {
            return Ok(());
        };
        for family in &replay.families {
            redis::cmd("INCR")
                .arg(self.keys.family_generation(*family))
                .query_async::<u64>(&mut *conn)
                .await?;
        }
        if replay.flush {
            // Generations stay, so in-flight fills stay fenced.
            conn.unlink_matching(&self.keys.namespace_pattern(), keys::is_generation)
                .await?;
        } else {
            for chunk in replay.entries.chunks(500) {
                self.scripts
                    .invalidate(conn, &self.entity_keys(chunk))
                    .await?;
            }
        }
        self.pending.replayed(&replay);
        tracing::info!(
            replayed = replay.entries.len(),
            flushed = replay.flush,
            "queued cache invalidations applied"
        );
        Ok(())
    }
}
