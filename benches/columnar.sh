#!/usr/bin/env bash
# Columnar archives (issue 17 item 5): bytes per point of one archived day of simulated
# telemetry (1,000,000 points of 16 aircraft, dbx_client::sim flights written with the
# daemon's binary COPY encoder) as heap (table + indexes + TOAST) and after the archival task
# turned it columnar, and the time of the seed's daily aggregate over that day on each
# (median of 5). It is the ignored test `bench_columnar_archive_bytes_and_query_time` of the
# Citus suite (tests/citus/columnar.rs): the test kit's private cluster, a database dropped
# with it. Needs citus_columnar in the machine's PostgreSQL (as scripts/test-citus).
# Holds /tmp/bench.lock while it measures. Results: benches/RESULTS.md, "Columnar archives".
#
# What is timed runs inside PostgreSQL (sizes, the query), so the test binary's own build
# profile does not matter: the ordinary (debug) test build is used.
#
#   benches/columnar.sh            # build the suite, then the measurement
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test -p dbx --features citus --test citus --no-run
exec flock /tmp/bench.lock cargo test -p dbx --features citus --test citus \
    bench_columnar_archive_bytes_and_query_time -- --ignored --nocapture --test-threads=1
