"""``modelward.agent.app``, the library the example inference app imports: what a local user
or the disk can do to ``current`` and the slot while the application reads them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from modelward.agent import app as lib
from modelward.agent.app import ModelWatcher, load_verified
from tests.unit.test_i15_example_app import activate, slot


@pytest.fixture
def state(tmp_path: Path) -> Path:
    s = tmp_path / "state"
    slot(s, "a", "1.0.0", 1)
    slot(s, "b", "2.0.0", 2)
    activate(s, "a")
    return s


def test_i15_current_as_a_directory_or_a_detour_is_refused(state: Path, tmp_path: Path) -> None:
    cur = state / "current"
    for target in ("slots/a/", "./slots/a", "slots/b/../a", str(state / "slots" / "a")):
        cur.unlink()
        cur.symlink_to(target)  # (each resolves to the active slot: still not `slots/a`)
        with pytest.raises(ValueError, match="trust record names"):
            load_verified(str(cur))
    cur.unlink()
    shutil.copytree(state / "slots" / "a", cur)  # a plain copy named `current`
    with pytest.raises(OSError):
        load_verified(str(cur))


def test_i15_slot_swapped_between_the_fingerprint_and_the_read(
        state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk swaps slot a for a link to a copy right after the slot was fingerprinted:
    the files are opened O_NOFOLLOW from the slots directory, so nothing is read."""
    real = lib.directory_entries

    def then_swap(root: Path) -> list[object]:
        out = real(root)
        shutil.copytree(root, tmp_path / "copy")
        shutil.rmtree(root)
        os.symlink(tmp_path / "copy", root)
        return out  # type: ignore[return-value]

    monkeypatch.setattr(lib, "directory_entries", then_swap)
    with pytest.raises(OSError):
        load_verified(str(state / "current"))


def test_i15_model_rewritten_between_the_fingerprint_and_the_read(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = lib.directory_entries

    def then_rewrite(root: Path) -> list[object]:
        out = real(root)
        p = root / "model.onnx"
        data = bytearray(p.read_bytes())
        data[-1] ^= 1
        with open(p, "r+b") as f:  # same size, same inode
            f.write(bytes(data))
        return out  # type: ignore[return-value]

    monkeypatch.setattr(lib, "directory_entries", then_rewrite)
    with pytest.raises(ValueError, match="changed since it was fingerprinted"):
        load_verified(str(state / "current"))


def test_i15_a_runtime_that_refuses_the_model_keeps_nothing_untrusted(state: Path) -> None:
    opened: list[str] = []

    def open_model(m: lib.VerifiedModel) -> str:
        if m.version == "2.0.0":
            raise RuntimeError("the runtime refuses it")
        opened.append(m.version)
        return m.version

    w = ModelWatcher(str(state / "current"), open_model)
    w.poll()
    assert w.active is not None and w.active.runtime == "1.0.0"
    activate(state, "b")  # the record names b active, a previous
    w.poll()
    assert w.active is not None and w.active.model.version == "1.0.0"  # (previous: kept)
    activate(state, "b")  # again: a is no longer in the record
    w.request_reload()
    w.poll()
    assert w.active is None and opened == ["1.0.0"]
