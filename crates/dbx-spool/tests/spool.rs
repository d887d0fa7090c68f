//! The spool gate and replayer against a stand-in for the batcher that the test
//! drives by hand (stall it, then let it commit): spooling when the batcher stalls,
//! acks only after the fsync, segment rotation, deletion after every record of a
//! segment has its verdict, replay of what a previous run left (torn tail
//! included), and `when_full`. The real batcher and PostgreSQL are exercised with
//! the daemon in tests/spool.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use dbx_core::{BatchOutcome, RejectCode, Rejection, TelemetryBatch};
use dbx_spool::record::{encode_batch, encode_end};
use dbx_spool::segment::{self, frame_record, SegmentWriter};
use dbx_spool::{inspect, rejected, requeue_rejected, Spool, SpoolConfig, WhenFull};
use tokio::sync::mpsc;

mod spool_kit;
use spool_kit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_batcher_is_spooled_acked_then_replayed_and_segments_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let (a_tx, a_rx) = mpsc::channel(16);
    let (b_tx, b_rx) = mpsc::channel(4);
    let spool = Spool::start(config(dir.path()), a_rx, b_tx).await.unwrap();

    // The batcher takes nothing: after after_ms the gate spools, and acks come.
    let started = Instant::now();
    let acks = send_batches(&a_tx, 0..100, 10).await;
    for rx in acks {
        assert_eq!(outcome(rx).await, Some(BatchOutcome::Durable));
    }
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "not before after_ms"
    );
    let st = spool.stats();
    assert!(st.spooled_records >= 96, "{st:?}"); // all but what sat in B unresolved... and those too
    assert!(st.segments >= 2, "segment_bytes forced rotation: {st:?}");
    assert!(segments(dir.path()) >= 2);
    // A burst is split at segment_bytes, whatever the timing.
    for f in segment::list(dir.path()).unwrap() {
        assert!(f.len <= 8192, "{f:?} exceeds segment_bytes");
    }

    // The batcher comes back: everything is replayed, each segment deleted once resolved.
    let consumer = commit_all(b_rx);
    wait_drained(dir.path(), &spool, Duration::from_secs(20)).await;
    // New batches now go straight through.
    let (b, rx) = batch(1000, 1);
    a_tx.send(b).await.unwrap();
    assert_eq!(outcome(rx).await, Some(BatchOutcome::Durable));
    drop(a_tx);
    let st = spool.join().await;
    let (seen, replayed) = consumer.await.unwrap();
    for seq in 0..100i64 {
        for i in 0..10 {
            assert!(
                seen.contains(&(seq * 1000 + i)),
                "point {seq}/{i} never reached the batcher"
            );
        }
    }
    assert!(seen.contains(&1_000_000));
    assert!(replayed >= 96, "replayed {replayed}");
    assert_eq!(
        (st.segments, st.bytes, st.corrupt_records),
        (0, 0, 0),
        "{st:?}"
    );
    assert!(st.deleted_segments >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_left_by_a_crash_are_replayed_and_a_torn_tail_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    // A previous run: two segments, the second ending in a half-written record.
    for (id, seqs) in [(0u64, 0..5i64), (1, 5..8)] {
        let mut w = SegmentWriter::create(dir.path(), id, 1).unwrap();
        let mut framed = Vec::new();
        for seq in seqs {
            let (b, _) = batch(seq, 3);
            let mut p = Vec::new();
            encode_batch(b.org_id, b.aircraft_id, b.session_id, &b.points, 1, &mut p);
            frame_record(&p, &mut framed);
        }
        w.append(&framed).unwrap();
        if id == 1 {
            let mut torn = Vec::new();
            frame_record(&[7u8; 100], &mut torn);
            torn.truncate(60);
            w.append(&torn).unwrap();
        }
    }
    // And a file cut before its header: nothing in it was ever acked.
    std::fs::write(dir.path().join(segment::file_name(2)), b"DBX").unwrap();

    let (a_tx, a_rx) = mpsc::channel(16);
    let (b_tx, b_rx) = mpsc::channel(4);
    let spool = Spool::start(config(dir.path()), a_rx, b_tx).await.unwrap();
    let consumer = commit_all(b_rx);
    wait_drained(dir.path(), &spool, Duration::from_secs(10)).await;
    drop(a_tx);
    let st = spool.join().await;
    let (seen, replayed) = consumer.await.unwrap();
    assert_eq!(replayed, 8);
    let want: HashSet<i64> = (0..8i64)
        .flat_map(|s| (0..3).map(move |i| s * 1000 + i))
        .collect();
    assert_eq!(seen, want);
    assert_eq!(st.corrupt_records, 1, "{st:?}");
    assert_eq!(st.replayed_records, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_session_end_is_replayed_after_the_records_before_it_and_before_those_after() {
    let dir = tempfile::tempdir().unwrap();
    // A previous run spooled: batches 0..4, the session's end, batches 4..6.
    let mut w = SegmentWriter::create(dir.path(), 0, 1).unwrap();
    let mut framed = Vec::new();
    let mut org = None;
    for seq in 0..6i64 {
        let (b, _) = batch(seq, 2);
        org = Some(b.org_id);
        let mut p = Vec::new();
        encode_batch(b.org_id, b.aircraft_id, b.session_id, &b.points, 1, &mut p);
        frame_record(&p, &mut framed);
        if seq == 3 {
            let mut e = Vec::new();
            encode_end(b.org_id, SESSION, 1, &mut e);
            frame_record(&e, &mut framed);
        }
    }
    w.append(&framed).unwrap();

    let (a_tx, a_rx) = mpsc::channel(16);
    // Room for a replay window of several records.
    let (b_tx, mut b_rx) = mpsc::channel(8);
    let spool = Spool::start(config(dir.path()), a_rx, b_tx).await.unwrap();
    // A batcher that takes a while over every verdict, and logs what it holds when a
    // record arrives.
    let consumer = tokio::spawn(async move {
        let in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut log = Vec::new();
        while let Some(b) = b_rx.recv().await {
            let held = in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let what = if b.ends_session {
                assert_eq!(
                    (b.org_id, b.session_id, b.points.len()),
                    (org.unwrap(), SESSION, 0)
                );
                "end".to_string()
            } else {
                format!("batch {}", b.points[0].seq / 1000)
            };
            log.push((what, held));
            let in_flight = in_flight.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                b.ack.durable();
            });
        }
        log
    });
    wait_drained(dir.path(), &spool, Duration::from_secs(10)).await;
    drop(a_tx);
    spool.join().await;
    let log = consumer.await.unwrap();
    let order: Vec<&str> = log.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(
        order,
        ["batch 0", "batch 1", "batch 2", "batch 3", "end", "batch 4", "batch 5"]
    );
    // The end came when nothing else was in flight, and batch 4 only after its verdict.
    assert_eq!(log[4].1, 0, "{log:?}");
    assert_eq!(log[5].1, 0, "{log:?}");
    assert!(
        log[1].1 > 0,
        "the replay does overlap records otherwise: {log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_end_is_spooled_and_acked_like_a_batch_while_the_batcher_stalls() {
    let dir = tempfile::tempdir().unwrap();
    let (a_tx, a_rx) = mpsc::channel(16);
    let (b_tx, mut b_rx) = mpsc::channel(4);
    let spool = Spool::start(config(dir.path()), a_rx, b_tx).await.unwrap();
    let mut acks = send_batches(&a_tx, 0..3, 2).await;
    let (ack, rx) = dbx_core::AckHandle::channel();
    let (b, _) = batch(0, 0);
    a_tx.send(dbx_core::TelemetryBatch::session_end(
        b.org_id,
        SESSION,
        ack,
        dbx_core::BatchOrigin::Tcp,
        Instant::now(),
    ))
    .await
    .unwrap();
    acks.push(rx);
    // The batcher takes nothing: everything is acked from the spool, the end included.
    for rx in acks {
        assert_eq!(outcome(rx).await, Some(BatchOutcome::Durable));
    }
    assert!(spool.stats().spooled_records >= 4, "{:?}", spool.stats());
    // The batcher comes back: the end reaches it as an end (forwarded, and replayed).
    let consumer = tokio::spawn(async move {
        let mut ends = 0;
        while let Some(b) = b_rx.recv().await {
            if b.ends_session {
                assert_eq!((b.session_id, b.points.len()), (SESSION, 0));
                ends += 1;
            }
            b.ack.durable();
        }
        ends
    });
    wait_drained(dir.path(), &spool, Duration::from_secs(10)).await;
    drop(a_tx);
    spool.join().await;
    assert!(consumer.await.unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_full_drop_newest_nacks_and_never_acks_what_is_not_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        max_bytes: 64 * 1024,
        when_full: WhenFull::DropNewest,
        segment_bytes: 1024 * 1024,
        ..config(dir.path())
    };
    let (a_tx, a_rx) = mpsc::channel(64);
    let (b_tx, _b_rx) = mpsc::channel(2);
    let spool = Spool::start(cfg, a_rx, b_tx).await.unwrap();
    let acks = send_batches(&a_tx, 0..60, 20).await; // ~2.3 KB each: about 27 fit
    let (mut durable, mut rejected) = (0, 0);
    for rx in acks {
        match outcome(rx).await {
            Some(BatchOutcome::Durable) => durable += 1,
            Some(BatchOutcome::Rejected(r)) => {
                assert_eq!(r.code, RejectCode::Rejected);
                assert!(r.msg.contains("spool is full"), "{}", r.msg);
                rejected += 1;
            }
            None => panic!("dropped without a verdict"),
        }
    }
    let st = spool.stats();
    assert!(
        durable > 10 && rejected > 10,
        "{durable} durable, {rejected} rejected"
    );
    assert_eq!(st.full, rejected as u64);
    assert!(st.bytes <= 64 * 1024, "{st:?}");
    // Every durable one is on disk: the batcher holds at most its queue's 2 + in flight,
    // the rest must be in the spool's records.
    assert!(
        st.records + 2 >= durable as u64,
        "{st:?} vs {durable} durable"
    );
}

/// `block` at the limit: the gate stops reading (the sender blocks), acks only what
/// is on disk, and once the batcher is back everything drains and the directory
/// empties. It once caught a replayer stall (one acked record left in the last
/// segment until the next start, about one run in ten), now pinned down
/// deterministically by `spool::replay`'s unit test.
/// `block` backpressure itself is also covered by tests/spool (a real daemon).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_full_block_stops_reading_until_the_spool_drains() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SpoolConfig {
        max_bytes: 64 * 1024,
        segment_bytes: 16 * 1024,
        ..config(dir.path())
    };
    let (a_tx, a_rx) = mpsc::channel(4);
    let (b_tx, b_rx) = mpsc::channel(2);
    let spool = Spool::start(cfg, a_rx, b_tx).await.unwrap();
    let mut acks = Vec::new();
    let mut blocked_at = None;
    // More than the gate may hold in memory (BURST_BATCHES, 512) plus what fits in
    // 64 KiB: the sender must block at some point, whatever the timing.
    for seq in 0..800 {
        let (b, rx) = batch(seq, 20);
        acks.push(rx);
        match tokio::time::timeout(Duration::from_secs(3), a_tx.send(b)).await {
            Ok(r) => r.unwrap(),
            Err(_) => {
                blocked_at = Some(seq);
                acks.pop();
                break;
            }
        }
    }
    let blocked_at = blocked_at.unwrap_or_else(|| {
        panic!(
            "the gate stopped reading at the limit: {:?} {:?}",
            spool.stats(),
            std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .collect::<Vec<_>>()
        )
    });
    assert!(blocked_at > 20, "blocked only at {blocked_at}");
    let st = spool.stats();
    assert!(st.full >= 1 && st.bytes <= 64 * 1024, "{st:?}");
    // Nothing beyond what is on disk (or in the batcher's queue) was acked.
    let mut durable = 0;
    let mut waiting = Vec::new();
    for mut rx in acks {
        match rx.try_recv() {
            Ok(BatchOutcome::Durable) => durable += 1,
            Ok(other) => panic!("{other:?}"),
            Err(_) => waiting.push(rx),
        }
    }
    let mut acks = waiting;
    assert!(durable as u64 <= st.records + 2, "{durable} acked, {st:?}");

    // The batcher comes back: the spool drains and everything gets its ack.
    let consumer = commit_all(b_rx);
    acks.extend(send_batches(&a_tx, blocked_at..blocked_at + 40, 20).await);
    for rx in acks {
        assert_eq!(outcome(rx).await, Some(BatchOutcome::Durable));
    }
    // Acked from the spool is not yet replayed: wait for the spool to empty.
    wait_drained(dir.path(), &spool, Duration::from_secs(20)).await;
    drop(a_tx);
    let st = spool.join().await;
    assert!(st.full >= 1 && st.deleted_segments >= 1, "{st:?}");
    let (seen, _) = consumer.await.unwrap();
    for seq in 0..80i64 {
        assert!(
            seen.contains(&(seq * 1000 + 19)),
            "batch {seq} never reached the batcher"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_directory_is_locked_against_a_second_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let (_a_tx, a_rx) = mpsc::channel(4);
    let (b_tx, _b_rx) = mpsc::channel(4);
    let first = Spool::start(config(dir.path()), a_rx, b_tx).await.unwrap();
    let (_c_tx, c_rx) = mpsc::channel(4);
    let (d_tx, _d_rx) = mpsc::channel(4);
    let err = Spool::start(config(dir.path()), c_rx, d_tx)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("in use by another dbx"), "{msg}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    drop(first);
}

/// A batch the spool acked and the batcher then refuses on replay (a data error
/// decided at commit, such as `foreign_session`) is kept as a dead letter with its
/// reason before its segment is deleted; `requeue_rejected` moves it back into the
/// spool, and the next start replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_replays_become_dead_letters_and_requeue_replays_them() {
    let dir = tempfile::tempdir().unwrap();
    let (a_tx, a_rx) = mpsc::channel(16);
    let (b_tx, b_rx) = mpsc::channel(4);
    let spool = Spool::start(config(dir.path()), a_rx, b_tx).await.unwrap();
    // The batcher is stalled: everything is acked from the spool.
    let acks = send_batches(&a_tx, 0..30, 5).await;
    for rx in acks {
        assert_eq!(outcome(rx).await, Some(BatchOutcome::Durable));
    }
    // It comes back and refuses the odd batches, forwarded or replayed.
    let consumer = tokio::spawn(async move {
        let mut rx = b_rx;
        let mut refused = 0;
        while let Some(b) = rx.recv().await {
            if (b.points[0].seq / 1000) % 2 == 1 {
                refused += 1;
                b.ack.reject(Rejection::new(
                    RejectCode::ForeignSession,
                    "session belongs to another aircraft",
                ));
            } else {
                b.ack.durable();
            }
        }
        refused
    });
    wait_drained(dir.path(), &spool, Duration::from_secs(20)).await;
    drop(a_tx);
    let st = spool.join().await;
    assert!(consumer.await.unwrap() >= 15);
    assert_eq!(st.rejected_records, 15, "{st:?}");

    let reasons = rejected::read_reasons(&dir.path().join(rejected::DIR)).unwrap();
    let mut kept: Vec<i64> = reasons
        .iter()
        .map(|r| r.seq_range.unwrap().0 / 1000)
        .collect();
    kept.sort();
    assert_eq!(kept, (0..30).filter(|s| s % 2 == 1).collect::<Vec<_>>());
    assert!(reasons
        .iter()
        .all(|r| r.code == "foreign_session" && r.session_id == SESSION && r.points == 5));
    let report = inspect(dir.path()).unwrap();
    assert_eq!((report.segments.len(), report.rejected_records), (0, 15));
    assert!(!report.in_use);

    // Requeued, they are replayed at the next start (and accepted this time).
    let (records, _files) = requeue_rejected(dir.path()).unwrap();
    assert_eq!(records, 15);
    assert_eq!(inspect(dir.path()).unwrap().rejected_records, 0);
    let (a_tx, a_rx) = mpsc::channel(16);
    let (b_tx, b_rx) = mpsc::channel(4);
    let spool = Spool::start(config(dir.path()), a_rx, b_tx).await.unwrap();
    assert!(inspect(dir.path()).unwrap().in_use);
    let consumer = commit_all(b_rx);
    wait_drained(dir.path(), &spool, Duration::from_secs(20)).await;
    drop(a_tx);
    let st = spool.join().await;
    let (seen, replayed) = consumer.await.unwrap();
    assert_eq!((replayed, st.rejected_records), (15, 0));
    let batches: HashSet<i64> = seen.iter().map(|s| s / 1000).collect();
    assert_eq!(batches, (0..30).filter(|s| s % 2 == 1).collect());
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Starts a spool on `dir` that must be refused; the error.
async fn start_refused(dir: &std::path::Path) -> String {
    let (_a, a_rx) = mpsc::channel(4);
    let (b_tx, _b) = mpsc::channel(4);
    Spool::start(config(dir), a_rx, b_tx)
        .await
        .unwrap_err()
        .to_string()
}

/// Refuses every batch that reaches it (a database that says no to each replay).
fn refuse_all(mut rx: mpsc::Receiver<TelemetryBatch>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            b.ack
                .reject(Rejection::new(RejectCode::ForeignSession, "not yours"));
        }
    })
}

