"""Attacker a16org, the origin/CDN (or a link that drops): when the delta of a release is
refused for good (a range answered 403/416, an altered chunk, a lying index) the device
takes the whole bundle; when that whole download is broken off, the next poll must resume
it, not begin the delta again and lose the partial download."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.updater.bundle._chunkindex import ChunkIndex
from modelward.updater.errors import DownloadFailedError
from modelward.updater.idle import Gate
from modelward.updater.install import _delta
from modelward.updater.install._install import download_and_extract
from tests.unit._delta_fakes import IndexSession as _Session


class _Origin:
    """Refuses every Range of a delta (403, for good); a whole download breaks off after
    ``cut`` bytes (or not, when None). Counts the bytes of whole downloads."""

    def __init__(self, data: bytes, cut: int | None) -> None:
        self.data, self.cut, self.sent = data, cut, 0

    def fetch_ranges(self, url: str, ranges: Sequence[tuple[int, int]]
                     ) -> Iterator[tuple[int, bytes]]:
        raise tuf_exc.DownloadHTTPError("range refused", 403)
        yield  # pragma: no cover

    def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
        def gen() -> Iterator[bytes]:
            for i in range(offset, len(self.data), 65536):
                if self.cut is not None and i >= self.cut:
                    raise tuf_exc.DownloadError("connection reset")
                piece = self.data[i:i + 65536]
                self.sent += len(piece)
                yield piece
        return gen(), offset


@pytest.fixture
def release(tmp_path: Path):  # type: ignore[no-untyped-def]
    from tests.integration._i16_delta import big_model

    model = big_model(tmp_path / "m.onnx")
    out = tmp_path / "classifier-1.0.0.tar"
    build_bundle(model, "classifier", "1.0.0", out, options=BuildOptions())
    data = out.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    tf = TargetFile(len(data), {"sha256": sha}, "classifier/classifier-1.0.0.tar")
    return data, build_index(out, sha), tf


def _poll(tmp: Path, data: bytes, ix: ChunkIndex, tf: TargetFile, origin: _Origin):  # type: ignore[no-untyped-def]
    st = tmp / "state"
    st.mkdir(exist_ok=True)
    staging, incoming = st / "staging", st / "staging" / "incoming"
    session = _Session(ix)
    rel = _delta.Release(tf, "classifier", "1.0.0", _delta.index_fingerprint(ix), "targets")

    def whole():  # type: ignore[no-untyped-def]
        return download_and_extract(session, origin, tf, staging, incoming,  # type: ignore[arg-type]
                                    1 << 30, gate=Gate())

    return _delta.fetch_release(session, origin, rel, st, staging, incoming, [], Gate(),  # type: ignore[arg-type]
                                whole)


def test_without_an_index_a_broken_whole_download_resumes(tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    """(The baseline, the whole-bundle path alone: the second poll fetches the rest.)"""
    data, ix, tf = release
    cut = len(data) // 2
    st = tmp_path / "state"
    st.mkdir()
    staging = st / "staging"
    session = _Session(ix)
    first = _Origin(data, cut)
    with pytest.raises(DownloadFailedError):
        download_and_extract(session, first, tf, staging, staging / "incoming",  # type: ignore[arg-type]
                             1 << 30, gate=Gate())
    second = _Origin(data, None)
    download_and_extract(session, second, tf, staging, staging / "incoming",  # type: ignore[arg-type]
                         1 << 30, gate=Gate())
    assert second.sent <= len(data) - cut + (128 << 10)


def test_a_refused_delta_does_not_lose_the_whole_bundles_partial_download(
        tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    data, ix, tf = release
    cut = len(data) // 2
    first = _Origin(data, cut)
    with pytest.raises(DownloadFailedError):
        _poll(tmp_path, data, ix, tf, first)  # delta refused -> whole -> broken off
    assert first.sent >= cut - 65536
    second = _Origin(data, None)
    out = _poll(tmp_path, data, ix, tf, second)
    assert out[4] == ""  # (the whole bundle, as the delta is refused again)
    assert second.sent <= len(data) - cut + (128 << 10)  # the rest, not all of it again
