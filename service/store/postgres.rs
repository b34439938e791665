//! The PostgreSQL pool and the schema migrations.

use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::{
    PgPool,
    migrate::{Migrate as _, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::config::DatabaseSettings;

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// A pool sized and timed by the settings. Connections are opened lazily
/// (beyond `min_connections`, in the background), so start-up does not fail
/// on a database that is briefly unreachable; readiness reports it instead.
pub fn pool(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    pool_at(settings, &settings.url, "database.url", "datagate")
}

/// A pool on `url` (the setting `key`), sized and timed by `settings`, its
/// connections named `application` in `pg_stat_activity`.
fn pool_at(
    settings: &DatabaseSettings,
    url: &SecretString,
    key: &str,
    application: &str,
) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url
        .expose_secret()
        .parse()
        .with_context(|| format!("invalid configuration: {key} is not a PostgreSQL URL"))?;
    Ok(PgPoolOptions::new()
        .min_connections(settings.min_connections)
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        .idle_timeout(Some(settings.idle_timeout))
        .max_lifetime(Some(settings.max_lifetime))
        .connect_lazy_with(options.application_name(application)))
}

/// Where lag-tolerant reads go: the read replica when `database.read_url` is
/// set, else the primary.
#[derive(Clone, Debug)]
pub struct Reads {
    pool: PgPool,
    replica: bool,
}

impl Reads {
    /// The replica's pool (opened lazily, like the primary's), or `primary`.
    pub fn new(settings: &DatabaseSettings, primary: &PgPool) -> anyhow::Result<Self> {
        if settings.read_url.expose_secret().trim().is_empty() {
            return Ok(Self::primary(primary));
        }
        Ok(Self {
            pool: pool_at(
                settings,
                &settings.read_url,
                "database.read_url",
                "datagate-reads",
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
    use super::url_with_database;

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
