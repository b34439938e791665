//! `TestApp`: the real application, in-process on ephemeral ports, with its
//! own PostgreSQL database, called through the generated client.
//!
//! The server to create databases on comes from `DATAGATE_TEST_DATABASE_URL`
//! or `DATABASE_URL` (`make test` starts one). Each test's database is
//! `datagate_test_<uuid>` and is dropped when the `TestApp` is dropped
//! (`KEEP_TEST_DB=1` keeps it for inspection). `TEST_LOG=1` shows the logs.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

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
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};
use tonic_types::StatusExt as _;

pub type UserClient = UserServiceClient<InterceptedService<Channel, Bearer>>;
pub type CatalogClient = CatalogServiceClient<InterceptedService<Channel, Bearer>>;
pub type OrderClient = OrderServiceClient<InterceptedService<Channel, Bearer>>;
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, Bearer>>;
pub type AnalyticsClient = AnalyticsServiceClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(pub Option<Arc<str>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| Status::internal("token is not valid metadata"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// The subscriber every test process runs with: the statement layer (which
/// statement counting and N+1 detection rely on, as in production), the
/// capture tests read a call's log lines from, and, with `TEST_LOG=1`,
/// readable logs.
fn init_telemetry() {
    use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let logs = std::env::var_os("TEST_LOG").is_some().then(|| {
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(tracing_subscriber::EnvFilter::new(
                    "info,datagate=debug,sqlx=warn",
                ))
        });
        let _ = tracing_subscriber::registry()
            .with(datagate::statements::StatementLayer::filtered(
                Duration::from_millis(200),
            ))
            .with(crate::observe::capture_layer())
            .with(logs)
            .try_init();
    });
}

pub fn admin_database_url() -> String {
    std::env::var("DATAGATE_TEST_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .expect("set DATABASE_URL to a PostgreSQL server the tests may create databases on (`make test` does)")
}

/// A fresh, migrated database for one test; dropped with the guard.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let admin_url = admin_database_url();
        let name = format!("datagate_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("connect to the test PostgreSQL server");
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        admin.close().await.ok();
        let url = datagate::store::postgres::url_with_database(&admin_url, &name);
        let pool = PgPool::connect(&url)
            .await
            .expect("connect to the test database");
        datagate::store::postgres::migrate_up(&pool)
            .await
            .expect("migrate the test database");
        pool.close().await;
        Self {
            name,
            url,
            admin_url,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_DB").is_some() {
            eprintln!("kept test database {}", self.name);
            return;
        }
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside any runtime we may block: use a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for dropping the test database");
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&admin_url).await {
                    let _ =
                        sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
                            .execute(&mut admin)
                            .await;
                }
            });
        })
        .join();
    }
}

pub fn mongodb_url() -> String {
    std::env::var("MONGODB_URL").expect(
        "set MONGODB_URL to a MongoDB-compatible server the tests may use (`make test` does)",
    )
}

