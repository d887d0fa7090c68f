//! Writes the seed corpus of the `spool_reader` cargo-fuzz target in /fuzz: small
//! segments of real batch payloads, intact and damaged in each way the reader must
//! handle (bad CRC, lost framing with intact records after it, torn tail, a version
//! 1 record). Run when the format changes:
//! `cargo test -p dbx-spool --test fuzz_corpus -- --ignored`.

use std::path::PathBuf;

use dbx_core::Point;
use dbx_spool::record::encode_batch;
use dbx_spool::segment::{self, frame_record};
use uuid::Uuid;

fn payload(seq: i64, points: usize) -> Vec<u8> {
    let pts: Vec<Point> = (0..points as i64)
        .map(|i| {
            let mut p = Point::new(1_700_000_000_000_000 + i, seq * 100 + i);
            p.lat = Some(47.5);
            p.alt = Some(1200.0);
            p.rpm = Some(vec![2400.0, 2410.0]);
            p.extra = Some("{\"k\":1}".into());
            p
        })
        .collect();
    let id = Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0);
    let mut out = Vec::new();
    encode_batch(id, id, id, &pts, 1_700_000_000_000_000, &mut out);
    out
}

fn segment_of(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut seg = segment::header(1_700_000_000_000_000).to_vec();
    for p in payloads {
        frame_record(p, &mut seg);
    }
    seg
}

#[test]
#[ignore = "writes the fuzz seed corpus into /fuzz/corpus"]
fn write_spool_reader_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/spool_reader");
    std::fs::create_dir_all(&dir).unwrap();
    let three = vec![payload(1, 1), payload(2, 2), payload(3, 1)];
    let first_len = 8 + three[0].len();
    let h = segment::HEADER_BYTES as usize;

    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("empty_segment", segment_of(&[])),
        ("one_record", segment_of(&three[..1])),
        ("three_records", segment_of(&three)),
    ];
    let mut bad_crc = segment_of(&three);
    bad_crc[h + first_len + 8 + 3] ^= 0x40;
    files.push(("bad_crc", bad_crc));
    let mut bad_length = segment_of(&three);
    bad_length[h + first_len..h + first_len + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    files.push(("bad_length", bad_length));
    let mut torn = segment_of(&three);
    torn.truncate(torn.len() - 9);
    files.push(("torn_tail", torn));
    let mut v1 = three[0].clone();
    v1.drain(1..9);
    v1[0] = 1;
    files.push(("version_1_record", segment_of(&[v1])));
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
