//! Typed configuration: defaults embedded in the binary, then an optional TOML file, then
//! `MAILGATE_*` environment variables (nested keys joined with `__`, e.g.
//! `MAILGATE_DELIVERY__CONCURRENCY=64`).

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Default pool size on SQLite. Every SQLite connection runs on a thread of its own with a
/// page cache of its own; with 16, peak RSS of a 20,000-email SendBatch run was 102-108 MiB,
/// with 4 it was 59-67 MiB, at the same throughput (docs/benchmarks.md).
const SQLITE_DEFAULT_CONNECTIONS: u32 = 4;

/// Default pool size on PostgreSQL: a sixteenth of the pool writes accepts (1 group writer;
/// 1 to 4), one more connection writes completions and runs claims.
const POSTGRES_DEFAULT_CONNECTIONS: u32 = 16;

/// The whole configuration of one mailgate process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on. Port 0 picks a free port.
    pub listen_addr: SocketAddr,
    /// Directory for the SQLite database, the file drop and the development key.
    pub data_dir: PathBuf,
    /// Database URL: `sqlite://path` or `postgres://...`. Empty: SQLite under `data_dir`.
    pub database_url: Secret,
    /// Largest number of pooled database connections. Unset: 4 on SQLite (one writer and
    /// in-process readers; each connection has a thread and a page cache of its own), 16 on
    /// PostgreSQL.
    pub database_max_connections: Option<u32>,
    /// Worker threads of the async runtime that serves requests and delivers email. Unset:
    /// Tokio's `TOKIO_WORKER_THREADS` if set, else one per CPU the process may use (a
    /// container's CPU limit counts; its CPU request does not).
    pub worker_threads: Option<usize>,
    /// How long graceful shutdown waits for in-flight deliveries.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The delivery engine.
    pub delivery: DeliveryConfig,
    /// Rules for tenant-supplied SMTP servers.
    pub smtp: SmtpConfig,
    /// The operator's system default service.
    pub system_default: SystemDefaultConfig,
    /// Encryption of stored secrets.
    pub encryption: EncryptionConfig,
    /// Logging.
    pub log: LogConfig,
    /// Metrics (traces and metrics over OTLP are configured by the OTEL_* variables).
    pub metrics: MetricsConfig,
    /// How long the email log keeps entries.
    pub retention: RetentionConfig,
    /// Who may call (API keys, roles).
    pub auth: crate::auth::AuthConfig,
    /// Limits on requests.
    pub limits: crate::auth::LimitsConfig,
    /// TLS (and mutual TLS) on the gRPC listener.
    pub tls: crate::auth::settings::ListenerTlsConfig,
}

/// Email log retention.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Final entries (SENT, FAILED, CANCELLED) older than this are deleted; `0s` keeps
    /// everything. Emails still waiting to be sent are never deleted.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How often the job runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Entries deleted per statement.
    pub batch_size: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(90 * 86_400),
            interval: Duration::from_secs(600),
            batch_size: 1_000,
        }
    }
}

/// Metrics settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of a Prometheus scrape endpoint (plain HTTP, any path); none when unset.
    pub prometheus_addr: Option<SocketAddr>,
}

/// Most worker threads `worker_threads` may ask for: beyond this it is a typo, not a machine.
const MAX_WORKER_THREADS: usize = 1024;

impl Default for Config {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("mailgate-data"),
            database_url: Secret::default(),
            database_max_connections: None,
            worker_threads: None,
            shutdown_grace: Duration::from_secs(25),
            delivery: DeliveryConfig::default(),
            smtp: SmtpConfig::default(),
            system_default: SystemDefaultConfig::default(),
            encryption: EncryptionConfig::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
            retention: RetentionConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            limits: crate::auth::LimitsConfig::default(),
            tls: crate::auth::settings::ListenerTlsConfig::default(),
        }
    }
}

