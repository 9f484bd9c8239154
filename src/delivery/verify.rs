//! Verification of SMTP settings, stage by stage, with a plain-language hint for each typical
//! failure. Used by VerifySmtpProfile, by create/update with `verify`, and by SendTestEmail.

use std::time::Duration;

use tokio::time::Instant;

use super::{
    guard::Guard,
    smtp::{FailureKind, Progress, Session, SmtpFailure, SmtpTarget, Stage},
};

/// The outcome of one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageStatus {
    /// Passed.
    Passed,
    /// Failed; the later stages were skipped.
    Failed,
    /// Did not run.
    Skipped,
}

/// One stage of a report.
#[derive(Debug, Clone)]
pub struct StageReport {
    /// Which stage.
    pub stage: Stage,
    /// Its outcome.
    pub status: StageStatus,
    /// Time spent.
    pub duration: Duration,
    /// Reply code, if the server answered.
    pub reply_code: Option<u16>,
    /// Server reply or local detail (never a secret).
    pub detail: String,
    /// What to do about a failure.
    pub hint: String,
}

/// A whole verification.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// Every stage passed.
    pub succeeded: bool,
    /// The stages in order.
    pub stages: Vec<StageReport>,
    /// Total time.
    pub duration: Duration,
    /// EHLO keywords the server announced.
    pub capabilities: Vec<String>,
}

/// The stages a verification runs, in order.
pub fn stages_for(target: &SmtpTarget) -> Vec<Stage> {
    let mut stages = vec![Stage::Dns, Stage::Connect];
    match target.security {
        crate::domain::Security::ImplicitTls => stages.extend([Stage::Tls, Stage::Greeting]),
        crate::domain::Security::StartTls => stages.extend([Stage::Greeting, Stage::Tls]),
        crate::domain::Security::None => stages.push(Stage::Greeting),
    }
    if target.auth.is_some() {
        stages.push(Stage::Auth);
    }
    stages.extend([Stage::MailFrom, Stage::RcptTo]);
    stages
}

/// Connects, secures, authenticates, then MAIL FROM and RCPT TO, then RSET and QUIT. Sends
/// no email.
pub async fn verify(
    target: &SmtpTarget,
    guard: &Guard,
    envelope_from: &str,
    recipient: &str,
    timeout: Duration,
) -> VerifyReport {
    let deadline = Instant::now() + timeout;
    let mut progress = Progress::default();
    let mut capabilities = Vec::new();
    let result = async {
        let mut session = Session::open_traced(target, guard, deadline, &mut progress).await?;
        capabilities = session.capabilities();
        let probe = session
            .probe(envelope_from, recipient, deadline, &mut progress)
            .await;
        session.quit().await;
        probe
    }
    .await;
    let result_name = if result.is_ok() { "passed" } else { "failed" };
    crate::metrics::metrics()
        .verifications
        .add(1, &[opentelemetry::KeyValue::new("result", result_name)]);
    report(target, &progress, result.err(), capabilities)
}

/// Builds a report from what passed and the failure, if any.
pub fn report(
    target: &SmtpTarget,
    progress: &Progress,
    failure: Option<SmtpFailure>,
    capabilities: Vec<String>,
) -> VerifyReport {
    let mut stages: Vec<StageReport> = progress
        .passed
        .iter()
        .map(|(stage, duration, detail)| StageReport {
            stage: *stage,
            status: StageStatus::Passed,
            duration: *duration,
            reply_code: None,
            detail: detail.clone(),
            hint: String::new(),
        })
        .collect();
    // When the session failed after the greeting, the capabilities come from its record.
    let capabilities = if capabilities.is_empty() {
        progress
            .passed
            .iter()
            .rev()
            .find(|(stage, _, _)| *stage == Stage::Greeting)
            .map(|(_, _, detail)| capabilities_of(detail))
            .unwrap_or_default()
    } else {
        capabilities
    };
    let succeeded = failure.is_none();
    if let Some(f) = failure {
        stages.push(StageReport {
            stage: f.stage,
            status: StageStatus::Failed,
            duration: progress.since_last(),
            reply_code: f.code,
            hint: hint(target, &f),
            detail: f.text,
        });
        let done: Vec<Stage> = stages.iter().map(|s| s.stage).collect();
        for stage in stages_for(target) {
            if !done.contains(&stage) {
                stages.push(StageReport {
                    stage,
                    status: StageStatus::Skipped,
                    duration: Duration::ZERO,
                    reply_code: None,
                    detail: String::new(),
                    hint: String::new(),
                });
            }
        }
    }
    VerifyReport {
        succeeded,
        stages,
        duration: progress.total(),
        capabilities,
    }
}

