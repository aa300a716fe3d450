"""Issue 13, "Verify what you use": a stage on disk from before this attempt is not trusted,
and nothing under ``state_dir`` is followed out of it. In-memory harness around the real
``download_and_extract`` (a fake origin), many planted variants."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import build_bundle
from modelward.simulator._models import make_linear_model
from modelward.trust._fingerprint import directory_entries, slot_fingerprint
from modelward.updater.errors import StagingError, StateDirError, TargetHashError
from modelward.updater.install._install import download_and_extract
from modelward.updater.install._slots import SlotStore, slot_of_link
from modelward.updater.install._stage import IndexEntry, ResumePlan, Stage, plan_resume
from modelward.updater.install._statedir import check_state_dirs, plain_dir, remove_entry


class _Origin:
    """Serves one bundle with Range support and counts the bytes it sent."""

    def __init__(self, data: bytes) -> None:
        self.data, self.sent = data, 0

    def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
        def chunks() -> Iterator[bytes]:
            for i in range(offset, len(self.data), 65536):
                part = self.data[i:i + 65536]
                self.sent += len(part)
                yield part
        return chunks(), offset


class _Session:
    def target_url(self, target: TargetFile) -> str:
        return f"https://origin/{target.path}"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """The signed bundle, and the attacker's own (valid, but not signed) one."""
    d = tmp_path_factory.mktemp("b")
    out = []
    for seed in (1, 666):
        (d / "pad.bin").write_bytes(os.urandom(3 << 20))
        model = make_linear_model(d / f"m{seed}.onnx", seed=seed)
        build_bundle(model, "clf", "1.0.0", d / f"b{seed}.tar",
                     extra=[(d / "pad.bin", "data/pad.bin")])
        out.append((d / f"b{seed}.tar").read_bytes())
    return out[0], out[1]


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}  # type: ignore[union-attr]


