//! The files under `deploy/` against the code and `config/dbx.toml`: every fact they share
//! with the daemon — ports, limits, timeouts, metric names, referenced files — is checked, and
//! their own validators (`promtool`, `systemd-analyze`, `haproxy -c`) run on them; those are
//! programs of `scripts/test-tools`, which `scripts/test` installs. The compose stack and the
//! systemd unit cannot run here (no container engine, no systemd as PID 1); Prometheus and
//! HAProxy do, with these files, in `tests/live`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_norway::Value as Yaml;

use dbx_testkit::prereq::tool;

use crate::{
    config_int, config_port, config_value, exported_metrics, metric_tokens, read, repo, run_ok,
};

fn yaml(rel: &str) -> Yaml {
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn get<'a>(v: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(v, |v, k| {
        v.get(*k)
            .unwrap_or_else(|| panic!("missing key {k} (path {path:?})"))
    })
}

fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Seconds of a compose/systemd duration such as `65s`, `1m30s`, `65`.
fn seconds(s: &str) -> f64 {
    let s = s.trim();
    if let Ok(v) = s.parse::<f64>() {
        return v;
    }
    let mut total = 0.0;
    let mut num = String::new();
    for c in s.chars() {
        match c {
            '0'..='9' | '.' => num.push(c),
            'h' | 'm' | 's' => {
                let n: f64 = num.parse().unwrap_or_else(|_| panic!("bad duration {s:?}"));
                total += n * match c {
                    'h' => 3600.0,
                    'm' => 60.0,
                    _ => 1.0,
                };
                num.clear();
            }
            _ => panic!("bad duration {s:?}"),
        }
    }
    assert!(num.is_empty(), "bad duration {s:?}");
    total
}

/// What a graceful stop may take: drain, then the batcher's deadline.
fn drain_seconds() -> f64 {
    (config_int("listener.drain_timeout_ms") + config_int("batcher.shutdown_deadline_ms")) as f64
        / 1000.0
}

