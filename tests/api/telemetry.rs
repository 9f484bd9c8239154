//! Traces end to end: the real binary exports over OTLP to a real OTLP receiver (the
//! collector's TraceService, from the opentelemetry-proto definitions) running in the test.

use std::sync::{Arc, Mutex};

use mailgate::proto::v1::{
    email_log_service_client::EmailLogServiceClient, send_service_client::SendServiceClient,
    smtp_config_service_client::SmtpConfigServiceClient, *,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::any_value,
    trace::v1::Span,
};
use tonic::metadata::MetadataValue;

use crate::{
    helpers::{active_profile, as_tenant, mailbox, plain_profile, Binary, TestDatabase},
    smtp_server::{Behavior, TestSmtpServer},
};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const PASSWORD_CANARY: &str = "pw-canary-8d1f0c";
const BODY_CANARY: &str = "body-canary-51be";

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

// Several threads: the receiver and the SMTP server must keep running while this test waits
// for the child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_follow_the_caller_into_delivery_without_secrets() {
    // The OTLP receiver.
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let receiver = collector.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let smtp = TestSmtpServer::start(Behavior::default()).await;
    let db = TestDatabase::new().await;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Binary::start(&[
        (
            "MAILGATE_DATA_DIR",
            db.dir.path().join("data").display().to_string(),
        ),
        ("MAILGATE_DATABASE_URL", db.url.clone()),
        ("MAILGATE_LOG__LEVEL", "debug".into()),
        (
            "MAILGATE_SMTP__ALLOWED_NETWORKS",
            "[\"127.0.0.0/8\"]".into(),
        ),
        (
            "MAILGATE_SMTP__ALLOWED_PORTS",
            format!("[{}, 587]", smtp.port),
        ),
        (
            "MAILGATE_METRICS__PROMETHEUS_ADDR",
            format!("127.0.0.1:{metrics_port}"),
        ),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}")),
        ("OTEL_SERVICE_NAME", "mailgate-test".into()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
    ]);
    let channel = server.channel().await;
    let mut config = SmtpConfigServiceClient::new(channel.clone());

    // A profile with a password: the canary must never be exported or logged.
    let mut secret = plain_profile("secret", 587);
    secret.host = "smtp.example.com".into();
    secret.security = SmtpSecurity::Starttls.into();
    secret.username = "u@acme.test".into();
    secret.password = PASSWORD_CANARY.into();
    config
        .create_smtp_profile(as_tenant(
            "acme",
            CreateSmtpProfileRequest {
                profile: Some(secret),
                verify: false,
            },
        ))
        .await
        .unwrap();
    let profile_id = active_profile(&channel, "acme", plain_profile("main", smtp.port)).await;

    let mut watch = EmailLogServiceClient::new(channel.clone())
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
    let mut request = as_tenant(
        "acme",
        SendEmailRequest {
            to: vec![mailbox("bob@example.com")],
            subject: "Traced".into(),
            text_body: BODY_CANARY.into(),
            profile_id: profile_id.clone(),
            ..Default::default()
        },
    );
    request.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(format!("00-{TRACE_ID}-{CALLER_SPAN}-01")).unwrap(),
    );
    let sent = SendServiceClient::new(channel.clone())
        .send_email(request)
        .await
        .unwrap()
        .into_inner();
    let entry = watch.message().await.unwrap().unwrap().entry.unwrap();
    assert_eq!(entry.id, sent.message_id);
    assert_eq!(
        entry.trace_id, TRACE_ID,
        "the log entry stores the trace id"
    );
    drop(watch);

    // The Prometheus endpoint shows the delivery.
    let scrape = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: mailgate\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    })
    .await
    .unwrap();
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    let sent_line = scrape
        .lines()
        .find(|l| {
            l.starts_with("mailgate_delivery_attempts_total") && l.contains("outcome=\"sent\"")
        })
        .unwrap_or_else(|| panic!("no sent attempts in {scrape}"));
    assert!(
        sent_line.contains("tenant=\"acme\"") && sent_line.ends_with(" 1"),
        "{sent_line}"
    );
    assert!(scrape.contains("mailgate_rpc_duration"), "{scrape}");
    // The delivery's result was committed (the watch saw it SENT): one recording timed.
    let recorded = scrape
        .lines()
        .find(|l| l.starts_with("mailgate_delivery_record_duration") && l.contains("_count"))
        .unwrap_or_else(|| panic!("no recording duration in {scrape}"));
    assert!(recorded.ends_with(" 1"), "{recorded}");

    // SIGTERM: a graceful shutdown flushes the exporter.
    let (status, log) = server.terminate().await;
    assert!(status.success());

    let spans = collector.0.lock().unwrap().clone();
    let traced: Vec<&Span> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == TRACE_ID)
        .collect();
    let names: Vec<&str> = traced.iter().map(|s| s.name.as_str()).collect();
    let rpc = traced
        .iter()
        .find(|s| s.name == "mailgate.v1.SendService/SendEmail")
        .unwrap_or_else(|| panic!("no RPC span in {names:?}"));
    assert_eq!(
        hex(&rpc.parent_span_id),
        CALLER_SPAN,
        "the RPC span is a child of the caller's span"
    );
    for name in ["routing", "enqueue", "delivery", "smtp.attempt"] {
        assert!(
            names.contains(&name),
            "{name} missing from the trace: {names:?}"
        );
    }
    let attempt = traced.iter().find(|s| s.name == "smtp.attempt").unwrap();
    assert_eq!(
        attr(attempt, "server.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(attr(attempt, "server.port"), Some(smtp.port.to_string()));
    assert_eq!(attr(attempt, "smtp.security").as_deref(), Some("None"));
    assert_eq!(attr(attempt, "smtp.reply_code").as_deref(), Some("250"));
    assert_eq!(
        attr(attempt, "smtp.enhanced_code").as_deref(),
        Some("2.0.0")
    );
    assert_eq!(attr(attempt, "mailgate.outcome").as_deref(), Some("sent"));
    assert_eq!(attr(attempt, "mailgate.fallback").as_deref(), Some("false"));
    let delivery = traced.iter().find(|s| s.name == "delivery").unwrap();
    assert_eq!(attempt.parent_span_id, delivery.span_id);

    let everything = format!("{spans:?}");
    for canary in [PASSWORD_CANARY, BODY_CANARY] {
        assert!(
            !everything.contains(canary),
            "{canary} leaked into an exported span"
        );
        assert!(!log.contains(canary), "{canary} leaked into the log");
    }
    assert!(
        log.contains("\"level\":\"DEBUG\""),
        "the log was captured at debug level"
    );
    let tagged = format!("\"trace_id\":\"{TRACE_ID}\"");
    let traced_lines = log.lines().filter(|l| l.contains(&tagged)).count();
    assert!(
        traced_lines >= 2,
        "log lines of the RPC and the delivery carry the trace id"
    );
    // The trace-only spans, in the trace above, never show in the log: the lines of what
    // happens inside them (the routing's reads, the SMTP session's debug lines) carry the
    // RPC's or the delivery's span instead.
    for name in ["routing", "enqueue", "smtp.attempt"] {
        let shown = format!("\"name\":\"{name}\"");
        assert!(
            !log.lines().any(|l| l.contains(&shown)),
            "the {name} span shows in the log:\n{log}"
        );
    }
    // An RPC's span names the caller's tenant (recorded by the authentication layer): the
    // lines of the statements run while creating the profile show it.
    assert!(
        log.lines()
            .any(|l| l.contains("\"rpc.method\":\"CreateSmtpProfile\"")
                && l.contains("\"tenant_id\":\"acme\"")),
        "no log line of an RPC names its tenant:\n{log}"
    );
}
