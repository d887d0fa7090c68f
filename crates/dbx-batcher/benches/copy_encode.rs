//! Binary COPY encoding: `dbx_batcher::copy::CopyEncoder` against the way
//! tokio-postgres's `binary_copy::BinaryCopyInWriter` encodes (per value
//! `ToSql::to_sql_checked` through a trait object into a `BytesMut`, then the length
//! word patched in), on the same 5000 realistic rows.
//!
//! `encode/*` measures encoding alone (the writer's own loop, reproduced without its
//! sink). `copy_into_postgres/*` COPYs the same rows into a real PostgreSQL table
//! from dbx-testkit, through `CopyEncoder` + `copy_in` and through `BinaryCopyInWriter`
//! itself. Run: `cargo bench -p dbx-batcher --bench copy_encode`.

use std::error::Error;

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dbx_batcher::copy::{send_chunks, CopyEncoder, COLUMNS};
use dbx_core::Point;
use futures::SinkExt;
use postgres_types::{to_sql_checked, IsNull, ToSql, Type};
use rand::{Rng, SeedableRng};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use uuid::Uuid;

const ROWS: usize = 5000;

/// A typical point: position, attitude, speeds, battery, 4 motors, 6 surfaces, a small
/// extra document on one point in ten.
fn points() -> Vec<Point> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let t0 = 1_750_000_000_000_000i64;
    (0..ROWS as i64)
        .map(|i| {
            let mut f = |lo: f32, hi: f32| Some(rng.gen_range(lo..hi));
            Point {
                ts_micros: t0 + i * 100_000,
                seq: i,
                lat: Some(45.0 + i as f64 * 1e-5),
                lon: Some(7.0 + i as f64 * 1e-5),
                alt: f(0.0, 3000.0),
                gs: f(0.0, 80.0),
                vs: f(-5.0, 5.0),
                hdg: f(0.0, 360.0),
                roll: f(-30.0, 30.0),
                pitch: f(-20.0, 20.0),
                yaw: f(-180.0, 180.0),
                ias: f(0.0, 80.0),
                bv: f(20.0, 25.0),
                bi: f(0.0, 40.0),
                bp: f(0.0, 100.0),
                rpm: Some(vec![5000.0, 5100.0, 4900.0, 5050.0]),
                cs: Some(vec![0.1, -0.2, 0.0, 0.3, 0.0, -0.1]),
                fix: Some(3),
                sats: Some(12),
                temp: f(-10.0, 40.0),
                extra: (i % 10 == 0).then(|| r#"{"mode":"auto","wp":17}"#.to_string()),
            }
        })
        .collect()
}

/// jsonb from already-serialized text, as a ToSql user would write it for a `String`
/// column of JSON (version byte 1, then the text).
#[derive(Debug)]
struct JsonbText<'a>(&'a str);

impl ToSql for JsonbText<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_u8(1);
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
    to_sql_checked!();
}

const TYPES: [Type; 24] = [
    Type::UUID,
    Type::UUID,
    Type::UUID,
    Type::TIMESTAMPTZ,
    Type::INT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT4,
    Type::FLOAT4,
    Type::FLOAT4,
    Type::FLOAT4,
    Type::FLOAT4,
    Type::FLOAT4,
    Type::FLOAT4,
    Type::FLOAT4,
    Type::FLOAT4,
    Type::FLOAT4,
    Type::FLOAT4,
    Type::FLOAT4_ARRAY,
    Type::FLOAT4_ARRAY,
    Type::INT2,
    Type::INT2,
    Type::FLOAT4,
    Type::JSONB,
];

/// Calls `f` with the 24 values of a row as `ToSql` trait objects.
fn with_values<R>(
    ids: &(Uuid, Uuid, Uuid),
    p: &Point,
    f: impl FnOnce(&[&(dyn ToSql + Sync)]) -> R,
) -> R {
    let ts = DateTime::<Utc>::from_timestamp_micros(p.ts_micros);
    let extra = p.extra.as_deref().map(JsonbText);
    f(&[
        &ids.0, &ids.1, &ids.2, &ts, &p.seq, &p.lat, &p.lon, &p.alt, &p.gs, &p.vs, &p.hdg, &p.roll,
        &p.pitch, &p.yaw, &p.ias, &p.bv, &p.bi, &p.bp, &p.rpm, &p.cs, &p.fix, &p.sats, &p.temp,
        &extra,
    ])
}

