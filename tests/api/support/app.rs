//! `TestApp`: the real application, in-process on ephemeral ports, with its
//! own PostgreSQL database (and, if asked, MongoDB database and Redis
//! namespace), called through the generated clients.
//!
//! The app runs on the test's runtime, so a test that pauses tokio's clock
//! pauses the app's too. Dropping a `TestApp` cancels its shutdown token;
//! the test's frame (`frame`) then waits for the server to stop, background
//! tasks included, before its databases are dropped. `TEST_LOG=1` shows the
//! logs.

use std::{net::SocketAddr, time::Duration};

use datagate::{
    auth,
    config::{RedisMode, Settings},
    proto::v1::{
        self as pb, admin_service_client::AdminServiceClient,
        analytics_service_client::AnalyticsServiceClient,
        catalog_service_client::CatalogServiceClient, order_service_client::OrderServiceClient,
        user_service_client::UserServiceClient,
    },
    startup::Application,
};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::{
    TestDatabase, TestMongo,
    clients::{AdminClient, AnalyticsClient, Bearer, CatalogClient, OrderClient, UserClient},
    frame::Teardown,
    mongo::use_test_mongo,
    redis::redis_cluster_connection,
    telemetry,
};

pub struct TestApp {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// The plaintext health port, when `server.health_port` is set.
    pub health_addr: Option<SocketAddr>,
    /// A pool on the app's database, for arranging and checking state.
    pub db: PgPool,
    /// A token with the `admin` role.
    pub token: String,
    /// A token with the `writer` role.
    pub writer_token: String,
    /// A token with the `reader` role.
    pub reader_token: String,
    /// The settings the app runs with.
    pub settings: Settings,
    shutdown: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    // Last: the databases are dropped after the app has stopped using them
    // (replicas share their primary's and own none).
    _databases: Owned,
}

/// The app's bearer tokens, by role.
struct Tokens {
    admin: String,
    writer: String,
    reader: String,
}

/// The databases an app owns (a primary) or not (a replica).
#[derive(Default)]
struct Owned {
    _postgres: Option<TestDatabase>,
    _mongo: Option<TestMongo>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Spawns the app with settings adjusted by `customize`.
    pub async fn spawn_with(customize: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_owning(false, customize).await
    }

    /// The app with MongoDB: its own database on `MONGODB_URL` (dropped
    /// with the app). MongoDB traffic is kept to the tests that need it: the
    /// test server is slow.
    pub async fn spawn_with_mongo(customize: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_owning(true, customize).await
    }

    async fn spawn_owning(with_mongo: bool, customize: impl FnOnce(&mut Settings)) -> Self {
        telemetry::init();
        let database = TestDatabase::create().await;
        let (token, admin_entry) =
            auth::new_token("test-admin", &[auth::ADMIN_ROLE.to_owned()]).unwrap();
        let (writer_token, writer_entry) =
            auth::new_token("test-writer", &[auth::Role::Writer.as_str().to_owned()]).unwrap();
        let (reader_token, reader_entry) =
            auth::new_token("test-reader", &[auth::Role::Reader.as_str().to_owned()]).unwrap();
        let mut settings = Settings::load_with_overrides(
            None,
            &[
                ("database.url", &database.url),
                (
                    "pagination.token_secret",
                    "test-page-token-secret-0123456789abcdef",
                ),
                ("server.host", "127.0.0.1"),
                ("server.port", "0"),
                ("metrics.host", "127.0.0.1"),
                ("metrics.port", "0"),
            ],
        )
        .expect("test settings load");
        if let Ok(redis) = std::env::var("REDIS_URL") {
            settings.redis.url = redis.into();
            settings.redis.key_prefix = format!("dgtest-{}", uuid::Uuid::new_v4().simple());
            // Tests that are not about timeouts must not see one on a busy
            // machine (a timed-out read is a miss, which they would notice).
            settings.redis.command_timeout = Duration::from_secs(2);
            settings.redis.wait_timeout = Duration::from_secs(2);
        }
        settings.database.max_connections = 8;
        settings.database.min_connections = 0;
        // Tests that are not about overload must not be shed when they fire
        // bursts on a busy machine; `admission.rs` turns it on.
        settings.admission.enabled = false;
        // Nor held to a caller's quota (`quotas.rs` sets them).
        settings.quotas.reader = 0.0;
        settings.quotas.writer = 0.0;
        settings.quotas.admin = 0.0;
        settings.auth.tokens = [admin_entry, writer_entry, reader_entry]
            .iter()
            .map(|entry| entry.parse().unwrap())
            .collect();
        let mongo = with_mongo.then(|| use_test_mongo(&mut settings));
        customize(&mut settings);
        let databases = Owned {
            _postgres: Some(database),
            _mongo: mongo,
        };
        Self::start(
            settings,
            Tokens {
                admin: token,
                writer: writer_token,
                reader: reader_token,
            },
            databases,
        )
        .await
    }

