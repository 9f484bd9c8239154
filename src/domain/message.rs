//! Messages: what a caller asked to send, and its life in the log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Header, Mailbox};

/// Where a message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageStatus {
    /// Waiting for its send_at time.
    Scheduled,
    /// Waiting for a worker.
    Queued,
    /// Leased by a worker.
    Sending,
    /// Accepted by the server.
    Sent,
    /// Temporary failure; will be retried.
    Deferred,
    /// Permanent failure.
    Failed,
    /// Cancelled before sending.
    Cancelled,
}

impl MessageStatus {
    /// Every status, in proto order.
    pub const ALL: [Self; 7] = [
        Self::Scheduled,
        Self::Queued,
        Self::Sending,
        Self::Sent,
        Self::Deferred,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "SCHEDULED",
            Self::Queued => "QUEUED",
            Self::Sending => "SENDING",
            Self::Sent => "SENT",
            Self::Deferred => "DEFERRED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// Parses the stored name.
    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == value)
    }

    /// Whether the message will not change any more on its own.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Sent | Self::Failed | Self::Cancelled)
    }
}

/// Why a profile was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileReason {
    /// Named in the request.
    Request,
    /// The campaign's profile.
    Campaign,
    /// The template's profile.
    Template,
    /// The tenant's default profile.
    TenantDefault,
    /// The operator's system default service.
    SystemDefault,
}

impl ProfileReason {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "REQUEST",
            Self::Campaign => "CAMPAIGN",
            Self::Template => "TEMPLATE",
            Self::TenantDefault => "TENANT_DEFAULT",
            Self::SystemDefault => "SYSTEM_DEFAULT",
        }
    }
    /// Parses the stored name.
    pub fn parse(value: &str) -> Option<Self> {
        [
            Self::Request,
            Self::Campaign,
            Self::Template,
            Self::TenantDefault,
            Self::SystemDefault,
        ]
        .into_iter()
        .find(|r| r.as_str() == value)
    }
}

/// An attachment, stored with the message until it is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// File name.
    pub filename: String,
    /// MIME type.
    pub content_type: String,
    /// The bytes, base64 in storage.
    #[serde(with = "base64_bytes")]
    pub content: Vec<u8>,
}

/// What the message says and to whom: everything needed to compose it at send time.
///
/// Stored as JSON written by `storage::content_json` (by hand, for speed) and read back by
/// the derived `Deserialize`: a field added here goes there too (its test compares the two
/// writers and fails until it does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageContent {
    /// The From mailbox.
    pub from: Mailbox,
    /// Reply-To address, if any.
    #[serde(default)]
    pub reply_to: Option<String>,
    /// Envelope sender (bounce address), if not From.
    #[serde(default)]
    pub error_to: Option<String>,
    /// To recipients.
    pub to: Vec<Mailbox>,
    /// Cc recipients.
    #[serde(default)]
    pub cc: Vec<Mailbox>,
    /// Bcc recipients (never in a header).
    #[serde(default)]
    pub bcc: Vec<Mailbox>,
    /// Subject.
    pub subject: String,
    /// Plain-text body.
    #[serde(default)]
    pub text: Option<String>,
    /// HTML body.
    #[serde(default)]
    pub html: Option<String>,
    /// Custom headers, already merged and validated.
    #[serde(default)]
    pub headers: Vec<Header>,
    /// Attachments.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
}

impl MessageContent {
    /// Every envelope recipient: to, cc and bcc.
    pub fn recipients(&self) -> impl Iterator<Item = &Mailbox> {
        self.to.iter().chain(&self.cc).chain(&self.bcc)
    }

    /// About how many bytes the content holds in memory: its subject, bodies, headers and
    /// attachments (the parts that can be large), plus their names.
    pub fn held_bytes(&self) -> usize {
        let text = |s: &Option<String>| s.as_deref().map_or(0, str::len);
        self.subject.len()
            + text(&self.text)
            + text(&self.html)
            + self
                .headers
                .iter()
                .map(|h| h.name.len() + h.value.len())
                .sum::<usize>()
            + self
                .attachments
                .iter()
                .map(|a| a.filename.len() + a.content_type.len() + a.content.len())
                .sum::<usize>()
    }
}

