"""Attacks on issue 16's publish path (a team key holder, a careless operator), on a real
repository on disk (no origin, no device): ``publish`` and its operator view."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from modelward.publisher._chunking import build_index
from modelward.publisher._indexpub import NewIndex, index_target, served_name
from modelward.publisher._repo import Repository
from modelward.publisher.errors import RepositoryStateError
from modelward.updater.bundle._bundle import extract_bundle
from modelward.updater.bundle._chunkindex import Chunk, index_path, parse_index
from tests.conftest import PASSPHRASE, World

MODEL = "classifier"


@pytest.fixture
def pub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    from tests.conftest import _new_repo

    repo_dir, keys, builds, repo, _ = _new_repo(tmp_path, monkeypatch)
    return World(tmp_path, repo_dir, keys, repo, builds, tmp_path / "unused.toml",
                 None, "", None)  # type: ignore[arg-type]


def _release(w: World, version: str, seed: int, blob_seed: int) -> Path:
    blob = w.builds / f"blob-{blob_seed}.bin"
    blob.write_bytes(random.Random(blob_seed).randbytes(1 << 20))
    return w.bundle(version, seed, extra=[(blob, "weights.bin")])


# -- a careless operator -----------------------------------------------------------


def _reordered(src: Path, dest: Path) -> Path:
    """``src`` repacked by hand: manifest first, the files in another order (a valid
    bundle: the device's full install and ``extract_bundle`` accept it)."""
    with tarfile.open(src) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]  # type: ignore[union-attr]
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for m, data in [members[0], *members[1:][::-1]]:
            ti = tarfile.TarInfo(m.name)
            ti.size, ti.mode, ti.mtime = len(data), m.mode, m.mtime
            t.addfile(ti, io.BytesIO(data))
    dest.write_bytes(bio.getvalue())
    extract_bundle(io.BytesIO(dest.read_bytes()), None, "reordered")  # valid
    return dest


def test_a_valid_bundle_in_another_member_order_publishes(pub: World) -> None:
    b = _reordered(_release(pub, "1.0.0", 1, blob_seed=7), pub.builds / "reordered.tar")
    r = pub.repo.publish(b)  # the bundle alone (devices fetch it whole) or with an index
    assert r.target_path in {f.path for f in pub.repo.releases(MODEL)}
    if r.index_path is not None:  # its offsets are those of this layout
        data = b.read_bytes()
        served = next((pub.repo_dir / "targets").rglob(f"*.{Path(r.index_path).name}"))
        ix = parse_index(served.read_bytes(), "index")
        for f in ix.files:
            for c in f.chunks:
                assert hashlib.sha256(data[c.offset:c.offset + c.length]).digest() == c.sha256


