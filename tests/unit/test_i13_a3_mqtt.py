"""Attacker review of issue 13 "bounded before verified": the broker / bridge identity.

The fetcher's block loop is driven with a fake connection whose "broker" answers each
request with the attacker's message (correlation data copied from the request, as the
broker and the bridge identity see it); the announcement listener gets payloads directly.
What works is marked xfail.
"""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from tuf.api import exceptions as tuf_exc

from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqtt import MqttFetcher, block_header
from modelward.updater.transport._mqttconn import AnnouncementListener

CFG = MqttConfig(host="h", port=1, fleet="f", client_name="d", block_size=64,
                 block_timeout=0.2, max_retries=1)


def _msg(payload: bytes, corr: bytes, props: list[tuple[str, str]] | None = None) -> Any:
    msg = mqtt.MQTTMessage(topic=b"modelward/f/devices/d/repo/resp")
    msg.payload = payload
    msg.properties = SimpleNamespace(  # type: ignore[assignment]
        CorrelationData=corr, UserProperty=props or [])
    return msg


class _Conn:
    """A connection whose broker answers every request with ``answer(offset, corr)``."""

    def __init__(self, f: MqttFetcher, answer: Any) -> None:
        self.f, self.answer = f, answer
        self.lost = SimpleNamespace(is_set=lambda: False)
        self.requests = 0

    def subscribe(self, _topic: str) -> None:
        pass

    def unsubscribe(self, _topic: str) -> None:
        pass

    def publish(self, _topic: str, body: bytes, props: Any) -> None:
        self.requests += 1
        off = json.loads(body)["offset"]
        for m in self.answer(off, props.CorrelationData):
            self.f._deliver(m)  # noqa: SLF001


def _fetch(answer: Any, max_length: int = 1 << 20) -> tuple[bytes, _Conn]:
    f = MqttFetcher(CFG)
    conn = _Conn(f, answer)
    f._connection = lambda: conn  # type: ignore[assignment,method-assign,return-value]  # noqa: SLF001
    return f.download_bytes("mqtt://repo/metadata/timestamp.json", max_length), conn


@pytest.mark.parametrize("status", ["\u00b2", "9" * 5000])
def test_a3_format1_status_that_is_no_number_is_a_download_error(status: str) -> None:
    def answer(off: int, corr: bytes) -> list[Any]:
        return [_msg(b"", corr, [("status", status)])]

    with pytest.raises(tuf_exc.DownloadError):
        _fetch(answer)


def test_a3_duplicate_reordered_and_foreign_blocks_are_ignored() -> None:
    """Refused: junk before, duplicates of, and blocks for other sessions around the real
    answer; the file arrives whole and once."""
    data = bytes(range(100))

    def answer(off: int, corr: bytes) -> list[Any]:
        block = block_header(200, off, len(data)) + data[off:off + 64]
        foreign = b"X" * 8 + corr[8:]
        return [_msg(block, foreign), _msg(block_header(200, off + 64, 100), corr),
                _msg(block, corr), _msg(block, corr),
                _msg(block_header(200, off, 10**6) + data[off:off + 64], corr)]

    got, _ = _fetch(answer)
    assert got == data


def test_a3_huge_announced_size_is_bounded_by_max_length() -> None:
    """Refused: a block saying the file is 2**63 bytes ends at TUF's max_length."""
    def answer(off: int, corr: bytes) -> list[Any]:
        return [_msg(block_header(200, off, 1 << 63) + b"z" * 64, corr)]

    with pytest.raises(tuf_exc.DownloadLengthMismatchError):
        _fetch(answer, max_length=640)


def test_a3_size_changing_between_blocks_is_a_download_error() -> None:
    def answer(off: int, corr: bytes) -> list[Any]:
        return [_msg(block_header(200, off, 1000 + off) + b"z" * 64, corr)]

    with pytest.raises(tuf_exc.DownloadError):
        _fetch(answer)


def test_a3_silent_broker_ends_in_a_download_error() -> None:
    """Refused: no answer at all ends after the retries (no hang)."""
    with pytest.raises(tuf_exc.DownloadError, match="no answer"):
        _fetch(lambda off, corr: [])


def test_a3_format1_bad_offset_size_is_ignored() -> None:
    def answer(off: int, corr: bytes) -> list[Any]:
        return [_msg(b"z" * 64, corr, [("status", "200"), ("offset", "x"), ("size", "9" * 5000)])]

    with pytest.raises(tuf_exc.DownloadError, match="no answer"):
        _fetch(answer)


