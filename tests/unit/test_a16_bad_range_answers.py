"""Attacker a16org, the origin/CDN: it serves the whole bundle right, but answers range
requests in a way the device refuses (parts out of order, a byte outside the range, a
short part). The device must not stay on the delta forever: within a few polls it must
take the whole bundle, which works."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.updater.errors import ModelwardError
from modelward.updater.idle import Gate
from modelward.updater.install import _delta
from modelward.updater.transport._ranges import Cover, RangeAnswerError
from tests.unit._delta_fakes import IndexSession as _Session


class _Cdn:
    """Answers ranges wrongly in the way ``shape`` says, every time."""

    def __init__(self, data: bytes, shape: str) -> None:
        self.data, self.shape, self.range_calls = data, shape, 0

    def fetch_ranges(self, url: str, ranges: Sequence[tuple[int, int]]
                     ) -> Iterator[tuple[int, bytes]]:
        self.range_calls += 1
        pieces = [(p, self.data[p:min(p + 65536, o + n)]) for o, n in ranges
                  for p in range(o, o + n, 65536)]
        if self.shape == "reordered":
            assert len(pieces) > 1
            pieces[0], pieces[1] = pieces[1], pieces[0]
        elif self.shape == "lying-content-range":  # (what RequestsFetcher raises then)
            raise RangeAnswerError("a Content-Range other than the range asked", url)
        elif self.shape == "outside":
            o, d = pieces[0]
            pieces[0] = (o - 1, self.data[o - 1:o] + d)
        elif self.shape == "short":
            o, d = pieces[-1]
            pieces[-1] = (o, d[:-1])
        yield from pieces

    def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
        return iter([self.data[offset:]]), offset


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.integration._i16_delta import big_model

    tmp = tmp_path_factory.mktemp("rel")
    out = tmp / "classifier-1.0.0.tar"
    build_bundle(big_model(tmp / "m.onnx"), "classifier", "1.0.0", out,
                 options=BuildOptions())
    data = out.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    return data, build_index(out, sha), TargetFile(len(data), {"sha256": sha},
                                                   "classifier/classifier-1.0.0.tar")


@pytest.mark.parametrize("shape", ["reordered", "outside", "short",
                                   "lying-content-range"])
def test_an_origin_that_answers_ranges_wrongly_gets_the_whole_bundle_taken(
        tmp_path: Path, release, shape: str) -> None:  # type: ignore[no-untyped-def]
    data, ix, tf = release
    assert Cover  # (the transport's own checker refuses these answers too)
    st = tmp_path / "state"
    st.mkdir()
    cdn = _Cdn(data, shape)
    wholes: list[int] = []
    rel = _delta.Release(tf, "classifier", "1.0.0", _delta.index_fingerprint(ix), "targets")
    for _ in range(3):  # three polls
        try:
            _delta.fetch_release(_Session(ix), cdn, rel, st, st / "staging",  # type: ignore[arg-type]
                                 st / "staging" / "incoming", [], Gate(),
                                 lambda: (wholes.append(1), ("s", "m", []))[1])  # type: ignore[arg-type]
        except ModelwardError:
            continue
        break
    assert wholes, f"{cdn.range_calls} range fetches, never the whole bundle"
