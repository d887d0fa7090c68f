//! `dbx setup --distributed` and the seed's features on a three-node Citus cluster.

use dbx_testkit::{run_cli, TestDb};

use crate::{dbx_bin, setup_distributed, undistributed_partitions, Distributed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_distributed_places_every_table_and_runs_again_unchanged() {
    let d = Distributed::new().await;
    assert!(d.output.contains("Citus workers: "), "{}", d.output);
    let placed: Vec<(String, String, String)> = d
        .client
        .query(
            "SELECT table_name::text, citus_table_type, distribution_column FROM citus_tables \
              WHERE table_name::text NOT LIKE 'dbx_aviation.flight_telemetry_%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want = |t: &str, kind: &str, col: &str| (t.to_string(), kind.to_string(), col.to_string());
    assert_eq!(
        placed,
        vec![
            want(
                "dbx_archive.flight_telemetry_archive",
                "distributed",
                "session_id"
            ),
            want("dbx_audit.audit_log", "local", "<none>"),
            want("dbx_aviation.aircraft_registry", "reference", "<none>"),
            want("dbx_aviation.api_keys", "reference", "<none>"),
            want("dbx_aviation.api_requests", "local", "<none>"),
            want("dbx_aviation.flight_sessions", "distributed", "session_id"),
            want("dbx_aviation.flight_telemetry", "distributed", "session_id"),
            want("dbx_aviation.ml_analysis_results", "local", "<none>"),
            want("dbx_aviation.organizations", "reference", "<none>"),
            want("dbx_aviation.schema_migrations", "local", "<none>"),
        ]
    );
    // Sessions, telemetry (every partition) and the archive share one colocation group.
    let groups: i64 = d
        .client
        .query_one(
            "SELECT count(DISTINCT colocation_id) FROM citus_tables \
              WHERE citus_table_type = 'distributed'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(groups, 1);
    // Every partition premade by the migrations is distributed with its parent.
    let local_partitions = undistributed_partitions(&d.client).await;
    assert_eq!(local_partitions, 0);

    // Idempotent: a second run places nothing and succeeds.
    let dir = tempfile::tempdir().unwrap();
    let again = setup_distributed(&d.db, dir.path(), &[]);
    assert!(again.contains("already distributed: 10"), "{again}");
    assert!(!again.contains("  distributed dbx_"), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_distributed_refuses_a_server_without_citus_naming_what_to_do() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = run_cli(
        dbx_bin(),
        &[
            "setup",
            "--distributed",
            "--superuser-url",
            &db.url(),
            "--database",
            db.name(),
            "--out-dir",
            &dir.path().display().to_string(),
        ],
        &[],
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("`--distributed` needs the citus extension in this database"),
        "{out}"
    );
    assert!(out.contains("CREATE EXTENSION citus"), "{out}");
    // Refused before any migration.
    let tables: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname LIKE 'dbx_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);
}

/// Telemetry and a session for `org`'s aircraft, written as the superuser (what the daemon
/// writes is covered by ingest.rs).
async fn seed_flight(
    d: &Distributed,
    org: uuid::Uuid,
    aircraft: uuid::Uuid,
    pilot: &str,
) -> uuid::Uuid {
    let session = uuid::Uuid::new_v4();
    d.client
        .execute(
            "INSERT INTO dbx_aviation.flight_sessions \
               (session_id, org_id, aircraft_id, pilot_id, actual_departure, point_count) \
             VALUES ($1, $2, $3, $4, now() - interval '1 hour', 50)",
            &[&session, &org, &aircraft, &pilot],
        )
        .await
        .unwrap();
    d.client
        .execute(
            "INSERT INTO dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq, altitude_m) \
             SELECT $1, $2, $3, now() - interval '1 hour' + g * interval '1 second', g, g \
               FROM generate_series(1, 50) g",
            &[&org, &aircraft, &session],
        )
        .await
        .unwrap();
    d.client
        .execute(
            "INSERT INTO dbx_aviation.ml_analysis_results \
               (session_id, org_id, model_version, risk_score, risk_level, anomaly_detected, anomalies) \
             VALUES ($1, $2, 'v1', 0.9, 'critical', true, '[\"critical motor\"]')",
            &[&session, &org],
        )
        .await
        .unwrap();
    session
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rls_isolates_two_organizations_through_the_coordinator_with_set_local() {
    let d = Distributed::new().await;
    let (a, air_a) = d.org("RLSA").await;
    let (b, air_b) = d.org("RLSB").await;
    seed_flight(&d, a.id, air_a, "pilot-a").await;
    seed_flight(&d, b.id, air_b, "pilot-b").await;
    seed_flight(&d, b.id, air_b, "pilot-b").await;

    let mut reader = dbx_testkit::connect(&d.url(0, "dbx_analytics_service")).await;
    for (org, sessions, points) in [(a.id, 1i64, 50i64), (b.id, 2, 100)] {
        let tx = reader.transaction().await.unwrap();
        // The application sets the tenant with SET LOCAL; with citus.propagate_set_commands =
        // 'local' (set by setup) Citus sends it to the workers holding the shards.
        tx.batch_execute(&format!("SET LOCAL app.current_org_id = '{org}'"))
            .await
            .unwrap();
        let got: (i64, i64, i64, i64) = {
            let r = tx
                .query_one(
                    "SELECT (SELECT count(*) FROM dbx_aviation.flight_sessions), \
                            (SELECT count(*) FROM dbx_aviation.flight_telemetry), \
                            (SELECT count(*) FROM dbx_aviation.organizations), \
                            (SELECT count(DISTINCT org_id) FROM dbx_aviation.flight_telemetry)",
                    &[],
                )
                .await
                .unwrap();
            (r.get(0), r.get(1), r.get(2), r.get(3))
        };
        assert_eq!(got, (sessions, points, 1, 1), "organization {org}");
        tx.commit().await.unwrap();
    }
    // No context: nothing, on every shard.
    let none: i64 = reader
        .query_one("SELECT count(*) FROM dbx_aviation.flight_telemetry", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(none, 0);
    // set_org_context() is a function call, not a SET: Citus does not forward it, so the
    // workers see no tenant and RLS fails closed (docs/scaling.md says to use SET LOCAL).
    let tx = reader.transaction().await.unwrap();
    tx.execute("SELECT dbx_aviation.set_org_context($1)", &[&a.id])
        .await
        .unwrap();
    let via_function: i64 = tx
        .query_one("SELECT count(*) FROM dbx_aviation.flight_telemetry", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        via_function, 0,
        "a tenant context that never reached the workers"
    );
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_features_work_on_citus() {
    let d = Distributed::new().await;
    let (a, air) = d.org("SEED").await;
    let session = seed_flight(&d, a.id, air, "pilot-gdpr").await;

    // Audit: a change of a reference table is audited once, from the coordinator's placement,
    // under the table's own name.
    d.client
        .execute(
            "UPDATE dbx_aviation.aircraft_registry SET model = 'Q-5' WHERE aircraft_id = $1",
            &[&air],
        )
        .await
        .unwrap();
    let audited: Vec<(String, String)> = d
        .client
        .query(
            "SELECT action_type, table_name FROM dbx_audit.audit_log \
              WHERE record_id = $1 ORDER BY audit_id",
            &[&air],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let row = |a: &str| (a.to_string(), "dbx_aviation.aircraft_registry".to_string());
    assert_eq!(audited, vec![row("INSERT"), row("UPDATE")]);
    // The key mirror: the organization's own key is listed in api_keys as 'primary'.
    let primary: i64 = d
        .client
        .query_one(
            "SELECT count(*) FROM dbx_aviation.api_keys WHERE org_id = $1 AND label = 'primary'",
            &[&a.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(primary, 1);

    // GDPR delete: the pilot is anonymized in the distributed sessions.
    let n: i32 = d
        .client
        .query_one(
            "SELECT dbx_aviation.gdpr_delete_user_data('pilot-gdpr')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let pilot: String = d
        .client
        .query_one(
            "SELECT pilot_id FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&session],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pilot, format!("ANONYMIZED_{session}"));

    // Analytics functions and views join reference, distributed and coordinator tables.
    let risk: Vec<(String, i64, i64)> = d
        .client
        .query(
            "SELECT aircraft_type::text, total_flights, high_risk_flights \
               FROM dbx_analytics.calculate_fleet_risk_profile($1, now() - interval '1 day', now())",
            &[&a.id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(risk, vec![("quadcopter".to_string(), 1, 1)]);
    let score: i64 = d
        .client
        .query_one(
            "SELECT count(*) FROM dbx_analytics.calculate_maintenance_score($1)",
            &[&air],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(score, 1);
    for view in [
        "dbx_analytics.executive_summary",
        "dbx_analytics.maintenance_predictions",
        "dbx_aviation.system_health",
        "dbx_aviation.table_bloat",
    ] {
        d.client
            .query(&format!("SELECT * FROM {view}"), &[])
            .await
            .unwrap_or_else(|e| panic!("{view}: {e:?}"));
    }
    let flights: i64 = d
        .client
        .query_one(
            "SELECT sum(flights)::bigint FROM dbx_analytics.executive_summary WHERE org_name = $1",
            &[&"SEED test organization"],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(flights, 1);

    // The materialized view (stored on the coordinator) refreshes from the distributed table,
    // both ways.
    for concurrently in [false, true] {
        d.client
            .execute(
                "SELECT dbx_analytics.refresh_telemetry_daily_aircraft($1)",
                &[&concurrently],
            )
            .await
            .unwrap();
    }
    let points: i64 = d
        .client
        .query_one(
            "SELECT sum(points)::bigint FROM dbx_analytics.telemetry_daily_aircraft WHERE aircraft_id = $1",
            &[&air],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(points, 50);
}
