"""Issue 14, must-show 7 (third bullet): the broker settings `fleet broker-config` writes
bound bytes, not only counts. Real mosquitto started with the generated settings (the same
`start_broker` the `sim fleet` path uses), a device using only its own credentials.

The attacker speaks raw MQTT 3.1.1 (no client-side limits, no Maximum Packet Size from the
CONNACK to honour): whatever refuses the oversized packet is the broker.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from modelward.publisher._broker_config import MAX_PACKET, MAX_QUEUED_BYTES, write_broker_config
from modelward.simulator._broker import BrokerHandle, start_broker, stop_broker
from modelward.simulator._pki import CertPair
from modelward.updater._config import MqttConfig, fetch_client_id, fetch_username
from modelward.updater.transport._mqtt import block_header
from modelward.updater.transport._mqttconn import MqttConnection, device_connection
from tests._helpers import mqtt_str, mqtt_varint

FLEET = "f14"
MiB = 1 << 20
GROUP = "test-bridges-0123456789abcdef"  # a bridge subscribes in a shared group only


@dataclass
class Broker:
    handle: BrokerHandle
    ca: Path
    creds: dict[str, Path]

    def cfg(self, user: str) -> MqttConfig:
        return MqttConfig(host="127.0.0.1", port=self.handle.port, fleet=FLEET,
                          client_name=user, ca_file=str(self.ca),
                          password=self.creds[user].read_text().strip())

    def rss(self) -> int:
        for line in Path(f"/proc/{self.handle.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def _broker(d: Path, pki: tuple[CertPair, CertPair]) -> Iterator[Broker]:
    ca, server = pki
    bc = write_broker_config(FLEET, ["dev-1", "dev-2"], d / "broker-config")
    h = start_broker(d / "broker", server, ca.cert, bc.conf)
    try:
        yield Broker(h, ca.cert, bc.credentials)
    finally:
        stop_broker(d / "broker")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory,
           pki: tuple[CertPair, CertPair]) -> Iterator[Broker]:
    yield from _broker(tmp_path_factory.mktemp("i14broker"), pki)


@pytest.fixture
def fresh_broker(tmp_path: Path, pki: tuple[CertPair, CertPair]) -> Iterator[Broker]:
    """A broker of its own, for memory measurements (nothing freed earlier to reuse)."""
    yield from _broker(tmp_path, pki)


class RawClient:
    """A hostile MQTT 3.1.1 client: exactly the bytes it is told to send."""

    def __init__(self, b: Broker, user: str, client_id: str,
                 username: str | None = None) -> None:
        ctx = ssl.create_default_context(cafile=str(b.ca))
        raw = socket.create_connection(("127.0.0.1", b.handle.port), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        pw = b.creds[user].read_text().strip().encode()
        login = (username or user).encode()
        body = (mqtt_str(b"MQTT") + bytes([4, 0x80 | 0x40 | 0x02]) + struct.pack(">H", 60)
                + mqtt_str(client_id.encode()) + mqtt_str(login) + mqtt_str(pw))
        self.sock.sendall(b"\x10" + mqtt_varint(len(body)) + body)
        assert self.sock.recv(4) == b"\x20\x02\x00\x00", "CONNACK refused"
        self.sent = 0  # payload bytes the broker took before it ended the connection

    def publish(self, topic: str, size: int, *, retain: bool, chunk: int = MiB) -> bool:
        """PUBLISH QoS 1 with a ``size``-byte payload of zeros, streamed; True when the
        broker acknowledged it, False when it ended the connection instead."""
        self.sent = 0
        var = mqtt_str(topic.encode()) + struct.pack(">H", 1)
        head = bytes([0x32 | int(retain)]) + mqtt_varint(len(var) + size) + var
        try:
            self.sock.sendall(head)
            zeros, left = bytes(chunk), size
            while left:
                n = min(left, chunk)
                self.sock.sendall(zeros[:n])
                left -= n
                self.sent += n
            self.sock.settimeout(5)
            return self.sock.recv(4) == b"\x40\x02\x00\x01"
        except (OSError, ssl.SSLError):
            return False
        finally:
            self.sock.close()


def _wait(pred: object, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if callable(pred) and pred():
            return True
        time.sleep(0.02)
    return False


def test_config_in_use_bounds_bytes(broker: Broker) -> None:
    conf = (broker.handle.work / "mosquitto.conf").read_text().splitlines()
    assert f"max_packet_size {MAX_PACKET}" in conf
    assert f"max_queued_bytes {MAX_QUEUED_BYTES}" in conf
    assert any(line.startswith("persistent_client_expiration ") for line in conf)
    # the installed mosquitto takes every option as it is: no error, nothing deprecated.
    # The broker is shared by this module's tests: their clients' own failures don't count
    # (CI: a TLS handshake cut short logs "new connection from", "openssl error[0]: ...
    # unexpected eof" and "client <unknown> disconnected: protocol error")
    clients = ("client connection from", "socket error", "new connection from",
               "openssl error", "client <unknown> disconnected")
    log = "\n".join(line for line in
                    (broker.handle.work / "mosquitto.log").read_text().lower().splitlines()
                    if not any(c in line for c in clients))
    assert "error" not in log and "deprecat" not in log and "unknown" not in log, log


def test_200mib_retained_status_is_refused_and_not_retained(broker: Broker) -> None:
    topic = f"modelward/{FLEET}/devices/dev-1/status"
    old = b'{"report": "old"}'
    dev = device_connection(broker.cfg("dev-1"), "listen", [])
    try:
        dev.publish(topic, old, retain=True, wait=True)
    finally:
        dev.close()
    evil = RawClient(broker, "dev-1", "dev-1-listen")
    accepted = evil.publish(topic, 200 * MiB, retain=True)
    seen: list[bytes] = []
    op = MqttConnection(broker.cfg("modelward-operator"), "op-1", [topic],
                        lambda m: seen.append(bytes(m.payload)), max_packet_size=255 * MiB)
    try:
        assert _wait(lambda: seen, 5), "the operator sees no retained status at all"
        time.sleep(0.2)
    finally:
        op.close()
    assert seen == [old], "the oversized status replaced the retained one"
    assert not accepted, "the broker acknowledged a 200 MiB status"
    assert evil.sent < 32 * MiB, f"the broker read {evil.sent >> 20} MiB of the packet"


def test_100mib_request_never_reaches_the_bridge(broker: Broker) -> None:
    req = f"modelward/{FLEET}/repo/req/dev-2"
    seen: list[int] = []
    lock = threading.Lock()

    def got(m: mqtt.MQTTMessage) -> None:
        with lock:
            seen.append(len(m.payload))

    bridge = MqttConnection(broker.cfg("modelward-bridge"), "bridge-1",
                            [f"$share/{GROUP}/modelward/{FLEET}/repo/req/+"], got,
                            max_packet_size=255 * MiB)
    dev = None
    try:
        accepted = RawClient(broker, "dev-2", fetch_client_id("dev-2"),
                             fetch_username("dev-2")).publish(req, 100 * MiB, retain=False)
        dev = device_connection(broker.cfg("dev-2"), "fetch", [
            f"modelward/{FLEET}/devices/dev-2/repo/resp"])
        dev.publish(req, b'{"path": "metadata/1.root.json", "offset": 0}', wait=True)
        assert _wait(lambda: seen, 5)
        # a full block answer (the largest legitimate packet) still passes the bound
        answers: list[int] = []
        dev.close()
        dev = device_connection(broker.cfg("dev-2"), "fetch",
                                [f"modelward/{FLEET}/devices/dev-2/repo/resp"],
                                lambda m: answers.append(len(m.payload)))
        block = block_header(200, 0, MiB) + bytes(MiB)
        bridge.publish(f"modelward/{FLEET}/devices/dev-2/repo/resp", block, wait=True)
        assert _wait(lambda: answers, 5) and answers == [len(block)]
    finally:
        bridge.close()
        if dev is not None:
            dev.close()
    assert seen == [len(b'{"path": "metadata/1.root.json", "offset": 0}')], \
        "the 100 MiB request reached the bridge's subscription"
    assert not accepted, "the broker acknowledged a 100 MiB request"


def test_a_subscriber_asking_for_small_packets_never_gets_a_large_one(broker: Broker) -> None:
    """What a bridge gains by asking for small packets on CONNECT (MQTT 5 Maximum Packet
    Size): mosquitto drops, for that subscriber only, a request that fits the broker's
    bound but not the subscriber's."""
    req = f"modelward/{FLEET}/repo/req/dev-1"
    seen: list[int] = []
    bridge = MqttConnection(broker.cfg("modelward-bridge"), "bridge-small",
                            [f"$share/{GROUP}/modelward/{FLEET}/repo/req/+"],
                            lambda m: seen.append(len(m.payload)), max_packet_size=4096)
    dev = device_connection(broker.cfg("dev-1"), "fetch", [])
    try:
        dev.publish(req, bytes(512 * 1024), wait=True)  # accepted by the broker...
        dev.publish(req, b'{"path": "x", "offset": 0, "length": 1}', wait=True)
        assert _wait(lambda: seen, 5)
        time.sleep(0.1)
    finally:
        dev.close()
        bridge.close()
    assert seen == [len(b'{"path": "x", "offset": 0, "length": 1}')]  # ...never delivered