#[test]
fn compose_file_parses_references_existing_files_and_matches_the_config_ports() {
    let deploy = repo().join("deploy");
    let c = yaml("deploy/docker-compose.yml");
    let services = get(&c, &["services"]);
    for s in ["postgres", "dbx-setup", "dbx", "prometheus", "grafana"] {
        assert!(services.get(s).is_some(), "service {s} missing");
    }

    // PostgreSQL 15 with pg_stat_statements preloaded and the tuning snippet included.
    let pg = get(services, &["postgres"]);
    assert!(get(pg, &["image"])
        .as_str()
        .unwrap_or("")
        .starts_with("postgres:15"));
    let pg_cmd = strings(get(pg, &["command"])).join(" ");
    assert!(
        pg_cmd.contains("shared_preload_libraries=pg_stat_statements"),
        "{pg_cmd}"
    );
    assert!(read("deploy/docker/postgresql.conf").contains("include '/etc/postgresql/ingest.conf'"));

    // setup once, then serve.
    let setup = get(services, &["dbx-setup"]);
    assert_eq!(strings(get(setup, &["command"]))[0], "setup");
    assert_eq!(
        get(setup, &["environment", "DB_HOST"]).as_str(),
        Some("postgres")
    );
    let dbx = get(services, &["dbx"]);
    assert_eq!(
        get(dbx, &["depends_on", "dbx-setup", "condition"]).as_str(),
        Some("service_completed_successfully")
    );
    let entry = strings(get(dbx, &["entrypoint"])).join(" ");
    assert!(entry.contains("dbx serve"), "{entry}");
    // The credentials file's keys the entrypoint reads are the ones `dbx setup` writes.
    for user in ["dbx_ingest_service", "dbx_maintenance_service"] {
        assert!(entry.contains(&format!("{user}_url = ")), "{entry}");
        assert!(
            dbx_control::setup::LOGIN_USERS
                .iter()
                .any(|(u, _)| *u == user),
            "{user} is not a login user of dbx setup"
        );
    }
    assert!(read("crates/dbx-control/src/setup/mod.rs").contains("{user}_url = {url}"));

    // Ports: what the container listens on is what config/dbx.toml says.
    let http = config_port("http.bind");
    assert_eq!(
        get(dbx, &["environment", "DBX_HTTP__BIND"]).as_str(),
        Some(format!("0.0.0.0:{http}").as_str()),
        "the admin endpoint must listen on every interface inside the container"
    );
    let container_ports: BTreeSet<String> = strings(get(dbx, &["ports"]))
        .iter()
        .map(|p| p.rsplit(':').next().unwrap_or_default().to_string())
        .collect();
    let wanted: BTreeSet<String> = [
        format!("{}/tcp", config_port("listener.tcp_bind")),
        format!("{}/udp", config_port("listener.udp_bind")),
        format!("{}/tcp", config_port("listener.tls_bind")),
        format!("{http}/tcp"),
    ]
    .into();
    assert_eq!(container_ports, wanted);
    assert_eq!(
        (
            config_port("listener.tcp_bind"),
            config_port("listener.udp_bind")
        ),
        (7070, 7071)
    );
    assert_eq!((config_port("listener.tls_bind"), http), (7443, 9898));
    let grace = seconds(get(dbx, &["stop_grace_period"]).as_str().unwrap_or("0"));
    assert!(grace > drain_seconds(), "stop_grace_period {grace}s");
    let nofile = get(dbx, &["ulimits", "nofile", "soft"])
        .as_i64()
        .unwrap_or(0);
    assert!(nofile > config_int("listener.max_connections"));

    // Every bind mount's source and the build's Dockerfile exist.
    let mut checked = 0;
    for (name, svc) in services.as_mapping().expect("services map") {
        for vol in strings(svc.get("volumes").unwrap_or(&Yaml::Null)) {
            let src = vol.split(':').next().unwrap_or_default();
            if src.starts_with('.') || src.starts_with('/') {
                let p = deploy.join(src);
                assert!(p.exists(), "{name:?} mounts {src}, which does not exist");
                checked += 1;
            } else {
                assert!(
                    c.get("volumes").and_then(|v| v.get(src)).is_some(),
                    "{name:?} uses volume {src}, not declared"
                );
            }
        }
        if let Some(build) = svc.get("build") {
            let ctx = deploy.join(get(build, &["context"]).as_str().unwrap_or("."));
            let file = ctx.join(get(build, &["dockerfile"]).as_str().unwrap_or("Dockerfile"));
            assert!(file.is_file(), "{} missing", file.display());
            assert_eq!(ctx.canonicalize().expect("context"), repo());
        }
    }
    assert!(checked >= 7, "only {checked} bind mounts checked");

    // Prometheus in the compose network scrapes the daemon's admin port.
    let prom = yaml("deploy/prometheus/prometheus.yml");
    let targets: Vec<String> = get(&prom, &["scrape_configs"])
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .filter(|j| j.get("job_name").and_then(Yaml::as_str) == Some("dbx"))
        .flat_map(|j| {
            get(j, &["static_configs"])
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|s| strings(get(&s, &["targets"])))
        .collect();
    assert_eq!(targets, vec![format!("dbx:{http}")]);

    // Off loopback the admin endpoint needs admin.token_file: the compose secret, which
    // Prometheus presents as its bearer token.
    let token_file = admin_token_file();
    assert_eq!(
        get(dbx, &["environment", "DBX_ADMIN__TOKEN_FILE"]).as_str(),
        Some(token_file.as_str())
    );
    let secret = token_file
        .strip_prefix("/run/secrets/")
        .expect("a compose secret");
    for svc in ["dbx", "prometheus"] {
        let sources: Vec<String> = get(services, &[svc, "secrets"])
            .as_sequence()
            .expect("secrets list")
            .iter()
            .map(|s| {
                s.as_str()
                    .or_else(|| s.get("source").and_then(Yaml::as_str))
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        assert!(sources.iter().any(|s| s == secret), "{svc}: {sources:?}");
    }
    let declared = get(&c, &["secrets", secret]);
    assert!(
        declared.get("environment").is_some() || declared.get("file").is_some(),
        "secret {secret} has no source"
    );
    let auth = get(&prom, &["scrape_configs"])
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .find(|j| j.get("job_name").and_then(Yaml::as_str) == Some("dbx"))
        .and_then(|j| j.get("authorization"))
        .cloned()
        .expect("the dbx job presents a bearer token");
    assert_eq!(get(&auth, &["type"]).as_str(), Some("Bearer"));
    assert_eq!(
        get(&auth, &["credentials_file"]).as_str(),
        Some(token_file.as_str())
    );
}

/// Where the container image and the compose stack expect the admin token.
fn admin_token_file() -> String {
    "/run/secrets/dbx_admin_token".to_string()
}

/// The `target` of a service's volume whose source is `source`.
fn mount_target(svc: &Yaml, source: &str) -> Option<String> {
    strings(svc.get("volumes").unwrap_or(&Yaml::Null))
        .iter()
        .find(|v| v.split(':').next() == Some(source))
        .and_then(|v| v.split(':').nth(1).map(str::to_string))
}

#[test]
fn compose_runs_postgres_tls_only_and_dbx_with_verify_full() {
    let c = yaml("deploy/docker-compose.yml");
    let services = get(&c, &["services"]);
    // The certificates are made at start-up, for the host name dbx connects to.
    let certs = get(services, &["pg-certs"]);
    let script = strings(get(certs, &["entrypoint"])).join(" ");
    let db_host = get(services, &["dbx-setup", "environment", "DB_HOST"])
        .as_str()
        .expect("DB_HOST")
        .to_string();
    assert!(
        script.contains(&format!("make-certs.sh server /ca /tls {db_host} ")),
        "{script}"
    );
    assert_eq!(
        mount_target(certs, "./postgresql/make-certs.sh").as_deref(),
        Some("/deploy/make-certs.sh")
    );
    // PostgreSQL: tls.conf and pg_hba.conf mounted and used, the server files from pg-certs.
    let pg = get(services, &["postgres"]);
    assert_eq!(
        get(pg, &["depends_on", "pg-certs", "condition"]).as_str(),
        Some("service_completed_successfully")
    );
    assert_eq!(
        mount_target(pg, "./postgresql/tls.conf").as_deref(),
        Some("/etc/postgresql/tls.conf")
    );
    assert_eq!(
        mount_target(pg, "./postgresql/pg_hba.conf").as_deref(),
        Some("/etc/postgresql/pg_hba.conf")
    );
    assert_eq!(
        mount_target(pg, "pg-tls").as_deref(),
        Some("/etc/postgresql/tls")
    );
    assert_eq!(mount_target(certs, "pg-tls").as_deref(), Some("/tls"));
    let main_conf = read("deploy/docker/postgresql.conf");
    assert!(main_conf.contains("include '/etc/postgresql/tls.conf'"));
    assert!(main_conf.contains("hba_file = '/etc/postgresql/pg_hba.conf'"));
    let tls_conf = read("deploy/postgresql/tls.conf");
    for file in ["server.crt", "server.key", "ca.crt"] {
        assert!(
            tls_conf.contains(&format!("'/etc/postgresql/tls/{file}'")),
            "{file}"
        );
    }
    // setup and the daemon: verify-full against the CA pg-certs publishes, TLS required.
    assert!(script.contains("cp /tls/ca.crt /public/ca.crt"), "{script}");
    for name in ["dbx-setup", "dbx"] {
        let svc = get(services, &[name]);
        let env = |k: &str| {
            get(svc, &["environment", k])
                .as_str()
                .unwrap_or_else(|| panic!("{name}: {k} is not a string"))
                .to_string()
        };
        assert_eq!(env("DBX_DATABASE__SSLMODE"), "verify-full", "{name}");
        assert_eq!(env("DBX_DATABASE__REQUIRE_TLS"), "true", "{name}");
        let ca_dir = mount_target(svc, "pg-ca-public").expect("the public CA volume");
        assert_eq!(
            env("DBX_DATABASE__SSLROOTCERT"),
            format!("{ca_dir}/ca.crt"),
            "{name}"
        );
    }
    assert_eq!(
        mount_target(certs, "pg-ca-public").as_deref(),
        Some("/public")
    );
    // The CA key's volume is mounted by the step that signs, nowhere else.
    for (name, svc) in services.as_mapping().expect("services") {
        if name.as_str() != Some("pg-certs") {
            assert!(
                mount_target(svc, "pg-ca").is_none(),
                "{name:?} mounts the CA key"
            );
        }
    }
}

#[test]
fn deploy_postgresql_tls_files_say_why_and_refuse_plaintext() {
    // Every setting of tls.conf comes with its reason (a comment right above it).
    let tls = read("deploy/postgresql/tls.conf");
    let lines: Vec<&str> = tls.lines().collect();
    let mut settings = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        settings += 1;
        assert!(
            i > 0 && lines[i - 1].starts_with('#'),
            "tls.conf: {line:?} has no comment saying why"
        );
    }
    assert!(settings >= 6, "{settings} settings");
    assert!(lines.contains(&"ssl = on"));
    // pg_hba.conf: plaintext TCP rejected before anything accepts; no `host` (either) lines.
    let hba = read("deploy/postgresql/pg_hba.conf");
    let rules: Vec<Vec<&str>> = hba
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(rules.iter().all(|r| r[0] != "host"), "{rules:?}");
    let first_accept = rules
        .iter()
        .position(|r| r[0] == "hostssl")
        .expect("hostssl lines");
    let rejects: Vec<usize> = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r[0] == "hostnossl")
        .map(|(i, r)| {
            assert_eq!(r.last(), Some(&"reject"), "{r:?}");
            i
        })
        .collect();
    assert_eq!(rejects.len(), 4, "IPv4 and IPv6, databases and replication");
    assert!(rejects.iter().all(|i| *i < first_accept));
    assert!(rules
        .iter()
        .filter(|r| r[0] == "hostssl")
        .all(|r| r.last() == Some(&"scram-sha-256") || r.last() == Some(&"cert")));
    // No private key is committed: certificates are made where they are used.
    let mut stack = vec![repo().join("deploy")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("deploy dir") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(text) = std::fs::read_to_string(&p) {
                assert!(
                    !text.contains("PRIVATE KEY-----"),
                    "{} holds a private key",
                    p.display()
                );
            }
        }
    }
    // The documented config describes every TLS key the deploy files set.
    let documented = read("config/dbx.toml");
    for key in ["sslmode", "sslrootcert", "sslcert", "sslkey"] {
        assert!(
            documented.contains(&format!("\n# {key} = ")),
            "config/dbx.toml: {key}"
        );
    }
    assert_eq!(
        crate::config_value("database.require_tls").as_bool(),
        Some(false),
        "the default stays false; deploy/ sets it"
    );
}

