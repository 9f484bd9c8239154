//! UpdateSmtpProfile's field mask: which paths exist, and applying them.

use crate::{
    domain::{FieldError, ProfileSettings, SmtpProfile},
    proto::v1 as pb,
};

use super::convert::settings_from_proto;

/// Paths that change how mailgate connects or authenticates: changing one resets verification.
const CONNECTION_PATHS: &[&str] = &[
    "host",
    "port",
    "security",
    "verify_certificate",
    "trusted_ca_pem",
    "auth_mechanism",
    "username",
    "password",
    "helo_name",
    "provider",
];

/// Paths that may be updated.
const UPDATABLE: &[&str] = &[
    "name",
    "description",
    "provider",
    "host",
    "port",
    "security",
    "verify_certificate",
    "trusted_ca_pem",
    "auth_mechanism",
    "username",
    "password",
    "helo_name",
    "from_name",
    "from_email",
    "reply_to",
    "error_to",
    "cc",
    "bcc",
    "headers",
    "has_relay",
    "allowed_sender_domains",
    "shared_with",
    "limits",
    "max_connections",
    "fallback_policy",
];

/// What an update changes.
#[derive(Debug)]
pub(crate) struct MaskedUpdate {
    /// The new name.
    pub name: String,
    /// The new settings.
    pub settings: ProfileSettings,
    /// A new plain-text password (Some("") clears it), if the mask names it.
    pub password: Option<String>,
    /// Whether connection settings or credentials changed.
    pub connection_changed: bool,
}

/// Applies `paths` of `input` over `current`. Unknown and output-only paths are errors.
pub(crate) fn apply(
    current: &SmtpProfile,
    input: &pb::SmtpProfile,
    paths: &[String],
) -> Result<MaskedUpdate, Vec<FieldError>> {
    if paths.is_empty() {
        return Err(vec![FieldError::new(
            "update_mask",
            "is required: name the fields to change, e.g. \"host,port\"",
        )]);
    }
    let mut errors = Vec::new();
    for path in paths {
        if !UPDATABLE.contains(&path.as_str()) {
            errors.push(FieldError::new(
                "update_mask",
                format!("{path:?} is not a field that can be updated"),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let has = |p: &str| paths.iter().any(|x| x == p);
    // Parse the input as a whole to reuse enum conversion and provider defaults.
    let (incoming, unreadable) = settings_from_proto(input, "profile");
    errors.extend(
        unreadable
            .into_iter()
            .filter(|e| paths.iter().any(|p| e.field == format!("profile.{p}"))),
    );
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut s = current.settings.clone();
    macro_rules! take {
        ($($field:ident),*) => {
            $(if has(stringify!($field)) { s.$field = incoming.$field.clone(); })*
        };
    }
    take!(
        description,
        provider,
        host,
        port,
        security,
        verify_certificate,
        trusted_ca_pem,
        auth_mechanism,
        username,
        helo_name,
        from_name,
        from_email,
        reply_to,
        error_to,
        cc,
        bcc,
        headers,
        has_relay,
        allowed_sender_domains,
        shared_with,
        limits,
        max_connections,
        fallback_policy
    );
    Ok(MaskedUpdate {
        name: if has("name") {
            input.name.trim().to_owned()
        } else {
            current.name.clone()
        },
        settings: s,
        password: has("password").then(|| input.password.clone()),
        connection_changed: CONNECTION_PATHS.iter().any(|p| has(p)),
    })
}
