//! Redis cache-aside. Redis is never the source of truth: every failure,
//! timeout or open circuit turns into a read from PostgreSQL.
//!
//! This file is the public API ([`Cache`], [`Entity`], [`Family`]) and the
//! orchestration of one read or write; each concern it composes has a file:
//!
//! - `keys`: key names and cluster hash tags;
//! - `codec`: the stored forms (`V` + postcard, `N` for "not found") and
//!   TTL jitter;
//! - `scripts`: the Lua scripts of the **invalidation fence**, by which a
//!   read that loaded the old row before a write committed cannot put it
//!   back after the write's delete;
//! - `connection`: one Redis or a Redis Cluster behind one pool;
//! - `tls`: `rediss://`: the CA, the client certificate and the ACL user;
//! - `breaker`: the circuit breaker (**fail-open**);
//! - `flight`: single flight within this process;
//! - `queue`: the invalidation queue (**writes never fail because of
//!   Redis**);
//! - `near`: the in-process tier for bounded-staleness reads, kept coherent
//!   by the invalidation messages the invalidation script publishes.
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
//! `command_timeout`, or by the call's remaining deadline when that is
//! shorter, and runs under the circuit breaker. A command cut short by the
//! caller's deadline is not held against Redis: it is the caller's budget
//! that ran out, not Redis's health, so the breaker does not count it (it
//! is counted in `cache_deadline_cutoffs_total`).

mod breaker;
mod codec;
mod connection;
mod flight;
mod keys;
mod near;
mod queue;
mod scripts;
mod tls;

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
    codec::Stored,
    connection::{Conn, Failure, Pool},
    flight::{Fetched, Flights},
    keys::Keys,
    near::Near,
    queue::{MAX_PENDING, Queue, Replay},
    scripts::{Fill, Looked, Scripts},
};
use crate::{
    config::{RedisMode, RedisSettings},
    error::{Error, Result},
    model::{
        deadline::{Deadline, wait_bound},
        diagnostics::{PoolStats, RedisInfo},
    },
    statements,
    telemetry::{DbOperation, DbSpan, DbSystem, Peer},
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

/// The names hit and miss counters are kept under (the `entity` label of
/// the `cache_*_total` counters).
pub const COUNTED: [&str; 5] = ["user", "product", "order", "search", "analytics"];

/// One entity's lookups: the totals behind the hit rate gauge, and its
/// Prometheus counters, resolved once.
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    hits_total: metrics::Counter,
    misses_total: metrics::Counter,
    bypassed_total: metrics::Counter,
    fills_total: metrics::Counter,
}

impl Counters {
    fn of(entity: &'static str) -> Self {
        Self {
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            hits_total: metrics::counter!("cache_hits_total", "entity" => entity),
            misses_total: metrics::counter!("cache_misses_total", "entity" => entity),
            bypassed_total: metrics::counter!("cache_bypassed_total", "entity" => entity),
            fills_total: metrics::counter!("cache_fills_total", "entity" => entity),
        }
    }
}

/// What a cache-aside read runs on a miss: one load of the value from its
/// source of truth (`None`: there is none), e.g. `|| async { ... }`.
pub trait Load<T>: FnOnce() -> Self::Loading {
    type Loading: Future<Output = Result<Option<T>>>;
}

