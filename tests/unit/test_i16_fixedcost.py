"""Issue 16, the install's fixed costs: the health child hands onnxruntime the sealed memfd
itself (``/proc/self/fd/N``), not a copy, and still loads exactly the sealed bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelward.updater.install._healthchild import model_source
from modelward.updater.install._sealed import copy_sealed


def _sealed(tmp_path: Path, data: bytes) -> tuple[Path, int]:
    src = tmp_path / "model.onnx"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        mfd = copy_sealed(fd, len(data), "model.onnx")
    finally:
        os.close(fd)
    assert mfd is not None
    return src, mfd


def test_i16_the_model_is_loaded_from_the_sealed_memfd_by_its_proc_path(tmp_path: Path) -> None:
    """The path names this process's sealed copy: a rewrite of the file it came from
    changes nothing read through it, and nobody can write through the path either.
    Mutation: returning the file's own path fails it."""
    src, mfd = _sealed(tmp_path, b"sealed model bytes")
    try:
        got = model_source({"model.onnx": mfd}, "model.onnx")
        assert got == f"/proc/self/fd/{mfd}"
        src.write_bytes(b"rewritten on disk!")
        with open(got, "rb") as f:
            assert f.read() == b"sealed model bytes"
        with pytest.raises(PermissionError), open(got, "r+b") as f:
            f.write(b"x")
    finally:
        os.close(mfd)


def test_i16_a_model_not_handed_over_is_not_looked_for_elsewhere(tmp_path: Path) -> None:
    """A manifest naming a file that was not sealed (a careless operator's bundle) is a
    failed check naming it, never a path opened. Mutation: falling back to the slot fails."""
    with pytest.raises(FileNotFoundError, match="model.onnx was not handed over"):
        model_source({}, "model.onnx")


def test_i16_a_descriptor_proc_does_not_show_as_itself_falls_back_to_a_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``/proc/self/fd/N`` is not the same file (no procfs, another mount there), the
    child reads the sealed copy's bytes instead: still the sealed bytes, never the path.
    Mutation: returning the path without the inode comparison fails it."""
    _, mfd = _sealed(tmp_path, b"sealed model bytes")
    other = tmp_path / "other"
    other.write_bytes(b"not the model")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(other)
                        if str(p).startswith("/proc/self/fd/") else real_stat(p, *a, **k))
    try:
        assert model_source({"model.onnx": mfd}, "model.onnx") == b"sealed model bytes"
    finally:
        os.close(mfd)
