//! `dbx partitions list|create|archive|retention|sweep|api-requests`: the control plane's
//! maintenance tasks, run once from the command line (each under the same advisory lock as
//! the daemon's timers, so it never races a running daemon), or with `--dry-run` printing the
//! SQL it would run.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::bail;
use clap::{Args, Subcommand};

use dbx_control::partitions::{PartitionManager, Task, TaskReport};
use dbx_core::SystemClock;

use crate::config::{self, Config};

/// Flags of `dbx partitions`.
#[derive(Debug, Args)]
pub struct PartitionsArgs {
    /// Connection URL; default the config's database.admin_url, else database.url (which
    /// DATABASE_URL overrides). Archival and retention need a member of dbx_admin
    /// (dbx_maintenance_service).
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Print the SQL the task would run, and run nothing.
    #[arg(long, global = true)]
    dry_run: bool,
    #[command(subcommand)]
    action: PartitionsAction,
}

#[derive(Debug, Subcommand)]
enum PartitionsAction {
    /// Every partition of the live and the archive table: name, schema, bounds, rows, size.
    List,
    /// Create the partitions of [now - lookback, now + premake] that are missing.
    Create {
        /// Intervals ahead (default: partitions.premake).
        #[arg(long)]
        premake: Option<u32>,
        /// Intervals back (default: partitions.lookback).
        #[arg(long)]
        lookback: Option<u32>,
    },
    /// Move partitions older than archive_after_days under dbx_archive.flight_telemetry_archive.
    Archive {
        /// Days (default: partitions.archive_after_days).
        #[arg(long)]
        after_days: Option<u32>,
    },
    /// Apply each organization's data_retention_days to telemetry (live and archived), sessions
    /// and analysis results.
    Retention {
        /// Rows per delete transaction (default: partitions.retention_chunk_rows).
        #[arg(long)]
        chunk_rows: Option<u32>,
    },
    /// Move rows out of the default partition into their own partitions.
    Sweep,
    /// Delete api_requests rows older than partitions.api_requests_retention_days, oldest
    /// first, in bounded transactions.
    ApiRequests {
        /// Days kept (default: partitions.api_requests_retention_days).
        #[arg(long)]
        days: Option<u32>,
        /// Rows per delete transaction (default: partitions.retention_chunk_rows).
        #[arg(long)]
        chunk_rows: Option<u32>,
    },
}

/// `dbx partitions …`.
pub async fn partitions(
    config_path: Option<&Path>,
    args: PartitionsArgs,
) -> anyhow::Result<ExitCode> {
    let cfg: Config = config::load(config_path)?;
    let (url, origin) = match &args.database_url {
        Some(u) => (u.as_str(), "--database-url"),
        None => cfg.database.admin(),
    };
    let connector = cfg.database.connector(url, origin)?;
    let interval = cfg.batcher.partition_interval;
    let mut pcfg = cfg.partitions.clone();
    let task = match args.action {
        PartitionsAction::List => None,
        PartitionsAction::Create { premake, lookback } => {
            pcfg.premake = premake.unwrap_or(pcfg.premake);
            pcfg.lookback = lookback.unwrap_or(pcfg.lookback);
            Some(Task::Premake)
        }
        PartitionsAction::Archive { after_days } => {
            pcfg.archive_after_days = after_days.unwrap_or(pcfg.archive_after_days);
            if pcfg.archive_after_days == 0 {
                bail!("--after-days must be at least 1");
            }
            Some(Task::Archive)
        }
        PartitionsAction::Retention { chunk_rows } => {
            pcfg.retention_chunk_rows = chunk_rows.unwrap_or(pcfg.retention_chunk_rows);
            Some(Task::Retention)
        }
        PartitionsAction::Sweep => Some(Task::Sweep),
        PartitionsAction::ApiRequests { days, chunk_rows } => {
            if days == Some(0) {
                bail!("--days must be at least 1");
            }
            pcfg.api_requests_retention_days = days.unwrap_or(pcfg.api_requests_retention_days);
            pcfg.retention_chunk_rows = chunk_rows.unwrap_or(pcfg.retention_chunk_rows);
            Some(Task::RequestLog)
        }
    };
    if let Err(e) = pcfg.validate() {
        bail!(
            "{} (from the config or this command's flags)",
            e.in_section("partitions")
        );
    }
    let manager = PartitionManager::new(connector, interval, pcfg, Arc::new(SystemClock));
    let Some(task) = task else {
        list(&manager).await?;
        return Ok(ExitCode::SUCCESS);
    };
    if args.dry_run {
        print!("{}", manager.plan(task).await?);
        return Ok(ExitCode::SUCCESS);
    }
    let Some(report) = manager.run_task(task).await? else {
        bail!("another dbx is running partition maintenance on this database (advisory lock held); try again in a moment");
    };
    print_report(task, &report);
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn list(manager: &PartitionManager) -> anyhow::Result<()> {
    let parts = manager.list().await?;
    let fmt_ts = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.format("%Y-%m-%d %H:%MZ").to_string())
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{:<32} {:<8} {:<18} {:<18} {:>12} {:>10}",
        "name", "schema", "from", "to", "rows (est.)", "size"
    );
    for p in &parts {
        let (from, to) = if p.is_default {
            ("DEFAULT".to_string(), String::new())
        } else {
            (fmt_ts(p.from), fmt_ts(p.to))
        };
        println!(
            "{:<32} {:<8} {:<18} {:<18} {:>12} {:>10}{}{}",
            p.name,
            if p.is_live() { "live" } else { "archive" },
            from,
            to,
            p.rows_estimate
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into()),
            human_bytes(p.total_bytes),
            if p.detach_pending {
                "  (detach pending)"
            } else {
                ""
            },
            // Archived with partitions.archive_access_method = "columnar".
            if p.is_columnar() { "  (columnar)" } else { "" }
        );
    }
    let live = parts
        .iter()
        .filter(|p| p.is_live() && !p.is_default)
        .count();
    let archived = parts.iter().filter(|p| !p.is_live()).count();
    println!("{live} live partition(s), {archived} archived, plus the default partition");
    Ok(())
}

fn human_bytes(n: i64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

fn print_report(task: Task, r: &TaskReport) {
    for n in &r.notes {
        println!("note: {n}");
    }
    for d in &r.done {
        println!("done: {d}");
    }
    for s in &r.skipped {
        println!("skipped: {s}");
    }
    for f in &r.failed {
        println!("FAILED: {f}");
    }
    println!(
        "{task}: {} step(s) done, {} skipped, {} failed, {} row(s) affected",
        r.done.len(),
        r.skipped.len(),
        r.failed.len(),
        r.rows
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(8192), "8.0 kB");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MB");
    }
}
