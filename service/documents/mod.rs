//! MongoDB documents (the standard driver API only): the client and its
//! indexes, and one file per collection with typed filters and updates.
//!
//! Like `store/`, this layer imports only the model, the error type and
//! configuration: it returns documents, `Option` and booleans, and the domain
//! decides what they mean.

pub mod market_analyses;
pub mod mongo;
pub mod price_history;
pub mod profiles;

pub use mongo::Mongo;
