//! SQLite: the writer's own connection, on a thread of its own, with its statements prepared
//! once.
//!
//! sqlx runs each SQLite connection on a thread and every statement is a round trip to it,
//! so a group used to go there as one multi-statement script with a VALUES row per email.
//! SQLite then parsed the whole script for every group: in a profile of a SendBatch pass the
//! writer's thread spent 23 % of its time preparing, 5 % handing rows back to the async side
//! and more in the allocations of both. Here the group is handed to a thread that owns a
//! rusqlite connection to the same file (the same SQLite library as sqlx's, linked once) and
//! runs it as one transaction of small statements, each prepared on first use and kept:
//! executing a prepared statement once per email costs no parsing at all.
//!
//! Reads and the rare writes outside the hot path stay on sqlx's pool; SQLite's write lock
//! (`BEGIN IMMEDIATE`, with the same busy timeout) keeps them apart from the writer's.
//!
//! The statements that write `messages` say `OR ROLLBACK`: a constraint they break undoes
//! the whole group, which a failed statement did anyway (the group's transaction is dropped
//! on the first error). With SQLite's default (undo the statement alone), every such
//! statement inside the group's transaction kept a statement journal, a copy of each page
//! before its first change, in case it had to be undone alone: with the log rollup's
//! triggers (whose upsert forced that default until migration 0010), 9 % of mailgate's
//! instructions per email in a SendBatch pass. A trigger's statements take the conflict
//! handling of the statement that fires it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        mpsc::{self, Receiver},
        Arc, LazyLock,
    },
    time::Duration,
};

use anyhow::Context as _;
use rusqlite::{
    params,
    types::{FromSql, Value, ValueRef},
    Connection, OpenFlags, TransactionBehavior,
};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use crate::{
    domain::{AttemptRecord, NewMessage},
    storage::{
        batch::{
            json, recipient_rows, stored_state, Finished, Outcome, ATTEMPT_COLUMNS, COMPLETE_SET,
            COMPLETION_COLUMNS, STORED_COLUMNS,
        },
        content_json::content_json,
        rows::{message_columns, message_from_row, MessageRow, MESSAGE_COLUMNS},
        sql::Backend,
        Claimed, StoreError,
    },
};

/// One claim in a group: lease up to `limit` due messages at `now` until `until`.
#[derive(Debug)]
pub(super) struct Claim {
    pub(super) now: i64,
    pub(super) until: i64,
    pub(super) limit: u32,
}

/// What a group hands back: its emails and completions (the caller answers from them), and
/// what was committed with the messages each claim leased, or the error.
pub(super) type Applied = (
    Vec<(NewMessage, i64)>,
    Vec<Finished>,
    Result<(Outcome, Vec<LeasedRows>), StoreError>,
);

/// The rows a claim leased, as SQLite returned them, and the claim's lease token. Decoding
/// them (the content's JSON above all: 8 % of the writer thread's time on a SendBatch pass)
/// is left to the claiming caller, so the writer's thread goes on with the next group.
pub(super) struct LeasedRows {
    rows: Vec<Vec<Value>>,
    token: String,
}

impl LeasedRows {
    pub(super) fn decode(self) -> Result<Vec<Claimed>, StoreError> {
        let token = self.token;
        self.rows
            .into_iter()
            .map(|values| {
                let message = message_from_row(&RawRow(values)).map_err(StoreError::Other)?;
                Ok(Claimed {
                    message,
                    lease_token: token.clone(),
                })
            })
            .collect()
    }
}

/// A row of SQLite's [`message_columns`]: the columns of [`MESSAGE_COLUMNS`], in that order.
struct RawRow(Vec<Value>);

/// The position of each of [`MESSAGE_COLUMNS`] (where SQLite's list has the same column).
static COLUMN_AT: LazyLock<HashMap<&'static str, usize>> = LazyLock::new(|| {
    MESSAGE_COLUMNS
        .split(", ")
        .enumerate()
        .map(|(i, c)| (c, i))
        .collect()
});

impl RawRow {
    fn get<T: FromSql>(&self, column: &str) -> anyhow::Result<T> {
        let at = *COLUMN_AT
            .get(column)
            .ok_or_else(|| anyhow::anyhow!("no column {column} in a claimed row"))?;
        let value = self
            .0
            .get(at)
            .ok_or_else(|| anyhow::anyhow!("a claimed row lacks column {column}"))?;
        T::column_result(ValueRef::from(value)).with_context(|| format!("column {column}"))
    }
}

