//! The message SendTestEmail sends.

use crate::{
    domain::{EmailAddress, Mailbox, MessageContent, NewMessage, ProfileReason, ProfileSettings},
    error::ApiError,
};

use super::Caller;

/// A test email from the profile's sender to `to`, held (not due) so that only the caller's
/// synchronous send delivers it.
pub(crate) fn message(
    caller: &Caller,
    settings: &ProfileSettings,
    profile_id: Option<String>,
    to: EmailAddress,
    subject: &str,
) -> Result<NewMessage, ApiError> {
    let from = Mailbox::parse(
        "profile.from_email",
        &settings.from_email,
        &settings.from_name,
    )?;
    let subject = if subject.trim().is_empty() {
        "mailgate test email".to_owned()
    } else {
        subject.to_owned()
    };
    if subject.contains(['\r', '\n', '\0']) {
        return Err(ApiError::invalid(
            "subject",
            "must not contain CR, LF or NUL",
        ));
    }
    let id = uuid::Uuid::now_v7().to_string();
    let text = format!(
        "This is a test email sent by mailgate through {}:{}.\r\n\r\nIf you can read it, the SMTP profile works.\r\n",
        settings.host, settings.port
    );
    Ok(NewMessage {
        message_id_header: format!("{id}@{}", from.email.domain()),
        id,
        tenant_id: caller.tenant_id.clone(),
        source: caller.source.clone(),
        email_type: "test".to_owned(),
        profile_id,
        profile_reason: ProfileReason::Request,
        template_id: None,
        campaign_id: None,
        content: MessageContent {
            from,
            reply_to: None,
            error_to: (!settings.error_to.is_empty()).then(|| settings.error_to.clone()),
            to: vec![Mailbox {
                email: to,
                name: String::new(),
            }],
            cc: Vec::new(),
            bcc: Vec::new(),
            subject,
            text: Some(text),
            html: None,
            headers: Vec::new(),
            attachments: Vec::new(),
        },
        // Far in the future: never due for the engine; the caller leases it at once.
        send_at: Some(i64::MAX / 2),
        idempotency_key: None,
        // Only an idempotency key needs a request hash (see `send::request_hash`).
        request_hash: String::new(),
        tags: Default::default(),
        trace_id: String::new(),
        traceparent: String::new(),
        lease: None,
    })
}
