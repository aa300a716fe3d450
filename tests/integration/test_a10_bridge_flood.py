"""Attacker a10bridge (session 10), real mosquitto (generated dynamic-security config) and
the real ``serve-mqtt``: one device, with only its own fetcher identity, keeps many 1 MiB
answers outstanding and never acknowledges one (paho ``manual_ack``, no ``ack()``), each
asked for at an offset that leaves 512 KiB + 1 bytes of the file (so that the bridge's
requested-length ``preadv`` buffer is kept whole, see ``test_a10_bridge_buffers``).
Another device's block is still answered within 2x its baseline, and the bridge's memory
stays within its send queue and a few blocks.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from modelward.updater._config import fetch_client_id, fetch_username
from modelward.updater.transport._mqtt import publish_properties
from modelward.updater.transport._mqttconn import MqttConnection, device_connection
from tests.conftest import FLEET, MqttWorld

MIB = 1 << 20
TAIL = (512 << 10) + 1


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _props(device: str, corr: bytes):  # type: ignore[no-untyped-def]
    p = publish_properties()
    p.ResponseTopic = f"modelward/{FLEET}/devices/{device}/repo/resp"
    p.CorrelationData = corr
    return p


def _latency(conn: MqttConnection, got: queue.Queue[bytes], corr: bytes) -> float:
    req = json.dumps({"path": "targets/a10.bin", "offset": 0, "length": 4096,
                      "format": 2}).encode()
    t = time.monotonic()
    conn.publish(f"modelward/{FLEET}/repo/req/dev-2", req, _props("dev-2", corr), wait=True)
    while True:
        c = got.get(timeout=30)
        if c == corr:
            return time.monotonic() - t


@pytest.mark.xdist_group("machine")
def test_a10_unacknowledging_tail_block_flood_leaves_another_device_served(
        mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    assert w.bridge is not None and w.creds is not None
    size = 3 * MIB + TAIL
    (w.repo_dir / "targets" / "a10.bin").write_bytes(b"A" * size)
    got: queue.Queue[bytes] = queue.Queue()
    dev2 = device_connection(w.mqtt_cfg("dev-2"), "fetch", [],
                             lambda m: got.put(bytes(m.properties.CorrelationData)))
    evil = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=fetch_client_id("dev-1"),
                       protocol=mqtt.MQTTv5, manual_ack=True)
    evil.username_pw_set(fetch_username("dev-1"), w.creds["dev-1"].read_text().strip())
    evil.tls_set(ca_certs=str(w.ca.cert))
    received = [0]

    def on_evil(_c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        received[0] += 1  # and never evil.ack(...)

    evil.on_message = on_evil
    evil.connect("127.0.0.1", w.broker_port, 30)
    evil.loop_start()
    stop = threading.Event()
    try:
        dev2.subscribe(f"modelward/{FLEET}/devices/dev-2/repo/resp")
        evil.subscribe(f"modelward/{FLEET}/devices/dev-1/repo/resp", qos=1)
        time.sleep(0.5)
        baseline = min(_latency(dev2, got, b"base%d" % i) for i in range(5))
        rss0 = _status(w.bridge.pid, "VmRSS")

        def flood() -> None:
            i = 0
            req = json.dumps({"path": "targets/a10.bin", "offset": 3 * MIB,
                              "length": MIB, "format": 2}).encode()
            while not stop.is_set():
                evil.publish(f"modelward/{FLEET}/repo/req/dev-1", req, qos=1,
                             properties=_props("dev-1", b"E%015d" % i))
                i += 1
                time.sleep(1 / 40)  # under the device's 50 requests/s

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        time.sleep(3)
        latencies = [_latency(dev2, got, b"flood%d" % i) for i in range(5)]
        time.sleep(1)
        hwm = _status(w.bridge.pid, "VmHWM")
        stop.set()
        t.join(5)
        ms = [round(x * 1000, 1) for x in latencies]
        print(f"baseline {baseline * 1000:.1f} ms, under flood {ms} ms;"
              f" bridge RSS before {rss0 / MIB:.1f} MiB, peak {hwm / MIB:.1f} MiB;"
              f" evil received {received[0]}")
        assert received[0] > 0  # the flood was answered (and never acknowledged)
        assert sorted(latencies)[2] < max(0.25, 2 * baseline), (baseline, latencies)
        assert hwm - rss0 < 24 * MIB, (rss0, hwm)
        assert w.bridge.poll() is None  # the bridge is still up
    finally:
        stop.set()
        evil.disconnect()
        evil.loop_stop()
        dev2.close()
