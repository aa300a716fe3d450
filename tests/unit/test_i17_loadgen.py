"""The load generator's simulated fetcher (issue 17) against a fake broker connection:
it verifies every block against its trusted hash, waits out busy answers, and fails (with
its reason) on a block that does not match; the raw MQTT codec round-trips its packets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct

import pytest

from modelward.simulator import _loadgen as lg
from modelward.simulator._mqttraw import Publish, encode_publish, parse_properties, varint
from modelward.updater.transport._mqtt import BLOCK_HEADER, BLOCK_MAGIC

BLOCK = 1024


class FakeClient:
    """Answers each request at once from ``data``, through ``answer`` (which may alter it)."""

    def __init__(self, data: bytes, inbox: asyncio.Queue[Publish], answer=None) -> None:
        self.data, self.inbox, self.closed = data, inbox, asyncio.Event()
        self.answer = answer or (lambda off, block, n: (200, block))
        self.requests: list[int] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, response_topic=None,
                correlation=None, header: bytes = b"") -> None:
        off = json.loads(payload)["offset"]
        self.requests.append(off)
        status, block = self.answer(off, self.data[off:off + BLOCK],
                                    self.requests.count(off))
        body = BLOCK_HEADER.pack(BLOCK_MAGIC, status, off, len(self.data)) + \
            (block if status == 200 else b"")
        self.inbox.put_nowait(Publish(response_topic, correlation, None, memoryview(body),
                                      False))


def _fetch(data: bytes, answer=None, trusted: bytes | None = None
           ) -> tuple[lg.DeviceResult, FakeClient, Exception | None]:
    cfg = lg.LoadConfig("127.0.0.1", 1, "", "f", "targets/x", block_size=BLOCK, window=4)
    blocks = lg.Blocks(len(data), tuple(
        hashlib.sha256((trusted or data)[o:o + BLOCK]).digest()
        for o in range(0, len(data), BLOCK)))

    async def go() -> tuple[lg.DeviceResult, FakeClient, Exception | None]:
        inbox: asyncio.Queue[Publish] = asyncio.Queue()
        client = FakeClient(data, inbox, answer)
        res = lg.DeviceResult("d1")
        try:
            await lg._blocks(cfg, client, "d1", blocks, inbox, res)  # type: ignore[arg-type]
        except lg._Failed as e:
            return res, client, e
        return res, client, None

    return asyncio.run(go())


def test_every_block_verified_and_counted() -> None:
    data = os.urandom(5 * BLOCK + 17)
    res, client, err = _fetch(data)
    assert err is None
    assert res.bytes == len(data)
    assert sorted(set(client.requests)) == list(range(0, len(data), BLOCK))


def test_a_block_not_matching_its_trusted_hash_fails_the_device() -> None:
    data = os.urandom(3 * BLOCK)
    trusted = data[:BLOCK] + bytes([data[BLOCK] ^ 1]) + data[BLOCK + 1:]
    res, _client, err = _fetch(data, trusted=trusted)
    assert isinstance(err, lg._Failed) and err.reason == "hash"
    assert res.bytes < len(data)  # the bad block is not counted as delivered


def test_a_short_block_fails_the_device() -> None:
    data = os.urandom(2 * BLOCK)
    _res, _client, err = _fetch(data, answer=lambda off, block, n: (200, block[:-1]))
    assert isinstance(err, lg._Failed) and err.reason == "hash"


def test_busy_answers_are_waited_out_and_asked_again() -> None:
    data = os.urandom(2 * BLOCK)
    res, client, err = _fetch(
        data, answer=lambda off, block, n: (503, b"") if n == 1 else (200, block))
    assert err is None and res.bytes == len(data)
    assert res.busy == 2 and client.requests.count(0) == 2


def test_an_error_status_fails_the_device() -> None:
    _res, _client, err = _fetch(os.urandom(BLOCK), answer=lambda off, block, n: (404, b""))
    assert isinstance(err, lg._Failed) and err.reason == "status 404"


def test_publish_header_and_properties_round_trip() -> None:
    head = encode_publish("a/b", qos=1, packet_id=7, response_topic="r/t",
                          correlation=b"\x00" * 16, payload_len=3)
    assert head[0] == 0x32  # PUBLISH, QoS 1
    n, mult, pos = 0, 0, 1
    while True:
        b = head[pos]
        n += (b & 0x7F) << mult
        pos += 1
        if not b & 0x80:
            break
        mult += 7
    assert n == len(head) - pos + 3
    body = memoryview(head[pos:] + b"xyz")
    tlen = struct.unpack(">H", body[:2])[0]
    assert bytes(body[2:2 + tlen]) == b"a/b"
    assert struct.unpack(">H", body[2 + tlen:4 + tlen])[0] == 7
    props, end = parse_properties(body, 4 + tlen)
    assert props == {0x08: b"r/t", 0x09: b"\x00" * 16}
    assert bytes(body[end:]) == b"xyz"


@pytest.mark.parametrize("n", [0, 127, 128, 16383, 16384, 2_097_152, 268_435_455])
def test_varint_lengths(n: int) -> None:
    enc = varint(n)
    assert len(enc) == 1 + (n >= 128) + (n >= 16384) + (n >= 2_097_152)
    value = sum((b & 0x7F) << (7 * i) for i, b in enumerate(enc))
    assert value == n
