//! Sending limits, authentication failures on delivery, and graceful shutdown with work in
//! flight.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mailgate::{domain::MessageStatus, proto::v1::*};
use tokio::sync::broadcast;

use crate::{
    external::TestPki,
    helpers::{
        as_tenant, mailbox, plain_profile, simple_email, test_config, wait_all_settled, Binary,
        TestApp, TestDatabase,
    },
    smtp_server::{Behavior, TestSmtpServer},
};

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

async fn send_many(app: &TestApp, profile_id: &str, count: usize) -> Vec<String> {
    let mut client = app.send_client();
    let mut ids = Vec::new();
    for i in 0..count {
        let mut req = simple_email(&format!("user{i}@example.com"));
        req.profile_id = profile_id.to_owned();
        ids.push(
            client
                .send_email(as_tenant("acme", req))
                .await
                .unwrap()
                .into_inner()
                .message_id,
        );
    }
    ids
}

/// Waits (bounded, no polling) until every id has reported `status` once.
async fn wait_all_with(
    events: &mut broadcast::Receiver<mailgate::delivery::MessageEvent>,
    ids: &[String],
    status: MessageStatus,
) {
    let mut left: Vec<&String> = ids.iter().collect();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !left.is_empty() {
            let e = events.recv().await.expect("event stream");
            if e.status == status {
                left.retain(|id| **id != e.message_id);
            }
        }
    })
    .await
    .expect("every message reached the status in time");
}

