//! Email addresses and mailboxes.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use super::{check_max_len, check_no_control, FieldError};

/// A syntactically valid email address (`local@domain`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EmailAddress(String);

impl EmailAddress {
    /// Parses an address; `field` names it in the error.
    pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(FieldError::new(field, "is required"));
        }
        check_no_control(field, value)?;
        check_max_len(field, value, 254)?;
        lettre::Address::from_str(value)
            .map(|_| Self(value.to_owned()))
            .map_err(|_| FieldError::new(field, format!("{value:?} is not a valid email address")))
    }

    /// The address as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part after `@`, lowercased.
    pub fn domain(&self) -> String {
        self.0
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default()
    }
}

impl TryFrom<String> for EmailAddress {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse("address", &value).map_err(|e| e.description)
    }
}

impl From<EmailAddress> for String {
    fn from(value: EmailAddress) -> Self {
        value.0
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An address with an optional display name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mailbox {
    /// The address.
    pub email: EmailAddress,
    /// The display name; empty when none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

impl Mailbox {
    /// Parses a mailbox; `field` is the path of the mailbox message (e.g. `to[0]`).
    pub fn parse(field: &str, email: &str, name: &str) -> Result<Self, FieldError> {
        // The paths of the address and the name are written for an error only: two
        // `format!`s for every mailbox of every email were 1 % of mailgate's instructions.
        let at = |part: &'static str| {
            move |e: FieldError| FieldError {
                field: format!("{field}.{part}"),
                ..e
            }
        };
        let email = EmailAddress::parse(field, email).map_err(at("email"))?;
        check_no_control(field, name).map_err(at("name"))?;
        check_max_len(field, name, 255).map_err(at("name"))?;
        Ok(Self {
            email,
            name: name.trim().to_owned(),
        })
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            write!(f, "{}", self.email)
        } else {
            write!(f, "{:?} <{}>", self.name, self.email)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_and_names_field_on_invalid() {
        assert_eq!(
            EmailAddress::parse("to", "a@example.com").unwrap().domain(),
            "example.com"
        );
        let err = EmailAddress::parse("profile.from_email", "not-an-address").unwrap_err();
        assert_eq!(err.field, "profile.from_email");
        let err = EmailAddress::parse("to[0].email", "a@b.com\r\nBcc: x@y.z").unwrap_err();
        assert!(err.description.contains("CR, LF"));
        assert!(EmailAddress::parse("x", "").is_err());
    }
}
