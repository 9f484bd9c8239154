//! The delivery engine: claims due messages with a lease, delivers each outside any
//! transaction, records the attempt and the new state only while it still holds the lease.
//! The SMTP side of an attempt (targets, test sends, verification, sending) is in `send`.

mod send;

use send::record_metrics;

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    sync::{broadcast, mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
    time::Instant,
};
use tracing::{info, warn, Instrument};

use super::{
    limits::{Admission, Limiter},
    policy::{allows_fallback, classify, random_jitter, retry_delay, Verdict},
    smtp::{Accepted, SmtpFailure},
    transport::Transports,
};
use crate::{
    crypto::SecretBox,
    domain::{AttemptRecord, FallbackPolicy, Lease, Mailbox, MessageStatus, SmtpProfile},
    storage::{Claimed, Completion, Store, StoreError},
    telemetry::{in_log_context, LogContext},
};

/// A change of a message's status, for live watchers and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageEvent {
    /// The tenant.
    pub tenant_id: String,
    /// The message.
    pub message_id: String,
    /// Its new status.
    pub status: MessageStatus,
}

/// What the engine needs besides storage and transports.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Most SMTP sessions sending at once. The engine keeps up to [`CLAIM_AHEAD`] times as
    /// many messages in hand, so that claiming and recording (database round trips) overlap
    /// with sending.
    pub concurrency: usize,
    /// Lease length.
    pub lease: Duration,
    /// Poll interval when nothing wakes the engine.
    pub poll_interval: Duration,
    /// Deadline of one attempt.
    pub attempt_timeout: Duration,
    /// Retry schedule.
    pub retry_schedule: Vec<Duration>,
    /// Give up after this long since acceptance.
    pub give_up_after: Duration,
    /// How long shutdown waits for in-flight deliveries.
    pub shutdown_grace: Duration,
    /// The system default service's sender, used on fallback.
    pub system_sender: Mailbox,
    /// Extra CA certificates (PEM) trusted for every profile.
    pub operator_roots: Vec<String>,
    /// EHLO name when a profile sets none.
    pub helo_name: String,
}

/// The delivery engine. Cheap to share: `Arc<Engine>`.
#[derive(Debug)]
pub struct Engine {
    store: Arc<dyn Store>,
    transports: Arc<Transports>,
    secrets: SecretBox,
    settings: EngineSettings,
    wake: Notify,
    events: broadcast::Sender<MessageEvent>,
    /// Messages in hand by id, with their lease token: given back to the queue at shutdown.
    in_flight: Mutex<HashMap<String, String>>,
    /// Profiles by (tenant, id), with when they were read.
    profiles: Mutex<HashMap<(String, String), (SmtpProfile, std::time::Instant)>>,
    /// Per-profile rates and daily quotas.
    limiter: Limiter,
    /// Where status changes go for other replicas (PostgreSQL only).
    relay: std::sync::OnceLock<tokio::sync::mpsc::Sender<MessageEvent>>,
    /// One permit per SMTP send at a time (`settings.concurrency`).
    sending: Semaphore,
    /// One permit per message in hand: claimed, adopted, sending or being recorded.
    in_hand: Arc<Semaphore>,
    /// The number of those permits: [`CLAIM_AHEAD`] × `settings.concurrency`.
    in_hand_total: usize,
    /// One permit per attempted message whose result waits for its commit,
    /// [`RECORDING_AHEAD`] times as many as `in_hand` (see [`Engine::deliver_traced`]).
    recording: Semaphore,
    /// Room in the line of adopted emails waiting in memory for a slot in hand (see
    /// [`Engine::reserve`]): [`WAITING_AHEAD`] places per slot in hand, at most
    /// [`MAX_WAITING`], holding at most [`MAX_WAITING_KIB`] of content.
    waiting: LineRoom,
    /// Where adopted emails go while the engine runs (see [`Engine::reserve`]).
    adopt: Mutex<Option<Adoptions>>,
    /// Whether a claim is running: it holds its slots already, so accepts may take the rest.
    claiming: AtomicBool,
}

/// The way to the running engine for emails stored leased to this process.
type Adoptions = mpsc::UnboundedSender<Adopted>;

/// An email stored leased to this process, on its way to the engine.
type Adopted = (Claimed, Slot, i64);

/// What a reservation holds: a slot in hand, or a place in the line of adopted emails
/// waiting for one.
#[derive(Debug)]
enum Slot {
    InHand(OwnedSemaphorePermit),
    /// Held until the email takes a slot in hand: its place in line, and the kibibytes of
    /// content it holds there.
    Waiting {
        _place: OwnedSemaphorePermit,
        _bytes: OwnedSemaphorePermit,
    },
}

