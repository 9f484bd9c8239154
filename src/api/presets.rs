//! Provider presets: ready defaults for well-known SMTP services.

use crate::proto::v1::{self as pb, AuthMechanism as A, Provider as P, SmtpSecurity as S};

fn preset(
    provider: P,
    display_name: &str,
    host: &str,
    (port, security): (u32, S),
    auth: A,
    alternatives: &[(u32, S)],
    hint: &str,
) -> pb::ProviderPreset {
    pb::ProviderPreset {
        provider: provider.into(),
        display_name: display_name.to_owned(),
        host: host.to_owned(),
        port,
        security: security.into(),
        auth_mechanism: auth.into(),
        alternatives: alternatives
            .iter()
            .map(|(port, security)| pb::PresetEndpoint {
                port: *port,
                security: (*security).into(),
            })
            .collect(),
        hint: hint.to_owned(),
    }
}

/// Every preset.
pub(crate) fn all() -> Vec<pb::ProviderPreset> {
    let starttls = (587, S::Starttls);
    let implicit = (465, S::ImplicitTls);
    vec![
        preset(P::Gmail, "Gmail", "smtp.gmail.com", implicit, A::Auto, &[starttls],
            "Use an app password (requires 2-step verification) or XOAUTH2; the normal account password is refused. Personal accounts send at most about 500 emails a day."),
        preset(P::GoogleWorkspace, "Google Workspace", "smtp.gmail.com", implicit, A::Auto, &[starttls],
            "Use an app password or XOAUTH2; for smtp-relay.gmail.com the admin console must allow this server's IP."),
        preset(P::Microsoft365, "Microsoft 365", "smtp.office365.com", starttls, A::Login, &[],
            "SMTP AUTH must be enabled for the mailbox; tenants with security defaults block basic authentication: use XOAUTH2."),
        preset(P::OutlookCom, "Outlook.com", "smtp-mail.outlook.com", starttls, A::Login, &[],
            "Personal Outlook.com accounts need OAuth2 (XOAUTH2); basic authentication is being retired."),
        preset(P::Yahoo, "Yahoo Mail", "smtp.mail.yahoo.com", implicit, A::Auto, &[starttls],
            "Use an app password generated in the Yahoo account security settings."),
        preset(P::AmazonSes, "Amazon SES", "email-smtp.{region}.amazonaws.com", starttls, A::Auto, &[implicit, (2587, S::Starttls), (2465, S::ImplicitTls)],
            "Replace {region} (e.g. eu-west-1); use SMTP credentials created in the SES console, not IAM access keys; the sender must be a verified identity."),
        preset(P::Sendgrid, "SendGrid", "smtp.sendgrid.net", starttls, A::Auto, &[implicit, (2525, S::Starttls)],
            "Username is the literal \"apikey\"; the password is an API key with Mail Send permission."),
        preset(P::Mailgun, "Mailgun", "smtp.mailgun.org", starttls, A::Auto, &[implicit, (2525, S::Starttls)],
            "Use the domain's SMTP credentials; EU domains use smtp.eu.mailgun.org."),
        preset(P::Postmark, "Postmark", "smtp.postmarkapp.com", starttls, A::Auto, &[(2525, S::Starttls)],
            "Username and password are both the server API token."),
        preset(P::Custom, "Custom SMTP server", "", starttls, A::Auto, &[implicit, (25, S::None)],
            "Any SMTP server; without a port, 587 with STARTTLS."),
    ]
}
