//! MQTT input, end to end (issue 18): a real Mosquitto started by the test kit with the
//! configuration in deploy/mosquitto/, real `dbx serve` processes subscribing to it,
//! publishers written by others (Debian's `mosquitto_pub`/`mosquitto_sub` and a
//! python3-paho-mqtt script, tests/mqtt/publish.py) and a real PostgreSQL.
//!
//! Needs `mosquitto` and `mosquitto-clients` (scripts/test-tools) and paho-mqtt in the test
//! Python (scripts/requirements-test.txt); scripts/test brings them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use dbx_core::Point;
use dbx_testkit::broker::{wait_subscribed, PASSWORD};
use dbx_testkit::{Daemon, Fixture, Org, TestBroker, TestDb};
use tokio_postgres::Client;
use uuid::Uuid;

fn dbx_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_dbx"))
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// A database with two organizations (ACME with N100AC, BETA with N200BT) and a broker
/// whose users are dbx, ACME and BETA.
struct Fleet {
    _db: TestDb,
    client: Client,
    acme: Org,
    beta: Org,
    n100: Uuid,
    ingest_url: String,
    broker: TestBroker,
}

async fn fleet_with(tls: Option<(PathBuf, PathBuf)>) -> Fleet {
    let (db, ingest_url) = TestDb::migrated().await;
    let client = db.client().await;
    let acme = Fixture::org(&client, "ACME", None).await;
    let beta = Fixture::org(&client, "BETA", None).await;
    let n100 = Fixture::aircraft(&client, acme.id, "N100AC").await;
    Fixture::aircraft(&client, beta.id, "N200BT").await;
    let broker = TestBroker::start(&["ACME", "BETA"], tls);
    Fleet {
        _db: db,
        client,
        acme,
        beta,
        n100,
        ingest_url,
        broker,
    }
}

async fn fleet() -> Fleet {
    fleet_with(None).await
}

impl Fleet {
    /// A daemon consuming the broker as `client_id`, subscribed before this returns.
    async fn daemon(&self, client_id: &str, extra: &[(&str, &str)]) -> Daemon {
        let env = self.broker.daemon_env(client_id);
        let mut all: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        all.push(("DBX_BATCHER__MAX_BATCH_AGE_MS", "20"));
        all.extend_from_slice(extra);
        let d = Daemon::start(dbx_bin(), &self.ingest_url, &all).await;
        assert!(
            wait_subscribed(&d, Duration::from_secs(20)).await,
            "dbx did not subscribe:\n{}\nbroker:\n{}",
            d.log(),
            self.broker.broker.log()
        );
        d
    }

