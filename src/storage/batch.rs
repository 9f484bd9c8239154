//! Multi-row statements for SQLite's group script (`script.rs`): a group's completions are one
//! UPDATE and one INSERT of attempts, however many deliveries finished, instead of two
//! statements each.

use super::{sql::decode, Claimed, Completion, StoreError};
use crate::domain::{AttemptRecord, MessageStatus, NewMessage};

/// One finished delivery.
pub(super) type Finished = (Claimed, Vec<AttemptRecord>, Completion, i64);

/// Rows per statement: keeps every statement under SQLite's 32,766 parameters.
pub(super) const CHUNK: usize = 256;

/// A query over the Any driver, before it is run.
pub(super) type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Whether `conn` is a SQLite connection.
pub(super) fn is_sqlite(conn: &sqlx::AnyConnection) -> bool {
    conn.backend_name() == "SQLite"
}

/// `rows` tuples of `columns` anonymous placeholders, bound in order: `(?, ?), (?, ?), ...`.
/// Not `$n`: SQLite looks every `$n` up in a list of the names seen so far while it parses,
/// which is quadratic in a statement of thousands.
fn placeholders(rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row; rows].join(", ")
}

/// `WITH v AS (VALUES ...) UPDATE messages ... RETURNING messages.id` for `rows` completions:
/// records each one whose lease token still matches.
pub(super) fn complete_sql(rows: usize) -> String {
    format!(
        "WITH v ({COMPLETION_COLUMNS}) AS (VALUES {}) UPDATE messages SET {COMPLETE_SET} \
         FROM v WHERE messages.id = v.id AND messages.lease_token = v.token \
         RETURNING messages.id",
        placeholders(rows, 9)
    )
}

/// A completion's values, in [`bind_completions`] order.
pub(super) const COMPLETION_COLUMNS: &str =
    "id, token, status, due_at, attempts, last_error, fallback, fallback_reason, now";

/// What a completion sets on its message, from the completion's row `v`.
pub(super) const COMPLETE_SET: &str = "status = v.status, due_at = v.due_at, \
     lease_token = NULL, attempt_count = messages.attempt_count + v.attempts, \
     last_error = v.last_error, fallback = v.fallback, fallback_reason = v.fallback_reason, \
     updated_at = v.now, sent_at = CASE WHEN v.status = 'SENT' THEN v.now ELSE messages.sent_at END";

/// Binds [`complete_sql`]'s values.
pub(super) fn bind_completions<'q>(mut query: AnyQuery<'q>, chunk: &'q [Finished]) -> AnyQuery<'q> {
    for (claimed, attempts, c, now) in chunk {
        query = query
            .bind(&claimed.message.id)
            .bind(&claimed.lease_token)
            .bind(c.status.as_str())
            .bind(c.retry_at)
            .bind(i64::try_from(attempts.len()).unwrap_or(1))
            .bind(&c.last_error)
            .bind(i64::from(c.fallback))
            .bind(&c.fallback_reason)
            .bind(*now);
    }
    query
}

pub(super) const ATTEMPT_COLUMNS: &str = "message_id, number, started_at, duration_us, server, \
     profile_id, fallback, reply_code, enhanced_code, reply_text, outcome, rejected_recipients";

/// Binds one attempt's columns, in [`ATTEMPT_COLUMNS`] order.
pub(super) fn bind_attempt<'q>(
    query: AnyQuery<'q>,
    id: &'q str,
    a: &'q AttemptRecord,
) -> Result<AnyQuery<'q>, StoreError> {
    let rejected = decode(serde_json::to_string(&a.rejected_recipients).map_err(Into::into))?;
    Ok(query
        .bind(id)
        .bind(i64::from(a.number))
        .bind(a.started_at)
        .bind(a.duration_us)
        .bind(&a.server)
        .bind(a.profile_id.as_deref())
        .bind(i64::from(a.fallback))
        .bind(i64::from(a.reply_code))
        .bind(&a.enhanced_code)
        .bind(&a.reply_text)
        .bind(a.outcome.as_str())
        .bind(rejected))
}

