//! The real `datagate` binary: configuration errors, SIGTERM while a call is
//! in flight, and what it logs.

use std::{process::Stdio, time::Duration};

use datagate::{auth, proto::v1 as pb, proto::v1::user_service_client::UserServiceClient};
use sqlx::PgPool;
use tokio::{io::AsyncReadExt as _, process::Command};
use tonic::transport::Endpoint;

use crate::support::{
    Bearer, RowLock, TestApp, TestDatabase, api_test, redis::redis_url, rename,
    wait_for_lock_waiter,
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
        table("category_daily_listings").await,
        None,
        "one step reverts the newest migration"
    );
    assert_eq!(
        table("category_daily_sales").await.as_deref(),
        Some("category_daily_sales"),
        "and only that one"
    );
    run(&["migrate", "down", "--steps", "7"]).await;
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
