//! Delivery: the engine that drains the outbox, the SMTP client, the file drop, and the
//! policy that turns SMTP outcomes into retries, failures and fallbacks.

mod compose;
mod engine;
mod filedrop;
pub mod guard;
mod limits;
pub mod policy;
mod relay;
pub mod smtp;
pub mod tls;
mod transport;
pub mod verify;

pub use compose::{compose, ComposeError, MAILGATE_ID_HEADER};
pub use engine::{now_micros, secret_context, Engine, EngineSettings, MessageEvent, Reservation};
pub use filedrop::FileDrop;
pub use relay::Relay;
pub use transport::{SystemService, Transports};
