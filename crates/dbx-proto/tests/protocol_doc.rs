//! docs/protocol.md cannot drift from the daemon: every annotated frame of its worked
//! example is decoded by the real decoders (`decode_client`, `decode_server`,
//! `open_datagram`) and compared with the `expect:` line printed beside it; server
//! frames must also be exactly what the daemon's encoder writes; the key-less UDP
//! datagram is opened and its MAC verified by the daemon's own code, and its `kid` and
//! `mac` are recomputed here from the key as well. The code table must name
//! every code the daemon sends.
//!
//! Block format (a fenced block whose info string is `msgpack <kind>`, kind = client,
//! server, udp or udp-mac): a `# title` line, a `# expect: <JSON>` line, then lines of
//! two-digit hex bytes, each optionally followed by `# what they are`.

use chrono::{DateTime, SecondsFormat};
use dbx_core::{Point, RejectCode};
use dbx_proto::{
    decode_client, decode_server, mac, open_datagram, AircraftRef, ClientMessage, DatagramAuth,
    DecodeError, Limits, ServerMessage,
};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// The example's "now": 2025-06-01T12:00:10Z, inside every point's window.
const NOW: i64 = 1_748_779_210_000_000;

#[derive(Debug)]
struct Block {
    kind: String,
    title: String,
    expect: Value,
    bytes: Vec<u8>,
}

fn doc() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn blocks(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(kind) = line.strip_prefix("```msgpack ") else {
            continue;
        };
        let title = lines
            .next()
            .and_then(|l| l.strip_prefix("# "))
            .expect("a # title line");
        let expect = lines
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{title}: no `# expect:` line"));
        let expect = serde_json::from_str(expect)
            .unwrap_or_else(|e| panic!("{title}: expect is not JSON: {e}"));
        let mut bytes = Vec::new();
        for l in lines.by_ref().take_while(|l| !l.starts_with("```")) {
            let hex_part = l.split('#').next().unwrap_or_default();
            for tok in hex_part.split_whitespace() {
                assert!(
                    tok.len() == 2,
                    "{title}: {tok:?} in {l:?} is not one hex byte"
                );
                bytes
                    .push(u8::from_str_radix(tok, 16).unwrap_or_else(|_| panic!("{title}: {l:?}")));
            }
        }
        out.push(Block {
            kind: kind.trim().to_string(),
            title: title.to_string(),
            expect,
            bytes,
        });
    }
    out
}

fn f(v: Option<f32>) -> Option<Value> {
    v.map(|x| json!(f64::from(x)))
}

/// A decoded point with the wire's short keys, present fields only; `ts` in RFC 3339,
/// `extra` as the JSON object that is stored.
fn point_json(p: &Point) -> Value {
    let ts = DateTime::from_timestamp_micros(p.ts_micros).expect("representable ts");
    let mut m = Map::new();
    m.insert(
        "ts".into(),
        json!(ts.to_rfc3339_opts(SecondsFormat::Micros, true)),
    );
    m.insert("seq".into(), json!(p.seq));
    let floats = [
        ("alt", p.alt),
        ("gs", p.gs),
        ("vs", p.vs),
        ("hdg", p.hdg),
        ("roll", p.roll),
        ("pitch", p.pitch),
        ("yaw", p.yaw),
        ("ias", p.ias),
        ("bv", p.bv),
        ("bi", p.bi),
        ("bp", p.bp),
        ("temp", p.temp),
    ];
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    };
    put("lat", p.lat.map(|x| json!(x)));
    put("lon", p.lon.map(|x| json!(x)));
    for (k, v) in floats {
        put(k, f(v));
    }
    let arr = |a: &Option<Vec<f32>>| {
        a.as_ref()
            .map(|a| Value::Array(a.iter().map(|x| json!(f64::from(*x))).collect()))
    };
    put("rpm", arr(&p.rpm));
    put("cs", arr(&p.cs));
    put("fix", p.fix.map(|x| json!(x)));
    put("sats", p.sats.map(|x| json!(x)));
    put(
        "extra",
        p.extra
            .as_deref()
            .map(|e| serde_json::from_str(e).expect("extra is JSON")),
    );
    Value::Object(m)
}

fn aircraft_json(a: &AircraftRef) -> Value {
    match a {
        AircraftRef::Registration(r) => json!(r),
        AircraftRef::Id(id) => json!(id.to_string()),
    }
}

