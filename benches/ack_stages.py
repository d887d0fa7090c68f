#!/usr/bin/env python3
"""Per-stage latency of the acknowledged batches between two /metrics scrapes.

Usage: ack_stages.py before.prom after.prom [loadgen.json]

For dbx_ack_latency_seconds and every stage of dbx_batch_stage_seconds: observations,
mean, p50 and p99 of the run (bucket deltas, linear interpolation within a bucket like
PromQL's histogram_quantile). Used by benches/ack_stages.sh.
"""
import json
import re
import sys

STAGES = ["read", "send_wait", "queued", "grouped", "writer_wait", "begin",
          "session_upsert", "copy", "session_stats", "commit", "verdict", "ack_written"]
LINE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')


def parse(path):
    out = {}
    for line in open(path):
        m = LINE.match(line.strip())
        if not m or line.startswith('#'):
            continue
        name, labels, value = m.groups()
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels or ''))
        out[(name, tuple(sorted(lab.items())))] = float(value)
    return out


def series(samples, name, stage):
    """(buckets [(le, cumulative)], count, sum) of one histogram."""
    buckets, count, total = [], 0.0, 0.0
    for (n, lab), v in samples.items():
        d = dict(lab)
        if stage is not None and d.get('stage') != stage:
            continue
        if n == name + '_bucket':
            buckets.append((float(d['le']), v))
        elif n == name + '_count':
            count = v
        elif n == name + '_sum':
            total = v
    return sorted(buckets), count, total


def quantile(q, buckets):
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return float('nan')
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float('inf'):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-12)
        prev_le, prev_c = le, c
    return prev_le


def delta(before, after, name, stage=None):
    b_b, b_n, b_s = series(before, name, stage)
    a_b, a_n, a_s = series(after, name, stage)
    bmap = dict(b_b)
    buckets = [(le, c - bmap.get(le, 0.0)) for le, c in a_b]
    return buckets, a_n - b_n, a_s - b_s


def main():
    before, after = parse(sys.argv[1]), parse(sys.argv[2])
    if len(sys.argv) > 3:
        s = json.load(open(sys.argv[3]))
        lat = s.get('latency_ms', {})
        print(f"loadgen: {s.get('points_acked')} points acked, {s.get('throughput_per_sec', 0):.0f} points/s, "
              f"ack p50 {lat.get('p50', 0):.1f} / p90 {lat.get('p90', 0):.1f} / p99 {lat.get('p99', 0):.1f} "
              f"/ max {lat.get('max', 0):.1f} ms (client side)")
    rows = [('ack latency (daemon)', delta(before, after, 'dbx_ack_latency_seconds'))]
    rows += [(st, delta(before, after, 'dbx_batch_stage_seconds', st)) for st in STAGES]
    print(f"{'stage':<22}{'batches':>9}{'mean ms':>10}{'p50 ms':>9}{'p99 ms':>9}")
    means = 0.0
    for name, (buckets, n, total) in rows:
        mean = 1000 * total / n if n else float('nan')
        if name in STAGES and n:
            means += mean
        print(f"{name:<22}{int(n):>9}{mean:>10.2f}{1000 * quantile(0.5, buckets):>9.2f}"
              f"{1000 * quantile(0.99, buckets):>9.2f}")
    print(f"{'sum of stage means':<22}{'':>9}{means:>10.2f}")


if __name__ == '__main__':
    main()
