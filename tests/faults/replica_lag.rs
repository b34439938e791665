//! A real streaming replica (a hot standby made with `pg_basebackup` from
//! the scenario's own primary) behind `database.read_url`: GetDatabaseHealth
//! reports its replay lag as 0 while it keeps up, as the age of what it last
//! replayed while its replay is paused and WAL waits, and 0 again once it has
//! caught up.

use std::time::{Duration, Instant};

use datagate::proto::v1 as pb;

use crate::support::{Deps, Postgres, Service, figure, wait_until};

const SCENARIO: &str = "replica_lag";

async fn lag(service: &Service) -> Option<f64> {
    service
        .admin()
        .get_database_health(pb::GetDatabaseHealthRequest {})
        .await
        .expect("GetDatabaseHealth")
        .into_inner()
        .replication_lag_seconds
}

/// A product written through the service (on the primary).
async fn write(service: &Service, tag: &str) -> i64 {
    service
        .catalog()
        .create_product(pb::CreateProductRequest {
            sku: format!(
                "LAG-{tag}-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            title: format!("Lag probe {tag}"),
            category: "tools".into(),
            price_cents: 100,
            inventory: 1,
            ..Default::default()
        })
        .await
        .expect("CreateProduct")
        .into_inner()
        .id
}

async fn replicated(replica: &sqlx::PgPool, product: i64) -> bool {
    sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM products WHERE id = $1)")
        .bind(product)
        .fetch_one(replica)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_lag_of_a_real_replica_is_reported_while_it_falls_behind_and_after_it_catches_up()
 {
    let _serial = crate::support::serial().await;
    let primary = Postgres::start().await;
    let replica = Postgres::replica_of(&primary).await;
    let replica_url = replica.url();
    let service = Service::in_process(Deps {
        database_url: &primary.url(),
        redis_url: None,
        overrides: &[("database.read_url", &replica_url)],
    })
    .await;
    let standby = replica.pool().await;
    let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&standby)
        .await
        .unwrap();
    assert!(in_recovery, "the replica is a standby");

    // Keeping up: what the primary wrote is replayed, and the lag is 0.
    let first = write(&service, "first").await;
    wait_until(
        "the first write is replayed",
        Duration::from_secs(20),
        async || replicated(&standby, first).await,
    )
    .await;
    // WAL the service writes in the background (partition upkeep, the audit
    // log) may be received a moment before it is replayed, and the lag then
    // reads a few milliseconds: a replica that keeps up returns to 0.
    wait_until(
        "a replica that keeps up reports a lag of 0",
        Duration::from_secs(20),
        async || lag(&service).await == Some(0.0),
    )
    .await;

    // Falling behind: replay paused, a write waits in the replica's WAL.
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&standby)
        .await
        .unwrap();
    let paused = Instant::now();
    let second = write(&service, "second").await;
    let mut behind = None;
    wait_until(
        "the replica has received the second write",
        Duration::from_secs(20),
        async || {
            behind = lag(&service).await;
            behind.is_some_and(|l| l > 0.0)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let behind = lag(&service).await.expect("a replica is configured");
    assert!(
        !replicated(&standby, second).await,
        "replay is paused: the second write is not on the replica yet"
    );
    let floor = paused.elapsed().as_secs_f64() - 0.5;
    assert!(
        behind >= floor,
        "paused for {:.1} s, the lag reads {behind:.2} s",
        paused.elapsed().as_secs_f64()
    );
    figure(SCENARIO, "lag_while_paused_s", format!("{behind:.2}"));

    // Caught up: replay resumed, the write arrives, the lag is 0 again.
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&standby)
        .await
        .unwrap();
    wait_until(
        "the second write is replayed",
        Duration::from_secs(20),
        async || replicated(&standby, second).await,
    )
    .await;
    let mut after = None;
    wait_until(
        "the lag is back to 0",
        Duration::from_secs(20),
        async || {
            after = lag(&service).await;
            after == Some(0.0)
        },
    )
    .await;
    standby.close().await;
    service.stop().await;
}
