//! datagate, in-process (`Application::build` + `run_until_stopped`, as the
//! API tests run it) or as the real binary (`datagate serve`) when the
//! scenario kills or signals the service.

use std::{path::PathBuf, process::Stdio, sync::Arc, time::Duration};

use datagate::{auth, config::Settings, proto::v1 as pb, startup::Application};
use tokio::{
    process::{Child, Command},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{Admin, Bearer, Catalog, Orders, Users, channel};

const BIN: &str = env!("CARGO_BIN_EXE_datagate");
const PAGE_SECRET: &str = "faults-page-token-secret-0123456789abcdef";

/// Where the service runs: this process or a child process.
#[expect(clippy::large_enum_variant, reason = "one per scenario")]
enum Runner {
    InProcess {
        stop: CancellationToken,
        server: Option<JoinHandle<anyhow::Result<()>>>,
    },
    Binary {
        child: Option<Child>,
        env: Vec<(String, String)>,
        log: PathBuf,
        /// The current start's `/metrics` port.
        metrics_port: u16,
    },
}

pub struct Service {
    pub port: u16,
    token: Arc<str>,
    runner: Runner,
}

/// What a scenario points the service at; `overrides` are settings keys
/// (`section.key`) and values.
pub struct Deps<'a> {
    pub database_url: &'a str,
    pub redis_url: Option<&'a str>,
    pub overrides: &'a [(&'a str, &'a str)],
}

impl Service {
    /// The application in this process on `pg` (and `redis`, if any), with
    /// no overrides: how most scenarios start.
    pub async fn on(pg: &super::Postgres, redis: Option<&super::Redis>) -> Self {
        let (url, redis_url) = (pg.url(), redis.map(super::Redis::url));
        Self::in_process(Deps {
            database_url: &url,
            redis_url: redis_url.as_deref(),
            overrides: &[],
        })
        .await
    }

    /// `datagate serve` on `pg` and `redis` with `overrides`: how the
    /// scenarios that kill, signal or measure the binary start it.
    pub async fn binary_on(
        pg: &super::Postgres,
        redis: &super::Redis,
        overrides: &[(&str, &str)],
    ) -> Self {
        let (url, redis_url) = (pg.url(), redis.url());
        Self::binary(Deps {
            database_url: &url,
            redis_url: Some(&redis_url),
            overrides,
        })
        .await
    }

    /// The application in this process, on a free port.
    pub async fn in_process(deps: Deps<'_>) -> Self {
        let (token, entry) = auth::new_token("faults", &[auth::ADMIN_ROLE.to_owned()]).unwrap();
        let mut overrides: Vec<(&str, &str)> = vec![
            ("database.url", deps.database_url),
            ("pagination.token_secret", PAGE_SECRET),
            ("server.host", "127.0.0.1"),
            ("server.port", "0"),
            ("metrics.host", "127.0.0.1"),
            ("metrics.port", "0"),
            // The scenarios measure the instance, not one caller's quota.
            ("quotas.admin", "0"),
        ];
        if let Some(redis) = deps.redis_url {
            overrides.push(("redis.url", redis));
        }
        overrides.extend_from_slice(deps.overrides);
        let mut settings: Settings =
            Settings::load_with_overrides(None, &overrides).expect("fault-suite settings");
        settings.auth.tokens = vec![entry.parse().unwrap()];
        let app = Application::build(settings).await.expect("the app builds");
        let port = app.grpc_addr().port();
        let stop = CancellationToken::new();
        let server = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
        let service = Self {
            port,
            token: token.into(),
            runner: Runner::InProcess {
                stop,
                server: Some(server),
            },
        };
        service.wait_serving().await;
        service
    }

