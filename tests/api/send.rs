//! SendEmail through the in-process SMTP server and the file drop: statuses, attempts,
//! headers on the wire, validation and isolation.

use mailgate::{domain::MessageStatus, proto::v1::*};
use tonic::Code;

use crate::{
    helpers::{as_tenant, mailbox, plain_profile, simple_email, TestApp},
    smtp_server::{Behavior, TestSmtpServer},
};

#[tokio::test]
async fn an_email_to_bcc_recipients_only_is_delivered_without_naming_them() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let profile_id = app
        .active_profile("acme", plain_profile("main", smtp.port))
        .await;
    let mut req = simple_email("bob@example.com");
    req.profile_id = profile_id;
    req.to = vec![];
    req.bcc = vec![mailbox("secret@example.com")];
    let (_, status) = app.send_and_settle("acme", req).await;
    assert_eq!(status, MessageStatus::Sent);
    let received = smtp.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].rcpt_to, ["secret@example.com"]);
    assert!(!received[0].data.contains("secret@example.com"));
}

#[tokio::test]
async fn sends_through_profile_with_right_headers_and_envelope() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let mut profile = plain_profile("main", smtp.port);
    profile.cc = vec!["audit@acme.test".into()];
    profile.bcc = vec!["archive@acme.test".into()];
    profile.error_to = "bounces@acme.test".into();
    profile.headers = vec![Header {
        name: "X-Profile".into(),
        value: "p".into(),
    }];
    let profile_id = app.active_profile("acme", profile).await;

    let mut req = simple_email("bob@example.com");
    req.profile_id = profile_id.clone();
    req.cc = vec![mailbox("carol@example.com")];
    req.bcc = vec![mailbox("secret@example.com")];
    req.headers = vec![Header {
        name: "X-Request".into(),
        value: "r".into(),
    }];
    req.tags = [("user_id".to_string(), "42".to_string())].into();
    let (id, status) = app.send_and_settle("acme", req).await;
    assert_eq!(status, MessageStatus::Sent);

    let received = smtp.received();
    assert_eq!(received.len(), 1);
    let m = &received[0];
    assert_eq!(
        m.mail_from, "bounces@acme.test",
        "error_to is the envelope sender"
    );
    let mut rcpts = m.rcpt_to.clone();
    rcpts.sort();
    assert_eq!(
        rcpts,
        [
            "archive@acme.test",
            "audit@acme.test",
            "bob@example.com",
            "carol@example.com",
            "secret@example.com"
        ]
    );
    let headers = m.data.split("\r\n\r\n").next().unwrap();
    assert!(
        headers.contains("From: Acme <noreply@acme.test>"),
        "{headers}"
    );
    assert!(headers.contains("To: bob@example.com"));
    assert!(
        headers.contains("Cc: carol@example.com, audit@acme.test"),
        "{headers}"
    );
    assert!(headers.contains("Subject: Hello"));
    assert!(headers.contains(&format!("X-Mailgate-Id: {id}")));
    assert!(headers.contains("X-Profile: p") && headers.contains("X-Request: r"));
    assert!(headers.contains("Message-ID: <") && headers.contains("Date: "));
    assert!(!m.data.contains("secret@example.com") && !m.data.contains("archive@acme.test"));
    assert!(!headers.to_ascii_lowercase().contains("\r\nbcc:"));

    let entry = app.log_entry("acme", &id).await;
    assert_eq!(entry.status(), EmailStatus::Sent);
    assert_eq!(entry.profile_id, profile_id);
    assert_eq!(entry.profile_reason(), ProfileReason::Request);
    assert_eq!(entry.source, "test-suite");
    assert_eq!(entry.tags.get("user_id").map(String::as_str), Some("42"));
    assert_eq!(entry.attempts.len(), 1);
    let attempt = &entry.attempts[0];
    assert_eq!(attempt.reply_code, 250);
    assert_eq!(attempt.enhanced_code, "2.0.0");
    assert!(attempt.reply_text.contains("queued as TEST"));
    assert_eq!(attempt.outcome(), AttemptOutcome::Sent);
    assert!(entry.sent_time.is_some());
    app.stop().await.unwrap();
}

