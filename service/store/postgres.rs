//! The PostgreSQL pools, the schema migrations, and how the call's deadline
//! reaches every statement.
//!
//! # Deadlines in PostgreSQL
//!
//! Every statement a call runs is bounded by the call's remaining deadline
//! minus [`MARGIN`] (so PostgreSQL gives up, and the caller hears
//! `QUERY_TIMEOUT`, before its own timer fires): its `statement_timeout`
//! and `lock_timeout` are that budget ([`statement_budget`]). Round trips:
//!
//! - **Every connection** of the serving pool starts with both timeouts at
//!   `server.request_timeout` (startup parameters in the connect options:
//!   no round trip). Nothing the service runs outlives the longest call.
//! - **Writes** ([`crate::store::audit::begin`]): `BEGIN`, then the audit
//!   statement that already named the actor now also sets both timeouts
//!   `LOCAL` to the budget and returns `pg_backend_pid()`: 0 extra round
//!   trips. The settings end with the transaction.
//! - **Reads** ([`acquire`]): when the connection's default is no more than
//!   [`TOLERANCE`] over the budget (a call with the server's full deadline,
//!   the common case), nothing is sent: 0 extra round trips. When the call's
//!   deadline is shorter, the read runs in a transaction begun with
//!   `BEGIN; SET LOCAL statement_timeout …; SET LOCAL lock_timeout …` (one
//!   simple-query message): 1 extra round trip per acquire. The transaction
//!   is never committed: dropping it queues a `ROLLBACK`, which sqlx sends
//!   with the ping it runs on every returned connection anyway, so the
//!   settings are gone before the connection is reused, also when the read
//!   was dropped mid-statement.
//! - `statement_timeout` is per statement: each statement of a write gets
//!   the budget left when the transaction's first statement ran, so a
//!   transaction whose later statements wait too can outrun the call; the
//!   cancel below ends what is still running when the call is dropped at
//!   its deadline.
//! - **Pool waits** are bounded by the same budget: an acquire that runs out
//!   of the call's time is DEADLINE_EXCEEDED; one that hits the pool's own
//!   `acquire_timeout` first (a saturated pool, a longer deadline) stays
//!   UNAVAILABLE.
//!
//! # Cancelling what a dropped call left running
//!
//! sqlx does not cancel a statement whose future is dropped: the connection
//! is returned (`PoolConnection`'s `Drop` spawns `return_to_pool`), and its
//! ping waits, with no bound, for every pending result, the abandoned
//! statement's included, then for the queued `ROLLBACK`. The connection is
//! never handed out mid-statement, but it is out of the pool for as long as
//! the statement runs. The timeouts above end a call's statements about its
//! deadline; when a call is abandoned (its caller cancels, RST_STREAM, or
//! the middleware drops it at the deadline), its write's statement is
//! cancelled by [`Control::cancel`]: `pg_cancel_backend(pid)`
//! over a pool of its own (so a saturated main pool cannot hold it up),
//! with the pid the write's first statement returned. The write's
//! connection is held until the cancel has been delivered, and only then
//! returned: a cancel that arrives after the statement ended finds the
//! backend reading its next command, where PostgreSQL ignores it, so it can
//! never hit the next user of the connection.
//!
//! Reads are not cancelled that way: sqlx does not expose a connection's
//! pid, and asking for it would cost a round trip per acquire. A read
//! connection ([`Conn`]) dropped while its call is abandoned is closed
//! instead of returned, and every serving connection starts with
//! `client_connection_check_interval` ([`CLIENT_CHECK_INTERVAL_MS`]), so
//! PostgreSQL notices the closed socket while the statement runs (a lock
//! wait included) and aborts it. The pool replaces the connection when it
//! needs one: one reconnect per abandoned read.