#[tokio::test]
async fn a_rate_limit_spreads_sends_over_seconds_and_fails_none() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let mut profile = plain_profile("limited", smtp.port);
    profile.limits = Some(SendingLimits {
        messages_per_second: 4,
        messages_per_day: 0,
    });
    let profile_id = app.active_profile("acme", profile).await;
    let mut events = app.events();
    let started = unix_seconds();
    // Nine messages at four per second need three one-second windows: the last one cannot
    // leave before the start of the third window, two seconds after the first one began.
    let ids = send_many(&app, &profile_id, 9).await;
    let statuses = wait_all_settled(&mut events, &ids).await;
    let elapsed = unix_seconds() - started;
    assert!(
        statuses.iter().all(|s| *s == MessageStatus::Sent),
        "{statuses:?}"
    );
    assert_eq!(smtp.received().len(), 9);
    assert!(
        elapsed > 1.0,
        "9 messages at 4/s went out in {elapsed:.2}s: the limit did not hold"
    );
    for id in &ids {
        let entry = app.log_entry("acme", id).await;
        assert_eq!(entry.attempts.len(), 1, "waiting is not an attempt");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_daily_quota_holds_the_rest_until_the_next_utc_day() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    // The test drives the engine itself: one pass over the five due messages.
    let app = TestApp::spawn_with(|c| c.delivery.enabled = false).await;
    let mut profile = plain_profile("gmail-like", smtp.port);
    profile.limits = Some(SendingLimits {
        messages_per_second: 0,
        messages_per_day: 3,
    });
    let profile_id = app.active_profile("acme", profile).await;
    let ids = send_many(&app, &profile_id, 5).await;
    assert_eq!(app.engine.run_once().await, 5);
    let mut waiting = Vec::new();
    for id in &ids {
        let entry = app.log_entry("acme", id).await;
        if entry.status() != EmailStatus::Sent {
            waiting.push(id.clone());
        }
    }
    assert_eq!(waiting.len(), 2);
    assert_eq!(smtp.received().len(), 3);
    let next_day = (unix_seconds() as i64 / 86_400 + 1) * 86_400;
    for id in &waiting {
        let entry = app.log_entry("acme", id).await;
        assert_eq!(
            entry.status(),
            EmailStatus::Queued,
            "over quota waits, never fails"
        );
        assert!(entry.attempts.is_empty());
        assert!(
            entry.last_error.contains("quota of 3"),
            "{}",
            entry.last_error
        );
        let due = entry.next_attempt_time.unwrap().seconds;
        assert!(
            (next_day..next_day + 60).contains(&due),
            "due {due}, next UTC day starts {next_day}"
        );
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn auth_failure_retries_without_fallback_and_falls_back_when_allowed() {
    let pki = TestPki::new();
    let good = Behavior {
        auth: Some(("mailer".into(), "right-password".into())),
        ..Behavior::default()
    };
    let smtp = TestSmtpServer::start_tls(good.clone(), &pki).await;
    let app = TestApp::spawn().await;
    let profile_for = |name: &str, policy: FallbackPolicy| {
        let mut p = plain_profile(name, smtp.port);
        p.security = SmtpSecurity::ImplicitTls.into();
        p.trusted_ca_pem = pki.ca_pem.clone();
        p.auth_mechanism = AuthMechanism::Plain.into();
        p.username = "mailer".into();
        p.password = "right-password".into();
        p.fallback_policy = policy.into();
        p
    };
    let strict = app
        .active_profile("acme", profile_for("strict", FallbackPolicy::Never))
        .await;
    let lenient = app
        .active_profile(
            "acme",
            profile_for("lenient", FallbackPolicy::OnServerFailure),
        )
        .await;
    // The server changes its password after verification: every AUTH now gets 535.
    smtp.set_behavior(Behavior {
        auth: Some(("mailer".into(), "rotated".into())),
        ..good
    });

    let mut req = simple_email("bob@example.com");
    req.profile_id = strict.clone();
    let (id, status) = app.send_and_settle("acme", req).await;
    assert_eq!(
        status,
        MessageStatus::Deferred,
        "an auth failure is retried"
    );
    let entry = app.log_entry("acme", &id).await;
    assert!(!entry.fallback);
    assert_eq!(entry.attempts.len(), 1);
    assert_eq!(entry.attempts[0].reply_code, 535);
    assert_eq!(entry.attempts[0].outcome(), AttemptOutcome::Deferred);
    assert!(entry.next_attempt_time.is_some());
    assert!(!format!("{entry:?}").contains("right-password"));
    // The profile's health shows the failure; it stays in service.
    let profile = app
        .config_client()
        .get_smtp_profile(as_tenant(
            "acme",
            GetSmtpProfileRequest { id: strict.clone() },
        ))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    let verification = profile.verification.clone().unwrap();
    assert_eq!(verification.state(), VerificationState::Failed);
    assert!(
        verification.last_error.contains("535"),
        "{}",
        verification.last_error
    );
    assert!(!verification.last_error.contains("right-password"));
    assert_eq!(profile.status(), ProfileStatus::Active);

    let mut req = simple_email("bob@example.com");
    req.profile_id = lenient;
    let (id, status) = app.send_and_settle("acme", req).await;
    assert_eq!(status, MessageStatus::Sent);
    let entry = app.log_entry("acme", &id).await;
    assert!(entry.fallback, "the system default delivered");
    assert!(
        entry.fallback_reason.contains("535"),
        "{}",
        entry.fallback_reason
    );
    assert_eq!(entry.attempts.len(), 2);
    assert_eq!(entry.attempts[0].reply_code, 535);
    assert!(entry.attempts[1].fallback);
    assert!(app
        .data_dir
        .join("outbox/acme")
        .join(format!("{id}.eml"))
        .exists());
    assert!(smtp.received().is_empty());
    app.stop().await.unwrap();
}

/// An active profile of acme's on `smtp`, which from now on answers the end of DATA after
/// `delay` (the profile's verification went through before that).
async fn answering_after(app: &TestApp, smtp: &TestSmtpServer, delay: Duration) -> String {
    let profile_id = app
        .active_profile("acme", plain_profile("slow", smtp.port))
        .await;
    smtp.set_behavior(Behavior {
        data_delay: delay,
        ..Behavior::default()
    });
    profile_id
}

/// An app whose SMTP server takes two minutes to answer the end of DATA (far beyond the
/// half-second grace period of its shutdown), on a database a second app can reopen.
struct Stalled {
    smtp: TestSmtpServer,
    db: TestDatabase,
    config: mailgate::config::Config,
    app: TestApp,
    profile_id: String,
}

impl Stalled {
    async fn start(adjust: impl FnOnce(&mut mailgate::config::Config)) -> Self {
        let smtp = TestSmtpServer::start(Behavior::default()).await;
        let db = TestDatabase::new().await;
        let mut config = test_config(&db);
        config.shutdown_grace = Duration::from_millis(500);
        config.delivery.attempt_timeout = Duration::from_secs(120);
        adjust(&mut config);
        let app = TestApp::spawn_on(&db, config.clone()).await;
        let profile_id = answering_after(&app, &smtp, Duration::from_secs(120)).await;
        Self {
            smtp,
            db,
            config,
            app,
            profile_id,
        }
    }

    /// Stops the app, then checks that a new process on the same database finds every one
    /// of `ids` back in the queue, unattempted, and sends each once.
    async fn stop_then_deliver_elsewhere(self, ids: &[String]) {
        let Self {
            smtp,
            db,
            mut config,
            app,
            ..
        } = self;
        let stopping = std::time::Instant::now();
        app.stop().await.unwrap();
        let took = stopping.elapsed();
        assert!(
            took < Duration::from_secs(30),
            "shutdown waited {took:?} for a server that answers after 120s"
        );
        smtp.set_behavior(Behavior::default());
        config.delivery.enabled = false;
        let app = TestApp::spawn_on(&db, config).await;
        for id in ids {
            let entry = app.log_entry("acme", id).await;
            assert_eq!(entry.status(), EmailStatus::Queued, "released, not lost");
            assert!(
                entry.attempts.is_empty(),
                "an interrupted send is not an attempt"
            );
        }
        let mut events = app.events();
        while app.engine.run_once().await > 0 {}
        wait_all_with(&mut events, ids, MessageStatus::Sent).await;
        assert_eq!(smtp.received().len(), ids.len());
        app.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_in_flight_work_within_its_grace_period() {
    let stalled = Stalled::start(|_| {}).await;
    let ids = send_many(&stalled.app, &stalled.profile_id, 3).await;
    stalled.smtp.wait_for_data(3).await;
    stalled.stop_then_deliver_elsewhere(&ids).await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_work_that_ends_within_the_grace_period() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let profile_id = answering_after(&app, &smtp, Duration::from_millis(300)).await;
    let mut events = app.events();
    let ids = send_many(&app, &profile_id, 2).await;
    smtp.wait_for_data(2).await;
    app.stop().await.unwrap();
    // Both completions were recorded before the engine stopped.
    wait_all_with(&mut events, &ids, MessageStatus::Sent).await;
    assert_eq!(smtp.received().len(), 2);
}

/// A batch larger than the engine's slots is stored leased to this process and waits in
/// memory for a slot, instead of being queued for a claim; at shutdown the emails still in
/// line go back to the queue with the rest, none lost, none counted as an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_beyond_the_engines_slots_waits_in_memory_and_is_released_at_shutdown() {
    // One sending slot: six in hand, a quarter of them (one) kept for claims.
    let stalled = Stalled::start(|c| c.delivery.concurrency = 1).await;
    // The engine is running and its only sending slot is held.
    let mut ids = send_many(&stalled.app, &stalled.profile_id, 1).await;
    stalled.smtp.wait_for_data(1).await;

    let mut base = simple_email("x@example.com");
    base.profile_id = stalled.profile_id.clone();
    let recipients = (0..20)
        .map(|i| BatchRecipient {
            to: Some(mailbox(&format!("user{i}@example.com"))),
            ..Default::default()
        })
        .collect();
    let answer = stalled
        .app
        .send_client()
        .send_batch(as_tenant(
            "acme",
            SendBatchRequest {
                message: Some(base),
                recipients,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.accepted_count, 20);
    for r in &answer.results {
        // Four of the slots in hand, the rest in line: every one leased, none queued.
        let entry = stalled.app.log_entry("acme", &r.message_id).await;
        assert_eq!(entry.status(), EmailStatus::Sending, "{}", r.index);
        ids.push(r.message_id.clone());
    }
    stalled.stop_then_deliver_elsewhere(&ids).await;
}

/// An email whose lease runs short while it waits for a sending slot goes back to the
/// queue unsent and is delivered once under a new lease: sent with too little lease left,
/// another worker could claim it mid-send and send it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_whose_lease_runs_short_before_its_turn_is_given_back_unsent() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn_with(|c| {
        c.delivery.concurrency = 1;
        // Each send takes 5 s; an attempt needs 4 s of lease left (half the lease, shorter
        // than the attempt's deadline), so the email behind the first, which has about 3 s
        // left when its turn comes, goes back to the queue. A loaded machine only makes its
        // turn come later; the first email's completion has 3 s of its lease to spare (with
        // a 4 s lease and 3 s sends it had 1 s, and a suite run beside other heavy work
        // once saw that email's lease run out and the email sent twice).
        c.delivery.lease = Duration::from_secs(8);
        c.delivery.attempt_timeout = Duration::from_secs(60);
    })
    .await;
    let profile_id = answering_after(&app, &smtp, Duration::from_secs(5)).await;
    let ids = send_many(&app, &profile_id, 2).await;
    // After the accepts, which announce QUEUED too; the first send takes 5 s.
    let mut events = app.events();
    let mut given_back = false;
    let mut sent: Vec<String> = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while sent.len() < ids.len() {
            let e = events.recv().await.expect("event stream");
            match e.status {
                MessageStatus::Queued if e.message_id == ids[1] => given_back = true,
                MessageStatus::Sent => sent.push(e.message_id),
                _ => {}
            }
        }
    })
    .await
    .expect("both sent in time");
    assert!(given_back, "the second email went back to the queue");
    sent.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(sent, expected);
    assert_eq!(smtp.received().len(), 2, "each sent once");
    for id in &ids {
        assert_eq!(app.log_entry("acme", id).await.attempts.len(), 1, "{id}");
    }
    app.stop().await.unwrap();
}

