"""Fixes of attack 17 on MQTT spans, and what the same attacker tries next.

(1) Messages a request: a span's blocks are at least ``MIN_SPAN_BLOCK`` (or the bridge's
block), and the blocks of a span beyond those its bytes need at the bridge's block size
cost a request token each, so a device's messages a second stay within its requests a
second plus its bytes a second over the bridge's block, as before spans. (2) One device's
share of the send queue: its unacknowledged answers cannot hold the count every other
device's next block waits on. (3) The device bounds busy answers per block, across
re-requests and the span->singles downgrade.
"""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from tuf.api import exceptions as tuf_exc

from modelward.publisher import _bridge as bridge_mod
from modelward.publisher._bridge import Bridge
from modelward.publisher._fairness import (
    MIN_SPAN_BLOCK,
    BridgeLimits,
    Scheduler,
    SendQueue,
    extra_messages,
    parse_request,
)
from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqtt import block_header
from tests.unit.test_i16_mqtt_spans import BS, _ask, _get, _hdr, _req, _stack

MIB = 1 << 20


def test_a_span_s_block_is_raised_to_the_floor() -> None:
    assert parse_request(_req(length=16, block=1), MIB, "r").block == MIN_SPAN_BLOCK
    r = parse_request(_req(length=16 * MIN_SPAN_BLOCK, block=7), MIB, "r")
    assert (r.block, r.length) == (MIN_SPAN_BLOCK, 16 * MIN_SPAN_BLOCK)
    assert parse_request(_req(length=64, block=1), 64, "r").block == 64  # (bridge's block)
    assert parse_request(_req(length=MIB, block=MIB), MIB, "r").block == MIB


def test_extra_messages_of_a_span() -> None:
    assert extra_messages(8 * MIB, 8, MIB) == 0  # an honest span: one token
    assert extra_messages(100, 1, MIB) == 0
    assert extra_messages(16 * 4096, 16, MIB) == 15
    assert extra_messages(8 * 4096, 8, 4 * 4096) == 6


def test_small_block_spans_cost_request_tokens_and_refusals_give_them_back() -> None:
    lim = BridgeLimits(requests_per_s=50, request_burst=100, bytes_per_s=MIB,
                       byte_burst=MIB, device_queue=10**6)
    s: Scheduler[str] = Scheduler(lim)
    n = 0
    while s.offer("a", f"s{n}", 16 * 4096, 0.0, 16, 15) is None:
        n += 1
    assert n == 6  # 6 * 15 of the 100 tokens (the requests' own not taken here)
    assert s.offer("a", "x", 16 * 4096, 0.0, 16, 15) == (
        429, "over 50 requests/s (16 blocks count as 16 requests)")
    # the byte bucket refuses: the request tokens are given back
    t: Scheduler[str] = Scheduler(lim)
    assert t.offer("b", "big", 2 * MIB, 0.0, 16, 14) == (429, f"over {MIB} bytes/s")
    assert t._devices["b"].requests.tokens == 100  # noqa: SLF001
    assert t.offer("b", "honest", MIB, 0.0, 1, 0) is None  # (1 MiB blocks: nothing extra)


class _Capture:
    def __init__(self, b: Bridge) -> None:
        self.sent: list[bytes] = []
        self.lock = threading.Lock()
        b._send = self  # type: ignore[method-assign]  # noqa: SLF001

    def __call__(self, topic: str, data: bytes, props: Any) -> None:
        with self.lock:
            self.sent.append(data)


def test_spans_of_floor_sized_blocks_are_bounded_by_the_request_rate(
        tmp_path: Path) -> None:
    """The next attack: spans of 16 blocks at the floor (4 KiB) against a bridge of 1 MiB
    blocks, at the default limits: the messages stay within the request tokens."""
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "f").write_bytes(b"y" * (1 << 20))
    b = Bridge(tmp_path, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
               limits=BridgeLimits(device_queue=10**4), connect=False)
    cap = _Capture(b)
    t0 = time.monotonic()
    try:
        for i in range(100):
            _ask(b, "evil", _req(path="metadata/f", offset=(i % 16) * 16 * 4096,
                                 length=16 * 4096, block=4096),
                 corr=struct.pack(">8sQ", b"e" * 8, i))
        end = time.monotonic() + 5
        while b._sched.queued("evil") and time.monotonic() < end:  # noqa: SLF001
            time.sleep(0.01)
        took = time.monotonic() - t0
    finally:
        b.close()
    blocks = [d for d in cap.sent if _hdr(d)[0] == 200]
    # Tokens: the burst (100) and 50 a second since; each span of 16 costs 16.
    assert len(blocks) <= 100 + 50 * took + 16, (len(blocks), took)
    assert any(_hdr(d)[0] == 429 for d in cap.sent)


