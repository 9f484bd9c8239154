//! Row <-> domain conversion for the SQL store.

use std::{collections::BTreeMap, sync::LazyLock};

use anyhow::Context;
use sqlx::{any::AnyRow, Row};

use super::sql::Backend;

use crate::domain::{
    AttemptOutcome, AttemptRecord, Document, MessageContent, MessageStatus, ProfileReason,
    ProfileStatus, SmtpProfile, StoredMessage,
};

/// Columns read by [`message_from_row`], in a form usable in SELECT and RETURNING, from
/// `messages` on PostgreSQL; [`message_columns`] gives a backend's.
pub(super) const MESSAGE_COLUMNS: &str = "id, tenant_id, status, source, email_type, \
     profile_id, profile_reason, fallback, fallback_reason, template_id, campaign_id, content, \
     message_id_header, trace_id, traceparent, tags, attempt_count, last_error, created_at, updated_at, \
     sent_at, due_at";

/// [`MESSAGE_COLUMNS`] on SQLite, in the same order: the content is in `message_contents`
/// (migration 0011), read by rowid in a subquery, which SELECT and RETURNING both take.
static SQLITE_MESSAGE_COLUMNS: LazyLock<String> = LazyLock::new(|| {
    MESSAGE_COLUMNS.replacen(
        " content,",
        " (SELECT c.content FROM message_contents c WHERE c.id = messages.content_id) \
         AS content,",
        1,
    )
});

/// The columns read by [`message_from_row`] on `backend`, from a query whose table is
/// `messages` (not aliased).
pub(super) fn message_columns(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => MESSAGE_COLUMNS,
        Backend::Sqlite => SQLITE_MESSAGE_COLUMNS.as_str(),
    }
}

/// Columns read by [`profile_from_row`].
pub(super) const PROFILE_COLUMNS: &str = "id, tenant_id, name, settings, secret_ciphertext, \
     status, verification, created_by, created_at, updated_at, version";

/// Columns read by [`attempt_from_row`].
pub(super) const ATTEMPT_COLUMNS: &str = "number, started_at, duration_us, server, profile_id, \
     fallback, reply_code, enhanced_code, reply_text, outcome, rejected_recipients";

/// Columns read by [`document_from_row`].
pub(super) const DOCUMENT_COLUMNS: &str =
    "id, tenant_id, name, profile_id, body, created_at, updated_at, version";

pub(super) fn document_from_row(row: &AnyRow) -> anyhow::Result<Document> {
    Ok(Document {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        profile_id: row.try_get("profile_id")?,
        body: row.try_get("body")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
    })
}

pub(super) fn profile_from_row(row: &AnyRow) -> anyhow::Result<SmtpProfile> {
    let settings: String = row.try_get("settings")?;
    let verification: String = row.try_get("verification")?;
    let status: String = row.try_get("status")?;
    Ok(SmtpProfile {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        settings: serde_json::from_str(&settings).context("profile settings")?,
        secret_ciphertext: row.try_get("secret_ciphertext")?,
        status: ProfileStatus::parse(&status).context("profile status")?,
        verification: serde_json::from_str(&verification).context("profile verification")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
    })
}

/// A row to read a message from: sqlx's, or the values the SQLite writer's own connection
/// returned for a claim.
pub(super) trait MessageRow {
    fn text(&self, column: &str) -> anyhow::Result<String>;
    fn opt_text(&self, column: &str) -> anyhow::Result<Option<String>>;
    fn int(&self, column: &str) -> anyhow::Result<i64>;
    fn opt_int(&self, column: &str) -> anyhow::Result<Option<i64>>;
}

