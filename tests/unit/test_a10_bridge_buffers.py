"""Attacker a10bridge (session 10): the bridge's send queue against what it really holds.

Since c3f2589 a block is read (``os.preadv``) into a buffer sized for the *requested*
length plus its 22-byte header, then cut to what was read; that buffer is the payload
paho keeps (``_out_messages``) until the broker's PUBACK. Since 910172a the send queue
counts only the block's bytes (``_block_bytes``), guessing a format 2 header from the
payload's first four bytes.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from modelward.publisher._bridge import Bridge
from modelward.publisher._fairness import BridgeLimits
from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqtt import BLOCK_HEADER, BLOCK_MAGIC

RESP = "modelward/f/devices/{}/repo/resp"
MIB = 1 << 20


class _Info:
    """A paho MQTTMessageInfo the broker never acknowledges (until ``done`` is set)."""

    rc = mqtt.MQTT_ERR_SUCCESS

    def __init__(self) -> None:
        self.done = threading.Event()

    def is_published(self) -> bool:
        return self.done.is_set()

    def wait_for_publish(self, timeout: float) -> None:
        self.done.wait(timeout)


def _bridge(tmp: Path, content: bytes, send_bytes: int) -> tuple[Bridge, list[Any],
                                                                list[_Info]]:
    (tmp / "metadata").mkdir()
    (tmp / "metadata" / "f.bin").write_bytes(content)
    b = Bridge(tmp, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
               limits=BridgeLimits(send_bytes=send_bytes, bytes_per_s=0,
                                   queued_bytes=1 << 30),
               connect=False)
    held: list[Any] = []  # what paho would keep until the PUBACK: the payload object
    infos: list[_Info] = []

    def publish(topic: str, payload: Any, qos: int, properties: Any) -> _Info:
        held.append(payload)
        infos.append(_Info())
        return infos[-1]

    b._conn = SimpleNamespace(  # type: ignore[assignment]  # noqa: SLF001
        lost=threading.Event(), client=SimpleNamespace(publish=publish), close=lambda: None)
    return b, held, infos


def _ask(b: Bridge, corr: bytes, offset: int, length: int, fmt: int = 2) -> None:
    msg = mqtt.MQTTMessage(topic=b"modelward/f/repo/req/d")
    msg.payload = json.dumps({"path": "metadata/f.bin", "offset": offset, "length": length,
                              "format": fmt}).encode()
    msg.properties = SimpleNamespace(  # type: ignore[assignment]
        CorrelationData=corr, ResponseTopic=RESP.format("d"))
    b._on_message(msg)  # noqa: SLF001


def _settle(held: list[Any], n: int) -> None:
    deadline = time.monotonic() + 5
    while len(held) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # (and no more than that)


def test_a10_unacknowledged_answers_hold_no_more_than_the_send_queue_counts(
        tmp_path: Path) -> None:
    """One device asks, again and again, for a 1 MiB block at an offset that leaves
    512 KiB + 1 bytes of the file (the last block of any file whose size it knows from
    its metadata). The send queue lets 6 such answers out (room for one more 1 MiB block
    after 5 x (512 KiB + 1)); what paho keeps of them until their PUBACK must be about
    the 3 MiB counted, not 6 MiB."""
    tail = (512 << 10) + 1
    content = b"T" * (3 * MIB + tail)
    send = 4 * MIB
    b, held, infos = _bridge(tmp_path, content, send)
    try:
        for i in range(16):
            _ask(b, b"c%02d" % i, 3 * MIB, MIB)
        _settle(held, 6)
        with b._sent_lock:  # noqa: SLF001
            counted = b._sent.bytes  # noqa: SLF001
        assert len(held) == 6 and counted == 6 * tail <= send  # the queue's bound holds
        resident = sum(sys.getsizeof(p) for p in held)
        # each payload: its block, its header and an object's overhead (plus slack)
        assert resident <= counted + len(held) * (BLOCK_HEADER.size + 4096), \
            (resident, counted)
        assert resident <= send + 64 * 1024
    finally:
        for i in infos:
            i.done.set()
        b.close()


def test_a10_short_read_payload_is_exactly_the_bytes_read(tmp_path: Path) -> None:
    """A request past the file's end (a file shorter than the request, or offset == size)
    is answered with exactly what the file has: the header's size is the file's, and the
    payload (paho's copy until PUBACK) is not the requested length."""
    content = bytes(range(256)) * 40  # 10240 bytes
    b, held, infos = _bridge(tmp_path, content, 4 * MIB)
    try:
        _ask(b, b"a", 10000, MIB)
        _ask(b, b"b", len(content), MIB)
        _settle(held, 2)
    finally:
        for i in infos:
            i.done.set()
        b.close()
    assert len(held) == 2
    first, second = held
    assert bytes(first[BLOCK_HEADER.size:]) == content[10000:]
    assert BLOCK_HEADER.unpack(bytes(first[:BLOCK_HEADER.size]))[1:] == (
        200, 10000, len(content))
    assert len(second) == BLOCK_HEADER.size
    assert sys.getsizeof(first) < 64 * 1024 and sys.getsizeof(second) < 64 * 1024


def test_a10_a_format1_block_that_starts_with_the_magic_counts_in_full(
        tmp_path: Path) -> None:
    """Format 1 carries no header in its payload: whatever the file holds at the asked
    offset, the send queue counts every byte of it."""
    content = (BLOCK_MAGIC + b"\0" * 60) * 1024  # 64 KiB, b"MWB2" every 64 bytes
    b, held, infos = _bridge(tmp_path, content, 4 * MIB)
    try:
        _ask(b, b"a", 64, 4096, fmt=1)
        _settle(held, 1)
        with b._sent_lock:  # noqa: SLF001
            counted = b._sent.bytes  # noqa: SLF001
    finally:
        for i in infos:
            i.done.set()
        b.close()
    assert len(held) == 1 and bytes(held[0]) == content[64:64 + 4096]
    assert counted == 4096


# --- the origin side: the served file changes while the bridge reads it -----------------

def _truncate(p: Path, n: int) -> None:
    with open(p, "r+b") as f:
        f.truncate(n)


def _grow(p: Path, n: int) -> None:
    with open(p, "ab") as f:
        f.write(b"G" * n)


def _replace(p: Path, n: int) -> None:
    tmp = p.with_name("new")
    tmp.write_bytes(b"N" * n)
    os.replace(tmp, p)  # (the open descriptor keeps the old file)


def _fifo(p: Path, n: int) -> None:
    p.unlink()
    os.mkfifo(p)


@pytest.mark.parametrize(("change", "ignored"), [
    (lambda p: _truncate(p, 3 * MIB + 10), True),  # a short read, not at fstat's size
    (lambda p: _truncate(p, 0), True),  # nothing at all where fstat said 3.5 MiB
    (lambda p: _grow(p, 2 * MIB), True),  # more than fstat said
    (lambda p: _replace(p, 10), False),  # (the descriptor's file: as it was)
    (lambda p: _fifo(p, 0), False),
], ids=["truncated", "emptied", "grown", "replaced", "fifo"])
def test_a10_a_file_changed_during_preadv_gives_no_block_the_device_takes_as_good(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Any, ignored: bool) -> None:
    """Between the bridge's ``fstat`` and its ``preadv`` the served file is truncated,
    grown, replaced or swapped for a FIFO. The bridge still answers (no 500, its worker
    alive), and the device (``MqttFetcher._accept``) either ignores the block (and asks
    again) or takes one whose bytes agree with the size it says (the bundle's signed hash
    decides the rest)."""
    from modelward.updater.transport._mqtt import MqttFetcher
    from tests.unit.test_i13_a3_mqtt import _msg

    content = b"O" * (3 * MIB + (512 << 10))  # the last block: half of one
    b, held, infos = _bridge(tmp_path, content, 4 * MIB)
    path = tmp_path / "metadata" / "f.bin"
    real = os.preadv
    fired: list[int] = []

    def racing(fd: int, bufs: Any, offset: int, *a: Any) -> int:
        if not fired:
            fired.append(1)
            change(path)
        return real(fd, bufs, offset, *a)

    monkeypatch.setattr(os, "preadv", racing)
    session = b"S" * 8
    try:
        _ask(b, session + (3 * MIB).to_bytes(8, "big"), 3 * MIB, MIB)
        _settle(held, 1)
        assert b._worker.is_alive() and b.stats.errors == 0  # noqa: SLF001
    finally:
        for i in infos:
            i.done.set()
        b.close()
    assert fired and len(held) == 1
    payload = bytes(held[0])
    _, status, off, size = BLOCK_HEADER.unpack(payload[:BLOCK_HEADER.size])
    assert status == 200 and off == 3 * MIB
    f = MqttFetcher(MqttConfig(host="h", port=1, fleet="f", client_name="d"))
    got = f._accept(  # noqa: SLF001
        _msg(payload, session + (3 * MIB).to_bytes(8, "big")), session, "metadata/f.bin",
        {3 * MIB: (0.0, 0)}, None)
    assert (got is None) == ignored
    if got is not None:
        g_off, data, g_size = got
        assert bytes(data) == content[3 * MIB:]
        assert g_size == size and len(data) == min(MIB, size - g_off)
