"""Issue 14, must-show 7: the bridge's send queue, its file opening and its exception
paths, in memory (``Bridge(connect=False)`` with a stand-in for paho's client)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from modelward.publisher import _bridge as bridge_mod
from modelward.publisher._bridge import SENT_ENTRIES, Bridge
from modelward.publisher._fairness import BridgeLimits, SendQueue
from modelward.publisher.errors import OperatorInputError
from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqtt import BLOCK_HEADER

PREFIX = "modelward/f"


class _Client:
    """paho's publish as the bridge uses it; ``ack``: the broker acknowledges at once."""

    def __init__(self, ack: bool = True) -> None:
        self.ack = ack
        self.sent: list[tuple[bytes, bytes]] = []  # (correlation data, payload)
        self._mid = 0

    def publish(self, topic: str, payload: bytes, qos: int = 0,
                properties: Any = None) -> mqtt.MQTTMessageInfo:
        self._mid += 1
        info = mqtt.MQTTMessageInfo(self._mid)
        info.rc = mqtt.MQTT_ERR_SUCCESS
        if self.ack:
            info._set_as_published()
        self.sent.append((bytes(properties.CorrelationData), bytes(payload)))
        return info


def _bridge(repo: Path, ack: bool = True, **lim: Any) -> tuple[Bridge, _Client]:
    (repo / "metadata").mkdir(parents=True, exist_ok=True)
    (repo / "targets").mkdir(exist_ok=True)
    b = Bridge(repo, MqttConfig(host="", port=0, fleet="f", client_name="br"),
               limits=BridgeLimits(**lim) if lim else None, connect=False)
    client = _Client(ack)
    b._conn = SimpleNamespace(client=client, lost=threading.Event(),  # type: ignore[assignment]
                              close=lambda: None)
    return b, client


def _msg(payload: bytes, i: int, device: str = "dev-2") -> Any:
    props = SimpleNamespace(CorrelationData=i.to_bytes(4, "big"),
                            ResponseTopic=f"{PREFIX}/devices/{device}/repo/resp")
    return SimpleNamespace(topic=f"{PREFIX}/repo/req/{device}", payload=payload,
                           properties=props, retain=False)


def _req(path: str, length: int = 100) -> bytes:
    return json.dumps({"path": path, "offset": 0, "length": length, "format": 2}).encode()


def _statuses(client: _Client, n: int) -> dict[int, int]:
    end = time.monotonic() + 5
    while len(client.sent) < n and time.monotonic() < end:
        time.sleep(0.01)
    return {int.from_bytes(c, "big"): int(BLOCK_HEADER.unpack(p[:BLOCK_HEADER.size])[1])
            for c, p in client.sent}


# --- SendQueue: pure ---------------------------------------------------------------

def test_i14_send_queue_releases_acknowledged_answers_and_stays_bounded() -> None:
    acked: set[int] = set()
    q: SendQueue[int] = SendQueue(4, 100, 30.0, lambda i: i in acked)
    assert q.room(1000, 0.0)  # empty: one answer larger than the bound still goes out
    for i in range(4):
        q.add(i, 10, 0.0)
    assert not q.room(0, 0.0)  # 4 entries: full by count
    acked.update({1, 2, 3})  # the one in front is not acknowledged
    assert q.room(0, 0.0) and len(q) == 1 and q.bytes == 10 and q.oldest() == 0
    q.add(4, 85, 0.0)
    assert not q.room(10, 0.0) and q.room(5, 0.0)  # full by bytes: 95 of 100
    assert q.room_for_refusal(0.0)  # bytes do not silence refusals
    q.add(6, 1, 0.0)
    q.add(7, 1, 0.0)
    assert not q.room_for_refusal(0.0)  # the count does
    assert q.room(100, 31.0) and len(q) == 0 and q.bytes == 0  # timed out: not counted
    acked.add(5)
    q.add(5, 10, 40.0)
    q.prune(40.0)
    assert len(q) == 0 and list(q) == []


# --- the bridge's send queue ------------------------------------------------------