#[test]
fn dockerfile_copies_existing_files_runs_unprivileged_and_exposes_the_config_ports() {
    let text = read("deploy/docker/Dockerfile");
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: a builder and a runtime");
    assert!(
        froms[1].contains("debian:") && froms[1].contains("slim"),
        "{}",
        froms[1]
    );
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(repo().join(src).exists(), "Dockerfile copies missing {src}");
        }
    }
    // The runtime stage gets the binary and the config, nothing else.
    let runtime = text.split(froms[1]).nth(1).expect("runtime stage");
    let copies: Vec<&str> = runtime.lines().filter(|l| l.starts_with("COPY ")).collect();
    assert_eq!(copies.len(), 2, "{copies:?}");
    let user = runtime
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );
    let expose: BTreeSet<String> = runtime
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace().map(str::to_string))
        .collect();
    let wanted: BTreeSet<String> = [
        format!("{}/tcp", config_port("listener.tcp_bind")),
        format!("{}/udp", config_port("listener.udp_bind")),
        format!("{}/tcp", config_port("listener.tls_bind")),
        format!("{}/tcp", config_port("http.bind")),
    ]
    .into();
    assert_eq!(expose, wanted);
    assert!(runtime.contains(&format!(
        "DBX_HTTP__BIND=0.0.0.0:{}",
        config_port("http.bind")
    )));
    // Every interface: the daemon then requires admin.token_file, so the image names one.
    assert!(
        runtime.contains(&format!("DBX_ADMIN__TOKEN_FILE={}", admin_token_file())),
        "{runtime}"
    );
    assert_eq!(
        config_value("admin.token_file").as_str(),
        Some(""),
        "the documented default stays loopback-only without a token"
    );
    assert!(repo()
        .join("deploy/docker/Dockerfile.dockerignore")
        .is_file());
}

