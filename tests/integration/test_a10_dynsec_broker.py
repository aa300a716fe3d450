"""a10-dynsec: one device's credentials (both identities) and a careless operator against
real mosquitto started with the dynamic-security configuration `fleet broker-config` wrote.

Worked (fixed): ``check_id`` accepts a trailing newline (``publisher/_broker_config.py``
``_ID``, see ``tests/unit/test_a10_broker_config_ids.py``): broker-config writes a client
``dev-1\\n`` with its credential file, which mosquitto can never authenticate (a control
character in the username: the CONNECT ends in a protocol error).

Resisted (passing tests, coverage):

* a CONNECT that would take over another identity's session before authenticating: no
  username with dev-2's listener id (MQTT 3.1.1 and 5), dev-2's username with a wrong
  password, dev-1's password under dev-2's username; usernames differing in case, with a
  trailing NUL, ``dev-1:fetch:fetch``, a client id with a NUL; an empty client id (MQTT 5,
  clean start 0 or 1: mosquitto assigns one, which is not the bound id). Each is refused
  (CONNACK 5 / 0x87 / 0x86, or a protocol error) and dev-2's listener stays connected;
* 20 SUBSCRIBEs of a 65,000-``/`` filter (the 2.0.11 topic-tree CPU issue): the first
  ends the connection as malformed, no CPU spent;
* 3,000 SUBSCRIBE/UNSUBSCRIBE pairs of the listener's own announcement filter: no growth;
* mosquitto never writes the dynamic-security file back (it would on a ``$CONTROL``
  command, which no client may send): after a refused ``createClient`` and a shutdown
  the file is byte for byte the one broker-config wrote, still 0600;
* ``createClient`` on ``$CONTROL/dynamic-security/v1`` over MQTT 3.1.1 (QoS 0, 1,
  retained; 3.1.1 has no refusal code, the PUBACK comes anyway): no client is created;
* the listener's retained will on the admin topic, its own fetcher's request topic or the
  announcement is never published (the same will on its own status is: the control).
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelward.publisher._broker_config import write_broker_config
from modelward.publisher.errors import OperatorInputError
from modelward.simulator._broker import start_broker, stop_broker
from modelward.simulator._pki import CertPair
from modelward.updater.errors import TransportError
from modelward.updater.transport._mqttconn import device_connection
from tests._helpers import mqtt_str as _s
from tests._helpers import mqtt_varint as _varint
from tests.integration.test_a14_device_props import _recv_packet
from tests.integration.test_i14_broker import FLEET, Broker, MiB, _broker

T = f"modelward/{FLEET}"


@pytest.fixture
def fresh_broker(tmp_path: Path, pki: tuple[CertPair, CertPair]) -> Iterator[Broker]:
    yield from _broker(tmp_path, pki)


def _connect(b: Broker, login: bytes | None, pw: bytes | None, cid: bytes,
             level: int = 4, clean: bool = True) -> tuple[ssl.SSLSocket, bytes]:
    """Raw CONNECT (MQTT 3.1.1 or 5); the socket and the CONNACK (b"" if the broker
    closed the connection instead)."""
    ctx = ssl.create_default_context(cafile=str(b.ca))
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", b.handle.port), 10),
                        server_hostname="127.0.0.1")
    flags = (0x02 if clean else 0) | (0x80 if login is not None else 0) \
        | (0x40 if pw is not None else 0)
    body = _s(b"MQTT") + bytes([level, flags]) + struct.pack(">H", 60) \
        + (b"\x00" if level == 5 else b"") + _s(cid) \
        + (_s(login) if login is not None else b"") + (_s(pw) if pw is not None else b"")
    try:
        s.sendall(b"\x10" + _varint(len(body)) + body)
        ack = _recv_packet(s)
    except (OSError, IndexError):
        ack = b""
    return s, ack


def _accepted(ack: bytes) -> bool:
    return len(ack) >= 3 and ack[0] == 0x20 and ack[2] == 0  # head, flags, code


def _cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def test_a10_no_connect_takes_another_identitys_session(fresh_broker: Broker) -> None:
    b = fresh_broker
    pw1 = b.creds["dev-1"].read_text().strip().encode()
    got: list[bytes] = []
    dev2 = device_connection(b.cfg("dev-2"), "listen", [f"{T}/announce"],
                             lambda m: got.append(bytes(m.payload)))
    tries: list[tuple[bytes | None, bytes | None, bytes, int, bool]] = [
        (None, None, b"dev-2-listen", 4, True),
        (None, None, b"dev-2-listen", 5, True),
        (b"dev-2", b"not-the-password", b"dev-2-listen", 4, True),
        (b"dev-2", pw1, b"dev-2-listen", 5, False),
        (b"DEV-1", pw1, b"DEV-1-listen", 4, True),
        (b"DEV-1", pw1, b"dev-1-listen", 4, True),
        (b"dev-1\x00", pw1, b"dev-1-listen", 4, True),
        (b"dev-1:fetch:fetch", pw1, b"dev-1-fetch", 4, True),
        (b"dev-1", pw1, b"dev-1-listen\x00", 4, True),
        (b"dev-1", pw1, b"", 5, False),
        (b"dev-1", pw1, b"", 5, True),
        (b"dev-1", pw1, b"", 4, False),
    ]
    try:
        for login, pw, cid, level, clean in tries:
            s, ack = _connect(b, login, pw, cid, level, clean)
            s.close()
            assert not _accepted(ack), (login, cid, level, clean, ack.hex())
        time.sleep(0.3)
        assert not dev2.lost.is_set()
        # dev-2's listener still receives the announcement
        from modelward.updater.transport._mqttconn import MqttConnection

        op = MqttConnection(b.cfg("modelward-operator"), "op-a10", [])
        try:
            op.publish(f"{T}/announce", b'{"timestamp_version": 3}', wait=True)
        finally:
            op.close()
        end = time.monotonic() + 5
        while not got and time.monotonic() < end:
            time.sleep(0.02)
        assert got == [b'{"timestamp_version": 3}']
    finally:
        dev2.close()


def test_a10_deep_filters_and_subscribe_churn_cost_the_broker_nothing(
        fresh_broker: Broker) -> None:
    b = fresh_broker
    pw1 = b.creds["dev-1"].read_text().strip().encode()
    s, ack = _connect(b, b"dev-1", pw1, b"dev-1-listen")
    assert _accepted(ack)
    cpu0 = _cpu(b.handle.pid)
    try:
        for i in range(20):
            var = struct.pack(">H", i + 1) + _s(b"/" * 65000) + b"\x00"
            s.sendall(b"\x82" + _varint(len(var)) + var)
        _recv_packet(s)
    except (OSError, IndexError):
        pass  # mosquitto ends the connection
    finally:
        s.close()
    assert _cpu(b.handle.pid) - cpu0 < 0.5
    s, ack = _connect(b, b"dev-1", pw1, b"dev-1-listen")
    assert _accepted(ack)
    before, cpu0 = b.rss(), _cpu(b.handle.pid)
    try:
        topic = _s(f"{T}/announce".encode())
        for i in range(3000):
            mid = struct.pack(">H", i % 60000 + 1)
            s.sendall(b"\x82" + _varint(len(mid + topic) + 1) + mid + topic + b"\x01")
            s.sendall(b"\xa2" + _varint(len(mid + topic)) + mid + topic)
        time.sleep(1.0)
    finally:
        s.close()
    assert b.rss() - before < 2 * MiB
    assert _cpu(b.handle.pid) - cpu0 < 2.0


def test_a10_mosquitto_never_rewrites_the_dynsec_file(tmp_path: Path,
                                                      pki: tuple[CertPair, CertPair]) -> None:
    ca, server = pki
    bc = write_broker_config(FLEET, ["dev-1", "dev-2"], tmp_path / "bc")
    written = hashlib.sha256(bc.dynsec.read_bytes()).digest()
    st = bc.dynsec.stat()
    h = start_broker(tmp_path / "broker", server, ca.cert, bc.conf)
    try:
        b = Broker(h, ca.cert, bc.credentials)
        for identity in ("listen", "fetch"):
            conn = device_connection(b.cfg("dev-1"), identity, [])
            try:
                with pytest.raises(TransportError, match="refused the publish"):
                    conn.publish("$CONTROL/dynamic-security/v1",
                                 b'{"commands": [{"command": "createClient", '
                                 b'"username": "x", "password": "x"}]}', wait=True)
            finally:
                conn.close()
        time.sleep(0.3)
    finally:
        stop_broker(tmp_path / "broker")
    assert hashlib.sha256(bc.dynsec.read_bytes()).digest() == written
    after = bc.dynsec.stat()  # the file broker-config wrote (0640 root:mosquitto as root)
    assert (after.st_ino, after.st_mode, after.st_uid, after.st_gid) == \
        (st.st_ino, st.st_mode, st.st_uid, st.st_gid)
    assert after.st_mode & 0o777 in (0o600, 0o640)
    assert not list(bc.dynsec.parent.glob("dynamic-security.json?*"))  # no .new left


def test_a10_every_identity_broker_config_writes_can_log_in(
        tmp_path: Path, pki: tuple[CertPair, CertPair]) -> None:
    ca, server = pki
    try:
        bc = write_broker_config(FLEET, ["dev-1", "dev-1\n"], tmp_path / "bc")
    except OperatorInputError:  # refusing the id is the other correct outcome
        return
    h = start_broker(tmp_path / "broker", server, ca.cert, bc.conf)
    try:
        b = Broker(h, ca.cert, bc.credentials)
        for dev in ("dev-1", "dev-1\n"):
            s, ack = _connect(b, dev.encode(), bc.credentials[dev].read_text().strip()
                              .encode(), f"{dev}-listen".encode())
            s.close()
            assert _accepted(ack), (dev, ack.hex())
    finally:
        stop_broker(tmp_path / "broker")


@pytest.mark.parametrize("identity", ["listen", "fetch"])
def test_a10_control_commands_over_mqtt_311_change_nothing(fresh_broker: Broker,
                                                           identity: str) -> None:
    """MQTT 3.1.1 has no refusal codes: a denied PUBLISH is acknowledged and dropped. A
    device's ``createClient`` on ``$CONTROL/dynamic-security/v1`` (QoS 0, 1, retained)
    must still create nothing."""
    b = fresh_broker
    pw = b.creds["dev-1"].read_text().strip().encode()
    login, cid = (b"dev-1", b"dev-1-listen") if identity == "listen" else \
        (b"dev-1:fetch", b"dev-1-fetch")
    s, ack = _connect(b, login, pw, cid)
    assert _accepted(ack)
    try:
        for n, (qos, retain) in enumerate([(0, False), (1, False), (1, True)]):
            user = f"evil{n}".encode()
            cmd = (b'{"commands": [{"command": "createClient", "username": "' + user
                   + b'", "password": "evil", "roles": [{"rolename": "modelward-bridge"}]}]}')
            var = _s(b"$CONTROL/dynamic-security/v1") \
                + (struct.pack(">H", n + 1) if qos else b"") + cmd
            s.sendall(bytes([0x30 | qos << 1 | int(retain)]) + _varint(len(var)) + var)
            if qos:
                assert _recv_packet(s)[:1] == b"\x40"  # PUBACK (3.1.1: dropped silently)
        time.sleep(0.3)
    finally:
        s.close()
    for n in range(3):
        e, ack = _connect(b, f"evil{n}".encode(), b"evil", f"evil{n}".encode())
        e.close()
        assert not _accepted(ack), n


@pytest.mark.parametrize("topic", ["$CONTROL/dynamic-security/v1", f"{T}/repo/req/dev-1",
                                   f"{T}/announce", f"{T}/devices/dev-1/status"])
def test_a10_the_listeners_will_crosses_no_identity(fresh_broker: Broker, topic: str) -> None:
    """dev-1's listener sets a retained QoS 1 will on a topic only another identity may
    write (the broker's admin topic: a ``createClient`` with the bridge's role; its own
    fetcher's request topic; the operator's announcement) and drops the connection: the
    will is never published (nothing retained, no client created). The control: the same
    will on its own status topic is published and retained."""
    b = fresh_broker
    pw = b.creds["dev-1"].read_text().strip().encode()
    will = (b'{"commands": [{"command": "createClient", "username": "evil", '
            b'"password": "evil", "roles": [{"rolename": "modelward-bridge"}]}]}')
    ctx = ssl.create_default_context(cafile=str(b.ca))
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", b.handle.port), 10),
                        server_hostname="127.0.0.1")
    flags = 0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02  # user, pw, will retain+QoS 1, clean
    body = (_s(b"MQTT") + bytes([4, flags]) + struct.pack(">H", 60) + _s(b"dev-1-listen")
            + _s(topic.encode()) + _s(will) + _s(b"dev-1") + _s(pw))
    try:
        s.sendall(b"\x10" + _varint(len(body)) + body)
        ack = _recv_packet(s)
    except (OSError, IndexError):
        ack = b""
    s.close()  # no DISCONNECT: the will is due now
    time.sleep(0.5)
    e, eack = _connect(b, b"evil", b"evil", b"evil")
    e.close()
    assert not _accepted(eack)
    if topic.startswith("$"):
        return
    # what a new subscriber of the topic finds retained: nothing
    from modelward.updater.transport._mqttconn import MqttConnection

    got: list[bytes] = []
    user = {"repo": "modelward-bridge", "devi": "modelward-operator"}.get(
        topic.split("/")[2][:4], "dev-2")
    reader = (MqttConnection(b.cfg(user), "a10-reader", [topic],
                             lambda m: got.append(bytes(m.payload)))
              if user != "dev-2" else
              device_connection(b.cfg(user), "listen", [topic],
                                lambda m: got.append(bytes(m.payload))))
    time.sleep(0.5)
    reader.close()
    assert _accepted(ack) or ack == b""
    assert got == ([will] if topic.endswith("dev-1/status") else []), got
