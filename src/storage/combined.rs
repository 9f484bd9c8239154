//! PostgreSQL: a writer group's writes as one statement.
//!
//! Every statement is a network round trip to the database, and a group used to need up to
//! seven (BEGIN, the accepts, their recipients, the completions, their attempts, the claim,
//! COMMIT). Here the accepts, their recipients, the completions and their attempts are one
//! statement of data-modifying CTEs, which PostgreSQL runs atomically as its own
//! transaction; each claim is a statement of its own, run after the writes are answered. The conditions the multi-statement path
//! checks in Rust are in the SQL:
//! - recipients are stored for the emails the INSERT returned (an email whose idempotency
//!   key is taken returns nothing);
//! - attempts are stored for the completions the UPDATE returned (the lease was held).
//!
//! Groups too large for one statement's parameters take the multi-statement path.

use sqlx::Row as _;

use super::{
    batch::{
        bind_attempt, bind_completions, bind_messages, bind_recipients, completion_values,
        insert_messages_sql, placeholders_after, recipient_rows, Accepted, Finished,
        ATTEMPT_COLUMNS, COMPLETE_UPDATE, MESSAGE_PARAMS,
    },
    script::Outcome,
    sql::{db_error, decode},
    StoreError,
};
use crate::domain::{AttemptRecord, NewMessage};

/// Most parameters in the combined statement (PostgreSQL allows 65,535).
const MAX_PARAMETERS: usize = 60_000;

/// Rows of each part up to which a group's statement is kept prepared.
const SMALL_GROUP: usize = 4;

/// Parameters per row of each part.
const RECIPIENT_PARAMS: usize = 3;
const COMPLETION_PARAMS: usize = 9;
const ATTEMPT_PARAMS: usize = 12;

/// Whether the group's writes fit in one statement.
pub(super) fn fits<'a>(
    inserts: impl Iterator<Item = &'a NewMessage>,
    finished: &[Finished],
) -> bool {
    let (emails, recipients) = inserts.fold((0, 0), |(e, r), m| {
        (e + 1, r + m.content.recipients().count())
    });
    let attempts: usize = finished.iter().map(|(_, a, ..)| a.len()).sum();
    emails * MESSAGE_PARAMS
        + recipients * RECIPIENT_PARAMS
        + finished.len() * COMPLETION_PARAMS
        + attempts * ATTEMPT_PARAMS
        <= MAX_PARAMETERS
}

/// Runs the group's writes as one statement (its own transaction). Claims are separate
/// statements: the writer answers the writes first (see `commit_fast`).
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

async fn write(
    conn: &mut sqlx::AnyConnection,
    inserts: &[Accepted<'_>],
    finished: &[Finished],
    outcome: &mut Outcome,
) -> Result<(), StoreError> {
    let recipients = recipient_rows(inserts.iter());
    let attempts: Vec<(&str, &AttemptRecord)> = finished
        .iter()
        .flat_map(|(c, attempts, ..)| attempts.iter().map(move |a| (c.message.id.as_str(), a)))
        .collect();
    let mut ctes = Vec::new();
    let mut selects = Vec::new();
    let mut used = 0usize;
    if !inserts.is_empty() {
        ctes.push(format!(
            "ins AS ({})",
            insert_messages_sql(false, inserts.len())
        ));
        selects.push("SELECT 'created', id FROM ins");
        used += inserts.len() * MESSAGE_PARAMS;
        if !recipients.is_empty() {
            ctes.push(format!(
                "rcpt AS (INSERT INTO message_recipients (tenant_id, email, message_id) \
                 SELECT r.tenant_id, r.email, r.message_id \
                 FROM (VALUES {}) AS r (tenant_id, email, message_id) \
                 JOIN ins ON ins.id = r.message_id ON CONFLICT DO NOTHING)",
                placeholders_after(false, used, recipients.len(), RECIPIENT_PARAMS)
            ));
            used += recipients.len() * RECIPIENT_PARAMS;
        }
    }
    if !finished.is_empty() {
        ctes.push(completion_values(false, used, finished.len()));
        ctes.push(format!("upd AS ({COMPLETE_UPDATE})"));
        selects.push("SELECT 'held', id FROM upd");
        used += finished.len() * COMPLETION_PARAMS;
        if !attempts.is_empty() {
            let picked: Vec<String> = ATTEMPT_COLUMNS
                .split(", ")
                .map(|c| format!("a.{c}"))
                .collect();
            ctes.push(format!(
                "att AS (INSERT INTO attempts ({ATTEMPT_COLUMNS}) SELECT {} \
                 FROM (VALUES {}) AS a ({ATTEMPT_COLUMNS}) JOIN upd ON upd.id = a.message_id)",
                picked.join(", "),
                placeholders_after(false, used, attempts.len(), ATTEMPT_PARAMS)
            ));
        }
    }
    let sql = format!("WITH {} {}", ctes.join(", "), selects.join(" UNION ALL "));

    // Small groups repeat the same few shapes at a steady rate: keep those prepared, so
    // PostgreSQL plans each shape once per connection instead of once per group.
    let small = [
        inserts.len(),
        recipients.len(),
        finished.len(),
        attempts.len(),
    ]
    .iter()
    .all(|n| *n <= SMALL_GROUP);
    let mut query = sqlx::query(&sql).persistent(small);
    if !inserts.is_empty() {
        query = bind_messages(query, inserts)?;
        query = bind_recipients(query, &recipients);
    }
    if !finished.is_empty() {
        query = bind_completions(query, finished);
        for (id, a) in &attempts {
            query = bind_attempt(query, id, a)?;
        }
    }
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
