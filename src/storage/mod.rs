//! Storage: one [`Store`] interface, implemented over SQLite and PostgreSQL by [`SqlStore`].
//!
//! The `messages` table is both the email log and the outbox: workers claim due rows with a
//! lease token in one short statement, send outside any transaction, and complete a row only
//! while they still hold its lease. Failed messages are never deleted.

mod batch;
mod combined;
mod content_json;
mod housekeeping;
mod logquery;
mod rows;
mod sql;
mod writer;

use async_trait::async_trait;

use crate::domain::{
    AttemptRecord, Document, DocumentKind, LogFilter, MessageStatus, NewMessage, ProfileStatus,
    SmtpProfile, StoredMessage, TenantSettings, Verification,
};

pub use sql::{Backend, SqlStore};

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such row for this tenant.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A unique constraint or an idempotency conflict.
    #[error("{0}")]
    Conflict(String),
    /// The row is not in a state that allows the change.
    #[error("{0}")]
    WrongState(String),
    /// The database is unreachable.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// The result of storing a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// A new message was stored.
    Created,
    /// The idempotency key was used before with the same request: this is that message.
    Replayed {
        /// The earlier message's id.
        id: String,
        /// Its current status.
        status: MessageStatus,
    },
}

/// How an attempt ended, as the store records it.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The new status: SENT, DEFERRED or FAILED; QUEUED when a sending limit postponed the
    /// message without an attempt (`retry_at` says until when, `last_error` why).
    pub status: MessageStatus,
    /// For DEFERRED: when to try again (unix microseconds).
    pub retry_at: Option<i64>,
    /// The error, empty when sent.
    pub last_error: String,
    /// Whether the system default service delivered as a fallback.
    pub fallback: bool,
    /// Why fallback happened.
    pub fallback_reason: String,
}

/// Counts of a tenant's log entries over a time window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmailStats {
    /// All entries.
    pub total: i64,
    /// (status, count).
    pub by_status: Vec<(String, i64)>,
    /// (email type, count).
    pub by_type: Vec<(String, i64)>,
    /// (profile id or "", count).
    pub by_profile: Vec<(String, i64)>,
    /// (bucket start in unix microseconds, [(status, count)]), oldest first.
    pub buckets: Vec<(i64, Vec<(String, i64)>)>,
}

/// A claimed message: the row and the lease that lets the worker complete it.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The message.
    pub message: StoredMessage,
    /// The lease token.
    pub lease_token: String,
}

impl Claimed {
    /// The claim an email stored with a lease stands for (see [`NewMessage::lease`]): the
    /// row as the store holds it, without reading it back. None without a lease, or for an
    /// email scheduled for later (stored without one).
    pub fn stored_leased(m: NewMessage, now: i64) -> Option<Claimed> {
        let lease = m.lease.clone()?;
        if m.scheduled_after(now) {
            return None;
        }
        Some(Claimed {
            message: StoredMessage {
                id: m.id,
                tenant_id: m.tenant_id,
                status: MessageStatus::Sending,
                source: m.source,
                email_type: m.email_type,
                profile_id: m.profile_id,
                profile_reason: m.profile_reason,
                fallback: false,
                fallback_reason: String::new(),
                template_id: m.template_id,
                campaign_id: m.campaign_id,
                content: m.content,
                message_id_header: m.message_id_header,
                trace_id: m.trace_id,
                traceparent: m.traceparent,
                tags: m.tags,
                attempt_count: 0,
                last_error: String::new(),
                created_at: now,
                updated_at: now,
                sent_at: None,
                next_attempt_at: None,
            },
            lease_token: lease.token,
        })
    }
}

