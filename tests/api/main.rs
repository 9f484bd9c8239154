//! mailgate's integration suite: one binary, one module per area. Every test spawns the real
//! app on port 0 with its own database (a temporary SQLite file, or a fresh PostgreSQL database
//! when `MAILGATE_TEST_DATABASE=postgres`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    unreachable_pub,
    missing_debug_implementations
)]

mod access;
mod external;
mod helpers;
mod limits;
mod pipelining;
mod profiles;
mod replicas;
mod send;
mod smtp_server;
mod store_contract;
mod telemetry;
mod templates;
