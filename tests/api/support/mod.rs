//! The harness every test module uses; test modules import from here and
//! never from each other.
//!
//! - `frame`: what `#[api_test]` wraps each test in: a time limit, and the
//!   teardown of the apps and databases it started (after the body, inside
//!   its runtime);
//! - `app`: `TestApp`, the real application in-process on ephemeral ports,
//!   with its typed shortcuts;
//! - `database`, `template`: a PostgreSQL database per test, copied from a
//!   migrated template database;
//! - `mongo`, `redis`: MongoDB databases per test, the Redis URLs, and
//!   Redis servers and clusters of a test's own;
//! - `clients`: the gRPC clients and the bearer-token interceptor;
//! - `assertions`, `health`, `locks`, `requests`: the checks, waits and
//!   request builders several modules share;
//! - `observe`: what the app did, seen from outside: a metric series on
//!   `/metrics`, a call's log lines by request id, Redis keys, and waiting
//!   for an event instead of sleeping;
//! - `proxy`: a controllable TCP proxy in front of the test Redis;
//! - `telemetry`: the process's tracing subscriber.

pub mod app;
pub mod assertions;
pub mod clients;
pub mod database;
pub mod frame;
pub mod health;
pub mod locks;
pub mod mongo;
pub mod observe;
pub mod proxy;
pub mod redis;
pub mod requests;
mod telemetry;
mod template;

pub use app::TestApp;
pub use assertions::{assert_error, violated_fields};
pub use clients::{AnalyticsClient, Bearer, CatalogClient};
pub use database::TestDatabase;
pub use datagate_test_macros::api_test;
pub use health::{health_of, wait_for_health};
pub use locks::{RowLock, app_backend_waiting_for_lock, wait_for_lock_waiter};
pub use mongo::{TestMongo, use_test_mongo};
pub use proxy::RedisProxy;
pub use requests::{mask, rename, unique};