impl MessageRow for RawRow {
    fn text(&self, column: &str) -> anyhow::Result<String> {
        self.get(column)
    }
    fn opt_text(&self, column: &str) -> anyhow::Result<Option<String>> {
        self.get(column)
    }
    fn int(&self, column: &str) -> anyhow::Result<i64> {
        self.get(column)
    }
    fn opt_int(&self, column: &str) -> anyhow::Result<Option<i64>> {
        self.get(column)
    }
}

struct Job {
    inserts: Vec<(NewMessage, i64)>,
    finished: Vec<Finished>,
    claims: Vec<Claim>,
    reply: oneshot::Sender<Applied>,
    /// Given back once the group is committed (or failed), before its sync.
    place: Option<OwnedSemaphorePermit>,
}

/// The handle to the writer's thread. The thread ends (and closes its connection) when the
/// handle is dropped.
#[derive(Debug)]
pub(super) struct SqliteWriter {
    jobs: mpsc::Sender<Job>,
}

/// How long a statement waits for another connection's write lock, as sqlx's connections do.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

impl SqliteWriter {
    /// Starts the thread for the database file at `path` (created already, with its
    /// migrations applied before the first group). The connection is opened for the first
    /// group, and again after a group that left it unusable.
    pub(super) fn start(path: PathBuf) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel();
        let (nudge, nudged) = mpsc::sync_channel(1);
        let (committed, to_sync) = mpsc::channel();
        let checkpointed = path.clone();
        let mut wal = WalFile::default();
        // Names of at most 15 bytes: the kernel keeps no more (ps, top and perf show them).
        std::thread::Builder::new()
            .name("sqlite-checkpt".to_owned())
            .spawn(move || checkpoints(&checkpointed, &nudged))?;
        std::thread::Builder::new()
            .name("sqlite-sync".to_owned())
            .spawn(move || syncs(&to_sync, |path| wal.sync(path)))?;
        std::thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || serve(&path, &rx, &nudge, &committed))?;
        Ok(Self { jobs })
    }

    /// Applies a group as one transaction. The group joins the thread's queue at the call,
    /// not when the answer is awaited: groups handed over one after another are applied in
    /// that order. `place` is dropped once the transaction has committed or failed, before
    /// the sync that the answer waits for.
    pub(super) fn apply(
        &self,
        inserts: Vec<(NewMessage, i64)>,
        finished: Vec<Finished>,
        claims: Vec<Claim>,
        place: OwnedSemaphorePermit,
    ) -> impl std::future::Future<Output = Applied> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            inserts,
            finished,
            claims,
            reply,
            place: Some(place),
        };
        let refused = self.jobs.send(job).err();
        async move {
            if let Some(mpsc::SendError(job)) = refused {
                return (job.inserts, job.finished, Err(stopped()));
            }
            // The thread answers every job it takes; it only stops when this handle is
            // dropped.
            answer
                .await
                .unwrap_or_else(|_| (Vec::new(), Vec::new(), Err(stopped())))
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Other(anyhow::anyhow!("the SQLite writer thread has stopped"))
}

/// Shortest time between two checkpoints of the checkpointer's thread.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(10);

/// Copies committed WAL frames into the database file on a thread of its own, so that the
/// writer's thread does not.
///
/// With SQLite's automatic checkpoint alone, the connection whose commit took the WAL past
/// 1,000 pages copied all of them into the database file, with its `fsync`, before it went on:
/// the writer's thread, which every accepted email waits for (9 % of its time in a profile of
/// a unary burst). Here, after each of the writer's commits (`nudged`), this thread runs a
/// passive checkpoint, at most every [`CHECKPOINT_EVERY`]: it copies what is committed
/// without taking a lock the writer needs. The writer keeps the
/// automatic checkpoint, which then finds most pages copied already; it is what lets the WAL
/// start over from its beginning (a passive checkpoint beside a busy writer never catches up
/// with it alone).
fn checkpoints(path: &std::path::Path, nudged: &Receiver<()>) {
    let mut conn: Option<Connection> = None;
    while nudged.recv().is_ok() {
        match conn.take().map_or_else(|| open(path), Ok) {
            Ok(c) => match checkpoint(&c) {
                Ok(_) => conn = Some(c),
                Err(e) => tracing::debug!(error = %e, "background WAL checkpoint failed"),
            },
            Err(e) => {
                tracing::debug!(error = %e, "opening the WAL checkpointer's connection failed")
            }
        }
        std::thread::sleep(CHECKPOINT_EVERY);
    }
}

