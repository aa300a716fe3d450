"""a14-bridge: one device's credentials, many MQTT connections (real mosquitto +
``modelward serve-mqtt``).

The broker settings bound what one *session* holds (``max_inflight_bytes`` 4 blocks,
``max_queued_bytes`` one window). dev-2 opens "sink" connections, each subscribed to its
own response topic and never reading (or acknowledging) again, one after another, and asks
the bridge, within its own 16 MiB/s budget, for a window of blocks after each.

Worked (until dynamic security): nothing bounded the sessions of one username; every sink
held a different window, ~30 MiB of broker memory per connection (1 sink 28 MiB, 5 sinks
157 MiB), without bound. Fixed: ``broker-config`` binds each device identity to one
client id, so a sink with any other client id is refused at CONNECT, a sink with the
listener's id cannot subscribe the response topic, and a sink with the fetcher's id takes
the place of the session before it (the flooder's, or the last sink's): one session's
worth, however it connects.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from modelward.simulator._flood import _props, vm_rss
from modelward.updater._config import fetch_username
from modelward.updater.errors import TransportError
from modelward.updater.transport._mqttconn import MqttConnection, device_connection
from tests.conftest import MqttWorld

FLOOD_FILE = "targets/flood.bin"
MIB = 1 << 20
SINKS = 5
BLOCKS = 20  # a window (16) and the in-flight blocks beyond it


@pytest.mark.xdist_group("machine")
def test_a14_one_device_many_unread_sessions_grow_the_broker(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    with open(w.repo_dir / FLOOD_FILE, "wb") as f:
        f.truncate(64 * MIB)
    pid = int((w.broker_work / "mosquitto.pid").read_text().split()[0])
    cfg = w.mqtt_cfg("dev-2")
    resp = cfg.topic("devices/dev-2/repo/resp")
    req = cfg.topic("repo/req/dev-2")
    sinks: list[MqttConnection] = []
    refused: list[int] = []
    before = vm_rss(pid)
    try:
        n = 0
        for k in range(SINKS):
            for login in ("dev-2", fetch_username("dev-2")):  # either identity's password
                with pytest.raises(TransportError, match="refused"):
                    MqttConnection(cfg, f"dev-2-sink-{k}", [resp], username=login)
            refused.append(k)
            # the listener's id connects, but may not subscribe the response topic
            listener = device_connection(cfg, "listen", [])
            try:
                with pytest.raises(TransportError, match="refused the subscription"):
                    listener.subscribe(resp)
            finally:
                listener.close()
            # the fetcher's id connects (taking the last sink's place), subscribes, asks
            # for a window and more of blocks and never reads or acknowledges again
            s = device_connection(cfg, "fetch", [resp])
            sinks.append(s)
            for _ in range(BLOCKS):
                s.publish(req, b'{"path": "%s", "offset": %d, "length": %d, "format": 2}'
                          % (FLOOD_FILE.encode(), (n % 64) * MIB, MIB),
                          _props(resp), wait=True)
                n += 1
            s.client.loop_stop()  # the socket stays open; nothing reads or acknowledges
            time.sleep(1.5)  # the bridge answers (within dev-2's 16 MiB/s budget)
        time.sleep(0.3)
        grown = vm_rss(pid) - before
    finally:
        for s in sinks:
            with contextlib.suppress(OSError, AttributeError):
                s.client.socket().close()  # type: ignore[union-attr]
    served = w.served_bytes("flood.bin")
    print(f"mosquitto VmRSS grew {grown >> 20} MiB with {SINKS} unread dev-2 connections "
          f"(the bridge sent {served >> 20} MiB)")
    assert refused == list(range(SINKS))
    assert served >= SINKS * 8 * MIB  # the attack ran: every sink was sent blocks
    assert grown < 48 * MIB, grown >> 20  # what one device may hold, however it connects

