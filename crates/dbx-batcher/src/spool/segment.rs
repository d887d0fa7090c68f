//! Segment files: naming, the file header, record framing, an append-and-fsync
//! writer, and a reader that detects torn and corrupt records instead of trusting
//! them.
//!
//! A segment is `<20-digit id>.seg` in the spool directory:
//! ```text
//! header: b"DBXSPL01" | i64 created_unix_micros (LE)          16 bytes
//! record: u32 len (LE) | u32 crc32c(len bytes ‖ payload) (LE) | payload (len bytes)
//! ```
//! The CRC covers the length word too, so a flipped length is caught as well as a
//! flipped payload byte. Records are only ever appended; a crash can therefore only
//! tear the tail. The reader treats the two cases differently: a record whose CRC
//! fails but whose length is plausible is skipped on its own (framing is intact);
//! a length of zero, above [`MAX_RECORD_BYTES`] or past the end of a sealed file
//! means framing is lost, and the rest of that segment is skipped (a torn tail).
//! Neither ever stops the replayer.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Magic at the start of every segment (the last two bytes are the format version).
pub const MAGIC: &[u8; 8] = b"DBXSPL01";
/// Bytes of the segment header.
pub const HEADER_BYTES: u64 = 16;
/// Bytes of a record header (length and CRC).
pub const RECORD_HEADER_BYTES: u64 = 8;
/// The largest payload a record may have. A 10 000-point batch with large `extra`
/// objects stays far below it; anything longer is taken for a corrupt length.
pub const MAX_RECORD_BYTES: u32 = 64 * 1024 * 1024;

/// The file name of segment `id`.
pub fn file_name(id: u64) -> String {
    format!("{id:020}.seg")
}

/// The id of a segment file name, `None` for anything else.
pub fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The CRC of a record: over its length word and its payload.
pub fn record_crc(payload: &[u8]) -> u32 {
    let len = (payload.len() as u32).to_le_bytes();
    crc32c::crc32c_append(crc32c::crc32c(&len), payload)
}

/// Appends one framed record to `out`.
pub fn frame_record(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&record_crc(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The header of a new segment.
pub fn header(created_micros: i64) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&created_micros.to_le_bytes());
    h
}

/// Something records can be read from at an offset: a file, or bytes in memory
/// (tests and the fuzz target).
pub trait Source {
    /// Fills `buf` from `offset`, or fails (including when the source ends first).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl Source for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl Source for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&e| e <= self.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(&self[start..end]);
        Ok(())
    }
}

/// Reads the segment header: the creation time, or `None` when it is missing or
/// not ours.
pub fn read_header<S: Source + ?Sized>(src: &S, len: u64) -> Option<i64> {
    if len < HEADER_BYTES {
        return None;
    }
    let mut h = [0u8; HEADER_BYTES as usize];
    src.read_exact_at(&mut h, 0).ok()?;
    if &h[..8] != MAGIC {
        return None;
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&h[8..]);
    Some(i64::from_le_bytes(t))
}

/// What the reader found at its position.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A record whose CRC matches; `end` is the offset after it.
    Record {
        /// The record's offset.
        offset: u64,
        /// The payload.
        payload: Vec<u8>,
        /// Offset of the next record.
        end: u64,
    },
    /// A record with a plausible length but a wrong CRC; the reader moved past it.
    Corrupt {
        /// The record's offset.
        offset: u64,
        /// Offset of the next record.
        end: u64,
    },
    /// Framing is lost (bad length, or a record cut short in a sealed segment): the
    /// rest of the segment from `offset` is unreadable.
    Torn {
        /// Where it starts.
        offset: u64,
        /// Why.
        reason: &'static str,
    },
    /// The end of the readable part: for a sealed segment its end, for the open one
    /// everything fsynced so far.
    End,
}

