//! Group commit: the hot writes (accepting an email, completing a delivery) from many
//! concurrent callers are queued to one writer task, which applies as many as are waiting in
//! one transaction and answers each caller after the commit. One commit (one fsync on
//! SQLite) then covers many emails, and SQLite's single writer lock is never fought over.
//!
//! An answer still means "committed": nothing is acknowledged before its transaction is.

use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};

use super::{
    sql::{claim_one, complete_one, db_error, insert_one, Backend},
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
    fn failed(&self) -> bool {
        match self {
            Done::Insert(r, _) => {
                matches!(r, Err(StoreError::Unavailable(_) | StoreError::Other(_)))
            }
            Done::InsertMany(r, _) => r.is_err(),
            Done::Complete(r, _) => r.is_err(),
            Done::Claim(r, _) => r.is_err(),
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

async fn apply(conn: &mut sqlx::AnyConnection, op: Op) -> Done {
    match op {
        Op::Insert(m, now, tx) => Done::Insert(insert_one(conn, &m, now).await, tx),
        Op::InsertMany(ms, now, tx) => {
            let mut out = Vec::with_capacity(ms.len());
            let mut fatal = None;
            for m in &ms {
                match insert_one(conn, m, now).await {
                    Err(e @ (StoreError::Unavailable(_) | StoreError::Other(_))) => {
                        fatal = Some(e);
                        break;
                    }
                    r => out.push(r),
                }
            }
            Done::InsertMany(fatal.map_or(Ok(out), Err), tx)
        }
        Op::Claim(backend, now, until, limit, tx) => {
            Done::Claim(claim_one(conn, backend, now, until, limit).await, tx)
        }
        Op::Complete(c, now, tx) => {
            let (claimed, attempts, completion) = *c;
            Done::Complete(
                complete_one(conn, &claimed, &attempts, &completion, now).await,
                tx,
            )
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
    let mut done = Vec::with_capacity(ops.len());
    for op in ops {
        done.push(apply(&mut tx, op).await);
    }
    // A database error inside the group aborts the transaction (PostgreSQL refuses further
    // statements): nothing is committed and every caller hears it; they retry on their own
    // (a worker's lease expires, an RPC answers UNAVAILABLE or INTERNAL).
    if done.iter().any(Done::failed) {
        let _ = tx.rollback().await;
        let e = StoreError::Other(anyhow::anyhow!(
            "a write in the same group failed; nothing was committed"
        ));
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
