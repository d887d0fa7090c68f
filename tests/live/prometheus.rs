//! Debian's Prometheus with deploy/prometheus/prometheus.yml and alerts.yml, scraping two real
//! daemons under load on a PostgreSQL of the test's own (with pg_stat_statements preloaded, as
//! deploy/docker-compose.yml runs it): daemon `a` without a spool, daemon `b` with a small one.
//!
//! The copies differ from the shipped files only where a test must: the `dbx` job's targets are
//! the two daemons and its bearer token file the test's (the daemons require the token, so the
//! shipped `authorization` block is exercised), the `prometheus` job scrapes this Prometheus,
//! the `node` job (a backup host's node_exporter, which promtool's unit tests cover) is left
//! out, and time runs [`SPEEDUP`] times faster: the scrape and evaluation intervals and every
//! duration of alerts.yml (`for:` and range selectors) are divided by it, so an alert fires
//! after the same number of samples as in production. Thresholds that are values in seconds
//! (`time() - … > 600`) are not durations and stay.
//!
//! Then: both targets are up; the daemons are driven so that every kind of event a dashboard
//! panel shows happens (a batch for an unknown aircraft, a wrong key, a resent batch, a session
//! of another aircraft, rate limits over TCP and UDP, the connection limit, a maintenance step
//! skipped on a busy lock; in the outage, maintenance failing, writes retried, the spool
//! filling up, a spooled batch refused on replay and kept as a dead letter, and the replay);
//! PostgreSQL is stopped and DbxDatabaseUnreachable and DbxIngestStalled fire for both daemons
//! within their (scaled) windows, and resolve once it is back (DbxSpoolDeadLetters fires for
//! the dead letter); finally every query of the Grafana dashboard returns data (finite
//! numbers) through the HTTP API, except those listed in [`EMPTY_UNLESS`] with what would
//! have to happen for them to have any — today none.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dbx_client::loadgen::{self, LoadgenConfig, Stats, Transport};
use dbx_core::ShutdownTrigger;
use dbx_proto::{AircraftRef, PointForm, ServerMessage};
use dbx_testkit::daemon::http_get_with;
use dbx_testkit::env::metric_value;
use dbx_testkit::gateway::{now_micros, points};
use dbx_testkit::prereq::tool;
use dbx_testkit::{Daemon, Fixture, Org, OwnCluster, TestGateway};
use serde_json::Value;
use serde_norway::Value as Yaml;
use uuid::Uuid;

use crate::{dbx_bin, free_port, poll, read, Server};

/// How much faster than in production time runs for Prometheus here.
const SPEEDUP: f64 = 30.0;

/// Dashboard queries allowed to return an empty vector, with what would have to happen for
/// them to return data. Each is checked to be empty: a query that has data is not listed.
const EMPTY_UNLESS: &[(&str, &str)] = &[];

/// The bearer token the daemons require and Prometheus presents.
const TOKEN: &str = "prometheus-live-test-token-0123456789abcdef";

/// The organization flying the fleet, and its aircraft (the loadgen's default registrations).
const FLEET: [&str; 4] = ["N101DX", "N102DX", "N201DX", "N301DX"];

/// Seconds of a Prometheus duration (`15s`, `5m`, `1h30m`, `500ms`, `1d`).
fn seconds(d: &str) -> f64 {
    let mut total = 0.0;
    let mut rest = d.trim();
    assert!(!rest.is_empty(), "empty duration");
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or_else(|| panic!("duration {d:?} has no unit"));
        let n: f64 = rest[..digits]
            .parse()
            .unwrap_or_else(|_| panic!("bad duration {d:?}"));
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "w" => 7.0 * 86400.0,
            other => panic!("unit {other:?} in duration {d:?}"),
        };
        total += n * unit;
        rest = &rest[unit_len..];
    }
    total
}

/// A Prometheus duration `SPEEDUP` times shorter, in milliseconds.
fn faster(d: &str) -> String {
    format!(
        "{}ms",
        (seconds(d) * 1000.0 / SPEEDUP).round().max(1.0) as u64
    )
}

