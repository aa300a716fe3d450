"""Attack 17 on MQTT spans through mosquitto and the real ``serve-mqtt``: one device, with
only its own credentials, asks for spans of one-byte blocks (``block`` 1). The bridge
stays up, its memory flat, another device is answered at once, and each request makes
one message (a span's blocks are at least ``MIN_SPAN_BLOCK``: its 16 bytes in one)."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path

from modelward.updater._config import fetch_client_id, fetch_username
from modelward.updater.transport._mqtt import BLOCK_HEADER, publish_properties
from modelward.updater.transport._mqttconn import MqttConnection, device_connection
from tests.conftest import FLEET, MqttWorld


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _flood(w: MqttWorld, n: int = 40) -> dict[str, float]:
    got: queue.Queue[tuple[bytes, bytes]] = queue.Queue()

    def on_message(msg) -> None:  # type: ignore[no-untyped-def]
        got.put((bytes(msg.properties.CorrelationData), bytes(msg.payload)))

    assert w.bridge is not None
    rss0 = _rss(w.bridge.pid)
    evil = device_connection(w.mqtt_cfg("dev-1"), "fetch", [], on_message)
    honest = device_connection(w.mqtt_cfg("dev-2"), "fetch", [], on_message)
    try:
        for conn, dev in ((evil, "dev-1"), (honest, "dev-2")):
            conn.subscribe(f"modelward/{FLEET}/devices/{dev}/repo/resp")

        def ask(conn: MqttConnection, dev: str, corr: bytes, body: dict) -> None:
            p = publish_properties()
            p.ResponseTopic = f"modelward/{FLEET}/devices/{dev}/repo/resp"
            p.CorrelationData = corr
            conn.publish(f"modelward/{FLEET}/repo/req/{dev}", json.dumps(body).encode(),
                         p, wait=True)

        for i in range(n):
            ask(evil, "dev-1", b"E" * 8 + i.to_bytes(8, "big"),
                {"path": "metadata/1.root.json", "offset": 16 * i, "length": 16,
                 "format": 3, "block": 1})
            time.sleep(0.02)  # (within the device's queue of 32 blocks: 2 spans)
        t0 = time.monotonic()
        ask(honest, "dev-2", b"H" * 16, {"path": "metadata/1.root.json", "offset": 0,
                                         "length": 100, "format": 2})
        honest_after = -1.0
        blocks = refused = 0
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                corr, payload = got.get(timeout=0.5)
            except queue.Empty:
                if honest_after >= 0:
                    break
                continue
            _, status, _, _ = BLOCK_HEADER.unpack(payload[:BLOCK_HEADER.size])
            if corr == b"H" * 16:
                honest_after = time.monotonic() - t0
            elif status == 200:
                blocks += 1
            else:
                refused += 1
        alive = w.bridge.poll() is None
        return {"blocks": blocks, "refused": refused, "requests": n,
                "honest": honest_after, "alive": float(alive),
                "rss_growth": _rss(w.bridge.pid) - rss0 if alive else -1}
    finally:
        evil.close()
        honest.close()


def test_a_tiny_block_flood_leaves_the_bridge_up_and_another_device_served(
        mqtt_world: MqttWorld) -> None:
    r = _flood(mqtt_world)
    assert r["alive"] == 1.0, r
    assert 0 <= r["honest"] < 1.0, r
    assert r["rss_growth"] < 16 << 20, r
    assert r["blocks"] + r["refused"] >= r["requests"], r  # (each request answered)


def test_tiny_block_spans_are_not_sent_as_one_message_a_byte(mqtt_world: MqttWorld) -> None:
    r = _flood(mqtt_world)
    asked = 16 * r["requests"]
    assert r["blocks"] <= r["requests"] + asked // 1024, r


def test_a_never_acking_subscriber_does_not_hold_the_bridge(mqtt_world: MqttWorld) -> None:
    """The flooding device subscribes with a Receive Maximum of 1 and never acknowledges
    what it gets (paho's manual ack, never given), then asks for 60 spans: the answers are
    QoS 0, so nothing waits for its acknowledgement and the bridge's send queue drains;
    another device is answered at once and the bridge stays up."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    w = mqtt_world
    cfg = w.mqtt_cfg("dev-1")
    got = {"n": 0}

    def on_message(client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        got["n"] += 1  # (never acknowledged)

    evil = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=fetch_client_id("dev-1"),
                       protocol=mqtt.MQTTv5, manual_ack=True)
    evil.tls_set(ca_certs=cfg.ca_file)
    evil.username_pw_set(fetch_username("dev-1"), cfg.password)
    evil.on_message = on_message
    cp = Properties(PacketTypes.CONNECT)
    cp.ReceiveMaximum = 1
    evil.connect("127.0.0.1", w.broker_port, properties=cp)
    evil.loop_start()
    answers: queue.Queue[bytes] = queue.Queue()
    honest = device_connection(w.mqtt_cfg("dev-2"), "fetch", [],
                            lambda m: answers.put(bytes(m.properties.CorrelationData)))
    try:
        evil.subscribe(f"modelward/{FLEET}/devices/dev-1/repo/resp", qos=1)
        honest.subscribe(f"modelward/{FLEET}/devices/dev-2/repo/resp")
        time.sleep(0.3)
        assert evil.is_connected()
        for i in range(60):
            p = Properties(PacketTypes.PUBLISH)
            p.ResponseTopic = f"modelward/{FLEET}/devices/dev-1/repo/resp"
            p.CorrelationData = b"N" * 8 + i.to_bytes(8, "big")
            evil.publish(f"modelward/{FLEET}/repo/req/dev-1", json.dumps(
                {"path": "metadata/1.root.json", "offset": 16 * i, "length": 16,
                 "format": 3, "block": 1}).encode(), qos=1, properties=p).wait_for_publish(5)
            time.sleep(0.02)
        p2 = publish_properties()
        p2.ResponseTopic = f"modelward/{FLEET}/devices/dev-2/repo/resp"
        p2.CorrelationData = b"H" * 16
        t0 = time.monotonic()
        honest.publish(f"modelward/{FLEET}/repo/req/dev-2", json.dumps(
            {"path": "metadata/1.root.json", "offset": 0, "length": 100,
             "format": 2}).encode(), p2, wait=True)
        assert answers.get(timeout=5) == b"H" * 16
        assert time.monotonic() - t0 < 1.0
        assert w.bridge is not None and w.bridge.poll() is None
        # The answers are QoS 0 (publisher._bridge.ANSWER_QOS): no acknowledgement is
        # awaited and Receive Maximum (QoS 1 and 2 only) holds none back, so the subscriber
        # gets at most what the bridge answered (one message per span of 16 one-byte
        # blocks: 60), and the broker holds nothing for it afterwards.
        assert 1 <= got["n"] <= 60
    finally:
        evil.loop_stop()
        evil.disconnect()
        honest.close()
