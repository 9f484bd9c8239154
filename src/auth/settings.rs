//! Settings of access control, request limits and the listener's TLS.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A caller's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A backend service: acts for the tenant named in `x-tenant-id` (or its bound tenant)
    /// with a tenant admin's rights.
    Service,
    /// A tenant's owner or admin: manages profiles, templates, campaigns and settings, and
    /// reads the tenant's whole log.
    Admin,
    /// A tenant member: sends, and reads and manages only the emails it sent.
    Member,
    /// A reseller or the operator: an admin of any tenant who may also share profiles across
    /// tenants.
    Operator,
}

impl Role {
    /// The role's name in configuration and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Admin => "admin",
            Self::Member => "member",
            Self::Operator => "operator",
        }
    }
}

/// How callers authenticate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// API keys when any are configured; otherwise an unauthenticated development mode,
    /// allowed only on a loopback listener.
    #[default]
    Auto,
    /// API keys are required: mailgate refuses to start without one.
    Keys,
}

/// One API key, as the operator configures it. Only the token's hash is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The key's name: recorded as the email log's `source`.
    pub name: String,
    /// What the key may do.
    pub role: Role,
    /// The tenant the key is bound to. Required for admin and member keys; a service or
    /// operator key without one acts for the tenant named in `x-tenant-id`.
    #[serde(default)]
    pub tenant: String,
    /// `sha256:` and the SHA-256 of the token in hex (`mailgate keys new` prints it).
    pub hash: String,
}

/// The keys file: `[[keys]]` entries.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    /// The entries.
    #[serde(default)]
    pub keys: Vec<ApiKeyConfig>,
}

/// Access control.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `auto` or `keys`.
    pub mode: AuthMode,
    /// A TOML file of `[[keys]]` entries (e.g. a mounted Kubernetes Secret).
    pub keys_file: Option<PathBuf>,
    /// Keys given inline.
    pub keys: Vec<ApiKeyConfig>,
    /// gRPC services callable without credentials.
    pub public_services: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Auto,
            keys_file: None,
            keys: Vec::new(),
            public_services: vec![
                "grpc.health.v1.Health".into(),
                "grpc.reflection.v1.ServerReflection".into(),
                "grpc.reflection.v1alpha.ServerReflection".into(),
            ],
        }
    }
}

/// Limits on requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request message in bytes (attachments included).
    pub max_request_bytes: usize,
    /// Most recipients (to, cc and bcc together) of one email.
    pub max_recipients: usize,
    /// Most recipients of one SendBatch call.
    pub max_batch: usize,
    /// Most bytes of content (subjects, bodies, headers, attachments) the emails of one
    /// SendBatch call may hold together: each email holds its own copy of the message's.
    pub max_batch_bytes: usize,
    /// SendEmail and SendBatch calls per second per tenant, in each process; 0: unlimited.
    pub send_calls_per_second: u32,
    /// Calls a tenant may make at once above that rate; 0: one second's worth.
    pub send_burst: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 16 * 1024 * 1024,
            max_recipients: 100,
            max_batch: 1000,
            max_batch_bytes: 64 * 1024 * 1024,
            send_calls_per_second: 0,
            send_burst: 0,
        }
    }
}

/// TLS on the gRPC listener, from PEM files.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// The server's certificate chain. Set with `key_file` to turn TLS on.
    pub cert_file: Option<PathBuf>,
    /// The server's private key.
    pub key_file: Option<PathBuf>,
    /// CA certificates of clients: when set, every client must present a certificate it
    /// signed (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}
