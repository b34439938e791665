//! The Lua scripts that fence fills against invalidations, and their calls.
//!
//! **Invalidation fence.** Each key has a generation counter, `<key>:gen`.
//! A reader that misses remembers the generation it saw; after loading from
//! PostgreSQL it fills the key only if the generation is unchanged
//! ([`FILL`]). A writer, after its transaction commits, increments the
//! generation and deletes the value ([`INVALIDATE`]). So a read that loaded
//! the old row before a write committed cannot put it back after the delete.
//! Generations expire after ten minutes, far beyond any call's deadline; an
//! expired generation reads as `0`, which never matches a reader that saw
//! one, so expiry can only refuse a fill, never admit a stale one.
//!
//! **One lookup, one fill.** A single-key read is two round trips on a
//! miss: [`LOOKUP`] reads the value and, when it is absent, the generation,
//! and takes the fill lock (or names its holder), all in one script; after
//! loading, [`FILL_ONE`] fills the key if the generation is unchanged and
//! releases the lock in the same call. (Before: `MGET` of value and
//! generation, `SET NX PX` of the lock, the fill script, the unlock script:
//! four.) A hit is one round trip either way.
//!
//! A script's keys must share a slot on a cluster: see
//! [`Conn::invoke_each`](super::connection::Conn::invoke_each).

use std::time::Duration;

use deadpool_redis::redis::{RedisResult, Script, ScriptInvocation};

use super::{connection::Conn, keys};

/// How long a generation outlives its last bump.
const GENERATION_TTL: Duration = Duration::from_secs(600);

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

/// Bumps each key's generation and deletes its value, then publishes the
/// deleted keys (space-separated) for the replicas' near caches. KEYS:
/// value, generation (per key); ARGV[1]: generation ttl in ms, ARGV[2]: the
/// invalidation channel. A failed publish (an ACL user without PUBLISH)
/// fails nothing: the near caches' bound still holds.
const INVALIDATE: &str = r"
local names = {}
for i = 1, #KEYS, 2 do
  redis.call('INCR', KEYS[i + 1])
  redis.call('PEXPIRE', KEYS[i + 1], ARGV[1])
  redis.call('DEL', KEYS[i])
  names[#names + 1] = KEYS[i]
end
redis.pcall('PUBLISH', ARGV[2], table.concat(names, ' '))
return #KEYS / 2";

/// Looks one key up. KEYS: value, generation, fill lock; ARGV: this
/// process's lock token, the lock ttl in ms, and `1` to skip the value (it
/// was read and did not decode). A hit returns `{value}`; a miss
/// `{false, generation, lock holder}`, having taken the lock if it was free
/// (then the holder is the token).
const LOOKUP: &str = r"
if ARGV[3] ~= '1' then
  local value = redis.call('GET', KEYS[1])
  if value then return {value} end
end
local generation = redis.call('GET', KEYS[2]) or '0'
local holder = redis.call('GET', KEYS[3])
if not holder then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
  holder = ARGV[1]
end
return {false, generation, holder}";

/// [`FILL`] of one key, then releases its fill lock if this process holds
/// it. KEYS: value, generation, lock; ARGV: expected generation, payload,
/// ttl in ms, lock token.
const FILL_ONE: &str = r"
local filled = 0
if (redis.call('GET', KEYS[2]) or '0') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  filled = 1
end
if redis.call('GET', KEYS[3]) == ARGV[4] then redis.call('DEL', KEYS[3]) end
return filled";

/// A value to store if its generation is still the one seen before loading.
pub(super) struct Fill {
    pub(super) key: String,
    pub(super) generation_key: String,
    pub(super) generation: String,
    pub(super) payload: Vec<u8>,
    pub(super) ttl_ms: u64,
}

impl Fill {
    /// An entity's fill: its generation key is `<key>:gen`.
    pub(super) fn entity(key: String, generation: String, payload: Vec<u8>, ttl_ms: u64) -> Self {
        Self {
            generation_key: keys::generation_of(&key),
            key,
            generation,
            payload,
            ttl_ms,
        }
    }
}

/// What [`LOOKUP`] found.
#[derive(Debug, PartialEq)]
pub(super) enum Looked {
    /// The stored bytes (not yet decoded).
    Stored(Vec<u8>),
    /// Nothing stored: the generation, and whether this process holds the
    /// fill lock (it took it now, or one of its calls did before).
    Absent { generation: String, locked: bool },
}

/// The scripts, loaded once (by SHA, `EVALSHA`, falling back to `EVAL` on
/// `NOSCRIPT`).
pub(super) struct Scripts {
    fill: Script,
    invalidate: Script,
    lookup: Script,
    fill_one: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            fill: Script::new(FILL),
            invalidate: Script::new(INVALIDATE),
            lookup: Script::new(LOOKUP),
            fill_one: Script::new(FILL_ONE),
        }
    }

    /// Runs [`LOOKUP`] on `key` (with `skip_value`, as if it held nothing).
    /// `token` is this process's lock token.
    pub(super) async fn lookup(
        &self,
        conn: &mut Conn,
        key: &str,
        token: &str,
        lock_ms: u64,
        skip_value: bool,
    ) -> RedisResult<Looked> {
        let reply: Vec<Option<Vec<u8>>> = self
            .lookup
            .key(key)
            .key(keys::generation_of(key))
            .key(keys::lock_of(key))
            .arg(token)
            .arg(lock_ms)
            .arg(if skip_value { "1" } else { "0" })
            .invoke_async(conn)
            .await?;
        let mut reply = reply.into_iter();
        Ok(match (reply.next().flatten(), reply.next().flatten()) {
            (Some(value), _) => Looked::Stored(value),
            (None, generation) => Looked::Absent {
                generation: generation
                    .and_then(|g| String::from_utf8(g).ok())
                    .unwrap_or_else(|| "0".to_owned()),
                locked: reply.next().flatten().as_deref() == Some(token.as_bytes()),
            },
        })
    }

    /// Runs [`FILL_ONE`]: fills `fill` if its generation is unchanged and
    /// releases the key's lock if `token` holds it; the number filled.
    pub(super) async fn fill_one(
        &self,
        conn: &mut Conn,
        fill: &Fill,
        token: &str,
    ) -> RedisResult<u64> {
        self.fill_one
            .key(&fill.key)
            .key(&fill.generation_key)
            .key(keys::lock_of(&fill.key))
            .arg(&fill.generation)
            .arg(&fill.payload)
            .arg(fill.ttl_ms)
            .arg(token)
            .invoke_async(conn)
            .await
    }

    /// Runs [`FILL`]; the number of keys filled.
    pub(super) async fn fill(&self, conn: &mut Conn, fills: &[Fill]) -> RedisResult<u64> {
        let add = |invocation: &mut ScriptInvocation<'_>, fill: &Fill| {
            invocation
                .key(&fill.key)
                .key(&fill.generation_key)
                .arg(&fill.generation)
                .arg(&fill.payload)
                .arg(fill.ttl_ms);
        };
        conn.invoke_each(&self.fill, fills, add, &[]).await
    }

    /// Runs [`INVALIDATE`] over entity keys, announcing them on `channel`;
    /// the number invalidated.
    pub(super) async fn invalidate(
        &self,
        conn: &mut Conn,
        keys: &[String],
        channel: &str,
    ) -> RedisResult<u64> {
        let add = |invocation: &mut ScriptInvocation<'_>, key: &String| {
            invocation.key(key).key(keys::generation_of(key));
        };
        let ttl = GENERATION_TTL.as_millis().to_string();
        conn.invoke_each(&self.invalidate, keys, add, &[ttl.as_str(), channel])
            .await
    }
}