use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::{
    Executor as _, PgConnection, PgPool, Postgres, Transaction,
    migrate::{Migrate as _, Migrator},
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::availability;
use crate::{
    config::DatabaseSettings,
    error::{Error, Result},
    model::{
        availability::{Admit, FIRST_BACKOFF, TRIAL_WAIT},
        deadline::{Abandoned, Deadline},
        diagnostics::PoolStats,
    },
};

/// Taken off the call's remaining time for each statement, so PostgreSQL's
/// timeout, the rollback and the answer reach the caller before its own
/// timer fires (its deadline started before ours, by the network's delay;
/// a client that times out first reports its own timeout, e.g. tonic's
/// CANCELLED "Timeout expired", and never sees `QUERY_TIMEOUT`). 20 ms was
/// too little on a loaded 2-core machine: the locked-row test's answers all
/// lost to the client's timer.
pub const MARGIN: Duration = Duration::from_millis(50);
/// The shortest budget worth sending: with less, the call fails at once.
/// (Also keeps the timeout off zero, which PostgreSQL reads as "none".)
pub const FLOOR: Duration = Duration::from_millis(1);
/// How far a connection's default timeout may exceed a read's budget before
/// the read sets its own: the default-deadline call is not charged a round
/// trip for the milliseconds it has already spent.
pub const TOLERANCE: Duration = Duration::from_millis(250);

/// `pool`'s size, idle connections and maximum, named `name`.
pub fn pool_stats(name: &'static str, pool: &PgPool) -> PoolStats {
    PoolStats {
        pool: name,
        size: i64::from(pool.size()),
        idle: pool.num_idle() as i64,
        max: i64::from(pool.options().get_max_connections()),
    }
}

/// The time a statement of a call with `remaining` time left may take, or
/// `None` when there is too little left to start one.
pub fn statement_budget(remaining: Duration) -> Option<Duration> {
    remaining.checked_sub(MARGIN).filter(|b| *b >= FLOOR)
}

/// How often PostgreSQL checks, while a statement runs, that the service is
/// still connected (`client_connection_check_interval`, PostgreSQL 14+):
/// a read connection closed by an abandoned call stops its statement
/// within about this long, and so do the backends of a killed instance.
pub const CLIENT_CHECK_INTERVAL_MS: u64 = 50;

/// A duration as PostgreSQL milliseconds, never zero (zero disables).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Whether a read with `budget` must set its own timeouts on a connection
/// whose default is `default` (`None`: no default, always).
pub fn read_needs_own_timeout(budget: Duration, default: Option<Duration>) -> bool {
    default.is_none_or(|default| budget.saturating_add(TOLERANCE) < default)
}

/// The `statement_timeout` a pool's connections start with, as set by
/// [`pool_for_calls`] (the `-c statement_timeout=<ms>` startup option).
fn connection_default(options: Option<&str>) -> Option<Duration> {
    options?
        .split_whitespace()
        .find_map(|o| o.strip_prefix("statement_timeout="))
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis)
}

/// The statement budget of the call running on this task: `None` outside a
/// call, DEADLINE_EXCEEDED when too little is left to start a statement.
pub fn current_budget() -> Result<Option<Duration>> {
    Deadline::current()
        .map(|d| statement_budget(d.remaining()).ok_or_else(Error::deadline_exceeded))
        .transpose()
}

/// A connection for reads, bounded by the call's deadline (see the module
/// doc); it dereferences to the connection the store functions take.
///
/// Dropped while its call is abandoned, it is closed rather than returned
/// (PostgreSQL then aborts what it still runs, see the module doc). Dropped
/// inside the transaction that set a shorter deadline's timeouts, it rolls
/// that back on a task of its own before the connection goes back.
pub struct Conn {
    conn: Option<PoolConnection<Postgres>>,
    /// `BEGIN; SET LOCAL …` was sent: roll back before reuse.
    in_transaction: bool,
    abandoned: Option<Abandoned>,
}

impl Conn {
    fn new(conn: PoolConnection<Postgres>) -> Self {
        Self {
            conn: Some(conn),
            in_transaction: false,
            abandoned: Abandoned::current(),
        }
    }
}

