//! `dbx setup` and `dbx check` as a user runs them: the binary against a fresh database.
//!
//! A test binary of its own: setup gives the cluster-wide login roles new passwords,
//! so it must not share a cluster with tests whose daemons log in as those roles.

use std::path::Path;

use dbx_testkit::TestDb;

fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    dbx_testkit::run_cli(dbx_bin(), args, env)
}

/// Roles are cluster-wide: setup tests that set passwords run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_then_check_prints_the_seven_tables_and_is_idempotent() {
    let _guard = SERIAL.lock().await;
    let db = TestDb::new().await;
    let name = format!("{}_app", db.name());
    let out = tempfile::tempdir().unwrap();
    let su = db.server_url("postgres");
    let args = [
        "setup",
        "--superuser-url",
        &su,
        "--database",
        &name,
        "--out-dir",
        out.path().to_str().unwrap(),
    ];
    let (ok, text) = run(&args, &[]);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("created database {name}")), "{text}");
    assert!(!text.contains("[!]"), "{text}");
    for f in ["credentials.txt", "api_key.txt"] {
        let meta = std::fs::metadata(out.path().join(f)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let creds = std::fs::read_to_string(out.path().join("credentials.txt")).unwrap();
    let key = std::fs::read_to_string(out.path().join("api_key.txt")).unwrap();
    // Only the hash of the key is stored.
    let client = dbx_testkit::connect(&db.server_url(&name)).await;
    let key_line = key.lines().find(|l| l.starts_with("dbx_")).unwrap();
    let stored: String = client
        .query_one(
            "SELECT api_key_hash FROM dbx_aviation.organizations WHERE org_code = 'DBX-TEST'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, dbx_control::setup::api_key_hash(key_line));
    assert_ne!(stored, key_line);

    // Again: nothing changes, nothing fails.
    let (ok, text) = run(&args, &[]);
    assert!(ok, "{text}");
    assert!(text.contains("migrations: up to date"), "{text}");
    assert_eq!(
        std::fs::read_to_string(out.path().join("credentials.txt")).unwrap(),
        creds
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("api_key.txt")).unwrap(),
        key
    );

    // check, as the application user, prints what the seed's test prints.
    let url = creds
        .lines()
        .find_map(|l| l.strip_prefix("dbx_api_service_url = "))
        .unwrap();
    let (ok, text) = run(&["check", "--database-url", url], &[]);
    assert!(ok, "{text}");
    for t in dbx_control::setup::EXPECTED_TABLES {
        assert!(text.contains(&format!("   - {t}")), "{text}");
    }
    assert!(
        text.contains("Found 7 tables") && text.contains("PostgreSQL 15"),
        "{text}"
    );

    // --rotate makes a new key and passwords.
    let mut rotate = args.to_vec();
    rotate.push("--rotate");
    let (ok, text) = run(&rotate, &[]);
    assert!(ok, "{text}");
    assert_ne!(
        std::fs::read_to_string(out.path().join("api_key.txt")).unwrap(),
        key
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_reads_the_seeds_db_variables_and_explains_failures() {
    let db = TestDb::new().await;
    let cfg: tokio_postgres::Config = db.server_url("postgres").parse().unwrap();
    let port = cfg.get_ports()[0].to_string();
    // Wrong password through DB_* variables: authentication failure, named.
    let (ok, text) = run(
        &[
            "setup",
            "--database",
            "never_made",
            "--out-dir",
            "/tmp/dbx-never",
        ],
        &[
            ("DB_HOST", "127.0.0.1"),
            ("DB_PORT", &port),
            ("DB_USER", "postgres"),
            ("DB_PASSWORD", "wrong"),
        ],
    );
    assert!(!ok);
    assert!(
        text.contains("authentication failed for user \"postgres\""),
        "{text}"
    );
    // Nothing listening: unreachable, with host, port and the seed's hint.
    let (ok, text) = run(
        &["setup", "--out-dir", "/tmp/dbx-never"],
        &[
            ("DB_HOST", "127.0.0.1"),
            ("DB_PORT", "1"),
            ("DB_USER", "postgres"),
        ],
    );
    assert!(!ok);
    assert!(
        text.contains("cannot reach PostgreSQL at 127.0.0.1:1")
            && text.contains("systemctl status postgresql"),
        "{text}"
    );
    // A bad port value names the variable.
    let (ok, text) = run(&["setup"], &[("DB_PORT", "seventy")]);
    assert!(!ok && text.contains("DB_PORT"), "{text}");
    // A database made by something else is refused, not trampled.
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE someone_elses (x int)")
        .await
        .unwrap();
    let (ok, text) = run(
        &[
            "setup",
            "--superuser-url",
            &db.server_url("postgres"),
            "--database",
            db.name(),
            "--out-dir",
            "/tmp/dbx-never",
        ],
        &[],
    );
    assert!(!ok);
    assert!(text.contains("exists but was not made by dbx"), "{text}");
    // check against a database without the schema names what is missing.
    let (ok, text) = run(&["check", "--database-url", &db.url()], &[]);
    assert!(!ok);
    assert!(
        text.contains("7 tables are missing") || text.contains("of the 7 tables are missing"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_privilege_is_reported_as_such() {
    let _guard = SERIAL.lock().await;
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("DO $$ BEGIN CREATE ROLE dbx_weak_user LOGIN PASSWORD 'weakpw'; EXCEPTION WHEN duplicate_object THEN NULL; END $$;")
        .await
        .unwrap();
    let (ok, text) = run(
        &[
            "setup",
            "--superuser-url",
            &db.url_for("dbx_weak_user", "weakpw"),
            "--database",
            "dbx_weak_db",
            "--out-dir",
            "/tmp/dbx-never",
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        text.contains("permission denied while creating database dbx_weak_db"),
        "{text}"
    );
}
