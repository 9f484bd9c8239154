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
//! Each part's rows travel as arrays, one parameter per column (`unnest`), so the
//! statement's text is the same for every group: PostgreSQL parses it once per connection
//! and keeps its plan, and no group is too large for the protocol's 65,535 parameters. With
//! a VALUES row of parameters per email, every group size was a new statement to parse and
//! plan. The arrays travel in PostgreSQL's binary format, so the server copies each value
//! instead of reading it character by character: with each part's rows as one JSON
//! document (`json_to_recordset`), parsing the JSON, every body included, took a sixth of
//! PostgreSQL's CPU per email.

use std::sync::LazyLock;

use sqlx::{postgres::PgArguments, Arguments as _, PgConnection, Postgres, Row as _};

use super::{
    batch::{
        json, recipient_rows, stored_state, Accepted, Finished, Outcome, ATTEMPT_COLUMNS,
        COMPLETE_SET, STORED_COLUMNS,
    },
    content_json::content_json,
    sql::{db_error, decode},
    StoreError,
};

/// Runs the group's writes as one statement (its own transaction). Claims are separate
/// statements: the writer answers the writes first (see `writer::group::commit_group`).
pub(super) async fn run(
    conn: &mut PgConnection,
    inserts: &[Accepted<'_>],
    finished: &[Finished],
) -> Result<Outcome, StoreError> {
    let mut outcome = Outcome::default();
    if !inserts.is_empty() || !finished.is_empty() {
        write(conn, inserts, finished, &mut outcome).await?;
    }
    Ok(outcome)
}

/// Each part's arrays: a column's name and PostgreSQL type, in the order they are bound.
/// The names are those of `STORED_COLUMNS`, `COMPLETION_COLUMNS` and `ATTEMPT_COLUMNS`, in
/// their order (a test checks it).
const MESSAGE_ARRAYS: [(&str, &str); 23] = [
    ("id", "text"),
    ("tenant_id", "text"),
    ("status", "text"),
    ("source", "text"),
    ("email_type", "text"),
    ("subject", "text"),
    ("sender", "text"),
    ("profile_id", "text"),
    ("profile_reason", "text"),
    ("template_id", "text"),
    ("campaign_id", "text"),
    ("content", "text"),
    ("message_id_header", "text"),
    ("trace_id", "text"),
    ("tags", "text"),
    ("idempotency_key", "text"),
    ("request_hash", "text"),
    ("created_at", "bigint"),
    ("updated_at", "bigint"),
    ("send_at", "bigint"),
    ("due_at", "bigint"),
    ("traceparent", "text"),
    ("lease_token", "text"),
];
const RECIPIENT_ARRAYS: [(&str, &str); 3] = [
    ("tenant_id", "text"),
    ("email", "text"),
    ("message_id", "text"),
];
const COMPLETION_ARRAYS: [(&str, &str); 9] = [
    ("id", "text"),
    ("token", "text"),
    ("status", "text"),
    ("due_at", "bigint"),
    ("attempts", "bigint"),
    ("last_error", "text"),
    ("fallback", "bigint"),
    ("fallback_reason", "text"),
    ("now", "bigint"),
];
const ATTEMPT_ARRAYS: [(&str, &str); 12] = [
    ("message_id", "text"),
    ("number", "bigint"),
    ("started_at", "bigint"),
    ("duration_us", "bigint"),
    ("server", "text"),
    ("profile_id", "text"),
    ("fallback", "bigint"),
    ("reply_code", "bigint"),
    ("enhanced_code", "text"),
    ("reply_text", "text"),
    ("outcome", "text"),
    ("rejected_recipients", "text"),
];

/// `unnest($first::type[], ...) AS alias (name, ...)`: a part's rows from its arrays,
/// which are parameters `first` on.
fn unnest(first: usize, alias: &str, arrays: &[(&str, &str)]) -> String {
    let params: Vec<String> = arrays
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("${}::{ty}[]", first + i))
        .collect();
    let names: Vec<&str> = arrays.iter().map(|(name, _)| *name).collect();
    format!(
        "unnest({}) AS {alias} ({})",
        params.join(", "),
        names.join(", ")
    )
}