def _offsets(data: bytes) -> list[tuple[str, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return [(m.name, m.offset_data, m.size) for m in t.getmembers()]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _target(data: bytes) -> TargetFile:
    return TargetFile(len(data), {"sha256": hashlib.sha256(data).hexdigest()}, "clf/b.tar")


def _run(tmp: Path, data: bytes) -> tuple[dict[str, bytes], _Origin, str]:
    """One download_and_extract; returns the files in incoming, the origin and the
    fingerprint the stream computed."""
    origin = _Origin(data)
    stage, _manifest, entries = download_and_extract(
        _Session(), origin, _target(data), tmp / "staging", tmp / "staging" / "incoming",  # type: ignore[arg-type]
        1 << 30)
    incoming = tmp / "staging" / "incoming"
    on_disk = slot_fingerprint(directory_entries(incoming))
    assert on_disk == slot_fingerprint(entries)  # what is in incoming is what was hashed
    return _files(incoming), origin, on_disk


def _plant(tmp: Path, data: bytes, index: list[dict[str, Any]], files: dict[str, bytes],
           skeleton: bytes | None = None) -> Stage:
    key = hashlib.sha256(data).hexdigest()
    stage = Stage(tmp / "staging", tmp / "staging" / "incoming", key)
    stage.incoming.mkdir(parents=True)
    stage.part.write_bytes(data if skeleton is None else skeleton)
    stage.index.write_text("".join(json.dumps(e) + "\n" for e in index))
    for name, b in files.items():
        (stage.incoming / name).parent.mkdir(parents=True, exist_ok=True)
        (stage.incoming / name).write_bytes(b)
    return stage


# --- the planted partial stage (finding 2) and its variants ------------------------------


def test_plan_of_an_index_with_every_size_zero_keeps_no_member_bytes() -> None:
    entries = [IndexEntry("manifest.json", 512, 0), IndexEntry("model.onnx", 2048, 0)]
    plan = plan_resume(10_000, entries, {"manifest.json": 700, "model.onnx": 90}, 10_000)
    assert plan == ResumePlan(10_000, tuple(entries))  # offsets only: sizes come from tar


def test_plan_cuts_at_a_short_file_and_at_a_short_skeleton() -> None:
    e = [IndexEntry("a", 512, 1000), IndexEntry("b", 2048, 100)]
    assert plan_resume(4096, e, {"a": 300}, 4096) == ResumePlan(812, (e[0],))
    assert plan_resume(1024, e, {"a": 1000}, 4096) == ResumePlan(1024, (e[0],))
    assert plan_resume(None, e, {"a": 1000, "b": 100}, 4096) == ResumePlan(0, ())
    assert plan_resume(4096, e, {}, 4096) == ResumePlan(512, ())  # nothing of a: not kept


@pytest.mark.parametrize("size", ["zero", "short", "long"])
def test_planted_stage_whose_index_lies_about_sizes_gets_the_signed_bytes(
    bundles: tuple[bytes, bytes], tmp_path: Path, size: str,
) -> None:
    signed, evil = bundles
    sizes = {"zero": lambda n: 0, "short": lambda n: n // 2, "long": lambda n: n + 7}[size]
    index = [{"path": p, "offset": o, "size": sizes(n)} for p, o, n in _offsets(signed)]
    stage = _plant(tmp_path, signed, index, _members(evil))
    if size != "zero":  # the prefix is read from the attacker's files: refused, discarded
        with pytest.raises(StagingError, match="not written by this agent"):
            _run(tmp_path, signed)
        assert not stage.exists() and not stage.incoming.exists()
    files, _origin, _fp = _run(tmp_path, signed)  # size 0: at once, from the skeleton
    assert files == _members(signed)


def test_planted_stage_with_a_true_index_and_attacker_files_is_refused_by_the_hash(
    bundles: tuple[bytes, bytes], tmp_path: Path,
) -> None:
    """The index tells the truth, so the prefix is read from the attacker's files: the
    TUF hash refuses it, and the stage is gone."""
    signed, evil = bundles
    index = [{"path": p, "offset": o, "size": n} for p, o, n in _offsets(signed)]
    evil_files = _members(evil)
    stage = _plant(tmp_path, signed, index, {p: evil_files[p][:n] + b"\0" * (n - len(
        evil_files[p][:n])) for p, _o, n in _offsets(signed)})
    with pytest.raises(TargetHashError):
        _run(tmp_path, signed)
    assert not stage.exists() and not stage.incoming.exists()
    assert _run(tmp_path, signed)[0] == _members(signed)


def test_stray_files_links_and_hard_links_in_incoming_are_not_kept(
    bundles: tuple[bytes, bytes], tmp_path: Path,
) -> None:
    signed, _evil = bundles
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"outside\n")
    (outside / "d").mkdir()
    (outside / "d" / "pad.bin").write_bytes(b"outside pad")
    index = [{"path": p, "offset": o, "size": n} for p, o, n in _offsets(signed)]
    good = _members(signed)
    stage = _plant(tmp_path, signed, index, {"manifest.json": good["manifest.json"],
                                              "extra.py": b"import os"})
    os.link(outside / "victim", stage.incoming / "vectors.npz")  # a hard link out
    os.symlink(outside / "victim", stage.incoming / "model.onnx")
    os.symlink(outside / "d", stage.incoming / "data")  # a symlinked directory
    before = _files(outside)
    files, _origin, _fp = _run(tmp_path, signed)
    assert files == good
    assert _files(outside) == before and os.stat(outside / "victim").st_nlink == 1


def test_a_kept_file_with_a_second_hard_link_is_rewritten(
    bundles: tuple[bytes, bytes], tmp_path: Path,
) -> None:
    signed, _evil = bundles
    index = [{"path": p, "offset": o, "size": n} for p, o, n in _offsets(signed)]
    stage = _plant(tmp_path, signed, index, _members(signed))
    handle = tmp_path / "handle"
    os.link(stage.incoming / "model.onnx", handle)  # to change it after verification
    files, _origin, _fp = _run(tmp_path, signed)
    assert files == _members(signed)
    assert os.stat(stage.incoming / "model.onnx").st_ino != os.stat(handle).st_ino


@pytest.mark.parametrize("which", ["part", "index", "index.tmp", "incoming"])
def test_stage_files_symlinked_out_are_removed_not_followed(
    bundles: tuple[bytes, bytes], tmp_path: Path, which: str,
) -> None:
    signed, _evil = bundles
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_bytes(signed[:5000])
    (outside / "dir").mkdir()
    (outside / "dir" / "manifest.json").write_bytes(b"{}")
    key = hashlib.sha256(signed).hexdigest()
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / f"{key}.index").write_text(json.dumps(
        {"path": "manifest.json", "offset": 512, "size": 2}) + "\n")
    (staging / f"{key}.part").write_bytes(signed[:5000])
    name = {"part": f"{key}.part", "index": f"{key}.index", "index.tmp": f"{key}.tmp",
            "incoming": "incoming"}[which]
    (staging / name).unlink(missing_ok=True)
    (staging / name).symlink_to(outside / ("dir" if which == "incoming" else "file"))
    before = _files(outside)
    files, _origin, _fp = _run(tmp_path, signed)
    assert files == _members(signed)
    assert _files(outside) == before


def test_a_partial_stage_of_another_target_is_cleared_without_following_links(
    bundles: tuple[bytes, bytes], tmp_path: Path,
) -> None:
    signed, evil = bundles
    outside = tmp_path / "outside"
    (outside / "x").mkdir(parents=True)
    (outside / "x" / "keep").write_bytes(b"keep")
    other = _plant(tmp_path, evil, [], {"manifest.json": b"{}"})
    (other.staging / "junkdir").mkdir()
    (other.staging / "junkdir" / "out").symlink_to(outside / "x")
    (other.staging / "link").symlink_to(outside / "x")
    files, _origin, _fp = _run(tmp_path, signed)
    assert files == _members(signed)
    key = hashlib.sha256(signed).hexdigest()
    assert sorted(p.name for p in other.staging.iterdir()) == [
        f"{key}.bundle", f"{key}.index", "incoming"]
    assert _files(outside) == {"x/keep": b"keep"}


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_symlinked_staging_is_refused_and_its_target_untouched(
    bundles: tuple[bytes, bytes], tmp_path: Path, kind: str,
) -> None:
    signed, _evil = bundles
    outside = tmp_path / "outside"
    (outside / "incoming").mkdir(parents=True)
    (outside / "sentinel").write_bytes(b"s")
    (outside / "incoming" / "model.onnx").write_bytes(b"m")
    staging = tmp_path / "staging"
    if kind == "symlink":
        staging.symlink_to(outside)
    else:
        staging.write_bytes(b"not a dir")
    with pytest.raises(StateDirError) as e:
        _run(tmp_path, signed)
    assert e.value.path == str(staging)
    assert _files(outside) == {"sentinel": b"s", "incoming/model.onnx": b"m"}


def test_non_hex_target_digest_is_refused_before_it_names_a_file(tmp_path: Path) -> None:
    t = TargetFile(10, {"sha256": "../../victim"}, "clf/b.tar")
    (tmp_path / "victim.part").write_bytes(b"x")
    with pytest.raises(TargetHashError, match="not lowercase hex"):
        download_and_extract(_Session(), _Origin(b"0" * 10), t, tmp_path / "s" / "staging",  # type: ignore[arg-type]
                             tmp_path / "s" / "staging" / "incoming", 1 << 20)
    assert (tmp_path / "victim.part").exists()


# --- directory_entries: anything but a plain file never matches --------------------------


def test_directory_entries_mark_links_fifos_and_hard_links(tmp_path: Path) -> None:
    root = tmp_path / "slot"
    root.mkdir()
    (root / "f").write_bytes(b"plain")
    (tmp_path / "other").write_bytes(b"x")
    os.link(tmp_path / "other", root / "hard")
    os.mkfifo(root / "fifo")
    (root / "ln").symlink_to(tmp_path / "other")
    (root / "dl").symlink_to(tmp_path)
    got = {e.path: e.size for e in directory_entries(root)}
    assert got == {"f": 5, "hard": -1, "fifo": -1, "ln": -1, "dl": -1}
    link = tmp_path / "linked-slot"
    link.symlink_to(root)
    assert [(e.path, e.size) for e in directory_entries(link)] == [(".", -1)]


# --- slots and current -------------------------------------------------------------------


@pytest.mark.parametrize(("target", "slot"), [
    ("slots/a", "a"), ("slots/b", "b"), ("/anywhere/b", None), ("slots/b/", None),
    ("./slots/b", None), ("../state/slots/a", None), ("slots/c", None), ("b", None),
    (None, None),
])
def test_current_names_a_slot_only_as_the_exact_relative_link(
    target: str | None, slot: str | None,
) -> None:
    assert slot_of_link(target) == slot


def test_current_as_a_directory_or_file_is_replaced_without_following(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "slots" / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"k")
    slots = SlotStore(state)
    (state / "current").mkdir()
    (state / "current" / "out").symlink_to(outside)
    assert slots.current_slot() is None
    slots.activate("a")
    assert os.readlink(state / "current") == "slots/a"
    (state / "current").unlink()
    (state / "current").write_bytes(b"file")
    assert slots.current_slot() is None
    slots.activate("b")
    assert slots.current_slot() == "b"
    slots.deactivate()
    assert not os.path.lexists(state / "current")
    assert _files(outside) == {"keep": b"k"}


def test_install_over_a_symlinked_inactive_slot_replaces_the_link_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "staging" / "incoming").mkdir(parents=True)
    (state / "staging" / "incoming" / "manifest.json").write_bytes(b"{}")
    (state / "slots").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.onnx").write_bytes(b"m")
    (state / "slots" / "b").symlink_to(outside)
    (state / "slots" / ".old-b").symlink_to(outside)
    slots = SlotStore(state)
    assert slots.slot_dir("b") is None  # a link is not a slot
    slots.install_incoming("b")
    assert _files(state / "slots" / "b") == {"manifest.json": b"{}"}
    assert sorted(os.listdir(state / "slots")) == ["b"]
    assert _files(outside) == {"model.onnx": b"m"}


