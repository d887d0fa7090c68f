//! Backups as documented in `deploy/backup/`, run for real: a private cluster configured with
//! `deploy/postgresql/ingest.conf` and `deploy/backup/wal-archiving.conf` (the archive path
//! replaced by a temporary directory), `backup.sh base` and `backup.sh dump` with rotation,
//! and a point-in-time recovery with `restore.sh` to a moment between two ingests, checked by
//! row counts on both sides of the target.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use dbx_localpg::cluster::{ClusterOptions, LocalCluster};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::{deploy_cluster, include_conf, is_root, pg_dir, read, repo, run_ok};

/// A command run as the user PostgreSQL runs as (`postgres` when we are root).
fn as_pg(program: impl AsRef<OsStr>) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

async fn connect(url: &str) -> Client {
    dbx_testkit::connect(url).await
}

/// `n` telemetry rows of a new session, committed in one transaction.
async fn ingest(client: &Client, org: Uuid, aircraft: Uuid, n: i64) -> Uuid {
    let session = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO dbx_aviation.flight_telemetry
               (org_id, aircraft_id, session_id, ts, seq, latitude, longitude, altitude_m, motor_rpm)
             SELECT $1, $2, $3, now() - interval '1 minute' + g * interval '10 ms', g,
                    47 + g * 1e-5, 8 + g * 1e-5, 100 + g % 50, ARRAY[5000, 5010, 4990, 5005]::real[]
               FROM generate_series(1, $4::bigint) g",
            &[&org, &aircraft, &session, &n],
        )
        .await
        .expect("ingest rows");
    session
}

async fn rows(client: &Client, session: Uuid) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
            &[&session],
        )
        .await
        .expect("count")
        .get(0)
}

