//! AdminService's diagnostics against the development PostgreSQL (which
//! preloads pg_stat_statements and has hypopg): slow and blocked
//! statements, the cancel of the service's own backends only, index health,
//! index advice on a planted missing index, building it, table sizes with
//! growth, database health, and EXTENSION_MISSING where an extension is not
//! created.

use std::time::Duration;

use datagate::proto::v1 as pb;
use sqlx::{ConnectOptions as _, Connection as _, Executor as _, PgConnection};
use tonic::Code;

use crate::support::{TestApp, TestDatabase, api_test, assert_error, violated_fields};

/// A connection to the app's database named `application` in
/// `pg_stat_activity`.
async fn connect_as(app: &TestApp, application: &str) -> PgConnection {
    let url = secrecy::ExposeSecret::expose_secret(&app.settings.database.url).to_owned();
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    options
        .application_name(application)
        .connect()
        .await
        .expect("connect to the app's database")
}

async fn backend_pid(conn: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// A table of `rows` rows and no index but its primary key, analyzed.
async fn plant_orders(app: &TestApp, rows: i64) {
    for sql in [
        "CREATE TABLE planted_orders (id bigint PRIMARY KEY, customer_code text NOT NULL, amount int NOT NULL)",
        "INSERT INTO planted_orders SELECT g, 'c-' || (g % 5000), g % 100 FROM generate_series(1, $1) g",
        "ANALYZE planted_orders",
    ] {
        let query = sqlx::query(sql);
        let query = if sql.contains("$1") {
            query.bind(rows)
        } else {
            query
        };
        query.execute(&app.db).await.unwrap();
    }
}

async fn slow_statements(app: &TestApp) -> pb::ListSlowStatementsResponse {
    app.admin_as(&app.token)
        .await
        .list_slow_statements(pb::ListSlowStatementsRequest { limit: 100 })
        .await
        .expect("ListSlowStatements")
        .into_inner()
}

#[api_test]
async fn slow_statements_list_a_deliberately_slow_one_by_total_and_mean_time_without_its_values() {
    let app = TestApp::spawn().await;
    sqlx::query("SELECT pg_sleep(0.3), 'secret-literal' AS v")
        .execute(&app.db)
        .await
        .unwrap();

    let response = slow_statements(&app).await;

    for list in [&response.by_total_time, &response.by_mean_time] {
        let slow = list
            .iter()
            .find(|s| s.query.contains("pg_sleep"))
            .unwrap_or_else(|| panic!("the slow statement is listed: {list:#?}"));
        assert!(!slow.query.contains("secret-literal"), "{}", slow.query);
        assert_eq!(slow.calls, 1);
        assert_eq!(slow.rows, 1);
        assert!(slow.mean_time_ms >= 300.0, "{slow:?}");
        assert!(slow.total_time_ms >= slow.mean_time_ms, "{slow:?}");
        assert_ne!(slow.query_id, 0);
    }
    let means: Vec<f64> = response
        .by_mean_time
        .iter()
        .map(|s| s.mean_time_ms)
        .collect();
    assert!(means.windows(2).all(|w| w[0] >= w[1]), "{means:?}");
    let totals: Vec<f64> = response
        .by_total_time
        .iter()
        .map(|s| s.total_time_ms)
        .collect();
    assert!(totals.windows(2).all(|w| w[0] >= w[1]), "{totals:?}");

    let status = app
        .admin_as(&app.token)
        .await
        .list_slow_statements(pb::ListSlowStatementsRequest { limit: -1 })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["limit"]);
}

