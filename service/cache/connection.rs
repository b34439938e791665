//! Connections: one Redis or a Redis Cluster, behind one pool and one
//! connection type, so the rest of the cache does not care which.
//!
//! **Cluster.** `MGET` and `UNLINK` across slots are split per slot by the
//! cluster client. A script's keys must share a slot, so batch fills and
//! invalidations send one script call per key there (concurrently, on one
//! multiplexed connection, [`Conn::invoke_each`]). Reads go to primaries
//! only: a lagging replica's generation would open the fence. A namespace
//! flush scans every primary ([`Conn::unlink_matching`]).
//!
//! **What counts as Redis being down.** Only failures to reach Redis or to
//! hear from it in time ([`Failure::Unavailable`], [`Failure::TimedOut`])
//! count against the circuit breaker, and a timeout only when this process
//! noticed it on time (`redis.breaker_ignore_late_by`). An error Redis answers because of the request
//! ([`Failure::Command`]: `WRONGTYPE`, an `ERR` reply, a reply of another
//! type than expected) is a miss for that call only: Redis is fine, and
//! one caller's odd request must not turn caching off for every caller.
//!
//! **TLS and credentials** (`rediss://`, an ACL user): see [`super::tls`].
//! On a cluster they apply to every node the client discovers, not only to
//! the seeds: that is why the cluster pool has a manager of its own
//! ([`ClusterManager`]), deadpool-redis's cannot take certificates. A
//! failed TLS handshake or `AUTH` is Redis being unavailable to this
//! process: the cache fails open and the breaker counts it.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
};

use deadpool::managed;
use deadpool_redis::{
    Runtime, Timeouts,
    cluster::{ClusterClient, ClusterClientBuilder, ClusterConnection},
    redis::{
        self, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisError, Script, ScriptInvocation,
        ServerErrorKind,
        aio::ConnectionLike,
        cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo},
    },
};
use secrecy::ExposeSecret;

use super::tls;
use crate::config::{RedisMode, RedisSettings};

/// A pooled connection used this recently is handed out without a `PING`
/// (see [`SingleManager`]).
const RECENTLY_USED: std::time::Duration = std::time::Duration::from_secs(1);

/// Connections to one Redis, or to a Redis Cluster.
pub(super) enum Pool {
    Single(managed::Pool<SingleManager>),
    Cluster(managed::Pool<ClusterManager>),
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
        tls::refuse_insecure(url)?;
        let certificates = tls::certificates(settings, url)?;
        let username = Some(settings.username.trim()).filter(|u| !u.is_empty());
        let password = Some(settings.password.expose_secret()).filter(|p| !p.is_empty());
        // A user alone would be ignored: `AUTH` needs the password.
        let url_has_password = url
            .split(',')
            .next()
            .and_then(|first| first.trim().into_connection_info().ok())
            .is_some_and(|info| info.redis_settings().password().is_some());
        if username.is_some() && password.is_none() && !url_has_password {
            anyhow::bail!(
                "invalid configuration: redis.username needs redis.password (or a password in redis.url)"
            );
        }
        Ok(match settings.mode {
            RedisMode::Single => {
                let info = node_info(url, username, password, certificates)?;
                let manager = SingleManager {
                    client: redis::Client::open(info).map_err(|e| invalid(&e))?,
                    pings: AtomicUsize::new(0),
                };
                Self::Single(pool(manager, pool_config).map_err(|e| invalid(&e))?)
            }
            RedisMode::Cluster => {
                let urls: Vec<&str> = url
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .collect();
                // Primaries only (no read routing strategy): a lagging
                // replica's generation would let a stale fill or read
                // through the fence.
                let mut client = ClusterClientBuilder::new(urls);
                if let Some(username) = username {
                    client = client.username(username);
                }
                if let Some(password) = password {
                    client = client.password(password);
                }
                if let Some(certificates) = certificates {
                    client = client.certs(certificates);
                }
                let manager = ClusterManager {
                    client: client.build().map_err(|e| invalid(&e))?,
                    pings: AtomicUsize::new(0),
                };
                Self::Cluster(pool(manager, pool_config).map_err(|e| invalid(&e))?)
            }
        })
    }

    pub(super) async fn get(&self) -> Result<Conn, Failure> {
        Ok(match self {
            Self::Single(pool) => Conn::Single(pool.get().await?),
            Self::Cluster(pool) => Conn::Cluster(pool.get().await?),
        })
    }

    /// Whether calls are queued for a connection with none free: every
    /// pooled connection is busy with this process's commands.
    pub(super) fn saturated(&self) -> bool {
        let status = self.status();
        status.available == 0 && status.waiting > 0
    }

    pub(super) fn status(&self) -> deadpool_redis::Status {
        match self {
            Self::Single(pool) => pool.status(),
            Self::Cluster(pool) => pool.status(),
        }
    }
}

