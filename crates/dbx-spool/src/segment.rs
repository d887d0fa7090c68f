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
//! tear the tail. The reader ([`Walker`]) treats the two cases differently: a
//! record whose CRC fails but whose length is plausible is skipped on its own
//! (framing is intact); a length of zero, above [`MAX_RECORD_BYTES`] or past the
//! end of the readable part means framing is lost. Then it [`resync`]s: it searches
//! the rest of the segment for the next intact record (a plausible payload start,
//! then a matching CRC) and goes on from there, so damage in the middle of a
//! segment (a bad sector, not a crash) costs only the damaged records. When nothing
//! intact follows, the rest is a torn tail and is skipped. Neither ever stops the
//! replayer.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
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

/// One segment file of a directory, as [`list`] finds it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentFile {
    /// Its id (the number in its name).
    pub id: u64,
    /// Its path.
    pub path: PathBuf,
    /// Its size in bytes.
    pub len: u64,
}

/// The segment files of `dir`, by id; none when `dir` does not exist. Other files
/// (`LOCK`, `*.bad`, `rejected/`) are not segments, and neither is anything under a
/// segment's name that is not a regular file (a symbolic link is never followed).
pub fn list(dir: &Path) -> io::Result<Vec<SegmentFile>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if let Some(id) = entry.file_name().to_str().and_then(parse_name) {
            // DirEntry::metadata does not follow symbolic links. A segment gone since
            // read_dir was drained and deleted by the replayer meanwhile: not listed.
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if !meta.is_file() {
                tracing::warn!(path = %entry.path().display(), "not a regular file; ignored (a spool segment never is a link)");
                continue;
            }
            let len = meta.len();
            out.push(SegmentFile {
                id,
                path: entry.path(),
                len,
            });
        }
    }
    out.sort();
    Ok(out)
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

/// Bytes of a payload's start that [`resync`] checks before it computes a CRC.
pub const PROBE_BYTES: usize = super::record::PLAUSIBLE_PREFIX_BYTES;

/// Finds the first offset in `from..before` where an intact record (ending by
/// `limit`) starts, reading the segment in blocks. A candidate needs a possible
/// length, a payload start that
/// [`record::plausible_start`](super::record::plausible_start) accepts (which rules
/// out all but a few positions in random bytes), and a matching CRC.
pub fn resync<S: Source + ?Sized>(
    src: &S,
    from: u64,
    before: u64,
    limit: u64,
) -> io::Result<Option<u64>> {
    const BLOCK: u64 = 1 << 20;
    let need = RECORD_HEADER_BYTES + PROBE_BYTES as u64;
    let before = before.min(limit.saturating_sub(RECORD_HEADER_BYTES));
    let mut buf = Vec::new();
    let mut start = from;
    while start < before {
        let end = (start + BLOCK + need).min(limit);
        buf.resize((end - start) as usize, 0);
        src.read_exact_at(&mut buf, start)?;
        // Candidates whose probe may run past this block are left to the next one
        // (which starts at the first of them), except in the last block.
        let last_block = end == limit;
        let in_block = if last_block {
            buf.len() - RECORD_HEADER_BYTES as usize + 1
        } else {
            buf.len() - need as usize + 1
        };
        let candidates = in_block.min((before - start) as usize);
        for i in 0..candidates {
            let at = start + i as u64;
            let len = u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
            if len == 0
                || len > MAX_RECORD_BYTES
                || at + RECORD_HEADER_BYTES + u64::from(len) > limit
            {
                continue;
            }
            let probe_at = i + RECORD_HEADER_BYTES as usize;
            let probe = &buf[probe_at..(probe_at + PROBE_BYTES).min(buf.len())];
            if !super::record::plausible_start(probe) {
                continue;
            }
            if let Next::Record { .. } = read_next(src, at, limit)? {
                return Ok(Some(at));
            }
        }
        if last_block {
            break;
        }
        start += candidates as u64;
    }
    Ok(None)
}

