"""Fix of a16 (bundle diff died of SIGBUS on a file rewritten while cut): ``build_index``
reads the bundle with ordinary reads, a window at a time, and cuts exactly the bytes it
hashes. The windowed cut is FastCDC's cut of the whole file; a file that changes at any
point of the cut is refused (OperatorInputError), never a crash or an index of other bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from modelward.publisher import _chunking
from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index, cut
from modelward.publisher.errors import OperatorInputError
from modelward.simulator._models import make_linear_model
from modelward.updater.bundle._chunkindex import MAX_CHUNK


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(random.Random(3).randbytes(3 * 1024 * 1024 + 12345))
    out = tmp_path / "b.tar"
    build_bundle(make_linear_model(tmp_path / "m.onnx", 1), "classifier", "1.0.0", out,
                 extra=[(blob, "weights.bin")], options=BuildOptions())
    return out


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_the_windowed_cut_is_the_cut_of_the_whole_file(bundle: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_chunking, "WINDOW", MAX_CHUNK)  # many windows over 3 MiB
    ix = build_index(bundle, _sha(bundle))
    data = bundle.read_bytes()
    with ThreadPoolExecutor(2) as pool:
        for f in ix.files:
            whole = cut(memoryview(data)[f.data_offset:f.data_offset + f.size],
                        f.data_offset, pool)
            assert list(f.chunks) == whole
    big = max(ix.files, key=lambda f: f.size)
    assert len(big.chunks) > 20


@pytest.mark.parametrize("how", ["truncate", "rewrite", "grow"])
def test_a_bundle_changed_while_it_is_cut_is_refused(bundle: Path, how: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_chunking, "WINDOW", MAX_CHUNK)
    sha, size = _sha(bundle), bundle.stat().st_size
    real = _chunking._cut_window  # noqa: SLF001
    calls = []

    def window(*a: object, **k: object) -> object:
        if len(calls) == 2:  # in the middle of the big file's data
            if how == "truncate":
                os.truncate(bundle, size // 2)
            elif how == "rewrite":  # the same length, other bytes (cp over it)
                with open(bundle, "r+b") as f:
                    f.seek(size - 600_000)
                    f.write(b"\x01" * 4096)
            else:
                with open(bundle, "ab") as f:
                    f.write(b"\0" * 1024)
        calls.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(_chunking, "_cut_window", window)
    with pytest.raises(OperatorInputError, match="changed while it was being published"):
        build_index(bundle, sha)
    assert len(calls) > 2


def test_a_bundle_that_no_longer_hashes_as_verified_is_refused(bundle: Path) -> None:
    with pytest.raises(OperatorInputError, match="changed while"):
        build_index(bundle, "0" * 64)
