//! An email's content as the JSON text it is stored as, written by hand: the same text
//! serde_json writes for [`MessageContent`] (a test holds them equal over every field), and
//! read back by serde's derived `Deserialize`.
//!
//! serde_json looks each byte of a string up in a table to find what needs escaping: for the
//! bodies of an email that was 4 % of mailgate's instructions per email. Here a string is
//! checked eight bytes at a time (one 64-bit word, [`escaped_bytes`]), and only the bytes to
//! escape are visited: about half the instructions.

use base64::{engine::general_purpose::STANDARD, Engine};

use crate::domain::{Mailbox, MessageContent};

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

/// A byte JSON must escape in a string: a control character, `"` or `\`.
fn escaped(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Appends `s` as a JSON string, escaped as serde_json escapes it: `\"`, `\\`, `\b`, `\f`,
/// `\n`, `\r`, `\t`, `\u00xx` for the other control characters; everything else as it is.
fn string(out: &mut String, s: &str) {
    const WORD: usize = 8;
    let bytes = s.as_bytes();
    out.push('"');
    // The start of what is not copied yet; every cut is at an ASCII byte, a char boundary.
    let mut start = 0;
    let mut words = bytes.chunks_exact(WORD);
    for (n, word) in words.by_ref().enumerate() {
        // Eight bytes checked at once, and only the bytes to escape visited. (Every chunk
        // of `chunks_exact` is a word; were one not, each of its bytes would be visited.)
        let mut found =
            <[u8; WORD]>::try_from(word).map_or(HIGHS, |w| escaped_bytes(u64::from_le_bytes(w)));
        while found != 0 {
            let at = n * WORD + found.trailing_zeros() as usize / 8;
            found &= found - 1;
            start = escape(out, s, start, at);
        }
    }
    let rest = bytes.len() - words.remainder().len();
    for at in rest..bytes.len() {
        start = escape(out, s, start, at);
    }
    out.push_str(&s[start..]);
    out.push('"');
}

const LOWS: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const HIGHS: u64 = 0x8080_8080_8080_8080;
const ONES: u64 = 0x0101_0101_0101_0101;

/// The high bit of each byte of `w` (eight bytes, little-endian) that needs escaping
/// ([`escaped`]), the others clear. No carry crosses a byte: the low seven bits of a byte
/// plus at most 0x7f stay below 0x100.
fn escaped_bytes(w: u64) -> u64 {
    // High bit set in the bytes whose low seven bits are 0x20 or more, or whose own is set.
    let at_least_space = ((w & LOWS) + ONES * 0x60) | w;
    // High bit set in the bytes that are not zero.
    let nonzero = |v: u64| ((v & LOWS) + LOWS) | v;
    let quote = nonzero(w ^ (ONES * u64::from(b'"')));
    let backslash = nonzero(w ^ (ONES * u64::from(b'\\')));
    !(at_least_space & quote & backslash) & HIGHS
}

/// If the byte of `s` at `at` needs escaping, copies what comes before it from `start` on and
/// writes its escape; returns the new start.
fn escape(out: &mut String, s: &str, start: usize, at: usize) -> usize {
    let b = s.as_bytes()[at];
    if !escaped(b) {
        return start;
    }
    out.push_str(&s[start..at]);
    match b {
        b'"' => out.push_str("\\\""),
        b'\\' => out.push_str("\\\\"),
        b'\n' => out.push_str("\\n"),
        b'\r' => out.push_str("\\r"),
        b'\t' => out.push_str("\\t"),
        0x08 => out.push_str("\\b"),
        0x0c => out.push_str("\\f"),
        _ => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    at + 1
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

    /// Strings with every kind of byte JSON treats apart, at every offset around the blocks.
    fn strings() -> Vec<String> {
        let mut all = vec![
            String::new(),
            "plain".to_owned(),
            "quote \" backslash \\ slash / tab \t".to_owned(),
            "lines\nand\r\nbreaks\n".to_owned(),
            "caf\u{e9} \u{1f600} \u{7f} del".to_owned(),
        ];
        for c in 0u8..0x20 {
            all.push(format!("ctl {} end", char::from(c)));
        }
        for at in 0..40 {
            let mut s = "x".repeat(40);
            s.insert(at, '\n');
            all.push(s.clone());
            s.insert(at, '\u{e9}');
            all.push(s);
        }
        all
    }

    /// Every byte value at every place of a word, among bytes of every kind: exactly the
    /// bytes to escape are marked.
    #[test]
    fn the_bytes_to_escape_of_a_word_are_marked() {
        for fill in [b'a', 0xff, 0x20, 0x1f, 0x80, 0x7f, 0, b'"', b'\\'] {
            for at in 0..8 {
                for b in 0..=255u8 {
                    let mut word = [fill; 8];
                    word[at] = b;
                    let marked = escaped_bytes(u64::from_le_bytes(word)).to_le_bytes();
                    for (i, byte) in word.iter().enumerate() {
                        assert_eq!(marked[i] == 0x80, escaped(*byte), "{word:?} at {i}");
                        assert!(marked[i] == 0x80 || marked[i] == 0, "{marked:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for s in strings() {
            let mut ours = String::new();
            string(&mut ours, &s);
            assert_eq!(ours, serde_json::to_string(&s).unwrap(), "{s:?}");
        }
    }

    /// Contents with every field empty and set, written as serde_json writes them, and read
    /// back the same by serde.
    #[test]
    fn content_is_written_as_serde_json_writes_it() {
        let texts = strings();
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
