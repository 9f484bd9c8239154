//! mailgate: a multi-tenant gRPC email notification service.
//!
//! How a request flows through the crate:
//!
//! - [`api`]: one module per gRPC service. Reads the tenant from request metadata, turns proto
//!   messages into validated [`domain`] types, calls [`storage`] and answers. No SQL, no SMTP.
//! - [`domain`]: parsed, validated types (addresses, profiles, messages). Depends on nothing else
//!   in the crate.
//! - [`storage`]: the [`storage::Store`] trait and its SQL implementation over SQLite and
//!   PostgreSQL. The `messages` table is both the email log and the outbox (the queue).
//! - [`delivery`]: the engine that claims due messages with a lease, composes them, hands them
//!   to an SMTP server (or the file drop) outside any transaction, classifies the reply and
//!   completes or reschedules them.
//! - [`app`]: wires everything: binds the listener, starts the engine, serves gRPC, shuts down.

pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod crypto;
pub mod delivery;
pub mod domain;
pub mod error;
pub mod housekeeping;
mod json;
pub mod metrics;
pub mod proto;
pub mod routing;
pub mod storage;
pub mod telemetry;
pub mod templating;