/// Settings of the delivery engine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Run the delivery engine in this process.
    pub enabled: bool,
    /// Most SMTP sends at once by this process (the engine keeps up to six times as many
    /// messages in hand, so database round trips overlap with sending).
    pub concurrency: usize,
    /// How long a claimed message stays leased to this process before another may take it.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often the engine looks for due messages when nothing wakes it.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Total deadline of one attempt: connect, TLS, AUTH and DATA.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Delays before the 1st, 2nd, ... retry; the last one repeats.
    #[serde(with = "duration_list")]
    pub retry_schedule: Vec<Duration>,
    /// A message still failing this long after it was accepted is FAILED.
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            concurrency: 64,
            lease: Duration::from_secs(120),
            poll_interval: Duration::from_secs(1),
            attempt_timeout: Duration::from_secs(60),
            retry_schedule: [30, 60, 300, 900, 3600, 7200, 14400]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            give_up_after: Duration::from_secs(2 * 24 * 3600),
        }
    }
}

/// Rules for connecting to tenant-supplied SMTP servers (the SSRF guard).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpConfig {
    /// Ports tenant profiles may use.
    pub allowed_ports: Vec<u16>,
    /// Networks tenant profiles may reach although they are not public (e.g. "10.0.0.0/8" for
    /// an internal relay, "127.0.0.0/8" in tests).
    pub allowed_networks: Vec<IpNet>,
    /// PEM file of extra CA certificates trusted for every profile.
    pub extra_roots_file: Option<PathBuf>,
    /// Whether a profile may turn certificate verification off.
    pub allow_insecure_tls: bool,
    /// Name sent with EHLO when a profile sets none.
    pub helo_name: String,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        Self {
            allowed_ports: vec![25, 465, 587, 2525],
            allowed_networks: Vec::new(),
            extra_roots_file: None,
            allow_insecure_tls: false,
            helo_name: "mailgate.localdomain".to_owned(),
        }
    }
}

/// The operator's own service, used when a tenant has no usable profile and as fallback.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SystemDefaultConfig {
    /// SMTP relay URL, e.g. `smtp://relay.internal:25` or `smtps://user:pass@host:465`
    /// (`smtp+starttls://` for STARTTLS). Empty: the file drop under `data_dir/outbox`.
    pub smtp_url: Secret,
    /// From address used by the system default service.
    pub from_email: String,
    /// From display name used by the system default service.
    pub from_name: String,
}

impl Default for SystemDefaultConfig {
    fn default() -> Self {
        Self {
            smtp_url: Secret::default(),
            from_email: "mailgate@localhost".to_owned(),
            from_name: "mailgate".to_owned(),
        }
    }
}

/// Encryption of stored secrets (SMTP passwords and tokens).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncryptionConfig {
    /// The key: 32 bytes, base64. Empty: a development key is created in `data_dir` (with a
    /// warning).
    pub key: Secret,
    /// The key's id, stored beside every ciphertext so keys can be rotated.
    pub key_id: String,
    /// Older keys, still able to decrypt (for rotation: add the old key here, set the new
    /// one as `key`, run `mailgate rekey`, then remove the old key).
    pub previous_keys: Vec<PreviousKey>,
}

/// A retired encryption key that can still decrypt.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreviousKey {
    /// Its id.
    pub id: String,
    /// The key: 32 bytes, base64.
    pub key: Secret,
}

