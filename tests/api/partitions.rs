//! Monthly partitions of the log tables: created ahead, retired by
//! retention, DEFAULT rows moved, and safe from concurrent replicas.

use chrono::{Datelike as _, Months, NaiveDate, Utc};
use datagate::{config::PartitionSettings, domain::partitions::Partitions, proto::v1 as pb};
use tonic::Code;

use crate::support::{TestApp, api_test, assert_error};

fn months_from_now(n: u32) -> String {
    let month = Utc::now().date_naive().with_day(1).unwrap() + Months::new(n);
    format!("{:04}-{:02}", month.year(), month.month())
}

fn settings(months_ahead: u32, retention: u32) -> PartitionSettings {
    PartitionSettings {
        months_ahead,
        search_retention_months: retention,
        audit_retention_months: retention,
        interval: std::time::Duration::ZERO,
    }
}

fn day(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap()
}

async fn monthly(app: &TestApp, table: &str) -> Vec<String> {
    let response = app
        .admin_as(&app.token)
        .await
        .list_partitions(pb::ListPartitionsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut months: Vec<String> = response
        .partitions
        .into_iter()
        .filter(|p| p.table == table && !p.is_default)
        .map(|p| p.month)
        .collect();
    months.sort();
    months
}

#[api_test]
async fn partitions_are_created_ahead_at_start_up_and_ensuring_again_changes_nothing() {
    let app = TestApp::spawn().await;
    let expected: Vec<String> = (0..=3).map(months_from_now).collect();
    for table in ["product_searches", "audit_log"] {
        let mut months = Vec::new();
        for _ in 0..100 {
            months = monthly(&app, table).await;
            if months == expected {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(
            months, expected,
            "{table}: this month and 3 ahead, from start-up"
        );
    }
    let again = app
        .admin_as(&app.token)
        .await
        .ensure_partitions(pb::EnsurePartitionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(again.created.is_empty(), "idempotent: {:?}", again.created);
}

#[api_test]
async fn admin_rpcs_need_the_admin_role() {
    let app = TestApp::spawn().await;
    let mut admin = app.admin_as(&app.reader_token).await;
    let status = admin
        .list_partitions(pb::ListPartitionsRequest {})
        .await
        .unwrap_err();
    assert_error(&status, Code::PermissionDenied, "ADMIN_ROLE_REQUIRED");
    let status = admin
        .retire_partitions(pb::RetirePartitionsRequest {})
        .await
        .unwrap_err();
    assert_error(&status, Code::PermissionDenied, "ADMIN_ROLE_REQUIRED");
}

#[api_test]
async fn partitions_older_than_the_retention_are_dropped_with_their_rows() {
    let app = TestApp::spawn_with(|s| s.partitions.interval = std::time::Duration::ZERO).await;
    let partitions = Partitions::new(app.db.clone(), settings(4, 2));
    partitions.ensure(day(2025, 1, 15)).await.unwrap();
    sqlx::query(
        "INSERT INTO audit_log (table_name, record_id, action, actor, changed_at) \
         VALUES ('users', 1, 'insert', 'test', '2025-01-20T10:00:00Z')",
    )
    .execute(&app.db)
    .await
    .unwrap();

    let mut dropped = partitions.retire(day(2025, 6, 20)).await.unwrap();
    dropped.sort();
    assert_eq!(
        dropped,
        [
            "audit_log_p202501",
            "audit_log_p202502",
            "audit_log_p202503",
            "product_searches_p202501",
            "product_searches_p202502",
            "product_searches_p202503",
        ]
    );
    assert_eq!(monthly(&app, "audit_log").await, ["2025-04", "2025-05"]);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rows, 0, "the retired month's rows went with it");
    assert!(
        partitions
            .retire(day(2025, 6, 20))
            .await
            .unwrap()
            .is_empty(),
        "idempotent"
    );
}

#[api_test]
async fn rows_in_default_are_reported_and_moved_into_their_month_when_it_is_created() {
    let app = TestApp::spawn_with(|s| s.partitions.interval = std::time::Duration::ZERO).await;
    sqlx::query(
        "INSERT INTO product_searches (query, results_count, processing_time_ms, searched_at) \
         VALUES ('hammer', 3, 1.5, '2031-05-03T12:00:00Z')",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let home = || async {
        sqlx::query_scalar::<_, String>("SELECT tableoid::regclass::text FROM product_searches")
            .fetch_one(&app.db)
            .await
            .unwrap()
    };
    assert_eq!(home().await, "product_searches_default");
    let listed = app
        .admin_as(&app.token)
        .await
        .list_partitions(pb::ListPartitionsRequest {})
        .await
        .unwrap()
        .into_inner();
    let waiting = listed
        .default_rows
        .iter()
        .find(|d| d.table == "product_searches")
        .unwrap();
    assert_eq!(waiting.rows, 1, "reported");

    let partitions = Partitions::new(app.db.clone(), settings(0, 13));
    let created = partitions.ensure(day(2031, 5, 10)).await.unwrap();
    assert!(
        created.contains(&"product_searches_p203105".to_owned()),
        "{created:?}"
    );
    assert_eq!(
        home().await,
        "product_searches_p203105",
        "moved into its month"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM product_searches_default")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(left, 0);
    let query: String = sqlx::query_scalar("SELECT query FROM product_searches")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(query, "hammer", "nothing lost in the move");
}

#[api_test]
async fn two_replicas_ensuring_at_once_create_each_partition_once() {
    let first = TestApp::spawn_with(|s| s.partitions.interval = std::time::Duration::ZERO).await;
    let second = first.spawn_replica().await;
    let (mut a, mut b) = (
        first.admin_as(&first.token).await,
        second.admin_as(&second.token).await,
    );
    let (ra, rb) = tokio::join!(
        a.ensure_partitions(pb::EnsurePartitionsRequest {}),
        b.ensure_partitions(pb::EnsurePartitionsRequest {})
    );
    let mut created = ra.unwrap().into_inner().created;
    created.extend(rb.unwrap().into_inner().created);
    created.sort();
    let mut expected: Vec<String> = ["audit_log", "product_searches"]
        .iter()
        .flat_map(|t| (0..=3).map(move |n| format!("{t}_p{}", months_from_now(n).replace('-', ""))))
        .collect();
    expected.sort();
    assert_eq!(
        created, expected,
        "every partition created exactly once, by one of the two"
    );
}
