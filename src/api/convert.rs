//! Conversions between proto messages and domain types.

use crate::{
    domain::{
        AttemptOutcome, AttemptRecord, AuthMechanism, FallbackPolicy, FieldError, Header, Mailbox,
        MessageStatus, ProfileReason, ProfileSettings, ProfileStatus, Security, SendingLimits,
        SmtpProfile, StoredMessage, VerificationState,
    },
    proto::v1 as pb,
};

/// Unix microseconds to a proto timestamp.
pub(crate) fn timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

/// A proto timestamp to unix microseconds.
pub(crate) fn micros(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(ts.nanos) / 1000)
}

/// Microseconds to a proto duration.
pub(crate) fn duration(micros: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

pub(crate) fn security_from_proto(value: i32, field: &str) -> Result<Option<Security>, FieldError> {
    match pb::SmtpSecurity::try_from(value) {
        Ok(pb::SmtpSecurity::Unspecified) => Ok(None),
        Ok(pb::SmtpSecurity::None) => Ok(Some(Security::None)),
        Ok(pb::SmtpSecurity::Starttls) => Ok(Some(Security::StartTls)),
        Ok(pb::SmtpSecurity::ImplicitTls) => Ok(Some(Security::ImplicitTls)),
        Err(_) => Err(FieldError::new(field, format!("unknown security {value}"))),
    }
}

fn security_to_proto(value: Security) -> pb::SmtpSecurity {
    match value {
        Security::None => pb::SmtpSecurity::None,
        Security::StartTls => pb::SmtpSecurity::Starttls,
        Security::ImplicitTls => pb::SmtpSecurity::ImplicitTls,
    }
}

pub(crate) fn auth_from_proto(
    value: i32,
    field: &str,
) -> Result<Option<AuthMechanism>, FieldError> {
    match pb::AuthMechanism::try_from(value) {
        Ok(pb::AuthMechanism::Unspecified) => Ok(None),
        Ok(pb::AuthMechanism::None) => Ok(Some(AuthMechanism::None)),
        Ok(pb::AuthMechanism::Auto) => Ok(Some(AuthMechanism::Auto)),
        Ok(pb::AuthMechanism::Plain) => Ok(Some(AuthMechanism::Plain)),
        Ok(pb::AuthMechanism::Login) => Ok(Some(AuthMechanism::Login)),
        Ok(pb::AuthMechanism::Xoauth2) => Ok(Some(AuthMechanism::Xoauth2)),
        Err(_) => Err(FieldError::new(
            field,
            format!("unknown auth mechanism {value}"),
        )),
    }
}

fn auth_to_proto(value: AuthMechanism) -> pb::AuthMechanism {
    match value {
        AuthMechanism::None => pb::AuthMechanism::None,
        AuthMechanism::Auto => pb::AuthMechanism::Auto,
        AuthMechanism::Plain => pb::AuthMechanism::Plain,
        AuthMechanism::Login => pb::AuthMechanism::Login,
        AuthMechanism::Xoauth2 => pb::AuthMechanism::Xoauth2,
    }
}

fn fallback_from_proto(value: i32, field: &str) -> Result<FallbackPolicy, FieldError> {
    match pb::FallbackPolicy::try_from(value) {
        Ok(pb::FallbackPolicy::Unspecified) => Ok(FallbackPolicy::Inherit),
        Ok(pb::FallbackPolicy::Never) => Ok(FallbackPolicy::Never),
        Ok(pb::FallbackPolicy::OnServerFailure) => Ok(FallbackPolicy::OnServerFailure),
        Err(_) => Err(FieldError::new(
            field,
            format!("unknown fallback policy {value}"),
        )),
    }
}

fn fallback_to_proto(value: FallbackPolicy) -> pb::FallbackPolicy {
    match value {
        FallbackPolicy::Inherit => pb::FallbackPolicy::Unspecified,
        FallbackPolicy::Never => pb::FallbackPolicy::Never,
        FallbackPolicy::OnServerFailure => pb::FallbackPolicy::OnServerFailure,
    }
}

/// The provider's name as stored, and its default (port, security).
fn provider(value: i32, field: &str) -> Result<(&'static str, u16, Security), FieldError> {
    use pb::Provider as P;
    let p = P::try_from(value)
        .map_err(|_| FieldError::new(field, format!("unknown provider {value}")))?;
    Ok(match p {
        P::Unspecified | P::Custom => ("custom", 587, Security::StartTls),
        P::Gmail => ("gmail", 465, Security::ImplicitTls),
        P::GoogleWorkspace => ("google_workspace", 465, Security::ImplicitTls),
        P::Microsoft365 => ("microsoft_365", 587, Security::StartTls),
        P::OutlookCom => ("outlook_com", 587, Security::StartTls),
        P::Yahoo => ("yahoo", 465, Security::ImplicitTls),
        P::AmazonSes => ("amazon_ses", 587, Security::StartTls),
        P::Sendgrid => ("sendgrid", 587, Security::StartTls),
        P::Mailgun => ("mailgun", 587, Security::StartTls),
        P::Postmark => ("postmark", 587, Security::StartTls),
    })
}

fn provider_host(name: &str) -> &'static str {
    match name {
        "gmail" | "google_workspace" => "smtp.gmail.com",
        "microsoft_365" => "smtp.office365.com",
        "outlook_com" => "smtp-mail.outlook.com",
        "yahoo" => "smtp.mail.yahoo.com",
        "sendgrid" => "smtp.sendgrid.net",
        "mailgun" => "smtp.mailgun.org",
        "postmark" => "smtp.postmarkapp.com",
        _ => "",
    }
}

