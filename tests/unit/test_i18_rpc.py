"""Issue 18 step 2c: the operator request channel's pure parts (request bounds, chunked
answers, the device's admission in paho's thread) and its broker ACL."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from modelward.agent._rpc import RpcConfig, RpcServer
from modelward.publisher._broker_config import dynsec_document, roles
from modelward.publisher._devrpc import percentile
from modelward.trust.errors import LocalDeviceError
from modelward.updater.transport._rpc import (
    CHUNK_BYTES,
    MAX_PARTS,
    Assembly,
    Request,
    RpcFormatError,
    answer_chunks,
    parse_chunk,
    parse_request,
    req_topic,
)

P = "modelward/f"
TOPIC = req_topic(P, "dev-1")
NONCE = bytes(range(32))


def _req(**kw: Any) -> bytes:
    doc: dict[str, Any] = {"kind": "attest", "nonce": NONCE.hex(), **kw}
    return json.dumps(doc).encode()


def test_a_request_parses_back() -> None:
    assert parse_request(_req(), "r") == Request("attest", NONCE)
    a = Request("audit", NONCE, 512, 256)
    assert parse_request(a.to_bytes(), "r") == a
    old = Request("audit", NONCE, 0, 256, "old")  # the kept older segment
    assert parse_request(old.to_bytes(), "r") == old and b"segment" not in a.to_bytes()


@pytest.mark.parametrize("payload", [
    _req(nonce="ab" * 15),  # 15 bytes
    _req(nonce="ab" * 65),  # 65 bytes
    _req(nonce="AB" * 16),  # uppercase
    _req(nonce="abc" * 11),  # odd length
    _req(nonce=1234),
    _req(kind="shell"),
    _req(extra=1),  # an unknown key
    _req(offset=1),  # audit keys on an attest request
    json.dumps({"kind": "audit", "nonce": NONCE.hex(), "limit": 257}).encode(),
    json.dumps({"kind": "audit", "nonce": NONCE.hex(), "offset": -1}).encode(),
    json.dumps({"kind": "audit", "nonce": NONCE.hex(), "offset": True}).encode(),
    json.dumps({"kind": "audit", "nonce": NONCE.hex(), "segment": "../x"}).encode(),
    _req(segment="old"),  # an audit key on an attest request
    _req(nonce=[NONCE.hex()]),  # depth 2
    b"[" * 5000,
    b"{" + b" " * 2000 + b"}",  # over MAX_REQUEST
    b"\xff\xfe",
    b"[]",
], ids=lambda p: p[:40].decode(errors="replace"))
def test_requests_out_of_bounds_are_refused(payload: bytes) -> None:
    with pytest.raises(RpcFormatError):
        parse_request(payload, "the request")


def test_a_large_answer_is_chunked_and_reassembled_in_any_order() -> None:
    doc = {"entries": ["x" * 1000] * 150}  # ~150 KiB: 4 chunks
    chunks = answer_chunks(Request("audit", NONCE), doc)
    assert 1 < len(chunks) <= MAX_PARTS
    assert all(len(c) <= CHUNK_BYTES + 512 for c in chunks)
    asm, out = Assembly(), None
    for c in [*reversed(chunks), chunks[0]]:  # reversed, and a duplicate
        got = asm.add(parse_chunk(c, "a"), "a")
        out = got if got is not None else out
    assert out is not None and json.loads(out) == doc


def test_an_answer_beyond_the_chunk_bound_is_refused_by_the_device() -> None:
    with pytest.raises(RpcFormatError):
        answer_chunks(Request("audit", NONCE), {"x": "y" * (MAX_PARTS * CHUNK_BYTES)})


@pytest.mark.parametrize("payload", [
    b"no header",
    b'{"v":2,"kind":"attest","nonce":"00","part":0,"parts":1}\n{}',
    b'{"v":1,"kind":"attest","nonce":"00","part":1,"parts":1}\n{}',
    b'{"v":1,"kind":"attest","nonce":"00","part":0,"parts":33}\n{}',
    b'{"v":1,"kind":"attest","nonce":"zz","part":0,"parts":1}\n{}',
    b'{"v":1,"kind":"attest","nonce":"00","part":0,"parts":2,"error":"x"}\n',
    b'{"v":1,"kind":"attest","nonce":"00","part":0,"parts":1}\n' + b"x" * (CHUNK_BYTES + 1),
])
def test_malformed_chunks_are_refused(payload: bytes) -> None:
    with pytest.raises(RpcFormatError):
        parse_chunk(payload, "a chunk")


def test_chunks_disagreeing_on_parts_are_refused() -> None:
    asm = Assembly()
    c = answer_chunks(Request("audit", NONCE), {"e": "x" * CHUNK_BYTES})
    asm.add(parse_chunk(c[0], "a"), "a")
    bad = parse_chunk(c[1].replace(b'"parts":2', b'"parts":3'), "a")
    with pytest.raises(RpcFormatError):
        asm.add(bad, "a")


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _server(handler: Any, clock: _Clock, cfg: RpcConfig | None = None
            ) -> tuple[RpcServer, list[tuple[bytes, bytes]], threading.Event]:
    sent: list[tuple[bytes, bytes]] = []
    release = threading.Event()

    def send(payload: bytes, corr: bytes) -> None:
        sent.append((payload, corr))

    return RpcServer(TOPIC, send, {"attest": handler}, cfg, clock=clock), sent, release


def _wait(pred: Any, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_a_flood_is_rate_limited_and_queued_at_most_8_and_answered_off_pahos_thread(
) -> None:
    clock = _Clock()
    gate = threading.Event()
    threads: list[str] = []

    def handler(req: Request) -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        gate.wait(10)
        return {"ok": req.nonce.hex()}

    srv, sent, _ = _server(handler, clock, RpcConfig(rate=4, burst=4, queue=8))
    try:
        for _ in range(100):  # one instant: the bucket admits its burst
            srv.on_message(TOPIC, _req(), False, b"c1")
        assert srv.dropped == 96
        for _ in range(40):  # 10 s later: the bucket refilled, the queue bounds the rest
            clock.t += 0.25
            srv.on_message(TOPIC, _req(), False, b"c1")
        # the rate admits 4 + 40; the queue holds 8 (and the worker perhaps one): dropped
        assert 140 - 9 <= srv.dropped <= 140 - 8
        gate.set()
        _wait(lambda: srv.answered == 140 - srv.dropped)
        assert set(threads) == {"rpc"}  # never the caller's (paho's) thread
        assert all(c == b"c1" for _, c in sent)
    finally:
        gate.set()
        srv.close()


@pytest.mark.parametrize("topic,payload,retain,corr", [
    (req_topic(P, "dev-2"), _req(), False, b"c"),  # another device's topic
    (TOPIC, _req(), True, b"c"),  # retained
    (TOPIC, _req(), False, None),  # no correlation data
    (TOPIC, _req(), False, b"c" * 65),  # too much of it
    (TOPIC, b" " * 2000, False, b"c"),  # too large
])
def test_requests_dropped_before_the_queue(topic: str, payload: bytes, retain: bool,
                                           corr: bytes | None) -> None:
    calls: list[Request] = []
    srv, sent, _ = _server(lambda r: calls.append(r) or {}, _Clock())
    try:
        srv.on_message(topic, payload, retain, corr)
        assert srv.dropped == 1
        srv.on_message(TOPIC, _req(), False, b"ok")  # the control
        _wait(lambda: len(sent) == 1)
        assert len(calls) == 1 and sent[0][1] == b"ok"
    finally:
        srv.close()


def test_a_failing_handler_answers_its_error_and_the_worker_lives_on() -> None:
    def handler(req: Request) -> dict[str, Any]:
        raise LocalDeviceError("the TPM is gone")

    clock = _Clock()
    srv, sent, _ = _server(handler, clock)
    try:
        srv.on_message(TOPIC, _req(), False, b"c")
        srv.on_message(TOPIC, b'{"kind":"audit"}', False, b"c")  # malformed: no answer
        clock.t += 1
        srv.on_message(TOPIC, json.dumps({"kind": "audit", "nonce": NONCE.hex()}).encode(),
                       False, b"d")  # no audit handler: an error answer
        _wait(lambda: len(sent) == 2)
        first, second = (parse_chunk(p, "a") for p, _ in sent)
        assert first.error == "LocalDeviceError: the TPM is gone" and first.nonce == NONCE
        assert second.error is not None and "not supported" in second.error
        assert srv.failed == 3 and srv.answered == 0
    finally:
        srv.close()


def test_the_acl_gives_each_device_only_its_own_request_and_response(tmp_path: Path
                                                                      ) -> None:
    acl = {r["rolename"]: {(a["acltype"], a["topic"]) for a in r["acls"]}  # type: ignore
           for r in roles("f", ["dev-1", "dev-2"])}
    listen = acl["device-listen:dev-1"]
    assert ("subscribeLiteral", "modelward/f/devices/dev-1/rpc/req") in listen
    assert ("publishClientReceive", "modelward/f/devices/dev-1/rpc/req") in listen
    assert ("publishClientSend", "modelward/f/devices/dev-1/rpc/resp") in listen
    assert not any("dev-2" in t for _, t in listen)
    assert not any(k != "publishClientSend" and t.endswith("rpc/resp") for k, t in listen)
    assert not any("rpc" in t for _, t in acl["device-fetch:dev-1"])
    op = acl["modelward-operator"]
    assert ("publishClientSend", "modelward/f/devices/+/rpc/req") in op
    assert ("subscribePattern", "modelward/f/devices/+/rpc/resp") in op
    assert not any(k != "publishClientSend" and "rpc/req" in t for k, t in op)
    assert not any("rpc" in t for _, t in acl["modelward-bridge"])
    doc = dynsec_document("f", {"dev-1": "p"})
    assert any(r["rolename"] == "device-listen:dev-1" for r in doc["roles"])  # type: ignore


def test_percentile() -> None:
    assert percentile([], 0.95) is None
    assert percentile([5.0], 0.95) == 5.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    assert percentile([float(i) for i in range(1, 11)], 0.5) == 5.0
    assert percentile([float(i) for i in range(1, 11)], 0.95) == 10.0