class _Client:
    """paho's publish: the broker acknowledges at once except what goes to ``stalled``."""

    def __init__(self, stalled: str) -> None:
        self.stalled = stalled
        self.sent: list[str] = []
        self._mid = 0
        self.lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, qos: int = 0,
                properties: Any = None) -> mqtt.MQTTMessageInfo:
        with self.lock:
            self._mid += 1
            info = mqtt.MQTTMessageInfo(self._mid)
            info.rc = mqtt.MQTT_ERR_SUCCESS
            dev = topic.split("/")[3]
            if dev != self.stalled:
                info._set_as_published()  # noqa: SLF001
            self.sent.append(dev)
            return info


@pytest.mark.parametrize("kind", ["format2", "span"])
def test_a_device_whose_answers_are_never_acknowledged_holds_only_its_share(
        tmp_path: Path, kind: str) -> None:
    """The next attack on the send queue: limits an operator raised (a benchmark's), one
    device's many one-message requests whose answers the broker never acknowledges
    (fills SENT_ENTRIES before the fix): another device is still served, and the
    stalled one holds at most its share."""
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "f").write_bytes(b"z" * 65536)
    b = Bridge(tmp_path, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
               limits=BridgeLimits(requests_per_s=1e6, request_burst=10**6, bytes_per_s=0,
                                   device_queue=10**6), connect=False)
    client = _Client("evil")
    b._conn = SimpleNamespace(client=client, lost=threading.Event(),  # type: ignore[assignment]  # noqa: SLF001
                              close=lambda: None)
    share = bridge_mod.DEVICE_SENT_ENTRIES
    try:
        for i in range(bridge_mod.SENT_ENTRIES + 200):
            body = _req(path="metadata/f", offset=i % 60000, length=1, format=2) \
                if kind == "format2" else \
                _req(path="metadata/f", offset=0, length=16 * 4096, block=4096)
            _ask(b, "evil", body, corr=struct.pack(">8sQ", b"e" * 8, i))
        end = time.monotonic() + 5
        while client.sent.count("evil") < share and time.monotonic() < end:
            time.sleep(0.01)
        _ask(b, "honest", _req(path="metadata/f", offset=0, length=100, format=2))
        end = time.monotonic() + 5
        while "honest" not in client.sent and time.monotonic() < end:
            time.sleep(0.01)
        assert "honest" in client.sent
        assert client.sent.count("evil") <= share
        assert b._worker.is_alive()  # noqa: SLF001  (the stand-in has no network thread)
    finally:
        b._sched.clear()  # noqa: SLF001
        b.close()


def test_send_queue_shares_are_per_owner() -> None:
    acked: set[int] = set()
    q: SendQueue[int] = SendQueue(10, 1000, 30.0, lambda i: i in acked, max_per_owner=3)
    for i in range(3):
        q.add(i, 1, 0.0, "a")
    assert q.full_owners() == {"a"}
    assert not q.room(1, 0.0, "a") and q.room(1, 0.0, "b") and q.room(1, 0.0)
    assert not q.room_for_refusal(0.0, "a") and q.room_for_refusal(0.0, "b")
    q.add(3, 1, 0.0)  # (no owner: in no share)
    acked.add(1)  # acknowledged behind an unacknowledged one: released (a is at its share)
    assert q.room(1, 0.0, "a") and q.full_owners() == set() and len(q) == 3
    assert [e[0] for e in q] == [0, 2, 3]
    assert q.room(1, 31.0, "a") and len(q) == 0 and q.bytes == 0  # timed out


def test_busy_answers_to_a_span_and_its_singles_are_bounded_per_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next attack on the device: a span of 8 blocks refused 429, its singles refused
    MAX_BUSY times then silent once, again and again: each block's busy answers count
    across the span, its singles and the re-requests."""
    import modelward.updater.transport._mqtt as m

    monkeypatch.setattr(m, "busy_pause", lambda n: 0.001)
    count: dict[int, int] = {}

    def mangle(payload: bytes, corr: bytes) -> list[tuple[bytes, bytes]]:
        off = struct.unpack(">Q", corr[8:])[0]
        count[off] = count.get(off, 0) + 1
        if count[off] % (m.MAX_BUSY + 1) == 0:
            return []
        return [(block_header(429 if count[off] % 2 else 503, off, 0), corr)]

    f, w, b = _stack(tmp_path, mangle=mangle, block_timeout=0.05)
    try:
        with pytest.raises(tuf_exc.DownloadError, match="busy"):
            _get(f, [(0, 8 * BS)])
    finally:
        b.close()
    assert f.bytes_received == 0
    assert len(w.requests) <= 8 * (m.MAX_BUSY + f.cfg.max_retries + 2), len(w.requests)
