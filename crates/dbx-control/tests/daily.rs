//! The daily telemetry aggregate kept per day (migration 0045) against the materialized view it
//! replaced: the old view's query, verbatim from migration 0005, is run directly on the same data
//! and must give exactly the table's rows, after the first upkeep, after late points into a
//! closed day, points through the default partition and the sweep, retention deletes, a dropped
//! and an archived partition, and a full recompute. And what makes it O(new data): a run with
//! nothing new recomputes only the open days. A database upgraded from the materialized view
//! keeps the view's rows. Retention looks at a partition wholly past an organization's cutoff
//! only until it found it clean, and again once it was written.
//!
//! The second test measures every maintenance task and one health collection on an empty and on
//! a filled table (`DBX_MAINT_ROWS` rows over seven closed days, default 200 000; the figures in
//! benches/RESULTS.md come from `DBX_MAINT_ROWS=3000000`). It prints the durations and asserts
//! only results, never a speed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use tokio::sync::OnceCell;
use tokio_postgres::Client;

use dbx_control::health::HealthCollector;
use dbx_control::migrate;
use dbx_control::partitions::{PartitionInterval, PartitionManager, PartitionsConfig, Task};
use dbx_core::{ManualClock, SharedClock};
use dbx_testkit::TestDb;

mod common;
use common::new_org;

const MAINT_PASSWORD: &str = "dbx-maintenance-daily-test-password";

/// The materialized view's query of migration 0005, verbatim: the old definition.
const OLD_VIEW: &str = "
WITH per_session AS (
    SELECT
        t.aircraft_id,
        t.org_id,
        (t.ts AT TIME ZONE 'UTC')::date AS day,
        t.session_id,
        count(*) AS points,
        extract(epoch FROM max(t.ts) - min(t.ts)) AS span_seconds,
        max(t.altitude_m) AS max_altitude_m,
        max(t.ground_speed_mps) AS max_ground_speed_mps,
        min(t.battery_remaining_pct) AS min_battery_pct
    FROM dbx_aviation.flight_telemetry t
    GROUP BY t.aircraft_id, t.org_id, (t.ts AT TIME ZONE 'UTC')::date, t.session_id
)
SELECT
    ps.aircraft_id,
    ps.org_id,
    ps.day,
    sum(ps.points)::bigint AS points,
    sum(ps.span_seconds)::double precision AS flight_time_seconds,
    max(ps.max_altitude_m) AS max_altitude_m,
    max(ps.max_ground_speed_mps) AS max_ground_speed_mps,
    min(ps.min_battery_pct) AS min_battery_pct
FROM per_session ps
GROUP BY ps.aircraft_id, ps.org_id, ps.day";

/// A migrated database, a superuser client, and the maintenance user's URL.
async fn setup() -> (TestDb, Client, String) {
    let (db, _ingest) = TestDb::migrated().await;
    let c = db.client().await;
    // Roles are cluster-wide; concurrent ALTER ROLE of one role fails: once per process.
    static PW: OnceCell<()> = OnceCell::const_new();
    PW.get_or_init(|| async {
        c.batch_execute(&format!(
            "ALTER ROLE dbx_maintenance_service WITH LOGIN PASSWORD '{MAINT_PASSWORD}'"
        ))
        .await
        .expect("maintenance password");
    })
    .await;
    let url = db.url_for("dbx_maintenance_service", MAINT_PASSWORD);
    (db, c, url)
}

fn manager(url: &str, clock: SharedClock, cfg: PartitionsConfig) -> PartitionManager {
    PartitionManager::new(
        dbx_testkit::connector(url),
        PartitionInterval::Daily,
        cfg,
        clock,
    )
}

/// Runs `task`; fails the test on any failed or skipped step. Returns the report's rows.
async fn run(m: &PartitionManager, task: Task) -> u64 {
    let r = m
        .run_task(task)
        .await
        .unwrap_or_else(|e| panic!("{task}: {e}"))
        .unwrap_or_else(|| panic!("{task}: the advisory lock was held elsewhere"));
    assert!(r.failed.is_empty() && r.skipped.is_empty(), "{task}: {r:?}");
    r.rows
}

