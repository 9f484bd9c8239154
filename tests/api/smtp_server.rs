//! An in-process SMTP server for fault injection. It records every message (envelope and raw
//! bytes) and answers what a test tells it to.

use std::sync::{Arc, Mutex};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpListener,
    sync::Notify,
};
use tokio_rustls::{
    rustls::{
        self,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    },
    TlsAcceptor,
};

/// How the server behaves.
#[derive(Clone, Debug)]
pub struct Behavior {
    /// The greeting; None: never greet (a server that hangs).
    pub greeting: Option<String>,
    /// Recipients refused with 550.
    pub reject_rcpt: Vec<String>,
    /// Reply to the end of DATA.
    pub data_reply: String,
    /// Close the connection right after the final dot, without replying.
    pub drop_after_dot: bool,
    /// Accept AUTH with these credentials (offers AUTH PLAIN LOGIN when set).
    pub auth: Option<(String, String)>,
    /// Refuse every sender with 553.
    pub reject_mail_from: bool,
    /// Wait this long before answering the end of DATA (a slow server).
    pub data_delay: std::time::Duration,
    /// Announce PIPELINING (RFC 2920) in the EHLO reply. Commands are answered in order
    /// either way.
    pub pipelining: bool,
    /// Recipients refused with 450 (temporarily).
    pub transient_rcpt: Vec<String>,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            greeting: Some("220 test.smtp ESMTP ready".into()),
            reject_rcpt: Vec::new(),
            data_reply: "250 2.0.0 OK queued as TEST".into(),
            drop_after_dot: false,
            auth: None,
            reject_mail_from: false,
            data_delay: std::time::Duration::ZERO,
            pipelining: true,
            transient_rcpt: Vec::new(),
        }
    }
}

/// One received message.
#[derive(Clone, Debug)]
pub struct Received {
    /// The name the client gave in EHLO.
    pub helo: String,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub data: String,
}

#[derive(Default)]
struct State {
    received: Mutex<Vec<Received>>,
    /// How many messages' data ended (the final dot read), whatever the reply.
    data_ended: tokio::sync::watch::Sender<usize>,
    behavior: Mutex<Behavior>,
    arrived: Notify,
    /// Connections accepted so far.
    connections: std::sync::atomic::AtomicUsize,
    /// MAIL FROM commands that arrived with more commands behind them in the same read
    /// (the client did not wait for the reply: pipelining).
    pipelined: std::sync::atomic::AtomicUsize,
}

/// A running server; stops when dropped.
pub struct TestSmtpServer {
    pub port: u16,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestSmtpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestSmtpServer {
    pub async fn start(behavior: Behavior) -> Self {
        Self::start_with(behavior, None).await
    }

    /// A server speaking implicit TLS (SMTPS) with the certificate in `pki`.
    pub async fn start_tls(behavior: Behavior, pki: &crate::external::TestPki) -> Self {
        let read = |name: &str| std::fs::read(pki.dir.path().join(name)).unwrap();
        let chain = CertificateDer::pem_slice_iter(&read("cert.pem"))
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(&read("key.pem")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        Self::start_with(behavior, Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(behavior: Behavior, tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        *state.behavior.lock().unwrap() = behavior;
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                s.connections
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = match tls {
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => session(stream, s).await,
                            Err(_) => Ok(()),
                        },
                        None => session(stream, s).await,
                    };
                });
            }
        });
        Self { port, state, task }
    }

    pub fn set_behavior(&self, behavior: Behavior) {
        *self.state.behavior.lock().unwrap() = behavior;
    }

    /// Waits until `count` messages' data has ended (before the server replies to it).
    pub async fn wait_for_data(&self, count: usize) {
        let mut ended = self.state.data_ended.subscribe();
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            ended.wait_for(|n| *n >= count),
        )
        .await
        .expect("data arrived in time")
        .expect("server alive");
    }

    /// How many MAIL FROM commands came pipelined with the commands after them.
    pub fn pipelined(&self) -> usize {
        self.state
            .pipelined
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many connections the server has accepted.
    pub fn connections(&self) -> usize {
        self.state
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }
}

