//! PostgreSQL: a writer group's writes as one statement.
//!
//! Every statement is a network round trip to the database, and a group used to need up to
//! seven (BEGIN, the accepts, their recipients, the completions, their attempts, the claim,
//! COMMIT). Here the accepts, their recipients, the completions and their attempts are one
//! statement of data-modifying CTEs, which PostgreSQL runs atomically as its own
//! transaction; each claim is a statement of its own, run after the writes are answered.
//! Checks that would otherwise need a round trip each are in the SQL:
//! - recipients are stored for the emails the INSERT returned (an email whose idempotency
//!   key is taken returns nothing);
//! - attempts are stored for the completions the UPDATE returned (the lease was held).
//!
//! Each part's rows travel as one JSON parameter (`json_to_recordset`), so the statement's
//! text is the same for every group: PostgreSQL parses it once per connection and keeps its
//! plan, and no group is too large for the protocol's 65,535 parameters. With a VALUES row
//! of parameters per email, every group size was a new statement to parse and plan.

use std::{collections::BTreeMap, sync::LazyLock};

use serde::Serialize;
use sqlx::Row as _;

use super::{
    batch::{
        recipient_rows, stored_state, Accepted, Finished, Outcome, ATTEMPT_COLUMNS, COMPLETE_SET,
        STORED_COLUMNS,
    },
    sql::{db_error, decode},
    StoreError,
};
use crate::domain::MessageContent;

/// Runs the group's writes as one statement (its own transaction). Claims are separate
/// statements: the writer answers the writes first (see `writer::group::commit_group`).
pub(super) async fn run(
    conn: &mut sqlx::AnyConnection,
    inserts: &[Accepted<'_>],
    finished: &[Finished],
) -> Result<Outcome, StoreError> {
    let mut outcome = Outcome::default();
    if !inserts.is_empty() || !finished.is_empty() {
        write(conn, inserts, finished, &mut outcome).await?;
    }
    Ok(outcome)
}

/// The group's writes, with each part's rows as one JSON parameter: the text never changes,
/// so PostgreSQL parses and plans it once per connection, whatever the group's size. The
/// plan it keeps is a generic one, made without the rows: `id = ANY(ARRAY(...))` makes the
/// completions' UPDATE find its rows by primary key (a plan made while the table was small
/// scanned the whole table instead: PostgreSQL's CPU per email doubled). The JSON fields
/// are the columns of `STORED_COLUMNS`, `COMPLETION_COLUMNS` and `ATTEMPT_COLUMNS`.
///
/// A group with only accepts or only completions runs a statement of its parts alone: each
/// run sets up every part of its statement, rows or not, and below a few hundred groups a
/// second (one or two emails each) that set-up was a sixth of PostgreSQL's time.
struct Statements {
    both: String,
    accepts: String,
    completions: String,
}

static WRITE: LazyLock<Statements> = LazyLock::new(|| {
    let accepts = format!(
        "m AS (SELECT * FROM json_to_recordset($1::json) AS r (id text, tenant_id text, \
           status text, source text, email_type text, subject text, sender text, \
           profile_id text, profile_reason text, template_id text, campaign_id text, \
           content text, message_id_header text, trace_id text, tags text, \
           idempotency_key text, request_hash text, created_at bigint, updated_at bigint, \
           send_at bigint, due_at bigint, traceparent text, lease_token text)), \
         ins AS (INSERT INTO messages ({STORED_COLUMNS}) SELECT * FROM m \
           ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING id), \
         rcpt AS (INSERT INTO message_recipients (tenant_id, email, message_id) \
           SELECT r.tenant_id, r.email, r.message_id FROM json_to_recordset($2::json) \
           AS r (tenant_id text, email text, message_id text) \
           JOIN ins ON ins.id = r.message_id ON CONFLICT DO NOTHING)"
    );
    // `$n` is the first of the completions' two parameters.
    let completions = |n: u8| {
        format!(
            "v AS (SELECT * FROM json_to_recordset(${n}::json) AS r (id text, token text, \
               status text, due_at bigint, attempts bigint, last_error text, fallback bigint, \
               fallback_reason text, now bigint)), \
             upd AS (UPDATE messages SET {COMPLETE_SET} \
               FROM v WHERE messages.id = ANY(ARRAY(SELECT id FROM v)) \
               AND messages.id = v.id AND messages.lease_token = v.token \
               RETURNING messages.id), \
             att AS (INSERT INTO attempts ({ATTEMPT_COLUMNS}) \
               SELECT a.* FROM json_to_recordset(${}::json) AS a (message_id text, \
               number bigint, started_at bigint, duration_us bigint, server text, \
               profile_id text, fallback bigint, reply_code bigint, enhanced_code text, \
               reply_text text, outcome text, rejected_recipients text) \
               JOIN upd ON upd.id = a.message_id)",
            n + 1
        )
    };
    Statements {
        both: format!(
            "WITH {accepts}, {} \
             SELECT 'created', id FROM ins UNION ALL SELECT 'held', id FROM upd",
            completions(3)
        ),
        accepts: format!("WITH {accepts} SELECT 'created', id FROM ins"),
        completions: format!("WITH {} SELECT 'held', id FROM upd", completions(1)),
    }
});

/// One email as a row of [`WRITE`]'s `m`. Content, tags and rejected recipients go as JSON
/// values: PostgreSQL stores their JSON text in the TEXT column, unescaped only once.
#[derive(Serialize)]
struct MessageRow<'a> {
    id: &'a str,
    tenant_id: &'a str,
    status: &'static str,
    source: &'a str,
    email_type: &'a str,
    subject: &'a str,
    sender: String,
    profile_id: Option<&'a str>,
    profile_reason: &'static str,
    template_id: Option<&'a str>,
    campaign_id: Option<&'a str>,
    content: &'a MessageContent,
    message_id_header: &'a str,
    trace_id: &'a str,
    tags: &'a BTreeMap<String, String>,
    idempotency_key: Option<&'a str>,
    request_hash: &'a str,
    created_at: i64,
    updated_at: i64,
    send_at: Option<i64>,
    due_at: i64,
    traceparent: &'a str,
    lease_token: Option<&'a str>,
}

