//! Tenant administration end to end (issue 9): the real `dbx` binary's `org`, `key`,
//! `aircraft` and `analyses` commands against a real PostgreSQL (dbx-testkit), and a real
//! `dbx serve` picking the changes up within seconds: new keys work, revoked keys and
//! deactivated organizations are refused and their open connections closed, both keys of a
//! rotation work, api_requests records the key label, every command is audited.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use dbx_core::RejectCode;
use dbx_proto::{AircraftRef, PointForm, ServerMessage};
use dbx_testkit::gateway::{now_micros, points};
use dbx_testkit::{wait_until, Fixture, TestDb, TestGateway};
use serde_json::Value;
use tokio_postgres::Client;
use uuid::Uuid;

/// The binary under test.
fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

/// Runs `dbx <args>` against `url` (as DATABASE_URL), without an encryption key.
async fn dbx(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(dbx_bin())
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("DBX_ENCRYPTION_KEY")
        .env_remove("DBX_CONFIG")
        .output()
        .await
        .expect("running dbx")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must succeed and returns its stdout.
async fn ok(url: &str, args: &[&str]) -> String {
    let o = dbx(url, args).await;
    assert!(
        o.status.success(),
        "dbx {args:?} failed ({:?}):\n{}\n{}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Runs a `--json` command that must succeed and parses its output.
async fn ok_json(url: &str, args: &[&str]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.push("--json");
    let out = ok(url, &all).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("dbx {args:?}: not JSON ({e}):\n{out}"))
}

/// Runs a command that must fail and returns (exit code, stderr).
async fn fails(url: &str, args: &[&str]) -> (i32, String) {
    let o = dbx(url, args).await;
    assert!(
        !o.status.success(),
        "dbx {args:?} should have failed:\n{}",
        stdout(&o)
    );
    (o.status.code().unwrap_or(-1), stderr(&o))
}

fn error_code(m: &Option<ServerMessage>) -> Option<RejectCode> {
    match m {
        Some(ServerMessage::Error { code, .. }) => Some(*code),
        _ => None,
    }
}

/// Connects and sends hello with `key`; the first answer.
async fn hello_answer(addr: std::net::SocketAddr, key: &str) -> Option<ServerMessage> {
    let mut g = TestGateway::connect(addr).await;
    g.send_hello(key).await;
    g.recv_within(Duration::from_secs(5)).await
}

/// Waits (up to `within`) until hello with `key` is refused with `error unauthorized`.
async fn refused_within(addr: std::net::SocketAddr, key: &str, within: Duration) -> bool {
    wait_until(within, || async {
        error_code(&hello_answer(addr, key).await) == Some(RejectCode::Unauthorized)
    })
    .await
}

/// Sends one batch of `n` points for `registration` and waits for its verdict.
async fn send_and_ack(g: &mut TestGateway, seq: u64, registration: &str, session: Uuid) -> u64 {
    let pts = points(10, (seq as i64) * 10, now_micros() - 30_000_000);
    g.send_batch(
        seq,
        &AircraftRef::Registration(registration.to_string()),
        session,
        &pts,
        PointForm::Map,
    )
    .await;
    let (acked, nacks) = g.await_verdicts(seq).await;
    assert!(nacks.is_empty(), "nacked: {nacks:?}");
    acked
}

async fn count(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// Polls `sql` (a count) until it reaches `n`, for up to `within`.
async fn wait_count(c: &Client, sql: &str, n: i64, within: Duration) -> i64 {
    dbx_testkit::wait_count(c, sql, &[], n, within).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn org_created_while_the_daemon_runs_ingests_and_deactivation_closes_its_connections() {
    let env = dbx_testkit::Env::start(dbx_bin(), &[]).await;
    let url = env.db.url();

    let created = ok_json(
        &url,
        &[
            "org",
            "create",
            "--code",
            "NEWCO",
            "--name",
            "New Co",
            "--type",
            "airline",
            "--points-per-sec",
            "100000",
            "--retention-days",
            "90",
        ],
    )
    .await;
    let key = created["api_key"].as_str().expect("api_key").to_string();
    let org_id: Uuid = created["org"]["org_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(created["org"]["code"], "NEWCO");
    assert_eq!(created["org"]["points_per_sec"], 100000);
    assert_eq!(created["org"]["retention_days"], 90);
    assert_eq!(created["key_label"], "primary");
    // Only the hash is stored.
    let stored: String = env
        .client
        .query_one(
            "SELECT api_key_hash FROM dbx_aviation.organizations WHERE org_code = 'NEWCO'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, dbx_core::apikey::key_hash_hex(&key));

    // The new key works within seconds, for the new organization.
    let (mut g, welcome) =
        TestGateway::hello_within(env.daemon.tcp, &key, Duration::from_secs(5)).await;
    match welcome {
        ServerMessage::Welcome { org, .. } => assert_eq!(org, org_id),
        other => panic!("{other:?}"),
    }

    // An aircraft registered now takes telemetry.
    let added = ok_json(
        &url,
        &[
            "aircraft",
            "add",
            "--org",
            "NEWCO",
            "--registration",
            "N1NEW",
            "--type",
            "quadcopter",
            "--manufacturer",
            "DBX Aerospace",
            "--model",
            "Q-4",
        ],
    )
    .await;
    assert_eq!(added["registration"], "N1NEW");
    assert_eq!(added["active"], true);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let session = Uuid::new_v4();
    assert_eq!(send_and_ack(&mut g, 1, "N1NEW", session).await, 1);
    assert_eq!(env.rows(session).await, 10);

    // org list / show report it, with the session's points.
    let list = ok_json(&url, &["org", "list"]).await;
    let orgs = list.as_array().expect("an array");
    assert_eq!(orgs.len(), 2, "{list}");
    let newco = orgs
        .iter()
        .find(|o| o["code"] == "NEWCO")
        .expect("NEWCO listed");
    assert_eq!(newco["aircraft"], 1);
    assert_eq!(newco["sessions"], 1);
    assert_eq!(newco["points_24h"], 10);
    assert_eq!(newco["active"], true);
    let table = ok(&url, &["org", "list"]).await;
    let header = table.lines().next().unwrap_or_default();
    for col in [
        "CODE",
        "NAME",
        "TYPE",
        "ACTIVE",
        "AIRCRAFT",
        "SESSIONS",
        "POINTS 24H",
        "RATE LIMIT",
        "RETENTION",
    ] {
        assert!(header.contains(col), "{col} missing from {header:?}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("NEWCO") && l.contains("100000 pts/s") && l.contains("90 d")),
        "{table}"
    );
    let shown = ok_json(&url, &["org", "show", "NEWCO"]).await;
    assert_eq!(shown["code"], "NEWCO");
    assert_eq!(shown["keys"][0]["label"], "primary");
    assert_eq!(shown["keys"][0]["status"], "active");
    assert!(shown["keys"][0].get("key_hash").is_none());
    assert!(!shown.to_string().contains(&key));

    // Update: no limit any more.
    let updated = ok_json(
        &url,
        &[
            "org",
            "update",
            "NEWCO",
            "--unlimited",
            "--name",
            "NewCo Air",
        ],
    )
    .await;
    assert_eq!(updated["points_per_sec"], Value::Null);
    assert_eq!(updated["name"], "NewCo Air");

    // Deactivate: the open connection is closed with `error unauthorized`, a new one refused.
    let other = &env.org.key;
    let (mut bystander, _) = TestGateway::hello(env.daemon.tcp, other).await;
    let deact = ok_json(&url, &["org", "deactivate", "NEWCO"]).await;
    assert_eq!(deact["active"], false);
    let m = g.recv_within(Duration::from_secs(5)).await;
    assert_eq!(error_code(&m), Some(RejectCode::Unauthorized), "{m:?}");
    assert!(g.closed_within(Duration::from_secs(5)).await);
    assert_eq!(
        error_code(&hello_answer(env.daemon.tcp, &key).await),
        Some(RejectCode::Unauthorized)
    );
    // Another organization's connection is untouched.
    bystander.send_ping().await;
    assert_eq!(
        bystander.recv_within(Duration::from_secs(5)).await,
        Some(ServerMessage::Pong)
    );

    // Activate again: accepted again.
    let act = ok_json(&url, &["org", "activate", "NEWCO"]).await;
    assert_eq!(act["active"], true);
    let (mut g, _) = TestGateway::hello_within(env.daemon.tcp, &key, Duration::from_secs(5)).await;
    assert_eq!(send_and_ack(&mut g, 2, "N1NEW", session).await, 2);

    // Retire: its telemetry is refused once the daemon's cache has one aircraft less.
    let known = env.metric("dbx_auth_aircraft", "").await;
    let retired = ok_json(
        &url,
        &[
            "aircraft",
            "retire",
            "--org",
            "NEWCO",
            "--registration",
            "N1NEW",
        ],
    )
    .await;
    assert_eq!(retired["active"], false);
    assert_eq!(retired["operational_status"], "retired");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            env.metric("dbx_auth_aircraft", "").await < known
        })
        .await,
        "no reload after the retirement"
    );
    let pts = points(5, 1000, now_micros() - 10_000_000);
    g.send_batch(
        3,
        &AircraftRef::Registration("N1NEW".into()),
        Uuid::new_v4(),
        &pts,
        PointForm::Map,
    )
    .await;
    match g.recv_within(Duration::from_secs(5)).await {
        Some(ServerMessage::Nack { seq: 3, code, .. }) => {
            assert_eq!(code, RejectCode::UnknownAircraft)
        }
        other => panic!("expected nack unknown_aircraft, got {other:?}"),
    }
    let fleet = ok_json(&url, &["aircraft", "list", "--org", "NEWCO"]).await;
    assert_eq!(fleet.as_array().map(Vec::len), Some(1));
    assert_eq!(fleet[0]["registration"], "N1NEW");
    assert_eq!(fleet[0]["active"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_both_keys_working_and_revocation_closes_the_old_ones_connection() {
    let env = dbx_testkit::Env::start(dbx_bin(), &[]).await;
    let url = env.db.url();
    let reg = env.registration.clone();

    // The gateway on the organization's first key is connected and ingesting.
    let (mut old, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    let s_old = Uuid::new_v4();
    assert_eq!(send_and_ack(&mut old, 1, &reg, s_old).await, 1);

    // Rotation: a second key, working within seconds while the first still does.
    let created = ok_json(
        &url,
        &[
            "key",
            "create",
            "--org",
            &env.org.code,
            "--label",
            "rot-2",
            "--expires",
            "30d",
        ],
    )
    .await;
    let new_key = created["api_key"].as_str().unwrap().to_string();
    assert_eq!(created["key"]["label"], "rot-2");
    assert_eq!(created["key"]["status"], "active");
    assert!(created["key"]["expires_at"].is_string());
    let (mut new, _) =
        TestGateway::hello_within(env.daemon.tcp, &new_key, Duration::from_secs(5)).await;
    let s_new = Uuid::new_v4();
    assert_eq!(send_and_ack(&mut new, 1, &reg, s_new).await, 1);
    assert_eq!(send_and_ack(&mut old, 2, &reg, s_old).await, 2);
    let (_third, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;

    // Revoke the old key: its connections close, the new key's stays.
    let revoked = ok_json(
        &url,
        &[
            "key",
            "revoke",
            "--org",
            &env.org.code,
            "--label",
            "primary",
        ],
    )
    .await;
    assert_eq!(revoked["key"]["status"], "revoked");
    assert_eq!(revoked["active_keys_left"], 1);
    let m = old.recv_within(Duration::from_secs(5)).await;
    assert_eq!(error_code(&m), Some(RejectCode::Unauthorized), "{m:?}");
    assert!(old.closed_within(Duration::from_secs(5)).await);
    assert!(refused_within(env.daemon.tcp, &env.org.key, Duration::from_secs(5)).await);
    new.send_ping().await;
    assert_eq!(
        new.recv_within(Duration::from_secs(5)).await,
        Some(ServerMessage::Pong)
    );
    assert_eq!(send_and_ack(&mut new, 2, &reg, s_new).await, 2);
    assert_eq!(env.rows(s_new).await, 20);

    // api_requests names the key of each handshake (and none for the refused one).
    let c = &env.client;
    let labelled = |label: &str| {
        format!(
            "SELECT count(*) FROM dbx_aviation.api_requests WHERE org_id = '{}' AND status_code = 200 \
             AND key_label = '{label}' AND user_agent = 'dbx-testkit'",
            env.org.id
        )
    };
    assert!(wait_count(c, &labelled("rot-2"), 1, Duration::from_secs(5)).await >= 1);
    assert!(wait_count(c, &labelled("primary"), 2, Duration::from_secs(5)).await >= 2);
    assert!(
        wait_count(
            c,
            "SELECT count(*) FROM dbx_aviation.api_requests WHERE status_code = 401 AND key_label IS NULL AND org_id IS NULL",
            1,
            Duration::from_secs(5)
        )
        .await
            >= 1
    );

    // key list: labels, states and last use — never keys or hashes.
    let last_used =
        "SELECT count(*) FROM dbx_aviation.api_keys WHERE label = 'rot-2' AND last_used_at IS NOT NULL";
    assert_eq!(wait_count(c, last_used, 1, Duration::from_secs(6)).await, 1);
    let keys = ok_json(&url, &["key", "list", "--org", &env.org.code]).await;
    let keys = keys.as_array().unwrap();
    let summary: Vec<(String, String, bool)> = keys
        .iter()
        .map(|k| {
            (
                k["label"].as_str().unwrap().to_string(),
                k["status"].as_str().unwrap().to_string(),
                k["last_used_at"].is_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("primary".to_string(), "revoked".to_string(), summary[0].2),
            ("rot-2".to_string(), "active".to_string(), true),
        ]
    );
    let text = ok(&url, &["key", "list", "--org", &env.org.code]).await;
    assert!(text.starts_with("LABEL"), "{text}");
    for secret in [&env.org.key, &new_key] {
        assert!(!text.contains(secret.as_str()));
        assert!(!text.contains(&dbx_core::apikey::key_hash_hex(secret)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_key_is_refused_and_its_connection_closed_at_expiry() {
    let env = dbx_testkit::Env::start(dbx_bin(), &[]).await;
    let url = env.db.url();
    let created = ok_json(
        &url,
        &["key", "create", "--org", &env.org.code, "--expires", "90m"],
    )
    .await;
    assert_eq!(created["key"]["label"], "key-1");
    let key = created["api_key"].as_str().unwrap().to_string();
    let (mut g, _) = TestGateway::hello_within(env.daemon.tcp, &key, Duration::from_secs(5)).await;
    // Bring the expiry close (the CLI's shortest practical lifetime is minutes).
    env.client
        .execute(
            "UPDATE dbx_aviation.api_keys SET expires_at = now() + interval '2 seconds' WHERE label = 'key-1'",
            &[],
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let m = g.recv_within(Duration::from_secs(8)).await;
    assert_eq!(error_code(&m), Some(RejectCode::Unauthorized), "{m:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "closed before expiry: {took:?}"
    );
    assert_eq!(
        error_code(&hello_answer(env.daemon.tcp, &key).await),
        Some(RejectCode::Unauthorized)
    );
    let keys = ok_json(&url, &["key", "list", "--org", &env.org.code]).await;
    let status: Vec<&str> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["status"].as_str().unwrap())
        .collect();
    assert_eq!(status, ["active", "expired"]);
}

#[tokio::test]
async fn cli_errors_are_clear_and_name_the_flag() {
    let (db, _) = TestDb::migrated().await;
    let c = db.client().await;
    let org = Fixture::org(&c, "ACME", None).await;
    let url = db.url();

    let (code, err) = fails(&url, &["key", "list", "--org", "NOPE"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("unknown organization \"NOPE\""), "{err}");
    let (_, err) = fails(
        &url,
        &[
            "aircraft",
            "add",
            "--org",
            "NOPE",
            "--registration",
            "N1",
            "--type",
            "x",
        ],
    )
    .await;
    assert!(err.contains("unknown organization \"NOPE\""), "{err}");
    let (_, err) = fails(&url, &["org", "show", "NOPE"]).await;
    assert!(err.contains("unknown organization"), "{err}");

    let (_, err) = fails(
        &url,
        &[
            "org", "create", "--code", "ACME", "--name", "Again", "--type", "airline",
        ],
    )
    .await;
    assert!(
        err.contains("already exists") && err.contains("--code"),
        "{err}"
    );
    let (_, err) = fails(
        &url,
        &[
            "org", "create", "--code", "bad code", "--name", "x", "--type", "airline",
        ],
    )
    .await;
    assert!(err.contains("invalid --code"), "{err}");
    let (_, err) = fails(
        &url,
        &[
            "org",
            "create",
            "--code",
            "X1",
            "--name",
            "x",
            "--type",
            "airline",
            "--points-per-sec",
            "0",
        ],
    )
    .await;
    assert!(err.contains("invalid --points-per-sec"), "{err}");
    let (_, err) = fails(
        &url,
        &[
            "org",
            "create",
            "--code",
            "X2",
            "--name",
            "x",
            "--type",
            "airline",
            "--retention-days",
            "0",
        ],
    )
    .await;
    assert!(err.contains("invalid --retention-days"), "{err}");
    // Not a number at all: clap names the flag (usage error, exit code 2).
    let (code, err) = fails(
        &url,
        &[
            "org",
            "create",
            "--code",
            "X3",
            "--name",
            "x",
            "--type",
            "t",
            "--retention-days",
            "ten",
        ],
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("--retention-days"), "{err}");
    let (_, err) = fails(
        &url,
        &[
            "org",
            "update",
            "ACME",
            "--points-per-sec",
            "5",
            "--unlimited",
        ],
    )
    .await;
    assert!(
        err.contains("--unlimited") || err.contains("--points-per-sec"),
        "{err}"
    );
    let (_, err) = fails(&url, &["org", "update", "ACME"]).await;
    assert!(err.contains("nothing to change"), "{err}");

    for bad in ["N 123", "-N123", "N123_AB", "ABCDEFGHIJKLMNOPQRSTU"] {
        let flag = format!("--registration={bad}");
        let (_, err) = fails(
            &url,
            &[
                "aircraft",
                "add",
                "--org",
                "ACME",
                &flag,
                "--type",
                "quadcopter",
            ],
        )
        .await;
        assert!(err.contains("invalid --registration"), "{bad}: {err}");
        assert!(err.contains("letters, digits or dashes"), "{err}");
    }
    ok(
        &url,
        &[
            "aircraft",
            "add",
            "--org",
            "ACME",
            "--registration",
            "N123AB",
            "--type",
            "quadcopter",
        ],
    )
    .await;
    let (_, err) = fails(
        &url,
        &[
            "aircraft",
            "add",
            "--org",
            "ACME",
            "--registration",
            "N123AB",
            "--type",
            "quadcopter",
        ],
    )
    .await;
    assert!(
        err.contains("already has an aircraft registered as \"N123AB\""),
        "{err}"
    );
    let (_, err) = fails(
        &url,
        &[
            "aircraft",
            "retire",
            "--org",
            "ACME",
            "--registration",
            "N999",
        ],
    )
    .await;
    assert!(err.contains("no aircraft registered as \"N999\""), "{err}");

    for bad in ["30", "30x", "0d", "-5d", "1.5h", "forever"] {
        let flag = format!("--expires={bad}");
        let (_, err) = fails(&url, &["key", "create", "--org", "ACME", &flag]).await;
        assert!(err.contains("invalid --expires"), "{bad}: {err}");
        assert!(err.contains("30d, 12h, 90m"), "{err}");
    }
    let (_, err) = fails(
        &url,
        &["key", "create", "--org", "ACME", "--label", "primary"],
    )
    .await;
    assert!(
        err.contains("already has a key labelled \"primary\""),
        "{err}"
    );
    let (_, err) = fails(
        &url,
        &["key", "create", "--org", "ACME", "--label", "no spaces"],
    )
    .await;
    assert!(err.contains("invalid --label"), "{err}");
    let (_, err) = fails(&url, &["key", "revoke", "--org", "ACME", "--label", "nope"]).await;
    assert!(err.contains("no key labelled \"nope\""), "{err}");
    ok(
        &url,
        &["key", "revoke", "--org", "ACME", "--label", "primary"],
    )
    .await;
    let (_, err) = fails(
        &url,
        &["key", "revoke", "--org", "ACME", "--label", "primary"],
    )
    .await;
    assert!(err.contains("already revoked"), "{err}");

    // No database given at all.
    let o = tokio::process::Command::new(dbx_bin())
        .args(["org", "list"])
        .env_remove("DATABASE_URL")
        .output()
        .await
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--database-url"), "{}", stderr(&o));
    // An application user is refused with an explanation.
    let (_, err) = fails(
        &login_url(&db, &c, "dbx_api_service").await,
        &["org", "list"],
    )
    .await;
    assert!(err.contains("row-level security"), "{err}");
    // Nothing was created by the failures.
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_aviation.organizations").await,
        1
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_aviation.aircraft_registry").await,
        1
    );
    assert_eq!(
        count(
            &c,
            &format!(
                "SELECT count(*) FROM dbx_aviation.api_keys WHERE org_id = '{}'",
                org.id
            )
        )
        .await,
        1
    );
}

/// The URL of login user `user` (dbx_api_service or dbx_maintenance_service). Their passwords
/// are set once per process: roles are cluster-wide and concurrent ALTER ROLEs of one role
/// fail with "tuple concurrently updated".
async fn login_url(db: &TestDb, c: &Client, user: &str) -> String {
    static PASSWORDS: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    PASSWORDS
        .get_or_init(|| async {
            c.batch_execute(
                "ALTER ROLE dbx_api_service WITH LOGIN PASSWORD 'tenants-test-pw';
                 ALTER ROLE dbx_maintenance_service WITH LOGIN PASSWORD 'tenants-test-pw'",
            )
            .await
            .unwrap();
        })
        .await;
    db.url_for(user, "tenants-test-pw")
}

/// Only the owner mints API keys (migration 0033): `dbx key create` works with an owner's URL
/// (dbx_maintenance_service, a member of dbx_admin) and the new key is accepted by a daemon;
/// the application user (dbx_api_service, in dbx_app_write) is refused by the CLI and, going
/// around it with plain SQL, by PostgreSQL: permission denied, nothing minted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_mints_api_keys() {
    let env = dbx_testkit::Env::start(dbx_bin(), &[]).await;
    let c = &env.client;
    let owner = login_url(&env.db, c, "dbx_maintenance_service").await;
    let created = ok_json(
        &owner,
        &[
            "key",
            "create",
            "--org",
            &env.org.code,
            "--label",
            "by-owner",
        ],
    )
    .await;
    let key = created["api_key"].as_str().unwrap().to_string();
    assert_eq!(created["key"]["label"], "by-owner");
    TestGateway::hello_within(env.daemon.tcp, &key, Duration::from_secs(5)).await;

    let app = login_url(&env.db, c, "dbx_api_service").await;
    let (_, err) = fails(&app, &["key", "create", "--org", &env.org.code]).await;
    assert!(err.contains("row-level security"), "{err}");
    let api = dbx_testkit::connect(&app).await;
    api.batch_execute("BEGIN").await.unwrap();
    api.execute("SELECT dbx_aviation.set_org_context($1)", &[&env.org.id])
        .await
        .unwrap();
    let e = api
        .execute(
            "INSERT INTO dbx_aviation.api_keys (org_id, label, key_hash) VALUES ($1, 'minted', repeat('a', 64))",
            &[&env.org.id],
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{e}"
    );
    api.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM dbx_aviation.api_keys WHERE label = 'minted' OR key_hash = repeat('a', 64)"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn every_command_writes_an_audit_row_without_key_material() {
    let (db, _) = TestDb::migrated().await;
    let c = db.client().await;
    let url = db.url();
    let mut keys: Vec<String> = Vec::new();

    let commands: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "org",
                "create",
                "--code",
                "AUD",
                "--name",
                "Audit Air",
                "--type",
                "airline",
            ],
            "dbx org create",
        ),
        (vec!["org", "list"], "dbx org list"),
        (vec!["org", "show", "AUD"], "dbx org show"),
        (
            vec!["org", "update", "AUD", "--retention-days", "30"],
            "dbx org update",
        ),
        (vec!["org", "deactivate", "AUD"], "dbx org deactivate"),
        (vec!["org", "activate", "AUD"], "dbx org activate"),
        (
            vec!["key", "create", "--org", "AUD", "--label", "k2"],
            "dbx key create",
        ),
        (vec!["key", "list", "--org", "AUD"], "dbx key list"),
        (
            vec!["key", "revoke", "--org", "AUD", "--label", "k2"],
            "dbx key revoke",
        ),
        (
            vec![
                "aircraft",
                "add",
                "--org",
                "AUD",
                "--registration",
                "N1AUD",
                "--type",
                "vtol",
            ],
            "dbx aircraft add",
        ),
        (
            vec!["aircraft", "list", "--org", "AUD"],
            "dbx aircraft list",
        ),
        (
            vec![
                "aircraft",
                "retire",
                "--org",
                "AUD",
                "--registration",
                "N1AUD",
            ],
            "dbx aircraft retire",
        ),
        (
            vec!["analyses", "search", "--org", "AUD", "battery"],
            "dbx analyses search",
        ),
    ];
    let last_id = "SELECT COALESCE(max(audit_id), 0) FROM dbx_audit.audit_log";
    for (args, tag) in commands {
        let before = count(&c, last_id).await;
        let out = ok_json(&url, &args).await;
        if let Some(k) = out["api_key"].as_str() {
            keys.push(k.to_string());
        }
        let rows = c
            .query(
                "SELECT action_type::text, COALESCE(user_agent, '') FROM dbx_audit.audit_log
                  WHERE audit_id > $1 ORDER BY audit_id",
                &[&before],
            )
            .await
            .unwrap();
        assert!(!rows.is_empty(), "{tag}: no audit row");
        let read = matches!(
            tag,
            "dbx org list"
                | "dbx org show"
                | "dbx key list"
                | "dbx aircraft list"
                | "dbx analyses search"
        );
        for r in &rows {
            let (action, agent): (String, String) = (r.get(0), r.get(1));
            assert_eq!(agent, tag);
            if read {
                assert_eq!(action, "READ", "{tag}");
            } else {
                assert!(
                    ["INSERT", "UPDATE"].contains(&action.as_str()),
                    "{tag}: {action}"
                );
            }
        }
    }
    assert_eq!(keys.len(), 2);
    // Key tables' rows hold no key material; no row anywhere holds a clear key.
    for k in &keys {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM dbx_audit.audit_log
                  WHERE strpos(COALESCE(old_values::text, '') || COALESCE(new_values::text, ''), $1) > 0",
                &[k],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM dbx_audit.audit_log WHERE table_name = 'dbx_aviation.api_keys'
                   AND strpos(COALESCE(old_values::text, '') || COALESCE(new_values::text, ''), $1) > 0",
                &[&dbx_core::apikey::key_hash_hex(k)],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
    }
    let key_rows: Vec<String> = c
        .query(
            "SELECT action_type || ' ' || (COALESCE(new_values, old_values) ->> 'label') || ' ' || COALESCE(user_agent, '-')
               FROM dbx_audit.audit_log WHERE table_name = 'dbx_aviation.api_keys' AND action_type <> 'READ'
              ORDER BY audit_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        key_rows,
        [
            "INSERT primary dbx org create",
            "INSERT k2 dbx key create",
            "UPDATE k2 dbx key revoke"
        ]
    );
}

#[tokio::test]
async fn analyses_search_ranks_the_better_match_first() {
    let (db, _) = TestDb::migrated().await;
    let c = db.client().await;
    let org = Fixture::org(&c, "SRCH", None).await;
    let other = Fixture::org(&c, "OTHER", None).await;
    let url = db.url();
    let mut ids = Vec::new();
    for (o, text) in [
        (org.id, "Battery overheating detected: the battery pack overheated twice and battery voltage sagged."),
        (org.id, "Nominal flight. Battery fine; light vibration on motor 3."),
        (org.id, "GPS drift during approach."),
        (other.id, "Battery battery battery overheating."),
    ] {
        let id: Uuid = c
            .query_one(
                "INSERT INTO dbx_aviation.ml_analysis_results (org_id, model_version, ai_report_content, risk_level)
                 VALUES ($1, 'v2', $2, 'medium') RETURNING analysis_id",
                &[&o, &text],
            )
            .await
            .unwrap()
            .get(0);
        ids.push(id);
    }
    let hits = ok_json(&url, &["analyses", "search", "--org", "SRCH", "battery"]).await;
    let got: Vec<Uuid> = hits
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["analysis_id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(got, [ids[0], ids[1]]);
    let r0 = hits[0]["rank"].as_f64().unwrap();
    let r1 = hits[1]["rank"].as_f64().unwrap();
    assert!(r0 > r1, "{r0} > {r1}");
    assert!(
        hits[0]["headline"]
            .as_str()
            .unwrap()
            .contains("**Battery**"),
        "{hits}"
    );
    let text = ok(
        &url,
        &["analyses", "search", "--org", "SRCH", "vibration motor"],
    )
    .await;
    assert!(text.starts_with("1. "), "{text}");
    assert!(
        text.contains(&ids[1].to_string()) && !text.contains(&ids[0].to_string()),
        "{text}"
    );
    let none = ok(&url, &["analyses", "search", "--org", "SRCH", "hydraulic"]).await;
    assert!(none.contains("No analysis"), "{none}");
    let (_, err) = fails(&url, &["analyses", "search", "--org", "NOPE", "x"]).await;
    assert!(err.contains("unknown organization"), "{err}");
}
