"""The download stage: bundle bytes are written once (files + a sparse skeleton), and an
interrupted stage rebuilds exactly the bytes it has, so a download continues from there."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelward.publisher._bundle_build import build_bundle
from modelward.simulator._models import make_linear_model
from modelward.trust._fingerprint import directory_entries, slot_fingerprint
from modelward.updater.bundle._bundle import extract_bundle
from modelward.updater.install._stage import Stage


class _Cut(Exception):
    pass


class _Source:
    """Bundle bytes in chunks: first ``prefix`` (rebuilt from a stage), then the rest of
    ``data``; raises :class:`_Cut` at ``stop`` (the transfer breaks off)."""

    def __init__(self, data: bytes, start: int, prefix: Iterator[memoryview], chunk: int,
                 stop: int | None = None) -> None:
        self.data, self.pos, self.prefix, self.chunk, self.stop = data, start, prefix, chunk, stop

    def read(self, n: int = -1) -> bytes | memoryview:
        for view in self.prefix:
            return view
        if self.stop is not None and self.pos >= self.stop:
            raise _Cut
        end = min(self.pos + self.chunk, len(self.data))
        if self.stop is not None:
            end = min(end, self.stop)
        out = self.data[self.pos:end]
        self.pos = end
        return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("b")
    model = make_linear_model(d / "m.onnx", seed=1)
    (d / "pad.bin").write_bytes(os.urandom(3 << 20))
    (d / "small.txt").write_bytes(b"tiny\n")
    out = d / "b.tar"
    build_bundle(model, "clf", "1.0.0", out,
                 extra=[(d / "pad.bin", "data/pad.bin"), (d / "small.txt", "small.txt")])
    return out.read_bytes()


def _attempt(stage: Stage, data: bytes, stop: int | None, chunk: int = 100_000) -> object:
    """One attempt: resume from what the stage has, break off at ``stop``."""
    at = stage.resumable(len(data))
    writer = stage.writer(at)
    src = _Source(data, at, stage.prefix(at), chunk, stop)
    try:
        return extract_bundle(src, stage.incoming, "b", writer=writer)
    except _Cut:
        return None


def _files(bundle: bytes, tmp: Path) -> dict[str, bytes]:
    out = tmp / "ref"
    out.mkdir()
    with tarfile.open(fileobj=__import__("io").BytesIO(bundle)) as t:
        t.extractall(out, filter="data")
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("stops", [[10], [700], [1500, 3000], [2_000_000], [2_000_000, 2_500_000],
                                   [None]])
def test_interrupted_stage_rebuilds_its_prefix_and_resumes(
    bundle: bytes, tmp_path: Path, stops: list[int | None],
) -> None:
    stage = Stage(tmp_path / "staging", tmp_path / "staging" / "incoming", "k")
    stage.staging.mkdir()
    for stop in stops:
        assert _attempt(stage, bundle, stop) is None or stop is None
        have = stage.resumable(len(bundle))
        assert have <= (stop if stop is not None else len(bundle))
        assert b"".join(stage.prefix(have)) == bundle[:have]  # exactly the bytes it has
    result = _attempt(stage, bundle, None)
    assert result is not None
    _, entries = result  # type: ignore[misc]
    assert {p.relative_to(stage.incoming).as_posix(): p.read_bytes()
            for p in stage.incoming.rglob("*") if p.is_file()} == _files(bundle, tmp_path)
    assert slot_fingerprint(entries) == slot_fingerprint(directory_entries(stage.incoming))
    assert b"".join(stage.prefix(len(bundle))) == bundle
    # Written once: the skeleton holds headers and padding, holes where the data lies.
    assert os.stat(stage.part).st_size == len(bundle)
    assert os.stat(stage.part).st_blocks * 512 < 256 * 1024


def test_complete_stage_reverifies_without_writing(bundle: bytes, tmp_path: Path) -> None:
    stage = Stage(tmp_path / "staging", tmp_path / "staging" / "incoming", "k")
    stage.staging.mkdir()
    assert _attempt(stage, bundle, None) is not None
    pad = stage.incoming / "data" / "pad.bin"
    before = os.stat(pad)
    assert stage.resumable(len(bundle)) == len(bundle)
    assert _attempt(stage, bundle, None) is not None  # every byte from the stage, hashed again
    after = os.stat(pad)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_skeleton_without_index_is_a_plain_prefix_and_its_files_are_written(
    bundle: bytes, tmp_path: Path,
) -> None:
    """A raw prefix (no index) rebuilds from the skeleton alone; its members' files must then
    be written from those bytes, not assumed to be on disk already."""
    stage = Stage(tmp_path / "staging", tmp_path / "staging" / "incoming", "k")
    stage.staging.mkdir()
    half = len(bundle) // 2
    stage.part.write_bytes(bundle[:half])
    assert stage.resumable(len(bundle)) == half
    assert _attempt(stage, bundle, None) is not None
    assert (stage.incoming / "data" / "pad.bin").read_bytes() == _files(bundle, tmp_path)[
        "data/pad.bin"]


def test_resume_removes_what_the_stage_does_not_account_for(
    bundle: bytes, tmp_path: Path,
) -> None:
    stage = Stage(tmp_path / "staging", tmp_path / "staging" / "incoming", "k")
    stage.staging.mkdir()
    _attempt(stage, bundle, 1_000_000)
    outside = tmp_path / "outside"
    outside.mkdir()
    (stage.incoming / "small.txt").symlink_to(outside / "victim")  # planted while stopped
    (stage.incoming / "stray").write_bytes(b"x")
    have = stage.resumable(len(bundle))
    stage.writer(have).close()
    assert sorted(p.name for p in stage.incoming.rglob("*")) == [
        "data", "manifest.json", "model.onnx", "pad.bin", "vectors.npz"]
    assert not (outside / "victim").exists()


def test_other_targets_stages_are_cleared(bundle: bytes, tmp_path: Path) -> None:
    old = Stage(tmp_path / "staging", tmp_path / "staging" / "incoming", "old")
    old.staging.mkdir()
    _attempt(old, bundle, 1_000_000)
    new = Stage(old.staging, old.incoming, "new")
    new.clear_others()
    assert list(old.staging.iterdir()) == []
    assert new.resumable(len(bundle)) == 0


def test_members_are_written_behind_with_at_most_two_windows_dirty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A big member is written back as it goes: each 8 MiB window's writeback starts when
    it is full and the window before is waited for, so at most two windows are dirty (the
    pre-commit fsync has little left to do). Its pages stay cached for the seal, which
    reads them right after (no DONTNEED: that made the seal read the stage from disk)."""
    import io

    from modelward.updater.bundle._tarstream import Member, TarStream
    from modelward.updater.install import _stage
    from modelward.updater.install._stage import WRITE_BEHIND, StageWriter

    real = _stage._sync_file_range
    if real is None:
        pytest.fail("sync_file_range (glibc, Linux) is what the write-behind uses")
    calls: list[tuple[int, int, int]] = []

    def spy(fd: int, start: int, n: int, flags: int) -> int:
        calls.append((start, n, flags))
        return real(fd, start, n, flags)

    monkeypatch.setattr(_stage, "_sync_file_range", spy)
    fadvise: list[int] = []
    monkeypatch.setattr(_stage.os, "posix_fadvise",
                        lambda fd, off, n, advice: fadvise.append(advice))
    payload = os.urandom(6 * WRITE_BEHIND + 12345)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("big.bin")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    dest = tmp_path / "out"
    dest.mkdir()
    writer = StageWriter(dest)
    tar = TarStream(io.BytesIO(buf.getvalue()))
    member = tar.next()
    assert isinstance(member, Member)
    sink = writer.open(member)
    for view in tar.data():
        sink.write(view)
    sink.close()
    out = dest / "big.bin"
    started = [c[0] for c in calls if c[2] == _stage._SYNC_WRITE]
    waited = [c[0] for c in calls if c[2] == _stage._SYNC_WAIT]
    assert started == [i * WRITE_BEHIND for i in range(6)], calls
    assert waited == [i * WRITE_BEHIND for i in range(5)], calls  # (each window before)
    assert os.POSIX_FADV_DONTNEED not in fadvise
    assert out.read_bytes() == payload
