#!/usr/bin/env python3
"""A gateway written against paho-mqtt (pinned in scripts/requirements-test.txt), for the MQTT tests.

Publishes --count JSON batches of --points points each, at QoS 1 over MQTT 5 with a
persistent session, on --topic, one every --interval seconds, then waits until the broker
has acknowledged every one (paho resends what was unacknowledged after a reconnect).
Point i of batch b has seq b * points + i, an RFC 3339 timestamp and every field.
Prints {"published": n, "acked": n} and exits 0 when every message was acknowledged.
"""
import argparse
import datetime
import json
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

p = argparse.ArgumentParser()
for name in ("host", "user", "password", "topic", "session", "client-id"):
    p.add_argument("--" + name, required=True)
p.add_argument("--port", type=int, required=True)
p.add_argument("--count", type=int, default=100)
p.add_argument("--points", type=int, default=10)
p.add_argument("--interval", type=float, default=0.0)
a = p.parse_args()

acked = set()
client = mqtt.Client(client_id=a.client_id, protocol=mqtt.MQTTv5)
client.username_pw_set(a.user, a.password)
client.max_inflight_messages_set(20)
client.max_queued_messages_set(0)
client.reconnect_delay_set(0.1, 1)
client.on_publish = lambda c, u, mid: acked.add(mid)
props = Properties(PacketTypes.CONNECT)
props.SessionExpiryInterval = 3600
client.connect(a.host, a.port, keepalive=10, clean_start=False, properties=props)
client.loop_start()

now = datetime.datetime.now(datetime.timezone.utc)
for b in range(a.count):
    points = []
    for i in range(a.points):
        seq = b * a.points + i
        ts = now + datetime.timedelta(milliseconds=seq)
        points.append({
            "ts": ts.isoformat().replace("+00:00", "Z"), "seq": seq,
            "lat": 46.5 + seq * 1e-5, "lon": 6.6, "alt": 120.5, "gs": 12.0,
            "vs": -0.5, "hdg": 270.0, "bp": 80.0, "fix": 3, "sats": 11,
        })
    body = json.dumps({"session": a.session, "seq": b, "points": points})
    client.publish(a.topic, body, qos=1)
    if a.interval:
        time.sleep(a.interval)

deadline = time.time() + 120
while len(acked) < a.count and time.time() < deadline:
    time.sleep(0.05)
print(json.dumps({"published": a.count, "acked": len(acked)}), flush=True)
client.disconnect()
client.loop_stop()
sys.exit(0 if len(acked) == a.count else 1)
