//! Dead letters: spooled batches that PostgreSQL refused after the spool had acked
//! them. An ack from the spool promises the batch is kept, but the batcher stays
//! the authority on data errors decided in the commit transaction (a session that
//! turned out to belong to another aircraft, an aircraft deleted meanwhile), so such
//! a batch can be refused on replay. It is then neither dropped nor retried forever:
//! its record is copied here, with the reason, before its segment may be deleted.
//!
//! `<spool.dir>/rejected/` holds segment files in the spool's own format, so that
//! `dbx spool requeue` can move them back for replay once the cause is fixed, and
//! `reasons.jsonl`, one [`RejectedEntry`] per record. The record is fsynced before its
//! reason line; a crash between the two leaves a record without a reason and the
//! original segment in place, so the batch is rejected and kept again at the next
//! start (a duplicate dead letter, never a lost one).
//!
//! Bounded by `spool.rejected_max_bytes`: past it a refused record is not copied and
//! its segment is kept in the spool instead (replayed, and refused, at every start)
//! until an operator makes room. Nothing acked is ever deleted unkept.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::record::decode_batch;
use super::segment::{self, SegmentWriter};

/// The dead-letter directory's name inside `spool.dir`.
pub const DIR: &str = "rejected";
/// The reasons file's name inside [`DIR`].
pub const REASONS: &str = "reasons.jsonl";

/// Why one dead-letter record was refused, as a line of `reasons.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectedEntry {
    /// When the replay was refused (RFC 3339, UTC).
    pub rejected_at: String,
    /// The dead-letter segment file holding the record.
    pub file: String,
    /// The record's offset in it.
    pub offset: u64,
    /// The protocol's nack code the batcher gave.
    pub code: String,
    /// The batcher's message.
    pub message: String,
    /// The organization the batch was accepted for.
    pub org_id: Uuid,
    /// Its aircraft.
    pub aircraft_id: Uuid,
    /// Its session.
    pub session_id: Uuid,
    /// How many points it holds.
    pub points: usize,
    /// The lowest and highest `seq` in it.
    pub seq_range: Option<(i64, i64)>,
}

/// What [`DeadLetters::keep`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// The record and its reason are on disk.
    Stored,
    /// `rejected_max_bytes` is reached; nothing was written.
    Full,
}

/// The dead-letter store the replayer appends to.
#[derive(Debug)]
pub struct DeadLetters {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    bytes: u64,
    next_id: u64,
    writer: Option<SegmentWriter>,
}

