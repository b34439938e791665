//! The near cache: an in-process tier in front of Redis for reads that
//! accept bounded staleness (`max_staleness` on GetUser and GetProduct).
//! Strong reads never use it.
//!
//! **The contract.** A read with bound `B` is answered from here only with
//! an entry whose *fill time* is at most `B` ago. The fill time is when the
//! strong read that produced the entry started: whatever a strong read
//! returns reflects every write acknowledged before it started, so an
//! answer is never staler than `B`, whatever happens to invalidations.
//! Entries expire after `redis.near_max_staleness`, the largest bound a call
//! may ask for. Memory is bounded by `redis.near_max_bytes` (the stored
//! forms' sizes, least recently used out first).
//!
//! **Coherence.** Within the bound, entries are usually fresher than it:
//! every replica subscribes to `<prefix>:v1:invalidations`, on which the
//! invalidation script publishes the keys it deleted, after the write's
//! commit (one `PUBLISH` inside that script: no extra round trip). A key
//! named there is dropped at once on every replica that hears it, and on the
//! writing replica before its write returns. While the subscription is down
//! (not yet up, the connection dropped, a heartbeat unanswered) the tier is
//! flushed and bypassed: reads go to Redis and nothing is filled, until the
//! subscription is up again.
//!
//! **Fills racing invalidations.** Each key hashes to a stripe whose counter
//! every invalidation of its keys bumps, and every change of the
//! subscription's state bumps the epoch. A read notes both before it reads
//! Redis; its fill is kept only if neither moved until after the insert, so
//! an invalidation heard while the read was in flight is never undone by it.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use deadpool_redis::redis::{
    self, AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value,
};
use tokio_util::sync::CancellationToken;

use super::{Entity, keys::Keys};

/// Stripes of invalidation counters (a power of two).
const STRIPES: usize = 256;
/// What an entry costs besides its stored form, for the memory bound.
const ENTRY_OVERHEAD: usize = 64;
/// How often the subscription is pinged; unanswered within this, it is down.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Waits between subscription attempts, doubling up to the last.
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// The message that flushes every replica's tier (a namespace flush).
pub(super) const FLUSH_ALL: &str = "*";

#[derive(Clone)]
struct Entry {
    /// The stored form (`codec`), or `None` for "not found".
    bytes: Option<Arc<[u8]>>,
    filled_at: Instant,
}

/// What a bounded read found here.
pub(super) enum Read {
    /// An entry young enough: its stored form, or `None` for "not found".
    Hit(Option<Arc<[u8]>>),
    /// Nothing usable: read Redis, then [`Near::fill`] with the ticket
    /// (`None`: the tier is bypassed, fill nothing).
    Miss(Option<Ticket>),
}

/// What a read noted before reading Redis (see the module documentation).
pub(super) struct Ticket {
    epoch: u64,
    stripe: u64,
    started: Instant,
}

/// The metric handles, resolved once (on first use: the recorder is
/// installed after the cache is built).
struct Counters {
    hits: [metrics::Counter; 3],
    misses: [metrics::Counter; 3],
    bypassed: [metrics::Counter; 3],
    invalidations: metrics::Counter,
}

pub(super) struct Near {
    entries: moka::sync::Cache<(Entity, i64), Entry>,
    /// Odd while the subscription is up; bumped by every change.
    epoch: AtomicU64,
    stripes: Box<[AtomicU64]>,
    keys: Keys,
    counters: OnceLock<Counters>,
}

fn slot(entity: Entity) -> usize {
    match entity {
        Entity::User => 0,
        Entity::Product => 1,
        Entity::Order => 2,
    }
}

