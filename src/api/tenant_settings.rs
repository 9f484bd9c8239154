//! Tenant settings: proto conversion and field-mask updates.

use crate::{
    domain::{FallbackPolicy, Mailbox, TenantSettings},
    error::ApiError,
    proto::v1 as pb,
};

use super::convert::timestamp;

pub(crate) fn to_proto(s: &TenantSettings) -> pb::TenantSettings {
    pb::TenantSettings {
        gateway_url: s.gateway_url.clone(),
        default_profile_id: s.default_profile_id.clone().unwrap_or_default(),
        fallback_policy: match s.fallback_policy {
            FallbackPolicy::Inherit => pb::FallbackPolicy::Unspecified,
            FallbackPolicy::Never => pb::FallbackPolicy::Never,
            FallbackPolicy::OnServerFailure => pb::FallbackPolicy::OnServerFailure,
        }
        .into(),
        default_from: s.default_from.as_ref().map(|m| pb::Mailbox {
            email: m.email.to_string(),
            name: m.name.clone(),
        }),
        update_time: s.updated_at.map(timestamp),
    }
}

/// Applies the mask's paths of `input` over `current`.
pub(crate) fn apply(
    current: &TenantSettings,
    input: pb::TenantSettings,
    paths: &[String],
) -> Result<TenantSettings, ApiError> {
    if paths.is_empty() {
        return Err(ApiError::invalid(
            "update_mask",
            "is required: name the fields to change, e.g. \"gateway_url\"",
        ));
    }
    let mut next = current.clone();
    for path in paths {
        match path.as_str() {
            "gateway_url" => next.gateway_url = input.gateway_url.trim().to_owned(),
            "default_profile_id" => {
                next.default_profile_id =
                    (!input.default_profile_id.is_empty()).then(|| input.default_profile_id.clone())
            }
            "fallback_policy" => {
                next.fallback_policy = match pb::FallbackPolicy::try_from(input.fallback_policy) {
                    Ok(pb::FallbackPolicy::Unspecified) => FallbackPolicy::Inherit,
                    Ok(pb::FallbackPolicy::Never) => FallbackPolicy::Never,
                    Ok(pb::FallbackPolicy::OnServerFailure) => FallbackPolicy::OnServerFailure,
                    Err(_) => {
                        return Err(ApiError::invalid(
                            "settings.fallback_policy",
                            "unknown fallback policy",
                        ))
                    }
                }
            }
            "default_from" => {
                next.default_from = match &input.default_from {
                    Some(m) if !m.email.is_empty() => {
                        Some(Mailbox::parse("settings.default_from", &m.email, &m.name)?)
                    }
                    _ => None,
                }
            }
            other => {
                return Err(ApiError::invalid(
                    "update_mask",
                    format!("{other:?} is not a tenant setting that can be updated"),
                ))
            }
        }
    }
    next.validate()?;
    Ok(next)
}
