#!/usr/bin/env bash
# Where an ack's time goes (issue 20 item 2): a release `dbx serve` on a private
# PostgreSQL cluster, `dbx loadgen` at a fixed rate, and the p50/p99 of every stage of
# dbx_batch_stage_seconds over the run (from the bucket deltas of two /metrics scrapes,
# interpolated within buckets like histogram_quantile). Results: benches/RESULTS.md,
# "Where an ack's time goes".
#
#   benches/ack_stages.sh start                 # cluster + setup + fleet of 2000 aircraft
#   benches/ack_stages.sh serve [key=value ...] # (re)start the daemon; batcher overrides
#     (listener.key=value and limits.key=value for those sections, e.g.
#     listener.max_pending_per_ip=4096 limits.max_buffered_bytes=67108864)
#   [WARMUP=s] benches/ack_stages.sh run <loadgen flags>  # one run: loadgen's summary + stages
#     (a fresh --seed each run: the same seed repeats the same sessions, which are
#     completed by then, and their batches would be settled as duplicates)
#   [ROWS=n] benches/ack_stages.sh history     # n points (20 M) over the 8 days before today;
#     then KEEP_TABLES=1 benches/ack_stages.sh serve … runs on them instead of a fresh table
#   benches/ack_stages.sh stop
#
# Needs target/release/dbx (cargo build --release -p dbx --bin dbx) and PostgreSQL's
# server binaries. Runs as root: the cluster runs as `postgres`.
set -euo pipefail
DIR=${DBX_STAGES_DIR:-/tmp/dbx-ack-stages}
PGPORT=${DBX_STAGES_PGPORT:-55460}
TCP=127.0.0.1:${DBX_STAGES_TCP:-57070}
HTTP=127.0.0.1:${DBX_STAGES_HTTP:-59898}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DBX=$ROOT/target/release/dbx
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
FLEET=${DBX_STAGES_FLEET:-2000}

pg() { runuser -u postgres -- "$@"; }

start() {
  mkdir -p "$DIR/pg"; chmod 755 "$DIR"; chown postgres "$DIR/pg"; chmod 700 "$DIR/pg"
  pg "$BIN/initdb" -D "$DIR/pg" -A trust -U postgres >/dev/null
  cat >>"$DIR/pg/postgresql.conf" <<CONF
port = $PGPORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR/pg'
shared_buffers = 256MB
max_wal_size = 4GB
min_wal_size = 1GB
wal_compression = on
checkpoint_timeout = 15min
max_connections = 200
log_min_messages = warning
CONF
  pg "$BIN/pg_ctl" -D "$DIR/pg" -l "$DIR/pg/server.log" -w start >/dev/null
  DBX_SUPERUSER_URL="postgresql://postgres@127.0.0.1:$PGPORT/postgres" \
    "$DBX" setup --out-dir "$DIR/credentials" >"$DIR/setup.log"
  # The fleet: FLEET aircraft of the sample organization (like `dbx demo`).
  pg "$BIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -d dbx_aviation -qc \
    "INSERT INTO dbx_aviation.aircraft_registry (org_id, registration_number, aircraft_type, manufacturer, model)
     SELECT o.org_id, 'S' || lpad(i::text, 5, '0'), 'quadcopter', 'DBX Aerospace', 'Stages'
     FROM dbx_aviation.organizations o, generate_series(1, $FLEET) i
     WHERE o.org_code = (SELECT org_code FROM dbx_aviation.organizations ORDER BY created_at LIMIT 1)
     ON CONFLICT DO NOTHING"
  # A server in service recycles its WAL segments at each checkpoint; a fresh cluster creates
  # (zero-fills and fsyncs) every new 16 MB segment in the foreground of the commit that
  # needs it, a stall of tens to hundreds of ms every second or so at these rates. Write
  # 1 GB of WAL once and checkpoint, so the runs meet the WAL of a server in service.
  pg "$BIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -qc \
    "CREATE TABLE wal_warmup AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 4000000) g" \
    -c "DROP TABLE wal_warmup" -c "CHECKPOINT"
  echo "cluster on $PGPORT, credentials in $DIR/credentials"
}

url_of() { grep -o "postgresql://$1[^ ]*" "$DIR/credentials/credentials.txt" | head -1; }