/// Points `settings` at a fresh MongoDB database of its own.
pub fn use_test_mongo(settings: &mut Settings) {
    settings.mongodb.url = mongodb_url().into();
    settings.mongodb.database = format!(
        "dgtest_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    );
    settings.mongodb.outbox_interval = Duration::from_millis(200);
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    /// A pool on the app's database, for arranging and checking state.
    pub db: PgPool,
    /// A token with the `admin` role.
    pub token: String,
    /// A token without roles.
    pub reader_token: String,
    /// The settings the app runs with.
    pub settings: Settings,
    shutdown: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    // Last: the database is dropped after the app has stopped using it
    // (replicas share their primary's and own none).
    _database: Option<TestDatabase>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Spawns the app with settings adjusted by `customize`.
    pub async fn spawn_with(customize: impl FnOnce(&mut Settings)) -> Self {
        init_telemetry();
        let database = TestDatabase::create().await;
        let (token, admin_entry) =
            auth::new_token("test-admin", &[auth::ADMIN_ROLE.to_owned()]).unwrap();
        let (reader_token, reader_entry) = auth::new_token("test-reader", &[]).unwrap();
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
        settings.auth.tokens = vec![admin_entry.parse().unwrap(), reader_entry.parse().unwrap()];
        customize(&mut settings);
        Self::start(settings, token, reader_token, Some(database)).await
    }

    async fn start(
        settings: Settings,
        token: String,
        reader_token: String,
        database: Option<TestDatabase>,
    ) -> Self {
        let app = Application::build(settings.clone())
            .await
            .expect("app builds");
        let addr = app.grpc_addr();
        let metrics_addr = app.metrics_addr();
        let db = PgPool::connect(secrecy::ExposeSecret::expose_secret(&settings.database.url))
            .await
            .expect("test pool");
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(app.run_until_stopped(shutdown.clone().cancelled_owned()));
        Self {
            addr,
            metrics_addr,
            db,
            token,
            reader_token,
            settings,
            shutdown,
            server: Some(server),
            _database: database,
        }
    }

    /// The app with MongoDB: its own database on `MONGODB_URL` (dropped
    /// with the app). MongoDB traffic is kept to the tests that need it: the
    /// test server is slow.
    pub async fn spawn_with_mongo(customize: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_with(|s| {
            use_test_mongo(s);
            customize(s);
        })
        .await
    }

    /// This app's MongoDB database, for arranging and checking documents.
    pub async fn mongo(&self) -> mongodb::Database {
        let url = secrecy::ExposeSecret::expose_secret(&self.settings.mongodb.url).to_owned();
        mongodb::Client::with_uri_str(url)
            .await
            .expect("MongoDB client")
            .database(&self.settings.mongodb.database)
    }

    /// A replica with other settings (on the same database).
    pub async fn spawn_replica_with(&self, settings: Settings) -> Self {
        Self::start(
            settings,
            self.token.clone(),
            self.reader_token.clone(),
            None,
        )
        .await
    }

    /// A second instance on the same database and the same Redis namespace,
    /// as another replica would be.
    pub async fn spawn_replica(&self) -> Self {
        Self::start(
            self.settings.clone(),
            self.token.clone(),
            self.reader_token.clone(),
            None,
        )
        .await
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
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the app")
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

    /// AnalyticsService as the caller without roles.
    pub async fn analytics(&self) -> AnalyticsClient {
        self.analytics_as(&self.reader_token).await
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
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(self.metrics_addr)
            .await
            .unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
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

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.abort();
        }
        // The owner of a test database also drops its MongoDB database.
        let mongo_url = secrecy::ExposeSecret::expose_secret(&self.settings.mongodb.url).to_owned();
        if self._database.is_some()
            && !mongo_url.is_empty()
            && std::env::var_os("KEEP_TEST_DB").is_none()
        {
            let name = self.settings.mongodb.database.clone();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for dropping the test database");
                rt.block_on(async {
                    if let Ok(client) = mongodb::Client::with_uri_str(mongo_url).await {
                        let _ = client.database(&name).drop().await;
                    }
                });
            })
            .join();
        }
    }
}

/// A connection to the Redis Cluster with these comma-separated seed URLs.
pub async fn redis_cluster_connection(urls: &str) -> deadpool_redis::cluster::ClusterConnection {
    deadpool_redis::cluster::ClusterClient::new(urls.split(','))
        .expect("redis cluster urls")
        .get_async_connection()
        .await
        .expect("connect to the redis cluster")
}

/// The health of `service` once it is `want`, or its last status after 10 s.
pub async fn health_of(
    app: &TestApp,
    service: &str,
    want: tonic_health::pb::health_check_response::ServingStatus,
) -> tonic_health::pb::health_check_response::ServingStatus {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mut health = HealthClient::new(app.channel().await);
    let mut last = ServingStatus::Unknown;
    for _ in 0..100 {
        if let Ok(r) = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
        {
            last = r.into_inner().status();
            if last == want {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// Asserts the status code and the `ErrorInfo` reason of an error.
#[track_caller]
pub fn assert_error(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    let details = status.get_error_details();
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "unexpected reason in {status:?}");
    assert_eq!(info.domain, "datagate.v1");
}

/// The fields named by the `BadRequest` violations of an INVALID_ARGUMENT.
#[track_caller]
pub fn violated_fields(status: &Status) -> Vec<String> {
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "unexpected status: {status:?}"
    );
    let details = status.get_error_details();
    let bad_request = details
        .bad_request()
        .unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
    let mut fields: Vec<String> = bad_request
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect();
    fields.sort();
    fields
}

/// A unique email and username for one test's users.
pub fn unique(prefix: &str) -> (String, String) {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..10];
    (
        format!("{prefix}-{tag}@example.com"),
        format!("{prefix}_{tag}"),
    )
}