/// A pool of `manager`'s connections, sized and timed by `config`.
fn pool<M: managed::Manager>(
    manager: M,
    config: deadpool_redis::PoolConfig,
) -> Result<managed::Pool<M>, managed::BuildError> {
    managed::Pool::builder(manager)
        .config(config)
        .runtime(Runtime::Tokio1)
        .build()
}

/// How to reach one node (`url`) as the settings' user, over their TLS.
fn node_info(
    url: &str,
    username: Option<&str>,
    password: Option<&str>,
    certificates: Option<redis::TlsCertificates>,
) -> anyhow::Result<ConnectionInfo> {
    let invalid =
        |e: &dyn std::fmt::Display| anyhow::anyhow!("invalid configuration: redis.url: {e}");
    let mut info = url.into_connection_info().map_err(|e| invalid(&e))?;
    let mut login = info.redis_settings().clone();
    if let Some(username) = username {
        login = login.set_username(username);
    }
    if let Some(password) = password {
        login = login.set_password(password);
    }
    info = info.set_redis_settings(login);
    if let Some(certificates) = certificates {
        info = redis::Client::build_with_tls(info, certificates)
            .map_err(|e| invalid(&e))?
            .get_connection_info()
            .clone();
    }
    Ok(info)
}

/// How to reach each node the near cache may subscribe on: the URL, or
/// every seed of a cluster (a message published on any node reaches all).
pub(super) fn subscriber_infos(
    settings: &RedisSettings,
    url: &str,
) -> anyhow::Result<Vec<ConnectionInfo>> {
    let certificates = tls::certificates(settings, url)?;
    let username = Some(settings.username.trim()).filter(|u| !u.is_empty());
    let password = Some(settings.password.expose_secret()).filter(|p| !p.is_empty());
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|node| node_info(node, username, password, certificates.clone()))
        .collect()
}

/// A pooled connection. On a cluster each command goes to the primary of
/// its keys' slot (split per slot for `MGET` and `UNLINK`).
pub(super) enum Conn {
    Single(managed::Object<SingleManager>),
    Cluster(managed::Object<ClusterManager>),
}

impl Conn {
    /// Takes the connection out of the pool, to be closed: after a
    /// connection-level failure ([`Failure::Unavailable`]) it is not handed
    /// out again, whether or not its check would have run.
    pub(super) fn discard(self) {
        match self {
            Self::Single(conn) => drop(managed::Object::take(conn)),
            Self::Cluster(conn) => drop(managed::Object::take(conn)),
        }
    }
}

/// Opens single-node connections as deadpool-redis's manager does
/// (multiplexed, TLS and credentials from the connection info), but checks
/// a pooled connection with a `PING` only when it was last handed out
/// [`RECENTLY_USED`] ago or longer. deadpool-redis's manager pings on every
/// checkout: a second round trip on every cache hit, for a connection that
/// answered a moment ago. A connection that fails in use is discarded
/// ([`Conn::discard`]), so a dead one costs one failed command (a miss,
/// which fails open), not one per call.
pub(super) struct SingleManager {
    client: redis::Client,
    pings: AtomicUsize,
}

impl managed::Manager for SingleManager {
    type Type = redis::aio::MultiplexedConnection;
    type Error = RedisError;

    // Connecting (TCP, TLS, AUTH, HELLO) is boxed, here and below: it is
    // rare, and its large future would otherwise be part of every
    // `Pool::get` future, which each command moves about.
    async fn create(&self) -> Result<Self::Type, RedisError> {
        Box::pin(self.client.get_multiplexed_async_connection()).await
    }

    async fn recycle(
        &self,
        conn: &mut Self::Type,
        metrics: &managed::Metrics,
    ) -> managed::RecycleResult<RedisError> {
        if metrics.last_used() < RECENTLY_USED {
            return Ok(());
        }
        Box::pin(check_with_ping(conn, &self.pings)).await
    }
}