/// Reads `reasons.jsonl` of a dead-letter directory (never through a symbolic link); a
/// line cut by a crash is skipped.
pub fn read_reasons(dir: &Path) -> io::Result<Vec<RejectedEntry>> {
    let mut text = String::new();
    match super::secure::open_nofollow(OpenOptions::new().read(true), &dir.join(REASONS)) {
        Ok(mut f) => io::Read::read_to_string(&mut f, &mut text)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

impl DeadLetters {
    /// Takes stock of `<spool_dir>/rejected` (created on the first write).
    pub fn open(spool_dir: &Path, max_bytes: u64, segment_bytes: u64) -> io::Result<DeadLetters> {
        let dir = spool_dir.join(DIR);
        super::secure::not_a_symlink(&dir)?;
        let existing = segment::list(&dir)?;
        Ok(DeadLetters {
            bytes: existing.iter().map(|s| s.len).sum(),
            next_id: existing.last().map_or(0, |s| s.id + 1),
            dir,
            max_bytes,
            segment_bytes,
            writer: None,
        })
    }

    /// Bytes in dead-letter segment files.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Copies the record `payload` (refused with `code` and `message`) and its
    /// reason to disk, both fsynced. Blocking.
    pub fn keep(&mut self, payload: &[u8], code: &str, message: &str) -> io::Result<Kept> {
        let framed_len = segment::RECORD_HEADER_BYTES + payload.len() as u64;
        let new_segment = self
            .writer
            .as_ref()
            .is_none_or(|w| w.len >= self.segment_bytes);
        let grows_by = framed_len
            + if new_segment {
                segment::HEADER_BYTES
            } else {
                0
            };
        if self.bytes + grows_by > self.max_bytes {
            return Ok(Kept::Full);
        }
        if new_segment {
            super::secure::private_subdir(&self.dir)?;
            let w = SegmentWriter::create(&self.dir, self.next_id, dbx_core::now_micros())?;
            self.next_id += 1;
            self.bytes += w.len;
            self.writer = Some(w);
        }
        let Some(w) = self.writer.as_mut() else {
            unreachable!("a writer was just opened");
        };
        let offset = w.len;
        let mut framed = Vec::with_capacity(framed_len as usize);
        segment::frame_record(payload, &mut framed);
        if let Err(e) = w.append(&framed) {
            // The writer cut the file back; start a fresh one next time.
            self.writer = None;
            return Err(e);
        }
        self.bytes += framed_len;
        let batch = decode_batch(payload).ok();
        let entry = RejectedEntry {
            rejected_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            file: segment::file_name(w.id),
            offset,
            code: code.to_string(),
            message: message.to_string(),
            org_id: batch.as_ref().map_or(Uuid::nil(), |b| b.org_id),
            aircraft_id: batch.as_ref().map_or(Uuid::nil(), |b| b.aircraft_id),
            session_id: batch.as_ref().map_or(Uuid::nil(), |b| b.session_id),
            points: batch.as_ref().map_or(0, |b| b.points.len()),
            seq_range: batch.as_ref().and_then(|b| {
                let seqs = b.points.iter().map(|p| p.seq);
                Some((seqs.clone().min()?, seqs.max()?))
            }),
        };
        let mut line = serde_json::to_vec(&entry).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut reasons = super::secure::open_nofollow(
            OpenOptions::new().create(true).append(true),
            &self.dir.join(REASONS),
        )?;
        reasons.write_all(&line)?;
        reasons.sync_data()?;
        Ok(Kept::Stored)
    }
}

/// Moves every dead-letter segment of `spool_dir` back into the spool as new
/// segments (ids after the highest there), so that the next daemon start replays
/// them, and retires `reasons.jsonl` (renamed with the time). The caller holds the
/// spool's lock. Returns the records and segments moved.
pub fn requeue(spool_dir: &Path) -> io::Result<(u64, u64)> {
    let dir = spool_dir.join(DIR);
    super::secure::not_a_symlink(&dir)?;
    let first_id = segment::list(spool_dir)?.last().map_or(0, |s| s.id + 1);
    let dead = segment::list(&dir)?;
    let mut records = 0;
    for (id, s) in (first_id..).zip(&dead) {
        records += segment::count_records(&File::open(&s.path)?, s.len);
        std::fs::rename(&s.path, spool_dir.join(segment::file_name(id)))?;
    }
    let moved = dead.len() as u64;
    if dir.join(REASONS).exists() {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
        std::fs::rename(
            dir.join(REASONS),
            dir.join(format!("reasons.requeued-{stamp}.jsonl")),
        )?;
    }
    File::open(spool_dir)?.sync_all()?;
    Ok((records, moved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::encode_batch;
    use dbx_core::Point;

    fn payload(seqs: std::ops::Range<i64>) -> Vec<u8> {
        let points: Vec<Point> = seqs.map(|s| Point::new(1_700_000_000_000_000, s)).collect();
        let mut p = Vec::new();
        let (o, a, s) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3));
        encode_batch(o, a, s, &points, 5, &mut p);
        p
    }

    #[test]
    fn kept_records_read_back_with_their_reasons_and_requeue_into_the_spool() {
        let spool = tempfile::tempdir().unwrap();
        let mut dl = DeadLetters::open(spool.path(), 1 << 20, 4096).unwrap();
        assert_eq!(dl.bytes(), 0);
        let p = payload(10..13);
        assert_eq!(
            dl.keep(&p, "foreign_session", "session belongs to another aircraft")
                .unwrap(),
            Kept::Stored
        );
        let reasons = read_reasons(&spool.path().join(DIR)).unwrap();
        assert_eq!(reasons.len(), 1);
        let r = &reasons[0];
        assert_eq!((r.code.as_str(), r.points), ("foreign_session", 3));
        assert_eq!(r.seq_range, Some((10, 12)));
        assert_eq!(r.session_id, Uuid::from_u128(3));
        // The record is where the reason says, intact.
        let path = spool.path().join(DIR).join(&r.file);
        let len = std::fs::metadata(&path).unwrap().len();
        let file = File::open(&path).unwrap();
        match segment::read_next(&file, r.offset, len).unwrap() {
            segment::Next::Record { payload, .. } => assert_eq!(payload, p),
            other => panic!("{other:?}"),
        }

        // A spool segment already there: requeued ones come after it.
        SegmentWriter::create(spool.path(), 4, 0).unwrap();
        assert_eq!(requeue(spool.path()).unwrap(), (1, 1));
        assert!(spool.path().join(segment::file_name(5)).exists());
        assert!(segment::list(&spool.path().join(DIR)).unwrap().is_empty());
        assert!(read_reasons(&spool.path().join(DIR)).unwrap().is_empty());
    }

    #[test]
    fn the_bound_is_kept_and_reopening_counts_what_is_there() {
        let spool = tempfile::tempdir().unwrap();
        let p = payload(0..50);
        let one = segment::HEADER_BYTES + segment::RECORD_HEADER_BYTES + p.len() as u64;
        let mut dl = DeadLetters::open(spool.path(), one, 4096).unwrap();
        assert_eq!(dl.keep(&p, "rejected", "bad").unwrap(), Kept::Stored);
        assert_eq!(dl.keep(&p, "rejected", "bad").unwrap(), Kept::Full);
        assert_eq!(dl.bytes(), one);
        let again = DeadLetters::open(spool.path(), one, 4096).unwrap();
        assert_eq!(again.bytes(), one);
        assert_eq!(again.next_id, 1);
    }
}