#[api_test]
async fn diagnostics_answer_extension_missing_where_an_extension_is_not_created() {
    let app = TestApp::spawn().await;
    sqlx::query("DROP EXTENSION pg_stat_statements")
        .execute(&app.db)
        .await
        .unwrap();
    sqlx::query("DROP EXTENSION hypopg")
        .execute(&app.db)
        .await
        .unwrap();
    let mut admin = app.admin_as(&app.token).await;

    let status = admin
        .list_slow_statements(pb::ListSlowStatementsRequest::default())
        .await
        .unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "EXTENSION_MISSING");
    let status = admin
        .advise_indexes(pb::AdviseIndexesRequest {
            statement: "SELECT * FROM users WHERE display_name = $1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "EXTENSION_MISSING");

    // The rest needs no extension.
    admin
        .get_index_health(pb::GetIndexHealthRequest {})
        .await
        .expect("GetIndexHealth without extensions");
}

#[api_test]
async fn active_statements_show_who_blocks_whom_and_only_the_services_own_backend_is_cancelled() {
    let app = TestApp::spawn().await;
    sqlx::query("CREATE TABLE planted_locks (id int PRIMARY KEY)")
        .execute(&app.db)
        .await
        .unwrap();
    sqlx::query("INSERT INTO planted_locks VALUES (1)")
        .execute(&app.db)
        .await
        .unwrap();
    // Another application holds a row lock ...
    let mut holder = connect_as(&app, "someone-else").await;
    let holder_pid = backend_pid(&mut holder).await;
    holder
        .execute("BEGIN; UPDATE planted_locks SET id = 1 WHERE id = 1")
        .await
        .unwrap();
    // ... and a backend named as the service's own waits for it.
    let mut waiter = connect_as(&app, "datagate").await;
    let waiter_pid = backend_pid(&mut waiter).await;
    let waiting = tokio::spawn(async move {
        let outcome = sqlx::query("UPDATE planted_locks SET id = 1 WHERE id = 1")
            .execute(&mut waiter)
            .await;
        outcome.map(|_| ())
    });
    let mut admin = app.admin_as(&app.token).await;
    let mut statements = Vec::new();
    for _ in 0..200 {
        statements = admin
            .list_active_statements(pb::ListActiveStatementsRequest { min_duration_ms: 1 })
            .await
            .unwrap()
            .into_inner()
            .statements;
        if statements
            .iter()
            .any(|s| s.pid == waiter_pid && s.blocked_by.contains(&holder_pid))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let blocked = statements
        .iter()
        .find(|s| s.pid == waiter_pid)
        .unwrap_or_else(|| panic!("the waiter is listed: {statements:#?}"));
    assert_eq!(blocked.blocked_by, [holder_pid]);
    assert_eq!(blocked.wait_event_type, "Lock");
    assert!(blocked.own, "{blocked:?}");
    assert!(
        blocked.query.contains("UPDATE planted_locks SET id = ?"),
        "{blocked:?}"
    );
    let holding = statements
        .iter()
        .find(|s| s.pid == holder_pid)
        .unwrap_or_else(|| panic!("the holder is listed: {statements:#?}"));
    assert_eq!(holding.state, "idle in transaction");
    assert_eq!(holding.application_name, "someone-else");
    assert!(!holding.own);

    // Another application's backend is refused ...
    let status = admin
        .cancel_statement(pb::CancelStatementRequest { pid: holder_pid })
        .await
        .unwrap_err();
    assert_error(&status, Code::PermissionDenied, "BACKEND_NOT_OWNED");
    // ... the service's own is cancelled.
    let cancelled = admin
        .cancel_statement(pb::CancelStatementRequest { pid: waiter_pid })
        .await
        .unwrap()
        .into_inner();
    assert!(cancelled.cancelled);
    let error = waiting
        .await
        .unwrap()
        .expect_err("the waiting UPDATE is cancelled");
    assert_eq!(
        error.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("57014"),
        "{error}"
    );
    // The holder still holds its transaction: it was not touched.
    holder.execute("COMMIT").await.unwrap();

    let status = admin
        .cancel_statement(pb::CancelStatementRequest { pid: i32::MAX })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "BACKEND_NOT_FOUND");
    let status = admin
        .cancel_statement(pb::CancelStatementRequest { pid: 0 })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["pid"]);
}