/// A passive checkpoint: (pages in the WAL, pages copied into the database file).
fn checkpoint(conn: &Connection) -> Result<(i64, i64), StoreError> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get(1)?, row.get(2)?))
    })
    .map_err(sqlite_error)
}

/// A group's answer, sent once the WAL that holds its commit is on disk, and that WAL's path.
type Committed = (oneshot::Sender<Applied>, Applied, Arc<Path>);

fn serve(
    path: &Path,
    jobs: &Receiver<Job>,
    nudge: &mpsc::SyncSender<()>,
    committed: &mpsc::Sender<Committed>,
) {
    let mut conn: Option<(Connection, Arc<Path>)> = None;
    while let Ok(job) = jobs.recv() {
        let opened = match conn.take() {
            Some(kept) => Ok(kept),
            None => open(path).map(|c| {
                let wal = wal_path(&c, path);
                (c, wal)
            }),
        };
        let (result, wal) = match opened {
            Ok((mut c, wal)) => {
                let result = apply(&mut c, &job.inserts, &job.finished, &job.claims);
                // A failed group's transaction is rolled back when it is dropped; a
                // connection still inside one is not used again.
                if result.is_ok() || c.is_autocommit() {
                    conn = Some((c, wal.clone()));
                }
                (result, Some(wal))
            }
            Err(e) => (Err(e), None),
        };
        drop(job.place);
        let committed_now = result.is_ok();
        let applied = (job.inserts, job.finished, result);
        match wal {
            // The syncing thread answers once the WAL is on disk, while this thread goes on
            // with the next group; it only stops after this thread has. A failed group's
            // answer goes the same way, in order: its error may rest on what an earlier
            // group committed and a power loss could still undo.
            Some(wal) => {
                let _ = committed.send((job.reply, applied, wal));
            }
            // No connection: nothing was read or written.
            None => {
                let _ = job.reply.send(applied);
            }
        }
        if committed_now {
            // Full: a checkpoint is due already.
            let _ = nudge.try_send(());
        }
    }
}

/// The WAL of the writer's connection: the database's path as SQLite resolved it when it
/// opened the file (symbolic links followed), with `-wal`.
fn wal_path(conn: &Connection, configured: &Path) -> Arc<Path> {
    let mut wal = conn.path().filter(|p| !p.is_empty()).map_or_else(
        || configured.as_os_str().to_owned(),
        std::ffi::OsString::from,
    );
    wal.push("-wal");
    Arc::from(PathBuf::from(wal))
}

/// Makes committed groups durable before they are answered, while the writer's thread
/// applies the next group.
///
/// The writer's connection commits with `synchronous = NORMAL`: SQLite writes the
/// transaction's frames to the WAL and does not wait for the disk. This thread then syncs
/// the WAL file (`sync`) and only then answers the groups committed before the sync began,
/// every one of them with that one sync. An answered group is on disk, as with
/// `synchronous = FULL`, but the disk's flush no longer stops the writer: with FULL, the
/// writer's thread waited for it inside every commit, and the callers of the next group
/// waited with it. SQLite's WAL stays consistent under NORMAL (a torn or missing frame ends
/// recovery at the last whole commit); what a power loss can take is only what was not
/// answered yet.
///
/// A failed sync is final. The kernel may drop the pages it could not write and report the
/// failure only once, so a later sync that succeeds proves nothing about the frames before
/// it, and every later commit builds on them. From then on every group is answered with the
/// error, until mailgate restarts (SQLite then recovers the WAL from what the disk holds). A
/// stored email that survives is still sent: an email answered with this error may be.
fn syncs(committed: &Receiver<Committed>, mut sync: impl FnMut(&Path) -> std::io::Result<()>) {
    let mut waiting: Vec<Committed> = Vec::new();
    let mut failed: Option<String> = None;
    while let Ok(first) = committed.recv() {
        waiting.push(first);
        waiting.extend(committed.try_iter());
        if failed.is_none() {
            let mut synced: Vec<&Arc<Path>> = Vec::with_capacity(1);
            for (.., wal) in &waiting {
                if synced.contains(&wal) {
                    continue;
                }
                if let Err(e) = sync(wal) {
                    let message = format!(
                        "syncing the SQLite WAL {} to disk failed ({e}): writes since may not \
                         survive a power loss, so every write is refused until mailgate \
                         restarts",
                        wal.display()
                    );
                    tracing::error!("{message}");
                    failed = Some(message);
                    break;
                }
                synced.push(wal);
            }
        }
        for (reply, (inserts, finished, result), _) in waiting.drain(..) {
            let result = match &failed {
                None => result,
                Some(message) => Err(StoreError::Other(anyhow::anyhow!("{message}"))),
            };
            let _ = reply.send((inserts, finished, result));
        }
    }
}

