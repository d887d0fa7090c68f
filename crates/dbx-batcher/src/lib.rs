//! # dbx-batcher
//!
//! Turns [`dbx_core::TelemetryBatch`]es into committed rows and resolves their ack
//! handles. Parses no wire bytes.
//!
//! - `config`: flush thresholds, pool size, retry policy.
//! - `copy`: `CopyEncoder`, the binary COPY writer (PGCOPY header, rows, trailer) into a reused `BytesMut`.
//! - `partition`: which child partition a timestamp belongs to.
//! - `writer`: one flush: COPY into the partition, session statistics, high-water marks, commit.
//! - `dedupe`: per-session high-water marks and the staging path for possible duplicates.
//! - `batcher`: the task that groups batches by partition, applies the flush policy and retries.
