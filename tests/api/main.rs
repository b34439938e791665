//! Integration tests: the application through its gRPC front door, against
//! a real PostgreSQL (one database per test, so tests run in parallel).
//! Every test is an `#[api_test]` (a time limit and teardown around
//! `#[tokio::test]`); the modules share only `support`.

// The service's futures nest deeper than the default limit (128) lets
// the compiler prove `Send` (the service's own crate raises it too).
#![recursion_limit = "256"]

mod admission;
mod analytics;
mod audit;
mod authz;
mod batching;
mod breaker;
mod cache;
mod catalog;
mod connections;
mod deadlines;
mod detection;
mod diagnostics;
mod documents;
mod idempotency;
mod invalidation;
mod jwt;
mod limits;
mod market;
mod near;
mod orders;
mod partitions;
mod process;
mod promises;
mod quotas;
mod readiness;
mod redis_tls;
mod references;
mod replica;
mod retries;
mod round_trips;
mod search;
mod seed;
mod server;
mod support;
mod teams;
mod tls;
mod users;
