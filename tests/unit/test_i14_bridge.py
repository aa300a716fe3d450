"""Issue 14, must-show 7 (the bridge): one device cannot take the bridge down.

The pure decisions (:mod:`modelward.publisher._fairness`) and the bridge without a broker
(``connect=False``: requests go straight into ``_on_message``, answers are recorded), then
the device's handling of a busy answer with a fake connection.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from modelward.publisher._bridge import Bridge
from modelward.publisher._fairness import (
    MAX_REQUEST_BYTES,
    BadRequestError,
    BridgeLimits,
    Scheduler,
    TokenBucket,
    parse_request,
)
from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqtt import BLOCK_HEADER, MqttFetcher, block_header

RESP = "modelward/f/devices/{}/repo/resp"


def _req(**kw: Any) -> bytes:
    doc: dict[str, Any] = {"path": "metadata/1.root.json", "offset": 0, "length": 64,
                           "format": 2}
    doc.update(kw)
    return json.dumps(doc).encode()


# --- parse_request ----------------------------------------------------------------

@pytest.mark.parametrize("payload", [
    b"[" * 100_000,                         # RecursionError in json.loads before issue 13
    b'{"path": ' + b"[" * 3000,
    _req(offset=2 ** 64),                   # struct.error in the header, issue 14
    _req(offset=2 ** 63),
    _req(offset=-1),
    _req(offset=True),
    _req(offset=1.5),
    _req(offset="0"),
    _req(offset=10 ** 300),
    _req(length=0),
    _req(length=(1 << 20) + 1),
    _req(length=None),
    _req(format=4),  # (3: a span, since issue 16)
    _req(format=True),
    _req(format="2"),
    _req(path=7),
    _req(path=""),
    _req(path="x" * 2000),
    b"[1, 2]",
    b'"metadata/root.json"',
    b"NaN",
    b"\xff\xfe",
    b'{"path": "metadata/x", "offset": 0, "length": 1e400}',
])
def test_i14_bad_requests_are_a_typed_error(payload: bytes) -> None:
    with pytest.raises(BadRequestError):
        parse_request(payload, 1 << 20, "the request")


def test_i14_request_size_is_bounded_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    import modelward.publisher._fairness as fairness

    def never(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("parsed")

    monkeypatch.setattr(fairness, "loads_bounded", never)
    with pytest.raises(BadRequestError, match="bytes"):
        parse_request(b" " * (MAX_REQUEST_BYTES + 1), 1 << 20, "the request")


def test_i14_a_good_request_parses() -> None:
    r = parse_request(_req(offset=(1 << 63) - 1, length=1 << 20), 1 << 20, "r")
    assert (r.path, r.offset, r.length, r.format) == ("metadata/1.root.json", (1 << 63) - 1,
                                                      1 << 20, 2)
    assert parse_request(b'{"path": "a", "offset": 0, "length": 1}', 8, "r").format == 1


# --- token bucket, scheduler ------------------------------------------------------

def test_i14_token_bucket() -> None:
    b = TokenBucket(rate=10, burst=5, now=0.0)
    assert [b.take(1, 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert b.take(1, 0.1) and not b.take(1, 0.1)  # 10/s: one more after 0.1 s
    assert not b.take(6, 100.0)  # never more than the burst
    assert TokenBucket(0, 0, 0.0).take(10 ** 9, 0.0)  # rate 0: no limit


def test_i14_scheduler_serves_devices_round_robin() -> None:
    s: Scheduler[str] = Scheduler(BridgeLimits(device_queue=32))
    for i in range(32):
        assert s.offer("flood", f"f{i}", 1, 0.0) is None
    assert s.offer("flood", "f32", 1, 0.0) == (429, "32 requests queued already")
    assert s.offer("honest", "h0", 1, 0.0) is None
    assert s.offer("honest", "h1", 1, 0.0) is None
    order = [s.take(0) for _ in range(6)]
    assert order == ["h0", "f0", "h1", "f1", "f2", "f3"]  # a new device first, then turns
    assert s.offer("late", "l0", 1, 0.0) is None
    assert s.take(0) == "l0"


def test_i14_scheduler_byte_bucket_global_bound_and_device_table() -> None:
    s: Scheduler[int] = Scheduler(BridgeLimits(bytes_per_s=100, byte_burst=100,
                                               queued_bytes=150, devices=2))
    assert s.offer("a", 1, 100, 0.0) is None
    refusal = s.offer("a", 2, 1, 0.0)
    assert refusal is not None and refusal[0] == 429  # a's bytes are used up
    assert s.offer("a", 3, 50, 0.5) is None  # 0.5 s later: 50 more
    assert s.offer("b", 4, 10, 0.5) == (503, "the bridge has 150 bytes queued")
    assert s.queued_bytes == 150
    assert s.take(0) == 1 and s.take(0) == 3 and s.take(0) is None
    # the device table is bounded: an idle device is forgotten for a new one
    assert s.offer("b", 5, 1, 1.0) is None and s.offer("c", 6, 1, 1.0) is None
    assert s.queued("a") == 0 and s.queued("b") == 1 and s.queued("c") == 1
    refusal = s.offer("d", 7, 1, 1.0)  # b and c have requests queued: none to forget
    assert refusal is not None and refusal[0] == 503


def test_i14_request_bucket_drops() -> None:
    s: Scheduler[int] = Scheduler(BridgeLimits(requests_per_s=10, request_burst=3))
    assert [s.allow("x", 0.0) for _ in range(4)] == [True, True, True, False]
    assert s.allow("y", 0.0)  # another device has its own bucket


# --- the bridge without a broker --------------------------------------------------

class _Harness:
    """A bridge (no broker) whose answers are recorded as (device, status, offset, data)."""

    def __init__(self, tmp: Path, limits: BridgeLimits | None = None) -> None:
        (tmp / "metadata").mkdir(exist_ok=True)
        (tmp / "metadata" / "1.root.json").write_bytes(b"R" * 100)
        self.bridge = Bridge(tmp, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
                             limits=limits, connect=False)
        self.sent: list[tuple[str, int, int, bytes]] = []
        self.cv = threading.Condition()
        self.bridge._send = self._record  # type: ignore[method-assign]  # noqa: SLF001

    def _record(self, topic: str, data: bytes, props: Any) -> None:
        device = topic.split("/")[3]
        up = dict(getattr(props, "UserProperty", None) or [])
        if "status" in up:
            status, off = int(up["status"]), int(up["offset"])
        else:
            _, status, off, _ = BLOCK_HEADER.unpack(data[:BLOCK_HEADER.size])
            data = data[BLOCK_HEADER.size:]
        with self.cv:
            self.sent.append((device, status, off, data))
            self.cv.notify_all()

    def request(self, device: str, payload: bytes, corr: bytes = b"c" * 16) -> None:
        msg = mqtt.MQTTMessage(topic=f"modelward/f/repo/req/{device}".encode())
        msg.payload = payload
        msg.properties = SimpleNamespace(  # type: ignore[assignment]
            CorrelationData=corr, ResponseTopic=RESP.format(device))
        self.bridge._on_message(msg)  # noqa: SLF001

    def wait(self, n: int, timeout: float = 5.0) -> list[tuple[str, int, int, bytes]]:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.sent) >= n, timeout), self.sent
            return list(self.sent)

    def close(self) -> None:
        self.bridge.close()


@pytest.fixture
def harness(tmp_path: Path) -> Any:
    h = _Harness(tmp_path)
    yield h
    h.close()


@pytest.mark.parametrize("payload", [b"[" * 100_000, _req(offset=2 ** 64), _req(offset=-5),
                                     _req(length=10 ** 30), b"\x00" * 20_000])
def test_i14_hostile_request_is_refused_and_the_next_device_is_served(
    harness: _Harness, payload: bytes, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        harness.request("evil", payload)
    harness.request("dev-1", _req())
    sent = harness.wait(2)
    assert sent[0][:2] == ("evil", 400)
    assert sent[1] == ("dev-1", 200, 0, b"R" * 64)
    assert harness.bridge.healthy() is None
    assert harness.bridge.stats.refused == 1 and harness.bridge.stats.errors == 0
    assert all("Traceback" not in r.getMessage() for r in caplog.records)


def test_i14_any_exception_in_a_handler_is_one_line_and_a_500(
    harness: _Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    calls = {"n": 0}
    real = harness.bridge._read  # noqa: SLF001

    def flaky(path: str, offset: int, length: int) -> tuple[int, bytes]:
        calls["n"] += 1
        if offset == 1:  # the evil device's request
            raise RecursionError("boom\n\x1b[8mforged")
        return real(path, offset, length)

    monkeypatch.setattr(harness.bridge, "_read", flaky)
    with caplog.at_level(logging.ERROR):
        harness.request("evil", _req(offset=1))
        harness.request("dev-1", _req())
        sent = harness.wait(2)
    assert sorted(s[:2] for s in sent) == [("dev-1", 200), ("evil", 500)]
    assert harness.bridge.healthy() is None and harness.bridge.stats.errors == 1
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "RecursionError" in line and "\n" not in line and "\x1b" not in line


def test_i14_an_exception_while_admitting_is_caught(
    harness: _Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    class Props:
        ResponseTopic = RESP.format("evil")

        @property
        def CorrelationData(self) -> bytes:  # noqa: N802 - paho's name
            raise struct_error("bad")

    from struct import error as struct_error

    msg = mqtt.MQTTMessage(topic=b"modelward/f/repo/req/evil")
    msg.payload = _req()
    msg.properties = Props()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR):
        harness.bridge._on_message(msg)  # noqa: SLF001 - must not raise
    assert harness.bridge.stats.errors == 1
    assert any("error" in r.getMessage() for r in caplog.records)
    harness.request("dev-1", _req())
    assert harness.wait(1)[0][:2] == ("dev-1", 200)


def test_i14_logs_carry_no_raw_device_bytes(
    harness: _Harness, caplog: pytest.LogCaptureFixture,
) -> None:
    forged = "metadata/x\n2026-12-01 INFO served everything\x1b]0;owned\x07\u202e"
    with caplog.at_level(logging.DEBUG, logger="modelward.publisher._bridge"):
        harness.request("dev-1", _req(path=forged))
        harness.request("dev-1", json.dumps({"path": forged, "offset": "\n"}).encode())
        harness.wait(2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines
    for line in lines:
        assert "\n" not in line and "\x1b" not in line and "\x07" not in line, line
        assert "\u202e" not in line, line


def test_i14_flood_is_dropped_queued_boundedly_and_the_honest_device_goes_first(
    tmp_path: Path,
) -> None:
    h = _Harness(tmp_path, BridgeLimits(requests_per_s=0.001, request_burst=100,
                                        device_queue=8))
    gate = threading.Event()
    real = h.bridge._read  # noqa: SLF001

    def slow(path: str, offset: int, length: int) -> tuple[int, bytes]:
        gate.wait(5)
        return real(path, offset, length)

    h.bridge._read = slow  # type: ignore[method-assign]  # noqa: SLF001
    try:
        for i in range(5000):
            h.request("flood", _req(offset=i % 50))
        h.request("dev-1", _req(offset=7))
        st = h.bridge.stats
        assert st.dropped == 5000 - 100  # over the request rate: not even answered
        assert h.bridge._sched.queued("flood") <= 8  # noqa: SLF001
        refused = [s for s in h.sent if s[1] == 429]
        assert len(refused) in (100 - 8 - 1, 100 - 8)  # the queue cap (+ one being read)
        gate.set()
        sent = h.wait(101)  # every admitted request is answered, once
        served = [s[0] for s in sent if s[1] == 200]
        assert served.index("dev-1") <= 1  # behind at most the block being read
    finally:
        gate.set()
        h.close()


def test_i14_send_queue_is_bounded_in_bytes(tmp_path: Path) -> None:
    """The worker reads the next block only while the unacknowledged bytes leave room."""
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "big").write_bytes(b"B" * (4 << 20))
    b = Bridge(tmp_path, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
               limits=BridgeLimits(send_bytes=(2 << 20) + 4096), connect=False)

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
        for i in range(4):
            msg = mqtt.MQTTMessage(topic=b"modelward/f/repo/req/d")
            msg.payload = _req(path="metadata/big", offset=i << 20, length=1 << 20)
            msg.properties = SimpleNamespace(  # type: ignore[assignment]
                CorrelationData=b"c", ResponseTopic=RESP.format("d"))
            b._on_message(msg)  # noqa: SLF001
        time.sleep(0.5)
        assert len(infos) == 2  # 2 MiB unacknowledged: the third block waits
        infos[0].done.set()
        deadline = time.monotonic() + 5
        while len(infos) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(infos) == 3
    finally:
        for i in infos:
            i.done.set()
        b.close()


def test_the_send_queue_holds_as_many_blocks_as_its_bytes(tmp_path: Path) -> None:
    """A send queue of 4 MiB holds 4 blocks of 1 MiB awaiting their PUBACK, through the
    real ``_send`` (each answer's 22-byte header is not counted: with it, 4 MiB held 3
    blocks and the worker waited for a PUBACK before every block); the fifth waits until
    one is acknowledged."""
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "big").write_bytes(b"B" * (6 << 20))
    b = Bridge(tmp_path, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
               limits=BridgeLimits(send_bytes=4 << 20), connect=False)

    class Info:
        rc = mqtt.MQTT_ERR_SUCCESS

        def __init__(self, size: int) -> None:
            self.done = threading.Event()
            self.size = size

        def is_published(self) -> bool:
            return self.done.is_set()

        def wait_for_publish(self, timeout: float) -> None:
            self.done.wait(timeout)

    infos: list[Info] = []

    def publish(topic: str, data: bytes, qos: int, properties: Any) -> Info:
        infos.append(Info(len(data)))
        return infos[-1]

    b._conn = SimpleNamespace(  # type: ignore[assignment]  # noqa: SLF001
        lost=threading.Event(), client=SimpleNamespace(publish=publish), close=lambda: None)
    try:
        for i in range(6):
            msg = mqtt.MQTTMessage(topic=b"modelward/f/repo/req/d")
            msg.payload = _req(path="metadata/big", offset=i << 20, length=1 << 20)
            msg.properties = SimpleNamespace(  # type: ignore[assignment]
                CorrelationData=b"c", ResponseTopic=RESP.format("d"))
            b._on_message(msg)  # noqa: SLF001
        time.sleep(0.5)
        assert [i.size for i in infos] == [(1 << 20) + BLOCK_HEADER.size] * 4
        assert b._sent.bytes == 4 << 20  # noqa: SLF001 - (the blocks' bytes)
        infos[0].done.set()
        deadline = time.monotonic() + 5
        while len(infos) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert len(infos) == 5  # one acknowledged: one more block, not two
    finally:
        for i in infos:
            i.done.set()
        b.close()


def test_a_block_is_answered_from_the_buffer_it_was_read_into(tmp_path: Path) -> None:
    """Format 2: the block is read behind room for its header and that buffer is the
    payload (no header + block concatenation), the last block of a file as short as the
    file; format 1 carries the same bytes and its user properties."""
    data = random.Random(14).randbytes((2 << 20) + 777)
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "big").write_bytes(data)
    b = Bridge(tmp_path, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
               connect=False)
    sent: list[tuple[Any, Any]] = []
    got = threading.Event()

    def publish(topic: str, payload: Any, qos: int, properties: Any) -> Any:
        sent.append((payload, properties))
        if len(sent) == 3:
            got.set()
        return SimpleNamespace(rc=mqtt.MQTT_ERR_SUCCESS, is_published=lambda: True)

    b._conn = SimpleNamespace(  # type: ignore[assignment]  # noqa: SLF001
        lost=threading.Event(), client=SimpleNamespace(publish=publish), close=lambda: None)
    try:
        for corr, fmt, off in ((b"a", 2, 0), (b"b", 2, 2 << 20), (b"c", 1, 0)):
            msg = mqtt.MQTTMessage(topic=b"modelward/f/repo/req/d")
            msg.payload = _req(path="metadata/big", offset=off, length=1 << 20, format=fmt)
            msg.properties = SimpleNamespace(  # type: ignore[assignment]
                CorrelationData=corr, ResponseTopic=RESP.format("d"))
            b._on_message(msg)  # noqa: SLF001
        assert got.wait(5)
    finally:
        b.close()
    by = {p.CorrelationData: (payload, p) for payload, p in sent}
    first, _ = by[b"a"]
    assert isinstance(first, bytearray)
    assert first == block_header(200, 0, len(data)) + data[:1 << 20]
    assert by[b"b"][0] == block_header(200, 2 << 20, len(data)) + data[2 << 20:]
    legacy, props = by[b"c"]
    assert type(legacy) is bytes and legacy == data[:1 << 20]
    assert dict(props.UserProperty) == {"status": "200", "offset": "0",
                                        "size": str(len(data))}


def test_i14_healthy_reports_a_dead_network_thread(tmp_path: Path) -> None:
    h = _Harness(tmp_path)
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    h.bridge._conn = SimpleNamespace(  # type: ignore[assignment]  # noqa: SLF001
        client=SimpleNamespace(_thread=dead), close=lambda: None)
    assert h.bridge.healthy() == "paho's network thread has ended"
    h.bridge._conn = None  # noqa: SLF001
    assert h.bridge.healthy() is None
    h.close()
    assert h.bridge.healthy() == "the bridge worker thread has ended"


def test_i14_serve_mqtt_exits_non_zero_when_the_bridge_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import modelward.publisher._bridge as publisher
    from modelward.cli import EXIT_ERROR, main

    class Dying:
        def __init__(self, *_a: Any, **kw: Any) -> None:
            self.limits = kw["limits"]
            self.stats = SimpleNamespace(requests=0, served_bytes=0, refused=0, dropped=0)
            self.checks = 0

        def healthy(self) -> str | None:
            self.checks += 1
            return "paho's network thread has ended" if self.checks > 1 else None

        def close(self) -> None:
            pass

    monkeypatch.setattr(publisher, "Bridge", Dying, raising=False)
    rc = main(["serve-mqtt", "--repo", str(tmp_path), "--broker", "mqtts://127.0.0.1:1",
               "--fleet", "f", "--device-mib-per-s", "8"])
    assert rc == EXIT_ERROR
    assert "stopped:" in capsys.readouterr().out


# --- the device: a busy answer is a pause, not a failure ----------------------------

CFG = MqttConfig(host="h", port=1, fleet="f", client_name="d", block_size=64,
                 block_timeout=0.5, max_retries=1)


class _Conn:
    def __init__(self, f: MqttFetcher, answer: Any) -> None:
        self.f, self.answer = f, answer
        self.lost = SimpleNamespace(is_set=lambda: False)
        self.requests = 0

    def subscribe(self, _t: str) -> None:
        pass

    def unsubscribe(self, _t: str) -> None:
        pass

    def publish(self, _t: str, body: bytes, props: Any) -> None:
        self.requests += 1
        msg = mqtt.MQTTMessage(topic=b"modelward/f/devices/d/repo/resp")
        msg.payload = self.answer(json.loads(body)["offset"], self.requests)
        msg.properties = SimpleNamespace(  # type: ignore[assignment]
            CorrelationData=props.CorrelationData, UserProperty=[])
        self.f._deliver(msg)  # noqa: SLF001


def _fetch(answer: Any) -> tuple[bytes, _Conn]:
    f = MqttFetcher(CFG)
    conn = _Conn(f, answer)
    f._connection = lambda: conn  # type: ignore[assignment,method-assign,return-value]  # noqa: SLF001
    return f.download_bytes("mqtt://repo/metadata/timestamp.json", 1 << 20), conn


def test_i14_device_backs_off_on_429_and_gets_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import modelward.updater.transport._mqtt as m

    monkeypatch.setattr(m, "busy_pause", lambda n: 0.01)
    data = bytes(range(200))

    def answer(off: int, n: int) -> bytes:
        if n % 3:  # two of three requests are refused (more than max_retries in a row)
            return block_header(429 if n % 2 else 503, off, 0)
        return block_header(200, off, len(data)) + data[off:off + 64]

    got, conn = _fetch(answer)
    assert got == data and conn.requests > 8


def test_i14_device_gives_up_on_a_bridge_that_stays_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    from tuf.api import exceptions as tuf_exc

    import modelward.updater.transport._mqtt as m

    monkeypatch.setattr(m, "busy_pause", lambda n: 0.001)
    with pytest.raises(tuf_exc.DownloadError, match="stayed busy"):
        _fetch(lambda off, n: block_header(429, off, 0))


def test_i14_busy_pause_grows_and_is_capped() -> None:
    from modelward.updater.transport._mqtt import busy_pause

    assert 0.025 <= busy_pause(1) <= 0.075
    assert all(0.5 <= busy_pause(n) <= 1.5 for n in (6, 20, 10 ** 6))


@pytest.mark.parametrize("bad", [["--device-queue", "0"], ["--device-mib-per-s", "-1"],
                                 ["--device-requests-per-s", "0"], ["--send-queue-mib", "0"]])
def test_i14_serve_mqtt_refuses_limits_that_serve_nobody(
    tmp_path: Path, bad: list[str], capsys: pytest.CaptureFixture[str],
) -> None:
    """A careless operator: a zero or negative bound is one line naming the options."""
    from modelward.cli import EXIT_ERROR, main

    (tmp_path / "metadata").mkdir()
    rc = main(["serve-mqtt", "--repo", str(tmp_path), "--broker", "mqtts://127.0.0.1:1",
               "--fleet", "f", *bad])
    err = capsys.readouterr().err
    assert rc == EXIT_ERROR and "must be positive" in err and "Traceback" not in err


def test_i14_one_device_on_many_connections_shares_one_budget(tmp_path: Path) -> None:
    """The budget is keyed by the request topic (which the ACL ties to the credentials),
    not by the MQTT client id: more connections buy a device nothing."""
    h = _Harness(tmp_path, BridgeLimits(requests_per_s=0.001, request_burst=10))
    try:
        for i in range(30):
            h.request("flood", _req(), corr=f"conn-{i}".encode())  # 30 "connections"
        assert h.bridge.stats.dropped == 20
    finally:
        h.close()


@pytest.mark.xdist_group("machine")
def test_i14_bridge_unit_restarts_on_failure_and_verifies(tmp_path: Path) -> None:
    """serve-mqtt exits 1 when a thread dies; its unit restarts it, and is confined."""
    import re
    import shutil
    import subprocess
    import sys

    unit = Path(__file__).resolve().parents[2] / "systemd" / "modelward-bridge.service"
    text = unit.read_text()
    assert re.search(r"^Restart=on-failure$", text, re.M)
    assert "serve-mqtt" in text and "MemoryMax=" in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze missing (scripts/setup installs it)")
    exe = Path(sys.executable).parent / "modelward"
    copy = tmp_path / unit.name
    copy.write_text(text.replace("/usr/bin/modelward", str(exe)))
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                       capture_output=True, text=True, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m and float(m.group(1)) <= 2.5, r.stdout


def test_i14_a_device_cannot_aim_answers_at_another_device(harness: _Harness) -> None:
    """The response goes to the requester's own topic only; asking for another device's
    is refused unanswered (the ACL also keeps each device to its own request topic)."""
    msg = mqtt.MQTTMessage(topic=b"modelward/f/repo/req/evil")
    msg.payload = _req()
    msg.properties = SimpleNamespace(  # type: ignore[assignment]
        CorrelationData=b"c" * 16, ResponseTopic=RESP.format("dev-1"))
    harness.bridge._on_message(msg)  # noqa: SLF001
    harness.request("evil", _req(), corr=b"x" * 65)  # oversized correlation data
    harness.request("dev-1", _req())
    assert harness.wait(1) == [("dev-1", 200, 0, b"R" * 64)]
    time.sleep(0.2)
    assert len(harness.sent) == 1 and harness.bridge.stats.refused == 2


@pytest.mark.parametrize("path", ["metadata/../../etc/passwd", "/etc/passwd", "keys/root.pem",
                                  "metadata/link", "targets", "metadata/\x00"])
def test_i14_paths_outside_the_served_files_are_refused(
    harness: _Harness, tmp_path: Path, path: str,
) -> None:
    (tmp_path / "metadata" / "link").symlink_to("/etc/passwd")
    harness.request("evil", _req(path=path))
    harness.request("dev-1", _req())
    sent = harness.wait(2)
    evil = [s for s in sent if s[0] == "evil"]
    assert len(evil) == 1 and evil[0][1] in (400, 404) and evil[0][3] == b""
    assert ("dev-1", 200, 0, b"R" * 64) in sent
