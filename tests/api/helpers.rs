//! Spawning the real app for a test: its own port, its own database, typed clients.

use std::{path::PathBuf, time::Duration};

use mailgate::{
    app::App,
    config::{Config, Secret},
    delivery::{Engine, MessageEvent},
    domain::MessageStatus,
    proto::v1::{
        email_log_service_client::EmailLogServiceClient, send_service_client::SendServiceClient,
        smtp_config_service_client::SmtpConfigServiceClient, *,
    },
};
use std::sync::Arc;
use tokio::sync::{broadcast, oneshot};
use tonic::{metadata::MetadataValue, transport::Channel, Request};

/// Which database the suite runs on: `MAILGATE_TEST_DATABASE=postgres` picks PostgreSQL
/// (server from `MAILGATE_TEST_POSTGRES_URL`, default the local one).
pub fn on_postgres() -> bool {
    std::env::var("MAILGATE_TEST_DATABASE").is_ok_and(|v| v == "postgres")
}

fn postgres_admin_url() -> String {
    std::env::var("MAILGATE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A fresh database for one test; dropped (PostgreSQL) or deleted (SQLite) afterwards.
pub struct TestDatabase {
    pub url: String,
    pg_name: Option<String>,
    pub dir: tempfile::TempDir,
}

impl TestDatabase {
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        if on_postgres() {
            use sqlx::Connection;
            let name = format!("mailgate_test_{}", uuid::Uuid::new_v4().simple());
            let admin = postgres_admin_url();
            let mut conn = sqlx::PgConnection::connect(&admin)
                .await
                .expect("PostgreSQL for tests");
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut conn)
                .await
                .unwrap();
            let base = admin.rsplit_once('/').unwrap().0;
            Self {
                url: format!("{base}/{name}"),
                pg_name: Some(name),
                dir,
            }
        } else {
            let url = format!("sqlite://{}", dir.path().join("test.db").display());
            Self {
                url,
                pg_name: None,
                dir,
            }
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Some(name) = self.pg_name.take() {
            // Drop on a separate thread: Drop cannot be async and may run inside a runtime.
            let admin = postgres_admin_url();
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut conn)
                                .await;
                    }
                });
            })
            .join();
        }
    }
}

/// The configuration every test app starts from: port 0, loopback SMTP servers allowed.
pub fn test_config(db: &TestDatabase) -> Config {
    let mut config = Config {
        listen_addr: "127.0.0.1:0".parse().unwrap(),
        data_dir: db.dir.path().join("data"),
        database_url: Secret::new(db.url.clone()),
        database_max_connections: Some(5),
        ..Config::default()
    };
    config.smtp.allowed_networks = vec!["127.0.0.0/8".parse().unwrap()];
    config.smtp.allowed_ports = (1024..=65535).collect();
    config.delivery.attempt_timeout = Duration::from_secs(5);
    config.delivery.poll_interval = Duration::from_secs(3600);
    config.shutdown_grace = Duration::from_secs(5);
    config
}