/// Reads the record at `offset` of a segment whose readable part ends at `limit`.
/// In a `sealed` segment, a record cut short by `limit` is a torn tail; in the open
/// one, `limit` only ever falls on a record boundary, so the same thing is also
/// reported as torn (the file was damaged under us). Allocates at most
/// `min(len, limit - offset)` bytes, and never above [`MAX_RECORD_BYTES`].
pub fn read_next<S: Source + ?Sized>(src: &S, offset: u64, limit: u64) -> io::Result<Next> {
    if offset >= limit {
        return Ok(Next::End);
    }
    let left = limit - offset;
    if left < RECORD_HEADER_BYTES {
        return Ok(Next::Torn {
            offset,
            reason: "a record header cut short",
        });
    }
    let mut h = [0u8; RECORD_HEADER_BYTES as usize];
    src.read_exact_at(&mut h, offset)?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len == 0 || len > MAX_RECORD_BYTES {
        return Ok(Next::Torn {
            offset,
            reason: "an impossible record length",
        });
    }
    if u64::from(len) > left - RECORD_HEADER_BYTES {
        return Ok(Next::Torn {
            offset,
            reason: "a record cut short",
        });
    }
    let mut payload = vec![0u8; len as usize];
    src.read_exact_at(&mut payload, offset + RECORD_HEADER_BYTES)?;
    let end = offset + RECORD_HEADER_BYTES + u64::from(len);
    if record_crc(&payload) != crc {
        return Ok(Next::Corrupt { offset, end });
    }
    Ok(Next::Record {
        offset,
        payload,
        end,
    })
}

/// Everything a whole segment holds, read as the replayer reads it (tests, the fuzz
/// target, and the record count at start-up).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Payloads of the intact records, in order.
    pub records: Vec<Vec<u8>>,
    /// Records skipped for a bad CRC, plus one for a torn tail.
    pub corrupt: u64,
    /// Whether the segment ended in a torn tail.
    pub torn: bool,
    /// Whether the header was missing or not ours.
    pub bad_header: bool,
}

/// Reads every record of a segment of `len` bytes.
pub fn scan<S: Source + ?Sized>(src: &S, len: u64) -> io::Result<Scan> {
    let mut s = Scan::default();
    if read_header(src, len).is_none() {
        s.bad_header = true;
        return Ok(s);
    }
    let mut at = HEADER_BYTES;
    loop {
        match read_next(src, at, len)? {
            Next::Record { payload, end, .. } => {
                s.records.push(payload);
                at = end;
            }
            Next::Corrupt { end, .. } => {
                s.corrupt += 1;
                at = end;
            }
            Next::Torn { .. } => {
                s.corrupt += 1;
                s.torn = true;
                return Ok(s);
            }
            Next::End => return Ok(s),
        }
    }
}

/// Counts the records of a segment from their length words alone (no CRC, no
/// payload read): cheap enough for start-up over a large spool.
pub fn count_records(file: &File, len: u64) -> u64 {
    let mut at = HEADER_BYTES;
    let mut n = 0;
    let mut h = [0u8; RECORD_HEADER_BYTES as usize];
    while at + RECORD_HEADER_BYTES <= len && FileExt::read_exact_at(file, &mut h, at).is_ok() {
        let l = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        if l == 0 || l > MAX_RECORD_BYTES || at + RECORD_HEADER_BYTES + u64::from(l) > len {
            break;
        }
        n += 1;
        at += RECORD_HEADER_BYTES + u64::from(l);
    }
    n
}

/// The open segment the gate appends to.
#[derive(Debug)]
pub struct SegmentWriter {
    /// Its id.
    pub id: u64,
    /// Its path.
    pub path: PathBuf,
    file: File,
    /// Bytes written and fsynced (header included).
    pub len: u64,
}

