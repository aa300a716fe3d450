"""Issue 16, MQTT at full speed: a range request asks for a span of blocks (format 3), the
bridge answers it block by block.

The scheduler's accounting (every block of a span counts against the device's queue and
takes its turn with the other devices'), then the real bridge (``connect=False``) and the
real fetcher wired together in memory, then a hostile bridge against the fetcher (blocks
not asked for, duplicated, longer than asked, on another request's correlation data) and a
hostile device against the bridge (a span past the end of the file, a flood of spans).
"""

from __future__ import annotations

import json
import random
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from tuf.api import exceptions as tuf_exc

from modelward.publisher._bridge import Bridge
from modelward.publisher._fairness import (
    MAX_SPAN_BLOCKS,
    BadRequestError,
    BridgeLimits,
    Scheduler,
    parse_request,
)
from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqtt import BLOCK_HEADER, MqttFetcher, block_header

MIB = 1 << 20
BS = 4096


# --- parsing and the scheduler -----------------------------------------------------


def _req(**kw: Any) -> bytes:
    doc: dict[str, Any] = {"path": "targets/x", "offset": 0, "length": 64, "format": 3}
    doc.update(kw)
    return json.dumps(doc).encode()


def test_a_span_is_at_most_sixteen_blocks_and_only_in_format_3() -> None:
    r = parse_request(_req(length=MAX_SPAN_BLOCKS * MIB), MIB, "r")
    assert (r.length, r.format) == (MAX_SPAN_BLOCKS * MIB, 3)
    with pytest.raises(BadRequestError, match="length"):
        parse_request(_req(length=MAX_SPAN_BLOCKS * MIB + 1), MIB, "r")
    with pytest.raises(BadRequestError, match="length"):
        parse_request(_req(length=MIB + 1, format=2), MIB, "r")


def test_a_span_names_its_block_size_within_the_bridge_s() -> None:
    r = parse_request(_req(length=16 * 4096, block=4096), MIB, "r")
    assert (r.length, r.block) == (16 * 4096, 4096)
    assert parse_request(_req(length=MIB), MIB, "r").block == MIB  # (default: the bridge's)
    with pytest.raises(BadRequestError, match="length"):  # 16 blocks of the size it names
        parse_request(_req(length=16 * 4096 + 1, block=4096), MIB, "r")
    with pytest.raises(BadRequestError, match="block"):
        parse_request(_req(block=MIB + 1), MIB, "r")
    with pytest.raises(BadRequestError, match="block"):
        parse_request(_req(block=0), MIB, "r")


def test_every_block_of_a_span_counts_against_the_device_queue() -> None:
    s: Scheduler[str] = Scheduler(BridgeLimits(bytes_per_s=0, device_queue=32))
    assert s.offer("a", "s1", 16 * MIB, 0.0, parts=16) is None
    assert s.offer("a", "s2", 16 * MIB, 0.0, parts=16) is None
    assert s.queued("a") == 32
    assert s.offer("a", "s3", MIB, 0.0) == (429, "2 requests queued already")
    assert s.offer("a", "s4", 2 * MIB, 0.0, parts=2) == (
        429, "32 blocks queued already, 2 more asked")
    assert s.queued_bytes == 32 * MIB
    with pytest.raises(ValueError):
        s.offer("a", "bad", 3, 0.0, parts=4)  # (more parts than bytes)
    t: Scheduler[str] = Scheduler(BridgeLimits(bytes_per_s=0, device_queue=32))
    for i in range(10):
        assert t.offer("b", f"one{i}", MIB, 0.0) is None
    assert t.offer("b", "span", 16 * MIB, 0.0, parts=16) is None  # 26 blocks
    assert t.offer("b", "over", 16 * MIB, 0.0, parts=16) == (
        429, "26 blocks queued already, 16 more asked")  # 42 > 32, though 12 requests


def test_the_byte_bucket_is_charged_for_the_whole_span_at_admission() -> None:
    s: Scheduler[str] = Scheduler(BridgeLimits(bytes_per_s=MIB, byte_burst=2 * MIB))
    assert s.offer("a", "big", 4 * MIB, 0.0, parts=4) == (429, f"over {MIB} bytes/s")
    assert s.offer("a", "ok", 2 * MIB, 0.0, parts=2) is None


