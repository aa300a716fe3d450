"""Leftovers of issue 14 next to the two-machine rotation: a planted ``N.snapshot.json``
name never raises the online host's snapshot version, and the offline side's first-run
bootstrap keeps the very bytes of ``1.root.json`` it verified (one read, not two)."""

from __future__ import annotations

from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization.json import JSONSerializer

import modelward.publisher._served as served
from modelward.publisher._repo import Repository
from tests._stock_tuf import stock_refresh
from tests.unit.test_i14_online import Layout

PW = b"unit test passphrase"


def test_planted_snapshot_names_never_raise_the_online_snapshot_version(
        tmp_path: Path) -> None:
    lay = Layout(tmp_path)
    lay.online().refresh()
    ts = lay.md("timestamp.json").signed
    v = ts.snapshot_meta.version
    md = lay.repo_dir / "metadata"
    (md / f"{10 ** 30}.snapshot.json").write_bytes(b"")
    (md / f"{v + 1}.snapshot.json").write_bytes(b"{}")  # the very next name, taken
    lay.offline.publish(lay.bundle("1.0.0"))
    assert lay.online().refresh() == ["snapshot", "timestamp"]
    assert lay.md("timestamp.json").signed.snapshot_meta.version == v + 1
    assert stock_refresh(lay.repo_dir) == 1
    assert lay.snapshot_meta()["targets.json"] == 2


def test_bootstrap_keeps_the_bytes_it_verified(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The served 1.root.json is swapped for another self-signed root right after the
    bootstrap read it: the anchor kept is the one verified."""
    repo = Repository(tmp_path / "repo", tmp_path / "keys", PW)
    repo.init()
    anchor = served.anchor_path(repo)
    anchor.unlink()
    first = repo.metadata_dir / "1.root.json"
    good = first.read_bytes()
    evil = CryptoSigner.generate_ed25519()
    root = Root()
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(evil.public_key, role)
    other = Metadata(root)
    other.sign(evil)
    swapped = other.to_bytes(JSONSerializer())
    real, reads = served.read_file, [0]

    def read(path: Path, *a: object, **k: object) -> bytes | None:
        data = real(path, *a, **k)  # type: ignore[arg-type]
        if path == first:
            reads[0] += 1
            return data if reads[0] == 1 else swapped
        return data

    monkeypatch.setattr(served, "read_file", read)
    served._anchor(repo)  # noqa: SLF001
    assert anchor.read_bytes() == good
