//! SQLite: a writer group as one script.
//!
//! sqlx runs each SQLite connection on a thread of its own, and every statement is a round
//! trip to that thread: a wake-up there and one back. On a busy 2-core machine one such hop
//! took about 0.2 ms, and a group needed seven (BEGIN, the accepts, their recipients, the
//! attempts, the completions, the claim, COMMIT), so the single writer spent most of its
//! time waiting for threads to be scheduled. Here the whole group goes as one
//! multi-statement query, `BEGIN IMMEDIATE; ...; COMMIT`, with every value bound in order:
//! one hop. The statements are the same multi-row ones as the PostgreSQL path, except that
//! the conditions that path checks in Rust between statements are in the SQL:
//! - the recipients of an email are stored only if the email was (its idempotency key may be
//!   taken);
//! - attempts are stored only for completions whose lease token is still held, checked
//!   before the completion's update clears the token.
//!
//! If any statement fails, the script stops there and the transaction is rolled back.

use std::collections::HashSet;

use futures::TryStreamExt as _;
use sqlx::{Either, Executor as _, Row as _};

use super::{
    batch::{
        bind_completions, bind_held_attempts, bind_messages, bind_recipients, complete_sql,
        held_attempts_sql, insert_messages_sql, recipient_rows, stored_recipients_sql, Accepted,
        Finished, CHUNK,
    },
    rows::{message_from_row, MESSAGE_COLUMNS},
    sql::{db_error, decode},
    Claimed, StoreError,
};
use crate::domain::AttemptRecord;

/// One claim in a group: lease up to `limit` due messages at `now` until `until`.
#[derive(Debug)]
pub(super) struct Claim {
    pub(super) now: i64,
    pub(super) until: i64,
    pub(super) limit: u32,
}

/// What a committed script did.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    /// Emails stored (the others had an idempotency key that was taken).
    pub(super) created: HashSet<String>,
    /// Completions recorded (their lease was still held).
    pub(super) held: HashSet<String>,
    /// The messages each claim leased, in the order of the claims.
    pub(super) claimed: Vec<Vec<Claimed>>,
}

/// What rows a statement of the script returns.
enum Returns {
    Nothing,
    CreatedIds,
    HeldIds,
    Claimed(usize),
}

/// Runs the group as one transaction. On failure, returns the error and whether the
/// rollback went through (if not, the connection should not be used again).
pub(super) async fn run(
    conn: &mut sqlx::AnyConnection,
    inserts: &[Accepted<'_>],
    finished: &[Finished],
    claims: &[Claim],
) -> Result<Outcome, (StoreError, bool)> {
    match execute(conn, inserts, finished, claims).await {
        Ok(outcome) => Ok(outcome),
        Err(e) => {
            // The script stopped at the failing statement, inside its transaction.
            let rolled_back = match conn.execute("ROLLBACK").await {
                Ok(_) => true,
                Err(r) => r.to_string().contains("no transaction is active"),
            };
            Err((e, rolled_back))
        }
    }
}

async fn execute(
    conn: &mut sqlx::AnyConnection,
    inserts: &[Accepted<'_>],
    finished: &[Finished],
    claims: &[Claim],
) -> Result<Outcome, StoreError> {
    let recipients = recipient_rows(inserts.iter());
    let attempts: Vec<(&str, &str, &AttemptRecord)> = finished
        .iter()
        .flat_map(|(c, attempts, ..)| {
            attempts
                .iter()
                .map(move |a| (c.lease_token.as_str(), c.message.id.as_str(), a))
        })
        .collect();

    let mut statements = vec!["BEGIN IMMEDIATE".to_owned()];
    let mut returns = vec![Returns::Nothing];
    for chunk in inserts.chunks(CHUNK) {
        statements.push(insert_messages_sql(chunk.len()));
        returns.push(Returns::CreatedIds);
    }
    for part in recipients.chunks(CHUNK) {
        statements.push(stored_recipients_sql(part.len()));
        returns.push(Returns::Nothing);
    }
    for part in attempts.chunks(CHUNK) {
        statements.push(held_attempts_sql(part.len()));
        returns.push(Returns::Nothing);
    }
    for chunk in finished.chunks(CHUNK) {
        statements.push(complete_sql(chunk.len()));
        returns.push(Returns::HeldIds);
    }
    for i in 0..claims.len() {
        statements.push(format!(
            "UPDATE messages SET status = 'SENDING', lease_token = ?, due_at = ?, \
             updated_at = ? WHERE id IN (SELECT id FROM messages WHERE due_at IS NOT NULL \
             AND due_at <= ? ORDER BY due_at LIMIT ?) RETURNING {MESSAGE_COLUMNS}"
        ));
        returns.push(Returns::Claimed(i));
    }
    statements.push("COMMIT".to_owned());
    returns.push(Returns::Nothing);
    let sql = statements.join(";\n");

    // One lease token per claim.
    let tokens: Vec<String> = claims
        .iter()
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    // Bind in the statements' order.
    let mut query = sqlx::query(&sql).persistent(false);
    for chunk in inserts.chunks(CHUNK) {
        query = bind_messages(query, chunk)?;
    }
    for part in recipients.chunks(CHUNK) {
        query = bind_recipients(query, part);
    }
    for part in attempts.chunks(CHUNK) {
        query = bind_held_attempts(query, part)?;
    }
    for chunk in finished.chunks(CHUNK) {
        query = bind_completions(query, chunk);
    }
    for (claim, token) in claims.iter().zip(&tokens) {
        query = query
            .bind(token.as_str())
            .bind(claim.until)
            .bind(claim.now)
            .bind(claim.now)
            .bind(i64::from(claim.limit));
    }

    // The rows of each statement come first, then its result: count results to know which
    // statement a row belongs to.
    let mut outcome = Outcome {
        claimed: claims.iter().map(|_| Vec::new()).collect(),
        ..Outcome::default()
    };
    let mut at = 0usize;
    let mut stream = conn.fetch_many(query);
    while let Some(item) = stream.try_next().await.map_err(db_error)? {
        let row = match item {
            Either::Left(_) => {
                at += 1;
                continue;
            }
            Either::Right(row) => row,
        };
        match returns.get(at) {
            Some(Returns::CreatedIds) => {
                outcome.created.insert(row.try_get(0).map_err(db_error)?);
            }
            Some(Returns::HeldIds) => {
                outcome.held.insert(row.try_get(0).map_err(db_error)?);
            }
            Some(Returns::Claimed(i)) => {
                let message = decode(message_from_row(&row))?;
                outcome.claimed[*i].push(Claimed {
                    message,
                    lease_token: tokens[*i].clone(),
                });
            }
            Some(Returns::Nothing) | None => {
                return Err(StoreError::Other(anyhow::anyhow!(
                    "statement {at} of a group script returned rows"
                )));
            }
        }
    }
    if at != returns.len() {
        return Err(StoreError::Other(anyhow::anyhow!(
            "a group script ran {at} of its {} statements",
            returns.len()
        )));
    }
    Ok(outcome)
}