/// The WAL file, opened once and synced through a descriptor of its own (Linux syncs a
/// file's data whatever descriptor asks). It is opened again when its path names another
/// file (a WAL that SQLite deleted, after checkpointing all of it into the database file,
/// and made again); a file opened anew has its directory synced too, so that its name
/// survives with it (SQLite syncs the directory at a WAL's first sync, which its writer no
/// longer makes).
#[derive(Default)]
struct WalFile {
    /// The path, the file opened there, and that file's metadata when it was opened (which
    /// file it is).
    open: Option<(PathBuf, std::fs::File, std::fs::Metadata)>,
}

impl WalFile {
    fn sync(&mut self, path: &Path) -> std::io::Result<()> {
        let current = std::fs::metadata(path)?;
        let (file, opened) = match self.open.take() {
            Some((p, f, m)) if p == path && same_file(&m, &current) => (f, m),
            _ => {
                let f = std::fs::OpenOptions::new().write(true).open(path)?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    sync_directory(dir)?;
                }
                let m = f.metadata()?;
                (f, m)
            }
        };
        file.sync_data()?;
        self.open = Some((path.to_owned(), file, opened));
        Ok(())
    }
}

#[cfg(unix)]
fn sync_directory(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_directory(_: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
    false
}

/// Opens the writer's connection with the busy timeout of sqlx's (`SqlStore::connect`), in
/// WAL mode (the pool's first connection made the file WAL already; asking again is a no-op;
/// a file that cannot have a WAL is refused) and with `synchronous = NORMAL`: a commit does
/// not wait for the disk, and [`syncs`] answers each group only after syncing the WAL, so
/// an acknowledged email survives a power loss as with the pool's `synchronous = FULL`.
///
/// Foreign keys are not checked on this connection, as PostgreSQL has none for the same rows
/// (its migration 0012): the writer stores recipients only for the emails its transaction
/// just stored, and attempts only for the emails whose completion its transaction just
/// recorded, with SQLite's one write lock held throughout, so no parent can be missing.
/// Looking each parent up again was 4 % of mailgate's instructions per email through
/// SendBatch (docs/benchmarks.md, 2026-12-07). The pool's connections keep them on: a DELETE
/// there (retention, a person by hand) still takes an email's attempts and recipients with it.
///
/// Temporary storage is in memory. A statement that fires a trigger or checks a foreign key
/// inside a transaction keeps a statement journal (to undo just that statement), and SQLite
/// spilled it to a temporary file: creating and writing that file took 10 % of the writer
/// thread's time in a profile. It holds only the pages one statement changes.
fn open(path: &std::path::Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite_error)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(sqlite_error)?;
    if !mode.eq_ignore_ascii_case("wal") {
        // `synchronous = NORMAL` is only safe with a WAL, and only the WAL is synced.
        return Err(StoreError::Other(anyhow::anyhow!(
            "the SQLite database {} cannot use a write-ahead log (journal mode {mode})",
            path.display()
        )));
    }
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = OFF; PRAGMA temp_store = MEMORY;",
    )
    .map_err(sqlite_error)?;
    Ok(conn)
}

/// A unique or primary key violation is a conflict, as on sqlx's connections; anything
/// else is an error of the store.
fn sqlite_error(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            StoreError::Conflict("already exists".to_owned())
        }
        _ => StoreError::Other(anyhow::Error::new(e).context("SQLite writer")),
    }
}

/// One anonymous placeholder per column of `columns`.
fn placeholders(columns: &str) -> String {
    vec!["?"; columns.split(", ").count()].join(", ")
}

