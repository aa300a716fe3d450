"""Issue 13, "verify what you use, when you use it": the health check's inputs are sealed
in-memory copies of the bytes whose fingerprint was checked (updater/install/_sealed.py), and the
health child loads from them, never from a path (updater/install/_healthchild.py)."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from modelward.trust._fingerprint import directory_entries, slot_fingerprint
from modelward.updater.errors import StagedFilesChangedError
from modelward.updater.install._sealed import SEALS, copy_sealed, seal_slot, seal_verified


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(mode=0o750)
    os.chmod(root, 0o750)  # noqa: S103
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(mode=0o750, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, 0o640)
    return root


FILES = {"manifest.json": b"{}", "model.onnx": b"M" * 5000, "vectors.npz": b"V" * 300,
         "data/labels.txt": b"cat\n"}
NAMES = ("manifest.json", "model.onnx", "vectors.npz")
SIZES = {k: len(v) for k, v in FILES.items()}


def test_fingerprint_of_the_sealed_copies_is_the_slot_fingerprint(tmp_path: Path) -> None:
    root = _tree(tmp_path / "in", FILES)
    want = slot_fingerprint(directory_entries(root))
    with seal_slot(root, NAMES, SIZES) as s:
        assert s.fingerprint == want
        assert set(s.fds) == set(NAMES)
        for name, fd in s.fds.items():
            assert os.pread(fd, 1 << 20, 0) == FILES[name]
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
    assert not s.fds  # closed


def test_a_sealed_copy_cannot_be_changed_by_anyone(tmp_path: Path) -> None:
    root = _tree(tmp_path / "in", FILES)
    with seal_slot(root, NAMES, SIZES) as s:
        fd = s.fds["model.onnx"]
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"X", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
        with pytest.raises(PermissionError), \
                open(f"/proc/self/fd/{fd}", "r+b") as f:  # nor through /proc (same uid)
            f.write(b"X")
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)  # F_SEAL_SEAL: no seal removed/added
        assert os.pread(fd, 5000, 0) == FILES["model.onnx"]


def test_rewriting_the_disk_after_sealing_changes_nothing_sealed(tmp_path: Path) -> None:
    root = _tree(tmp_path / "in", FILES)
    with seal_slot(root, NAMES, SIZES) as s:
        with open(root / "model.onnx", "r+b") as f:  # in place: same inode
            f.write(b"EVIL")
        assert os.pread(s.fds["model.onnx"], 5000, 0) == FILES["model.onnx"]


@pytest.mark.parametrize("attack", ["symlink", "hardlink", "fifo", "grown", "sparse-giant",
                                    "mode", "missing", "stray"])
def test_a_changed_stage_is_refused_before_anything_is_copied_in_full(
        tmp_path: Path, attack: str) -> None:
    root = _tree(tmp_path / "in", FILES)
    want = slot_fingerprint(directory_entries(root))
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(FILES["model.onnx"])
    model = root / "model.onnx"
    if attack == "symlink":
        model.unlink()
        model.symlink_to(outside)
    elif attack == "hardlink":
        os.link(model, tmp_path / "handle")
    elif attack == "fifo":
        model.unlink()
        os.mkfifo(model, 0o640)
    elif attack == "grown":
        with open(model, "ab") as f:
            f.write(b"more")
    elif attack == "sparse-giant":
        with open(model, "r+b") as f:
            f.truncate(1 << 40)  # 1 TiB of holes: never copied into memory
    elif attack == "mode":
        os.chmod(model, 0o666)  # noqa: S103
    elif attack == "missing":
        model.unlink()
    else:
        (root / "run.py").write_bytes(b"import os\n")
    done: list[object] = []
    t = threading.Thread(target=lambda: done.append(_try(root, want)), daemon=True)
    t.start()
    t.join(30)  # a fifo must not block, a giant must not be read
    assert done, "seal_verified hung"
    assert isinstance(done[0], StagedFilesChangedError), done[0]
    assert done[0].expected == want and done[0].path == str(root)


def _try(root: Path, want: str) -> object:
    try:
        seal_verified(root, NAMES, SIZES, want, "m 1.0.0", "before its health check").close()
    except StagedFilesChangedError as e:
        return e
    return "accepted"


def test_a_file_that_shrinks_while_copied_never_matches(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    with open(src, "rb") as f:
        assert copy_sealed(f.fileno(), 10, "f") is None  # fewer bytes than fstat said
        fd = copy_sealed(f.fileno(), 2, "f")  # never more than asked
        assert fd is not None
        try:
            assert os.pread(fd, 10, 0) == b"ab"
        finally:
            os.close(fd)


def test_an_unsealed_name_is_hashed_from_disk_and_not_copied(tmp_path: Path) -> None:
    root = _tree(tmp_path / "in", FILES)
    with seal_slot(root, ("manifest.json",), SIZES) as s:
        assert set(s.fds) == {"manifest.json"}
        assert s.fingerprint == slot_fingerprint(directory_entries(root))


def test_seal_verified_refuses_when_a_health_input_is_not_in_the_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path / "in", FILES)
    want = slot_fingerprint(directory_entries(root))
    with pytest.raises(StagedFilesChangedError):
        seal_verified(root, (*NAMES, "other.onnx"), SIZES, want, "m 1.0.0", "now")


def _real_slot(tmp_path: Path, seed: int = 1) -> Path:
    from modelward.publisher._bundle_build import BuildOptions, build_bundle
    from modelward.simulator._models import make_linear_model
    from modelward.updater.bundle._bundle import extract_bundle

    bundle = tmp_path / f"m{seed}.tar"
    build_bundle(make_linear_model(tmp_path / f"m{seed}.onnx", seed), "m", "1.0.0", bundle,
                 options=BuildOptions())
    slot = tmp_path / f"state{seed}" / "staging" / "incoming"
    slot.mkdir(parents=True)
    with open(bundle, "rb") as f:
        extract_bundle(f, slot, "m")
    return slot


def test_the_health_child_loads_the_sealed_bytes_not_the_disk(tmp_path: Path) -> None:
    """Through the real sandbox and onnxruntime: after sealing, the disk gets another
    model (it fails these vectors) in place; the check still passes on the sealed bytes.
    Mutation: ignoring ``sealed`` (loading from the slot) fails it."""
    from modelward.updater._config import HealthConfig
    from modelward.updater.install._health import health_inputs, run_health_check

    slot = _real_slot(tmp_path)
    other = _real_slot(tmp_path, seed=2)
    want = slot_fingerprint(directory_entries(slot))
    sizes = {e.path: e.size for e in directory_entries(slot)}
    names = health_inputs("model.onnx", "vectors.npz")
    with seal_verified(slot, names, sizes, want, "m 1.0.0", "now") as sealed:
        with open(slot / "model.onnx", "r+b") as f:
            f.truncate(0)
            f.write((other / "model.onnx").read_bytes())
        assert "match" in run_health_check(slot, "m", "1.0.0", HealthConfig(timeout=60),
                                           sealed=sealed)
    with pytest.raises(Exception, match="differs from the test vectors"):
        run_health_check(slot, "m", "1.0.0", HealthConfig(timeout=60))  # from the disk


def test_the_health_child_cannot_open_the_stage_by_path(tmp_path: Path) -> None:
    """The sandbox of the real health check hides the stage itself: a child that tries to
    read it gets nothing (the launcher proves each hidden path fails to open)."""
    from modelward.updater._config import HealthConfig
    from modelward.updater.install._health import child_policy, memory_limit
    from modelward.updater.install._sandbox import run

    slot = _real_slot(tmp_path)
    cfg = HealthConfig(timeout=60)
    policy = child_policy(slot, cfg, os.environ, memory_limit(cfg))
    assert str(slot.resolve()) in policy.must_deny and not policy.read_only
    code = f"open({str(slot / 'model.onnx')!r}, 'rb')"
    import sys
    done = run([sys.executable, "-P", "-c", code], policy, timeout=60)
    assert done.returncode != 0 and b"PermissionError" in done.stderr, done.stderr


def test_the_fingerprint_hook_contract(tmp_path: Path) -> None:
    """``directory_entries(root, hook)``: the entry is the hash of the fd the hook returns,
    None never matches, and a non-OSError from the hook propagates (no silent mismatch)."""
    from modelward.trust._fingerprint import FileEntry

    root = _tree(tmp_path / "in", {"a": b"x"})
    assert directory_entries(root, lambda rel, fd, st: None) == [FileEntry("a", -1, "")]
    other = tmp_path / "other"
    other.write_bytes(b"yy")
    with open(other, "rb") as f:
        got = directory_entries(root, lambda rel, fd, st: f.fileno())
    assert got[0].size == 2  # hashed from what the hook handed back

    class Boom(Exception):
        pass

    def boom(rel: str, fd: int, st: os.stat_result) -> int:
        raise Boom

    with pytest.raises(Boom):
        directory_entries(root, boom)
