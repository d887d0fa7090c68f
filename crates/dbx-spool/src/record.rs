//! The spool's record payload: one [`TelemetryBatch`](dbx_core::TelemetryBatch)'s
//! organization, aircraft, session and points in a compact little-endian binary form
//! of our own (the batcher parses no wire bytes, so not MessagePack).
//!
//! Layout, version 2 (version 1, written by earlier releases, lacks `accepted` and
//! is still read):
//! ```text
//! u8 version (2) | i64 accepted (unix µs) | 16 org | 16 aircraft | 16 session
//!   | u32 n_points | n × point
//! point: i64 ts_micros | i64 seq | u32 presence mask (bit i = optional field i)
//!        | the present fields in order: lat f64, lon f64, alt..bp f32 × 11,
//!          rpm (u16 n, n × f32), cs (u16 n, n × f32), fix i16, sats i16, temp f32,
//!          extra (u32 len, UTF-8 bytes)
//! ```
//! A gateway's `end` of a flight session (protocol 1.1) has no aircraft and no
//! points; it is written as version 3:
//! ```text
//! u8 version (3) | i64 accepted (unix µs) | 16 org | 16 session
//! ```
//! Floats are stored as their bit patterns, so a round trip is exact. The decoder
//! never allocates more than the payload it was given can justify: every count is
//! checked against the bytes left before a vector is reserved.

use dbx_core::Point;
use uuid::Uuid;

/// The payload format version this code writes.
pub const PAYLOAD_VERSION: u8 = 2;
/// The first format, without `accepted`: still read, never written.
const PAYLOAD_VERSION_1: u8 = 1;
/// The version byte of a session end.
pub const END_VERSION: u8 = 3;

/// Smallest encoded point: ts, seq and the presence mask.
const MIN_POINT_BYTES: usize = 8 + 8 + 4;

/// Optional fields, in mask-bit order.
const OPTIONAL_FIELDS: u32 = 19;

