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

/// The three scripts, loaded once (by SHA, `EVALSHA`, falling back to `EVAL`).
pub(super) struct Scripts {
    fill: Script,
    invalidate: Script,
    unlock: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            fill: Script::new(FILL),
            invalidate: Script::new(INVALIDATE),
            unlock: Script::new(UNLOCK),
        }
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
        conn.invoke_each(&self.fill, fills, add, None).await
    }

    /// Runs [`INVALIDATE`] over entity keys; the number invalidated.
    pub(super) async fn invalidate(&self, conn: &mut Conn, keys: &[String]) -> RedisResult<u64> {
        let add = |invocation: &mut ScriptInvocation<'_>, key: &String| {
            invocation.key(key).key(keys::generation_of(key));
        };
        let ttl = GENERATION_TTL.as_millis() as u64;
        conn.invoke_each(&self.invalidate, keys, add, Some(ttl))
            .await
    }

    /// Runs [`UNLOCK`]: deletes `lock_key` if it still holds `token`.
    pub(super) async fn unlock(
        &self,
        conn: &mut Conn,
        lock_key: &str,
        token: &str,
    ) -> RedisResult<u64> {
        self.unlock
            .key(lock_key)
            .arg(token)
            .invoke_async(conn)
            .await
    }
}