/// The days the refresh recomputes now (the function itself, as the manager calls it).
async fn refresh(c: &Client, now: DateTime<Utc>) -> BTreeSet<NaiveDate> {
    c.query(
        "SELECT * FROM dbx_analytics.maintain_telemetry_daily_aircraft($1)",
        &[&now],
    )
    .await
    .expect("maintain_telemetry_daily_aircraft")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Makes this connection's write counts visible in pg_stat now. A backend reports them by
/// itself within about a second of going idle; the tests do not wait for that.
async fn flush_stats(c: &Client) {
    c.batch_execute("SELECT pg_stat_force_next_flush()")
        .await
        .expect("pg_stat_force_next_flush");
}

/// The table and the old view's query give the same rows (as multisets), and there are some.
async fn assert_same_as_old_view(c: &Client, when: &str) {
    let t = "SELECT * FROM dbx_analytics.telemetry_daily_aircraft";
    let diff: i64 = c
        .query_one(
            &format!(
                "SELECT count(*) FROM (({t} EXCEPT ALL ({OLD_VIEW})) \
                 UNION ALL (({OLD_VIEW}) EXCEPT ALL {t})) d"
            ),
            &[],
        )
        .await
        .expect("compare")
        .get(0);
    let rows: i64 = c
        .query_one(&format!("SELECT count(*) FROM ({t}) d"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        diff, 0,
        "{when}: table and old view differ in {diff} row(s)"
    );
    assert!(rows > 0, "{when}: an empty aggregate proves nothing");
}

fn midnight(now: DateTime<Utc>) -> DateTime<Utc> {
    PartitionInterval::Daily.floor(now)
}

/// `n` points of `aircraft` aircraft (in 3 organizations), spread evenly over [from, to), in
/// sessions of `per_session` consecutive points of an aircraft (so some cross midnight), with
/// NULL batteries now and then. One INSERT … SELECT generate_series.
async fn fill(
    c: &Client,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    n: i64,
    aircraft: i64,
    seq0: i64,
) {
    c.execute(
        "INSERT INTO dbx_aviation.flight_telemetry
           (org_id, aircraft_id, session_id, ts, seq, altitude_m, ground_speed_mps, battery_remaining_pct)
         SELECT md5('org' || (a % 3))::uuid, md5('ac' || a)::uuid,
                md5('ac' || a || ':' || (g / ($4::bigint * 500)))::uuid,
                $1::timestamptz + ($2::timestamptz - $1::timestamptz) * (g::float8 / $3::bigint),
                $5::bigint + g,
                (g % 500)::real, (g % 37)::real,
                CASE WHEN g % 11 = 0 THEN NULL ELSE (100 - g % 100)::real END
           FROM generate_series(0::bigint, $3::bigint - 1) g
          CROSS JOIN LATERAL (SELECT g % $4::bigint AS a) x",
        &[&from, &to, &n, &aircraft, &seq0],
    )
    .await
    .expect("fill");
}

async fn ensure_day(c: &Client, day: DateTime<Utc>) {
    c.execute(
        "SELECT dbx_aviation.ensure_telemetry_partition($1, $2)",
        &[&day, &(day + TimeDelta::days(1))],
    )
    .await
    .expect("partition");
}

fn days(from: DateTime<Utc>, to: DateTime<Utc>) -> BTreeSet<NaiveDate> {
    let mut out = BTreeSet::new();
    let mut d = from.date_naive();
    while d <= to.date_naive() {
        out.insert(d);
        d = d.succ_opt().unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_table_keeps_the_old_views_results_through_late_data_and_lifecycle() {
    let (_db, c, url) = setup().await;
    let now = Utc::now();
    let d0 = midnight(now);
    let day = |i: i64| d0 + TimeDelta::days(i);
    for i in -6..0 {
        ensure_day(&c, day(i)).await;
    }
    // Six days of history up to now, and a day nobody has a partition for (default partition).
    fill(&c, day(-6), now, 30_000, 40, 0).await;
    fill(&c, day(-10), day(-9), 200, 5, 1_000_000).await;
    flush_stats(&c).await;
    // The migration made today and the next three days; the open days are yesterday on.
    let open = days(day(-1), day(3));

    let first = refresh(&c, now).await;
    let mut expect = open.clone();
    expect.extend(days(day(-6), day(-2)));
    expect.insert(day(-10).date_naive());
    assert_eq!(first, expect, "first run: every new partition's day");
    assert_same_as_old_view(&c, "after the first run").await;

    // Nothing written since: only the open days are recomputed.
    assert_eq!(refresh(&c, now).await, open, "a run with nothing new");

    // Late points into a closed day, for a known session and a new aircraft.
    c.execute(
        "INSERT INTO dbx_aviation.flight_telemetry
           (org_id, aircraft_id, session_id, ts, seq, altitude_m, ground_speed_mps, battery_remaining_pct)
         SELECT t.org_id, t.aircraft_id, t.session_id, t.ts + interval '1 second', t.seq + 5000000,
                9999, 1, 1
           FROM dbx_aviation.flight_telemetry t
          WHERE t.ts >= $1 AND t.ts < $1 + interval '1 hour' LIMIT 5",
        &[&day(-4)],
    )
    .await
    .unwrap();
    fill(&c, day(-4), day(-3), 50, 1, 2_000_000).await;
    c.execute(
        "UPDATE dbx_aviation.flight_telemetry SET altitude_m = 12345
          WHERE ts >= $1 AND ts < $2 AND seq = 2000003",
        &[&day(-4), &day(-3)],
    )
    .await
    .unwrap();
    flush_stats(&c).await;
    let mut expect = open.clone();
    expect.insert(day(-4).date_naive());
    assert_eq!(
        refresh(&c, now).await,
        expect,
        "late data into a closed day"
    );
    assert_same_as_old_view(&c, "after late data").await;

    // More points into the default partition's day; then the sweep moves them out.
    fill(&c, day(-10), day(-9), 30, 2, 3_000_000).await;
    flush_stats(&c).await;
    let mut expect = open.clone();
    expect.insert(day(-10).date_naive());
    assert_eq!(
        refresh(&c, now).await,
        expect,
        "late data into the default partition"
    );
    assert_same_as_old_view(&c, "after late data in the default partition").await;
    let clock: SharedClock = ManualClock::new(now);
    let m = manager(
        &url,
        clock,
        PartitionsConfig {
            archive_after_days: 5,
            ..PartitionsConfig::default()
        },
    );
    run(&m, Task::Sweep).await;
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM dbx_aviation.flight_telemetry_default",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the sweep moved the default partition's rows");
    // The manager's own refresh: it sees its own connection's sweep (flushed first).
    let days_done = run(&m, Task::Refresh).await;
    assert_eq!(
        days_done,
        open.len() as u64 + 1,
        "the swept day and the open ones"
    );
    assert_same_as_old_view(&c, "after the sweep").await;

    // Retention deleting an organization's rows from a closed partition.
    c.execute(
        "DELETE FROM dbx_aviation.flight_telemetry WHERE ts >= $1 AND ts < $2
            AND org_id = md5('org1')::uuid",
        &[&day(-5), &day(-4)],
    )
    .await
    .unwrap();
    flush_stats(&c).await;
    let mut expect = open.clone();
    expect.insert(day(-5).date_naive());
    assert_eq!(refresh(&c, now).await, expect, "retention deleted rows");
    assert_same_as_old_view(&c, "after a retention delete").await;

    // A dropped partition, and an archived one: their days leave the aggregate, as they left
    // the old view (it read the live table only).
    let p6 = format!(
        "dbx_aviation.flight_telemetry_p{}",
        day(-6).format("%Y%m%d")
    );
    c.batch_execute(&format!("DROP TABLE {p6}")).await.unwrap();
    assert!(run(&m, Task::Archive).await == 0);
    let archived: i64 = c
        .query_one(
            "SELECT count(*) FROM dbx_aviation.telemetry_partitions() WHERE partition_schema = 'dbx_archive'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        archived, 1,
        "the day-10 partition the sweep made is archived"
    );
    let mut expect = open.clone();
    expect.insert(day(-6).date_naive());
    expect.insert(day(-10).date_naive());
    assert_eq!(refresh(&c, now).await, expect, "dropped and archived days");
    assert_same_as_old_view(&c, "after a drop and an archival").await;
    let gone: i64 = c
        .query_one(
            "SELECT count(*) FROM dbx_analytics.telemetry_daily_aircraft WHERE day IN ($1, $2)",
            &[&day(-6).date_naive(), &day(-10).date_naive()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gone, 0);

    // The full recompute (refresh_telemetry_daily_aircraft(false)) agrees, and a day later the
    // first of the open days has closed: it is not recomputed again.
    c.batch_execute("SELECT dbx_analytics.refresh_telemetry_daily_aircraft(false)")
        .await
        .unwrap();
    assert_same_as_old_view(&c, "after the full recompute").await;
    let tomorrow = now + TimeDelta::days(1);
    assert_eq!(refresh(&c, tomorrow).await, days(day(0), day(3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_keeps_what_the_materialized_view_held() {
    let db = TestDb::new().await;
    let mut c = db.client().await;
    // A database as the release before 0045 left it: the materialized view, refreshed.
    dbx_testkit::migrate_before(&mut c, 45).await;
    let now = Utc::now();
    let d0 = midnight(now);
    ensure_day(&c, d0 - TimeDelta::days(2)).await;
    ensure_day(&c, d0 - TimeDelta::days(1)).await;
    fill(&c, d0 - TimeDelta::days(2), now, 5_000, 12, 0).await;
    fill(
        &c,
        d0 - TimeDelta::days(30),
        d0 - TimeDelta::days(29),
        100,
        3,
        100_000,
    )
    .await;
    c.batch_execute(
        "SELECT dbx_analytics.refresh_telemetry_daily_aircraft(false);
         CREATE TABLE public.old_daily AS SELECT * FROM dbx_analytics.telemetry_daily_aircraft",
    )
    .await
    .unwrap();

    let applied = migrate::apply(&mut c).await.unwrap();
    assert!(applied.iter().any(|a| a.version == 45), "{applied:?}");
    let kind: String = c
        .query_one(
            "SELECT relkind::text FROM pg_class WHERE oid = 'dbx_analytics.telemetry_daily_aircraft'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kind, "r", "a table now");
    let t = "SELECT * FROM dbx_analytics.telemetry_daily_aircraft";
    let o = "SELECT * FROM public.old_daily";
    let diff: i64 = c
        .query_one(
            &format!(
                "SELECT count(*) FROM (({t} EXCEPT ALL {o}) UNION ALL ({o} EXCEPT ALL {t})) d"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        diff, 0,
        "the migration filled the table with the view's rows"
    );
    assert_same_as_old_view(&c, "after the upgrade").await;
    // Readers' view and the refresh function survived the swap, with their grants.
    let granted: bool = c
        .query_one(
            "SELECT has_table_privilege('dbx_app_read', 'dbx_analytics.org_telemetry_daily', 'SELECT')
                AND NOT has_table_privilege('dbx_app_read', 'dbx_analytics.telemetry_daily_aircraft', 'SELECT')
                AND has_function_privilege('dbx_ingest', 'dbx_analytics.refresh_telemetry_daily_aircraft(boolean)', 'EXECUTE')
                AND has_function_privilege('dbx_ingest', 'dbx_analytics.maintain_telemetry_daily_aircraft(timestamptz, boolean)', 'EXECUTE')
                AND NOT has_function_privilege('dbx_app_read', 'dbx_analytics.maintain_telemetry_daily_aircraft(timestamptz, boolean)', 'EXECUTE')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(granted, "grants as before");
}

/// Retention's delete steps for `org` in the plan it would run now, by partition name.
async fn retention_deletes(m: &PartitionManager, org: uuid::Uuid) -> BTreeSet<String> {
    let plan = m.plan(Task::Retention).await.expect("plan");
    plan.steps
        .iter()
        .filter(|s| {
            s.what
                .starts_with(&format!("delete organization {org}'s rows"))
        })
        .map(|s| {
            s.what
                .rsplit(" from ")
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_does_not_scan_partitions_it_found_clean_until_they_are_written() {
    let (_db, c, url) = setup().await;
    let short = new_org(&c, "DAILY-SHORT", 3).await;
    let long = new_org(&c, "DAILY-LONG", 365).await;
    let now = Utc::now();
    let d0 = midnight(now);
    let day = |i: i64| d0 + TimeDelta::days(i);
    for i in -10..0 {
        ensure_day(&c, day(i)).await;
    }
    for org in [short, long] {
        c.execute(
            "INSERT INTO dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq)
             SELECT $1::uuid, md5($1::uuid::text)::uuid, md5($1::uuid::text || 's')::uuid, $2::timestamptz + g * interval '1 hour', g
               FROM generate_series(0, 240) g",
            &[&org, &day(-10)],
        )
        .await
        .unwrap();
    }
    flush_stats(&c).await;
    let clock: SharedClock = ManualClock::new(now);
    let m = manager(&url, clock, PartitionsConfig::default());
    let name = |i: i64| {
        format!(
            "\"dbx_aviation\".\"flight_telemetry_p{}\"",
            day(i).format("%Y%m%d")
        )
    };
    let whole: BTreeSet<String> = (-10..=-4).map(name).collect();
    let mut all = whole.clone();
    all.insert(name(-3)); // straddles the cutoff: always looked at
    all.insert("\"dbx_aviation\".\"flight_telemetry_default\"".into());

    assert_eq!(retention_deletes(&m, short).await, all, "first run");
    let default: BTreeSet<String> =
        ["\"dbx_aviation\".\"flight_telemetry_default\"".to_string()].into();
    assert_eq!(
        retention_deletes(&m, long).await,
        default,
        "LONG: only the default partition"
    );
    let deleted = run(&m, Task::Retention).await;
    assert!(deleted >= 7 * 24, "{deleted}");
    // The deletes themselves changed the counters: one more look, which finds nothing.
    assert_eq!(retention_deletes(&m, short).await, all, "second run");
    assert_eq!(run(&m, Task::Retention).await, 0);
    let mut rest = all.clone();
    rest.retain(|p| !whole.contains(p));
    assert_eq!(
        retention_deletes(&m, short).await,
        rest,
        "clean partitions are skipped"
    );
    assert_eq!(run(&m, Task::Retention).await, 0);

    // A late point of SHORT into a clean partition: that one is looked at again, and deleted.
    c.execute(
        "INSERT INTO dbx_aviation.flight_telemetry (org_id, aircraft_id, session_id, ts, seq)
         VALUES ($1::uuid, md5($1::uuid::text)::uuid, md5($1::uuid::text || 'late')::uuid, $2::timestamptz, 1)",
        &[&short, &(day(-6) + TimeDelta::hours(5))],
    )
    .await
    .unwrap();
    flush_stats(&c).await;
    let mut expect = rest.clone();
    expect.insert(name(-6));
    assert_eq!(retention_deletes(&m, short).await, expect, "written since");
    assert_eq!(run(&m, Task::Retention).await, 1);
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE org_id = $1 AND ts < $2",
            &[&short, &(now - TimeDelta::days(3))],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "nothing of SHORT's left past its retention");
    let kept: i64 = c
        .query_one(
            "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE org_id = $1",
            &[&long],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 241, "LONG's rows untouched");
}

/// Milliseconds of `f`, awaited.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, f64) {
    let t = Instant::now();
    let out = f.await;
    (out, t.elapsed().as_secs_f64() * 1000.0)
}

/// Every maintenance task once and one health collection, in milliseconds.
async fn measure(m: &PartitionManager, h: &HealthCollector) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for task in Task::ALL {
        let (_, ms) = timed(run(m, task)).await;
        out.push((task.name().to_string(), ms));
    }
    let (snap, ms) = timed(h.collect_once()).await;
    snap.expect("health collection");
    out.push(("health collection".into(), ms));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_costs_on_an_empty_and_a_filled_table() {
    let rows: i64 = std::env::var("DBX_MAINT_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let (_db, c, url) = setup().await;
    let now = Utc::now();
    let d0 = midnight(now);
    let clock: SharedClock = ManualClock::new(now);
    let cfg = PartitionsConfig {
        lookback: 8,
        ..PartitionsConfig::default()
    };
    let m = manager(&url, clock.clone(), cfg);
    let h = HealthCollector::new(dbx_testkit::connector(&url), clock, Duration::from_secs(60));
    // Premake once (it makes the eight past days), then measure on the empty table.
    run(&m, Task::Premake).await;
    let empty = measure(&m, &h).await;

    // History: `rows` points over seven closed days, 1/50 of that since yesterday.
    let t = Instant::now();
    fill(
        &c,
        d0 - TimeDelta::days(8),
        d0 - TimeDelta::days(1),
        rows,
        2000,
        0,
    )
    .await;
    fill(&c, d0 - TimeDelta::days(1), now, rows / 50, 2000, rows).await;
    c.batch_execute("ANALYZE dbx_aviation.flight_telemetry")
        .await
        .unwrap();
    flush_stats(&c).await;
    let fill_secs = t.elapsed().as_secs_f64();
    // Premake made up to four days ahead: the open days are yesterday to then.
    let open = days(d0 - TimeDelta::days(1), d0 + TimeDelta::days(4));
    let (first, first_ms) = timed(refresh(&c, now)).await;
    let mut expect = open.clone();
    expect.extend(days(d0 - TimeDelta::days(8), d0 - TimeDelta::days(2)));
    assert_eq!(
        first, expect,
        "the seven written closed days and the open ones"
    );
    let filled = measure(&m, &h).await;
    let (again, open_ms) = timed(refresh(&c, now)).await;
    assert_eq!(again, open, "nothing new: the open days only");
    let sql = |q: String| {
        let c = &c;
        async move {
            c.batch_execute(&q)
                .await
                .unwrap_or_else(|e| panic!("{q}: {e}"))
        }
    };
    let (_, old_ms) = timed(sql(format!("SELECT count(*) FROM ({OLD_VIEW}) v"))).await;
    let (_, full_ms) = timed(sql(
        "SELECT dbx_analytics.refresh_telemetry_daily_aircraft(false)".into(),
    ))
    .await;
    assert_same_as_old_view(&c, "after the measurements").await;

    println!(
        "maintenance on an empty table and on {} rows (+{} since yesterday) over 8 daily partitions \
         (filled in {fill_secs:.1} s):",
        rows,
        rows / 50
    );
    println!("| task | empty, ms | filled, ms |\n|---|---:|---:|");
    for ((name, e), (_, f)) in empty.iter().zip(&filled) {
        println!("| {name} | {e:.1} | {f:.1} |");
    }
    println!("| refresh, first run after the history was written (7 new days + open days) | — | {first_ms:.1} |");
    println!("| refresh, nothing new (open days only) | — | {open_ms:.1} |");
    println!("| the old materialized view's query over the whole table | — | {old_ms:.1} |");
    println!("| full recompute, refresh_telemetry_daily_aircraft(false) | — | {full_ms:.1} |");
}
