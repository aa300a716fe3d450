"""``modelward.agent.app.load_verified`` against a store through a primed shared mapping
(no timestamp moves) between the fingerprint and the read, and against a slot file that
gains a second hard link or grows meanwhile: the app hashes the bytes it read, so none of
them is served."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

from modelward.agent import app as lib
from modelward.agent.app import load_verified
from tests.unit.test_i15_example_app import activate, slot


@pytest.fixture
def state(tmp_path: Path) -> Path:
    s = tmp_path / "state"
    slot(s, "a", "1.0.0", 1)
    slot(s, "b", "2.0.0", 2)
    activate(s, "a")
    return s


def _after_fingerprint(monkeypatch: pytest.MonkeyPatch, attack: object) -> None:
    real = lib.directory_entries

    def then(root: Path) -> list[object]:
        out = real(root)
        attack(Path(root) / "model.onnx")  # type: ignore[operator]
        return out  # type: ignore[return-value]

    monkeypatch.setattr(lib, "directory_entries", then)


def test_a17_app_mmap_store_after_the_fingerprint_is_refused(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = state / "slots" / "a" / "model.onnx"
    fd = os.open(model, os.O_RDWR)
    m = mmap.mmap(fd, os.fstat(fd).st_size)
    try:
        m[-1:] = m[-1:]  # primed before the app looks

        def store(_: Path) -> None:
            m[-1] ^= 1

        _after_fingerprint(monkeypatch, store)
        with pytest.raises(ValueError, match="changed since it was fingerprinted"):
            load_verified(str(state / "current"))
    finally:
        m.close()
        os.close(fd)


def test_a17_app_second_link_or_growth_after_the_fingerprint_is_refused(
        state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _after_fingerprint(monkeypatch, lambda p: os.link(p, tmp_path / "other"))
    assert load_verified(str(state / "current")).version == "1.0.0"  # same bytes: fine
    (tmp_path / "other").unlink()

    def grow(p: Path) -> None:
        with open(p, "ab") as f:
            f.write(b"\0" * 64)

    _after_fingerprint(monkeypatch, grow)
    with pytest.raises(ValueError, match="changed size"):
        load_verified(str(state / "current"))
