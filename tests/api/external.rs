//! Against programs this project did not write: a real SMTP server (Python aiosmtpd with
//! STARTTLS, implicit TLS and AUTH) and the real grpcurl driving the real mailgate binary.
//!
//! The tools come from `.ci/install-tools.sh` (directory `MAILGATE_TOOLS_DIR`, default
//! `.tools`). Without them these tests say so and pass, unless `MAILGATE_REQUIRE_TOOLS=1`
//! (CI sets it), which makes a missing tool a failure.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
};

use mailgate::{domain::MessageStatus, proto::v1::*};

use crate::helpers::{as_tenant, mailbox, simple_email, Binary, TestApp};

const USER: &str = "mailer@acme.test";
const PASSWORD: &str = "canary-aiosmtpd-5d21";

pub fn tool(name: &str) -> Option<PathBuf> {
    let dir = std::env::var("MAILGATE_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools"));
    let path = dir.join("bin").join(name);
    if path.exists() {
        return Some(path);
    }
    if std::env::var("MAILGATE_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!(
            "{name} is required (MAILGATE_REQUIRE_TOOLS=1) but missing from {}: run .ci/install-tools.sh",
            dir.display()
        );
    }
    eprintln!("SKIPPED: {name} not installed (run .ci/install-tools.sh)");
    None
}

/// A test CA and a leaf for localhost/127.0.0.1, written as PEM files.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    /// A client certificate (PEM) and key signed by the CA, for mutual TLS.
    client: (String, String),
}

impl TestPki {
    pub fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mailgate test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf_params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cert.pem"),
            format!("{}{}", leaf.pem(), ca.pem()),
        )
        .unwrap();
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params
            .distinguished_name
            .push(DnType::CommonName, "mailgate test client");
        let client_cert = client_params.signed_by(&client_key, &ca).unwrap();
        Self {
            dir,
            ca_pem: ca.pem(),
            client: (client_cert.pem(), client_key.serialize_pem()),
        }
    }

    /// The client certificate and key (PEM).
    pub fn client_identity(&self) -> (String, String) {
        self.client.clone()
    }
}

/// The aiosmtpd server of tests/fixtures/smtp_server.py; stops when dropped.
pub struct RealSmtp {
    child: Child,
    _stdin: ChildStdin,
    pub starttls_port: u16,
    pub implicit_port: u16,
    pub out: tempfile::TempDir,
    pub pki: TestPki,
}

impl Drop for RealSmtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RealSmtp {
    pub fn start() -> Option<Self> {
        let python = tool("tools-python")?;
        let pki = TestPki::new();
        let out = tempfile::tempdir().unwrap();
        let mut child = Command::new(python)
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smtp_server.py"))
            .env("CERT", pki.dir.path().join("cert.pem"))
            .env("KEY", pki.dir.path().join("key.pem"))
            .env("SMTP_USER", USER)
            .env("SMTP_PASS", PASSWORD)
            .env("AUTH_REQUIRED", "1")
            .env("OUT", out.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("aiosmtpd starts");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = |key: &str| -> u16 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("bad READY line {line:?}"))
        };
        let (starttls_port, implicit_port) = (port("starttls="), port("implicit="));
        Some(Self {
            child,
            _stdin: stdin,
            starttls_port,
            implicit_port,
            out,
            pki,
        })
    }

    /// The messages received: (envelope JSON, raw message).
    pub fn received(&self) -> Vec<(serde_json::Value, String)> {
        let mut out = Vec::new();
        let mut n = 1;
        loop {
            let json = self.out.path().join(format!("{n}.json"));
            let Ok(meta) = std::fs::read_to_string(&json) else {
                return out;
            };
            let eml = std::fs::read_to_string(self.out.path().join(format!("{n}.eml"))).unwrap();
            out.push((serde_json::from_str(&meta).unwrap(), eml));
            n += 1;
        }
    }

    pub fn profile(
        &self,
        name: &str,
        security: SmtpSecurity,
        mechanism: AuthMechanism,
    ) -> SmtpProfile {
        let port = if security == SmtpSecurity::ImplicitTls {
            self.implicit_port
        } else {
            self.starttls_port
        };
        SmtpProfile {
            name: name.into(),
            host: "localhost".into(),
            port: u32::from(port),
            security: security.into(),
            trusted_ca_pem: self.pki.ca_pem.clone(),
            auth_mechanism: mechanism.into(),
            username: USER.into(),
            password: PASSWORD.into(),
            from_email: "noreply@acme.test".into(),
            from_name: "Acme Notifications".into(),
            ..Default::default()
        }
    }
}

