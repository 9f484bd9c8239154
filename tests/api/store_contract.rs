//! The store contract, run against the backend the suite is on (SQLite or PostgreSQL):
//! claiming with leases, completing only with the lease, releasing, idempotency.

use std::collections::BTreeMap;

use mailgate::{
    delivery::now_micros,
    domain::*,
    storage::{Claimed, Completion, InsertOutcome, SqlStore, Store},
};

use crate::helpers::{on_postgres, TestDatabase};

fn message(tenant: &str, key: Option<&str>) -> NewMessage {
    let mb = |e: &str| Mailbox {
        email: EmailAddress::parse("x", e).unwrap(),
        name: String::new(),
    };
    NewMessage {
        id: uuid::Uuid::now_v7().to_string(),
        tenant_id: tenant.into(),
        source: "svc".into(),
        email_type: "notification".into(),
        profile_id: None,
        profile_reason: ProfileReason::SystemDefault,
        template_id: None,
        campaign_id: None,
        content: MessageContent {
            from: mb("from@acme.test"),
            reply_to: None,
            error_to: None,
            to: vec![mb("to@example.com")],
            cc: vec![],
            bcc: vec![],
            subject: "s".into(),
            text: Some("t".into()),
            html: None,
            headers: vec![],
            attachments: vec![],
        },
        send_at: None,
        idempotency_key: key.map(str::to_owned),
        request_hash: "h1".into(),
        tags: BTreeMap::new(),
        message_id_header: "m@acme.test".into(),
        trace_id: String::new(),
        traceparent: String::new(),
        lease: None,
    }
}

fn attempt(number: u32) -> AttemptRecord {
    AttemptRecord {
        number,
        started_at: now_micros(),
        duration_us: 10,
        server: "s:25".into(),
        profile_id: None,
        fallback: false,
        reply_code: 250,
        enhanced_code: "2.0.0".into(),
        reply_text: "ok".into(),
        outcome: AttemptOutcome::Sent,
        rejected_recipients: vec![],
    }
}

fn sent() -> Completion {
    Completion {
        status: MessageStatus::Sent,
        retry_at: None,
        last_error: String::new(),
        fallback: false,
        fallback_reason: String::new(),
    }
}

async fn store() -> (SqlStore, TestDatabase) {
    let db = TestDatabase::new().await;
    let store = SqlStore::connect(&db.url, 4).await.unwrap();
    (store, db)
}

#[tokio::test]
async fn a_pool_of_one_connection_serves_reads_between_writes() {
    // The group writer keeps a connection only when the pool has another for readers.
    let db = TestDatabase::new().await;
    let store = SqlStore::connect(&db.url, 1).await.unwrap();
    let now = now_micros();
    for _ in 0..2 {
        stores_one_queued(&store, now).await;
    }
}

/// Stores a new email of t1 and reads it back QUEUED.
async fn stores_one_queued(store: &SqlStore, now: i64) {
    let m = message("t1", None);
    assert_eq!(
        store.insert_message(&m, now).await.unwrap(),
        InsertOutcome::Created
    );
    assert_eq!(
        store.get_message("t1", &m.id).await.unwrap().status,
        MessageStatus::Queued
    );
}

#[tokio::test]
async fn an_in_memory_sqlite_database_is_refused_naming_the_setting() {
    // The SQLite writer has a connection of its own, which would see another database.
    for url in ["sqlite::memory:", "sqlite://?mode=memory"] {
        let err = SqlStore::connect(url, 4).await.unwrap_err().to_string();
        assert!(
            err.contains("database_url") && err.contains("in-memory"),
            "{url}: {err}"
        );
    }
}

