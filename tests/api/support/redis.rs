//! Redis for the tests: the shared servers `make test` starts (`REDIS_URL`,
//! `REDIS_CLUSTER_URLS`, and the TLS-only ones with an ACL user:
//! `REDIS_TLS_*`), and servers and clusters of a test's own, to freeze and
//! kill.

use std::{process::Stdio, time::Duration};

use tokio::process::{Child, Command};

pub fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .expect("set REDIS_URL to a Redis the tests may use (`make test` does)")
}

pub fn redis_cluster_urls() -> String {
    std::env::var("REDIS_CLUSTER_URLS").expect(
        "set REDIS_CLUSTER_URLS to comma-separated seed URLs of a Redis Cluster the tests may use (`make test` starts one)",
    )
}

/// The TLS-only Redis servers `scripts/dev-env.sh up` starts: a single
/// node and a cluster (which also asks for a client certificate), their
/// private CA, and the ACL user to log in as.
pub struct RedisTls {
    pub url: String,
    pub cluster_urls: String,
    pub ca_file: String,
    pub client_cert: String,
    pub client_key: String,
    pub username: String,
    pub password: String,
}

pub fn redis_tls() -> RedisTls {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "set {name} (and the other REDIS_TLS_* variables) to the TLS Redis the tests may use: `eval \"$(scripts/dev-env.sh up)\"` starts it"
            )
        })
    };
    RedisTls {
        url: var("REDIS_TLS_URL"),
        cluster_urls: var("REDIS_TLS_CLUSTER_URLS"),
        ca_file: var("REDIS_TLS_CA_FILE"),
        client_cert: var("REDIS_TLS_CLIENT_CERT"),
        client_key: var("REDIS_TLS_CLIENT_KEY"),
        username: var("REDIS_TLS_USERNAME"),
        password: var("REDIS_TLS_PASSWORD"),
    }
}

impl RedisTls {
    fn certificates(&self) -> deadpool_redis::redis::TlsCertificates {
        let read = |path: &str| std::fs::read(path).expect("a dev-env TLS file");
        deadpool_redis::redis::TlsCertificates {
            client_tls: Some(deadpool_redis::redis::ClientTlsConfig {
                client_cert: read(&self.client_cert),
                client_key: read(&self.client_key),
            }),
            root_cert: Some(read(&self.ca_file)),
        }
    }

    /// A value from the single TLS node (None if absent), as the ACL user.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        use deadpool_redis::redis::AsyncCommands as _;
        self.connection().await.get(key).await.expect("GET")
    }

    /// A connection to the single TLS node, as the ACL user (who may do
    /// anything, `ACL SETUSER` included).
    pub async fn connection(&self) -> deadpool_redis::redis::aio::MultiplexedConnection {
        use deadpool_redis::redis::IntoConnectionInfo as _;
        let info = self.url.as_str().into_connection_info().unwrap();
        let login = info
            .redis_settings()
            .clone()
            .set_username(&self.username)
            .set_password(&self.password);
        let client = deadpool_redis::redis::Client::build_with_tls(
            info.set_redis_settings(login),
            self.certificates(),
        )
        .expect("a TLS client");
        client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the TLS Redis")
    }

    /// A value from the TLS cluster (None if absent), as the ACL user.
    pub async fn cluster_get(&self, key: &str) -> Option<Vec<u8>> {
        use deadpool_redis::redis::AsyncCommands as _;
        let mut conn =
            deadpool_redis::cluster::ClusterClientBuilder::new(self.cluster_urls.split(','))
                .username(&self.username)
                .password(&self.password)
                .certs(self.certificates())
                .build()
                .expect("a TLS cluster client")
                .get_async_connection()
                .await
                .expect("connect to the TLS Redis Cluster");
        conn.get(key).await.expect("GET")
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

/// A Redis of this test's own, to stop and kill.
pub struct OwnRedis {
    pub child: Child,
}

impl OwnRedis {
    pub async fn start(port: u16) -> Self {
        Self::start_with(port, &[]).await
    }

    pub async fn start_with(port: u16, extra: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is installed (scripts/dev-env.sh installs it)");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Self { child };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not start on port {port}");
    }

    pub async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .await
                .unwrap()
                .success()
        );
    }
}

/// A Redis Cluster of this test's own (three primaries), to freeze.
pub struct OwnCluster {
    pub nodes: Vec<OwnRedis>,
    pub urls: String,
    dir: std::path::PathBuf,
}

impl OwnCluster {
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("dgtest-cluster-{}", uuid::Uuid::new_v4()));
        // A node's cluster bus listens 10000 above its port.
        let base = 20_000 + (uuid::Uuid::new_v4().as_u128() % 10_000) as u16;
        let ports: Vec<u16> = (base..)
            .filter(|p| {
                [*p, p + 10_000]
                    .iter()
                    .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
            })
            .take(3)
            .collect();
        let mut nodes = Vec::new();
        for port in &ports {
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let node_dir = node_dir.to_str().unwrap();
            nodes.push(
                OwnRedis::start_with(
                    *port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &format!("{node_dir}/nodes.conf"),
                        "--dir",
                        node_dir,
                    ],
                )
                .await,
            );
        }
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .await
            .unwrap();
        assert!(created.success(), "redis-cli --cluster create");
        for port in &ports {
            let mut ok = false;
            for _ in 0..100 {
                let info = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .await
                    .unwrap();
                ok = String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok");
                if ok {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(ok, "cluster node {port} is ok");
        }
        let urls = addresses
            .iter()
            .map(|a| format!("redis://{a}"))
            .collect::<Vec<_>>()
            .join(",");
        Self { nodes, urls, dir }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
