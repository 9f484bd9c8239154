//! Group commit: the hot writes (accepting an email, completing a delivery) from many
//! concurrent callers are queued to one writer task, which applies as many as are waiting in
//! one transaction and answers each caller after the commit. One commit (one fsync on
//! SQLite) then covers many emails, and SQLite's single writer lock is never fought over.
//!
//! An answer still means "committed": nothing is acknowledged before its transaction is.

use sqlx::{pool::PoolConnection, Any, AnyPool};
use tokio::sync::{mpsc, oneshot};

mod group;

use group::{commit_group, Group};

use super::{sql::db_error, Claimed, Completion, InsertOutcome, StoreError};
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
    Claim(i64, i64, u32, Reply<Vec<Claimed>>),
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
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        self.call(|r| Op::Claim(now, lease_until, limit, r)).await
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

/// Emails (accepted or completed) in one group at most: beyond that a group only holds
/// more memory (a SendBatch brings a thousand at once).
const MAX_GROUP_EMAILS: usize = 1024;

/// How many emails an operation carries.
fn emails(op: &Op) -> usize {
    match op {
        Op::InsertMany(ms, ..) => ms.len(),
        _ => 1,
    }
}

/// Moves the operations already queued into `ops`, up to [`MAX_GROUP`] operations and about
/// [`MAX_GROUP_EMAILS`] emails. Returns whether the group can take more.
fn drain(rx: &mut mpsc::Receiver<Op>, ops: &mut Vec<Op>) -> bool {
    let mut carried: usize = ops.iter().map(emails).sum();
    loop {
        if ops.len() >= MAX_GROUP || carried >= MAX_GROUP_EMAILS {
            return false;
        }
        match rx.try_recv() {
            Ok(op) => {
                carried += emails(&op);
                ops.push(op);
            }
            Err(_) => return true,
        }
    }
}

async fn run(pool: AnyPool, rx: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Op>>>) {
    // The writer keeps one connection: taking one from the pool and giving it back costs a
    // round trip to the database each time (sqlx pings a returned connection). A connection
    // that failed is dropped and replaced for the next group.
    let mut conn: Option<PoolConnection<Any>> = None;
    let mut last_group = 0;
    // Closing the pool waits for every connection to come back: give ours back then.
    let mut closed = Box::pin(pool.close_event());
    loop {
        // Take a group while holding the queue, then commit it without: another writer
        // gathers the next group meanwhile.
        let ops = {
            let mut rx = tokio::select! {
                rx = rx.lock() => rx,
                () = &mut closed => return,
            };
            let first = tokio::select! {
                op = rx.recv() => op,
                () = &mut closed => None,
            };
            let Some(first) = first else { return };
            let mut ops = vec![first];
            let mut room = drain(&mut rx, &mut ops);
            // Under concurrent load (the last group had company), let the callers that are
            // running now reach the queue before committing: one commit then covers more
            // emails. Each turn lets the runtime poll its sockets; stop after two turns that
            // brought nothing. A lone caller is never held up.
            let mut quiet = 0;
            while last_group > 1 && quiet < 2 && room {
                let before = ops.len();
                tokio::task::yield_now().await;
                room = drain(&mut rx, &mut ops);
                quiet = if ops.len() == before { quiet + 1 } else { 0 };
            }
            ops
        };
        last_group = ops.len();
        if conn.is_none() {
            match pool.acquire().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    Group::new(ops).fail(&db_error(e));
                    continue;
                }
            }
        }
        if let Some(c) = conn.as_mut() {
            if !commit_group(c, ops).await {
                conn = None;
            }
        }
    }
}