/// `expr` with every range and subquery duration (`[5m]`, `[6h:5m]`) and every `offset`
/// made faster.
fn faster_ranges(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(open) = rest.find('[') {
        let close = open + rest[open..].find(']').expect("a closing ]");
        out.push_str(&rest[..=open]);
        let parts: Vec<String> = rest[open + 1..close].split(':').map(faster).collect();
        out.push_str(&parts.join(":"));
        rest = &rest[close..];
    }
    out.push_str(rest);
    let mut parts = out.split("offset ");
    let mut scaled = parts.next().unwrap_or_default().to_string();
    for part in parts {
        let end = part
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(part.len());
        scaled.push_str("offset ");
        scaled.push_str(&faster(&part[..end]));
        scaled.push_str(&part[end..]);
    }
    scaled
}

fn get_mut<'a>(v: &'a mut Yaml, key: &str) -> &'a mut Yaml {
    v.get_mut(key)
        .unwrap_or_else(|| panic!("deploy/prometheus: no key {key}"))
}

/// deploy/prometheus/prometheus.yml for this test (see the module's doc).
fn prometheus_yml(targets: &[SocketAddr], own: SocketAddr, token: &Path) -> String {
    let mut c: Yaml =
        serde_norway::from_str(&read("deploy/prometheus/prometheus.yml")).expect("YAML");
    let global = get_mut(&mut c, "global");
    for key in ["scrape_interval", "evaluation_interval"] {
        let d = get_mut(global, key);
        *d = Yaml::from(faster(d.as_str().expect("a duration")));
    }
    let interval = global["scrape_interval"].clone();
    global["scrape_timeout"] = interval;
    assert_eq!(
        c["rule_files"],
        serde_norway::from_str::<Yaml>("[alerts.yml]").unwrap()
    );
    let jobs = get_mut(&mut c, "scrape_configs")
        .as_sequence_mut()
        .expect("scrape_configs");
    jobs.retain(|j| j["job_name"] != "node");
    let mut seen = BTreeSet::new();
    for job in jobs.iter_mut() {
        let name = job["job_name"].as_str().expect("job_name").to_string();
        let targets: Vec<String> = match name.as_str() {
            "dbx" => {
                let file = &mut job["authorization"]["credentials_file"];
                assert_eq!(file.as_str(), Some("/run/secrets/dbx_admin_token"));
                *file = Yaml::from(token.display().to_string());
                targets.iter().map(|a| a.to_string()).collect()
            }
            "prometheus" => vec![own.to_string()],
            other => panic!("deploy/prometheus has a job {other} this test does not know"),
        };
        let configs = job["static_configs"]
            .as_sequence_mut()
            .expect("static_configs");
        assert_eq!(configs.len(), 1, "{name}");
        configs[0]["targets"] = serde_norway::to_value(targets).expect("targets");
        seen.insert(name);
    }
    assert_eq!(seen, BTreeSet::from(["dbx".into(), "prometheus".into()]));
    serde_norway::to_string(&c).expect("YAML")
}

/// deploy/prometheus/alerts.yml with every duration made faster; also the rules' names.
fn alerts_yml() -> (String, Vec<String>) {
    let mut rules: Yaml =
        serde_norway::from_str(&read("deploy/prometheus/alerts.yml")).expect("YAML");
    let mut names = Vec::new();
    for group in get_mut(&mut rules, "groups")
        .as_sequence_mut()
        .expect("groups")
    {
        for rule in get_mut(group, "rules").as_sequence_mut().expect("rules") {
            names.push(rule["alert"].as_str().expect("alert").to_string());
            let expr = faster_ranges(rule["expr"].as_str().expect("expr"));
            rule["expr"] = Yaml::from(expr);
            if let Some(d) = rule.get("for").and_then(Yaml::as_str).map(faster) {
                rule["for"] = Yaml::from(d);
            }
        }
    }
    (serde_norway::to_string(&rules).expect("YAML"), names)
}

/// Every query of the Grafana dashboard, with its variables (`$instance`, `$org`) set to All.
fn dashboard_exprs() -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr", Value::String(s)) => out.push(s.clone()),
                        _ => walk(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let dash: Value =
        serde_json::from_str(&read("deploy/grafana/dbx-dashboard.json")).expect("dashboard");
    let vars: Vec<(String, String)> = dash["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .map(|v| {
            let all = v["allValue"].as_str().expect("an All value");
            (
                format!("${}", v["name"].as_str().expect("name")),
                all.to_string(),
            )
        })
        .collect();
    assert!(vars.len() >= 2, "{vars:?}");
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out.into_iter()
        .map(|e| {
            let e = vars.iter().fold(e, |e, (var, all)| e.replace(var, all));
            assert!(!e.contains('$'), "a dashboard variable left in {e}");
            e
        })
        .collect()
}