/// Logging settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `mailgate=debug,info`. `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".to_owned(),
        }
    }
}

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// A configuration value that must never be printed (`Debug` shows `[redacted]`).
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether no value is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("[redacted]")
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Loads defaults, then `file` (if given), then `MAILGATE_*` environment variables.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(Env::prefixed("MAILGATE_").split("__").ignore(&["CONFIG"]));
        let config: Config = figment.extract().map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.delivery.concurrency == 0 {
            return Err(ConfigError(
                "delivery.concurrency must be at least 1".into(),
            ));
        }
        if self.delivery.retry_schedule.is_empty() {
            return Err(ConfigError(
                "delivery.retry_schedule must not be empty".into(),
            ));
        }
        if self.limits.max_recipients == 0 || self.limits.max_batch == 0 {
            return Err(ConfigError(
                "limits.max_recipients and limits.max_batch must be at least 1".into(),
            ));
        }
        if self.limits.max_batch_bytes < self.limits.max_request_bytes {
            return Err(ConfigError(
                "limits.max_batch_bytes must be at least limits.max_request_bytes".into(),
            ));
        }
        if self.limits.max_request_bytes < 64 * 1024 {
            return Err(ConfigError(
                "limits.max_request_bytes must be at least 65536".into(),
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(ConfigError(
                "tls.cert_file and tls.key_file go together: set both or neither".into(),
            ));
        }
        if self.tls.client_ca_file.is_some() && self.tls.cert_file.is_none() {
            return Err(ConfigError(
                "tls.client_ca_file (mutual TLS) needs tls.cert_file and tls.key_file".into(),
            ));
        }
        if self.database_max_connections == Some(0) {
            return Err(ConfigError(
                "database_max_connections must be at least 1".into(),
            ));
        }
        if let Some(n) = self.worker_threads {
            if !(1..=MAX_WORKER_THREADS).contains(&n) {
                return Err(ConfigError(format!(
                    "worker_threads must be between 1 and {MAX_WORKER_THREADS} (unset: one per \
                     CPU), not {n}"
                )));
            }
        }
        Ok(())
    }

    /// The async runtime's worker threads: `worker_threads`, else Tokio's own
    /// `TOKIO_WORKER_THREADS` (checked here: Tokio would panic on a bad value), else None for
    /// Tokio's default, one per CPU.
    pub fn runtime_worker_threads(&self) -> Result<Option<usize>, ConfigError> {
        if self.worker_threads.is_some() {
            return Ok(self.worker_threads);
        }
        let value = match std::env::var("TOKIO_WORKER_THREADS") {
            Err(std::env::VarError::NotPresent) => return Ok(None),
            value => value,
        };
        let workers = value
            .as_deref()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok());
        match workers {
            Some(n) if (1..=MAX_WORKER_THREADS).contains(&n) => Ok(Some(n)),
            _ => {
                let shown = value.map_or_else(
                    |_| "a value that is not UTF-8".to_owned(),
                    |v| format!("{v:?}"),
                );
                Err(ConfigError(format!(
                    "TOKIO_WORKER_THREADS must be between 1 and {MAX_WORKER_THREADS} (or unset), \
                     not {shown}"
                )))
            }
        }
    }

    /// The database URL, defaulting to a SQLite file under `data_dir`.
    pub fn effective_database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("mailgate.db").display())
        } else {
            self.database_url.expose().to_owned()
        }
    }

    /// The pool size: `database_max_connections`, or the backend's default.
    pub fn effective_max_connections(&self) -> u32 {
        self.database_max_connections.unwrap_or_else(|| {
            if self.effective_database_url().starts_with("sqlite:") {
                SQLITE_DEFAULT_CONNECTIONS
            } else {
                POSTGRES_DEFAULT_CONNECTIONS
            }
        })
    }
}

/// Serde for a list of durations written as humantime strings (`["30s", "5m"]`).
mod duration_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            value
                .iter()
                .map(|d| humantime_serde::re::humantime::format_duration(*d).to_string()),
        )
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let items: Vec<humantime_serde::Serde<Duration>> = Vec::deserialize(d)?;
        Ok(items
            .into_iter()
            .map(humantime_serde::Serde::into_inner)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_secret_is_redacted() {
        let config = Config::default();
        assert!(config.validate().is_ok());
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert!(config.effective_database_url().starts_with("sqlite://"));
    }

    #[test]
    fn pool_size_defaults_by_backend_and_an_explicit_size_wins() {
        let mut config = Config::default();
        assert_eq!(config.effective_max_connections(), 4);
        config.database_url = Secret::new("postgres://db/mailgate");
        assert_eq!(config.effective_max_connections(), 16);
        config.database_max_connections = Some(7);
        assert_eq!(config.effective_max_connections(), 7);
        config.database_max_connections = Some(0);
        assert!(config.validate().is_err());
    }

    #[test]
    fn worker_threads_between_one_and_the_maximum() {
        let mut config = Config::default();
        for ok in [None, Some(1), Some(MAX_WORKER_THREADS)] {
            config.worker_threads = ok;
            assert!(config.validate().is_ok(), "{ok:?}");
        }
        for bad in [0, MAX_WORKER_THREADS + 1] {
            config.worker_threads = Some(bad);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("worker_threads"), "{err}");
        }
    }
}
