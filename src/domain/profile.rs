//! SMTP profiles: a tenant's SMTP server settings and sender identity.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{
    check_max_len, check_no_control, validate_headers, EmailAddress, FieldError, Header, Violations,
};

/// How the connection to the SMTP server is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// Plain text (no credentials are ever sent).
    None,
    /// STARTTLS, required.
    StartTls,
    /// TLS from the first byte.
    ImplicitTls,
}

/// The SMTP AUTH mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMechanism {
    /// No authentication.
    None,
    /// The best mechanism both sides offer.
    Auto,
    /// AUTH PLAIN.
    Plain,
    /// AUTH LOGIN.
    Login,
    /// AUTH XOAUTH2.
    Xoauth2,
}

/// Whether the system default service may deliver when the profile's server fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackPolicy {
    /// Inherit the tenant's policy.
    #[default]
    Inherit,
    /// Never fall back.
    Never,
    /// Fall back on connection, TLS and authentication failures.
    OnServerFailure,
}

/// Whether a profile is used for sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProfileStatus {
    /// Used for sending.
    Active,
    /// Not used.
    Inactive,
}

impl ProfileStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Inactive => "INACTIVE",
        }
    }
    /// Parses the stored name.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "ACTIVE" => Some(Self::Active),
            "INACTIVE" => Some(Self::Inactive),
            _ => None,
        }
    }
}

/// The state of the latest verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerificationState {
    /// Not verified since the connection settings last changed.
    #[default]
    Unverified,
    /// The latest verification succeeded.
    Verified,
    /// The latest verification failed.
    Failed,
}

/// The latest verification of a profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// The state.
    pub state: VerificationState,
    /// When it ran, unix microseconds.
    pub verified_at: Option<i64>,
    /// Why it failed.
    pub last_error: String,
}

/// Sending limits; zero means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendingLimits {
    /// Messages per second.
    pub per_second: u32,
    /// Messages per day.
    pub per_day: u32,
}

/// Everything of a profile except identity, status and secrets. Stored as one JSON document
/// so new settings need no schema change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProfileSettings {
    /// Free text.
    pub description: String,
    /// Provider preset name, e.g. `custom`, `gmail`.
    pub provider: String,
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Connection security.
    pub security: Security,
    /// Verify the certificate and host name.
    pub verify_certificate: bool,
    /// Extra trusted CA certificates (PEM).
    pub trusted_ca_pem: String,
    /// AUTH mechanism.
    pub auth_mechanism: AuthMechanism,
    /// AUTH username.
    pub username: String,
    /// EHLO name; empty: the operator's.
    pub helo_name: String,
    /// Default sender display name.
    pub from_name: String,
    /// Default sender address.
    pub from_email: String,
    /// Default Reply-To.
    pub reply_to: String,
    /// Bounce address (envelope sender).
    pub error_to: String,
    /// Cc added to every email.
    pub cc: Vec<String>,
    /// Bcc added to every email.
    pub bcc: Vec<String>,
    /// Headers added to every email.
    pub headers: Vec<Header>,
    /// Relays for any sender domain.
    pub has_relay: bool,
    /// Sender domains allowed without relay.
    pub allowed_sender_domains: Vec<String>,
    /// Tenants that may use the profile.
    pub shared_with: Vec<String>,
    /// Limits.
    pub limits: SendingLimits,
    /// Most connections at once; zero: the operator's default.
    pub max_connections: u32,
    /// Fallback policy.
    pub fallback_policy: FallbackPolicy,
}

impl Default for ProfileSettings {
    fn default() -> Self {
        Self {
            description: String::new(),
            provider: "custom".to_owned(),
            host: String::new(),
            port: 587,
            security: Security::StartTls,
            verify_certificate: true,
            trusted_ca_pem: String::new(),
            auth_mechanism: AuthMechanism::None,
            username: String::new(),
            helo_name: String::new(),
            from_name: String::new(),
            from_email: String::new(),
            reply_to: String::new(),
            error_to: String::new(),
            cc: Vec::new(),
            bcc: Vec::new(),
            headers: Vec::new(),
            has_relay: false,
            allowed_sender_domains: Vec::new(),
            shared_with: Vec::new(),
            limits: SendingLimits::default(),
            max_connections: 0,
            fallback_policy: FallbackPolicy::Inherit,
        }
    }
}

