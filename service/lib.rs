//! datagate: a gRPC data-access service fronting PostgreSQL, Redis and MongoDB.
//!
//! # Layout
//!
//! A request flows one way, down these layers; each may import the layers
//! below it and never one above (`tests/layers.rs` checks it in `make lint`):
//!
//! | layer | owns | may import | must not import |
//! |---|---|---|---|
//! | `middleware` | the tower stack: request id, span, metrics, caller, deadline, admission | everything below `api` | — |
//! | `api` | one file per gRPC service: proto ⇄ model, nothing else | `domain`, `model`, `error`, `auth` | `store`, `documents`, `cache`, `loaders` |
//! | `domain` | parsing, rules and outcomes, orchestration, the write path | `loaders`, `cache`, `store`, `documents`, `model`, `error` | `api`, `middleware` |
//! | `loaders` | batching by id, request-scoped | `cache`, `store`, `model`, `error` | `domain`, `api` |
//! | `cache` | Redis cache-aside | `model`, `error`, `config` | `domain`, `api`, `store`, `documents`, `loaders` |
//! | `store` | PostgreSQL: SQL only, returns rows, `Option`, counts | `model`, `error`, `config` | `domain`, `api`, `cache`, `documents`, `loaders` |
//! | `documents` | MongoDB: typed filters only | `model`, `error`, `config` | `domain`, `api`, `cache`, `store`, `loaders` |
//! | `model`, `error` | value and entity types; the one error enum and its reasons | each other | everything else |
//!
//! Beside the layers: `startup` assembles the application (the one place
//! that builds every layer), `config` and `telemetry` are read by all,
//! `statements` counts each request's statements (N+1 detection), `pem`
//! reads the certificate files of the TLS settings, `outbox`
//! and `search_log` are background writers, and `cli`, `seed` and `generate`
//! serve the command line. `main` only parses the command line.
//!
//! Public here is what the binaries, the tests and the benchmarks use; the
//! fuzz targets (`fuzz/`) also reach the request parsers through
//! `fuzzing`, which exists only in their builds.

// The service's call futures nest deeply (middleware, loaders, the cache's
// pooled connections); the default limit (128) is too small to prove them
// `Send`.
#![recursion_limit = "256"]

mod api;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod config;
pub mod documents;
pub mod domain;
pub mod error;
pub mod generate;
pub mod loaders;
pub mod metrics;
mod middleware;
pub mod model;
mod outbox;
mod pem;
pub mod proto;
mod retry;
pub mod search_log;
mod seed;
pub mod startup;
pub mod statements;
pub mod store;
mod telemetry;

/// The JSON log format's span fields, for the tests' log capture.
pub use telemetry::AppendJsonFields;

/// The parsers the fuzz targets (`fuzz/`) run on arbitrary input: each gRPC
/// service's request parsers (`parse_<rpc>`, the very functions its handlers
/// call) and the `grpc-timeout` parser. Only in fuzz builds (cargo-fuzz
/// passes `--cfg fuzzing`), so the service's public surface stays as it is.
#[cfg(fuzzing)]
pub mod fuzzing {
    pub use crate::api::{admin, analytics, catalog, orders, users};
    pub use crate::middleware::parse_grpc_timeout;
}
