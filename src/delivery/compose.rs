//! Composing the RFC 5322 message from stored content, at send time (so a fallback can change
//! the sender without touching what the caller asked for).

use std::{io::Write as _, str::FromStr};

use lettre::message::{
    header::{self, ContentTransferEncoding, ContentType, HeaderName, HeaderValue, Headers},
    Attachment as LettreAttachment, Body as LettreBody, Mailbox as LettreMailbox, Mailboxes,
    MultiPart, SinglePart,
};

use crate::domain::{Mailbox, MessageContent};

/// The header carrying mailgate's message id.
pub const MAILGATE_ID_HEADER: &str = "X-Mailgate-Id";

/// Why a message could not be composed (a permanent failure: retrying cannot help).
#[derive(Debug, thiserror::Error)]
#[error("cannot compose the message: {0}")]
pub struct ComposeError(String);

/// `m`'s address for lettre. Every [`crate::domain::EmailAddress`] was checked by lettre's own
/// parser when it was made (from a request, a profile or the stored content), so it is not
/// parsed again here: checking each address of each email again was 3 % of mailgate's
/// instructions per email.
fn mailbox(m: &Mailbox) -> LettreMailbox {
    let email = m.email.as_str();
    // The domain follows the last `@`, as lettre's parser splits it.
    let (user, domain) = email.rsplit_once('@').unwrap_or((email, ""));
    let name = (!m.name.is_empty()).then(|| m.name.clone());
    LettreMailbox::new(name, lettre::Address::new_dangerous(user, domain))
}

fn mailboxes(list: &[Mailbox]) -> Mailboxes {
    list.iter().map(mailbox).collect()
}

/// Builds the message bytes. Bcc recipients appear in no header.
///
/// The headers are lettre's (each encoded by lettre: RFC 2047 words, quoting, folding), set
/// in the order lettre's `MessageBuilder` gives them, and the body is lettre's MIME part; the
/// builder itself is not used. It parsed every address header back after each change and
/// checked the message it had just been given (From present, a Date, an envelope): half of
/// the composing, 7 % of mailgate's instructions per email. The SMTP envelope is the engine's
/// own (`smtp::transaction`).
pub fn compose(
    content: &MessageContent,
    message_id: &str,
    mailgate_id: &str,
) -> Result<Vec<u8>, ComposeError> {
    if content.recipients().next().is_none() {
        return Err(ComposeError("no recipient".into()));
    }
    let mut headers = Headers::with_capacity(10 + content.headers.len());
    headers.set(header::From::from(Mailboxes::from(mailbox(&content.from))));
    headers.set(header::Subject::from(content.subject.clone()));
    headers.set(header::MessageId::from(format!("<{message_id}>")));
    headers.set(header::Date::now());
    if !content.to.is_empty() {
        headers.set(header::To::from(mailboxes(&content.to)));
    }
    if !content.cc.is_empty() {
        headers.set(header::Cc::from(mailboxes(&content.cc)));
    }
    if let Some(reply_to) = &content.reply_to {
        let address = lettre::Address::from_str(reply_to)
            .map_err(|e| ComposeError(format!("reply-to {reply_to}: {e}")))?;
        headers.set(header::ReplyTo::from(Mailboxes::from(LettreMailbox::new(
            None, address,
        ))));
    }
    headers.insert_raw(raw_header(MAILGATE_ID_HEADER, mailgate_id)?);
    for h in &content.headers {
        headers.insert_raw(raw_header(&h.name, &h.value)?);
    }
    headers.set(header::MIME_VERSION_1_0);
    let body = body_part(content);
    let part = if content.attachments.is_empty() {
        body
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
        Body::Multi(mixed)
    };
    let part = match part {
        Body::Single(part) => part.formatted(),
        Body::Multi(part) => part.formatted(),
    };
    let mut raw = Vec::with_capacity(512 + part.len());
    // Writing to a Vec cannot fail.
    let _ = write!(raw, "{headers}");
    raw.extend_from_slice(&part);
    Ok(raw)
}