@pytest.mark.parametrize("name", ["staging", "slots", "metadata", "trust"])
def test_state_dirs_that_are_links_are_refused_by_name(tmp_path: Path, name: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "outside").mkdir()
    (state / name).symlink_to(tmp_path / "outside")
    with pytest.raises(StateDirError, match="is a symlink") as e:
        check_state_dirs(state)
    assert e.value.path == str(state / name) and e.value.hint
    if name == "slots":
        with pytest.raises(StateDirError):
            SlotStore(state).install_incoming("a")


def test_plain_dir_checks_every_component_and_creates(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "ln").symlink_to(tmp_path / "real")
    assert plain_dir(tmp_path, "new/sub", create=True) == tmp_path / "new" / "sub"
    with pytest.raises(StateDirError) as e:
        plain_dir(tmp_path, "ln/x", create=True)
    assert e.value.path == str(tmp_path / "ln")
    assert not (tmp_path / "real" / "x").exists()
    with pytest.raises(StateDirError, match="missing"):
        plain_dir(tmp_path, "absent")


def test_remove_entry_never_follows(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep").write_bytes(b"k")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ln").symlink_to(tmp_path / "outside")
    (tmp_path / "ln").symlink_to(tmp_path / "outside")
    remove: Callable[[Path], None] = remove_entry
    remove(tmp_path / "ln")
    remove(tmp_path / "d")
    remove(tmp_path / "missing")
    assert sorted(os.listdir(tmp_path)) == ["outside"]
    assert _files(tmp_path / "outside") == {"keep": b"k"}


