//! The binary COPY writer: turns points into PostgreSQL's `COPY ... FROM STDIN
//! (FORMAT binary)` stream (signature, flags, header extension, one tuple per point,
//! the −1 trailer) without going through `ToSql` trait objects.
//!
//! Every column type of `flight_telemetry` is fixed (docs/schema.md, "flight_telemetry"), so each field is a
//! length word and a big-endian payload written straight into one `BytesMut`. That
//! buffer is kept by the encoder and reused from flush to flush: [`CopyEncoder::finish`]
//! hands out the encoded stream as frozen `Bytes`, and once the COPY has consumed and
//! dropped them, the next [`CopyEncoder::begin`] reclaims the same allocation.
//! `benches/copy_encode.rs` compares this with tokio-postgres's `BinaryCopyInWriter`.

use bytes::{BufMut, Bytes, BytesMut};
use dbx_core::Point;
use uuid::Uuid;

/// The binary COPY signature (11 bytes).
pub const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// The column list of every COPY and staging INSERT, in the order of docs/schema.md ("flight_telemetry").
pub const COLUMNS: &str = "org_id, aircraft_id, session_id, ts, seq, latitude, longitude, \
altitude_m, ground_speed_mps, vertical_speed_mps, heading_deg, roll_deg, pitch_deg, yaw_deg, \
airspeed_mps, battery_voltage, battery_current, battery_remaining_pct, motor_rpm, \
control_surfaces, gps_fix, satellites, temperature_c, extra";

/// Number of columns per row.
pub const COLUMN_COUNT: i16 = 24;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 00:00:00 UTC).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// PostgreSQL's OID of `float4`, the element type of `real[]`.
const FLOAT4_OID: i32 = 700;

/// Writes binary COPY streams of `flight_telemetry` rows into a reused buffer.
#[derive(Debug)]
pub struct CopyEncoder {
    buf: BytesMut,
    capacity: usize,
    rows: usize,
}

impl CopyEncoder {
    /// An encoder whose buffer starts with room for `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        CopyEncoder {
            buf: BytesMut::with_capacity(capacity),
            capacity,
            rows: 0,
        }
    }

    /// Starts a new stream: empties the buffer (reclaiming its allocation when the
    /// previous stream's `Bytes` are gone) and writes the header.
    pub fn begin(&mut self) {
        self.buf.clear();
        self.buf.reserve(self.capacity.max(19));
        self.buf.put_slice(SIGNATURE);
        self.buf.put_i32(0); // flags: no OIDs
        self.buf.put_i32(0); // header extension length
        self.rows = 0;
    }

    /// Rows written since [`begin`](Self::begin).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes written since [`begin`](Self::begin).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when nothing, not even a header, has been written.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends one row: the three identifiers of its batch, then the point's fields.
    pub fn push(&mut self, org: &Uuid, aircraft: &Uuid, session: &Uuid, p: &Point) {
        let b = &mut self.buf;
        b.reserve(p.approx_copy_bytes());
        b.put_i16(COLUMN_COUNT);
        put_uuid(b, org);
        put_uuid(b, aircraft);
        put_uuid(b, session);
        b.put_i32(8);
        b.put_i64(p.ts_micros.saturating_sub(PG_EPOCH_OFFSET_MICROS));
        b.put_i32(8);
        b.put_i64(p.seq);
        put_f64(b, p.lat);
        put_f64(b, p.lon);
        put_f32(b, p.alt);
        put_f32(b, p.gs);
        put_f32(b, p.vs);
        put_f32(b, p.hdg);
        put_f32(b, p.roll);
        put_f32(b, p.pitch);
        put_f32(b, p.yaw);
        put_f32(b, p.ias);
        put_f32(b, p.bv);
        put_f32(b, p.bi);
        put_f32(b, p.bp);
        put_f32_array(b, p.rpm.as_deref());
        put_f32_array(b, p.cs.as_deref());
        put_i16(b, p.fix);
        put_i16(b, p.sats);
        put_f32(b, p.temp);
        match &p.extra {
            None => b.put_i32(-1),
            Some(text) => {
                // An `extra` too long for a length word cannot come from a frame (1 MiB
                // limit); were it to, the server would reject the malformed row as data.
                b.put_i32(i32::try_from(text.len() + 1).unwrap_or(i32::MAX));
                b.put_u8(1); // jsonb binary format version
                b.put_slice(text.as_bytes());
            }
        }
        self.rows += 1;
    }

    /// Writes the trailer and hands out the stream; the encoder is ready for
    /// [`begin`](Self::begin) again.
    pub fn finish(&mut self) -> Bytes {
        self.buf.put_i16(-1);
        self.buf.split().freeze()
    }
}