/// The spool's files are the daemon's alone: a new directory (and its parents) is made
/// 0700, an existing one open to others is tightened to 0700, and the segments, `LOCK`,
/// `rejected/` and `rejected/reasons.jsonl` are 0600 / 0700 whatever the umask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_files_are_owner_only_and_a_loose_directory_is_tightened() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let fresh = root.path().join("made/by/the/spool");
    let (_a, a_rx) = mpsc::channel(4);
    let (b_tx, _b) = mpsc::channel(4);
    let first = Spool::start(config(&fresh), a_rx, b_tx).await.unwrap();
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&root.path().join("made")), 0o700);
    drop(first);

    let dir = root.path().join("loose");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (a_tx, a_rx) = mpsc::channel(16);
    let (b_tx, b_rx) = mpsc::channel(4);
    let spool = Spool::start(config(&dir), a_rx, b_tx).await.unwrap();
    assert_eq!(
        mode(&dir),
        0o700,
        "an existing world-writable spool dir is tightened"
    );
    // The batcher is stalled: the batches are acked from segment files.
    for rx in send_batches(&a_tx, 0..6, 5).await {
        assert_eq!(outcome(rx).await, Some(BatchOutcome::Durable));
    }
    let segs = segment::list(&dir).unwrap();
    assert!(!segs.is_empty());
    for s in &segs {
        assert_eq!(mode(&s.path), 0o600, "{}", s.path.display());
    }
    assert_eq!(mode(&dir.join("LOCK")), 0o600);
    // Refused on replay: dead letters, just as private.
    let consumer = refuse_all(b_rx);
    wait_drained(&dir, &spool, Duration::from_secs(20)).await;
    drop(a_tx);
    let st = spool.join().await;
    consumer.await.unwrap();
    assert!(st.rejected_records >= 6, "{st:?}");
    let rejected = dir.join(rejected::DIR);
    assert_eq!(mode(&rejected), 0o700);
    assert_eq!(mode(&rejected.join(rejected::REASONS)), 0o600);
    for s in segment::list(&rejected).unwrap() {
        assert_eq!(mode(&s.path), 0o600, "{}", s.path.display());
    }
}