/// sqlx's rows: the pool's (any backend) and a PostgreSQL writer's.
macro_rules! sqlx_message_row {
    ($($row:ty),*) => {$(
        impl MessageRow for $row {
            fn text(&self, column: &str) -> anyhow::Result<String> {
                Ok(self.try_get(column)?)
            }
            fn opt_text(&self, column: &str) -> anyhow::Result<Option<String>> {
                Ok(self.try_get(column)?)
            }
            fn int(&self, column: &str) -> anyhow::Result<i64> {
                Ok(self.try_get(column)?)
            }
            fn opt_int(&self, column: &str) -> anyhow::Result<Option<i64>> {
                Ok(self.try_get(column)?)
            }
        }
    )*};
}
sqlx_message_row!(AnyRow, sqlx::postgres::PgRow);

pub(super) fn message_from_row(row: &impl MessageRow) -> anyhow::Result<StoredMessage> {
    let status = MessageStatus::parse(&row.text("status")?).context("message status")?;
    let reason = row.text("profile_reason")?;
    let content = row.text("content")?;
    let tags = row.text("tags")?;
    let due_at = row.opt_int("due_at")?;
    Ok(StoredMessage {
        id: row.text("id")?,
        tenant_id: row.text("tenant_id")?,
        status,
        source: row.text("source")?,
        email_type: row.text("email_type")?,
        profile_id: row.opt_text("profile_id")?,
        profile_reason: ProfileReason::parse(&reason).context("profile reason")?,
        fallback: row.int("fallback")? != 0,
        fallback_reason: row.text("fallback_reason")?,
        template_id: row.opt_text("template_id")?,
        campaign_id: row.opt_text("campaign_id")?,
        content: serde_json::from_str::<MessageContent>(&content).context("message content")?,
        message_id_header: row.text("message_id_header")?,
        trace_id: row.text("trace_id")?,
        traceparent: row.text("traceparent")?,
        tags: serde_json::from_str::<BTreeMap<String, String>>(&tags).context("message tags")?,
        attempt_count: u32::try_from(row.int("attempt_count")?).unwrap_or(0),
        last_error: row.text("last_error")?,
        created_at: row.int("created_at")?,
        updated_at: row.int("updated_at")?,
        sent_at: row.opt_int("sent_at")?,
        // While SENDING, due_at is the lease end, not a planned attempt.
        next_attempt_at: if status == MessageStatus::Sending {
            None
        } else {
            due_at
        },
    })
}

pub(super) fn attempt_from_row(row: &AnyRow) -> anyhow::Result<AttemptRecord> {
    let outcome: String = row.try_get("outcome")?;
    let rejected: String = row.try_get("rejected_recipients")?;
    Ok(AttemptRecord {
        number: u32::try_from(row.try_get::<i64, _>("number")?).unwrap_or(0),
        started_at: row.try_get("started_at")?,
        duration_us: row.try_get("duration_us")?,
        server: row.try_get("server")?,
        profile_id: row.try_get("profile_id")?,
        fallback: row.try_get::<i64, _>("fallback")? != 0,
        reply_code: u16::try_from(row.try_get::<i64, _>("reply_code")?).unwrap_or(0),
        enhanced_code: row.try_get("enhanced_code")?,
        reply_text: row.try_get("reply_text")?,
        outcome: AttemptOutcome::parse(&outcome).context("attempt outcome")?,
        rejected_recipients: serde_json::from_str(&rejected).context("rejected recipients")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SQLite writer finds a claimed row's values by their place in `MESSAGE_COLUMNS`,
    /// and `message_from_row` by name: both hold only if SQLite's list names the same
    /// columns in the same order.
    #[test]
    fn sqlite_message_columns_are_the_same_columns_in_the_same_order() {
        let names = |list: &str| -> Vec<String> {
            list.split(", ")
                .map(|c| c.rsplit(' ').next().unwrap_or(c).to_owned())
                .collect()
        };
        assert_eq!(names(&SQLITE_MESSAGE_COLUMNS), names(MESSAGE_COLUMNS));
        assert!(SQLITE_MESSAGE_COLUMNS.contains("FROM message_contents"));
        assert!(!MESSAGE_COLUMNS.contains("message_contents"));
    }
}
