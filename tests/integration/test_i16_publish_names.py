"""What attacker a16pub tries next against the publish fixes (fixpub): a team inside the
model's namespace signs an "index" of the operator's release; a team publishes under
another model's name; a model directory linked out of the served directory. A real
repository on disk (no origin, no device)."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

import pytest

from modelward.publisher._chunking import build_index
from modelward.publisher._indexpub import NewIndex, index_target, served_name
from modelward.publisher.errors import RepositoryStateError
from modelward.updater.bundle._chunkindex import Chunk, index_path
from tests.conftest import World

MODEL = "classifier"


@pytest.fixture
def pub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    from tests.conftest import _new_repo

    repo_dir, keys, builds, repo, _ = _new_repo(tmp_path, monkeypatch)
    return World(tmp_path, repo_dir, keys, repo, builds, tmp_path / "unused.toml",
                 None, "", None)  # type: ignore[arg-type]


def _release(w: World, version: str, seed: int, blob_seed: int, name: str = MODEL) -> Path:
    blob = w.builds / f"blob-{blob_seed}.bin"
    blob.write_bytes(random.Random(blob_seed).randbytes(1 << 20))
    return w.bundle(version, seed, name=name, extra=[(blob, "weights.bin")])


def _tree(w: World) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in w.tmp.rglob("*") if p.is_file() and "builds" not in
            p.parts}


def test_a_team_in_the_namespace_cannot_forge_the_index_of_the_operators_release(
        pub: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelward.publisher._repo as repo_mod

    repo = pub.repo
    with monkeypatch.context() as m:  # the operator's 1.0.0, from before indexes
        m.setattr(repo_mod, "add_index", lambda *a, **k: NewIndex(None, None))
        r1 = repo.publish(_release(pub, "1.0.0", 1, blob_seed=7))
    repo.delegate("team", [f"{MODEL}/*"])  # TUF's search for the index path ends at it
    new = _release(pub, "1.1.0", 2, blob_seed=8)  # every weight differs: ~a full fetch
    new_hashes = sorted({c.sha256 for f in build_index(new, hashlib.sha256(
        new.read_bytes()).hexdigest()).files for c in f.chunks})
    (old_tf,) = [f.target for f in repo.releases(MODEL) if f.path == r1.target_path]
    honest = build_index(served_name(repo.targets_dir, old_tf), old_tf.hashes["sha256"])
    big = max(honest.files, key=lambda f: f.size)
    n, pos, chunks = len(new_hashes), big.data_offset, []
    for i, h in enumerate(new_hashes):  # its real layout, the new release's hashes
        ln = big.size // n if i < n - 1 else big.size - (big.size // n) * (n - 1)
        chunks.append(Chunk(pos, ln, h))
        pos += ln
    forged = dataclasses.replace(honest, files=tuple(
        dataclasses.replace(f, chunks=tuple(chunks)) if f is big else f
        for f in honest.files)).to_bytes()
    itf = index_target(forged, r1.target_path)
    served_name(repo.targets_dir, itf).write_bytes(forged)
    md = repo._role_md("team")  # noqa: SLF001 - the team's key signs its own role
    md.signed.targets[itf.path] = itf
    md.signed.version += 1
    repo._write_delegated(md, "team", repo.keys / "delegated-team.pem")  # noqa: SLF001
    repo._snapshot_and_timestamp(repo.current()[0].version)  # noqa: SLF001
    assert index_path(r1.target_path) == itf.path
    r2 = repo.publish(new)
    (e,) = r2.estimates
    assert e.fetch is not None and e.fetch > 0.9 * e.full, e.text()  # the honest figure
    assert "signed by role team, which did not sign the release" in e.note, e.note
    assert e.note.endswith("cut from its bundle"), e.note


def test_a_team_cannot_publish_under_another_models_name(pub: World) -> None:
    pub.repo.delegate("eve", ["detector/*"])
    b = _release(pub, "1.0.0", 1, blob_seed=7)  # named "classifier"
    before = _tree(pub)
    with pytest.raises(RepositoryStateError, match="outside the paths delegated to 'eve'"):
        pub.repo.publish(b, role="eve")
    assert _tree(pub) == before  # nothing served, no metadata moved
    assert pub.repo.releases(MODEL) == []


def test_a_model_directory_linked_out_of_the_served_directory_writes_nothing(pub: World
                                                                            ) -> None:
    outside = pub.tmp / "outside"
    outside.mkdir()
    (pub.repo_dir / "targets" / MODEL).symlink_to(outside)  # planted, or a careless `ln -s`
    b = _release(pub, "1.0.0", 1, blob_seed=7)
    before = _tree(pub)
    with pytest.raises(RepositoryStateError, match="leads out of the served directory"):
        pub.repo.publish(b)
    assert list(outside.iterdir()) == []
    assert _tree(pub) == before
    assert pub.repo.releases(MODEL) == []