def test_i14_unacknowledged_refusals_are_bounded_by_count(tmp_path: Path) -> None:
    """A broker that acknowledges nothing (or devices flooding bad requests faster than
    PUBACKs come): at most SENT_ENTRIES answers are held, of one device at most its share
    (DEVICE_SENT_ENTRIES, issue 17); the rest are not sent."""
    b, client = _bridge(tmp_path / "repo", ack=False, requests_per_s=1e9,
                        request_burst=10**9)
    share = bridge_mod.DEVICE_SENT_ENTRIES
    devices = -(-SENT_ENTRIES // share) + 1
    try:
        for i in range(SENT_ENTRIES + 500):
            b._on_message(_msg(b"[", i))  # (one device: its share)
        assert len(b._sent) == share == len(client.sent)
        assert b.stats.dropped == SENT_ENTRIES + 500 - share
        for d in range(devices):
            for i in range(share + 10):
                b._on_message(_msg(b"[", i, device=f"many-{d}"))
        assert len(b._sent) == SENT_ENTRIES == len(client.sent)
        assert b.stats.refused == SENT_ENTRIES + 500 + devices * (share + 10)
    finally:
        b.close()


def test_i14_acknowledged_refusals_are_released_without_any_job(tmp_path: Path) -> None:
    b, client = _bridge(tmp_path / "repo", requests_per_s=1e9, request_burst=10**9)
    try:
        for i in range(3 * SENT_ENTRIES):
            b._on_message(_msg(b"not json", i))
        assert len(client.sent) == 3 * SENT_ENTRIES and b.stats.dropped == 0
        assert len(b._sent) <= 1  # each send released the acknowledged ones before it
        time.sleep(0.7)  # the idle worker prunes too
        assert len(b._sent) == 0
    finally:
        b.close()


# --- opening files: no symlink followed, regular files only, no descriptor leaked ---

def test_i14_no_symlink_anywhere_below_the_repository_is_followed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    b, client = _bridge(repo, device_queue=1000, requests_per_s=1e9, request_burst=10**9)
    t = repo / "targets"
    (repo / "private").mkdir()
    (repo / "private" / "k").write_bytes(b"K" * 100)
    (t / "a.bin").write_bytes(b"A" * 100)
    (t / "sub").mkdir()
    (t / "sub" / "b.bin").write_bytes(b"B" * 100)
    os.link(t / "a.bin", t / "hard.bin")  # a hard link is one regular file: served
    (t / "alias").symlink_to("a.bin")  # even within targets/ (the publisher writes none)
    (t / "pdir").symlink_to("../private")  # a symlinked directory component
    (t / "meta").symlink_to("../metadata")  # into the other served directory
    (t / "ldir").symlink_to("ldir")  # a loop as a directory component
    (t / "null").symlink_to("/dev/null")
    (repo / "metadata" / "root.json").symlink_to("../private/k")
    os.mkfifo(t / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(t / "sock"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_bytes(b"X" * 100)
    paths = {"targets/a.bin": 200, "targets/sub/b.bin": 200, "targets/hard.bin": 200,
             "targets/alias": 404, "targets/pdir/k": 404, "targets/meta/root.json": 404,
             "targets/ldir/x": 404, "targets/ldir": 404, "targets/null": 404,
             "metadata/root.json": 404, "targets/fifo": 404, "targets/sock": 404,
             "targets/sub": 404, "targets/" + "n" * 300: 404, "targets/\udcff": 400,
             "targets/a.bin/x": 404, "private/k": 400, "targets": 400}
    # (a lone surrogate is not printable: check_member_path refuses it as an unsafe path,
    # 400, as bundle paths must be printable since 2c70f25; it was a failed open, 404)
    def open_in_repo() -> list[str]:
        out = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                out.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [p for p in out if p.startswith(str(tmp_path)) and "sock" not in p]

    try:
        names = list(paths)
        for i, p in enumerate(names * 5):
            b._on_message(_msg(_req(p), i))
        got = _statuses(client, 5 * len(names))
        assert {names[i % len(names)]: st for i, st in got.items()} == paths
        assert all(b"K" * 100 not in p for _, p in client.sent)
        assert open_in_repo() == []  # every descriptor closed
        assert b.stats.errors == 0
        # the served directory itself a symlink (to another disk): refused as well
        os.rename(t, other / "targets")
        t.symlink_to(other / "targets")
        b._on_message(_msg(_req("targets/a.bin"), 999))
        assert _statuses(client, 5 * len(names) + 1)[999] == 404
    finally:
        s.close()
        b.close()


def test_i14_a_symlinked_served_directory_is_refused_at_start(tmp_path: Path) -> None:
    """A careless operator: targets/ a symlink to another disk. Nothing below the
    repository is followed, so the bridge says so at start instead of answering 404."""
    repo = tmp_path / "repo"
    (repo / "metadata").mkdir(parents=True)
    (tmp_path / "disk").mkdir()
    (repo / "targets").symlink_to(tmp_path / "disk")
    with pytest.raises(OperatorInputError, match=r"targets is a symlink"):
        Bridge(repo, MqttConfig(host="", port=0, fleet="f", client_name="br"),
               connect=False)


# --- exception paths: answered, counted, logged at most ~1/s -----------------------

@pytest.mark.xdist_group("machine")
def test_i14_a_raising_admission_is_cheap_and_its_log_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    b, _ = _bridge(tmp_path / "repo", requests_per_s=1e9, request_burst=10**9)

    class Nasty(RuntimeError):
        def __str__(self) -> str:
            raise ValueError("no message for you")

    def boom(*_a: Any) -> Any:
        raise Nasty() if _a[0] == b"[]" else RuntimeError("x" * 100_000)

    monkeypatch.setattr(bridge_mod, "parse_request", boom)
    try:
        t = time.perf_counter()
        # first (the log's bucket is full): a topic that is not UTF-8 (msg.topic raises
        # in _admit), and an exception whose __str__ raises
        m = mqtt.MQTTMessage(topic=b"modelward/f/repo/req/\xff\xfe")
        b._on_message(m)
        m = mqtt.MQTTMessage(topic=b"modelward/f/repo/req/dev-2")
        m.payload = b"[]"
        m.properties = SimpleNamespace(CorrelationData=b"c",  # type: ignore[assignment]
                                       ResponseTopic=f"{PREFIX}/devices/dev-2/repo/resp")
        b._on_message(m)
        assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 2
        for i in range(2000):
            b._on_message(_msg(b"{}", i))
        dt = time.perf_counter() - t
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert b.stats.errors == 2002
        assert len(errors) <= 6, len(errors)
        assert all(len(r.getMessage()) < 600 for r in errors)
        assert dt < 2.0, dt
    finally:
        b.close()


def test_i14_a_raising_read_is_answered_500_and_its_log_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    b, client = _bridge(tmp_path / "repo")

    def boom(*_a: Any) -> Any:
        raise RuntimeError("a filesystem surprise")

    monkeypatch.setattr(b, "_read", boom)
    try:
        for i in range(30):
            b._on_message(_msg(_req("targets/a.bin"), i))
        end = time.monotonic() + 5
        while len(client.sent) < 30 and time.monotonic() < end:
            time.sleep(0.01)
        assert len(client.sent) == 30 and b.stats.errors == 30
        assert b._worker.is_alive()
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert 1 <= len(errors) <= 6, len(errors)
    finally:
        b.close()
