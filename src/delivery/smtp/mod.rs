//! SMTP sessions: mailgate opens the TCP connection itself (SSRF-checked address, deadline,
//! TCP_NODELAY), wraps implicit TLS itself, and hands the stream to lettre's
//! `AsyncSmtpConnection` for the protocol. lettre's own transport leaves Nagle's algorithm on,
//! which stalls every message by about 40 ms.

use std::{error::Error as _, fmt, net::SocketAddr, str::FromStr, time::Duration};

use lettre::{
    transport::smtp::{
        authentication::{Credentials, Mechanism},
        client::AsyncSmtpConnection,
        commands::{Ehlo, Mail, Rcpt},
        extension::{ClientId, Extension},
        response::Response,
        Error as LettreError,
    },
    Address,
};
use tokio::{net::TcpStream, time::Instant};

mod transaction;

use super::{
    guard::{Guard, GuardError},
    tls::{handshake, TrustSettings},
};
use crate::domain::{AuthMechanism, Security};

/// Where and how to connect: a tenant profile or the operator's relay, resolved.
#[derive(Clone)]
pub struct SmtpTarget {
    /// Host name or IP.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Security mode.
    pub security: Security,
    /// Certificates to trust.
    pub trust: TrustSettings,
    /// EHLO name.
    pub helo_name: String,
    /// Credentials, if AUTH is configured.
    pub auth: Option<SmtpAuth>,
    /// Whether the SSRF guard applies (tenant-supplied hosts); the operator's relay is trusted.
    pub guarded: bool,
}

/// AUTH settings. `Debug` never shows the secret.
#[derive(Clone)]
pub struct SmtpAuth {
    /// The mechanism.
    pub mechanism: AuthMechanism,
    /// The username.
    pub username: String,
    /// The password or access token.
    pub secret: String,
}

impl fmt::Debug for SmtpAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpAuth")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("secret", &"[redacted]")
            .finish()
    }
}

impl fmt::Debug for SmtpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl SmtpTarget {
    /// "host:port", as recorded in the log.
    pub fn server(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// The step of an SMTP session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Resolving and checking the host.
    Dns,
    /// TCP connect.
    Connect,
    /// Greeting and EHLO.
    Greeting,
    /// TLS handshake (implicit or STARTTLS).
    Tls,
    /// Authentication.
    Auth,
    /// MAIL FROM.
    MailFrom,
    /// RCPT TO.
    RcptTo,
    /// DATA and the message.
    Data,
}

impl Stage {
    /// Whether a failure at this stage means the server (not the message) is the problem.
    pub fn is_before_transaction(self) -> bool {
        matches!(
            self,
            Self::Dns | Self::Connect | Self::Greeting | Self::Tls | Self::Auth
        )
    }
}

/// What kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The SSRF guard refused the destination.
    Refused,
    /// DNS, TCP or I/O failure.
    Network,
    /// The deadline passed.
    Timeout,
    /// TLS setup, handshake or certificate failure, or STARTTLS not offered.
    Tls,
    /// The server refused the credentials or offers no usable mechanism.
    Auth,
    /// A 4xx reply.
    Transient,
    /// A 5xx reply.
    Permanent,
    /// A reply mailgate could not understand.
    Protocol,
}

/// A failed SMTP session, with what the server said. Never contains a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{stage:?}: {text}")]
pub struct SmtpFailure {
    /// Where it failed.
    pub stage: Stage,
    /// What kind of failure.
    pub kind: FailureKind,
    /// The reply code, if the server answered.
    pub code: Option<u16>,
    /// The enhanced status code, e.g. `5.7.8`.
    pub enhanced_code: String,
    /// The server's reply text or the local error.
    pub text: String,
}

/// Text a server sent, as mailgate keeps and shows it: each control character becomes
/// U+FFFD (a tab, a space). A reply may carry any byte but CR LF; PostgreSQL cannot store a
/// NUL in text, and a completion holding one failed its whole group, again at every retry.
/// Text without control characters comes back as it is, without a copy.
fn printable(text: String) -> String {
    if !text.chars().any(char::is_control) {
        return text;
    }
    text.chars()
        .map(|c| match c {
            '\t' => ' ',
            c if c.is_control() => char::REPLACEMENT_CHARACTER,
            c => c,
        })
        .collect()
}

impl SmtpFailure {
    fn local(stage: Stage, kind: FailureKind, text: impl Into<String>) -> Self {
        Self {
            stage,
            kind,
            code: None,
            enhanced_code: String::new(),
            text: printable(text.into()),
        }
    }