/// BinaryCopyInWriter::write_raw's loop, without the sink.
fn tosql_encode(ids: &(Uuid, Uuid, Uuid), pts: &[Point]) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_slice(b"PGCOPY\n\xff\r\n\0");
    buf.put_i32(0);
    buf.put_i32(0);
    for p in pts {
        with_values(ids, p, |vals| {
            buf.put_i16(vals.len() as i16);
            for (v, ty) in vals.iter().zip(TYPES.iter()) {
                let idx = buf.len();
                buf.put_i32(0);
                let len = match v.to_sql_checked(ty, &mut buf).expect("encodable") {
                    IsNull::Yes => -1,
                    IsNull::No => (buf.len() - idx - 4) as i32,
                };
                buf[idx..idx + 4].copy_from_slice(&len.to_be_bytes());
            }
        });
    }
    buf.put_i16(-1);
    buf.freeze()
}

fn ours_encode(enc: &mut CopyEncoder, ids: &(Uuid, Uuid, Uuid), pts: &[Point]) -> Bytes {
    enc.begin();
    for p in pts {
        enc.push(&ids.0, &ids.1, &ids.2, p);
    }
    enc.finish()
}

fn bench(c: &mut Criterion) {
    let pts = points();
    let ids = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let mut enc = CopyEncoder::new(4 << 20);
    // Same bytes from both, except that jsonb/arrays/timestamps must agree exactly.
    assert_eq!(ours_encode(&mut enc, &ids, &pts), tosql_encode(&ids, &pts));

    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("dbx_copy_encoder", |b| {
        b.iter(|| ours_encode(&mut enc, &ids, &pts).len())
    });
    g.bench_function("tokio_postgres_tosql", |b| {
        b.iter(|| tosql_encode(&ids, &pts).len())
    });
    g.finish();

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = rt.block_on(async {
        let db = dbx_testkit::TestDb::new().await;
        let c = db.client().await;
        c.batch_execute(
            "CREATE UNLOGGED TABLE t (org_id uuid NOT NULL, aircraft_id uuid NOT NULL, \
             session_id uuid NOT NULL, ts timestamptz NOT NULL, seq bigint NOT NULL, \
             latitude double precision, longitude double precision, altitude_m real, \
             ground_speed_mps real, vertical_speed_mps real, heading_deg real, roll_deg real, \
             pitch_deg real, yaw_deg real, airspeed_mps real, battery_voltage real, \
             battery_current real, battery_remaining_pct real, motor_rpm real[], \
             control_surfaces real[], gps_fix smallint, satellites smallint, \
             temperature_c real, extra jsonb)",
        )
        .await
        .expect("creating the table");
        c
    });
    let sql = format!("COPY t ({COLUMNS}) FROM STDIN (FORMAT binary)");
    let mut g = c.benchmark_group("copy_into_postgres");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.sample_size(20);
    g.bench_function("dbx_copy_encoder", |b| {
        b.iter(|| {
            rt.block_on(async {
                let data = ours_encode(&mut enc, &ids, &pts);
                let sink = client.copy_in::<_, Bytes>(&sql).await.expect("copy");
                futures::pin_mut!(sink);
                for piece in send_chunks(&data) {
                    sink.feed(piece).await.expect("send");
                }
                sink.finish().await.expect("finish")
            })
        })
    });
    g.bench_function("binary_copy_in_writer", |b| {
        b.iter(|| {
            rt.block_on(async {
                let sink = client.copy_in(&sql).await.expect("copy");
                let w = BinaryCopyInWriter::new(sink, &TYPES);
                futures::pin_mut!(w);
                for p in &pts {
                    let ts = DateTime::<Utc>::from_timestamp_micros(p.ts_micros);
                    let extra = p.extra.as_deref().map(JsonbText);
                    w.as_mut()
                        .write(&[
                            &ids.0, &ids.1, &ids.2, &ts, &p.seq, &p.lat, &p.lon, &p.alt, &p.gs,
                            &p.vs, &p.hdg, &p.roll, &p.pitch, &p.yaw, &p.ias, &p.bv, &p.bi, &p.bp,
                            &p.rpm, &p.cs, &p.fix, &p.sats, &p.temp, &extra,
                        ])
                        .await
                        .expect("write");
                }
                w.finish().await.expect("finish")
            })
        })
    });
    g.finish();
    rt.block_on(async {
        client.batch_execute("TRUNCATE t").await.expect("truncate");
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
