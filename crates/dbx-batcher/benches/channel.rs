//! Listener → batcher channel: tokio `mpsc` against crossbeam-channel, both bounded
//! at 1024, one async producer task sending 100 000 small messages, one consumer.
//! crossbeam's receiver blocks, so its consumer runs on a `spawn_blocking` thread:
//! the price of bridging it into an async batcher that must also watch a timer.
//! Run: `cargo bench -p dbx-batcher --bench channel`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const N: u64 = 100_000;
const CAP: usize = 1024;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("channel");
    g.throughput(Throughput::Elements(N));
    g.sample_size(20);
    g.bench_function("tokio_mpsc", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<[u64; 8]>(CAP);
                let consumer = tokio::spawn(async move {
                    let mut sum = 0u64;
                    while let Some(m) = rx.recv().await {
                        sum = sum.wrapping_add(m[0]);
                    }
                    sum
                });
                for i in 0..N {
                    tx.send([i; 8]).await.expect("send");
                }
                drop(tx);
                consumer.await.expect("consumer")
            })
        })
    });
    g.bench_function("crossbeam_blocking_consumer", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (tx, rx) = crossbeam_channel::bounded::<[u64; 8]>(CAP);
                let consumer = tokio::task::spawn_blocking(move || {
                    let mut sum = 0u64;
                    while let Ok(m) = rx.recv() {
                        sum = sum.wrapping_add(m[0]);
                    }
                    sum
                });
                for i in 0..N {
                    // An async producer cannot block: try, and yield while full.
                    let mut m = [i; 8];
                    loop {
                        match tx.try_send(m) {
                            Ok(()) => break,
                            Err(crossbeam_channel::TrySendError::Full(back)) => {
                                m = back;
                                tokio::task::yield_now().await;
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                drop(tx);
                consumer.await.expect("consumer")
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