def test_spans_take_turns_block_by_block_and_a_sparse_device_goes_first() -> None:
    s: Scheduler[str] = Scheduler(BridgeLimits(bytes_per_s=0))
    assert s.offer("flood", "F", 16 * MIB, 0.0, parts=16) is None
    assert s.offer("other", "O", 16 * MIB, 0.0, parts=16) is None
    got = [s.take_part(0) for _ in range(4)]
    assert got == [("O", 0), ("F", 0), ("O", 1), ("F", 1)]
    assert s.offer("sparse", "one", 100, 0.0) is None
    assert s.take_part(0) == ("one", 0)  # not behind the 30 blocks the others have queued
    n = 0
    while s.take_part(0) is not None:
        n += 1
    assert n == 28 and s.queued_bytes == 0 and s.queued("flood") == s.queued("other") == 0


def test_drop_rest_releases_the_parts_not_yet_taken() -> None:
    s: Scheduler[str] = Scheduler(BridgeLimits(bytes_per_s=0))
    assert s.offer("a", "S", 8 * MIB, 0.0, parts=8) is None
    assert s.take_part(0) == ("S", 0)
    assert s.drop_rest("a", "other job") == 0
    assert s.drop_rest("a", "S") == 7
    assert s.queued("a") == 0 and s.queued_bytes == 0 and s.take_part(0) is None


# --- the real bridge and the real fetcher, in memory ---------------------------------


class _Wire:
    """The fetcher's connection, published straight into a bridge without a broker; the
    bridge's answers go through ``mangle`` into the fetcher's inbox."""

    def __init__(self, f: MqttFetcher, bridge: Bridge,
                 mangle: Callable[[bytes, bytes], list[tuple[bytes, bytes]]] | None = None,
                 ) -> None:
        self.f, self.bridge = f, bridge
        self.mangle = mangle or (lambda payload, corr: [(payload, corr)])
        self.lost = threading.Event()
        self.requests: list[dict[str, Any]] = []
        bridge._send = self._answer  # type: ignore[method-assign]  # noqa: SLF001

    def subscribe(self, topic: str) -> None:
        pass

    def unsubscribe(self, topic: str) -> None:
        pass

    def close(self) -> None:
        pass

    def publish(self, topic: str, body: bytes, props: Any) -> None:
        self.requests.append(json.loads(body))
        msg = mqtt.MQTTMessage(topic=topic.encode())
        msg.payload = body
        msg.properties = SimpleNamespace(  # type: ignore[assignment]
            CorrelationData=props.CorrelationData, ResponseTopic=props.ResponseTopic)
        self.bridge._on_message(msg)  # noqa: SLF001

    def _answer(self, topic: str, data: bytes | bytearray, props: Any) -> None:
        # (bytes: what the device's decoder makes of each message; the bridge's own
        # buffer never reaches a device)
        for payload, corr in self.mangle(bytes(data), props.CorrelationData):
            msg = mqtt.MQTTMessage(topic=topic.encode())
            msg.payload = payload
            msg.properties = SimpleNamespace(  # type: ignore[assignment]
                CorrelationData=corr, UserProperty=getattr(props, "UserProperty", None))
            self.f._inbox.put(msg)  # noqa: SLF001


FAST = BridgeLimits(bytes_per_s=0, requests_per_s=1e6, request_burst=10**6)
DATA = random.Random(16).randbytes(200 * BS + 123)


def _stack(tmp: Path, mangle: Any = None, bridge_cls: type[Bridge] = Bridge,
           limits: BridgeLimits | None = None, max_block: int = BS, **cfg: Any,
           ) -> tuple[MqttFetcher, _Wire, Bridge]:
    (tmp / "metadata").mkdir(exist_ok=True)
    (tmp / "targets").mkdir(exist_ok=True)
    (tmp / "targets" / "x").write_bytes(DATA)
    b = bridge_cls(tmp, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
                   max_block=max_block, limits=limits or FAST,
                   connect=False)
    c = MqttConfig(host="h", port=1, fleet="f", client_name="d", block_size=BS,
                   range_requests_per_s=0, **cfg)
    f = MqttFetcher(c)
    w = _Wire(f, b, mangle)
    f._conn = w  # type: ignore[assignment]  # noqa: SLF001
    return f, w, b