/// Size of the CopyData messages a stream is sent in. One message of several MiB
/// would make the server receive it whole before parsing a row; 64 KiB pieces (zero-copy
/// slices of the same `Bytes`) let it parse while the rest is still on the wire.
pub const SEND_CHUNK: usize = 64 * 1024;

/// Zero-copy pieces of `data` of at most [`SEND_CHUNK`] bytes, in order.
pub fn send_chunks(data: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    (0..data.len())
        .step_by(SEND_CHUNK)
        .map(move |at| data.slice(at..(at + SEND_CHUNK).min(data.len())))
}

fn put_uuid(b: &mut BytesMut, u: &Uuid) {
    b.put_i32(16);
    b.put_slice(u.as_bytes());
}

fn put_f64(b: &mut BytesMut, v: Option<f64>) {
    match v {
        Some(v) => {
            b.put_i32(8);
            b.put_f64(v);
        }
        None => b.put_i32(-1),
    }
}

fn put_f32(b: &mut BytesMut, v: Option<f32>) {
    match v {
        Some(v) => {
            b.put_i32(4);
            b.put_f32(v);
        }
        None => b.put_i32(-1),
    }
}

fn put_i16(b: &mut BytesMut, v: Option<i16>) {
    match v {
        Some(v) => {
            b.put_i32(2);
            b.put_i16(v);
        }
        None => b.put_i32(-1),
    }
}