def test_an_index_entry_the_bundle_does_not_have_leaves_no_file(
    bundles: tuple[bytes, bytes], tmp_path: Path,
) -> None:
    signed, _evil = bundles
    (first, off, _n), *_ = _offsets(signed)
    index = [{"path": first, "offset": off, "size": 0},
             {"path": "evil/run.py", "offset": off + 10, "size": 0}]
    _plant(tmp_path, signed, index, {"evil/run.py": b"", first: b"planted"})
    files, _origin, _fp = _run(tmp_path, signed)
    assert files == _members(signed)
    assert not (tmp_path / "staging" / "incoming" / "evil").exists()


def test_a_huge_planted_index_is_read_only_to_its_bound(tmp_path: Path) -> None:
    from modelward.updater.install._stage import MAX_INDEX_BYTES

    stage = Stage(tmp_path / "staging", tmp_path / "staging" / "incoming", "k" * 64)
    stage.staging.mkdir()
    line = json.dumps({"path": "a", "offset": 512, "size": 1}).encode() + b"\n"
    with open(stage.index, "wb") as f:
        f.write(line)
        f.truncate(8 << 30)  # 8 GiB, sparse
    assert stage.entries() == [IndexEntry("a", 512, 1)]
    assert MAX_INDEX_BYTES <= 1 << 20


def _deep(root: Path, depth: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)


def test_a_planted_chain_of_thousands_of_directories_is_walked_and_removed_without_recursion(
    bundles: tuple[bytes, bytes], tmp_path: Path,
) -> None:
    signed, _evil = bundles
    slot = tmp_path / "slot"
    slot.mkdir()
    (slot / "f").write_bytes(b"x")
    _deep(slot, 3000)
    got = directory_entries(slot)  # no RecursionError; the deep part never matches
    assert ("f", 1) in [(e.path, e.size) for e in got] and any(e.size == -1 for e in got)
    index = [{"path": p, "offset": o, "size": n} for p, o, n in _offsets(signed)]
    stage = _plant(tmp_path, signed, index, {})
    _deep(stage.incoming, 3000)
    (stage.incoming / "d" / ".rm-1").mkdir()  # (a name the remover itself uses)
    files, _origin, _fp = _run(tmp_path, signed)
    assert files == _members(signed)
    remove_entry(slot)
    assert not slot.exists()
