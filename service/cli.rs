//! The command line: `serve`, `migrate`, `token`, `seed`, `healthcheck`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::{auth, config::Settings, generate, seed, startup::Application, store, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "datagate",
    version,
    about = "gRPC data-access service for users, orders, search and analytics"
)]
pub struct Cli {
    /// A TOML file with settings, layered over the defaults and under
    /// DATAGATE__* environment variables.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server (and the metrics endpoint) until SIGTERM or SIGINT.
    Serve,
    /// Manage the PostgreSQL schema.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Manage caller tokens.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Insert a little demo data (idempotent), or, given sizes, generate
    /// data at scale into an empty database (deterministic for a seed).
    Seed {
        #[arg(long, default_value_t = 0)]
        users: u64,
        #[arg(long, default_value_t = 0)]
        products: u64,
        /// Orders with their lines (needs users and products).
        #[arg(long, default_value_t = 0)]
        orders: u64,
        /// Search log rows, over the last 24 months.
        #[arg(long, default_value_t = 0)]
        searches: u64,
        /// Price measurements in MongoDB (needs DATAGATE__MONGODB__URL).
        #[arg(long = "price-history", default_value_t = 0)]
        price_history: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Ask a running datagate's gRPC health service; exit 0 when the entry
    /// is SERVING, 1 otherwise. A probe for places without native gRPC
    /// probes (Docker HEALTHCHECK, Compose); it needs no shell.
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// The health entry: "" (ready: PostgreSQL reachable), "liveness"
        /// (the process serves), a service name, "redis" or "mongodb".
        #[arg(long, default_value = "")]
        service: String,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        timeout: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// Apply every pending migration.
    Up,
    /// Revert the newest applied migrations.
    Down {
        /// How many migrations to revert.
        #[arg(long, default_value_t = 1)]
        steps: usize,
    },
    /// List migrations and whether each is applied.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Print a new random token and the configuration entry that accepts it.
    New {
        /// The caller's name, recorded in logs and traces.
        #[arg(long)]
        caller: String,
        /// A role (repeatable): `reader`, `writer` (includes reader) or
        /// `admin` (includes writer).
        #[arg(long = "role", value_parser = ["reader", "writer", "admin"])]
        roles: Vec<String>,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Token {
        action: TokenAction::New { caller, roles },
    } = &cli.command
    {
        let (token, entry) = auth::new_token(caller, roles)?;
        entry
            .parse::<crate::config::TokenEntry>()
            .map_err(|e| anyhow::anyhow!("invalid caller or role: {e}"))?;
        println!("token:  {token}");
        println!("config: DATAGATE__AUTH__TOKENS={entry}");
        return Ok(());
    }

    if let Command::Healthcheck {
        addr,
        service,
        timeout,
    } = &cli.command
    {
        let status = health::check(addr, service, *timeout).await?;
        anyhow::ensure!(status == "SERVING", "{addr} {service:?} is {status}");
        println!("{status}");
        return Ok(());
    }

    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve => serve(settings).await,
        Command::Migrate { action } => migrate(&settings, action).await,
        Command::Seed {
            users,
            products,
            orders,
            searches,
            price_history,
            seed,
        } => {
            let db = store::postgres::pool(&settings.database)?;
            let sizes = generate::Sizes {
                users,
                products,
                orders,
                searches,
                price_points: price_history,
                seed,
            };
            if sizes
                == (generate::Sizes {
                    seed,
                    ..Default::default()
                })
            {
                let cache = crate::cache::Cache::new(&settings.redis)?;
                return seed::demo(&db, cache).await;
            }
            store::postgres::migrate_up(&db).await?;
            let started = std::time::Instant::now();
            let mongo = crate::documents::Mongo::connect(&settings.mongodb).await?;
            generate::generate(&db, mongo.as_ref(), sizes).await?;
            println!("generated {sizes:?} in {:.1?}", started.elapsed());
            Ok(())
        }
        Command::Token { .. } | Command::Healthcheck { .. } => unreachable!("handled above"),
    }
}

mod health {
    use std::time::Duration;

    use anyhow::Context as _;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    /// The serving status of `service` at `addr`, by name.
    pub async fn check(addr: &str, service: &str, timeout: Duration) -> anyhow::Result<String> {
        let channel = tonic::transport::Endpoint::from_shared(addr.to_owned())
            .context("invalid --addr")?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|status| anyhow::anyhow!("{addr} {service:?}: {}", status.message()))?;
        Ok(response.into_inner().status().as_str_name().to_owned())
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    settings.check_serving()?;
    let guard = telemetry::init(&settings.telemetry)?;
    let result = async {
        let app = Application::build(settings).await?;
        app.run_until_stopped(shutdown_signal()).await
    }
    .await;
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "datagate stopped with an error");
    }
    guard.shutdown();
    result
}

async fn migrate(settings: &Settings, action: MigrateAction) -> anyhow::Result<()> {
    let db = store::postgres::pool(&settings.database)?;
    match action {
        MigrateAction::Up => {
            store::postgres::migrate_up(&db).await?;
            println!("migrations applied");
        }
        MigrateAction::Down { steps } => {
            let reverted = store::postgres::migrate_down(&db, steps).await?;
            println!("reverted: {reverted:?}");
        }
        MigrateAction::Status => {
            for (version, description, applied) in store::postgres::migration_status(&db).await? {
                let state = if applied { "applied" } else { "pending" };
                println!("{version}  {state:<8} {description}");
            }
        }
    }
    db.close().await;
    Ok(())
}

/// Completes on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listening for SIGTERM")
        {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