/// Room in the line of adopted emails that wait in memory: places, and the KiB of content
/// the emails in them may hold together.
#[derive(Debug)]
struct LineRoom {
    places: Arc<Semaphore>,
    kib: Arc<Semaphore>,
}

impl LineRoom {
    fn new(places: usize, kib: usize) -> Self {
        Self {
            places: Arc::new(Semaphore::new(places)),
            kib: Arc::new(Semaphore::new(kib)),
        }
    }

    /// A place for an email whose content holds `held_bytes` (counted in whole KiB, at
    /// least one), if the line has both.
    fn take(&self, held_bytes: usize) -> Option<Slot> {
        let kib = u32::try_from(held_bytes.div_ceil(1024).max(1)).ok()?;
        Some(Slot::Waiting {
            _bytes: Arc::clone(&self.kib).try_acquire_many_owned(kib).ok()?,
            _place: Arc::clone(&self.places).try_acquire_owned().ok()?,
        })
    }
}

/// A slot in the engine taken for an email about to be accepted (see [`Engine::reserve`]).
/// Dropping it gives the slot back.
#[derive(Debug)]
pub struct Reservation {
    slot: Slot,
    to_engine: Adoptions,
    lease: Lease,
}

impl Reservation {
    /// The lease to store the email with.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }
}

/// Messages in hand (claimed, sending, or being recorded) per sending slot. A message waits
/// for its claim and its completion to be committed, each a group commit of the writer; with
/// only one message per slot, the slot would sit idle through both. With 3 per slot,
/// SendBatch on PostgreSQL delivered 20 % fewer emails a second than with 6, on a machine
/// that was a quarter idle: most likely its sending slots ran dry while a claim waited
/// behind the completion writer's group (docs/benchmarks.md).
pub(super) const CLAIM_AHEAD: usize = 6;

/// Attempted messages whose results may wait for their commit, per message in hand. It bounds
/// what a stalled writer lets pile up: sent emails, their bodies already freed, whose leases
/// run on. Under a SendBatch burst on PostgreSQL a result waits about 20 ms for its commit
/// (the completions' writer gathers, then commits groups of dozens; up to 55 ms), so at
/// 9,000 emails/s about 180 wait at once: with one permit per message in hand (192), 40 % of
/// the attempts found none free and kept their slot meanwhile, and SendBatch delivered
/// 9-12 % less than with four, where none waited (docs/benchmarks.md).
const RECORDING_AHEAD: usize = 4;

/// Adopted emails that may wait in memory for a slot in hand, per slot in hand (at most
/// [`MAX_WAITING`], holding at most [`MAX_WAITING_KIB`]). When every slot is taken, an email
/// accepted with room in this line is still stored leased to this process and delivered
/// from memory as soon as a slot frees, instead of being queued: a queued email costs a
/// claim, which rewrites its row once more (with every index of it) and reads it back, body
/// included. Under a SendBatch burst, accepts outrun deliveries and the slots are always
/// taken, so without this line nearly every email went through a claim. With 5 per slot
/// (960 emails at 32 sending slots) and a claim after every three quarters boarded, a third
/// of a PostgreSQL SendBatch burst skipped its claim; with 20 and seven (below), 44 %, and
/// the burst delivered 19-20 % more than when every batch email was claimed. With 80 (15,360
/// places at 32 sending slots, of which the benchmark's emails, 1.1 KB of content counted as
/// 2 KiB each, fill 8,192 before [`MAX_WAITING_KIB`] stops them), PostgreSQL's CPU per
/// email of a 20,000-email burst fell by 16-25 % in six pairs of seven (6 % in the other)
/// and it delivered 10-21 % more in six (3 % less in the other), SQLite's 6-15 % more, at
/// 8-10 MiB more peak RSS on SQLite (docs/benchmarks.md, 2026-12-06, sixth session).
const WAITING_AHEAD: usize = 80;

/// The most adopted emails waiting in memory.
const MAX_WAITING: usize = 16_384;

/// The most content (subjects, bodies, headers, attachments) that adopted emails waiting in
/// memory may hold together: 16 MiB, each email counted in whole KiB, rounded up (about
/// what it holds with its other fields). Bounded by count alone, a line of emails with
/// large attachments could hold gigabytes; an email that does not fit is queued.
const MAX_WAITING_KIB: usize = 16 * 1024;

/// Slots that free up while adopted emails wait go to them, but after this many in a row
/// (per quarter of the slots) a claim gets a quarter of the slots: emails already queued
/// (retries, scheduled ones come due, those accepted while the line was full) keep moving.
const WAITING_TURNS: usize = 7;

/// How far ahead (seconds) a worker looks for a free per-second slot before it puts the
/// message back in the queue.
const RATE_LOOKAHEAD_SECS: i64 = 5;