serve() {
  [ -f "$DIR/dbx.pid" ] && kill "$(cat "$DIR/dbx.pid")" 2>/dev/null && sleep 2 || true
  # A fresh table each time (the issue's "fresh database"), which also keeps the disk small;
  # KEEP_TABLES=1 keeps what is there (runs on a history written with `history`).
  [ "${KEEP_TABLES:-0}" = 1 ] || pg "$BIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -d dbx_aviation -qc \
    "TRUNCATE dbx_aviation.flight_telemetry, dbx_aviation.flight_sessions CASCADE" 2>/dev/null
  {
    echo "[database]"; echo "url = \"$(url_of dbx_ingest_service)\""
    echo "admin_url = \"$(url_of dbx_maintenance_service)\""
    echo "[listener]"; echo "tcp_bind = \"$TCP\""; echo "udp_bind = \"\""
    for kv in "$@"; do case $kv in listener.*) kv=${kv#listener.}; echo "${kv%%=*} = ${kv#*=}" ;; esac; done
    echo "[limits]"
    for kv in "$@"; do case $kv in limits.*) kv=${kv#limits.}; echo "${kv%%=*} = ${kv#*=}" ;; esac; done
    echo "[http]"; echo "bind = \"$HTTP\""
    echo "[log]"; echo "level = \"warn\""
    echo "[batcher]"
    for kv in "$@"; do case $kv in listener.*|limits.*) ;; *) echo "${kv%%=*} = ${kv#*=}" ;; esac; done
  } >"$DIR/dbx.toml"
  ulimit -n "$(ulimit -Hn)"
  "$DBX" --config "$DIR/dbx.toml" serve >"$DIR/dbx.log" 2>&1 &
  echo $! >"$DIR/dbx.pid"
  for _ in $(seq 100); do curl -sf "http://$HTTP/readyz" >/dev/null && break; sleep 0.2; done
  echo "dbx serving on $TCP (pid $(cat "$DIR/dbx.pid")), batcher: $*"
}

run() {
  ulimit -n "$(ulimit -Hn)"
  local regs; regs=$(seq -f 'S%05g' 1 "$FLEET" | paste -sd,)
  # Both the daemon's figures and loadgen's percentiles leave out the first WARMUP seconds
  # (connects, first lookups of every session); loadgen still counts those acks.
  "$DBX" loadgen --addr "$TCP" --key-file "$DIR/credentials/api_key.txt" --aircraft "$regs" \
    --seed "${SEED:-$RANDOM$RANDOM}" --warmup-secs "${WARMUP:-0}" --json "$@" >"$DIR/loadgen.json" &
  local lg=$!
  sleep "${WARMUP:-0}"
  curl -s "http://$HTTP/metrics" >"$DIR/before.prom"
  wait $lg || echo "loadgen exited with $?"
  sleep 1
  curl -s "http://$HTTP/metrics" >"$DIR/after.prom"
  python3 "$ROOT/benches/ack_stages.py" "$DIR/before.prom" "$DIR/after.prom" "$DIR/loadgen.json"
}

# ROWS points (default 20 M) over the 8 days before today, in sessions of 500 points of
# 2000 aircraft not in the fleet, then VACUUM (FREEZE, ANALYZE), as a history under the runs.
history() {
  local rows=${ROWS:-20000000}
  pg "$BIN/psql" -h 127.0.0.1 -p "$PGPORT" -U postgres -d dbx_aviation -v ON_ERROR_STOP=1 -q <<SQL
DO \$\$
DECLARE p text;
BEGIN
  -- Written anew each time: the days' partitions are emptied first.
  FOR p IN SELECT dbx_aviation.ensure_telemetry_partition(d, d + interval '1 day')
             FROM generate_series(date_trunc('day', now()) - interval '8 days',
                                  date_trunc('day', now()) - interval '1 day', interval '1 day') d
  LOOP
    EXECUTE 'TRUNCATE ' || p;
  END LOOP;
END \$\$;
INSERT INTO dbx_aviation.flight_telemetry
  (org_id, aircraft_id, session_id, ts, seq, altitude_m, ground_speed_mps, battery_remaining_pct)
SELECT md5('org' || (g % 3))::uuid, md5('ac' || (g % 2000))::uuid,
       md5('ac' || (g % 2000) || ':' || (g / 1000000))::uuid,
       date_trunc('day', now()) - interval '8 days' + interval '8 days' * (g::float8 / $rows),
       g, (g % 500)::real, (g % 37)::real, (100 - g % 100)::real
  FROM generate_series(0::bigint, $rows - 1) g;
VACUUM (FREEZE, ANALYZE) dbx_aviation.flight_telemetry;
SQL
  echo "history: $rows rows over 8 days"
}

stop() {
  [ -f "$DIR/dbx.pid" ] && kill "$(cat "$DIR/dbx.pid")" 2>/dev/null || true
  pg "$BIN/pg_ctl" -D "$DIR/pg" -m fast stop >/dev/null || true
}

cmd=${1:-}; shift || true
case $cmd in start|serve|run|history|stop) $cmd "$@" ;; *) sed -n 2,19p "$0"; exit 2 ;; esac
