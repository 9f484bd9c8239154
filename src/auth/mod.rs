//! Access control: who is calling (API keys sent as `authorization: Bearer ...`), for which
//! tenant, and whether the role may call the method. Checked for every RPC in one tower layer
//! ([`AuthLayer`]) before any handler runs; handlers get the resolved [`Caller`].
//!
//! Keys are stored by the operator only as SHA-256 hashes; a presented token is hashed and
//! looked up. Tokens are 256 random bits, so a fast hash is enough (no password stretching).

mod layer;
mod rate;
pub mod settings;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use base64::Engine as _;
use http::HeaderMap;
use ring::digest;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub use layer::AuthLayer;
pub use settings::{ApiKeyConfig, AuthConfig, AuthMode, KeysFile, LimitsConfig, Role};

use rate::TenantRate;

/// Metadata key naming the tenant a call acts for.
pub const TENANT_HEADER: &str = "x-tenant-id";
/// Metadata key naming the calling service in development mode (with keys, the key's name
/// is the source).
pub const SOURCE_HEADER: &str = "x-source";

/// Who is calling, resolved once per RPC: the tenant it acts for, its name (the log's
/// `source`) and its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The tenant.
    pub tenant_id: String,
    /// The key's name (or, in development mode, `x-source`).
    pub source: String,
    /// The role.
    pub role: Role,
}

impl Caller {
    /// Whether the caller sees only the emails it sent itself (members).
    pub fn own_emails_only(&self) -> bool {
        self.role == Role::Member
    }

    /// Whether the caller may share profiles with other tenants (operators).
    pub fn may_share_profiles(&self) -> bool {
        self.role == Role::Operator
    }
}

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Sending and managing one's own emails, reading templates, campaigns and presets:
    /// every role.
    Use,
    /// Managing the tenant (profiles, templates, campaigns, settings, requeues, statistics):
    /// service, admin and operator.
    Manage,
}

/// The access every method of the public API needs. A method missing here is refused, so a
/// new RPC cannot be reachable by accident.
pub fn method_access(path: &str) -> Option<Access> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    let access = match (service, method) {
        ("mailgate.v1.SendService", "SendEmail" | "SendBatch" | "CancelEmail" | "RetryEmail") => {
            Access::Use
        }
        ("mailgate.v1.SendService", "RequeueEmails") => Access::Manage,
        ("mailgate.v1.EmailLogService", "ListEmailLogs" | "GetEmailLog" | "WatchEmailLogs") => {
            Access::Use
        }
        ("mailgate.v1.EmailLogService", "GetEmailStats") => Access::Manage,
        ("mailgate.v1.TemplateService", "GetEmailTemplate" | "ListEmailTemplates")
        | ("mailgate.v1.TemplateService", "RenderTemplate")
        | ("mailgate.v1.CampaignService", "GetCampaign" | "ListCampaigns")
        | ("mailgate.v1.SmtpConfigService", "ListProviderPresets") => Access::Use,
        (
            "mailgate.v1.TemplateService",
            "CreateEmailTemplate" | "UpdateEmailTemplate" | "DeleteEmailTemplate",
        )
        | ("mailgate.v1.CampaignService", "CreateCampaign" | "UpdateCampaign" | "DeleteCampaign")
        | (
            "mailgate.v1.SmtpConfigService",
            "CreateSmtpProfile"
            | "GetSmtpProfile"
            | "ListSmtpProfiles"
            | "UpdateSmtpProfile"
            | "DeleteSmtpProfile"
            | "ActivateSmtpProfile"
            | "DeactivateSmtpProfile"
            | "VerifySmtpProfile"
            | "SendTestEmail"
            | "GetTenantSettings"
            | "UpdateTenantSettings",
        ) => Access::Manage,
        _ => return None,
    };
    Some(access)
}

/// A configured key, resolved.
#[derive(Debug)]
struct Key {
    name: String,
    role: Role,
    tenant: Option<String>,
}

/// Decides who may call what. Built once from the configuration.
#[derive(Debug)]
pub struct Authenticator {
    /// Keys by the SHA-256 of their token. Empty in development mode.
    keys: HashMap<[u8; 32], Key>,
    dev_mode: bool,
    public_services: Vec<String>,
    send_rate: Option<TenantRate>,
}

/// A new token and the configuration entry that admits it.
#[derive(Debug)]
pub struct NewKey {
    /// The token: shown once, never stored.
    pub token: String,
    /// The entry for the keys file.
    pub entry: ApiKeyConfig,
}

/// Makes a new random token (`mgk_` and 256 random bits) and its entry.
pub fn new_key(name: &str, role: Role, tenant: &str) -> NewKey {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let token = format!(
        "mgk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    NewKey {
        entry: ApiKeyConfig {
            name: name.to_owned(),
            role,
            tenant: tenant.to_owned(),
            hash: hash_token(&token),
        },
        token,
    }
}

/// `sha256:` and the hex SHA-256 of a token: what the configuration stores.
pub fn hash_token(token: &str) -> String {
    format!("sha256:{}", crate::crypto::sha256_hex(token.as_bytes()))
}

