//! Where an ack's time goes (issue 20): every acknowledged batch's time from frame
//! received to ack written, split into the stages of `dbx_batch_stage_seconds`, against
//! a real daemon. The stages partition that interval, so their sums add up to the sum of
//! `dbx_ack_latency_seconds`. No speed is asserted.

use std::time::Duration;

use dbx_core::metrics::{BATCH_STAGE_SECONDS, STAGES};
use dbx_proto::{AircraftRef, PointForm};
use dbx_testkit::env::metric_value;
use dbx_testkit::gateway::{now_micros, points};
use dbx_testkit::{wait_until, TestGateway};
use uuid::Uuid;

use crate::Env;

/// `_count` and `_sum` of one stage in an exposition.
fn stage(exposition: &str, stage: &str) -> (f64, f64) {
    let labels = format!("stage=\"{stage}\"");
    (
        metric_value(exposition, &format!("{BATCH_STAGE_SECONDS}_count"), &labels),
        metric_value(exposition, &format!("{BATCH_STAGE_SECONDS}_sum"), &labels),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_batch_has_each_stage_and_the_stages_add_up_to_the_ack_latency() {
    let env = Env::start(&[]).await;
    let aircraft = AircraftRef::Registration(env.registration.clone());
    let t0 = now_micros() - 600_000_000;
    // Two gateways at once, each with batches in flight, so that flushes carry several
    // batches and acks are coalesced.
    const PER_GATEWAY: u64 = 30;
    let mut sends = Vec::new();
    for g in 0..2i64 {
        let (addr, key, aircraft) = (env.daemon.tcp, env.org.key.clone(), aircraft.clone());
        sends.push(tokio::spawn(async move {
            let (mut gw, _) = TestGateway::hello(addr, &key).await;
            let session = Uuid::new_v4();
            for seq in 1..=PER_GATEWAY {
                let first = (seq as i64 - 1) * 50;
                let pts = points(50, first, t0 + g * 1_000_000 + first * 100_000);
                gw.send_batch(seq, &aircraft, session, &pts, PointForm::Map)
                    .await;
            }
            gw.await_verdicts(PER_GATEWAY).await
        }));
    }
    for s in sends {
        let (acked, nacks) = s.await.unwrap();
        assert_eq!((acked, nacks.len()), (PER_GATEWAY, 0));
    }
    let batches = (2 * PER_GATEWAY) as f64;
    // The connection records the last stage right after writing the ack: wait for it.
    let counted = wait_until(Duration::from_secs(10), || async {
        let (_, body) = env.daemon.http_get("/metrics").await;
        stage(&body, "ack_written").0 >= batches
    })
    .await;
    assert!(counted, "ack_written never reached {batches} observations");

    let (_, body) = env.daemon.http_get("/metrics").await;
    assert!(
        body.contains(&format!("# HELP {BATCH_STAGE_SECONDS} ")),
        "no HELP line for {BATCH_STAGE_SECONDS}"
    );
    // The stages have buckets of their own, finer than the global ones below 100 ms.
    assert!(
        body.contains(&format!(
            "{BATCH_STAGE_SECONDS}_bucket{{stage=\"copy\",le=\"0.0001\"}}"
        )),
        "the stage histogram lacks its fine buckets"
    );
    let ack_count = metric_value(&body, "dbx_ack_latency_seconds_count", "");
    let ack_sum = metric_value(&body, "dbx_ack_latency_seconds_sum", "");
    assert_eq!(ack_count, batches);
    let mut stages_sum = 0.0;
    for name in STAGES {
        let (count, sum) = stage(&body, name);
        assert_eq!(
            count, batches,
            "stage {name}: one observation per acked batch"
        );
        assert!(sum >= 0.0, "stage {name}: sum {sum}");
        stages_sum += sum;
    }
    // The stages partition each batch's interval from frame received to ack written,
    // which is what dbx_ack_latency_seconds measures: the sums agree up to rounding.
    let ack_mean = ack_sum / ack_count;
    let stages_mean = stages_sum / batches;
    let slack = 1e-4 + ack_mean * 1e-3;
    assert!(
        stages_mean <= ack_mean + slack && stages_mean >= ack_mean - slack,
        "sum of stage means {stages_mean} s vs ack latency mean {ack_mean} s"
    );
    // The stages a batch cannot pass without time (a COPY, a commit) took some.
    for name in ["copy", "commit", "session_upsert"] {
        assert!(stage(&body, name).1 > 0.0, "stage {name} took no time");
    }
}
