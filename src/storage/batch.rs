//! Multi-row statements for the writer's groups: a group's completions are one UPDATE and one
//! INSERT of attempts, however many deliveries finished, instead of two statements each.

use std::collections::HashSet;

use sqlx::Row as _;

use super::{
    sql::{db_error, decode, replay_or_conflict},
    Claimed, Completion, InsertOutcome, StoreError,
};
use crate::domain::{AttemptRecord, MessageStatus, NewMessage};

/// One finished delivery.
pub(super) type Finished = (Claimed, Vec<AttemptRecord>, Completion, i64);

/// Rows per statement: keeps every statement under SQLite's 32,766 parameters.
const CHUNK: usize = 256;

/// `rows` tuples of `columns` placeholders, bound in order: `($1, $2), ($3, $4), ...` on
/// PostgreSQL, `(?, ?), (?, ?), ...` on SQLite. SQLite looks every `$n` up in a list of the
/// names seen so far while it parses, which is quadratic in a statement of thousands.
fn placeholders(conn: &sqlx::AnyConnection, rows: usize, columns: usize) -> String {
    let anonymous = conn.backend_name() == "SQLite";
    (0..rows)
        .map(|r| {
            let p: Vec<String> = (1..=columns)
                .map(|c| {
                    if anonymous {
                        "?".to_owned()
                    } else {
                        format!("${}", r * columns + c)
                    }
                })
                .collect();
            format!("({})", p.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a statement of `rows` rows is worth keeping prepared: only full chunks, the
/// common size of large batches. Every other group size is another statement text, and
/// caching them all piles up prepared statements on each connection (peak RSS 133 MiB).
fn cacheable(rows: usize) -> bool {
    rows == CHUNK
}

/// Records the completions whose lease is still held; returns, for each, whether it was.
pub(super) async fn complete_many(
    conn: &mut sqlx::AnyConnection,
    items: &[Finished],
) -> Result<Vec<bool>, StoreError> {
    let mut held = HashSet::new();
    for chunk in items.chunks(CHUNK) {
        held.extend(update_chunk(conn, chunk).await?);
        let attempts: Vec<(&str, &AttemptRecord)> = chunk
            .iter()
            .filter(|(c, ..)| held.contains(&c.message.id))
            .flat_map(|(c, attempts, ..)| attempts.iter().map(|a| (c.message.id.as_str(), a)))
            .collect();
        for part in attempts.chunks(CHUNK) {
            insert_attempts(conn, part).await?;
        }
    }
    Ok(items
        .iter()
        .map(|(c, ..)| held.contains(&c.message.id))
        .collect())
}

async fn update_chunk(
    conn: &mut sqlx::AnyConnection,
    chunk: &[Finished],
) -> Result<Vec<String>, StoreError> {
    let values = placeholders(conn, chunk.len(), 9);
    // The same statement on both backends: a CTE names the VALUES columns.
    let sql = format!(
        "WITH v (id, token, status, due_at, attempts, last_error, fallback, fallback_reason, \
         now) AS (VALUES {values}) \
         UPDATE messages SET status = v.status, due_at = v.due_at, lease_token = NULL, \
         attempt_count = messages.attempt_count + v.attempts, last_error = v.last_error, \
         fallback = v.fallback, fallback_reason = v.fallback_reason, updated_at = v.now, \
         sent_at = CASE WHEN v.status = 'SENT' THEN v.now ELSE messages.sent_at END \
         FROM v WHERE messages.id = v.id AND messages.lease_token = v.token \
         RETURNING messages.id"
    );
    let mut query = sqlx::query(&sql).persistent(cacheable(chunk.len()));
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
    let rows = query.fetch_all(&mut *conn).await.map_err(db_error)?;
    rows.iter()
        .map(|r| r.try_get::<String, _>(0).map_err(db_error))
        .collect()
}

async fn insert_attempts(
    conn: &mut sqlx::AnyConnection,
    part: &[(&str, &AttemptRecord)],
) -> Result<(), StoreError> {
    let values = placeholders(conn, part.len(), 12);
    let sql = format!(
        "INSERT INTO attempts (message_id, number, started_at, duration_us, server, \
         profile_id, fallback, reply_code, enhanced_code, reply_text, outcome, \
         rejected_recipients) VALUES {values}"
    );
    let mut query = sqlx::query(&sql).persistent(cacheable(part.len()));
    for (id, a) in part {
        let rejected = decode(serde_json::to_string(&a.rejected_recipients).map_err(Into::into))?;
        query = query
            .bind(*id)
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
            .bind(rejected);
    }
    query.execute(&mut *conn).await.map_err(db_error)?;
    Ok(())
}

/// An email to store, and when it was accepted.
pub(super) type Accepted<'a> = (&'a NewMessage, i64);

/// Stores a group's emails with one INSERT per chunk (and one for their recipients); an
/// email whose idempotency key exists already is a replay or a conflict, as for one insert.
/// The outer error means nothing may be committed.
pub(super) async fn insert_many(
    conn: &mut sqlx::AnyConnection,
    items: &[Accepted<'_>],
) -> Result<Vec<Result<InsertOutcome, StoreError>>, StoreError> {
    let mut created = HashSet::new();
    for chunk in items.chunks(CHUNK) {
        created.extend(insert_chunk(conn, chunk).await?);
    }
    let recipients: Vec<(&str, String, &str)> = items
        .iter()
        .filter(|(m, _)| created.contains(&m.id))
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
        .collect();
    for part in recipients.chunks(CHUNK) {
        let values = placeholders(conn, part.len(), 3);
        let sql = format!(
            "INSERT INTO message_recipients (tenant_id, email, message_id) VALUES {values} \
             ON CONFLICT DO NOTHING"
        );
        let mut query = sqlx::query(&sql).persistent(cacheable(part.len()));
        for (tenant, email, id) in part {
            query = query.bind(*tenant).bind(email.as_str()).bind(*id);
        }
        query.execute(&mut *conn).await.map_err(db_error)?;
    }
    let mut out = Vec::with_capacity(items.len());
    for (m, _) in items {
        if created.contains(&m.id) {
            out.push(Ok(InsertOutcome::Created));
        } else {
            match replay_or_conflict(conn, m).await {
                Err(e @ (StoreError::Unavailable(_) | StoreError::Other(_))) => return Err(e),
                r => out.push(r),
            }
        }
    }
    Ok(out)
}

/// Inserts a chunk; returns the ids stored (an existing idempotency key stores nothing).
async fn insert_chunk(
    conn: &mut sqlx::AnyConnection,
    chunk: &[Accepted<'_>],
) -> Result<Vec<String>, StoreError> {
    let values = placeholders(conn, chunk.len(), 22);
    let sql = format!(
        "INSERT INTO messages (id, tenant_id, status, source, email_type, subject, sender, \
         profile_id, profile_reason, template_id, campaign_id, content, \
         message_id_header, trace_id, tags, idempotency_key, request_hash, created_at, \
         updated_at, send_at, due_at, traceparent) VALUES {values} \
         ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING id"
    );
    let mut query = sqlx::query(&sql).persistent(cacheable(chunk.len()));
    for (m, now) in chunk {
        let content = decode(serde_json::to_string(&m.content).map_err(Into::into))?;
        let tags = decode(serde_json::to_string(&m.tags).map_err(Into::into))?;
        let (status, due_at) = match m.send_at {
            Some(at) if at > *now => (MessageStatus::Scheduled, at),
            _ => (MessageStatus::Queued, *now),
        };
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
            .bind(&m.traceparent);
    }
    let rows = query.fetch_all(&mut *conn).await.map_err(db_error)?;
    rows.iter()
        .map(|r| r.try_get::<String, _>(0).map_err(db_error))
        .collect()
}
