"""Issue 13, "Verify what you use, when you use it", through swtpm + nginx + onnxruntime.

Must-show 4: a planted partial stage never reaches the health check or the commit.
Must-show 5: ``current`` repointed outside the slots is restored by boot-check.
Must-show 6: a symlinked ``staging``, ``slots`` or ``metadata`` is refused by name, and
nothing outside ``state_dir`` is touched.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

import modelward.updater.install._install as install
from modelward.trust._store import TrustStore
from modelward.updater.errors import StagedFilesChangedError, StateDirError
from tests.conftest import World, tree_digest


def _tar_files(data: bytes) -> dict[str, bytes]:
    """path -> bytes of every member of a bundle."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t.getmembers():
            f = t.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
    return out


def _tree_files(root: Path) -> dict[str, bytes]:
    """path -> bytes of every file below ``root`` (following ``root`` itself)."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _plant_partial_stage(w: World, signed: bytes, sha: str, evil: bytes) -> None:
    """Finding 2: index with every member at size 0, the public bundle as the skeleton,
    the attacker's own model, vectors and manifest in ``staging/incoming``."""
    staging = w.state / "staging"
    incoming = staging / "incoming"
    incoming.mkdir(parents=True)
    (staging / f"{sha}.part").write_bytes(signed)
    with tarfile.open(fileobj=io.BytesIO(signed)) as t:
        lines = [json.dumps({"path": m.name, "offset": m.offset_data, "size": 0})
                 for m in t.getmembers()]
    (staging / f"{sha}.index").write_text("\n".join(lines) + "\n")
    for name, data in _tar_files(evil).items():
        (incoming / name).parent.mkdir(parents=True, exist_ok=True)
        (incoming / name).write_bytes(data)