#[api_test]
async fn index_health_reports_unused_redundant_and_invalid_indexes_and_sequential_scans() {
    let app = TestApp::spawn().await;
    plant_orders(&app, 2_000).await;
    for sql in [
        "CREATE INDEX planted_orders_amount_idx ON planted_orders (amount)",
        "CREATE INDEX planted_orders_amount_id_idx ON planted_orders (amount, id)",
        "CREATE INDEX planted_orders_code_idx ON planted_orders (customer_code)",
        "CREATE INDEX planted_orders_code_again_idx ON planted_orders (customer_code)",
    ] {
        sqlx::query(sql).execute(&app.db).await.unwrap();
    }
    // A unique index built concurrently over duplicates fails, and stays
    // behind invalid.
    sqlx::query(
        "CREATE UNIQUE INDEX CONCURRENTLY planted_orders_amount_unique ON planted_orders (amount)",
    )
    .execute(&app.db)
    .await
    .expect_err("duplicates make it fail");
    // Sequential scans of a table no index scan reads.
    let mut conn = connect_as(&app, "someone-else").await;
    for _ in 0..3 {
        sqlx::query("SELECT count(*) FROM planted_orders WHERE amount + 1 = 5")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    let mut admin = app.admin_as(&app.token).await;
    let mut health = pb::GetIndexHealthResponse::default();
    for _ in 0..100 {
        health = admin
            .get_index_health(pb::GetIndexHealthRequest {})
            .await
            .unwrap()
            .into_inner();
        if health
            .sequential_scan_tables
            .iter()
            .any(|t| t.table == "planted_orders" && t.seq_scan >= 3)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let scanned = health
        .sequential_scan_tables
        .iter()
        .find(|t| t.table == "planted_orders")
        .unwrap_or_else(|| panic!("planted_orders is seq-scanned: {health:#?}"));
    assert!(scanned.seq_tup_read >= 3 * 2_000, "{scanned:?}");
    assert_eq!(scanned.idx_scan, 0);
    let unused: Vec<&str> = health
        .unused_indexes
        .iter()
        .filter(|i| i.table == "planted_orders")
        .map(|i| i.index.as_str())
        .collect();
    for index in [
        "planted_orders_amount_idx",
        "planted_orders_amount_id_idx",
        "planted_orders_code_idx",
    ] {
        assert!(unused.contains(&index), "{index} in {unused:?}");
    }
    assert!(
        !unused.contains(&"planted_orders_pkey"),
        "a primary key is never unused: {unused:?}"
    );
    let redundant: Vec<(&str, &str, bool)> = health
        .redundant_indexes
        .iter()
        .filter(|i| i.table == "planted_orders")
        .map(|i| (i.index.as_str(), i.covered_by.as_str(), i.duplicate))
        .collect();
    assert!(
        redundant.contains(&(
            "planted_orders_amount_idx",
            "planted_orders_amount_id_idx",
            false
        )),
        "{redundant:?}"
    );
    assert!(
        redundant.contains(&(
            "planted_orders_code_again_idx",
            "planted_orders_code_idx",
            true
        )),
        "{redundant:?}"
    );
    assert!(
        !redundant
            .iter()
            .any(|(index, _, _)| *index == "planted_orders_code_idx"),
        "of two equal indexes only the newer is redundant: {redundant:?}"
    );
    assert!(
        health
            .invalid_indexes
            .iter()
            .any(|i| i.table == "planted_orders" && i.index == "planted_orders_amount_unique"),
        "{:?}",
        health.invalid_indexes
    );
}

#[api_test]
async fn index_advice_finds_the_planted_missing_index_with_its_cost_and_create_index_builds_it() {
    let app = TestApp::spawn().await;
    plant_orders(&app, 50_000).await;
    for _ in 0..3 {
        sqlx::query("SELECT id, amount FROM planted_orders WHERE customer_code = $1")
            .bind("c-4242")
            .fetch_all(&app.db)
            .await
            .unwrap();
    }
    let slow = slow_statements(&app).await;
    let statement = slow
        .by_total_time
        .iter()
        .find(|s| s.query.contains("FROM planted_orders WHERE customer_code"))
        .unwrap_or_else(|| panic!("the statement is listed: {slow:#?}"));
    assert_eq!(statement.calls, 3);
    let mut admin = app.admin_as(&app.token).await;

    let advice = admin
        .advise_indexes(pb::AdviseIndexesRequest {
            query_id: statement.query_id,
            ..Default::default()
        })
        .await
        .expect("AdviseIndexes")
        .into_inner();

    assert!(
        advice.statement.contains("customer_code = $1"),
        "{advice:?}"
    );
    let best = advice.candidates.first().expect("a candidate");
    assert_eq!(best.table, "planted_orders");
    assert_eq!(best.columns, ["customer_code"]);
    assert!(best.used, "{advice:?}");
    assert!(
        best.cost_after < advice.cost_before / 2.0,
        "an index on the filtered column at least halves the cost: {advice:?}"
    );
    assert!(best.improvement > 0.5 && best.improvement < 1.0, "{best:?}");
    assert!(best.definition.contains("(customer_code)"), "{best:?}");
    let built: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_indexes WHERE tablename = 'planted_orders' AND indexdef LIKE '%customer_code%'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(built, 0, "advice builds nothing");

    // Given as text, with two filtered columns: each alone and both together.
    let by_text = admin
        .advise_indexes(pb::AdviseIndexesRequest {
            statement: "SELECT * FROM planted_orders WHERE amount = 7 AND customer_code = 'c-1'"
                .into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<Vec<String>> = by_text
        .candidates
        .iter()
        .map(|c| c.columns.clone())
        .collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys.contains(&vec!["customer_code".to_owned()]), "{keys:?}");
    assert!(keys.contains(&vec!["amount".to_owned()]), "{keys:?}");
    assert!(by_text.candidates[0].cost_after < by_text.cost_before);
    assert!(!by_text.statement.contains("c-1"), "{}", by_text.statement);

    // Building it.
    let request = pb::CreateIndexRequest {
        table: best.table.clone(),
        columns: best.columns.clone(),
    };
    let created = admin
        .create_index(request.clone())
        .await
        .expect("CreateIndex")
        .into_inner();
    assert_eq!(created.index, "planted_orders_customer_code_idx");
    assert!(
        created.definition.contains("USING btree (customer_code)"),
        "{created:?}"
    );
    let valid: bool = sqlx::query_scalar(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'planted_orders_customer_code_idx'::regclass",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(valid);
    let status = admin.create_index(request).await.unwrap_err();
    assert_error(&status, Code::AlreadyExists, "INDEX_ALREADY_EXISTS");

    // With it built, the statement costs what the advice said.
    let after = admin
        .advise_indexes(pb::AdviseIndexesRequest {
            query_id: statement.query_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        after.cost_before < advice.cost_before / 2.0,
        "before {}, now {}",
        advice.cost_before,
        after.cost_before
    );
}

#[api_test]
async fn advice_and_index_creation_refuse_bad_input_without_running_it() {
    let app = TestApp::spawn().await;
    plant_orders(&app, 10).await;
    let mut admin = app.admin_as(&app.token).await;
    let advise = |statement: &str, query_id: i64| pb::AdviseIndexesRequest {
        query_id,
        statement: statement.into(),
    };

    for (request, field) in [
        (advise("", 0), "query_id"),
        (advise("SELECT 1", 5), "statement"),
        (
            advise("SELECT 1; DROP TABLE planted_orders", 0),
            "statement",
        ),
        (advise("SELECT * FROM no_such_table", 0), "statement"),
    ] {
        let status = admin.advise_indexes(request).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
    }
    // A statement run through SQL's PREPARE is listed as its PREPARE, and
    // advised as the statement it prepares.
    sqlx::raw_sql("PREPARE by_amount(int) AS SELECT id FROM planted_orders WHERE amount = $1; EXECUTE by_amount(3)")
        .execute(&app.db)
        .await
        .unwrap();
    let prepared = slow_statements(&app)
        .await
        .by_total_time
        .into_iter()
        .find(|s| s.query.starts_with("PREPARE by_amount"))
        .expect("the PREPARE is listed");
    let planned = admin
        .advise_indexes(advise("", prepared.query_id))
        .await
        .expect("the prepared statement is planned")
        .into_inner();
    assert_eq!(
        planned.statement,
        "SELECT id FROM planted_orders WHERE amount = $1"
    );
    let status = admin.advise_indexes(advise("", 12345)).await.unwrap_err();
    assert_error(&status, Code::NotFound, "STATEMENT_NOT_FOUND");
    // A write is planned, never run.
    let planned = admin
        .advise_indexes(advise("DELETE FROM planted_orders WHERE amount = $1", 0))
        .await
        .expect("a DELETE is planned")
        .into_inner();
    let keys: Vec<Vec<String>> = planned.candidates.into_iter().map(|c| c.columns).collect();
    assert_eq!(keys, [["amount"]]);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM planted_orders")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rows, 10, "the table and its rows are still there");
    let status = admin
        .list_active_statements(pb::ListActiveStatementsRequest {
            min_duration_ms: -1,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["min_duration_ms"]);

    let create = |table: &str, columns: &[&str]| pb::CreateIndexRequest {
        table: table.into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
    };
    for (request, fields) in [
        (create("planted_orders; drop", &["amount"]), vec!["table"]),
        (create("planted_orders", &[]), vec!["columns"]),
        (create("planted_orders", &["Amount"]), vec!["columns[0]"]),
        (
            create("planted_orders", &["amount", "nope"]),
            vec!["columns[1]"],
        ),
        (
            create("planted_orders", &["amount", "amount"]),
            vec!["columns[1]"],
        ),
        (create("audit_log", &["actor"]), vec!["table"]),
    ] {
        let status = admin.create_index(request).await.unwrap_err();
        assert_eq!(violated_fields(&status), fields);
    }
    let status = admin
        .create_index(create("no_such_table", &["id"]))
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "TABLE_NOT_FOUND");
    // An index on the same columns under another name exists already.
    sqlx::query("CREATE INDEX planted_by_amount ON planted_orders (amount)")
        .execute(&app.db)
        .await
        .unwrap();
    let status = admin
        .create_index(create("planted_orders", &["amount"]))
        .await
        .unwrap_err();
    assert_error(&status, Code::AlreadyExists, "INDEX_ALREADY_EXISTS");
}

#[api_test]
async fn table_sizes_are_sampled_from_start_up_and_report_growth_since_the_oldest_sample_in_the_window()
 {
    let app = TestApp::spawn().await;
    let mut sampled = 0_i64;
    for _ in 0..200 {
        sampled = sqlx::query_scalar("SELECT count(*) FROM table_size_samples")
            .fetch_one(&app.db)
            .await
            .unwrap();
        if sampled > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sampled > 0, "the sampler ran at start-up");
    // And the start-up partition maintenance (DEFAULT, this month and 3
    // ahead), so that the partitions do not change under the sizes.
    for _ in 0..200 {
        let partitions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'audit_log'::regclass",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        if partitions >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Older samples of `users`: 2 h ago (in a 24 h window) and 30 h ago
    // (outside it).
    let two_hours_ago: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT date_trunc('second', now() - interval '2 hours')")
            .fetch_one(&app.db)
            .await
            .unwrap();
    sqlx::query(
        "INSERT INTO table_size_samples (table_name, sampled_at, total_bytes) \
         VALUES ('users', $1, 1000), ('users', now() - interval '30 hours', 1)",
    )
    .bind(two_hours_ago)
    .execute(&app.db)
    .await
    .unwrap();
    let mut admin = app.admin_as(&app.token).await;

    let tables = admin
        .get_table_sizes(pb::GetTableSizesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tables;

    let users = tables.iter().find(|t| t.table == "users").expect("users");
    assert!(users.total_bytes > 0);
    assert_eq!(users.growth_bytes, Some(users.total_bytes - 1000));
    assert_eq!(
        users.sampled_since.as_ref().map(|t| t.seconds),
        Some(two_hours_ago.timestamp())
    );
    assert!(users.parent.is_empty());
    let audit_log = tables
        .iter()
        .find(|t| t.table == "audit_log")
        .expect("audit_log");
    let partitions: Vec<&pb::TableSize> =
        tables.iter().filter(|t| t.parent == "audit_log").collect();
    assert_eq!(partitions.len(), 5, "DEFAULT and monthly: {partitions:?}");
    assert_eq!(
        audit_log.total_bytes,
        partitions.iter().map(|p| p.total_bytes).sum::<i64>(),
        "a partitioned table is the sum of its partitions"
    );
    let sizes: Vec<i64> = tables.iter().map(|t| t.total_bytes).collect();
    assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "largest first");

    // A one-hour window has only the start-up sample.
    let hour = admin
        .get_table_sizes(pb::GetTableSizesRequest {
            growth_window_hours: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .tables;
    let users = hour.iter().find(|t| t.table == "users").unwrap();
    assert_ne!(users.growth_bytes, Some(users.total_bytes - 1000));
    let status = admin
        .get_table_sizes(pb::GetTableSizesRequest {
            growth_window_hours: 2161,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["growth_window_hours"]);
}

#[api_test]
async fn database_health_reports_buffer_cache_connections_redis_and_pools() {
    // A second database stands in for the replica: not in recovery, so
    // nothing waits to be replayed and the lag is 0 (a real standby falling
    // behind is the fault suite's `replica_lag` scenario).
    let replica = TestDatabase::create().await;
    let app = TestApp::spawn_with(|s| s.database.read_url = replica.url.clone().into()).await;
    let mut admin = app.admin_as(&app.token).await;

    let health = admin
        .get_database_health(pb::GetDatabaseHealthRequest {})
        .await
        .unwrap()
        .into_inner();

    let ratio = health.buffer_cache_hit_ratio.expect("blocks were read");
    assert!(ratio > 0.0 && ratio <= 1.0, "{ratio}");
    assert!(
        health
            .connections
            .iter()
            .any(|c| c.state == "active" && c.count >= 1),
        "this call's own statement is active: {:?}",
        health.connections
    );
    assert_eq!(health.replication_lag_seconds, Some(0.0));
    let pools: Vec<&str> = health.pools.iter().map(|p| p.pool.as_str()).collect();
    assert!(
        pools.starts_with(&["postgres", "postgres-reads"]),
        "{pools:?}"
    );
    let primary = &health.pools[0];
    assert_eq!(primary.max, 8);
    assert!(
        primary.size >= 1 && primary.idle <= primary.size,
        "{primary:?}"
    );
    let redis = health.redis.expect("the Redis entry");
    if std::env::var_os("REDIS_URL").is_some() {
        assert!(redis.available, "{redis:?}");
        assert!(redis.nodes >= 1);
        assert!(redis.used_memory_bytes > 0);
        assert!(redis.connected_clients >= 1);
        assert!(pools.contains(&"redis"), "{pools:?}");
    }
}
