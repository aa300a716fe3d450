"""The example app against the trust record (fixapp): what the same disk attacker tries
next once the app checks the record's active slot, name, version and fingerprint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from modelward.agent import app as lib
from modelward.trust import _fingerprint as fp
from tests.unit.test_i15_example_app import activate, ia, record, slot  # noqa: F401

__all__ = ["ia"]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    s = tmp_path / "state"
    slot(s, "a", "1.0.0", 1)
    activate(s, "a")
    slot(s, "b", "2.0.0", 2)
    activate(s, "b")  # (record: active b 2.0.0, previous a 1.0.0)
    return s


def _refused(ia: ModuleType, state: Path, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        lib.load_verified(str(state / "current"))


def test_i15_the_record_s_previous_slot_is_never_loaded(ia: ModuleType, state: Path) -> None:
    (state / "current").unlink()
    (state / "current").symlink_to("slots/a")  # a verified model, but not the active one
    _refused(ia, state, "the trust record names")


def test_i15_a_self_consistent_model_in_the_active_slot_is_refused(
    ia: ModuleType, state: Path, tmp_path: Path,
) -> None:
    evil = slot(tmp_path / "x", "b", "2.0.0", 666)  # same name and version, other bytes
    shutil.copy(evil / "model.onnx", state / "slots/b/model.onnx")
    shutil.copy(evil / "manifest.json", state / "slots/b/manifest.json")
    _refused(ia, state, "fingerprint")


def test_i15_record_naming_another_version_than_the_manifest_is_refused(
    ia: ModuleType, state: Path,
) -> None:
    rec = state / "trust/record.json"
    doc = json.loads(rec.read_text())
    doc["record"]["active"]["version"] = "9.9.9"
    rec.write_text(json.dumps(doc))
    _refused(ia, state, "the trust record names classifier 9.9.9")


def test_i15_bytes_changed_after_the_fingerprint_are_refused(
    ia: ModuleType, state: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The model swapped (same size) between the fingerprint walk and the read."""
    model = state / "slots/b/model.onnx"
    real = lib.directory_entries

    def then_swap(root: Path) -> list[fp.FileEntry]:
        entries = real(root)
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
        return entries

    monkeypatch.setattr(lib, "directory_entries", then_swap)
    _refused(ia, state, "changed since it was fingerprinted")


def test_i15_a_symlinked_directory_is_refused_even_if_the_record_names_the_tree(
    ia: ModuleType, state: Path, tmp_path: Path,
) -> None:
    b = state / "slots/b"
    (tmp_path / "out").mkdir()
    shutil.move(b / "model.onnx", tmp_path / "out" / "model.onnx")
    (b / "lnk").symlink_to(tmp_path / "out")
    doc = json.loads((b / "manifest.json").read_text())
    doc["model"]["path"] = "lnk/model.onnx"
    doc["files"][0]["path"] = "lnk/model.onnx"
    (b / "manifest.json").write_text(json.dumps(doc))
    record(state, "b")  # (a forged record over the tree with the link: still refused)
    _refused(ia, state, "not a plain file of the fingerprinted slot")
    dir_fd = os.open(b, os.O_RDONLY | os.O_DIRECTORY)
    try:  # and the reader itself follows no directory link
        with pytest.raises(OSError):
            lib.read_in_slot(dir_fd, "lnk/model.onnx", 10)
    finally:
        os.close(dir_fd)


@pytest.mark.parametrize("how", ["removed", "symlink", "not-json", "active-none"])
def test_i15_no_believable_record_stops_the_running_app(
    ia: ModuleType, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str,
) -> None:
    app = lib.ModelWatcher(str(state / "current"), ia.MODEL.open_model)
    app.poll()
    assert app.active is not None and app.active.model.version == "2.0.0"
    rec = state / "trust/record.json"
    if how == "removed":
        rec.unlink()
    elif how == "symlink":
        shutil.move(rec, tmp_path / "rec.json")
        rec.symlink_to(tmp_path / "rec.json")
    elif how == "not-json":
        rec.write_text("{")
    else:
        doc = json.loads(rec.read_text())
        doc["record"]["active"] = doc["record"]["previous"] = None
        rec.write_text(json.dumps(doc))
    app.poll()
    assert app.active is None


def test_i15_current_replaced_by_a_directory_never_serves_it(
    ia: ModuleType, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = lib.ModelWatcher(str(state / "current"), ia.MODEL.open_model)
    app.poll()
    evil = slot(tmp_path / "x", "b", "6.6.6", 666)
    (state / "current").unlink()
    shutil.copytree(evil, state / "current")  # (not a link: readlink fails, the watch goes on)
    app.poll()
    assert app.active is not None and app.active.model.version == "2.0.0"  # (the record's)
    fresh = lib.ModelWatcher(str(state / "current"), ia.MODEL.open_model)
    fresh.poll()
    assert fresh.active is None