RESP = f"modelward/{FLEET}/devices/dev-1/repo/resp"


def _park_sessions(b: Broker, n: int) -> None:
    """``n`` times an offline persistent session of dev-1's fetcher, subscribed at QoS 1
    to its response topic (the only topic it reads that carries blocks). Its client id is
    bound (dynamic security), so each one takes the place of the one before; with any
    other client id the CONNECT is refused."""
    for i in range(n):
        for cid in (f"dev-1-parked-{i}", fetch_client_id("dev-1")):
            sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid,
                              clean_session=False, protocol=mqtt.MQTTv311)
            sub.tls_set_context(ssl.create_default_context(cafile=str(b.ca)))
            sub.username_pw_set(fetch_username("dev-1"), b.cfg("dev-1").password)
            connected: list[int] = []
            up = threading.Event()
            sub.on_connect = lambda *a, ev=up, rc=connected: (rc.append(int(a[3].value)),
                                                              ev.set())
            sub.connect("127.0.0.1", b.handle.port)
            sub.loop_start()
            try:
                assert up.wait(5)
                if cid != fetch_client_id("dev-1"):
                    assert connected[0] != 0, f"{cid}: CONNECT accepted"
                    continue
                assert connected == [0]
                done = threading.Event()
                sub.on_subscribe = lambda *_a, ev=done: ev.set()
                assert sub.subscribe(RESP, qos=1)[0] == mqtt.MQTT_ERR_SUCCESS
                assert done.wait(5)
            finally:
                sub.disconnect()
                sub.loop_stop()


