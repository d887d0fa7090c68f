#!/usr/bin/env python3
"""A minimal dbx gateway in Python, written from docs/protocol.md alone.

It connects over TCP, says hello, streams a short flight of one aircraft in
batches (map-form points, MessagePack timestamps), keeps every batch until it is
acked, ends the flight session with `end` (protocol 1.1) once the flight is over,
resends whatever was not acked (the `end` included) after a reconnect, and says bye.

    pip install msgpack
    python3 examples/python_gateway.py --host 127.0.0.1 --port 7070 \
        --key "$(tail -1 database/api_key.txt)" --aircraft N101DX --points 1000

Prints one JSON line at the end:
{"sent": .., "acked": .., "nacked": .., "ended": true|false, "session": ..}.

With --udp-port it sends the flight as UDP datagrams instead (fire-and-forget, no
acks): --udp-auth mac (the default) signs each batch with the key, which then never
travels (protocol 1.1: kid, mac, body; only hashlib and hmac from the standard
library); --udp-auth key puts the key in every datagram (protocol v1). It prints
{"sent": .., "datagrams": .., "session": ..}.
"""

import argparse
import datetime
import hashlib
import hmac
import json
import math
import socket
import struct
import sys
import uuid

import msgpack


def send_frame(sock, message):
    body = msgpack.packb(message, use_bin_type=True, datetime=True)
    sock.sendall(struct.pack(">I", len(body)) + body)


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    return buf


def recv_frame(sock):
    (length,) = struct.unpack(">I", recv_exact(sock, 4))
    return msgpack.unpackb(recv_exact(sock, length), raw=False, timestamp=3)


def datagram(key, auth, batch):
    """One UDP datagram holding `batch` (a map with the batch keys)."""
    if auth == "key":
        return msgpack.packb(dict(batch, key=key), use_bin_type=True, datetime=True)
    # kid: the first 16 hex digits of hex(sha256(key)); mac: the first 16 bytes of
    # HMAC-SHA256 over body, keyed with the 32 raw bytes of sha256(key).
    key_hash = hashlib.sha256(key.encode()).digest()
    body = msgpack.packb(batch, use_bin_type=True, datetime=True)
    mac = hmac.new(key_hash, body, hashlib.sha256).digest()[:16]
    return msgpack.packb({"kid": key_hash.hex()[:16], "mac": mac, "body": body}, use_bin_type=True)


def send_udp(args, session, batches):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for seq, pts in batches.items():
            batch = {"t": "batch", "seq": seq, "aircraft": args.aircraft, "session": session, "points": pts}
            dg = datagram(args.key, args.udp_auth, batch)
            if len(dg) > 65507:
                print(f"batch {seq} does not fit a datagram ({len(dg)} bytes); use a smaller --batch", file=sys.stderr)
                return 2
            sock.sendto(dg, (args.host, args.udp_port))
    sent = sum(len(b) for b in batches.values())
    print(json.dumps({"sent": sent, "datagrams": len(batches), "session": session}))
    return 0


def flight(n_points, start):
    """A plausible short flight: climb, cruise, descend; battery draining."""
    points = []
    for i in range(n_points):
        phase = i / max(n_points - 1, 1)
        alt = 120.0 * math.sin(math.pi * phase)
        points.append(
            {
                "ts": start + datetime.timedelta(milliseconds=100 * i),
                "seq": i,
                "lat": 47.3769 + 0.0001 * i,
                "lon": 8.5417 + 0.00005 * i,
                "alt": alt,
                "gs": 15.0,
                "hdg": 45.0,
                "bp": 100.0 - 30.0 * phase,
                "rpm": [5200.0, 5180.0, 5210.0, 5195.0],
                "fix": 3,
                "sats": 14,
                "x": {"gateway": "python-example"},
            }
        )
    return points


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7070)
    p.add_argument("--key", required=True)
    p.add_argument("--aircraft", required=True, help="registration number or aircraft UUID")
    p.add_argument("--points", type=int, default=1000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--udp-port", type=int, help="send UDP datagrams to this port instead of using TCP")
    p.add_argument("--udp-auth", choices=["mac", "key"], default="mac", help="UDP: sign with the key (mac) or send it (key)")
    args = p.parse_args()

    session = str(uuid.uuid4())
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    points = flight(args.points, start)
    batches = {}
    for seq, i in enumerate(range(0, len(points), args.batch), start=1):
        batches[seq] = points[i : i + args.batch]
    if args.udp_port:
        return send_udp(args, session, batches)

    # `ended` is None until the end has a verdict: True when acked, False when nacked.
    acked, nacked, ended, attempts = set(), {}, None, 0
    while ended is None and attempts < 5:
        attempts += 1
        try:
            ended = stream(args, session, batches, acked, nacked)
        except (ConnectionError, OSError) as e:
            print(f"connection lost ({e}); reconnecting and resending what was not acked", file=sys.stderr)

    sent = sum(len(b) for b in batches.values())
    acked_points = sum(len(batches[s]) for s in acked)
    print(json.dumps({"sent": sent, "acked": acked_points, "nacked": len(nacked), "ended": bool(ended), "session": session}))
    return 0 if acked_points == sent and ended else 1


def stream(args, session, batches, acked, nacked):
    """One connection: sends every batch not acked yet, then `end`; returns whether the
    end was acked (None when the server closed before answering it)."""
    with socket.create_connection((args.host, args.port), timeout=30) as sock:
        send_frame(sock, {"t": "hello", "v": 1, "key": args.key, "gateway": "python-example"})
        welcome = recv_frame(sock)
        if welcome.get("t") != "welcome":
            print(f"refused: {welcome}", file=sys.stderr)
            sys.exit(2)
        # seq must increase on a connection, across batches and end: resends get fresh seqs.
        conn_seq, mapping = 0, {}
        for seq, pts in batches.items():
            if seq in acked or seq in nacked:
                continue
            conn_seq += 1
            mapping[conn_seq] = seq
            send_frame(
                sock,
                {"t": "batch", "seq": conn_seq, "aircraft": args.aircraft, "session": session, "points": pts},
            )
        # The flight is over: end its session. The server writes it after the batches
        # above and acknowledges it in seq order like them; sending it again is harmless.
        conn_seq += 1
        end_seq = conn_seq
        send_frame(sock, {"t": "end", "seq": end_seq, "session": session})
        ended = None
        while ended is None:
            msg = recv_frame(sock)
            if msg["t"] == "ack":
                for s in [s for s in mapping if s <= msg["seq"]]:
                    acked.add(mapping.pop(s))
                if msg["seq"] >= end_seq:
                    ended = True
            elif msg["t"] == "nack" and msg["seq"] == end_seq:
                print(f"end refused: {msg}", file=sys.stderr)
                ended = False
            elif msg["t"] == "nack":
                nacked[mapping.pop(msg["seq"])] = msg
            elif msg["t"] == "error":
                print(f"error: {msg}", file=sys.stderr)
                return None
        send_frame(sock, {"t": "bye"})
        while recv_frame(sock).get("t") != "bye":
            pass
        return ended


if __name__ == "__main__":
    sys.exit(main())
