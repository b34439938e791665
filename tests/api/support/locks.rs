//! Calls that stay in flight for as long as a test wants: a row lock that an
//! UpdateUser of the row waits for.

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