/// Inserts the attempts of `rows` completions whose lease token is still held: the same
/// check as [`complete_sql`], made before it (which clears the token). Values are the
/// token followed by [`ATTEMPT_COLUMNS`].
pub(super) fn held_attempts_sql(rows: usize) -> String {
    let values = placeholders(rows, 13);
    let picked: Vec<String> = ATTEMPT_COLUMNS
        .split(", ")
        .map(|c| format!("a.{c}"))
        .collect();
    format!(
        "WITH a (token, {ATTEMPT_COLUMNS}) AS (VALUES {values}) \
         INSERT INTO attempts ({ATTEMPT_COLUMNS}) SELECT {} FROM a \
         JOIN messages m ON m.id = a.message_id AND m.lease_token = a.token",
        picked.join(", ")
    )
}

/// Binds [`held_attempts_sql`]'s values: (token, message id, attempt) each.
pub(super) fn bind_held_attempts<'q>(
    mut query: AnyQuery<'q>,
    part: &[(&'q str, &'q str, &'q AttemptRecord)],
) -> Result<AnyQuery<'q>, StoreError> {
    for (token, id, a) in part {
        query = bind_attempt(query.bind(*token), id, a)?;
    }
    Ok(query)
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

/// Binds (tenant, email, message id) rows.
pub(super) fn bind_recipients<'q>(
    mut query: AnyQuery<'q>,
    part: &'q [(&'q str, String, &'q str)],
) -> AnyQuery<'q> {
    for (tenant, email, id) in part {
        query = query.bind(*tenant).bind(email.as_str()).bind(*id);
    }
    query
}

/// Inserts the recipients of the emails among `rows` that exist (were stored): the emails
/// of a script whose idempotency key was taken already are left out.
pub(super) fn stored_recipients_sql(rows: usize) -> String {
    let values = placeholders(rows, 3);
    format!(
        "WITH r (tenant_id, email, message_id) AS (VALUES {values}) \
         INSERT INTO message_recipients (tenant_id, email, message_id) \
         SELECT r.tenant_id, r.email, r.message_id FROM r \
         WHERE EXISTS (SELECT 1 FROM messages m WHERE m.id = r.message_id) \
         ON CONFLICT DO NOTHING"
    )
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

/// The columns an accepted email is stored with, in [`bind_messages`] order.
pub(super) const STORED_COLUMNS: &str = "id, tenant_id, status, source, email_type, subject, \
     sender, profile_id, profile_reason, template_id, campaign_id, content, message_id_header, \
     trace_id, tags, idempotency_key, request_hash, created_at, updated_at, send_at, due_at, \
     traceparent, lease_token";

/// `INSERT INTO messages ... RETURNING id` for `rows` emails; an email whose idempotency key
/// exists already is skipped (no id returned).
pub(super) fn insert_messages_sql(rows: usize) -> String {
    let values = placeholders(rows, STORED_COLUMNS.split(", ").count());
    format!(
        "INSERT INTO messages ({STORED_COLUMNS}) VALUES {values} \
         ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING id"
    )
}

/// Binds [`insert_messages_sql`]'s values.
pub(super) fn bind_messages<'q>(
    mut query: AnyQuery<'q>,
    chunk: &'q [Accepted<'q>],
) -> Result<AnyQuery<'q>, StoreError> {
    for (m, now) in chunk {
        let content = decode(serde_json::to_string(&m.content).map_err(Into::into))?;
        let tags = decode(serde_json::to_string(&m.tags).map_err(Into::into))?;
        let (status, due_at, lease_token) = stored_state(m, *now);
        query = query
            .bind(&m.id)
            .bind(&m.tenant_id)
            .bind(status.as_str())
            .bind(&m.source)
            .bind(&m.email_type)
            .bind(&m.content.subject)
            .bind(m.content.from.to_string())
            .bind(m.profile_id.as_deref())
            .bind(m.profile_reason.as_str())
            .bind(m.template_id.as_deref())
            .bind(m.campaign_id.as_deref())
            .bind(content)
            .bind(&m.message_id_header)
            .bind(&m.trace_id)
            .bind(tags)
            .bind(m.idempotency_key.as_deref())
            .bind(&m.request_hash)
            .bind(*now)
            .bind(*now)
            .bind(m.send_at)
            .bind(due_at)
            .bind(&m.traceparent)
            .bind(lease_token);
    }
    Ok(query)
}
