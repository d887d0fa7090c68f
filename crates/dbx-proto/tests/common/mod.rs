//! A tiny MessagePack value builder for tests: lets a test write exactly the bytes a
//! (possibly misbehaving) gateway would send, with `rmp::encode` underneath.
#![allow(dead_code)]

use bytes::BytesMut;
use dbx_proto::Limits;

/// 2026-09-21T… in microseconds: "now" for every test.
pub const NOW: i64 = 1_790_000_000_000_000;

/// A MessagePack value.
#[derive(Debug, Clone)]
pub enum V {
    Nil,
    B(bool),
    U(u64),
    I(i64),
    F32(f32),
    F64(f64),
    S(String),
    RawStr(Vec<u8>),
    Bin(Vec<u8>),
    A(Vec<V>),
    M(Vec<(V, V)>),
    Ext(i8, Vec<u8>),
    /// Bytes written as they are (already MessagePack, or deliberately not).
    Raw(Vec<u8>),
}

pub fn s(x: &str) -> V {
    V::S(x.to_owned())
}

/// A map with string keys.
pub fn m(entries: Vec<(&str, V)>) -> V {
    V::M(entries.into_iter().map(|(k, v)| (s(k), v)).collect())
}

pub fn enc_into(v: &V, out: &mut Vec<u8>) {
    use rmp::encode::*;
    match v {
        V::Nil => write_nil(out).unwrap(),
        V::B(b) => write_bool(out, *b).unwrap(),
        V::U(u) => {
            write_uint(out, *u).unwrap();
        }
        V::I(i) => {
            write_sint(out, *i).unwrap();
        }
        V::F32(f) => write_f32(out, *f).unwrap(),
        V::F64(f) => write_f64(out, *f).unwrap(),
        V::S(x) => write_str(out, x).unwrap(),
        V::RawStr(b) => {
            write_str_len(out, b.len() as u32).unwrap();
            out.extend_from_slice(b);
        }
        V::Bin(b) => write_bin(out, b).unwrap(),
        V::A(a) => {
            write_array_len(out, a.len() as u32).unwrap();
            a.iter().for_each(|x| enc_into(x, out));
        }
        V::M(e) => {
            write_map_len(out, e.len() as u32).unwrap();
            for (k, x) in e {
                enc_into(k, out);
                enc_into(x, out);
            }
        }
        V::Ext(t, d) => {
            write_ext_meta(out, d.len() as u32, *t).unwrap();
            out.extend_from_slice(d);
        }
        V::Raw(b) => out.extend_from_slice(b),
    }
}

pub fn enc(v: &V) -> Vec<u8> {
    let mut out = Vec::new();
    enc_into(v, &mut out);
    out
}

/// A timestamp extension of 32 bits (whole seconds).
pub fn ts32(secs: u32) -> V {
    V::Ext(-1, secs.to_be_bytes().to_vec())
}

/// A timestamp extension of 64 bits.
pub fn ts64(secs: u64, nanos: u32) -> V {
    V::Ext(-1, ((u64::from(nanos) << 34) | secs).to_be_bytes().to_vec())
}

/// A timestamp extension of 96 bits.
pub fn ts96(secs: i64, nanos: u32) -> V {
    let mut d = nanos.to_be_bytes().to_vec();
    d.extend_from_slice(&secs.to_be_bytes());
    V::Ext(-1, d)
}

pub const SESSION: &str = "6f1c2a3e-9b1d-4c55-8e2a-0d3b4c5e6f70";

/// A batch message with `points` and the given seq.
pub fn batch(seq: u64, points: Vec<V>) -> V {
    m(vec![
        ("t", s("batch")),
        ("seq", V::U(seq)),
        ("aircraft", s("N123AB")),
        ("session", s(SESSION)),
        ("points", V::A(points)),
    ])
}

/// A minimal valid map-form point at NOW.
pub fn pt(seq: u64) -> V {
    m(vec![("ts", V::I(NOW)), ("seq", V::U(seq))])
}

/// A valid point with extra entries appended.
pub fn pt_with(seq: u64, extra: Vec<(&str, V)>) -> V {
    let mut e = vec![("ts", V::I(NOW)), ("seq", V::U(seq))];
    e.extend(extra);
    m(e)
}

pub fn limits() -> Limits {
    Limits::default()
}

pub fn frame(body: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    dbx_proto::write_frame(&mut b, body);
    b
}