/// Opens and checks the cluster pool's connections (as deadpool-redis's
/// own manager does) with a client that carries TLS certificates and
/// credentials for every node.
pub(super) struct ClusterManager {
    client: ClusterClient,
    pings: AtomicUsize,
}

impl managed::Manager for ClusterManager {
    type Type = ClusterConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<ClusterConnection, RedisError> {
        Box::pin(self.client.get_async_connection()).await
    }

    async fn recycle(
        &self,
        conn: &mut ClusterConnection,
        _: &managed::Metrics,
    ) -> managed::RecycleResult<RedisError> {
        check_with_ping(conn, &self.pings).await
    }
}

/// A pooled connection is reused if it answers a `PING` with its own
/// number, the next of `pings` (a reply meant for an earlier command would
/// not match).
async fn check_with_ping(
    conn: &mut impl ConnectionLike,
    pings: &AtomicUsize,
) -> managed::RecycleResult<RedisError> {
    let ping = pings.fetch_add(1, Ordering::Relaxed).to_string();
    let pong: String = redis::cmd("PING").arg(&ping).query_async(conn).await?;
    if pong == ping {
        Ok(())
    } else {
        Err(managed::RecycleError::message("unexpected PING reply"))
    }
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
        tail: &[&str],
    ) -> redis::RedisResult<u64> {
        if items.is_empty() {
            return Ok(0);
        }
        let invocation = |items: &[T]| {
            let mut invocation = script.prepare_invoke();
            for item in items {
                add(&mut invocation, item);
            }
            for arg in tail {
                invocation.arg(*arg);
            }
            invocation
        };
        match self {
            Self::Single(conn) => invocation(items).invoke_async(&mut **conn).await,
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

/// Why a Redis operation failed (see the module documentation).
#[derive(Debug)]
pub(super) enum Failure {
    /// Redis could not be reached: I/O errors, a closed pool, a cluster
    /// that is down or failing over. Counts against the breaker.
    Unavailable(String),
    /// Redis did not answer in time: the command timeout, the pool's create
    /// and recycle timeouts. Counts against the breaker, unless this
    /// process noticed it late (its workers were busy).
    TimedOut(String),
    /// No pooled connection came free in time: every one is busy with this
    /// process's own commands. A miss for this call; says nothing about
    /// Redis (were Redis stuck, those commands would time out and count).
    Saturated,
    /// Redis answered an error caused by the request. A miss for this call.
    Command(String),
}

impl Failure {
    /// The command timeout ran out (pool wait included).
    pub(super) fn timed_out() -> Self {
        Self::TimedOut("timed out".to_owned())
    }
}

impl From<RedisError> for Failure {
    fn from(error: RedisError) -> Self {
        // `is_io_error` covers the other three today; they are asked too so
        // that a refused, dropped or timed-out connection counts whatever
        // kind a later redis version files it under.
        let unavailable = error.is_io_error()
            || error.is_timeout()
            || error.is_connection_refusal()
            || error.is_connection_dropped()
            || matches!(
                error.kind(),
                // Connecting failed, or the node cannot serve anyone now.
                ErrorKind::AuthenticationFailed
                    | ErrorKind::ClusterConnectionNotFound
                    | ErrorKind::Server(
                        ServerErrorKind::ClusterDown
                            | ServerErrorKind::MasterDown
                            | ServerErrorKind::TryAgain
                            | ServerErrorKind::BusyLoading
                            | ServerErrorKind::ReadOnly
                    )
            );
        if error.is_timeout() {
            Self::TimedOut(error.to_string())
        } else if unavailable {
            Self::Unavailable(error.to_string())
        } else {
            Self::Command(error.to_string())
        }
    }
}

impl From<deadpool_redis::PoolError> for Failure {
    fn from(error: deadpool_redis::PoolError) -> Self {
        match error {
            deadpool_redis::PoolError::Backend(error) => error.into(),
            // Timed out waiting for, creating or recycling a connection.
            deadpool_redis::PoolError::Timeout(deadpool_redis::TimeoutType::Wait) => {
                Self::Saturated
            }
            timeout @ deadpool_redis::PoolError::Timeout(_) => Self::TimedOut(timeout.to_string()),
            // The pool is closed: there is no connection to use.
            other => Self::Unavailable(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use deadpool_redis::{PoolError, TimeoutType, redis::Value};

    use super::*;

    #[tokio::test]
    async fn an_acl_user_needs_a_password_in_the_settings_or_the_url() {
        let settings = |overrides: &[(&str, &str)]| {
            let mut all = vec![("database.url", "postgres://localhost/datagate")];
            all.extend_from_slice(overrides);
            crate::config::Settings::load_with_overrides(None, &all)
                .unwrap()
                .redis
        };
        let user = settings(&[("redis.username", "datagate")]);
        let error = Pool::new(&user, "redis://127.0.0.1:1")
            .err()
            .expect("refused")
            .to_string();
        assert!(
            error.contains("redis.username needs redis.password"),
            "{error}"
        );
        assert!(Pool::new(&user, "redis://:in-the-url@127.0.0.1:1").is_ok());
        let both = settings(&[
            ("redis.username", "datagate"),
            ("redis.password", "in-the-settings"),
        ]);
        assert!(Pool::new(&both, "redis://127.0.0.1:1").is_ok());
        // Neither: no AUTH at all, as before.
        assert!(Pool::new(&settings(&[]), "redis://127.0.0.1:1").is_ok());
    }

    /// The error Redis answers with `reply` (RESP), as the client sees it.
    fn answered(reply: &[u8]) -> RedisError {
        redis::parse_redis_value(reply)
            .and_then(Value::extract_error)
            .expect_err("an error reply")
    }

    fn counts(failure: Failure) -> bool {
        matches!(failure, Failure::Unavailable(_) | Failure::TimedOut(_))
    }

    /// Each of these error replies counts against the breaker, or none does.
    #[track_caller]
    fn assert_replies_count(replies: &[&[u8]], expected: bool) {
        for reply in replies {
            let failure = Failure::from(answered(reply));
            assert_eq!(
                counts(failure),
                expected,
                "{}",
                String::from_utf8_lossy(reply)
            );
        }
    }

    #[test]
    fn connection_and_timeout_failures_count_against_the_breaker() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::TimedOut,
            io::ErrorKind::UnexpectedEof,
        ] {
            let error = RedisError::from(io::Error::new(kind, "socket"));
            assert!(counts(error.into()), "{kind:?}");
        }
        let dropped = RedisError::from((ErrorKind::Io, "Connection dropped"));
        assert!(counts(dropped.into()));
        assert!(counts(Failure::timed_out()));
        assert!(matches!(Failure::timed_out(), Failure::TimedOut(_)));
    }

    #[test]
    fn pool_timeouts_and_failed_connects_count_against_the_breaker() {
        for timeout in [TimeoutType::Create, TimeoutType::Recycle] {
            let failure = PoolError::Timeout(timeout).into();
            assert!(matches!(failure, Failure::TimedOut(_)), "{timeout:?}");
        }
        // Waiting for a busy pool is this process's saturation, not Redis.
        let wait = PoolError::Timeout(TimeoutType::Wait).into();
        assert!(matches!(wait, Failure::Saturated));
        assert!(!counts(wait));
        assert!(counts(PoolError::Closed.into()));
        let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "connect");
        assert!(counts(PoolError::Backend(refused.into()).into()));
    }

    #[test]
    fn a_cluster_that_is_down_or_failing_over_counts_against_the_breaker() {
        assert_replies_count(
            &[
                b"-CLUSTERDOWN The cluster is down\r\n",
                b"-MASTERDOWN Link with MASTER is down\r\n",
                b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
                b"-LOADING Redis is loading the dataset in memory\r\n",
                b"-READONLY You can't write against a read only replica.\r\n",
            ],
            true,
        );
    }

    #[test]
    fn a_command_error_caused_by_the_request_does_not_count() {
        assert_replies_count(
            &[
                b"-ERR wrong number of arguments for 'mget' command\r\n",
                b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
                b"-ERR Error running script (call to f_0123): user_script:1: bad\r\n",
                b"-NOSCRIPT No matching script.\r\n",
                b"-CROSSSLOT Keys in request don't hash to the same slot\r\n",
            ],
            false,
        );
        let type_error = redis::from_redis_value::<u64>(Value::SimpleString("OK".into()))
            .expect_err("not a number");
        assert!(!counts(RedisError::from(type_error).into()));
        let backend = PoolError::Backend(answered(b"-ERR unknown command\r\n"));
        assert!(!counts(backend.into()));
    }
}
