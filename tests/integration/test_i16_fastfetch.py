"""The fast receive path of a full install (issue 16: range answers read in place by the
socket's reader, chunks hashed on the pool and written in order), through real TLS: a
hostile origin on loopback (a body longer than it states, a body cut short, a slowloris
trickle, a 200 instead of a 206) and real nginx (a chunk altered on the origin in the
middle of one coalesced read: refused, nothing of it written; then the resume fetches only
the chunks still missing, counted in nginx's access log)."""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.simulator._pki import CertPair
from modelward.updater.idle import Gate
from modelward.updater.install import _delta
from modelward.updater.transport._ranges import RangeAnswerError
from tests.conftest import World
from tests.integration.test_i16_ranges import DATA, _access, _https, _Origin


@pytest.fixture(scope="module")
def origin(pki: tuple[CertPair, CertPair]) -> Iterator[_Origin]:
    o = _Origin(pki[1])
    try:
        yield o
    finally:
        o.close()


def _single(first: int, n: int, body: Iterator[bytes], length: int | None = None,
            close: bool = False) -> tuple[int, dict[str, str], Iterator[bytes]]:
    h = {"Content-Range": f"bytes {first}-{first + n - 1}/{len(DATA)}",
         "Content-Length": str(n if length is None else length)}
    if close:
        h["Connection"] = "close"
    return 206, h, body


def _pieces(f: object, url: str, ranges: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
    out = []
    for off, piece in f.fetch_ranges(url, ranges):  # type: ignore[attr-defined]
        assert isinstance(piece, memoryview)  # (in place: no copy)
        out.append((off, bytes(piece)))
    return out


def test_a_body_longer_than_it_states_yields_only_the_stated_bytes(
        origin: _Origin, pki: tuple[CertPair, CertPair]) -> None:
    off, n = 12_345, 2_000_000
    origin.answer = lambda rs: _single(off, n, iter([DATA[off:off + n], b"EVIL" * 50_000]))
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    got = _pieces(f, origin.url + "/x", [(off, n)])
    assert b"".join(p for _, p in got) == DATA[off:off + n]
    assert got[0][0] == off and f.bytes_received == n
    # (the connection is not reused after a body read in place: the next answer is clean)
    origin.answer = lambda rs: _single(5, 10, iter([DATA[5:15]]))
    assert _pieces(f, origin.url + "/x", [(5, 10)]) == [(5, DATA[5:15])]


def test_a_body_cut_short_is_a_transfer_failure_not_a_refusal(
        origin: _Origin, pki: tuple[CertPair, CertPair]) -> None:
    off, n = 0, 1_000_000
    origin.answer = lambda rs: _single(off, n, iter([DATA[:300_000]]), close=True)
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    handed = 0
    with pytest.raises(tuf_exc.DownloadError, match="closed after 300000") as ei:
        for p_off, piece in f.fetch_ranges(origin.url + "/x", [(off, n)]):
            assert bytes(piece) == DATA[p_off:p_off + len(piece)]
            handed += len(piece)
    assert not isinstance(ei.value, RangeAnswerError)  # (resumed later, not refused)
    assert handed <= 300_000


def test_a_slowloris_range_body_is_cut_by_min_speed(
        origin: _Origin, pki: tuple[CertPair, CertPair]) -> None:
    def trickle() -> Iterator[bytes]:
        for i in itertools.count():
            time.sleep(0.05)
            yield DATA[i * 20:(i + 1) * 20]

    origin.answer = lambda rs: _single(0, 1_000_000, trickle(), close=True)
    f = _https(origin.url, pki[0].cert, read_timeout=5, min_speed=100_000,
               min_speed_window=0.5)
    t = time.monotonic()
    with pytest.raises(tuf_exc.SlowRetrievalError):
        list(f.fetch_ranges(origin.url + "/x", [(0, 1_000_000)]))
    assert time.monotonic() - t < 4  # (not read_timeout per byte, for ever)


def test_a_200_instead_of_a_206_yields_only_the_ranges(
        origin: _Origin, pki: tuple[CertPair, CertPair]) -> None:
    origin.answer = lambda rs: (200, {"Content-Length": str(len(DATA))}, iter([DATA]))
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    ranges = [(100, 1000), (2_000_000, 500_000)]
    got = _pieces(f, origin.url + "/x", ranges)
    assert b"".join(p for _, p in got) == DATA[100:1100] + DATA[2_000_000:2_500_000]
    assert all(any(o <= a and a + len(p) <= o + ln for o, ln in ranges) for a, p in got)


# --- real nginx: a chunk altered in the middle of one coalesced read, then the resume ------


def test_nginx_altered_chunk_mid_read_is_refused_then_resume_fetches_only_the_rest(
        world: World, tmp_path: Path) -> None:
    from tests.integration._i16_delta import big_model

    bundle = tmp_path / "classifier-1.0.0.tar"
    build_bundle(big_model(tmp_path / "m.onnx"), "classifier", "1.0.0", bundle,
                 options=BuildOptions())
    data = bundle.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    ix = build_index(bundle, sha)
    tf = TargetFile(len(data), {"sha256": sha}, "classifier/f.tar")
    chunks = [(c.offset, c.length) for f in ix.files for c in f.chunks]
    k = len(chunks) * 2 // 3
    off, n = chunks[k]
    served = world.repo_dir / "targets" / "f.tar"
    bad = bytearray(data)
    bad[off + n // 2] ^= 0x40  # the origin alters one byte in the middle of chunk k
    served.write_bytes(bytes(bad))
    url = world.origin_url + "/targets/f.tar"
    staging = world.tmp / "dev-state" / "staging"
    staging.parent.mkdir()
    fetcher = _https(world.origin_url, world.ca.cert)

    def assemble() -> _delta.DeltaStats:
        return _delta.assemble(ix, tf, url, fetcher, staging, staging / "incoming", [],
                               Gate())[3]

    with pytest.raises(_delta.DeltaChunkError):
        assemble()
    held = []
    for f in ix.files:
        blob = (staging / "incoming" / f.path).read_bytes()
        for c in f.chunks:
            at = f.file_offset(c)
            held.append(hashlib.sha256(blob[at:at + c.length]).digest() == c.sha256)
            if c.offset == off:
                assert blob[at:at + c.length] != bytes(bad[off:off + n])  # (not written)
    assert not held[k] and not any(held[k + 1:])  # (in order: nothing after it)
    first = _access(world, "/targets/f.tar", 1)
    assert len(first) == 1 and first[0][0] == 206  # (one coalesced read)
    served.write_bytes(data)  # the origin is honest again: the resume
    stats = assemble()
    missing = [(o, ln) for (o, ln), h in zip(chunks, held, strict=True) if not h]
    assert stats.fetched_bytes == sum(ln for _, ln in missing)
    log = _access(world, "/targets/f.tar", 2)
    assert len(log) == 2 and log[1][0] == 206  # (one plain 206: a single range)
    assert log[1][1] == stats.fetched_bytes + stats.gap_bytes  # exactly what was missing
