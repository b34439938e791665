//! Domain rules per bounded context: parsing requests into model values,
//! the rules and outcomes ("not found", "insufficient", a state conflict),
//! and orchestration of the loaders, the cache, the store and the documents.
//!
//! Every write goes through [`write::WriteTx`]; idempotent creates through
//! [`idempotency`].

pub mod analytics;
pub mod catalog;
pub mod diagnostics;
pub mod idempotency;
pub mod market_analyses;
pub mod orders;
pub mod partitions;
pub mod passwords;
pub mod price_history;
pub mod profiles;
pub mod search;
pub mod teams;
pub mod users;
pub mod write;
