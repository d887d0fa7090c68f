//! TLS from dbx to PostgreSQL, against a cluster configured like production: dbx-testkit's
//! TLS cluster (`ssl = on`, a certificate for localhost and 127.0.0.1 from a private CA, a
//! pg_hba.conf with `hostssl` only and `hostnossl … reject`, `cert` authentication for
//! `dbx_cert_user`). The binary runs as a user would — `setup`, `check`, `migrate`,
//! `partitions`, `org`/`key`, `serve` with a gateway streaming, `demo` — and every
//! misconfiguration must fail naming what to change.
//!
//! A test binary of its own: `dbx setup` gives the cluster-wide login roles new passwords, so
//! the setup test runs alone (write lock) and puts the ingest password back for the others.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dbx_proto::{AircraftRef, PointForm};
use dbx_testkit::gateway::{now_micros, points};
use dbx_testkit::{wait_until, Env, TestDb, TestGateway, CERT_USER, INGEST_TEST_PASSWORD};
use tokio::sync::RwLock;
use uuid::Uuid;

/// Write-locked by the test that runs `dbx setup` (it changes the login roles' passwords).
static ROLES: RwLock<()> = RwLock::const_new(());

fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

/// Runs the binary with only PATH and `env`: (success, stdout + stderr).
fn dbx(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    dbx_testkit::run_cli(dbx_bin(), args, env)
}

fn ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let (success, text) = dbx(args, env);
    assert!(success, "dbx {args:?} failed:\n{text}");
    text
}

fn fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let (success, text) = dbx(args, env);
    assert!(
        !success,
        "dbx {args:?} succeeded but should not have:\n{text}"
    );
    text
}

