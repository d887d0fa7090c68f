//! Tenant administration (`dbx_control::tenants`) and migration 0020 against a real PostgreSQL:
//! organizations and their keys, the mirror of `organizations.api_key_hash`, audit rows without
//! key material, NOTIFY on changes that matter (and not on last_used_at stamps), privileges,
//! aircraft, and full-text search over analysis reports.

use std::time::Duration;

use dbx_control::tenants::{self, KeyStatus, NewAircraft, NewOrg, OrgUpdate, TenantError};
use dbx_testkit::TestDb;
use futures::StreamExt;
use tokio_postgres::{AsyncMessage, Client};
use uuid::Uuid;

mod common;
use common::count;

async fn migrated() -> (TestDb, Client) {
    let db = TestDb::new().await;
    let mut client = db.client().await;
    dbx_control::migrate::apply(&mut client)
        .await
        .unwrap_or_else(|e| panic!("migrating: {e}"));
    (db, client)
}

fn new_org(code: &str) -> NewOrg {
    NewOrg {
        code: code.into(),
        name: format!("{code} Airways"),
        org_type: "airline".into(),
        retention_days: None,
        points_per_sec: None,
    }
}

/// Audit rows whose values mention `needle` anywhere.
async fn audit_rows_mentioning(c: &Client, needle: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM dbx_audit.audit_log
          WHERE strpos(COALESCE(old_values::text, '') || COALESCE(new_values::text, ''), $1) > 0",
        &[&needle],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn org_create_stores_only_the_hash_and_mirrors_the_primary_key() {
    let (_db, mut c) = migrated().await;
    tenants::prepare(&c, "org create", None).await.unwrap();
    let mut new = new_org("ACME");
    new.retention_days = Some(90);
    new.points_per_sec = Some(5000);
    let created = tenants::create_org(&mut c, &new).await.unwrap();
    assert!(created.api_key.starts_with("dbx_"));
    assert_eq!(created.key_label, "primary");
    assert_eq!(created.org.code, "ACME");
    assert_eq!(created.org.retention_days, 90);
    assert_eq!(created.org.points_per_sec, Some(5000));
    assert!(created.org.active);
    assert!(
        !created.org.key_encrypted,
        "no app.encryption_key: nothing encrypted"
    );

    let hash = dbx_core::apikey::key_hash_hex(&created.api_key);
    let row = c
        .query_one(
            "SELECT o.api_key_hash::text, o.api_key_encrypted IS NULL, k.label::text, k.key_hash::text
               FROM dbx_aviation.organizations o JOIN dbx_aviation.api_keys k USING (org_id)
              WHERE o.org_code = 'ACME'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), hash);
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, String>(2), "primary");
    assert_eq!(row.get::<_, String>(3), hash);

    // The clear key is nowhere in the database's tables we write, nor in the audit trail.
    assert_eq!(audit_rows_mentioning(&c, &created.api_key).await, 0);
    // The key table's audit row carries neither hash nor encrypted key.
    let key_audit = c
        .query_one(
            "SELECT new_values, user_agent FROM dbx_audit.audit_log
              WHERE table_name = 'dbx_aviation.api_keys' AND action_type = 'INSERT'",
            &[],
        )
        .await
        .unwrap();
    let v: serde_json::Value = key_audit.get(0);
    assert_eq!(v["label"], "primary");
    assert!(
        v.get("key_hash").is_none() && v.get("key_encrypted").is_none(),
        "{v}"
    );
    assert_eq!(
        key_audit.get::<_, Option<String>>(1).as_deref(),
        Some("dbx org create")
    );

    // Duplicate code.
    match tenants::create_org(&mut c, &new_org("ACME")).await {
        Err(TenantError::DuplicateCode(code)) => assert_eq!(code, "ACME"),
        other => panic!("expected DuplicateCode, got {other:?}"),
    }
    // Invalid values name their flag, before touching the database.
    let mut bad = new_org("BAD");
    bad.retention_days = Some(0);
    let e = tenants::create_org(&mut c, &bad).await.unwrap_err();
    assert!(e.to_string().starts_with("invalid --retention-days"), "{e}");
    let e = tenants::create_org(&mut c, &new_org("has space"))
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("invalid --code"), "{e}");
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_aviation.organizations").await,
        1
    );
}

