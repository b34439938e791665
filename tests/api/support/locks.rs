//! Calls that stay in flight for as long as a test wants: a row lock that an
//! UpdateUser of the row waits for, and the app's backend that waits.

use std::time::Duration;

use sqlx::PgPool;

/// Holds a row lock on a user so that an UpdateUser of it blocks.
pub struct RowLock(sqlx::Transaction<'static, sqlx::Postgres>);

impl RowLock {
    pub async fn on_user(db: &PgPool, id: i64) -> Self {
        let mut tx = db.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR UPDATE")
            .bind(id)
            .execute(&mut *tx)
            .await
            .unwrap();
        Self(tx)
    }

    pub async fn release(self) {
        self.0.rollback().await.unwrap();
    }
}

/// Waits until some statement in the app's database waits for a lock.
pub async fn wait_for_lock_waiter(db: &PgPool) {
    for _ in 0..200 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(db)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no call started waiting for the row lock");
}

/// Waits until one of the app's backends (not the test's own sessions)
/// waits for a lock; its pid.
pub async fn app_backend_waiting_for_lock(db: &PgPool) -> i32 {
    for _ in 0..400 {
        let waiting: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'datagate' \
               AND wait_event_type = 'Lock' \
             LIMIT 1",
        )
        .fetch_optional(db)
        .await
        .unwrap();
        if let Some(pid) = waiting {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no call of the app started waiting for a lock");
}