impl std::ops::Deref for Conn {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn.as_deref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.abandoned.as_ref().is_some_and(Abandoned::is_set) {
            // Closed: the server notices within its client connection
            // check interval and aborts the statement; the pool opens a
            // replacement when it needs one.
            metrics::counter!("abandoned_reads_closed_total").increment(1);
            drop(conn.detach());
            return;
        }
        if !self.in_transaction {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let mut conn = conn;
                    let connection: &mut PgConnection = &mut conn;
                    if connection.execute(sqlx::raw_sql("ROLLBACK")).await.is_err() {
                        drop(conn.detach());
                    }
                });
            }
            Err(_) => drop(conn.detach()),
        }
    }
}

/// A connection from `pool` for the reads of the call running on this task:
/// the pool wait is bounded by the call's budget, and so is every statement
/// (by the connection's default, or by `SET LOCAL` when the call's deadline
/// is shorter). Outside a call, a plain pooled connection.
pub async fn acquire(pool: &PgPool) -> Result<Conn> {
    let Some(budget) = current_budget()? else {
        return Ok(Conn::new(pooled(pool, None).await?));
    };
    let mut conn = Conn::new(pooled(pool, Some(budget)).await?);
    // What is left after the pool wait.
    let budget = current_budget()?.unwrap_or(budget);
    let default = connection_default(pool.connect_options().get_options());
    if !read_needs_own_timeout(budget, default) {
        return Ok(conn);
    }
    let ms = millis(budget);
    // Marked first: a BEGIN dropped in flight is rolled back too (a
    // ROLLBACK outside a transaction is only a warning).
    conn.in_transaction = true;
    let begin = format!("BEGIN; SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}");
    let connection: &mut PgConnection = &mut conn;
    connection.execute(sqlx::raw_sql(&begin)).await?;
    Ok(conn)
}

/// A transaction from `pool`, its pool wait bounded by the call's budget
/// (the caller sets the statement timeouts in its first statement, from
/// [`current_budget`] then).
pub async fn begin(pool: &PgPool) -> Result<Transaction<'static, Postgres>> {
    let conn = pooled(pool, current_budget()?).await?;
    begin_on(conn, None).await
}

/// A connection from `pool`, through its server's availability gate (see
/// [`availability`](super::availability)): refused at once while the server
/// is down (but for the period's trial), the wait bounded by `budget`.
async fn pooled(pool: &PgPool, budget: Option<Duration>) -> Result<PoolConnection<Postgres>> {
    let gate = availability::gate(pool);
    let trial = match gate.admit(std::time::Instant::now()) {
        Admit::Go => false,
        Admit::Trial => true,
        Admit::Refuse(retry_after) => return Err(gate.refused(retry_after)),
    };
    // A trial waits briefly: sqlx retries the connection within one acquire,
    // and a long trial would be many attempts.
    let wait = if trial {
        Some(budget.map_or(TRIAL_WAIT, |b| b.min(TRIAL_WAIT)))
    } else {
        budget
    };
    let acquired = match wait {
        None => pool.acquire().await,
        Some(wait) => match tokio::time::timeout(wait, pool.acquire()).await {
            Ok(acquired) => acquired,
            Err(_elapsed) if trial => {
                gate.down(std::time::Instant::now());
                return Err(gate.refused(FIRST_BACKOFF));
            }
            // The call's deadline, not the server's health.
            Err(_elapsed) => return Err(Error::deadline_exceeded()),
        },
    };
    match acquired {
        Ok(conn) => {
            gate.up();
            Ok(conn)
        }
        Err(e) => {
            if availability::is_outage(&e, pool) {
                gate.down(std::time::Instant::now());
            }
            // Not retried: the pool has retried connecting within the
            // acquire, and an outage is the gate's to handle.
            Err(Error::from(e).not_transient())
        }
    }
}