/// The group's writes. The text never changes, so PostgreSQL parses and plans it once per
/// connection, whatever the group's size. The plan it keeps is a generic one, made without
/// the rows: `id = ANY(ARRAY(...))` makes the completions' UPDATE find its rows by primary
/// key (a plan made while the table was small scanned the whole table instead:
/// PostgreSQL's CPU per email doubled).
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
    // The conflict target carries the predicate `idempotency_key IS NOT NULL`: the unique
    // index of keys holds only the emails that have one (migration 0013), and a target
    // without the predicate would match no index. It also matched the older unique
    // constraint, so replicas from before 0013 kept accepting during the upgrade to it.
    //
    // Only the emails with a key go through ON CONFLICT. PostgreSQL inserts every row of an
    // INSERT ... ON CONFLICT speculatively, whether or not it could conflict: it searches
    // the arbiter index first, takes a lock in the lock manager for the row, and writes a
    // second WAL record to confirm it. An email without a key cannot conflict (its id is
    // new), and neither can its recipients (`recipient_rows` lists each once per email, and
    // only for emails this statement stored), so those are plain inserts: PostgreSQL's
    // instructions per SendEmail email -4 % (docs/benchmarks.md, 2026-12-08). The two kinds
    // of email travel as two sets of arrays, so that each row is built once: from one set,
    // read by both INSERTs, PostgreSQL kept every row in a temporary store (about 1 % more
    // instructions per SendEmail email, 3 % per SendBatch email).
    let accepts = format!(
        "unkeyed AS (INSERT INTO messages ({STORED_COLUMNS}) SELECT * FROM {} RETURNING id), \
         keyed AS (INSERT INTO messages ({STORED_COLUMNS}) SELECT * FROM {} \
           ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL \
           DO NOTHING RETURNING id), \
         ins AS (SELECT id FROM unkeyed UNION ALL SELECT id FROM keyed), \
         rcpt AS (INSERT INTO message_recipients (tenant_id, email, message_id) \
           SELECT r.tenant_id, r.email, r.message_id FROM {} \
           JOIN ins ON ins.id = r.message_id)",
        unnest(1, "r", &MESSAGE_ARRAYS),
        unnest(1 + MESSAGE_ARRAYS.len(), "r", &MESSAGE_ARRAYS),
        unnest(1 + 2 * MESSAGE_ARRAYS.len(), "r", &RECIPIENT_ARRAYS),
    );
    // `first` is the first of the completions' parameters.
    let completions = |first: usize| {
        format!(
            "v AS (SELECT * FROM {}), \
             upd AS (UPDATE messages SET {COMPLETE_SET} \
               FROM v WHERE messages.id = ANY(ARRAY(SELECT id FROM v)) \
               AND messages.id = v.id AND messages.lease_token = v.token \
               RETURNING messages.id), \
             att AS (INSERT INTO attempts ({ATTEMPT_COLUMNS}) \
               SELECT a.* FROM {} JOIN upd ON upd.id = a.message_id)",
            unnest(first, "v", &COMPLETION_ARRAYS),
            unnest(first + COMPLETION_ARRAYS.len(), "a", &ATTEMPT_ARRAYS),
        )
    };
    Statements {
        both: format!(
            "WITH {accepts}, {} \
             SELECT 'created', id FROM ins UNION ALL SELECT 'held', id FROM upd",
            completions(1 + 2 * MESSAGE_ARRAYS.len() + RECIPIENT_ARRAYS.len())
        ),
        accepts: format!("WITH {accepts} SELECT 'created', id FROM ins"),
        completions: format!("WITH {} SELECT 'held', id FROM upd", completions(1)),
    }
});

/// One column of a part: `f` of each row.
fn column<'a, T, U>(rows: &'a [T], f: impl Fn(&'a T) -> U) -> Vec<U> {
    rows.iter().map(f).collect()
}