/// Opens a directory for fsync.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl SegmentWriter {
    /// Creates segment `id` in `dir` with its header, fsyncs it and the directory,
    /// so that records appended later are reachable after a crash.
    pub fn create(dir: &Path, id: u64, created_micros: i64) -> io::Result<SegmentWriter> {
        let path = dir.join(file_name(id));
        let mut file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&path)?;
        let res = (|| {
            file.write_all(&header(created_micros))?;
            file.sync_all()?;
            sync_dir(dir)
        })();
        if let Err(e) = res {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(SegmentWriter {
            id,
            path,
            file,
            len: HEADER_BYTES,
        })
    }

    /// Appends `framed` (whole records) and fsyncs. On any error the file is cut
    /// back to its last fsynced length (best effort) and the error returned: the
    /// caller must then seal this segment and ack none of these records.
    pub fn append(&mut self, framed: &[u8]) -> io::Result<()> {
        let res = self
            .file
            .write_all_at(framed, self.len)
            .and_then(|()| self.file.sync_data());
        match res {
            Ok(()) => {
                self.len += framed.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Whatever reached the disk past `len` was never acked; cutting it
                // keeps it from being replayed, and if the cut fails too, a replay of
                // it is only a duplicate the batcher drops.
                let _ = self.file.set_len(self.len);
                let _ = self.file.sync_data();
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(payloads: &[&[u8]]) -> Vec<u8> {
        let mut v = header(123).to_vec();
        for p in payloads {
            frame_record(p, &mut v);
        }
        v
    }

    #[test]
    fn names_round_trip_and_strangers_are_ignored() {
        assert_eq!(parse_name(&file_name(42)), Some(42));
        assert_eq!(file_name(7), "00000000000000000007.seg");
        assert_eq!(parse_name("00000000000000000007.tmp"), None);
        assert_eq!(parse_name("7.seg"), None);
        assert_eq!(parse_name("0000000000000000000x.seg"), None);
    }

    #[test]
    fn intact_segment_reads_back() {
        let seg = segment(&[b"one", b"two", b"three"]);
        let s = scan(seg.as_slice(), seg.len() as u64).unwrap();
        assert_eq!(
            s.records,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        assert_eq!((s.corrupt, s.torn, s.bad_header), (0, false, false));
        assert_eq!(read_header(seg.as_slice(), seg.len() as u64), Some(123));
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        let seg = segment(&[b"alpha-record", b"beta-record!", b"gamma"]);
        let clean = scan(seg.as_slice(), seg.len() as u64).unwrap();
        for i in HEADER_BYTES as usize..seg.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = seg.clone();
                bad[i] ^= bit;
                let s = scan(bad.as_slice(), bad.len() as u64).unwrap();
                // Never a record that was not written; always at least one detection.
                assert!(s.corrupt >= 1, "flip at {i} went unnoticed");
                assert!(s.records.len() < clean.records.len(), "flip at {i}");
                for r in &s.records {
                    assert!(clean.records.contains(r), "flip at {i} invented {r:?}");
                }
            }
        }
    }

    #[test]
    fn a_bad_payload_crc_skips_only_that_record() {
        let mut seg = segment(&[b"first", b"second", b"third"]);
        let second_payload = HEADER_BYTES as usize + 8 + 5 + 8;
        seg[second_payload] ^= 0xff;
        let s = scan(seg.as_slice(), seg.len() as u64).unwrap();
        assert_eq!(s.records, vec![b"first".to_vec(), b"third".to_vec()]);
        assert_eq!((s.corrupt, s.torn), (1, false));
    }

    #[test]
    fn a_torn_tail_keeps_earlier_records() {
        let seg = segment(&[b"first", b"second", b"third-and-last"]);
        let full = seg.len();
        for cut in (full - 8 - 14 + 1)..full {
            let s = scan(&seg[..cut], cut as u64).unwrap();
            assert_eq!(
                s.records,
                vec![b"first".to_vec(), b"second".to_vec()],
                "cut {cut}"
            );
            assert!(s.torn && s.corrupt == 1, "cut {cut}");
        }
        // Cut exactly at a record boundary: nothing is torn.
        let s = scan(&seg[..full - 8 - 14], (full - 8 - 14) as u64).unwrap();
        assert_eq!((s.records.len(), s.torn), (2, false));
    }

    #[test]
    fn a_missing_header_is_reported() {
        assert!(scan(&b"DBX"[..], 3).unwrap().bad_header);
        assert!(scan(&[0u8; 40][..], 40).unwrap().bad_header);
    }

    #[test]
    fn writer_appends_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SegmentWriter::create(dir.path(), 3, 99).unwrap();
        let mut framed = Vec::new();
        frame_record(b"abc", &mut framed);
        frame_record(b"defg", &mut framed);
        w.append(&framed).unwrap();
        assert_eq!(w.len, HEADER_BYTES + framed.len() as u64);
        let f = File::open(dir.path().join(file_name(3))).unwrap();
        let len = f.metadata().unwrap().len();
        assert_eq!(count_records(&f, len), 2);
        let s = scan(&f, len).unwrap();
        assert_eq!(s.records, vec![b"abc".to_vec(), b"defg".to_vec()]);
        assert!(
            SegmentWriter::create(dir.path(), 3, 99).is_err(),
            "never reuses an id"
        );
    }
}
