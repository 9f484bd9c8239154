//! Composing the RFC 5322 message from stored content, at send time (so a fallback can change
//! the sender without touching what the caller asked for).

use std::str::FromStr;

use lettre::message::{
    header::{ContentType, HeaderName, HeaderValue},
    Attachment as LettreAttachment, Mailbox as LettreMailbox, MultiPart, SinglePart,
};

use crate::domain::{Mailbox, MessageContent};

/// The header carrying mailgate's message id.
pub const MAILGATE_ID_HEADER: &str = "X-Mailgate-Id";

/// Why a message could not be composed (a permanent failure: retrying cannot help).
#[derive(Debug, thiserror::Error)]
#[error("cannot compose the message: {0}")]
pub struct ComposeError(String);

fn address(m: &Mailbox) -> Result<lettre::Address, ComposeError> {
    lettre::Address::from_str(m.email.as_str())
        .map_err(|e| ComposeError(format!("address {}: {e}", m.email)))
}

fn mailbox(m: &Mailbox) -> Result<LettreMailbox, ComposeError> {
    let name = (!m.name.is_empty()).then(|| m.name.clone());
    Ok(LettreMailbox::new(name, address(m)?))
}

/// Builds the message bytes. Bcc recipients appear in no header.
pub fn compose(
    content: &MessageContent,
    message_id: &str,
    mailgate_id: &str,
) -> Result<Vec<u8>, ComposeError> {
    // The SMTP envelope is the engine's own (`smtp::transaction`). Without one here, lettre
    // derives one from the headers: it parsed every address back (3 % of the workers' time
    // in a profile) and refused an email with only Bcc recipients, which no header names.
    let recipients = content
        .recipients()
        .map(address)
        .collect::<Result<Vec<_>, _>>()?;
    let envelope = lettre::address::Envelope::new(Some(address(&content.from)?), recipients)
        .map_err(|_| ComposeError("no recipient".into()))?;
    let mut builder = lettre::Message::builder()
        .envelope(envelope)
        .from(mailbox(&content.from)?)
        .subject(content.subject.clone())
        .message_id(Some(format!("<{message_id}>")))
        .date_now();
    for to in &content.to {
        builder = builder.to(mailbox(to)?);
    }
    for cc in &content.cc {
        builder = builder.cc(mailbox(cc)?);
    }
    if let Some(reply_to) = &content.reply_to {
        let address = lettre::Address::from_str(reply_to)
            .map_err(|e| ComposeError(format!("reply-to {reply_to}: {e}")))?;
        builder = builder.reply_to(LettreMailbox::new(None, address));
    }
    builder = builder.raw_header(raw_header(MAILGATE_ID_HEADER, mailgate_id)?);
    for header in &content.headers {
        builder = builder.raw_header(raw_header(&header.name, &header.value)?);
    }
    let body = body_part(content);
    let message = if content.attachments.is_empty() {
        match body {
            Body::Single(part) => builder.singlepart(part),
            Body::Multi(part) => builder.multipart(part),
        }
    } else {
        let mut mixed = match body {
            Body::Single(part) => MultiPart::mixed().singlepart(part),
            Body::Multi(part) => MultiPart::mixed().multipart(part),
        };
        for a in &content.attachments {
            let content_type = ContentType::parse(&a.content_type)
                .map_err(|_| ComposeError(format!("content type {:?}", a.content_type)))?;
            mixed = mixed.singlepart(
                LettreAttachment::new(a.filename.clone()).body(a.content.clone(), content_type),
            );
        }
        builder.multipart(mixed)
    };
    let message = message.map_err(|e| ComposeError(e.to_string()))?;
    Ok(message.formatted())
}

enum Body {
    Single(SinglePart),
    Multi(MultiPart),
}

fn body_part(content: &MessageContent) -> Body {
    match (&content.text, &content.html) {
        (Some(text), Some(html)) => Body::Multi(MultiPart::alternative_plain_html(
            text.clone(),
            html.clone(),
        )),
        (None, Some(html)) => Body::Single(SinglePart::html(html.clone())),
        (Some(text), None) => Body::Single(SinglePart::plain(text.clone())),
        (None, None) => Body::Single(SinglePart::plain(String::new())),
    }
}

fn raw_header(name: &str, value: &str) -> Result<HeaderValue, ComposeError> {
    let name = HeaderName::new_from_ascii(name.to_owned())
        .map_err(|_| ComposeError(format!("header name {name:?}")))?;
    Ok(HeaderValue::new(name, value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EmailAddress, Header};

    fn mb(e: &str) -> Mailbox {
        Mailbox {
            email: EmailAddress::parse("x", e).unwrap(),
            name: String::new(),
        }
    }

    #[test]
    fn bcc_never_in_headers_and_ids_present() {
        let content = MessageContent {
            from: Mailbox {
                name: "Acme Support".into(),
                ..mb("support@acme.test")
            },
            reply_to: Some("help@acme.test".into()),
            error_to: None,
            to: vec![mb("a@x.test")],
            cc: vec![mb("c@x.test")],
            bcc: vec![mb("secret@x.test")],
            subject: "Hello".into(),
            text: Some("plain".into()),
            html: Some("<p>html</p>".into()),
            headers: vec![Header {
                name: "X-Campaign".into(),
                value: "spring".into(),
            }],
            attachments: vec![],
        };
        let raw = String::from_utf8(compose(&content, "abc@mailgate", "m-1").unwrap()).unwrap();
        assert!(!raw.contains("secret@x.test"), "{raw}");
        assert!(!raw.to_ascii_lowercase().contains("\nbcc:"));
        assert!(raw.contains("Message-ID: <abc@mailgate>"));
        assert!(raw.contains("X-Mailgate-Id: m-1"));
        assert!(raw.contains("X-Campaign: spring"));
        assert!(raw.contains("Cc: c@x.test"));
        assert!(raw.contains("Reply-To: help@acme.test"));
        assert!(raw.contains("Date: "));
    }

    #[test]
    fn an_email_to_bcc_recipients_only_is_composed_without_them() {
        let content = MessageContent {
            from: mb("support@acme.test"),
            reply_to: None,
            error_to: None,
            to: vec![],
            cc: vec![],
            bcc: vec![mb("secret@x.test")],
            subject: "Hello".into(),
            text: Some("plain".into()),
            html: None,
            headers: vec![],
            attachments: vec![],
        };
        let raw = String::from_utf8(compose(&content, "abc@mailgate", "m-1").unwrap()).unwrap();
        assert!(!raw.contains("secret@x.test"), "{raw}");
        assert!(!raw.contains("\r\nTo:"), "{raw}");
        assert!(raw.contains("From: support@acme.test"), "{raw}");
    }
}