/// `BEGIN` (or `statement`) on a connection already acquired: what
/// `Pool::begin` / `Pool::begin_with` do after their acquire, through the
/// (doc-hidden) constructor they use. The acquire is split off so that only
/// the pool wait runs under this module's timer: sqlx 0.8.6 counts a
/// transaction only once its `BEGIN` has been answered, so a `BEGIN`
/// dropped in flight queues no `ROLLBACK` and the connection would go back
/// to the pool inside the transaction. A `BEGIN` is one quick round trip;
/// only the call's own end (the middleware) can still drop it.
async fn begin_on(
    conn: PoolConnection<Postgres>,
    statement: Option<String>,
) -> Result<Transaction<'static, Postgres>> {
    Ok(Transaction::begin(
        sqlx::pool::MaybePoolConnection::PoolConnection(conn),
        statement.map(Into::into),
    )
    .await?)
}

/// Cancels statements of the main pool's backends, over connections of its
/// own: at most [`Control::CONNECTIONS`], opened on first use and closed
/// when idle, so a saturated main pool cannot hold a cancel up.
#[derive(Clone, Debug)]
pub struct Control {
    pool: PgPool,
}

impl Control {
    pub const CONNECTIONS: u32 = 2;
    /// Bound on a cancel, pool wait included.
    pub const TIMEOUT: Duration = Duration::from_secs(1);

    /// A control pool on the same server and database as `main`.
    pub fn for_pool(main: &PgPool) -> Self {
        let options = (*main.connect_options())
            .clone()
            .application_name(APPLICATION_NAMES[2]);
        Self {
            pool: PgPoolOptions::new()
                .min_connections(0)
                .max_connections(Self::CONNECTIONS)
                .acquire_timeout(Self::TIMEOUT)
                .idle_timeout(Some(Duration::from_secs(10)))
                .connect_lazy_with(options),
        }
    }

    /// Asks PostgreSQL to cancel what backend `pid` is running; false if the
    /// request could not be made in time (logged).
    pub async fn cancel(&self, pid: i32) -> bool {
        let sent = tokio::time::timeout(
            Self::TIMEOUT,
            sqlx::query_scalar::<_, bool>("SELECT pg_cancel_backend($1)")
                .bind(pid)
                .fetch_one(&self.pool),
        )
        .await;
        match sent {
            Ok(Ok(_)) => true,
            Ok(Err(error)) => {
                tracing::warn!(pid, %error, "could not cancel an abandoned statement");
                false
            }
            Err(_) => {
                tracing::warn!(pid, "cancelling an abandoned statement timed out");
                false
            }
        }
    }
}

/// The `application_name` of the serving pool's connections, the read
/// replica's and the control pool's: how `pg_stat_activity` tells the
/// service's own backends (AdminService cancels only those).
pub const APPLICATION_NAMES: [&str; 3] = ["datagate", "datagate-reads", "datagate-control"];

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// A pool sized and timed by the settings. Connections are opened lazily
/// (beyond `min_connections`, in the background), so start-up does not fail
/// on a database that is briefly unreachable; readiness reports it instead.
///
/// Its statements have no time limit: this is the pool of the command line
/// (migrations, seeding). The server uses [`pool_for_calls`].
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    pool_at(
        settings,
        &settings.url,
        "database.url",
        APPLICATION_NAMES[0],
        None,
    )
}

/// The serving pool: like [`pool`], and every connection starts with
/// `statement_timeout` and `lock_timeout` at `longest_call` (startup
/// options, no round trip), the default a call's read keeps when its
/// deadline is about that long.
pub fn pool_for_calls(
    settings: &DatabaseSettings,
    longest_call: Duration,
) -> anyhow::Result<PgPool> {
    pool_at(
        settings,
        &settings.url,
        "database.url",
        APPLICATION_NAMES[0],
        Some(longest_call),
    )
}

