//! What both backends' writer groups share: the columns an email is stored with, what a
//! completion sets, and what a committed group did.

use std::collections::HashSet;

use super::{Completion, StoreError};
use crate::domain::{AttemptRecord, MessageStatus, NewMessage};

/// The lease a finished delivery held: its message and token (all a completion needs of the
/// claim, so the message itself is not copied into the writer's queue).
#[derive(Debug)]
pub(super) struct Held {
    pub(super) id: String,
    pub(super) token: String,
}

/// One finished delivery.
pub(super) type Finished = (Held, Vec<AttemptRecord>, Completion, i64);

/// A completion's values, as the PostgreSQL group statement names them.
pub(super) const COMPLETION_COLUMNS: &str =
    "id, token, status, due_at, attempts, last_error, fallback, fallback_reason, now";

/// What a completion sets on its message, from the completion's row `v`.
pub(super) const COMPLETE_SET: &str = "status = v.status, due_at = v.due_at, \
     lease_token = NULL, attempt_count = messages.attempt_count + v.attempts, \
     last_error = v.last_error, fallback = v.fallback, fallback_reason = v.fallback_reason, \
     updated_at = v.now, sent_at = CASE WHEN v.status = 'SENT' THEN v.now ELSE messages.sent_at END";

/// The columns an attempt is stored with.
pub(super) const ATTEMPT_COLUMNS: &str = "message_id, number, started_at, duration_us, server, \
     profile_id, fallback, reply_code, enhanced_code, reply_text, outcome, rejected_recipients";

/// A value stored as JSON text (an email's content and tags, an attempt's rejected
/// recipients).
pub(super) fn json(value: &impl serde::Serialize) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Other(e.into()))
}

/// An email to store, and when it was accepted.
pub(super) type Accepted<'a> = (&'a NewMessage, i64);

/// (tenant, lowercased email, message id) for every distinct recipient of `items`.
pub(super) fn recipient_rows<'a>(
    items: impl Iterator<Item = &'a Accepted<'a>>,
) -> Vec<(&'a str, String, &'a str)> {
    items
        .flat_map(|(m, _)| {
            let mut emails: Vec<String> = m
                .content
                .recipients()
                .map(|r| r.email.as_str().to_ascii_lowercase())
                .collect();
            emails.sort_unstable();
            emails.dedup();
            emails
                .into_iter()
                .map(|e| (m.tenant_id.as_str(), e, m.id.as_str()))
        })
        .collect()
}

/// How an accepted email is stored: scheduled for later, leased to the accepting process, or
/// queued for any worker. Returns its status, `due_at` and lease token.
pub(super) fn stored_state(m: &NewMessage, now: i64) -> (MessageStatus, i64, Option<&str>) {
    match (m.send_at, &m.lease) {
        (Some(at), _) if m.scheduled_after(now) => (MessageStatus::Scheduled, at, None),
        (_, Some(lease)) => (
            MessageStatus::Sending,
            lease.until,
            Some(lease.token.as_str()),
        ),
        _ => (MessageStatus::Queued, now, None),
    }
}

/// The columns an accepted email is stored with.
pub(super) const STORED_COLUMNS: &str = "id, tenant_id, status, source, email_type, subject, \
     sender, profile_id, profile_reason, template_id, campaign_id, content, message_id_header, \
     trace_id, tags, idempotency_key, request_hash, created_at, updated_at, send_at, due_at, \
     traceparent, lease_token";

/// What a committed group did.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    /// Emails stored (the others had an idempotency key that was taken).
    pub(super) created: HashSet<String>,
    /// Completions recorded (their lease was still held).
    pub(super) held: HashSet<String>,
}