    async fn rows(&self, session: Uuid) -> i64 {
        self.client
            .query_one(
                "SELECT count(*) FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
                &[&session],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until `session` has `n` rows (or 60 s), then that it stays there; the count.
    async fn settle(&self, session: Uuid, n: i64) -> i64 {
        dbx_testkit::wait_until(Duration::from_secs(60), || async {
            self.rows(session).await >= n
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.rows(session).await
    }

    /// The paho gateway: `count` batches of `points` on `topic` for `session`.
    fn paho(&self, topic: &str, session: Uuid, count: u32, points: u32, interval: f64) -> Child {
        let user = topic.split('/').nth(1).unwrap_or("ACME");
        Command::new(dbx_testkit::prereq::python())
            .arg(repo_file("tests/mqtt/publish.py"))
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.broker.port().to_string(),
            ])
            .args(["--user", user, "--password", PASSWORD, "--topic", topic])
            .args(["--session", &session.to_string()])
            .args(["--client-id", &format!("gw-{session}")])
            .args([
                "--count",
                &count.to_string(),
                "--points",
                &points.to_string(),
            ])
            .args(["--interval", &interval.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running tests/mqtt/publish.py with the test Python (scripts/test makes it)")
    }

    /// `mosquitto_pub` as `user` (MQTT 5): one message from a file.
    fn mosquitto_pub(
        &self,
        user: &str,
        topic: &str,
        qos: u8,
        payload: &[u8],
    ) -> std::process::Output {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("payload");
        std::fs::write(&file, payload).unwrap();
        Command::new(dbx_testkit::prereq::tool("mosquitto_pub"))
            .args(["-h", "127.0.0.1", "-p", &self.broker.port().to_string()])
            .args(["-u", user, "-P", PASSWORD, "-V", "mqttv5", "-t", topic])
            .args(["-q", &qos.to_string(), "-f"])
            .arg(&file)
            .output()
            .expect("running mosquitto_pub")
    }

    /// `mosquitto_sub` as `user`, exiting after `count` messages or `secs` seconds.
    fn mosquitto_sub(&self, user: &str, topic: &str, count: u32, secs: u32) -> Child {
        Command::new(dbx_testkit::prereq::tool("mosquitto_sub"))
            .args(["-h", "127.0.0.1", "-p", &self.broker.port().to_string()])
            .args([
                "-u", user, "-P", PASSWORD, "-V", "mqttv5", "-t", topic, "-q", "1",
            ])
            .args(["-C", &count.to_string(), "-W", &secs.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running mosquitto_sub")
    }
}

fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().expect("publisher output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn metric(body: &str, name: &str, labels: &str) -> f64 {
    dbx_testkit::env::metric_value(body, name, labels)
}

/// A point with every field set, at a whole microsecond near now.
fn full_point(seq: i64) -> Point {
    let now = chrono::Utc::now().timestamp_micros();
    Point {
        ts_micros: now - 1_000 + seq,
        seq,
        lat: Some(47.25),
        lon: Some(-122.5),
        alt: Some(310.5),
        gs: Some(21.25),
        vs: Some(-1.5),
        hdg: Some(359.5),
        roll: Some(2.5),
        pitch: Some(-3.25),
        yaw: Some(12.0),
        ias: Some(22.5),
        bv: Some(22.2),
        bi: Some(-4.5),
        bp: Some(55.5),
        rpm: Some(vec![5100.0, 5200.0, 5300.0, 5400.0]),
        cs: Some(vec![0.5, -0.25]),
        fix: Some(3),
        sats: Some(14),
        temp: Some(-7.5),
        extra: Some(r#"{"mode":"auto","wind":[3.5,180]}"#.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_paho_and_mosquitto_pub_land_with_every_column() {
    let f = fleet().await;
    let d = f.daemon("dbx-columns", &[]).await;

    // MessagePack, every field, aircraft by UUID in the topic, from mosquitto_pub (QoS 1).
    let s1 = Uuid::new_v4();
    let p = full_point(7);
    let mut payload = BytesMut::new();
    dbx_proto::encode_batch_payload(
        &mut payload,
        Some(1),
        s1,
        std::slice::from_ref(&p),
        Default::default(),
    )
    .unwrap();
    let out = f.mosquitto_pub(
        "ACME",
        &format!("dbx/ACME/{}/telemetry", f.n100),
        1,
        &payload,
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(f.settle(s1, 1).await, 1, "{}", d.log());
    let r = f
        .client
        .query_one(
            "SELECT org_id, aircraft_id, (extract(epoch FROM ts) * 1000000)::int8, seq, latitude, longitude, \
                    altitude_m, ground_speed_mps, vertical_speed_mps, heading_deg, roll_deg, pitch_deg, \
                    yaw_deg, airspeed_mps, battery_voltage, battery_current, battery_remaining_pct, \
                    motor_rpm, control_surfaces, gps_fix, satellites, temperature_c, extra \
             FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
            &[&s1],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, Uuid>(0), f.acme.id);
    assert_eq!(r.get::<_, Uuid>(1), f.n100);
    assert_eq!(r.get::<_, i64>(2), p.ts_micros);
    assert_eq!(r.get::<_, i64>(3), 7);
    assert_eq!(r.get::<_, f64>(4), 47.25);
    assert_eq!(r.get::<_, f64>(5), -122.5);
    let reals: Vec<f32> = (6..17).map(|i| r.get::<_, f32>(i)).collect();
    assert_eq!(
        reals,
        vec![310.5, 21.25, -1.5, 359.5, 2.5, -3.25, 12.0, 22.5, 22.2, -4.5, 55.5]
    );
    assert_eq!(
        r.get::<_, Vec<f32>>(17),
        vec![5100.0, 5200.0, 5300.0, 5400.0]
    );
    assert_eq!(r.get::<_, Vec<f32>>(18), vec![0.5, -0.25]);
    assert_eq!(r.get::<_, i16>(19), 3);
    assert_eq!(r.get::<_, i16>(20), 14);
    assert_eq!(r.get::<_, f32>(21), -7.5);
    assert_eq!(
        r.get::<_, serde_json::Value>(22),
        serde_json::json!({"mode": "auto", "wind": [3.5, 180]})
    );

    // JSON with RFC 3339 timestamps, by registration, from paho (MQTT 5, QoS 1).
    let s2 = Uuid::new_v4();
    let (ok, text) = finish(f.paho("dbx/ACME/N100AC/telemetry", s2, 3, 4, 0.0));
    assert!(ok, "{text}");
    assert_eq!(f.settle(s2, 12).await, 12, "{}", d.log());
    let r = f
        .client
        .query_one(
            "SELECT org_id, aircraft_id, latitude, longitude, altitude_m, ground_speed_mps, vertical_speed_mps, \
                    heading_deg, battery_remaining_pct, gps_fix, satellites, ts > now() - interval '1 minute' \
             FROM dbx_aviation.flight_telemetry WHERE session_id = $1 AND seq = 5",
            &[&s2],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, Uuid>(0), r.get::<_, Uuid>(1)),
        (f.acme.id, f.n100)
    );
    assert!((r.get::<_, f64>(2) - (46.5 + 5e-5)).abs() < 1e-9);
    assert_eq!(r.get::<_, f64>(3), 6.6);
    assert_eq!(
        (5..9).map(|i| r.get::<_, f32>(i)).collect::<Vec<_>>(),
        vec![12.0, -0.5, 270.0, 80.0]
    );
    assert_eq!(r.get::<_, f32>(4), 120.5);
    assert_eq!((r.get::<_, i16>(9), r.get::<_, i16>(10)), (3, 11));
    assert!(r.get::<_, bool>(11));
    let owner: Uuid = f
        .client
        .query_one(
            "SELECT org_id FROM dbx_aviation.flight_sessions WHERE session_id = $1",
            &[&s2],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, f.acme.id);

    // QoS 0 is best effort, and still lands when nothing is saturated.
    let s3 = Uuid::new_v4();
    let text = format!(
        r#"{{"session":"{s3}","points":[{{"ts":{},"seq":1}}]}}"#,
        chrono::Utc::now().timestamp_micros()
    );
    assert!(f
        .mosquitto_pub("ACME", "dbx/ACME/N100AC/telemetry", 0, text.as_bytes())
        .status
        .success());
    assert_eq!(f.settle(s3, 1).await, 1);
    let (_, body) = d.http_get("/metrics").await;
    assert_eq!(
        metric(&body, "dbx_mqtt_messages_received_total", "qos0"),
        1.0
    );
    assert_eq!(metric(&body, "dbx_mqtt_messages_acked_total", ""), 4.0);
    assert_eq!(metric(&body, "dbx_mqtt_in_flight_messages", ""), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_payload_lands_in_the_dead_letter_topic_with_its_reason() {
    let f = fleet().await;
    let d = f.daemon("dbx-dead-letters", &[]).await;
    let sub = f.mosquitto_sub("ACME", "dbx/ACME/rejected", 3, 30);
    // mosquitto_sub has no ready signal: give it a moment to subscribe.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let now = chrono::Utc::now().timestamp_micros();
    let s = Uuid::new_v4();
    let bad_point = format!(
        r#"{{"session":"{s}","seq":9,"points":[{{"ts":{now},"seq":1}},{{"ts":{now},"seq":2,"lat":91.5}}]}}"#
    );
    let topic = "dbx/ACME/N100AC/telemetry";
    assert!(f
        .mosquitto_pub("ACME", topic, 1, bad_point.as_bytes())
        .status
        .success());
    assert!(f
        .mosquitto_pub("ACME", topic, 1, &[0x01, 0x02, 0x03])
        .status
        .success());
    let unknown = format!(r#"{{"session":"{s}","points":[{{"ts":{now},"seq":1}}]}}"#);
    assert!(f
        .mosquitto_pub("ACME", "dbx/ACME/N999ZZ/telemetry", 1, unknown.as_bytes())
        .status
        .success());
    // Nothing else is affected: a good message right after lands.
    let good = format!(r#"{{"session":"{s}","points":[{{"ts":{now},"seq":3}}]}}"#);
    assert!(f
        .mosquitto_pub("ACME", topic, 1, good.as_bytes())
        .status
        .success());
    assert_eq!(f.settle(s, 1).await, 1, "{}", d.log());

    let (ok, text) = finish(sub);
    assert!(ok, "mosquitto_sub: {text}\n{}", d.log());
    let notices: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(notices.len(), 3, "{text}");
    let n = &notices[0];
    assert_eq!(n["code"], "invalid_point", "{n}");
    assert_eq!(n["index"], 1);
    assert_eq!(n["topic"], topic);
    assert_eq!(n["payload_sha256"].as_str().map(str::len), Some(64));
    assert!(n["msg"].as_str().unwrap().contains("lat"), "{n}");
    assert_eq!(n["payload_bytes"], bad_point.len());
    assert_eq!(notices[1]["code"], "bad_frame", "{}", notices[1]);
    assert_eq!(notices[2]["code"], "unknown_aircraft", "{}", notices[2]);
    // Refused after decoding: the notice names the batch.
    assert_eq!(notices[2]["session"], s.to_string());
    for n in &notices {
        assert!(
            !n.to_string().contains(&now.to_string()),
            "the payload is not echoed: {n}"
        );
    }
    let (_, body) = d.http_get("/metrics").await;
    assert_eq!(
        metric(&body, "dbx_mqtt_messages_rejected_total", "invalid_point"),
        1.0
    );
    assert_eq!(
        metric(&body, "dbx_mqtt_messages_rejected_total", "bad_frame"),
        1.0
    );
    assert_eq!(
        metric(&body, "dbx_mqtt_dead_letters_published_total", ""),
        3.0
    );
    // Refused messages are acknowledged too (MQTT has no nack).
    assert_eq!(metric(&body, "dbx_mqtt_messages_acked_total", ""), 4.0);
    // Per organization (the topic's): every payload's bytes, the one batch accepted, the
    // three refused.
    let acme = "org=\"ACME\"";
    let bytes = bad_point.len() + 3 + unknown.len() + good.len();
    assert_eq!(
        metric(&body, "dbx_org_received_bytes_total", acme),
        bytes as f64
    );
    assert_eq!(metric(&body, "dbx_org_batches_received_total", acme), 1.0);
    assert_eq!(metric(&body, "dbx_org_points_received_total", acme), 1.0);
    assert_eq!(metric(&body, "dbx_org_rejections_total", acme), 3.0);
}

/// Streams `count` × 10 points with paho while `disrupt` runs once `trigger` rows are in;
/// every point must end up stored exactly once.
async fn stream_through(
    f: &Fleet,
    count: u32,
    trigger: i64,
    disrupt: impl std::future::Future<Output = ()>,
) -> Uuid {
    let s = Uuid::new_v4();
    let publisher = f.paho("dbx/ACME/N100AC/telemetry", s, count, 10, 0.01);
    let reached = dbx_testkit::wait_until(Duration::from_secs(60), || async {
        f.rows(s).await >= trigger
    })
    .await;
    assert!(reached, "nothing arrived before the disruption");
    disrupt.await;
    let (ok, text) = tokio::task::spawn_blocking(move || finish(publisher))
        .await
        .unwrap();
    assert!(ok, "publisher: {text}");
    let want = i64::from(count) * 10;
    assert_eq!(f.settle(s, want).await, want, "every published point, once");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_dbx_mid_stream_loses_and_doubles_nothing() {
    let f = fleet().await;
    let d = f.daemon("dbx-crash", &[]).await;
    let mut restarted = None;
    stream_through(&f, 300, 600, async {
        d.signal(libc::SIGKILL);
        tokio::time::sleep(Duration::from_millis(700)).await;
        restarted = Some(f.daemon("dbx-crash", &[]).await);
    })
    .await;
    let d2 = restarted.expect("restarted");
    let (_, body) = d2.http_get("/metrics").await;
    // What was in flight at the kill came back: from the broker's session, not lost.
    assert!(
        metric(&body, "dbx_mqtt_messages_received_total", "qos1") > 0.0,
        "{body}"
    );
    assert_eq!(metric(&body, "dbx_mqtt_sessions_lost_total", ""), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_and_doubles_nothing() {
    let f = fleet().await;
    let d = f.daemon("dbx-broker-restart", &[]).await;
    stream_through(&f, 300, 600, async {
        let broker = &f.broker.broker;
        tokio::task::block_in_place(|| broker.restart().expect("broker restart"));
    })
    .await;
    let (_, body) = d.http_get("/metrics").await;
    assert!(
        metric(&body, "dbx_mqtt_reconnects_total", "") >= 1.0,
        "{body}"
    );
    assert_eq!(
        metric(&body, "dbx_mqtt_sessions_lost_total", ""),
        0.0,
        "the broker kept the session"
    );
    assert_eq!(metric(&body, "dbx_mqtt_connected", ""), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_a_shared_subscription_split_the_load_and_lose_nothing() {
    let f = fleet().await;
    let group = [("DBX_MQTT__SHARED_GROUP", "dbx")];
    let a = f.daemon("dbx-share-a", &group).await;
    let b = f.daemon("dbx-share-b", &group).await;
    let mut b_again = None;
    stream_through(&f, 400, 1000, async {
        let received = |body: &str| metric(body, "dbx_mqtt_messages_received_total", "qos1");
        let (_, body_a) = a.http_get("/metrics").await;
        let (_, body_b) = b.http_get("/metrics").await;
        assert!(
            received(&body_a) > 0.0 && received(&body_b) > 0.0,
            "both take a share"
        );
        b.signal(libc::SIGKILL);
        tokio::time::sleep(Duration::from_secs(1)).await;
        b_again = Some(f.daemon("dbx-share-b", &group).await);
    })
    .await;
    drop(b_again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployed_acl_keeps_org_b_out_of_org_a() {
    let f = fleet().await;
    let d = f.daemon("dbx-acl", &[]).await;
    let now = chrono::Utc::now().timestamp_micros();
    let intruding = Uuid::new_v4();
    let own = Uuid::new_v4();
    let batch = |s: Uuid| format!(r#"{{"session":"{s}","points":[{{"ts":{now},"seq":1}}]}}"#);
    // BETA's gateway publishes under ACME's prefix: the broker refuses it (MQTT 5 PUBACK
    // "not authorized"), so dbx never sees it.
    let out = f.mosquitto_pub(
        "BETA",
        "dbx/ACME/N100AC/telemetry",
        1,
        batch(intruding).as_bytes(),
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.to_lowercase().contains("not authori"), "{out:?}");
    // Its own prefix works (so the credentials were fine).
    assert!(f
        .mosquitto_pub(
            "BETA",
            "dbx/BETA/N200BT/telemetry",
            1,
            batch(own).as_bytes()
        )
        .status
        .success());
    assert_eq!(f.settle(own, 1).await, 1, "{}", d.log());
    let owner: Uuid = f
        .client
        .query_one(
            "SELECT org_id FROM dbx_aviation.flight_telemetry WHERE session_id = $1",
            &[&own],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, f.beta.id);
    assert_eq!(f.rows(intruding).await, 0);
    // Nor may BETA read ACME's rejection notices: the broker lets it subscribe but
    // delivers nothing, while ACME's own subscriber gets the notice.
    let beta_sub = f.mosquitto_sub("BETA", "dbx/ACME/rejected", 1, 5);
    let acme_sub = f.mosquitto_sub("ACME", "dbx/ACME/rejected", 1, 20);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(f
        .mosquitto_pub("ACME", "dbx/ACME/N100AC/telemetry", 1, b"not a batch")
        .status
        .success());
    let (ok, text) = finish(acme_sub);
    assert!(ok && text.contains("bad_frame"), "{text}");
    let (ok, text) = finish(beta_sub);
    assert!(
        !ok && !text.contains("bad_frame"),
        "BETA read ACME's notice: {text}"
    );
    // And no anonymous client gets in at all.
    let anon = Command::new(dbx_testkit::prereq::tool("mosquitto_pub"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &f.broker.port().to_string(),
            "-t",
            "dbx/ACME/N100AC/telemetry",
            "-m",
            "{}",
        ])
        .output()
        .unwrap();
    assert!(!anon.status.success(), "{anon:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_credentials_to_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    let f = fleet_with(Some((cert_path.clone(), key_path))).await;
    let url = format!("mqtts://localhost:{}", f.broker.broker.tls_port().unwrap());
    let d = f
        .daemon(
            "dbx-tls",
            &[
                ("DBX_MQTT__URL", &url),
                ("DBX_MQTT__CA_FILE", cert_path.to_str().unwrap()),
            ],
        )
        .await;
    let s = Uuid::new_v4();
    let text = format!(
        r#"{{"session":"{s}","points":[{{"ts":{},"seq":1}}]}}"#,
        chrono::Utc::now().timestamp_micros()
    );
    assert!(f
        .mosquitto_pub("ACME", "dbx/ACME/N100AC/telemetry", 1, text.as_bytes())
        .status
        .success());
    assert_eq!(f.settle(s, 1).await, 1, "{}", d.log());

    // A wrong password: refused by the broker, said so in the log, never subscribed.
    let env = f.broker.daemon_env("dbx-wrong-password");
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.push(("DBX_MQTT__PASSWORD", "not-the-password"));
    let bad = Daemon::start(dbx_bin(), &f.ingest_url, &all).await;
    assert!(!wait_subscribed(&bad, Duration::from_secs(2)).await);
    assert!(
        bad.log().contains("refused the credentials"),
        "{}",
        bad.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_wait_for_the_byte_budget_and_give_it_back() {
    let f = fleet().await;
    // A budget of one frame: a 200-point message (about 40 KB of JSON) is charged the
    // whole budget until it is decoded, and then still more than half of it (its points'
    // heap), until the batcher resolves it. So messages that follow one another closely
    // must wait for each other, and still every point lands once.
    let d = f
        .daemon(
            "dbx-budget",
            &[
                ("DBX_LISTENER__MAX_FRAME_BYTES", "65536"),
                ("DBX_LIMITS__MAX_BUFFERED_BYTES", "65536"),
            ],
        )
        .await;
    let s = Uuid::new_v4();
    let publisher = f.paho("dbx/ACME/N100AC/telemetry", s, 40, 200, 0.0);
    let (ok, text) = tokio::task::spawn_blocking(move || finish(publisher))
        .await
        .unwrap();
    assert!(ok, "publisher: {text}");
    assert_eq!(f.settle(s, 8000).await, 8000, "every published point, once");
    let (_, body) = d.http_get("/metrics").await;
    assert!(
        metric(&body, "dbx_buffered_bytes_waits_total", "") > 0.0,
        "no message waited for the budget:\n{body}"
    );
    // Every charge went back once the batcher resolved its message.
    let drained = dbx_testkit::wait_until(Duration::from_secs(10), || async {
        let (_, body) = d.http_get("/metrics").await;
        metric(&body, "dbx_buffered_bytes", "") == 0.0
    })
    .await;
    assert!(drained, "bytes still charged after the stream");
}