# --- announcements ---------------------------------------------------------------------------


def _listener() -> tuple[AnnouncementListener, list[int]]:
    got: list[int] = []
    listener = object.__new__(AnnouncementListener)
    listener._cb = got.append  # noqa: SLF001
    return listener, got


def test_a3_deeply_nested_announcement_is_ignored() -> None:
    listener, got = _listener()
    listener._on_message(_msg(b"[" * 2000, b""))  # noqa: SLF001
    assert got == []


@pytest.mark.parametrize("payload", [
    b"{", b"[]", b'{"timestamp_version": true}', b'{"timestamp_version": -1}',
    b'{"timestamp_version": ' + b"9" * 5000 + b"}", b"\xff\xfe", b'"x"',
    b'{"timestamp_version": 1e400}',
])
def test_a3_malformed_announcements_are_ignored(payload: bytes) -> None:
    listener, got = _listener()
    listener._on_message(_msg(payload, b""))  # noqa: SLF001
    assert got == []


def test_a3_corr_offset_not_asked_for_is_ignored() -> None:
    """A block for an offset never asked (corr forged from the session) is dropped."""
    f = MqttFetcher(CFG)
    session = b"S" * 8
    msg = _msg(block_header(200, 4096, 5000) + b"z" * 64, session + struct.pack(">Q", 4096))
    assert f._accept(msg, session, "p", {0: (0.0, 0)}, None) is None  # noqa: SLF001


# --- what the fetcher holds while the download pauses ----------------------------------------


def test_a3_held_back_block_and_duplicate_flood_stay_within_one_window() -> None:
    import queue
    import threading

    mib = 1 << 20
    cfg = MqttConfig(host="h", port=1, fleet="f", client_name="d", block_timeout=30.0)
    f = MqttFetcher(cfg)
    size = cfg.window * mib
    data = bytes(mib)
    reqs: queue.Queue[tuple[int, bytes]] = queue.Queue()
    paused, resume = threading.Event(), threading.Event()
    accepted = [0]
    real_accept = f._accept  # noqa: SLF001

    def accept(*a: Any) -> Any:
        got = real_accept(*a)
        if got is not None:
            accepted[0] += len(got[1])
        return got

    f._accept = accept  # type: ignore[method-assign,assignment]  # noqa: SLF001

    def block(off: int, corr: bytes) -> Any:
        return _msg(block_header(200, off, size) + data, corr)

    class Conn(_Conn):
        def publish(self, _topic: str, body: bytes, props: Any) -> None:
            reqs.put((json.loads(body)["offset"], props.CorrelationData))

    f._connection = lambda: Conn(f, None)  # type: ignore[assignment,method-assign,return-value]  # noqa: SLF001
    held: list[int] = []
    yielded = [0]

    def broker() -> None:
        corrs: dict[int, bytes] = {}
        while len(corrs) < cfg.window:
            off, corr = reqs.get(timeout=10)
            corrs[off] = corr
            if off == 0:
                f._deliver(block(0, corr))  # noqa: SLF001
            elif off != mib:  # hold block 1 back
                f._deliver(block(off, corr))  # noqa: SLF001
        while accepted[0] < (cfg.window - 1) * mib:  # blocks 0 and 2..15 taken in
            threading.Event().wait(0.01)
        f._deliver(block(mib, corrs[mib]))  # noqa: SLF001
        paused.wait(10)  # the download loop now pauses on block 1
        while f._inbox.put(block(2 * mib, corrs[2 * mib])):  # noqa: SLF001
            pass
        held.append(f._inbox.bytes + accepted[0] - yielded[0])  # noqa: SLF001
        resume.set()

    f._deliver = f._inbox.put  # type: ignore[assignment,method-assign]  # noqa: SLF001
    t = threading.Thread(target=broker, daemon=True)
    t.start()
    chunks, _ = f.fetch_from("mqtt://repo/targets/x.tar", 0)
    for chunk in chunks:
        yielded[0] += len(chunk)
        if yielded[0] == 2 * mib:  # the gate pauses (device busy) on the second block
            paused.set()
            resume.wait(10)
    t.join(10)
    assert yielded[0] == size
    print(f"held by the fetcher during the pause: {held[0] / mib:.1f} MiB")
    assert held[0] <= cfg.queue_byte_limit() + mib, held