def test_planted_partial_stage_never_reaches_health_check_or_commit(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    served = world.publish("1.0.0", seed=1)
    signed, sha = served.read_bytes(), served.name.split(".", 1)[0]
    signed_files = _tar_files(signed)
    evil = world.bundle("1.0.0", seed=666).read_bytes()  # health-checks fine on its own
    assert _tar_files(evil) != signed_files
    _plant_partial_stage(world, signed, sha, evil)
    incoming = world.state / "staging" / "incoming"

    checked: list[dict[str, bytes]] = []
    committed: list[dict[str, bytes]] = []
    real_health = install.run_health_check

    def health(slot: Path, *a: Any, **kw: Any) -> str:
        checked.append(_tree_files(slot))
        return real_health(slot, *a, **kw)

    real_commit = TrustStore.commit

    def commit(self: TrustStore, record: Any) -> None:
        if record.active is not None:
            committed.append(_tree_files(incoming))
        real_commit(self, record)

    monkeypatch.setattr(install, "run_health_check", health)
    monkeypatch.setattr(TrustStore, "commit", commit)
    result = world.update()
    assert result.active is not None and result.active.version == "1.0.0"
    assert checked == [signed_files]  # the health check saw the signed bytes only
    assert committed == [signed_files]  # and so did the commit
    assert _tree_files(world.state / "current") == signed_files
    assert os.readlink(world.state / "current") == "slots/a"
    assert not list((world.state / "staging").iterdir())
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("change", ["edit", "stray", "hardlink"])
def test_files_changed_after_verification_are_not_committed(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, change: str,
) -> None:
    """What the health check (or anyone) changes in incoming after the stream verified it
    is caught by the fingerprint re-derived just before the commit."""
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    before = world.snapshot()
    real_health = install.run_health_check

    def health(slot: Path, *a: Any, **kw: Any) -> str:
        detail = real_health(slot, *a, **kw)
        if change == "edit":
            with open(slot / "model.onnx", "r+b") as f:
                f.write(b"\0")
        elif change == "stray":
            (slot / "run.py").write_text("import os\n")
        else:
            os.link(slot / "model.onnx", tmp_path / "handle")  # to change it later
        return detail

    monkeypatch.setattr(install, "run_health_check", health)
    with pytest.raises(StagedFilesChangedError, match="before its commit"):
        world.update()
    after = world.snapshot()  # (the TUF metadata that verified, v2 signed, is kept)
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    assert world.active_version() == "1.0.0"
    assert not (world.state / "staging" / "incoming").exists()


def _installed_v1_v2(w: World) -> dict[str, bytes]:
    w.publish("1.0.0", seed=1)
    w.update()
    v2 = w.publish("2.0.0", seed=2)
    w.update()
    assert os.readlink(w.state / "current") == "slots/b"
    return _tar_files(v2.read_bytes())


def _boot_check(w: World) -> int:
    r = w.cli("agent", "boot-check", "--config", str(w.conf_path))
    assert "Traceback" not in r.stderr
    return r.returncode


def test_current_repointed_outside_the_slots_is_restored_by_boot_check(
    world: World, tmp_path: Path,
) -> None:
    v2 = _installed_v1_v2(world)
    before = world.snapshot()
    cur, slot_b = world.state / "current", world.state / "slots" / "b"
    elsewhere = tmp_path / "anywhere" / "b"  # same basename as the slot
    shutil.copytree(slot_b, elsewhere)
    (elsewhere / "model.onnx").write_bytes(b"attacker's model")
    copy = tmp_path / "copy" / "b"  # an exact copy of the slot, elsewhere
    shutil.copytree(slot_b, copy)
    outside = {p: tree_digest(p) for p in (elsewhere, copy)}

    def relink(target: str) -> None:
        cur.unlink()
        cur.symlink_to(target)

    for repoint in (
        lambda: relink(str(elsewhere)),  # current -> /anywhere/b (finding 3)
        lambda: relink(str(copy)),  # current -> a copy of the slot
        lambda: relink(str(slot_b)),  # the right slot, but not the relative link
        lambda: relink("slots/b/"),
        lambda: relink("../state/slots/b"),
        lambda: (cur.unlink(), shutil.copytree(copy, cur)),  # current as a directory
    ):
        repoint()
        assert _boot_check(world) == 0
        assert os.readlink(cur) == "slots/b"
        assert _tree_files(cur) == v2  # the app sees only the signed slot
        assert world.snapshot() == before  # no commit was needed: record, counter intact
    assert {p: tree_digest(p) for p in outside} == outside

    # The same repointing healed by an update attempt (it reconciles first).
    relink(str(elsewhere))
    world.update()
    assert os.readlink(cur) == "slots/b" and world.snapshot() == before

    # slots/b itself a symlink to the copy: not a slot any more, fall back to v1 in a.
    shutil.rmtree(slot_b)
    slot_b.symlink_to(copy)
    assert _boot_check(world) == 0
    assert os.readlink(cur) == "slots/a"
    assert json.loads((cur / "manifest.json").read_bytes())["version"] == "1.0.0"
    # and with slots/a a symlink too, nothing trusted is left: exit 3, nothing served.
    shutil.rmtree(world.state / "slots" / "a")
    (world.state / "slots" / "a").symlink_to(copy)
    assert _boot_check(world) == 3
    assert not os.path.lexists(cur)
    assert {p: tree_digest(p) for p in outside} == outside


def _sentinel_dir(root: Path, name: str) -> Path:
    """A directory outside state_dir that a symlinked ``name`` points at, shaped to lure:
    a sentinel, a stage-like file and sub-directory."""
    d = root / f"outside-{name}"
    (d / "incoming").mkdir(parents=True)
    (d / "a").mkdir()
    (d / "sentinel").write_text("do not touch\n")
    (d / "incoming" / "model.onnx").write_bytes(b"x" * 100)
    (d / "a" / "manifest.json").write_text("{}\n")
    (d / "root.json").write_text("{}\n")
    return d


@pytest.mark.parametrize("name", ["staging", "slots", "metadata"])
def test_symlinked_state_dir_is_refused_and_nothing_outside_is_touched(
    world: World, tmp_path: Path, name: str,
) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    (world.state / "staging").mkdir(exist_ok=True)
    before = world.snapshot()
    real = world.state / name
    aside = tmp_path / f"real-{name}"
    os.replace(real, aside)
    outside = _sentinel_dir(tmp_path, name)
    digest = tree_digest(outside)
    real.symlink_to(outside)

    with pytest.raises(StateDirError) as e:
        world.update()
    assert e.value.path == str(real)
    r = world.cli("agent", "update", "--once", "--config", str(world.conf_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{real} is a symlink" in r.stderr
    boot = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert "Traceback" not in boot.stderr
    if name == "slots":  # the model cannot be verified through it: refused, by name
        assert boot.returncode == 1 and f"{real} is a symlink" in boot.stderr
    else:  # boot does not need staging/ or metadata/: the signed slot keeps serving
        assert boot.returncode == 0, boot.stderr
        assert os.readlink(world.state / "current") == "slots/a"

    assert tree_digest(outside) == digest  # nothing outside state_dir was touched
    real.unlink()
    os.replace(aside, real)
    assert world.snapshot() == before  # record, counter, anchor, current, slots, metadata
    assert world.active_version() == "1.0.0"
    world.update()  # and once the link is gone, the device updates normally
    assert world.active_version() == "2.0.0"