#[tokio::test]
async fn claim_is_exclusive_and_completion_needs_the_lease() {
    let (store, _db) = store().await;
    let now = now_micros();
    for _ in 0..3 {
        store
            .insert_message(&message("t1", None), now)
            .await
            .unwrap();
    }
    let first = store.claim_due(now + 1, now + 60_000_000, 2).await.unwrap();
    assert_eq!(first.len(), 2);
    let second = store
        .claim_due(now + 1, now + 60_000_000, 10)
        .await
        .unwrap();
    assert_eq!(second.len(), 1, "leased messages are not claimed twice");
    assert!(store
        .claim_due(now + 1, now + 60_000_000, 10)
        .await
        .unwrap()
        .is_empty());

    // A stale lease cannot complete: after expiry another worker reclaims it.
    let reclaimed = store
        .claim_due(now + 61_000_000, now + 120_000_000, 10)
        .await
        .unwrap();
    assert_eq!(reclaimed.len(), 3, "expired leases are reclaimed");
    assert!(!store
        .complete(&first[0], &[attempt(1)], &sent(), now)
        .await
        .unwrap());
    let fresh = reclaimed
        .iter()
        .find(|c| c.message.id == first[0].message.id)
        .unwrap();
    assert!(store
        .complete(fresh, &[attempt(1)], &sent(), now)
        .await
        .unwrap());
    let m = store.get_message("t1", &fresh.message.id).await.unwrap();
    assert_eq!(m.status, MessageStatus::Sent);
    assert_eq!(m.attempt_count, 1);
    assert!(m.sent_at.is_some());
    assert_eq!(store.list_attempts("t1", &m.id).await.unwrap().len(), 1);
    assert!(store.list_attempts("t2", &m.id).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_email_stored_with_a_lease_is_held_like_a_claim() {
    let (store, _db) = store().await;
    let now = now_micros();
    let lease = Lease {
        token: "accepting-process".into(),
        until: now + 60_000_000,
    };
    let mut leased = message("t1", None);
    leased.lease = Some(lease.clone());
    let queued = message("t1", None);
    // A scheduled email ignores the lease: it is not due, so nobody may hold it yet.
    let mut scheduled = message("t1", None);
    scheduled.lease = Some(lease.clone());
    scheduled.send_at = Some(now + 3_600_000_000);
    for m in [&leased, &queued, &scheduled] {
        assert_eq!(
            store.insert_message(m, now).await.unwrap(),
            InsertOutcome::Created
        );
    }
    let row = store.get_message("t1", &leased.id).await.unwrap();
    assert_eq!(row.status, MessageStatus::Sending);
    assert_eq!(row.next_attempt_at, None);
    assert_eq!(
        store.get_message("t1", &scheduled.id).await.unwrap().status,
        MessageStatus::Scheduled
    );
    assert!(Claimed::stored_leased(scheduled.clone(), now).is_none());
    assert!(Claimed::stored_leased(queued.clone(), now).is_none());

    // Only the queued email is claimable while the lease runs.
    let claimed = store
        .claim_due(now + 1, now + 60_000_000, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].message.id, queued.id);

    // The in-memory claim matches the stored row and completes with the lease.
    let held = Claimed::stored_leased(leased.clone(), now).unwrap();
    assert_eq!(held.lease_token, lease.token);
    assert_eq!(held.message.status, row.status);
    assert_eq!(held.message.attempt_count, row.attempt_count);
    assert_eq!(held.message.created_at, row.created_at);
    assert_eq!(held.message.content, row.content);
    let mut stale = held.clone();
    stale.lease_token = "someone-else".into();
    assert!(!store
        .complete(&stale, &[attempt(1)], &sent(), now)
        .await
        .unwrap());
    assert!(store
        .complete(&held, &[attempt(1)], &sent(), now)
        .await
        .unwrap());
    let m = store.get_message("t1", &leased.id).await.unwrap();
    assert_eq!(m.status, MessageStatus::Sent);
    assert_eq!(m.attempt_count, 1);

    // A lease that ran out (the process died) lets any worker claim the email.
    let mut orphan = message("t1", None);
    orphan.lease = Some(lease.clone());
    store.insert_message(&orphan, now).await.unwrap();
    assert!(store
        .claim_due(now + 59_000_000, now + 70_000_000, 10)
        .await
        .unwrap()
        .iter()
        .all(|c| c.message.id != orphan.id));
    let reclaimed = store
        .claim_due(now + 61_000_000, now + 120_000_000, 10)
        .await
        .unwrap();
    assert!(reclaimed.iter().any(|c| c.message.id == orphan.id));
}

#[tokio::test]
async fn deferred_messages_wait_for_their_time_and_release_requeues() {
    let (store, _db) = store().await;
    let now = now_micros();
    store
        .insert_message(&message("t1", None), now)
        .await
        .unwrap();
    let claimed = store.claim_due(now, now + 1_000_000, 1).await.unwrap();
    let deferred = Completion {
        status: MessageStatus::Deferred,
        retry_at: Some(now + 30_000_000),
        last_error: "451".into(),
        fallback: false,
        fallback_reason: String::new(),
    };
    let mut a = attempt(1);
    a.outcome = AttemptOutcome::Deferred;
    assert!(store
        .complete(&claimed[0], &[a], &deferred, now)
        .await
        .unwrap());
    assert!(store
        .claim_due(now + 29_000_000, now + 40_000_000, 5)
        .await
        .unwrap()
        .is_empty());
    let again = store
        .claim_due(now + 30_000_000, now + 40_000_000, 5)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message.attempt_count, 1);
    // A token that does not hold the lease releases nothing.
    assert!(!store
        .release(&again[0].message.id, "not-the-lease", now + 30_000_000)
        .await
        .unwrap());
    let m = store.get_message("t1", &again[0].message.id).await.unwrap();
    assert_eq!(m.status, MessageStatus::Sending);
    assert!(store
        .release(
            &again[0].message.id,
            &again[0].lease_token,
            now + 30_000_000,
        )
        .await
        .unwrap());
    let m = store.get_message("t1", &again[0].message.id).await.unwrap();
    assert_eq!(m.status, MessageStatus::Queued);
    assert_eq!(
        store
            .claim_due(now + 30_000_000, now + 40_000_000, 5)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn scheduled_messages_are_not_due_early() {
    let (store, _db) = store().await;
    let now = now_micros();
    let mut m = message("t1", None);
    m.send_at = Some(now + 3_600_000_000);
    store.insert_message(&m, now).await.unwrap();
    assert_eq!(
        store.get_message("t1", &m.id).await.unwrap().status,
        MessageStatus::Scheduled
    );
    assert!(store.claim_due(now, now + 1, 5).await.unwrap().is_empty());
    assert_eq!(
        store
            .claim_due(now + 3_600_000_000, now + 3_700_000_000, 5)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn idempotency_is_per_tenant() {
    let (store, _db) = store().await;
    let now = now_micros();
    let a = message("t1", Some("k"));
    assert_eq!(
        store.insert_message(&a, now).await.unwrap(),
        InsertOutcome::Created
    );
    let replay = message("t1", Some("k"));
    assert!(
        matches!(store.insert_message(&replay, now).await.unwrap(), InsertOutcome::Replayed { id, .. } if id == a.id)
    );
    let mut conflict = message("t1", Some("k"));
    conflict.request_hash = "other".into();
    assert!(store.insert_message(&conflict, now).await.is_err());
    assert_eq!(
        store
            .insert_message(&message("t2", Some("k")), now)
            .await
            .unwrap(),
        InsertOutcome::Created
    );
}

/// The migrations of `migrations/<backend>` whose names sort before `first_new`: the ones a
/// release before `first_new` applied (`count` of them).
async fn migrations_before(
    backend: &str,
    first_new: &str,
    count: usize,
) -> sqlx::migrate::Migrator {
    let previous = tempfile::tempdir().unwrap();
    let mut copied = 0;
    for entry in std::fs::read_dir(format!("migrations/{backend}")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.as_str() < first_new {
            std::fs::copy(&path, previous.path().join(&name)).unwrap();
            copied += 1;
        }
    }
    assert_eq!(copied, count);
    // Read now: the folder goes when this returns.
    sqlx::migrate::Migrator::new(previous.path()).await.unwrap()
}

/// PostgreSQL's migration 0013 replaces the unique constraint on idempotency keys with a
/// unique index of only the emails that carry a key. A database upgraded with emails in it
/// still replays a repeated request, refuses a key reused for another request, takes any
/// number of emails without a key, and the index leaves those out.
#[tokio::test]
async fn idempotency_keys_stay_unique_through_the_upgrade_to_an_index_of_keys_only() {
    // SQLite keeps the constraint of its first migration (no 0013 there).
    if !on_postgres() {
        return;
    }
    let db = TestDatabase::new().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    // The migrations before 0013, as a release before it would have applied them.
    migrations_before("postgres", "0013", 12)
        .await
        .run(&pool)
        .await
        .unwrap();
    // Emails the previous release stored: one with a key, two without.
    let now = now_micros();
    let keyed = message("t1", Some("k"));
    for (id, key) in [
        (keyed.id.clone(), Some("k")),
        (uuid::Uuid::now_v7().to_string(), None),
        (uuid::Uuid::now_v7().to_string(), None),
    ] {
        sqlx::query(
            "INSERT INTO messages (id, tenant_id, status, source, email_type, subject, sender, \
             profile_reason, content, message_id_header, request_hash, created_at, updated_at, \
             idempotency_key) \
             VALUES ($1, 't1', 'SENT', 'svc', 'notification', 's', 'from@acme.test', \
             'SYSTEM_DEFAULT', '{}', 'm@acme.test', 'h1', $2, $2, $3)",
        )
        .bind(id)
        .bind(now)
        .bind(key)
        .execute(&pool)
        .await
        .unwrap();
    }

    let store = SqlStore::connect(&db.url, 4).await.unwrap();
    let replay = store
        .insert_message(&message("t1", Some("k")), now)
        .await
        .unwrap();
    assert!(
        matches!(&replay, InsertOutcome::Replayed { id, .. } if *id == keyed.id),
        "{replay:?}"
    );
    let mut reused = message("t1", Some("k"));
    reused.request_hash = "other".into();
    let refused = store.insert_message(&reused, now).await;
    assert!(
        matches!(refused, Err(mailgate::storage::StoreError::Conflict(_))),
        "{refused:?}"
    );
    for m in [
        message("t1", None),
        message("t1", None),
        message("t2", Some("k")),
    ] {
        assert_eq!(
            store.insert_message(&m, now).await.unwrap(),
            InsertOutcome::Created
        );
    }
    // One unique index on the key, of the emails that have one.
    let definitions: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'messages' \
         AND indexdef LIKE '%UNIQUE%idempotency_key%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(definitions.len(), 1, "{definitions:?}");
    assert!(
        definitions[0].contains("WHERE (idempotency_key IS NOT NULL)"),
        "{definitions:?}"
    );
}

/// SQLite's migration 0011 moves each email's content out of `messages` into
/// `message_contents`. An email a release before it stored keeps its content through the
/// upgrade (read by id, in the listing, and when a claim leases it); a new email stores its
/// content there; an email that is not stored (its idempotency key taken) leaves no content
/// behind; retention deletes an email's content with it.
#[tokio::test]
async fn contents_live_in_their_own_table_through_the_sqlite_upgrade() {
    // PostgreSQL keeps the content in the row (no 0011 there).
    if on_postgres() {
        return;
    }
    let db = TestDatabase::new().await;
    let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(&db.url)
        .unwrap()
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    // The migrations before 0011, as a release before it would have applied them.
    migrations_before("sqlite", "0011", 10)
        .await
        .run(&pool)
        .await
        .unwrap();
    // Two emails the previous release stored: one sent (retention may take it), one queued.
    let now = now_micros();
    let mut stored = Vec::new();
    for (subject, status, due_at) in [
        ("sent before", "SENT", None),
        ("queued before", "QUEUED", Some(now)),
    ] {
        let mut content = message("t1", None).content;
        content.subject = subject.into();
        content.text = Some(format!("the body of {subject}"));
        let id = uuid::Uuid::now_v7().to_string();
        sqlx::query(
            "INSERT INTO messages (id, tenant_id, status, source, email_type, subject, sender, \
             profile_reason, content, message_id_header, request_hash, created_at, updated_at, \
             due_at) \
             VALUES (?, 't1', ?, 'svc', 'notification', ?, 'from@acme.test', \
             'SYSTEM_DEFAULT', ?, 'm@acme.test', 'h1', ?, ?, ?)",
        )
        .bind(&id)
        .bind(status)
        .bind(subject)
        .bind(serde_json::to_string(&content).unwrap())
        .bind(now)
        .bind(now)
        .bind(due_at)
        .execute(&pool)
        .await
        .unwrap();
        stored.push((id, content));
    }

    let store = SqlStore::connect(&db.url, 4).await.unwrap();
    let contents = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM message_contents")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(contents().await, 2, "the upgrade moved both contents");
    for (id, content) in &stored {
        assert_eq!(&store.get_message("t1", id).await.unwrap().content, content);
    }
    let listed = store
        .list_messages("t1", &LogFilter::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
    for m in &listed {
        let (_, content) = stored.iter().find(|(id, _)| *id == m.id).unwrap();
        assert_eq!(&m.content, content);
    }

    // A new email, then the same request again and a reuse of its key for another one.
    let new = message("t1", Some("k"));
    assert_eq!(
        store.insert_message(&new, now).await.unwrap(),
        InsertOutcome::Created
    );
    assert_eq!(
        store.get_message("t1", &new.id).await.unwrap().content,
        new.content
    );
    assert!(matches!(
        store
            .insert_message(&message("t1", Some("k")), now)
            .await
            .unwrap(),
        InsertOutcome::Replayed { .. }
    ));
    let mut reused = message("t1", Some("k"));
    reused.request_hash = "other".into();
    assert!(store.insert_message(&reused, now).await.is_err());
    assert_eq!(
        contents().await,
        3,
        "emails not stored leave no content behind"
    );

    // A claim reads the contents too: the queued email from before and the new one.
    let claimed = store
        .claim_due(now + 1, now + 60_000_000, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    for c in &claimed {
        let expected = if c.message.id == new.id {
            &new.content
        } else {
            assert_eq!(c.message.id, stored[1].0);
            &stored[1].1
        };
        assert_eq!(&c.message.content, expected);
        assert!(store
            .complete(c, &[attempt(1)], &sent(), now)
            .await
            .unwrap());
    }

    // Retention takes the three sent emails and their contents.
    assert_eq!(store.delete_expired(now + 1, 100).await.unwrap(), 3);
    assert_eq!(contents().await, 0);
    pool.close().await;
}

#[tokio::test]
async fn the_writer_gets_a_new_connection_after_the_database_dropped_its_own() {
    // PostgreSQL only: a SQLite file has no server to drop a connection.
    if !on_postgres() {
        return;
    }
    let (store, db) = store().await;
    let now = now_micros();
    store
        .insert_message(&message("t1", None), now)
        .await
        .unwrap();
    // What a database restart or a failover does to every connection of the pool.
    let (base, name) = db.url.rsplit_once('/').unwrap();
    let admin = sqlx::PgPool::connect(&format!("{base}/postgres"))
        .await
        .unwrap();
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
    )
    .bind(name)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(!ended.is_empty() && ended.iter().all(|&e| e));
    // The writer's kept connection is gone: the group it was on may fail, the next must not.
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let m = message("t1", None);
        outcomes.push(store.insert_message(&m, now).await.map(|_| m.id));
    }
    for failed in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert!(
            matches!(failed, mailgate::storage::StoreError::Unavailable(_)),
            "a dropped connection is UNAVAILABLE (retry), not {failed:?}"
        );
    }
    let stored: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
    assert!(
        stored.len() >= 2,
        "the writer did not recover: {:?}",
        outcomes
            .iter()
            .map(|o| o.as_ref().err().map(|e| e.to_string()))
            .collect::<Vec<_>>()
    );
    for id in stored {
        assert_eq!(
            store.get_message("t1", id).await.unwrap().status,
            MessageStatus::Queued
        );
    }
}

#[tokio::test]
async fn one_group_answers_created_replayed_and_conflicting_emails_apart() {
    let (store, db) = store().await;
    let now = now_micros();
    let first = message("t1", Some("k"));
    store.insert_message(&first, now).await.unwrap();
    let new = message("t1", Some("other"));
    let replay = message("t1", Some("k"));
    let mut conflict = message("t1", Some("k"));
    conflict.request_hash = "other".into();
    // Emails without a key in the same group, before and after those with one (PostgreSQL
    // stores the two kinds with two INSERTs of one statement).
    let (plain, plain_too) = (message("t1", None), message("t2", None));
    let results = store
        .insert_messages(
            vec![
                plain.clone(),
                new.clone(),
                replay.clone(),
                conflict.clone(),
                plain_too.clone(),
            ],
            now,
        )
        .await
        .unwrap();
    assert_eq!(results.len(), 5);
    for i in [0, 1, 4] {
        assert_eq!(results[i].as_ref().unwrap(), &InsertOutcome::Created, "{i}");
    }
    assert!(
        matches!(&results[2], Ok(InsertOutcome::Replayed { id, .. }) if *id == first.id),
        "{:?}",
        results[2]
    );
    assert!(results[3].is_err(), "{:?}", results[3]);
    // Only the stored emails have rows; the replayed ones did not add any.
    for (tenant, id) in [("t1", &new.id), ("t1", &plain.id), ("t2", &plain_too.id)] {
        assert_eq!(
            store.get_message(tenant, id).await.unwrap().status,
            MessageStatus::Queued
        );
    }
    for id in [&replay.id, &conflict.id] {
        assert!(store.get_message("t1", id).await.is_err());
    }
    // Each stored email has its recipient row, once; the others none.
    sqlx::any::install_default_drivers();
    let raw = sqlx::AnyPool::connect(&db.url).await.unwrap();
    let stored = [&first, &new, &plain, &plain_too].map(|m| m.id.clone());
    assert_eq!(child_rows(&raw, "message_recipients", &stored).await, 4);
    let refused = [&replay, &conflict].map(|m| m.id.clone());
    assert_eq!(child_rows(&raw, "message_recipients", &refused).await, 0);
    let claimed = store
        .claim_due(now + 1, now + 60_000_000, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4, "the first email and the three new ones");
}

#[tokio::test]
async fn a_failed_group_stores_nothing_and_the_writer_goes_on() {
    let (store, _db) = store().await;
    let now = now_micros();
    let kept = message("t1", None);
    // The same id twice: the second row breaks the primary key, so the whole group fails.
    let mut twin = message("t1", None);
    twin.id = kept.id.clone();
    assert!(store
        .insert_messages(vec![kept.clone(), twin], now)
        .await
        .is_err());
    assert!(
        store.get_message("t1", &kept.id).await.is_err(),
        "nothing of a failed group is committed"
    );
    let later = message("t1", None);
    assert_eq!(
        store.insert_message(&later, now).await.unwrap(),
        InsertOutcome::Created
    );
    let claimed = store
        .claim_due(now + 1, now + 60_000_000, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(store
        .complete(&claimed[0], &[attempt(1)], &sent(), now)
        .await
        .unwrap());
    assert_eq!(store.list_attempts("t1", &later.id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn sending_slots_stop_at_the_limit_per_window_and_profile() {
    let (store, _db) = store().await;
    let mut taken = Vec::new();
    for _ in 0..5 {
        taken.push(store.reserve_slot("p1", 1, 100, 3).await.unwrap());
    }
    assert_eq!(taken, [true, true, true, false, false]);
    assert!(
        store.reserve_slot("p1", 1, 101, 3).await.unwrap(),
        "a new window"
    );
    assert!(
        store.reserve_slot("p2", 1, 100, 3).await.unwrap(),
        "another profile"
    );
    assert!(
        store.reserve_slot("p1", 86_400, 0, 3).await.unwrap(),
        "a day window is counted apart from the second windows"
    );
    // Concurrent reservations never overshoot.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let store = store.clone();
        tasks.spawn(async move { store.reserve_slot("p3", 1, 7, 5).await.unwrap() });
    }
    let granted = tasks.join_all().await.into_iter().filter(|t| *t).count();
    assert_eq!(granted, 5);
    assert_eq!(
        store.prune_usage(102).await.unwrap(),
        3,
        "windows ended before 102"
    );
    assert!(store.reserve_slot("p1", 1, 100, 3).await.unwrap(), "pruned");
}

#[tokio::test]
async fn retention_deletes_old_final_entries_in_batches_and_never_pending_ones() {
    let (store, db) = store().await;
    let old = now_micros() - 40 * 86_400_000_000;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let m = message("t1", None);
        ids.push(m.id.clone());
        store.insert_message(&m, old).await.unwrap();
    }
    // Four of the old ones are sent; one is still waiting in the queue.
    let claimed = store.claim_due(old + 1, old + 60_000_000, 4).await.unwrap();
    for c in &claimed {
        assert!(store
            .complete(c, &[attempt(1)], &sent(), old)
            .await
            .unwrap());
    }
    let fresh = message("t1", None);
    store.insert_message(&fresh, now_micros()).await.unwrap();
    let leased = store
        .lease_message("t1", &fresh.id, now_micros(), now_micros() + 60_000_000)
        .await
        .unwrap();
    assert!(store
        .complete(&leased, &[attempt(1)], &sent(), now_micros())
        .await
        .unwrap());
    let cutoff = now_micros() - 30 * 86_400_000_000;
    assert_eq!(store.delete_expired(cutoff, 3).await.unwrap(), 3);
    assert_eq!(store.delete_expired(cutoff, 3).await.unwrap(), 1);
    assert_eq!(store.delete_expired(cutoff, 3).await.unwrap(), 0);
    let pending = ids
        .iter()
        .find(|id| claimed.iter().all(|c| c.message.id != **id))
        .unwrap();
    assert_eq!(
        store.get_message("t1", pending).await.unwrap().status,
        MessageStatus::Queued,
        "an accepted email is never dropped by retention"
    );
    store.get_message("t1", &fresh.id).await.unwrap();
    for c in &claimed {
        assert!(store.get_message("t1", &c.message.id).await.is_err());
    }
    // Their attempts and recipients went with them (on PostgreSQL a trigger deletes them,
    // not a foreign key), and no other email's did.
    let gone: Vec<String> = claimed.iter().map(|c| c.message.id.clone()).collect();
    sqlx::any::install_default_drivers();
    let raw = sqlx::AnyPool::connect(&db.url).await.unwrap();
    assert_eq!(child_rows(&raw, "attempts", &gone).await, 0);
    assert_eq!(child_rows(&raw, "message_recipients", &gone).await, 0);
    let kept = vec![pending.clone(), fresh.id.clone()];
    assert_eq!(
        child_rows(&raw, "message_recipients", &kept).await,
        2,
        "the kept emails keep their recipient"
    );
    assert_eq!(
        child_rows(&raw, "attempts", &kept).await,
        1,
        "the kept sent email keeps its attempt"
    );
    raw.close().await;
}

/// The rows of `table` (attempts, message_recipients) that belong to the emails `ids`,
/// read straight from the database.
async fn child_rows(raw: &sqlx::AnyPool, table: &str, ids: &[String]) -> i64 {
    let list: Vec<String> = ids.iter().map(|id| format!("'{id}'")).collect();
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE message_id IN ({})",
        list.join(", ")
    ))
    .fetch_one(raw)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_housekeeping_pass_deletes_in_batches_until_done() {
    let (store, _db) = store().await;
    let old = now_micros() - 100 * 86_400_000_000;
    for _ in 0..5 {
        store
            .insert_message(&message("t1", None), old)
            .await
            .unwrap();
    }
    for c in store.claim_due(old + 1, old + 60_000_000, 5).await.unwrap() {
        assert!(store
            .complete(&c, &[attempt(1)], &sent(), old)
            .await
            .unwrap());
    }
    store.reserve_slot("p1", 1, 1_000, 5).await.unwrap();
    let config = mailgate::config::RetentionConfig {
        max_age: std::time::Duration::from_secs(90 * 86_400),
        batch_size: 2,
        ..Default::default()
    };
    let pass = mailgate::housekeeping::run_once(&store, &config, now_micros())
        .await
        .unwrap();
    assert_eq!((pass.deleted, pass.batches, pass.pruned_windows), (5, 3, 1));
    let keep = mailgate::config::RetentionConfig {
        max_age: std::time::Duration::ZERO,
        ..Default::default()
    };
    store
        .insert_message(&message("t1", None), old)
        .await
        .unwrap();
    let c = store.claim_due(old + 1, old + 60_000_000, 1).await.unwrap();
    store
        .complete(&c[0], &[attempt(1)], &sent(), old)
        .await
        .unwrap();
    let pass = mailgate::housekeeping::run_once(&store, &keep, now_micros())
        .await
        .unwrap();
    assert_eq!(pass.deleted, 0, "max_age 0s keeps everything");
}

#[tokio::test]
async fn statistics_from_the_hourly_rollup_match_live_counts_and_follow_later_changes() {
    let (store, _db) = store().await;
    const HOUR: i64 = 3_600_000_000;
    let now = now_micros();
    let base = (now / HOUR - 72) * HOUR; // three days ago, on the hour
                                         // 30 emails of t1 and 10 of t2 over 10 hours, a few minutes past each hour.
    for i in 0..40i64 {
        let tenant = if i < 30 { "t1" } else { "t2" };
        let mut m = message(tenant, None);
        m.email_type = ["welcome", "notification"][usize::try_from(i % 2).unwrap()].into();
        store
            .insert_message(&m, base + (i % 10) * HOUR + 60_000_000 * (i / 10 + 1))
            .await
            .unwrap();
    }
    // Half of them sent, at the time they were created.
    let claimed = store
        .claim_due(base + 11 * HOUR, base + 12 * HOUR, 20)
        .await
        .unwrap();
    for c in &claimed {
        assert!(store
            .complete(c, &[attempt(1)], &sent(), base)
            .await
            .unwrap());
    }
    let day = Some(86_400_000_000);
    let hour = Some(HOUR);
    // A window with ragged ends: from 30 minutes into the first hour to 30 minutes into the
    // eighth.
    let (start, end) = (base + HOUR / 2, base + 7 * HOUR + HOUR / 2);
    let live: Vec<_> = [None, hour, day]
        .iter()
        .map(|b| (*b, store.email_stats("t1", start, end, *b)))
        .collect();
    let mut before = Vec::new();
    for (b, fut) in live {
        before.push((b, fut.await.unwrap()));
    }
    assert!(before[0].1.total > 0);

    // The first pass starts watching the ended hours, the second rolls them up.
    store.roll_up_log(now, 500).await.unwrap();
    assert!(store.roll_up_log(now, 500).await.unwrap() >= 10);
    for (b, expected) in &before {
        assert_eq!(
            &store.email_stats("t1", start, end, *b).await.unwrap(),
            expected,
            "rolled-up statistics equal the live count (bucket {b:?})"
        );
    }

    // Later changes to rolled-up hours: a late delivery, an old email stored now, retention.
    let late = store
        .claim_due(base + 11 * HOUR, base + 12 * HOUR, 1)
        .await
        .unwrap();
    let late_status = late[0].message.tenant_id.clone();
    assert!(store
        .complete(&late[0], &[attempt(1)], &sent(), now)
        .await
        .unwrap());
    let extra = message("t1", None);
    store
        .insert_message(&extra, base + 3 * HOUR + 1)
        .await
        .unwrap();
    let after = store.email_stats("t1", start, end, None).await.unwrap();
    let count = |s: &mailgate::storage::EmailStats, k: &str| {
        s.by_status
            .iter()
            .find(|(status, _)| status == k)
            .map_or(0, |(_, n)| *n)
    };
    let moved = i64::from(
        late_status == "t1" && {
            let created = late[0].message.created_at;
            created >= start && created < end
        },
    );
    assert_eq!(
        after.total,
        before[0].1.total + 1,
        "the old email stored now counts"
    );
    assert_eq!(count(&after, "SENT"), count(&before[0].1, "SENT") + moved);
    // The next pass recomputes the dirty hours; the answer stays the same and nothing is
    // left to do.
    assert!(store.roll_up_log(now, 500).await.unwrap() >= 1);
    assert_eq!(
        store.email_stats("t1", start, end, None).await.unwrap(),
        after
    );
    assert_eq!(store.roll_up_log(now, 500).await.unwrap(), 0);

    // Retention deletes the sent emails of the first four (rolled-up) hours: their hours
    // turn dirty, and the statistics drop by the deleted emails of the window.
    let cutoff = base + 4 * HOUR;
    let sent_emails: Vec<_> = claimed.iter().chain(&late).map(|c| &c.message).collect();
    let expired = sent_emails.iter().filter(|m| m.created_at < cutoff);
    let in_window = expired
        .clone()
        .filter(|m| m.tenant_id == "t1" && m.created_at >= start && m.created_at < end)
        .count();
    assert!(in_window > 0, "the window loses some emails");
    assert_eq!(
        store.delete_expired(cutoff, 1_000).await.unwrap(),
        u64::try_from(expired.count()).unwrap()
    );
    let purged = store.email_stats("t1", start, end, None).await.unwrap();
    assert_eq!(
        purged.total,
        after.total - i64::try_from(in_window).unwrap()
    );
    assert!(store.roll_up_log(now, 500).await.unwrap() >= 1);
    assert_eq!(
        store.email_stats("t1", start, end, None).await.unwrap(),
        purged
    );
}

/// A group that breaks a constraint stores nothing of itself, and the next group is stored.
/// (On SQLite the writer's statements undo the whole transaction themselves: OR ROLLBACK.)
#[tokio::test]
async fn a_group_that_breaks_a_constraint_is_undone_whole() {
    let (store, _db) = store().await;
    let now = now_micros();
    let first = message("t1", None);
    let mut twin = message("t1", None);
    twin.id = first.id.clone();
    let other = message("t1", None);
    let result = store
        .insert_messages(vec![other.clone(), first.clone(), twin], now)
        .await;
    assert!(result.is_err(), "{result:?}");
    for id in [&other.id, &first.id] {
        assert!(matches!(
            store.get_message("t1", id).await,
            Err(mailgate::storage::StoreError::NotFound(_))
        ));
    }
    stores_one_queued(&store, now).await;
}

/// Every change to an email of a watched hour counts on that hour's one dirty mark: stored,
/// claimed, completed, deleted. The rollup pass deletes a mark only at the version it read,
/// so a change made while it recomputes the hour keeps the mark. (SQLite's triggers mark
/// without an upsert since migration 0010, PostgreSQL's with one.)
#[tokio::test]
async fn each_change_to_a_watched_hour_counts_on_its_dirty_mark() {
    let (store, db) = store().await;
    const HOUR: i64 = 3_600_000_000;
    let now = now_micros();
    let hour = now / HOUR - 5;
    let created = hour * HOUR + 60_000_000;
    // The first pass watches the ended hours.
    store.roll_up_log(now, 500).await.unwrap();
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
    let marks = async || -> Vec<(String, i64, i64)> {
        sqlx::query_as("SELECT tenant_id, hour, version FROM log_rollup_dirty ORDER BY tenant_id")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    assert_eq!(marks().await, vec![]);
    for tenant in ["t1", "t1", "t2"] {
        store
            .insert_message(&message(tenant, None), created)
            .await
            .unwrap();
    }
    assert_eq!(
        marks().await,
        vec![("t1".to_owned(), hour, 2), ("t2".to_owned(), hour, 1)],
        "a new mark, then a count on it"
    );
    let claimed = store.claim_due(created + 1, now + HOUR, 10).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let t2 = claimed
        .iter()
        .find(|c| c.message.tenant_id == "t2")
        .unwrap();
    assert!(store
        .complete(t2, &[attempt(1)], &sent(), now)
        .await
        .unwrap());
    assert_eq!(
        marks().await,
        vec![("t1".to_owned(), hour, 4), ("t2".to_owned(), hour, 3)],
        "claims and completions change the status"
    );
    assert!(store.roll_up_log(now, 500).await.unwrap() >= 1);
    assert_eq!(marks().await, vec![], "the pass took both marks");
    assert_eq!(store.delete_expired(created + 1, 100).await.unwrap(), 1);
    assert_eq!(
        marks().await,
        vec![("t2".to_owned(), hour, 1)],
        "retention deleted t2's sent email"
    );
    pool.close().await;
}

/// A replica whose clock runs ahead stamps emails in an hour that has not begun for the
/// database, and runs the rollup pass with that clock. The email's later changes must
/// still count: on PostgreSQL the triggers pass only rows of hours the database has seen
/// end, so the pass must not roll up (watch) an hour beyond the database's clock.
#[tokio::test]
async fn statistics_follow_changes_when_a_replica_clock_runs_ahead() {
    let (store, _db) = store().await;
    const HOUR: i64 = 3_600_000_000;
    let now = now_micros();
    let hour = (now / HOUR + 2) * HOUR;
    let ahead = hour + 60_000_000;
    let m = message("t1", None);
    store.insert_message(&m, ahead).await.unwrap();
    // Two passes by a process three hours ahead: the first watches, the second rolls up.
    let pass_now = now + 3 * HOUR;
    store.roll_up_log(pass_now, 500).await.unwrap();
    store.roll_up_log(pass_now, 500).await.unwrap();
    let by_status = async || {
        store
            .email_stats("t1", hour, hour + HOUR, None)
            .await
            .unwrap()
            .by_status
    };
    assert_eq!(by_status().await, vec![("QUEUED".to_owned(), 1)]);
    // Delivered (two status changes), then another pass.
    let claimed = store.claim_due(ahead + 1, ahead + HOUR, 1).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(store
        .complete(&claimed[0], &[attempt(1)], &sent(), ahead + 2)
        .await
        .unwrap());
    store.roll_up_log(pass_now, 500).await.unwrap();
    assert_eq!(
        by_status().await,
        vec![("SENT".to_owned(), 1)],
        "the statistics follow the delivery"
    );
}

/// The indexes holding `status` leave out what most rows are (SENT in the status index,
/// SENDING in the statistics' covering index); listings and statistics still see every
/// status, each from where it is kept.
#[tokio::test]
async fn emails_in_flight_and_sent_are_listed_and_counted_though_an_index_leaves_them_out() {
    let (store, _db) = store().await;
    const HOUR: i64 = 3_600_000_000;
    let now = now_micros();
    let hour = now / HOUR * HOUR;
    // t1: four emails, two types; t2: one, which t1's answers never count.
    let mut ids = Vec::new();
    for i in 0..5i64 {
        let mut m = message(if i < 4 { "t1" } else { "t2" }, None);
        m.email_type = ["welcome", "notification"][usize::try_from(i % 2).unwrap()].into();
        store.insert_message(&m, hour + i).await.unwrap();
        ids.push(m.id);
    }
    // And one of t1 from the hour before, outside the window counted below.
    let earlier = message("t1", None);
    store.insert_message(&earlier, hour - 1).await.unwrap();
    ids.push(earlier.id);
    // The first four due are claimed: the earlier one and the next three. The first is
    // sent, the second failed, the third and the earlier one stay in flight; the fourth and
    // t2's stay queued.
    let claimed = store.claim_due(hour + 10, now + HOUR, 4).await.unwrap();
    let mut taken: Vec<&str> = claimed.iter().map(|c| c.message.id.as_str()).collect();
    taken.sort_unstable();
    let mut first_four: Vec<&str> = [0, 1, 2, 5].iter().map(|&i| ids[i].as_str()).collect();
    first_four.sort_unstable();
    assert_eq!(taken, first_four);
    let failed = Completion {
        status: MessageStatus::Failed,
        last_error: "550 no such user".into(),
        ..sent()
    };
    for (id, completion) in [(&ids[0], sent()), (&ids[1], failed)] {
        let c = claimed.iter().find(|c| &c.message.id == id).unwrap();
        let attempts = [attempt(1)];
        let done = store.complete(c, &attempts, &completion, hour + 20).await;
        assert!(done.unwrap());
    }

    let stats = store
        .email_stats("t1", hour, hour + HOUR, Some(HOUR))
        .await
        .unwrap();
    let mut by_status = stats.by_status.clone();
    by_status.sort();
    let expected: Vec<(String, i64)> = [("FAILED", 1), ("QUEUED", 1), ("SENDING", 1), ("SENT", 1)]
        .iter()
        .map(|(s, n)| ((*s).to_owned(), *n))
        .collect();
    assert_eq!(by_status, expected);
    assert_eq!(stats.total, 4);
    let mut by_type = stats.by_type.clone();
    by_type.sort();
    assert_eq!(
        by_type,
        vec![("notification".to_owned(), 2), ("welcome".to_owned(), 2)]
    );
    let bucket: i64 = stats
        .buckets
        .iter()
        .flat_map(|(_, c)| c.iter().map(|(_, n)| n))
        .sum();
    assert_eq!(
        bucket, 4,
        "the buckets hold every email: {:?}",
        stats.buckets
    );

    let listed = async |statuses: &[MessageStatus]| {
        let filter = LogFilter {
            statuses: statuses.to_vec(),
            ..LogFilter::default()
        };
        let rows = store.list_messages("t1", &filter, None, 10).await.unwrap();
        let mut found: Vec<String> = rows.into_iter().map(|m| m.id).collect();
        found.sort();
        found
    };
    let sorted = |picked: &[usize]| {
        let mut v: Vec<String> = picked.iter().map(|&i| ids[i].clone()).collect();
        v.sort();
        v
    };
    assert_eq!(listed(&[MessageStatus::Sent]).await, sorted(&[0]));
    assert_eq!(listed(&[MessageStatus::Sending]).await, sorted(&[2, 5]));
    assert_eq!(
        listed(&[MessageStatus::Failed, MessageStatus::Queued]).await,
        sorted(&[1, 3])
    );
    assert_eq!(
        listed(&[MessageStatus::Sent, MessageStatus::Sending]).await,
        sorted(&[0, 2, 5])
    );
    assert_eq!(listed(&[]).await, sorted(&[0, 1, 2, 3, 5]));

    if !on_postgres() {
        // A filter without SENT carries the status index's own term, without which SQLite
        // would not read a partial index.
        let filter = LogFilter {
            statuses: vec![MessageStatus::Failed],
            ..LogFilter::default()
        };
        let plan = store.explain_list("t1", &filter, None, 10).await.unwrap();
        assert!(
            plan.iter()
                .any(|step| step.contains("messages_tenant_status")),
            "{plan:?}"
        );
        // So does requeueing, with a status filter or without one.
        for statuses in [vec![], vec![MessageStatus::Failed]] {
            let filter = LogFilter {
                statuses,
                ..LogFilter::default()
            };
            let plan = store.explain_requeue("t1", &filter).await.unwrap();
            assert!(
                plan.iter()
                    .any(|step| step.contains("messages_tenant_status")),
                "{plan:?}"
            );
        }
    }
}