impl ProfileSettings {
    /// Checks every field; `prefix` is the path of the profile message (e.g. `profile`).
    /// `has_secret` says whether a password or token is (or will be) stored.
    pub fn validate(&self, prefix: &str, has_secret: bool) -> Result<(), Vec<FieldError>> {
        let f = |name: &str| format!("{prefix}.{name}");
        let mut v = Violations::default();
        v.check(validate_host(&f("host"), &self.host));
        if self.port == 0 {
            v.add(f("port"), "must be between 1 and 65535");
        }
        v.check(check_max_len(&f("username"), &self.username, 255));
        v.check(check_no_control(&f("username"), &self.username));
        v.check(check_max_len(&f("from_name"), &self.from_name, 255));
        v.check(check_no_control(&f("from_name"), &self.from_name));
        v.check(check_max_len(&f("description"), &self.description, 2000));
        v.check(check_max_len(&f("helo_name"), &self.helo_name, 255));
        if !self.helo_name.is_empty() {
            v.check(validate_host(&f("helo_name"), &self.helo_name));
        }
        v.check(EmailAddress::parse(&f("from_email"), &self.from_email));
        for (name, value) in [("reply_to", &self.reply_to), ("error_to", &self.error_to)] {
            if !value.is_empty() {
                v.check(EmailAddress::parse(&f(name), value));
            }
        }
        for (name, list) in [("cc", &self.cc), ("bcc", &self.bcc)] {
            for (i, addr) in list.iter().enumerate() {
                v.check(EmailAddress::parse(&format!("{}[{i}]", f(name)), addr));
            }
        }
        if let Err(errors) = validate_headers(
            &f("headers"),
            self.headers
                .iter()
                .map(|h| (h.name.as_str(), h.value.as_str())),
        ) {
            for e in errors {
                v.add(e.field, e.description);
            }
        }
        for (i, domain) in self.allowed_sender_domains.iter().enumerate() {
            v.check(validate_host(
                &format!("{}[{i}]", f("allowed_sender_domains")),
                domain,
            ));
        }
        for (i, tenant) in self.shared_with.iter().enumerate() {
            let valid = !tenant.is_empty()
                && tenant.len() <= 128
                && tenant
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !valid {
                v.add(
                    format!("{}[{i}]", f("shared_with")),
                    "must be a tenant id: 1 to 128 letters, digits, '-', '_' or '.'",
                );
            }
        }
        let needs_credentials = !matches!(self.auth_mechanism, AuthMechanism::None);
        if needs_credentials && self.username.is_empty() {
            v.add(f("username"), "is required when an AUTH mechanism is set");
        }
        if needs_credentials && !has_secret {
            v.add(f("password"), "is required when an AUTH mechanism is set");
        }
        if needs_credentials && self.security == Security::None {
            v.add(
                f("security"),
                "credentials are never sent over an unencrypted connection: use STARTTLS or IMPLICIT_TLS",
            );
        }
        v.finish()
    }

    /// Domains the From address may use when the profile does not relay: the configured list,
    /// or else the domains of from_email and of the username.
    pub fn sender_domains(&self) -> Vec<String> {
        if !self.allowed_sender_domains.is_empty() {
            return self
                .allowed_sender_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect();
        }
        [&self.from_email, &self.username]
            .into_iter()
            .filter_map(|a| a.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()))
            .collect()
    }
}

