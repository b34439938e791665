//! datagate: a gRPC data-access service fronting PostgreSQL, Redis and MongoDB.
//!
//! A request flows one way: `middleware` (request id, caller, deadline) →
//! `api` (proto ⇄ domain) → `domain` (rules, transactions) → `store` (SQL).
//! `startup` assembles it all; `main` only parses the command line.

pub mod api;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod config;
pub mod domain;
pub mod generate;
pub mod loaders;
pub mod metrics;
pub mod middleware;
pub mod outbox;
pub mod proto;
pub mod search_log;
pub mod seed;
pub mod startup;
pub mod statements;
pub mod store;
pub mod telemetry;
