//! Integration tests: the application through its gRPC front door, against
//! a real PostgreSQL (one database per test, so tests run in parallel).

mod analytics;
mod audit;
mod batching;
mod breaker;
mod cache;
mod catalog;
mod deadlines;
mod detection;
mod documents;
mod helpers;
mod idempotency;
mod invalidation;
mod market;
mod observe;
mod orders;
mod partitions;
mod process;
mod promises;
mod replica;
mod search;
mod seed;
mod server;
mod teams;
mod users;