fn client_json(r: Result<ClientMessage, DecodeError>) -> Value {
    match r {
        Ok(ClientMessage::Hello(h)) => {
            json!({"t": "hello", "v": h.v, "key": h.key, "gateway": h.gateway})
        }
        Ok(ClientMessage::Batch(b)) => json!({
            "t": "batch", "seq": b.seq, "aircraft": aircraft_json(&b.aircraft),
            "session": b.session.to_string(),
            "points": b.points.iter().map(point_json).collect::<Vec<_>>(),
        }),
        Ok(ClientMessage::End(e)) => {
            json!({"t": "end", "seq": e.seq, "session": e.session.to_string()})
        }
        Ok(ClientMessage::Ping) => json!({"t": "ping"}),
        Ok(ClientMessage::Bye) => json!({"t": "bye"}),
        Err(DecodeError::Batch { seq, rejection: r }) => {
            let mut n = json!({"seq": seq, "code": r.code.as_str(), "msg": r.msg});
            if let Some(i) = r.index {
                n["index"] = json!(i);
            }
            json!({ "nack": n })
        }
        Err(DecodeError::Connection(r)) => {
            json!({"error": {"code": r.code.as_str(), "msg": r.msg}})
        }
    }
}

fn server_json(m: &ServerMessage) -> Value {
    match m {
        ServerMessage::Welcome {
            v,
            org,
            max_frame,
            max_points,
        } => json!({"t": "welcome", "v": v, "org": org.to_string(),
                    "max_frame": max_frame, "max_points": max_points}),
        ServerMessage::Ack { seq } => json!({"t": "ack", "seq": seq}),
        ServerMessage::Nack {
            seq,
            code,
            msg,
            index,
        } => {
            let mut n = json!({"t": "nack", "seq": seq, "code": code.as_str(), "msg": msg});
            if let Some(i) = index {
                n["index"] = json!(i);
            }
            n
        }
        ServerMessage::Error { code, msg } => {
            json!({"t": "error", "code": code.as_str(), "msg": msg})
        }
        ServerMessage::Pong => json!({"t": "pong"}),
        ServerMessage::Bye => json!({"t": "bye"}),
    }
}

/// The frame's body, after checking its length prefix.
fn body(b: &Block) -> &[u8] {
    assert!(b.bytes.len() >= 4, "{}: no length prefix", b.title);
    let len = u32::from_be_bytes([b.bytes[0], b.bytes[1], b.bytes[2], b.bytes[3]]) as usize;
    assert_eq!(len, b.bytes.len() - 4, "{}: length prefix", b.title);
    &b.bytes[4..]
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let pad = |x: u8| k.iter().map(|b| b ^ x).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

/// The key-less datagram: exactly `kid`, `mac`, `body`; both recomputed from the key.
fn check_keyless_datagram(b: &Block) {
    let mut rd = b.bytes.as_slice();
    assert_eq!(
        rmp::decode::read_map_len(&mut rd).unwrap(),
        3,
        "{}",
        b.title
    );
    let mut fields = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let mut key = [0u8; 8];
        let k = rmp::decode::read_str(&mut rd, &mut key)
            .expect("a key")
            .to_string();
        let value = if k == "kid" {
            let mut s = [0u8; 64];
            rmp::decode::read_str(&mut rd, &mut s)
                .unwrap()
                .as_bytes()
                .to_vec()
        } else {
            let n = rmp::decode::read_bin_len(&mut rd).unwrap() as usize;
            let (v, rest) = rd.split_at(n);
            rd = rest;
            v.to_vec()
        };
        fields.insert(k, value);
    }
    assert!(rd.is_empty(), "{}: trailing bytes", b.title);
    let key = b.expect["key"].as_str().expect("expect names the key");
    let hash = Sha256::digest(key.as_bytes());
    let kid = &hex::encode(hash)[..16];
    assert_eq!(fields["kid"], kid.as_bytes(), "{}: kid", b.title);
    assert_eq!(b.expect["kid"], kid);
    let mac = &hmac_sha256(&hash, &fields["body"])[..16];
    assert_eq!(fields["mac"], mac, "{}: mac", b.title);
    assert_eq!(b.expect["mac"], hex::encode(mac));
    let body = client_json(decode_client(&fields["body"], &Limits::default(), NOW));
    assert_eq!(body, b.expect["body"], "{}: body", b.title);

    // And the daemon's own path: authenticate first, then decode the body.
    let envelope = open_datagram(&b.bytes).unwrap_or_else(|e| panic!("{}: {e}", b.title));
    let DatagramAuth::Mac {
        kid,
        mac: tag,
        body,
    } = envelope.auth
    else {
        panic!("{}: not read as the kid/mac/body form", b.title)
    };
    let hash = mac::key_hash(key);
    assert_eq!(kid, mac::key_id(&hash), "{}: kid", b.title);
    assert!(mac::verify_body_mac(&hash, body, &tag), "{}: mac", b.title);
    let d = envelope
        .decode(&Limits::default(), NOW)
        .unwrap_or_else(|e| panic!("{}: {e}", b.title));
    assert_eq!(
        d.points.len(),
        b.expect["body"]["points"].as_array().unwrap().len()
    );
}

