//! The bytes-per-point figure of docs/scaling.md, measured: 200 000 points shaped like the
//! flight simulator's (every field set, four motor RPMs, four control surfaces) in one daily
//! partition with its dedupe key and aircraft index, then `pg_total_relation_size / rows`.
//!
//! `cargo test -p dbx --test ops bytes_per_point -- --nocapture` prints the breakdown.

use dbx_testkit::{Fixture, TestDb};
use uuid::Uuid;

const POINTS: i64 = 200_000;
const AIRCRAFT: i64 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_per_point_on_disk() {
    let (db, _) = TestDb::migrated().await;
    let client = db.client().await;
    let org = Fixture::org(&client, "SIZE", None).await;
    let mut aircraft = Vec::new();
    for i in 0..AIRCRAFT {
        aircraft.push(Fixture::aircraft(&client, org.id, &format!("N{i}SZ")).await);
    }
    let sessions: Vec<Uuid> = (0..AIRCRAFT).map(|_| Uuid::new_v4()).collect();
    // A fixed past day, so the partition holds exactly these rows.
    let partition: String = client
        .query_one(
            "SELECT dbx_aviation.ensure_telemetry_partition('2026-01-10 00:00+00', '2026-01-11 00:00+00')",
            &[],
        )
        .await
        .expect("partition")
        .get(0);
    // 16 aircraft at 10 Hz, values in the simulator's ranges (crates/dbx-client/src/sim.rs).
    client
        .execute(
            "INSERT INTO dbx_aviation.flight_telemetry
             SELECT $1, ($2::uuid[])[a + 1], ($3::uuid[])[a + 1],
                    '2026-01-10 06:00+00'::timestamptz + i * interval '100 ms', i,
                    47 + random(), 8 + random(), (100 + random() * 400)::real,
                    (random() * 30)::real, (random() * 4 - 2)::real, (random() * 360)::real,
                    (random() * 10 - 5)::real, (random() * 6 - 3)::real, (random() * 4 - 2)::real,
                    (random() * 30)::real, (19 + random() * 3)::real, (random() * 25)::real,
                    (random() * 100)::real,
                    ARRAY[3000 + random() * 3000, 3000 + random() * 3000,
                          3000 + random() * 3000, 3000 + random() * 3000]::real[],
                    ARRAY[random() * 0.4 - 0.2, random() * 0.4 - 0.2,
                          random() * 0.4 - 0.2, random() * 0.4 - 0.2]::real[],
                    3, (9 + random() * 8)::smallint, (15 + random() * 10)::real, NULL
               FROM generate_series(0, $4::bigint / $5 - 1) i, generate_series(0, $5 - 1) a",
            &[&org.id, &aircraft, &sessions, &POINTS, &AIRCRAFT],
        )
        .await
        .expect("insert points");
    client
        .batch_execute(&format!("VACUUM ANALYZE {partition}"))
        .await
        .expect("vacuum");
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), pg_total_relation_size('{partition}'), pg_relation_size('{partition}'),
                        pg_indexes_size('{partition}') FROM {partition}"
            ),
            &[],
        )
        .await
        .expect("sizes");
    let (rows, total, heap, indexes): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(rows, POINTS);
    let per_point = total as f64 / rows as f64;
    println!(
        "{partition}: {rows} points, total {total} B = {per_point:.1} B/point \
         (heap {:.1}, indexes {:.1})",
        heap as f64 / rows as f64,
        indexes as f64 / rows as f64
    );
    // 24 columns with two real[4] arrays: about 250 B of heap tuple plus two B-tree entries. Far
    // outside this range means the schema changed and docs/scaling.md needs a new figure.
    assert!((250.0..600.0).contains(&per_point), "{per_point} B/point");
}