enum Body {
    Single(SinglePart),
    Multi(MultiPart),
}

fn body_part(content: &MessageContent) -> Body {
    match (&content.text, &content.html) {
        (Some(text), Some(html)) => Body::Multi(MultiPart::alternative_plain_html(
            wire_body(text),
            wire_body(html),
        )),
        (None, Some(html)) => Body::Single(SinglePart::html(wire_body(html))),
        (Some(text), None) => Body::Single(SinglePart::plain(wire_body(text))),
        (None, None) => Body::Single(SinglePart::plain(String::new())),
    }
}

/// Longest line, without its line break, of a body sent as it is (7bit): the length of a
/// quoted-printable line (RFC 2045), under the 78 that RFC 5322 asks for, and the limit
/// under which Nodemailer sends text as it is.
const SEVEN_BIT_LINE: usize = 76;

/// A text or HTML body as it goes on the wire. Printable ASCII in lines of at most
/// [`SEVEN_BIT_LINE`] characters goes as it is (7bit, with CRLF line breaks): readable in the
/// raw message, and no encoding pass. Anything else is left to lettre's chooser
/// (quoted-printable or base64 for long lines and non-ASCII text). lettre alone sends 7bit
/// only for lines of at most 74 characters, so a body of 75- or 76-character lines would be
/// quoted-printable.
fn wire_body(text: &str) -> LettreBody {
    match seven_bit(text) {
        Some(wire) => LettreBody::dangerous_pre_encoded(wire, ContentTransferEncoding::SevenBit),
        None => LettreBody::new(text.to_owned()),
    }
}