    fn from_lettre(stage: Stage, err: &LettreError) -> Self {
        let code = err.status().map(u16::from);
        let text = err
            .source()
            .map(|s| s.to_string())
            .unwrap_or_else(|| err.to_string());
        let kind = if let Some(code) = code {
            if stage == Stage::Auth && (code == 535 || code == 534 || code == 530) {
                FailureKind::Auth
            } else if code >= 500 {
                FailureKind::Permanent
            } else {
                FailureKind::Transient
            }
        } else if err.is_timeout() {
            FailureKind::Timeout
        } else if err.is_tls() {
            FailureKind::Tls
        } else if err.is_response() {
            FailureKind::Protocol
        } else if stage == Stage::Auth && err.is_client() {
            FailureKind::Auth
        } else {
            FailureKind::Network
        };
        Self {
            stage,
            kind,
            code,
            enhanced_code: enhanced_code(&text),
            text: printable(if code.is_some() {
                text
            } else {
                err.to_string()
            }),
        }
    }
}

/// Extracts an RFC 3463 enhanced status code ("5.1.1") from the start of a reply text.
pub fn enhanced_code(text: &str) -> String {
    let first = text.split_whitespace().next().unwrap_or_default();
    let parts: Vec<&str> = first.split('.').collect();
    let valid = parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
    if valid {
        first.to_owned()
    } else {
        String::new()
    }
}

/// Stages passed so far, with when each ended and what the server said.
#[derive(Debug)]
pub struct Progress {
    started: Instant,
    last: Instant,
    /// (stage, time spent in it, detail), in order.
    pub passed: Vec<(Stage, Duration, String)>,
}

impl Default for Progress {
    fn default() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            last: now,
            passed: Vec::new(),
        }
    }
}

impl Progress {
    pub(super) fn passed(&mut self, stage: Stage, detail: String) {
        let now = Instant::now();
        self.passed
            .push((stage, now - self.last, printable(detail)));
        self.last = now;
    }
    /// Time since the last passed stage (the failing stage's duration).
    pub fn since_last(&self) -> Duration {
        self.last.elapsed()
    }
    /// Time since the start.
    pub fn total(&self) -> Duration {
        self.started.elapsed()
    }
}

/// What the server said when it accepted a message.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The reply code (250).
    pub code: u16,
    /// The enhanced status code.
    pub enhanced_code: String,
    /// The reply text.
    pub text: String,
    /// Recipients refused while others were accepted.
    pub rejected: Vec<String>,
}

/// An open, greeted, secured and authenticated session.
pub(super) struct Session {
    conn: AsyncSmtpConnection,
    /// What the server announced in its EHLO reply on the connection mailgate sends over
    /// (after STARTTLS, before AUTH): one keyword with its parameters per entry, e.g.
    /// `PIPELINING` or `SIZE 10485760`.
    keywords: Vec<String>,
    /// Set when the conversation fell out of step (an I/O error, a timeout, or a reply that
    /// leaves the server waiting for data mailgate will not send): never reuse the session.
    broken: bool,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

async fn step<T>(
    deadline: Instant,
    stage: Stage,
    fut: impl std::future::Future<Output = Result<T, SmtpFailure>>,
) -> Result<T, SmtpFailure> {
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(result) => result,
        Err(_) => Err(SmtpFailure::local(
            stage,
            FailureKind::Timeout,
            "the server did not answer before the attempt deadline",
        )),
    }
}

impl Session {
    /// Connects, greets, secures and authenticates, all before `deadline`.
    ///
    /// The opening's future (DNS, TCP, TLS, EHLO, AUTH) is about 9 KB and lives on the heap:
    /// held inline, it made every delivery's future 15 KB, copied several times per email
    /// (into its task, and at each await that moves a callee's future into its caller's),
    /// although a pooled session is opened once for thousands of emails. Those copies were
    /// about 5 % of mailgate's instructions per email under load.
    pub(super) async fn open(
        target: &SmtpTarget,
        guard: &Guard,
        deadline: Instant,
    ) -> Result<Self, SmtpFailure> {
        let mut progress = Progress::default();
        Box::pin(Self::open_traced(target, guard, deadline, &mut progress)).await
    }