/// A message about to be stored.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The id (UUIDv7: sorts by creation time).
    pub id: String,
    /// The tenant.
    pub tenant_id: String,
    /// The calling service.
    pub source: String,
    /// The email type.
    pub email_type: String,
    /// The chosen profile; None for the system default service.
    pub profile_id: Option<String>,
    /// Why.
    pub profile_reason: ProfileReason,
    /// Template, if any.
    pub template_id: Option<String>,
    /// Campaign, if any.
    pub campaign_id: Option<String>,
    /// The content.
    pub content: MessageContent,
    /// Deliver no earlier than this (unix microseconds).
    pub send_at: Option<i64>,
    /// The idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// Hash of the request, to tell a replay from a conflicting reuse of the key; empty when
    /// the email has no key.
    pub request_hash: String,
    /// Caller tags.
    pub tags: BTreeMap<String, String>,
    /// The Message-ID header value (without angle brackets).
    pub message_id_header: String,
    /// The trace id of the accepting request, if traced.
    pub trace_id: String,
    /// The W3C traceparent of the accepting request, if traced.
    pub traceparent: String,
    /// Set when the accepting process delivers the email itself: it is stored leased to that
    /// process (SENDING) instead of QUEUED, and needs no claim. Ignored for an email
    /// scheduled for later.
    pub lease: Option<Lease>,
}

impl NewMessage {
    /// Whether the email waits for a `send_at` after `now` (SCHEDULED) rather than being due.
    pub fn scheduled_after(&self, now: i64) -> bool {
        self.send_at.is_some_and(|at| at > now)
    }
}

/// A delivery lease taken when an email is stored (see [`NewMessage::lease`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The token that lets the holder complete the delivery.
    pub token: String,
    /// When the lease ends (unix microseconds); after that any worker may claim the email.
    pub until: i64,
}

/// A message as stored: log entry and queue item at once.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// The id.
    pub id: String,
    /// The tenant.
    pub tenant_id: String,
    /// Status.
    pub status: MessageStatus,
    /// The calling service.
    pub source: String,
    /// Email type.
    pub email_type: String,
    /// The chosen profile.
    pub profile_id: Option<String>,
    /// Why.
    pub profile_reason: ProfileReason,
    /// Whether fallback delivered it.
    pub fallback: bool,
    /// Why fallback happened.
    pub fallback_reason: String,
    /// Template.
    pub template_id: Option<String>,
    /// Campaign.
    pub campaign_id: Option<String>,
    /// Content.
    pub content: MessageContent,
    /// Message-ID header.
    pub message_id_header: String,
    /// Trace id.
    pub trace_id: String,
    /// The W3C traceparent of the accepting request ("" when not traced).
    pub traceparent: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Attempts so far.
    pub attempt_count: u32,
    /// Latest error.
    pub last_error: String,
    /// Created, unix microseconds.
    pub created_at: i64,
    /// Updated, unix microseconds.
    pub updated_at: i64,
    /// Accepted by the server, unix microseconds.
    pub sent_at: Option<i64>,
    /// When the next attempt is due.
    pub next_attempt_at: Option<i64>,
}

/// The outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// Accepted.
    Sent,
    /// Temporary failure.
    Deferred,
    /// Permanent failure.
    Failed,
}

impl AttemptOutcome {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "SENT",
            Self::Deferred => "DEFERRED",
            Self::Failed => "FAILED",
        }
    }
    /// Parses the stored name.
    pub fn parse(value: &str) -> Option<Self> {
        [Self::Sent, Self::Deferred, Self::Failed]
            .into_iter()
            .find(|o| o.as_str() == value)
    }
}

/// One delivery attempt as recorded in the log.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    /// 1 for the first.
    pub number: u32,
    /// Start, unix microseconds.
    pub started_at: i64,
    /// Duration in microseconds.
    pub duration_us: i64,
    /// "host:port" or "file-drop".
    pub server: String,
    /// Profile used; None for the system default service.
    pub profile_id: Option<String>,
    /// Whether this was a fallback attempt.
    pub fallback: bool,
    /// SMTP reply code; 0 when none was read.
    pub reply_code: u16,
    /// Enhanced status code.
    pub enhanced_code: String,
    /// Reply text or local error.
    pub reply_text: String,
    /// Outcome.
    pub outcome: AttemptOutcome,
    /// Recipients refused while others were accepted.
    pub rejected_recipients: Vec<String>,
}

/// Which log entries to list. Empty fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    /// Any of these statuses.
    pub statuses: Vec<MessageStatus>,
    /// Email type.
    pub email_type: Option<String>,
    /// Source.
    pub source: Option<String>,
    /// Profile.
    pub profile_id: Option<String>,
    /// Template.
    pub template_id: Option<String>,
    /// Campaign.
    pub campaign_id: Option<String>,
    /// A recipient, lowercased.
    pub recipient: Option<String>,
    /// Subject substring.
    pub subject_contains: Option<String>,
    /// Created at or after (unix microseconds).
    pub start: Option<i64>,
    /// Created before (unix microseconds).
    pub end: Option<i64>,
}

mod base64_bytes {
    use base64::{engine::general_purpose::STANDARD, Engine};
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(value))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}