/// `text` with CRLF line breaks, if it can go as it is: every line printable ASCII (tabs
/// allowed) and at most [`SEVEN_BIT_LINE`] characters long, line breaks LF or CRLF. Any other
/// body (a lone CR included, a final one too) is left to lettre's chooser.
fn seven_bit(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    // One pass over the bytes, then line by line with memchr: checked and copied character
    // by character, this was 4 % of mailgate's instructions per email. The check runs over
    // blocks of 64 bytes without stopping inside one, a loop the compiler vectorizes (stopping
    // at the first bad byte, it took 3 instructions a byte).
    let allowed = |b: u8| matches!(b, b'\t' | b'\n' | b'\r' | 0x20..=0x7e);
    let block_allowed = |block: &[u8]| block.iter().fold(true, |ok, &b| ok & allowed(b));
    if !bytes.chunks(64).all(block_allowed) {
        return None;
    }
    // A line without its break: short enough, and no CR left in it.
    let fits = |line: &[u8]| line.len() <= SEVEN_BIT_LINE && memchr::memchr(b'\r', line).is_none();
    let mut wire = Vec::with_capacity(bytes.len() + bytes.len() / 32 + 2);
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', bytes) {
        // A CR belongs to the line break only before an LF.
        let line = &bytes[start..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !fits(line) {
            return None;
        }
        wire.extend_from_slice(line);
        wire.extend_from_slice(b"\r\n");
        start = end + 1;
    }
    let last = &bytes[start..];
    if !fits(last) {
        return None;
    }
    wire.extend_from_slice(last);
    Some(wire)
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

    /// An email to one recipient with these bodies, composed.
    fn raw_with(text: Option<&str>, html: Option<&str>) -> String {
        let content = MessageContent {
            from: mb("support@acme.test"),
            reply_to: None,
            error_to: None,
            to: vec![mb("a@x.test")],
            cc: vec![],
            bcc: vec![],
            subject: "Hello".into(),
            text: text.map(str::to_owned),
            html: html.map(str::to_owned),
            headers: vec![],
            attachments: vec![],
        };
        String::from_utf8(compose(&content, "abc@mailgate", "m-1").unwrap()).unwrap()
    }

    fn text_only(text: &str) -> String {
        raw_with(Some(text), None)
    }

    fn body_of(raw: &str) -> &str {
        raw.split_once("\r\n\r\n").unwrap().1
    }

    /// Printable ASCII in lines of up to 76 characters goes as it is, with CRLF line breaks
    /// (LF or CRLF in the input); lettre ends the part with a CRLF of its own.
    #[test]
    fn short_ascii_lines_go_as_they_are() {
        let line = "x".repeat(76);
        let text = format!("{line}\n\tindented\r\n. a dot\n\n{}", "y".repeat(75));
        let raw = text_only(&text);
        assert!(raw.contains("Content-Transfer-Encoding: 7bit\r\n"), "{raw}");
        assert_eq!(
            body_of(&raw),
            format!(
                "{line}\r\n\tindented\r\n. a dot\r\n\r\n{}\r\n",
                "y".repeat(75)
            )
        );
        assert!(body_of(&text_only("ends with a break\n")).ends_with("break\r\n\r\n"));
    }

    /// What may go as it is: printable ASCII and tabs, lines of at most 76 characters.
    #[test]
    fn seven_bit_takes_only_short_printable_lines() {
        assert_eq!(seven_bit("a\r\nb\n").unwrap(), b"a\r\nb\r\n");
        assert_eq!(seven_bit("a\nb").unwrap(), b"a\r\nb");
        assert_eq!(seven_bit("").unwrap(), b"");
        assert!(seven_bit(&"z".repeat(76)).is_some());
        for text in [
            "z".repeat(77),
            format!("ok\n{}", "z".repeat(77)),
            "caf\u{e9}".to_owned(),
            "bell \u{7}".to_owned(),
            "lone \r cr".to_owned(),
            "final cr\r".to_owned(),
            "final cr\n\r".to_owned(),
            "del \u{7f}".to_owned(),
            "nul \0".to_owned(),
        ] {
            assert!(seven_bit(&text).is_none(), "{text:?}");
        }
    }

    /// Line by line, as the rule reads: split at LF, a CR before an LF belongs to the line
    /// break, every line printable ASCII or tabs and at most 76 characters.
    fn seven_bit_by_lines(text: &str) -> Option<Vec<u8>> {
        let mut wire = Vec::new();
        let mut lines = text.split('\n').peekable();
        while let Some(line) = lines.next() {
            let broken = lines.peek().is_some();
            let line = match line.strip_suffix('\r') {
                Some(stripped) if broken => stripped,
                _ => line,
            };
            let printable = line
                .bytes()
                .all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
            if line.len() > SEVEN_BIT_LINE || !printable {
                return None;
            }
            wire.extend_from_slice(line.as_bytes());
            if broken {
                wire.extend_from_slice(b"\r\n");
            }
        }
        Some(wire)
    }

    #[test]
    fn seven_bit_matches_the_rule_for_every_short_body() {
        // Every body of up to 7 characters over the ones that matter (97,656), and lines
        // around the limit.
        const ALPHABET: [char; 5] = ['a', '\r', '\n', '\t', '\u{7f}'];
        let mut bodies = Vec::new();
        for len in 0..=7u32 {
            for mut n in 0..5usize.pow(len) {
                bodies.push(
                    (0..len)
                        .map(|_| {
                            let c = ALPHABET[n % 5];
                            n /= 5;
                            c
                        })
                        .collect::<String>(),
                );
            }
        }
        for len in [75, 76, 77] {
            let line = "z".repeat(len);
            for body in [
                line.clone(),
                format!("{line}\r\n"),
                format!("a\n{line}"),
                format!("{line}\r\nb"),
                format!("{line}\r"),
            ] {
                bodies.push(body);
            }
        }
        for body in bodies {
            assert_eq!(seven_bit(&body), seven_bit_by_lines(&body), "{body:?}");
        }
    }

    /// The message as lettre's `MessageBuilder` composes it: what `compose` did before it set
    /// lettre's headers itself, kept as the reference.
    fn compose_with_builder(
        content: &MessageContent,
        message_id: &str,
        mailgate_id: &str,
    ) -> Vec<u8> {
        let address = |m: &Mailbox| lettre::Address::from_str(m.email.as_str()).unwrap();
        let lettre_mailbox = |m: &Mailbox| {
            LettreMailbox::new((!m.name.is_empty()).then(|| m.name.clone()), address(m))
        };
        let envelope = lettre::address::Envelope::new(
            Some(address(&content.from)),
            content.recipients().map(address).collect(),
        )
        .unwrap();
        let mut builder = lettre::Message::builder()
            .envelope(envelope)
            .from(lettre_mailbox(&content.from))
            .subject(content.subject.clone())
            .message_id(Some(format!("<{message_id}>")))
            .date_now();
        for to in &content.to {
            builder = builder.to(lettre_mailbox(to));
        }
        for cc in &content.cc {
            builder = builder.cc(lettre_mailbox(cc));
        }
        if let Some(reply_to) = &content.reply_to {
            builder = builder.reply_to(LettreMailbox::new(None, reply_to.parse().unwrap()));
        }
        builder = builder.raw_header(raw_header(MAILGATE_ID_HEADER, mailgate_id).unwrap());
        for header in &content.headers {
            builder = builder.raw_header(raw_header(&header.name, &header.value).unwrap());
        }
        let message = if content.attachments.is_empty() {
            match body_part(content) {
                Body::Single(part) => builder.singlepart(part),
                Body::Multi(part) => builder.multipart(part),
            }
        } else {
            let mut mixed = match body_part(content) {
                Body::Single(part) => MultiPart::mixed().singlepart(part),
                Body::Multi(part) => MultiPart::mixed().multipart(part),
            };
            for a in &content.attachments {
                let content_type = ContentType::parse(&a.content_type).unwrap();
                mixed = mixed.singlepart(
                    LettreAttachment::new(a.filename.clone()).body(a.content.clone(), content_type),
                );
            }
            builder.multipart(mixed)
        };
        message.unwrap().formatted()
    }

    /// `raw` with what differs from one composing to the next made fixed: the Date header's
    /// value and the MIME boundaries (random), each boundary named by its first appearance.
    fn normalized(raw: &[u8]) -> String {
        let mut text = String::from_utf8(raw.to_vec()).unwrap();
        let date = text.find("\r\nDate: ").expect("a Date header") + 2;
        let end = date + text[date..].find("\r\n").unwrap();
        text.replace_range(date..end, "Date: (now)");
        let mut n = 0;
        while let Some(at) = text.find("boundary=\"") {
            let start = at + "boundary=\"".len();
            let end = start + text[start..].find('"').unwrap();
            let boundary = text[start..end].to_owned();
            assert_eq!(boundary.len(), 40, "{text}");
            n += 1;
            text = text.replace(&format!("boundary=\"{boundary}\""), &format!("b=\"B{n}\""));
            text = text.replace(&boundary, &format!("B{n}"));
        }
        text
    }

    /// Every combination that matters of names (plain, quoted, escaped, non-ASCII, long),
    /// subjects and header values (short, folded, encoded), recipient lists, reply-to, custom
    /// headers (a repeated name too), bodies and attachments: composed byte for byte as lettre's
    /// builder composes it.
    #[test]
    fn composes_what_lettres_builder_composes() {
        let names = [
            "",
            "Acme",
            "Acme Support",
            "O'Brien, Ltd.",
            "say \"hi\" \\ there",
            "Gr\u{fc}\u{df}e K\u{f6}ln",
            "a very long display name that goes on and on well past one folded header line",
        ];
        let subjects = [
            String::new(),
            "Hello".to_owned(),
            "  spaced  out  ".to_owned(),
            "word ".repeat(40),
            "x".repeat(120),
            "Gr\u{fc}\u{df}e aus K\u{f6}ln, und noch viel mehr Text danach, bis die Zeile umbricht"
                .to_owned(),
        ];
        let values = [
            "spring".to_owned(),
            "a value ".repeat(20),
            "caf\u{e9} au lait".to_owned(),
        ];
        let bodies: [(Option<&str>, Option<&str>); 5] = [
            (Some("plain text\nwith two lines"), Some("<p>html</p>")),
            (Some("only text"), None),
            (None, Some("<p>only html</p>")),
            (None, None),
            (Some("caf\u{e9}"), Some(&"<p>long</p>".repeat(20))),
        ];
        let person = |i: usize, domain: &str| Mailbox {
            name: names[i % names.len()].to_owned(),
            ..mb(&format!("user{i}@{domain}"))
        };
        let (mut encoded, mut folded, mut mixed) = (0, 0, 0);
        for i in 0..420 {
            let (text, html) = bodies[i % bodies.len()];
            let content = MessageContent {
                from: person(i / 3, "acme.test"),
                reply_to: (i % 4 == 1).then(|| "help@acme.test".to_owned()),
                error_to: None,
                to: (0..i % 3).map(|k| person(i + k, "x.test")).collect(),
                cc: (0..i % 2 * 2)
                    .map(|k| person(i + k + 3, "y.test"))
                    .collect(),
                bcc: vec![mb("secret@z.test")],
                subject: subjects[i / 2 % subjects.len()].clone(),
                text: text.map(str::to_owned),
                html: html.map(str::to_owned),
                headers: (0..i % 4)
                    .map(|k| Header {
                        name: if k == 2 {
                            "X-Tag".into()
                        } else {
                            format!("X-Tag{}", k % 2)
                        },
                        value: values[(i + k) % values.len()].clone(),
                    })
                    .collect(),
                attachments: if i % 7 == 3 {
                    vec![crate::domain::Attachment {
                        filename: "report \u{e9}t\u{e9}.pdf".into(),
                        content_type: "application/pdf".into(),
                        content: vec![0, 159, 146, 150, 255, 1, 2, 3],
                    }]
                } else {
                    vec![]
                },
            };
            let ours = compose(&content, "abc@mailgate", "m-1").unwrap();
            let builders = compose_with_builder(&content, "abc@mailgate", "m-1");
            let ours = normalized(&ours);
            assert_eq!(ours, normalized(&builders), "email {i}");
            let head = ours.split_once("\r\n\r\n").unwrap().0;
            encoded += usize::from(head.contains("=?utf-8?"));
            folded += usize::from(head.contains("\r\n "));
            mixed += usize::from(head.contains("multipart/mixed"));
        }
        // The combinations reach lettre's encoding, folding and attachments.
        assert!(
            encoded > 50 && folded > 50 && mixed > 50,
            "{encoded} {folded} {mixed}"
        );
    }

    /// A longer line or a non-ASCII character is encoded; the encoded body reads back.
    #[test]
    fn other_bodies_are_encoded() {
        let raw = text_only(&"z".repeat(77));
        assert!(
            raw.contains("Content-Transfer-Encoding: quoted-printable"),
            "{raw}"
        );
        assert_eq!(
            body_of(&raw).replace("=\r\n", ""),
            format!("{}\r\n", "z".repeat(77))
        );
        let raw = text_only("caf\u{e9}");
        assert!(!raw.contains("Content-Transfer-Encoding: 7bit"), "{raw}");
    }

    /// Both parts of an alternative body get the same choice, each on its own.
    #[test]
    fn each_part_is_chosen_on_its_own() {
        let long_html = format!("<p>{}</p>", "w".repeat(100));
        let raw = raw_with(Some("short lines\nonly"), Some(&long_html));
        assert!(
            raw.contains("Content-Transfer-Encoding: 7bit\r\n\r\nshort lines\r\nonly"),
            "{raw}"
        );
        assert!(
            raw.contains("Content-Transfer-Encoding: quoted-printable"),
            "{raw}"
        );
        let raw = raw_with(None, None);
        assert!(raw.contains("Content-Type: text/plain"), "{raw}");
    }
}
