//! A writer group: its operations sorted by kind, how it is applied (one transaction on the
//! SQLite writer's own connection; one statement for the writes and one per claim on
//! PostgreSQL), and the answers.

use super::{
    dup, gone,
    sqlite::{Claim, SqliteWriter},
    Done, Leases, Op, Reply,
};
use crate::{
    domain::NewMessage,
    storage::{
        batch::{Finished, Outcome},
        combined,
        sql::{claim_one, db_error, replay_or_conflict},
        InsertOutcome, StoreError,
    },
};

/// A group's operations sorted by kind, with where each answer goes.
pub(super) struct Group {
    inserts: Vec<(NewMessage, i64)>,
    /// For each insert op: where its messages sit in `inserts`, and its reply.
    insert_ops: Vec<(std::ops::Range<usize>, InsertReply)>,
    finished: Vec<Finished>,
    complete_replies: Vec<Reply<bool>>,
    claims: Vec<ClaimOp>,
}

/// A claim: now, lease end, most messages, and where the answer goes.
type ClaimOp = (i64, i64, u32, Reply<Leases>);

impl Group {
    pub(super) fn new(ops: Vec<Op>) -> Self {
        let mut g = Group {
            inserts: Vec::new(),
            insert_ops: Vec::new(),
            finished: Vec::new(),
            complete_replies: Vec::new(),
            claims: Vec::new(),
        };
        for op in ops {
            match op {
                Op::Insert(m, now, reply) => {
                    let at = g.inserts.len();
                    g.inserts.push((*m, now));
                    g.insert_ops.push((at..at + 1, InsertReply::One(reply)));
                }
                Op::InsertMany(ms, now, reply) => {
                    let at = g.inserts.len();
                    g.inserts.extend(ms.into_iter().map(|m| (m, now)));
                    g.insert_ops
                        .push((at..g.inserts.len(), InsertReply::Many(reply)));
                }
                Op::Complete(c, now, reply) => {
                    let (held, attempts, completion) = *c;
                    g.finished.push((held, attempts, completion, now));
                    g.complete_replies.push(reply);
                }
                Op::Claim(now, until, limit, reply) => g.claims.push((now, until, limit, reply)),
            }
        }
        g
    }

    /// Answers every caller of the group with `e`: nothing of theirs was committed.
    pub(super) fn fail(self, e: &StoreError) {
        Self::fail_parts(self.insert_ops, self.complete_replies, self.claims, e);
    }

    fn fail_parts(
        insert_ops: Vec<(std::ops::Range<usize>, InsertReply)>,
        complete_replies: Vec<Reply<bool>>,
        claims: Vec<ClaimOp>,
        e: &StoreError,
    ) {
        let mut done = Vec::new();
        Self::insert_dones(insert_ops, Err(dup(e)), &mut done);
        done.extend(
            complete_replies
                .into_iter()
                .map(|reply| Done::Complete(Err(dup(e)), reply)),
        );
        done.extend(
            claims
                .into_iter()
                .map(|(.., reply)| Done::Claim(Err(dup(e)), reply)),
        );
        for d in done {
            d.answer(Err(e));
        }
    }

    /// Hands each insert op its slice of `results` (one per email, in order).
    fn insert_dones(
        insert_ops: Vec<(std::ops::Range<usize>, InsertReply)>,
        mut results: Result<Vec<Result<InsertOutcome, StoreError>>, StoreError>,
        done: &mut Vec<Done>,
    ) {
        // Last op first, so each takes the tail.
        for (range, reply) in insert_ops.into_iter().rev() {
            let mine = match &mut results {
                Ok(all) => Ok(all.drain(range.start..).collect::<Vec<_>>()),
                Err(e) => Err(dup(e)),
            };
            done.push(match reply {
                InsertReply::One(tx) => Done::Insert(
                    mine.and_then(|m| m.into_iter().next().unwrap_or_else(|| Err(gone()))),
                    tx,
                ),
                InsertReply::Many(tx) => Done::InsertMany(mine, tx),
            });
        }
    }
}

/// Applies a group on PostgreSQL: one statement for the writes (see
/// [`crate::storage::combined`]), then one per claim, on the writer's connection `conn`. If
/// the writes cannot be committed, every caller hears the error (nothing of theirs was
/// committed). Emails whose idempotency key was taken are answered after the commit, from
/// the stored email, read on `conn` too. Returns false when the connection should not be
/// used again: after a failed write or claim, which may mean that the connection is broken
/// (a database restart, a network cut), so the next group gets a new one.
pub(super) async fn commit_group(conn: &mut sqlx::PgConnection, ops: Vec<Op>) -> bool {
    let g = Group::new(ops);
    let refs: Vec<(&NewMessage, i64)> = g.inserts.iter().map(|(m, now)| (m, *now)).collect();
    let outcome = match combined::run(conn, &refs, &g.finished).await {
        Ok(outcome) => outcome,
        Err(e) => {
            g.fail(&e);
            return false;
        }
    };
    let results = insert_results::<sqlx::Postgres>(&g.inserts, &outcome, Ok(&mut *conn)).await;
    answer_writes(
        g.insert_ops,
        results,
        &g.finished,
        g.complete_replies,
        &outcome,
    );
    // Each claim is one statement, atomic on its own. A failed one may mean a broken
    // connection, as a failed write does.
    let mut usable = true;
    for (now, until, limit, reply) in g.claims {
        let leases = claim_one(conn, now, until, limit).await;
        usable &= leases.is_ok();
        Done::Claim(leases, reply).answer(Ok(()));
    }
    usable
}

