//! The SMTP side of the engine: the target of a profile (its secret decrypted), test sends,
//! verification, and one attempt through a profile or the system default service.

use tokio::time::Instant;
use tracing::{warn, Instrument};

use super::{micros, now_micros, secret_context, Engine};
use crate::{
    delivery::{
        compose::compose,
        policy::{classify, Verdict},
        smtp::{Accepted, Progress, Session, SmtpAuth, SmtpFailure, SmtpTarget},
        tls::TrustSettings,
        transport::Outgoing,
        verify::VerifyReport,
    },
    domain::{
        AttemptOutcome, AttemptRecord, AuthMechanism, Mailbox, MessageStatus, ProfileSettings,
        SmtpProfile,
    },
    storage::{Claimed, Completion},
};

impl Engine {
    /// The SMTP target of a stored profile (decrypting its secret).
    pub fn target_for(&self, profile: &SmtpProfile) -> Result<SmtpTarget, String> {
        let secret = match &profile.secret_ciphertext {
            None => None,
            Some(sealed) => Some(
                self.secrets
                    .open(sealed, &secret_context(&profile.tenant_id, &profile.id))
                    .map_err(|e| format!("the stored password cannot be used: {e}"))?,
            ),
        };
        self.target_from_settings(&profile.settings, secret)
    }

    /// The SMTP target of settings and a plain-text secret (for unsaved settings).
    pub fn target_from_settings(
        &self,
        s: &ProfileSettings,
        secret: Option<String>,
    ) -> Result<SmtpTarget, String> {
        let auth = match (s.auth_mechanism, secret) {
            (AuthMechanism::None, _) => None,
            (_, None) => return Err("the profile has an AUTH mechanism but no password".into()),
            (mechanism, Some(secret)) => Some(SmtpAuth {
                mechanism,
                username: s.username.clone(),
                secret,
            }),
        };
        let mut roots = self.settings.operator_roots.clone();
        if !s.trusted_ca_pem.is_empty() {
            roots.push(s.trusted_ca_pem.clone());
        }
        Ok(SmtpTarget {
            host: s.host.clone(),
            port: s.port,
            security: s.security,
            trust: TrustSettings {
                extra_roots_pem: roots,
                verify: s.verify_certificate,
            },
            helo_name: if s.helo_name.is_empty() {
                self.settings.helo_name.clone()
            } else {
                s.helo_name.clone()
            },
            auth,
            guarded: true,
        })
    }

    /// Sends a claimed test email synchronously through `target` (no retries, no fallback),
    /// records the attempt and reports stage by stage.
    pub async fn send_test(
        &self,
        claimed: Claimed,
        target: &SmtpTarget,
        profile_id: Option<String>,
    ) -> VerifyReport {
        let message = &claimed.message;
        let deadline = Instant::now() + self.settings.attempt_timeout;
        let mut progress = Progress::default();
        let mut capabilities = Vec::new();
        let started = now_micros();
        let clock = Instant::now();
        let content = &message.content;
        let result = match compose(content, &message.message_id_header, &message.id) {
            Err(e) => Err(compose_failure(e)),
            Ok(body) => {
                let recipients = envelope_recipients(content);
                let envelope_from = content
                    .error_to
                    .clone()
                    .unwrap_or_else(|| content.from.email.to_string());
                async {
                    let mut session = Session::open_traced(
                        target,
                        self.transports.guard(),
                        deadline,
                        &mut progress,
                    )
                    .await?;
                    capabilities = session.capabilities();
                    let sent = session
                        .send(&envelope_from, &recipients, &body, deadline)
                        .await;
                    session.quit().await;
                    sent
                }
                .await
            }
        };
        if let Ok(accepted) = &result {
            progress.passed(
                crate::delivery::smtp::Stage::Data,
                format!("{} {}", accepted.code, accepted.text),
            );
        }
        let record = attempt_record(
            1,
            started,
            clock,
            target.server(),
            profile_id,
            false,
            &result,
        );
        let failure = result.as_ref().err().cloned();
        let completion = match &result {
            Ok(_) => Completion {
                status: MessageStatus::Sent,
                retry_at: None,
                last_error: String::new(),
                fallback: false,
                fallback_reason: String::new(),
            },
            // A test email is not retried: the caller hears the outcome now.
            Err(f) => Completion {
                status: MessageStatus::Failed,
                retry_at: None,
                last_error: f.text.clone(),
                fallback: false,
                fallback_reason: String::new(),
            },
        };
        match self
            .store
            .complete(&claimed, &[record], &completion, now_micros())
            .await
        {
            Ok(true) => self.publish(&message.tenant_id, &message.id, completion.status),
            Ok(false) => warn!("test email lease lost"),
            Err(e) => warn!(error = %e, "recording the test email failed"),
        }
        crate::delivery::verify::report(target, &progress, failure, capabilities)
    }

