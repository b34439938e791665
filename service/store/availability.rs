//! Fail fast while a PostgreSQL server is down: which [`Gate`] (see
//! [`crate::model::availability`]) guards a pool, and which failures close
//! it.
//!
//! Each server (host, port and database of a pool: the primary and the
//! read replica apart) has a gate. It closes when an acquire fails for want
//! of a server (an I/O error, or a pool timeout while the pool holds no live
//! connection: a saturated pool is overload, not an outage) or when the
//! readiness probe's own connection fails. A trial call's acquire waits at
//! most [`TRIAL_WAIT`](crate::model::availability::TRIAL_WAIT) (sqlx
//! retries the connection within one acquire, so a long trial would be many
//! attempts); the gate opens at the first successful acquire or probe.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock, PoisonError},
};

use sqlx::PgPool;

use crate::model::availability::Gate;

/// The gate of the server `pool` connects to.
pub fn gate(pool: &PgPool) -> Arc<Gate> {
    static GATES: OnceLock<Mutex<HashMap<String, Arc<Gate>>>> = OnceLock::new();
    let options = pool.connect_options();
    let key = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or_default()
    );
    GATES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(key)
        .or_insert_with(|| Arc::new(Gate::new("postgres", "the database")))
        .clone()
}

/// Whether an acquire's failure means the server cannot be reached (rather
/// than a saturated pool or the call's own deadline).
pub fn is_outage(error: &sqlx::Error, pool: &PgPool) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::PoolTimedOut => pool.size() == 0,
        // "the database system is starting up" / "is shutting down".
        sqlx::Error::Database(db) => {
            matches!(db.code().as_deref(), Some("57P01" | "57P02" | "57P03"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, reason};

    // A runtime: a lazy pool spawns its reaper.
    #[tokio::test]
    async fn each_server_and_database_has_its_own_gate_and_it_names_postgres() {
        let lazy = |url: &str| PgPool::connect_lazy(url).unwrap();
        let primary = gate(&lazy("postgres://u@127.0.0.1:5432/a"));
        assert!(Arc::ptr_eq(
            &primary,
            &gate(&lazy("postgres://other@127.0.0.1:5432/a"))
        ));
        assert!(!Arc::ptr_eq(
            &primary,
            &gate(&lazy("postgres://u@127.0.0.1:5433/a"))
        ));
        assert!(!Arc::ptr_eq(
            &primary,
            &gate(&lazy("postgres://u@127.0.0.1:5432/b"))
        ));
        match primary.refused(std::time::Duration::ZERO) {
            Error::Unavailable { detail, .. } => {
                assert_eq!(detail.reason, reason::DEPENDENCY_UNAVAILABLE);
                assert_eq!(detail.metadata["dependency"], "postgres");
            }
            other => panic!("{other:?}"),
        }
    }
}
