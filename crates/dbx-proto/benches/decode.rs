//! Decoding throughput of a full `batch` frame body, map-form and array-form points,
//! in points per second (criterion `Throughput::Elements`).

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dbx_core::Point;
use dbx_proto::{
    decode_client, encode_batch_with, AircraftRef, ClientMessage, EncodeOptions, Limits, PointForm,
    TimestampForm,
};
use uuid::Uuid;

const NOW: i64 = 1_790_000_000_000_000;
const POINTS: usize = 1000;

/// A realistic point: every numeric field set, four motors, no extra.
fn point(i: usize) -> Point {
    let f = i as f32;
    Point {
        ts_micros: NOW - 60_000_000 + i as i64 * 20_000,
        seq: i as i64,
        lat: Some(47.0 + f64::from(f) * 1e-5),
        lon: Some(8.0 + f64::from(f) * 1e-5),
        alt: Some(500.0 + f),
        gs: Some(35.5),
        vs: Some(-1.25),
        hdg: Some(271.0),
        roll: Some(2.5),
        pitch: Some(-1.0),
        yaw: Some(271.5),
        ias: Some(36.0),
        bv: Some(22.2),
        bi: Some(14.5),
        bp: Some(87.0),
        rpm: Some(vec![5200.0, 5210.0, 5190.0, 5205.0]),
        cs: None,
        fix: Some(3),
        sats: Some(14),
        temp: Some(21.5),
        extra: None,
    }
}

fn body(form: PointForm) -> Vec<u8> {
    let points: Vec<Point> = (0..POINTS).map(point).collect();
    let mut buf = BytesMut::new();
    let opts = EncodeOptions {
        form,
        timestamps: TimestampForm::Ext,
        uuid_as_bin: false,
    };
    encode_batch_with(
        &mut buf,
        1,
        &AircraftRef::Registration("HB-ABC".into()),
        Uuid::from_u128(7),
        &points,
        opts,
    )
    .expect("valid points encode");
    buf[4..].to_vec()
}

fn bench(c: &mut Criterion) {
    let limits = Limits::default();
    let mut g = c.benchmark_group("decode_batch");
    g.throughput(Throughput::Elements(POINTS as u64));
    for (name, form) in [("map", PointForm::Map), ("array", PointForm::Array)] {
        let b = body(form);
        match decode_client(&b, &limits, NOW) {
            Ok(ClientMessage::Batch(batch)) => assert_eq!(batch.points.len(), POINTS),
            other => panic!("bench input does not decode: {other:?}"),
        }
        g.bench_function(name, |bencher| {
            bencher.iter(|| decode_client(black_box(&b), &limits, NOW))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