    /// Verifies settings stage by stage (no email is sent).
    pub async fn verify(
        &self,
        target: &SmtpTarget,
        envelope_from: &str,
        recipient: &str,
    ) -> VerifyReport {
        crate::delivery::verify::verify(
            target,
            self.transports.guard(),
            envelope_from,
            recipient,
            self.settings.attempt_timeout,
        )
        .await
    }

    pub(super) async fn send_via_profile(
        &self,
        claimed: &Claimed,
        profile: &SmtpProfile,
        number: u32,
        deadline: Instant,
    ) -> (AttemptRecord, Result<Accepted, SmtpFailure>) {
        let message = &claimed.message;
        let started = now_micros();
        let clock = Instant::now();
        let result = match self.target_for(profile) {
            Err(text) => Err(SmtpFailure {
                stage: crate::delivery::smtp::Stage::Auth,
                kind: crate::delivery::smtp::FailureKind::Auth,
                code: None,
                enhanced_code: String::new(),
                text,
            }),
            Ok(target) => match Prepared::new(&message.content, message) {
                Err(failure) => Err(failure),
                Ok(prepared) => {
                    let span = attempt_span(
                        &target.host,
                        target.port,
                        &format!("{:?}", target.security),
                        false,
                    );
                    let result = self
                        .transports
                        .send_smtp(
                            &profile.id,
                            profile.version,
                            &target,
                            &prepared.outgoing(message),
                            deadline,
                        )
                        .instrument(span.clone())
                        .await;
                    record_reply(&span, &result);
                    result
                }
            },
        };
        let server = format!("{}:{}", profile.settings.host, profile.settings.port);
        let record = attempt_record(
            number,
            started,
            clock,
            server,
            Some(profile.id.clone()),
            false,
            &result,
        );
        (record, result)
    }

    pub(super) async fn send_via_system(
        &self,
        claimed: &Claimed,
        number: u32,
        fallback: bool,
        deadline: Instant,
    ) -> (AttemptRecord, Result<Accepted, SmtpFailure>) {
        let message = &claimed.message;
        let started = now_micros();
        let clock = Instant::now();
        let mut content = message.content.clone();
        if fallback {
            // Never spoof the tenant's unverified domain: the operator's sender sends, and the
            // tenant's From becomes the Reply-To unless one is set.
            if content.reply_to.is_none() {
                content.reply_to = Some(content.from.email.to_string());
            }
            content.from = Mailbox {
                email: self.settings.system_sender.email.clone(),
                name: if content.from.name.is_empty() {
                    self.settings.system_sender.name.clone()
                } else {
                    content.from.name.clone()
                },
            };
            content.error_to = None;
        }
        let result = match Prepared::new(&content, message) {
            Err(failure) => Err(failure),
            Ok(prepared) => {
                let span = attempt_span(&self.transports.system_server(), 0, "system", fallback);
                let result = self
                    .transports
                    .send_system(&prepared.outgoing(message), deadline)
                    .instrument(span.clone())
                    .await;
                record_reply(&span, &result);
                result
            }
        };
        let record = attempt_record(
            number,
            started,
            clock,
            self.transports.system_server(),
            None,
            fallback,
            &result,
        );
        (record, result)
    }
}

/// The span of one SMTP session: where to, how secured, and (recorded after) the reply.
/// Never a secret or a message body.
fn attempt_span(host: &str, port: u16, security: &str, fallback: bool) -> tracing::Span {
    tracing::info_span!(
        target: crate::telemetry::TRACE_ONLY,
        "smtp.attempt",
        server.address = %host,
        server.port = port,
        smtp.security = %security,
        mailgate.fallback = fallback,
        smtp.reply_code = tracing::field::Empty,
        smtp.enhanced_code = tracing::field::Empty,
        mailgate.outcome = tracing::field::Empty,
    )
}

