//! The spool when the disk refuses a write, with a real write error from the kernel:
//! this test binary limits the size of the files it may write (`RLIMIT_FSIZE`, a
//! "size-limited file"), so an append past the limit fails with EFBIG half-way, as
//! a full disk fails with ENOSPC. A binary of its own, because the limit is the
//! whole process's.
//!
//! What must hold: no panic; nothing acked that is not whole on disk (the segment is
//! cut back to its last fsynced length, so no torn or corrupt record is left); the
//! batches the failed write held are retried (in a fresh segment, in smaller group
//! commits) and acked then; and when the batcher returns, every batch reaches it.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use dbx_core::BatchOutcome;
use dbx_spool::record::decode_batch;
use dbx_spool::segment;
use dbx_spool::{Spool, SpoolConfig};
use tokio::sync::mpsc;

mod spool_kit;
use spool_kit::*;

/// Files this process writes may not grow past this.
const FILE_LIMIT: u64 = 96 * 1024;

fn limit_file_size(bytes: u64) {
    // SAFETY: plain libc calls with valid arguments; SIGXFSZ is ignored so that
    // an oversized write returns EFBIG instead of killing the process.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let lim = libc::rlimit {
            rlim_cur: bytes as libc::rlim_t,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_acks_nothing_unwritten_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    limit_file_size(FILE_LIMIT);
    let cfg = SpoolConfig {
        // Segments would grow to 1 MiB: every one hits the file size limit first.
        segment_bytes: 1024 * 1024,
        ..config(dir.path())
    };
    // Every batch is queued before the spool starts, so that its first group
    // commit (≈ 300 KiB) is larger than any file may be: retrying that same burst
    // would fail forever; smaller ones must be tried.
    let n = 300;
    let (a_tx, a_rx) = mpsc::channel(n as usize);
    let acks = send_batches(&a_tx, 0..n, 10).await;
    // The batcher is stalled: everything goes to the spool, with several write
    // errors on the way (each after a 1 s pause).
    let (b_tx, b_rx) = mpsc::channel(4);
    let spool = Spool::start(cfg, a_rx, b_tx).await.unwrap();
    for rx in acks {
        let verdict = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("acked once the retry wrote it")
            .ok();
        assert_eq!(verdict, Some(BatchOutcome::Durable));
    }
    let st = spool.stats();
    assert!(st.full >= 1, "the write errors were met: {st:?}");

    // Every acked batch is whole on disk: no segment past the limit, none torn or
    // corrupt, and every seq in one of them.
    let mut on_disk = HashSet::new();
    let segments = segment::list(dir.path()).unwrap();
    let files = segments.len();
    for f in &segments {
        let bytes = std::fs::read(&f.path).unwrap();
        assert!(bytes.len() as u64 <= FILE_LIMIT, "{f:?}");
        let scan = segment::scan(bytes.as_slice(), bytes.len() as u64).unwrap();
        assert_eq!((scan.corrupt, scan.torn), (0, false), "{f:?}");
        for p in scan.records {
            on_disk.extend(
                decode_batch(&p)
                    .unwrap()
                    .points
                    .iter()
                    .map(|p| p.seq / 1000),
            );
        }
    }
    assert!(
        files >= 3,
        "a fresh segment after each refused write: {files}"
    );
    assert_eq!(on_disk, (0..n).collect::<HashSet<i64>>());

    // The batcher returns: everything is replayed and the directory empties.
    let consumer = commit_all(b_rx);
    let started = Instant::now();
    wait_drained(dir.path(), &spool, Duration::from_secs(30)).await;
    drop(a_tx);
    let st = spool.join().await;
    let (seen, _) = consumer.await.unwrap();
    let batches: HashSet<i64> = seen.iter().map(|s| s / 1000).collect();
    assert_eq!(batches, (0..n).collect::<HashSet<i64>>());
    assert_eq!(st.corrupt_records, 0, "{st:?}");
    eprintln!(
        "{} batches held back by refused writes, {files} segments, drained in {:?}",
        st.full,
        started.elapsed()
    );
}
