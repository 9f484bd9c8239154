//! The `mailgate` command: `serve`, `migrate` and `healthcheck`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use mailgate::{app::App, config::Config, storage::SqlStore, telemetry};

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
}

fn humantime_parse(value: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(value).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("mailgate: {e}");
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Serve);
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

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
