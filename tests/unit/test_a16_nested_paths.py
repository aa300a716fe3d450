"""Attacker a16org, a team key holder: a release whose manifest lists a file and another
file below it (``vectors.npz`` and ``vectors.npz/x``). The manifest parser accepts it; the
delta path then fails to assemble it with a StateDirError (a *local device* error: the
disk is blamed), which is neither a fall back to the whole bundle nor a rejection of the
release, so every poll downloads the index and fails again. (The whole-bundle path fails
the same way, StateDirError in extraction: the gap is parse_manifest's, older than the
delta; parse_index inherits it.)"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.trust._fingerprint import MerkleHasher
from modelward.updater.bundle._chunkindex import ChunkIndex
from modelward.updater.errors import (
    BundleFormatError,
    FingerprintMismatchError,
    HealthCheckError,
    StateDirError,
)
from modelward.updater.idle import Gate
from modelward.updater.install import _delta
from modelward.updater.install._install import download_and_extract
from modelward.updater.install._rejections import REJECTING


class _Session:
    def __init__(self, ix: ChunkIndex) -> None:
        self.ix = ix

    def find_target(self, model: str, path: str) -> tuple[TargetFile, str] | None:
        data = self.ix.to_bytes()
        return TargetFile(len(data), {"sha256": hashlib.sha256(data).hexdigest()},
                          path), "targets"

    def fetch_target_bytes(self, target: TargetFile, max_bytes: int) -> bytes:
        return self.ix.to_bytes()

    def target_url(self, target: TargetFile) -> str:
        return "https://o/" + target.path


class _Origin:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def fetch_ranges(self, url: str, ranges: Sequence[tuple[int, int]]
                     ) -> Iterator[tuple[int, bytes]]:
        for off, n in ranges:
            yield off, self.data[off:off + n]

    def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
        return iter([self.data[offset:]]), offset


def _nested_bundle(tmp: Path) -> Path:
    from tests.integration._i16_delta import big_model

    good = tmp / "good.tar"
    build_bundle(big_model(tmp / "m.onnx"), "classifier", "1.0.0", good,
                 options=BuildOptions())
    with tarfile.open(good) as t:
        members = {x.name: t.extractfile(x).read()  # type: ignore[union-attr]
                   for x in t.getmembers() if x.isfile()}
    man = json.loads(members["manifest.json"])
    extra = b"E" * 1000
    mh = MerkleHasher()
    mh.update(extra)
    man["files"].append({"path": "vectors.npz/x", "size": len(extra),
                         "sha256": hashlib.sha256(extra).hexdigest(),
                         "merkle_root": mh.hexdigest()})
    members["vectors.npz/x"] = extra
    members["manifest.json"] = json.dumps(man).encode()
    bad = tmp / "classifier-1.0.0.tar"
    with tarfile.open(bad, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name in ["manifest.json", *(f["path"] for f in man["files"])]:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(members[name]), 0o644
            tf.addfile(ti, io.BytesIO(members[name]))
    return bad


@pytest.mark.xfail(strict=True, reason="a16org: a manifest with a file below another file "
                   "passes parse_manifest/parse_index (bundle/_bundle.py); the delta's "
                   "assemble (_Files.open_out, make_dirs) raises StateDirError, which "
                   "fetch_release neither turns into the whole bundle nor _rejections "
                   "remembers: the same failure every poll")
def test_a_file_below_another_file_is_rejected_as_the_releases_own_fault(
        tmp_path: Path) -> None:
    bundle = _nested_bundle(tmp_path)
    data = bundle.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    tf = TargetFile(len(data), {"sha256": sha}, "classifier/classifier-1.0.0.tar")
    ix = build_index(bundle, sha)  # (the team's own index: valid, signed)
    st = tmp_path / "state"
    st.mkdir()
    staging, incoming = st / "staging", st / "staging" / "incoming"
    session, origin = _Session(ix), _Origin(data)
    rel = _delta.Release(tf, "classifier", "1.0.0", _delta.index_fingerprint(ix), "targets")

    def whole():  # type: ignore[no-untyped-def]
        return download_and_extract(session, origin, tf, staging, incoming,  # type: ignore[arg-type]
                                    1 << 30, gate=Gate())

    with pytest.raises(Exception) as e:  # noqa: PT011 - the type is what is asserted
        _delta.fetch_release(session, origin, rel, st, staging, incoming, [],  # type: ignore[arg-type]
                             Gate(), whole)
    assert not isinstance(e.value, StateDirError), e.value  # not the disk's fault
    assert isinstance(e.value, REJECTING), repr(e.value)
    assert isinstance(e.value, BundleFormatError | FingerprintMismatchError |
                      HealthCheckError)
