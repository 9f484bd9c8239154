//! Group commit: the hot writes (accepting an email, completing a delivery) from many
//! concurrent callers are queued to one writer task, which applies as many as are waiting in
//! one transaction and answers each caller after the commit. One commit (one fsync on
//! SQLite) then covers many emails, and SQLite's single writer lock is never fought over.
//!
//! An answer still means "committed": nothing is acknowledged before its transaction is.

use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};

use super::{
    batch::{complete_many, insert_many},
    sql::{claim_one, db_error, Backend},
    Claimed, Completion, InsertOutcome, StoreError,
};
use crate::domain::{AttemptRecord, NewMessage};

/// Most operations applied in one transaction.
const MAX_GROUP: usize = 512;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

#[derive(Debug)]
enum Op {
    Insert(Box<NewMessage>, i64, Reply<InsertOutcome>),
    InsertMany(
        Vec<NewMessage>,
        i64,
        Reply<Vec<Result<InsertOutcome, StoreError>>>,
    ),
    Complete(
        Box<(Claimed, Vec<AttemptRecord>, Completion)>,
        i64,
        Reply<bool>,
    ),
    Claim(Backend, i64, i64, u32, Reply<Vec<Claimed>>),
}

/// The handle to the writer task.
#[derive(Debug, Clone)]
pub(super) struct Writer {
    queue: mpsc::Sender<Op>,
}

fn gone() -> StoreError {
    StoreError::Other(anyhow::anyhow!("the storage writer has stopped"))
}

impl Writer {
    /// Starts the writer task on `pool`.
    /// Starts `writers` writer tasks on `pool`: one for SQLite (one writer at a time anyway),
    /// several for PostgreSQL, where groups commit in parallel.
    pub(super) fn start(pool: AnyPool, writers: usize) -> Self {
        let (queue, rx) = mpsc::channel(4096);
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tokio::spawn(run(pool.clone(), rx.clone()));
        }
        Self { queue }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.queue.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub(super) async fn insert(
        &self,
        m: NewMessage,
        now: i64,
    ) -> Result<InsertOutcome, StoreError> {
        self.call(|r| Op::Insert(Box::new(m), now, r)).await
    }

    pub(super) async fn insert_many(
        &self,
        m: Vec<NewMessage>,
        now: i64,
    ) -> Result<Vec<Result<InsertOutcome, StoreError>>, StoreError> {
        self.call(|r| Op::InsertMany(m, now, r)).await
    }

    pub(super) async fn claim(
        &self,
        backend: Backend,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        self.call(|r| Op::Claim(backend, now, lease_until, limit, r))
            .await
    }

    pub(super) async fn complete(
        &self,
        claimed: Claimed,
        attempts: Vec<AttemptRecord>,
        completion: Completion,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.call(|r| Op::Complete(Box::new((claimed, attempts, completion)), now, r))
            .await
    }
}

/// What one operation produced, before its caller hears of it.
enum Done {
    Insert(Result<InsertOutcome, StoreError>, Reply<InsertOutcome>),
    InsertMany(
        Result<Vec<Result<InsertOutcome, StoreError>>, StoreError>,
        Reply<Vec<Result<InsertOutcome, StoreError>>>,
    ),
    Complete(Result<bool, StoreError>, Reply<bool>),
    Claim(Result<Vec<Claimed>, StoreError>, Reply<Vec<Claimed>>),
}

/// The same error again, for every caller of a failed group (keeps UNAVAILABLE apart).
fn dup(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::NotFound(w) => StoreError::NotFound(w),
        StoreError::Conflict(m) => StoreError::Conflict(m.clone()),
        StoreError::WrongState(m) => StoreError::WrongState(m.clone()),
        StoreError::Other(e) => StoreError::Other(anyhow::anyhow!("{e:#}")),
    }
}

impl Done {
    /// The error that spoils the whole group, if this operation failed in the database. (A
    /// single accept refused for its idempotency key does not: the group commits.) Every
    /// caller hears it, so a database outage is UNAVAILABLE for all of them.
    fn failure(&self) -> Option<StoreError> {
        let group_error = |e: &StoreError| {
            let spoiled = match e {
                StoreError::Unavailable(_) => dup(e),
                _ => StoreError::Other(anyhow::anyhow!(
                    "a write in the same group failed; nothing was committed"
                )),
            };
            Some(spoiled)
        };
        match self {
            Done::Insert(Err(e @ (StoreError::Unavailable(_) | StoreError::Other(_))), _)
            | Done::InsertMany(Err(e), _)
            | Done::Complete(Err(e), _)
            | Done::Claim(Err(e), _) => group_error(e),
            _ => None,
        }
    }

    /// Answers the caller; `commit` is the outcome of the transaction.
    fn answer(self, commit: Result<(), &StoreError>) {
        let err = dup;
        match self {
            Done::Insert(r, tx) => {
                let _ = tx.send(commit.map_err(err).and(r));
            }
            Done::InsertMany(r, tx) => {
                let _ = tx.send(commit.map_err(err).and(r));
            }
            Done::Complete(r, tx) => {
                let _ = tx.send(commit.map_err(err).and(r));
            }
            Done::Claim(r, tx) => {
                let _ = tx.send(commit.map_err(err).and(r));
            }
        }
    }
}