#[tokio::test]
async fn without_profile_the_file_drop_delivers() {
    let app = TestApp::spawn().await;
    let (id, status) = app
        .send_and_settle("acme", simple_email("bob@example.com"))
        .await;
    assert_eq!(status, MessageStatus::Sent);
    let eml = std::fs::read_to_string(
        app.data_dir
            .join("outbox")
            .join("acme")
            .join(format!("{id}.eml")),
    )
    .unwrap();
    assert!(eml.contains("X-Mailgate-Envelope-To: bob@example.com"));
    assert!(eml.contains("Subject: Hello"));
    let entry = app.log_entry("acme", &id).await;
    assert_eq!(entry.profile_reason(), ProfileReason::SystemDefault);
    assert_eq!(entry.attempts[0].server, "file-drop");
    app.stop().await.unwrap();
}

async fn settle_with(behavior: Behavior, to: &[&str]) -> (EmailLogEntry, TestSmtpServer) {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let profile_id = app
        .active_profile("acme", plain_profile("main", smtp.port))
        .await;
    smtp.set_behavior(behavior);
    let mut req = simple_email(to[0]);
    req.to = to.iter().map(|t| mailbox(t)).collect();
    req.profile_id = profile_id;
    let (id, _) = app.send_and_settle("acme", req).await;
    let entry = app.log_entry("acme", &id).await;
    app.stop().await.unwrap();
    (entry, smtp)
}

#[tokio::test]
async fn permanent_rejection_after_data_fails() {
    let behavior = Behavior {
        data_reply: "554 5.7.1 Message rejected as spam".into(),
        ..Behavior::default()
    };
    let (entry, _smtp) = settle_with(behavior, &["bob@example.com"]).await;
    assert_eq!(entry.status(), EmailStatus::Failed);
    assert_eq!(entry.attempts[0].reply_code, 554);
    assert_eq!(entry.attempts[0].enhanced_code, "5.7.1");
    assert!(entry.last_error.contains("rejected as spam"));
    assert!(entry.next_attempt_time.is_none());
}

/// A server may put any byte but CR LF in a reply. PostgreSQL cannot store a NUL in text:
/// kept as sent, the reply failed the completion (and every completion and claim committed
/// with it), again at each retry.
#[tokio::test]
async fn a_reply_with_control_characters_is_recorded_without_them() {
    let behavior = Behavior {
        data_reply: "554 5.7.1 Message\0rejected\x1b[0m as spam".into(),
        ..Behavior::default()
    };
    let (entry, _smtp) = settle_with(behavior, &["bob@example.com"]).await;
    assert_eq!(entry.status(), EmailStatus::Failed);
    assert_eq!(entry.attempts[0].reply_code, 554);
    assert_eq!(entry.attempts[0].enhanced_code, "5.7.1");
    for text in [&entry.last_error, &entry.attempts[0].reply_text] {
        assert!(
            text.contains("Message\u{FFFD}rejected\u{FFFD}[0m as spam"),
            "{text}"
        );
    }

    let behavior = Behavior {
        data_reply: "250 2.0.0 OK\0queued".into(),
        ..Behavior::default()
    };
    let (entry, _smtp) = settle_with(behavior, &["bob@example.com"]).await;
    assert_eq!(entry.status(), EmailStatus::Sent);
    let text = &entry.attempts[0].reply_text;
    assert!(text.contains("OK\u{FFFD}queued"), "{text}");
}

#[tokio::test]
async fn temporary_failure_after_data_defers_with_a_retry_time() {
    let behavior = Behavior {
        data_reply: "451 4.3.0 Try again later".into(),
        ..Behavior::default()
    };
    let (entry, _smtp) = settle_with(behavior, &["bob@example.com"]).await;
    assert_eq!(entry.status(), EmailStatus::Deferred);
    assert_eq!(entry.attempts[0].reply_code, 451);
    assert_eq!(entry.attempts[0].outcome(), AttemptOutcome::Deferred);
    let next = entry.next_attempt_time.unwrap().seconds;
    let created = entry.create_time.unwrap().seconds;
    // First retry step is 30 s with +-20 % jitter.
    assert!(
        (created + 23..=created + 37).contains(&next),
        "next attempt {next} vs {created}"
    );
}

