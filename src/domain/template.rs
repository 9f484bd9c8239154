//! Templates and campaigns: named, tenant-owned sending contexts.

use serde::{Deserialize, Serialize};

use super::{Header, Mailbox};

/// Which kind of named document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DocumentKind {
    /// An email template.
    Template,
    /// A campaign.
    Campaign,
}

impl DocumentKind {
    /// The table holding this kind.
    pub fn table(self) -> &'static str {
        match self {
            Self::Template => "templates",
            Self::Campaign => "campaigns",
        }
    }
    /// The name used in errors.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Template => "email template",
            Self::Campaign => "campaign",
        }
    }
}

/// A stored template or campaign: identity and bookkeeping in columns, the rest as JSON.
#[derive(Debug, Clone)]
pub struct Document {
    /// The id.
    pub id: String,
    /// The owning tenant.
    pub tenant_id: String,
    /// Unique name within the tenant and kind.
    pub name: String,
    /// The bound profile, if any (a column, so profile deletion can find references).
    pub profile_id: Option<String>,
    /// Everything else, as JSON.
    pub body: String,
    /// Creation time, unix microseconds.
    pub created_at: i64,
    /// Last change, unix microseconds.
    pub updated_at: i64,
    /// Increases with each change.
    pub version: i64,
}

/// What a template or campaign contributes to an email.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SendingContext {
    /// Free text.
    pub description: String,
    /// Email type recorded in the log.
    pub email_type: String,
    /// Headers added to its emails.
    pub headers: Vec<Header>,
    /// Sender overriding the profile's.
    pub from: Option<Mailbox>,
    /// Reply-To overriding the profile's.
    pub reply_to: Option<String>,
    /// Subject template (templates only).
    pub subject: String,
    /// Plain-text body template (templates only).
    pub text_body: String,
    /// HTML body template (templates only).
    pub html_body: String,
}
