//! An email's content as the JSON text it is stored as, written by hand: the same text
//! serde_json writes for [`MessageContent`] (a test holds them equal over every field), and
//! read back by serde's derived `Deserialize`.
//!
//! serde_json looks each byte of a string up in a table to find what needs escaping: for the
//! bodies of an email that was 4 % of mailgate's instructions per email. Strings here go
//! through [`crate::json::push_string`], which checks eight bytes at a time: about half the
//! instructions.

use base64::{engine::general_purpose::STANDARD, Engine};

use crate::{
    domain::{Mailbox, MessageContent},
    json::push_string as string,
};

/// `content` as JSON text.
pub(super) fn content_json(content: &MessageContent) -> String {
    // Attachments go as base64 (four characters for three bytes); 512 for names and quoting.
    let mut out = String::with_capacity(content.held_bytes() / 3 * 4 + 512);
    out.push_str("{\"from\":");
    mailbox(&mut out, &content.from);
    out.push_str(",\"reply_to\":");
    optional(&mut out, content.reply_to.as_deref());
    out.push_str(",\"error_to\":");
    optional(&mut out, content.error_to.as_deref());
    for (key, list) in [
        (",\"to\":", &content.to),
        (",\"cc\":", &content.cc),
        (",\"bcc\":", &content.bcc),
    ] {
        out.push_str(key);
        array(&mut out, list, mailbox);
    }
    out.push_str(",\"subject\":");
    string(&mut out, &content.subject);
    out.push_str(",\"text\":");
    optional(&mut out, content.text.as_deref());
    out.push_str(",\"html\":");
    optional(&mut out, content.html.as_deref());
    out.push_str(",\"headers\":");
    array(&mut out, &content.headers, |out, h| {
        out.push_str("{\"name\":");
        string(out, &h.name);
        out.push_str(",\"value\":");
        string(out, &h.value);
        out.push('}');
    });
    out.push_str(",\"attachments\":");
    array(&mut out, &content.attachments, |out, a| {
        out.push_str("{\"filename\":");
        string(out, &a.filename);
        out.push_str(",\"content_type\":");
        string(out, &a.content_type);
        // Base64 needs no escaping.
        out.push_str(",\"content\":\"");
        STANDARD.encode_string(&a.content, out);
        out.push_str("\"}");
    });
    out.push('}');
    out
}

/// A mailbox: its address, and its name unless empty (as `Mailbox` serializes).
fn mailbox(out: &mut String, m: &Mailbox) {
    out.push_str("{\"email\":");
    string(out, m.email.as_str());
    if !m.name.is_empty() {
        out.push_str(",\"name\":");
        string(out, &m.name);
    }
    out.push('}');
}

fn optional(out: &mut String, value: Option<&str>) {
    match value {
        Some(value) => string(out, value),
        None => out.push_str("null"),
    }
}

fn array<T>(out: &mut String, items: &[T], mut item: impl FnMut(&mut String, &T)) {
    out.push('[');
    for (i, value) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        item(out, value);
    }
    out.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Attachment, EmailAddress, Header};

    fn mb(email: &str, name: &str) -> Mailbox {
        Mailbox {
            email: EmailAddress::parse("x", email).unwrap(),
            name: name.to_owned(),
        }
    }

    /// Contents with every field empty and set, written as serde_json writes them, and read
    /// back the same by serde.
    #[test]
    fn content_is_written_as_serde_json_writes_it() {
        let texts = crate::json::tests::strings();
        let full = MessageContent {
            from: mb("support@acme.test", "Acme \"Support\""),
            reply_to: Some("help@acme.test".into()),
            error_to: Some("bounces@acme.test".into()),
            to: vec![mb("a@x.test", ""), mb("b@x.test", "B\\b")],
            cc: vec![mb("c@x.test", "C")],
            bcc: vec![mb("d@x.test", "")],
            subject: texts.join("|"),
            text: Some(texts.concat()),
            html: Some("<p>\"html\"</p>\n".into()),
            headers: vec![
                Header {
                    name: "X-A".into(),
                    value: "one \"two\"".into(),
                },
                Header {
                    name: "X-B".into(),
                    value: String::new(),
                },
            ],
            attachments: vec![
                Attachment {
                    filename: "r\u{e9}sum\u{e9} \"1\".pdf".into(),
                    content_type: "application/pdf".into(),
                    content: (0..=255).collect(),
                },
                Attachment {
                    filename: "empty".into(),
                    content_type: "text/plain".into(),
                    content: vec![],
                },
            ],
        };
        let bare = MessageContent {
            from: mb("a@b.test", ""),
            reply_to: None,
            error_to: None,
            to: vec![],
            cc: vec![],
            bcc: vec![],
            subject: String::new(),
            text: None,
            html: None,
            headers: vec![],
            attachments: vec![],
        };
        for content in [full, bare] {
            let ours = content_json(&content);
            assert_eq!(ours, serde_json::to_string(&content).unwrap());
            let back: MessageContent = serde_json::from_str(&ours).unwrap();
            assert_eq!(back, content);
        }
    }
}
