//! gRPC services. Each handler reads the caller's tenant from metadata, converts the request
//! into validated domain types, calls storage or the engine, and converts back. No SQL here.

mod campaign;
mod convert;
mod documents;
mod email_log;
mod presets;
mod profile_mask;
mod send;
mod smtp_config;
mod template;
mod tenant_settings;
mod test_email;

use std::sync::Arc;

use tonic::{metadata::MetadataMap, Status};

pub use campaign::CampaignApi;
pub use email_log::EmailLogApi;
pub use send::SendApi;
pub use smtp_config::SmtpConfigApi;
pub use template::TemplateApi;

use crate::{crypto::SecretBox, delivery::Engine, domain::Mailbox, storage::Store};

/// Metadata key naming the tenant a call acts for.
pub const TENANT_HEADER: &str = "x-tenant-id";
/// Metadata key naming the calling service (recorded as the log's `source`).
pub const SOURCE_HEADER: &str = "x-source";

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
}

/// Who is calling: the tenant and the calling service.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The tenant.
    pub tenant_id: String,
    /// The calling service's name.
    pub source: String,
}

/// Reads the caller from request metadata. The tenant never comes from the request body.
pub fn caller(metadata: &MetadataMap) -> Result<Caller, Status> {
    let tenant = metadata
        .get(TENANT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or_default();
    if tenant.is_empty() {
        return Err(Status::unauthenticated(format!(
            "missing tenant: set the {TENANT_HEADER} request metadata"
        )));
    }
    if tenant.len() > 128
        || !tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(Status::invalid_argument(format!(
            "{TENANT_HEADER} must be 1 to 128 characters of letters, digits, '-', '_' or '.'"
        )));
    }
    let source = metadata
        .get(SOURCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().chars().take(128).collect::<String>())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    Ok(Caller {
        tenant_id: tenant.to_owned(),
        source,
    })
}

/// Clamps a requested page size to 1..=1000, defaulting to 100.
pub(crate) fn page_size(requested: i32) -> u32 {
    match requested {
        n if n <= 0 => 100,
        n => u32::try_from(n.min(1000)).unwrap_or(100),
    }
}
