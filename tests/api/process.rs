//! The real `datagate` binary: configuration errors, SIGTERM while a call is
//! in flight, and what it logs.

use std::{process::Stdio, time::Duration};

use datagate::{auth, proto::v1 as pb, proto::v1::user_service_client::UserServiceClient};
use sqlx::PgPool;
use tokio::{io::AsyncReadExt as _, process::Command};
use tonic::transport::Endpoint;

use crate::support::{
    Bearer, RowLock, TestApp, TestDatabase, api_test,
    observe::{sample, with_request_id},
    redis::redis_url,
    rename, wait_for_lock_waiter,
};

const BIN: &str = env!("CARGO_BIN_EXE_datagate");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn datagate() -> Command {
    let mut command = Command::new(BIN);
    // Only what each test sets; nothing from the developer's shell.
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    command
}

/// `datagate serve` on loopback `port` with a database, one token entry and
/// an ephemeral metrics port; tests add what they are about.
fn serve(database_url: &str, token_entry: &str, port: u16) -> Command {
    let mut command = datagate();
    command
        .arg("serve")
        .env("DATAGATE__DATABASE__URL", database_url)
        .env("DATAGATE__PAGINATION__TOKEN_SECRET", "x".repeat(40))
        .env("DATAGATE__AUTH__TOKENS", token_entry)
        .env("DATAGATE__SERVER__HOST", "127.0.0.1")
        .env("DATAGATE__SERVER__PORT", port.to_string())
        .env("DATAGATE__METRICS__HOST", "127.0.0.1")
        .env("DATAGATE__METRICS__PORT", free_port().to_string());
    command
}

/// A channel to the binary on `port`, once it accepts connections.
async fn connect(port: u16) -> tonic::transport::Channel {
    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    for _ in 0..200 {
        if let Ok(channel) = endpoint.connect().await {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the binary did not start serving on port {port}");
}

#[api_test]
async fn help_lists_the_subcommands() {
    let output = datagate().arg("--help").output().await.unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success());
    for command in ["serve", "migrate", "token", "seed", "healthcheck"] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
    let output = datagate()
        .args(["migrate", "--help"])
        .output()
        .await
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for action in ["up", "down", "status"] {
        assert!(help.contains(action), "{action} missing from:\n{help}");
    }
}

#[api_test]
async fn a_missing_database_url_is_a_one_line_error_naming_the_variable() {
    let output = datagate().arg("serve").output().await.unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("DATAGATE__DATABASE__URL"), "{stderr}");
}

#[api_test]
async fn an_invalid_value_is_a_one_line_error_naming_the_setting() {
    let output = datagate()
        .arg("serve")
        .env("DATAGATE__DATABASE__URL", "postgres://localhost/x")
        .env("DATAGATE__SERVER__PORT", "not-a-port")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("server.port"), "{stderr}");
}

#[api_test]
async fn migrate_status_down_and_up_round_trip() {
    let database = TestDatabase::create().await;
    let run = |args: &'static [&'static str]| {
        let url = database.url.clone();
        async move {
            let output = datagate()
                .args(args)
                .env("DATAGATE__DATABASE__URL", url)
                .output()
                .await
                .unwrap();
            assert!(
                output.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8(output.stdout).unwrap()
        }
    };
    assert!(run(&["migrate", "status"]).await.contains("applied"));
    let pool = PgPool::connect(&database.url).await.unwrap();
    let table = |name: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<String>>("SELECT to_regclass($1)::text")
                .bind(name)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    run(&["migrate", "down"]).await;
    assert_eq!(
        table("table_size_samples").await,
        None,
        "one step reverts the newest migration"
    );
    assert_eq!(
        table("category_daily_listings").await.as_deref(),
        Some("category_daily_listings"),
        "and only that one"
    );
    run(&["migrate", "down", "--steps", "8"]).await;
    assert_eq!(table("users").await, None, "down removed the tables");
    assert!(!run(&["migrate", "status"]).await.contains("applied"));

    run(&["migrate", "up"]).await;
    assert_eq!(table("users").await.as_deref(), Some("users"));
    assert_eq!(table("orders").await.as_deref(), Some("orders"));
    assert_eq!(table("audit_log").await.as_deref(), Some("audit_log"));
    pool.close().await;
}

