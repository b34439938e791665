//! The fault suite (`make test-faults`, issue 14 point 8): each scenario
//! starts its own PostgreSQL (fsync on) and Redis, so killing them harms
//! nothing else, drives the service from a bounded load client, and asserts
//! its promise as counts and codes. Figures (latencies, rates, attempts) are
//! printed as `FIGURE <scenario> <name> = <value>` lines for RELIABILITY.md
//! (run with `--nocapture` to see them).
//!
//! Scenarios run one at a time (`--test-threads=1`): each loads a 2-core
//! machine on purpose.

mod support;

mod cancel;
mod ledger;
mod locked_row;
mod overload;
mod postgres_restart;
mod redis_faults;
mod sigterm;