impl<T, F, Fut> Load<T> for F
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    type Loading = Fut;
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
    /// A timeout noticed this late is not a breaker failure (zero: all are).
    ignore_late_by: Duration,
    ttl: Duration,
    jitter: f64,
    negative_ttl: Duration,
    query_ttl: Duration,
    analytics_ttl: Duration,
    lock_ttl: Duration,
    breaker: Breaker,
    /// When Redis last answered anything (see [`Answers`]).
    answers: Answers,
    flights: Flights,
    pending: Queue,
    counters: HashMap<&'static str, Counters>,
    scripts: Scripts,
    /// The server the command spans name (a cluster's first seed).
    peer: Option<Peer>,
    /// The near cache (`redis.near_max_bytes` zero: none), and how to reach
    /// the nodes its subscriber may listen on.
    near: Option<Arc<Near>>,
    subscriber: Vec<deadpool_redis::redis::ConnectionInfo>,
    /// This process's fill-lock token: a lock holding it was taken by one of
    /// this process's calls, whose single flight the others join, so any of
    /// them may load (see `Inner::load_once`).
    token: String,
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
        let keys = Keys::new(&settings.key_prefix, settings.mode == RedisMode::Cluster);
        let near = (settings.near_max_bytes > 0).then(|| {
            Arc::new(Near::new(
                settings.near_max_bytes,
                settings.near_max_staleness,
                keys.clone(),
            ))
        });
        Ok(Self {
            inner: Some(Arc::new(Inner {
                pool: Pool::new(settings, url)?,
                subscriber: match near {
                    Some(_) => connection::subscriber_infos(settings, url)?,
                    None => Vec::new(),
                },
                near,
                keys,
                command_timeout: settings.command_timeout,
                ignore_late_by: settings.breaker_ignore_late_by,
                ttl: settings.ttl,
                jitter: settings.ttl_jitter,
                negative_ttl: settings.negative_ttl,
                query_ttl: settings.query_ttl,
                analytics_ttl: settings.analytics_ttl,
                lock_ttl: settings.lock_ttl,
                breaker: Breaker::new(settings.breaker_failures, settings.breaker_open_for),
                answers: Answers::new(),
                flights: Flights::default(),
                pending: Queue::new(MAX_PENDING),
                counters: COUNTED
                    .iter()
                    .map(|name| (*name, Counters::of(name)))
                    .collect(),
                scripts: Scripts::new(),
                peer: Peer::from_url(DbSystem::Redis, url),
                token: uuid::Uuid::new_v4().to_string(),
            })),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The near cache's invalidation subscriber, to run until `stopping`
    /// (`None` without a near cache). Until it has subscribed, bounded
    /// reads are served as strong ones.
    pub fn near_subscriber(
        &self,
        stopping: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Option<impl Future<Output = ()> + Send + 'static>> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        let Some(near) = inner.near.clone() else {
            return Ok(None);
        };
        let clients = inner
            .subscriber
            .iter()
            .cloned()
            .map(near::subscriber_client)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("invalid configuration: redis.url: {e}"))?;
        // Named after the namespace, so that operators can tell replicas'
        // subscribers apart from other clients in `CLIENT LIST`.
        let name = format!(
            "{}:near:{}",
            inner.keys.prefix(),
            uuid::Uuid::new_v4().simple()
        );
        Ok(Some(near.subscribe(clients, name, stopping)))
    }

    /// [`get_or_load`](Self::get_or_load) for a call that accepts an answer
    /// current at most `max_staleness` ago (zero: strong, as
    /// `get_or_load`). The near cache answers if it holds an entry filled
    /// within the bound and its invalidation channel is up; else the strong
    /// read's answer is kept there, stamped with the time it started.
    pub async fn get_or_load_within<T: Serialize + DeserializeOwned>(
        &self,
        entity: Entity,
        id: i64,
        max_staleness: Duration,
        load: impl Load<T>,
    ) -> Result<Option<T>> {
        let near = self.inner.as_ref().and_then(|inner| inner.near.as_ref());
        let Some(near) = near.filter(|_| !max_staleness.is_zero()) else {
            return self.get_or_load(entity, id, load).await;
        };
        let ticket = match near.read(entity, id, max_staleness) {
            near::Read::Hit(None) => return Ok(None),
            near::Read::Hit(Some(bytes)) => match codec::decode(&bytes) {
                Some(value) => return Ok(Some(value)),
                // Encoded by this process: cannot happen; read strongly.
                None => None,
            },
            near::Read::Miss(ticket) => ticket,
        };
        let value = self.get_or_load(entity, id, load).await?;
        if let Some(ticket) = ticket {
            let bytes = match &value {
                Some(value) => Some(Arc::from(codec::encode(Some(value))?)),
                None => None,
            };
            near.fill(ticket, entity, id, bytes);
        }
        Ok(value)
    }

    /// Cache-aside read of one entity: a hit, or one load per key across
    /// concurrent callers (and replicas), then a fenced fill. Two round trips
    /// on a miss (the lookup script, the fill script), one on a hit.
    pub async fn get_or_load<T: Serialize + DeserializeOwned>(
        &self,
        entity: Entity,
        id: i64,
        load: impl Load<T>,
    ) -> Result<Option<T>> {
        let Some(inner) = &self.inner else {
            return load().await;
        };
        let key = inner.keys.entity(entity, id);
        let missed = match inner.lookup_one(entity.name(), &key).await {
            Some(One::Hit(value)) => return Ok(Some(value)),
            Some(One::Missing) => return Ok(None),
            Some(One::Miss(missed)) => Some(missed),
            None => None,
        };
        // The miss path is boxed: its futures (the flight, the load, the
        // fill) would otherwise make every hit's future as large as theirs,
        // and a future is moved (copied) at each level it is awaited from.
        let fetched = Box::pin(
            inner
                .flights
                .run(&key, || inner.load_once(entity, &key, missed, load)),
        )
        .await?;
        // What a flight shares was encoded by its leader, or checked by it
        // (`wait_for_fill`): failing to decode it is a programming error.
        match fetched {
            Fetched::Found(bytes) => codec::decode(&bytes)
                .map(Some)
                .ok_or_else(|| anyhow::anyhow!("a loaded cache value did not decode").into()),
            Fetched::Missing => Ok(None),
        }
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
                        Lookup::Hit(value) => {
                            result.insert(*id, Some(value));
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
            Some(QueryLookup::Hit(value)) => return Ok(value),
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
                Ok::<_, Error>(Fetched::Found(Arc::new(payload)))
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
            .guarded_as("invalidate", "INCR", async |conn| {
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
        // This replica's near cache at once; the others when the script's
        // message reaches them.
        if let Some(near) = &inner.near {
            for (entity, id) in entries {
                near.invalidate(*entity, *id);
            }
        }
        let applied = inner
            .guarded("invalidate", async |conn| {
                inner
                    .scripts
                    .invalidate(conn, &keys, &inner.keys.invalidation_channel())
                    .await
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

    /// Redis `INFO`, summed over the servers that answered (every primary
    /// of a cluster); `None` when caching is off or Redis did not answer.
    pub async fn info(&self) -> Option<RedisInfo> {
        let inner = self.inner.as_ref()?;
        let reply = inner
            .guarded("info", async |conn| {
                redis::cmd("INFO").query_async::<redis::Value>(conn).await
            })
            .await?;
        let mut info = RedisInfo::default();
        for text in info_replies(reply) {
            info.add_reply(&text);
        }
        (info.nodes > 0).then_some(info)
    }

    /// The connection pool's size, idle connections and maximum; `None`
    /// when caching is off.
    pub fn pool_stats(&self) -> Option<PoolStats> {
        let status = self.inner.as_ref()?.pool.status();
        Some(PoolStats {
            pool: "redis",
            size: status.size as i64,
            idle: status.available as i64,
            max: status.max_size as i64,
        })
    }

    /// The breaker's state and the hit rate per entity, for the metrics
    /// endpoint (the pool's gauges are [`pool_stats`](Self::pool_stats)).
    pub fn record_gauges(&self) {
        let Some(inner) = &self.inner else { return };
        metrics::gauge!("cache_breaker_state").set(inner.breaker.gauge_value());
        for (name, counters) in &inner.counters {
            let hits = counters.hits.load(Ordering::Relaxed) as f64;
            let total = hits + counters.misses.load(Ordering::Relaxed) as f64;
            if total > 0.0 {
                metrics::gauge!("cache_hit_rate", "entity" => *name).set(hits / total);
            }
        }
    }
}

/// The text of each server's `INFO` reply: one string from a single Redis,
/// a map of node to string from a cluster.
fn info_replies(reply: redis::Value) -> Vec<String> {
    match reply {
        redis::Value::BulkString(bytes) => vec![String::from_utf8_lossy(&bytes).into_owned()],
        redis::Value::SimpleString(text) => vec![text],
        redis::Value::VerbatimString { text, .. } => vec![text],
        redis::Value::Map(nodes) => nodes
            .into_iter()
            .flat_map(|(_, reply)| info_replies(reply))
            .collect(),
        redis::Value::Array(replies) => replies.into_iter().flat_map(info_replies).collect(),
        _ => Vec::new(),
    }
}

/// When Redis last answered a command (a reply or an error it sent), as
/// microseconds since `epoch`, plus one (zero: never). A pool wait that
/// times out is this process's own load only if Redis answered someone
/// after the waiting command started.
struct Answers {
    epoch: Instant,
    last: std::sync::atomic::AtomicU64,
}

impl Answers {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX - 1)
            + 1
    }

    fn note(&self) {
        let now = self.micros(Instant::now());
        self.last
            .fetch_max(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether Redis answered at or after `started`.
    fn since(&self, started: Instant) -> bool {
        self.last.load(std::sync::atomic::Ordering::Relaxed) >= self.micros(started)
    }
}

/// The Redis command behind each operation label of [`Inner::guarded`]
/// (`EVALSHA`: a script, pipelined over many keys).
fn command_of(op: &'static str) -> &'static str {
    match op {
        "mget" | "poll" => "MGET",
        "lock" => "SET",
        "fill" | "invalidate" | "unlock" => "EVALSHA",
        "ping" => "PING",
        other => other,
    }
}

/// A Redis operation given up because of this process's own load (`cause`:
/// `noticed_late`, its timeout noticed late by busy workers; `pool_busy`,
/// no pooled connection free in time): a miss for this call, nothing about
/// Redis, so not a breaker failure either.
fn own_load(op: &'static str, cause: &'static str) {
    metrics::counter!("cache_own_load_misses_total", "op" => op, "cause" => cause).increment(1);
    tracing::debug!(
        database_type = "redis",
        operation = op,
        cause,
        "cache skipped for this call: this process is busy"
    );
}

/// What the lookup of one key found (see [`Inner::lookup_one`]).
enum One<T> {
    Hit(T),
    Missing,
    Miss(Missed),
}

/// A key found absent: its generation when looked up, and whether this
/// process holds its fill lock (else another replica does).
struct Missed {
    generation: String,
    locked: bool,
}

enum Lookup<T> {
    Hit(T),
    Missing,
    /// Not cached (or cached in a form that no longer decodes); the key's
    /// generation when looked up.
    Miss(String),
}

enum QueryLookup<T> {
    /// The stored result, computed at the current generation.
    Hit(T),
    /// Absent, stale or undecodable; the family's generation when looked up.
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
    fn guarded<T>(
        &self,
        op: &'static str,
        run: impl AsyncFnOnce(&mut Conn) -> redis::RedisResult<T>,
    ) -> impl Future<Output = Option<T>> {
        self.guarded_as(op, command_of(op), run)
    }

    /// [`guarded`](Self::guarded), its span naming `command` (the Redis
    /// command, or `EVALSHA` for a script, run in a pipeline when it has
    /// many keys).
    async fn guarded_as<T>(
        &self,
        op: &'static str,
        command: &'static str,
        run: impl AsyncFnOnce(&mut Conn) -> redis::RedisResult<T>,
    ) -> Option<T> {
        let (timeout, by_deadline) = wait_bound(
            self.command_timeout,
            Deadline::current().map(Deadline::remaining),
        );
        if timeout.is_zero() {
            // The call has no time left for Redis; its deadline, not Redis.
            metrics::counter!("cache_deadline_cutoffs_total", "op" => op).increment(1);
            return None;
        }
        if !self.breaker.allow(Instant::now()) {
            return None;
        }
        let started = Instant::now();
        let due = tokio::time::Instant::now() + timeout;
        let mut connected = false;
        let mut span = DbSpan::start(self.peer.as_ref(), None, || DbOperation {
            operation: command,
            collection: None,
            query: None,
        });
        let outcome = match tokio::time::timeout(timeout, async {
            let mut conn = self.pool.get().await?;
            connected = true;
            let outcome = async {
                self.replay(&mut conn).await?;
                Ok::<_, Failure>(run(&mut conn).await?)
            }
            .await;
            if matches!(outcome, Err(Failure::Unavailable(_))) {
                conn.discard();
            }
            outcome
        })
        .await
        {
            Ok(outcome) => outcome,
            Err(_elapsed) if by_deadline => {
                span.fail("deadline_exceeded");
                metrics::counter!("cache_deadline_cutoffs_total", "op" => op).increment(1);
                tracing::debug!(
                    database_type = "redis",
                    operation = op,
                    "cache command cut short by the call's deadline"
                );
                return None;
            }
            // Still queued for a pooled connection while every one is busy:
            // this process's own load, not Redis. (Without a connection but
            // not queued, it was connecting or checking one: Redis's turn.)
            // Only while Redis answers others: were it stuck, the pool
            // would be full of commands waiting on it, and this wait its
            // symptom, not this process's load.
            Err(_elapsed) if !connected && self.pool.saturated() && self.answers.since(started) => {
                Err(Failure::Saturated)
            }
            Err(_elapsed) => Err(Failure::timed_out()),
        };
        if outcome.is_err() {
            span.fail("redis_error");
        }
        drop(span);
        match outcome {
            Ok(value) => {
                self.answers.note();
                self.breaker.success();
                Some(value)
            }
            // This process's workers were busy, and the answer may be
            // waiting in the socket for one of them.
            Err(Failure::TimedOut(_)) if self.noticed_late(due) => {
                own_load(op, "noticed_late");
                None
            }
            Err(failure) => {
                self.report_failure(op, started, failure);
                None
            }
        }
    }

    /// Whether a timeout due at `due` is noticed `ignore_late_by` or more
    /// after it (never, with `ignore_late_by` zero).
    fn noticed_late(&self, due: tokio::time::Instant) -> bool {
        !self.ignore_late_by.is_zero()
            && tokio::time::Instant::now().saturating_duration_since(due) >= self.ignore_late_by
    }

    /// `MGET keys` under [`guarded`](Self::guarded).
    async fn mget<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        keys: impl redis::ToRedisArgs,
    ) -> Option<T> {
        self.guarded(op, async |conn| {
            redis::cmd("MGET").arg(keys).query_async(conn).await
        })
        .await
    }

    fn report_failure(&self, op: &'static str, started: Instant, failure: Failure) {
        if !matches!(failure, Failure::Saturated) {
            metrics::counter!("cache_errors_total", "op" => op).increment(1);
        }
        match failure {
            Failure::Unavailable(error) | Failure::TimedOut(error) => {
                self.breaker.failure(started, Instant::now());
                tracing::warn!(
                    database_type = "redis",
                    operation = op,
                    error,
                    "cache unavailable; using PostgreSQL"
                );
            }
            Failure::Saturated => own_load(op, "pool_busy"),
            Failure::Command(error) => {
                // Redis answered: it is up, whatever this request asked.
                self.answers.note();
                self.breaker.success();
                tracing::warn!(
                    database_type = "redis",
                    operation = op,
                    error,
                    "cache command failed; using PostgreSQL for this call"
                );
            }
        }
    }

    /// Looks keys up with their generations, in one MGET. A value that no
    /// longer decodes is a miss (counted in `cache_decode_failures_total`),
    /// so the caller reads PostgreSQL and refills it.
    async fn lookup<T: DeserializeOwned>(
        &self,
        name: &'static str,
        keys: &[String],
    ) -> Option<Vec<Lookup<T>>> {
        // `MGET` with no keys is an error: an empty batch has nothing to ask.
        if keys.is_empty() {
            return Some(Vec::new());
        }
        let mut args = Vec::with_capacity(keys.len() * 2);
        for key in keys {
            args.push(key.clone());
            args.push(keys::generation_of(key));
        }
        let values: Option<Vec<Option<Vec<u8>>>> = self.mget("mget", &args).await;
        let Some(values) = values else {
            self.count_bypass(name, keys.len() as u64);
            return None;
        };
        let mut undecodable = 0;
        let lookups: Vec<Lookup<T>> = values
            .chunks(2)
            .map(|pair| {
                let generation = pair
                    .get(1)
                    .cloned()
                    .flatten()
                    .and_then(|g| String::from_utf8(g).ok())
                    .unwrap_or_else(|| "0".to_owned());
                match codec::read(pair.first().and_then(Option::as_deref)) {
                    Stored::Value(value) => Lookup::Hit(value),
                    Stored::NotFound => Lookup::Missing,
                    Stored::Absent => Lookup::Miss(generation),
                    Stored::Undecodable => {
                        undecodable += 1;
                        Lookup::Miss(generation)
                    }
                }
            })
            .collect();
        self.count_decode_failures(name, undecodable);
        let hits = lookups
            .iter()
            .filter(|l| !matches!(l, Lookup::Miss(_)))
            .count() as u64;
        self.count_lookups(name, hits, lookups.len() as u64 - hits);
        Some(lookups)
    }

    /// Looks one key up with [`LOOKUP`](scripts): its value, or its
    /// generation and its fill lock (taken when free), in one round trip. A
    /// value that no longer decodes is a miss (counted in
    /// `cache_decode_failures_total`): the script runs again past it for the
    /// generation and the lock, so the caller reads PostgreSQL and refills.
    /// (Its `op` label stays `mget`, the lookup's, as before the script.)
    async fn lookup_one<T: DeserializeOwned>(
        &self,
        name: &'static str,
        key: &str,
    ) -> Option<One<T>> {
        let lock_ms = self.lock_ttl.as_millis() as u64;
        let look = async |skip_value| {
            self.guarded("mget", async |conn| {
                self.scripts
                    .lookup(conn, key, &self.token, lock_ms, skip_value)
                    .await
            })
            .await
        };
        let mut looked = look(false).await;
        if let Some(Looked::Stored(bytes)) = &looked {
            match codec::read::<T>(Some(bytes)) {
                Stored::Value(value) => {
                    self.count_lookups(name, 1, 0);
                    return Some(One::Hit(value));
                }
                Stored::NotFound => {
                    self.count_lookups(name, 1, 0);
                    return Some(One::Missing);
                }
                Stored::Undecodable => {
                    self.count_decode_failures(name, 1);
                    looked = look(true).await;
                }
                Stored::Absent => looked = look(true).await,
            }
        }
        match looked {
            Some(Looked::Absent { generation, locked }) => {
                self.count_lookups(name, 0, 1);
                Some(One::Miss(Missed { generation, locked }))
            }
            // Unreachable: skipping the value, the script never returns one.
            Some(Looked::Stored(_)) | None => {
                self.count_bypass(name, 1);
                None
            }
        }
    }

    /// Looks a query entry up with its family's generation, in one MGET. A
    /// current entry that no longer decodes is a miss (counted in
    /// `cache_decode_failures_total`), recomputed and refilled.
    async fn lookup_query<T: DeserializeOwned>(
        &self,
        family: Family,
        key: &str,
        generation_key: &str,
    ) -> Option<QueryLookup<T>> {
        let values: Option<(Option<Vec<u8>>, Option<u64>)> =
            self.mget("mget", &[key, generation_key][..]).await;
        let Some((value, generation)) = values else {
            self.count_bypass(family.name(), 1);
            return None;
        };
        let generation = generation.unwrap_or(0);
        // Only an entry computed at the current generation is a hit.
        let current = value.filter(|v| codec::query_generation(v) == Some(generation));
        let decoded = current.as_deref().and_then(codec::decode_query);
        if current.is_some() && decoded.is_none() {
            self.count_decode_failures(family.name(), 1);
        }
        let hit = u64::from(decoded.is_some());
        self.count_lookups(family.name(), hit, 1 - hit);
        Some(match decoded {
            Some(value) => QueryLookup::Hit(value),
            None => QueryLookup::Miss(generation),
        })
    }

    /// Counts reads that went to PostgreSQL because Redis was not usable
    /// (the circuit open, a failure or a timeout): misses for the hit rate
    /// gauge, so that it drops while the cache is not serving, and
    /// `cache_bypassed_total`.
    fn count_bypass(&self, name: &'static str, keys: u64) {
        let counters = &self.counters[name];
        counters.misses.fetch_add(keys, Ordering::Relaxed);
        counters.bypassed_total.increment(keys);
        statements::record_cache_lookup(false);
    }

    /// Counts a lookup's hits and misses (hit rate gauge, metrics, and the
    /// call's `cache_hit`: true only when nothing missed).
    fn count_lookups(&self, name: &'static str, hits: u64, misses: u64) {
        let counters = &self.counters[name];
        counters.hits.fetch_add(hits, Ordering::Relaxed);
        counters.misses.fetch_add(misses, Ordering::Relaxed);
        counters.hits_total.increment(hits);
        counters.misses_total.increment(misses);
        statements::record_cache_lookup(misses == 0);
    }

    /// Counts cached values that no longer decode: each is a miss, and a
    /// sign that a cached type changed shape without a format bump.
    fn count_decode_failures(&self, name: &'static str, failures: u64) {
        if failures == 0 {
            return;
        }
        metrics::counter!("cache_decode_failures_total", "entity" => name).increment(failures);
        tracing::warn!(
            database_type = "redis",
            entity = name,
            failures,
            "cached values did not decode; reading PostgreSQL"
        );
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
            self.counters[name].fills_total.increment(filled);
        }
    }

    /// The leader of a single flight: unless this process holds the
    /// cross-replica lock its lookup took, wait for the replica holding it
    /// to fill the key; else load, then fill and unlock in one script.
    async fn load_once<T: Serialize + DeserializeOwned>(
        &self,
        entity: Entity,
        key: &str,
        missed: Option<Missed>,
        load: impl Load<T>,
    ) -> Result<Fetched> {
        // Without a lookup Redis is not usable now: load, and fill nothing.
        if let Some(Missed { locked: false, .. }) = missed
            && let Some(fetched) = self.wait_for_fill::<T>(entity, key).await
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
        if let Some(Missed { generation, .. }) = missed {
            let fill = Fill::entity(key.to_owned(), generation, payload, ttl_ms);
            let filled: Option<u64> = self
                .guarded("fill", async |conn| {
                    self.scripts.fill_one(conn, &fill, &self.token).await
                })
                .await;
            if let Some(filled) = filled {
                self.counters[entity.name()].fills_total.increment(filled);
            }
        }
        Ok(fetched)
    }

    /// Another replica holds the fill lock: poll until it fills the key, or
    /// until its lock is gone, expires or is this process's (one of its
    /// calls took it since), or it filled a value this build cannot decode
    /// (then the caller loads itself).
    async fn wait_for_fill<T: DeserializeOwned>(
        &self,
        entity: Entity,
        key: &str,
    ) -> Option<Fetched> {
        let lock_key = keys::lock_of(key);
        let deadline = Instant::now() + self.lock_ttl;
        let mut pause = Duration::from_millis(5);
        while Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
            let values: Vec<Option<Vec<u8>>> =
                self.mget("poll", &[key, lock_key.as_str()][..]).await?;
            let mut values = values.into_iter();
            let (value, lock) = (values.next().flatten(), values.next().flatten());
            let stored = codec::read::<T>(value.as_deref());
            match stored {
                Stored::Value(_) => return value.map(|bytes| Fetched::Found(Arc::new(bytes))),
                Stored::NotFound => return Some(Fetched::Missing),
                Stored::Undecodable => {
                    self.count_decode_failures(entity.name(), 1);
                    return None;
                }
                Stored::Absent
                    if value.is_none()
                        && lock.as_deref().is_none_or(|l| l == self.token.as_bytes()) =>
                {
                    return None;
                }
                Stored::Absent => {}
            }
        }
        None
    }

    /// Applies queued invalidations on `conn`; an error leaves them queued.
    async fn replay(&self, conn: &mut Conn) -> redis::RedisResult<()> {
        let Some(replay) = self.pending.to_replay() else {
            return Ok(());
        };
        // Boxed: rare, and its commands' futures would otherwise be part of
        // every guarded command's future.
        Box::pin(self.apply(conn, replay)).await
    }

    /// Applies `replay` on `conn`, then takes it off the queue.
    async fn apply(&self, conn: &mut Conn, replay: Replay) -> redis::RedisResult<()> {
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
            // Every replica's near cache goes too: the queued keys are lost.
            // (An ACL user without PUBLISH has no near cache to flush.)
            let flushed = redis::cmd("PUBLISH")
                .arg(self.keys.invalidation_channel())
                .arg(near::FLUSH_ALL)
                .query_async::<u64>(&mut *conn)
                .await;
            if let Err(error) = flushed {
                tracing::warn!(error = %error, "near caches not told of the flush");
            }
        } else {
            for chunk in replay.entries.chunks(500) {
                let channel = self.keys.invalidation_channel();
                self.scripts
                    .invalidate(conn, &self.entity_keys(chunk), &channel)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_own_load_only_if_redis_answered_after_it_started() {
        let answers = Answers::new();
        let before = Instant::now();
        assert!(!answers.since(before), "never answered");
        answers.note();
        assert!(answers.since(before), "answered after the wait started");
        std::thread::sleep(Duration::from_millis(2));
        assert!(!answers.since(Instant::now()), "nothing since");
    }
}