/// What [`Walker::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// An intact record.
    Record {
        /// Its offset.
        offset: u64,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// A record with a wrong CRC, skipped on its own. When its length was damaged
    /// too, reading goes on at the first intact record inside the span it claimed.
    Corrupt {
        /// Its offset.
        offset: u64,
    },
    /// Framing was lost at `offset`; reading goes on at `to`, the next intact record.
    Resynced {
        /// Where the damage starts.
        offset: u64,
        /// Where the next intact record starts.
        to: u64,
        /// What was wrong.
        reason: &'static str,
    },
    /// Framing was lost at `offset` and nothing intact follows: the end.
    Torn {
        /// Where it starts.
        offset: u64,
        /// What was wrong.
        reason: &'static str,
    },
    /// The end of the readable part.
    End,
}

/// Reads a segment's records in order, skipping damage (see the module overview).
/// Its offset only ever moves forward, and no record is yielded twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walker {
    /// Where the next read starts.
    pub offset: u64,
}

impl Walker {
    /// A walker at `offset` (the first record is at [`HEADER_BYTES`]).
    pub fn new(offset: u64) -> Walker {
        Walker { offset }
    }

    /// The next step in a segment whose readable part ends at `limit`.
    pub fn next<S: Source + ?Sized>(&mut self, src: &S, limit: u64) -> io::Result<Step> {
        Ok(match read_next(src, self.offset, limit)? {
            Next::Record {
                offset,
                payload,
                end,
            } => {
                self.offset = end;
                Step::Record { offset, payload }
            }
            Next::Corrupt { offset, end } => {
                // The CRC covers the length: when it was the length that was damaged,
                // intact records may hide in the span it claims.
                self.offset = resync(src, offset + 1, end, limit)?.unwrap_or(end);
                Step::Corrupt { offset }
            }
            Next::Torn { offset, reason } => match resync(src, offset + 1, limit, limit)? {
                Some(to) => {
                    self.offset = to;
                    Step::Resynced { offset, to, reason }
                }
                None => Step::Torn { offset, reason },
            },
            Next::End => Step::End,
        })
    }
}

