"""A hostile TLS origin against the in-place range reader (updater/transport/_fetcher:
``_pieces``/``_body_readinto``): a forged second response after a body longer than it
states (the connection must not be reused), Transfer-Encoding chunked plus a
Content-Length with no terminating chunk, a stall right after the last stated byte, a
stall in the middle of the body (a typed transfer failure, resumed, not a refusal), a
Content-Length that disagrees with the range, a 206 for another range, and a body in
tiny TLS records (memory stays bounded)."""

from __future__ import annotations

import hashlib
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.simulator._pki import CertPair
from modelward.updater.idle import Gate
from modelward.updater.install import _delta
from modelward.updater.transport._ranges import RangeAnswerError
from tests.integration.test_i16_ranges import DATA, _fetch, _https, _Origin


@pytest.fixture(scope="module")
def origin(pki: tuple[CertPair, CertPair]) -> Iterator[_Origin]:
    o = _Origin(pki[1])
    conns = [0]
    real = o.server.process_request

    def counting(request: Any, client_address: Any) -> None:
        conns[0] += 1
        real(request, client_address)

    o.server.process_request = counting  # type: ignore[method-assign]
    o.conns = conns  # type: ignore[attr-defined]
    try:
        yield o
    finally:
        o.close()


def _cr(first: int, n: int) -> str:
    return f"bytes {first}-{first + n - 1}/{len(DATA)}"


def _stall(first: bytes, seconds: float = 20.0) -> Iterator[bytes]:
    yield first
    time.sleep(seconds)  # (keeps the connection open, sends nothing more)


def test_a17_a_forged_second_response_after_the_body_is_never_read(
        origin: _Origin, pki: tuple[CertPair, CertPair]) -> None:
    off, n = 40_000, 300_000
    forged = (f"HTTP/1.1 206 Partial Content\r\nContent-Range: {_cr(5, 10)}\r\n"
              "Content-Length: 10\r\n\r\n").encode() + b"X" * 10
    origin.answer = lambda rs: (206, {"Content-Range": _cr(off, n), "Content-Length": str(n)},
                                iter([DATA[off:off + n] + forged]))
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    before = origin.conns[0]  # type: ignore[attr-defined]
    assert _fetch(f, origin.url + "/x", [(off, n)]) == DATA[off:off + n]
    origin.answer = lambda rs: (206, {"Content-Range": _cr(5, 10), "Content-Length": "10"},
                                iter([DATA[5:15]]))
    assert _fetch(f, origin.url + "/x", [(5, 10)]) == DATA[5:15]  # (not the forged X)
    assert origin.conns[0] - before == 2  # type: ignore[attr-defined]  # a new connection


def _chunked(data: bytes, size: int = 70_000) -> bytes:
    out = bytearray()
    for i in range(0, len(data), size):
        part = data[i:i + size]
        out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
    return bytes(out)  # (no terminating 0-chunk)