/// How long a cached profile serves deliveries before it is read again.
pub(super) const PROFILE_CACHE_TTL: Duration = Duration::from_secs(2);

/// The associated data that binds a profile's sealed secret to its row.
pub fn secret_context(tenant_id: &str, profile_id: &str) -> String {
    format!("{tenant_id}/{profile_id}")
}

/// Unix microseconds now.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl Engine {
    /// An engine over `store` and `transports`.
    pub fn new(
        store: Arc<dyn Store>,
        transports: Arc<Transports>,
        secrets: SecretBox,
        settings: EngineSettings,
    ) -> Self {
        let (events, _) = broadcast::channel(4096);
        let in_hand_total = settings.concurrency.max(1) * CLAIM_AHEAD;
        Self {
            in_hand: Arc::new(Semaphore::new(in_hand_total)),
            waiting: LineRoom::new(
                (in_hand_total * WAITING_AHEAD).min(MAX_WAITING),
                MAX_WAITING_KIB,
            ),
            in_hand_total,
            recording: Semaphore::new(RECORDING_AHEAD * in_hand_total),
            adopt: Mutex::new(None),
            claiming: AtomicBool::new(false),
            store,
            transports,
            secrets,
            sending: Semaphore::new(settings.concurrency),
            settings,
            wake: Notify::new(),
            events,
            in_flight: Mutex::new(HashMap::new()),
            profiles: Mutex::new(HashMap::new()),
            limiter: Limiter::default(),
            relay: std::sync::OnceLock::new(),
        }
    }

    /// Wakes the engine: new work may be due (called after an email is accepted).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Subscribes to status changes.
    pub fn subscribe(&self) -> broadcast::Receiver<MessageEvent> {
        self.events.subscribe()
    }

    /// Announces a status change to this process's watchers and, through the relay, to the
    /// other replicas'.
    pub fn publish(&self, tenant_id: &str, message_id: &str, status: MessageStatus) {
        let event = MessageEvent {
            tenant_id: tenant_id.to_owned(),
            message_id: message_id.to_owned(),
            status,
        };
        if let Some(relay) = self.relay.get() {
            // A full relay drops the notice for other replicas rather than hold up delivery.
            let _ = relay.try_send(event.clone());
        }
        let _ = self.events.send(event);
    }

    /// Sends this engine's status changes to `relay` as well.
    pub(super) fn relay_to(&self, relay: tokio::sync::mpsc::Sender<MessageEvent>) {
        let _ = self.relay.set(relay);
    }

    /// Hands another replica's status change to this process's watchers.
    pub(super) fn rebroadcast(&self, event: MessageEvent) {
        let _ = self.events.send(event);
    }

    /// Claims what is due now and delivers it all; returns how many were claimed.
    pub async fn run_once(self: &Arc<Self>) -> usize {
        let (claimed, until) = self.claim(self.settings.concurrency).await;
        let count = claimed.len();
        let mut tasks = JoinSet::new();
        for c in claimed {
            let engine = Arc::clone(self);
            tasks.spawn(Box::pin(
                async move { engine.deliver(c, until, None).await },
            ));
        }
        while tasks.join_next().await.is_some() {}
        count
    }

    /// Leases up to `limit` due messages; returns them and the end of their lease.
    async fn claim(&self, limit: usize) -> (Vec<Claimed>, i64) {
        let now = now_micros();
        let until = now + micros(self.settings.lease);
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        let claimed = match self
            .store
            .claim_due(now, until, limit)
            .instrument(tracing::debug_span!("claim", limit))
            .await
        {
            Ok(claimed) => {
                tracing::debug!(claimed = claimed.len(), limit, "claimed due messages");
                let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                for c in &claimed {
                    in_flight.insert(c.message.id.clone(), c.lease_token.clone());
                }
                claimed
            }
            Err(e) => {
                warn!(error = %e, "claiming due messages failed");
                Vec::new()
            }
        };
        (claimed, until)
    }

    /// Takes a slot for an email this process is about to accept, so that it is stored
    /// leased to this process ([`crate::domain::NewMessage::lease`]) and delivered at once,
    /// without a claim; or, when the slots are taken, a place in the line of adopted emails
    /// that wait in memory for one ([`WAITING_AHEAD`]). A quarter of the slots stays for
    /// claims, so emails waiting in the queue keep moving; while a claim runs it holds its
    /// slots already, and accepts may take all the others. None when the engine is not
    /// running or the line is full too.
    ///
    /// `held_bytes` is what the email's content holds in memory
    /// ([`crate::domain::MessageContent::held_bytes`]): the line holds at most
    /// [`MAX_WAITING_KIB`] of it.
    pub fn reserve(&self, held_bytes: usize) -> Option<Reservation> {
        let keep = if self.claiming.load(Ordering::Acquire) {
            0
        } else {
            self.spare()
        };
        let to_engine = self
            .adopt
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let in_hand = if self.in_hand.available_permits() > keep {
            Arc::clone(&self.in_hand).try_acquire_owned().ok()
        } else {
            None
        };
        let slot = match in_hand {
            Some(permit) => Slot::InHand(permit),
            None => self.waiting.take(held_bytes)?,
        };
        Some(Reservation {
            slot,
            to_engine,
            lease: Lease {
                token: uuid::Uuid::new_v4().to_string(),
                until: now_micros() + micros(self.settings.lease),
            },
        })
    }

    /// The least lease an email must have left for an attempt to start: an attempt's
    /// deadline plus the longest wait for a profile's rate limit, or half the lease if that
    /// is shorter (so that fresh emails still go out under a lease that short, which the
    /// operations guide warns against). A fallback attempt after a failed one may still
    /// outlive the lease: the guide asks for a lease well above the deadline.
    fn lease_margin(&self) -> i64 {
        let lookahead = RATE_LOOKAHEAD_SECS.min(micros(self.settings.lease) / 2_000_000);
        (micros(self.settings.attempt_timeout) + lookahead * 1_000_000)
            .min(micros(self.settings.lease) / 2)
    }

    /// Slots that accepts leave to claims, and claims to accepts: a quarter of them.
    fn spare(&self) -> usize {
        (self.in_hand_total / 4).max(1)
    }

    /// Delivers an email stored with `reservation`'s lease. If the engine stopped meanwhile,
    /// the lease runs out and any worker delivers the email then.
    pub fn adopt(&self, reservation: Reservation, claimed: Claimed) {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(claimed.message.id.clone(), claimed.lease_token.clone());
        let Reservation {
            slot,
            to_engine,
            lease,
        } = reservation;
        if to_engine.send((claimed, slot, lease.until)).is_err() {
            tracing::debug!("engine stopped before an adopted email; its lease will run out");
        }
    }

    /// Runs until `shutdown` turns true: then stops claiming, waits up to the grace period
    /// for in-flight deliveries, and gives unfinished ones back to the queue.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let permits = Arc::clone(&self.in_hand);
        let (to_engine, mut adopted) = mpsc::unbounded_channel();
        *self.adopt.lock().unwrap_or_else(|e| e.into_inner()) = Some(to_engine);
        let mut tasks = JoinSet::new();
        // Claim when something may be due: at start, after a wake (an email was queued),
        // at every poll (retries and scheduled emails come due, other replicas queue), and
        // again right after a claim that took all it asked for. Adopted emails and finished
        // deliveries alone do not call for a claim.
        let mut want_claim = true;
        let mut next_poll = Instant::now() + self.settings.poll_interval;
        // A claim's share of the slots, and the most it takes while adopted emails wait: the
        // quarter that accepts leave to claims.
        let batch = self.spare();
        // Adopted emails waiting for a slot in hand, oldest first, and how many of them took
        // a slot since the last claim (see [`WAITING_TURNS`]).
        let mut line: VecDeque<Adopted> = VecDeque::new();
        let mut from_line = 0usize;
        // Slots a claim waited for while adopted emails wait.
        let mut ready: Option<OwnedSemaphorePermit> = None;
        let spawn =
            |tasks: &mut JoinSet<()>, c: Claimed, until: i64, permit: OwnedSemaphorePermit| {
                let engine = Arc::clone(&self);
                // Boxed: the delivery's future is large (the email, its SMTP exchange), and a
                // task's future is moved into the task on spawn and its stage rewritten when
                // it ends; those copies were a tenth of the server's CPU under load.
                tasks.spawn(Box::pin(async move {
                    engine.deliver(c, until, Some(permit)).await
                }));
            };
        // An adopted email with a slot in hand is delivered; one without waits in line.
        let receive = |tasks: &mut JoinSet<()>, line: &mut VecDeque<Adopted>, a: Adopted| match a {
            (c, Slot::InHand(permit), until) => spawn(tasks, c, until, permit),
            waiting => line.push_back(waiting),
        };
        // The first email in line takes `permit` (and gives its place in line back, with
        // the KiB it held there).
        let board = |tasks: &mut JoinSet<()>, line: &mut VecDeque<Adopted>, permit| {
            if let Some((c, _place, until)) = line.pop_front() {
                spawn(tasks, c, until, permit);
            }
        };
        loop {
            if *shutdown.borrow() {
                break;
            }
            // A finished task keeps its memory (sized for the whole delivery future, about
            // 8 KB) until it is joined: join every finished one now. Joining one per turn let
            // thousands pile up under load (165 MB at the peak of a 20,000-email run).
            while tasks.try_join_next().is_some() {}
            while let Ok(a) = adopted.try_recv() {
                receive(&mut tasks, &mut line, a);
            }
            if Instant::now() >= next_poll {
                want_claim = true;
                next_poll = Instant::now() + self.settings.poll_interval;
            }
            // Free slots go to the adopted emails in line first, a claim's turn aside.
            // Whether the line may board now, or a wanted claim has its turn.
            let line_turn = |want_claim: bool, from_line: usize| {
                !want_claim || from_line < WAITING_TURNS * batch
            };
            while !line.is_empty() && line_turn(want_claim, from_line) {
                let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                    break;
                };
                board(&mut tasks, &mut line, permit);
                from_line += 1;
            }
            let mut claimed_all = false;
            // The slots are taken before the claim: an email accepted meanwhile cannot take
            // one that a claimed message then lacks. A claim leaves a quarter of the slots
            // to the emails accepted while it runs (when that many are free), or they would
            // all be queued, each waking the engine for another claim: at a steady 1,000
            // emails/s most emails went through a claim that way, an extra write each.
            // While adopted emails wait, a claim takes a quarter of the slots, on its turn.
            let free = permits.available_permits();
            let slots = if let Some(slots) = ready.take() {
                Some(slots)
            } else if !want_claim {
                None
            } else if line.is_empty() {
                let take = if free > self.spare() {
                    free - self.spare()
                } else {
                    free
                };
                match u32::try_from(take) {
                    Ok(n) if n > 0 => Arc::clone(&permits).try_acquire_many_owned(n).ok(),
                    _ => None,
                }
            } else if !line_turn(want_claim, from_line) && free >= batch {
                u32::try_from(batch)
                    .ok()
                    .and_then(|n| Arc::clone(&permits).try_acquire_many_owned(n).ok())
            } else {
                None
            };
            if let Some(mut slots) = slots {
                let take = slots.num_permits();
                self.claiming.store(true, Ordering::Release);
                let (claimed, until) = self.claim(take).await;
                self.claiming.store(false, Ordering::Release);
                from_line = 0;
                claimed_all = !claimed.is_empty() && claimed.len() == take;
                // Fewer than asked: the queue has nothing more due. The next claim waits for
                // a wake (an email queued), the poll, or a full claim.
                want_claim = claimed_all;
                for c in claimed {
                    let Some(permit) = slots.split(1) else { break };
                    spawn(&mut tasks, c, until, permit);
                }
            }
            if claimed_all && line.is_empty() {
                // More are due: wait until a quarter of the slots is free, so claims stay
                // batched instead of one statement per finished delivery.
                while permits.available_permits() < batch && !tasks.is_empty() && line.is_empty() {
                    tokio::select! {
                        _ = tasks.join_next() => {}
                        Some(a) = adopted.recv() => receive(&mut tasks, &mut line, a),
                        _ = shutdown.changed() => break,
                    }
                }
                continue;
            }
            let turn = line_turn(want_claim, from_line);
            let boarding = !line.is_empty() && turn;
            let claim_turn = !line.is_empty() && !turn;
            tokio::select! {
                _ = self.wake.notified() => want_claim = true,
                _ = tokio::time::sleep_until(next_poll) => {}
                _ = tasks.join_next(), if !tasks.is_empty() => {}
                Some(a) = adopted.recv() => receive(&mut tasks, &mut line, a),
                Ok(permit) = Arc::clone(&permits).acquire_owned(), if boarding => {
                    board(&mut tasks, &mut line, permit);
                    from_line += 1;
                }
                Ok(slots) = Arc::clone(&permits).acquire_many_owned(
                    u32::try_from(batch).unwrap_or(u32::MAX)
                ), if claim_turn => ready = Some(slots),
                _ = shutdown.changed() => {}
            }
        }
        // The emails in line go back to the queue below with the rest (`in_flight`).
        line.clear();
        // No more adoptions; those already sent are in `in_flight` and go back to the queue
        // below with the rest.
        *self.adopt.lock().unwrap_or_else(|e| e.into_inner()) = None;
        adopted.close();
        while adopted.try_recv().is_ok() {}
        info!(in_flight = tasks.len(), "delivery engine stopping");
        let drained = tokio::time::timeout(self.settings.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let leftover: Vec<(String, String)> = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for (id, token) in leftover {
            if let Err(e) = self.store.release(&id, &token, now_micros()).await {
                warn!(message_id = %id, error = %e, "releasing lease failed; it will expire");
            }
        }
        self.transports.close_idle().await;
        info!("delivery engine stopped");
    }

    /// Gives an email whose lease is about to run out back to the queue, unsent, where any
    /// worker may claim it: sent now, it could still be sending when another worker claims it
    /// and sends it again.
    async fn give_back(&self, claimed: &Claimed) {
        let id = &claimed.message.id;
        match self
            .store
            .release(id, &claimed.lease_token, now_micros())
            .await
        {
            Ok(true) => {
                info!("the lease ran short while the email waited for a sending slot; back to the queue");
                self.publish(&claimed.message.tenant_id, id, MessageStatus::Queued);
                self.wake();
            }
            Ok(false) => {
                info!("the lease ran out while the email waited for a sending slot; another worker has it")
            }
            Err(e) => {
                warn!(error = %e, "giving back an email failed; its lease will run out")
            }
        }
        self.forget(claimed);
    }

    /// Drops `claimed` from the messages in flight (released at shutdown), unless this
    /// process has claimed it again meanwhile, under another lease (its lease ran out while
    /// it waited or was being sent).
    fn forget(&self, claimed: &Claimed) {
        let id = &claimed.message.id;
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if in_flight.get(id) == Some(&claimed.lease_token) {
            in_flight.remove(id);
        }
    }

    /// Delivers one email in hand in a span that continues the accepting request's trace; its
    /// slot (`permit`, if it holds one) is given back once the attempt ends, before the
    /// result is committed (see [`Self::deliver_traced`]).
    async fn deliver(&self, claimed: Claimed, until: i64, permit: Option<OwnedSemaphorePermit>) {
        let message = &claimed.message;
        let span = tracing::info_span!(
            target: crate::telemetry::CONTEXT_SPANS,
            "delivery",
            tenant_id = message.tenant_id.as_str(),
            message_id = message.id.as_str(),
            attempt = message.attempt_count + 1,
            mailgate.status = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        if !message.trace_id.is_empty() {
            span.record("trace_id", message.trace_id.as_str());
        }
        crate::telemetry::continue_trace(&span, &message.traceparent);
        let mut context = LogContext::new("delivery")
            .with("tenant_id", message.tenant_id.as_str())
            .with("message_id", message.id.as_str())
            .with("attempt", u64::from(message.attempt_count) + 1);
        if !message.trace_id.is_empty() {
            context = context.with("trace_id", message.trace_id.as_str());
        }
        in_log_context(
            context,
            self.deliver_traced(claimed, until, permit).instrument(span),
        )
        .await;
    }

    async fn deliver_traced(
        &self,
        mut claimed: Claimed,
        until: i64,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let (attempts, completion) = {
            // The semaphore is never closed, so the permit always comes.
            let sending = self.sending.acquire().await.ok();
            // An email may wait for a sending slot (in line, or in hand behind slow sends)
            // until little of its lease is left: leases are not renewed, so it goes back to
            // the queue rather than start an attempt that could outlive the lease.
            if now_micros() > until - self.lease_margin() {
                drop((sending, permit));
                self.give_back(&claimed).await;
                return;
            }
            self.attempt(&claimed).await
        };
        // Recording the result needs none of what was sent: the bodies and attachments go
        // before it waits for its commit, where as many emails may wait as are in hand.
        let content = &mut claimed.message.content;
        (content.text, content.html, content.attachments) = (None, None, Vec::new());
        // The slot is free for the next email while the result waits for its commit. A
        // group of completions alone waits a few milliseconds for company (until an accept
        // or a claim comes; on PostgreSQL completions have a writer of their own, and
        // claims another); a claim-driven round that waited for these very slots would wait
        // out that delay on every round. The result waits with a `recording` permit instead:
        // there are a few per slot ([`RECORDING_AHEAD`]), so a writer that stalls stops the
        // engine after a bounded number of sent emails, not after an ever-growing pile whose
        // leases run out. The message stays in `in_flight` (released at shutdown) until the
        // commit.
        // The semaphore is never closed, so the permit always comes.
        let ended = std::time::Instant::now();
        let _recording = self.recording.acquire().await.ok();
        drop(permit);
        crate::telemetry::record("mailgate.status", completion.status.as_str());
        record_metrics(&claimed.message.tenant_id, &attempts);
        tracing::debug!(status = ?completion.status, attempts = attempts.len(), "attempt finished");
        let status = completion.status;
        let message = &claimed.message;
        let committed = self
            .store
            .complete(&claimed, &attempts, &completion, now_micros())
            .await;
        // Recorded before the status is published, so a watcher that saw it finds it.
        crate::metrics::metrics()
            .record_duration
            .record(ended.elapsed().as_secs_f64(), &[]);
        match committed {
            Ok(true) => self.publish(&message.tenant_id, &message.id, status),
            Ok(false) => warn!("lease lost before completion; another worker owns the message"),
            Err(e) => {
                warn!(error = %e, "recording the attempt failed; the lease will expire and the message will be retried")
            }
        }
        self.forget(&claimed);
    }

    /// A profile usable by `tenant_id`, from a cache refreshed every few seconds: one lookup
    /// serves many messages. A change reaches deliveries within [`PROFILE_CACHE_TTL`].
    async fn profile(&self, tenant_id: &str, id: &str) -> Result<SmtpProfile, StoreError> {
        let key = (tenant_id.to_owned(), id.to_owned());
        if let Some((profile, at)) = self
            .profiles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            if at.elapsed() < PROFILE_CACHE_TTL {
                return Ok(profile.clone());
            }
        }
        let profile = self.store.get_usable_profile(tenant_id, id).await?;
        let mut cache = self.profiles.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(key, (profile.clone(), std::time::Instant::now()));
        Ok(profile)
    }

    /// Makes one attempt (plus a fallback attempt when allowed) and decides the new state.
    async fn attempt(&self, claimed: &Claimed) -> (Vec<AttemptRecord>, Completion) {
        let message = &claimed.message;
        let first_number = message.attempt_count + 1;
        let profile = match &message.profile_id {
            None => None,
            // A grantee's message uses the owner's profile.
            Some(id) => match self.profile(&message.tenant_id, id).await {
                Ok(p) => Some(p),
                Err(StoreError::NotFound(_)) => {
                    // Deleted, or no longer shared with this tenant: the operator's service
                    // delivers, with its own sender, and the log says why.
                    let reason = format!("profile {id} is no longer available to this tenant");
                    let deadline = Instant::now() + self.settings.attempt_timeout;
                    let (record, result) = self
                        .send_via_system(claimed, first_number, true, deadline)
                        .await;
                    return (vec![record], self.decide(claimed, result, true, reason));
                }
                Err(e) => {
                    // Storage trouble: nothing went on the wire; try again soon.
                    warn!(error = %e, "loading the profile failed; retrying later");
                    return (Vec::new(), self.storage_trouble("loading the profile"));
                }
            },
        };
        let Some(profile) = profile else {
            let deadline = Instant::now() + self.settings.attempt_timeout;
            let (record, result) = self
                .send_via_system(claimed, first_number, false, deadline)
                .await;
            return (
                vec![record],
                self.decide(claimed, result, false, String::new()),
            );
        };
        if let Some(postponed) = self.wait_for_limits(&profile).await {
            return (Vec::new(), postponed);
        }
        let deadline = Instant::now() + self.settings.attempt_timeout;
        let (record, result) = self
            .send_via_profile(claimed, &profile, first_number, deadline)
            .await;
        if let Err(failure) = &result {
            if failure.kind == super::smtp::FailureKind::Auth {
                self.mark_auth_failure(&profile, failure).await;
            }
        }
        // The tenant's policy is read only when a failure could fall back: a send that
        // succeeded costs no read.
        let falls_back = match &result {
            Err(failure) if allows_fallback(failure) => {
                let policy = match profile.settings.fallback_policy {
                    FallbackPolicy::Inherit => self
                        .store
                        .get_tenant_settings(&message.tenant_id)
                        .await
                        .map(|t| t.fallback_policy)
                        .unwrap_or(FallbackPolicy::Never),
                    own => own,
                };
                policy == FallbackPolicy::OnServerFailure
            }
            _ => false,
        };
        match result {
            Err(failure) if falls_back => {
                let code = failure.code.map(|c| format!("{c} ")).unwrap_or_default();
                let reason = format!("profile {} failed: {code}{}", profile.name, failure.text);
                let fallback_deadline = Instant::now() + self.settings.attempt_timeout;
                let (fb_record, fb_result) = self
                    .send_via_system(claimed, first_number + 1, true, fallback_deadline)
                    .await;
                let completion = self.decide(claimed, fb_result, true, reason);
                (vec![record, fb_record], completion)
            }
            result => (
                vec![record],
                self.decide(claimed, result, false, String::new()),
            ),
        }
    }

    /// Takes a slot under the profile's rate limit and daily quota, sleeping until a slot a
    /// few seconds ahead if need be. Returns the completion that puts the message back in the
    /// queue when no slot is in reach: over-limit messages wait, they never fail.
    async fn wait_for_limits(&self, profile: &SmtpProfile) -> Option<Completion> {
        let limits = &profile.settings.limits;
        if limits.per_second == 0 && limits.per_day == 0 {
            return None;
        }
        let now = now_micros();
        let lookahead = RATE_LOOKAHEAD_SECS.min(micros(self.settings.lease) / 2_000_000);
        match self
            .limiter
            .admit(self.store.as_ref(), profile, now / 1_000_000, lookahead)
            .await
        {
            Ok(Admission::SendAt(second)) => {
                let wait = second * 1_000_000 - now_micros();
                if wait > 0 {
                    tracing::debug!(wait_us = wait, "waiting for a rate-limit slot");
                    tokio::time::sleep(Duration::from_micros(wait.unsigned_abs())).await;
                }
                None
            }
            Ok(Admission::Wait { until, note }) => {
                tracing::info!(until, "{note}");
                // Spread the wake-up of a large backlog over a few seconds.
                let spread = rand::random_range(0..5_000_000);
                Some(Completion {
                    status: MessageStatus::Queued,
                    retry_at: Some(until * 1_000_000 + spread),
                    last_error: note,
                    fallback: false,
                    fallback_reason: String::new(),
                })
            }
            Err(e) => {
                warn!(error = %e, "reserving a sending slot failed; retrying later");
                Some(self.storage_trouble("reserving a sending slot"))
            }
        }
    }

    /// Records on the profile that its server refused the credentials while delivering: the
    /// owner sees it in the profile's verification (state FAILED, the reply) until a new
    /// verification. Routing is unchanged: the status stays as the owner set it.
    async fn mark_auth_failure(&self, profile: &SmtpProfile, failure: &SmtpFailure) {
        if profile.verification.state == crate::domain::VerificationState::Failed {
            return;
        }
        let code = failure.code.map(|c| format!("{c} ")).unwrap_or_default();
        let verification = crate::domain::Verification {
            state: crate::domain::VerificationState::Failed,
            verified_at: Some(now_micros()),
            last_error: format!(
                "authentication failed while delivering: {code}{}; check the credentials and \
                 verify the profile again",
                failure.text
            ),
        };
        warn!(profile_id = %profile.id, "{}", verification.last_error);
        if let Err(e) = self
            .store
            .set_profile_verification(&profile.tenant_id, &profile.id, &verification, now_micros())
            .await
        {
            warn!(error = %e, "recording the profile's failed authentication failed");
        }
        self.profiles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, id), _| *id != profile.id);
    }

    /// The completion for a storage failure before anything went on the wire: try again soon.
    fn storage_trouble(&self, doing: &str) -> Completion {
        Completion {
            status: MessageStatus::Deferred,
            retry_at: Some(now_micros() + micros(self.settings.poll_interval)),
            last_error: format!("storage unavailable while {doing}"),
            fallback: false,
            fallback_reason: String::new(),
        }
    }

    fn decide(
        &self,
        claimed: &Claimed,
        result: Result<Accepted, SmtpFailure>,
        fallback: bool,
        fallback_reason: String,
    ) -> Completion {
        let message = &claimed.message;
        match result {
            Ok(_) => Completion {
                status: MessageStatus::Sent,
                retry_at: None,
                last_error: String::new(),
                fallback,
                fallback_reason,
            },
            Err(failure) => {
                let now = now_micros();
                let expired = now - message.created_at >= micros(self.settings.give_up_after);
                let (status, retry_at, last_error) = match classify(&failure) {
                    Verdict::Retry if !expired => {
                        let delay = retry_delay(
                            &self.settings.retry_schedule,
                            message.attempt_count + 1,
                            random_jitter(),
                        );
                        (
                            MessageStatus::Deferred,
                            Some(now + micros(delay)),
                            failure.text,
                        )
                    }
                    Verdict::Retry => (
                        MessageStatus::Failed,
                        None,
                        format!("gave up after retrying: {}", failure.text),
                    ),
                    Verdict::Fail => (MessageStatus::Failed, None, failure.text),
                };
                Completion {
                    status,
                    retry_at,
                    last_error,
                    fallback,
                    fallback_reason,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LineRoom;

    /// The line is bounded by places and by the content its emails hold, each counted in
    /// whole KiB; a place given back (its email boarded or dropped) is free again.
    #[test]
    fn the_line_holds_so_many_emails_and_so_much_content() {
        let room = LineRoom::new(3, 100);
        let big = room.take(60 * 1024).expect("60 of 100 KiB");
        assert!(room.take(41 * 1024).is_none(), "101 KiB");
        assert!(room.take(40 * 1024 + 1).is_none(), "41 KiB once rounded up");
        let one = room.take(0).expect("an empty email counts one KiB");
        let two = room.take(1).expect("a third place");
        assert!(room.take(1).is_none(), "no fourth place");
        drop(big);
        let again = room
            .take(60 * 1024)
            .expect("the place and its KiB are back");
        assert!(
            room.take(usize::MAX).is_none(),
            "more than the line ever holds"
        );
        drop((one, two, again));
        assert!(room.take(100 * 1024).is_some(), "all of it");
    }
}
