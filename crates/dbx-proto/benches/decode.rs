//! Decoding throughput of a full `batch` frame body, map-form and array-form points,
//! in points per second (criterion `Throughput::Elements`); and the hostile inputs of
//! issue 13: one point with N and 2N extra keys (decode time must grow linearly: the
//! old duplicate check made it quadratic), the 80 000-key hello through the hello
//! decoder, and the refusal of an oversized first frame at its prefix.

use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dbx_core::Point;
use dbx_proto::{
    decode_client, decode_hello, encode_batch_with, AircraftRef, ClientMessage, EncodeOptions,
    FrameCodec, Limits, PointForm, TimestampForm,
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

/// Appends a MessagePack str (fixstr/str8 are all these keys need).
fn put_str(out: &mut Vec<u8>, s: &str) {
    if s.len() < 32 {
        out.push(0xa0 | s.len() as u8);
    } else {
        out.push(0xd9);
        out.push(s.len() as u8);
    }
    out.extend_from_slice(s.as_bytes());
}

/// A map header for `n` entries.
fn put_map(out: &mut Vec<u8>, n: usize) {
    out.push(0xdf);
    out.extend_from_slice(&(n as u32).to_be_bytes());
}

/// Point `seq` with `keys` distinct unknown keys (`nil` values) after `ts` and `seq`.
fn point_with_keys(out: &mut Vec<u8>, keys: usize, seq: usize) {
    put_map(out, keys + 2);
    put_str(out, "ts");
    out.push(0xd3);
    out.extend_from_slice(&NOW.to_be_bytes());
    put_str(out, "seq");
    out.push(0xce);
    out.extend_from_slice(&(seq as u32).to_be_bytes());
    for i in 0..keys {
        put_str(out, &format!("k{i:07}"));
        out.push(0xc0);
    }
}

/// A batch body whose one point holds `keys` extra keys.
fn batch_with_keys(keys: usize) -> Vec<u8> {
    batch_of(&[keys])
}

/// A batch body with one point per entry of `keys`, each with that many extra keys.
fn batch_of(keys: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    put_map(&mut out, 5);
    put_str(&mut out, "t");
    put_str(&mut out, "batch");
    put_str(&mut out, "seq");
    out.push(1);
    put_str(&mut out, "aircraft");
    put_str(&mut out, "HB-ABC");
    put_str(&mut out, "session");
    put_str(&mut out, &Uuid::from_u128(7).to_string());
    put_str(&mut out, "points");
    out.push(0xdd);
    out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
    for (i, &n) in keys.iter().enumerate() {
        point_with_keys(&mut out, n, i);
    }
    out
}

/// The hello of issue 13: `points` first, one point with `keys` unknown keys.
fn hello_with_keys(keys: usize) -> Vec<u8> {
    let mut out = Vec::new();
    put_map(&mut out, 4);
    put_str(&mut out, "points");
    out.push(0x91);
    point_with_keys(&mut out, keys, 1);
    put_str(&mut out, "t");
    put_str(&mut out, "hello");
    put_str(&mut out, "v");
    out.push(1);
    put_str(&mut out, "key");
    put_str(&mut out, "dbx_not_a_key");
    out
}

/// CPU time of this thread: unlike wall-clock time it does not count the time the
/// thread waits for a core, which on a shared machine is most of the noise.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime with a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One criterion group of batch bodies holding `n` extra keys each, in thread CPU time.
fn bench_keys(c: &mut Criterion, group: &str, bodies: &[(usize, Vec<u8>)], limits: &Limits) {
    let mut g = c.benchmark_group(group);
    g.sample_size(20);
    for (n, b) in bodies {
        match decode_client(b, limits, NOW) {
            Ok(ClientMessage::Batch(batch)) => assert!(batch.points[0].extra.is_some()),
            other => panic!("bench input does not decode: {other:?}"),
        }
        g.throughput(Throughput::Elements(*n as u64));
        g.bench_function(format!("{n}"), |bencher| {
            bencher.iter_custom(|iters| {
                let start = thread_cpu_time();
                for _ in 0..iters {
                    black_box(decode_client(black_box(b), limits, NOW)).ok();
                }
                thread_cpu_time() - start
            })
        });
    }
    g.finish();
}

fn hostile(c: &mut Criterion) {
    // max_extra_keys lifted so that the whole point is decoded: this measures the
    // decoder's growth, not the limit (which stops a real point at 256 keys).
    let wide = Limits {
        max_extra_keys: usize::MAX,
        ..Limits::default()
    };
    // Measured in thread CPU time (see thread_cpu_time): the ratio of 2N to N keys is
    // what matters, and wall-clock time on a shared machine swings by 3x.
    let one_point: Vec<(usize, Vec<u8>)> = [10_000usize, 20_000, 40_000, 80_000]
        .into_iter()
        .map(|n| (n, batch_with_keys(n)))
        .collect();
    bench_keys(c, "extra_keys", &one_point, &wide);
    // The same numbers of keys as an attacker can send them under the default
    // max_extra_keys: points of 256 keys, as many as the frame holds.
    let defaults = Limits::default();
    let in_points: Vec<(usize, Vec<u8>)> = [20_480usize, 40_960, 81_920]
        .into_iter()
        .map(|n| (n, batch_of(&vec![256; n / 256])))
        .collect();
    bench_keys(c, "extra_keys_in_256_key_points", &in_points, &defaults);
    growth_summary(&wide, &defaults);

    let mut g = c.benchmark_group("hello");
    let h = hello_with_keys(80_000);
    assert!(decode_hello(&h).is_ok());
    g.throughput(Throughput::Bytes(h.len() as u64));
    g.bench_function("decode_hello_80000_keys", |bencher| {
        bencher.iter(|| decode_hello(black_box(&h)))
    });
    let codec = FrameCodec::for_hello(Limits::default().max_hello_bytes);
    let prefix = (h.len() as u32).to_be_bytes();
    g.bench_function("refuse_oversized_at_prefix", |bencher| {
        bencher.iter(|| codec.announced(black_box(&prefix)).is_err())
    });
    g.finish();
}

/// Thread CPU time of one decode of `body`.
fn cpu_of(body: &[u8], limits: &Limits) -> Duration {
    let start = thread_cpu_time();
    black_box(decode_client(black_box(body), limits, NOW)).ok();
    thread_cpu_time() - start
}

/// Builds a batch body holding this many extra keys.
type BodyOfKeys = fn(usize) -> Vec<u8>;

/// Prints time(2N) / time(N) for both shapes, each time the least of 40 rounds that
/// decode every size in turn (interleaved, so that a disturbance on the shared
/// machine hits all sizes alike; the least is the least disturbed run).
fn growth_summary(wide: &Limits, defaults: &Limits) {
    let shapes: [(&str, &Limits, BodyOfKeys); 2] = [
        ("one point", wide, batch_with_keys),
        ("256-key points", defaults, |n| {
            batch_of(&vec![256; n / 256])
        }),
    ];
    let sizes = [10_240usize, 20_480, 40_960, 81_920];
    for (name, limits, body) in shapes {
        let bodies: Vec<Vec<u8>> = sizes.iter().map(|&n| body(n)).collect();
        let mut least = vec![Duration::MAX; sizes.len()];
        for _ in 0..40 {
            for (b, l) in bodies.iter().zip(least.iter_mut()) {
                *l = (*l).min(cpu_of(b, limits));
            }
        }
        let ratios: Vec<String> = least
            .windows(2)
            .zip(sizes.windows(2))
            .map(|(t, n)| {
                let r = t[1].as_secs_f64() / t[0].as_secs_f64();
                format!("{}→{} keys {r:.2}x", n[0], n[1])
            })
            .collect();
        println!(
            "extra keys, {name}: least CPU time {least:?}; growth {}",
            ratios.join(", ")
        );
    }
}

criterion_group!(benches, bench, hostile);
criterion_main!(benches);
