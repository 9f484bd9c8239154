//! Group commit: the hot writes (accepting an email, completing a delivery) from many
//! concurrent callers are queued to one writer task, which applies as many as are waiting in
//! one transaction and answers each caller after the commit. One commit (one fsync on
//! SQLite) then covers many emails, and SQLite's single writer lock is never fought over.
//!
//! An answer still means "committed": nothing is acknowledged before its transaction is.

use sqlx::{pool::PoolConnection, Any, AnyPool, Connection as _};
use tokio::sync::{mpsc, oneshot};

use super::{
    batch::{anonymous, complete_many, insert_many, Finished},
    combined, script,
    sql::{claim_one, db_error, replay_or_conflict, Backend},
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
/// [`MAX_GROUP_EMAILS`] emails.
fn drain(rx: &mut mpsc::Receiver<Op>, ops: &mut Vec<Op>) {
    let mut carried: usize = ops.iter().map(emails).sum();
    while ops.len() < MAX_GROUP && carried < MAX_GROUP_EMAILS {
        match rx.try_recv() {
            Ok(op) => {
                carried += emails(&op);
                ops.push(op);
            }
            Err(_) => break,
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
            drain(&mut rx, &mut ops);
            // Under concurrent load (the last group had company), let the callers that are
            // running now reach the queue before committing: one commit then covers more
            // emails. Each turn lets the runtime poll its sockets; stop after two turns that
            // brought nothing. A lone caller is never held up.
            let mut quiet = 0;
            while last_group > 1 && quiet < 2 && ops.len() < MAX_GROUP {
                let before = ops.len();
                tokio::task::yield_now().await;
                drain(&mut rx, &mut ops);
                quiet = if ops.len() == before { quiet + 1 } else { 0 };
            }
            ops
        };
        last_group = ops.len();
        if conn.is_none() {
            match pool.acquire().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    let e = db_error(e);
                    for op in ops {
                        fail(op, &e);
                    }
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

/// A group's operations sorted by kind, with where each answer goes.
struct Group {
    inserts: Vec<(NewMessage, i64)>,
    /// For each insert op: where its messages sit in `inserts`, and its reply.
    insert_ops: Vec<(std::ops::Range<usize>, InsertReply)>,
    finished: Vec<Finished>,
    complete_replies: Vec<Reply<bool>>,
    claims: Vec<ClaimOp>,
}

/// A claim: backend, now, lease end, most messages, and where the answer goes.
type ClaimOp = (Backend, i64, i64, u32, Reply<Vec<Claimed>>);

impl Group {
    fn new(ops: Vec<Op>) -> Self {
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
                    let (claimed, attempts, completion) = *c;
                    g.finished.push((claimed, attempts, completion, now));
                    g.complete_replies.push(reply);
                }
                Op::Claim(backend, now, until, limit, reply) => {
                    g.claims.push((backend, now, until, limit, reply));
                }
            }
        }
        g
    }

    /// Whether the group's writes fit in one PostgreSQL statement.
    fn fits_one_statement(&self) -> bool {
        let refs: Vec<(&NewMessage, i64)> = self.inserts.iter().map(|(m, now)| (m, *now)).collect();
        combined::fits(&refs, &self.finished)
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

/// Applies a group's operations with a few multi-row statements: all accepts together, all
/// completions together, then the claims. Once a statement fails, the operations left get
/// its error without touching the database (PostgreSQL refuses statements in a failed
/// transaction anyway); `commit_group` then rolls the whole group back.
async fn apply_group(conn: &mut sqlx::AnyConnection, group: Group) -> Vec<Done> {
    let Group {
        inserts,
        insert_ops,
        finished,
        complete_replies,
        claims,
    } = group;
    let mut done = Vec::with_capacity(insert_ops.len() + complete_replies.len() + claims.len());
    let mut failure: Option<StoreError> = None;
    if !inserts.is_empty() {
        let refs: Vec<(&NewMessage, i64)> = inserts.iter().map(|(m, now)| (m, *now)).collect();
        let results = match insert_many(conn, &refs).await {
            Ok(results) => Ok(results),
            Err(e) => {
                let copy = dup(&e);
                failure = Some(e);
                Err(copy)
            }
        };
        Group::insert_dones(insert_ops, results, &mut done);
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

/// Applies a group in as few round trips as the backend allows: on SQLite one script for
/// the whole transaction (see [`super::script`]), on PostgreSQL one statement for the
/// writes and one per claim (see [`super::combined`]). Emails whose idempotency key was
/// taken are answered after the commit, from the stored email. Returns false when the
/// connection should not be used again.
async fn commit_fast(conn: &mut sqlx::AnyConnection, group: Group, sqlite: bool) -> bool {
    let Group {
        inserts,
        insert_ops,
        finished,
        complete_replies,
        claims,
    } = group;
    let refs: Vec<(&NewMessage, i64)> = inserts.iter().map(|(m, now)| (m, *now)).collect();
    let claim_args: Vec<script::Claim> = claims
        .iter()
        .map(|(_, now, until, limit, _)| script::Claim::new(*now, *until, *limit))
        .collect();
    let outcome = if sqlite {
        script::run(conn, &refs, &finished, &claim_args).await
    } else {
        combined::run(conn, &refs, &finished, &claim_args).await
    };
    let mut done = Vec::with_capacity(insert_ops.len() + complete_replies.len() + claims.len());
    let (healthy, outcome) = match outcome {
        Ok(o) => (true, Ok(o)),
        Err((e, rolled_back)) => (rolled_back, Err(e)),
    };
    match outcome {
        Err(e) => {
            let results = Err(dup(&e));
            Group::insert_dones(insert_ops, results, &mut done);
            for reply in complete_replies {
                done.push(Done::Complete(Err(dup(&e)), reply));
            }
            for (.., reply) in claims {
                done.push(Done::Claim(Err(dup(&e)), reply));
            }
            for d in done {
                d.answer(Err(&e));
            }
        }
        Ok(mut outcome) => {
            let mut results = Vec::with_capacity(inserts.len());
            for (m, _) in &inserts {
                results.push(if outcome.created.contains(&m.id) {
                    Ok(InsertOutcome::Created)
                } else {
                    replay_or_conflict(conn, m).await
                });
            }
            Group::insert_dones(insert_ops, Ok(results), &mut done);
            for ((claimed, ..), reply) in finished.iter().zip(complete_replies) {
                let held = outcome.held.contains(&claimed.message.id);
                done.push(Done::Complete(Ok(held), reply));
            }
            for ((.., reply), claimed) in claims.into_iter().zip(outcome.claimed.drain(..)) {
                done.push(Done::Claim(Ok(claimed), reply));
            }
            for d in done {
                d.answer(Ok(()));
            }
        }
    }
    healthy
}

/// Where an insert op's answer goes.
enum InsertReply {
    One(Reply<InsertOutcome>),
    Many(Reply<Vec<Result<InsertOutcome, StoreError>>>),
}

/// Applies a group in one transaction. If the transaction cannot be used or committed, every
/// caller hears the error (nothing of theirs was committed). Returns false when the
/// connection should not be used again.
async fn commit_group(conn: &mut sqlx::AnyConnection, ops: Vec<Op>) -> bool {
    let group = Group::new(ops);
    let sqlite = anonymous(conn);
    if sqlite || group.fits_one_statement() {
        return commit_fast(conn, group, sqlite).await;
    }
    let mut tx = match conn.begin().await {
        Ok(tx) => tx,
        Err(e) => {
            let e = db_error(e);
            let mut done = Vec::new();
            Group::insert_dones(group.insert_ops, Err(dup(&e)), &mut done);
            done.extend(
                group
                    .complete_replies
                    .into_iter()
                    .map(|reply| Done::Complete(Err(dup(&e)), reply)),
            );
            done.extend(
                group
                    .claims
                    .into_iter()
                    .map(|(.., reply)| Done::Claim(Err(dup(&e)), reply)),
            );
            for d in done {
                d.answer(Err(&e));
            }
            return false;
        }
    };
    let done = apply_group(&mut tx, group).await;
    // A database error inside the group aborts the transaction (PostgreSQL refuses further
    // statements): nothing is committed and every caller hears it; they retry on their own
    // (a worker's lease expires, an RPC answers UNAVAILABLE or INTERNAL).
    if let Some(e) = done.iter().find_map(Done::failure) {
        let rolled_back = tx.rollback().await.is_ok();
        for d in done {
            d.answer(Err(&e));
        }
        return rolled_back;
    }
    let committed = tx.commit().await.map_err(db_error);
    let healthy = committed.is_ok();
    for d in done {
        d.answer(committed.as_ref().map(|_| ()));
    }
    healthy
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