#[tokio::test]
async fn keys_are_encrypted_when_the_session_has_an_encryption_key() {
    let (_db, mut c) = migrated().await;
    tenants::prepare(&c, "org create", Some("s3cret-test-key"))
        .await
        .unwrap();
    assert!(tenants::encryption_available(&c).await.unwrap());
    let created = tenants::create_org(&mut c, &new_org("ENC")).await.unwrap();
    assert!(created.org.key_encrypted);
    let clear: String = c
        .query_one(
            "SELECT dbx_aviation.decrypt_api_key(api_key_encrypted) FROM dbx_aviation.organizations WHERE org_code = 'ENC'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(clear, created.api_key);
    let second = tenants::create_key(&mut c, "ENC", Some("rot-1"), None)
        .await
        .unwrap();
    assert!(second.key.encrypted);
    let clear: String = c
        .query_one(
            "SELECT dbx_aviation.decrypt_api_key(key_encrypted) FROM dbx_aviation.api_keys WHERE label = 'rot-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(clear, second.api_key);
    // The primary's mirror row carries the encrypted copy; the audit rows never do.
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.api_keys WHERE key_encrypted IS NOT NULL"
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_audit.audit_log
              WHERE new_values ? 'key_encrypted' OR new_values ? 'api_key_encrypted' OR new_values ? 'key_hash'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn key_lifecycle_create_list_revoke_with_errors() {
    let (_db, mut c) = migrated().await;
    tenants::prepare(&c, "key", None).await.unwrap();
    let org = tenants::create_org(&mut c, &new_org("KEYS")).await.unwrap();

    let k1 = tenants::create_key(&mut c, "KEYS", None, None)
        .await
        .unwrap();
    assert_eq!(k1.key.label, "key-1");
    let k2 = tenants::create_key(&mut c, "KEYS", None, Some(Duration::from_secs(30 * 86_400)))
        .await
        .unwrap();
    assert_eq!(k2.key.label, "key-2");
    let expires = k2.key.expires_at.expect("an expiry");
    let days = (expires - chrono::Utc::now()).num_hours() as f64 / 24.0;
    assert!((29.9..=30.0).contains(&days), "{days}");
    assert_ne!(k1.api_key, k2.api_key);

    match tenants::create_key(&mut c, "KEYS", Some("key-1"), None).await {
        Err(TenantError::DuplicateLabel { label, .. }) => assert_eq!(label, "key-1"),
        other => panic!("expected DuplicateLabel, got {other:?}"),
    }
    match tenants::create_key(&mut c, "NOPE", None, None).await {
        Err(TenantError::UnknownOrg(code)) => assert_eq!(code, "NOPE"),
        other => panic!("expected UnknownOrg, got {other:?}"),
    }
    let e = tenants::create_key(&mut c, "KEYS", Some("bad label"), None)
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("invalid --label"), "{e}");

    let keys = tenants::list_keys(&c, &org.org).await.unwrap();
    let labels: Vec<&str> = keys.iter().map(|k| k.label.as_str()).collect();
    assert_eq!(labels, ["primary", "key-1", "key-2"]);
    assert!(keys.iter().all(|k| k.status == KeyStatus::Active));

    let revoked = tenants::revoke_key(&mut c, "KEYS", "key-1").await.unwrap();
    assert_eq!(revoked.key.status, KeyStatus::Revoked);
    assert!(revoked.key.revoked_at.is_some());
    assert_eq!(revoked.active_keys_left, 2);
    match tenants::revoke_key(&mut c, "KEYS", "key-1").await {
        Err(TenantError::AlreadyRevoked { label, .. }) => assert_eq!(label, "key-1"),
        other => panic!("expected AlreadyRevoked, got {other:?}"),
    }
    match tenants::revoke_key(&mut c, "KEYS", "nope").await {
        Err(TenantError::UnknownKey { label, .. }) => assert_eq!(label, "nope"),
        other => panic!("expected UnknownKey, got {other:?}"),
    }
    // A revoked key keeps its label: the next default label is key-3.
    let k3 = tenants::create_key(&mut c, "KEYS", None, None)
        .await
        .unwrap();
    assert_eq!(k3.key.label, "key-3");

    // An expired key is reported as such.
    c.execute(
        "UPDATE dbx_aviation.api_keys SET expires_at = now() - interval '1 minute' WHERE label = 'key-2'",
        &[],
    )
    .await
    .unwrap();
    let keys = tenants::list_keys(&c, &org.org).await.unwrap();
    let status: Vec<(&str, KeyStatus)> =
        keys.iter().map(|k| (k.label.as_str(), k.status)).collect();
    assert_eq!(
        status,
        [
            ("primary", KeyStatus::Active),
            ("key-1", KeyStatus::Revoked),
            ("key-2", KeyStatus::Expired),
            ("key-3", KeyStatus::Active),
        ]
    );
    let summary = tenants::org_summary(&c, "KEYS").await.unwrap();
    assert_eq!(summary.active_keys, 2);

    // Audit: one INSERT per key, one UPDATE for the revocation (and one for the SQL expiry).
    let rows = c
        .query(
            "SELECT action_type::text, count(*) FROM dbx_audit.audit_log
              WHERE table_name = 'dbx_aviation.api_keys' GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, [("INSERT".to_string(), 4), ("UPDATE".to_string(), 2)]);
    for k in [&k1.api_key, &k2.api_key, &k3.api_key] {
        assert_eq!(audit_rows_mentioning(&c, k).await, 0);
        assert_eq!(
            audit_rows_mentioning(&c, &dbx_core::apikey::key_hash_hex(k)).await,
            0
        );
    }
}

#[tokio::test]
async fn primary_key_mirror_follows_plain_sql_writes() {
    let (_db, c) = migrated().await;
    let org: Uuid = c
        .query_one(
            "INSERT INTO dbx_aviation.organizations (org_code, org_name, org_type, api_key_hash)
             VALUES ('SQL', 'Sql Org', 'airline', dbx_aviation.generate_api_key_hash('k1')) RETURNING org_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let hash_of = |k: &str| dbx_core::apikey::key_hash_hex(k);
    assert_eq!(primary(&c, org).await, (hash_of("k1"), true));
    // Revoked, then rotated by writing organizations (what `dbx setup --rotate` does): the
    // primary row starts over with the new hash.
    c.execute(
        "UPDATE dbx_aviation.api_keys SET revoked_at = now() WHERE org_id = $1",
        &[&org],
    )
    .await
    .unwrap();
    c.execute(
        "UPDATE dbx_aviation.organizations SET api_key_hash = dbx_aviation.generate_api_key_hash('k2') WHERE org_id = $1",
        &[&org],
    )
    .await
    .unwrap();
    assert_eq!(primary(&c, org).await, (hash_of("k2"), true));
    // Another column's update leaves it alone.
    c.execute(
        "UPDATE dbx_aviation.organizations SET org_name = 'Renamed' WHERE org_id = $1",
        &[&org],
    )
    .await
    .unwrap();
    assert_eq!(primary(&c, org).await, (hash_of("k2"), true));
    // A key hash shared with another organization's key is refused (unique across tables).
    let e = c
        .execute(
            "INSERT INTO dbx_aviation.api_keys (org_id, label, key_hash) VALUES ($1, 'dup', $2)",
            &[&org, &hash_of("k2")],
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.as_db_error().and_then(|d| d.constraint()),
        Some("api_keys_key_hash_key")
    );
    // Deleting the organization takes its keys along.
    c.execute(
        "DELETE FROM dbx_aviation.organizations WHERE org_id = $1",
        &[&org],
    )
    .await
    .unwrap();
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_aviation.api_keys").await,
        0
    );
}

async fn primary(c: &Client, org: Uuid) -> (String, bool) {
    let r = c
        .query_one(
            "SELECT key_hash::text, revoked_at IS NULL FROM dbx_aviation.api_keys
              WHERE org_id = $1 AND label = 'primary'",
            &[&org],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// Notifications on `dbx_auth_changed` received by a LISTENing connection within `wait`.
async fn notifications_during<F: std::future::Future<Output = ()>>(
    db: &TestDb,
    wait: Duration,
    action: F,
) -> usize {
    let (listener, mut connection) = dbx_testkit::connector(&db.url())
        .connect_raw()
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(msg)) = stream.next().await {
            if let AsyncMessage::Notification(n) = msg {
                let _ = tx.send(n.channel().to_string());
            }
        }
    });
    listener
        .batch_execute("LISTEN dbx_auth_changed")
        .await
        .unwrap();
    action.await;
    tokio::time::sleep(wait).await;
    let mut n = 0;
    while rx.try_recv().is_ok() {
        n += 1;
    }
    driver.abort();
    n
}

#[tokio::test]
async fn last_used_stamps_neither_notify_nor_audit_but_revocation_does_both() {
    let (db, mut c) = migrated().await;
    tenants::prepare(&c, "key", None).await.unwrap();
    tenants::create_org(&mut c, &new_org("NTF")).await.unwrap();
    tenants::create_key(&mut c, "NTF", Some("gw"), None)
        .await
        .unwrap();
    let audits = count(&c, "SELECT count(*) FROM dbx_audit.audit_log").await;

    // The daemon's stamp, as the ingest role.
    let stamped = notifications_during(&db, Duration::from_millis(300), async {
        c.batch_execute(
            "SET ROLE dbx_ingest_service;
             UPDATE dbx_aviation.api_keys SET last_used_at = now() WHERE label = 'gw';
             RESET ROLE;",
        )
        .await
        .unwrap();
    })
    .await;
    assert_eq!(
        stamped, 0,
        "a last_used_at stamp must not make daemons reload"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_audit.audit_log").await,
        audits
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_aviation.api_keys WHERE label = 'gw' AND last_used_at IS NOT NULL"
        )
        .await,
        1
    );

    let revoked = notifications_during(&db, Duration::from_millis(300), async {
        tenants::revoke_key(&mut c, "NTF", "gw").await.unwrap();
    })
    .await;
    assert_eq!(revoked, 1);
    assert_eq!(
        count(&c, "SELECT count(*) FROM dbx_audit.audit_log").await,
        audits + 1
    );
}