impl Near {
    pub(super) fn new(max_bytes: u64, max_staleness: Duration, keys: Keys) -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, entry: &Entry| {
                    let size = entry.bytes.as_ref().map_or(0, |b| b.len()) + ENTRY_OVERHEAD;
                    u32::try_from(size).unwrap_or(u32::MAX)
                })
                .time_to_live(max_staleness)
                .build(),
            epoch: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            keys,
            counters: OnceLock::new(),
        }
    }

    fn counters(&self) -> &Counters {
        self.counters.get_or_init(|| {
            let per = |name: &'static str| {
                [Entity::User, Entity::Product, Entity::Order]
                    .map(|e| metrics::counter!(name, "entity" => e.name()))
            };
            Counters {
                hits: per("near_cache_hits_total"),
                misses: per("near_cache_misses_total"),
                bypassed: per("near_cache_bypassed_total"),
                invalidations: metrics::counter!("near_cache_invalidations_total"),
            }
        })
    }

    fn stripe(&self, entity: Entity, id: i64) -> &AtomicU64 {
        let mixed = (id as u64 ^ ((slot(entity) as u64) << 61)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.stripes[(mixed >> 56) as usize % STRIPES]
    }

    /// An entry filled at most `bound` ago, or a ticket to fill one.
    pub(super) fn read(&self, entity: Entity, id: i64, bound: Duration) -> Read {
        let epoch = self.epoch.load(Ordering::SeqCst);
        if epoch.is_multiple_of(2) {
            self.counters().bypassed[slot(entity)].increment(1);
            return Read::Miss(None);
        }
        let stripe = self.stripe(entity, id).load(Ordering::SeqCst);
        let now = Instant::now();
        if let Some(entry) = self.entries.get(&(entity, id))
            && now.saturating_duration_since(entry.filled_at) <= bound
        {
            self.counters().hits[slot(entity)].increment(1);
            return Read::Hit(entry.bytes);
        }
        self.counters().misses[slot(entity)].increment(1);
        Read::Miss(Some(Ticket {
            epoch,
            stripe,
            started: now,
        }))
    }

    fn current(&self, ticket: &Ticket, entity: Entity, id: i64) -> bool {
        self.epoch.load(Ordering::SeqCst) == ticket.epoch
            && self.stripe(entity, id).load(Ordering::SeqCst) == ticket.stripe
    }

    /// Keeps what a strong read that started at `ticket` answered, unless
    /// the key was invalidated or the subscription changed since.
    pub(super) fn fill(&self, ticket: Ticket, entity: Entity, id: i64, bytes: Option<Arc<[u8]>>) {
        if !self.current(&ticket, entity, id) {
            return;
        }
        let entry = Entry {
            bytes,
            filled_at: ticket.started,
        };
        self.entries.insert((entity, id), entry);
        // An invalidation between the check and the insert is undone here.
        if !self.current(&ticket, entity, id) {
            self.entries.invalidate(&(entity, id));
        }
    }

    /// Drops a key (a write here, or a message from another replica).
    pub(super) fn invalidate(&self, entity: Entity, id: i64) {
        self.stripe(entity, id).fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate(&(entity, id));
        self.counters().invalidations.increment(1);
    }

    /// Drops every key: the stripes all move, so no fill in flight lands.
    fn invalidate_everything(&self) {
        for stripe in &self.stripes {
            stripe.fetch_add(1, Ordering::SeqCst);
        }
        self.entries.invalidate_all();
    }

    /// The subscription is up: serve and fill from now on (from empty).
    fn up(&self) {
        self.entries.invalidate_all();
        if self.epoch.load(Ordering::SeqCst).is_multiple_of(2) {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The subscription is down: flush, and bypass until it is up again.
    fn down(&self, cause: &'static str) {
        if self.epoch.load(Ordering::SeqCst) % 2 == 1 {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            self.entries.invalidate_all();
            metrics::counter!("near_cache_flushes_total", "cause" => cause).increment(1);
            tracing::warn!(
                database_type = "redis",
                cause,
                "near cache invalidations lost; flushed, bypassed until resubscribed"
            );
        }
    }

    /// Applies one message of the invalidation channel: keys separated by
    /// spaces, or [`FLUSH_ALL`].
    fn on_message(&self, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        for key in text.split(' ') {
            if key == FLUSH_ALL {
                self.invalidate_everything();
            } else if let Some((entity, id)) = self.keys.parse_entity(key) {
                self.invalidate(entity, id);
            }
        }
    }

    /// A push from the subscriber connection: a message (channel, payload).
    fn on_push(&self, push: PushInfo) {
        if push.kind == PushKind::Message
            && let Some(Value::BulkString(payload)) = push.data.get(1)
        {
            self.on_message(payload);
        }
    }

    /// Keeps the subscription to the invalidation channel up until
    /// `stopping`: subscribe, go live, ping every [`HEARTBEAT`]; on a drop
    /// or an unanswered ping, flush, go back to bypassing, and resubscribe
    /// (backing off while it fails).
    pub(super) async fn subscribe(
        self: Arc<Self>,
        clients: Vec<redis::Client>,
        name: String,
        stopping: CancellationToken,
    ) {
        let channel = self.keys.invalidation_channel();
        let mut pause = RECONNECT_FIRST;
        // Each attempt asks the next node (cluster seeds take turns).
        for attempt in 0.. {
            if stopping.is_cancelled() || clients.is_empty() {
                return;
            }
            let client = &clients[attempt % clients.len()];
            let near = self.clone();
            let dropped = Arc::new(tokio::sync::Notify::new());
            let notify = dropped.clone();
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(HEARTBEAT))
                .set_response_timeout(Some(HEARTBEAT))
                .set_push_sender(move |push: PushInfo| {
                    // The loop below flushes: a connection given up already
                    // must not flush the one that replaced it.
                    if push.kind == PushKind::Disconnection {
                        notify.notify_one();
                    } else {
                        near.on_push(push);
                    }
                    Ok::<(), redis::aio::SendError>(())
                });
            let connected = async {
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                // The name lets operators (and tests) find the subscriber;
                // an ACL user without CLIENT still subscribes.
                let named = redis::cmd("CLIENT")
                    .arg("SETNAME")
                    .arg(&name)
                    .query_async::<()>(&mut conn)
                    .await;
                if let Err(error) = named {
                    tracing::debug!(error = %error, "naming the near cache subscriber failed");
                }
                conn.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(conn)
            };
            let mut conn = match connected.await {
                Ok(conn) => conn,
                Err(error) => {
                    self.down("subscribe_failed");
                    tracing::debug!(error = %error, "near cache subscription failed; retrying");
                    tokio::select! {
                        () = stopping.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(RECONNECT_MAX);
                    continue;
                }
            };
            pause = RECONNECT_FIRST;
            self.up();
            tracing::info!(channel, "near cache subscribed to invalidations");
            loop {
                tokio::select! {
                    () = stopping.cancelled() => {
                        self.down("stopping");
                        return;
                    }
                    () = dropped.notified() => break,
                    () = tokio::time::sleep(HEARTBEAT) => {
                        let ping = redis::cmd("PING");
                        let pinged =
                            tokio::time::timeout(HEARTBEAT, ping.query_async::<Value>(&mut conn))
                                .await;
                        if !matches!(pinged, Ok(Ok(_))) {
                            self.down("heartbeat");
                            break;
                        }
                    }
                }
            }
            self.down("disconnected");
            tokio::select! {
                () = stopping.cancelled() => return,
                () = tokio::time::sleep(RECONNECT_FIRST) => {}
            }
        }
    }
}

/// The connection the subscriber opens: `info` speaking RESP3 (pushes
/// beside replies, so it can be pinged while subscribed).
pub(super) fn subscriber_client(info: redis::ConnectionInfo) -> redis::RedisResult<redis::Client> {
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    redis::Client::open(info.set_redis_settings(settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near() -> Near {
        let near = Near::new(1 << 20, Duration::from_secs(60), Keys::new("dg", false));
        near.up();
        near
    }

    fn ticket(near: &Near, entity: Entity, id: i64) -> Ticket {
        match near.read(entity, id, Duration::from_secs(60)) {
            Read::Miss(Some(ticket)) => ticket,
            Read::Miss(None) => panic!("bypassed"),
            Read::Hit(_) => panic!("a hit"),
        }
    }

    fn bytes(b: &[u8]) -> Option<Arc<[u8]>> {
        Some(Arc::from(b))
    }

    #[test]
    fn an_entry_is_served_only_to_reads_whose_bound_covers_its_age() {
        let near = near();
        let mut ticket = ticket(&near, Entity::User, 1);
        ticket.started -= Duration::from_secs(10);
        near.fill(ticket, Entity::User, 1, bytes(b"V1"));
        assert!(matches!(
            near.read(Entity::User, 1, Duration::from_secs(5)),
            Read::Miss(Some(_))
        ));
        match near.read(Entity::User, 1, Duration::from_secs(20)) {
            Read::Hit(Some(b)) => assert_eq!(&*b, b"V1"),
            _ => panic!("a hit within 20 s"),
        }
    }

    #[test]
    fn a_fill_that_started_before_an_invalidation_is_not_kept() {
        let near = near();
        let ticket = ticket(&near, Entity::User, 2);
        near.invalidate(Entity::User, 2);
        near.fill(ticket, Entity::User, 2, bytes(b"Vold"));
        assert!(matches!(
            near.read(Entity::User, 2, Duration::from_secs(60)),
            Read::Miss(Some(_))
        ));
    }

    #[test]
    fn while_down_reads_bypass_and_fills_from_before_are_dropped() {
        let near = near();
        let before = ticket(&near, Entity::Product, 3);
        near.fill(ticket(&near, Entity::Product, 4), Entity::Product, 4, None);
        near.down("test");
        assert!(matches!(
            near.read(Entity::Product, 4, Duration::from_secs(60)),
            Read::Miss(None)
        ));
        near.up();
        near.fill(before, Entity::Product, 3, bytes(b"V3"));
        for id in [3, 4] {
            assert!(
                matches!(
                    near.read(Entity::Product, id, Duration::from_secs(60)),
                    Read::Miss(Some(_))
                ),
                "{id}: flushed, and the old fill refused"
            );
        }
    }

    #[test]
    fn messages_name_keys_in_either_key_layout_or_flush_everything() {
        for cluster in [false, true] {
            let near = Near::new(1 << 20, Duration::from_secs(60), Keys::new("dg", cluster));
            near.up();
            let keys = Keys::new("dg", cluster);
            for id in [1, 2] {
                near.fill(ticket(&near, Entity::User, id), Entity::User, id, None);
            }
            let message = keys.entity(Entity::User, 1);
            near.on_message(message.as_bytes());
            assert!(matches!(
                near.read(Entity::User, 1, Duration::from_secs(60)),
                Read::Miss(Some(_))
            ));
            assert!(matches!(
                near.read(Entity::User, 2, Duration::from_secs(60)),
                Read::Hit(None)
            ));
            near.on_message(FLUSH_ALL.as_bytes());
            assert!(matches!(
                near.read(Entity::User, 2, Duration::from_secs(60)),
                Read::Miss(Some(_))
            ));
        }
    }
}