    /// Like [`Session::open`], recording when each stage passed.
    pub(super) async fn open_traced(
        target: &SmtpTarget,
        guard: &Guard,
        deadline: Instant,
        progress: &mut Progress,
    ) -> Result<Self, SmtpFailure> {
        let addrs = step(deadline, Stage::Dns, resolve(target, guard)).await?;
        progress.passed(Stage::Dns, format!("{} address(es)", addrs.len()));
        let tcp = step(deadline, Stage::Connect, connect(&addrs)).await?;
        progress.passed(
            Stage::Connect,
            tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
        );
        let helo = ClientId::Domain(target.helo_name.clone());
        let mut conn = match target.security {
            Security::ImplicitTls => {
                let tls = step(deadline, Stage::Tls, async {
                    handshake(tcp, &target.host, &target.trust)
                        .await
                        .map_err(|e| {
                            SmtpFailure::local(Stage::Tls, FailureKind::Tls, e.to_string())
                        })
                })
                .await?;
                progress.passed(Stage::Tls, "implicit TLS established".to_owned());
                step(deadline, Stage::Greeting, async {
                    AsyncSmtpConnection::connect_with_transport(Box::new(tls), &helo)
                        .await
                        .map_err(|e| SmtpFailure::from_lettre(Stage::Greeting, &e))
                })
                .await?
            }
            Security::None | Security::StartTls => {
                step(deadline, Stage::Greeting, async {
                    AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &helo)
                        .await
                        .map_err(|e| SmtpFailure::from_lettre(Stage::Greeting, &e))
                })
                .await?
            }
        };
        // The greeting and EHLO passed (STARTTLS repeats EHLO afterwards).
        progress.passed(Stage::Greeting, conn.server_info().to_string());
        if target.security == Security::StartTls {
            if !conn.server_info().supports_feature(Extension::StartTls) {
                conn.abort().await;
                return Err(SmtpFailure::local(
                    Stage::Tls,
                    FailureKind::Tls,
                    "the server does not offer STARTTLS",
                ));
            }
            let params = target
                .trust
                .lettre_parameters(&target.host)
                .map_err(|e| SmtpFailure::local(Stage::Tls, FailureKind::Tls, e.to_string()))?;
            step(deadline, Stage::Tls, async {
                conn.starttls(params, &helo)
                    .await
                    .map_err(|e| SmtpFailure::from_lettre(Stage::Tls, &e))
            })
            .await?;
            progress.passed(Stage::Tls, "STARTTLS established".to_owned());
        }
        // lettre keeps only the EHLO keywords it uses itself; ask again for the whole list
        // (PIPELINING, SIZE, ...). Before AUTH: some servers forget a login on a new EHLO.
        let keywords = step(deadline, Stage::Greeting, async {
            conn.command(Ehlo::new(helo.clone()))
                .await
                .map(|reply| ehlo_keywords(&reply))
                .map_err(|e| SmtpFailure::from_lettre(Stage::Greeting, &e))
        })
        .await?;
        if let Some(auth) = &target.auth {
            let mechanisms: &[Mechanism] = match auth.mechanism {
                AuthMechanism::None => &[],
                AuthMechanism::Auto => &[Mechanism::Plain, Mechanism::Login],
                AuthMechanism::Plain => &[Mechanism::Plain],
                AuthMechanism::Login => &[Mechanism::Login],
                AuthMechanism::Xoauth2 => &[Mechanism::Xoauth2],
            };
            if !mechanisms.is_empty() {
                // Implicit TLS is ours, so lettre cannot see it; STARTTLS succeeded or failed above.
                if target.security == Security::None {
                    return Err(SmtpFailure::local(
                        Stage::Auth,
                        FailureKind::Auth,
                        "refusing to send credentials over an unencrypted connection",
                    ));
                }
                if conn.server_info().get_auth_mechanism(mechanisms).is_none() {
                    conn.abort().await;
                    return Err(SmtpFailure::local(
                        Stage::Auth,
                        FailureKind::Auth,
                        format!(
                            "the server offers none of the AUTH mechanisms {}",
                            mechanisms
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                let credentials = Credentials::new(auth.username.clone(), auth.secret.clone());
                step(deadline, Stage::Auth, async {
                    conn.auth(mechanisms, &credentials)
                        .await
                        .map(|_| ())
                        .map_err(|e| SmtpFailure::from_lettre(Stage::Auth, &e))
                })
                .await?;
                progress.passed(Stage::Auth, format!("authenticated as {}", auth.username));
            }
        }
        Ok(Self {
            conn,
            keywords,
            broken: false,
        })
    }

    /// The capabilities the server announced: its EHLO keywords with their parameters.
    pub(super) fn capabilities(&self) -> Vec<String> {
        self.keywords.clone()
    }

    /// Whether the server announced `keyword` (e.g. `PIPELINING`) in its EHLO reply.
    fn offers(&self, keyword: &str) -> bool {
        self.keywords.iter().any(|k| {
            k.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case(keyword))
        })
    }

    /// MAIL FROM and RCPT TO without DATA, then RSET: checks that the server accepts the
    /// sender and the recipient. No email is sent.
    pub(super) async fn probe(
        &mut self,
        envelope_from: &str,
        recipient: &str,
        deadline: Instant,
        progress: &mut Progress,
    ) -> Result<(), SmtpFailure> {
        let from = Address::from_str(envelope_from).map_err(|_| {
            SmtpFailure::local(
                Stage::MailFrom,
                FailureKind::Permanent,
                "invalid sender address",
            )
        })?;
        let rcpt = Address::from_str(recipient).map_err(|_| {
            SmtpFailure::local(
                Stage::RcptTo,
                FailureKind::Permanent,
                "invalid recipient address",
            )
        })?;
        let conn = &mut self.conn;
        let reply = step(deadline, Stage::MailFrom, async {
            conn.command(Mail::new(Some(from), vec![]))
                .await
                .map_err(|e| SmtpFailure::from_lettre(Stage::MailFrom, &e))
        })
        .await?;
        progress.passed(
            Stage::MailFrom,
            reply.message().collect::<Vec<_>>().join(" "),
        );
        let reply = step(deadline, Stage::RcptTo, async {
            conn.command(Rcpt::new(rcpt, vec![]))
                .await
                .map_err(|e| SmtpFailure::from_lettre(Stage::RcptTo, &e))
        })
        .await?;
        progress.passed(Stage::RcptTo, reply.message().collect::<Vec<_>>().join(" "));
        let _ = tokio::time::timeout_at(deadline, conn.command("RSET\r\n")).await;
        Ok(())
    }

    /// Whether the session can carry another message.
    pub(super) fn is_usable(&self) -> bool {
        !self.broken && !self.conn.has_broken()
    }

    /// Ends the session politely.
    pub(super) async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.quit()).await;
    }
}