fn provider_to_proto(name: &str) -> pb::Provider {
    use pb::Provider as P;
    match name {
        "gmail" => P::Gmail,
        "google_workspace" => P::GoogleWorkspace,
        "microsoft_365" => P::Microsoft365,
        "outlook_com" => P::OutlookCom,
        "yahoo" => P::Yahoo,
        "amazon_ses" => P::AmazonSes,
        "sendgrid" => P::Sendgrid,
        "mailgun" => P::Mailgun,
        "postmark" => P::Postmark,
        _ => P::Custom,
    }
}

/// Settings from a proto profile: the provider preset fills host, port and security; explicit
/// fields win. Returns the settings and the fields that could not be read (unknown enum
/// values); the rest is checked by [`ProfileSettings::validate`].
pub(crate) fn settings_from_proto(
    p: &pb::SmtpProfile,
    prefix: &str,
) -> (ProfileSettings, Vec<FieldError>) {
    let f = |name: &str| format!("{prefix}.{name}");
    let mut errors = Vec::new();
    let (provider_name, default_port, default_security) = provider(p.provider, &f("provider"))
        .unwrap_or_else(|e| {
            errors.push(e);
            ("custom", 587, Security::StartTls)
        });
    let security = security_from_proto(p.security, &f("security"))
        .map_err(|e| errors.push(e))
        .ok()
        .flatten()
        .unwrap_or(default_security);
    let auth = auth_from_proto(p.auth_mechanism, &f("auth_mechanism"))
        .map_err(|e| errors.push(e))
        .ok()
        .flatten()
        .unwrap_or(if p.username.is_empty() {
            AuthMechanism::None
        } else {
            AuthMechanism::Auto
        });
    let fallback_policy = fallback_from_proto(p.fallback_policy, &f("fallback_policy"))
        .map_err(|e| errors.push(e))
        .unwrap_or_default();
    let port = match p.port {
        0 => default_port,
        // Out of range: 0, which validation reports.
        n => u16::try_from(n).unwrap_or(0),
    };
    let host = if p.host.trim().is_empty() {
        provider_host(provider_name).to_owned()
    } else {
        p.host.trim().to_owned()
    };
    let limits = p.limits.as_ref().map(|l| SendingLimits {
        per_second: l.messages_per_second,
        per_day: l.messages_per_day,
    });
    let settings = ProfileSettings {
        description: p.description.clone(),
        provider: provider_name.to_owned(),
        host,
        port,
        security,
        verify_certificate: p.verify_certificate.unwrap_or(true),
        trusted_ca_pem: p.trusted_ca_pem.clone(),
        auth_mechanism: auth,
        username: p.username.trim().to_owned(),
        helo_name: p.helo_name.trim().to_owned(),
        from_name: p.from_name.trim().to_owned(),
        from_email: p.from_email.trim().to_owned(),
        reply_to: p.reply_to.trim().to_owned(),
        error_to: p.error_to.trim().to_owned(),
        cc: p.cc.iter().map(|s| s.trim().to_owned()).collect(),
        bcc: p.bcc.iter().map(|s| s.trim().to_owned()).collect(),
        headers: p
            .headers
            .iter()
            .map(|h| Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect(),
        has_relay: p.has_relay,
        allowed_sender_domains: p
            .allowed_sender_domains
            .iter()
            .map(|d| d.trim().to_ascii_lowercase())
            .collect(),
        shared_with: p.shared_with.clone(),
        limits: limits.unwrap_or_default(),
        max_connections: p.max_connections,
        fallback_policy,
    };
    (settings, errors)
}

/// A profile as callers see it: never the secret.
pub(crate) fn profile_to_proto(p: &SmtpProfile) -> pb::SmtpProfile {
    let s = &p.settings;
    pb::SmtpProfile {
        id: p.id.clone(),
        name: p.name.clone(),
        description: s.description.clone(),
        provider: provider_to_proto(&s.provider).into(),
        host: s.host.clone(),
        port: u32::from(s.port),
        security: security_to_proto(s.security).into(),
        verify_certificate: Some(s.verify_certificate),
        trusted_ca_pem: s.trusted_ca_pem.clone(),
        auth_mechanism: auth_to_proto(s.auth_mechanism).into(),
        username: s.username.clone(),
        password: String::new(),
        has_password: p.secret_ciphertext.is_some(),
        helo_name: s.helo_name.clone(),
        from_name: s.from_name.clone(),
        from_email: s.from_email.clone(),
        reply_to: s.reply_to.clone(),
        error_to: s.error_to.clone(),
        cc: s.cc.clone(),
        bcc: s.bcc.clone(),
        headers: s
            .headers
            .iter()
            .map(|h| pb::Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect(),
        has_relay: s.has_relay,
        allowed_sender_domains: s.allowed_sender_domains.clone(),
        shared_with: s.shared_with.clone(),
        status: match p.status {
            ProfileStatus::Active => pb::ProfileStatus::Active,
            ProfileStatus::Inactive => pb::ProfileStatus::Inactive,
        }
        .into(),
        verification: Some(pb::Verification {
            state: match p.verification.state {
                VerificationState::Unverified => pb::VerificationState::Unverified,
                VerificationState::Verified => pb::VerificationState::Verified,
                VerificationState::Failed => pb::VerificationState::Failed,
            }
            .into(),
            verify_time: p.verification.verified_at.map(timestamp),
            last_error: p.verification.last_error.clone(),
        }),
        limits: Some(pb::SendingLimits {
            messages_per_second: s.limits.per_second,
            messages_per_day: s.limits.per_day,
        }),
        max_connections: s.max_connections,
        fallback_policy: fallback_to_proto(s.fallback_policy).into(),
        created_by: p.created_by.clone(),
        create_time: Some(timestamp(p.created_at)),
        update_time: Some(timestamp(p.updated_at)),
        version: p.version,
    }
}

pub(crate) fn status_to_proto(s: MessageStatus) -> pb::EmailStatus {
    match s {
        MessageStatus::Scheduled => pb::EmailStatus::Scheduled,
        MessageStatus::Queued => pb::EmailStatus::Queued,
        MessageStatus::Sending => pb::EmailStatus::Sending,
        MessageStatus::Sent => pb::EmailStatus::Sent,
        MessageStatus::Deferred => pb::EmailStatus::Deferred,
        MessageStatus::Failed => pb::EmailStatus::Failed,
        MessageStatus::Cancelled => pb::EmailStatus::Cancelled,
    }
}

pub(crate) fn status_from_proto(value: i32, field: &str) -> Result<MessageStatus, FieldError> {
    match pb::EmailStatus::try_from(value) {
        Ok(pb::EmailStatus::Scheduled) => Ok(MessageStatus::Scheduled),
        Ok(pb::EmailStatus::Queued) => Ok(MessageStatus::Queued),
        Ok(pb::EmailStatus::Sending) => Ok(MessageStatus::Sending),
        Ok(pb::EmailStatus::Sent) => Ok(MessageStatus::Sent),
        Ok(pb::EmailStatus::Deferred) => Ok(MessageStatus::Deferred),
        Ok(pb::EmailStatus::Failed) => Ok(MessageStatus::Failed),
        Ok(pb::EmailStatus::Cancelled) => Ok(MessageStatus::Cancelled),
        _ => Err(FieldError::new(
            field,
            format!("{value} is not a valid email status"),
        )),
    }
}

fn mailbox_to_proto(m: &Mailbox) -> pb::Mailbox {
    pb::Mailbox {
        email: m.email.to_string(),
        name: m.name.clone(),
    }
}

fn reason_to_proto(r: ProfileReason) -> pb::ProfileReason {
    match r {
        ProfileReason::Request => pb::ProfileReason::Request,
        ProfileReason::Campaign => pb::ProfileReason::Campaign,
        ProfileReason::Template => pb::ProfileReason::Template,
        ProfileReason::TenantDefault => pb::ProfileReason::TenantDefault,
        ProfileReason::SystemDefault => pb::ProfileReason::SystemDefault,
    }
}

fn attempt_to_proto(a: &AttemptRecord) -> pb::DeliveryAttempt {
    pb::DeliveryAttempt {
        number: a.number,
        start_time: Some(timestamp(a.started_at)),
        duration: Some(duration(a.duration_us)),
        server: a.server.clone(),
        profile_id: a.profile_id.clone().unwrap_or_default(),
        fallback: a.fallback,
        reply_code: u32::from(a.reply_code),
        enhanced_code: a.enhanced_code.clone(),
        reply_text: a.reply_text.clone(),
        outcome: match a.outcome {
            AttemptOutcome::Sent => pb::AttemptOutcome::Sent,
            AttemptOutcome::Deferred => pb::AttemptOutcome::Deferred,
            AttemptOutcome::Failed => pb::AttemptOutcome::Failed,
        }
        .into(),
        rejected_recipients: a.rejected_recipients.clone(),
    }
}

/// A log entry; attempts only when given.
pub(crate) fn entry_to_proto(m: &StoredMessage, attempts: &[AttemptRecord]) -> pb::EmailLogEntry {
    pb::EmailLogEntry {
        id: m.id.clone(),
        tenant_id: m.tenant_id.clone(),
        create_time: Some(timestamp(m.created_at)),
        update_time: Some(timestamp(m.updated_at)),
        sent_time: m.sent_at.map(timestamp),
        status: status_to_proto(m.status).into(),
        source: m.source.clone(),
        email_type: m.email_type.clone(),
        subject: m.content.subject.clone(),
        sender: Some(mailbox_to_proto(&m.content.from)),
        to: m.content.to.iter().map(mailbox_to_proto).collect(),
        cc: m.content.cc.iter().map(mailbox_to_proto).collect(),
        bcc: m.content.bcc.iter().map(mailbox_to_proto).collect(),
        profile_id: m.profile_id.clone().unwrap_or_default(),
        profile_reason: reason_to_proto(m.profile_reason).into(),
        fallback: m.fallback,
        fallback_reason: m.fallback_reason.clone(),
        template_id: m.template_id.clone().unwrap_or_default(),
        campaign_id: m.campaign_id.clone().unwrap_or_default(),
        attempt_count: m.attempt_count,
        attempts: attempts.iter().map(attempt_to_proto).collect(),
        message_id_header: m.message_id_header.clone(),
        trace_id: m.trace_id.clone(),
        tags: m.tags.clone().into_iter().collect(),
        last_error: m.last_error.clone(),
        next_attempt_time: m.next_attempt_at.map(timestamp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        for us in [0, 1, 1_700_000_000_123_456, -5] {
            assert_eq!(micros(&timestamp(us)), us);
        }
    }

    #[test]
    fn custom_profile_defaults_to_587_starttls_and_explicit_wins() {
        let p = pb::SmtpProfile {
            host: "smtp.example.com".into(),
            ..Default::default()
        };
        let (s, errors) = settings_from_proto(&p, "profile");
        assert!(errors.is_empty());
        assert_eq!((s.port, s.security), (587, Security::StartTls));
        let p = pb::SmtpProfile {
            provider: pb::Provider::Gmail.into(),
            port: 587,
            security: pb::SmtpSecurity::Starttls.into(),
            ..Default::default()
        };
        let (s, _) = settings_from_proto(&p, "profile");
        assert_eq!(s.host, "smtp.gmail.com");
        assert_eq!((s.port, s.security), (587, Security::StartTls));
    }
}