#[api_test]
async fn healthcheck_exits_zero_only_for_a_serving_entry() {
    let app = TestApp::spawn().await;
    let addr = format!("http://{}", app.addr);
    let check = |service: &str, addr: &str| {
        datagate()
            .args(["healthcheck", "--addr", addr, "--service", service])
            .output()
    };
    for service in ["", "liveness", "datagate.v1.UserService"] {
        let output = check(service, &addr).await.unwrap();
        assert!(
            output.status.success(),
            "{service:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "SERVING");
    }

    let unknown = check("no.such.Service", &addr).await.unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("no.such.Service"), "{stderr}");

    let closed = format!("http://127.0.0.1:{}", free_port());
    let refused = check("", &closed).await.unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("connecting to"), "{stderr}");
}

/// GET /metrics of the child's metrics listener on `port`, as text.
async fn scrape(port: u16) -> String {
    crate::support::app::scrape(("127.0.0.1", port)).await
}

#[api_test]
async fn a_fresh_process_exports_its_counters_and_gauges_at_zero_before_any_call() {
    // A process of its own: in the test process other tests move the
    // counters.
    let database = TestDatabase::create().await;
    let (_token, entry) =
        auth::new_token("metrics-test", &[auth::Role::Reader.as_str().to_owned()]).unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let _child = serve(&database.url, &entry, port)
        .env("DATAGATE__METRICS__PORT", metrics_port.to_string())
        .env("DATAGATE__REDIS__URL", redis_url())
        .env(
            "DATAGATE__REDIS__KEY_PREFIX",
            format!("dgtest-{}", uuid::Uuid::new_v4().simple()),
        )
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    connect(port).await;
    // The first partition maintenance round measures the DEFAULT partitions.
    let mut metrics = String::new();
    crate::support::observe::wait_until(
        "the first partition maintenance round",
        Duration::from_secs(10),
        async || {
            metrics = scrape(metrics_port).await;
            sample(
                &metrics,
                "partition_default_rows",
                &[("table", "audit_log")],
            )
            .is_some()
        },
    )
    .await;

    let get_user = [
        ("service", "datagate.v1.UserService"),
        ("method", "GetUser"),
    ];
    let at_zero: &[(&str, Vec<(&str, &str)>)] = &[
        (
            "n_plus_one_detected_total",
            vec![("operation", "datagate.v1.OrderService/ListUsersWithOrders")],
        ),
        (
            "rpc_requests_total",
            [&get_user[..], &[("code", "OK")]].concat(),
        ),
        (
            "rpc_requests_total",
            [&get_user[..], &[("code", "INTERNAL")]].concat(),
        ),
        (
            "rpc_requests_total",
            [&get_user[..], &[("code", "UNAVAILABLE")]].concat(),
        ),
        (
            "rpc_requests_total",
            vec![
                ("service", "datagate.v1.CatalogService"),
                ("method", "SearchProducts"),
                ("code", "DEADLINE_EXCEEDED"),
            ],
        ),
        // A bucket at each latency objective: 100, 200 and 500 ms.
        (
            "rpc_latency_seconds_bucket",
            [&get_user[..], &[("code", "OK"), ("le", "0.1")]].concat(),
        ),
        (
            "rpc_latency_seconds_bucket",
            [&get_user[..], &[("code", "OK"), ("le", "0.2")]].concat(),
        ),
        (
            "rpc_latency_seconds_bucket",
            [&get_user[..], &[("code", "OK"), ("le", "0.5")]].concat(),
        ),
        (
            "rpc_latency_seconds_count",
            [&get_user[..], &[("code", "OK")]].concat(),
        ),
        ("cache_hits_total", vec![("entity", "user")]),
        ("cache_misses_total", vec![("entity", "product")]),
        ("cache_bypassed_total", vec![("entity", "user")]),
        ("cache_errors_total", vec![("op", "mget")]),
        ("cache_breaker_state", vec![]),
        (
            "background_task_failures_total",
            vec![("task", "partition maintenance")],
        ),
        ("call_retries_total", vec![("outcome", "retried")]),
        (
            "quota_requests_total",
            vec![("caller", "metrics-test"), ("outcome", "exceeded")],
        ),
        (
            "quota_requests_total",
            vec![("caller", "other"), ("outcome", "admitted")],
        ),
        ("admission_rejected_total", vec![("reason", "queue_full")]),
        ("grpc_connections_refused_total", vec![]),
        ("mongo_outbox_failures_total", vec![]),
        ("search_log_dropped_total", vec![("reason", "buffer_full")]),
        ("partition_default_rows", vec![("table", "audit_log")]),
        (
            "partition_default_rows",
            vec![("table", "product_searches")],
        ),
    ];
    let mut wrong = Vec::new();
    for (name, labels) in at_zero {
        let value = sample(&metrics, name, labels);
        if value != Some(0.0) {
            wrong.push(format!("{name}{labels:?} = {value:?}"));
        }
    }
    // Present; their values are the process's own.
    for (name, labels) in [
        (
            "slow_query_count",
            vec![("database_type", "postgres"), ("operation", "SELECT")],
        ),
        (
            "slow_query_count",
            vec![("database_type", "postgres"), ("operation", "MERGE")],
        ),
        // Latency for every statement kind, not only those run so far.
        (
            "query_latency_seconds_count",
            vec![("database_type", "postgres"), ("operation", "DELETE")],
        ),
        (
            "query_latency_seconds_count",
            vec![("database_type", "postgres"), ("operation", "OTHER")],
        ),
        ("connection_pool_usage", vec![("pool", "postgres")]),
        ("connection_pool_usage", vec![("pool", "redis")]),
        ("admission_limit", vec![]),
    ] {
        if sample(&metrics, name, &labels).is_none() {
            wrong.push(format!("{name}{labels:?} is absent"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}\nin:\n{metrics}");
}

#[api_test]
async fn ordinary_bad_requests_log_no_error_and_every_line_of_a_call_names_its_request_and_caller()
{
    let database = TestDatabase::create().await;
    let (token, entry) =
        auth::new_token("log-test", &[auth::Role::Writer.as_str().to_owned()]).unwrap();
    let port = free_port();
    let mut child = serve(&database.url, &entry, port)
        .env("DATAGATE__TELEMETRY__LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let channel = connect(port).await;
    // A writer: AdminService is PERMISSION_DENIED to it.
    let mut admin = datagate::proto::v1::admin_service_client::AdminServiceClient::with_interceptor(
        channel.clone(),
        Bearer(Some(token.clone().into())),
    );
    let mut users =
        UserServiceClient::with_interceptor(channel.clone(), Bearer(Some(token.into())));
    let mut strangers =
        UserServiceClient::with_interceptor(channel, Bearer(Some("no-such-token".into())));
    let user = users
        .create_user(pb::CreateUserRequest {
            email: "logs@example.com".into(),
            username: "logs".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let mut calls: Vec<(String, tonic::Code)> = Vec::new();
    let mut record = |id: String, result: Result<(), tonic::Status>| {
        calls.push((id, result.err().map_or(tonic::Code::Ok, |s| s.code())));
    };
    let (request, id) = with_request_id(pb::GetUserRequest {
        id: 0,
        ..Default::default()
    });
    record(id, users.get_user(request).await.map(drop));
    let (request, id) = with_request_id(pb::GetUserRequest {
        id: user.id + 1000,
        ..Default::default()
    });
    record(id, users.get_user(request).await.map(drop));
    let (request, id) = with_request_id(pb::CreateUserRequest {
        email: "LOGS@example.com".into(),
        username: "logs2".into(),
        ..Default::default()
    });
    record(id, users.create_user(request).await.map(drop));
    let (request, id) = with_request_id(pb::CreateUserRequest {
        email: "not an email".into(),
        username: "x".into(),
        ..Default::default()
    });
    record(id, users.create_user(request).await.map(drop));
    let mut stale = rename(&user, "stale");
    stale.version = user.version + 7;
    let (request, id) = with_request_id(stale);
    record(id, users.update_user(request).await.map(drop));
    let (request, id) = with_request_id(pb::ListUsersRequest {
        page_size: -1,
        ..Default::default()
    });
    record(id, users.list_users(request).await.map(drop));
    let (request, id) = with_request_id(pb::DeleteUserRequest {
        id: user.id + 1000,
        ..Default::default()
    });
    record(id, users.delete_user(request).await.map(drop));
    let (request, id) = with_request_id(pb::GetUserRequest {
        id: user.id,
        ..Default::default()
    });
    let unauthenticated_id = id.clone();
    record(id, strangers.get_user(request).await.map(drop));
    let (request, id) = with_request_id(pb::ListPartitionsRequest {});
    record(id, admin.list_partitions(request).await.map(drop));
    let codes: Vec<tonic::Code> = calls.iter().map(|(_, code)| *code).collect();
    use tonic::Code::*;
    assert_eq!(
        codes,
        [
            InvalidArgument,
            NotFound,
            AlreadyExists,
            InvalidArgument,
            Aborted,
            InvalidArgument,
            NotFound,
            Unauthenticated,
            PermissionDenied
        ]
    );

    child.start_kill().unwrap();
    let mut logs = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let errors: Vec<&serde_json::Value> = lines.iter().filter(|l| l["level"] == "ERROR").collect();
    assert!(
        errors.is_empty(),
        "ERROR lines for callers' mistakes: {errors:#?}"
    );

    for (id, code) in &calls {
        let of_call: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| {
                l["spans"]
                    .as_array()
                    .is_some_and(|spans| spans.iter().any(|s| s["request_id"] == id.as_str()))
            })
            .collect();
        assert!(
            of_call.iter().any(|l| l["message"] == "rpc finished"),
            "{code:?}: no rpc finished line with request id {id} in:\n{logs}"
        );
        if id == &unauthenticated_id {
            continue;
        }
        for line in &of_call {
            assert_eq!(line["spans"][0]["caller"], "log-test", "{line}");
        }
    }
    // A line logged in a span below the call's (the domain operation's
    // error) carries the call's request id and caller too.
    let (not_found, _) = &calls[1];
    let nested = lines
        .iter()
        .find(|l| {
            l["span"]["name"] != "rpc"
                && l["spans"].as_array().is_some_and(|spans| {
                    spans.iter().any(|s| s["request_id"] == not_found.as_str())
                })
        })
        .unwrap_or_else(|| panic!("no nested line for {not_found} in:\n{logs}"));
    assert_eq!(nested["level"], "INFO", "{nested}");
    assert_eq!(nested["spans"][0]["name"], "rpc", "{nested}");
    assert_eq!(nested["spans"][0]["caller"], "log-test", "{nested}");
}

#[api_test]
async fn sigterm_lets_the_in_flight_call_finish_and_exits_zero() {
    let database = TestDatabase::create().await;
    let (token, entry) =
        auth::new_token("sigterm-test", &[auth::Role::Writer.as_str().to_owned()]).unwrap();
    let port = free_port();
    let mut child = serve(&database.url, &entry, port)
        .env("DATAGATE__TELEMETRY__LOG_FORMAT", "json")
        .env("DATAGATE__REDIS__URL", redis_url())
        .env(
            "DATAGATE__REDIS__KEY_PREFIX",
            format!("dgtest-{}", uuid::Uuid::new_v4().simple()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let mut users =
        UserServiceClient::with_interceptor(connect(port).await, Bearer(Some(token.into())));
    let user = users
        .create_user(pb::CreateUserRequest {
            email: "term@example.com".into(),
            username: "term".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    for _ in 0..2 {
        users
            .get_user(pb::GetUserRequest {
                id: user.id,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    let db = PgPool::connect(&database.url).await.unwrap();
    let lock = RowLock::on_user(&db, user.id).await;
    let request = rename(&user, "finished after SIGTERM");
    let in_flight = tokio::spawn(async move { users.update_user(request).await });
    wait_for_lock_waiter(&db).await;

    let pid = child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    // Draining: the listener is closed (no readiness delay by default).
    crate::support::observe::wait_until(
        "the binary stops accepting connections",
        Duration::from_secs(10),
        async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
        },
    )
    .await;
    lock.release().await;

    let finished = in_flight
        .await
        .unwrap()
        .expect("the in-flight call succeeds");
    assert_eq!(finished.into_inner().display_name, "finished after SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the process exits once drained")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");

    let mut logs = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    let finished_line = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "rpc finished" && l["span"]["rpc.method"] == "UpdateUser")
        .unwrap_or_else(|| panic!("no JSON line for UpdateUser in:\n{logs}"));
    assert_eq!(finished_line["span"]["caller"], "sigterm-test");
    // The audit actor, the UPDATE and the COMMIT (sqlx pipelines BEGIN with
    // the first statement): the call's statements are on its span.
    assert_eq!(finished_line["span"]["db.statements"], 3, "{finished_line}");
    assert_eq!(
        finished_line["span"]["db.max_repeats"], 1,
        "{finished_line}"
    );
    assert_eq!(finished_line["code"], "OK");
    assert!(finished_line["span"]["request_id"].is_string());
    let reads: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "rpc finished" && l["span"]["rpc.method"] == "GetUser")
        .collect();
    assert_eq!(reads.len(), 2, "{logs}");
    assert_eq!(
        reads[0]["span"]["cache_hit"], false,
        "the first read misses"
    );
    assert_eq!(reads[1]["span"]["cache_hit"], true, "the second read hits");
    assert!(logs.contains("SIGTERM received"));
    assert!(
        !logs.contains("finished after SIGTERM\""),
        "payloads are not logged"
    );
    db.close().await;
}

/// An OTLP/gRPC trace receiver that hands every exported span to the test.
mod collector {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    };
    use opentelemetry_proto::tonic::trace::v1::Span;
    use tokio::sync::mpsc;
    use tonic::{Request, Response, Status};

    struct Receiver(mpsc::UnboundedSender<Span>);

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            request: Request<ExportTraceServiceRequest>,
        ) -> Result<Response<ExportTraceServiceResponse>, Status> {
            for resource in request.into_inner().resource_spans {
                for scope in resource.scope_spans {
                    for span in scope.spans {
                        let _ = self.0.send(span);
                    }
                }
            }
            Ok(Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    pub async fn start() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Span>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Receiver(tx)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (addr, rx)
    }
}

/// SIGTERMs the binary, checks it exits 0, and returns the spans it
/// exported (spans are batched; SIGTERM flushes them before the process
/// exits).
async fn stop_and_collect_spans(
    child: &mut tokio::process::Child,
    spans: &mut tokio::sync::mpsc::UnboundedReceiver<opentelemetry_proto::tonic::trace::v1::Span>,
) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
    let pid = child.id().unwrap().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success());
    let mut exported = Vec::new();
    while let Ok(Some(span)) = tokio::time::timeout(Duration::from_secs(2), spans.recv()).await {
        exported.push(span);
    }
    exported
}

#[api_test]
async fn with_an_otlp_endpoint_every_call_is_exported_as_a_server_span() {
    let database = TestDatabase::create().await;
    let (collector, mut spans) = collector::start().await;
    let (token, entry) =
        auth::new_token("traced-caller", &[auth::Role::Writer.as_str().to_owned()]).unwrap();
    let port = free_port();
    let mut child = serve(&database.url, &entry, port)
        .env(
            "DATAGATE__TELEMETRY__OTLP_ENDPOINT",
            format!("http://{collector}"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let mut users =
        UserServiceClient::with_interceptor(connect(port).await, Bearer(Some(token.into())));
    let mut request = tonic::Request::new(pb::GetUserRequest {
        id: 77,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "trace-me-1".parse().unwrap());
    let _ = users.get_user(request).await;

    let exported = stop_and_collect_spans(&mut child, &mut spans).await;
    let rpc = exported
        .iter()
        .find(|s| s.name == "datagate.v1.UserService/GetUser")
        .unwrap_or_else(|| {
            let names: Vec<&str> = exported.iter().map(|s| s.name.as_str()).collect();
            panic!("no GetUser server span among {names:?}")
        });
    let attribute = |key: &str| {
        rpc.attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref())
            .map(|v| format!("{:?}", v.value))
            .unwrap_or_default()
    };
    assert!(attribute("request_id").contains("trace-me-1"), "{rpc:?}");
    assert!(attribute("caller").contains("traced-caller"), "{rpc:?}");
    assert!(
        attribute("rpc.grpc.status_code").contains('5'),
        "NOT_FOUND is code 5: {rpc:?}"
    );
    let children = exported
        .iter()
        .filter(|s| s.trace_id == rpc.trace_id && s.parent_span_id == rpc.span_id)
        .count();
    assert!(
        children >= 1,
        "domain spans are children of the call's span"
    );
}

#[api_test]
async fn the_rpc_span_is_a_child_of_the_callers_traceparent() {
    let database = TestDatabase::create().await;
    let (collector, mut spans) = collector::start().await;
    let (token, entry) =
        auth::new_token("traced-caller", &[auth::Role::Writer.as_str().to_owned()]).unwrap();
    let port = free_port();
    let mut child = serve(&database.url, &entry, port)
        .env(
            "DATAGATE__TELEMETRY__OTLP_ENDPOINT",
            format!("http://{collector}"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span_id = "00f067aa0ba902b7";
    let mut users =
        UserServiceClient::with_interceptor(connect(port).await, Bearer(Some(token.into())));
    let mut request = tonic::Request::new(pb::GetUserRequest {
        id: 77,
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span_id}-01")
            .parse()
            .unwrap(),
    );
    let _ = users.get_user(request).await;

    let exported = stop_and_collect_spans(&mut child, &mut spans).await;
    let rpc = exported
        .iter()
        .find(|s| s.name == "datagate.v1.UserService/GetUser")
        .unwrap_or_else(|| panic!("no GetUser server span among {exported:?}"));
    assert_eq!(hex::encode(&rpc.trace_id), trace_id, "the caller's trace");
    assert_eq!(
        hex::encode(&rpc.parent_span_id),
        caller_span_id,
        "a child of the caller's span"
    );
    assert_ne!(hex::encode(&rpc.span_id), caller_span_id);
}

/// The attribute `key` of `span` as text ("" when absent).
fn span_attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
        .unwrap_or_default()
}

#[api_test]
async fn a_list_users_with_orders_trace_has_its_loader_batches_and_their_statements_and_redis_commands()
 {
    let database = TestDatabase::create().await;
    let db = PgPool::connect(&database.url).await.unwrap();
    // 3 users with 2 orders of 2 items each, over 4 products.
    for sql in [
        "INSERT INTO users (email, username) \
         SELECT 'u' || g || '@example.com', 'user' || g FROM generate_series(1, 3) g",
        "INSERT INTO products (sku, title, category, price) \
         SELECT 'P' || g, 'Product ' || g, 'tools', 10 FROM generate_series(1, 4) g",
        "INSERT INTO inventory (product_id, quantity) SELECT id, 1000 FROM products",
        "INSERT INTO orders (user_id, total) SELECT u.id, 20 FROM users u, generate_series(1, 2)",
        "INSERT INTO order_items (order_id, product_id, quantity, unit_price) \
         SELECT o.id, 1 + (o.id + k) % 4, 1, 10 FROM orders o, generate_series(0, 1) k",
    ] {
        sqlx::query(sql).execute(&db).await.unwrap();
    }
    let (collector, mut spans) = collector::start().await;
    let (token, entry) =
        auth::new_token("traced-caller", &[auth::Role::Reader.as_str().to_owned()]).unwrap();
    let port = free_port();
    let mut child = serve(&database.url, &entry, port)
        .env(
            "DATAGATE__TELEMETRY__OTLP_ENDPOINT",
            format!("http://{collector}"),
        )
        .env("DATAGATE__REDIS__URL", redis_url())
        .env(
            "DATAGATE__REDIS__KEY_PREFIX",
            format!("dgtest-{}", uuid::Uuid::new_v4().simple()),
        )
        // Production's log level: the DEBUG spans are exported all the same.
        .env("DATAGATE__TELEMETRY__LOG_FILTER", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let mut orders =
        datagate::proto::v1::order_service_client::OrderServiceClient::with_interceptor(
            connect(port).await,
            Bearer(Some(token.into())),
        );
    let listed = orders
        .list_users_with_orders(pb::ListUsersWithOrdersRequest {
            page_size: 3,
            page_token: String::new(),
            orders_per_user: 5,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.users.len(), 3);

    let exported = stop_and_collect_spans(&mut child, &mut spans).await;
    let rpc = exported
        .iter()
        .find(|s| s.name == "datagate.v1.OrderService/ListUsersWithOrders")
        .unwrap_or_else(|| {
            let names: Vec<&str> = exported.iter().map(|s| s.name.as_str()).collect();
            panic!("no ListUsersWithOrders server span among {names:?}")
        });
    let trace: Vec<_> = exported
        .iter()
        .filter(|s| s.trace_id == rpc.trace_id)
        .collect();
    let parent_of = |span: &opentelemetry_proto::tonic::trace::v1::Span| {
        trace
            .iter()
            .find(|p| p.span_id == span.parent_span_id)
            .copied()
    };
    let descends_from_rpc = |span: &opentelemetry_proto::tonic::trace::v1::Span| {
        let mut at = parent_of(span);
        while let Some(p) = at {
            if p.span_id == rpc.span_id {
                return true;
            }
            at = parent_of(p);
        }
        false
    };
    let names: Vec<&str> = trace.iter().map(|s| s.name.as_str()).collect();
    let batch = |loader: &str| {
        *trace
            .iter()
            .find(|s| s.name == loader)
            .unwrap_or_else(|| panic!("no {loader} batch span in {names:?}"))
    };
    let children = |parent: &opentelemetry_proto::tonic::trace::v1::Span| -> Vec<_> {
        trace
            .iter()
            .filter(|s| s.parent_span_id == parent.span_id)
            .copied()
            .collect()
    };
    let client_kind = opentelemetry_proto::tonic::trace::v1::span::SpanKind::Client as i32;
    let db_host = database
        .url
        .split_once('@')
        .map_or(database.url.as_str(), |(_, h)| h)
        .split(['/', ':'])
        .next()
        .unwrap()
        .trim_start_matches("postgres://")
        .to_owned();

    // One batch per level, each below the call's span.
    for loader in ["RecentOrdersByUser", "ItemsByOrder", "ProductsById"] {
        let span = batch(loader);
        assert!(
            descends_from_rpc(span),
            "{loader} is not below the RPC span"
        );
        assert_eq!(span_attribute(span, "loader"), loader);
    }
    // Each batch's SELECT is its child, with the semantic conventions.
    for (loader, table) in [
        ("RecentOrdersByUser", "orders"),
        ("ItemsByOrder", "order_items"),
        ("ProductsById", "products"),
    ] {
        let selects: Vec<_> = children(batch(loader))
            .into_iter()
            .filter(|s| {
                span_attribute(s, "db.system.name") == "postgresql"
                    && span_attribute(s, "db.operation.name") == "SELECT"
            })
            .collect();
        assert_eq!(selects.len(), 1, "{loader}: {selects:?}");
        let sql = selects[0];
        assert_eq!(sql.kind, client_kind);
        assert_eq!(span_attribute(sql, "db.system"), "postgresql");
        assert_eq!(span_attribute(sql, "db.operation.name"), "SELECT");
        assert_eq!(span_attribute(sql, "db.collection.name"), table, "{sql:?}");
        let text = span_attribute(sql, "db.query.text");
        assert!(text.contains("$1") && text.contains(table), "{text}");
        assert!(
            !text.contains('\n') && !text.contains("  "),
            "normalized: {text}"
        );
        assert_eq!(span_attribute(sql, "server.address"), db_host);
        assert!(span_attribute(sql, "server.port").parse::<u16>().is_ok());
        assert!(sql.end_time_unix_nano >= sql.start_time_unix_nano);
    }
    // The page of users is the domain operation's own statement.
    let page_query = trace
        .iter()
        .find(|s| {
            span_attribute(s, "db.system.name") == "postgresql"
                && span_attribute(s, "db.collection.name") == "users"
        })
        .unwrap_or_else(|| panic!("no users statement in {names:?}"));
    assert!(descends_from_rpc(page_query));
    // The product batch reads Redis first (a miss: nothing is cached yet),
    // then fills it.
    let redis: Vec<String> = children(batch("ProductsById"))
        .into_iter()
        .filter(|s| span_attribute(s, "db.system.name") == "redis")
        .map(|s| {
            assert_eq!(s.kind, client_kind);
            assert!(!span_attribute(s, "server.address").is_empty(), "{s:?}");
            span_attribute(s, "db.operation.name")
        })
        .collect();
    assert!(redis.contains(&"MGET".to_owned()), "{redis:?}");
    assert!(redis.contains(&"EVALSHA".to_owned()), "{redis:?}");
    db.close().await;
}

#[api_test]
async fn the_load_generator_drives_the_service_and_writes_its_results() {
    let app = TestApp::spawn().await;
    let out =
        std::env::temp_dir().join(format!("datagate-bench-{}", uuid::Uuid::new_v4().simple()));
    let output = Command::new(env!("CARGO_BIN_EXE_datagate-bench"))
        .args([
            "--addr",
            &format!("http://{}", app.addr),
            "--scenarios",
            "get_user_hit,search_cached,create_order",
            "--concurrency",
            "1,2",
            "--duration",
            "300ms",
            "--warmup",
            "50ms",
            "--users",
            "120",
            // The service runs in this process.
            "--service-pid",
            &std::process::id().to_string(),
            "--out",
        ])
        .arg(&out)
        .env("DATAGATE_BENCH_TOKEN", &app.token)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let document: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("latest.json")).unwrap()).unwrap();
    let results = document["results"].as_array().unwrap();
    assert_eq!(results.len(), 6, "3 scenarios at 2 concurrency levels");
    for r in results {
        assert!(r["requests"].as_u64().unwrap() > 0, "{r}");
        assert!(r["p50_ms"].as_f64().unwrap() > 0.0);
        assert!(r["p99_ms"].as_f64().unwrap() >= r["p50_ms"].as_f64().unwrap());
        assert_eq!(r["errors"], serde_json::json!({}), "{r}");
        assert!(
            r["rps_vs_tonic"].as_f64().unwrap() > 0.0,
            "a ratio to the baseline: {r}"
        );
        assert!(r["service_rss_mib"].as_f64().unwrap() > 1.0, "{r}");
    }
    let memory = &document["service_memory"];
    assert!(memory["idle_rss_mib"].as_f64().unwrap() > 1.0, "{memory}");
    assert!(
        memory["peak_rss_mib"].as_f64().unwrap() >= memory["idle_rss_mib"].as_f64().unwrap(),
        "{memory}"
    );
    let baselines: Vec<&str> = document["baselines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(baselines, ["tonic_bare", "tonic_bare"]);
    let summary = std::fs::read_to_string(out.join("latest.md")).unwrap();
    for scenario in ["get_user_hit", "search_cached", "create_order"] {
        assert!(
            summary.contains(&format!("| {scenario} | 2 |")),
            "{summary}"
        );
    }
    for plot in ["latency.svg", "throughput.svg"] {
        let svg = std::fs::read_to_string(out.join(plot)).unwrap();
        assert!(svg.contains("create_order"), "{plot} names every scenario");
    }
    let _ = std::fs::remove_dir_all(out);
}