#[tokio::test]
async fn the_ingest_role_reads_keys_but_only_stamps_last_used() {
    let (_db, mut c) = migrated().await;
    tenants::prepare(&c, "org create", None).await.unwrap();
    tenants::create_org(&mut c, &new_org("PRIV")).await.unwrap();
    c.batch_execute("SET ROLE dbx_ingest_service")
        .await
        .unwrap();
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM dbx_aviation.api_keys k JOIN dbx_aviation.organizations o USING (org_id)
              WHERE o.is_active AND k.revoked_at IS NULL AND k.key_hash IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    for sql in [
        "SELECT key_encrypted FROM dbx_aviation.api_keys",
        "UPDATE dbx_aviation.api_keys SET revoked_at = NULL",
        "INSERT INTO dbx_aviation.api_keys (org_id, label, key_hash) SELECT org_id, 'x', repeat('a', 64) FROM dbx_aviation.organizations",
    ] {
        let e = c.execute(sql, &[]).await.unwrap_err();
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {e}"
        );
    }
    c.batch_execute("RESET ROLE; SET ROLE dbx_analytics_service")
        .await
        .unwrap();
    let e = c
        .execute("SELECT key_hash FROM dbx_aviation.api_keys", &[])
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    // An application user is confined by RLS: the CLI refuses it with a clear message.
    c.batch_execute("RESET ROLE; SET ROLE dbx_api_service")
        .await
        .unwrap();
    match tenants::prepare(&c, "org list", None).await {
        Err(TenantError::NeedsAdmin { user }) => assert_eq!(user, "dbx_api_service"),
        other => panic!("expected NeedsAdmin, got {other:?}"),
    }
}

