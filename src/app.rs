//! Wiring: [`App::build`] opens storage, binds its own listener (port 0 picks a free port) and
//! assembles the services; [`App::run`] serves until the shutdown future resolves, then stops
//! accepting, stops claiming, finishes or releases in-flight deliveries, and returns.

use std::{future::Future, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::{server::HealthReporter, ServingStatus};
use tracing::{info, warn};

use crate::{
    api::{ApiContext, CampaignApi, EmailLogApi, SendApi, SmtpConfigApi, TemplateApi},
    auth::{AuthLayer, Authenticator},
    config::Config,
    crypto::SecretBox,
    delivery::{
        guard::Guard, smtp::SmtpTarget, tls::TrustSettings, Engine, EngineSettings, FileDrop,
        SystemService, Transports,
    },
    domain::{AuthMechanism, EmailAddress, Mailbox, Security},
    proto::{
        v1::{
            campaign_service_server::CampaignServiceServer,
            email_log_service_server::EmailLogServiceServer,
            send_service_server::SendServiceServer,
            smtp_config_service_server::SmtpConfigServiceServer,
            template_service_server::TemplateServiceServer,
        },
        FILE_DESCRIPTOR_SET,
    },
    storage::{SqlStore, Store},
};

/// The gRPC service names, for health reporting.
const SERVICES: [&str; 5] = [
    "mailgate.v1.SmtpConfigService",
    "mailgate.v1.TemplateService",
    "mailgate.v1.CampaignService",
    "mailgate.v1.SendService",
    "mailgate.v1.EmailLogService",
];

/// A built, bound, not yet running mailgate.
#[derive(Debug)]
pub struct App {
    stop: (watch::Sender<bool>, watch::Receiver<bool>),
    prometheus: Option<(TcpListener, Option<prometheus::Registry>)>,
    listener: TcpListener,
    local_addr: SocketAddr,
    store: Arc<SqlStore>,
    engine: Arc<Engine>,
    ctx: ApiContext,
    auth: Arc<Authenticator>,
    tls: Option<ServerTlsConfig>,
    relay: Option<crate::delivery::Relay>,
    config: Config,
}

fn system_service(config: &Config, roots: &[String]) -> anyhow::Result<SystemService> {
    let url = config.system_default.smtp_url.expose();
    if url.is_empty() {
        return Ok(SystemService::FileDrop(FileDrop::new(
            config.data_dir.join("outbox"),
        )));
    }
    let parsed = url::Url::parse(url).context("system_default.smtp_url is not a valid URL")?;
    let (security, default_port) = match parsed.scheme() {
        "smtp" => (Security::None, 25),
        "smtp+starttls" => (Security::StartTls, 587),
        "smtps" => (Security::ImplicitTls, 465),
        other => anyhow::bail!(
            "system_default.smtp_url: unknown scheme {other:?} (smtp, smtp+starttls, smtps)"
        ),
    };
    let host = parsed
        .host_str()
        .context("system_default.smtp_url has no host")?
        .to_owned();
    let auth = (!parsed.username().is_empty()).then(|| crate::delivery::smtp::SmtpAuth {
        mechanism: AuthMechanism::Auto,
        username: percent_decode(parsed.username()),
        secret: percent_decode(parsed.password().unwrap_or_default()),
    });
    Ok(SystemService::Smtp(SmtpTarget {
        host,
        port: parsed.port().unwrap_or(default_port),
        security,
        trust: TrustSettings {
            extra_roots_pem: roots.to_vec(),
            verify: true,
        },
        helo_name: config.smtp.helo_name.clone(),
        auth,
        guarded: false,
    }))
}

fn percent_decode(value: &str) -> String {
    url::form_urlencoded::parse(format!("v={value}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// The secret box of the configuration: the current key (or the development key) and the
/// previous keys that may still open older secrets.
pub fn secrets(config: &Config) -> anyhow::Result<SecretBox> {
    let mut sb = current_secrets(config)?;
    for previous in &config.encryption.previous_keys {
        sb = sb
            .with_previous(previous.key.expose(), &previous.id)
            .with_context(|| format!("encryption.previous_keys: key {:?}", previous.id))?;
    }
    Ok(sb)
}

fn current_secrets(config: &Config) -> anyhow::Result<SecretBox> {
    if config.encryption.key.is_empty() {
        warn!(
            "NO ENCRYPTION KEY CONFIGURED: using a development key stored in {}; anyone who can read that directory can decrypt SMTP passwords. Set MAILGATE_ENCRYPTION__KEY (32 bytes, base64) in production.",
            config.data_dir.display()
        );
        Ok(SecretBox::development(&config.data_dir)?)
    } else {
        Ok(SecretBox::new(
            config.encryption.key.expose(),
            &config.encryption.key_id,
        )?)
    }
}

fn read_roots(path: Option<&Path>) -> anyhow::Result<Vec<String>> {
    match path {
        None => Ok(Vec::new()),
        Some(path) => Ok(vec![std::fs::read_to_string(path).with_context(|| {
            format!("reading smtp.extra_roots_file {}", path.display())
        })?]),
    }
}

/// Re-encrypts every stored secret that is not sealed with the current key. Returns how many
/// were re-encrypted.
pub async fn rekey(config: &Config) -> anyhow::Result<usize> {
    std::fs::create_dir_all(&config.data_dir)?;
    let store = SqlStore::connect(&config.effective_database_url(), 2).await?;
    let secrets = secrets(config)?;
    let mut count = 0;
    for (tenant_id, profile_id, sealed) in store.all_profile_secrets().await? {
        if secrets.is_current(&sealed) {
            continue;
        }
        let context = crate::delivery::secret_context(&tenant_id, &profile_id);
        let plain = secrets
            .open(&sealed, &context)
            .with_context(|| format!("profile {profile_id} of tenant {tenant_id}"))?;
        let resealed = secrets.seal(&plain, &context);
        if store
            .replace_profile_secret(&tenant_id, &profile_id, &sealed, &resealed)
            .await?
        {
            count += 1;
        }
    }
    store.close().await;
    Ok(count)
}

impl App {
    /// Opens storage (applying migrations), binds the listener and assembles everything.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let auth = Arc::new(
            Authenticator::new(&config.auth, &config.limits, config.listen_addr)
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?,
        );
        if auth.dev_mode() {
            warn!(
                "DEVELOPMENT MODE: no API keys are configured, so every caller on this loopback \
                 listener may act for any tenant. Configure auth.keys or auth.keys_file before \
                 exposing mailgate."
            );
        } else {
            info!(keys = auth.key_count(), "API keys loaded");
        }
        let tls = listener_tls(&config.tls)?;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        let store = Arc::new(
            SqlStore::connect(
                &config.effective_database_url(),
                config.effective_max_connections(),
            )
            .await
            .context("opening the database")?,
        );
        let secrets = secrets(&config)?;
        let roots = read_roots(config.smtp.extra_roots_file.as_deref())?;
        let guard = Guard::new(
            config.smtp.allowed_ports.clone(),
            config.smtp.allowed_networks.clone(),
        );
        let transports = Arc::new(Transports::new(guard, system_service(&config, &roots)?));
        let system_sender = Mailbox {
            email: EmailAddress::parse(
                "system_default.from_email",
                &config.system_default.from_email,
            )
            .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.description))?,
            name: config.system_default.from_name.clone(),
        };
        let d = &config.delivery;
        let engine = Arc::new(Engine::new(
            store.clone() as Arc<dyn Store>,
            transports,
            secrets.clone(),
            EngineSettings {
                concurrency: d.concurrency,
                lease: d.lease,
                poll_interval: d.poll_interval,
                attempt_timeout: d.attempt_timeout,
                retry_schedule: d.retry_schedule.clone(),
                give_up_after: d.give_up_after,
                shutdown_grace: config.shutdown_grace,
                system_sender: system_sender.clone(),
                operator_roots: roots,
                helo_name: config.smtp.helo_name.clone(),
            },
        ));
        // On PostgreSQL, live watchers also see the changes other replicas make.
        let relay = match store.backend() {
            crate::storage::Backend::Postgres => Some(
                crate::delivery::Relay::connect(engine.clone(), &config.effective_database_url())
                    .await
                    .context("listening for other replicas' changes (LISTEN)")?,
            ),
            crate::storage::Backend::Sqlite => None,
        };
        let prometheus = match config.metrics.prometheus_addr {
            Some(addr) => Some((
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding metrics.prometheus_addr {addr}"))?,
                None,
            )),
            None => None,
        };
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("binding {}", config.listen_addr))?;
        let local_addr = listener.local_addr()?;
        let stop = watch::channel(false);
        let ctx = ApiContext {
            shutdown: stop.1.clone(),
            store: store.clone() as Arc<dyn Store>,
            engine: engine.clone(),
            secrets,
            allow_insecure_tls: config.smtp.allow_insecure_tls,
            system_sender,
            limits: config.limits.clone(),
            reads: Arc::default(),
        };
        Ok(Self {
            stop,
            prometheus,
            listener,
            local_addr,
            store,
            engine,
            ctx,
            auth,
            tls,
            relay,
            config,
        })
    }

    /// The address the gRPC server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The Prometheus registry to serve on `metrics.prometheus_addr`.
    pub fn with_prometheus(mut self, registry: Option<prometheus::Registry>) -> Self {
        if let Some((_, slot)) = &mut self.prometheus {
            *slot = registry;
        }
        self
    }

    /// The Prometheus endpoint's address, when configured.
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        self.prometheus
            .as_ref()
            .and_then(|(l, _)| l.local_addr().ok())
    }

    /// The delivery engine (tests drive it with `run_once` and watch its events).
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let (stop_tx, stop_rx) = self.stop.clone();
        let engine_task = self
            .config
            .delivery
            .enabled
            .then(|| tokio::spawn(self.engine.clone().run(stop_rx.clone())));
        if let Some(relay) = self.relay {
            tokio::spawn(relay.run(stop_rx.clone()));
        }
        let housekeeping_task = tokio::spawn(crate::housekeeping::run(
            self.store.clone(),
            self.config.retention.clone(),
            stop_rx.clone(),
        ));
        let health_task = tokio::spawn(watch_health(
            self.store.clone(),
            health.clone(),
            stop_rx.clone(),
        ));

        info!(
            addr = %self.local_addr,
            database = ?self.store.backend(),
            worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            "mailgate listening"
        );
        let ctx = self.ctx.clone();
        let stop_signal = {
            let stop_tx = stop_tx.clone();
            async move {
                shutdown.await;
                info!("shutdown requested: no new requests, no new claims");
                let _ = stop_tx.send(true);
            }
        };
        if let Some((listener, Some(registry))) = self.prometheus {
            tokio::spawn(crate::metrics::serve_prometheus(
                listener,
                registry,
                stop_rx.clone(),
            ));
        }
        let mut builder = Server::builder();
        if let Some(tls) = self.tls {
            builder = builder.tls_config(tls).context("tls settings")?;
        }
        let max = self.config.limits.max_request_bytes;
        let served = builder
            .trace_fn(crate::telemetry::grpc_server_span)
            .layer(crate::metrics::RpcMetricsLayer)
            .layer(AuthLayer::new(self.auth.clone(), max))
            .layer(crate::api::read_cache::InvalidateOnWriteLayer::new(
                ctx.reads.clone(),
            ))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                SmtpConfigServiceServer::new(SmtpConfigApi::new(ctx.clone()))
                    .max_decoding_message_size(max),
            )
            .add_service(
                TemplateServiceServer::new(TemplateApi::new(ctx.clone()))
                    .max_decoding_message_size(max),
            )
            .add_service(
                CampaignServiceServer::new(CampaignApi::new(ctx.clone()))
                    .max_decoding_message_size(max),
            )
            .add_service(
                SendServiceServer::new(SendApi::new(ctx.clone())).max_decoding_message_size(max),
            )
            .add_service(
                EmailLogServiceServer::new(EmailLogApi::new(ctx)).max_decoding_message_size(max),
            )
            // TCP_NODELAY: a unary answer is written in pieces (headers, body, trailers);
            // with Nagle's algorithm the last piece waits ~40 ms for the client's ACK.
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(self.listener).with_nodelay(Some(true)),
                stop_signal,
            )
            .await;
        let _ = stop_tx.send(true);
        if let Some(task) = engine_task {
            let _ = task.await;
        }
        let _ = health_task.await;
        let _ = housekeeping_task.await;
        self.store.close().await;
        info!("mailgate stopped");
        served.context("gRPC server failed")
    }
}

