//! Several real processes on one PostgreSQL database share the work without delivering any
//! message twice. (PostgreSQL only: SQLite is one process.)

use std::{collections::HashMap, time::Duration};

use mailgate::proto::v1::{
    email_log_service_client::EmailLogServiceClient, send_service_client::SendServiceClient, *,
};
use tonic::transport::Channel;

use crate::{
    helpers::{
        active_profile, as_tenant, on_postgres, plain_profile, simple_email, Binary, TestDatabase,
    },
    smtp_server::{Behavior, TestSmtpServer},
};

fn start_replica_with(
    db: &TestDatabase,
    smtp_port: u16,
    data: &std::path::Path,
    extra: &[(&str, &str)],
) -> Binary {
    let mut envs = vec![
        ("MAILGATE_DATA_DIR", data.display().to_string()),
        ("MAILGATE_DATABASE_URL", db.url.clone()),
        (
            "MAILGATE_SMTP__ALLOWED_NETWORKS",
            "[\"127.0.0.0/8\"]".to_owned(),
        ),
        ("MAILGATE_SMTP__ALLOWED_PORTS", format!("[{smtp_port}]")),
        // Replicas share one encryption key, as replicas must.
        (
            "MAILGATE_ENCRYPTION__KEY",
            "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=".to_owned(),
        ),
        ("MAILGATE_DELIVERY__CONCURRENCY", "16".to_owned()),
        ("MAILGATE_DELIVERY__POLL_INTERVAL", "50ms".to_owned()),
    ];
    envs.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    Binary::start(&envs)
}