/// A pool on `url` (the setting `key`), sized and timed by `settings`, its
/// connections named `application` in `pg_stat_activity`, and with the
/// default statement and lock timeouts when `timeouts` is set.
fn pool_at(
    settings: &DatabaseSettings,
    url: &SecretString,
    key: &str,
    application: &str,
    timeouts: Option<Duration>,
) -> anyhow::Result<PgPool> {
    let mut options: PgConnectOptions = url
        .expose_secret()
        .parse()
        .with_context(|| format!("invalid configuration: {key} is not a PostgreSQL URL"))?;
    if let Some(timeout) = timeouts {
        let ms = millis(timeout);
        options = options.options([
            ("statement_timeout", ms),
            ("lock_timeout", ms),
            ("client_connection_check_interval", CLIENT_CHECK_INTERVAL_MS),
        ]);
    }
    Ok(PgPoolOptions::new()
        .min_connections(settings.min_connections)
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        .idle_timeout(Some(settings.idle_timeout))
        .max_lifetime(Some(settings.max_lifetime))
        // sqlx pings every connection it hands out (and again when it is
        // released): a round trip before every statement. A connection
        // released within the last second has just answered that release
        // ping; only one idle longer is pinged first.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= RECENTLY_USED {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options.application_name(application)))
}

/// A pooled connection idle for less than this is handed out unchecked.
const RECENTLY_USED: Duration = Duration::from_secs(1);

/// Where lag-tolerant reads go: the read replica when `database.read_url` is
/// set, else the primary.
#[derive(Clone, Debug)]
pub struct Reads {
    pool: PgPool,
    replica: bool,
}

impl Reads {
    /// The replica's pool (opened lazily, like the primary's), or `primary`.
    /// Its connections start with the same default timeouts as the
    /// primary's (read from its connect options).
    pub fn new(settings: &DatabaseSettings, primary: &PgPool) -> anyhow::Result<Self> {
        if settings.read_url.expose_secret().trim().is_empty() {
            return Ok(Self::primary(primary));
        }
        Ok(Self {
            pool: pool_at(
                settings,
                &settings.read_url,
                "database.read_url",
                APPLICATION_NAMES[1],
                connection_default(primary.connect_options().get_options()),
            )?,
            replica: true,
        })
    }

    /// Every read on the primary.
    pub fn primary(primary: &PgPool) -> Self {
        Self {
            pool: primary.clone(),
            replica: false,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The replica's own pool, when there is one.
    pub fn replica(&self) -> Option<&PgPool> {
        self.replica.then_some(&self.pool)
    }

    /// How far behind the primary the replica's replay is, in seconds:
    /// `None` without a replica; 0 when the read server is not in recovery
    /// or has replayed all it received (an idle primary sends nothing, and
    /// the age of the last replayed transaction is not lag then); otherwise
    /// the age of the last transaction it replayed.
    pub async fn replication_lag(&self) -> sqlx::Result<Option<f64>> {
        if !self.replica {
            return Ok(None);
        }
        sqlx::query_scalar(
            "SELECT CASE \
                 WHEN NOT pg_is_in_recovery() \
                   OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
                 ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) \
             END::float8",
        )
        .fetch_one(&self.pool)
        .await
        .map(Some)
    }

    /// Waits, up to `timeout`, until the replica has replayed everything
    /// the primary had written when called, so that what is read next
    /// includes it (after a view refresh, before cached answers are made
    /// stale). True at once without a replica, or when the read server is
    /// not in recovery (not a streaming replica); false on timeout.
    pub async fn catch_up(&self, primary: &PgPool, timeout: Duration) -> sqlx::Result<bool> {
        if !self.replica {
            return Ok(true);
        }
        let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(primary)
            .await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (recovering, replayed): (bool, Option<bool>) = sqlx::query_as(
                "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn() >= $1::pg_lsn",
            )
            .bind(&lsn)
            .fetch_one(&self.pool)
            .await?;
            if !recovering || replayed == Some(true) {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub async fn migrate_up(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await.context("applying migrations")
}

/// `postgres://u@h:p/x?o` with the database `x` replaced by `name`; tools
/// and tests that create databases of their own derive their URLs with it.
pub fn url_with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let prefix = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    }
}

/// Reverts the newest `steps` applied migrations.
pub async fn migrate_down(pool: &PgPool, steps: usize) -> anyhow::Result<Vec<i64>> {
    let mut conn = pool.acquire().await.context("connecting to the database")?;
    let mut applied = conn
        .list_applied_migrations()
        .await
        .context("reading applied migrations")?;
    applied.sort_by_key(|m| m.version);
    let reverted: Vec<i64> = applied
        .iter()
        .rev()
        .take(steps)
        .map(|m| m.version)
        .collect();
    let target = applied.iter().rev().nth(steps).map_or(0, |m| m.version);
    drop(conn);
    MIGRATOR
        .undo(pool, target)
        .await
        .context("reverting migrations")?;
    Ok(reverted)
}

/// Each known migration with whether it is applied.
pub async fn migration_status(pool: &PgPool) -> anyhow::Result<Vec<(i64, String, bool)>> {
    let mut conn = pool.acquire().await.context("connecting to the database")?;
    conn.ensure_migrations_table()
        .await
        .context("creating the migrations table")?;
    let applied = conn
        .list_applied_migrations()
        .await
        .context("reading applied migrations")?;
    Ok(MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| {
            (
                m.version,
                m.description.to_string(),
                applied.iter().any(|a| a.version == m.version),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_statement_gets_the_remaining_time_less_the_margin() {
        assert_eq!(statement_budget(200 * MS), Some(200 * MS - MARGIN));
        assert_eq!(statement_budget(MARGIN + FLOOR), Some(FLOOR));
    }

    #[test]
    fn with_less_than_margin_and_floor_left_no_statement_starts() {
        assert_eq!(statement_budget(Duration::ZERO), None);
        assert_eq!(statement_budget(MARGIN), None);
        assert_eq!(
            statement_budget(MARGIN + FLOOR - Duration::from_micros(1)),
            None
        );
    }

    #[test]
    fn timeouts_are_whole_milliseconds_and_never_zero() {
        assert_eq!(millis(Duration::from_micros(1500)), 1);
        assert_eq!(
            millis(Duration::from_micros(10)),
            1,
            "0 would mean no timeout"
        );
        assert_eq!(millis(Duration::from_secs(30)), 30_000);
        assert_eq!(millis(Duration::MAX), u64::MAX);
    }

    #[test]
    fn a_read_sets_its_own_timeout_only_when_the_default_is_clearly_longer() {
        let default = Some(Duration::from_secs(30));
        assert!(!read_needs_own_timeout(Duration::from_secs(30), default));
        assert!(!read_needs_own_timeout(
            Duration::from_secs(30) - TOLERANCE,
            default
        ));
        assert!(read_needs_own_timeout(
            Duration::from_secs(30) - TOLERANCE - MS,
            default
        ));
        assert!(read_needs_own_timeout(200 * MS, default));
        assert!(
            read_needs_own_timeout(Duration::from_secs(3600), None),
            "no default: always bounded"
        );
    }

    #[test]
    fn the_connection_default_is_read_from_the_startup_options() {
        assert_eq!(
            connection_default(Some("-c statement_timeout=30000 -c lock_timeout=30000")),
            Some(Duration::from_secs(30))
        );
        assert_eq!(connection_default(Some("-c search_path=x")), None);
        assert_eq!(connection_default(None), None);
    }

    #[test]
    fn the_database_of_a_url_is_replaced_keeping_its_options() {
        assert_eq!(
            url_with_database("postgres://u@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            url_with_database("postgres://u@h:5432", "x"),
            "postgres://u@h:5432/x"
        );
    }
}