/// The listener's TLS settings, read from the configured PEM files.
fn listener_tls(
    config: &crate::auth::settings::ListenerTlsConfig,
) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
        return Ok(None);
    };
    let read = |setting: &str, path: &Path| {
        std::fs::read(path).with_context(|| format!("reading {setting} {}", path.display()))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read("tls.cert_file", cert)?,
        read("tls.key_file", key)?,
    ));
    if let Some(ca) = &config.client_ca_file {
        tls = tls.client_ca_root(Certificate::from_pem(read("tls.client_ca_file", ca)?));
    }
    Ok(Some(tls))
}

/// Reports SERVING while the database answers, NOT_SERVING otherwise.
async fn watch_health(
    store: Arc<SqlStore>,
    health: HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = None;
    loop {
        let status = match store.ping().await {
            Ok(()) => {
                if let Ok((depth, oldest)) = store.queue_stats(crate::delivery::now_micros()).await
                {
                    let gauges = &crate::metrics::metrics().queue;
                    gauges
                        .depth
                        .store(depth, std::sync::atomic::Ordering::Relaxed);
                    gauges
                        .oldest_due_seconds
                        .store(oldest, std::sync::atomic::Ordering::Relaxed);
                }
                ServingStatus::Serving
            }
            Err(e) => {
                warn!(error = %e, "database ping failed");
                ServingStatus::NotServing
            }
        };
        if last != Some(status) {
            // "liveness" answers SERVING while the process runs, whatever the database does, so
            // a database outage does not get every replica restarted at once.
            health
                .set_service_status("liveness", ServingStatus::Serving)
                .await;
            health.set_service_status("", status).await;
            for service in SERVICES {
                health.set_service_status(service, status).await;
            }
            last = Some(status);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.changed() => {
                health.set_service_status("", ServingStatus::NotServing).await;
                return;
            }
        }
    }
}
