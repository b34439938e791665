//! Domain rules per bounded context: parsed value types, operations, and the
//! transactions around them.

pub mod analytics;
pub mod audit;
pub mod catalog;
pub mod error;
pub mod market_analyses;
pub mod orders;
pub mod paging;
pub mod partitions;
pub mod passwords;
pub mod price_history;
pub mod profiles;
pub mod search;
pub mod teams;
pub mod users;
