"""Attack 14, real stack (mosquitto with the generated config, the real `serve-mqtt`): one
device, with only its own credentials, stalls every other device's block requests with a
few requests the bridge's bounded parser takes quadratic time to refuse
(``modelward.trust._bounded.json_depth``: ``"\\"\\"\\"...`` never closed, ~16 KiB each).
Also: a device that joins the bridges' fixed shared-subscription group loses half of another
device's requests; and a request it retains on its own topic is handed again to every
bridge that (re)subscribes.

The depth pre-scan runs in the bridge's one network thread before anything else, so each
such request holds every other device's answers for ~0.5 s; twelve of them, ~6 s.
"""

from __future__ import annotations

import queue
import time

import pytest

from modelward.publisher._bridge import MAX_REQUEST_BYTES
from modelward.updater._config import fetch_client_id, fetch_username
from modelward.updater.transport._mqtt import publish_properties
from modelward.updater.transport._mqttconn import MqttConnection, device_connection
from tests.conftest import FLEET, MqttWorld

N_SLOW = 12


def _props(device: str, corr: bytes):  # type: ignore[no-untyped-def]
    p = publish_properties()
    p.ResponseTopic = f"modelward/{FLEET}/devices/{device}/repo/resp"
    p.CorrelationData = corr
    return p


def _block_latency(conn: MqttConnection, got: queue.Queue[bytes], corr: bytes) -> float:
    req = b'{"path": "metadata/1.root.json", "offset": 0, "length": 1024, "format": 2}'
    t = time.monotonic()
    conn.publish(f"modelward/{FLEET}/repo/req/dev-2", req, _props("dev-2", corr), wait=True)
    while True:
        c = got.get(timeout=30)
        if c == corr:
            return time.monotonic() - t


@pytest.mark.xdist_group("machine")
def test_one_device_cannot_stall_the_bridge_with_slow_to_parse_requests(
        mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    got: queue.Queue[bytes] = queue.Queue()
    dev2 = device_connection(w.mqtt_cfg("dev-2"), "fetch",
                          [f"modelward/{FLEET}/devices/dev-2/repo/resp"],
                          lambda m: got.put(bytes(m.properties.CorrelationData)))
    dev1 = device_connection(w.mqtt_cfg("dev-1"), "fetch", [])
    try:
        baseline = min(_block_latency(dev2, got, b"base%d" % i) for i in range(3))
        slow = b'"' + b'\\"' * ((MAX_REQUEST_BYTES - 1) // 2)
        assert len(slow) <= MAX_REQUEST_BYTES
        for i in range(N_SLOW):
            dev1.publish(f"modelward/{FLEET}/repo/req/dev-1", slow,
                         _props("dev-1", b"slow%d" % i), wait=True)
        latency = _block_latency(dev2, got, b"after")
    finally:
        dev1.close()
        dev2.close()
    assert latency < max(1.0, 2 * baseline), (baseline, latency)


def test_one_device_in_the_bridges_share_group_loses_no_request_of_another(
        mqtt_world: MqttWorld) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    w = mqtt_world
    assert w.creds is not None
    thief = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=fetch_client_id("dev-1"),
                        protocol=mqtt.MQTTv5)
    thief.username_pw_set(fetch_username("dev-1"), w.creds["dev-1"].read_text().strip())
    thief.tls_set(ca_certs=str(w.ca.cert))
    thief.connect("127.0.0.1", w.broker_port, 30)
    thief.loop_start()
    got: queue.Queue[bytes] = queue.Queue()
    dev2 = device_connection(w.mqtt_cfg("dev-2"), "fetch",
                          [f"modelward/{FLEET}/devices/dev-2/repo/resp"],
                          lambda m: got.put(bytes(m.properties.CorrelationData)))
    answered = 0
    try:
        thief.subscribe(f"$share/modelward-bridges/modelward/{FLEET}/repo/req/+", qos=1)
        time.sleep(0.5)
        req = b'{"path": "metadata/1.root.json", "offset": 0, "length": 64, "format": 2}'
        for i in range(10):
            dev2.publish(f"modelward/{FLEET}/repo/req/dev-2", req,
                         _props("dev-2", b"r%d" % i), wait=True)
        end = time.monotonic() + 3
        while answered < 10 and time.monotonic() < end:
            try:
                got.get(timeout=0.2)
                answered += 1
            except queue.Empty:
                pass
    finally:
        dev2.close()
        thief.disconnect()
        thief.loop_stop()
    assert answered == 10, f"{answered}/10 of dev-2's requests answered"


def test_a_retained_slow_request_does_not_reach_a_restarted_bridge(
        mqtt_world: MqttWorld) -> None:
    """dev-1 retains a slow-to-parse request on its own request topic (``pattern write``
    allows retain). Every bridge that (re)subscribes, after a restart or a reconnect, is
    handed it first, even after dev-1 is gone or its credentials revoked; with the
    property-heavy PUBLISH of test_a14_device_props that is a minute per start."""
    w = mqtt_world
    dev1 = device_connection(w.mqtt_cfg("dev-1"), "fetch", [])
    slow = b'"' + b'\\"' * ((MAX_REQUEST_BYTES - 1) // 2)
    try:
        dev1.publish(f"modelward/{FLEET}/repo/req/dev-1", slow, _props("dev-1", b"ret"),
                     retain=True, wait=True)
    finally:
        dev1.close()
    time.sleep(1.0)  # the running bridge refuses it once
    w.stop_bridge()
    w.start_bridge()
    got: queue.Queue[bytes] = queue.Queue()
    dev2 = device_connection(w.mqtt_cfg("dev-2"), "fetch",
                          [f"modelward/{FLEET}/devices/dev-2/repo/resp"],
                          lambda m: got.put(bytes(m.properties.CorrelationData)))
    try:
        latency = _block_latency(dev2, got, b"first")
    finally:
        dev2.close()
    assert "from dev-1" not in w.bridge_log.read_text(), "restarted bridge got dev-1's request"
    assert latency < 0.3, latency