/// An email's row; an email whose idempotency key is taken is skipped (no row changes).
/// The columns are `STORED_COLUMNS` with the content's rowid in `message_contents` in place
/// of the content (migration 0011).
static INSERT_MESSAGE: LazyLock<String> = LazyLock::new(|| {
    let columns = STORED_COLUMNS.replacen(" content,", " content_id,", 1);
    format!(
        "INSERT OR ROLLBACK INTO messages ({columns}) VALUES ({}) \
         ON CONFLICT (tenant_id, idempotency_key) DO NOTHING",
        placeholders(&columns)
    )
});

/// An email's content, stored before its row (which keeps the content's rowid).
const INSERT_CONTENT: &str = "INSERT OR ROLLBACK INTO message_contents (content) VALUES (?)";

/// The content of an email that was not stored after all (its idempotency key was taken).
const DELETE_CONTENT: &str = "DELETE FROM message_contents WHERE id = ?";

const INSERT_RECIPIENT: &str = "INSERT INTO message_recipients (tenant_id, email, message_id) \
     VALUES (?, ?, ?) ON CONFLICT DO NOTHING";

/// A completion, recorded only while its lease token is held: what it sets is the PostgreSQL
/// group's `COMPLETE_SET`, with each of its values `v.<column>` (the columns of
/// `COMPLETION_COLUMNS`) a numbered parameter. An `UPDATE ... FROM (SELECT ? AS ...)` made
/// SQLite copy the one-row `v` into a temporary table of its own and join it, at every
/// completion: that cost 6-7 % of mailgate's instructions per email (docs/benchmarks.md,
/// 2026-12-07).
static COMPLETE: LazyLock<String> = LazyLock::new(|| {
    let mut set = COMPLETE_SET.to_owned();
    let mut columns: Vec<(usize, &str)> = COMPLETION_COLUMNS.split(", ").enumerate().collect();
    // The longest names first: `v.fallback` is the start of `v.fallback_reason`.
    columns.sort_by_key(|(_, c)| std::cmp::Reverse(c.len()));
    for (i, c) in columns {
        set = set.replace(&format!("v.{c}"), &format!("?{}", i + 1));
    }
    format!("UPDATE OR ROLLBACK messages SET {set} WHERE id = ?1 AND lease_token = ?2")
});

static INSERT_ATTEMPT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO attempts ({ATTEMPT_COLUMNS}) VALUES ({})",
        placeholders(ATTEMPT_COLUMNS)
    )
});

static CLAIM: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE OR ROLLBACK messages \
         SET status = 'SENDING', lease_token = ?, due_at = ?, updated_at = ? \
         WHERE id IN (SELECT id FROM messages WHERE due_at IS NOT NULL AND due_at <= ? \
         ORDER BY due_at LIMIT ?) RETURNING {}",
        message_columns(Backend::Sqlite)
    )
});

