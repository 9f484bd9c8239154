//! Group commit: the hot writes (accepting an email, completing a delivery) from many
//! concurrent callers are queued to one writer task, which applies as many as are waiting in
//! one transaction and answers each caller after the commit. One commit (one fsync on
//! SQLite) then covers many emails, and SQLite's single writer lock is never fought over.
//!
//! An answer still means "committed": nothing is acknowledged before its transaction is.

use sqlx::{
    pool::PoolConnection,
    postgres::{PgPool, PgPoolOptions},
    AnyPool, Executor as _, Postgres,
};
use tokio::sync::{mpsc, oneshot};

mod group;
mod sqlite;

use group::{commit_group, commit_group_sqlite, Group};
use sqlite::SqliteWriter;

use super::{batch::Held, sql::db_error, Claimed, Completion, InsertOutcome, StoreError};
use crate::domain::{AttemptRecord, NewMessage};

/// Most operations applied in one transaction.
const MAX_GROUP: usize = 512;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// The messages a claim leased, decoded when called (by the claiming caller, not the writer).
pub(super) type Leases = Box<dyn FnOnce() -> Result<Vec<Claimed>, StoreError> + Send>;

enum Op {
    Insert(Box<NewMessage>, i64, Reply<InsertOutcome>),
    InsertMany(
        Vec<NewMessage>,
        i64,
        Reply<Vec<Result<InsertOutcome, StoreError>>>,
    ),
    Complete(
        Box<(Held, Vec<AttemptRecord>, Completion)>,
        i64,
        Reply<bool>,
    ),
    Claim(i64, i64, u32, Reply<Leases>),
}

/// The handle to the writer task.
#[derive(Debug, Clone)]
pub(super) struct Writer {
    queue: mpsc::Sender<Op>,
    /// Where completions go: `queue`, or on PostgreSQL a writer of their own (see
    /// [`Writer::start`]).
    completions: mpsc::Sender<Op>,
    /// Where claims go: `completions`, or on PostgreSQL a writer of their own.
    claims: mpsc::Sender<Op>,
    /// PostgreSQL: the writers' own connections.
    connections: Option<PgPool>,
}

fn gone() -> StoreError {
    StoreError::Other(anyhow::anyhow!("the storage writer has stopped"))
}

impl Writer {
    /// Starts one writer for the SQLite file `sqlite` (one writer at a time anyway), with a
    /// connection of its own outside the pool (see [`sqlite`]).
    pub(super) fn start_sqlite(pool: AnyPool, sqlite: std::path::PathBuf) -> std::io::Result<Self> {
        let (queue, rx) = mpsc::channel(4096);
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        tokio::spawn(run_sqlite(pool, rx, SqliteWriter::start(sqlite)?));
        Ok(Self {
            completions: queue.clone(),
            claims: queue.clone(),
            queue,
            connections: None,
        })
    }

    /// Starts `writers` writer tasks (PostgreSQL), whose groups commit in parallel, with
    /// `completion_writer` one more for completions, and with `claim_writer` one more for
    /// claims. Each keeps a connection of `connections`, a pool of the writers' own (sized
    /// for them); `pool` is the readers' pool, whose closing stops the writers.
    ///
    /// Callers wait on an accept's commit, never on a completion's; in a shared statement a
    /// group's completions (an UPDATE that rewrites the row and its indexes, an attempt
    /// row) took about half of its time, and the accepting callers waited that out. On
    /// their own writer, completions gather for up to [`COMPLETION_LINGER`] and commit in
    /// groups of their own, beside the accepts. Claims used to go to the accepts' writers,
    /// where a claim waited for every SendBatch group of a thousand emails queued ahead of
    /// it, then to the completions' writer, where it waited for the group of completions
    /// ahead of it (2-3 ms under a burst) while the engine's sending slots ran dry; on a
    /// writer of their own (the engine claims one batch at a time) they run beside both,
    /// and SendBatch delivered 10 % more (docs/benchmarks.md). Without a claim writer,
    /// claims go where completions go; without a completion writer, both go to the
    /// accepts' writers.
    pub(super) fn start(
        pool: AnyPool,
        connections: PgPool,
        writers: usize,
        completion_writer: bool,
        claim_writer: bool,
    ) -> Self {
        // A queue of `capacity` operations and `tasks` writers sharing it.
        let spawn = |capacity: usize, tasks: usize| {
            let (queue, rx) = mpsc::channel(capacity);
            let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
            for _ in 0..tasks {
                tokio::spawn(run(pool.clone(), connections.clone(), rx.clone()));
            }
            queue
        };
        let queue = spawn(4096, writers.max(1));
        let completions = if completion_writer {
            spawn(4096, 1)
        } else {
            queue.clone()
        };
        // One claim at a time per engine; a few engines' worth of room.
        let claims = if claim_writer {
            spawn(16, 1)
        } else {
            completions.clone()
        };
        Self {
            queue,
            completions,
            claims,
            connections: Some(connections),
        }
    }