/// A running Prometheus.
struct Prometheus {
    addr: SocketAddr,
    server: Server,
}

impl Prometheus {
    /// GET `path?query` of the HTTP API; the `data` of a successful answer.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let q: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", dbx_pg::params::urlencode(v)))
            .collect();
        let (code, body) = http_get_with(self.addr, &format!("{path}?{}", q.join("&")), &[]).await;
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{path} {query:?}: {code} {e}: {body}"));
        assert_eq!(v["status"], "success", "{path} {query:?}: {body}");
        v["data"].clone()
    }

    /// The result vector of an instant query.
    async fn query(&self, q: &str) -> Vec<Value> {
        let data = self.api("/api/v1/query", &[("query", q)]).await;
        assert_eq!(data["resultType"], "vector", "{q}: {data}");
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// (alertname, its org or instance) → state of the active (pending or firing) alerts.
    async fn alerts(&self) -> BTreeMap<(String, String), String> {
        let data = self.api("/api/v1/alerts", &[]).await;
        data["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .map(|a| {
                let label = |k: &str| a["labels"][k].as_str().map(str::to_string);
                let subject = label("org").or_else(|| label("instance"));
                (
                    (
                        label("alertname").unwrap_or_default(),
                        subject.unwrap_or_default(),
                    ),
                    a["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// The value of each series of `q`, by its `org` label.
    async fn by_org(&self, q: &str) -> BTreeMap<String, f64> {
        self.query(q)
            .await
            .iter()
            .map(|s| {
                let org = s["metric"]["org"].as_str().unwrap_or_default().to_string();
                let v = s["value"][1].as_str().and_then(|v| v.parse().ok());
                (org, v.unwrap_or(f64::NAN))
            })
            .collect()
    }
}

/// Starts Prometheus in `dir` scraping `targets` with the rewritten deploy/prometheus files.
async fn start_prometheus(dir: &Path, targets: &[SocketAddr], token: &Path) -> Prometheus {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let (rules, _) = alerts_yml();
    std::fs::write(dir.join("alerts.yml"), rules).expect("alerts.yml");
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, prometheus_yml(targets, addr, token)).expect("prometheus.yml");
    let mut cmd = Command::new(tool("prometheus"));
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--log.level=warn");
    let mut p = Prometheus {
        addr,
        server: Server::spawn("prometheus", cmd, dir),
    };
    let ready = poll(Duration::from_secs(30), || async {
        let ok = tokio::net::TcpStream::connect(addr).await.is_ok()
            && http_get_with(addr, "/-/ready", &[]).await.0 == 200;
        ok.then_some(())
    })
    .await;
    p.server.assert_running();
    assert!(ready.is_some(), "prometheus not ready\n{}", p.server.log());
    p
}

/// One metric of a daemon's /metrics (with the bearer token), summed over matching series.
async fn metric(d: &Daemon, name: &str, labels: &str) -> f64 {
    let auth = format!("Bearer {TOKEN}");
    let (code, body) = http_get_with(d.http, "/metrics", &[("Authorization", &auth)]).await;
    assert_eq!(code, 200, "{body}");
    metric_value(&body, name, labels)
}

/// A fleet of `gateways` loadgen gateways of `org` against `addr`, until `stop` fires; `seed`
/// makes its flights (sessions) its own.
fn fleet(
    addr: SocketAddr,
    transport: Transport,
    org: &Org,
    aircraft: &[&str],
    (gateways, rate, seed): (usize, f64, u64),
) -> (
    ShutdownTrigger,
    Arc<Stats>,
    tokio::task::JoinHandle<loadgen::Summary>,
) {
    let (trigger, stop) = ShutdownTrigger::new();
    let stats = Arc::new(Stats::default());
    let config = LoadgenConfig {
        addr,
        transport,
        tls: None,
        key: org.key.clone(),
        aircraft: aircraft.iter().map(|s| s.to_string()).collect(),
        gateways,
        aircraft_per_gateway: aircraft.len().div_ceil(gateways),
        batch_points: 50,
        window: 8,
        rate: (rate > 0.0).then_some(rate),
        duration: Duration::from_secs(600),
        warmup: Duration::ZERO,
        total_points: None,
        form: PointForm::Map,
        seed,
        mqtt: None,
        udp_auth: loadgen::UdpAuth::Mac,
    };
    let task = tokio::spawn(loadgen::run(config, stats.clone(), stop));
    (trigger, stats, task)
}

/// Stops a fleet and returns its summary.
async fn land(
    fleet: (
        ShutdownTrigger,
        Arc<Stats>,
        tokio::task::JoinHandle<loadgen::Summary>,
    ),
) -> loadgen::Summary {
    fleet.0.fire();
    tokio::time::timeout(Duration::from_secs(40), fleet.2)
        .await
        .expect("the loadgen stops")
        .expect("the loadgen task")
}

/// The events the dashboard's error panels show, made to happen on `d` (see the module doc);
/// returns the session it made `aircraft[0]`'s.
async fn misbehave(d: &Daemon, org: &Org, aircraft: [Uuid; 2]) -> Uuid {
    // A wrong key, and a batch for an aircraft the organization does not have.
    let mut g = TestGateway::connect(d.tcp).await;
    g.send_hello("dbx_not_a_key_of_anyone_0123456789").await;
    assert!(matches!(g.recv().await, Some(ServerMessage::Error { .. })));
    let (mut g, _) = TestGateway::hello(d.tcp, &org.key).await;
    let t0 = now_micros() - 60_000_000;
    let unknown = AircraftRef::Registration("N0NE".into());
    g.send_batch(
        1,
        &unknown,
        Uuid::new_v4(),
        &points(5, 1, t0),
        PointForm::Map,
    )
    .await;
    // A batch acked, then resent on another connection (deduplicated), then its session
    // claimed by another aircraft (refused at admission: the session's owner is known).
    let session = Uuid::new_v4();
    let (a, b) = (AircraftRef::Id(aircraft[0]), AircraftRef::Id(aircraft[1]));
    g.send_batch(2, &a, session, &points(20, 1, t0), PointForm::Map)
        .await;
    let (acked, nacks) = g.await_verdicts(2).await;
    assert_eq!((acked, nacks.len()), (2, 1), "{nacks:?}");
    let (mut again, _) = TestGateway::hello(d.tcp, &org.key).await;
    again
        .send_batch(1, &a, session, &points(20, 1, t0), PointForm::Map)
        .await;
    again
        .send_batch(2, &b, session, &points(5, 100, t0), PointForm::Map)
        .await;
    let (acked, nacks) = again.await_verdicts(2).await;
    assert_eq!(acked, 1, "{nacks:?}");
    assert!(
        matches!(
            nacks.as_slice(),
            [ServerMessage::Nack {
                seq: 2,
                code: dbx_core::RejectCode::ForeignSession,
                ..
            }]
        ),
        "{nacks:?}"
    );
    session
}

/// While the database is down, `d` (with a spool) acks a batch for `session` from
/// `aircraft`: admission cannot look the session up and leaves the check to the batcher, the
/// spool acks the batch, and on replay the batcher refuses it (the session is another
/// aircraft's; `dbx_batches_rejected_total`) and the spool keeps it as a dead letter.
async fn spool_a_dead_letter(d: &Daemon, org: &Org, aircraft: Uuid, session: Uuid) {
    let (mut g, _) = TestGateway::hello(d.tcp, &org.key).await;
    let pts = points(5, 500, now_micros() - 30_000_000);
    g.send_batch(1, &AircraftRef::Id(aircraft), session, &pts, PointForm::Map)
        .await;
    assert_eq!(
        g.recv_within(Duration::from_secs(15)).await,
        Some(ServerMessage::Ack { seq: 1 }),
        "the spool acks what the database will refuse\n{}",
        tail(&d.log())
    );
}

/// Fills `d`'s connection limit (`max`) with idle connections until one is refused.
async fn refuse_a_connection(d: &Daemon, max: usize) {
    let before = metric(d, "dbx_connections_refused_total", "").await;
    let mut held = Vec::new();
    for _ in 0..max + 2 {
        held.push(
            tokio::net::TcpStream::connect(d.tcp)
                .await
                .expect("connect"),
        );
    }
    let refused = poll(Duration::from_secs(10), || async {
        (metric(d, "dbx_connections_refused_total", "").await > before).then_some(())
    })
    .await;
    assert!(refused.is_some(), "no connection refused at the limit");
}

/// Makes a premake step find the default partition locked: the newest premade partition is
/// dropped, and a reader holds the default partition until a daemon skipped the step.
async fn skip_a_maintenance_step(url: &str, daemons: [&Daemon; 2]) {
    let c = dbx_testkit::connect(url).await;
    let newest: String = c
        .query_one(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
              WHERE i.inhparent = 'dbx_aviation.flight_telemetry'::regclass
                AND c.relname <> 'flight_telemetry_default'
              ORDER BY c.relname DESC LIMIT 1",
            &[],
        )
        .await
        .expect("newest partition")
        .get(0);
    // Under the maintenance lock (so that no premake recreates the partition in between),
    // drop the partition, then hold the default partition from another session (a DROP in
    // that transaction would hold the parent table until its end).
    let locker = dbx_testkit::connect(url).await;
    let key = dbx_control::partitions::MAINTENANCE_LOCK_KEY;
    locker
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await
        .expect("maintenance lock");
    c.batch_execute(&format!("DROP TABLE dbx_aviation.{newest}"))
        .await
        .expect("drop the newest partition");
    locker
        .batch_execute(
            "BEGIN; LOCK TABLE dbx_aviation.flight_telemetry_default IN ACCESS SHARE MODE",
        )
        .await
        .expect("lock the default partition");
    locker
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await
        .expect("maintenance unlock");
    let skipped = poll(Duration::from_secs(20), || async {
        let mut n = 0.0;
        for d in daemons {
            n += metric(d, "dbx_maintenance_skipped_total", "").await;
        }
        (n > 0.0).then_some(())
    })
    .await;
    locker.batch_execute("COMMIT").await.expect("release");
    assert!(
        skipped.is_some(),
        "no maintenance step was skipped (dropped {newest})\n{}\n{}",
        daemons[0].log(),
        daemons[1].log()
    );
}

/// The last lines of a log, for a failure message.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Waits until `want(state)` holds for both alerts on both daemons; when it did, or the last
/// active alerts seen.
async fn alerts_become(
    p: &Prometheus,
    instances: &[String],
    want: impl Fn(Option<&String>) -> bool,
    within: Duration,
) -> Result<Instant, BTreeMap<(String, String), String>> {
    let started = Instant::now();
    loop {
        let active = p.alerts().await;
        let all = ["DbxDatabaseUnreachable", "DbxIngestStalled"]
            .iter()
            .all(|a| {
                instances
                    .iter()
                    .all(|i| want(active.get(&(a.to_string(), i.clone()))))
            });
        if all {
            return Ok(Instant::now());
        }
        if started.elapsed() > within {
            return Err(active);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_daemons_the_dashboard_has_data_and_the_outage_alerts_fire() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = tmp.path().join("dbx_admin_token");
    std::fs::write(&token, TOKEN).expect("token");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let pg = OwnCluster::start(&[("shared_preload_libraries", "pg_stat_statements")]).await;
    let (url, ingest_url) = pg.migrated("dbx_prometheus").await;
    let client = dbx_testkit::connect(&url).await;
    let org = Fixture::org(&client, "FLEET", None).await;
    let mut fleet_ids = Vec::new();
    for r in FLEET {
        fleet_ids.push(Fixture::aircraft(&client, org.id, r).await);
    }
    // An organization over its rate limit, over TCP and over UDP.
    let slow = Fixture::org(&client, "SLOW", Some(500)).await;
    Fixture::aircraft(&client, slow.id, "N900SL").await;

    let token_env = token.display().to_string();
    let spool = tmp.path().join("spool");
    let spool_env = spool.display().to_string();
    let common = [
        ("DBX_ADMIN__TOKEN_FILE", token_env.as_str()),
        ("DBX_HEALTH__INTERVAL_SECS", "1"),
        ("DBX_PARTITIONS__INTERVAL_SECS", "1"),
        ("DBX_PARTITIONS__LOCK_TIMEOUT_MS", "100"),
        ("DBX_PARTITIONS__LOCK_ATTEMPTS", "1"),
        ("DBX_BATCHER__RETRY_MAX_MS", "500"),
        ("DBX_LISTENER__MAX_CONNECTIONS", "12"),
    ];
    let mut with_spool = common.to_vec();
    with_spool.extend([
        ("DBX_SPOOL__DIR", spool_env.as_str()),
        ("DBX_SPOOL__AFTER_MS", "300"),
        ("DBX_SPOOL__MAX_BYTES", "524288"),
        ("DBX_SPOOL__SEGMENT_BYTES", "32768"),
    ]);
    let (a, b) = tokio::join!(
        Daemon::start(dbx_bin(), &ingest_url, &common),
        Daemon::start(dbx_bin(), &ingest_url, &with_spool)
    );
    let instances = [a.http.to_string(), b.http.to_string()];
    let prom = start_prometheus(tmp.path(), &[a.http, b.http], &token).await;

    // Both targets up, and Prometheus itself (the shipped `prometheus` job).
    let up = poll(Duration::from_secs(30), || async {
        let r = prom.query("up == 1").await;
        (r.len() == 3).then_some(r)
    })
    .await;
    assert!(
        up.is_some(),
        "{:?}\n{}",
        prom.query("up").await,
        prom.server.log()
    );

    // Load on both, the rate-limited organization over TCP and UDP, and the error events.
    let fleet_a = fleet(a.tcp, Transport::Tcp, &org, &FLEET, (2, 2000.0, 1));
    let fleet_b = fleet(b.tcp, Transport::Tcp, &org, &FLEET, (2, 1000.0, 2));
    let slow_tcp = fleet(a.tcp, Transport::Tcp, &slow, &["N900SL"], (1, 0.0, 3));
    let udp = b.udp.expect("udp");
    let slow_udp = fleet(udp, Transport::Udp, &slow, &["N900SL"], (1, 3000.0, 4));
    let claimed = misbehave(&a, &org, [fleet_ids[0], fleet_ids[1]]).await;
    refuse_a_connection(&a, 12).await;
    skip_a_maintenance_step(&url, [&a, &b]).await;
    let waited = poll(Duration::from_secs(20), || async {
        let paused = metric(&a, "dbx_rate_limit_wait_seconds_count", "").await;
        let dropped = metric(&b, "dbx_rate_limit_dropped_points_total", "").await;
        (paused > 0.0 && dropped > 0.0).then_some(())
    })
    .await;
    assert!(waited.is_some(), "no rate-limit pause or drop");
    let slow = (land(slow_tcp).await, land(slow_udp).await);
    let slow_landed = Instant::now();
    assert!(
        slow.0.points_acked > 0 && slow.0.error.is_none(),
        "{}",
        slow.0
    );
    // Let the fleets fly a few scrapes more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let active = prom.alerts().await;
    for i in &instances {
        for a in [
            "DbxDatabaseUnreachable",
            "DbxIngestStalled",
            "DbxDaemonDown",
        ] {
            assert!(
                !active.contains_key(&(a.into(), i.clone())),
                "{a} {i}: {active:?}"
            );
        }
    }

    // PostgreSQL stops: both alerts fire for both daemons within their (scaled) windows.
    let stopped_at = Instant::now();
    pg.stop();
    spool_a_dead_letter(&b, &org, fleet_ids[1], claimed).await;
    let fired = alerts_become(
        &prom,
        &instances,
        |s| s.map(String::as_str) == Some("firing"),
        Duration::from_secs(60),
    )
    .await;
    let fired = fired.unwrap_or_else(|last| {
        panic!(
            "alerts not firing within 60 s: {last:?}\n{}\n{}",
            a.log(),
            b.log()
        )
    });
    let fired = fired.duration_since(stopped_at).as_secs_f64();
    let full = metric(&b, "dbx_spool_full_total", "").await;
    let started_at = Instant::now();
    pg.restart();
    let resolved = alerts_become(&prom, &instances, |s| s.is_none(), Duration::from_secs(60))
        .await
        .unwrap_or_else(|last| {
            panic!(
                "alerts not resolved within 60 s: {last:?} (a = {}, b = {})\n{}\n{}",
                instances[0],
                instances[1],
                tail(&a.log()),
                tail(&b.log())
            )
        });
    let resolved = resolved.duration_since(started_at).as_secs_f64();
    eprintln!(
        "prometheus: alerts firing {fired:.1} s after PostgreSQL stopped, resolved {resolved:.1} s \
         after it started"
    );
    // Not before the scaled range window saw no write for the scaled `for:`, less two scrape
    // intervals (the last write and its sample may precede the stop by that much).
    let stalled_for = seconds(&faster("5m")) * 2.0 - 2.0 * seconds(&faster("15s"));
    assert!(
        fired >= stalled_for,
        "fired after {fired} s, before {stalled_for} s"
    );
    assert!(
        full > 0.0,
        "the small spool of b filled up during the outage"
    );

    // The fleets keep flying after the outage; then every dashboard query has data.
    let replayed = poll(Duration::from_secs(30), || async {
        (metric(&b, "dbx_spool_replayed_records_total", "").await > 0.0
            && metric(&b, "dbx_spool_records", "").await == 0.0)
            .then_some(())
    })
    .await;
    assert!(
        replayed.is_some(),
        "b's spool was not replayed\n{}",
        b.log()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut empty = BTreeSet::new();
    for expr in dashboard_exprs() {
        let result = prom.query(&expr).await;
        for sample in &result {
            let v = sample["value"][1].as_str().unwrap_or_default();
            let v: f64 = v.parse().unwrap_or(f64::NAN);
            assert!(v.is_finite(), "{expr}: {sample}");
        }
        if result.is_empty() {
            empty.insert(expr);
        }
    }
    let allowed: BTreeSet<String> = dashboard_exprs()
        .into_iter()
        .filter(|e| EMPTY_UNLESS.iter().any(|(m, _)| e.contains(m)))
        .collect();
    assert_eq!(empty, allowed, "dashboard queries without data");

    // Per organization: both are there under their codes, with what each did.
    let orgs = prom
        .by_org("sum by (org) (dbx_org_points_received_total)")
        .await;
    assert_eq!(
        orgs.keys().collect::<Vec<_>>(),
        ["FLEET", "SLOW"],
        "{orgs:?}"
    );
    let refused = prom.by_org("sum by (org) (dbx_org_rejections_total)").await;
    assert!(
        refused["FLEET"] >= 2.0 && refused["SLOW"] >= 1.0,
        "{refused:?}"
    );
    let paused = prom
        .by_org("sum by (org) (dbx_org_rate_limit_wait_seconds_sum)")
        .await;
    assert!(paused["SLOW"] > 0.0, "{paused:?}");
    // SLOW stopped sending when its fleets landed: DbxOrgStoppedSending fires for it (after
    // its scaled 15 minutes of silence), not for FLEET, which sends on.
    let stopped = poll(Duration::from_secs(60), || async {
        let active = prom.alerts().await;
        let slow = active.get(&("DbxOrgStoppedSending".into(), "SLOW".into()));
        (slow.map(String::as_str) == Some("firing")).then_some(active)
    })
    .await;
    let active = match stopped {
        Some(a) => a,
        None => panic!("SLOW not stopped: {:?}", prom.alerts().await),
    };
    assert!(
        !active.contains_key(&("DbxOrgStoppedSending".into(), "FLEET".into())),
        "{active:?}"
    );
    // Not before its scaled silence (less two scrape intervals: the last points arrived a
    // little before the fleets reported landing).
    let silent = slow_landed.elapsed().as_secs_f64();
    let least = seconds(&faster("15m")) - 2.0 * seconds(&faster("15s"));
    assert!(silent >= least, "fired after {silent} s");

    // The fleets: everything acked, nothing refused, across the outage.
    for (name, f) in [("a", fleet_a), ("b", fleet_b)] {
        let s = land(f).await;
        assert!(s.error.is_none() && s.points_nacked == 0, "{name}: {s}");
        assert!(
            s.points_acked > 0 && s.points_acked == s.points_sent,
            "{name}: {s}"
        );
    }
    for d in [&a, &b] {
        assert_eq!(metric(d, "dbx_admin_unauthorized_total", "").await, 0.0);
    }
    eprintln!(
        "prometheus: the whole test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn durations_of_ranges_subqueries_and_offsets_are_made_faster() {
    assert_eq!(seconds("1h30m"), 5400.0);
    assert_eq!(seconds("500ms"), 0.5);
    assert_eq!(
        faster_ranges("increase(x[1h] offset 15m) > 0 and rate(y{a=~\"b|c\"}[5m]) and z[6h:5m]"),
        "increase(x[120000ms] offset 30000ms) > 0 and rate(y{a=~\"b|c\"}[10000ms]) and z[720000ms:10000ms]"
    );
}
