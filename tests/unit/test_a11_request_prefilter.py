"""a11 fix: the bridge drops a request over its device's rate before paho decodes it.

The flood of one device (10,000 requests a second) reached the other devices' requests
only through the one socket they all share: paho read a packet a loop turn and decoded
each one (properties, message object, callback) before the bridge's bucket dropped it,
~94 us a request, so the socket backed up and dev-1's requests waited behind dev-2's
(8.8 -> 418 ms). Here paho's real client (modelward's subclass) reads real MQTT 5 bytes
from a stand-in socket into a real :class:`Bridge` (``connect=False``, answers recorded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.properties import Properties

from modelward.updater.transport import _pahofast
from tests._helpers import mqtt_str, mqtt_varint
from tests.unit.test_i14_bridge_paths import PREFIX, _bridge, _statuses


class _Sock:
    """What paho reads from: the bytes given, then "nothing yet"."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = memoryview(data), 0

    def recv(self, n: int) -> bytes:
        if self.pos >= len(self.data):
            raise BlockingIOError
        got = bytes(self.data[self.pos:self.pos + n])
        self.pos += len(got)
        return got

    def gettimeout(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


def _publish(device: str, corr: int, qos: int = 0, retain: bool = False,
             topic: str | None = None) -> bytes:
    props = (b"\x08" + mqtt_str(f"{PREFIX}/devices/{device}/repo/resp".encode())
             + b"\x09" + mqtt_str(corr.to_bytes(4, "big")))
    payload = json.dumps({"path": "targets/a.bin", "offset": 0, "length": 100,
                          "format": 2}).encode()
    var = mqtt_str((topic or f"{PREFIX}/repo/req/{device}").encode())
    if qos:
        var += corr.to_bytes(2, "big")  # the packet id
    var += mqtt_varint(len(props)) + props
    return bytes([0x30 | qos << 1 | retain]) + mqtt_varint(len(var) + len(payload)) + var \
        + payload


def _client(b: Any, data: bytes) -> _pahofast.Client:
    c = _pahofast.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="br",
                         protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, m: b._on_admitted(m)  # noqa: SLF001
    c.publish_filter = b._within_rate  # noqa: SLF001
    c.read_packets = 256
    c.max_incoming_packet = 20_000
    c._sock = _Sock(data)  # type: ignore[assignment]  # noqa: SLF001
    return c


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per PUBLISH whose properties paho decoded."""
    calls: list[int] = []
    real = Properties.unpack

    def unpack(self: Properties, buffer: bytes) -> Any:
        calls.append(1)
        return real(self, buffer)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(Properties, "unpack", unpack)
    return calls


def test_a11_requests_over_the_rate_are_dropped_undecoded_and_another_device_is_served(
        tmp_path: Path, decoded: list[int]) -> None:
    b, sent = _bridge(tmp_path / "repo", requests_per_s=0.001, request_burst=5)
    (tmp_path / "repo" / "targets" / "a.bin").write_bytes(b"m" * 1000)
    try:
        data = b"".join(_publish("dev-2", i) for i in range(50)) + _publish("dev-1", 999)
        c = _client(b, data)
        assert c.loop_read() == mqtt.MQTT_ERR_SUCCESS
        # one turn of the loop read them all (paho: one), and dev-1's request is answered
        assert c._sock.pos == len(data)  # type: ignore[union-attr]  # noqa: SLF001
        statuses = _statuses(sent, 6)
        assert statuses == {**dict.fromkeys(range(5), 200), 999: 200}
        # each admitted request took one token (not two), the 45 beyond were never decoded
        assert (b.stats.requests, b.stats.dropped) == (6, 45)
        assert len(decoded) == 6
    finally:
        b.close()


def test_a11_a_request_at_qos_1_dropped_by_the_filter_is_acknowledged(
        tmp_path: Path) -> None:
    b, sent = _bridge(tmp_path / "repo", requests_per_s=0.001, request_burst=1)
    try:
        c = _client(b, _publish("dev-2", 1, qos=1) + _publish("dev-2", 2, qos=1))
        c.loop_read()
        # the first is admitted (paho acknowledges it), the second dropped and acknowledged
        acks = [bytes(p["packet"]) for p in c._out_packet]  # noqa: SLF001
        assert acks.count(b"\x40\x02\x00\x02") == 1, acks
        assert b.stats.dropped == 1
    finally:
        b.close()


def test_a11_retained_and_foreign_topics_are_left_to_admission(tmp_path: Path) -> None:
    """Over its rate or not, a retained request is ignored (never answered, not counted
    as dropped), and a topic that names no device too, as before the filter."""
    b, sent = _bridge(tmp_path / "repo", requests_per_s=0.001, request_burst=1)
    (tmp_path / "repo" / "targets" / "a.bin").write_bytes(b"m" * 1000)
    try:
        data = (_publish("dev-2", 1) + _publish("dev-2", 2, retain=True)
                + _publish("dev-2", 3, topic=f"{PREFIX}/repo/req/dev-2/x")
                + _publish("dev-2", 4, topic=f"{PREFIX}/repo/req/\u00e9\u0301"))
        c = _client(b, data)
        c.loop_read()
        assert _statuses(sent, 1) == {1: 200}
        assert (b.stats.requests, b.stats.dropped) == (1, 0)
    finally:
        b.close()


def test_a11_a_filter_that_raises_keeps_the_message_and_the_thread(tmp_path: Path) -> None:
    b, sent = _bridge(tmp_path / "repo")
    (tmp_path / "repo" / "targets" / "a.bin").write_bytes(b"m" * 1000)
    try:
        c = _client(b, _publish("dev-2", 1) + _publish("dev-2", 2))

        def boom(_t: bytes, _r: bool) -> bool:
            raise RuntimeError("filter bug")

        c.publish_filter = boom
        assert c.loop_read() == mqtt.MQTT_ERR_SUCCESS
        # kept: admitted without its token taken by the filter (the connection's path)
        assert _statuses(sent, 2) == {1: 200, 2: 200}
    finally:
        b.close()


def test_a11_a_message_whose_token_the_filter_did_not_take_is_charged_at_admission(
        tmp_path: Path) -> None:
    """Only the token the filter took for that very device is not taken again: a message
    it passed untaken (here: it saw another topic than paho decoded) still pays."""
    b, sent = _bridge(tmp_path / "repo", requests_per_s=0.001, request_burst=2)
    (tmp_path / "repo" / "targets" / "a.bin").write_bytes(b"m" * 1000)
    try:
        c = _client(b, b"".join(_publish("dev-2", i) for i in range(5)))
        c.publish_filter = lambda _t, _r: True  # passes every message, takes no token
        c.loop_read()
        assert _statuses(sent, 2) == {0: 200, 1: 200}
        assert (b.stats.requests, b.stats.dropped) == (2, 3)
    finally:
        b.close()