/// The EHLO keywords of lettre's server description, in SMTP spelling.
pub(super) fn capabilities_of(server_info: &str) -> Vec<String> {
    // lettre prints "name with {features}"; keep the feature list readable.
    server_info
        .split_once(" with ")
        .map(|(_, rest)| {
            rest.trim_matches(|c| c == '{' || c == '}')
                .split(',')
                .map(|s| match s.trim() {
                    "EightBitMime" => "8BITMIME".to_owned(),
                    "SmtpUtfEight" => "SMTPUTF8".to_owned(),
                    "StartTls" => "STARTTLS".to_owned(),
                    other => match other.strip_prefix("Authentication(") {
                        Some(m) => format!("AUTH {}", m.trim_end_matches(')').to_ascii_uppercase()),
                        None => other.to_owned(),
                    },
                })
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// The plain-language hint for a failure.
pub fn hint(target: &SmtpTarget, f: &SmtpFailure) -> String {
    let host = target.host.to_ascii_lowercase();
    let gmail = host.contains("gmail") || host.contains("google");
    let microsoft = host.contains("office365") || host.contains("outlook");
    match (f.stage, f.kind) {
        (_, FailureKind::Refused) => "this destination is not allowed: the host must resolve to a public address and the port must be one the operator allows".into(),
        (Stage::Dns, _) => "the host name does not resolve: check its spelling and DNS".into(),
        (Stage::Connect, FailureKind::Timeout) => "server not responding: check host, port, DNS and firewall".into(),
        (Stage::Connect, _) if f.text.contains("refused") => "connection refused: nothing listens on this port; check the port and that the server runs".into(),
        (Stage::Connect, _) => "cannot connect: check host, port and firewall".into(),
        (Stage::Tls, _) if f.text.contains("STARTTLS") => "the server does not offer STARTTLS: use IMPLICIT_TLS on port 465, or check the port".into(),
        (Stage::Tls, _) if f.text.to_ascii_lowercase().contains("certificate") || f.text.contains("UnknownIssuer") || f.text.contains("CaUsedAsEndEntity") => "the server's certificate is not trusted (self-signed, expired, or issued for another name): add the CA certificate to trusted_ca_pem or fix the certificate".into(),
        (Stage::Tls, _) | (Stage::Greeting, FailureKind::Timeout) if target.security == crate::domain::Security::ImplicitTls => "TLS failed: the port may expect STARTTLS (587) rather than implicit TLS (465); check the security mode for this port".into(),
        (Stage::Tls, _) => "TLS handshake failed: check the security mode for this port and the certificate".into(),
        (Stage::Greeting, FailureKind::Timeout) => "the server accepted the connection but never greeted: the port may expect implicit TLS (465), or the server is overloaded".into(),
        (Stage::Greeting, _) => "the server refused the session: it may be overloaded or blocking this client".into(),
        (Stage::Auth, _) if f.text.contains("none of the AUTH mechanisms") => "the server does not offer this AUTH mechanism: choose AUTO or one the server lists".into(),
        (Stage::Auth, _) if gmail => "authentication failed: Gmail needs an app password (with 2-step verification) or XOAUTH2".into(),
        (Stage::Auth, _) if microsoft => "authentication failed: check the credentials; Microsoft 365 may have SMTP AUTH (basic authentication) disabled for this mailbox".into(),
        (Stage::Auth, _) => "authentication failed: check the username and password".into(),
        (Stage::MailFrom, _) => "the server refused the sender: from_email (or error_to) must be an address this account may send as".into(),
        (Stage::RcptTo, FailureKind::Permanent) => "the server refused the recipient: it may not relay to outside domains for this account, or the mailbox does not exist".into(),
        (Stage::RcptTo, _) | (Stage::Data, FailureKind::Transient) => "the server deferred: try again later".into(),
        (_, FailureKind::Timeout) => "the server stopped answering before the deadline".into(),
        _ => "the server refused the message: see its reply".into(),
    }
}