    /// Waits for the writers' connections to come back (each writer stops once the readers'
    /// pool closes, after the group it is committing), then closes them.
    pub(super) async fn close(&self) {
        if let Some(connections) = &self.connections {
            connections.close().await;
        }
    }

    async fn call<T>(
        queue: &mpsc::Sender<Op>,
        make: impl FnOnce(Reply<T>) -> Op,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        queue.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub(super) async fn insert(
        &self,
        m: NewMessage,
        now: i64,
    ) -> Result<InsertOutcome, StoreError> {
        Self::call(&self.queue, |r| Op::Insert(Box::new(m), now, r)).await
    }

    pub(super) async fn insert_many(
        &self,
        m: Vec<NewMessage>,
        now: i64,
    ) -> Result<Vec<Result<InsertOutcome, StoreError>>, StoreError> {
        Self::call(&self.queue, |r| Op::InsertMany(m, now, r)).await
    }

    pub(super) async fn claim(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError> {
        // Decoded here, by the caller: the writer goes on with the next group meanwhile.
        Self::call(&self.claims, |r| Op::Claim(now, lease_until, limit, r)).await?()
    }

    pub(super) async fn complete(
        &self,
        claimed: &Claimed,
        attempts: Vec<AttemptRecord>,
        completion: Completion,
        now: i64,
    ) -> Result<bool, StoreError> {
        let held = Held {
            id: claimed.message.id.clone(),
            token: claimed.lease_token.clone(),
        };
        Self::call(&self.completions, |r| {
            Op::Complete(Box::new((held, attempts, completion)), now, r)
        })
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
    Claim(Result<Leases, StoreError>, Reply<Leases>),
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

/// Takes the next group off the queue: the first operation to come, what is waiting behind
/// it, and under load what arrives in the next turns of the runtime. None when the pool
/// closes or every handle is gone.
async fn next_group(
    rx: &tokio::sync::Mutex<mpsc::Receiver<Op>>,
    closed: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>,
    last_group: usize,
) -> Option<Vec<Op>> {
    // Take a group while holding the queue, then commit it without: another writer gathers
    // the next group meanwhile.
    // Biased: operations already queued are committed before the writer stops.
    let mut rx = tokio::select! {
        biased;
        rx = rx.lock() => rx,
        () = closed.as_mut() => return None,
    };
    let first = tokio::select! {
        biased;
        op = rx.recv() => op,
        () = closed.as_mut() => None,
    };
    let mut ops = vec![first?];
    let room = drain(&mut rx, &mut ops) && gather(&mut rx, &mut ops, last_group).await;
    if room && ops.iter().all(|op| matches!(op, Op::Complete(..))) {
        // A caller that ends the wait is usually the first of many: the callers that the
        // last commit answered come back together. Gathered as at the start of a group,
        // they share this commit. Taken alone, the first one made a commit of its own in
        // most rounds of a SendEmail burst on SQLite (720-772 of 1,615-1,662 groups held
        // one accepted email and the completions that had waited; the rest of the round
        // followed in the next commit); gathered, 344-401 of 1,207-1,264 groups
        // (docs/benchmarks.md, 2026-12-07, second session).
        if linger(&mut rx, &mut ops).await {
            gather(&mut rx, &mut ops, last_group).await;
        }
    }
    Some(ops)
}

/// Under concurrent load (the last group had company), lets the callers that are running now
/// reach the queue before committing: one commit then covers more emails. Each turn lets the
/// runtime poll its sockets; stops after two turns that brought nothing. A lone caller is
/// never held up. Returns whether the group can take more.
async fn gather(rx: &mut mpsc::Receiver<Op>, ops: &mut Vec<Op>, last_group: usize) -> bool {
    let mut room = true;
    let mut quiet = 0;
    while last_group > 1 && quiet < 2 && room {
        let before = ops.len();
        tokio::task::yield_now().await;
        room = drain(rx, ops);
        quiet = if ops.len() == before { quiet + 1 } else { 0 };
    }
    room
}

/// How long a group of completions alone waits for company.
///
/// No caller waits on a completion's commit: it only marks a delivered email SENT (or due
/// again), and the engine gave the delivery's slot back before asking for it. Committed
/// alone, each completion cost a commit of its own: at 1,000 SendEmail/s on PostgreSQL, one
/// transaction in two was a single completion. Waiting lets it ride with the next accepted
/// email's commit instead (SQLite), or with the completions of the next few milliseconds
/// (PostgreSQL's completion writer). A crash during the wait leaves the email leased; it is
/// sent again when the lease ends, as after a crash during the delivery itself.
const COMPLETION_LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// Waits up to [`COMPLETION_LINGER`] for more operations to join a group of completions;
/// the first operation some caller waits on (an accept, a claim) ends the wait at once. (On
/// PostgreSQL's completion writer only claims can come, and only without a claim writer.)
/// Returns whether such an operation ended it, with room left in the group.
async fn linger(rx: &mut mpsc::Receiver<Op>, ops: &mut Vec<Op>) -> bool {
    let deadline = tokio::time::Instant::now() + COMPLETION_LINGER;
    loop {
        let op = tokio::select! {
            op = rx.recv() => op,
            () = tokio::time::sleep_until(deadline) => None,
        };
        let Some(op) = op else { return false };
        let awaited = !matches!(op, Op::Complete(..));
        ops.push(op);
        let room = drain(rx, ops);
        if !room || awaited {
            return room && awaited;
        }
    }
}

/// The SQLite writer: groups go to its own connection's thread; the pool serves only the
/// rare reads a group needs afterwards.
///
/// The next group is gathered while the thread applies the last one, and waits on the
/// thread's queue behind it: each group joins the queue here, in the loop, and one thread
/// applies them in order, so they commit in order. Gathered only after the commit, a group
/// waited for the callers that the commit had just answered to come back, and the thread
/// idled meanwhile (1.3 ms of a 3 ms cycle under a burst of 32 callers).
///
/// A group gives its place at the thread back once it is committed: its callers then wait
/// for the sync of the WAL on another thread (`sqlite::syncs`), and the group after next is
/// gathered meanwhile. Held until the answers, the places ran out while a sync was under
/// way, and the thread waited with them: with every sync made 2 ms slower (a slower disk,
/// emulated) SendEmail on SQLite delivered 8 % less (docs/benchmarks.md, 2026-12-07, fifth
/// session).
async fn run_sqlite(
    pool: AnyPool,
    rx: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Op>>>,
    db: SqliteWriter,
) {
    /// Groups at the thread: one applied, the next waiting for it.
    const AT_THREAD: usize = 2;
    let places = std::sync::Arc::new(tokio::sync::Semaphore::new(AT_THREAD));
    let mut answering = tokio::task::JoinSet::new();
    let mut last_group = 0;
    let mut closed = Box::pin(pool.close_event());
    loop {
        // The semaphore is never closed.
        let Ok(place) = places.clone().acquire_owned().await else {
            break;
        };
        let Some(ops) = next_group(&rx, &mut closed, last_group).await else {
            break;
        };
        last_group = ops.len();
        answering.spawn(commit_group_sqlite(&db, pool.clone(), ops, place));
        while answering.try_join_next().is_some() {}
    }
    // The groups still in flight are answered before the writer ends.
    while answering.join_next().await.is_some() {}
}

async fn run(
    pool: AnyPool,
    connections: PgPool,
    rx: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Op>>>,
) {
    // The writer keeps its connection: taking one from a pool and giving it back costs a
    // round trip to the database each time (sqlx pings a returned connection). A connection
    // that failed is closed and replaced for the next group. It is opened before the first
    // group: opening it (TLS, authentication) on the first email held the first callers up.
    let mut conn: Option<PoolConnection<Postgres>> = connections.acquire().await.ok();
    let mut last_group = 0;
    // The readers' pool closing stops the writer, after the group it is committing.
    let mut closed = Box::pin(pool.close_event());
    while let Some(ops) = next_group(&rx, &mut closed, last_group).await {
        last_group = ops.len();
        let taken = match conn.take() {
            Some(c) => Ok(c),
            None => connections.acquire().await.map_err(db_error),
        };
        let mut c = match taken {
            Ok(c) => c,
            Err(e) => {
                Group::new(ops).fail(&e);
                continue;
            }
        };
        if commit_group(&mut c, ops).await {
            conn = Some(c);
        } else {
            // It may be broken: close it rather than give it back.
            let _ = c.close().await;
        }
    }
}

/// The pool of the PostgreSQL writers' connections (`size` of them), set up for writing.
///
/// On PostgreSQL, a writer's statements never scan `messages`: they find its rows by key.
/// Yet each is prepared once per connection, and PostgreSQL keeps a generic plan made with
/// the table's statistics of that moment. A server started on an empty table kept a
/// sequential scan for the completions' UPDATE until the next ANALYZE (`auto_explain`
/// showed it after 10,000 emails), so each completion read the whole table. Without
/// sequential scans the planner uses the keys whatever the statistics say.
///
/// The writers' connections are PostgreSQL's own, not the `Any` pool's: they send each
/// group's rows as binary arrays (see [`crate::storage::combined`]). The pool opens them
/// when the writers start, not here.
pub(super) fn connections(
    options: sqlx::postgres::PgConnectOptions,
    size: u32,
    acquire_timeout: std::time::Duration,
) -> PgPool {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(acquire_timeout)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute("SET enable_seqscan = off").await?;
                Ok(())
            })
        })
        .connect_lazy_with(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MessageStatus;

    fn completion() -> Op {
        let held = Held {
            id: "m".into(),
            token: "t".into(),
        };
        let done = Completion {
            status: MessageStatus::Sent,
            retry_at: None,
            last_error: String::new(),
            fallback: false,
            fallback_reason: String::new(),
        };
        Op::Complete(Box::new((held, Vec::new(), done)), 0, oneshot::channel().0)
    }

    fn claim() -> Op {
        Op::Claim(0, 0, 1, oneshot::channel().0)
    }

    fn kinds(ops: &[Op]) -> Vec<&'static str> {
        ops.iter()
            .map(|op| match op {
                Op::Complete(..) => "complete",
                Op::Claim(..) => "claim",
                Op::Insert(..) | Op::InsertMany(..) => "insert",
            })
            .collect()
    }

    /// Completions wait for company; the caller that ends the wait is followed by the callers
    /// that come back with it (here one per turn of the runtime, on the test's one thread),
    /// and they all share the group. Without load (a lone caller last time) nobody is waited
    /// for.
    #[tokio::test]
    async fn the_callers_that_end_a_completions_wait_share_its_group() {
        for (last_group, expected) in [
            (8, vec!["complete", "claim", "claim", "claim"]),
            (1, vec!["complete", "claim"]),
        ] {
            let (tx, rx) = mpsc::channel(16);
            let rx = tokio::sync::Mutex::new(rx);
            tx.send(completion()).await.unwrap();
            let callers = tokio::spawn(async move {
                // Come after the writer's first turns, which find nobody, into its wait.
                for _ in 0..8 {
                    tokio::task::yield_now().await;
                }
                for _ in 0..3 {
                    tx.send(claim()).await.unwrap();
                    tokio::task::yield_now().await;
                }
                tx
            });
            let mut open = Box::pin(std::future::pending::<()>());
            let group = next_group(&rx, &mut open, last_group).await.unwrap();
            assert_eq!(kinds(&group), expected, "after a group of {last_group}");
            drop(callers.await.unwrap());
        }
    }
}