fn script(name: &str) -> PathBuf {
    repo().join("deploy/backup").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_archiving_base_backup_dump_and_point_in_time_restore() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = pg_dir(tmp.path());
    let wal = pg_dir(&root.join("wal"));
    let backups = pg_dir(&root.join("backups"));
    let textfile = pg_dir(&root.join("textfile"));

    // The source server: initdb, then the two deploy snippets included as shipped, except
    // for the archive directory.
    let src = deploy_cluster(root.join("src"));
    let pgdata = src.dir().join("pgdata");
    let archiving = read("deploy/backup/wal-archiving.conf");
    assert!(archiving.contains("/backup/wal/%f"));
    let archiving = archiving.replace("/backup/wal", &wal.display().to_string());
    include_conf(
        &pgdata,
        "dbx-ingest.conf",
        &read("deploy/postgresql/ingest.conf"),
    );
    include_conf(&pgdata, "dbx-wal-archiving.conf", &archiving);
    pg_dir(src.dir());
    src.start().expect("start the source cluster");

    let admin = connect(&src.superuser_url("postgres")).await;
    for (setting, want) in [
        ("archive_mode", "on"),
        ("wal_level", "replica"),
        ("synchronous_commit", "on"),
        ("wal_compression", "lz4"),
        ("shared_preload_libraries", "pg_stat_statements"),
        ("checkpoint_timeout", "15min"),
        ("max_wal_size", "16GB"),
    ] {
        let got: String = admin
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .expect("SHOW")
            .get(0);
        assert_eq!(got, want, "{setting} from the deploy snippets");
    }
    admin
        .batch_execute("CREATE DATABASE dbx_aviation")
        .await
        .expect("create database");
    let mut client = connect(&src.superuser_url("dbx_aviation")).await;
    dbx_control::migrate::apply(&mut client)
        .await
        .expect("migrations");
    client
        .batch_execute(
            "SELECT dbx_aviation.ensure_telemetry_partition(
                 date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + d * interval '1 day',
                 date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + (d + 1) * interval '1 day')
               FROM generate_series(-1, 0) d",
        )
        .await
        .expect("partitions");
    let org = dbx_testkit::Fixture::org(&client, "PITR", None).await;
    let aircraft = dbx_testkit::Fixture::aircraft(&client, org.id, "N1PITR").await;

    let before_backup = ingest(&client, org.id, aircraft, 1000).await;

    // The weekly base backup, as the script takes it (twice, KEEP=1: rotation leaves one).
    let env = |c: &mut Command| {
        c.env("PGHOST", "127.0.0.1")
            .env("PGPORT", src.port().to_string())
            .env("PGUSER", src.superuser())
            .env("PGPASSWORD", src.password())
            .env("PGDATABASE", "dbx_aviation")
            .env("BACKUP_DIR", &backups)
            .env("PG_BINDIR", src.bindir())
            .env("DBX_BACKUP_TEXTFILE_DIR", &textfile)
            .env("KEEP", "1");
    };
    for _ in 0..2 {
        let mut c = as_pg("bash");
        c.arg(script("backup.sh")).arg("base");
        env(&mut c);
        run_ok(&mut c);
        std::thread::sleep(Duration::from_millis(1100)); // names have one-second resolution
    }
    let bases: Vec<PathBuf> = std::fs::read_dir(backups.join("base"))
        .expect("base dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(bases.len(), 1, "KEEP=1 keeps one base backup: {bases:?}");
    let base = bases[0].clone();
    assert!(base.join("base.tar.gz").is_file() && base.join("pg_wal.tar.gz").is_file());

    // More data, the target time, then data that must not survive the restore.
    let before_target = ingest(&client, org.id, aircraft, 700).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let target: String = client
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .expect("target time")
        .get(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_target = ingest(&client, org.id, aircraft, 300).await;
    // Close the segment holding the last commit and wait until it is archived: recovery
    // must see a commit after the target to know where to stop.
    let segment: String = client
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .expect("switch wal")
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (archived, failed): (Option<String>, i64) = {
            let r = client
                .query_one(
                    "SELECT last_archived_wal, failed_count FROM pg_stat_archiver",
                    &[],
                )
                .await
                .expect("pg_stat_archiver");
            (r.get(0), r.get(1))
        };
        assert_eq!(
            failed,
            0,
            "archive_command failed; see {}",
            src.dir().display()
        );
        if archived.as_deref().is_some_and(|a| a >= segment.as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "segment {segment} not archived in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(wal.join(&segment).is_file());

    // The weekly logical dump: three runs with KEEP=2 leave two, each readable.
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(1100));
        }
        let mut c = as_pg("bash");
        c.arg(script("backup.sh")).arg("dump").env("KEEP", "2");
        env(&mut c);
        c.env("KEEP", "2");
        run_ok(&mut c);
    }
    let mut dumps: Vec<PathBuf> = std::fs::read_dir(backups.join("weekly"))
        .expect("weekly dir")
        .map(|e| e.expect("entry").path())
        .collect();
    dumps.sort();
    assert_eq!(dumps.len(), 2, "KEEP=2: {dumps:?}");
    assert!(dumps
        .iter()
        .all(|d| d.extension() == Some(OsStr::new("dump"))));
    let list = run_ok(
        Command::new(src.bindir().join("pg_restore"))
            .arg("--list")
            .arg(&dumps[1]),
    );
    assert!(
        list.contains("TABLE DATA dbx_aviation flight_telemetry_p"),
        "pg_restore --list:\n{list}"
    );
    assert!(list.contains("Format: CUSTOM"), "{list}");
    // Both kinds reported their success for Prometheus.
    for kind in ["base", "dump"] {
        let prom = std::fs::read_to_string(textfile.join(format!("dbx_backup_{kind}.prom")))
            .expect("textfile metric");
        assert!(
            prom.contains(&format!(
                "dbx_backup_last_success_timestamp_seconds{{kind=\"{kind}\"}} "
            )),
            "{prom}"
        );
    }

    // Point-in-time recovery into a new cluster.
    let restored_dir = pg_dir(&root.join("restored"));
    std::fs::copy(
        src.dir().join("superuser.password"),
        restored_dir.join("superuser.password"),
    )
    .expect("password file");
    pg_dir(&restored_dir);
    let restore = || {
        as_pg("bash")
            .arg(script("restore.sh"))
            .arg("--base")
            .arg(&base)
            .arg("--wal")
            .arg(&wal)
            .arg("--target-time")
            .arg(&target)
            .arg("--pgdata")
            .arg(restored_dir.join("pgdata"))
            .output()
            .expect("restore.sh")
    };
    let out = restore();
    assert!(
        out.status.success(),
        "restore.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(restored_dir.join("pgdata/recovery.signal").is_file());
    // restore.sh refuses a non-empty target.
    let again = restore();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not empty"));

    let restored = LocalCluster::init(ClusterOptions {
        password: src.password().to_string(),
        ..ClusterOptions::new(restored_dir.clone())
    })
    .expect("restored cluster");
    restored.start().expect("start the restored cluster");
    let rc = connect(&restored.superuser_url("dbx_aviation")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let in_recovery: bool = rc
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .expect("pg_is_in_recovery")
            .get(0);
        if !in_recovery {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still in recovery after 60 s; log in {}",
            restored_dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The source has everything; the restored copy everything up to the target only.
    assert_eq!(rows(&client, before_backup).await, 1000);
    assert_eq!(rows(&client, before_target).await, 700);
    assert_eq!(rows(&client, after_target).await, 300);
    assert_eq!(rows(&rc, before_backup).await, 1000, "from the base backup");
    assert_eq!(
        rows(&rc, before_target).await,
        700,
        "replayed from the WAL archive"
    );
    assert_eq!(
        rows(&rc, after_target).await,
        0,
        "committed after the target"
    );
    // Promoted: it takes writes, and does not archive into the source's archive.
    let s = ingest(&rc, org.id, aircraft, 10).await;
    assert_eq!(rows(&rc, s).await, 10);
    let archive_mode: String = rc
        .query_one("SHOW archive_mode", &[])
        .await
        .expect("SHOW")
        .get(0);
    assert_eq!(archive_mode, "off");
    restored.stop().expect("stop restored");
    src.stop().expect("stop source");
}
