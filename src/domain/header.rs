//! Custom header fields set by callers, profiles, campaigns and templates.

use serde::{Deserialize, Serialize};

use super::{check_max_len, check_no_control, FieldError};

/// A custom header field, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The field name.
    pub name: String,
    /// The field value.
    pub value: String,
}

/// Headers mailgate sets itself; callers may not set them.
const STRUCTURAL: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "date",
    "message-id",
    "return-path",
    "mime-version",
    "sender",
    "reply-to",
    "subject",
    "x-mailgate-id",
];

impl Header {
    /// Validates one header; `field` is its path (e.g. `headers[1]`).
    pub fn parse(field: &str, name: &str, value: &str) -> Result<Self, FieldError> {
        let name_field = format!("{field}.name");
        if name.is_empty() {
            return Err(FieldError::new(name_field, "is required"));
        }
        // RFC 5322 field name: printable US-ASCII except colon.
        if !name.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
            return Err(FieldError::new(
                name_field,
                format!("{name:?} is not a valid header field name"),
            ));
        }
        let lower = name.to_ascii_lowercase();
        if STRUCTURAL.contains(&lower.as_str()) || lower.starts_with("content-") {
            return Err(FieldError::new(
                name_field,
                format!("{name} is set by mailgate and cannot be set as a custom header"),
            ));
        }
        check_max_len(&name_field, name, 76)?;
        let value_field = format!("{field}.value");
        check_no_control(&value_field, value)?;
        check_max_len(&value_field, value, 998)?;
        Ok(Self {
            name: name.to_owned(),
            value: value.to_owned(),
        })
    }
}

/// Validates a list of `(name, value)` pairs under `field` (e.g. `headers`).
pub fn validate_headers<'a>(
    field: &str,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<Header>, Vec<FieldError>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, (name, value)) in headers.into_iter().enumerate() {
        match Header::parse(&format!("{field}[{i}]"), name, value) {
            Ok(h) => out.push(h),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_structural_and_injection() {
        assert!(Header::parse("h[0]", "X-Campaign", "spring").is_ok());
        assert_eq!(
            Header::parse("h[0]", "Bcc", "x@y.z").unwrap_err().field,
            "h[0].name"
        );
        assert!(Header::parse("h[0]", "Content-Type", "text/html").is_err());
        assert_eq!(
            Header::parse("h[0]", "X-A", "v\r\nBcc: evil@x.y")
                .unwrap_err()
                .field,
            "h[0].value"
        );
        assert!(Header::parse("h[0]", "Bad Name", "v").is_err());
    }
}
