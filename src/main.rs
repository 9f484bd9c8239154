//! The `mailgate` command: `serve`, `migrate` and `healthcheck`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mailgate::{app::App, auth::Role, config::Config, storage::SqlStore, telemetry};

/// Multi-tenant gRPC email notification service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (settings not in it come from defaults and MAILGATE_* variables).
    #[arg(long, short, env = "MAILGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gRPC server and the delivery engine (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Re-encrypt every stored secret with the current key (after moving the old key to
    /// encryption.previous_keys).
    Rekey,
    /// Ask a running server's gRPC health service; exit 0 when SERVING.
    Healthcheck {
        /// The server address; default: the configured listen address.
        #[arg(long)]
        addr: Option<SocketAddr>,
        /// How long to wait for the answer.
        #[arg(long, default_value = "3s", value_parser = humantime_parse)]
        timeout: Duration,
    },
    /// Make or hash API keys (needs no configuration).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Make a new random key: prints the token once (give it to the caller) and the entry for
    /// auth.keys_file (which holds only the token's hash).
    New {
        /// The key's name, recorded as the email log's source.
        #[arg(long)]
        name: String,
        /// service, admin, member or operator.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// The tenant the key is bound to (required for admin and member).
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// Read a token on standard input and print its hash for auth.keys_file.
    Hash,
}

fn parse_role(value: &str) -> Result<Role, String> {
    match value {
        "service" => Ok(Role::Service),
        "admin" => Ok(Role::Admin),
        "member" => Ok(Role::Member),
        "operator" => Ok(Role::Operator),
        other => Err(format!(
            "{other:?} is not a role: service, admin, member or operator"
        )),
    }
}

fn keys(command: KeysCommand) -> ExitCode {
    match command {
        KeysCommand::New { name, role, tenant } => {
            if matches!(role, Role::Admin | Role::Member) && tenant.is_empty() {
                eprintln!("mailgate: a {} key needs --tenant", role.as_str());
                return ExitCode::from(2);
            }
            let key = mailgate::auth::new_key(&name, role, &tenant);
            eprintln!("token (shown once; the caller sends `authorization: Bearer <token>`):");
            println!("{}", key.token);
            eprintln!("entry for auth.keys_file:");
            println!();
            println!("[[keys]]");
            println!("name = {:?}", key.entry.name);
            println!("role = {:?}", key.entry.role.as_str());
            if !key.entry.tenant.is_empty() {
                println!("tenant = {:?}", key.entry.tenant);
            }
            println!("hash = {:?}", key.entry.hash);
            ExitCode::SUCCESS
        }
        KeysCommand::Hash => {
            let mut token = String::new();
            if std::io::stdin().read_line(&mut token).is_err() || token.trim().is_empty() {
                eprintln!("mailgate: give the token on standard input");
                return ExitCode::from(2);
            }
            println!("{}", mailgate::auth::hash_token(token.trim()));
            ExitCode::SUCCESS
        }
    }
}

fn humantime_parse(value: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(value).map_err(|e| e.to_string())
}

/// jemalloc instead of glibc's malloc. A request's buffers are allocated on one worker thread
/// and often freed on another; glibc's arenas spent about a tenth of the server's CPU on that
/// under load. mimalloc saved as much but held up to 2.5 times the memory at its peak
/// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Keys { command }) = cli.command {
        return keys(command);
    }
    let loaded = Config::load(cli.config.as_deref())
        .and_then(|config| Ok((config.runtime_worker_threads()?, config)));
    let (workers, config) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("mailgate: {e}");
            return ExitCode::from(2);
        }
    };
    // Built here, not by `#[tokio::main]`: its size comes from the configuration.
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        runtime.worker_threads(n);
    }
    match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(run(cli.command.unwrap_or(Command::Serve), config)),
        Err(e) => {
            eprintln!("mailgate: starting the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> ExitCode {
    if !matches!(command, Command::Serve) {
        telemetry::init(&config.log);
    }
    let result = match command {
        Command::Serve => serve(config).await,
        Command::Migrate => migrate(config).await,
        Command::Rekey => mailgate::app::rekey(&config).await.map(|n| {
            println!(
                "re-encrypted {n} secret(s) with key {:?}",
                config.encryption.key_id
            );
        }),
        Command::Healthcheck { addr, timeout } => {
            healthcheck(addr.unwrap_or(config.listen_addr), timeout).await
        }
        Command::Keys { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "mailgate failed");
            eprintln!("mailgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let telemetry =
        telemetry::init_with_otel(&config.log, config.metrics.prometheus_addr.is_some())?;
    let result = match App::build(config).await {
        Ok(app) => {
            app.with_prometheus(telemetry.prometheus.clone())
                .run(shutdown_signal())
                .await
        }
        Err(e) => Err(e),
    };
    // Flush spans and metrics of the last moments (a failed start included).
    telemetry.shutdown().await;
    result
}

async fn migrate(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)?;
    let store = SqlStore::connect(&config.effective_database_url(), 1).await?;
    store.close().await;
    tracing::info!("migrations applied");
    Ok(())
}

async fn healthcheck(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let check = async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let mut client = HealthClient::new(channel);
        let response = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        anyhow::Ok(response.into_inner().status)
    };
    let status = tokio::time::timeout(timeout, check)
        .await
        .context("health check timed out")??;
    if status == ServingStatus::Serving as i32 {
        println!("SERVING");
        Ok(())
    } else {
        anyhow::bail!("server is not serving (status {status})")
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, before
/// the server starts and says it listens, not when the future is first polled: a signal in
/// between took the default action, which ends the process at once, with no graceful
/// shutdown (a test that stopped a server right after it started saw it).
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    /// The next signal of `s`; never, without a handler.
    async fn next(s: Option<Signal>) {
        match s {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let term = next(signal(SignalKind::terminate()).ok());
    let int = next(signal(SignalKind::interrupt()).ok());
    async move {
        tokio::select! {
            () = term => {}
            () = int => {}
        }
    }
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
