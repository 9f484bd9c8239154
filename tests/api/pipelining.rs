//! SMTP PIPELINING (RFC 2920): MAIL FROM, RCPT TO and DATA in one write when the server
//! announces it, against Postfix's smtp-sink (a real server this project did not write) and
//! against the in-process server for the replies a real server will not give on demand.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
};

use mailgate::{domain::MessageStatus, proto::v1::*};

use crate::{
    external::tool,
    helpers::{as_tenant, mailbox, plain_profile, simple_email, TestApp},
    smtp_server::{Behavior, TestSmtpServer},
};

/// Postfix's smtp-sink on a free loopback port, appending every transaction (envelope and
/// message) to `dump`. Killed when dropped.
struct SmtpSink {
    child: Child,
    port: u16,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SmtpSink {
    fn start(dump: &Path) -> Option<Self> {
        let bin = tool("smtp-sink")?;
        // smtp-sink will not keep root's privileges: it switches to a user, who must be able
        // to write the dump.
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        for _ in 0..5 {
            // smtp-sink takes a port, not a socket: take a free one and hand it over.
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            let mut cmd = Command::new(&bin);
            if as_root {
                cmd.args(["-u", "nobody"]);
            }
            let mut child = cmd
                .arg("-D")
                .arg(dump)
                .arg(format!("127.0.0.1:{port}"))
                .arg("64")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("smtp-sink starts");
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(Self { child, port });
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("smtp-sink did not start");
    }
}

#[tokio::test]
async fn delivers_pipelined_through_postfix_smtp_sink() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let dump = dir.path().join("transactions");
    let Some(sink) = SmtpSink::start(&dump) else {
        return;
    };
    let app = TestApp::spawn().await;
    let profile_id = app
        .active_profile("acme", plain_profile("sink", sink.port))
        .await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let mut req = simple_email(&format!("to{i}@example.com"));
        req.profile_id = profile_id.clone();
        req.cc = vec![mailbox("carol@example.com")];
        req.bcc = vec![mailbox("hidden@example.com")];
        // A line that starts with a dot must arrive as it was written (dot-stuffing).
        req.text_body = format!(".hidden line {i}\r\n..two dots\r\nend");
        let (id, status) = app.send_and_settle("acme", req).await;
        assert_eq!(status, MessageStatus::Sent, "{id}");
        ids.push(id);
    }
    app.stop().await.unwrap();
    drop(sink);

    let text = std::fs::read_to_string(&dump).unwrap();
    // Each transaction starts with the client's address.
    let transactions: Vec<&str> = text
        .split("X-Client-Addr: ")
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(transactions.len(), 20, "{text}");
    for (i, (t, id)) in transactions.iter().zip(&ids).enumerate() {
        assert!(t.contains(&format!("X-Mailgate-Id: {id}")), "{t}");
        assert!(t.contains("X-Mail-Args: <noreply@acme.test>"), "{t}");
        for rcpt in [
            format!("to{i}@example.com"),
            "carol@example.com".into(),
            "hidden@example.com".into(),
        ] {
            assert!(t.contains(&format!("X-Rcpt-Args: <{rcpt}>")), "{t}");
        }
        let (_, message) = t.split_once("\nReceived: ").unwrap();
        assert!(
            !message.contains("hidden@example.com"),
            "no Bcc header: {t}"
        );
        assert!(message.contains(&format!("\n.hidden line {i}")), "{t}");
        assert!(message.contains("\n..two dots"), "{t}");
    }
}

/// Sends through `smtp` and waits for the outcome; the log entry.
async fn settle(app: &TestApp, profile_id: &str, to: &[&str]) -> EmailLogEntry {
    let mut req = simple_email(to[0]);
    req.to = to.iter().map(|t| mailbox(t)).collect();
    req.profile_id = profile_id.to_owned();
    let (id, _) = app.send_and_settle("acme", req).await;
    app.log_entry("acme", &id).await
}

#[tokio::test]
async fn refused_recipients_in_a_pipeline_keep_the_session_usable() {
    for pipelining in [true, false] {
        let smtp = TestSmtpServer::start(Behavior {
            pipelining,
            reject_rcpt: vec!["gone@example.com".into(), "busy@example.com".into()],
            transient_rcpt: vec!["busy@example.com".into()],
            ..Behavior::default()
        })
        .await;
        let app = TestApp::spawn().await;
        let profile_id = app
            .active_profile("acme", plain_profile("p", smtp.port))
            .await;

        // Every recipient refused for good: FAILED, nothing delivered.
        let entry = settle(&app, &profile_id, &["gone@example.com"]).await;
        assert_eq!(entry.status(), EmailStatus::Failed, "{pipelining}");
        assert_eq!(entry.attempts[0].reply_code, 550);

        // A temporary refusal of one recipient defers the whole email.
        let entry = settle(&app, &profile_id, &["ok@example.com", "busy@example.com"]).await;
        assert_eq!(entry.status(), EmailStatus::Deferred, "{pipelining}");
        assert_eq!(entry.attempts[0].reply_code, 450);

        // One of two refused for good: the other gets it.
        let entry = settle(&app, &profile_id, &["a@example.com", "gone@example.com"]).await;
        assert_eq!(entry.status(), EmailStatus::Sent, "{pipelining}");
        assert_eq!(
            entry.attempts[0].rejected_recipients,
            vec!["gone@example.com".to_owned()]
        );
        let received = smtp.received();
        assert_eq!(received.len(), 1, "{pipelining}: {received:?}");
        assert_eq!(received[0].rcpt_to, vec!["a@example.com".to_owned()]);
        // One connection verified the profile. The refusals left the pooled session in step,
        // except one: pipelined, the server had already accepted DATA (354) when the
        // temporary refusal arrived, and only a message would end that; mailgate drops the
        // session instead of sending one.
        let sessions = if pipelining { 2 } else { 1 };
        assert_eq!(smtp.connections(), 1 + sessions, "{pipelining}");
        // Each envelope came in one write exactly when the server offered PIPELINING.
        assert_eq!(smtp.pipelined(), if pipelining { 3 } else { 0 });
        app.stop().await.unwrap();
    }
}

#[tokio::test]
async fn verification_reports_every_capability_the_server_announces() {
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let app = TestApp::spawn().await;
    let report = app
        .config_client()
        .verify_smtp_profile(as_tenant(
            "acme",
            VerifySmtpProfileRequest {
                target: Some(verify_smtp_profile_request::Target::Settings(
                    plain_profile("v", smtp.port),
                )),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert!(report.succeeded, "{report:?}");
    for capability in ["PIPELINING", "8BITMIME", "SIZE 10485760"] {
        assert!(
            report.capabilities.iter().any(|c| c == capability),
            "{capability}: {:?}",
            report.capabilities
        );
    }
    app.stop().await.unwrap();
}
