"""Issue 13 review (a5): the device's disk against the stage index, the fingerprint walk
and the files at the top of ``state_dir``. Cheap variants of tests/integration/
test_i13_disk_attacks.py; ``xfail(strict=True)`` marks an attack that works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelward.agent._commands import StatusFile
from modelward.trust._fingerprint import directory_entries, slot_fingerprint
from modelward.updater.install._journal import Journal
from modelward.updater.install._slots import SlotStore
from modelward.updater.install._stage import Stage

KEY = "ab" * 32
REPO = Path(__file__).resolve().parents[2]


def _slot(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"model bytes")
    (root / "manifest.json").write_text("{}\n")
    (root / "sub" / "w.bin").write_bytes(b"w" * 100)
    return root


def _fp(root: Path) -> str:
    return slot_fingerprint(directory_entries(root))


@pytest.mark.parametrize("path", [
    "../../../etc/passwd", "/etc/passwd", "a/../../x", "a\nb", "a\x00b", "./a", "a//b",
    "a\\..\\b", "",
])
def test_index_lines_with_unsafe_paths_end_the_index(tmp_path: Path, path: str) -> None:
    """Refused: a planted index line with '..', an absolute path, a newline (JSON-escaped
    in the file), NUL or backslash ends the index there (nothing after it is planned)."""
    staging = tmp_path / "staging"
    (staging / "incoming").mkdir(parents=True)
    lines = [{"path": "ok", "offset": 512, "size": 0},
             {"path": path, "offset": 1024, "size": 0},
             {"path": "after", "offset": 2048, "size": 0}]
    (staging / f"{KEY}.index").write_text("".join(json.dumps(d) + "\n" for d in lines))
    entries = Stage(staging, staging / "incoming", KEY).entries()
    assert [e.path for e in entries] == ["ok"]


def test_index_with_a_very_long_name_and_huge_numbers_is_bounded(tmp_path: Path) -> None:
    """Refused: a 900 KiB name and a 10**4000 offset are planned within the bound."""
    staging = tmp_path / "staging"
    (staging / "incoming").mkdir(parents=True)
    raw = (json.dumps({"path": "x" * 900_000, "offset": 512, "size": 1}) + "\n"
           + '{"path":"y","offset":1' + "0" * 4000 + ',"size":1}\n')
    (staging / f"{KEY}.index").write_text(raw)
    (staging / f"{KEY}.part").write_bytes(b"\0" * 1024)
    stage = Stage(staging, staging / "incoming", KEY)
    assert [len(e.path) for e in stage.entries()][:1] == [900_000]
    assert 0 <= stage.resumable(1000) <= 1000  # planned within the signed length


def test_an_empty_directory_planted_in_a_slot_changes_the_fingerprint(tmp_path: Path) -> None:
    slot = _slot(tmp_path / "a")
    before = _fp(slot)
    (slot / "plugins" / "custom_ops.so.d").mkdir(parents=True)
    assert _fp(slot) != before


@pytest.mark.parametrize("mode", [0o666, 0o6777, 0o600])
def test_mode_bits_planted_on_a_slot_file_change_the_fingerprint(
    tmp_path: Path, mode: int,
) -> None:
    slot = _slot(tmp_path / "a")
    before = _fp(slot)
    os.chmod(slot / "model.onnx", mode)
    assert _fp(slot) != before


@pytest.fixture
def world_readable_tmp() -> Iterator[Path]:
    """A temporary directory the unprivileged uid 65534 can reach (pytest's is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="a5-"))
    os.chmod(d, 0o755)  # noqa: S103 - the other uid must reach it
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to chown and setpriv to drop to another uid")
@pytest.mark.xdist_group("machine")
def test_a_directory_the_agent_cannot_open_changes_the_fingerprint(
    world_readable_tmp: Path,
) -> None:
    slot = _slot(world_readable_tmp / "a")
    code = ("import sys; from pathlib import Path; from modelward.trust._fingerprint import "
            "directory_entries, slot_fingerprint; "
            "print(slot_fingerprint(directory_entries(Path(sys.argv[1]))))")

    def fp_as_agent() -> str:
        r = subprocess.run(
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
             sys.executable, "-c", code, str(slot)],
            capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        return r.stdout.strip()

    for p in [slot, *slot.rglob("*")]:
        os.chown(p, 65534, 65534)
    before = fp_as_agent()
    hidden = slot / "sub" / "hidden"
    hidden.mkdir(mode=0o700)  # owned by root: the agent's uid cannot list it
    (hidden / "model.onnx").write_bytes(b"attacker's model")
    assert fp_as_agent() != before


def _blocks(fn: object, fifo: Path) -> bool:
    """Whether ``fn()`` is still blocked after 3 s (then unblocks it by opening the fifo)."""
    t = threading.Thread(target=fn, daemon=True)  # type: ignore[arg-type]
    t.start()
    t.join(3)
    blocked = t.is_alive()
    if blocked:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
    return blocked


def test_journal_symlinked_out_is_not_followed(tmp_path: Path) -> None:
    fifo = tmp_path / "outside.fifo"
    os.mkfifo(fifo)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "journal.json").symlink_to(fifo)
    assert not _blocks(Journal(tmp_path / "state" / "journal.json").read, fifo)