/// Records the server's answer on an attempt span.
fn record_reply(span: &tracing::Span, result: &Result<Accepted, SmtpFailure>) {
    match result {
        Ok(a) => {
            span.record("smtp.reply_code", a.code);
            span.record("smtp.enhanced_code", a.enhanced_code.as_str());
            span.record("mailgate.outcome", "sent");
        }
        Err(f) => {
            span.record("smtp.reply_code", f.code.unwrap_or(0));
            span.record("smtp.enhanced_code", f.enhanced_code.as_str());
            let outcome = match classify(f) {
                Verdict::Retry => "deferred",
                Verdict::Fail => "failed",
            };
            span.record("mailgate.outcome", outcome);
        }
    }
}

/// Counts and times the attempts.
pub(super) fn record_metrics(tenant_id: &str, attempts: &[AttemptRecord]) {
    use opentelemetry::KeyValue;
    let m = crate::metrics::metrics();
    for a in attempts {
        let attrs = [
            KeyValue::new("outcome", a.outcome.as_str().to_ascii_lowercase()),
            KeyValue::new("tenant", tenant_id.to_owned()),
            KeyValue::new("profile", a.profile_id.clone().unwrap_or_default()),
            KeyValue::new("fallback", a.fallback),
        ];
        m.attempts.add(1, &attrs);
        m.attempt_duration
            .record(a.duration_us as f64 / 1e6, &attrs);
        if a.fallback {
            m.fallbacks
                .add(1, &[KeyValue::new("tenant", tenant_id.to_owned())]);
        }
    }
}

/// An email composed for the wire, with its envelope.
struct Prepared {
    body: Vec<u8>,
    recipients: Vec<String>,
    envelope_from: String,
}

impl Prepared {
    /// Composes `content` (the stored content, or the fallback's rewrite of it).
    fn new(
        content: &crate::domain::MessageContent,
        message: &crate::domain::StoredMessage,
    ) -> Result<Self, SmtpFailure> {
        let body =
            compose(content, &message.message_id_header, &message.id).map_err(compose_failure)?;
        Ok(Self {
            body,
            recipients: envelope_recipients(content),
            envelope_from: content
                .error_to
                .clone()
                .unwrap_or_else(|| content.from.email.to_string()),
        })
    }

    fn outgoing<'a>(&'a self, message: &'a crate::domain::StoredMessage) -> Outgoing<'a> {
        Outgoing {
            tenant_id: &message.tenant_id,
            message_id: &message.id,
            envelope_from: &self.envelope_from,
            recipients: &self.recipients,
            body: &self.body,
        }
    }
}

fn compose_failure(e: crate::delivery::ComposeError) -> SmtpFailure {
    SmtpFailure {
        stage: crate::delivery::smtp::Stage::Data,
        kind: crate::delivery::smtp::FailureKind::Permanent,
        code: None,
        enhanced_code: String::new(),
        text: e.to_string(),
    }
}

/// Every recipient once, to, cc and bcc.
fn envelope_recipients(content: &crate::domain::MessageContent) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    content
        .recipients()
        .map(|m| m.email.to_string())
        .filter(|e| seen.insert(e.to_ascii_lowercase()))
        .collect()
}

fn attempt_record(
    number: u32,
    started: i64,
    clock: Instant,
    server: String,
    profile_id: Option<String>,
    fallback: bool,
    result: &Result<Accepted, SmtpFailure>,
) -> AttemptRecord {
    let duration_us = micros(clock.elapsed());
    match result {
        Ok(accepted) => AttemptRecord {
            number,
            started_at: started,
            duration_us,
            server,
            profile_id,
            fallback,
            reply_code: accepted.code,
            enhanced_code: accepted.enhanced_code.clone(),
            reply_text: accepted.text.clone(),
            outcome: AttemptOutcome::Sent,
            rejected_recipients: accepted.rejected.clone(),
        },
        Err(f) => AttemptRecord {
            number,
            started_at: started,
            duration_us,
            server,
            profile_id,
            fallback,
            reply_code: f.code.unwrap_or(0),
            enhanced_code: f.enhanced_code.clone(),
            reply_text: f.text.clone(),
            outcome: match classify(f) {
                Verdict::Retry => AttemptOutcome::Deferred,
                Verdict::Fail => AttemptOutcome::Failed,
            },
            rejected_recipients: Vec::new(),
        },
    }
}