def _get(f: MqttFetcher, ranges: list[tuple[int, int]]) -> bytes:
    out = bytearray()
    for off, piece in f.fetch_ranges("mqtt://repo/targets/x", ranges):
        assert any(o <= off and off + len(piece) <= o + n for o, n in ranges)
        out += piece
    return bytes(out)


RANGES = [(0, 100 * BS), (100 * BS + 7, 3 * BS + 1), (150 * BS, 50 * BS + 123)]


def _want(ranges: list[tuple[int, int]]) -> bytes:
    return b"".join(DATA[o:o + n] for o, n in ranges)


def test_a_full_file_comes_in_spans_of_eight_blocks(tmp_path: Path) -> None:
    f, w, b = _stack(tmp_path)
    try:
        assert _get(f, [(0, len(DATA))]) == DATA
    finally:
        b.close()
    assert all(r["format"] == 3 for r in w.requests[:-1])
    assert len(w.requests) == -(-len(DATA) // (8 * BS))  # one request per 8 blocks
    assert b.stats.served_bytes == len(DATA) == f.requested_bytes == f.bytes_received


def test_a_bridge_with_larger_blocks_answers_in_the_device_s(tmp_path: Path) -> None:
    f, w, b = _stack(tmp_path, max_block=4 * BS)
    try:
        assert _get(f, RANGES) == _want(RANGES)
    finally:
        b.close()
    assert all(r.get("block") == BS for r in w.requests if r["format"] == 3)
    assert b.stats.served_bytes == sum(n for _, n in RANGES)


def test_ranges_come_exactly_in_spans(tmp_path: Path) -> None:
    f, w, b = _stack(tmp_path)
    try:
        assert _get(f, RANGES) == _want(RANGES)
    finally:
        b.close()
    assert b.stats.served_bytes == sum(n for _, n in RANGES)


class _OldBridge(Bridge):
    """A bridge from before spans (format 3 refused with 400, as its parser did)."""

    formats = (1, 2)


def test_a_bridge_from_before_spans_is_asked_one_block_a_request(tmp_path: Path) -> None:
    f, w, b = _stack(tmp_path, bridge_cls=_OldBridge)
    try:
        assert _get(f, RANGES) == _want(RANGES)
        assert _get(f, [(0, 9 * BS)]) == DATA[:9 * BS]  # (the fetcher remembers)
    finally:
        b.close()
    assert [r["format"] for r in w.requests].count(3) <= 2  # (those sent before the 400)
    assert b.stats.served_bytes == sum(n for _, n in RANGES) + 9 * BS


def test_busy_spans_are_asked_again_after_a_pause(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import modelward.updater.transport._mqtt as m

    monkeypatch.setattr(m, "busy_pause", lambda n: 0.01)
    # queue room for one span at a time: the second is refused 429 until the first is out
    f, w, b = _stack(tmp_path, limits=BridgeLimits(bytes_per_s=0, requests_per_s=1e6,
                                                     request_burst=10**6, device_queue=8))
    try:
        assert _get(f, [(0, len(DATA))]) == DATA
    finally:
        b.close()
    assert b.stats.refused > 0
    assert b.stats.served_bytes == len(DATA)


# --- a hostile bridge (or broker) against the fetcher ------------------------------


def _hdr(payload: bytes) -> tuple[int, int, int, bytes]:
    _, status, off, size = BLOCK_HEADER.unpack(payload[:BLOCK_HEADER.size])
    return status, off, size, payload[BLOCK_HEADER.size:]


def test_blocks_not_asked_for_duplicated_or_longer_are_never_handed_on(
        tmp_path: Path) -> None:
    """Each real answer comes with: itself again, the block after the span (not asked),
    a block one byte off, the same block with more bytes, the same block with other bytes
    on another request's correlation data (or an offset no request has), and other bytes
    on a foreign session; the fetch hands on exactly the bytes asked for, each once.
    (Other bytes for a block on the very request that asked for it are the bridge's word
    against the chunk index: the chunk hashes refuse them, not this layer.)"""
    other: list[bytes] = []

    def mangle(payload: bytes, corr: bytes) -> list[tuple[bytes, bytes]]:
        status, off, size, data = _hdr(payload)
        if status != 200:
            return [(payload, corr)]
        bad = [(payload, corr)]
        bad.append((block_header(200, off + 8 * BS, size) + b"N" * BS, corr))
        bad.append((block_header(200, off + 1, size) + b"O" * len(data), corr))
        bad.append((block_header(200, off, size) + data + b"EXTRA", corr))
        bad.append((block_header(200, off, size) + b"E" * len(data),
                    corr[:8] + struct.pack(">Q", off + 1)))  # (no request at off + 1)
        for c in [c for c in other[-20:] if c != corr][-3:]:  # other spans' requests
            bad.append((block_header(200, off, size) + b"C" * len(data), c))
        if corr not in other:
            other.append(corr)
        bad.append((block_header(200, off, size) + b"F" * len(data), b"F" * 16))
        return bad[1:] + bad[:1]  # (the junk first: it must not take the block's place)

    f, w, b = _stack(tmp_path, mangle, window=16, queue_limit=4096, queue_bytes=64 * MIB)
    try:
        assert _get(f, RANGES) == _want(RANGES)
        assert _get(f, [(0, len(DATA))]) == DATA
    finally:
        b.close()
    assert f.bytes_received == sum(n for _, n in RANGES) + len(DATA)


def test_a_flood_of_unasked_blocks_stays_within_the_receive_bound(tmp_path: Path) -> None:
    """A hostile bridge sends 20 blocks of junk for every block: what the fetcher holds
    stays within its queue bound, and the fetch still completes."""

    def mangle(payload: bytes, corr: bytes) -> list[tuple[bytes, bytes]]:
        status, off, size, data = _hdr(payload)
        junk = block_header(200, off + 16 * BS, size) + b"J" * BS
        return [(junk, corr)] * 20 + [(payload, corr)]

    f, w, b = _stack(tmp_path, mangle, block_timeout=0.1, max_retries=40)
    tracemalloc.start()
    try:
        assert _get(f, [(0, 48 * BS)]) == DATA[:48 * BS]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        b.close()
    bound = f.cfg.queue_byte_limit()
    assert peak < 4 * bound + MIB, (peak, bound)


def test_a_span_answered_with_a_smaller_file_is_a_typed_error(tmp_path: Path) -> None:
    def mangle(payload: bytes, corr: bytes) -> list[tuple[bytes, bytes]]:
        status, off, size, data = _hdr(payload)
        return [(block_header(status, off, 5 * BS) + data, corr)]

    f, w, b = _stack(tmp_path, mangle)
    try:
        with pytest.raises(tuf_exc.DownloadError, match="ends at"):
            _get(f, [(0, 100 * BS)])
    finally:
        b.close()


# --- a hostile device against the bridge -------------------------------------------


class _Recorder:
    def __init__(self, b: Bridge) -> None:
        self.sent: list[tuple[int, int, int]] = []
        self.cv = threading.Condition()
        b._send = self._send  # type: ignore[method-assign]  # noqa: SLF001

    def _send(self, topic: str, data: bytes, props: Any) -> None:
        up = dict(getattr(props, "UserProperty", None) or [])
        if "status" in up:
            status, off, n = int(up["status"]), int(up["offset"]), len(data)
        else:
            status, off, _, body = _hdr(data)
            n = len(body)
        with self.cv:
            self.sent.append((status, off, n))
            self.cv.notify_all()

    def wait(self, n: int) -> list[tuple[int, int, int]]:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.sent) >= n, 5), self.sent
            return list(self.sent)


