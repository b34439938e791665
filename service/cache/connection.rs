//! Connections: one Redis or a Redis Cluster, behind one pool and one
//! connection type, so the rest of the cache does not care which.
//!
//! **Cluster.** `MGET` and `UNLINK` across slots are split per slot by the
//! cluster client. A script's keys must share a slot, so batch fills and
//! invalidations send one script call per key there (concurrently, on one
//! multiplexed connection, [`Conn::invoke_each`]). Reads go to primaries
//! only: a lagging replica's generation would open the fence. A namespace
//! flush scans every primary ([`Conn::unlink_matching`]).

use std::collections::HashMap;

use deadpool_redis::{
    Runtime, Timeouts,
    cluster::ClusterConnection,
    redis::{
        self, Script, ScriptInvocation,
        aio::ConnectionLike,
        cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo},
    },
};

use crate::config::{RedisMode, RedisSettings};

/// Connections to one Redis, or to a Redis Cluster.
pub(super) enum Pool {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

impl Pool {
    /// The pool `settings` describe, reaching `url` (comma-separated seed
    /// URLs on a cluster). Connects lazily: nothing is dialled here.
    pub(super) fn new(settings: &RedisSettings, url: &str) -> anyhow::Result<Self> {
        let mut pool_config = deadpool_redis::PoolConfig::new(settings.pool_size);
        pool_config.timeouts = Timeouts {
            wait: Some(settings.wait_timeout),
            create: Some(settings.create_timeout),
            recycle: Some(settings.recycle_timeout),
        };
        let invalid =
            |e: &dyn std::fmt::Display| anyhow::anyhow!("invalid configuration: redis.url: {e}");
        Ok(match settings.mode {
            RedisMode::Single => {
                let mut config = deadpool_redis::Config::from_url(url);
                config.pool = Some(pool_config);
                Self::Single(
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
                Self::Cluster(
                    config
                        .create_pool(Some(Runtime::Tokio1))
                        .map_err(|e| invalid(&e))?,
                )
            }
        })
    }

    pub(super) async fn get(&self) -> Result<Conn, String> {
        Ok(match self {
            Self::Single(pool) => Conn::Single(pool.get().await.map_err(|e| e.to_string())?),
            Self::Cluster(pool) => Conn::Cluster(pool.get().await.map_err(|e| e.to_string())?),
        })
    }

    pub(super) fn status(&self) -> deadpool_redis::Status {
        match self {
            Self::Single(pool) => pool.status(),
            Self::Cluster(pool) => pool.status(),
        }
    }
}

/// A pooled connection. On a cluster each command goes to the primary of
/// its keys' slot (split per slot for `MGET` and `UNLINK`).
pub(super) enum Conn {
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
    pub(super) async fn invoke_each<T>(
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

    /// Unlinks every key matching `pattern` that `keep` does not keep.
    /// `SCAN` walks one node: on a cluster, each primary is walked in turn.
    pub(super) async fn unlink_matching(
        &mut self,
        pattern: &str,
        keep: impl Fn(&str) -> bool,
    ) -> redis::RedisResult<()> {
        let Self::Cluster(cluster) = self else {
            return self.unlink_on_node(None, pattern, &keep).await;
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
            self.unlink_on_node(Some(node), pattern, &keep).await?;
        }
        Ok(())
    }

    /// [`unlink_matching`](Self::unlink_matching) on one node (`node`: its
    /// host and port, on a cluster).
    async fn unlink_on_node(
        &mut self,
        node: Option<(String, u16)>,
        pattern: &str,
        keep: &impl Fn(&str) -> bool,
    ) -> redis::RedisResult<()> {
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            let reply = match (&mut *self, &node) {
                (Self::Cluster(cluster), Some((host, port))) => {
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
            let doomed: Vec<&String> = keys.iter().filter(|k| !keep(k)).collect();
            if !doomed.is_empty() {
                redis::cmd("UNLINK")
                    .arg(doomed)
                    .query_async::<u64>(&mut *self)
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}