/// The group as one transaction: the emails with their recipients (only those of emails
/// stored), the completions with their attempts (only those whose lease was still held),
/// then the claims.
fn apply(
    conn: &mut Connection,
    inserts: &[(NewMessage, i64)],
    finished: &[Finished],
    claims: &[Claim],
) -> Result<(Outcome, Vec<LeasedRows>), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sqlite_error)?;
    let mut outcome = Outcome::default();
    let mut leased = Vec::with_capacity(claims.len());
    if !inserts.is_empty() {
        let mut content = tx.prepare_cached(INSERT_CONTENT).map_err(sqlite_error)?;
        let mut insert = tx.prepare_cached(&INSERT_MESSAGE).map_err(sqlite_error)?;
        let mut recipient = tx.prepare_cached(INSERT_RECIPIENT).map_err(sqlite_error)?;
        for (m, now) in inserts {
            let (status, due_at, lease_token) = stored_state(m, *now);
            let content_id = content
                .insert(params![content_json(&m.content)])
                .map_err(sqlite_error)?;
            let stored = insert
                .execute(params![
                    m.id,
                    m.tenant_id,
                    status.as_str(),
                    m.source,
                    m.email_type,
                    m.content.subject,
                    m.content.from.to_string(),
                    m.profile_id,
                    m.profile_reason.as_str(),
                    m.template_id,
                    m.campaign_id,
                    content_id,
                    m.message_id_header,
                    m.trace_id,
                    json(&m.tags)?,
                    m.idempotency_key,
                    m.request_hash,
                    now,
                    now,
                    m.send_at,
                    due_at,
                    m.traceparent,
                    lease_token,
                ])
                .map_err(sqlite_error)?;
            if stored == 0 {
                tx.prepare_cached(DELETE_CONTENT)
                    .and_then(|mut delete| delete.execute(params![content_id]))
                    .map_err(sqlite_error)?;
                continue;
            }
            let one = [(m, *now)];
            for (tenant, email, id) in recipient_rows(one.iter()) {
                recipient
                    .execute(params![tenant, email, id])
                    .map_err(sqlite_error)?;
            }
            outcome.created.insert(m.id.clone());
        }
    }
    if !finished.is_empty() {
        let mut complete = tx.prepare_cached(&COMPLETE).map_err(sqlite_error)?;
        let mut attempt = tx.prepare_cached(&INSERT_ATTEMPT).map_err(sqlite_error)?;
        for (lease, attempts, c, now) in finished {
            let id = &lease.id;
            let held = complete
                .execute(params![
                    id,
                    lease.token,
                    c.status.as_str(),
                    c.retry_at,
                    i64::try_from(attempts.len()).unwrap_or(1),
                    c.last_error,
                    c.fallback,
                    c.fallback_reason,
                    now,
                ])
                .map_err(sqlite_error)?;
            if held == 0 {
                continue;
            }
            for a in attempts {
                insert_attempt(&mut attempt, id, a)?;
            }
            outcome.held.insert(id.clone());
        }
    }
    let columns = COLUMN_AT.len();
    for claim in claims {
        let token = uuid::Uuid::new_v4().to_string();
        let mut statement = tx.prepare_cached(&CLAIM).map_err(sqlite_error)?;
        let mut rows = statement
            .query(params![
                token,
                claim.until,
                claim.now,
                claim.now,
                i64::from(claim.limit)
            ])
            .map_err(sqlite_error)?;
        let mut raw = Vec::new();
        while let Some(row) = rows.next().map_err(sqlite_error)? {
            let values = (0..columns)
                .map(|i| row.get::<_, Value>(i))
                .collect::<Result<Vec<_>, _>>()
                .map_err(sqlite_error)?;
            raw.push(values);
        }
        leased.push(LeasedRows { rows: raw, token });
    }
    tx.commit().map_err(sqlite_error)?;
    Ok((outcome, leased))
}