#[tokio::test]
async fn org_update_activate_and_summary() {
    let (_db, mut c) = migrated().await;
    tenants::prepare(&c, "org", None).await.unwrap();
    let created = tenants::create_org(&mut c, &new_org("UPD")).await.unwrap();
    let org = tenants::update_org(
        &c,
        "UPD",
        &OrgUpdate {
            name: Some("New Name".into()),
            points_per_sec: Some(Some(250)),
            retention_days: Some(30),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (org.name.as_str(), org.points_per_sec, org.retention_days),
        ("New Name", Some(250), 30)
    );
    let org = tenants::update_org(
        &c,
        "UPD",
        &OrgUpdate {
            points_per_sec: Some(None),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(org.points_per_sec, None);
    let e = tenants::update_org(&c, "UPD", &OrgUpdate::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nothing to change"), "{e}");
    assert!(matches!(
        tenants::update_org(
            &c,
            "NOPE",
            &OrgUpdate {
                name: Some("x".into()),
                ..Default::default()
            }
        )
        .await,
        Err(TenantError::UnknownOrg(_))
    ));
    assert!(
        !tenants::set_org_active(&c, "UPD", false)
            .await
            .unwrap()
            .active
    );
    assert!(
        tenants::set_org_active(&c, "UPD", true)
            .await
            .unwrap()
            .active
    );

    // Activity from the sessions' counters: one recent session of 120 points, one old of 50.
    let ac = tenants::add_aircraft(
        &c,
        "UPD",
        &NewAircraft {
            registration: "N1UPD".into(),
            aircraft_type: "quadcopter".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO dbx_aviation.flight_sessions (org_id, aircraft_id, actual_departure, actual_arrival, point_count, created_at)
         VALUES ($1, $2, now() - interval '1 hour', now() - interval '10 minutes', 120, now() - interval '1 hour'),
                ($1, $2, now() - interval '3 days', now() - interval '3 days', 50, now() - interval '3 days')",
        &[&created.org.org_id, &ac.aircraft_id],
    )
    .await
    .unwrap();
    let s = tenants::org_summary(&c, "UPD").await.unwrap();
    assert_eq!(
        (
            s.aircraft,
            s.sessions,
            s.sessions_24h,
            s.points_24h,
            s.active_keys
        ),
        (1, 2, 1, 120, 1)
    );
    let all = tenants::list_orgs(&c).await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0], s);
}

#[tokio::test]
async fn aircraft_add_list_retire() {
    let (_db, mut c) = migrated().await;
    tenants::prepare(&c, "aircraft", None).await.unwrap();
    let org = tenants::create_org(&mut c, &new_org("FLEET"))
        .await
        .unwrap();
    let new = |reg: &str| NewAircraft {
        registration: reg.into(),
        aircraft_type: "fixed_wing".into(),
        manufacturer: Some("DBX Aerospace".into()),
        model: Some("FW-2".into()),
    };
    let a = tenants::add_aircraft(&c, "FLEET", &new("G-ABCD"))
        .await
        .unwrap();
    assert!(a.active);
    assert_eq!(a.manufacturer.as_deref(), Some("DBX Aerospace"));
    tenants::add_aircraft(&c, "FLEET", &new("N123AB"))
        .await
        .unwrap();
    match tenants::add_aircraft(&c, "FLEET", &new("G-ABCD")).await {
        Err(e @ TenantError::DuplicateRegistration { retired: false, .. }) => {
            assert!(e.to_string().contains("--registration"), "{e}")
        }
        other => panic!("expected DuplicateRegistration, got {other:?}"),
    }
    let e = tenants::add_aircraft(&c, "FLEET", &new("BAD REG!"))
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("invalid --registration"), "{e}");
    assert!(matches!(
        tenants::add_aircraft(&c, "NOPE", &new("N1")).await,
        Err(TenantError::UnknownOrg(_))
    ));

    let retired = tenants::retire_aircraft(&c, "FLEET", "G-ABCD")
        .await
        .unwrap();
    assert!(!retired.active);
    assert_eq!(retired.operational_status, "retired");
    match tenants::add_aircraft(&c, "FLEET", &new("G-ABCD")).await {
        Err(e @ TenantError::DuplicateRegistration { retired: true, .. }) => {
            assert!(e.to_string().contains("(retired)"), "{e}")
        }
        other => panic!("expected DuplicateRegistration (retired), got {other:?}"),
    }
    assert!(matches!(
        tenants::retire_aircraft(&c, "FLEET", "N999").await,
        Err(TenantError::UnknownAircraft { .. })
    ));
    let list = tenants::list_aircraft(&c, &org.org).await.unwrap();
    let regs: Vec<(&str, bool)> = list
        .iter()
        .map(|a| (a.registration.as_str(), a.active))
        .collect();
    assert_eq!(regs, [("G-ABCD", false), ("N123AB", true)]);
    // Audit rows: two INSERTs and one UPDATE, tagged with the command.
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM dbx_audit.audit_log
              WHERE table_name = 'dbx_aviation.aircraft_registry' AND user_agent = 'dbx aircraft'"
        )
        .await,
        3
    );
}

