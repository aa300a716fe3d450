"""Attack 17 on MQTT spans (format 3), unit level: the real bridge (``connect=False``) and
the real fetcher wired together in memory (as tests/unit/test_i16_mqtt_spans.py).

(1) One compromised device with only its own credentials against the bridge: spans of
tiny blocks (messages per request), hostile paths, huge offsets, overlapping and re-asked
spans; another device's latency meanwhile. (2) A hostile bridge/broker against the device:
endless 429 or 400, blocks of another block size, a file size that changes between blocks,
junk correlation data, a 400 that downgrades a good bridge.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from tuf.api import exceptions as tuf_exc

from modelward.publisher._bridge import Bridge
from modelward.publisher._fairness import BridgeLimits
from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqtt import BLOCK_HEADER, block_header
from tests.unit.test_i16_mqtt_spans import BS, DATA, _ask, _get, _hdr, _req, _stack

SECRET = b"S3CRET-OUTSIDE-THE-REPOSITORY"


class _Capture:
    """A bridge's ``_send``: every answer, by device."""

    def __init__(self, b: Bridge) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.lock = threading.Lock()
        b._send = self  # type: ignore[method-assign]  # noqa: SLF001

    def __call__(self, topic: str, data: bytes, props: Any) -> None:
        with self.lock:
            self.sent.append((topic.split("/")[3], bytes(props.CorrelationData), data))

    def of(self, device: str) -> list[tuple[bytes, bytes]]:
        with self.lock:
            return [(c, d) for dev, c, d in self.sent if dev == device]


def _bridge(tmp: Path, limits: BridgeLimits | None = None) -> Bridge:
    (tmp / "metadata").mkdir(exist_ok=True)
    (tmp / "targets").mkdir(exist_ok=True)
    (tmp / "metadata" / "f").write_bytes(bytes(range(256)) * 64)  # 16 KiB
    return Bridge(tmp, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
                  max_block=BS, limits=limits or BridgeLimits(), connect=False)


def _wait(pred: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return bool(pred())


# --- (1) a compromised device against the bridge -------------------------------------


def test_tiny_block_spans_do_not_multiply_messages_per_request(tmp_path: Path) -> None:
    b = _bridge(tmp_path)  # the default limits
    cap = _Capture(b)
    asked = sent_reqs = 0
    try:
        for i in range(100):  # (the request burst: none dropped)
            _ask(b, "evil", _req(path="metadata/f", offset=(i * 16) % 16000, length=16,
                                 block=1), corr=struct.pack(">8sQ", b"e" * 8, i))
            asked += 16
            sent_reqs += 1
            # let the worker drain the device's queue (32 blocks) between requests
            _wait(lambda: b._sched.queued("evil") == 0, 1.0)  # noqa: SLF001
        _wait(lambda: b._sched.queued("evil") == 0)  # noqa: SLF001
        assert b.healthy() is None
    finally:
        b.close()
    blocks = [d for _, d in cap.of("evil") if _hdr(d)[0] == 200]
    assert sum(len(_hdr(d)[3]) for d in blocks) == asked  # (what was asked, nothing more)
    # What SHOULD hold: beyond one message per request, each message carries at least a
    # KiB of the bytes the device is charged for (a format 2 requester's bound).
    assert len(blocks) <= sent_reqs + asked // 1024, (len(blocks), sent_reqs, asked)


def test_hostile_spans_never_serve_a_byte_outside_the_repository(tmp_path: Path) -> None:
    """Spans on traversal paths, a symlink out of the repository (file and directory),
    a directory, a FIFO, huge and past-the-end offsets, overlapping spans, the same span
    re-asked on one correlation before it is answered, block sizes of 1 and 0: no answer
    carries a byte from outside, every span is answered at most with its blocks, the
    worker survives and the device's queue drains."""
    repo = tmp_path / "repo"
    repo.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET * 100)
    b = _bridge(repo, BridgeLimits(bytes_per_s=0, requests_per_s=1e6, request_burst=10**6,
                                   device_queue=4096))
    os.symlink(outside / "secret", repo / "targets" / "link")
    os.symlink(outside, repo / "targets" / "dirlink")
    os.mkfifo(repo / "targets" / "fifo")
    cap = _Capture(b)
    bad = ["../outside/secret", "targets/../../outside/secret", "/etc/passwd",
           "targets/link", "targets/dirlink/secret", "targets", "targets/", "metadata/",
           "targets/fifo", "targets/./link", "targets//link", "targets\\..\\link",
           "targets/link\x00", "metadata/f/../../../outside/secret"]
    try:
        for i, p in enumerate(bad):
            _ask(b, "evil", _req(path=p, offset=0, length=16 * BS, block=BS),
                 corr=struct.pack(">8sQ", b"p" * 8, i))
        odd = [dict(offset=(1 << 63) - 1, length=16 * BS),  # past the end, near off_t's max
               dict(offset=16384 - 1, length=16, block=1),  # one byte, then the end
               dict(offset=0, length=16, block=0),  # (400)
               dict(offset=0, length=16 * BS, block=BS, format=2),  # too long in format 2
               dict(offset=5, length=16 * BS, block=BS),  # overlapping the next
               dict(offset=6, length=16 * BS, block=BS)]
        for i, kw in enumerate(odd):
            _ask(b, "evil", _req(path="metadata/f", **kw),
                 corr=struct.pack(">8sQ", b"o" * 8, i))
        for _ in range(3):  # the same span re-asked before it is answered
            _ask(b, "evil", _req(path="metadata/f", offset=0, length=4 * BS, block=BS),
                 corr=b"r" * 16)
        assert _wait(lambda: b._sched.queued("evil") == 0)  # noqa: SLF001
        time.sleep(0.1)
        assert b.healthy() is None
    finally:
        b.close()
    answers = cap.of("evil")
    assert answers
    for corr, data in answers:
        assert SECRET[:8] not in data
        if corr[:8] == b"p" * 8:  # a bad path: one refusal, no bytes
            assert data[:4] != b"MWB2" or _hdr(data)[0] in (400, 404)
            assert data[:4] != b"MWB2" or not _hdr(data)[3]
    per_corr: dict[bytes, int] = {}
    for corr, _ in answers:
        per_corr[corr] = per_corr.get(corr, 0) + 1
    assert all(per_corr[struct.pack(">8sQ", b"p" * 8, i)] == 1 for i in range(len(bad)))
    assert per_corr[struct.pack(">8sQ", b"o" * 8, 0)] == 1  # one 416
    assert per_corr[struct.pack(">8sQ", b"o" * 8, 1)] == 1  # one byte, nothing after
    assert per_corr[b"r" * 16] == 12  # each of the 3 asks: its 4 blocks, no more
    total = sum(len(_hdr(d)[3]) for _, d in answers if d[:4] == b"MWB2")
    assert total <= 3 * 4 * BS + 1 + 2 * 16384