async fn session<S>(stream: S, state: Arc<State>) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let behavior = state.behavior.lock().unwrap().clone();
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = BufReader::new(read);
    let Some(greeting) = &behavior.greeting else {
        // Never greet: hold the connection open until the client gives up.
        let mut sink = String::new();
        while lines.read_line(&mut sink).await? > 0 {}
        return Ok(());
    };
    write
        .write_all(format!("{greeting}\r\n").as_bytes())
        .await?;
    if !greeting.starts_with('2') {
        return Ok(());
    }
    let mut mail_from = String::new();
    let mut rcpt_to = Vec::new();
    let mut in_transaction = false;
    let mut helo = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        // Read the behavior per command, so a change applies to pooled sessions too.
        let behavior = state.behavior.lock().unwrap().clone();
        let cmd = line.trim_end().to_owned();
        let upper = cmd.to_ascii_uppercase();
        if upper.starts_with("MAIL FROM:") && !lines.buffer().is_empty() {
            state
                .pipelined
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let reply: String = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            helo = cmd.split_whitespace().nth(1).unwrap_or_default().to_owned();
            let auth = if behavior.auth.is_some() {
                "250-AUTH PLAIN LOGIN\r\n"
            } else {
                ""
            };
            let pipelining = if behavior.pipelining {
                "250-PIPELINING\r\n"
            } else {
                ""
            };
            format!("250-test.smtp\r\n{auth}{pipelining}250-8BITMIME\r\n250 SIZE 10485760")
        } else if upper.starts_with("AUTH PLAIN") {
            let (user, pass) = behavior.auth.clone().unwrap_or_default();
            let expected = base64_encode(format!("\0{user}\0{pass}").as_bytes());
            if cmd.split_whitespace().nth(2) == Some(expected.as_str()) {
                "235 2.7.0 Authentication successful".into()
            } else {
                "535 5.7.8 Authentication credentials invalid".into()
            }
        } else if upper.starts_with("MAIL FROM:") && behavior.reject_mail_from {
            in_transaction = false;
            "553 5.7.1 Sender address rejected: not owned by user".into()
        } else if upper.starts_with("MAIL FROM:") {
            mail_from = addr(&cmd[10..]);
            rcpt_to.clear();
            in_transaction = true;
            "250 2.1.0 OK".into()
        } else if (upper.starts_with("RCPT TO:") || upper == "DATA") && !in_transaction {
            // As a real server: commands out of sequence (e.g. pipelined after a refused
            // MAIL FROM) are refused.
            "503 5.5.1 Error: need MAIL command".into()
        } else if upper.starts_with("RCPT TO:") {
            let rcpt = addr(&cmd[8..]);
            if behavior
                .transient_rcpt
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&rcpt))
            {
                "450 4.2.0 Mailbox busy, try later".into()
            } else if behavior
                .reject_rcpt
                .iter()
                .any(|r| r.eq_ignore_ascii_case(&rcpt))
            {
                "550 5.1.1 No such user".into()
            } else {
                rcpt_to.push(rcpt);
                "250 2.1.5 OK".into()
            }
        } else if upper == "DATA" && rcpt_to.is_empty() {
            // As a real server: no transaction without a recipient (RFC 2920 relies on it).
            "554 5.5.1 No valid recipients".into()
        } else if upper == "DATA" {
            write
                .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await?;
            let mut data = String::new();
            loop {
                let mut l = String::new();
                if lines.read_line(&mut l).await? == 0 {
                    return Ok(());
                }
                if l == ".\r\n" {
                    break;
                }
                data.push_str(
                    l.strip_prefix('.')
                        .filter(|_| l.starts_with(".."))
                        .unwrap_or(&l),
                );
            }
            in_transaction = false;
            state.data_ended.send_modify(|n| *n += 1);
            if behavior.drop_after_dot {
                return Ok(());
            }
            if !behavior.data_delay.is_zero() {
                tokio::time::sleep(behavior.data_delay).await;
            }
            if behavior.data_reply.starts_with('2') {
                state.received.lock().unwrap().push(Received {
                    helo: helo.clone(),
                    mail_from: mail_from.clone(),
                    rcpt_to: rcpt_to.clone(),
                    data,
                });
                state.arrived.notify_waiters();
            }
            behavior.data_reply.clone()
        } else if upper == "RSET" {
            in_transaction = false;
            "250 2.0.0 OK".into()
        } else if upper == "NOOP" {
            "250 2.0.0 OK".into()
        } else if upper == "QUIT" {
            write.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            "502 5.5.2 Command not recognized".into()
        };
        write.write_all(format!("{reply}\r\n").as_bytes()).await?;
    }
}

fn addr(arg: &str) -> String {
    let arg = arg.trim();
    match (arg.find('<'), arg.find('>')) {
        (Some(start), Some(end)) if end > start => arg[start + 1..end].to_owned(),
        _ => arg.split_whitespace().next().unwrap_or_default().to_owned(),
    }
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
