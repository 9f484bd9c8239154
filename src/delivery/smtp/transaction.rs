//! One mail transaction on an open session: MAIL FROM, RCPT TO, DATA and the message.
//!
//! When the server announces PIPELINING (RFC 2920), MAIL FROM, every RCPT TO and DATA go out
//! in one write and their replies are read in order; the message and its final dot go out in
//! a second write. Two round trips per email instead of 3 + recipients, and two writes instead
//! of one per command. Servers without PIPELINING get the commands one by one.

use std::str::FromStr;

use lettre::{
    transport::smtp::{
        commands::{Data, Mail, Rcpt},
        extension::{Extension, MailBodyParameter, MailParameter},
        response::Response,
        Error as LettreError,
    },
    Address,
};
use tokio::time::Instant;

use super::{enhanced_code, printable, step, Accepted, FailureKind, Session, SmtpFailure, Stage};

/// A reply that refuses (4xx, 5xx): part of the conversation, which stays in step.
type Reply = Result<Response, LettreError>;

/// How the recipients fared.
#[derive(Default)]
struct Recipients {
    accepted: usize,
    /// Refused for good (5xx) or not addresses at all: the others still get the email.
    rejected: Vec<String>,
    last_rejection: Option<SmtpFailure>,
    /// The first temporary refusal (4xx): the whole email waits for the next attempt.
    deferred: Option<SmtpFailure>,
}

impl Recipients {
    fn record(&mut self, rcpt: &str, reply: Reply) {
        match reply {
            Ok(_) => self.accepted += 1,
            Err(e) => {
                let failure = SmtpFailure::from_lettre(Stage::RcptTo, &e);
                if failure.kind == FailureKind::Permanent {
                    self.rejected.push(rcpt.to_owned());
                    self.last_rejection = Some(failure);
                } else if self.deferred.is_none() {
                    self.deferred = Some(failure);
                }
            }
        }
    }

    /// Why the email cannot go on to DATA, if it cannot.
    fn refusal(&mut self) -> Option<SmtpFailure> {
        if let Some(deferred) = self.deferred.take() {
            return Some(deferred);
        }
        (self.accepted == 0).then(|| self.nobody())
    }

    /// The failure when no recipient was accepted: the last refusal, if any.
    fn nobody(&mut self) -> SmtpFailure {
        self.last_rejection.take().unwrap_or_else(|| {
            SmtpFailure::local(Stage::RcptTo, FailureKind::Permanent, "no valid recipient")
        })
    }
}

/// Splits a command's outcome into a reply (positive or refusing) and a broken conversation.
fn reply(stage: Stage, result: Reply) -> Result<Reply, SmtpFailure> {
    match result {
        // No reply code: an I/O error, a timeout or an unreadable reply.
        Err(e) if e.status().is_none() => Err(SmtpFailure::from_lettre(stage, &e)),
        other => Ok(other),
    }
}

/// The message as it goes on the wire after DATA: dot-stuffed (RFC 5321 4.5.2) and ended by
/// CRLF.CRLF, exactly as lettre's own `message` writes it, but in one piece. None when the
/// bytes are not UTF-8 (lettre's writer then sends them).
fn data_payload(body: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 8);
    // A line starts at the beginning and after each CRLF; one that starts with a dot gets
    // another. The runs in between are copied whole (byte by byte, this was a sixteenth of
    // mailgate's instructions per email).
    if body.first() == Some(&b'.') {
        out.push(b'.');
    }
    let mut copied = 0;
    for at in memchr::memmem::find_iter(body, b"\r\n.") {
        out.extend_from_slice(&body[copied..at + 2]);
        out.push(b'.');
        copied = at + 2;
    }
    out.extend_from_slice(&body[copied..]);
    out.extend_from_slice(b"\r\n.\r\n");
    String::from_utf8(out).ok()
}