async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_postgres_never_deliver_twice() {
    if !on_postgres() {
        eprintln!("SKIPPED: needs MAILGATE_TEST_DATABASE=postgres");
        return;
    }
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let db = TestDatabase::new().await;
    // Each replica says EHLO with its own name, so the server knows who delivered what.
    let a = start_replica_with(
        &db,
        smtp.port,
        &db.dir.path().join("a"),
        &[("MAILGATE_SMTP__HELO_NAME", "replica-a.test")],
    );
    let b = start_replica_with(
        &db,
        smtp.port,
        &db.dir.path().join("b"),
        &[("MAILGATE_SMTP__HELO_NAME", "replica-b.test")],
    );
    let (ca, cb) = (channel(&a.addr).await, channel(&b.addr).await);

    let id = active_profile(&ca, "acme", plain_profile("main", smtp.port)).await;

    // The first replica's live tail reports every delivery, its own and (through PostgreSQL
    // notifications) the other's, which also ends the wait without polling.
    let mut watch = EmailLogServiceClient::new(ca.clone())
        .watch_email_logs(as_tenant(
            "acme",
            WatchEmailLogsRequest {
                filter: Some(EmailLogFilter {
                    statuses: vec![EmailStatus::Sent.into()],
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();

    // 400 emails, accepted half by each replica, concurrently.
    const N: usize = 400;
    let mut sends = tokio::task::JoinSet::new();
    for (i, ch) in [ca.clone(), cb.clone()].into_iter().enumerate() {
        let id = id.clone();
        sends.spawn(async move {
            let mut client = SendServiceClient::new(ch);
            for j in 0..N / 2 {
                let mut req = simple_email(&format!("user{i}-{j}@example.com"));
                req.profile_id = id.clone();
                client.send_email(as_tenant("acme", req)).await.unwrap();
            }
        });
    }
    while sends.join_next().await.is_some() {}

    let mut sent = std::collections::HashSet::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while sent.len() < N {
            let item = watch.message().await.unwrap().unwrap();
            assert!(
                sent.insert(item.entry.unwrap().id),
                "one email reported SENT twice"
            );
        }
    })
    .await
    .expect("all emails SENT in time");

    // Exactly once each on the wire, and both replicas delivered.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in smtp.received() {
        let id = m
            .data
            .lines()
            .find_map(|l| l.strip_prefix("X-Mailgate-Id: "))
            .unwrap()
            .trim()
            .to_owned();
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen.len(), N);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let by_a = smtp
        .received()
        .iter()
        .filter(|m| m.helo == "replica-a.test")
        .count();
    assert!(
        by_a > 0 && by_a < N,
        "both replicas delivered ({by_a} by the first)"
    );

    for replica in [a, b] {
        let (status, log) = replica.terminate().await;
        assert!(status.success());
        assert!(log.contains("mailgate stopped"), "{log}");
    }
}

/// kill -9 during a burst of 2,000 sends, restart: every acknowledged email ends SENT, and the
/// only duplicates are emails the server accepted just before the crash, before their status
/// was recorded (counted, and bounded by the emails in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_during_a_burst_loses_no_acknowledged_email() {
    // A slow server and few workers: a backlog is queued and in flight when the crash comes.
    let smtp = TestSmtpServer::start(Behavior {
        data_delay: Duration::from_millis(20),
        ..Behavior::default()
    })
    .await;
    let db = TestDatabase::new().await;
    let data = db.dir.path().join("data");
    let env = [
        ("MAILGATE_DELIVERY__LEASE", "2s"),
        ("MAILGATE_DELIVERY__CONCURRENCY", "4"),
    ];
    let mut first = start_replica_with(
        &db,
        smtp.port,
        &data,
        &[env[0], env[1], ("MAILGATE_SMTP__HELO_NAME", "first.test")],
    );
    let ch = channel(&first.addr).await;
    let profile_id = active_profile(&ch, "acme", plain_profile("main", smtp.port)).await;

    const N: usize = 2000;
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let mut senders = tokio::task::JoinSet::new();
    for s in 0..8 {
        let (ch, acked, profile_id) = (ch.clone(), acked.clone(), profile_id.clone());
        let count_tx = count_tx.clone();
        senders.spawn(async move {
            let mut client = SendServiceClient::new(ch);
            for j in (s..N).step_by(8) {
                let mut req = simple_email(&format!("user{j}@example.com"));
                req.profile_id = profile_id.clone();
                match client.send_email(as_tenant("acme", req)).await {
                    Ok(r) => {
                        let mut acked = acked.lock().unwrap();
                        acked.push(r.into_inner().message_id);
                        let _ = count_tx.send(acked.len());
                    }
                    Err(_) => return, // the server is gone: this one was not acknowledged
                }
            }
        });
    }
    // Crash once half the burst is acknowledged.
    count_rx.wait_for(|n| *n >= N / 2).await.unwrap();
    first.child.kill().unwrap(); // SIGKILL
    let _ = first.child.wait();
    while senders.join_next().await.is_some() {}
    let acked: Vec<String> = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= N / 2 && acked.len() < N,
        "{} acknowledged",
        acked.len()
    );

    // Restart on the same database; its live tail reports what it delivers from now on.
    let second = start_replica_with(
        &db,
        smtp.port,
        &data,
        &[env[0], env[1], ("MAILGATE_SMTP__HELO_NAME", "second.test")],
    );
    let ch = channel(&second.addr).await;
    let filter = EmailLogFilter {
        statuses: vec![EmailStatus::Sent.into()],
        ..Default::default()
    };
    let mut watch = EmailLogServiceClient::new(ch.clone())
        .watch_email_logs(as_tenant(
            "acme",
            WatchEmailLogsRequest {
                filter: Some(filter),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut log = EmailLogServiceClient::new(ch.clone());
    let mut pending = std::collections::HashSet::new();
    for id in &acked {
        let entry = log
            .get_email_log(as_tenant("acme", GetEmailLogRequest { id: id.clone() }))
            .await
            .expect("every acknowledged email is stored")
            .into_inner()
            .entry
            .unwrap();
        if entry.status() != EmailStatus::Sent {
            pending.insert(id.clone());
        }
    }
    let was_pending = pending.len();
    tokio::time::timeout(Duration::from_secs(120), async {
        while !pending.is_empty() {
            let item = watch.message().await.unwrap().unwrap();
            pending.remove(&item.entry.unwrap().id);
        }
    })
    .await
    .expect("every acknowledged email SENT after the restart");

    let mut seen: HashMap<String, usize> = HashMap::new();
    let recovered = smtp
        .received()
        .iter()
        .filter(|m| m.helo == "second.test")
        .count();
    for m in smtp.received() {
        if let Some(id) = m
            .data
            .lines()
            .find_map(|l| l.strip_prefix("X-Mailgate-Id: "))
        {
            *seen.entry(id.trim().to_owned()).or_default() += 1;
        }
    }
    for id in &acked {
        assert!(
            seen.contains_key(id),
            "acknowledged email {id} never reached the server"
        );
    }
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "crash test: {} acknowledged of {N}, {recovered} delivered after the restart ({was_pending} still unsent when read), {duplicates} duplicate(s)",
        acked.len()
    );
    assert!(
        recovered > 0,
        "the crash left work that the restarted process delivered"
    );
    // A duplicate needs the server's acceptance and the crash between it and the status
    // update: at most the messages the engine holds that were sent (delivery.concurrency = 4:
    // up to 4 sending, and 24 sent and waiting for their completion to commit).
    assert!(duplicates <= 28, "{duplicates} duplicates");
    drop(second);
}

#[tokio::test]
async fn a_watch_sees_the_changes_another_replica_makes() {
    if !on_postgres() {
        eprintln!("SKIPPED: one process on SQLite; run with MAILGATE_TEST_DATABASE=postgres");
        return;
    }
    let db = TestDatabase::new().await;
    // The watched replica delivers nothing and accepts nothing: every change it reports
    // comes from the other one, through PostgreSQL notifications.
    let mut quiet = crate::helpers::test_config(&db);
    quiet.delivery.enabled = false;
    let watched = crate::helpers::TestApp::spawn_on(&db, quiet).await;
    let mut busy = crate::helpers::test_config(&db);
    busy.data_dir = db.dir.path().join("busy");
    let other = crate::helpers::TestApp::spawn_on(&db, busy).await;
    let mut stream = watched
        .log_client()
        .watch_email_logs(as_tenant("acme", WatchEmailLogsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let (id, _) = other
        .send_and_settle("acme", simple_email("bob@example.com"))
        .await;
    let mut statuses = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while statuses.last() != Some(&EmailStatus::Sent) {
            let entry = stream.message().await.unwrap().unwrap().entry.unwrap();
            assert_eq!(entry.id, id);
            statuses.push(entry.status());
        }
    })
    .await
    .expect("the other replica's changes arrived");
    // (Each entry is read when its notice arrives, so the QUEUED notice may already show
    // the entry SENT.)
    assert!(!statuses.is_empty());
    other.stop().await.unwrap();
    watched.stop().await.unwrap();
}
