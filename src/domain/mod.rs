//! Parsed, validated domain types. Nothing here knows about gRPC, SQL or SMTP sessions.

mod address;
mod header;
mod message;
mod profile;
mod template;

pub use address::{EmailAddress, Mailbox};
pub use header::{validate_headers, Header};
pub use message::{
    Attachment, AttemptOutcome, AttemptRecord, Lease, LogFilter, MessageContent, MessageStatus,
    NewMessage, ProfileReason, StoredMessage,
};
pub use profile::{
    AuthMechanism, FallbackPolicy, ProfileSettings, ProfileStatus, Security, SendingLimits,
    SmtpProfile, TenantSettings, Verification, VerificationState,
};
pub use template::{Document, DocumentKind, SendingContext};

/// One invalid input field: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field path as the caller wrote it, e.g. `profile.port` or `to[2].email`.
    pub field: String,
    /// What is wrong, in plain language.
    pub description: String,
}

impl FieldError {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Collects field violations so a caller hears about all of them at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldError>);

impl Violations {
    /// Records one violation.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldError::new(field, description));
    }
    /// Records the violation of a failed check, if any.
    pub fn check<T>(&mut self, result: Result<T, FieldError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                self.0.push(e);
                None
            }
        }
    }
    /// Ok when nothing was recorded.
    pub fn finish(self) -> Result<(), Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// Checks that `value` has at most `max` characters.
pub fn check_max_len(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.chars().count() > max {
        Err(FieldError::new(
            field,
            format!("must be at most {max} characters"),
        ))
    } else {
        Ok(())
    }
}

/// Checks that a value bound for a header or an SMTP command has no CR, LF or NUL.
pub fn check_no_control(field: &str, value: &str) -> Result<(), FieldError> {
    if value.contains(['\r', '\n', '\0']) {
        Err(FieldError::new(field, "must not contain CR, LF or NUL"))
    } else {
        Ok(())
    }
}
