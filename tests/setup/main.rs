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

/// A test database (for its server), an output directory, and the arguments of
/// `dbx setup` creating database `<test db>_<suffix>` on that server (`args[4]`).
async fn fresh_setup(suffix: &str) -> (TestDb, tempfile::TempDir, Vec<String>) {
    let db = TestDb::new().await;
    let out = tempfile::tempdir().unwrap();
    let args = vec![
        "setup".to_string(),
        "--superuser-url".into(),
        db.server_url("postgres"),
        "--database".into(),
        format!("{}_{suffix}", db.name()),
        "--out-dir".into(),
        out.path().display().to_string(),
    ];
    (db, out, args)
}

/// Roles are cluster-wide: setup tests that set passwords run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_then_check_prints_the_seven_tables_and_is_idempotent() {
    let _guard = SERIAL.lock().await;
    let (db, out, args) = fresh_setup("app").await;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let name = args[4];
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
    let client = dbx_testkit::connect(&db.server_url(name)).await;
    let key_line = key.lines().find(|l| l.starts_with("dbx_")).unwrap();
    let stored: String = client
        .query_one(
            "SELECT api_key_hash FROM dbx_aviation.organizations WHERE org_code = 'DBX-TEST'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, dbx_core::apikey::key_hash_hex(key_line));
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

/// Whether `flight_sessions` of database `name` has the PostGIS endpoints.
async fn has_endpoints(db: &TestDb, name: &str) -> bool {
    let client = dbx_testkit::connect(&db.server_url(name)).await;
    dbx_control::postgis::PostgisState::read(&client)
        .await
        .unwrap()
        .endpoints
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_takes_the_postgis_branch_when_offered_and_the_plain_one_when_told() {
    let _guard = SERIAL.lock().await;
    // The machine's server offers PostGIS (scripts/test installs it): auto takes it, and the
    // checklist says so.
    let (db, _out, args) = fresh_setup("gis").await;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = run(&args, &[]);
    assert!(ok, "{text}");
    assert!(
        text.contains("[x] Geospatial data support (with PostGIS) — PostGIS 3.")
            && text.contains("geography endpoints on flight_sessions with GiST indexes"),
        "{text}"
    );
    assert!(has_endpoints(&db, args[4]).await);
    // off, by flag or by DBX_POSTGIS: the plain branch on the same server.
    for (suffix, extra, env) in [
        ("flag", Some("--postgis=off"), None),
        ("env", None, Some(("DBX_POSTGIS", "off"))),
    ] {
        let (db, _out, args) = fresh_setup(suffix).await;
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend(extra);
        let (ok, text) = run(&args, &env.into_iter().collect::<Vec<_>>());
        assert!(ok, "{text}");
        assert!(
            text.contains("[-] Geospatial data support (with PostGIS) — not used (postgis = off)"),
            "{text}"
        );
        assert!(!has_endpoints(&db, args[4]).await);
        // A database's branch is chosen once: require now fails, naming why, changing nothing.
        let mut require: Vec<&str> = args[..7].to_vec();
        require.extend(["--postgis", "require"]);
        let (ok, text) = run(&require, &[]);
        assert!(!ok, "{text}");
        assert!(text.contains("was set up without PostGIS"), "{text}");
        assert!(!has_endpoints(&db, args[4]).await);
    }
    let (ok, text) = run(&["setup", "--postgis", "maybe"], &[]);
    assert!(!ok && text.contains("use off, auto or require"), "{text}");
    // dbx migrate takes the same choice.
    let (db, _out, args) = fresh_setup("migrate").await;
    let name = &args[4];
    let client = db.client().await;
    client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await
        .unwrap();
    let (ok, text) = run(
        &[
            "migrate",
            "--postgis",
            "off",
            "--database-url",
            &db.server_url(name),
        ],
        &[],
    );
    assert!(ok, "{text}");
    assert!(text.contains("postgis: not used (postgis = off)"), "{text}");
    assert!(!has_endpoints(&db, name).await);
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

/// The `<user>_password` values of a credentials.txt.
fn passwords(creds: &str) -> Vec<(String, String)> {
    creds
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .filter_map(|(k, v)| Some((k.strip_suffix("_password")?.to_string(), v.to_string())))
        .collect()
}

/// Waits until new sessions see `log_statement = all` (pg_reload_conf is asynchronous).
async fn log_every_statement(db: &TestDb, on: bool) {
    let c = db.client().await;
    let (sql, want) = if on {
        ("ALTER SYSTEM SET log_statement = 'all'", "all")
    } else {
        ("ALTER SYSTEM RESET log_statement", "none")
    };
    c.batch_execute(sql).await.unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let seen = dbx_testkit::wait_until(std::time::Duration::from_secs(10), || async {
        let fresh = db.client().await;
        let v: String = fresh
            .query_one("SHOW log_statement", &[])
            .await
            .unwrap()
            .get(0);
        v == want
    })
    .await;
    assert!(seen, "log_statement did not become {want}");
}

/// `dbx setup` never sends a password: with `log_statement = all` the server log holds its
/// ALTER ROLE statements, each with a SCRAM-SHA-256 verifier and none with a password;
/// pg_authid stores the verifiers; every login user logs in with the password of
/// credentials.txt (and not with another: the cluster authenticates TCP with SCRAM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_reach_the_server_only_as_scram_verifiers() {
    let _guard = SERIAL.lock().await;
    let (db, out, args) = fresh_setup("scram").await;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let name = args[4];
    log_every_statement(&db, true).await;
    let log_path = TestDb::cluster().dir().join("postgres.log");
    let log_before = std::fs::read_to_string(&log_path).unwrap_or_default().len();
    let (ok, text) = run(&args, &[]);
    log_every_statement(&db, false).await;
    assert!(ok, "{text}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let log = &log[log_before..];
    let creds = std::fs::read_to_string(out.path().join("credentials.txt")).unwrap();
    let pws = passwords(&creds);
    assert_eq!(pws.len(), dbx_control::setup::LOGIN_USERS.len(), "{creds}");
    let client = dbx_testkit::connect(&db.server_url(name)).await;
    for (user, pw) in &pws {
        assert!(
            !log.contains(pw.as_str()),
            "{user}'s password is in the server log"
        );
        assert!(!text.contains(pw.as_str()), "{user}'s password was printed");
        assert!(
            log.contains(&format!(
                "ALTER ROLE {user} WITH LOGIN PASSWORD 'SCRAM-SHA-256$4096:"
            )),
            "no logged ALTER ROLE for {user}:\n{log}"
        );
        let stored: String = client
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[user],
            )
            .await
            .unwrap()
            .get(0);
        assert!(stored.starts_with("SCRAM-SHA-256$"), "{user}: {stored}");
        let url = creds
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{user}_url = ")))
            .unwrap();
        let user_client = dbx_testkit::connect(url).await;
        let who: String = user_client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(&who, user);
        let wrong = url.replace(&format!(":{pw}@"), ":not-the-password@");
        assert!(dbx_testkit::connector(&wrong).connect().await.is_err());
    }
}

/// A credentials.txt value that is not a plain token (quotes, whitespace, backslashes,
/// non-ASCII, too long) is refused before any role is touched, naming the file and the
/// key and never showing the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_that_are_not_plain_tokens_are_refused_without_echoing_them() {
    let _guard = SERIAL.lock().await;
    let (db, out, args) = fresh_setup("badcreds").await;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let creds_path = out.path().join("credentials.txt");
    let long = "x".repeat(200);
    for bad in [
        "pw'); DROP ROLE dbx_admin; --",
        "two words here1234",
        "back\\slash0123456789",
        "n\u{f6}n-ascii-0123456789",
        long.as_str(),
    ] {
        std::fs::write(
            &creds_path,
            format!("dbx_api_service_password = Abcdefgh12345678\ndbx_ingest_service_password = {bad}\n"),
        )
        .unwrap();
        let (ok, text) = run(&args, &[]);
        assert!(!ok, "{bad:?} accepted:\n{text}");
        assert!(
            text.contains(&creds_path.display().to_string())
                && text.contains("dbx_ingest_service_password")
                && text.contains("not a plain token"),
            "{text}"
        );
        assert!(!text.contains(bad), "the value was echoed:\n{text}");
    }
    // Nothing was set: the roles still refuse the plain token that was fine.
    let url = db.url_for("dbx_api_service", "Abcdefgh12345678");
    assert!(dbx_testkit::connector(&url).connect().await.is_err());
}