async fn run(pool: AnyPool, rx: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Op>>>) {
    loop {
        // Take a group while holding the queue, then commit it without: another writer
        // gathers the next group meanwhile.
        let ops = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            let mut ops = vec![first];
            while ops.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            ops
        };
        commit_group(&pool, ops).await;
    }
}

/// Applies a group's operations with a few multi-row statements: all accepts together, all
/// completions together, then the claims. Once a statement fails, the operations left get
/// its error without touching the database (PostgreSQL refuses statements in a failed
/// transaction anyway); `commit_group` then rolls the whole group back.
async fn apply_group(conn: &mut sqlx::AnyConnection, ops: Vec<Op>) -> Vec<Done> {
    let mut inserts: Vec<(NewMessage, i64)> = Vec::new();
    // For each insert op: where its messages sit in `inserts`, and its reply.
    let mut insert_ops: Vec<(std::ops::Range<usize>, InsertReply)> = Vec::new();
    let mut finished = Vec::new();
    let mut complete_replies = Vec::new();
    let mut claims = Vec::new();
    for op in ops {
        match op {
            Op::Insert(m, now, reply) => {
                let at = inserts.len();
                inserts.push((*m, now));
                insert_ops.push((at..at + 1, InsertReply::One(reply)));
            }
            Op::InsertMany(ms, now, reply) => {
                let at = inserts.len();
                inserts.extend(ms.into_iter().map(|m| (m, now)));
                insert_ops.push((at..inserts.len(), InsertReply::Many(reply)));
            }
            Op::Complete(c, now, reply) => {
                let (claimed, attempts, completion) = *c;
                finished.push((claimed, attempts, completion, now));
                complete_replies.push(reply);
            }
            Op::Claim(backend, now, until, limit, reply) => {
                claims.push((backend, now, until, limit, reply));
            }
        }
    }
    let mut done = Vec::with_capacity(insert_ops.len() + complete_replies.len() + claims.len());
    let mut failure: Option<StoreError> = None;
    if !inserts.is_empty() {
        let refs: Vec<(&NewMessage, i64)> = inserts.iter().map(|(m, now)| (m, *now)).collect();
        let mut results = match insert_many(conn, &refs).await {
            Ok(results) => Ok(results),
            Err(e) => {
                let copy = dup(&e);
                failure = Some(e);
                Err(copy)
            }
        };
        // Hand each op its slice of the results, last op first.
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
    if !finished.is_empty() {
        let held = match &failure {
            Some(e) => Err(dup(e)),
            None => complete_many(conn, &finished).await,
        };
        match held {
            Ok(held) => done.extend(
                held.into_iter()
                    .zip(complete_replies)
                    .map(|(h, reply)| Done::Complete(Ok(h), reply)),
            ),
            Err(e) => {
                done.extend(
                    complete_replies
                        .into_iter()
                        .map(|reply| Done::Complete(Err(dup(&e)), reply)),
                );
                failure.get_or_insert(e);
            }
        }
    }
    for (backend, now, until, limit, reply) in claims {
        let claimed = match &failure {
            Some(e) => Err(dup(e)),
            None => claim_one(conn, backend, now, until, limit).await,
        };
        done.push(Done::Claim(claimed, reply));
    }
    done
}

/// Where an insert op's answer goes.
enum InsertReply {
    One(Reply<InsertOutcome>),
    Many(Reply<Vec<Result<InsertOutcome, StoreError>>>),
}

/// Applies a group in one transaction. If the transaction cannot be used or committed, every
/// caller hears the error (nothing of theirs was committed).
async fn commit_group(pool: &AnyPool, ops: Vec<Op>) {
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => {
            let e = db_error(e);
            for op in ops {
                fail(op, &e);
            }
            return;
        }
    };
    let done = apply_group(&mut tx, ops).await;
    // A database error inside the group aborts the transaction (PostgreSQL refuses further
    // statements): nothing is committed and every caller hears it; they retry on their own
    // (a worker's lease expires, an RPC answers UNAVAILABLE or INTERNAL).
    if let Some(e) = done.iter().find_map(Done::failure) {
        let _ = tx.rollback().await;
        for d in done {
            d.answer(Err(&e));
        }
        return;
    }
    let committed = tx.commit().await.map_err(db_error);
    for d in done {
        d.answer(committed.as_ref().map(|_| ()));
    }
}

fn fail(op: Op, e: &StoreError) {
    let copy = || dup(e);
    match op {
        Op::Insert(_, _, tx) => {
            let _ = tx.send(Err(copy()));
        }
        Op::InsertMany(_, _, tx) => {
            let _ = tx.send(Err(copy()));
        }
        Op::Complete(_, _, tx) => {
            let _ = tx.send(Err(copy()));
        }
        Op::Claim(_, _, _, _, tx) => {
            let _ = tx.send(Err(copy()));
        }
    }
}
