"""Attack 14, real mosquitto with the generated config: what one device's credentials can
do to other devices' topics through MQTT features the ACL file must also cover.

Worked (strict xfail): a shared subscription in the bridges' group
(``$share/modelward-bridges/<fleet>/repo/req/+``, the group name is fixed in
``publisher/_bridge.py``) is granted (SUBACK QoS 1) although the device may read no
request topic. mosquitto then hands the device its round-robin share of every other
device's requests, finds on delivery that the ACL denies it, and drops them: with one such
connection half of dev-2's requests never reach the bridge; with N connections (mosquitto
cannot bound them per user) N/(N+1) of the fleet's requests are lost.

Worked (strict xfail): ``max_queued_bytes`` counts payload bytes, not properties. A
QoS 1 PUBLISH with an empty payload and ~200,000 empty user properties (1 MiB, inside
``max_packet_size``) queued for the device's own parked session costs mosquitto ~12 MiB
(one allocation per property): 20 of them grew it by 245 MiB, 40 by 489 MiB, linearly, up
to ``max_queued_messages`` 4096 (~49 GiB).

Worked (until dynamic security): subscriptions were not bounded and not checked against
the ACL at SUBSCRIBE: mosquitto's ``acl_file`` granted (SUBACK 0) any filter, even
``x/...`` that matches no topic the device may read, and kept it. 100 filters of 60 KB on
one connection grew it by ~12 MiB, linearly.

Fixed (issue 14, f14-broker): the bridges' group is now a secret derived from the bridge's
credential (``publisher._bridge.share_group``; this file's bridge client uses it, dev-1
the old constant); a device reads no topic it writes, and ``max_queued_messages`` is 24
(it was ``max(64, devices + 16)``; a10-dynsec made it a constant). Fixed (dynsec):
``broker-config`` configures mosquitto's dynamic-security plugin: every SUBSCRIBE is
checked (default deny; a device's listener may subscribe only the announcement, its
fetcher only its own response topic), so a filter outside them is refused in the SUBACK
and costs nothing kept; each device identity may connect with one client id only (not
another device's, not a bridge's); no device may subscribe ``$share/...`` or
``$CONTROL/#`` or publish on ``$CONTROL/dynamic-security/...``.

Resisted (passing tests, coverage):

* a will message on another device's status topic (retained, empty: it would clear that
  device's report) is accepted at CONNECT but never published: the report stays;
* wildcard subscriptions (``#``, ``devices/+/status``, ...) deliver nothing of another
  device.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from modelward.publisher._bridge import share_group
from modelward.simulator._pki import CertPair
from modelward.updater._config import fetch_client_id, fetch_username, listen_client_id
from modelward.updater.errors import TransportError
from modelward.updater.transport._mqttconn import MqttConnection, device_connection
from tests._helpers import mqtt_str as _s
from tests._helpers import mqtt_varint as _varint
from tests.integration.test_a14_device_props import _recv_packet
from tests.integration.test_i14_broker import (
    FLEET,
    Broker,
    MiB,
    _broker,
    _park_sessions,
)

T = f"modelward/{FLEET}"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory,
           pki: tuple[CertPair, CertPair]) -> Iterator[Broker]:
    yield from _broker(tmp_path_factory.mktemp("a14device"), pki)


SERVICES = ("modelward-bridge", "modelward-operator")


def _login(user: str, identity: str) -> tuple[str, str]:
    """(username, client id): a device's bound ids, a service's own choice."""
    if user in SERVICES:
        return user, f"{user}-{identity}-{time.monotonic_ns()}"
    if identity == "fetch":
        return fetch_username(user), fetch_client_id(user)
    return user, listen_client_id(user)


def _client(b: Broker, user: str, identity: str = "listen",
            cid: str | None = None) -> mqtt.Client:
    login, bound = _login(user, identity)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid or bound,
                    protocol=mqtt.MQTTv5)
    c.username_pw_set(login, b.creds[user].read_text().strip())
    c.tls_set(ca_certs=str(b.ca))
    c.connect("127.0.0.1", b.handle.port, 30)
    c.loop_start()
    return c


def _publish(b: Broker, user: str, topic: str, payload: bytes, retain: bool) -> None:
    c = _client(b, user, "pub")
    try:
        c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def _collect(b: Broker, user: str, sub: str, seconds: float = 0.7,
             identity: str = "sub") -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    c = _client(b, user, identity)
    c.on_message = lambda _c, _u, m: got.append((m.topic, bytes(m.payload)))
    try:
        c.subscribe(sub, qos=1)
        time.sleep(seconds)
    finally:
        c.disconnect()
        c.loop_stop()
    return got


def test_a_will_on_another_devices_status_is_refused(broker: Broker) -> None:
    _publish(broker, "dev-2", f"{T}/devices/dev-2/status", b"dev-2 report", retain=True)
    ctx = ssl.create_default_context(cafile=str(broker.ca))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", broker.handle.port), 10),
                           server_hostname="127.0.0.1")
    pw = broker.creds["dev-1"].read_text().strip().encode()
    # MQTT 3.1.1 CONNECT: user, password, will retain, will QoS 1, will flag, clean session
    flags = 0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02
    body = (_s(b"MQTT") + bytes([4, flags]) + struct.pack(">H", 60) + _s(b"dev-1-listen")
            + _s(f"{T}/devices/dev-2/status".encode()) + _s(b"") + _s(b"dev-1") + _s(pw))
    try:
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        ack = sock.recv(4)
        sock.close()  # not a DISCONNECT: the will would be published now
    except OSError:
        ack = b""
    assert ack[:1] in (b"\x20", b"")  # mosquitto 2 accepts the CONNECT, checks on publish
    time.sleep(0.3)
    assert _collect(broker, "modelward-operator", f"{T}/devices/dev-2/status") == \
        [(f"{T}/devices/dev-2/status", b"dev-2 report")]


def test_a_shared_subscription_in_the_bridges_group_takes_no_request(broker: Broker) -> None:
    got: list[str] = []
    granted: list[int] = []
    ready = threading.Event()
    thief = _client(broker, "dev-1", "fetch")

    def on_sub(_c: object, _u: object, _m: object, rcs: list[object], _p: object) -> None:
        granted.extend(int(getattr(rc, "value", rc)) for rc in rcs)
        ready.set()

    thief.on_subscribe = on_sub
    thief.on_message = lambda _c, _u, m: got.append(m.topic)
    bridge = _client(broker, "modelward-bridge", "real")
    seen: list[str] = []
    bridge.on_message = lambda _c, _u, m: seen.append(m.topic)
    try:
        # the real bridges' group is a secret (share_group); dev-1 tries the old constant
        group = share_group(broker.cfg("modelward-bridge"))
        assert group != "modelward-bridges"
        bridge.subscribe(f"$share/{group}/{T}/repo/req/+", qos=1)
        thief.subscribe(f"$share/modelward-bridges/{T}/repo/req/+", qos=1)
        assert ready.wait(10)
        time.sleep(0.2)
        dev2 = _client(broker, "dev-2", "fetch")
        try:
            p = Properties(PacketTypes.PUBLISH)
            p.CorrelationData = b"c"
            for _ in range(10):
                dev2.publish(f"{T}/repo/req/dev-2", b"{}", qos=1,
                             properties=p).wait_for_publish(10)
        finally:
            dev2.disconnect()
            dev2.loop_stop()
        end = time.monotonic() + 5
        while len(seen) < 10 and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        for c in (thief, bridge):
            c.disconnect()
            c.loop_stop()
    assert got == []
    assert granted == [0x87], granted  # dynamic security: Not authorized, nothing kept
    assert len(seen) == 10, (granted, len(seen))


@pytest.mark.parametrize("identity", ["listen", "fetch"])
@pytest.mark.parametrize("sub", ["#", f"{T}/#", f"{T}/devices/+/status",
                                 f"{T}/devices/+/repo/resp", f"{T}/repo/req/+"])
def test_wildcard_subscriptions_deliver_nothing_of_another_device(broker: Broker,
                                                                   sub: str,
                                                                   identity: str) -> None:
    _publish(broker, "dev-2", f"{T}/devices/dev-2/status", b"dev-2 report", retain=True)
    got = _collect(broker, "dev-1", sub, 0.5, identity)
    assert not [t for t, _ in got if "dev-2" in t], got


@pytest.fixture
def fresh_broker(tmp_path: Path, pki: tuple[CertPair, CertPair]) -> Iterator[Broker]:
    yield from _broker(tmp_path, pki)


def _publish_property_packets(b: Broker, n_msgs: int, n_props: int = 200_000) -> int:
    """Raw MQTT 5 as dev-1: ``n_msgs`` QoS 1 PUBLISHes on its own status topic, empty
    payload, ``n_props`` empty user properties each; the number acknowledged."""
    ctx = ssl.create_default_context(cafile=str(b.ca))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", b.handle.port), 20),
                           server_hostname="127.0.0.1")
    pw = b.creds["dev-1"].read_text().strip().encode()
    body = (_s(b"MQTT") + bytes([5, 0xC2]) + struct.pack(">H", 60) + b"\x00"
            + _s(b"dev-1-listen") + _s(b"dev-1") + _s(pw))
    acks = 0
    try:
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        assert _recv_packet(sock)[2] == 0
        props = b"\x26\x00\x00\x00\x00" * n_props
        topic = f"{T}/devices/dev-1/status".encode()
        for i in range(n_msgs):
            var = _s(topic) + struct.pack(">H", i + 1) + _varint(len(props)) + props
            sock.sendall(b"\x32" + _varint(len(var)) + var)
            acks += _recv_packet(sock)[0] == 0x40
    except OSError:
        pass
    finally:
        sock.close()
    return acks


def test_property_only_packets_for_a_parked_session_do_not_grow_the_broker(
        fresh_broker: Broker) -> None:
    _park_sessions(fresh_broker, 1)
    before = fresh_broker.rss()
    _publish_property_packets(fresh_broker, 12)
    time.sleep(0.3)
    grown = fresh_broker.rss() - before
    assert grown < 64 * MiB, f"broker grew by {grown >> 20} MiB for 12 MiB sent"


@pytest.mark.parametrize("identity", ["listen", "fetch"])
def test_subscriptions_outside_the_acl_do_not_grow_the_broker(fresh_broker: Broker,
                                                              identity: str) -> None:
    b = fresh_broker
    ctx = ssl.create_default_context(cafile=str(b.ca))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", b.handle.port), 20),
                           server_hostname="127.0.0.1")
    pw = b.creds["dev-1"].read_text().strip().encode()
    login, cid = _login("dev-1", identity)
    body = (_s(b"MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 60) + _s(cid.encode())
            + _s(login.encode()) + _s(pw))
    codes: list[int] = []
    try:
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        assert _recv_packet(sock) == b"\x20\x00\x00"
        before = b.rss()
        for i in range(100):
            var = struct.pack(">H", i + 1) + _s(f"x/{i}/".encode() + b"a" * 60000) + b"\x00"
            sock.sendall(b"\x82" + _varint(len(var)) + var)
        codes = [_recv_packet(sock)[-1] for _ in range(100)]
        time.sleep(0.2)
        grown = b.rss() - before
    finally:
        sock.close()
    assert grown < 3 * MiB, f"broker grew by {grown / MiB:.1f} MiB; SUBACK codes {set(codes)}"
    assert set(codes) == {0x80}, set(codes)  # MQTT 3.1.1: every filter refused


# --- dynamic security: client ids, identities, $share and $CONTROL ------------------


def _connect_code(b: Broker, login: str, password_of: str, cid: str) -> int:
    """Raw MQTT 3.1.1 CONNECT; the CONNACK return code (0 accepted, 5 not authorised)."""
    ctx = ssl.create_default_context(cafile=str(b.ca))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", b.handle.port), 10),
                           server_hostname="127.0.0.1")
    pw = b.creds[password_of].read_text().strip().encode()
    body = (_s(b"MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 60) + _s(cid.encode())
            + _s(login.encode()) + _s(pw))
    try:
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        ack = _recv_packet(sock)
    finally:
        sock.close()
    assert ack[0] == 0x20 and len(ack) == 3, ack  # CONNACK: flags, return code
    return ack[2]


def test_a_device_cannot_take_another_devices_or_the_bridges_client_id(
        broker: Broker) -> None:
    got: list[bytes] = []
    dev2 = device_connection(broker.cfg("dev-2"), "listen", [f"{T}/announce"],
                             lambda m: got.append(bytes(m.payload)))
    bridge = MqttConnection(broker.cfg("modelward-bridge"), "modelward-bridge-4242-1", [])
    try:
        for cid in ["dev-2", listen_client_id("dev-2"), fetch_client_id("dev-2"),
                    "modelward-bridge-4242-1", "dev-1", f"dev-1-listen-{1}", ""]:
            for login in ("dev-1", fetch_username("dev-1")):
                assert _connect_code(broker, login, "dev-1", cid) == 5, (login, cid)
        # a fetcher's password on the listener's id (and back) is refused too
        assert _connect_code(broker, "dev-1", "dev-1", fetch_client_id("dev-1")) == 5
        assert _connect_code(broker, fetch_username("dev-1"), "dev-1",
                             listen_client_id("dev-1")) == 5
        # dev-2 and the bridge were never disconnected, and still work
        assert not dev2.lost.is_set() and not bridge.lost.is_set()
        op = MqttConnection(broker.cfg("modelward-operator"), "op-ann", [])
        try:
            op.publish(f"{T}/announce", b'{"timestamp_version": 7}', wait=True)
        finally:
            op.close()
        end = time.monotonic() + 5
        while not got and time.monotonic() < end:
            time.sleep(0.02)
        assert got == [b'{"timestamp_version": 7}']
        bridge.publish(f"{T}/devices/dev-2/repo/resp", b"x", wait=True)
    finally:
        dev2.close()
        bridge.close()
    # with its own bound id dev-1 still connects
    assert _connect_code(broker, "dev-1", "dev-1", listen_client_id("dev-1")) == 0


def test_the_listener_identity_cannot_read_the_response_topic(broker: Broker) -> None:
    listener = device_connection(broker.cfg("dev-1"), "listen", [])
    try:
        with pytest.raises(TransportError, match="refused the subscription"):
            listener.subscribe(f"{T}/devices/dev-1/repo/resp")
        with pytest.raises(TransportError, match="refused the publish"):
            listener.publish(f"{T}/repo/req/dev-1", b"{}", wait=True)
    finally:
        listener.close()
    fetcher = device_connection(broker.cfg("dev-1"), "fetch", [])
    try:
        fetcher.subscribe(f"{T}/devices/dev-1/repo/resp")  # what the fetcher is for
        for topic in (f"{T}/announce", f"{T}/devices/dev-2/repo/resp"):
            with pytest.raises(TransportError, match="refused the subscription"):
                fetcher.subscribe(topic)
        with pytest.raises(TransportError, match="refused the publish"):
            fetcher.publish(f"{T}/devices/dev-1/status", b"{}", retain=True, wait=True)
    finally:
        fetcher.close()


@pytest.mark.parametrize("identity", ["listen", "fetch"])
def test_control_and_shared_filters_are_refused_to_a_device(broker: Broker,
                                                            identity: str) -> None:
    conn = device_connection(broker.cfg("dev-1"), identity, [])
    try:
        group = share_group(broker.cfg("modelward-bridge"))
        for topic in (f"$share/{group}/{T}/repo/req/+", f"$share/g/{T}/announce",
                      f"$share/g/{T}/devices/dev-1/repo/resp", "$CONTROL/#",
                      "$CONTROL/dynamic-security/v1/response", "$SYS/#"):
            with pytest.raises(TransportError, match="refused the subscription"):
                conn.subscribe(topic)
        # a command that would make dev-1 an administrator of the broker
        cmd = (b'{"commands": [{"command": "createClient", "username": "evil", '
               b'"password": "evil", "roles": [{"rolename": "modelward-bridge"}]}]}')
        with pytest.raises(TransportError, match="refused the publish"):
            conn.publish("$CONTROL/dynamic-security/v1", cmd, wait=True)
    finally:
        conn.close()
    time.sleep(0.2)
    ctx = ssl.create_default_context(cafile=str(broker.ca))
    evil = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="evil", protocol=mqtt.MQTTv5)
    evil.username_pw_set("evil", "evil")
    evil.tls_set_context(ctx)
    codes: list[int] = []
    evil.on_connect = lambda _c, _u, _f, rc, _p: codes.append(int(rc.value))
    evil.connect("127.0.0.1", broker.handle.port, 30)
    evil.loop_start()
    end = time.monotonic() + 5
    while not codes and time.monotonic() < end:
        time.sleep(0.02)
    evil.disconnect()
    evil.loop_stop()
    assert codes and codes[0] != 0, "the client dev-1 asked for exists"


def test_bridges_still_share_one_group_under_dynamic_security(broker: Broker) -> None:
    group = share_group(broker.cfg("modelward-bridge"))
    seen: list[list[str]] = [[], []]
    bridges = [MqttConnection(broker.cfg("modelward-bridge"), f"bridge-share-{i}",
                              [f"$share/{group}/{T}/repo/req/+"],
                              lambda m, i=i: seen[i].append(m.topic)) for i in range(2)]
    dev2 = device_connection(broker.cfg("dev-2"), "fetch", [])
    try:
        p = Properties(PacketTypes.PUBLISH)
        p.CorrelationData = b"c"
        for _ in range(10):
            dev2.publish(f"{T}/repo/req/dev-2", b"{}", p, wait=True)
        end = time.monotonic() + 5
        while len(seen[0]) + len(seen[1]) < 10 and time.monotonic() < end:
            time.sleep(0.02)
    finally:
        dev2.close()
        for c in bridges:
            c.close()
    assert len(seen[0]) + len(seen[1]) == 10  # each request once, to one bridge
    assert seen[0] and seen[1], [len(x) for x in seen]  # round-robin: both got some