/// The running app and typed clients.
pub struct TestApp {
    pub engine: Arc<Engine>,
    pub addr: std::net::SocketAddr,
    pub data_dir: PathBuf,
    pub channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _db: TestDatabase,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let db = TestDatabase::new().await;
        let mut config = test_config(&db);
        adjust(&mut config);
        Self::start(db, config).await
    }

    /// An app on an existing database (which the caller keeps).
    pub async fn spawn_on(db: &TestDatabase, config: Config) -> Self {
        let shared = TestDatabase {
            url: db.url.clone(),
            pg_name: None,
            dir: tempfile::tempdir().unwrap(),
        };
        Self::start(shared, config).await
    }

    async fn start(db: TestDatabase, config: Config) -> Self {
        // MAILGATE_TEST_LOG=debug shows the app's log while debugging a test.
        if let Ok(level) = std::env::var("MAILGATE_TEST_LOG") {
            mailgate::telemetry::init(&mailgate::config::LogConfig {
                level,
                ..Default::default()
            });
        }
        let data_dir = config.data_dir.clone();
        let tls = config.tls.cert_file.is_some();
        let app = App::build(config).await.expect("app builds");
        let addr = app.local_addr();
        let engine = app.engine();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async {
            let _ = rx.await;
        }));
        // A TLS listener gets a lazy plaintext channel that tests do not use.
        let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
        let channel = if tls {
            endpoint.connect_lazy()
        } else {
            endpoint.connect().await.unwrap()
        };
        Self {
            addr,
            engine,
            data_dir,
            channel,
            shutdown: Some(tx),
            task: Some(task),
            _db: db,
        }
    }

    /// Stops the app gracefully and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await?
    }

    pub fn config_client(&self) -> SmtpConfigServiceClient<Channel> {
        SmtpConfigServiceClient::new(self.channel.clone())
    }
    pub fn send_client(&self) -> SendServiceClient<Channel> {
        SendServiceClient::new(self.channel.clone())
    }
    pub fn log_client(&self) -> EmailLogServiceClient<Channel> {
        EmailLogServiceClient::new(self.channel.clone())
    }

    pub fn events(&self) -> broadcast::Receiver<MessageEvent> {
        self.engine.subscribe()
    }

    /// Sends and waits until the message reaches a final status (SENT, FAILED) or DEFERRED.
    pub async fn send_and_settle(
        &self,
        tenant: &str,
        req: SendEmailRequest,
    ) -> (String, MessageStatus) {
        let mut events = self.events();
        let id = self
            .send_client()
            .send_email(as_tenant(tenant, req))
            .await
            .expect("accepted")
            .into_inner()
            .message_id;
        let status = wait_settled(&mut events, &id).await;
        (id, status)
    }

    pub async fn log_entry(&self, tenant: &str, id: &str) -> EmailLogEntry {
        self.log_client()
            .get_email_log(as_tenant(tenant, GetEmailLogRequest { id: id.into() }))
            .await
            .unwrap()
            .into_inner()
            .entry
            .unwrap()
    }

    /// Creates, verifies and activates a profile; returns its id.
    pub async fn active_profile(&self, tenant: &str, profile: SmtpProfile) -> String {
        active_profile(&self.channel, tenant, profile).await
    }
}

/// Creates (verifying first), then activates a profile through `channel`; returns its id.
pub async fn active_profile(channel: &Channel, tenant: &str, profile: SmtpProfile) -> String {
    let mut client = SmtpConfigServiceClient::new(channel.clone());
    let created = client
        .create_smtp_profile(as_tenant(
            tenant,
            CreateSmtpProfileRequest {
                profile: Some(profile),
                verify: true,
            },
        ))
        .await
        .expect("profile created")
        .into_inner();
    let report = created.verification.unwrap();
    assert!(report.succeeded, "verification failed: {report:#?}");
    let id = created.profile.unwrap().id;
    client
        .activate_smtp_profile(as_tenant(
            tenant,
            ActivateSmtpProfileRequest { id: id.clone() },
        ))
        .await
        .expect("activated");
    id
}

/// Waits (bounded, no polling) until `id` reaches SENT, FAILED or DEFERRED.
pub async fn wait_settled(
    events: &mut broadcast::Receiver<MessageEvent>,
    id: &str,
) -> MessageStatus {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let e = events.recv().await.expect("event stream");
            if e.message_id == id
                && matches!(
                    e.status,
                    MessageStatus::Sent | MessageStatus::Failed | MessageStatus::Deferred
                )
            {
                return e.status;
            }
        }
    })
    .await
    .expect("message settled in time")
}

/// Waits (bounded, no polling) until every id reached SENT, FAILED or DEFERRED, in any order.
pub async fn wait_all_settled(
    events: &mut broadcast::Receiver<MessageEvent>,
    ids: &[String],
) -> Vec<MessageStatus> {
    let mut settled: Vec<Option<MessageStatus>> = vec![None; ids.len()];
    tokio::time::timeout(Duration::from_secs(30), async {
        while settled.iter().any(Option::is_none) {
            let e = events.recv().await.expect("event stream");
            if let Some(i) = ids.iter().position(|id| *id == e.message_id) {
                if matches!(
                    e.status,
                    MessageStatus::Sent | MessageStatus::Failed | MessageStatus::Deferred
                ) {
                    settled[i] = Some(e.status);
                }
            }
        }
    })
    .await
    .expect("messages settled in time");
    settled.into_iter().flatten().collect()
}