/// Appends one array to the statement's parameters.
fn add<'q, T>(args: &mut PgArguments, array: T) -> Result<(), StoreError>
where
    T: sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + 'q,
{
    args.add(array)
        .map_err(|e| StoreError::Other(anyhow::anyhow!("encoding a group parameter: {e}")))
}

/// One column of JSON text: `f` of each row, encoded.
fn json_column<'a, T, U: serde::Serialize + 'a>(
    rows: &'a [T],
    f: impl Fn(&'a T) -> &'a U,
) -> Result<Vec<String>, StoreError> {
    rows.iter().map(|row| json(f(row))).collect()
}

/// The accepts' arrays: the columns of [`MESSAGE_ARRAYS`] for the emails without an
/// idempotency key, again for those with one, then the columns of [`RECIPIENT_ARRAYS`].
fn add_accepts(args: &mut PgArguments, inserts: &[Accepted<'_>]) -> Result<(), StoreError> {
    let (keyed, unkeyed): (Vec<Accepted<'_>>, Vec<Accepted<'_>>) = inserts
        .iter()
        .partition(|(m, _)| m.idempotency_key.is_some());
    add_messages(args, &unkeyed)?;
    add_messages(args, &keyed)?;
    let recipients = recipient_rows(inserts.iter());
    add(args, column(&recipients, |(tenant_id, ..)| *tenant_id))?;
    add(args, column(&recipients, |(_, email, _)| email.as_str()))?;
    add(args, column(&recipients, |(.., message_id)| *message_id))
}

/// The columns of [`MESSAGE_ARRAYS`] for `inserts`.
fn add_messages(args: &mut PgArguments, inserts: &[Accepted<'_>]) -> Result<(), StoreError> {
    let states = column(inserts, |(m, now)| stored_state(m, *now));
    add(args, column(inserts, |(m, _)| m.id.as_str()))?;
    add(args, column(inserts, |(m, _)| m.tenant_id.as_str()))?;
    add(args, column(&states, |(status, ..)| status.as_str()))?;
    add(args, column(inserts, |(m, _)| m.source.as_str()))?;
    add(args, column(inserts, |(m, _)| m.email_type.as_str()))?;
    add(args, column(inserts, |(m, _)| m.content.subject.as_str()))?;
    add(args, column(inserts, |(m, _)| m.content.from.to_string()))?;
    add(args, column(inserts, |(m, _)| m.profile_id.as_deref()))?;
    add(args, column(inserts, |(m, _)| m.profile_reason.as_str()))?;
    add(args, column(inserts, |(m, _)| m.template_id.as_deref()))?;
    add(args, column(inserts, |(m, _)| m.campaign_id.as_deref()))?;
    let contents = inserts.iter().map(|(m, _)| content_json(&m.content));
    add(args, contents.collect::<Vec<_>>())?;
    add(args, column(inserts, |(m, _)| m.message_id_header.as_str()))?;
    add(args, column(inserts, |(m, _)| m.trace_id.as_str()))?;
    add(args, json_column(inserts, |(m, _)| &m.tags)?)?;
    add(args, column(inserts, |(m, _)| m.idempotency_key.as_deref()))?;
    add(args, column(inserts, |(m, _)| m.request_hash.as_str()))?;
    add(args, column(inserts, |(_, now)| *now))?; // created_at
    add(args, column(inserts, |(_, now)| *now))?; // updated_at
    add(args, column(inserts, |(m, _)| m.send_at))?;
    add(args, column(&states, |(_, due_at, _)| *due_at))?;
    add(args, column(inserts, |(m, _)| m.traceparent.as_str()))?;
    add(args, column(&states, |(.., lease_token)| *lease_token))
}

/// The completions' arrays: the columns of [`COMPLETION_ARRAYS`], then of
/// [`ATTEMPT_ARRAYS`].
fn add_completions(args: &mut PgArguments, finished: &[Finished]) -> Result<(), StoreError> {
    add(args, column(finished, |(held, ..)| held.id.as_str()))?;
    add(args, column(finished, |(held, ..)| held.token.as_str()))?;
    add(args, column(finished, |(_, _, c, _)| c.status.as_str()))?;
    add(args, column(finished, |(_, _, c, _)| c.retry_at))?;
    add(
        args,
        column(finished, |(_, attempts, ..)| attempts.len() as i64),
    )?;
    add(args, column(finished, |(_, _, c, _)| c.last_error.as_str()))?;
    add(args, column(finished, |(_, _, c, _)| i64::from(c.fallback)))?;
    add(
        args,
        column(finished, |(_, _, c, _)| c.fallback_reason.as_str()),
    )?;
    add(args, column(finished, |(.., now)| *now))?;

    let attempts: Vec<_> = finished
        .iter()
        .flat_map(|(held, attempts, ..)| attempts.iter().map(move |a| (held.id.as_str(), a)))
        .collect();
    add(args, column(&attempts, |(id, _)| *id))?;
    add(args, column(&attempts, |(_, a)| i64::from(a.number)))?;
    add(args, column(&attempts, |(_, a)| a.started_at))?;
    add(args, column(&attempts, |(_, a)| a.duration_us))?;
    add(args, column(&attempts, |(_, a)| a.server.as_str()))?;
    add(args, column(&attempts, |(_, a)| a.profile_id.as_deref()))?;
    add(args, column(&attempts, |(_, a)| i64::from(a.fallback)))?;
    add(args, column(&attempts, |(_, a)| i64::from(a.reply_code)))?;
    add(args, column(&attempts, |(_, a)| a.enhanced_code.as_str()))?;
    add(args, column(&attempts, |(_, a)| a.reply_text.as_str()))?;
    add(args, column(&attempts, |(_, a)| a.outcome.as_str()))?;
    add(
        args,
        json_column(&attempts, |(_, a)| &a.rejected_recipients)?,
    )
}

async fn write(
    conn: &mut PgConnection,
    inserts: &[Accepted<'_>],
    finished: &[Finished],
    outcome: &mut Outcome,
) -> Result<(), StoreError> {
    let mut args = PgArguments::default();
    if !inserts.is_empty() {
        add_accepts(&mut args, inserts)?;
    }
    if !finished.is_empty() {
        add_completions(&mut args, finished)?;
    }
    let sql = match (inserts.is_empty(), finished.is_empty()) {
        (false, false) => WRITE.both.as_str(),
        (false, true) => WRITE.accepts.as_str(),
        (true, _) => WRITE.completions.as_str(),
    };
    let rows = sqlx::query_with(sql, args)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::batch::COMPLETION_COLUMNS;

    fn names(arrays: &[(&str, &str)]) -> String {
        let names: Vec<&str> = arrays.iter().map(|(name, _)| *name).collect();
        names.join(", ")
    }

    /// The arrays are bound in the order of the columns they are stored in.
    #[test]
    fn arrays_follow_the_stored_columns() {
        let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(names(&MESSAGE_ARRAYS), squash(STORED_COLUMNS));
        assert_eq!(names(&COMPLETION_ARRAYS), squash(COMPLETION_COLUMNS));
        assert_eq!(names(&ATTEMPT_ARRAYS), squash(ATTEMPT_COLUMNS));
    }

    #[test]
    fn parameters_are_numbered_across_the_parts() {
        let both = &WRITE.both;
        assert!(both.contains("unnest($1::text[], $2::text[]"));
        assert!(both.contains("$23::text[]) AS r ("));
        assert!(both.contains("unnest($24::text[], $25::text[]"));
        assert!(both.contains("$46::text[]) AS r ("));
        assert!(both.contains("unnest($47::text[], $48::text[], $49::text[]) AS r ("));
        assert!(both.contains("unnest($50::text[]"));
        assert!(both.contains("$70::text[]) AS a ("));
        assert!(!both.contains("$71"));
        assert!(WRITE.completions.contains("unnest($1::text[]"));
        assert!(WRITE.completions.contains("$21::text[]) AS a ("));
    }
}