/// `worker_threads` sizes the binary's async runtime (the startup line says how many workers
/// it has), and a value out of range stops the binary at start with a message naming it.
#[tokio::test]
async fn worker_threads_size_the_binarys_runtime() {
    let db = TestDatabase::new().await;
    let data = db.dir.path().join("data").display().to_string();
    for workers in [1_u64, 3] {
        let server = Binary::start(&[
            ("MAILGATE_DATA_DIR", data.clone()),
            ("MAILGATE_DATABASE_URL", db.url.clone()),
            ("MAILGATE_WORKER_THREADS", workers.to_string()),
            // The setting wins over Tokio's variable.
            ("TOKIO_WORKER_THREADS", "2".to_owned()),
        ]);
        let line = server.startup_line("mailgate listening");
        assert_eq!(line["worker_threads"], workers, "{line}");
        let (status, log) = server.terminate().await;
        assert!(status.success(), "{log}");
    }
    // Tokio's own variable counts when the setting is unset (5: not this machine's CPUs).
    let server = Binary::start(&[
        ("MAILGATE_DATA_DIR", data.clone()),
        ("MAILGATE_DATABASE_URL", db.url.clone()),
        ("TOKIO_WORKER_THREADS", "5".to_owned()),
    ]);
    assert_eq!(
        server.startup_line("mailgate listening")["worker_threads"],
        5
    );
    drop(server);
    for (name, value, message) in [
        (
            "MAILGATE_WORKER_THREADS",
            "0",
            "worker_threads must be between 1 and 1024",
        ),
        (
            "TOKIO_WORKER_THREADS",
            "two",
            "TOKIO_WORKER_THREADS must be between 1 and 1024 (or unset), not \"two\"",
        ),
        (
            "TOKIO_WORKER_THREADS",
            "0",
            "TOKIO_WORKER_THREADS must be between 1 and 1024 (or unset), not \"0\"",
        ),
    ] {
        let refused = Binary::command()
            .arg("serve")
            .env("MAILGATE_DATA_DIR", &data)
            .env("MAILGATE_DATABASE_URL", &db.url)
            .env(name, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(2), "{name}={value}: {stderr}");
        assert!(stderr.contains(message), "{name}={value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}={value}: {stderr}");
    }
}

/// The allocator gives freed memory back to the system after 300 ms without use, not
/// jemalloc's 10 s (`.cargo/config.toml` builds the setting in): a SendBatch burst's peak
/// RSS does not keep what its storing phase freed. jemalloc says what it was built with.
#[test]
fn the_allocator_gives_freed_memory_back_within_300_ms() {
    let out = crate::helpers::Binary::command()
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "confirm_conf:true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--with-malloc-conf): \"dirty_decay_ms:300\"")
            && stderr.contains("Set conf value: dirty_decay_ms:300"),
        "{stderr}"
    );
}