def test_a17_chunked_plus_content_length_then_a_stall_ends_at_the_range(
        origin: _Origin, pki: tuple[CertPair, CertPair]) -> None:
    off, n = 1000, 500_000
    origin.answer = lambda rs: (206, {"Content-Range": _cr(off, n),
                                      "Content-Length": str(n // 2),  # (ignored: chunked)
                                      "Transfer-Encoding": "chunked"},
                                _stall(_chunked(DATA[off:off + n])))
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    t = time.monotonic()
    assert _fetch(f, origin.url + "/x", [(off, n)]) == DATA[off:off + n]
    assert time.monotonic() - t < 3  # (the range ended: no wait for the terminator)


def test_a17_a_stall_after_the_last_stated_byte_does_not_hold_the_fetch(
        origin: _Origin, pki: tuple[CertPair, CertPair]) -> None:
    off, n = 77, 1_000_000
    origin.answer = lambda rs: (206, {"Content-Range": _cr(off, n), "Content-Length": str(n)},
                                _stall(DATA[off:off + n]))
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    t = time.monotonic()
    assert _fetch(f, origin.url + "/x", [(off, n)]) == DATA[off:off + n]
    assert time.monotonic() - t < 3


def test_a17_a_stall_inside_the_body_is_a_typed_transfer_failure(
        origin: _Origin, pki: tuple[CertPair, CertPair]) -> None:
    off, n = 0, 1_000_000
    origin.answer = lambda rs: (206, {"Content-Range": _cr(off, n), "Content-Length": str(n)},
                                _stall(DATA[off:off + n // 2]))
    f = _https(origin.url, pki[0].cert, read_timeout=1, min_speed=1)
    t = time.monotonic()
    handed = 0
    with pytest.raises(tuf_exc.DownloadError) as ei:
        for p_off, piece in f.fetch_ranges(origin.url + "/x", [(off, n)]):
            assert bytes(piece) == DATA[p_off:p_off + len(piece)]
            handed += len(piece)
    assert not isinstance(ei.value, RangeAnswerError)  # (resumed later, not refused)
    assert handed <= n // 2
    assert time.monotonic() - t < 4


@pytest.mark.parametrize("case", ["longer", "shorter", "other range", "wider range",
                                  "206 without Content-Range, not multipart"])
def test_a17_an_answer_that_disagrees_with_the_range_is_refused(
        origin: _Origin, pki: tuple[CertPair, CertPair], case: str) -> None:
    off, n = 10_000, 200_000
    body = DATA[off:off + n]
    headers = {
        "longer": {"Content-Range": _cr(off, n), "Content-Length": str(n + 100)},
        "shorter": {"Content-Range": _cr(off, n), "Content-Length": str(n - 100)},
        "other range": {"Content-Range": _cr(off + 1, n), "Content-Length": str(n)},
        "wider range": {"Content-Range": _cr(off, n + 1), "Content-Length": str(n + 1)},
        "206 without Content-Range, not multipart": {"Content-Length": str(n)},
    }[case]
    origin.answer = lambda rs: (206, headers, iter([body + b"\0" * 100]))
    f = _https(origin.url, pki[0].cert, read_timeout=2)
    handed = 0
    with pytest.raises(RangeAnswerError):
        for _, piece in f.fetch_ranges(origin.url + "/x", [(off, n)]):
            handed += len(piece)
    assert handed == 0  # (refused on the headers: nothing of the body handed on)


def test_a17_a_body_in_tiny_tls_records_keeps_memory_bounded(
        origin: _Origin, pki: tuple[CertPair, CertPair]) -> None:
    off, n, rec = 0, 1 << 20, 256

    def tiny() -> Iterator[bytes]:
        for i in range(off, off + n, rec):
            yield DATA[i:i + rec]  # (one TLS record each)

    origin.answer = lambda rs: (206, {"Content-Range": _cr(off, n), "Content-Length": str(n)},
                                tiny())
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    got, pieces = bytearray(), 0
    tracemalloc.start()
    try:
        for p_off, piece in f.fetch_ranges(origin.url + "/x", [(off, n)]):
            assert p_off == off + len(got)
            got += piece
            pieces += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bytes(got) == DATA[off:off + n]
    assert pieces < n // rec // 4  # (records gathered into chunks, not a piece each)
    assert peak < 2 * n + (8 << 20)  # (the received bytes themselves, plus little)
    assert threading.active_count() < 50


# --- real TLS, the whole pipeline: an altered chunk hidden behind a cut connection ---------


def test_a17_real_tls_altered_chunk_then_close_is_refused_as_altered(
        origin: _Origin, pki: tuple[CertPair, CertPair], tmp_path: Path) -> None:
    from tests.integration._i16_delta import big_model

    bundle = tmp_path / "classifier-1.0.0.tar"
    build_bundle(big_model(tmp_path / "m.onnx"), "classifier", "1.0.0", bundle,
                 options=BuildOptions())
    data = bundle.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    ix = build_index(bundle, sha)
    tf = TargetFile(len(data), {"sha256": sha}, "classifier/f.tar")
    chunks = [(c.offset, c.length) for f in ix.files for c in f.chunks]
    k = len(chunks) // 2
    off, n = chunks[k]
    bad = bytearray(data)
    bad[off + n // 2] ^= 0x40
    cut = off + n + 1  # (the connection is closed one byte after chunk k)

    def answer(rs: list[tuple[int, int]]) -> tuple[int, dict[str, str], Iterator[bytes]]:
        assert len(rs) == 1, rs  # (nothing held: one coalesced range)
        a, ln = rs[0]
        return 206, {"Content-Range": f"bytes {a}-{a + ln - 1}/{len(data)}",
                     "Content-Length": str(ln), "Connection": "close"}, \
            iter([bytes(bad[a:min(a + ln, cut)])])

    origin.answer = answer
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    staging = tmp_path / "state" / "staging"
    staging.parent.mkdir()
    with pytest.raises(_delta.DeltaChunkError):
        _delta.assemble(ix, tf, origin.url + "/f.tar", f, staging, staging / "incoming", [],
                        Gate())


def test_a17_multipart_overstating_its_length_then_stalling_fails_typed_and_in_time(
        origin: _Origin, pki: tuple[CertPair, CertPair]) -> None:
    from tests.integration.test_i16_ranges import _MP, _honest

    ranges = [(1000, 500), (7_000, 9000)]
    body = b"".join(_honest(ranges))
    origin.answer = lambda rs: (206, {**_MP, "Content-Length": str(len(body) + 50)},
                                _stall(body))
    f = _https(origin.url, pki[0].cert, read_timeout=1)
    got = bytearray()
    t = time.monotonic()
    with pytest.raises(tuf_exc.DownloadError) as ei:  # (typed: a transfer failure)
        for p_off, piece in f.fetch_ranges(origin.url + "/x", ranges):
            assert bytes(piece) == DATA[p_off:p_off + len(piece)]
            got += piece
    assert not isinstance(ei.value, RangeAnswerError)  # (resumed, not refused)
    assert time.monotonic() - t < 4  # (read_timeout, not for ever)