/// `real[]` in array_send format: ndim, has-null flag, element OID, then per dimension
/// its length and lower bound, then each element as length word + payload. An empty
/// array is ndim 0 with no dimension entries, as PostgreSQL itself sends it.
fn put_f32_array(b: &mut BytesMut, v: Option<&[f32]>) {
    let Some(v) = v else {
        b.put_i32(-1);
        return;
    };
    if v.is_empty() {
        b.put_i32(12);
        b.put_i32(0);
        b.put_i32(0);
        b.put_i32(FLOAT4_OID);
        return;
    }
    // At most 16 elements arrive from the wire; the cast cannot truncate in practice.
    let n = v.len() as i32;
    b.put_i32(20 + 8 * n);
    b.put_i32(1); // ndim
    b.put_i32(0); // no NULL elements
    b.put_i32(FLOAT4_OID);
    b.put_i32(n);
    b.put_i32(1); // lower bound
    for x in v {
        b.put_i32(4);
        b.put_f32(*x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut v = SIGNATURE.to_vec();
        v.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        v
    }

    #[test]
    fn empty_stream_is_header_and_trailer() {
        let mut e = CopyEncoder::new(64);
        e.begin();
        let out = e.finish();
        let mut want = header();
        want.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(&out[..], &want[..]);
        assert_eq!(&out[..11], b"PGCOPY\n\xff\r\n\0");
    }

    #[test]
    fn minimal_row_exact_bytes() {
        let org = Uuid::from_bytes([1; 16]);
        let air = Uuid::from_bytes([2; 16]);
        let ses = Uuid::from_bytes([3; 16]);
        // 2000-01-01T00:00:01Z = one second after the PostgreSQL epoch.
        let p = Point::new(PG_EPOCH_OFFSET_MICROS + 1_000_000, 7);
        let mut e = CopyEncoder::new(0);
        e.begin();
        e.push(&org, &air, &ses, &p);
        let out = e.finish();

        let mut want = header();
        want.extend_from_slice(&24i16.to_be_bytes());
        for id in [[1u8; 16], [2; 16], [3; 16]] {
            want.extend_from_slice(&16i32.to_be_bytes());
            want.extend_from_slice(&id);
        }
        want.extend_from_slice(&8i32.to_be_bytes());
        want.extend_from_slice(&1_000_000i64.to_be_bytes());
        want.extend_from_slice(&8i32.to_be_bytes());
        want.extend_from_slice(&7i64.to_be_bytes());
        for _ in 0..19 {
            want.extend_from_slice(&(-1i32).to_be_bytes());
        }
        want.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(&out[..], &want[..]);
        assert_eq!(e.rows(), 1);
    }

    #[test]
    fn full_row_exact_bytes() {
        let id = Uuid::nil();
        let p = Point {
            ts_micros: 0, // the Unix epoch: negative in PostgreSQL's epoch
            seq: -1,
            lat: Some(1.5),
            lon: Some(-2.25),
            alt: Some(3.0),
            gs: Some(4.0),
            vs: Some(5.0),
            hdg: Some(6.0),
            roll: Some(7.0),
            pitch: Some(8.0),
            yaw: Some(9.0),
            ias: Some(10.0),
            bv: Some(11.0),
            bi: Some(12.0),
            bp: Some(13.0),
            rpm: Some(vec![1.0, 2.0]),
            cs: Some(vec![]),
            fix: Some(3),
            sats: Some(255),
            temp: Some(-40.0),
            extra: Some("{\"a\":1}".into()),
        };
        let mut e = CopyEncoder::new(16);
        e.begin();
        e.push(&id, &id, &id, &p);
        let out = e.finish();

        let mut w = header();
        w.extend_from_slice(&24i16.to_be_bytes());
        for _ in 0..3 {
            w.extend_from_slice(&16i32.to_be_bytes());
            w.extend_from_slice(&[0; 16]);
        }
        w.extend_from_slice(&8i32.to_be_bytes());
        w.extend_from_slice(&(-PG_EPOCH_OFFSET_MICROS).to_be_bytes());
        w.extend_from_slice(&8i32.to_be_bytes());
        w.extend_from_slice(&(-1i64).to_be_bytes());
        for f in [1.5f64, -2.25] {
            w.extend_from_slice(&8i32.to_be_bytes());
            w.extend_from_slice(&f.to_be_bytes());
        }
        for f in 3..=13 {
            w.extend_from_slice(&4i32.to_be_bytes());
            w.extend_from_slice(&(f as f32).to_be_bytes());
        }
        // rpm: {1,2}
        w.extend_from_slice(&36i32.to_be_bytes());
        for x in [1i32, 0, 700, 2, 1] {
            w.extend_from_slice(&x.to_be_bytes());
        }
        for f in [1.0f32, 2.0] {
            w.extend_from_slice(&4i32.to_be_bytes());
            w.extend_from_slice(&f.to_be_bytes());
        }
        // cs: {} (ndim 0)
        w.extend_from_slice(&12i32.to_be_bytes());
        for x in [0i32, 0, 700] {
            w.extend_from_slice(&x.to_be_bytes());
        }
        w.extend_from_slice(&2i32.to_be_bytes());
        w.extend_from_slice(&3i16.to_be_bytes());
        w.extend_from_slice(&2i32.to_be_bytes());
        w.extend_from_slice(&255i16.to_be_bytes());
        w.extend_from_slice(&4i32.to_be_bytes());
        w.extend_from_slice(&(-40.0f32).to_be_bytes());
        w.extend_from_slice(&8i32.to_be_bytes());
        w.push(1);
        w.extend_from_slice(b"{\"a\":1}");
        w.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(&out[..], &w[..]);
        // the approximate size used for max_batch_bytes is an upper bound
        assert!(p.approx_copy_bytes() >= out.len() - 21);
    }

    #[test]
    fn buffer_is_reused_between_flushes() {
        let id = Uuid::nil();
        let mut e = CopyEncoder::new(1 << 16);
        e.begin();
        for i in 0..100 {
            e.push(&id, &id, &id, &Point::new(i, i));
        }
        let first = e.finish();
        let first_ptr = first.as_ptr();
        drop(first);
        e.begin();
        e.push(&id, &id, &id, &Point::new(1, 1));
        let second = e.finish();
        assert_eq!(second.as_ptr(), first_ptr, "allocation reclaimed");
    }
}