fn parse_hash(hash: &str) -> Option<[u8; 32]> {
    let hex = hash.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

fn valid_tenant(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant.len() <= 128
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Authenticator {
    /// Builds the authenticator, refusing configurations that would leave a reachable
    /// listener open: no keys is allowed only in `auto` mode on a loopback address.
    pub fn new(
        auth: &AuthConfig,
        limits: &LimitsConfig,
        listen: SocketAddr,
    ) -> Result<Self, String> {
        let mut entries = auth.keys.clone();
        if let Some(file) = &auth.keys_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("auth.keys_file {}: {e}", file.display()))?;
            let parsed: KeysFile = toml_from_str(&text)
                .map_err(|e| format!("auth.keys_file {}: {e}", file.display()))?;
            entries.extend(parsed.keys);
        }
        let mut keys = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let at = format!("key {i} ({:?})", entry.name);
            if entry.name.trim().is_empty() || entry.name.len() > 128 {
                return Err(format!("{at}: name must be 1 to 128 characters"));
            }
            let hash = parse_hash(&entry.hash).ok_or_else(|| {
                format!(
                    "{at}: hash must be \"sha256:\" and 64 hex digits (see `mailgate keys new`)"
                )
            })?;
            let tenant = match (entry.role, entry.tenant.trim()) {
                (Role::Admin | Role::Member, "") => {
                    return Err(format!(
                        "{at}: a {} key must name its tenant",
                        entry.role.as_str()
                    ))
                }
                (_, "") => None,
                (_, t) if valid_tenant(t) => Some(t.to_owned()),
                (_, _) => {
                    return Err(format!(
                    "{at}: tenant must be 1 to 128 characters of letters, digits, '-', '_' or '.'"
                ))
                }
            };
            let key = Key {
                name: entry.name.trim().to_owned(),
                role: entry.role,
                tenant,
            };
            if keys.insert(hash, key).is_some() {
                return Err(format!("{at}: the same token hash appears twice"));
            }
        }
        let dev_mode = keys.is_empty();
        if dev_mode {
            if auth.mode == AuthMode::Keys {
                return Err(
                    "auth.mode is \"keys\" but no API key is configured (auth.keys or \
                     auth.keys_file; make one with `mailgate keys new`)"
                        .into(),
                );
            }
            if !listen.ip().is_loopback() {
                return Err(format!(
                    "no API keys are configured and listen_addr {listen} is not a loopback \
                     address: configure auth.keys or auth.keys_file (`mailgate keys new` makes \
                     one), or listen on 127.0.0.1 for development"
                ));
            }
        }
        let send_rate = (limits.send_calls_per_second > 0)
            .then(|| TenantRate::new(limits.send_calls_per_second, limits.send_burst));
        Ok(Self {
            keys,
            dev_mode,
            public_services: auth.public_services.clone(),
            send_rate,
        })
    }

    /// Whether callers are not authenticated (development on loopback).
    pub fn dev_mode(&self) -> bool {
        self.dev_mode
    }

    /// How many keys are configured.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    fn is_public(&self, path: &str) -> bool {
        let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
        self.public_services.iter().any(|s| s == service)
    }

    /// Resolves the caller of `path` from the request metadata (the HTTP/2 headers), or the
    /// status refusing it.
    pub fn authorize(&self, path: &str, metadata: &HeaderMap) -> Result<Caller, Status> {
        let (name, role, bound) = if self.dev_mode {
            let source = metadata
                .get(SOURCE_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.trim().chars().take(128).collect::<String>())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "unknown".to_owned());
            (source, Role::Operator, None)
        } else {
            let key = self.key(metadata)?;
            (key.name.clone(), key.role, key.tenant.clone())
        };
        let named = metadata
            .get(TENANT_HEADER)
            .map(|v| v.to_str().map(str::trim).unwrap_or("\u{0}"))
            .filter(|t| !t.is_empty());
        if let Some(t) = named {
            if !valid_tenant(t) {
                return Err(bad_tenant(
                    "must be 1 to 128 characters of letters, digits, '-', '_' or '.'",
                ));
            }
        }
        let tenant = match (bound, named) {
            (Some(bound), Some(named)) if bound != named => {
                return Err(Status::permission_denied(format!(
                    "key {name:?} may act only for its own tenant, not for {TENANT_HEADER} {named:?}"
                )))
            }
            (Some(bound), _) => bound,
            (None, Some(named)) => named.to_owned(),
            (None, None) => {
                return Err(bad_tenant(
                    "required: name the tenant this call acts for in request metadata",
                ))
            }
        };
        let Some(access) = method_access(path) else {
            return Err(Status::permission_denied(format!(
                "{path} is not part of the API"
            )));
        };
        if access == Access::Manage && role == Role::Member {
            return Err(Status::permission_denied(format!(
                "key {name:?} has the member role; {} needs an admin, service or operator key",
                path.trim_start_matches('/')
            )));
        }
        if let Some(rate) = &self.send_rate {
            if path.starts_with("/mailgate.v1.SendService/Send") {
                if let Err(wait) = rate.take(&tenant) {
                    return Err(rate_exhausted(&tenant, wait));
                }
            }
        }
        Ok(Caller {
            tenant_id: tenant,
            source: name,
            role,
        })
    }

    fn key(&self, metadata: &HeaderMap) -> Result<&Key, Status> {
        let Some(value) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(
                "missing credentials: send the metadata `authorization: Bearer <API key>`",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <API key>`"))?;
        let d = digest::digest(&digest::SHA256, token.as_bytes());
        let mut hash = [0u8; 32];
        hash.copy_from_slice(d.as_ref());
        self.keys
            .get(&hash)
            .ok_or_else(|| Status::unauthenticated("invalid API key"))
    }
}

fn bad_tenant(description: &str) -> Status {
    let mut details = ErrorDetails::new();
    details.add_bad_request_violation(TENANT_HEADER, description);
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{TENANT_HEADER} metadata: {description}"),
        details,
    )
}

fn rate_exhausted(tenant: &str, wait: Duration) -> Status {
    let mut details = ErrorDetails::new();
    details.set_retry_info(Some(wait));
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "tenant {tenant:?} is sending faster than its rate limit; retry in {} ms",
            wait.as_millis().max(1)
        ),
        details,
    )
}

fn toml_from_str(text: &str) -> Result<KeysFile, String> {
    use figment::{
        providers::{Format, Toml},
        Figment,
    };
    Figment::from(Toml::string(text))
        .extract()
        .map_err(|e| e.to_string())
}

/// The caller the auth layer resolved for this request.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

/// The authenticator, shared by the layer.
pub type SharedAuthenticator = Arc<Authenticator>;

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(keys: Vec<ApiKeyConfig>) -> Authenticator {
        let config = AuthConfig {
            keys,
            ..AuthConfig::default()
        };
        Authenticator::new(
            &config,
            &LimitsConfig::default(),
            "0.0.0.0:1".parse().unwrap(),
        )
        .unwrap()
    }

    fn metadata(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn a_key_is_found_by_its_hash_and_never_by_the_hash_itself() {
        let k = new_key("billing", Role::Service, "");
        let a = auth(vec![k.entry.clone()]);
        let bearer = format!("Bearer {}", k.token);
        let ok = a
            .authorize(
                "/mailgate.v1.SendService/SendEmail",
                &metadata(&[("authorization", &bearer), (TENANT_HEADER, "acme")]),
            )
            .unwrap();
        assert_eq!(ok.source, "billing");
        assert_eq!(ok.tenant_id, "acme");
        let with_hash = format!("Bearer {}", k.entry.hash);
        let err = a
            .authorize(
                "/mailgate.v1.SendService/SendEmail",
                &metadata(&[("authorization", &with_hash), (TENANT_HEADER, "acme")]),
            )
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(!err.message().contains(&k.token));
    }

    #[test]
    fn no_keys_is_refused_off_loopback_and_in_keys_mode() {
        let none = AuthConfig::default();
        let limits = LimitsConfig::default();
        let err = Authenticator::new(&none, &limits, "0.0.0.0:50051".parse().unwrap()).unwrap_err();
        assert!(err.contains("not a loopback"), "{err}");
        assert!(
            Authenticator::new(&none, &limits, "127.0.0.1:0".parse().unwrap())
                .unwrap()
                .dev_mode()
        );
        assert!(
            Authenticator::new(&none, &limits, "[::1]:0".parse().unwrap())
                .unwrap()
                .dev_mode()
        );
        let keys_mode = AuthConfig {
            mode: AuthMode::Keys,
            ..AuthConfig::default()
        };
        assert!(Authenticator::new(&keys_mode, &limits, "127.0.0.1:0".parse().unwrap()).is_err());
    }

    #[test]
    fn bad_entries_name_the_key_and_the_problem() {
        let limits = LimitsConfig::default();
        let listen = "127.0.0.1:0".parse().unwrap();
        let mut member = new_key("m", Role::Member, "").entry;
        let err = Authenticator::new(
            &AuthConfig {
                keys: vec![member.clone()],
                ..AuthConfig::default()
            },
            &limits,
            listen,
        )
        .unwrap_err();
        assert!(err.contains("\"m\"") && err.contains("tenant"), "{err}");
        member.tenant = "acme".into();
        member.hash = "sha256:abc".into();
        let err = Authenticator::new(
            &AuthConfig {
                keys: vec![member],
                ..AuthConfig::default()
            },
            &limits,
            listen,
        )
        .unwrap_err();
        assert!(err.contains("hash"), "{err}");
    }

    #[test]
    fn every_rpc_of_the_contract_has_an_access_rule() {
        use prost::Message as _;
        let set =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut count = 0;
        for file in set.file {
            let package = file.package().to_owned();
            for service in file.service {
                for method in &service.method {
                    let path = format!("/{package}.{}/{}", service.name(), method.name());
                    assert!(method_access(&path).is_some(), "no access rule for {path}");
                    count += 1;
                }
            }
        }
        assert_eq!(count, 32);
    }
}