def test_publish_while_another_publish_runs_loses_nothing(pub: World,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import modelward.publisher._repo as repo_mod

    real = repo_mod.add_index
    other = _release(pub, "2.0.0", 3, blob_seed=9)
    results = []

    def add_index(*a: object, **k: object) -> NewIndex:
        if not results:  # while the first publish cuts, a second operator publishes
            results.append(None)
            results.append(Repository(pub.repo_dir, pub.keys, PASSPHRASE).publish(other))
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(repo_mod, "add_index", add_index)
    first = _release(pub, "1.0.0", 1, blob_seed=7)
    # the publish that lost the race is refused when it signs (vN+1 exists), not lost
    with pytest.raises(RepositoryStateError, match="published already"):
        pub.repo.publish(first)
    second = results[1]
    assert second is not None
    fresh = Repository(pub.repo_dir, pub.keys, PASSPHRASE)
    assert {f.path for f in fresh.releases(MODEL)} == {second.target_path}
    monkeypatch.setattr(repo_mod, "add_index", real)
    again = fresh.publish(first)  # published again: both, each with its index
    assert {f.path for f in fresh.releases(MODEL)} == {second.target_path, again.target_path}
    assert again.index_path is not None and second.index_path is not None


def test_bundle_diff_of_a_file_rewritten_in_place_is_refused_not_a_crash(pub: World
                                                                         ) -> None:
    b = _release(pub, "1.0.0", 1, blob_seed=7)
    child = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from modelward.publisher import _chunking\n"
        "from modelward.publisher.errors import OperatorInputError\n"
        "from modelward.publisher._bundlediff import verified_index\n"
        "real = _chunking._index\n"
        "def cut(view, size, sha, what):\n"
        "    os.truncate(sys.argv[1], 4096)  # the operator's cp rewrites it meanwhile\n"
        "    return real(view, size, sha, what)\n"
        "_chunking._index = cut\n"
        "try:\n"
        "    verified_index(Path(sys.argv[1]))\n"
        "except (OperatorInputError, OSError, ValueError) as e:\n"
        "    print('refused:', e)\n"
        "    sys.exit(3)\n"
    )
    r = subprocess.run([sys.executable, "-c", child, str(b)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 3, (r.returncode, r.stderr[-500:])


# -- a team key holder -------------------------------------------------------------


def test_a_team_cannot_forge_the_index_of_anothers_release(pub: World,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import modelward.publisher._repo as repo_mod

    repo = pub.repo
    with monkeypatch.context() as m:  # the operator's 1.0.0, from before indexes
        m.setattr(repo_mod, "add_index", lambda *a, **k: NewIndex(None, None))
        r1 = repo.publish(_release(pub, "1.0.0", 1, blob_seed=7))
    repo.delegate("eve", ["detector/*"])  # a team for another model entirely
    new = _release(pub, "1.1.0", 2, blob_seed=8)  # every weight differs: ~a full fetch
    new_hashes = sorted({c.sha256 for f in build_index(new, hashlib.sha256(
        new.read_bytes()).hexdigest()).files for c in f.chunks})
    # eve's "index" of the operator's 1.0.0: its real layout, the new release's hashes
    (old_tf,) = [f.target for f in repo.releases(MODEL) if f.path == r1.target_path]
    honest = build_index(served_name(repo.targets_dir, old_tf), old_tf.hashes["sha256"])
    big = max(honest.files, key=lambda f: f.size)
    n, pos, chunks = len(new_hashes), big.data_offset, []
    for i, h in enumerate(new_hashes):
        ln = big.size // n if i < n - 1 else big.size - (big.size // n) * (n - 1)
        chunks.append(Chunk(pos, ln, h))
        pos += ln
    forged = dataclasses.replace(honest, files=tuple(
        dataclasses.replace(f, chunks=tuple(chunks)) if f is big else f
        for f in honest.files)).to_bytes()
    itf = index_target(forged, r1.target_path)
    dest = served_name(repo.targets_dir, itf)
    dest.write_bytes(forged)
    md = repo._role_md("eve")  # noqa: SLF001 - the team's key signs its own role
    md.signed.targets[itf.path] = itf
    md.signed.version += 1
    repo._write_delegated(md, "eve", repo.keys / "delegated-eve.pem")  # noqa: SLF001
    repo._snapshot_and_timestamp(repo.current()[0].version)  # noqa: SLF001
    assert index_path(r1.target_path) == itf.path
    r2 = repo.publish(new)
    (e,) = r2.estimates
    assert e.fetch is not None and e.fetch > 0.9 * e.full, e.text()  # the honest figure
    assert e.note == "it has no chunk index: cut from its bundle", e.note


# -- names: a bundle made by hand (not by `bundle build`, which checks the name) ----------


def _renamed(src: Path, dest: Path, name: str) -> Path:
    """``src`` with its manifest's model name replaced (a valid bundle otherwise)."""
    with tarfile.open(src) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]  # type: ignore[union-attr]
    man = json.loads(members[0][1])
    man["name"] = name
    members[0] = (members[0][0], json.dumps(man).encode())
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for m, data in members:
            ti = tarfile.TarInfo(m.name)
            ti.size, ti.mode, ti.mtime = len(data), m.mode, m.mtime
            t.addfile(ti, io.BytesIO(data))
    dest.write_bytes(bio.getvalue())
    return dest


def test_a_model_name_with_dotdot_writes_nothing_outside_the_served_targets(pub: World
                                                                            ) -> None:
    b = _renamed(_release(pub, "1.0.0", 1, blob_seed=7), pub.builds / "dotdot.tar",
                 "../escape")
    before = {p for p in pub.tmp.rglob("*")}
    with contextlib.suppress(Exception):  # refusing it is right; what it wrote is checked
        pub.repo.publish(b)
    new = {p for p in pub.tmp.rglob("*") if p not in before and p.is_file()}
    outside = [p for p in new if not p.resolve().is_relative_to(pub.repo_dir.resolve()
                                                                / "targets")
               and not p.resolve().is_relative_to(pub.repo_dir.resolve() / "metadata")
               and not p.resolve().is_relative_to(pub.keys.resolve())]
    assert outside == [], outside


def test_publish_prints_no_terminal_escape_from_a_model_name(pub: World) -> None:
    name = "a\x1b]0;pwned\x07"
    b = _renamed(_release(pub, "1.0.0", 1, blob_seed=7), pub.builds / "esc.tar", name)
    r = pub.cli("publish", "--repo", str(pub.repo_dir), "--keys", str(pub.keys), str(b))
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout, r.stdout
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr, r.stderr