#[tokio::test]
async fn partial_recipient_rejection_delivers_to_the_others() {
    let behavior = Behavior {
        reject_rcpt: vec!["ghost@example.com".into()],
        ..Behavior::default()
    };
    let (entry, smtp) = settle_with(
        behavior,
        &["a@example.com", "ghost@example.com", "c@example.com"],
    )
    .await;
    assert_eq!(entry.status(), EmailStatus::Sent);
    assert_eq!(entry.attempts[0].rejected_recipients, ["ghost@example.com"]);
    assert_eq!(
        smtp.received()[0].rcpt_to,
        ["a@example.com", "c@example.com"]
    );
}

#[tokio::test]
async fn connection_dropped_after_the_final_dot_defers() {
    let behavior = Behavior {
        drop_after_dot: true,
        ..Behavior::default()
    };
    let (entry, _smtp) = settle_with(behavior, &["bob@example.com"]).await;
    assert_eq!(entry.status(), EmailStatus::Deferred);
    assert_eq!(entry.attempts[0].reply_code, 0);
}

#[tokio::test]
async fn a_server_that_never_greets_cannot_hold_a_worker() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app =
        TestApp::spawn_with(|c| c.delivery.attempt_timeout = std::time::Duration::from_millis(500))
            .await;
    let profile_id = app
        .active_profile("acme", plain_profile("main", smtp.port))
        .await;
    smtp.set_behavior(Behavior {
        greeting: None,
        ..Behavior::default()
    });
    let mut req = simple_email("bob@example.com");
    req.profile_id = profile_id;
    let (id, status) = app.send_and_settle("acme", req).await;
    assert_eq!(status, MessageStatus::Deferred);
    let entry = app.log_entry("acme", &id).await;
    assert!(
        entry.last_error.contains("deadline"),
        "{}",
        entry.last_error
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn greeting_421_falls_back_to_the_system_default_when_allowed() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let mut profile = plain_profile("main", smtp.port);
    profile.fallback_policy = FallbackPolicy::OnServerFailure.into();
    let profile_id = app.active_profile("acme", profile).await;
    smtp.set_behavior(Behavior {
        greeting: Some("421 4.3.2 Service not available".into()),
        ..Behavior::default()
    });
    let mut req = simple_email("bob@example.com");
    req.profile_id = profile_id;
    let (id, status) = app.send_and_settle("acme", req).await;
    assert_eq!(status, MessageStatus::Sent);
    let entry = app.log_entry("acme", &id).await;
    assert!(entry.fallback);
    assert!(
        entry.fallback_reason.contains("421") || entry.fallback_reason.contains("not available"),
        "{}",
        entry.fallback_reason
    );
    assert_eq!(entry.attempts.len(), 2);
    assert!(entry.attempts[1].fallback);
    let eml = std::fs::read_to_string(app.data_dir.join("outbox/acme").join(format!("{id}.eml")))
        .unwrap();
    assert!(
        eml.contains("From: Acme <mailgate@localhost>"),
        "operator sender on fallback: {eml}"
    );
    assert!(eml.contains("Reply-To: noreply@acme.test"));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn recipient_rejection_never_falls_back() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let mut profile = plain_profile("main", smtp.port);
    profile.fallback_policy = FallbackPolicy::OnServerFailure.into();
    let profile_id = app.active_profile("acme", profile).await;
    smtp.set_behavior(Behavior {
        reject_rcpt: vec!["bob@example.com".into()],
        ..Behavior::default()
    });
    let mut req = simple_email("bob@example.com");
    req.profile_id = profile_id;
    let (id, status) = app.send_and_settle("acme", req).await;
    assert_eq!(status, MessageStatus::Failed);
    let entry = app.log_entry("acme", &id).await;
    assert!(!entry.fallback);
    assert_eq!(entry.attempts.len(), 1);
    assert_eq!(entry.attempts[0].reply_code, 550);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn idempotency_key_replays_or_conflicts() {
    let app = TestApp::spawn().await;
    let mut client = app.send_client();
    let mut req = simple_email("bob@example.com");
    req.idempotency_key = "order-17".into();
    let first = client
        .send_email(as_tenant("acme", req.clone()))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .send_email(as_tenant("acme", req.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.message_id, again.message_id);
    assert!(!first.replayed && again.replayed);
    // Another tenant may use the same key.
    let other = client
        .send_email(as_tenant("globex", req.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.message_id, first.message_id);
    req.subject = "Different".into();
    let err = client.send_email(as_tenant("acme", req)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn bad_input_names_every_field() {
    let app = TestApp::spawn().await;
    let req = SendEmailRequest {
        to: vec![mailbox("not-an-address")],
        cc: vec![mailbox("x@y.test\r\nBcc: evil@z.test")],
        subject: String::new(),
        headers: vec![
            Header {
                name: "Bcc".into(),
                value: "a@b.c".into(),
            },
            Header {
                name: "X-Ok".into(),
                value: "a\r\nb".into(),
            },
        ],
        ..Default::default()
    };
    let err = app
        .send_client()
        .send_email(as_tenant("acme", req))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    use tonic_types::StatusExt;
    let fields: Vec<String> = err
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    for f in [
        "to[0].email",
        "cc[0].email",
        "subject",
        "text_body",
        "headers[0].name",
        "headers[1].value",
    ] {
        assert!(fields.iter().any(|x| x == f), "{f} missing from {fields:?}");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn tenants_are_isolated_and_required() {
    let app = TestApp::spawn().await;
    let (id, _) = app
        .send_and_settle("acme", simple_email("bob@example.com"))
        .await;
    let mut log = app.log_client();
    let other = log
        .get_email_log(as_tenant("globex", GetEmailLogRequest { id: id.clone() }))
        .await
        .unwrap_err();
    let missing = log
        .get_email_log(as_tenant(
            "globex",
            GetEmailLogRequest { id: "nope".into() },
        ))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound);
    assert_eq!(
        other.message(),
        missing.message(),
        "another tenant's id looks exactly like a missing one"
    );
    let listed = log
        .list_email_logs(as_tenant("globex", ListEmailLogsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());
    let anonymous = log
        .get_email_log(tonic::Request::new(GetEmailLogRequest { id }))
        .await
        .unwrap_err();
    assert_eq!(
        anonymous.code(),
        Code::InvalidArgument,
        "development mode still needs the tenant: {anonymous:?}"
    );
    assert!(anonymous.message().contains("x-tenant-id"));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn list_is_newest_first_with_stable_cursor_pages_and_filters() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut req = simple_email(&format!("user{i}@example.com"));
        req.subject = format!("Invoice {i}");
        req.email_type = if i % 2 == 0 {
            "invoice".into()
        } else {
            "welcome".into()
        };
        ids.push(app.send_and_settle("acme", req).await.0);
    }
    let mut log = app.log_client();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = log
            .list_email_logs(as_tenant(
                "acme",
                ListEmailLogsRequest {
                    page_size: 2,
                    page_token: token.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.entries.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    ids.reverse();
    assert_eq!(seen, ids);
    let filtered = log
        .list_email_logs(as_tenant(
            "acme",
            ListEmailLogsRequest {
                filter: Some(EmailLogFilter {
                    email_type: "invoice".into(),
                    statuses: vec![EmailStatus::Sent.into()],
                    recipient: "USER2@example.com".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filtered.entries.len(), 1);
    assert_eq!(filtered.entries[0].subject, "Invoice 2");
    let by_subject = log
        .list_email_logs(as_tenant(
            "acme",
            ListEmailLogsRequest {
                filter: Some(EmailLogFilter {
                    subject_contains: "invoice 4".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_subject.entries.len(), 1);
    let bad = log
        .list_email_logs(as_tenant(
            "acme",
            ListEmailLogsRequest {
                page_token: "garbage".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn explicitly_named_inactive_profile_is_a_failed_precondition() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let created = app
        .config_client()
        .create_smtp_profile(as_tenant(
            "acme",
            CreateSmtpProfileRequest {
                profile: Some(plain_profile("p", smtp.port)),
                verify: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut req = simple_email("bob@example.com");
    req.profile_id = created.profile.unwrap().id;
    let err = app
        .send_client()
        .send_email(as_tenant("acme", req))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn relay_rule_refuses_foreign_sender_domains() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let profile_id = app
        .active_profile("acme", plain_profile("main", smtp.port))
        .await;
    let mut req = simple_email("bob@example.com");
    req.profile_id = profile_id;
    req.from = Some(mailbox("ceo@other-company.test"));
    let err = app
        .send_client()
        .send_email(as_tenant("acme", req))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("other-company.test"));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn scheduled_emails_can_be_cancelled_and_failed_ones_retried() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let mut send = app.send_client();
    let mut req = simple_email("bob@example.com");
    req.send_at = Some(prost_types::Timestamp {
        seconds: 4_102_444_800,
        nanos: 0,
    }); // 2100
    let accepted = send
        .send_email(as_tenant("acme", req))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(accepted.status(), EmailStatus::Scheduled);
    let cancelled = send
        .cancel_email(as_tenant(
            "acme",
            CancelEmailRequest {
                message_id: accepted.message_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.status(), EmailStatus::Cancelled);
    let twice = send
        .cancel_email(as_tenant(
            "acme",
            CancelEmailRequest {
                message_id: accepted.message_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);
    let foreign = send
        .cancel_email(as_tenant(
            "globex",
            CancelEmailRequest {
                message_id: accepted.message_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::NotFound);

    // A failed email, retried once the server is fixed, is sent.
    let profile_id = app
        .active_profile("acme", plain_profile("main", smtp.port))
        .await;
    smtp.set_behavior(Behavior {
        data_reply: "554 5.7.1 rejected".into(),
        ..Behavior::default()
    });
    let mut req = simple_email("bob@example.com");
    req.profile_id = profile_id;
    let (id, status) = app.send_and_settle("acme", req).await;
    assert_eq!(status, MessageStatus::Failed);
    smtp.set_behavior(Behavior::default());
    let mut events = app.events();
    let retried = send
        .retry_email(as_tenant(
            "acme",
            RetryEmailRequest {
                message_id: id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.status(), EmailStatus::Queued);
    assert_eq!(
        crate::helpers::wait_settled(&mut events, &id).await,
        MessageStatus::Sent
    );
    let entry = app.log_entry("acme", &id).await;
    assert_eq!(entry.attempts.len(), 2);
    let not_failed = send
        .retry_email(as_tenant("acme", RetryEmailRequest { message_id: id }))
        .await
        .unwrap_err();
    assert_eq!(not_failed.code(), Code::FailedPrecondition);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn requeue_by_filter_requeues_only_matching_failures() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let profile_id = app
        .active_profile("acme", plain_profile("main", smtp.port))
        .await;
    smtp.set_behavior(Behavior {
        data_reply: "554 5.7.1 rejected".into(),
        ..Behavior::default()
    });
    let mut failed = Vec::new();
    for kind in ["invoice", "invoice", "welcome"] {
        let mut req = simple_email("bob@example.com");
        req.profile_id = profile_id.clone();
        req.email_type = kind.into();
        failed.push(app.send_and_settle("acme", req).await.0);
    }
    smtp.set_behavior(Behavior::default());
    let mut events = app.events();
    let answer = app
        .send_client()
        .requeue_emails(as_tenant(
            "acme",
            RequeueEmailsRequest {
                filter: Some(EmailLogFilter {
                    email_type: "invoice".into(),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.requeued_count, 2);
    let statuses = crate::helpers::wait_all_settled(&mut events, &failed[..2]).await;
    assert_eq!(statuses, [MessageStatus::Sent, MessageStatus::Sent]);
    assert_eq!(
        app.log_entry("acme", &failed[2]).await.status(),
        EmailStatus::Failed
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn send_batch_accepts_valid_recipients_and_reports_each() {
    let app = TestApp::spawn_with(|c| c.delivery.enabled = false).await;
    let recipient = |email: &str, key: &str| BatchRecipient {
        to: Some(mailbox(email)),
        idempotency_key: key.into(),
        ..Default::default()
    };
    let base = SendEmailRequest {
        subject: "Your code".into(),
        text_body: "1234".into(),
        email_type: "device_authentication".into(),
        ..Default::default()
    };
    let mut send = app.send_client();
    let answer = send
        .send_batch(as_tenant(
            "acme",
            SendBatchRequest {
                message: Some(base.clone()),
                recipients: vec![
                    recipient("a@example.com", "k1"),
                    recipient("broken", ""),
                    recipient("c@example.com", ""),
                ],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.accepted_count, 2);
    assert_eq!(answer.results.len(), 3);
    assert_eq!(answer.results[1].code, Code::InvalidArgument as i32);
    assert!(
        answer.results[1].error.contains("to[0].email"),
        "{}",
        answer.results[1].error
    );
    assert!(answer.results[1].message_id.is_empty());
    let first = answer.results[0].message_id.clone();
    assert_eq!(
        app.log_entry("acme", &first).await.email_type,
        "device_authentication"
    );

    // The same key again replays that recipient's email.
    let again = send
        .send_batch(as_tenant(
            "acme",
            SendBatchRequest {
                message: Some(base.clone()),
                recipients: vec![recipient("a@example.com", "k1")],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.results[0].message_id, first);

    // A thousand recipients are accepted in one call; more are refused as a whole.
    let many: Vec<_> = (0..1000)
        .map(|i| recipient(&format!("user{i}@example.com"), ""))
        .collect();
    let big = send
        .send_batch(as_tenant(
            "acme",
            SendBatchRequest {
                message: Some(base.clone()),
                recipients: many.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(big.accepted_count, 1000);
    let mut too_many = many;
    too_many.push(recipient("one-more@example.com", ""));
    let err = send
        .send_batch(as_tenant(
            "acme",
            SendBatchRequest {
                message: Some(base),
                recipients: too_many,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn email_stats_count_by_status_type_profile_and_bucket() {
    let app = TestApp::spawn().await;
    for _ in 0..3 {
        app.send_and_settle("acme", simple_email("bob@example.com"))
            .await;
    }
    let mut later = simple_email("bob@example.com");
    later.email_type = "welcome".into();
    later.send_at = Some(prost_types::Timestamp {
        seconds: 4_102_444_800,
        nanos: 0,
    });
    let scheduled = app
        .send_client()
        .send_email(as_tenant("acme", later))
        .await
        .unwrap()
        .into_inner();
    app.send_client()
        .cancel_email(as_tenant(
            "acme",
            CancelEmailRequest {
                message_id: scheduled.message_id,
            },
        ))
        .await
        .unwrap();
    app.send_and_settle("globex", simple_email("x@example.com"))
        .await;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let stats = app
        .log_client()
        .get_email_stats(as_tenant(
            "acme",
            GetEmailStatsRequest {
                start_time: Some(prost_types::Timestamp {
                    seconds: now - 86_400,
                    nanos: 0,
                }),
                end_time: Some(prost_types::Timestamp {
                    seconds: now + 60,
                    nanos: 0,
                }),
                bucket_width: StatsBucketWidth::Hour.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.total, 4, "other tenants are not counted");
    let get = |list: &[StatsCount], key: &str| list.iter().find(|c| c.key == key).map(|c| c.count);
    assert_eq!(get(&stats.by_status, "SENT"), Some(3));
    assert_eq!(get(&stats.by_status, "CANCELLED"), Some(1));
    assert_eq!(get(&stats.by_type, "notification"), Some(3));
    assert_eq!(get(&stats.by_type, "welcome"), Some(1));
    assert_eq!(get(&stats.by_profile, ""), Some(4));
    let bucketed: i64 = stats
        .buckets
        .iter()
        .flat_map(|b| &b.by_status)
        .map(|c| c.count)
        .sum();
    assert_eq!(bucketed, 4);
    assert!(stats
        .buckets
        .iter()
        .all(|b| b.start_time.as_ref().unwrap().seconds % 3600 == 0));

    let err = app
        .log_client()
        .get_email_stats(as_tenant(
            "acme",
            GetEmailStatsRequest {
                start_time: None,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn watch_streams_matching_changes_and_ends_on_shutdown() {
    let app = TestApp::spawn().await;
    let filter = EmailLogFilter {
        statuses: vec![EmailStatus::Sent.into()],
        ..Default::default()
    };
    let mut stream = app
        .log_client()
        .watch_email_logs(as_tenant(
            "acme",
            WatchEmailLogsRequest {
                filter: Some(filter),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    app.send_and_settle("globex", simple_email("other@example.com"))
        .await;
    let (id, _) = app
        .send_and_settle("acme", simple_email("bob@example.com"))
        .await;
    let seen = stream.message().await.unwrap().unwrap().entry.unwrap();
    assert_eq!(seen.id, id, "only this tenant's SENT entries");
    assert_eq!(seen.status(), EmailStatus::Sent);
    tokio::time::timeout(std::time::Duration::from_secs(10), app.stop())
        .await
        .expect("an open watch does not hold up shutdown")
        .unwrap();
    assert!(
        stream.message().await.map(|m| m.is_none()).unwrap_or(true),
        "the stream ended"
    );
}

#[tokio::test]
async fn a_configuration_change_reaches_the_very_next_email() {
    // Routing's reads are cached for a moment; a change made through this process empties
    // the cache, so the next email already sees it.
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn_with(|c| c.delivery.enabled = false).await;
    let id = app
        .active_profile("acme", plain_profile("main", smtp.port))
        .await;
    let mut send = app.send_client();
    let mut req = simple_email("bob@example.com");
    req.profile_id = id.clone();
    send.send_email(as_tenant("acme", req.clone()))
        .await
        .expect("active: accepted (and its reads cached)");
    app.config_client()
        .deactivate_smtp_profile(as_tenant(
            "acme",
            DeactivateSmtpProfileRequest { id: id.clone() },
        ))
        .await
        .unwrap();
    let err = send
        .send_email(as_tenant("acme", req.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    // The tenant default changes routing of the next email too.
    app.config_client()
        .activate_smtp_profile(as_tenant(
            "acme",
            ActivateSmtpProfileRequest { id: id.clone() },
        ))
        .await
        .unwrap();
    app.config_client()
        .update_tenant_settings(as_tenant(
            "acme",
            UpdateTenantSettingsRequest {
                settings: Some(TenantSettings {
                    default_profile_id: id.clone(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["default_profile_id".into()],
                }),
            },
        ))
        .await
        .unwrap();
    let accepted = send
        .send_email(as_tenant("acme", simple_email("carol@example.com")))
        .await
        .unwrap()
        .into_inner();
    let entry = app.log_entry("acme", &accepted.message_id).await;
    assert_eq!(entry.profile_id, id);
    assert_eq!(entry.profile_reason(), ProfileReason::TenantDefault);
    app.stop().await.unwrap();
}

/// Each email of a batch holds its own copy of the message's body and attachments, in memory
/// until stored and in the log after: a batch whose emails would hold more than
/// `limits.max_batch_bytes` together is refused as a whole, before anything is stored,
/// with a message that names the field and the limit.
#[tokio::test]
async fn a_batch_whose_emails_would_hold_too_much_content_is_refused_whole() {
    let app = TestApp::spawn_with(crate::helpers::batches_of_256_kib).await;
    let base = SendEmailRequest {
        subject: "Your invoice".into(),
        text_body: "Attached.".into(),
        email_type: "invoice".into(),
        attachments: vec![Attachment {
            filename: "invoice.pdf".into(),
            content_type: "application/pdf".into(),
            content: vec![b'%'; 100 * 1024],
        }],
        ..Default::default()
    };
    let recipients = |n: usize| -> Vec<BatchRecipient> {
        (0..n)
            .map(|i| BatchRecipient {
                to: Some(mailbox(&format!("user{i}@example.com"))),
                ..Default::default()
            })
            .collect()
    };
    let mut send = app.send_client();
    let two = send
        .send_batch(as_tenant(
            "acme",
            SendBatchRequest {
                message: Some(base.clone()),
                recipients: recipients(2),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(two.accepted_count, 2, "about 200 KiB together");
    let err = send
        .send_batch(as_tenant(
            "acme",
            SendBatchRequest {
                message: Some(base),
                recipients: recipients(3),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with("recipients: ")
            && err
                .message()
                .contains("limits.max_batch_bytes (262144 bytes)")
            && err.message().contains("email 2 alone holds"),
        "{}",
        err.message()
    );
    let logged = app
        .log_client()
        .list_email_logs(as_tenant("acme", ListEmailLogsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(logged.entries.len(), 2, "nothing of the refused batch");
    app.stop().await.unwrap();
}