def _ask(b: Bridge, device: str, body: bytes, corr: bytes = b"c" * 16) -> None:
    msg = mqtt.MQTTMessage(topic=f"modelward/f/repo/req/{device}".encode())
    msg.payload = body
    msg.properties = SimpleNamespace(  # type: ignore[assignment]
        CorrelationData=corr, ResponseTopic=f"modelward/f/devices/{device}/repo/resp")
    b._on_message(msg)  # noqa: SLF001


def test_a_span_past_the_end_of_the_file_sends_only_what_the_file_has(
        tmp_path: Path) -> None:
    """Amplification: 16 blocks asked 10 bytes before the end: one answer of 10 bytes;
    past the end: one 416; the device's queue is empty afterwards."""
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "f").write_bytes(b"x" * (3 * MIB + 10))
    b = Bridge(tmp_path, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
               limits=BridgeLimits(bytes_per_s=0), connect=False)
    rec = _Recorder(b)
    try:
        _ask(b, "evil", _req(path="metadata/f", offset=3 * MIB, length=16 * MIB))
        assert rec.wait(1) == [(200, 3 * MIB, 10)]
        _ask(b, "evil", _req(path="metadata/f", offset=5 * MIB, length=16 * MIB))
        assert rec.wait(2)[1] == (416, 5 * MIB, 0)
        _ask(b, "evil", _req(path="metadata/f", offset=MIB, length=16 * MIB))
        assert rec.wait(5)[2:] == [(200, MIB, MIB), (200, 2 * MIB, MIB), (200, 3 * MIB, 10)]
        threading.Event().wait(0.2)  # (nothing more comes)
        assert len(rec.sent) == 5
        assert b._sched.queued("evil") == 0 and b._sched.queued_bytes == 0  # noqa: SLF001
    finally:
        b.close()