#[derive(Serialize)]
struct RecipientRow<'a> {
    tenant_id: &'a str,
    email: &'a str,
    message_id: &'a str,
}

#[derive(Serialize)]
struct CompletionRow<'a> {
    id: &'a str,
    token: &'a str,
    status: &'static str,
    due_at: Option<i64>,
    attempts: usize,
    last_error: &'a str,
    fallback: i64,
    fallback_reason: &'a str,
    now: i64,
}

#[derive(Serialize)]
struct AttemptRow<'a> {
    message_id: &'a str,
    number: u32,
    started_at: i64,
    duration_us: i64,
    server: &'a str,
    profile_id: Option<&'a str>,
    fallback: i64,
    reply_code: u16,
    enhanced_code: &'a str,
    reply_text: &'a str,
    outcome: &'static str,
    rejected_recipients: &'a [String],
}

fn json<T: Serialize>(rows: &[T]) -> Result<String, StoreError> {
    decode(serde_json::to_string(rows).map_err(Into::into))
}

async fn write(
    conn: &mut sqlx::AnyConnection,
    inserts: &[Accepted<'_>],
    finished: &[Finished],
    outcome: &mut Outcome,
) -> Result<(), StoreError> {
    let recipients = recipient_rows(inserts.iter());
    let messages: Vec<MessageRow> = inserts
        .iter()
        .map(|(m, now)| {
            let (status, due_at, lease_token) = stored_state(m, *now);
            MessageRow {
                id: &m.id,
                tenant_id: &m.tenant_id,
                status: status.as_str(),
                source: &m.source,
                email_type: &m.email_type,
                subject: &m.content.subject,
                sender: m.content.from.to_string(),
                profile_id: m.profile_id.as_deref(),
                profile_reason: m.profile_reason.as_str(),
                template_id: m.template_id.as_deref(),
                campaign_id: m.campaign_id.as_deref(),
                content: &m.content,
                message_id_header: &m.message_id_header,
                trace_id: &m.trace_id,
                tags: &m.tags,
                idempotency_key: m.idempotency_key.as_deref(),
                request_hash: &m.request_hash,
                created_at: *now,
                updated_at: *now,
                send_at: m.send_at,
                due_at,
                traceparent: &m.traceparent,
                lease_token,
            }
        })
        .collect();
    let recipients: Vec<RecipientRow> = recipients
        .iter()
        .map(|(tenant_id, email, message_id)| RecipientRow {
            tenant_id,
            email,
            message_id,
        })
        .collect();
    let completions: Vec<CompletionRow> = finished
        .iter()
        .map(|(held, attempts, c, now)| CompletionRow {
            id: &held.id,
            token: &held.token,
            status: c.status.as_str(),
            due_at: c.retry_at,
            attempts: attempts.len(),
            last_error: &c.last_error,
            fallback: i64::from(c.fallback),
            fallback_reason: &c.fallback_reason,
            now: *now,
        })
        .collect();
    let attempts: Vec<AttemptRow> = finished
        .iter()
        .flat_map(|(held, attempts, ..)| {
            attempts.iter().map(move |a| AttemptRow {
                message_id: &held.id,
                number: a.number,
                started_at: a.started_at,
                duration_us: a.duration_us,
                server: &a.server,
                profile_id: a.profile_id.as_deref(),
                fallback: i64::from(a.fallback),
                reply_code: a.reply_code,
                enhanced_code: &a.enhanced_code,
                reply_text: &a.reply_text,
                outcome: a.outcome.as_str(),
                rejected_recipients: &a.rejected_recipients,
            })
        })
        .collect();
    let query = match (messages.is_empty(), completions.is_empty()) {
        (false, false) => sqlx::query(WRITE.both.as_str())
            .bind(json(&messages)?)
            .bind(json(&recipients)?)
            .bind(json(&completions)?)
            .bind(json(&attempts)?),
        (false, true) => sqlx::query(WRITE.accepts.as_str())
            .bind(json(&messages)?)
            .bind(json(&recipients)?),
        (true, _) => sqlx::query(WRITE.completions.as_str())
            .bind(json(&completions)?)
            .bind(json(&attempts)?),
    };
    let rows = query.fetch_all(&mut *conn).await.map_err(db_error)?;
    for row in rows {
        let kind: String = row.try_get(0).map_err(db_error)?;
        let id: String = row.try_get(1).map_err(db_error)?;
        match kind.as_str() {
            "created" => outcome.created.insert(id),
            "held" => outcome.held.insert(id),
            other => {
                return decode(Err(anyhow::anyhow!(
                    "unexpected row kind {other:?} from a group statement"
                )))
            }
        };
    }
    Ok(())
}