impl Session {
    /// Sends one message: MAIL FROM, one RCPT per recipient, DATA. Recipients refused with a
    /// 5xx are reported while the others still get the message; a 4xx for any recipient
    /// defers the whole message.
    pub(in crate::delivery) async fn send(
        &mut self,
        envelope_from: &str,
        recipients: &[String],
        body: &[u8],
        deadline: Instant,
    ) -> Result<Accepted, SmtpFailure> {
        let from = Address::from_str(envelope_from).map_err(|_| {
            SmtpFailure::local(
                Stage::MailFrom,
                FailureKind::Permanent,
                "invalid envelope sender",
            )
        })?;
        let mut params = Vec::new();
        if !body.is_ascii()
            && self
                .conn
                .server_info()
                .supports_feature(Extension::EightBitMime)
        {
            params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let mail = Mail::new(Some(from), params);
        let result = if self.offers("PIPELINING") {
            self.pipelined(mail, recipients, body, deadline).await
        } else {
            self.one_by_one(mail, recipients, body, deadline).await
        };
        if let Err(f) = &result {
            if matches!(
                f.kind,
                FailureKind::Network | FailureKind::Timeout | FailureKind::Protocol
            ) {
                self.broken = true;
            }
        }
        result
    }

    /// MAIL, RCPT... and DATA in one write, then their replies in order.
    async fn pipelined(
        &mut self,
        mail: Mail,
        recipients: &[String],
        body: &[u8],
        deadline: Instant,
    ) -> Result<Accepted, SmtpFailure> {
        let mut tally = Recipients::default();
        let mut batch = mail.to_string();
        let mut sent = Vec::with_capacity(recipients.len());
        for rcpt in recipients {
            match Address::from_str(rcpt) {
                Ok(addr) => {
                    batch.push_str(&Rcpt::new(addr, vec![]).to_string());
                    sent.push(rcpt.as_str());
                }
                Err(_) => tally.rejected.push(rcpt.clone()),
            }
        }
        if sent.is_empty() {
            return Err(tally.nobody());
        }
        batch.push_str(&Data.to_string());
        let conn = &mut self.conn;
        let (mail_reply, rcpt_replies, data_reply) = step(deadline, Stage::MailFrom, async {
            let mail_reply = reply(Stage::MailFrom, conn.command(batch).await)?;
            let mut rcpt_replies = Vec::with_capacity(sent.len());
            for _ in &sent {
                match reply(Stage::RcptTo, conn.read_response().await) {
                    Ok(r) => rcpt_replies.push(r),
                    // A server that refuses MAIL may hang up: keep what it said.
                    Err(f) => return Ok((mail_reply, rcpt_replies, Err(f))),
                }
            }
            let data_reply = reply(Stage::Data, conn.read_response().await);
            Ok((mail_reply, rcpt_replies, data_reply))
        })
        .await?;
        // Err: the conversation broke before DATA's reply.
        let data_open = matches!(data_reply, Ok(Ok(_)));
        if let Err(e) = mail_reply {
            // No transaction, so the server refused DATA too. A server that hung up, or took
            // DATA anyway, leaves the session unusable.
            self.broken |= data_open || data_reply.is_err();
            return Err(SmtpFailure::from_lettre(Stage::MailFrom, &e));
        }
        let data_reply = data_reply?;
        for (rcpt, r) in sent.iter().zip(rcpt_replies) {
            tally.record(rcpt, r);
        }
        if let Some(refusal) = tally.refusal() {
            self.abandon(data_open, deadline).await;
            return Err(refusal);
        }
        if let Err(e) = data_reply {
            self.abandon(false, deadline).await;
            return Err(SmtpFailure::from_lettre(Stage::Data, &e));
        }
        self.content(body, tally.rejected, deadline).await
    }

    /// The same transaction without PIPELINING: each command waits for its reply.
    async fn one_by_one(
        &mut self,
        mail: Mail,
        recipients: &[String],
        body: &[u8],
        deadline: Instant,
    ) -> Result<Accepted, SmtpFailure> {
        let conn = &mut self.conn;
        let mail_reply = step(deadline, Stage::MailFrom, async {
            reply(Stage::MailFrom, conn.command(mail).await)
        })
        .await?;
        mail_reply.map_err(|e| SmtpFailure::from_lettre(Stage::MailFrom, &e))?;
        let mut tally = Recipients::default();
        for rcpt in recipients {
            let Ok(addr) = Address::from_str(rcpt) else {
                tally.rejected.push(rcpt.clone());
                continue;
            };
            let conn = &mut self.conn;
            let r = step(deadline, Stage::RcptTo, async {
                reply(Stage::RcptTo, conn.command(Rcpt::new(addr, vec![])).await)
            })
            .await?;
            tally.record(rcpt, r);
            if tally.deferred.is_some() {
                break;
            }
        }
        if let Some(refusal) = tally.refusal() {
            self.abandon(false, deadline).await;
            return Err(refusal);
        }
        let conn = &mut self.conn;
        let data_reply = step(deadline, Stage::Data, async {
            reply(Stage::Data, conn.command(Data).await)
        })
        .await?;
        if let Err(e) = data_reply {
            self.abandon(false, deadline).await;
            return Err(SmtpFailure::from_lettre(Stage::Data, &e));
        }
        self.content(body, tally.rejected, deadline).await
    }

    /// Ends a transaction that will send no message. After a 354 the server waits for data
    /// that would be delivered, so the session is dropped instead; otherwise RSET.
    async fn abandon(&mut self, data_open: bool, deadline: Instant) {
        if data_open {
            self.broken = true;
            return;
        }
        let reset = tokio::time::timeout_at(deadline, self.conn.command("RSET\r\n")).await;
        if !matches!(reset, Ok(Ok(_))) {
            self.broken = true;
        }
    }

    /// Sends the message after a 354 and reads the server's verdict.
    async fn content(
        &mut self,
        body: &[u8],
        rejected: Vec<String>,
        deadline: Instant,
    ) -> Result<Accepted, SmtpFailure> {
        let conn = &mut self.conn;
        let response = step(deadline, Stage::Data, async {
            let sent = match data_payload(body) {
                Some(payload) => conn.command(payload).await,
                None => conn.message(body).await,
            };
            reply(Stage::Data, sent)
        })
        .await?
        .map_err(|e| SmtpFailure::from_lettre(Stage::Data, &e))?;
        let text = printable(response.message().collect::<Vec<_>>().join(" "));
        Ok(Accepted {
            code: u16::from(response.code()),
            enhanced_code: enhanced_code(&text),
            text,
            rejected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::data_payload;

    #[test]
    fn payload_is_dot_stuffed_and_terminated() {
        assert_eq!(
            data_payload(b".a\r\nb\r\n..c\r\nd.\r\n.").as_deref(),
            Some("..a\r\nb\r\n...c\r\nd.\r\n..\r\n.\r\n")
        );
        // A bare LF does not start a line (lettre's rule too).
        assert_eq!(data_payload(b"x\n.y").as_deref(), Some("x\n.y\r\n.\r\n"));
        assert_eq!(data_payload(b"").as_deref(), Some("\r\n.\r\n"));
        assert_eq!(data_payload(&[0xff, b'a']), None);
    }

    /// Dot-stuffing byte by byte, as RFC 5321 4.5.2 states it.
    fn stuffed_bytewise(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut line_start, mut after_cr) = (true, false);
        for &b in body {
            if line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            line_start = after_cr && b == b'\n';
            after_cr = b == b'\r';
        }
        out.extend_from_slice(b"\r\n.\r\n");
        out
    }

    #[test]
    fn payload_matches_bytewise_stuffing_for_every_short_body() {
        // Every body of up to 7 bytes over the bytes that matter: 21,845 of them.
        const ALPHABET: [u8; 4] = [b'.', b'\r', b'\n', b'a'];
        for len in 0..=7u32 {
            for mut n in 0..4usize.pow(len) {
                let body: Vec<u8> = (0..len)
                    .map(|_| {
                        let b = ALPHABET[n % 4];
                        n /= 4;
                        b
                    })
                    .collect();
                assert_eq!(
                    data_payload(&body).map(String::into_bytes),
                    Some(stuffed_bytewise(&body)),
                    "{body:?}"
                );
            }
        }
    }
}
