//! JSON strings written as serde_json writes them, faster: the span fields of the JSON log
//! and the stored content of every email (`storage::content_json`) go through here. Most
//! strings (ids, names, hosts, lines of a body) need no escape or few, and are copied in runs
//! between them.

/// Appends `s` as a JSON string, escaped as serde_json escapes it: `\"`, `\\`, `\b`, `\f`,
/// `\n`, `\r`, `\t`, `\u00xx` for the other control characters; everything else as it is.
pub(crate) fn push_string(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    out.push('"');
    // The start of what is not copied yet; every cut is at an ASCII byte, a char boundary.
    let mut start = 0;
    let mut words = bytes.chunks_exact(WORD);
    for (n, word) in words.by_ref().enumerate() {
        // Eight bytes checked at once, and only the bytes to escape visited.
        start = escape_found(out, s, start, n * WORD, padded_escaped_bytes(word));
    }
    let rest = words.remainder();
    start = escape_found(
        out,
        s,
        start,
        bytes.len() - rest.len(),
        padded_escaped_bytes(rest),
    );
    out.push_str(&s[start..]);
    out.push('"');
}

/// The bytes checked at once: a 64-bit word.
const WORD: usize = 8;

/// [`escaped_bytes`] of up to eight bytes, the word filled up with bytes that need no escape
/// when they are fewer (the end of a string).
fn padded_escaped_bytes(bytes: &[u8]) -> u64 {
    let mut word = [b'a'; WORD];
    word[..bytes.len()].copy_from_slice(bytes);
    escaped_bytes(u64::from_le_bytes(word))
}

const LOWS: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const HIGHS: u64 = 0x8080_8080_8080_8080;
const ONES: u64 = 0x0101_0101_0101_0101;

/// The high bit of each byte of `w` (eight bytes, little-endian) that JSON must escape in a
/// string (a control character, `"` or `\`), the others clear. No carry crosses a byte: the
/// low seven bits of a byte plus at most 0x7f stay below 0x100.
fn escaped_bytes(w: u64) -> u64 {
    // High bit set in the bytes whose low seven bits are 0x20 or more, or whose own is set.
    let at_least_space = ((w & LOWS) + ONES * 0x60) | w;
    // High bit set in the bytes that are not zero.
    let nonzero = |v: u64| ((v & LOWS) + LOWS) | v;
    let quote = nonzero(w ^ (ONES * u64::from(b'"')));
    let backslash = nonzero(w ^ (ONES * u64::from(b'\\')));
    !(at_least_space & quote & backslash) & HIGHS
}

/// Escapes the bytes of `s` that `found` marks ([`escaped_bytes`] of the word at `base`),
/// copying what comes before each from `start` on; returns the new start.
fn escape_found(out: &mut String, s: &str, mut start: usize, base: usize, mut found: u64) -> usize {
    while found != 0 {
        let at = base + found.trailing_zeros() as usize / 8;
        found &= found - 1;
        out.push_str(&s[start..at]);
        match s.as_bytes()[at] {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            b => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
        start = at + 1;
    }
    start
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A byte JSON must escape in a string, byte by byte.
    fn escaped(b: u8) -> bool {
        b < 0x20 || b == b'"' || b == b'\\'
    }

    /// Strings with every kind of byte JSON treats apart, at every offset around the blocks.
    pub(crate) fn strings() -> Vec<String> {
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
            push_string(&mut ours, &s);
            assert_eq!(ours, serde_json::to_string(&s).unwrap(), "{s:?}");
        }
    }
}
