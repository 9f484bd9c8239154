//! gRPC services. Each handler reads the caller's tenant from metadata, converts the request
//! into validated domain types, calls storage or the engine, and converts back. No SQL here.

mod campaign;
mod convert;
mod documents;
mod email_log;
mod presets;
mod profile_mask;
pub mod read_cache;
mod send;
mod smtp_config;
mod template;
mod tenant_settings;
mod test_email;

use std::sync::Arc;

pub use campaign::CampaignApi;
pub use email_log::EmailLogApi;
pub use send::SendApi;
pub use smtp_config::SmtpConfigApi;
pub use template::TemplateApi;

use crate::{crypto::SecretBox, delivery::Engine, domain::Mailbox, storage::Store};

pub use crate::auth::{caller, Caller, SOURCE_HEADER, TENANT_HEADER};

/// What every service shares.
#[derive(Debug, Clone)]
pub struct ApiContext {
    /// Storage.
    pub store: Arc<dyn Store>,
    /// The delivery engine (woken after accepts; publishes status changes).
    pub engine: Arc<Engine>,
    /// Secret encryption.
    pub secrets: SecretBox,
    /// The system default service's sender.
    pub system_sender: Mailbox,
    /// Turns true when the server shuts down: live streams end so shutdown is not held up.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Whether profiles may turn certificate verification off (operator setting).
    pub allow_insecure_tls: bool,
    /// Request limits (recipients per email, batch size).
    pub limits: crate::auth::LimitsConfig,
    /// Routing's reads, cached for a moment (emptied by every configuration write).
    pub reads: std::sync::Arc<read_cache::ReadCache>,
}

/// Narrows a log filter to what the caller may read: a member sees only the emails it sent.
/// Returns false when the filter asks for another source, which a member cannot see.
pub(crate) fn restrict_to_caller(caller: &Caller, filter: &mut crate::domain::LogFilter) -> bool {
    if !caller.own_emails_only() {
        return true;
    }
    match &filter.source {
        Some(source) if *source != caller.source => false,
        _ => {
            filter.source = Some(caller.source.clone());
            true
        }
    }
}

/// Refuses, as NOT_FOUND exactly like a missing id, an email the caller may not see.
pub(crate) async fn ensure_visible(
    ctx: &ApiContext,
    caller: &Caller,
    id: &str,
) -> Result<(), crate::error::ApiError> {
    if caller.own_emails_only() {
        let message = ctx.store.get_message(&caller.tenant_id, id).await?;
        if message.source != caller.source {
            return Err(crate::error::ApiError::NotFound("email"));
        }
    }
    Ok(())
}

/// Clamps a requested page size to 1..=1000, defaulting to 100.
pub(crate) fn page_size(requested: i32) -> u32 {
    match requested {
        n if n <= 0 => 100,
        n => u32::try_from(n.min(1000)).unwrap_or(100),
    }
}
