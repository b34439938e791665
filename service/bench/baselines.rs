//! The baselines measured in the same run, so that results read as ratios
//! that survive a noisy machine: a bare tonic service (the ceiling of any
//! tonic service here), `pgbench -S` (PostgreSQL's own select-only limit) and
//! `redis-benchmark -t get` (Redis's own limit).

use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;

/// A baseline measured at one concurrency.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    pub name: String,
    pub concurrency: usize,
    pub rps: f64,
    pub p50_ms: Option<f64>,
}

/// A tonic server with only the health service, on an ephemeral port, and a
/// client of it.
pub async fn bare_tonic_service() -> anyhow::Result<HealthClient<Channel>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (reporter, service) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        let _reporter = reporter;
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(datagate::startup::connections::incoming(
                listener,
                datagate::startup::connections::Limits::default(),
            ))
            .await;
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(HealthClient::new(channel))
}

/// `pgbench -S` (PostgreSQL's select-only limit) at `concurrency` clients.
pub fn pgbench(url: &str, concurrency: usize, duration: Duration) -> anyhow::Result<Baseline> {
    let init = std::process::Command::new("pgbench")
        .args(["-i", "-s", "5", "-q", url])
        .output()
        .context("running pgbench (install postgresql-contrib)")?;
    anyhow::ensure!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let secs = duration.as_secs().max(1).to_string();
    let clients = concurrency.to_string();
    let threads = concurrency.min(2).to_string();
    let out = std::process::Command::new("pgbench")
        .args(["-S", "-n", "-c", &clients, "-j", &threads, "-T", &secs, url])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pgbench -S: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .context("no tps in pgbench's output")?;
    Ok(Baseline {
        name: "pgbench_select_only".into(),
        concurrency,
        rps: tps,
        p50_ms: None,
    })
}

/// `redis-benchmark -t get` (Redis's own limit) at `concurrency` clients.
pub fn redis_benchmark(host_port: &str, concurrency: usize) -> anyhow::Result<Baseline> {
    let (host, port) = host_port.rsplit_once(':').context("--redis is host:port")?;
    let clients = concurrency.to_string();
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-h", host, "-p", port, "-t", "get", "-n", "50000", "-c", &clients, "-q",
        ])
        .output()
        .context("running redis-benchmark (install redis-tools)")?;
    anyhow::ensure!(out.status.success(), "redis-benchmark failed");
    // The last line reads "GET: 81300.81 requests per second, p50=0.311 msec".
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .flat_map(|l| l.split('\r'))
        .rfind(|l| l.contains("requests per second"))
        .context("no GET result in redis-benchmark's output")?;
    let after = |marker: &str| {
        line.split_once(marker)
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.trim_end_matches(',').parse::<f64>().ok())
    };
    Ok(Baseline {
        name: "redis_benchmark_get".into(),
        concurrency,
        rps: after("GET:").context("no requests per second")?,
        p50_ms: after("p50="),
    })
}