/// Every `expr` of the alert rules.
fn alert_exprs() -> Vec<(String, String)> {
    let rules = yaml("deploy/prometheus/alerts.yml");
    get(&rules, &["groups"])
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| {
            get(g, &["rules"])
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .map(|r| {
            (
                get(&r, &["alert"]).as_str().unwrap_or_default().to_string(),
                get(&r, &["expr"]).as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn alert_rules_cover_the_issue_and_use_only_exported_metrics() {
    let known = exported_metrics();
    // Not exported by the daemon, each documented where it is used.
    let external: BTreeSet<&str> = [
        // deploy/backup/backup.sh's textfile metrics
        "dbx_backup_last_success_timestamp_seconds",
        "dbx_backup_size_bytes",
    ]
    .into();
    let backup = read("deploy/backup/backup.sh");
    for m in [
        "dbx_backup_last_success_timestamp_seconds",
        "dbx_backup_size_bytes",
    ] {
        assert!(backup.contains(m), "backup.sh does not write {m}");
    }
    let exprs = alert_exprs();
    let mut unknown = Vec::new();
    for (alert, expr) in &exprs {
        for m in metric_tokens(expr) {
            if !known.contains(&m) && !external.contains(m.as_str()) {
                unknown.push(format!("{alert}: {m}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "unknown metrics in alerts.yml: {unknown:?}"
    );
    let by_name: BTreeMap<&str, &str> = exprs
        .iter()
        .map(|(a, e)| (a.as_str(), e.as_str()))
        .collect();
    // The issue's list, each watching what it should.
    for (alert, metric) in [
        ("DbxIngestStalled", "dbx_points_written_total"),
        ("DbxQueueSaturated", "dbx_queue_capacity"),
        (
            "DbxDefaultPartitionHasRows",
            "dbx_db_default_partition_rows",
        ),
        ("DbxPartitionsNotAhead", "dbx_db_partition_ahead_seconds"),
        ("DbxSpoolGrowing", "dbx_spool_bytes"),
        ("DbxSpoolBacklogOld", "dbx_spool_oldest_record_age_seconds"),
        ("DbxSpoolFull", "dbx_spool_full_total"),
        ("DbxSpoolDeadLetters", "dbx_spool_rejected_records_total"),
        ("DbxSpoolCorruptRecords", "dbx_spool_corrupt_records_total"),
        (
            "DbxAuthCacheStale",
            "dbx_auth_last_reload_timestamp_seconds",
        ),
        ("DbxDatabaseUnreachable", "dbx_db_up"),
        ("DbxDatabaseNotEncrypted", "dbx_db_tls"),
        ("DbxCacheHitRatioLow", "dbx_db_cache_hit_ratio"),
        (
            "DbxDatabaseConnectionsNearLimit",
            "dbx_db_active_connections",
        ),
        ("DbxGatewayConnectionsNearLimit", "dbx_connections_open"),
        (
            "DbxBackupTooOld",
            "dbx_backup_last_success_timestamp_seconds",
        ),
        ("DbxOrgStoppedSending", "dbx_org_points_received_total"),
    ] {
        let expr = by_name
            .get(alert)
            .unwrap_or_else(|| panic!("alert {alert} missing"));
        assert!(
            expr.contains(metric),
            "{alert} does not use {metric}: {expr}"
        );
    }
    // "Under one interval" is one daily partition with the default config.
    assert_eq!(
        crate::config_value("batcher.partition_interval").as_str(),
        Some("daily")
    );
    assert!(by_name["DbxPartitionsNotAhead"].contains("< 86400"));
    assert!(by_name["DbxGatewayConnectionsNearLimit"].contains(&format!(
        "> {}",
        config_int("listener.max_connections") * 9 / 10
    )));
    assert!(by_name["DbxHandshakesNearLimit"].contains(&format!(
        "> {}",
        config_int("listener.max_pending_handshakes") * 9 / 10
    )));
    assert!(by_name["DbxByteBudgetSpent"].contains("dbx_buffered_bytes_limit"));
}

#[test]
fn promtool_accepts_the_config_the_rules_and_their_unit_tests() {
    let promtool = tool("promtool");
    let dir = repo().join("deploy/prometheus");
    // promtool checks that the bearer token file exists: check a copy whose
    // credentials_file is a real file here, the rest unchanged.
    let tmp = tempfile::tempdir().expect("temp dir");
    let token = tmp.path().join("dbx_admin_token");
    std::fs::write(&token, "promtool-check-token-0123456789").expect("token file");
    let config = read("deploy/prometheus/prometheus.yml");
    assert!(config.contains(&admin_token_file()));
    std::fs::write(
        tmp.path().join("prometheus.yml"),
        config.replace(&admin_token_file(), &token.display().to_string()),
    )
    .expect("config copy");
    std::fs::copy(dir.join("alerts.yml"), tmp.path().join("alerts.yml")).expect("rules copy");
    run_ok(Command::new(&promtool).current_dir(tmp.path()).args([
        "check",
        "config",
        "prometheus.yml",
    ]));
    run_ok(
        Command::new(&promtool)
            .current_dir(&dir)
            .args(["check", "rules", "alerts.yml"]),
    );
    let out = run_ok(Command::new(&promtool).current_dir(&dir).args([
        "test",
        "rules",
        "alerts_test.yml",
    ]));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn dashboard_queries_only_exported_metrics_and_has_the_issue_panels() {
    let known = exported_metrics();
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dbx-dashboard.json")).expect("dashboard JSON");
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&dash, &mut exprs);
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_tokens(e)).collect();
    let unknown: Vec<&String> = used.iter().filter(|m| !known.contains(*m)).collect();
    assert!(
        unknown.is_empty(),
        "dashboard queries unknown metrics: {unknown:?}"
    );
    for m in [
        "dbx_points_written_total",
        "dbx_ack_latency_seconds_bucket",
        "dbx_queue_depth",
        "dbx_copy_duration_seconds_bucket",
        "dbx_rejections_total",
        "dbx_db_cache_hit_ratio",
        "dbx_db_partitions",
        "dbx_db_partition_ahead_seconds",
        "dbx_db_tls",
    ] {
        assert!(used.contains(m), "no panel queries {m}");
    }
    assert!(exprs
        .iter()
        .any(|e| e.starts_with("histogram_quantile(0.99")
            && e.contains("dbx_ack_latency_seconds_bucket")));
    // Per organization: a row of panels using every dbx_org_* metric, summed by org, after
    // the Ingest row; an `org` variable filters them.
    let panels = dash["panels"].as_array().expect("panels");
    let titles: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(&titles[..2], ["Ingest", "Organizations"], "{titles:?}");
    let org_metrics: BTreeSet<&String> =
        known.iter().filter(|m| m.starts_with("dbx_org_")).collect();
    assert!(org_metrics.len() >= 5, "{org_metrics:?}");
    for m in org_metrics {
        if m.ends_with("_bucket")
            || m.ends_with("_count")
            || m.as_str() == "dbx_org_rate_limit_wait_seconds"
        {
            continue;
        }
        let e = exprs
            .iter()
            .find(|e| metric_tokens(e).contains(m))
            .unwrap_or_else(|| panic!("no panel queries {m}"));
        assert!(
            e.contains("sum by (org)") || m.as_str() == "dbx_org_labels",
            "{m}: {e}"
        );
    }
    let vars = dash["templating"]["list"].as_array().expect("variables");
    assert!(vars.iter().any(|v| v["name"] == "org"
        && v["definition"]
            .as_str()
            .unwrap_or("")
            .contains("dbx_org_points_received_total")));
    // Every panel's datasource is the provisioned one.
    let ds = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let uid = get(&ds, &["datasources"])[0]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            p["datasource"]["uid"].as_str(),
            Some(uid.as_str()),
            "{}",
            p["title"]
        );
    }
    // The provider's path is where compose mounts the dashboard.
    let prov = yaml("deploy/grafana/provisioning/dashboards/dbx.yml");
    let path = get(&prov, &["providers"])[0]["options"]["path"]
        .as_str()
        .expect("provider path")
        .to_string();
    let compose = read("deploy/docker-compose.yml");
    assert!(
        compose.contains(&format!(
            "./grafana/dbx-dashboard.json:{path}/dbx-dashboard.json"
        )),
        "compose does not mount the dashboard at {path}"
    );
}

/// `key=value` lines of a unit file (repeated keys keep every value).
fn unit_keys(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(k.trim().to_string())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    out
}

#[test]
fn systemd_unit_is_hardened_and_agrees_with_the_config() {
    let text = read("deploy/systemd/dbx.service");
    let keys = unit_keys(&text);
    let one = |k: &str| -> &str {
        keys.get(k)
            .and_then(|v| v.last())
            .map(String::as_str)
            .unwrap_or_else(|| panic!("dbx.service has no {k}"))
    };
    assert_eq!(one("User"), "dbx");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("ProtectHome"), "yes");
    assert_eq!(one("PrivateTmp"), "yes");
    assert_eq!(
        keys["ReadWritePaths"],
        vec!["/var/lib/dbx/spool".to_string()]
    );
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("EnvironmentFile"), "/etc/dbx/dbx.env");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/dbx serve --config /etc/dbx/dbx.toml"
    );
    let stop = seconds(one("TimeoutStopSec"));
    assert!(
        stop > drain_seconds(),
        "TimeoutStopSec {stop}s must exceed drain + batcher deadline {}s",
        drain_seconds()
    );
    let nofile: i64 = one("LimitNOFILE").parse().expect("LimitNOFILE number");
    assert!(
        nofile >= 2 * config_int("listener.max_connections"),
        "{nofile}"
    );
    // The example environment file names the variables the daemon reads.
    let env = read("deploy/systemd/dbx.env.example");
    assert!(env
        .lines()
        .any(|l| l.starts_with("DATABASE_URL=postgresql://")));
    assert!(env
        .lines()
        .any(|l| l.starts_with("DBX_DATABASE__ADMIN_URL=")));
    // Production connects to PostgreSQL over verified TLS only.
    for line in [
        "DBX_DATABASE__SSLMODE=verify-full",
        "DBX_DATABASE__SSLROOTCERT=/etc/dbx/pg-ca.crt",
        "DBX_DATABASE__REQUIRE_TLS=true",
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "dbx.env.example lacks {line}"
        );
    }
    assert!(
        text.contains("/etc/dbx/pg-ca.crt"),
        "the unit's install notes place the CA"
    );

    let out = Command::new(tool("systemd-analyze"))
        .arg("verify")
        .arg(repo().join("deploy/systemd/dbx.service"))
        .output()
        .expect("systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The binary is not installed here; anything else is a mistake in the unit.
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("/usr/local/bin/dbx") && !l.trim().is_empty())
        .filter(|l| !l.contains("Failed to") || l.contains("dbx.service"))
        .collect();
    assert!(problems.is_empty(), "systemd-analyze verify:\n{text}");
}

#[test]
fn haproxy_config_balances_the_config_ports_with_readyz_checks() {
    let text = read("deploy/haproxy/haproxy.cfg");
    let tcp = config_port("listener.tcp_bind");
    let tls = config_port("listener.tls_bind");
    let http = config_port("http.bind");
    assert!(text.contains(&format!("bind :{tcp}\n")));
    assert!(text.contains(&format!("bind :{tls}\n")));
    assert!(text.contains("    mode tcp\n"));
    assert_eq!(text.matches("option httpchk GET /readyz").count(), 2);
    // The checks carry no secret: /readyz's status code is open without the admin token.
    assert!(!text.to_ascii_lowercase().contains("authorization"));
    assert!(read("crates/dbx-control/src/http.rs").contains(r#"path == "/readyz""#));
    assert_eq!(text.matches(&format!("check port {http}")).count(), 2);
    let servers: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("server "))
        .collect();
    assert!(
        servers
            .iter()
            .filter(|l| l.ends_with(&format!(":{tcp}")))
            .count()
            >= 2
    );
    assert!(
        servers
            .iter()
            .filter(|l| l.ends_with(&format!(":{tls}")))
            .count()
            >= 2
    );
    // Per-server maxconn stays under the daemon's own limit, so HAProxy queues instead
    // of the daemon refusing.
    assert!(text.contains("maxconn 9000") && 9000 < config_int("listener.max_connections"));
    let out = Command::new(tool("haproxy"))
        .args(["-c", "-f"])
        .arg(repo().join("deploy/haproxy/haproxy.cfg"))
        .output()
        .expect("haproxy -c");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn scaling_doc_figures_come_from_the_benchmarks() {
    let doc = read("docs/scaling.md");
    let results = read("benches/RESULTS.md");
    // The end-to-end figure of the benchmark is quoted as it is.
    let e2e = results
        .lines()
        .find(|l| l.contains("**dbx end to end**"))
        .and_then(|l| l.split('|').nth(2))
        .map(|s| s.trim().trim_matches('*').to_string())
        .expect("end-to-end row in benches/RESULTS.md");
    assert!(
        doc.contains(&e2e),
        "docs/scaling.md does not quote {e2e} points/s"
    );
    for key in [
        "create_distributed_table",
        "create_reference_table",
        "session_id",
    ] {
        assert!(doc.contains(key), "docs/scaling.md lacks {key}");
    }
    assert!(Path::new(&repo().join("deploy/haproxy/haproxy.cfg")).is_file());
}