def test_another_device_is_served_while_one_floods_tiny_spans(tmp_path: Path) -> None:
    """One device floods spans of one-byte blocks at the request burst, from a second
    thread; another device's fetch of 200 blocks (in spans) takes at most twice its time
    alone (plus a little for the machine) and gets its exact bytes."""
    def fetch_time(flood: bool) -> float:
        f, w, b = _stack(tmp_path / ("flood" if flood else "alone"))
        (tmp_path / ("flood" if flood else "alone") / "metadata" / "f").write_bytes(
            b"z" * 4096)
        stop = threading.Event()

        def evil() -> None:
            i = 0
            while not stop.is_set():
                _ask(b, "evil", _req(path="metadata/f", offset=i % 4000, length=16,
                                     block=1), corr=struct.pack(">8sQ", b"e" * 8, i))
                i += 1
                time.sleep(0.0005)

        t = threading.Thread(target=evil, daemon=True)
        try:
            if flood:
                t.start()
                time.sleep(0.05)
            t0 = time.monotonic()
            assert _get(f, [(0, len(DATA))]) == DATA
            took = time.monotonic() - t0
            assert b.healthy() is None
            return took
        finally:
            stop.set()
            if flood:
                t.join(2)
            b.close()

    for d in ("flood", "alone"):
        (tmp_path / d).mkdir()
    alone = min(fetch_time(False) for _ in range(2))
    flooded = min(fetch_time(True) for _ in range(2))
    assert flooded <= 2 * alone + 0.25, (alone, flooded)


# --- (2) a hostile bridge or broker against the device -------------------------------


def _refuse_all(status: int) -> Any:
    def mangle(payload: bytes, corr: bytes) -> list[tuple[bytes, bytes]]:
        off = struct.unpack(">Q", corr[8:])[0]
        return [(block_header(status, off, 0), corr)]
    return mangle


def test_endless_429_ends_in_a_typed_error_within_bounded_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelward.updater.transport._mqtt as m

    monkeypatch.setattr(m, "busy_pause", lambda n: 0.002)
    f, w, b = _stack(tmp_path, mangle=_refuse_all(429))
    t0 = time.monotonic()
    try:
        with pytest.raises(tuf_exc.DownloadError, match="busy"):
            _get(f, [(0, len(DATA))])
    finally:
        b.close()
    assert time.monotonic() - t0 < 10
    assert f.bytes_received == 0
    assert len(w.requests) < 16 * (m.MAX_BUSY + 2)  # (each block: its busy budget)


