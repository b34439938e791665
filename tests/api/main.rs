//! Integration tests: the application through its gRPC front door, against
//! a real PostgreSQL (one database per test, so tests run in parallel).

mod helpers;
mod process;
mod server;
mod teams;
mod users;