#[tokio::test]
async fn search_ranks_the_better_match_first_using_the_gin_index() {
    let (_db, mut c) = migrated().await;
    tenants::prepare(&c, "analyses search", None).await.unwrap();
    let org = tenants::create_org(&mut c, &new_org("SRCH")).await.unwrap();
    let other = tenants::create_org(&mut c, &new_org("OTHER"))
        .await
        .unwrap();
    let insert = |org: Uuid, text: &'static str| {
        let c = &c;
        async move {
            c.query_one(
                "INSERT INTO dbx_aviation.ml_analysis_results (org_id, model_version, ai_report_content, risk_level)
                 VALUES ($1, 'v1', $2, 'high') RETURNING analysis_id",
                &[&org, &text],
            )
            .await
            .unwrap()
            .get::<_, Uuid>(0)
        }
    };
    let best = insert(
        org.org.org_id,
        "Severe battery overheating detected. Battery temperature rose during climb; the battery pack overheated twice.",
    )
    .await;
    let weaker = insert(
        org.org.org_id,
        "Routine flight. Minor GPS drift near the landing zone; battery nominal.",
    )
    .await;
    insert(org.org.org_id, "Propeller vibration within limits.").await;
    insert(other.org.org_id, "Battery overheating battery battery.").await;

    let hits = tenants::search_analyses(&c, &org.org, "battery overheating", 10)
        .await
        .unwrap();
    assert_eq!(hits.len(), 1, "both words must match: {hits:?}");
    assert_eq!(hits[0].analysis_id, best);
    assert!(
        hits[0].headline.contains("**Battery**") || hits[0].headline.contains("**battery**"),
        "{}",
        hits[0].headline
    );

    let hits = tenants::search_analyses(&c, &org.org, "battery", 10)
        .await
        .unwrap();
    let ids: Vec<Uuid> = hits.iter().map(|h| h.analysis_id).collect();
    assert_eq!(ids, [best, weaker], "ranked, other organizations excluded");
    assert!(hits[0].rank > hits[1].rank);
    // Stemming: "detection" finds "detected".
    assert_eq!(
        tenants::search_analyses(&c, &org.org, "detection", 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(tenants::search_analyses(&c, &org.org, "hydraulics", 10)
        .await
        .unwrap()
        .is_empty());

    // The expression index serves the query.
    c.batch_execute("SET enable_seqscan = off").await.unwrap();
    let plan: Vec<String> = c
        .query(
            "EXPLAIN SELECT analysis_id FROM dbx_aviation.ml_analysis_results a
              WHERE to_tsvector('english'::regconfig, COALESCE(a.ai_report_content, '')) @@ websearch_to_tsquery('english', 'battery')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter()
            .any(|l| l.contains("ml_analysis_results_report_fts")),
        "{plan:#?}"
    );
}

#[tokio::test]
async fn reads_write_audit_rows() {
    let (_db, mut c) = migrated().await;
    tenants::prepare(&c, "org list", None).await.unwrap();
    let org = tenants::create_org(&mut c, &new_org("READ")).await.unwrap();
    tenants::audit_read(
        &c,
        Some(org.org.org_id),
        "dbx_aviation.api_keys",
        serde_json::json!({"command": "key list"}),
    )
    .await
    .unwrap();
    let r = c
        .query_one(
            "SELECT org_id, action_type::text, table_name::text, new_values, user_agent
               FROM dbx_audit.audit_log WHERE action_type = 'READ'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, Option<Uuid>>(0), Some(org.org.org_id));
    assert_eq!(r.get::<_, String>(2), "dbx_aviation.api_keys");
    assert_eq!(r.get::<_, serde_json::Value>(3)["command"], "key list");
    assert_eq!(
        r.get::<_, Option<String>>(4).as_deref(),
        Some("dbx org list")
    );
}