/// The keywords of an EHLO reply: every line after the first (the server's name), trimmed.
fn ehlo_keywords(reply: &Response) -> Vec<String> {
    reply
        .message()
        .skip(1)
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| printable(k.to_owned()))
        .collect()
}

async fn resolve(target: &SmtpTarget, guard: &Guard) -> Result<Vec<SocketAddr>, SmtpFailure> {
    let result = if target.guarded {
        guard.resolve(&target.host, target.port).await
    } else {
        match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
            Ok(addrs) => Ok(addrs.collect()),
            Err(_) => Err(GuardError::Unresolvable),
        }
    };
    result.map_err(|e| {
        let kind = match e {
            GuardError::Unresolvable => FailureKind::Network,
            _ => FailureKind::Refused,
        };
        SmtpFailure::local(Stage::Dns, kind, e.to_string())
    })
}

async fn connect(addrs: &[SocketAddr]) -> Result<TcpStream, SmtpFailure> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // Without this, Nagle's algorithm holds the final "." of DATA for ~40 ms.
                stream.set_nodelay(true).map_err(|e| {
                    SmtpFailure::local(Stage::Connect, FailureKind::Network, e.to_string())
                })?;
                return Ok(stream);
            }
            Err(e) => last = Some(e),
        }
    }
    let text = match last {
        Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused".to_owned()
        }
        Some(e) => format!("connection failed: {e}"),
        None => "no address to connect to".to_owned(),
    };
    Err(SmtpFailure::local(
        Stage::Connect,
        FailureKind::Network,
        text,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_text_loses_its_control_characters() {
        assert_eq!(printable("2.0.0 OK queued".into()), "2.0.0 OK queued");
        assert_eq!(
            printable("5.7.1 bad\0byte\tand\x1b[31mred".into()),
            "5.7.1 bad\u{FFFD}byte and\u{FFFD}[31mred"
        );
        assert_eq!(printable("caf\u{e9} \u{7f}".into()), "caf\u{e9} \u{FFFD}");
    }

    #[test]
    fn parses_enhanced_codes() {
        assert_eq!(enhanced_code("5.1.1 User unknown"), "5.1.1");
        assert_eq!(enhanced_code("4.7.0 Try later"), "4.7.0");
        assert_eq!(enhanced_code("OK queued"), "");
        assert_eq!(enhanced_code("2.0.0"), "2.0.0");
        assert_eq!(enhanced_code("6.0.0 nope"), "");
    }
}
