"""Issue 14, must-show 7, real stack (mosquitto with the generated config, the real
``serve-mqtt``): a device floods its own request topic with PUBLISHes packed with empty
MQTT 5 user properties, each inside the bridge's ~20 KiB Maximum Packet Size (so mosquitto
forwards it). paho's ``Properties.unpack`` is quadratic (and copies its 64 KiB overread on
every property): ~0.1 s of the bridge's network thread per packet, before any per-device
budget applies. ``updater.transport._pahofast`` bounds the property block in one linear pass and
acknowledges and drops such a packet: another device's block latency stays put.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import struct
import time

import pytest

from modelward.publisher._bridge import REQUEST_PACKET_LIMIT
from modelward.updater._config import fetch_client_id, fetch_username
from modelward.updater.transport._mqttconn import device_connection
from tests._helpers import mqtt_str as _s
from tests._helpers import mqtt_varint as _varint
from tests.conftest import FLEET, MqttWorld
from tests.integration.test_a14_device_props import (
    _block_latency,
    _props,
    _recv_packet,
)

N_PACKETS = 40


def _flood_properties(w: MqttWorld, user: str, n_packets: int) -> int:
    """Raw MQTT 5 as ``user``: ``n_packets`` QoS 1 requests on its own topic, each with as
    many empty user properties as fit the bridge's packet limit; the number acknowledged."""
    assert w.creds is not None
    ctx = ssl.create_default_context(cafile=str(w.ca.cert))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", w.broker_port), 20),
                           server_hostname="127.0.0.1")
    pw = w.creds[user].read_text().strip().encode()
    body = (_s(b"MQTT") + bytes([5, 0xC2]) + struct.pack(">H", 60) + b"\x00"
            + _s(fetch_client_id(user).encode()) + _s(fetch_username(user).encode()) + _s(pw))
    topic = f"modelward/{FLEET}/repo/req/{user}".encode()
    props = b"\x26\x00\x00\x00\x00" * ((REQUEST_PACKET_LIMIT - 200 - len(topic)) // 5)
    acks = 0
    try:
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        assert _recv_packet(sock)[2] == 0
        for i in range(n_packets):
            var = _s(topic) + struct.pack(">H", i + 1) + _varint(len(props)) + props + b"{}"
            sock.sendall(b"\x32" + _varint(len(var)) + var)
        for _ in range(n_packets):
            acks += _recv_packet(sock)[0] == 0x40
        sock.sendall(b"\xe0\x00")
    finally:
        sock.close()
    return acks


@pytest.mark.xdist_group("machine")
def test_i14_a_flood_of_property_packed_requests_does_not_stall_the_bridge(
        mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    got: queue.Queue[bytes] = queue.Queue()
    dev2 = device_connection(w.mqtt_cfg("dev-2"), "fetch",
                          [f"modelward/{FLEET}/devices/dev-2/repo/resp"],
                          lambda m: got.put(bytes(m.properties.CorrelationData)))
    try:
        baseline = min(_block_latency(dev2, got, b"base%d" % i) for i in range(3))
        t = time.monotonic()
        assert _flood_properties(w, "dev-1", N_PACKETS) == N_PACKETS  # the broker took them
        latency = _block_latency(dev2, got, b"after")
        took = time.monotonic() - t
    finally:
        dev2.close()
    assert w.bridge is not None and w.bridge.poll() is None  # still serving
    assert latency < max(0.5, 2 * baseline), (baseline, latency, took)
    assert "dropping a PUBLISH from the broker" in w.bridge_log.read_text()


def test_i14_a_device_in_share_groups_of_its_own_takes_no_request_of_another(
        mqtt_world: MqttWorld) -> None:
    """Self-attack on the secret group: dev-1 subscribes to the request topics in the old
    fixed group, in a group of its own and without a group; the bridges' group is none of
    them, so every one of dev-2's requests is answered and dev-1 receives nothing."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from modelward.publisher._bridge import share_group

    w = mqtt_world
    assert w.creds is not None
    assert share_group(w.mqtt_cfg("modelward-bridge")) != "modelward-bridges"
    thief = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=fetch_client_id("dev-1"),
                        protocol=mqtt.MQTTv5)
    thief.username_pw_set(fetch_username("dev-1"), w.creds["dev-1"].read_text().strip())
    thief.tls_set(ca_certs=str(w.ca.cert))
    stolen: list[str] = []
    thief.on_message = lambda _c, _u, m: stolen.append(m.topic)
    thief.connect("127.0.0.1", w.broker_port, 30)
    thief.loop_start()
    got: queue.Queue[bytes] = queue.Queue()
    dev2 = device_connection(w.mqtt_cfg("dev-2"), "fetch",
                          [f"modelward/{FLEET}/devices/dev-2/repo/resp"],
                          lambda m: got.put(bytes(m.properties.CorrelationData)))
    try:
        req = f"modelward/{FLEET}/repo/req/+"
        thief.subscribe([(f"$share/modelward-bridges/{req}", 1), (f"$share/mine/{req}", 1),
                         (f"$share/modelward-bridges-0/{req}", 1), (req, 1)])
        time.sleep(0.5)
        body = b'{"path": "metadata/1.root.json", "offset": 0, "length": 64, "format": 2}'
        for i in range(10):
            dev2.publish(f"modelward/{FLEET}/repo/req/dev-2", body,
                         _props("dev-2", b"r%d" % i), wait=True)
        answered: set[bytes] = set()
        end = time.monotonic() + 3
        while len(answered) < 10 and time.monotonic() < end:
            with contextlib.suppress(queue.Empty):
                answered.add(got.get(timeout=0.2))
    finally:
        dev2.close()
        thief.disconnect()
        thief.loop_stop()
    assert len(answered) == 10, f"{len(answered)}/10 of dev-2's requests answered"
    assert stolen == []
