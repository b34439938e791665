//! The benchmark's reference servers (`datagate-bench --serve-reference`),
//! which BENCHMARKS.md's point-read and page ratios are measured against:
//! each answers its one method with what the service answers, from the
//! same database and the keys the service filled, and every other path
//! UNIMPLEMENTED.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use datagate::proto::v1::{
    self as pb, order_service_client::OrderServiceClient, user_service_client::UserServiceClient,
};
use secrecy::ExposeSecret as _;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
};
use tonic::Code;

use crate::support::{TestApp, api_test, app::plaintext_channel, redis::redis_url, unique};

/// A reference server in a process of its own, killed when dropped.
struct Reference {
    addr: SocketAddr,
    _process: Child,
}

impl Reference {
    /// `--serve-reference kind` on `app`'s database and Redis keys, once it
    /// says it accepts calls.
    async fn start(kind: &str, app: &TestApp) -> Self {
        let mut process = Command::new(env!("CARGO_BIN_EXE_datagate-bench"))
            .args(["--serve-reference", kind, "--listen", "127.0.0.1:0"])
            .args(["--database-url", app.settings.database.url.expose_secret()])
            .args(["--redis-url", &redis_url()])
            .args(["--redis-key-prefix", &app.settings.redis.key_prefix])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn datagate-bench --serve-reference");
        let mut lines = BufReader::new(process.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the reference starts within a minute")
            .unwrap()
            .expect("the reference prints where it listens");
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("not `listening on ADDR`: {line}"));
        Self {
            addr,
            _process: process,
        }
    }
}

#[api_test]
async fn each_point_read_reference_answers_get_user_as_the_service_does() {
    let app = TestApp::spawn().await;
    let (email, username) = unique("reference");
    let user = app.create_user(&email, &username).await;
    let request = pb::GetUserRequest {
        id: user.id,
        ..Default::default()
    };
    // The service's answer, which also fills the key the Redis reference reads.
    let served = app
        .users()
        .await
        .get_user(request)
        .await
        .unwrap()
        .into_inner();
    assert!(
        app.redis_get(&app.cache_key("user", user.id))
            .await
            .is_some(),
        "the service cached the user"
    );

    for kind in ["redis-get", "primary-key-select"] {
        let reference = Reference::start(kind, &app).await;
        let mut client = UserServiceClient::new(plaintext_channel(reference.addr).await);
        let answered = client.get_user(request).await.unwrap().into_inner();
        assert_eq!(answered, served, "{kind}");
        let other = client
            .list_users(pb::ListUsersRequest::default())
            .await
            .unwrap_err();
        assert_eq!(other.code(), Code::Unimplemented, "{kind}: {other:?}");
    }
}

#[api_test]
async fn the_json_agg_reference_answers_the_page_the_service_does() {
    let app = TestApp::spawn().await;
    let product = app.create_product(1_250, 10).await;
    for n in 0..3 {
        let (email, username) = unique(&format!("page{n}"));
        let user = app.create_user(&email, &username).await;
        for _ in 0..n {
            app.create_order(user.id, product.id, 1).await;
        }
    }
    let request = pb::ListUsersWithOrdersRequest {
        page_size: 20,
        page_token: String::new(),
        orders_per_user: 5,
    };
    let served = app
        .orders()
        .await
        .list_users_with_orders(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(served.users.len(), 3);

    let reference = Reference::start("json-agg", &app).await;
    let mut client = OrderServiceClient::new(plaintext_channel(reference.addr).await);
    let answered = client
        .list_users_with_orders(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answered.users, served.users);
    let other = client
        .get_order(pb::GetOrderRequest { id: 1 })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::Unimplemented, "{other:?}");
}
