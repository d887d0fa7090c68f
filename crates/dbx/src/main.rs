//! The `dbx` binary: command line, configuration, wiring and shutdown order.
//! Business logic lives in the library crates; each subcommand here parses its
//! flags, builds what it needs, runs it, and reports.

mod cmd;
mod config;
mod limits;
mod logging;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// High-throughput telemetry ingestion for PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "dbx", version, about, long_about = None)]
struct Cli {
    /// Configuration file (every key documented in config/dbx.toml).
    #[arg(long, short = 'c', global = true, env = "DBX_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the database, apply migrations, create users, insert sample data, write credentials.
    Setup(cmd::setup::SetupArgs),
    /// Test the connection: server version and the seven tables.
    Check(cmd::setup::CheckArgs),
    /// Apply pending migrations, or show their status.
    Migrate(cmd::setup::MigrateArgs),
    /// Run the daemon: listener, batcher, control plane, admin HTTP.
    Serve(cmd::serve::ServeArgs),
    /// Simulate a gateway fleet against a running daemon.
    Loadgen(cmd::loadgen::LoadgenArgs),
    /// Everything in one command: private PostgreSQL, setup, daemon, a simulated fleet, a report.
    Demo(cmd::demo::DemoArgs),
    /// Partition upkeep once: list, create, archive, retention, sweep (`--dry-run` prints the SQL).
    Partitions(cmd::partitions::PartitionsArgs),
    /// Organizations (tenants): create, list, show, update, activate, deactivate.
    Org(cmd::tenants::OrgArgs),
    /// API keys of an organization: create (rotation), list, revoke.
    Key(cmd::tenants::KeyArgs),
    /// Aircraft of an organization: add, list, retire.
    Aircraft(cmd::tenants::AircraftArgs),
    /// Analysis results: full-text search over the AI reports.
    Analyses(cmd::tenants::AnalysesArgs),
    /// The disk spool: status, dead letters (batches refused on replay), requeue.
    Spool(cmd::spool::SpoolArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Setup(args) => cmd::setup::setup(cli.config.as_deref(), args).await,
            Command::Check(args) => cmd::setup::check(cli.config.as_deref(), args).await,
            Command::Migrate(args) => cmd::setup::migrate(cli.config.as_deref(), args).await,
            Command::Serve(args) => cmd::serve::serve(cli.config.as_deref(), args).await,
            Command::Loadgen(args) => cmd::loadgen::loadgen(args).await,
            Command::Demo(args) => cmd::demo::demo(cli.config.as_deref(), args).await,
            Command::Partitions(args) => {
                cmd::partitions::partitions(cli.config.as_deref(), args).await
            }
            Command::Org(args) => cmd::tenants::org(cli.config.as_deref(), args).await,
            Command::Key(args) => cmd::tenants::key(cli.config.as_deref(), args).await,
            Command::Aircraft(args) => cmd::tenants::aircraft(cli.config.as_deref(), args).await,
            Command::Analyses(args) => cmd::tenants::analyses(cli.config.as_deref(), args).await,
            Command::Spool(args) => cmd::spool::spool(cli.config.as_deref(), args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
