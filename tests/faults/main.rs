//! The fault suite (`make test-faults`): each scenario starts its own
//! PostgreSQL (fsync on), Redis and, where it needs one, MongoDB
//! (nx-27017), so killing them harms nothing else, drives the service from
//! a bounded load client, and asserts its promise as counts and codes. Figures (latencies, rates, attempts) are
//! printed as `FIGURE <scenario> <name> = <value>` lines for RELIABILITY.md
//! (run with `--nocapture` to see them).
//!
//! Scenarios run one at a time (each holds `support::serial`): each loads a
//! 2-core machine on purpose. `make test-faults` runs them with
//! `--test-threads=1 --nocapture`; `make test` runs them inside `cargo test`.

// The service's futures nest deeper than the default limit (128) lets
// the compiler prove `Send` (the service's own crate raises it too).
#![recursion_limit = "256"]

mod support;

mod cancel;
mod ledger;
mod locked_row;
mod mongo_outage;
mod overload;
mod postgres_restart;
mod redis_faults;
mod replica_lag;
mod sigterm;