/// Everything a whole segment holds, read as the replayer reads it (tests, the fuzz
/// target, and the record count at start-up).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Payloads of the intact records, in order.
    pub records: Vec<Vec<u8>>,
    /// Records skipped for a bad CRC, plus one for each loss of framing (resynced
    /// or a torn tail).
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
    let mut walker = Walker::new(HEADER_BYTES);
    loop {
        match walker.next(src, len)? {
            Step::Record { payload, .. } => s.records.push(payload),
            Step::Corrupt { .. } | Step::Resynced { .. } => s.corrupt += 1,
            Step::Torn { .. } => {
                s.corrupt += 1;
                s.torn = true;
                return Ok(s);
            }
            Step::End => return Ok(s),
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
        // O_EXCL: an existing file, or a symbolic link planted under the name, is refused.
        let mut file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(super::secure::FILE_MODE)
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

    /// Where a record starts and ends in a segment.
    type Span = (usize, usize);

    /// A segment of `n` real batch payloads of varied sizes, and where each record
    /// starts and ends.
    fn real_segment(n: usize) -> (Vec<u8>, Vec<Vec<u8>>, Vec<Span>) {
        let mut seg = header(123).to_vec();
        let mut payloads = Vec::new();
        let mut spans = Vec::new();
        for i in 0..n {
            let points: Vec<dbx_core::Point> = (0..(i % 7 + 1) as i64)
                .map(|s| dbx_core::Point::new(1_700_000_000_000_000 + s, i as i64 * 100 + s))
                .collect();
            let mut p = Vec::new();
            let id = uuid::Uuid::from_u128(i as u128);
            super::super::record::encode_batch(id, id, id, &points, 1_700_000_000_000_000, &mut p);
            let start = seg.len();
            frame_record(&p, &mut seg);
            spans.push((start, seg.len()));
            payloads.push(p);
        }
        (seg, payloads, spans)
    }

    #[test]
    fn an_impossible_length_mid_segment_loses_only_that_record() {
        let (mut seg, payloads, spans) = real_segment(6);
        seg[spans[2].0..spans[2].0 + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let s = scan(seg.as_slice(), seg.len() as u64).unwrap();
        let mut want = payloads.clone();
        want.remove(2);
        assert_eq!(s.records, want);
        assert_eq!((s.corrupt, s.torn), (1, false));
    }

    #[test]
    fn a_length_pointing_elsewhere_or_at_the_end_loses_only_that_record() {
        let (seg, payloads, spans) = real_segment(6);
        let (start, _) = spans[1];
        // Longer by exactly what follows (the wrong end is the file's end), and
        // longer by a little (the wrong end is inside the next record).
        for new_len in [seg.len() - start - 8, spans[2].0 - start - 8 + 10] {
            let mut bad = seg.clone();
            bad[start..start + 4].copy_from_slice(&(new_len as u32).to_le_bytes());
            let s = scan(bad.as_slice(), bad.len() as u64).unwrap();
            let mut want = payloads.clone();
            want.remove(1);
            assert_eq!(s.records, want, "length {new_len}");
            assert!(!s.torn, "length {new_len}");
        }
    }

    /// The search reads in 1 MiB blocks: the next intact record is found wherever
    /// it falls relative to a block's end.
    #[test]
    fn resync_finds_records_across_block_boundaries() {
        let (seg, payloads, spans) = real_segment(12_000);
        const BLOCK: usize = 1 << 20;
        let k = spans.iter().position(|(a, _)| *a > BLOCK + 4096).unwrap();
        for d in [-2i64, -1, 0, 1, 2, 9, 17] {
            let next = spans[k].0;
            let from = (next as i64 - 1 - BLOCK as i64 - d) as usize;
            let mut bad = seg.clone();
            bad[from..next].fill(0);
            let s = scan(bad.as_slice(), bad.len() as u64).unwrap();
            let first_lost = spans.iter().position(|(_, b)| *b > from).unwrap();
            assert_eq!(s.records.len(), first_lost + (payloads.len() - k), "d {d}");
            assert_eq!(s.records.last(), payloads.last(), "d {d}");
            assert_eq!(s.records[first_lost], payloads[k], "d {d}");
        }
    }

    /// A length damaged to cover the next records (their bytes intact): the CRC
    /// fails, and the records inside the claimed span are still read.
    #[test]
    fn records_hidden_by_a_damaged_length_are_still_read() {
        let (seg, payloads, spans) = real_segment(6);
        let (start, _) = spans[1];
        let mut bad = seg.clone();
        // Exactly over records 1 to 3: the walker would land on record 4.
        let covers = spans[3].1 - start - 8;
        bad[start..start + 4].copy_from_slice(&(covers as u32).to_le_bytes());
        let s = scan(bad.as_slice(), bad.len() as u64).unwrap();
        let mut want = payloads.clone();
        want.remove(1);
        assert_eq!(s.records, want);
        assert_eq!((s.corrupt, s.torn), (1, false));
    }

    proptest::proptest! {
        /// Damage anywhere (a zeroed or scribbled span, as from a bad sector) costs
        /// only the records it touches: every record outside it is read back, in
        /// order, and nothing else is.
        #[test]
        fn damage_costs_only_the_records_it_touches(
            n in 2usize..12,
            at in 0.0f64..1.0,
            width in 1usize..600,
            fill in proptest::option::of(proptest::num::u8::ANY),
            seed in proptest::num::u64::ANY,
        ) {
            let (mut seg, payloads, spans) = real_segment(n);
            let body = HEADER_BYTES as usize..seg.len();
            let from = body.start + ((body.len() as f64) * at) as usize;
            let to = (from + width).min(seg.len());
            let mut x = seed | 1;
            for b in &mut seg[from..to] {
                *b = fill.unwrap_or_else(|| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                });
            }
            let s = scan(seg.as_slice(), seg.len() as u64).unwrap();
            let want: Vec<Vec<u8>> = payloads
                .iter()
                .zip(&spans)
                .filter(|(_, (a, b))| *b <= from || *a >= to)
                .map(|(p, _)| p.clone())
                .collect();
            // Records the damage left unchanged (random bytes equal to the old) count too.
            let intact: Vec<&Vec<u8>> = s.records.iter().collect();
            for w in &want {
                proptest::prop_assert!(intact.contains(&w), "lost an undamaged record");
            }
            // Nothing invented, nothing twice, in order.
            let mut last = None;
            for r in &s.records {
                let i = payloads.iter().position(|p| p == r);
                proptest::prop_assert!(i.is_some(), "invented a record");
                proptest::prop_assert!(last < i, "out of order or twice");
                last = i;
            }
        }
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
