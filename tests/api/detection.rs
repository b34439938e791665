//! N+1 and slow-statement detection on real calls: the log line in the
//! call's own span and the counter on `/metrics`.

use std::time::Duration;

use datagate::proto::v1 as pb;

use crate::support::{
    RowLock, TestApp, api_test,
    observe::{Logs, with_request_id},
    rename, unique, wait_for_lock_waiter,
};

const RETIRE: &str = "datagate.v1.AdminService/RetirePartitions";
const LIST: &str = "datagate.v1.AdminService/ListPartitions";

#[api_test]
async fn a_call_repeating_a_statement_shape_past_the_threshold_logs_n_plus_one_and_counts_it() {
    // RetirePartitions lists the partitions once per partitioned table: one
    // shape, twice. ListPartitions runs each of its shapes once.
    let app = TestApp::spawn_with(|s| s.telemetry.n_plus_one_threshold = 1).await;
    let mut admin = app.admin_as(&app.token).await;
    let detected = async |operation: &str| {
        app.metric("n_plus_one_detected_total", &[("operation", operation)])
            .await
    };
    let (retire_before, list_before) = (detected(RETIRE).await, detected(LIST).await);
    let logs = Logs::capture();

    let (request, retire_id) = with_request_id(pb::RetirePartitionsRequest {});
    admin.retire_partitions(request).await.unwrap();
    let (request, list_id) = with_request_id(pb::ListPartitionsRequest {});
    admin.list_partitions(request).await.unwrap();

    let lines = logs.of_finished_request(&retire_id).await;
    let reports: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["event"] == "N_PLUS_ONE_DETECTED")
        .collect();
    assert_eq!(reports.len(), 1, "{lines:#?}");
    let report = reports[0];
    assert_eq!(report["level"], "WARN");
    assert_eq!(report["operation"], RETIRE);
    assert_eq!(report["count"], 2);
    assert_eq!(report["threshold"], 1);
    assert!(
        report["shape"]
            .as_str()
            .unwrap()
            .contains("FROM pg_inherits"),
        "{report}"
    );
    let finished = lines
        .iter()
        .find(|l| l["message"] == "rpc finished")
        .unwrap();
    assert_eq!(finished["span"]["db.max_repeats"], 2, "{finished}");
    assert_eq!(detected(RETIRE).await - retire_before, 1.0);

    let lines = logs.of_finished_request(&list_id).await;
    assert!(
        lines.iter().all(|l| l["event"] != "N_PLUS_ONE_DETECTED"),
        "no shape repeats: {lines:#?}"
    );
    assert_eq!(detected(LIST).await, list_before);
}

#[api_test]
async fn a_statement_slower_than_the_threshold_is_logged_as_slow_query_in_its_call_and_counted() {
    // The test subscriber's threshold is 200 ms (`support::telemetry::init`;
    // the subscriber is process-wide): a held row lock makes the UPDATE of an
    // UpdateUser slower than that.
    let app = TestApp::spawn().await;
    let (email, username) = unique("slow");
    let user = app.create_user(&email, &username).await;
    let slow_updates = async || {
        app.metric(
            "slow_query_count",
            &[("database_type", "postgres"), ("operation", "UPDATE")],
        )
        .await
    };
    let before = slow_updates().await;
    let logs = Logs::capture();

    let lock = RowLock::on_user(&app.db, user.id).await;
    let (request, request_id) = with_request_id(rename(&user, "renamed slowly"));
    let mut users = app.users().await;
    let call = tokio::spawn(async move { users.update_user(request).await });
    wait_for_lock_waiter(&app.db).await;
    // Not synchronisation: the statement must last past the threshold.
    tokio::time::sleep(Duration::from_millis(400)).await;
    lock.release().await;
    call.await.unwrap().unwrap();

    let lines = logs.of_finished_request(&request_id).await;
    let slow: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["event"] == "SLOW_QUERY")
        .collect();
    assert!(
        slow.iter().any(|l| l["operation"] == "UPDATE"
            && l["database_type"] == "postgres"
            && l["query_time_ms"].as_f64().unwrap() >= 400.0
            && l["shape"].as_str().unwrap().starts_with("UPDATE users")),
        "{lines:#?}"
    );
    // Other tests may add slow updates of their own, never take any away.
    assert!(slow_updates().await - before >= 1.0);
}
