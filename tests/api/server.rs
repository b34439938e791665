//! The server around the services: identity, health, reflection, request
//! ids, deadlines, limits, metrics and graceful shutdown.

use std::time::Duration;

use datagate::proto::v1 as pb;
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, transport::Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt as _;

use crate::support::{
    RowLock, TestApp, api_test, assert_error, rename, wait_for_health, wait_for_lock_waiter,
};

const USER_SERVICE: &str = "datagate.v1.UserService";

/// Asserts that a GetUser with `token` is UNAUTHENTICATED with `reason`.
async fn assert_unauthenticated(token: Option<&str>, reason: &str) {
    let app = TestApp::spawn().await;
    let status = app
        .users_as(token)
        .await
        .get_user(pb::GetUserRequest {
            id: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::Unauthenticated, reason);
}

#[api_test]
async fn a_call_without_a_token_is_unauthenticated() {
    assert_unauthenticated(None, "MISSING_CREDENTIALS").await;
}

#[api_test]
async fn a_call_with_an_unknown_token_is_unauthenticated() {
    assert_unauthenticated(Some("dg_not-a-configured-token"), "INVALID_CREDENTIALS").await;
}

#[api_test]
async fn a_reader_can_read_the_user_service() {
    let app = TestApp::spawn().await;
    let status = app
        .users_as(Some(&app.reader_token))
        .await
        .get_user(pb::GetUserRequest {
            id: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::NotFound,
        "authenticated, authorized, then not found"
    );
}

#[api_test]
async fn health_reports_serving_overall_and_per_service_without_a_token() {
    let app = TestApp::spawn().await;
    let mut health = HealthClient::new(app.channel().await);
    for service in ["", USER_SERVICE, "liveness"] {
        let status = wait_for_health(&mut health, service, ServingStatus::Serving).await;
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[api_test]
async fn reflection_v1_and_v1alpha_list_every_service() {
    use tonic_reflection::pb::{v1, v1alpha};
    let app = TestApp::spawn().await;
    let expected = [
        "datagate.v1.AdminService",
        "datagate.v1.AnalyticsService",
        "datagate.v1.CatalogService",
        "datagate.v1.OrderService",
        "datagate.v1.UserService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(app.channel().await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        stream.next().await.unwrap().unwrap().message_response
    else {
        panic!("v1 answered something other than a service list");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, expected);

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel().await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "datagate.v1.UserService".into(),
            ),
        ),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.next().await.unwrap().unwrap().message_response;
    assert!(
        matches!(
            response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f))
                if !f.file_descriptor_proto.is_empty()
        ),
        "v1alpha describes the user service: {response:?}"
    );
}

#[api_test]
async fn the_callers_request_id_is_returned_and_one_is_generated_otherwise() {
    let app = TestApp::spawn().await;
    let mut users = app.users().await;

    let mut request = Request::new(pb::GetUserRequest {
        id: 1,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "caller-chosen-id-42".parse().unwrap());
    let status = users.get_user(request).await.unwrap_err();
    assert_eq!(
        status.metadata().get("x-request-id").unwrap(),
        "caller-chosen-id-42"
    );

    let user = app.create_user("rid@example.com", "rider").await;
    let response = users
        .get_user(pb::GetUserRequest {
            id: user.id,
            ..Default::default()
        })
        .await
        .unwrap();
    let generated = response
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(uuid::Uuid::parse_str(generated).is_ok(), "{generated}");
}

/// Sends one unary call over plain HTTP/2 with a `grpc-timeout` header and
/// returns the `grpc-status` the server answers with. (A tonic client would
/// enforce the deadline itself and race the server.)
async fn raw_call_status(
    app: &TestApp,
    path: &str,
    message: &impl prost::Message,
    timeout: &str,
) -> (i32, String) {
    use http_body_util::{BodyExt as _, Full};
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.encoded_len() as u32).to_be_bytes());
    message.encode(&mut frame).unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<bytes::Bytes>>();
    let request = http::Request::post(format!("http://{}{path}", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .header("authorization", format!("Bearer {}", app.token))
        .body(Full::new(bytes::Bytes::from(frame)))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let mut headers = response.headers().clone();
    let collected = response.into_body().collect().await.unwrap();
    if let Some(trailers) = collected.trailers() {
        headers.extend(trailers.clone());
    }
    let code = headers["grpc-status"].to_str().unwrap().parse().unwrap();
    let message = headers
        .get("grpc-message")
        .map(|m| m.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (code, message)
}

#[api_test]
async fn a_call_past_the_callers_deadline_is_deadline_exceeded() {
    let app = TestApp::spawn().await;
    let user = app.create_user("slow@example.com", "slowpoke").await;
    let lock = RowLock::on_user(&app.db, user.id).await;

    let started = std::time::Instant::now();
    let (code, message) = raw_call_status(
        &app,
        "/datagate.v1.UserService/UpdateUser",
        &rename(&user, "never"),
        "300m",
    )
    .await;
    assert_eq!(Code::from_i32(code), Code::DeadlineExceeded, "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered at the deadline, not the server bound"
    );
    lock.release().await;

    let unchanged = app
        .users()
        .await
        .get_user(pb::GetUserRequest {
            id: user.id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        unchanged.display_name, user.display_name,
        "the abandoned update did not apply"
    );
}

#[api_test]
async fn the_server_bound_caps_a_longer_caller_deadline() {
    // Wide enough for the arranging calls on a busy machine.
    let app = TestApp::spawn_with(|s| s.server.request_timeout = Duration::from_secs(2)).await;
    let user = app.create_user("cap@example.com", "capped").await;
    let lock = RowLock::on_user(&app.db, user.id).await;
    let mut request = Request::new(rename(&user, "never"));
    request
        .metadata_mut()
        .insert("grpc-timeout", "60S".parse().unwrap());
    let status = app.users().await.update_user(request).await.unwrap_err();
    // The statement's lock_timeout (the 2 s bound less the margin) usually
    // answers first (QUERY_TIMEOUT); else the middleware does at the bound.
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let reason = status
        .get_error_details()
        .error_info()
        .unwrap()
        .reason
        .clone();
    assert!(
        ["QUERY_TIMEOUT", "DEADLINE_EXCEEDED"].contains(&reason.as_str()),
        "{status:?}"
    );
    lock.release().await;
}

#[api_test]
async fn an_oversized_request_is_rejected_without_reaching_the_handler() {
    let app = TestApp::spawn_with(|s| s.server.max_message_bytes = 2048).await;
    let status = app
        .users()
        .await
        .create_user(pb::CreateUserRequest {
            email: "big@example.com".into(),
            username: "big".into(),
            display_name: "x".repeat(4096),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // tonic reports an over-limit message as OUT_OF_RANGE.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(count, 0);
}

#[api_test]
async fn metrics_count_calls_by_method_and_code_and_show_pool_usage() {
    let app = TestApp::spawn().await;
    let get_user = |code| {
        [
            ("service", USER_SERVICE),
            ("method", "GetUser"),
            ("code", code),
        ]
    };
    // Process-wide counters: other tests may add to them, never take away.
    let counted = async || {
        let scrape = app.metrics().await;
        [
            ("rpc_requests_total", "NOT_FOUND"),
            ("rpc_requests_total", "UNAUTHENTICATED"),
            ("rpc_latency_seconds_count", "NOT_FOUND"),
        ]
        .map(|(name, code)| crate::support::observe::series(&scrape, name, &get_user(code)))
    };
    let before = counted().await;
    let mut users = app.users().await;
    let _ = users
        .get_user(pb::GetUserRequest {
            id: 123_456,
            ..Default::default()
        })
        .await;
    let _ = app
        .users_as(None)
        .await
        .get_user(pb::GetUserRequest {
            id: 1,
            ..Default::default()
        })
        .await;

    let after = counted().await;
    for (i, what) in [
        "NOT_FOUND calls",
        "UNAUTHENTICATED calls",
        "NOT_FOUND latencies",
    ]
    .iter()
    .enumerate()
    {
        assert!(
            after[i] - before[i] >= 1.0,
            "{what}: {} -> {}",
            before[i],
            after[i]
        );
    }
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"rpc_latency_seconds_bucket{service="datagate.v1.UserService",method="GetUser",code="NOT_FOUND""#),
        "{metrics}"
    );
    // The pool gauges are this app's, sampled as it is scraped.
    let pool = |name, state: Option<&str>| {
        let mut labels = vec![("pool", "postgres")];
        labels.extend(state.map(|s| ("state", s)));
        crate::support::observe::series(&metrics, name, &labels)
    };
    let max = f64::from(app.settings.database.max_connections);
    assert_eq!(pool("connection_pool_max", None), max);
    // Gauges are process-wide too: another app's scrape may set one between
    // this app's setting and rendering it, so poll instead of trusting one.
    crate::support::observe::wait_until(
        "the app's connections",
        Duration::from_secs(5),
        async || {
            let labels = |state| [("pool", "postgres"), ("state", state)];
            let scrape = app.metrics().await;
            let held = crate::support::observe::series(
                &scrape,
                "connection_pool_connections",
                &labels("idle"),
            ) + crate::support::observe::series(
                &scrape,
                "connection_pool_connections",
                &labels("in_use"),
            );
            (1.0..=max).contains(&held)
        },
    )
    .await;
    let usage = pool("connection_pool_usage", None);
    assert!((0.0..=1.0).contains(&usage), "{usage}");
}

#[api_test]
async fn shutdown_reports_not_serving_refuses_new_calls_and_lets_in_flight_calls_finish() {
    let mut app = TestApp::spawn_with(|s| {
        // Long enough to read health on a busy machine before the listener
        // closes.
        s.server.shutdown_readiness_delay = Duration::from_secs(3);
        s.server.drain_timeout = Duration::from_secs(20);
    })
    .await;
    let user = app.create_user("drain@example.com", "drainer").await;
    let mut health = HealthClient::new(app.channel().await);
    assert_eq!(
        wait_for_health(&mut health, "", ServingStatus::Serving).await,
        ServingStatus::Serving
    );
    let lock = RowLock::on_user(&app.db, user.id).await;
    let mut users = app.users().await;
    let request = rename(&user, "finished during drain");
    let in_flight = tokio::spawn(async move { users.update_user(request).await });
    wait_for_lock_waiter(&app.db).await;

    let server = app.take_server();
    app.trigger_shutdown();
    assert_eq!(
        wait_for_health(&mut health, "", ServingStatus::NotServing).await,
        ServingStatus::NotServing
    );
    assert_eq!(
        wait_for_health(&mut health, USER_SERVICE, ServingStatus::NotServing).await,
        ServingStatus::NotServing
    );
    let liveness = health
        .check(HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        liveness,
        ServingStatus::Serving,
        "a draining process is not restarted by its liveness probe"
    );

    // After the readiness delay the listener closes: new connections fail.
    let endpoint = Endpoint::from_shared(format!("http://{}", app.addr)).unwrap();
    crate::support::observe::wait_until(
        "new connections are refused while draining",
        Duration::from_secs(15),
        async || endpoint.connect().await.is_err(),
    )
    .await;
    assert!(
        !server.is_finished(),
        "the server waits for the in-flight call"
    );

    lock.release().await;
    let finished = in_flight
        .await
        .unwrap()
        .expect("the in-flight call succeeds");
    assert_eq!(finished.into_inner().display_name, "finished during drain");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stops once drained")
        .unwrap()
        .expect("a clean shutdown");
}

#[api_test]
async fn the_drain_bound_stops_a_server_whose_calls_never_finish() {
    let mut app =
        TestApp::spawn_with(|s| s.server.drain_timeout = Duration::from_millis(300)).await;
    let user = app.create_user("stuck@example.com", "stuck").await;
    let lock = RowLock::on_user(&app.db, user.id).await;
    let mut users = app.users().await;
    let request = rename(&user, "never");
    let _in_flight = tokio::spawn(async move { users.update_user(request).await });
    wait_for_lock_waiter(&app.db).await;

    let server = app.take_server();
    app.trigger_shutdown();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the drain bound ends the shutdown")
        .unwrap()
        .expect("a bounded drain is still a clean exit");
    lock.release().await;
}

#[api_test]
async fn with_sslmode_require_every_database_connection_is_encrypted() {
    let app = TestApp::spawn_with(|s| {
        let url = secrecy::ExposeSecret::expose_secret(&s.database.url).to_owned();
        let separator = if url.contains('?') { '&' } else { '?' };
        s.database.url = format!("{url}{separator}sslmode=require").into();
    })
    .await;
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        ssl, "on",
        "the test PostgreSQL must accept TLS (scripts/dev-env.sh turns it on)"
    );
    // A read and a write, so the service holds connections of its own.
    let user = app.create_user("tls@example.com", "tls").await;
    app.users()
        .await
        .get_user(pb::GetUserRequest {
            id: user.id,
            ..Default::default()
        })
        .await
        .unwrap();

    let (service, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = current_database() AND a.application_name = 'datagate'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert!(service >= 1, "the service holds connections");
    assert_eq!(encrypted, service, "every service connection uses TLS");
}

/// An HTTP/2 connection to the app that makes no calls, and the task
/// driving it: the task ends when the server closes the connection.
async fn idle_http2_connection(
    addr: std::net::SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, task)
}

#[api_test]
async fn connections_past_max_connection_age_are_closed_and_callers_reconnect() {
    let app =
        TestApp::spawn_with(|s| s.server.max_connection_age = Duration::from_millis(300)).await;
    let (_client, connection) = idle_http2_connection(app.addr).await;
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the server closes a connection past its age")
        .unwrap();

    // A tonic channel reconnects on its own: calls across the age succeed.
    let user = app.create_user("aged@example.com", "aged").await;
    let mut users = app.users().await;
    for _ in 0..3 {
        users
            .get_user(pb::GetUserRequest {
                id: user.id,
                ..Default::default()
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

#[api_test]
async fn without_max_connection_age_an_idle_connection_stays_open() {
    let app = TestApp::spawn().await;
    let (_client, connection) = idle_http2_connection(app.addr).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!connection.is_finished(), "the server kept the connection");
}