def test_a_device_flooding_spans_waits_behind_itself(tmp_path: Path) -> None:
    """One device fills its queue with spans (32 blocks); another device's one request is
    answered within the next two blocks the bridge sends, and the flood beyond its queue
    is refused 429, not queued."""
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "f").write_bytes(b"x" * (64 * MIB))
    b = Bridge(tmp_path, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
               limits=BridgeLimits(bytes_per_s=0), connect=False)
    gate = threading.Event()
    sent: list[tuple[str, int, int]] = []
    cv = threading.Condition()

    def send(topic: str, data: bytes, props: Any) -> None:
        if threading.current_thread().name == "bridge-worker":
            gate.wait(5)  # (the worker waits here: the queues fill behind it)
        status, off, _, _ = _hdr(data) if data[:4] == b"MWB2" else (0, 0, 0, b"")
        with cv:
            sent.append((topic.split("/")[3], status, off))
            cv.notify_all()

    b._send = send  # type: ignore[method-assign]  # noqa: SLF001
    try:
        for i in range(4):
            _ask(b, "flood", _req(path="metadata/f", offset=i * 16 * MIB, length=16 * MIB))
        _ask(b, "honest", _req(path="metadata/f", offset=0, length=100, format=2))
        assert b._sched.queued("flood") <= 32  # noqa: SLF001
        gate.set()
        with cv:
            assert cv.wait_for(lambda: any(d == "honest" for d, _, _ in sent), 5)
            blocks = [d for d, s, _ in sent if s == 200]
        assert blocks.index("honest") <= 2, blocks
    finally:
        gate.set()
        b.close()


