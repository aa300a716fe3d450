"""Attack 14, real stack (mosquitto with the generated config, the real `serve-mqtt`): one
device, with only its own credentials, sends a PUBLISH whose MQTT 5 properties are tens of
thousands of empty user properties (5 bytes each, far inside ``max_packet_size``).
mosquitto forwards user properties as MQTT 5 requires, and every paho receiver parses them
with paho's ``Properties.unpack`` (still used by ``updater.transport._pahofast.decode_publish``),
which copies the rest of the properties for each one it reads: quadratic, ~4 s for 60,000,
~6-7 s for 75,000 (375 KiB, measured here), ~60 s and more for the ~200,000 a 1 MiB packet
holds, in the receiver's network thread.

* on ``repo/req/<own id>`` it stalls the bridge: every other device's block waits;
* retained on its own ``status`` topic it stalls every ``fleet status``: the operator's
  network thread parses it on each run, so the command overruns ``--wait``.

Fixed (issue 14, f14-broker): ``updater.transport._pahofast`` bounds a PUBLISH's property block
(4 KiB, 16 properties, 8 user properties) in one linear pass before paho sees it; the
client acknowledges and drops such a packet (~0.1 ms instead of ~6-18 s).
"""

from __future__ import annotations

import queue
import socket
import ssl
import struct
import time

import pytest

from modelward.publisher._fleet import collect_reports
from modelward.updater._config import fetch_client_id, fetch_username, listen_client_id
from modelward.updater.transport._mqtt import publish_properties
from modelward.updater.transport._mqttconn import MqttConnection, device_connection
from tests._helpers import mqtt_str, mqtt_varint
from tests.conftest import FLEET, MqttWorld

N_PROPS = 75_000


def _recv_packet(sock: ssl.SSLSocket) -> bytes:
    head = sock.recv(1)
    mult, length = 1, 0
    while True:
        b = sock.recv(1)[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return head + body


def publish_heavy(w: MqttWorld, user: str, topic: str, *, retain: bool,
                  payload: bytes = b"{}") -> None:
    """Raw MQTT 5: CONNECT as ``user`` (its fetcher for a request topic, else its
    listener, each with its bound client id), one QoS 1 PUBLISH with N_PROPS empty user
    properties, wait for the PUBACK (the broker took it), DISCONNECT."""
    assert w.creds is not None
    login, cid = ((fetch_username(user), fetch_client_id(user)) if "/repo/req/" in topic
                  else (user, listen_client_id(user)))
    ctx = ssl.create_default_context(cafile=str(w.ca.cert))
    raw = socket.create_connection(("127.0.0.1", w.broker_port), timeout=20)
    sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        pw = w.creds[user].read_text().strip().encode()
        body = (mqtt_str(b"MQTT") + bytes([5, 0x80 | 0x40 | 0x02]) + struct.pack(">H", 60)
                + b"\x00" + mqtt_str(cid.encode()) + mqtt_str(login.encode()) + mqtt_str(pw))
        sock.sendall(b"\x10" + mqtt_varint(len(body)) + body)
        connack = _recv_packet(sock)
        assert connack[0] == 0x20 and connack[2] == 0, connack
        props = b"\x26\x00\x00\x00\x00" * N_PROPS
        var = mqtt_str(topic.encode()) + struct.pack(">H", 1) + mqtt_varint(len(props)) + props
        sock.sendall(bytes([0x32 | int(retain)]) + mqtt_varint(len(var) + len(payload))
                     + var + payload)
        puback = _recv_packet(sock)
        assert puback[0] == 0x40 and (len(puback) < 4 or puback[3] < 0x80), puback
        sock.sendall(b"\xe0\x00")
    finally:
        sock.close()


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
        if got.get(timeout=120) == corr:
            return time.monotonic() - t


def test_one_request_full_of_user_properties_does_not_stall_the_bridge(
        mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    got: queue.Queue[bytes] = queue.Queue()
    dev2 = device_connection(w.mqtt_cfg("dev-2"), "fetch",
                          [f"modelward/{FLEET}/devices/dev-2/repo/resp"],
                          lambda m: got.put(bytes(m.properties.CorrelationData)))
    try:
        baseline = min(_block_latency(dev2, got, b"base%d" % i) for i in range(3))
        publish_heavy(w, "dev-1", f"modelward/{FLEET}/repo/req/dev-1", retain=False)
        latency = _block_latency(dev2, got, b"after")
    finally:
        dev2.close()
    assert latency < max(1.0, 2 * baseline), (baseline, latency)


@pytest.mark.xdist_group("machine")
def test_a_retained_status_full_of_user_properties_does_not_stall_fleet_status(
        mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    honest = device_connection(w.mqtt_cfg("dev-2"), "listen", [])
    try:
        honest.publish(f"modelward/{FLEET}/devices/dev-2/status", b'{"x": 1}', retain=True,
                       wait=True)
    finally:
        honest.close()
    publish_heavy(w, "dev-1", f"modelward/{FLEET}/devices/dev-1/status", retain=True)
    wait = 0.5
    t = time.monotonic()
    got = collect_reports(w.mqtt_cfg("modelward-operator"), ["dev-1", "dev-2"], wait=wait)
    took = time.monotonic() - t
    assert "dev-2" in got
    assert took < wait + 1.0, f"fleet status took {took:.1f}s for --wait {wait}"