/// Everything mailgate keeps. Every tenant-facing call is scoped by `tenant_id`.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Stores a new profile. A duplicate name is [`StoreError::Conflict`].
    async fn create_profile(&self, profile: &SmtpProfile) -> Result<(), StoreError>;
    /// One profile of a tenant.
    async fn get_profile(&self, tenant_id: &str, id: &str) -> Result<SmtpProfile, StoreError>;
    /// A profile `tenant_id` may send through: its own, or one shared with it. Others are
    /// [`StoreError::NotFound`], exactly like a missing id.
    async fn get_usable_profile(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<SmtpProfile, StoreError>;
    /// Sets a profile's status and verification; bumps its version.
    async fn set_profile_state(
        &self,
        tenant_id: &str,
        id: &str,
        status: ProfileStatus,
        verification: &Verification,
        now: i64,
    ) -> Result<SmtpProfile, StoreError>;
    /// Records a profile's health as its verification (e.g. a failed AUTH while delivering),
    /// leaving its status alone; bumps its version.
    async fn set_profile_verification(
        &self,
        tenant_id: &str,
        id: &str,
        verification: &Verification,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Replaces a profile's name, settings, secret, status and verification; bumps its
    /// version. With `expected_version`, only if the stored version still equals it.
    async fn update_profile(
        &self,
        profile: &SmtpProfile,
        expected_version: Option<i64>,
    ) -> Result<SmtpProfile, StoreError>;
    /// Deletes a profile of a tenant.
    async fn delete_profile(&self, tenant_id: &str, id: &str) -> Result<(), StoreError>;
    /// A tenant's settings (defaults when never set).
    async fn get_tenant_settings(&self, tenant_id: &str) -> Result<TenantSettings, StoreError>;
    /// Stores a tenant's settings.
    async fn put_tenant_settings(
        &self,
        tenant_id: &str,
        settings: &TenantSettings,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Leases one message of a tenant that is not final and not leased (for a synchronous
    /// send such as a test email).
    async fn lease_message(
        &self,
        tenant_id: &str,
        id: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Claimed, StoreError>;
    /// Cancels a SCHEDULED, QUEUED or DEFERRED message; returns its status afterwards.
    async fn cancel_message(
        &self,
        tenant_id: &str,
        id: &str,
        now: i64,
    ) -> Result<MessageStatus, StoreError>;
    /// Queues a FAILED or CANCELLED message again; returns its status afterwards.
    async fn retry_message(
        &self,
        tenant_id: &str,
        id: &str,
        now: i64,
    ) -> Result<MessageStatus, StoreError>;
    /// Queues again every FAILED or DEFERRED message of a tenant matching `filter`.
    async fn requeue_messages(
        &self,
        tenant_id: &str,
        filter: &LogFilter,
        now: i64,
    ) -> Result<u64, StoreError>;
    /// Stores a new template or campaign. A duplicate name is [`StoreError::Conflict`].
    async fn insert_document(&self, kind: DocumentKind, doc: &Document) -> Result<(), StoreError>;
    /// One template or campaign of a tenant.
    async fn get_document(
        &self,
        kind: DocumentKind,
        tenant_id: &str,
        id: &str,
    ) -> Result<Document, StoreError>;
    /// Templates or campaigns of a tenant ordered by name, after `after_name`.
    async fn list_documents(
        &self,
        kind: DocumentKind,
        tenant_id: &str,
        after_name: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Document>, StoreError>;
    /// Replaces a template or campaign; bumps its version (only if it still has
    /// `expected_version`, when given).
    async fn update_document(
        &self,
        kind: DocumentKind,
        doc: &Document,
        expected_version: Option<i64>,
    ) -> Result<Document, StoreError>;
    /// Deletes a template or campaign of a tenant.
    async fn delete_document(
        &self,
        kind: DocumentKind,
        tenant_id: &str,
        id: &str,
    ) -> Result<(), StoreError>;
    /// How many templates and campaigns (of any tenant) are bound to a profile.
    async fn profile_references(&self, profile_id: &str) -> Result<u64, StoreError>;
    /// Unbinds a profile from every template and campaign (they fall back to normal routing).
    async fn clear_profile_references(&self, profile_id: &str) -> Result<(), StoreError>;
    /// Profiles of a tenant ordered by name, after `after_name`.
    async fn list_profiles(
        &self,
        tenant_id: &str,
        after_name: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SmtpProfile>, StoreError>;

    /// Stores a message durably (committed before this returns).
    async fn insert_message(
        &self,
        message: &NewMessage,
        now: i64,
    ) -> Result<InsertOutcome, StoreError>;
    /// Stores many messages in one transaction; each gets its own outcome (an idempotency
    /// conflict affects only its message). Fails as a whole only if storage fails.
    async fn insert_messages(
        &self,
        messages: Vec<NewMessage>,
        now: i64,
    ) -> Result<Vec<Result<InsertOutcome, StoreError>>, StoreError>;
    /// One message of a tenant.
    async fn get_message(&self, tenant_id: &str, id: &str) -> Result<StoredMessage, StoreError>;
    /// The attempts of a message, oldest first.
    async fn list_attempts(
        &self,
        tenant_id: &str,
        message_id: &str,
    ) -> Result<Vec<AttemptRecord>, StoreError>;
    /// Messages of a tenant matching `filter`, newest first, with ids below `before_id`.
    async fn list_messages(
        &self,
        tenant_id: &str,
        filter: &LogFilter,
        before_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// Counts entries created in [start, end), optionally in buckets of `bucket` microseconds
    /// aligned to the Unix epoch (UTC hours and days).
    async fn email_stats(
        &self,
        tenant_id: &str,
        start: i64,
        end: i64,
        bucket: Option<i64>,
    ) -> Result<EmailStats, StoreError>;

    /// Leases up to `limit` due messages to the caller until `lease_until`.
    async fn claim_due(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> Result<Vec<Claimed>, StoreError>;
    /// Records the attempts (one, or two with a fallback) and the message's new state, if
    /// the lease is still held. Returns false when the lease was lost (nothing is written).
    async fn complete(
        &self,
        claimed: &Claimed,
        attempts: &[AttemptRecord],
        completion: &Completion,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Gives a leased message back to the queue without an attempt (graceful shutdown, a
    /// lease too short to start an attempt). False when the lease was no longer held (it ran
    /// out and another worker claimed the message): nothing changed.
    async fn release(
        &self,
        message_id: &str,
        lease_token: &str,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Takes one slot of `profile_id`'s window `[window_start, window_start + window_secs)`
    /// (unix seconds) if fewer than `limit` are taken. Atomic across processes.
    async fn reserve_slot(
        &self,
        profile_id: &str,
        window_secs: i64,
        window_start: i64,
        limit: u32,
    ) -> Result<bool, StoreError>;
    /// Keeps the hourly counts behind GetEmailStats current: rolls up hours that ended
    /// (at most `max_hours` a pass) and recomputes hours changed since. Returns hours written.
    async fn roll_up_log(&self, now: i64, max_hours: i64) -> Result<u64, StoreError>;
    /// Forgets usage windows that ended before `before` (unix seconds).
    async fn prune_usage(&self, before: i64) -> Result<u64, StoreError>;
    /// Deletes up to `batch` final log entries (SENT, FAILED, CANCELLED) created before
    /// `before` (unix microseconds), with their attempts. Returns how many went.
    async fn delete_expired(&self, before: i64, batch: u32) -> Result<u64, StoreError>;
}
