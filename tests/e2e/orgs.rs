//! Per-organization metrics (issue 19): points, batches, bytes, refusals and rate-limit
//! pauses labelled by org code, over TCP and UDP, and the label cap: past
//! `metrics.max_org_labels` organizations, the next ones count under `org="other"`. (MQTT is
//! covered in tests/mqtt, the dashboard and alert on top of them in tests/live.)

use std::time::Duration;

use bytes::BytesMut;
use dbx_proto::{AircraftRef, EncodeOptions, PointForm, ServerMessage};
use dbx_testkit::gateway::{now_micros, points};
use dbx_testkit::{Fixture, TestGateway};
use uuid::Uuid;

use crate::Env;

/// The bytes of one batch frame as the gateway sends it (length prefix included).
fn batch_frame(seq: u64, aircraft: &AircraftRef, session: Uuid, n: usize, first: i64) -> BytesMut {
    let mut b = BytesMut::new();
    let pts = points(n, first, now_micros() - 60_000_000);
    dbx_proto::encode_batch_with(
        &mut b,
        seq,
        aircraft,
        session,
        &pts,
        EncodeOptions::from(PointForm::Map),
    )
    .expect("encodable batch");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_organization_metrics_count_each_input_under_the_org_code_up_to_the_cap() {
    let env = Env::start(&[("DBX_METRICS__MAX_ORG_LABELS", "2")]).await;
    let acme = AircraftRef::Id(env.aircraft);
    let beta = Fixture::org(&env.client, "BETA", Some(100)).await;
    let beta_aircraft = AircraftRef::Id(Fixture::aircraft(&env.client, beta.id, "N200BT").await);
    let gamma = Fixture::org(&env.client, "GAMMA", None).await;
    let gamma_aircraft = AircraftRef::Id(Fixture::aircraft(&env.client, gamma.id, "N300GM").await);

    // ACME over TCP, labelled first: two batches acked, one refused (unknown aircraft).
    let (mut g, _) = TestGateway::hello(env.daemon.tcp, &env.org.key).await;
    let session = Uuid::new_v4();
    let frames = [
        batch_frame(1, &acme, session, 10, 1),
        batch_frame(2, &acme, session, 10, 11),
        batch_frame(3, &AircraftRef::Registration("N0NE".into()), session, 3, 21),
    ];
    for f in &frames {
        g.send_raw(f).await;
    }
    let (acked, nacks) = g.await_verdicts(3).await;
    assert_eq!((acked, nacks.len()), (2, 1), "{nacks:?}");
    let acme_bytes: usize = frames.iter().map(BytesMut::len).sum();

    // BETA (100 points/s), labelled second: over UDP one datagram fits its bucket, the next
    // is dropped over the limit; over TCP a batch runs the bucket into debt and reads pause.
    let (mut bg, _) =
        TestGateway::hello_within(env.daemon.tcp, &beta.key, Duration::from_secs(10)).await;
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut beta_bytes = 0;
    for first in [1, 81] {
        let mut d = BytesMut::new();
        let pts = points(80, first, now_micros() - 60_000_000);
        dbx_proto::encode_datagram(
            &mut d,
            &beta.key,
            None,
            &beta_aircraft,
            Uuid::new_v4(),
            &pts,
            EncodeOptions::from(PointForm::Map),
        )
        .unwrap();
        beta_bytes += d.len();
        udp.send_to(&d, env.daemon.udp.expect("udp")).await.unwrap();
    }
    let over = dbx_testkit::wait_until(Duration::from_secs(10), || async {
        env.metric("dbx_org_rejections_total", "org=\"BETA\"").await == 1.0
    })
    .await;
    assert!(over, "the second datagram was not refused over the limit");
    // More than a full bucket, so the debt does not depend on how much it refilled.
    let frame = batch_frame(1, &beta_aircraft, Uuid::new_v4(), 200, 1);
    beta_bytes += frame.len();
    bg.send_raw(&frame).await;
    assert_eq!(bg.recv().await, Some(ServerMessage::Ack { seq: 1 }));

    // GAMMA, past the cap of two: counted under `other`.
    let (mut cg, _) =
        TestGateway::hello_within(env.daemon.tcp, &gamma.key, Duration::from_secs(10)).await;
    cg.send_raw(&batch_frame(1, &gamma_aircraft, Uuid::new_v4(), 5, 1))
        .await;
    assert_eq!(cg.recv().await, Some(ServerMessage::Ack { seq: 1 }));

    let (_, body) = env.daemon.http_get("/metrics").await;
    let m = |name: &str, org: &str| {
        dbx_testkit::env::metric_value(&body, name, &format!("org=\"{org}\""))
    };
    let acme_code = env.org.code.as_str();
    for (org, points, batches, refused, bytes) in [
        (acme_code, 20.0, 2.0, 1.0, acme_bytes as f64),
        ("BETA", 280.0, 2.0, 1.0, beta_bytes as f64),
    ] {
        assert_eq!(m("dbx_org_points_received_total", org), points, "{org}");
        assert_eq!(m("dbx_org_batches_received_total", org), batches, "{org}");
        assert_eq!(m("dbx_org_rejections_total", org), refused, "{org}");
        assert_eq!(m("dbx_org_received_bytes_total", org), bytes, "{org}");
    }
    // One pause for BETA's debt: 200 points less what its bucket held (20 to 100) at 100/s.
    assert_eq!(m("dbx_org_rate_limit_wait_seconds_count", "BETA"), 1.0);
    let paused = m("dbx_org_rate_limit_wait_seconds_sum", "BETA");
    assert!((0.9..=2.0).contains(&paused), "{paused}");
    assert_eq!(m("dbx_org_rate_limit_wait_seconds_count", acme_code), 0.0);
    assert_eq!(m("dbx_org_points_received_total", "other"), 5.0);
    assert_eq!(m("dbx_org_batches_received_total", "other"), 1.0);
    assert!(!body.contains("GAMMA"), "a label past the cap:\n{body}");
    assert_eq!(
        dbx_testkit::env::metric_value(&body, "dbx_org_labels", ""),
        2.0
    );
    // promtool finds nothing to say about them; HELP texts for each.
    let (ok, said) = dbx_testkit::env::promtool_check_metrics(&body);
    assert!(
        ok && said.trim().is_empty(),
        "promtool check metrics:\n{said}"
    );
    for name in [
        "dbx_org_points_received_total",
        "dbx_org_batches_received_total",
        "dbx_org_received_bytes_total",
        "dbx_org_rejections_total",
        "dbx_org_rate_limit_wait_seconds",
        "dbx_org_labels",
    ] {
        assert!(body.contains(&format!("# HELP {name} ")), "{name}");
    }
}
