"""The byte bound of the slot fingerprint (fixapp): a file no bundle could hold is never read."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from modelward.trust import _fingerprint as fp
from modelward.trust._fingerprint import MAX_FILE_BYTES, FileChangedError, directory_entries
from modelward.updater._config import UpdaterConfig


def _slot(tmp: Path) -> Path:
    s = tmp / "slot"
    s.mkdir()
    os.chmod(s, 0o750)  # noqa: S103 - the mode the agent gives a slot
    return s


def test_i15_no_bundle_is_larger_than_the_file_bound() -> None:
    assert UpdaterConfig.__dataclass_fields__["max_bundle_bytes"].default <= MAX_FILE_BYTES


@pytest.mark.xdist_group("machine")
def test_i15_file_just_over_the_bound_never_matches_and_is_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    slot = _slot(tmp_path)
    p = slot / "model.onnx"
    p.write_bytes(b"")
    os.chmod(p, 0o640)
    os.truncate(p, MAX_FILE_BYTES + 1)
    monkeypatch.setattr(fp, "_read_leaf", lambda *a: pytest.fail("read a file over the bound"))
    t0 = time.monotonic()
    assert [(e.path, e.size) for e in directory_entries(slot)] == [("model.onnx", -1)]
    assert time.monotonic() - t0 < 1.0


def test_i15_file_grown_after_the_check_is_refused_before_hashing(tmp_path: Path) -> None:
    """A disk attacker who truncates the file up between the caller's stat and the hash."""
    p = tmp_path / "f"
    p.write_bytes(b"")
    os.truncate(p, 1 << 40)
    with open(p, "rb") as f, pytest.raises(FileChangedError):
        fp.fd_merkle_root(f.fileno(), None, MAX_FILE_BYTES)