def test_status_file_symlinked_out_is_not_followed(tmp_path: Path) -> None:
    fifo = tmp_path / "outside.fifo"
    os.mkfifo(fifo)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "status.json").symlink_to(fifo)
    assert not _blocks(StatusFile(tmp_path / "state").read, fifo)


def test_activate_with_a_directory_at_the_temp_name(tmp_path: Path) -> None:
    (tmp_path / "slots" / "a").mkdir(parents=True)
    (tmp_path / f".current.{os.getpid()}.tmp" / "x").mkdir(parents=True)
    SlotStore(tmp_path).activate("a")
    assert os.readlink(tmp_path / "current") == "slots/a"


def test_activate_over_a_current_tmp_symlink_does_not_follow(tmp_path: Path) -> None:
    """Refused: a symlink planted at the temp name is replaced, its target untouched."""
    (tmp_path / "slots" / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_text("keep\n")
    (tmp_path / f".current.{os.getpid()}.tmp").symlink_to(outside)
    SlotStore(tmp_path).activate("a")
    assert os.readlink(tmp_path / "current") == "slots/a"
    assert outside.read_text() == "keep\n"


# --- stage files hard-linked to files outside state_dir ----------------------------------

@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from modelward.publisher._bundle_build import build_bundle
    from modelward.simulator._models import make_linear_model

    d = tmp_path_factory.mktemp("b")
    (d / "pad.bin").write_bytes(os.urandom(1 << 20))
    build_bundle(make_linear_model(d / "m.onnx", seed=1), "clf", "1.0.0", d / "b.tar",
                 extra=[(d / "pad.bin", "data/pad.bin")])
    return (d / "b.tar").read_bytes()


@pytest.mark.parametrize("which", ["part", "bundle", "index", "incoming/model.onnx",
                                   "incoming/data/pad.bin"])
def test_stage_files_hard_linked_to_outside_files_are_never_written(
    signed: bytes, tmp_path: Path, which: str,
) -> None:
    """Refused: a stage file that is a second name of a file outside ``state_dir`` (a hard
    link, same file system) is removed, never opened for writing; the outside file keeps
    its bytes, and the stage gets the signed ones."""
    from tests.unit.test_i13_stage import _members, _offsets, _plant, _run

    index = [{"path": p, "offset": o, "size": n} for p, o, n in _offsets(signed)]
    # Resume inside the linked member (or the first one): what follows would be written
    # into the linked file if it were followed.
    cut = which.removeprefix("incoming/") if which.startswith("incoming/") else "manifest.json"
    files: dict[str, bytes] = {}
    for name_, data in _members(signed).items():
        files[name_] = data if name_ != cut else data[: len(data) // 2]
        if name_ == cut:
            break
    stage = _plant(tmp_path, signed, index, files)
    if which == "bundle":
        os.replace(stage.part, stage.done)
    name = {"part": stage.part, "bundle": stage.done, "index": stage.index}.get(
        which, stage.staging / which)
    outside = tmp_path / "outside"
    precious = name.read_bytes()  # the stage file's own bytes: a resume would continue it
    outside.write_bytes(precious)
    name.unlink()
    os.link(outside, name)
    files, _origin, _fp = _run(tmp_path, signed)
    assert files == _members(signed)
    assert outside.read_bytes() == precious


def test_hidden_files_and_dirs_in_a_slot_change_the_fingerprint(tmp_path: Path) -> None:
    """Refused: dot-files are listed like any other file."""
    slot = _slot(tmp_path / "a")
    before = _fp(slot)
    (slot / ".hidden").write_bytes(b"")
    assert _fp(slot) != before
    (slot / ".hidden").unlink()
    (slot / ".d").mkdir()
    (slot / ".d" / "x").write_bytes(b"")
    assert _fp(slot) != before


def test_a_slot_with_thousands_of_planted_files_is_refused_after_a_bounded_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import modelward.trust._fingerprint as fpmod

    slot = _slot(tmp_path / "a")
    for i in range(5000):
        (slot / f"f{i}").write_bytes(b"")
    opened = [0]
    real = fpmod._plain_entry

    def counted(*a: object) -> object:
        opened[0] += 1
        return real(*a)  # type: ignore[arg-type]

    monkeypatch.setattr(fpmod, "_plain_entry", counted)
    directory_entries(slot)
    assert opened[0] <= 300  # fails: 5003
