"""a14-bridge: one device's MQTT 5 user properties stall the bridge (real mosquitto +
``modelward serve-mqtt``).

A request is admitted (rate bucket, parsing) only after paho has decoded the whole
PUBLISH, user properties included, in the bridge's single network thread. mosquitto
forwards a publisher's user properties unchanged, and a packet within the bridge's
Maximum Packet Size (~20 KiB) holds ~3,800 empty ones, which paho's
``Properties.unpack`` decodes in ~90 ms (a plain request: ~70 us). So ~12 such
messages a second from dev-2, each dropped or refused by the bridge, keep the network
thread busy: dev-1's block requests wait behind them at the broker.
"""

from __future__ import annotations

import statistics
import threading
import time

import pytest

from modelward.simulator._flood import Prober, vm_hwm, vm_rss
from modelward.updater.transport._mqttconn import (
    device_connection,
    publish_properties,
)
from tests.conftest import MqttWorld

FLOOD_FILE = "targets/flood.bin"
MIB = 1 << 20
PROPS = 3800  # ("", "") pairs: 5 bytes each, the packet stays under 20 KiB


def _heavy_props(resp_topic: str) -> object:
    p = publish_properties()
    p.ResponseTopic = resp_topic
    p.CorrelationData = b"c" * 16
    p.UserProperty = [("", "")] * PROPS
    return p


@pytest.mark.xdist_group("machine")
def test_a14_user_properties_stall_the_bridge_for_another_device(
    mqtt_world: MqttWorld,
) -> None:
    w = mqtt_world
    assert w.bridge is not None
    with open(w.repo_dir / FLOOD_FILE, "wb") as f:
        f.truncate(4 * MIB)
    honest = Prober(w.mqtt_cfg("dev-1"), FLOOD_FILE)
    cfg = w.mqtt_cfg("dev-2")
    evil = device_connection(cfg, "fetch", [])
    req = cfg.topic("repo/req/dev-2")
    props = _heavy_props(cfg.topic("devices/dev-2/repo/resp"))
    stop = threading.Event()

    def flood() -> None:  # 25 messages a second: ~0.5 MB/s from dev-2
        t, i = time.monotonic(), 0
        while not stop.is_set():
            evil.client.publish(req, b"{}", qos=0, properties=props)
            i += 1
            stop.wait(max(0.0, t + i / 25 - time.monotonic()))

    flooder = threading.Thread(target=flood, daemon=True)
    broker = int((w.broker_work / "mosquitto.pid").read_text().split()[0])
    try:
        honest.latencies(3, pause=0.02)  # warm up
        base = statistics.median(honest.latencies(10, pause=0.02))
        broker_before = vm_rss(broker)
        flooder.start()
        time.sleep(0.5)
        flooded = [honest.once(offset=0, timeout=2.0) for _ in range(4)]
        broker_grown = vm_rss(broker) - broker_before
    finally:
        stop.set()
        flooder.join(5)
        evil.close()
        honest.close()
    print(f"dev-1 baseline {base * 1e3:.1f} ms; during the property flood "
          f"{[(s, round(dt * 1e3)) for s, dt in flooded]} (status, ms); bridge VmHWM "
          f"{vm_hwm(w.bridge.pid) >> 20} MiB; mosquitto grew {broker_grown >> 10} KiB")
    assert w.bridge.poll() is None
    assert all(s == 200 for s, _ in flooded), flooded
    assert statistics.median(dt for _, dt in flooded) <= max(2 * base, 0.1), (base, flooded)
