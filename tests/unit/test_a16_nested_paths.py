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
from tests.unit._delta_fakes import IndexSession as _Session


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


def _team_index(bundle: Path, sha: str) -> ChunkIndex:
    """The index a team key holder builds for the bundle (the publisher refuses it now:
    its build_index parses the manifest with the same rule, so it is built around it)."""
    from modelward.updater.bundle import _bundle

    real = _bundle._below_a_file  # noqa: SLF001
    _bundle._below_a_file = lambda paths: None  # type: ignore[assignment]  # noqa: SLF001
    try:
        return build_index(bundle, sha)
    finally:
        _bundle._below_a_file = real  # noqa: SLF001


def test_a_file_below_another_file_is_rejected_as_the_releases_own_fault(
        tmp_path: Path) -> None:
    bundle = _nested_bundle(tmp_path)
    data = bundle.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    tf = TargetFile(len(data), {"sha256": sha}, "classifier/classifier-1.0.0.tar")
    ix = _team_index(bundle, sha)  # (the team's own index: signed)
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


@pytest.mark.parametrize("paths", [["a", "a/b"], ["a/b", "a"], ["x/a", "x/a/b/c"],
                                   ["manifest.json/x"], ["a", "a!", "a/b"]])
def test_parse_manifest_refuses_a_file_below_a_file(paths: list[str]) -> None:
    """(The cause: parse_manifest; also ``a!`` sorting between ``a`` and ``a/b``, and a
    file below ``manifest.json``.)"""
    from modelward.updater.bundle._bundle import parse_manifest

    h = "0" * 64
    man = {"format": "modelward-bundle/1", "name": "m", "version": "1.0.0",
           "created": "x", "files": [{"path": p, "size": 1, "sha256": h, "merkle_root": h}
                                     for p in [*paths, "model.onnx", "v.npz"]],
           "model": {"format": "onnx", "path": "model.onnx", "opset": 17, "inputs": [],
                     "outputs": []},
           "checks": {"vectors": "v.npz", "rtol": 0.0, "atol": 0.0}}
    with pytest.raises(BundleFormatError, match="is below the file"):
        parse_manifest(json.dumps(man).encode(), "b")


def test_parse_manifest_takes_siblings_and_a_prefix_that_is_not_a_directory() -> None:
    from modelward.updater.bundle._bundle import FORMAT, parse_manifest

    h = "0" * 64
    man = {"format": FORMAT, "name": "m", "version": "1.0.0", "created": "x",
           "files": [{"path": p, "size": 1, "sha256": h, "merkle_root": h}
                     for p in ["a/b", "a/c", "ab", "a.b/c", "model.onnx", "v.npz"]],
           "model": {"format": "onnx", "path": "model.onnx", "opset": 17, "inputs": [],
                     "outputs": []},
           "checks": {"vectors": "v.npz", "rtol": 0.0, "atol": 0.0}}
    assert len(parse_manifest(json.dumps(man).encode(), "b").files) == 6


def test_parse_index_refuses_it_through_the_manifest(tmp_path: Path) -> None:
    """An index carrying such a manifest is refused (ChunkIndexError from the manifest's
    BundleFormatError), and the publisher refuses to build one."""
    from modelward.publisher.errors import OperatorInputError
    from modelward.updater.bundle._chunkindex import parse_index
    from modelward.updater.errors import ChunkIndexError

    bundle = _nested_bundle(tmp_path)
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    with pytest.raises(OperatorInputError, match="is below the file") as built:
        build_index(bundle, sha)
    assert isinstance(built.value.__cause__, BundleFormatError)
    ix = _team_index(bundle, sha)
    with pytest.raises(ChunkIndexError, match="is below the file") as e:
        parse_index(ix.to_bytes(), "ix")
    assert isinstance(e.value.__cause__, BundleFormatError)