/// Checks a host: a DNS name or an IP address, without scheme, port or path.
pub(crate) fn validate_host(field: &str, host: &str) -> Result<(), FieldError> {
    if host.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if host.contains("://") {
        return Err(FieldError::new(
            field,
            "must be a host name or IP address without a scheme (remove \"smtp://\")",
        ));
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let valid = host.len() <= 253
        && host.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{host:?} is not a valid host name or IP address (no port, path or spaces)"),
        ))
    }
}

/// A stored SMTP profile.
#[derive(Debug, Clone)]
pub struct SmtpProfile {
    /// The id.
    pub id: String,
    /// The owning tenant.
    pub tenant_id: String,
    /// Unique name within the tenant.
    pub name: String,
    /// The settings.
    pub settings: ProfileSettings,
    /// The encrypted password or token, if any (never the plain text).
    pub secret_ciphertext: Option<String>,
    /// ACTIVE or INACTIVE.
    pub status: ProfileStatus,
    /// The latest verification.
    pub verification: Verification,
    /// Who created it.
    pub created_by: String,
    /// Creation time, unix microseconds.
    pub created_at: i64,
    /// Last change, unix microseconds.
    pub updated_at: i64,
    /// Increases with each change.
    pub version: i64,
}

impl SmtpProfile {
    /// Whether `tenant_id` may send through this profile: its owner, or a tenant it is shared
    /// with. Only the owner may read or change it.
    pub fn usable_by(&self, tenant_id: &str) -> bool {
        self.tenant_id == tenant_id || self.settings.shared_with.iter().any(|t| t == tenant_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> ProfileSettings {
        ProfileSettings {
            host: "smtp.example.com".into(),
            from_email: "noreply@example.com".into(),
            ..ProfileSettings::default()
        }
    }

    #[test]
    fn validation_names_every_bad_field() {
        assert!(valid().validate("profile", false).is_ok());
        let bad = ProfileSettings {
            host: "smtp://smtp.example.com".into(),
            port: 0,
            from_email: "nope".into(),
            from_name: "x".repeat(256),
            username: "u".repeat(256),
            auth_mechanism: AuthMechanism::Login,
            ..valid()
        };
        let errors = bad.validate("profile", true).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        for expected in [
            "profile.host",
            "profile.port",
            "profile.from_email",
            "profile.from_name",
            "profile.username",
        ] {
            assert!(
                fields.contains(&expected),
                "{expected} missing in {fields:?}"
            );
        }
    }

    #[test]
    fn credentials_need_encryption() {
        let p = ProfileSettings {
            security: Security::None,
            auth_mechanism: AuthMechanism::Plain,
            username: "u@example.com".into(),
            ..valid()
        };
        let errors = p.validate("profile", true).unwrap_err();
        assert_eq!(errors[0].field, "profile.security");
    }

    #[test]
    fn sender_domains_default_to_from_and_username() {
        let p = ProfileSettings {
            username: "bot@mail.example.org".into(),
            ..valid()
        };
        assert_eq!(p.sender_domains(), vec!["example.com", "mail.example.org"]);
    }
}

/// Settings of a tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TenantSettings {
    /// Public base URL links in emails point to (available to templates as `gateway_url`).
    pub gateway_url: String,
    /// Profile used when nothing else names one.
    pub default_profile_id: Option<String>,
    /// Fallback policy for profiles that inherit (Inherit here means Never).
    pub fallback_policy: FallbackPolicy,
    /// Sender used when the system default service sends for this tenant.
    pub default_from: Option<super::Mailbox>,
    /// Last change, unix microseconds.
    pub updated_at: Option<i64>,
}

impl TenantSettings {
    /// Checks the settings; field names are under `settings`.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut v = Violations::default();
        if !self.gateway_url.is_empty() {
            match url::Url::parse(&self.gateway_url) {
                Ok(u) if (u.scheme() == "https" || u.scheme() == "http") && u.host().is_some() => {}
                _ => v.add(
                    "settings.gateway_url",
                    "must be an absolute http or https URL, e.g. https://gateway.example.com",
                ),
            }
        }
        v.finish()
    }
}