/// `dbx serve` that must refuse to start: its output (killed and failed after 30 s).
fn serve_refuses(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(dbx_bin())
        .args(["serve", "--ready-file"])
        .arg(dir.path().join("ready.json"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DBX_LISTENER__TCP_BIND", "127.0.0.1:0")
        .env("DBX_LISTENER__TLS_BIND", "127.0.0.1:0")
        .env("DBX_LISTENER__UDP_BIND", "127.0.0.1:0")
        .env("DBX_HTTP__BIND", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dbx serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("dbx serve did not refuse to start within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    assert!(!out.status.success(), "dbx serve exited successfully");
    assert!(!dir.path().join("ready.json").exists(), "it became ready");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `<user>_url` of a credentials file.
fn url_of(creds: &str, user: &str) -> String {
    creds
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{user}_url = ")))
        .unwrap_or_else(|| panic!("no {user}_url in credentials.txt:\n{creds}"))
        .to_string()
}

/// A URL to the TLS cluster's `db` as `user`, with `params` as its query.
fn tls_url(user: &str, password: &str, host: &str, db: &str, params: &str) -> String {
    let c = TestDb::tls_cluster();
    let auth = if password.is_empty() {
        user.to_string()
    } else {
        format!("{user}:{password}")
    };
    format!("postgresql://{auth}@{host}:{}/{db}?{params}", c.port())
}

fn ca() -> String {
    TestDb::tls_files().ca.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_check_migrate_partitions_and_tenant_commands_over_verify_full() {
    let _alone = ROLES.write().await;
    let db = TestDb::new_tls().await;
    let name = format!("{}_app", db.name());
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let su = db.server_url("postgres");
    assert!(su.contains("sslmode=verify-full") && su.contains("sslrootcert="));

    let text = ok(
        &[
            "setup",
            "--superuser-url",
            &su,
            "--database",
            &name,
            "--out-dir",
            dir,
        ],
        &[],
    );
    assert!(!text.contains("[!]"), "{text}");
    assert!(
        text.contains("[x] SSL/TLS connections — encrypted, TLSv1.3"),
        "{text}"
    );
    // The URLs setup writes connect the way it did: verify-full against the same CA.
    let creds = std::fs::read_to_string(out.path().join("credentials.txt")).unwrap();
    let api = url_of(&creds, "dbx_api_service");
    let maint = url_of(&creds, "dbx_maintenance_service");
    for user in [
        "dbx_api_service",
        "dbx_ingest_service",
        "dbx_maintenance_service",
    ] {
        let url = url_of(&creds, user);
        assert!(url.contains("sslmode=verify-full&sslrootcert="), "{url}");
    }

    // check: encrypted, TLS version, cipher, and the verification, per login user.
    let creds_path = out.path().join("credentials.txt");
    let text = ok(
        &[
            "check",
            "--database-url",
            &api,
            "--credentials",
            creds_path.to_str().unwrap(),
        ],
        &[],
    );
    assert!(text.contains("Found 7 tables"), "{text}");
    let port = TestDb::tls_cluster().port();
    for (user, _) in dbx_control::setup::LOGIN_USERS {
        let line = text
            .lines()
            .find(|l| {
                l.contains(&format!(
                    "🔒 {user}@127.0.0.1:{port}: encrypted, TLSv1.3 TLS_"
                ))
            })
            .unwrap_or_else(|| panic!("no TLS line for {user}:\n{text}"));
        assert!(
            line.contains(&format!(
                "server certificate verified: chain to sslrootcert={} and host name (sslmode=verify-full)",
                ca()
            )),
            "{line}"
        );
    }

    // The same settings as config keys, with a URL free of file paths.
    let base = api.split('?').next().unwrap();
    let ca = ca();
    let keys = [
        ("DBX_DATABASE__SSLMODE", "verify-full"),
        ("DBX_DATABASE__SSLROOTCERT", ca.as_str()),
        ("DBX_DATABASE__REQUIRE_TLS", "true"),
    ];
    let text = ok(&["check", "--database-url", base], &keys);
    assert!(
        text.contains("encrypted, TLSv1.3") && text.contains("host name"),
        "{text}"
    );
    // A URL and a key that disagree: refused, naming both.
    let text = fails(
        &["check", "--database-url", &api],
        &[("DBX_DATABASE__SSLMODE", "require")],
    );
    assert!(
        text.contains("sslmode=verify-full in the connection string")
            && text.contains("database.sslmode = \"require\""),
        "{text}"
    );

    // migrate (as the superuser), partitions, org and key (as the maintenance user).
    let owner = db.server_url(&name);
    let text = ok(&["migrate", "--database-url", &owner, "status"], &[]);
    assert!(
        text.contains("0001_") && !text.contains("pending"),
        "{text}"
    );
    let text = ok(&["partitions", "list", "--database-url", &maint], &[]);
    assert!(text.contains("live partition(s)"), "{text}");
    let text = ok(
        &[
            "partitions",
            "create",
            "--premake",
            "6",
            "--database-url",
            &maint,
        ],
        &[],
    );
    assert!(
        text.contains("premake: ") && text.contains("0 failed"),
        "{text}"
    );
    let text = ok(
        &[
            "org",
            "create",
            "--code",
            "TLSCO",
            "--name",
            "TLS Co",
            "--type",
            "airline",
            "--database-url",
            &maint,
        ],
        &[],
    );
    assert!(text.contains("dbx_"), "{text}");
    ok(
        &[
            "key",
            "create",
            "--org",
            "TLSCO",
            "--label",
            "second",
            "--database-url",
            &maint,
        ],
        &[],
    );
    let text = ok(
        &["key", "list", "--org", "TLSCO", "--database-url", &maint],
        &[],
    );
    assert!(text.contains("second"), "{text}");
    let text = ok(&["org", "list", "--database-url", &maint], &[]);
    assert!(text.contains("TLSCO"), "{text}");

    // As deploy/docker-compose.yml runs it: the seed's DB_* variables and the TLS keys.
    let cluster = TestDb::tls_cluster();
    let port = cluster.port().to_string();
    let compose_like = [
        ("DB_HOST", "localhost"),
        ("DB_PORT", port.as_str()),
        ("DB_USER", cluster.superuser()),
        ("DB_PASSWORD", cluster.password()),
        ("DBX_DATABASE__SSLMODE", "verify-full"),
        ("DBX_DATABASE__SSLROOTCERT", ca.as_str()),
        ("DBX_DATABASE__REQUIRE_TLS", "true"),
    ];
    let text = ok(
        &["setup", "--database", &name, "--out-dir", dir],
        &compose_like,
    );
    assert!(text.contains("migrations: up to date"), "{text}");
    assert!(
        text.contains("[x] SSL/TLS connections — encrypted, TLSv1.3"),
        "{text}"
    );
    // Without the keys the same server is still reached over TLS (sslmode=prefer), but the
    // checklist does not tick what it cannot vouch for.
    let text = ok(
        &["setup", "--database", &name, "--out-dir", dir],
        &compose_like[..4],
    );
    assert!(
        text.contains("[-] SSL/TLS connections — encrypted")
            && text.contains("NOT verified (sslmode=prefer"),
        "{text}"
    );

    // setup changed the cluster-wide ingest password; the other tests use the kit's.
    db.client()
        .await
        .batch_execute(&format!(
            "ALTER ROLE dbx_ingest_service WITH PASSWORD '{INGEST_TEST_PASSWORD}'"
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_require_tls_stores_every_point_and_every_connection_is_encrypted() {
    let _shared = ROLES.read().await;
    let env = Env::start_tls(
        dbx_bin(),
        &[
            ("DBX_DATABASE__REQUIRE_TLS", "true"),
            ("DBX_HEALTH__INTERVAL_SECS", "1"),
        ],
    )
    .await;
    assert!(env.ingest_url.contains("sslmode=verify-full"));
    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    let session = Uuid::new_v4();
    let aircraft = AircraftRef::Registration(env.registration.clone());
    let t0 = now_micros() - 900_000_000;
    for seq in 1..=20u64 {
        let first = (seq as i64 - 1) * 250;
        let pts = points(250, first, t0 + first * 100_000);
        g.send_batch(seq, &aircraft, session, &pts, PointForm::Map)
            .await;
    }
    let (acked, nacks) = g.await_verdicts(20).await;
    assert_eq!((acked, nacks.len()), (20, 0), "{nacks:?}");
    assert_eq!(env.rows(session).await, 5000, "every acked point stored");

    // The server's view: every backend of the daemon's user is TLS (writers, auth cache,
    // its LISTEN connection, the handshake recorder).
    let row = env
        .client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'dbx_ingest_service'",
            &[],
        )
        .await
        .unwrap();
    let (all, tls): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        all >= 2 && tls == all,
        "{tls} of {all} ingest connections use TLS"
    );

    // The health gauge, with its HELP text, and the start-up log line.
    let daemon = &env.daemon;
    let on = wait_until(Duration::from_secs(15), || async {
        let (_, body) = daemon.http_get("/metrics").await;
        dbx_testkit::env::metric_value(&body, "dbx_db_tls", "") == 1.0
            && dbx_testkit::env::metric_value(&body, "dbx_db_up", "") == 1.0
    })
    .await;
    let (_, body) = daemon.http_get("/metrics").await;
    assert!(on, "dbx_db_tls never 1:\n{body}");
    assert!(body.contains("# HELP dbx_db_tls "), "{body}");
    let (_, status) = daemon.http_get("/api/v2/system/status").await;
    assert!(status.contains("\"tls\":true"), "{status}");
    assert!(
        daemon
            .log()
            .contains("PostgreSQL connection: encrypted, TLSv1.3"),
        "{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_authentication_with_cert_in_pg_hba() {
    let _shared = ROLES.read().await;
    let (db, _) = TestDb::migrated_tls().await;
    db.client()
        .await
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE {CERT_USER} LOGIN; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ))
        .await
        .unwrap();
    let files = TestDb::tls_files();
    let (cert, key) = (
        files.client_cert.display().to_string(),
        files.client_key.display().to_string(),
    );
    let url = tls_url(
        CERT_USER,
        "",
        "127.0.0.1",
        db.name(),
        &format!(
            "sslmode=verify-full&sslrootcert={}&sslcert={cert}&sslkey={key}",
            ca()
        ),
    );
    let text = ok(&["check", "--database-url", &url], &[]);
    assert!(
        text.contains(&format!("🔒 {CERT_USER}@127.0.0.1"))
            && text.contains(&format!("client certificate /CN={CERT_USER}")),
        "{text}"
    );
    // The same with the config keys.
    let bare = tls_url(
        CERT_USER,
        "",
        "127.0.0.1",
        db.name(),
        &format!("sslmode=verify-full&sslrootcert={}", ca()),
    );
    let keys = [
        ("DBX_DATABASE__SSLCERT", cert.as_str()),
        ("DBX_DATABASE__SSLKEY", key.as_str()),
    ];
    let text = ok(&["check", "--database-url", &bare], &keys);
    assert!(text.contains(&format!("CN={CERT_USER}")), "{text}");
    // Without a certificate the server refuses, and the message says what to set.
    let text = fails(&["check", "--database-url", &bare], &[]);
    assert!(
        text.contains("connection requires a valid client certificate")
            && text.contains("set sslcert and sslkey"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigurations_fail_naming_what_to_change() {
    let _shared = ROLES.read().await;
    let (db, _) = TestDb::migrated_tls().await;
    let pw = TestDb::tls_cluster().password().to_string();
    let name = db.name();

    // A CA that did not sign the server's certificate: named as sslrootcert.
    let other = tempfile::tempdir().unwrap();
    let wrong_ca = other.path().join("other-ca.crt");
    let pki = dbx_localpg::pki::Pki::new("some other CA").unwrap();
    std::fs::write(&wrong_ca, pki.ca_pem()).unwrap();
    let url = tls_url(
        "postgres",
        &pw,
        "127.0.0.1",
        name,
        &format!("sslmode=verify-ca&sslrootcert={}", wrong_ca.display()),
    );
    let text = fails(&["check", "--database-url", &url], &[]);
    assert!(
        text.contains("UnknownIssuer")
            && text.contains(&format!(
                "not issued by a CA in sslrootcert={}",
                wrong_ca.display()
            )),
        "{text}"
    );
    assert!(!text.contains(&pw), "{text}");

    // verify-full to a name the certificate does not carry (the address is right).
    let misnamed = |mode: &str| {
        tls_url(
            "postgres",
            &pw,
            "wrong-name.test",
            name,
            &format!("hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={}", ca()),
        )
    };
    let text = fails(&["check", "--database-url", &misnamed("verify-full")], &[]);
    assert!(
        text.contains("wrong-name.test") && text.contains("does not name the host"),
        "{text}"
    );
    // verify-ca checks the chain only: the same connection is accepted.
    let text = ok(&["check", "--database-url", &misnamed("verify-ca")], &[]);
    assert!(
        text.contains("host name not checked (sslmode=verify-ca)"),
        "{text}"
    );

    // Plaintext to a hostssl-only server: PostgreSQL's own reason, and what to set.
    let plain = TestDb::tls_cluster().plaintext_url_for("postgres", &pw, name);
    let text = fails(&["check", "--database-url", &plain], &[]);
    assert!(
        text.contains("pg_hba.conf rejects connection")
            && text.contains("no encryption")
            && text.contains("sslmode=verify-full"),
        "{text}"
    );

    // sslnegotiation=direct (PostgreSQL 17) is refused before connecting.
    let direct = tls_url("postgres", &pw, "127.0.0.1", name, "sslnegotiation=direct");
    let text = fails(&["check", "--database-url", &direct], &[]);
    assert!(
        text.contains("sslnegotiation=direct is not supported"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_tls_refuses_to_start_on_a_plaintext_connection() {
    let _shared = ROLES.read().await;
    // The kit's default cluster has ssl = off: sslmode=prefer would fall back to plaintext.
    let (_db, ingest) = TestDb::migrated().await;
    let host_port = ingest
        .split('@')
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_string();
    let text = serve_refuses(&[
        ("DATABASE_URL", &ingest),
        ("DBX_DATABASE__REQUIRE_TLS", "true"),
    ]);
    assert!(
        text.contains(&host_port)
            && text.contains("database.require_tls")
            && text.contains("does not accept TLS"),
        "{text}"
    );
    assert!(!text.contains(INGEST_TEST_PASSWORD), "{text}");
    // sslmode=disable is refused before any connection, naming host and setting too.
    let disabled = format!("{ingest}?sslmode=disable");
    let text = serve_refuses(&[
        ("DATABASE_URL", &disabled),
        ("DBX_DATABASE__REQUIRE_TLS", "true"),
    ]);
    assert!(
        text.contains(&host_port)
            && text.contains("sslmode=disable, and database.require_tls = true"),
        "{text}"
    );
    // Without require_tls the same server is used in plaintext, and check says so.
    let text = ok(&["check", "--database-url", &ingest], &[]);
    assert!(
        text.contains("NOT encrypted: plaintext connection (sslmode=prefer)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_switches_to_tls_by_environment() {
    let dir = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .tempdir()
        .unwrap();
    let text = ok(
        &[
            "demo",
            "--exit",
            "--duration",
            "2",
            "--gateways",
            "1",
            "--aircraft-per-gateway",
            "2",
            "--dir",
            dir.path().join("demo").to_str().unwrap(),
        ],
        &[("DBX_DEMO_TLS", "1")],
    );
    assert!(
        text.contains("PostgreSQL connection encrypted, TLSv1.3")
            && text.contains("verified: chain to sslrootcert="),
        "{text}"
    );
    assert!(text.contains("dbx stopped cleanly"), "{text}");
    let creds =
        std::fs::read_to_string(dir.path().join("demo/credentials/credentials.txt")).unwrap();
    assert!(
        url_of(&creds, "dbx_ingest_service").contains("sslmode=verify-full"),
        "{creds}"
    );
}