/// Applies a group on SQLite: one transaction on the writer's own connection (see
/// [`super::sqlite`]). Emails whose idempotency key was taken are answered after the
/// commit, from the stored email, read through `pool`.
///
/// The group is handed to the writer's thread at the call; the future returned waits for
/// the commit and answers the callers. Groups handed over one after another commit in that
/// order, however their futures are run.
pub(super) fn commit_group_sqlite(
    db: &SqliteWriter,
    pool: sqlx::AnyPool,
    ops: Vec<Op>,
    place: tokio::sync::OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let g = Group::new(ops);
    let claim_args = g
        .claims
        .iter()
        .map(|&(now, until, limit, _)| Claim { now, until, limit })
        .collect();
    let applying = db.apply(g.inserts, g.finished, claim_args, place);
    let (insert_ops, complete_replies, claims) = (g.insert_ops, g.complete_replies, g.claims);
    async move {
        let (inserts, finished, applied) = applying.await;
        let (outcome, leased) = match applied {
            Ok(done) => done,
            Err(e) => {
                Group::fail_parts(insert_ops, complete_replies, claims, &e);
                return;
            }
        };
        let results = insert_answers(&pool, &inserts, &outcome).await;
        answer_writes(insert_ops, results, &finished, complete_replies, &outcome);
        for ((.., reply), rows) in claims.into_iter().zip(leased) {
            Done::Claim(Ok(Box::new(move || rows.decode())), reply).answer(Ok(()));
        }
    }
}

/// Each insert's answer (see [`insert_results`]), with a connection of `pool` to read stored
/// emails (SQLite: the writer's own connection is on its thread), taken only if an email
/// needs its stored row read back.
async fn insert_answers(
    pool: &sqlx::AnyPool,
    inserts: &[(NewMessage, i64)],
    outcome: &Outcome,
) -> Vec<Result<InsertOutcome, StoreError>> {
    let replays = inserts
        .iter()
        .any(|(m, _)| !outcome.created.contains(&m.id));
    if !replays {
        // Every email was created: no connection, and no error value made for nothing (an
        // error may capture a backtrace, with RUST_BACKTRACE set).
        return inserts.iter().map(|_| Ok(InsertOutcome::Created)).collect();
    }
    let mut conn = pool.acquire().await.map_err(db_error);
    let conn = match &mut conn {
        Ok(c) => Ok(&mut **c),
        Err(e) => Err(dup(e)),
    };
    insert_results::<sqlx::Any>(inserts, outcome, conn).await
}

/// Each insert's answer: created, or (its idempotency key was taken) the stored email's.
async fn insert_results<DB>(
    inserts: &[(NewMessage, i64)],
    outcome: &Outcome,
    mut conn: Result<&mut DB::Connection, StoreError>,
) -> Vec<Result<InsertOutcome, StoreError>>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (String, String, String): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let mut results = Vec::with_capacity(inserts.len());
    for (m, _) in inserts {
        results.push(if outcome.created.contains(&m.id) {
            Ok(InsertOutcome::Created)
        } else {
            match &mut conn {
                Ok(c) => replay_or_conflict::<DB>(c, m).await,
                Err(e) => Err(dup(e)),
            }
        });
    }
    results
}

/// Answers the committed writes: the callers hear it now, not after the claims.
fn answer_writes(
    insert_ops: Vec<(std::ops::Range<usize>, InsertReply)>,
    results: Vec<Result<InsertOutcome, StoreError>>,
    finished: &[Finished],
    complete_replies: Vec<Reply<bool>>,
    outcome: &Outcome,
) {
    let mut done = Vec::with_capacity(insert_ops.len() + complete_replies.len());
    Group::insert_dones(insert_ops, Ok(results), &mut done);
    for ((lease, ..), reply) in finished.iter().zip(complete_replies) {
        let held = outcome.held.contains(&lease.id);
        done.push(Done::Complete(Ok(held), reply));
    }
    for d in done {
        d.answer(Ok(()));
    }
}

/// Where an insert op's answer goes.
enum InsertReply {
    One(Reply<InsertOutcome>),
    Many(Reply<Vec<Result<InsertOutcome, StoreError>>>),
}
