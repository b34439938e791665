//! The migrated template every test database is copied from.
//!
//! Copying a database (`CREATE DATABASE … TEMPLATE`) takes a fraction of
//! the time replaying every migration does. The template is
//! `datagate_template_<digest>`, the digest covering every migration the
//! service embeds (version, kind and checksum), so a changed or added
//! migration gets a template of its own and no test runs on an old schema.
//!
//! It is built at most once, however many tests and test processes start
//! together: the builder holds a PostgreSQL advisory lock, checks again that
//! the template is missing, builds it under `<name>_partial` and renames it
//! when complete, so a half-built template is never copied (an interrupted
//! build leaves only a `_partial`, dropped by the next builder). The template
//! then refuses connections (`ALLOW_CONNECTIONS false`): `CREATE DATABASE …
//! TEMPLATE` fails while any session is connected to its source, and nothing
//! can be.
//!
//! The builder also drops the templates of other migration sets built more
//! than a day ago (an old checkout's; another checkout testing right now
//! keeps its recent one, and rebuilds it if it goes missing). Only databases
//! named `datagate_template_*` are touched.

use sha2::{Digest as _, Sha256};
use sqlx::{Connection as _, PgConnection};

/// The advisory lock key the builders share ("datagate" in ASCII).
const BUILD_LOCK: i64 = 0x6461_7461_6761_7465;
const PREFIX: &str = "datagate_template_";
/// Templates of other migration sets older than this are dropped.
const STALE_AFTER_SECS: i64 = 24 * 3600;

/// The template's name for the migrations this build of the service embeds.
pub fn name() -> String {
    let mut digest = Sha256::new();
    for migration in datagate::store::postgres::MIGRATOR.iter() {
        digest.update(migration.version.to_le_bytes());
        digest.update(format!("{:?}", migration.migration_type));
        digest.update(&*migration.checksum);
    }
    format!("{PREFIX}{}", &hex::encode(digest.finalize())[..16])
}

/// Builds the template `name` unless it exists; `admin` is a connection to
/// the server's maintenance database and `admin_url` its URL.
pub async fn ensure(admin: &mut PgConnection, admin_url: &str, name: &str) {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(BUILD_LOCK)
        .execute(&mut *admin)
        .await
        .expect("take the template build lock");
    if !exists(admin, name).await {
        build(admin, admin_url, name).await;
        drop_stale(admin, name).await;
    }
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(BUILD_LOCK)
        .execute(&mut *admin)
        .await
        .expect("release the template build lock");
}

async fn exists(admin: &mut PgConnection, name: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(admin)
        .await
        .expect("look the template up")
}

async fn build(admin: &mut PgConnection, admin_url: &str, name: &str) {
    let partial = format!("{name}_partial");
    for sql in [
        format!(r#"DROP DATABASE IF EXISTS "{partial}" WITH (FORCE)"#),
        format!(r#"CREATE DATABASE "{partial}""#),
    ] {
        sqlx::query(&sql)
            .execute(&mut *admin)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // One connection, closed before the rename: no session may be left on
    // a database that is renamed or copied.
    let url = datagate::store::postgres::url_with_database(admin_url, &partial);
    let mut migrating = PgConnection::connect(&url)
        .await
        .expect("connect to the template being built");
    datagate::store::postgres::MIGRATOR
        .run(&mut migrating)
        .await
        .expect("migrate the template");
    migrating
        .close()
        .await
        .expect("disconnect from the template");
    let built_at = chrono::Utc::now().timestamp();
    for sql in [
        format!(r#"ALTER DATABASE "{partial}" RENAME TO "{name}""#),
        format!(r#"ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false"#),
        format!(r#"COMMENT ON DATABASE "{name}" IS 'datagate test template, built {built_at}'"#),
    ] {
        sqlx::query(&sql)
            .execute(&mut *admin)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// Drops leftover partial builds, and the templates of other migration sets
/// built more than a day ago (or by an older harness, without a date).
async fn drop_stale(admin: &mut PgConnection, current: &str) {
    let stale: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database \
         WHERE starts_with(datname, $1) AND datname <> $2 \
           AND (datname LIKE '%\\_partial' \
                OR coalesce(substring(shobj_description(oid, 'pg_database') \
                                      FROM 'built ([0-9]+)')::bigint, 0) \
                   < extract(epoch FROM now())::bigint - $3)",
    )
    .bind(PREFIX)
    .bind(current)
    .bind(STALE_AFTER_SECS)
    .fetch_all(&mut *admin)
    .await
    .expect("list stale templates");
    for name in stale {
        let _ = sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
            .execute(&mut *admin)
            .await;
    }
}