/// A batch as read back from the spool.
#[derive(Debug, Clone, PartialEq)]
pub struct SpooledBatch {
    /// The organization the batch was accepted for.
    pub org_id: Uuid,
    /// The aircraft.
    pub aircraft_id: Uuid,
    /// The flight session.
    pub session_id: Uuid,
    /// The points, in the order they were received.
    pub points: Vec<Point>,
    /// When the daemon accepted the batch (unix µs); `None` in version 1 records.
    pub accepted_micros: Option<i64>,
    /// A session end (no points, nil aircraft).
    pub ends_session: bool,
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload ended inside a field.
    #[error("payload truncated at byte {0}")]
    Truncated(usize),
    /// A version this code does not know.
    #[error("unknown payload version {0}")]
    Version(u8),
    /// A count larger than the bytes left could hold.
    #[error("{what} count {count} cannot fit in the {left} bytes left")]
    Count {
        /// Which count.
        what: &'static str,
        /// Its value.
        count: usize,
        /// Bytes left in the payload.
        left: usize,
    },
    /// Bits set in a point's presence mask that name no field.
    #[error("unknown presence bits {0:#x}")]
    Mask(u32),
    /// `extra` is not UTF-8.
    #[error("extra is not UTF-8")]
    Utf8,
    /// Bytes after the last point.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// Appends the payload of one batch to `out`; `accepted_micros` is when the daemon
/// accepted it (unix µs), what `dbx_spool_oldest_record_age_seconds` measures from.
pub fn encode_batch(
    org_id: Uuid,
    aircraft_id: Uuid,
    session_id: Uuid,
    points: &[Point],
    accepted_micros: i64,
    out: &mut Vec<u8>,
) {
    out.reserve(1 + 8 + 48 + 4 + points.len() * 64);
    out.push(PAYLOAD_VERSION);
    out.extend_from_slice(&accepted_micros.to_le_bytes());
    out.extend_from_slice(org_id.as_bytes());
    out.extend_from_slice(aircraft_id.as_bytes());
    out.extend_from_slice(session_id.as_bytes());
    out.extend_from_slice(&(points.len() as u32).to_le_bytes());
    for p in points {
        encode_point(p, out);
    }
}

/// Appends the payload of a session end.
pub fn encode_end(org_id: Uuid, session_id: Uuid, accepted_micros: i64, out: &mut Vec<u8>) {
    out.push(END_VERSION);
    out.extend_from_slice(&accepted_micros.to_le_bytes());
    out.extend_from_slice(org_id.as_bytes());
    out.extend_from_slice(session_id.as_bytes());
}

fn encode_point(p: &Point, out: &mut Vec<u8>) {
    out.extend_from_slice(&p.ts_micros.to_le_bytes());
    out.extend_from_slice(&p.seq.to_le_bytes());
    let f32s = [
        p.alt, p.gs, p.vs, p.hdg, p.roll, p.pitch, p.yaw, p.ias, p.bv, p.bi, p.bp,
    ];
    let mut mask = 0u32;
    let mut bit = |present: bool, i: u32| {
        if present {
            mask |= 1 << i;
        }
    };
    bit(p.lat.is_some(), 0);
    bit(p.lon.is_some(), 1);
    for (i, v) in f32s.iter().enumerate() {
        bit(v.is_some(), 2 + i as u32);
    }
    bit(p.rpm.is_some(), 13);
    bit(p.cs.is_some(), 14);
    bit(p.fix.is_some(), 15);
    bit(p.sats.is_some(), 16);
    bit(p.temp.is_some(), 17);
    bit(p.extra.is_some(), 18);
    out.extend_from_slice(&mask.to_le_bytes());
    for v in [p.lat, p.lon].into_iter().flatten() {
        out.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    for v in f32s.into_iter().flatten() {
        out.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    for a in [&p.rpm, &p.cs].into_iter().flatten() {
        // The listener caps arrays at 16; u16 keeps any Vec a caller could build
        // representable up to 65 535 and the encoder never writes a wrong count.
        let n = a.len().min(u16::MAX as usize);
        out.extend_from_slice(&(n as u16).to_le_bytes());
        for v in &a[..n] {
            out.extend_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    for v in [p.fix, p.sats].into_iter().flatten() {
        out.extend_from_slice(&v.to_le_bytes());
    }
    if let Some(v) = p.temp {
        out.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    if let Some(e) = &p.extra {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e.as_bytes());
    }
}

/// A cursor over a payload; every read is bounds-checked.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeError::Truncated(self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn f32(&mut self) -> Result<f32, DecodeError> {
        Ok(f32::from_bits(self.u32()?))
    }
    fn f64(&mut self) -> Result<f64, DecodeError> {
        Ok(f64::from_bits(u64::from_le_bytes(self.array()?)))
    }
    fn uuid(&mut self) -> Result<Uuid, DecodeError> {
        Ok(Uuid::from_bytes(self.array()?))
    }

    /// A count of items of at least `item` bytes each, refused when the bytes left
    /// cannot hold them (this is what bounds every allocation).
    fn count(&mut self, n: usize, item: usize, what: &'static str) -> Result<usize, DecodeError> {
        if n.saturating_mul(item) > self.left() {
            return Err(DecodeError::Count {
                what,
                count: n,
                left: self.left(),
            });
        }
        Ok(n)
    }
}

/// Bytes [`plausible_start`] looks at.
pub const PLAUSIBLE_PREFIX_BYTES: usize = 9;

/// Whether `prefix` (a payload's first bytes) could start a record this code
/// writes: version 2 or 3 and an acceptance time between 2000 and 2200. The spool
/// reader's resync uses it to skip almost every position of damaged bytes without
/// a CRC over them (version 1 records are never found by a resync).
pub fn plausible_start(prefix: &[u8]) -> bool {
    const Y2000: i64 = 946_684_800_000_000;
    const Y2200: i64 = 7_258_118_400_000_000;
    let Some(&[v, a0, a1, a2, a3, a4, a5, a6, a7]) = prefix.first_chunk::<9>() else {
        return false;
    };
    let accepted = i64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]);
    (v == PAYLOAD_VERSION || v == END_VERSION) && (Y2000..Y2200).contains(&accepted)
}

/// Decodes one payload written by [`encode_batch`] or [`encode_end`].
pub fn decode_batch(payload: &[u8]) -> Result<SpooledBatch, DecodeError> {
    let mut c = Cursor {
        buf: payload,
        pos: 0,
    };
    let accepted_micros = match c.array::<1>()?[0] {
        PAYLOAD_VERSION => Some(c.i64()?),
        PAYLOAD_VERSION_1 => None,
        END_VERSION => return decode_end(&mut c),
        v => return Err(DecodeError::Version(v)),
    };
    let org_id = c.uuid()?;
    let aircraft_id = c.uuid()?;
    let session_id = c.uuid()?;
    let n = c.u32()? as usize;
    let n = c.count(n, MIN_POINT_BYTES, "point")?;
    let mut points = Vec::with_capacity(n);
    for _ in 0..n {
        points.push(decode_point(&mut c)?);
    }
    if c.left() != 0 {
        return Err(DecodeError::Trailing(c.left()));
    }
    Ok(SpooledBatch {
        org_id,
        aircraft_id,
        session_id,
        points,
        accepted_micros,
        ends_session: false,
    })
}

fn decode_end(c: &mut Cursor<'_>) -> Result<SpooledBatch, DecodeError> {
    let accepted_micros = Some(c.i64()?);
    let org_id = c.uuid()?;
    let session_id = c.uuid()?;
    if c.left() != 0 {
        return Err(DecodeError::Trailing(c.left()));
    }
    Ok(SpooledBatch {
        org_id,
        aircraft_id: Uuid::nil(),
        session_id,
        points: Vec::new(),
        accepted_micros,
        ends_session: true,
    })
}

fn decode_point(c: &mut Cursor<'_>) -> Result<Point, DecodeError> {
    let mut p = Point::new(c.i64()?, c.i64()?);
    let mask = c.u32()?;
    if mask >> OPTIONAL_FIELDS != 0 {
        return Err(DecodeError::Mask(mask));
    }
    let has = |i: u32| mask & (1 << i) != 0;
    if has(0) {
        p.lat = Some(c.f64()?);
    }
    if has(1) {
        p.lon = Some(c.f64()?);
    }
    let f32s = [
        &mut p.alt,
        &mut p.gs,
        &mut p.vs,
        &mut p.hdg,
        &mut p.roll,
        &mut p.pitch,
        &mut p.yaw,
        &mut p.ias,
        &mut p.bv,
        &mut p.bi,
        &mut p.bp,
    ];
    for (i, slot) in f32s.into_iter().enumerate() {
        if has(2 + i as u32) {
            *slot = Some(c.f32()?);
        }
    }
    for (bit, slot) in [(13, &mut p.rpm), (14, &mut p.cs)] {
        if has(bit) {
            let n = c.u16()? as usize;
            let n = c.count(n, 4, "array")?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(c.f32()?);
            }
            *slot = Some(v);
        }
    }
    if has(15) {
        p.fix = Some(c.i16()?);
    }
    if has(16) {
        p.sats = Some(c.i16()?);
    }
    if has(17) {
        p.temp = Some(c.f32()?);
    }
    if has(18) {
        let n = c.u32()? as usize;
        let n = c.count(n, 1, "extra byte")?;
        let bytes = c.take(n)?;
        let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::Utf8)?;
        p.extra = Some(s.to_owned());
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn opt<T: std::fmt::Debug + Clone + 'static>(
        s: impl Strategy<Value = T> + 'static,
    ) -> impl Strategy<Value = Option<T>> {
        proptest::option::of(s)
    }

    fn any_f32() -> impl Strategy<Value = f32> {
        any::<u32>().prop_map(f32::from_bits)
    }

    fn any_f64() -> impl Strategy<Value = f64> {
        any::<u64>().prop_map(f64::from_bits)
    }

    prop_compose! {
        fn any_point()(
            ts in any::<i64>(), seq in any::<i64>(),
            lat in opt(any_f64()), lon in opt(any_f64()),
            f in proptest::collection::vec(opt(any_f32()), 12),
            rpm in opt(proptest::collection::vec(any_f32(), 0..17)),
            cs in opt(proptest::collection::vec(any_f32(), 0..17)),
            fix in opt(any::<i16>()), sats in opt(any::<i16>()),
            extra in opt(".{0,40}"),
        ) -> Point {
            Point {
                ts_micros: ts, seq, lat, lon,
                alt: f[0], gs: f[1], vs: f[2], hdg: f[3], roll: f[4], pitch: f[5],
                yaw: f[6], ias: f[7], bv: f[8], bi: f[9], bp: f[10],
                rpm, cs, fix, sats, temp: f[11], extra,
            }
        }
    }

    /// Bit-exact comparison (NaN payloads included), which `PartialEq` on floats is not.
    fn same(a: &[Point], b: &[Point]) -> bool {
        let mut ea = Vec::new();
        let mut eb = Vec::new();
        encode_batch(Uuid::nil(), Uuid::nil(), Uuid::nil(), a, 0, &mut ea);
        encode_batch(Uuid::nil(), Uuid::nil(), Uuid::nil(), b, 0, &mut eb);
        ea == eb && a.len() == b.len()
    }

    proptest! {
        #[test]
        fn round_trip(points in proptest::collection::vec(any_point(), 0..20),
                      ids in any::<[u128; 3]>(), accepted in any::<i64>()) {
            let (o, a, s) = (Uuid::from_u128(ids[0]), Uuid::from_u128(ids[1]), Uuid::from_u128(ids[2]));
            let mut buf = Vec::new();
            encode_batch(o, a, s, &points, accepted, &mut buf);
            let back = decode_batch(&buf).unwrap();
            prop_assert_eq!((back.org_id, back.aircraft_id, back.session_id), (o, a, s));
            prop_assert_eq!(back.accepted_micros, Some(accepted));
            prop_assert!(same(&back.points, &points));
            // Field by field where equality is meaningful.
            for (x, y) in back.points.iter().zip(&points) {
                prop_assert_eq!(x.seq, y.seq);
                prop_assert_eq!(x.ts_micros, y.ts_micros);
                prop_assert_eq!(&x.extra, &y.extra);
                prop_assert_eq!(x.rpm.as_ref().map(Vec::len), y.rpm.as_ref().map(Vec::len));
                prop_assert_eq!(x.fix, y.fix);
                prop_assert_eq!(x.lat.is_none(), y.lat.is_none());
            }
        }

        #[test]
        fn every_truncation_is_an_error(points in proptest::collection::vec(any_point(), 1..5)) {
            let mut buf = Vec::new();
            encode_batch(Uuid::nil(), Uuid::nil(), Uuid::nil(), &points, 7, &mut buf);
            for cut in 0..buf.len() {
                prop_assert!(decode_batch(&buf[..cut]).is_err());
            }
        }
    }

    #[test]
    fn an_all_null_point_is_small_and_exact() {
        let p = Point::new(1_700_000_000_000_000, 42);
        let mut buf = Vec::new();
        encode_batch(
            Uuid::nil(),
            Uuid::nil(),
            Uuid::nil(),
            std::slice::from_ref(&p),
            9,
            &mut buf,
        );
        assert_eq!(buf.len(), 1 + 8 + 48 + 4 + MIN_POINT_BYTES);
        assert_eq!(decode_batch(&buf).unwrap().points, vec![p]);
    }

    /// Records written by the first release (version 1, no `accepted`) still replay.
    #[test]
    fn version_1_records_are_still_read() {
        let p = Point::new(1_700_000_000_000_000, 42);
        let mut v2 = Vec::new();
        encode_batch(
            Uuid::from_u128(1),
            Uuid::from_u128(2),
            Uuid::from_u128(3),
            std::slice::from_ref(&p),
            9,
            &mut v2,
        );
        // Version 1 is version 2 without the eight bytes of `accepted`.
        let mut v1 = vec![PAYLOAD_VERSION_1];
        v1.extend_from_slice(&v2[9..]);
        let back = decode_batch(&v1).unwrap();
        assert_eq!(back.accepted_micros, None);
        assert_eq!(back.session_id, Uuid::from_u128(3));
        assert_eq!(back.points, vec![p]);
        assert_eq!(decode_batch(&[4]), Err(DecodeError::Version(4)));
    }

    #[test]
    fn session_ends_round_trip_and_are_found_by_a_resync() {
        let accepted = 1_800_000_000_000_000;
        let mut buf = Vec::new();
        encode_end(Uuid::from_u128(1), Uuid::from_u128(3), accepted, &mut buf);
        assert_eq!(
            decode_batch(&buf),
            Ok(SpooledBatch {
                org_id: Uuid::from_u128(1),
                aircraft_id: Uuid::nil(),
                session_id: Uuid::from_u128(3),
                points: Vec::new(),
                accepted_micros: Some(accepted),
                ends_session: true,
            })
        );
        assert!(plausible_start(&buf));
        for cut in 0..buf.len() {
            assert!(decode_batch(&buf[..cut]).is_err());
        }
        buf.push(0);
        assert_eq!(decode_batch(&buf), Err(DecodeError::Trailing(1)));
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut buf = vec![PAYLOAD_VERSION];
        buf.extend_from_slice(&[0u8; 8 + 48]);
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_batch(&buf),
            Err(DecodeError::Count { what: "point", .. })
        ));
        buf.push(0);
        assert!(decode_batch(&[2]).is_err());
    }
}
