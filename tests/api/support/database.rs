//! A PostgreSQL database per test, so that tests run in parallel.
//!
//! The server to create databases on comes from `DATAGATE_TEST_DATABASE_URL`
//! or `DATABASE_URL` (`make test` starts one). Each test's database is
//! `datagate_test_<uuid>`, a copy of the migrated template (`template`), and
//! is dropped with its guard, after the test (`KEEP_TEST_DB=1` keeps it for
//! inspection).

use sqlx::{Connection as _, PgConnection};

use super::{frame::Teardown, template};

pub fn admin_database_url() -> String {
    std::env::var("DATAGATE_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .expect("set DATABASE_URL to a PostgreSQL server the tests may create databases on (`make test` does)")
}

/// A fresh database with every migration applied; dropped with the guard.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let admin_url = admin_database_url();
        let name = format!("datagate_test_{}", uuid::Uuid::new_v4().simple());
        let template = template::name();
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connect to the test PostgreSQL server");
        let create = format!(r#"CREATE DATABASE "{name}" TEMPLATE "{template}""#);
        if let Err(e) = sqlx::query(&create).execute(&mut admin).await {
            // The first test of a new migration set builds the template (and
            // so does a test whose template was dropped meanwhile).
            let missing = e
                .as_database_error()
                .and_then(|e| e.code())
                .is_some_and(|code| code == "3D000");
            assert!(missing, "{create}: {e}");
            template::ensure(&mut admin, &admin_url, &template).await;
            sqlx::query(&create)
                .execute(&mut admin)
                .await
                .unwrap_or_else(|e| panic!("{create}: {e}"));
        }
        admin.close().await.ok();
        let url = datagate::store::postgres::url_with_database(&admin_url, &name);
        Self {
            name,
            url,
            admin_url,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_DB").is_some() {
            eprintln!("kept test database {}", self.name);
            return;
        }
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        Teardown::task(move || async move {
            if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                let _ = sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
                    .execute(&mut admin)
                    .await;
                admin.close().await.ok();
            }
        })
        .register();
    }
}