    /// `datagate serve` as a child process on a free port; its output goes
    /// to a log file (printed if the scenario fails to start it).
    pub async fn binary(deps: Deps<'_>) -> Self {
        let (token, entry) = auth::new_token("faults", &[auth::ADMIN_ROLE.to_owned()]).unwrap();
        let port = super::free_port();
        let mut env = vec![
            ("DATAGATE__DATABASE__URL".into(), deps.database_url.into()),
            (
                "DATAGATE__PAGINATION__TOKEN_SECRET".into(),
                PAGE_SECRET.into(),
            ),
            ("DATAGATE__AUTH__TOKENS".into(), entry),
            // The scenarios measure the instance, not one caller's quota.
            ("DATAGATE__QUOTAS__ADMIN".into(), "0".into()),
            ("DATAGATE__SERVER__HOST".into(), "127.0.0.1".into()),
            ("DATAGATE__SERVER__PORT".into(), port.to_string()),
            ("DATAGATE__METRICS__HOST".into(), "127.0.0.1".into()),
            ("DATAGATE__TELEMETRY__LOG_FORMAT".into(), "json".into()),
        ];
        if let Some(redis) = deps.redis_url {
            env.push(("DATAGATE__REDIS__URL".into(), redis.into()));
        }
        for (key, value) in deps.overrides {
            let name = format!("DATAGATE__{}", key.to_uppercase().replace('.', "__"));
            env.push((name, (*value).into()));
        }
        let log = std::env::temp_dir().join(format!(
            "datagate-faults-service-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let mut service = Self {
            port,
            token: token.into(),
            runner: Runner::Binary {
                child: None,
                env,
                log,
                metrics_port: 0,
            },
        };
        service.restart().await;
        service
    }

    /// Starts the binary (again, on the same port and settings).
    pub async fn restart(&mut self) {
        let Runner::Binary {
            child,
            env,
            log,
            metrics_port,
        } = &mut self.runner
        else {
            panic!("only the binary restarts");
        };
        *metrics_port = super::free_port();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&*log)
            .unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            // Each start picks its own metrics port.
            .env("DATAGATE__METRICS__PORT", metrics_port.to_string())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true);
        *child = Some(command.spawn().expect("spawn datagate serve"));
        self.wait_serving().await;
    }

    fn child(&mut self) -> &mut Child {
        match &mut self.runner {
            Runner::Binary { child, .. } => child.as_mut().expect("a running binary"),
            Runner::InProcess { .. } => panic!("the in-process service has no pid"),
        }
    }

    /// The binary's peak resident memory so far (`VmHWM`), in MiB.
    pub fn peak_rss_mib(&mut self) -> f64 {
        let pid = self.child().id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// CPU time the binary has used so far (user + system).
    pub fn cpu_time(&mut self) -> Duration {
        let pid = self.child().id().expect("running");
        super::cpu_time_of(&pid.to_string())
    }

    /// The binary's `/metrics`, as text.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let Runner::Binary { metrics_port, .. } = &self.runner else {
            panic!("the in-process service shares this process's recorder; read it there");
        };
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", *metrics_port))
            .await
            .expect("the metrics port answers");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default()
    }

    /// kill -9 of the binary, reaped.
    pub async fn kill9(&mut self) {
        self.child().kill().await.unwrap();
        if let Runner::Binary { child, .. } = &mut self.runner {
            *child = None;
        }
    }

    /// Sends SIGTERM to the binary.
    pub fn sigterm(&mut self) {
        let pid = self.child().id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the binary to exit (at most `limit`).
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child().wait())
            .await
            .expect("the binary exits")
            .unwrap()
    }

    /// The binary's log so far (empty in-process).
    pub fn log(&self) -> String {
        match &self.runner {
            Runner::Binary { log, .. } => std::fs::read_to_string(log).unwrap_or_default(),
            Runner::InProcess { .. } => String::new(),
        }
    }

    /// The overall health entry (`""`) until it is SERVING.
    pub async fn wait_serving(&self) {
        let port = self.port;
        let log = || self.log();
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if self.health("").await == Some(ServingStatus::Serving) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "datagate on port {port} did not become SERVING; log:\n{}",
            log()
        );
    }

    /// One health check of `service` (None: no answer within 2 s).
    pub async fn health(&self, service: &str) -> Option<ServingStatus> {
        let mut health = HealthClient::new(channel(self.port));
        let request = HealthCheckRequest {
            service: service.into(),
        };
        match tokio::time::timeout(Duration::from_secs(2), health.check(request)).await {
            Ok(Ok(r)) => Some(r.into_inner().status()),
            _ => None,
        }
    }

    fn bearer(&self) -> Bearer {
        Bearer(self.token.clone())
    }

    pub fn users(&self) -> Users {
        pb::user_service_client::UserServiceClient::with_interceptor(
            channel(self.port),
            self.bearer(),
        )
    }

    pub fn catalog(&self) -> Catalog {
        pb::catalog_service_client::CatalogServiceClient::with_interceptor(
            channel(self.port),
            self.bearer(),
        )
    }

    pub fn orders(&self) -> Orders {
        pb::order_service_client::OrderServiceClient::with_interceptor(
            channel(self.port),
            self.bearer(),
        )
    }

    pub fn admin(&self) -> Admin {
        pb::admin_service_client::AdminServiceClient::with_interceptor(
            channel(self.port),
            self.bearer(),
        )
    }

    /// Stops the in-process application gracefully.
    pub async fn stop(mut self) {
        if let Runner::InProcess { stop, server } = &mut self.runner {
            stop.cancel();
            if let Some(server) = server.take() {
                let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        match &mut self.runner {
            Runner::InProcess { stop, server } => {
                stop.cancel();
                if let Some(server) = server.take() {
                    server.abort();
                }
            }
            Runner::Binary { child, log, .. } => {
                if let Some(child) = child {
                    let _ = child.start_kill();
                }
                if std::env::var_os("KEEP_FAULT_SERVERS").is_none() {
                    let _ = std::fs::remove_file(log);
                }
            }
        }
    }
}

/// A user and `products` products with `stock` each, created through the
/// API: (user id, product ids).
pub async fn arrange_catalog(service: &Service, products: usize, stock: i32) -> (i64, Vec<i64>) {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let user = service
        .users()
        .create_user(pb::CreateUserRequest {
            email: format!("f-{}@example.com", &tag[..12]),
            username: format!("f_{}", &tag[..12]),
            display_name: "fault suite".into(),
            ..Default::default()
        })
        .await
        .expect("create user")
        .into_inner();
    let mut ids = Vec::new();
    let mut catalog = service.catalog();
    for i in 0..products {
        let sku = format!("F-{}-{i}", &tag[..10]);
        let product = catalog
            .create_product(pb::CreateProductRequest {
                sku: sku.clone(),
                title: format!("Fault product {sku}"),
                category: "tools".into(),
                price_cents: 1000 + i as i64,
                inventory: stock,
                ..Default::default()
            })
            .await
            .expect("create product")
            .into_inner();
        ids.push(product.id);
    }
    (user.id, ids)
}

/// An order of one unit of `product_id`, without a request id.
pub fn one_unit(user_id: i64, product_id: i64) -> pb::CreateOrderRequest {
    pb::CreateOrderRequest {
        user_id,
        items: vec![pb::OrderLine {
            product_id,
            quantity: 1,
        }],
        request_id: String::new(),
    }
}

/// The mixed load of the outage scenarios: even calls read the user, odd
/// ones order one unit of `product`.
pub async fn read_or_order(
    mut users: super::Users,
    mut orders: super::Orders,
    user: i64,
    product: i64,
    n: u64,
) -> Result<(), tonic::Status> {
    if n.is_multiple_of(2) {
        users
            .get_user(pb::GetUserRequest {
                id: user,
                ..Default::default()
            })
            .await
            .map(|_| ())
    } else {
        orders
            .create_order(one_unit(user, product))
            .await
            .map(|_| ())
    }
}