#[test]
fn the_worked_example_decodes_as_the_page_says() {
    let doc = doc();
    let blocks = blocks(&doc);
    let limits = Limits::default();
    let mut seen = Vec::new();
    for b in &blocks {
        let got = match b.kind.as_str() {
            "client" => client_json(decode_client(body(b), &limits, NOW)),
            "server" => {
                let msg = decode_server(body(b)).unwrap_or_else(|e| panic!("{}: {e}", b.title));
                let mut again = bytes::BytesMut::new();
                dbx_proto::encode_server(&msg, &mut again);
                assert_eq!(
                    again.as_ref(),
                    b.bytes.as_slice(),
                    "{}: not the daemon's bytes",
                    b.title
                );
                server_json(&msg)
            }
            "udp" => {
                let envelope =
                    open_datagram(&b.bytes).unwrap_or_else(|e| panic!("{}: {e}", b.title));
                let DatagramAuth::Key(key) = envelope.auth else {
                    panic!("{}: not read as the key form", b.title)
                };
                let d = envelope
                    .decode(&limits, NOW)
                    .unwrap_or_else(|e| panic!("{}: {e}", b.title));
                json!({
                    "key": key, "seq": d.seq, "aircraft": aircraft_json(&d.aircraft),
                    "session": d.session.to_string(),
                    "points": d.points.iter().map(point_json).collect::<Vec<_>>(),
                })
            }
            "udp-mac" => {
                check_keyless_datagram(b);
                b.expect.clone()
            }
            other => panic!("{}: unknown block kind {other:?}", b.title),
        };
        assert_eq!(got, b.expect, "{}", b.title);
        // A message type, or what the decoder answered (`nack`, `error`); UDP by kind.
        let what = got["t"]
            .as_str()
            .or_else(|| got.as_object()?.keys().next().map(String::as_str))
            .filter(|_| !b.kind.starts_with("udp"))
            .unwrap_or_default();
        seen.push(format!("{} {what}", b.kind).trim().to_string());
    }
    // The example covers every message in both directions, a refusal of each kind, and UDP.
    for want in [
        "client hello",
        "client batch",
        "client nack",
        "client end",
        "client ping",
        "client bye",
        "server welcome",
        "server ack",
        "server nack",
        "server error",
        "server pong",
        "server bye",
        "udp",
        "udp-mac",
    ] {
        assert!(
            seen.iter().any(|s| s == want),
            "no {want:?} block in docs/protocol.md: {seen:?}"
        );
    }
}

#[test]
fn the_code_table_names_every_code() {
    let doc = doc();
    let codes = [
        "bad_frame",
        "frame_too_large",
        "handshake_timeout",
        "unauthorized",
        "unsupported_version",
        "idle_timeout",
        "protocol",
        "server_shutdown",
        "too_many_connections",
        "invalid_batch",
        "invalid_point",
        "unknown_aircraft",
        "foreign_session",
        "out_of_range",
        "rejected",
        "session_closed",
    ];
    for c in codes {
        let code = RejectCode::parse(c).unwrap_or_else(|| panic!("{c} is not a code"));
        assert_eq!(code.as_str(), c);
        let kind = if code.is_nack() { "nack" } else { "error" };
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{c}` |")))
            .unwrap_or_else(|| panic!("docs/protocol.md has no code table row for {c}"));
        assert!(row.contains(&format!("| {kind}")), "{c} is a {kind}: {row}");
    }
}