def _fill(b: Broker, mib: int) -> int:
    """The bridge sends ``mib`` answers of almost the largest size to dev-1 (what a device
    makes the broker queue for itself: answers to its own requests); the broker's growth."""
    before = b.rss()
    pub = MqttConnection(b.cfg("modelward-bridge"), "bridge-filler", [])
    payload = bytes(MAX_PACKET - 4096)
    try:
        for _ in range(mib):
            pub.publish(RESP, payload, wait=True)
    finally:
        pub.close()
    return b.rss() - before


def test_offline_qos1_session_does_not_grow_the_broker(fresh_broker: Broker) -> None:
    _park_sessions(fresh_broker, 1)
    grown = _fill(fresh_broker, 160)  # ~160 MiB aimed at the parked session's queue
    print(f"broker VmRSS grew by {grown / MiB:.1f} MiB")
    assert grown < 64 * MiB, f"broker grew by {grown >> 20} MiB"


def test_many_parked_sessions_of_one_device_do_not_multiply_it(fresh_broker: Broker) -> None:
    """Attack: the device parks several sessions (other client ids are refused, the
    bound one replaces its own session)."""
    _park_sessions(fresh_broker, 4)
    grown = _fill(fresh_broker, 160)
    assert grown < 64 * MiB, f"broker grew by {grown >> 20} MiB"


@pytest.mark.parametrize("connections", [1, 4])
def test_a_subscriber_that_never_reads_does_not_grow_the_broker(
    fresh_broker: Broker, connections: int
) -> None:
    """Attack: connected, subscribed at QoS 1, and never reading or acknowledging (on
    several connections: each holds its own serialized in-flight packets)."""
    stuck = []
    body = struct.pack(">H", 7) + mqtt_str(RESP.encode()) + b"\x01"
    for _ in range(connections):  # each with the one client id its credential allows
        c = RawClient(fresh_broker, "dev-1", fetch_client_id("dev-1"), fetch_username("dev-1"))
        c.sock.sendall(b"\x82" + mqtt_varint(len(body)) + body)
        assert c.sock.recv(5) == b"\x90\x03\x00\x07\x01"
        stuck.append(c)
    try:
        grown = _fill(fresh_broker, 160)
    finally:
        for c in stuck:
            c.sock.close()
    print(f"{connections} stuck: broker VmRSS grew by {grown / MiB:.1f} MiB")
    # one connection's worth whatever the count (dynamic security binds the client id:
    # each new connection took the last one's place); without the byte bounds one
    # connection alone held all 160 MiB
    assert grown < 64 * MiB, f"broker grew by {grown >> 20} MiB"


def test_an_oversized_connect_needs_no_credentials_to_be_refused(broker: Broker) -> None:
    """Attack: anyone who reaches the port sends a 200 MiB CONNECT (password, will)."""
    ctx = ssl.create_default_context(cafile=str(broker.ca))
    raw = socket.create_connection(("127.0.0.1", broker.handle.port), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    sent, zeros = 0, bytes(MiB)
    body_len = 200 * MiB
    head = (b"\x10" + mqtt_varint(body_len) + mqtt_str(b"MQTT") + bytes([4, 0x02])
            + struct.pack(">H", 60) + struct.pack(">H", 0xFFFF))
    try:
        sock.sendall(head)
        while sent < body_len - len(head):
            sock.sendall(zeros)
            sent += len(zeros)
    except (OSError, ssl.SSLError):
        pass
    finally:
        sock.close()
    assert sent < 32 * MiB, f"the broker read {sent >> 20} MiB of a CONNECT"
    # and it still serves everyone else
    ok = device_connection(broker.cfg("dev-2"), "listen", [])
    ok.close()


def test_status_of_a_normal_size_is_still_retained(broker: Broker) -> None:
    topic = f"modelward/{FLEET}/devices/dev-2/status"
    report = os.urandom(60 * 1024)  # about modelward.trust._report.MAX_REPORT_BYTES
    dev = device_connection(broker.cfg("dev-2"), "listen", [])
    try:
        dev.publish(topic, report, retain=True, wait=True)
    finally:
        dev.close()
    seen: list[bytes] = []
    op = MqttConnection(broker.cfg("modelward-operator"), "op-2", [topic],
                        lambda m: seen.append(bytes(m.payload)))
    try:
        assert _wait(lambda: seen, 5)
    finally:
        op.close()
    assert seen == [report]
