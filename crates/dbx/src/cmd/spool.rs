//! `dbx spool status|rejected|requeue`: look into a disk spool directory and act on
//! its dead letters (acked batches the database refused on replay), without a
//! database connection. `status` and `rejected` only read and are safe while a
//! daemon runs; `requeue` takes the directory's lock, so it runs only while no
//! daemon uses the directory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use dbx_spool::rejected;

use crate::config::{self, Config};

/// Flags of `dbx spool`.
#[derive(Debug, Args)]
pub struct SpoolArgs {
    /// The spool directory; default the config's spool.dir.
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    action: SpoolAction,
}

#[derive(Debug, Subcommand)]
enum SpoolAction {
    /// Segments waiting for replay (records, bytes, age), dead letters, and whether a daemon uses the directory.
    Status,
    /// The dead letters: acked batches the database refused on replay, with the reason.
    Rejected {
        /// One JSON object per line, as stored in rejected/reasons.jsonl.
        #[arg(long)]
        json: bool,
    },
    /// Move the dead letters back into the spool; the next daemon start replays them.
    Requeue,
}

/// `dbx spool …`.
pub async fn spool(config_path: Option<&Path>, args: SpoolArgs) -> anyhow::Result<ExitCode> {
    let dir = match args.dir {
        Some(d) => d,
        None => {
            let cfg: Config = config::load(config_path)?;
            if cfg.spool.dir.is_empty() {
                bail!("spool.dir is not set in the configuration; pass --dir <spool directory>");
            }
            PathBuf::from(cfg.spool.dir)
        }
    };
    if !dir.is_dir() {
        bail!("--dir {}: no such spool directory", dir.display());
    }
    tokio::task::spawn_blocking(move || match args.action {
        SpoolAction::Status => status(&dir),
        SpoolAction::Rejected { json } => list_rejected(&dir, json),
        SpoolAction::Requeue => requeue(&dir),
    })
    .await?
}

fn status(dir: &Path) -> anyhow::Result<ExitCode> {
    let report =
        dbx_spool::inspect(dir).with_context(|| format!("reading spool {}", dir.display()))?;
    let now = chrono::Utc::now().timestamp_micros();
    let records: u64 = report.segments.iter().map(|s| s.records).sum();
    let bytes: u64 = report.segments.iter().map(|s| s.bytes).sum();
    println!("spool {}", dir.display());
    println!(
        "  in use by a running daemon: {}",
        if report.in_use { "yes" } else { "no" }
    );
    println!(
        "  waiting for replay: {records} batches in {} segment files, {bytes} bytes",
        report.segments.len()
    );
    for s in &report.segments {
        let age = s.created_micros.map_or("header not ours".to_string(), |c| {
            format!("created {:.0} s ago", (now - c).max(0) as f64 / 1e6)
        });
        println!(
            "    {}  {:>8} batches  {:>12} bytes  {age}",
            dbx_spool::segment::file_name(s.id),
            s.records,
            s.bytes
        );
    }
    println!(
        "  dead letters (rejected/): {} batches, {} bytes{}",
        report.rejected_records,
        report.rejected_bytes,
        if report.rejected_records > 0 {
            "  (`dbx spool rejected` lists them)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn list_rejected(dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let entries = rejected::read_reasons(&dir.join(rejected::DIR))
        .with_context(|| format!("reading {}", dir.join(rejected::DIR).display()))?;
    if json {
        for e in &entries {
            println!("{}", serde_json::to_string(e)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() {
        println!("no dead letters in {}", dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24}  {:<36}  {:<36}  {:>6}  {:<15}  reason",
        "rejected at", "session", "aircraft", "points", "seq"
    );
    for e in &entries {
        let seq = e
            .seq_range
            .map_or(String::new(), |(a, b)| format!("{a}..={b}"));
        println!(
            "{:<24}  {:<36}  {:<36}  {:>6}  {seq:<15}  {}: {}",
            e.rejected_at, e.session_id, e.aircraft_id, e.points, e.code, e.message
        );
    }
    println!(
        "{} dead letters; fix their cause, stop the daemon, then `dbx spool requeue`",
        entries.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn requeue(dir: &Path) -> anyhow::Result<ExitCode> {
    let (records, files) = dbx_spool::requeue_rejected(dir)?;
    if files == 0 {
        println!("no dead letters in {}", dir.display());
    } else {
        println!(
            "requeued {records} batches in {files} segment files; the next daemon start on {} replays them \
             (a batch refused again is kept as a dead letter again)",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