/// Wraps a message in a request for `tenant`.
pub fn as_tenant<T>(tenant: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-tenant-id", MetadataValue::try_from(tenant).unwrap());
    request
        .metadata_mut()
        .insert("x-source", MetadataValue::from_static("test-suite"));
    request
}

pub fn mailbox(email: &str) -> Mailbox {
    Mailbox {
        email: email.into(),
        name: String::new(),
    }
}

/// A profile pointing at a loopback server without TLS or AUTH.
pub fn plain_profile(name: &str, port: u16) -> SmtpProfile {
    SmtpProfile {
        name: name.into(),
        host: "127.0.0.1".into(),
        port: u32::from(port),
        security: SmtpSecurity::None.into(),
        from_email: "noreply@acme.test".into(),
        from_name: "Acme".into(),
        ..Default::default()
    }
}

/// Settings for the tests of `limits.max_batch_bytes`: delivery off, and a SendBatch's
/// emails (and any request) hold at most 256 KiB.
pub fn batches_of_256_kib(c: &mut Config) {
    c.delivery.enabled = false;
    c.limits.max_batch_bytes = 256 * 1024;
    c.limits.max_request_bytes = 256 * 1024;
}

pub fn simple_email(to: &str) -> SendEmailRequest {
    SendEmailRequest {
        to: vec![mailbox(to)],
        subject: "Hello".into(),
        text_body: "Hello there".into(),
        ..Default::default()
    }
}

/// The real mailgate binary as a child process. The suite's own MAILGATE_* and OTEL_*
/// variables are removed; `envs` configure it. Ready once it logs that it listens (its log
/// is JSON and kept); killed when dropped.
pub struct Binary {
    pub child: std::process::Child,
    pub addr: String,
    startup: String,
    rest: Option<std::thread::JoinHandle<String>>,
}

impl Binary {
    /// The binary's command line, without the suite's own settings in its environment.
    pub fn command() -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mailgate"));
        for (key, _) in std::env::vars().filter(|(k, _)| {
            k.starts_with("MAILGATE_") || k.starts_with("OTEL_") || k == "RUST_LOG"
        }) {
            command.env_remove(key);
        }
        command
    }

    /// Starts `mailgate serve` on a free port with `envs`.
    pub fn start(envs: &[(&str, String)]) -> Self {
        use std::io::{BufRead, BufReader, Read};
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = Self::command()
            .arg("serve")
            .env("MAILGATE_LISTEN_ADDR", &addr)
            .env("MAILGATE_LOG__FORMAT", "json")
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut startup = String::new();
        loop {
            let mut line = String::new();
            assert!(
                stderr.read_line(&mut line).unwrap() > 0,
                "mailgate exited: {startup}"
            );
            startup.push_str(&line);
            if line.contains("mailgate listening") {
                break;
            }
        }
        let rest = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            rest
        });
        Self {
            child,
            addr,
            startup,
            rest: Some(rest),
        }
    }

    /// A gRPC channel to it.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// The JSON log line, up to and including "mailgate listening", whose message is
    /// `message`.
    pub fn startup_line(&self, message: &str) -> serde_json::Value {
        self.startup
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in the startup log: {}", self.startup))
    }

    /// SIGTERM, then waits (off the async runtime): the exit status and the whole log.
    pub async fn terminate(mut self) -> (std::process::ExitStatus, String) {
        std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        tokio::task::spawn_blocking(move || {
            let status = self.child.wait().unwrap();
            let rest = self.rest.take().unwrap().join().unwrap();
            (status, format!("{}{rest}", self.startup))
        })
        .await
        .unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