async fn deliver_through(
    smtp: &RealSmtp,
    app: &TestApp,
    profile: SmtpProfile,
) -> (String, serde_json::Value, String) {
    let profile_id = app.active_profile("acme", profile).await;
    let mut req = simple_email("bob@example.com");
    req.profile_id = profile_id;
    req.cc = vec![mailbox("carol@example.com")];
    req.bcc = vec![mailbox("hidden@example.com")];
    req.subject = "Welcome aboard".into();
    let (id, status) = app.send_and_settle("acme", req).await;
    assert_eq!(
        status,
        MessageStatus::Sent,
        "{:#?}",
        app.log_entry("acme", &id).await
    );
    let (meta, eml) = smtp
        .received()
        .pop()
        .expect("aiosmtpd received the message");
    (id, meta, eml)
}

#[tokio::test]
async fn delivers_through_real_server_with_starttls_and_auth() {
    let Some(smtp) = RealSmtp::start() else {
        return;
    };
    let app = TestApp::spawn().await;
    for (i, mechanism) in [
        AuthMechanism::Login,
        AuthMechanism::Plain,
        AuthMechanism::Auto,
    ]
    .into_iter()
    .enumerate()
    {
        let profile = smtp.profile(&format!("starttls-{i}"), SmtpSecurity::Starttls, mechanism);
        let (id, meta, eml) = deliver_through(&smtp, &app, profile).await;
        assert_eq!(meta["tls"], true);
        assert_eq!(meta["auth_user"], USER);
        assert_eq!(meta["mail_from"], "noreply@acme.test");
        let mut rcpts: Vec<String> = meta["rcpt_tos"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        rcpts.sort();
        assert_eq!(
            rcpts,
            ["bob@example.com", "carol@example.com", "hidden@example.com"]
        );
        let headers = eml.split("\r\n\r\n").next().unwrap();
        assert!(
            headers.contains("From: \"Acme Notifications\" <noreply@acme.test>")
                || headers.contains("From: Acme Notifications <noreply@acme.test>"),
            "{headers}"
        );
        assert!(headers.contains("To: bob@example.com"));
        assert!(headers.contains("Cc: carol@example.com"));
        assert!(headers.contains("Subject: Welcome aboard"));
        assert!(headers.contains(&format!("X-Mailgate-Id: {id}")));
        assert!(!eml.contains("hidden@example.com"), "no Bcc header");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn delivers_through_real_server_with_implicit_tls() {
    let Some(smtp) = RealSmtp::start() else {
        return;
    };
    let app = TestApp::spawn().await;
    let profile = smtp.profile("smtps", SmtpSecurity::ImplicitTls, AuthMechanism::Plain);
    let (_, meta, _) = deliver_through(&smtp, &app, profile).await;
    assert_eq!(meta["tls"], true);
    assert_eq!(meta["listener"], "implicit");
    app.stop().await.unwrap();
}

async fn failed_stage(app: &TestApp, settings: SmtpProfile) -> StageResult {
    let report = app
        .config_client()
        .verify_smtp_profile(as_tenant(
            "acme",
            VerifySmtpProfileRequest {
                target: Some(verify_smtp_profile_request::Target::Settings(settings)),
                recipient: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert!(!report.succeeded);
    let text = format!("{report:?}");
    assert!(
        !text.contains(PASSWORD) && !text.contains("wrong-password-canary"),
        "no secret in a report"
    );
    report
        .stages
        .into_iter()
        .find(|s| s.status() == StageStatus::Failed)
        .unwrap()
}

#[tokio::test]
async fn verification_names_the_failing_stage_against_a_real_server() {
    let Some(smtp) = RealSmtp::start() else {
        return;
    };
    let app = TestApp::spawn().await;

    let mut wrong_password = smtp.profile("x", SmtpSecurity::Starttls, AuthMechanism::Login);
    wrong_password.password = "wrong-password-canary".into();
    let stage = failed_stage(&app, wrong_password).await;
    assert_eq!(stage.stage(), VerificationStage::Auth);
    assert_eq!(stage.reply_code, 535);
    assert!(
        stage.hint.contains("authentication failed"),
        "{}",
        stage.hint
    );

    let mut untrusted = smtp.profile("x", SmtpSecurity::Starttls, AuthMechanism::Login);
    untrusted.trusted_ca_pem.clear();
    let stage = failed_stage(&app, untrusted).await;
    assert_eq!(stage.stage(), VerificationStage::Tls);
    assert!(stage.hint.contains("certificate"), "{}", stage.hint);

    // STARTTLS against the implicit-TLS port: the server never greets in plain text.
    let mut wrong_port = smtp.profile("x", SmtpSecurity::Starttls, AuthMechanism::Login);
    wrong_port.port = u32::from(smtp.implicit_port);
    let stage = failed_stage(&app, wrong_port).await;
    assert!(
        matches!(
            stage.stage(),
            VerificationStage::Greeting | VerificationStage::Tls
        ),
        "{stage:?}"
    );

    // Implicit TLS against the STARTTLS port.
    let mut wrong_mode = smtp.profile("x", SmtpSecurity::ImplicitTls, AuthMechanism::Login);
    wrong_mode.port = u32::from(smtp.starttls_port);
    let stage = failed_stage(&app, wrong_mode).await;
    assert_eq!(stage.stage(), VerificationStage::Tls);
    assert!(stage.hint.contains("STARTTLS"), "{}", stage.hint);

    // Plain text where the server requires AUTH, which it only offers after STARTTLS.
    let mut plain = smtp.profile("x", SmtpSecurity::None, AuthMechanism::Unspecified);
    plain.username.clear();
    plain.password.clear();
    let stage = failed_stage(&app, plain).await;
    assert_eq!(stage.stage(), VerificationStage::MailFrom);
    assert_eq!(stage.reply_code, 530);
    app.stop().await.unwrap();
}

/// The README's grpcurl walkthrough, run with the real grpcurl against the real binary.
#[tokio::test]
async fn grpcurl_walkthrough_against_the_binary() {
    let Some(grpcurl) = tool("grpcurl") else {
        return;
    };
    let Some(smtp) = RealSmtp::start() else {
        return;
    };
    let db = crate::helpers::TestDatabase::new().await;
    let ca_file = smtp.pki.dir.path().join("ca.pem");
    std::fs::write(&ca_file, &smtp.pki.ca_pem).unwrap();
    let server = Binary::start(&[
        (
            "MAILGATE_DATA_DIR",
            db.dir.path().join("data").display().to_string(),
        ),
        ("MAILGATE_DATABASE_URL", db.url.clone()),
        (
            "MAILGATE_SMTP__ALLOWED_NETWORKS",
            "[\"127.0.0.0/8\"]".into(),
        ),
        (
            "MAILGATE_SMTP__ALLOWED_PORTS",
            format!("[{}, {}]", smtp.starttls_port, smtp.implicit_port),
        ),
        (
            "MAILGATE_SMTP__EXTRA_ROOTS_FILE",
            ca_file.display().to_string(),
        ),
        // mailgate's own debug lines, the libraries' at info: the lines name their RPC or
        // delivery from its log context, not from spans.
        ("MAILGATE_LOG__LEVEL", "info,mailgate=debug".into()),
    ]);
    let addr = server.addr.clone();
    let health = Binary::command()
        .args(["healthcheck", "--addr", &addr])
        .output()
        .unwrap();
    assert!(health.status.success(), "healthcheck: {health:?}");
    let grpc = |args: &[&str]| -> serde_json::Value {
        let mut cmd = Command::new(&grpcurl);
        cmd.args([
            "-plaintext",
            "-H",
            "x-tenant-id: acme",
            "-H",
            "x-source: grpcurl",
        ]);
        cmd.args(args);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        if text.trim_start().starts_with('{') {
            serde_json::from_str(&text).unwrap()
        } else {
            serde_json::Value::String(text)
        }
    };
    let services = grpc(&[&addr, "list"]);
    for s in [
        "mailgate.v1.SendService",
        "mailgate.v1.SmtpConfigService",
        "mailgate.v1.EmailLogService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.as_str().unwrap().contains(s), "{services}");
    }
    let profile = serde_json::json!({
        "profile": {
            "name": "primary", "host": "localhost", "port": smtp.starttls_port,
            "security": "SMTP_SECURITY_STARTTLS", "auth_mechanism": "AUTH_MECHANISM_LOGIN",
            "username": USER, "password": PASSWORD,
            "from_email": "noreply@acme.test", "from_name": "Acme"
        },
        "verify": true
    });
    let created = grpc(&[
        "-d",
        &profile.to_string(),
        &addr,
        "mailgate.v1.SmtpConfigService/CreateSmtpProfile",
    ]);
    assert_eq!(created["verification"]["succeeded"], true, "{created}");
    assert!(!created.to_string().contains(PASSWORD));
    let profile_id = created["profile"]["id"].as_str().unwrap().to_owned();
    grpc(&[
        "-d",
        &serde_json::json!({"id": profile_id}).to_string(),
        &addr,
        "mailgate.v1.SmtpConfigService/ActivateSmtpProfile",
    ]);
    let send = serde_json::json!({
        "profile_id": profile_id,
        "to": [{"email": "bob@example.com", "name": "Bob"}],
        "subject": "Hello from grpcurl",
        "text_body": "It works."
    });
    // Watch the log until the message is SENT (the live tail ends the wait, not a timer).
    // The watch starts before the send: a delivery can finish before a watch started after
    // it has subscribed.
    let mut watch = Command::new(&grpcurl)
        .args([
            "-plaintext",
            "-H",
            "x-tenant-id: acme",
            "-max-time",
            "30",
            "-d",
            "{}",
            &addr,
            "mailgate.v1.EmailLogService/WatchEmailLogs",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let sent = grpc(&[
        "-d",
        &send.to_string(),
        &addr,
        "mailgate.v1.SendService/SendEmail",
    ]);
    let message_id = sent["messageId"].as_str().unwrap().to_owned();
    let entry = grpc(&[
        "-d",
        &serde_json::json!({"id": message_id}).to_string(),
        &addr,
        "mailgate.v1.EmailLogService/GetEmailLog",
    ]);
    let status = entry["entry"]["status"].as_str().unwrap().to_owned();
    if status != "EMAIL_STATUS_SENT" {
        let mut reader = BufReader::new(watch.stdout.take().unwrap());
        let mut buf = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                // The watch may still have subscribed after the delivery; the log decides.
                break;
            }
            buf.push_str(&line);
            if buf.contains(&message_id) && buf.contains("EMAIL_STATUS_SENT") {
                break;
            }
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let entry = grpc(&[
        "-d",
        &serde_json::json!({"id": message_id}).to_string(),
        &addr,
        "mailgate.v1.EmailLogService/GetEmailLog",
    ]);
    assert_eq!(entry["entry"]["status"], "EMAIL_STATUS_SENT", "{entry}");
    assert_eq!(entry["entry"]["source"], "grpcurl");
    assert_eq!(entry["entry"]["attempts"][0]["replyCode"], 250);
    let (meta, eml) = smtp.received().pop().unwrap();
    assert_eq!(meta["auth_user"], USER);
    assert!(eml.contains("Subject: Hello from grpcurl"));

    // Graceful shutdown on SIGTERM: exit code 0; the password never reached the log.
    let (status, log) = server.terminate().await;
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    assert!(log.contains("mailgate stopped"), "{log}");
    assert!(!log.contains(PASSWORD), "the password appeared in the log");
    // The delivery's line names it: tenant, message, attempt, outcome.
    let finished = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "attempt finished" && l["span"]["message_id"] == message_id)
        .unwrap_or_else(|| panic!("no line of the delivery of {message_id}:\n{log}"));
    let span = &finished["span"];
    assert_eq!(span["name"], "delivery", "{finished}");
    assert_eq!(span["tenant_id"], "acme", "{finished}");
    assert_eq!(span["attempt"], 1, "{finished}");
    assert_eq!(span["mailgate.status"], "SENT", "{finished}");
    assert_eq!(finished["spans"], serde_json::json!([span]), "{finished}");
}
