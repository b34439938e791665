//! The fault suite's own harness: private servers it may kill, the service
//! in-process or as the real binary, and a bounded load client.
//!
//! Nothing here touches the shared development servers: every scenario
//! starts its own PostgreSQL (fsync on), Redis and, where it needs one,
//! MongoDB (nx-27017) on free loopback ports and removes them when it ends.

pub mod load;
pub mod mongo;
pub mod postgres;
pub mod redis;
pub mod service;

use std::{sync::Arc, time::Duration};

use datagate::proto::v1 as pb;
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

pub use self::{
    load::{Load, Pacing},
    mongo::Mongo,
    postgres::Postgres,
    redis::Redis,
    service::{Deps, Service},
};

pub type Users = pb::user_service_client::UserServiceClient<InterceptedService<Channel, Bearer>>;
pub type Catalog =
    pb::catalog_service_client::CatalogServiceClient<InterceptedService<Channel, Bearer>>;
pub type Admin = pb::admin_service_client::AdminServiceClient<InterceptedService<Channel, Bearer>>;
pub type Orders = pb::order_service_client::OrderServiceClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(pub Arc<str>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let value = MetadataValue::try_from(format!("Bearer {}", self.0))
            .map_err(|_| Status::internal("token is not valid metadata"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

/// Held for the whole of a scenario: scenarios load the machine on purpose,
/// so they run one at a time however the test binary is run (`cargo test`
/// with its default threads included).
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// A free TCP port on loopback (bound and released: another process could
/// take it in between, which on a test machine does not happen in practice).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Something listens on `port`.
pub async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {limit:?} waiting until {what}");
}

/// A lazy channel to `port`: it connects on first use and reconnects after
/// the server went away, as a long-lived caller's would.
pub fn channel(port: u16) -> Channel {
    Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

/// Prints one measured figure in a form that is easy to collect:
/// `FIGURE <scenario> <name> = <value>`.
pub fn figure(scenario: &str, name: &str, value: impl std::fmt::Display) {
    eprintln!("FIGURE {scenario} {name} = {value}");
}

/// A test-sized setting from the environment (the suite's knobs, such as the
/// ledger's duration), or `default`.
pub fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) of process `pid` (`self` for this one) so far,
/// from `/proc/<pid>/stat` (zero where it cannot be read).
pub fn cpu_time_of(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}