def test_a_span_over_the_device_byte_budget_shrinks_and_the_fetch_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bridge whose byte burst for the device (4 blocks) is below a span (8): the span is
    refused 429 however long the device waits; it is asked again in single blocks, the next
    spans are halved, and the fetch completes."""
    import modelward.updater.transport._mqtt as m

    monkeypatch.setattr(m, "busy_pause", lambda n: 0.01)
    f, w, b = _stack(tmp_path, limits=BridgeLimits(bytes_per_s=200 * BS, byte_burst=4 * BS,
                                                   requests_per_s=1e6, request_burst=10**6))
    try:
        assert _get(f, [(0, 60 * BS)]) == DATA[:60 * BS]
    finally:
        b.close()
    assert b.stats.refused > 0
    assert b.stats.served_bytes == 60 * BS


def test_a_span_is_read_block_by_block_within_the_send_queue(tmp_path: Path) -> None:
    """The bridge's memory: a 4-block span is read one block at a time, each only while
    the unacknowledged bytes leave room (2 MiB here): never the span at once."""
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "big").write_bytes(b"B" * (4 * MIB))
    b = Bridge(tmp_path, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
               limits=BridgeLimits(send_bytes=2 * MIB + 4096), connect=False)

    class Info:
        def __init__(self) -> None:
            self.done = threading.Event()

        def is_published(self) -> bool:
            return self.done.is_set()

        def wait_for_publish(self, timeout: float) -> None:
            self.done.wait(timeout)

    infos: list[Info] = []

    def send(topic: str, data: bytes, props: Any) -> None:
        info = Info()
        infos.append(info)
        with b._sent_lock:  # noqa: SLF001
            b._sent.add(info, len(data), time.monotonic())  # noqa: SLF001

    b._send = send  # type: ignore[method-assign]  # noqa: SLF001
    try:
        _ask(b, "d", _req(path="metadata/big", offset=0, length=4 * MIB))
        threading.Event().wait(0.5)
        assert len(infos) == 2  # 2 MiB unacknowledged: the span's third block waits
        assert b._sched.queued("d") == 1  # noqa: SLF001 - (taken, it waits; the 4th queued)
        infos[0].done.set()
        deadline = time.monotonic() + 5
        while len(infos) < 3 and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        assert len(infos) == 3
    finally:
        for i in infos:
            i.done.set()
        b.close()


def test_pieces_are_views_of_immutable_payloads_so_the_delta_may_keep_them_uncopied(
        tmp_path: Path) -> None:
    """``MqttFetcher.stable_pieces``: the delta path hashes a chunk in one thread and
    writes it from the same memory in another; a payload buffer reused meanwhile would
    write bytes that were never verified. Each piece must be a view of a ``bytes`` (the
    decoder makes one per message)."""
    from modelward.updater.transport import _pahofast

    assert MqttFetcher.stable_pieces is True
    f, _, b = _stack(tmp_path)
    try:
        for _, piece in f.fetch_ranges("mqtt://repo/targets/x", RANGES):
            base = piece.obj if isinstance(piece, memoryview) else piece
            assert type(base) is bytes, type(base)
    finally:
        b.close()
    # (the decoder the connection uses: a PUBLISH's payload is its own bytes object)
    if _pahofast.decode_publish is not None:
        from paho.mqtt.enums import MQTTProtocolVersion

        topic, body = b"t/x", bytearray(b"\x00\x00\x00payload")
        packet = bytearray(len(topic).to_bytes(2, "big") + topic + b"\x00\x01") + body
        pub = _pahofast.decode_publish(0x32, packet, MQTTProtocolVersion.MQTTv311)
        packet[-7:] = b"changed"
        assert type(pub.payload) is bytes and pub.payload.endswith(b"payload")


def test_a_whole_file_from_offset_0_comes_uncopied(tmp_path: Path) -> None:
    """``fetch_from(url, 0)`` (a bundle without a chunk index, from its start) hands on
    each block as a view of its message's payload, as from any other offset: it went
    through ``fetch``, which copies every block into ``bytes`` for TUF's metadata path
    (256 MiB copied once more per install). ``fetch`` still yields ``bytes``."""
    sent: list[bytes] = []

    def keep(payload: bytes, corr: bytes) -> list[tuple[bytes, bytes]]:
        sent.append(payload)
        return [(payload, corr)]

    f, w, b = _stack(tmp_path, mangle=keep)
    try:
        chunks, start = f.fetch_from("mqtt://repo/targets/x", 0)
        got = list(chunks)
        assert start == 0 and b"".join(got) == DATA
        assert all(isinstance(c, memoryview) for c in got)
        payloads = {id(p) for p in sent}
        assert all(id(c.obj) in payloads for c in got if isinstance(c, memoryview))
        assert f.last_url == "mqtt://repo/targets/x"
        meta = list(f.fetch("mqtt://repo/targets/x"))
        assert b"".join(meta) == DATA and all(type(c) is bytes for c in meta)
    finally:
        b.close()