def test_endless_503_to_singles_after_a_span_429_is_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The span is refused 429 (halved, asked again singly), every single 503: the busy
    count is per request and each new single starts at 0, but each is bounded."""
    import modelward.updater.transport._mqtt as m

    monkeypatch.setattr(m, "busy_pause", lambda n: 0.002)

    def mangle(payload: bytes, corr: bytes) -> list[tuple[bytes, bytes]]:
        off = struct.unpack(">Q", corr[8:])[0]
        return [(block_header(429 if off % (8 * BS) == 0 else 503, off, 0), corr)]

    f, w, b = _stack(tmp_path, mangle=mangle)
    t0 = time.monotonic()
    try:
        with pytest.raises(tuf_exc.DownloadError):
            _get(f, [(0, len(DATA))])
    finally:
        b.close()
    assert time.monotonic() - t0 < 10 and f.bytes_received == 0


def test_endless_400_downgrades_then_ends_in_a_typed_error(tmp_path: Path) -> None:
    f, w, b = _stack(tmp_path, mangle=_refuse_all(400))
    t0 = time.monotonic()
    try:
        with pytest.raises(tuf_exc.DownloadHTTPError) as e:
            _get(f, [(0, len(DATA))])
    finally:
        b.close()
    assert e.value.status_code == 400
    assert time.monotonic() - t0 < 5 and f.bytes_received == 0


def test_a_400_on_the_first_span_only_costs_requests(tmp_path: Path) -> None:
    """A broker that turns the first span's answer into a 400 downgrades a good bridge to
    one block a request for the fetcher's life (by design, "the fetcher remembers"): the
    bytes stay exact, the next fetch asks singly."""
    state = {"done": False}

    def mangle(payload: bytes, corr: bytes) -> list[tuple[bytes, bytes]]:
        if not state["done"]:
            state["done"] = True
            off = struct.unpack(">Q", corr[8:])[0]
            return [(block_header(400, off, 0), corr)]
        return [(payload, corr)]

    f, w, b = _stack(tmp_path, mangle=mangle)
    try:
        assert _get(f, [(0, len(DATA))]) == DATA
        n = len(w.requests)
        assert _get(f, [(0, 16 * BS)]) == DATA[:16 * BS]
    finally:
        b.close()
    assert all(r["format"] == 2 for r in w.requests[n:])  # (downgraded: 16 requests)
    assert len(w.requests) - n == 16


def test_blocks_of_another_block_size_are_never_taken(tmp_path: Path) -> None:
    """The bridge answers each block as two half blocks (another block size), as a block
    straddling two of the device's, and with junk correlation data: nothing is taken and
    the fetch ends in a typed error within its retries."""
    def mangle(payload: bytes, corr: bytes) -> list[tuple[bytes, bytes]]:
        _, status, off, size = BLOCK_HEADER.unpack(payload[:BLOCK_HEADER.size])
        data = payload[BLOCK_HEADER.size:]
        h = BS // 2
        return [(block_header(status, off, size) + data[:h], corr),
                (block_header(status, off + h, size) + data[h:], corr),
                (block_header(status, off + h, size) + DATA[off + h:off + h + BS], corr),
                (payload, corr[:15]), (payload, b"x" * 16), (payload, corr + b"\0"),
                (payload, corr[:8] + struct.pack(">Q", (1 << 64) - 1))]

    f, w, b = _stack(tmp_path, mangle=mangle, block_timeout=0.1, max_retries=1)
    taken = 0
    try:
        with pytest.raises(tuf_exc.DownloadError):
            for _, piece in f.fetch_ranges("mqtt://repo/targets/x", [(0, 20 * BS)]):
                taken += len(piece)
    finally:
        b.close()
    assert taken == 0 and f.bytes_received == 0


def test_a_file_size_that_changes_between_blocks_is_a_typed_error(tmp_path: Path) -> None:
    n = {"i": 0}

    def mangle(payload: bytes, corr: bytes) -> list[tuple[bytes, bytes]]:
        _, status, off, size = BLOCK_HEADER.unpack(payload[:BLOCK_HEADER.size])
        n["i"] += 1
        return [(block_header(status, off, size + (n["i"] % 2)) +
                 payload[BLOCK_HEADER.size:], corr)]

    f, w, b = _stack(tmp_path, mangle=mangle)
    try:
        with pytest.raises(tuf_exc.DownloadError, match="size changed"):
            _get(f, [(0, 40 * BS)])
    finally:
        b.close()
    assert f.bytes_received <= 8 * BS  # (at most the blocks in order before the change)


def test_a_hostile_bridge_cannot_grow_the_device_s_memory(tmp_path: Path) -> None:
    """Every answer followed by 3 copies of the next span's blocks before they are
    asked and junk on a foreign session: what the fetcher holds stays within its window."""
    def mangle(payload: bytes, corr: bytes) -> list[tuple[bytes, bytes]]:
        _, status, off, size = BLOCK_HEADER.unpack(payload[:BLOCK_HEADER.size])
        out = [(payload, corr)]
        for k in range(3):
            o = off + (8 + k % 8) * BS
            out.append((block_header(200, o, size) + DATA[o:o + BS], corr))
        out.append((payload, b"\xff" * 16))
        return out

    f, w, b = _stack(tmp_path, mangle=mangle)
    peak = 0
    orig = f._inbox.hold  # noqa: SLF001

    def hold(n: int) -> None:
        nonlocal peak
        peak = max(peak, n)
        orig(n)

    f._inbox.hold = hold  # type: ignore[method-assign]  # noqa: SLF001
    try:
        assert _get(f, [(0, len(DATA))]) == DATA
    finally:
        b.close()
    assert peak <= 16 * BS, peak
    assert json.dumps(w.requests[0])  # (requests were JSON)


def test_busy_answers_are_bounded_per_block_across_re_requests(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelward.updater.transport._mqtt as m

    monkeypatch.setattr(m, "busy_pause", lambda n: 0.001)
    count: dict[int, int] = {}

    def mangle(payload: bytes, corr: bytes) -> list[tuple[bytes, bytes]]:
        off = struct.unpack(">Q", corr[8:])[0]
        count[off] = count.get(off, 0) + 1
        if count[off] % (m.MAX_BUSY + 1) == 0:
            return []  # silence once: the device re-asks after block_timeout
        return [(block_header(429, off, 0), corr)]

    f, w, b = _stack(tmp_path, mangle=mangle, block_timeout=0.05)
    try:
        with pytest.raises(tuf_exc.DownloadError):
            _get(f, [(0, BS)])
    finally:
        b.close()
    asked = sum(1 for r in w.requests if r["offset"] == 0)
    assert asked <= m.MAX_BUSY + f.cfg.max_retries + 2, asked


class _Link:
    """The bridge's link to the broker: answers acknowledged one after another, each
    ``per_msg`` seconds (a round trip over the in-flight window) plus its bytes at
    ``rate``; records when each device's answer is acknowledged."""

    def __init__(self, b: Bridge, per_msg: float, rate: float) -> None:
        self.b, self.per_msg, self.rate = b, per_msg, rate
        self.q: list[tuple[Any, int, str]] = []
        self.cv = threading.Condition()
        self.done_at: dict[str, float] = {}
        self.stop = False
        b._send = self.send  # type: ignore[method-assign]  # noqa: SLF001
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def send(self, topic: str, data: bytes, props: Any) -> None:
        info = _Info()
        with self.cv:
            self.q.append((info, len(data), topic.split("/")[3]))
            self.cv.notify()
        with self.b._sent_lock:  # noqa: SLF001
            self.b._sent.add(info, len(data), time.monotonic())  # noqa: SLF001

    def run(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.q or self.stop)
                if self.stop:
                    return
                info, n, dev = self.q.pop(0)
            time.sleep(self.per_msg + n / self.rate)
            self.done_at[dev] = time.monotonic()
            info.done.set()

    def close(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify()
        for info, _, _ in self.q:
            info.done.set()


class _Info:
    def __init__(self) -> None:
        self.done = threading.Event()

    def is_published(self) -> bool:
        return self.done.is_set()

    def wait_for_publish(self, timeout: float) -> None:
        self.done.wait(timeout)


def _honest_latency(tmp: Path, tiny: bool) -> float:
    """Another device's one block, asked while one device floods spans (at its request
    burst, within its queue): of one-byte blocks (``tiny``) or of 1 MiB blocks."""
    (tmp / "metadata").mkdir(parents=True)
    (tmp / "metadata" / "f").write_bytes(b"x" * (16 << 20))
    b = Bridge(tmp, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
               limits=BridgeLimits(), connect=False)  # the defaults: 1 MiB blocks, 4 MiB
    link = _Link(b, per_msg=0.001, rate=12.5e6)  # 1 ms a message, 100 Mbit/s
    try:
        for i in range(100):
            body = _req(path="metadata/f", offset=(16 * i) % 4000, length=16, block=1) \
                if tiny else _req(path="metadata/f", offset=0, length=16 << 20)
            _ask(b, "evil", body, corr=struct.pack(">8sQ", b"e" * 8, i))
            time.sleep(0.002)
        time.sleep(0.1)
        t0 = time.monotonic()
        _ask(b, "honest", _req(path="metadata/f", offset=0, length=100, format=2))
        assert _wait(lambda: "honest" in link.done_at, 20)
        assert b.healthy() is None
        return link.done_at["honest"] - t0
    finally:
        link.close()
        b.close()


def test_tiny_block_spans_do_not_hold_the_send_queue_for_others(tmp_path: Path) -> None:
    full = _honest_latency(tmp_path / "full", tiny=False)
    tiny = _honest_latency(tmp_path / "tiny", tiny=True)
    assert tiny <= 2 * full, (full, tiny)