/// A symbolic link planted at `LOCK`, at `rejected/reasons.jsonl` or as `rejected/` is
/// refused with an error naming it, and whatever it points to is left untouched; one
/// planted under a segment's name is not taken for a segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_planted_in_the_spool_are_refused_not_followed() {
    use std::os::unix::fs::symlink;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("spool");
    std::fs::create_dir(&dir).unwrap();
    let precious = root.path().join("precious");
    std::fs::write(&precious, "precious\n").unwrap();
    let untouched = || assert_eq!(std::fs::read_to_string(&precious).unwrap(), "precious\n");

    // LOCK
    symlink(&precious, dir.join("LOCK")).unwrap();
    let err = start_refused(&dir).await;
    assert!(
        err.contains("LOCK") && err.contains("symbolic link") && err.contains("refusing to follow"),
        "{err}"
    );
    untouched();
    assert!(inspect(&dir)
        .unwrap_err()
        .to_string()
        .contains("symbolic link"));
    std::fs::remove_file(dir.join("LOCK")).unwrap();

    // rejected/reasons.jsonl: the record is not kept (its segment stays in the spool).
    let rejected = dir.join(rejected::DIR);
    std::fs::create_dir(&rejected).unwrap();
    symlink(&precious, rejected.join(rejected::REASONS)).unwrap();
    let mut dead = rejected::DeadLetters::open(&dir, 1 << 20, 8192).unwrap();
    let (b, _) = batch(1, 3);
    let mut payload = Vec::new();
    encode_batch(
        b.org_id,
        b.aircraft_id,
        b.session_id,
        &b.points,
        1,
        &mut payload,
    );
    let err = dead
        .keep(&payload, "foreign_session", "x")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("reasons.jsonl") && err.contains("symbolic link"),
        "{err}"
    );
    untouched();
    let err = rejected::read_reasons(&rejected).unwrap_err().to_string();
    assert!(err.contains("symbolic link"), "{err}");

    // rejected/ itself
    std::fs::remove_dir_all(&rejected).unwrap();
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    symlink(&elsewhere, &rejected).unwrap();
    let err = start_refused(&dir).await;
    assert!(
        err.contains("rejected") && err.contains("symbolic link"),
        "{err}"
    );
    assert!(requeue_rejected(&dir).is_err());
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    std::fs::remove_file(&rejected).unwrap();

    // A link under a segment's name is no segment: never read, never deleted through.
    let real = root.path().join("real.seg");
    {
        let mut w = SegmentWriter::create(root.path(), 0, 1).unwrap();
        let mut framed = Vec::new();
        frame_record(&payload, &mut framed);
        w.append(&framed).unwrap();
        std::fs::rename(&w.path, &real).unwrap();
    }
    symlink(&real, dir.join(segment::file_name(3))).unwrap();
    assert!(segment::list(&dir).unwrap().is_empty());
    assert!(inspect(&dir).unwrap().segments.is_empty());
    assert!(real.exists());
}