    async fn start(settings: Settings, tokens: Tokens, databases: Owned) -> Self {
        let app = Application::build(settings.clone())
            .await
            .expect("app builds");
        let addr = app.grpc_addr();
        let metrics_addr = app.metrics_addr();
        let health_addr = app.health_addr();
        let db = PgPool::connect(secrecy::ExposeSecret::expose_secret(&settings.database.url))
            .await
            .expect("test pool");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(app.run_until_stopped(shutdown.clone().cancelled_owned()));
        let app = Self {
            addr,
            metrics_addr,
            health_addr,
            db,
            token: tokens.admin,
            writer_token: tokens.writer,
            reader_token: tokens.reader,
            settings,
            shutdown,
            server: Some(server),
            _databases: databases,
        };
        app.wait_for_first_readiness_check().await;
        app
    }

    /// Waits until the app's readiness watcher has checked its dependencies
    /// once and registered a health entry per service (SERVING or not), as
    /// a load balancer waits for a new replica; until then a per-service
    /// health check answers NOT_FOUND. With TLS on, it asks the plaintext
    /// health port, which TLS tests set.
    async fn wait_for_first_readiness_check(&self) {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let channel = if self.settings.server.tls.enabled {
            let addr = self
                .health_addr
                .expect("a TLS test app sets server.health_port (see tls.rs)");
            plaintext_channel(addr).await
        } else {
            self.channel().await
        };
        let mut health = HealthClient::new(channel);
        for _ in 0..500 {
            let check = HealthCheckRequest {
                service: "datagate.v1.UserService".into(),
            };
            if health.check(check).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the app registered no health entries within 10 s");
    }

    /// This app's MongoDB database, for arranging and checking documents.
    pub async fn mongo(&self) -> mongodb::Database {
        let url = secrecy::ExposeSecret::expose_secret(&self.settings.mongodb.url).to_owned();
        mongodb::Client::with_uri_str(url)
            .await
            .expect("MongoDB client")
            .database(&self.settings.mongodb.database)
    }

    fn tokens(&self) -> Tokens {
        Tokens {
            admin: self.token.clone(),
            writer: self.writer_token.clone(),
            reader: self.reader_token.clone(),
        }
    }

    /// A replica with other settings (on the same database).
    pub async fn spawn_replica_with(&self, settings: Settings) -> Self {
        Self::start(settings, self.tokens(), Owned::default()).await
    }

    /// A second instance on the same database and the same Redis namespace,
    /// as another replica would be.
    pub async fn spawn_replica(&self) -> Self {
        Self::start(self.settings.clone(), self.tokens(), Owned::default()).await
    }

    /// The Redis key of an entity in this app's namespace (hash-tagged on a
    /// cluster).
    pub fn cache_key(&self, entity: &str, id: i64) -> String {
        let prefix = &self.settings.redis.key_prefix;
        match self.settings.redis.mode {
            RedisMode::Single => format!("{prefix}:v1:{entity}:{id}"),
            RedisMode::Cluster => format!("{prefix}:v1:{{{entity}:{id}}}"),
        }
    }

    /// A raw value from the app's Redis or Redis Cluster (None if absent).
    pub async fn redis_get(&self, key: &str) -> Option<Vec<u8>> {
        use deadpool_redis::redis::AsyncCommands as _;
        let url = secrecy::ExposeSecret::expose_secret(&self.settings.redis.url).to_owned();
        match self.settings.redis.mode {
            RedisMode::Single => {
                let client = deadpool_redis::redis::Client::open(url).expect("redis url");
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect to redis");
                conn.get(key).await.expect("GET")
            }
            RedisMode::Cluster => {
                let mut conn = redis_cluster_connection(&url).await;
                conn.get(key).await.expect("GET")
            }
        }
    }

    pub async fn channel(&self) -> Channel {
        plaintext_channel(self.addr).await
    }

    pub async fn users(&self) -> UserClient {
        self.users_as(Some(&self.token)).await
    }

    pub async fn users_as(&self, token: Option<&str>) -> UserClient {
        UserServiceClient::with_interceptor(self.channel().await, Bearer(token.map(Into::into)))
    }

    pub async fn catalog(&self) -> CatalogClient {
        CatalogServiceClient::with_interceptor(
            self.channel().await,
            Bearer(Some(self.token.as_str().into())),
        )
    }

    pub async fn admin_as(&self, token: &str) -> AdminClient {
        AdminServiceClient::with_interceptor(self.channel().await, Bearer(Some(token.into())))
    }

    /// AnalyticsService as the writer.
    pub async fn analytics(&self) -> AnalyticsClient {
        self.analytics_as(&self.writer_token).await
    }

    pub async fn analytics_as(&self, token: &str) -> AnalyticsClient {
        AnalyticsServiceClient::with_interceptor(self.channel().await, Bearer(Some(token.into())))
    }

    pub async fn orders(&self) -> OrderClient {
        OrderServiceClient::with_interceptor(
            self.channel().await,
            Bearer(Some(self.token.as_str().into())),
        )
    }

    pub fn trigger_shutdown(&self) {
        self.shutdown.cancel();
    }

    pub fn take_server(&mut self) -> JoinHandle<anyhow::Result<()>> {
        self.server
            .take()
            .expect("server still owned by the test app")
    }

    /// GET /metrics, as text.
    pub async fn metrics(&self) -> String {
        scrape(self.metrics_addr).await
    }

    // --- Typed shortcuts -------------------------------------------------

    pub async fn create_user(&self, email: &str, username: &str) -> pb::User {
        self.create_user_with(pb::CreateUserRequest {
            email: email.into(),
            username: username.into(),
            display_name: format!("{username} display"),
            password: String::new(),
            status: 0,
        })
        .await
    }

    /// A product with a unique sku.
    pub async fn create_product(&self, price_cents: i64, inventory: i32) -> pb::Product {
        let sku = format!("SKU-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        self.catalog()
            .await
            .create_product(pb::CreateProductRequest {
                sku: sku.clone(),
                title: format!("Product {sku}"),
                category: "tools".into(),
                price_cents,
                inventory,
                ..Default::default()
            })
            .await
            .expect("create product")
            .into_inner()
    }

    /// An order of `quantity` units of one product, as the admin.
    pub async fn create_order(&self, user_id: i64, product_id: i64, quantity: i32) -> pb::Order {
        self.orders()
            .await
            .create_order(pb::CreateOrderRequest {
                user_id,
                items: vec![pb::OrderLine {
                    product_id,
                    quantity,
                }],
                request_id: String::new(),
            })
            .await
            .expect("create order")
            .into_inner()
    }

    pub async fn inventory_of(&self, product_id: i64) -> i32 {
        sqlx::query_scalar("SELECT quantity FROM inventory WHERE product_id = $1")
            .bind(product_id)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    pub async fn create_user_with(&self, request: pb::CreateUserRequest) -> pb::User {
        self.users()
            .await
            .create_user(request)
            .await
            .expect("create user")
            .into_inner()
    }
}

/// A plaintext HTTP/2 channel to `addr`.
pub async fn plaintext_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the app")
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            Teardown::Server(server).register();
        }
        // Then the fields: the test pool, and the databases this app owns,
        // whose teardowns come after the server's.
    }
}

/// GET /metrics of the metrics listener at `addr` (a test app's or a
/// `datagate serve` child's), as text; the response must be 200.
pub async fn scrape(addr: impl tokio::net::ToSocketAddrs) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}