fn insert_attempt(
    statement: &mut rusqlite::CachedStatement<'_>,
    id: &str,
    a: &AttemptRecord,
) -> Result<(), StoreError> {
    statement
        .execute(params![
            id,
            a.number,
            a.started_at,
            a.duration_us,
            a.server,
            a.profile_id,
            a.fallback,
            a.reply_code,
            a.enhanced_code,
            a.reply_text,
            a.outcome.as_str(),
            json(&a.rejected_recipients)?,
        ])
        .map_err(sqlite_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value of `COMPLETE_SET` is a parameter, in the order of `COMPLETION_COLUMNS`
    /// (the order the completion's values are bound in).
    #[test]
    fn a_completion_sets_what_postgresql_sets_from_numbered_parameters() {
        assert_eq!(
            *COMPLETE,
            "UPDATE OR ROLLBACK messages SET status = ?3, due_at = ?4, lease_token = NULL, \
             attempt_count = messages.attempt_count + ?5, last_error = ?6, fallback = ?7, \
             fallback_reason = ?8, updated_at = ?9, \
             sent_at = CASE WHEN ?3 = 'SENT' THEN ?9 ELSE messages.sent_at END \
             WHERE id = ?1 AND lease_token = ?2"
        );
    }

    /// Rows in the database file alone, without its WAL: what checkpoints copied.
    fn rows_in_main_file(path: &std::path::Path, dir: &std::path::Path) -> i64 {
        let copy = dir.join("copy.db");
        std::fs::copy(path, &copy).unwrap();
        let conn = Connection::open(&copy).unwrap();
        conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    /// A nudge makes the checkpointer's thread copy what the WAL holds into the database
    /// file; the thread ends when the writer's side goes away.
    #[test]
    fn the_checkpointer_copies_committed_pages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        drop(Connection::open(&path).unwrap());
        let writer = open(&path).unwrap();
        writer
            .execute_batch(
                "PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (v TEXT); \
                 PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .unwrap();
        let tx = writer.unchecked_transaction().unwrap();
        for i in 0..500 {
            tx.execute("INSERT INTO t VALUES (?1)", [format!("row {i}")])
                .unwrap();
        }
        tx.commit().unwrap();
        assert_eq!(
            rows_in_main_file(&path, dir.path()),
            0,
            "nothing copied yet"
        );

        let (nudge, nudged) = mpsc::sync_channel(1);
        let thread_path = path.clone();
        let thread = std::thread::spawn(move || checkpoints(&thread_path, &nudged));
        nudge.try_send(()).unwrap();
        drop(nudge);
        thread.join().unwrap();
        assert_eq!(rows_in_main_file(&path, dir.path()), 500);
        // Everything was copied: a checkpoint finds nothing left.
        let (in_wal, copied) = checkpoint(&writer).unwrap();
        assert_eq!(in_wal, copied);
    }

    /// The bundled SQLite is built with the flags of `.cargo/config.toml`: no count of
    /// allocated memory and no memory management shared by every connection, each of which
    /// took a process-wide mutex on every allocation or page fetch of the writer's thread.
    #[test]
    fn sqlite_is_built_without_process_wide_memory_locks() {
        let conn = Connection::open_in_memory().unwrap();
        let mut statement = conn.prepare("PRAGMA compile_options").unwrap();
        let options: Vec<String> = statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "{options:?}"
        );
        assert!(
            !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "{options:?}"
        );
    }

    /// A group of `claims` for the writer's thread, and where its answer comes.
    fn job(claims: Vec<Claim>) -> (Job, oneshot::Receiver<Applied>) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            inserts: Vec::new(),
            finished: Vec::new(),
            claims,
            reply,
            place: None,
        };
        (job, answer)
    }

    /// The writer's thread on a database at `path` with the syncing thread's `sync`: where
    /// its groups go, its nudges, and both threads (which end once the sender is dropped).
    fn writer_threads(
        path: &Path,
        sync: impl FnMut(&Path) -> std::io::Result<()> + Send + 'static,
    ) -> (
        mpsc::Sender<Job>,
        Receiver<()>,
        [std::thread::JoinHandle<()>; 2],
    ) {
        let (jobs, rx) = mpsc::channel();
        let (nudge, nudged) = mpsc::sync_channel(1);
        let (committed, to_sync) = mpsc::channel();
        let syncer = std::thread::spawn(move || syncs(&to_sync, sync));
        let path = path.to_owned();
        let writer = std::thread::spawn(move || serve(&path, &rx, &nudge, &committed));
        (jobs, nudged, [writer, syncer])
    }

    /// The writer's thread nudges the checkpointer after each group it commits, and not
    /// after a group that failed (nothing new in the WAL).
    #[test]
    fn the_writer_nudges_the_checkpointer_after_commits_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        // A database without the schema: an empty group commits, a claim fails (no table).
        drop(Connection::open(&path).unwrap());
        let mut wal = WalFile::default();
        let (jobs, nudged, threads) = writer_threads(&path, move |p| wal.sync(p));

        let (empty, answer) = job(Vec::new());
        jobs.send(empty).unwrap();
        assert!(answer.blocking_recv().unwrap().2.is_ok());
        nudged
            .recv_timeout(Duration::from_secs(30))
            .expect("a nudge after the commit");

        let claim = Claim {
            now: 0,
            until: 1,
            limit: 1,
        };
        let (failing, answer) = job(vec![claim]);
        jobs.send(failing).unwrap();
        assert!(answer.blocking_recv().unwrap().2.is_err());
        // The thread ends once its handle is gone; every nudge it sent is queued by then.
        drop(jobs);
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(nudged.try_recv().is_err(), "no nudge after a failed group");
    }

    /// An empty committed group, and where its answer comes.
    fn committed() -> (Committed, oneshot::Receiver<Applied>) {
        let (reply, answer) = oneshot::channel();
        let applied = (Vec::new(), Vec::new(), Ok((Outcome::default(), Vec::new())));
        let wal = Arc::from(Path::new("db.sqlite-wal"));
        ((reply, applied, wal), answer)
    }

    /// A committed group is answered only once the sync that follows its commit has
    /// returned, and with an error if that sync failed.
    #[test]
    fn a_committed_group_is_answered_after_the_wal_is_synced() {
        let (to_sync, committed_rx) = mpsc::channel();
        let (entered, entered_rx) = mpsc::channel();
        let (gate, gate_rx) = mpsc::channel::<std::io::Result<()>>();
        let thread = std::thread::spawn(move || {
            syncs(&committed_rx, |_| {
                entered.send(()).unwrap();
                gate_rx.recv().unwrap()
            })
        });

        let (group, mut answer) = committed();
        to_sync.send(group).unwrap();
        entered_rx.recv().unwrap();
        // The thread is inside the sync: nothing answered yet.
        assert!(matches!(
            answer.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        gate.send(Ok(())).unwrap();
        assert!(answer.blocking_recv().unwrap().2.is_ok());

        let (group, answer) = committed();
        to_sync.send(group).unwrap();
        entered_rx.recv().unwrap();
        gate.send(Err(std::io::Error::other("disk gone"))).unwrap();
        let error = answer.blocking_recv().unwrap().2.err().unwrap().to_string();
        assert!(
            error.contains("syncing the SQLite WAL db.sqlite-wal"),
            "{error}"
        );
        assert!(error.contains("disk gone"), "{error}");

        // A failed sync is final: later groups are refused without another sync. (Should it
        // sync again, the sync would pass and the group would be answered Ok.)
        gate.send(Ok(())).unwrap();
        let (group, answer) = committed();
        to_sync.send(group).unwrap();
        let error = answer.blocking_recv().unwrap().2.err().unwrap().to_string();
        assert!(error.contains("until mailgate restarts"), "{error}");
        assert!(entered_rx.try_recv().is_err(), "no sync after the failure");

        drop(to_sync);
        thread.join().unwrap();
    }

    /// The writer's thread gives a group's place back once the group is committed, while its
    /// answer still waits for the sync.
    #[test]
    fn a_group_gives_its_place_back_before_its_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        drop(Connection::open(&path).unwrap());
        let (gate, gate_rx) = mpsc::channel::<std::io::Result<()>>();
        let (jobs, _nudged, threads) = writer_threads(&path, move |_| gate_rx.recv().unwrap());

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let places = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let place = places.clone().try_acquire_owned().unwrap();
        let (mut group, mut answer) = job(Vec::new());
        group.place = Some(place);
        jobs.send(group).unwrap();
        let _given_back = runtime
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(30), places.acquire()).await
            })
            .expect("the place is given back while the sync waits")
            .unwrap();
        assert!(matches!(
            answer.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        gate.send(Ok(())).unwrap();
        assert!(answer.blocking_recv().unwrap().2.is_ok());

        drop(jobs);
        for thread in threads {
            thread.join().unwrap();
        }
    }

    /// The WAL is synced through a descriptor of the file the path names now: a WAL that
    /// was deleted and made again is opened again.
    #[cfg(unix)]
    #[test]
    fn the_wal_file_is_opened_again_when_it_is_replaced() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite-wal");
        let mut wal = WalFile::default();
        assert!(wal.sync(&path).is_err(), "no WAL yet");
        let ino = |wal: &WalFile| wal.open.as_ref().unwrap().1.metadata().unwrap().ino();

        std::fs::write(&path, b"first").unwrap();
        wal.sync(&path).unwrap();
        let first = ino(&wal);
        wal.sync(&path).unwrap();
        assert_eq!(ino(&wal), first);

        // Made again while the first is still open (so it cannot get the same inode).
        let kept = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"second").unwrap();
        wal.sync(&path).unwrap();
        let second = ino(&wal);
        assert_ne!(second, first);
        assert_eq!(second, std::fs::metadata(&path).unwrap().ino());
        drop(kept);
    }

    /// The writer syncs the WAL that SQLite opened: with the database reached through a
    /// symbolic link, the WAL beside the file the link names.
    #[cfg(unix)]
    #[test]
    fn the_wal_is_the_one_sqlite_opened() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.sqlite");
        drop(Connection::open(&real).unwrap());
        let link = dir.path().join("link.sqlite");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let conn = open(&link).unwrap();
        conn.execute_batch("CREATE TABLE t (v TEXT)").unwrap();
        let wal = wal_path(&conn, &link);
        assert!(
            std::fs::symlink_metadata(&wal).is_ok(),
            "{} does not exist",
            wal.display()
        );
        assert_eq!(
            wal.canonicalize().unwrap(),
            dir.path().join("real.sqlite-wal").canonicalize().unwrap()
        );
        WalFile::default().sync(&wal).unwrap();
    }
}
