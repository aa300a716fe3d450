"""Attacks a16disk (the device's disk, between and during attempts) on the delta install:
the chunks/ directory swapped for a link after its check (hint write and prune, hint read),
sparse files in staging/incoming defeating the free-space check, a hostile hint that claims
every chunk is held (bounded reads), ENOSPC while assembling (a typed error)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections import namedtuple
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.updater.bundle._chunkindex import ChunkIndex
from modelward.updater.errors import StagingError
from modelward.updater.idle import Gate
from modelward.updater.install import _delta
from modelward.updater.install._delta import MAX_SOURCES, Base, read_hint, write_hint


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, ChunkIndex, TargetFile]:
    from tests.integration._i16_delta import big_model

    model = big_model(tmp_path / "m.onnx")
    out = tmp_path / "classifier-1.0.0.tar"
    build_bundle(model, "classifier", "1.0.0", out, options=BuildOptions())
    data = out.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    tf = TargetFile(len(data), {"sha256": sha}, "classifier/classifier-1.0.0.tar")
    return out, build_index(out, sha), tf


class _Fake:
    """A ranged transport over the bundle's bytes that counts what it sends."""

    def __init__(self, data: bytes) -> None:
        self.data, self.sent = data, 0

    def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
        raise AssertionError("fetch_ranges is used")

    def fetch_ranges(self, url: str, ranges: Sequence[tuple[int, int]]
                     ) -> Iterator[tuple[int, bytes]]:
        for off, n in ranges:
            for i in range(off, off + n, 30000):
                piece = self.data[i:min(i + 30000, off + n)]
                self.sent += len(piece)
                yield i, piece


def _assemble(tmp: Path, ix: ChunkIndex, tf: TargetFile, fake: object,
              bases: list[tuple[Base, Path]] | None = None):  # type: ignore[no-untyped-def]
    staging = tmp / "state" / "staging"
    staging.parent.mkdir(exist_ok=True)
    return _delta.assemble(ix, tf, "https://o/x.tar", fake, staging,  # type: ignore[arg-type]
                           staging / "incoming", bases or [], Gate())


# -- chunks/ swapped for a link after it was checked --------------------------------------


def test_chunks_swapped_for_a_link_during_the_hint_write_deletes_nothing_outside(
        tmp_path: Path, release, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    _, ix, _ = release
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim"  # (e.g. /etc, when the agent runs as root)
    victim.mkdir()
    (victim / "passwd").write_bytes(b"root:x:0:0")
    real = _delta.write_at  # (the hint is written through chunks/'s fd, then pruned)

    def racing(fd: int, name: str, data: bytes, mode: int) -> None:
        real(fd, name, data, mode)
        shutil.rmtree(state / "chunks")  # the disk attacker wins the race here
        (state / "chunks").symlink_to(victim)

    monkeypatch.setattr(_delta, "write_at", racing)
    write_hint(state, ix, [])
    assert (victim / "passwd").read_bytes() == b"root:x:0:0"


def test_chunks_swapped_for_a_link_during_the_hint_read_is_not_followed(
        tmp_path: Path, release, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    _, ix, _ = release
    fp = _delta.index_fingerprint(ix)
    state = tmp_path / "state"
    (state / "chunks").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"{fp}.json").write_bytes(ix.to_bytes())
    real = _delta.is_plain_dir

    def racing(p: Path) -> bool:
        ok = real(p)
        if p == state / "chunks" and not p.is_symlink():
            p.rmdir()
            p.symlink_to(outside)
        return ok

    monkeypatch.setattr(_delta, "is_plain_dir", racing)
    assert read_hint(state, fp) is None


def test_hint_and_incoming_modes_are_not_world_readable(tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release
    (tmp_path / "state").mkdir()
    write_hint(tmp_path / "state", ix, [])
    for p in (tmp_path / "state" / "chunks").iterdir():
        assert os.stat(p).st_mode & 0o007 == 0
    assert os.stat(tmp_path / "state" / "chunks").st_mode & 0o007 == 0
    _assemble(tmp_path, ix, tf, _Fake(bundle.read_bytes()))
    inc = tmp_path / "state" / "staging" / "incoming"
    for p in [inc, *inc.rglob("*")]:
        assert os.stat(p).st_mode & 0o007 == 0, p


# -- space ---------------------------------------------------------------------------------


_Usage = namedtuple("_Usage", "total used free")


def test_sparse_incoming_files_do_not_pass_the_free_space_check(
        tmp_path: Path, release, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release
    inc = tmp_path / "state" / "staging" / "incoming"
    inc.mkdir(parents=True)
    for f in ix.files:  # what open_out leaves after a kill before the first chunk came
        with open(inc / f.path, "wb") as fh:
            fh.truncate(f.size)
    (inc / "manifest.json").write_bytes(ix.manifest_bytes)
    monkeypatch.setattr(_delta.shutil, "disk_usage",
                        lambda p: _Usage(1 << 30, (1 << 30) - 4096, 4096))
    fake = _Fake(bundle.read_bytes())
    with pytest.raises(StagingError, match="not enough space"):
        _assemble(tmp_path, ix, tf, fake)
    assert fake.sent == 0


def test_enospc_while_writing_a_chunk_is_a_typed_error_and_keeps_the_stage(
        tmp_path: Path, release, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release
    real = os.pwrite
    written = [0]

    def full(fd: int, data, pos: int) -> int:  # type: ignore[no-untyped-def]
        if written[0] > 1 << 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real(fd, data, pos)
        written[0] += n
        return n

    monkeypatch.setattr(_delta.os, "pwrite", full)
    with pytest.raises(StagingError, match="No space left"):
        _assemble(tmp_path, ix, tf, _Fake(bundle.read_bytes()))
    monkeypatch.setattr(_delta.os, "pwrite", real)
    fake = _Fake(bundle.read_bytes())  # space given back: the resume fetches the rest
    _, _, _, stats = _assemble(tmp_path, ix, tf, fake)
    assert stats.in_place_bytes > 0 and stats.fetched_bytes < ix.data_bytes


# -- a hostile hint: every chunk "held" in a sparse base file --------------------------------


def test_a_hint_claiming_every_chunk_is_held_costs_bounded_reads(
        tmp_path: Path, release, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release
    bases = []
    for name in ("active", "previous"):
        slot = tmp_path / name
        slot.mkdir()
        for f in ix.files:  # sparse files of the sizes the hint needs, none of the bytes
            with open(slot / f.path, "wb") as fh:
                fh.truncate(f.size)
        huge = slot / "model.onnx"  # and one sparse file of 1 TiB (only sizes count)
        with open(huge, "wb") as fh:
            fh.truncate(1 << 40)
        bases.append((Base(name, _delta.plain_sizes(slot), ix), slot))
    read = [0]
    real = _delta._Files.read

    def counting(self, p, n):  # type: ignore[no-untyped-def]
        got = real(self, p, n)
        read[0] += n
        return got

    monkeypatch.setattr(_delta._Files, "read", counting)
    fake = _Fake(bundle.read_bytes())
    _, _, _, stats = _assemble(tmp_path, ix, tf, fake, bases)
    assert stats.held_bytes == 0 and stats.fetched_bytes == ix.data_bytes
    assert read[0] <= MAX_SOURCES * ix.data_bytes  # a few passes, not the sparse TiB


def test_staging_swapped_for_a_link_after_prepare_writes_nothing_outside(
        tmp_path: Path, release, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release
    staging = tmp_path / "state" / "staging"
    victim = tmp_path / "victim"  # another app's directory, with a file of a release's name
    (victim / "incoming").mkdir(parents=True)
    (victim / "incoming" / "manifest.json").write_bytes(b"the other app's data")
    real = _delta._prepare

    def racing(*a, **kw):  # type: ignore[no-untyped-def]
        stage = real(*a, **kw)
        shutil.rmtree(staging)  # the disk attacker wins the race here
        staging.symlink_to(victim)
        return stage

    monkeypatch.setattr(_delta, "_prepare", racing)
    with contextlib.suppress(Exception):  # (a refusal is fine, a write outside is not)
        _assemble(tmp_path, ix, tf, _Fake(bundle.read_bytes()))
    assert (victim / "incoming" / "manifest.json").read_bytes() == b"the other app's data"


def test_slots_swapped_for_a_link_after_slot_bases_is_not_read_through(
        tmp_path: Path, release, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    bundle, ix, tf = release
    state = tmp_path / "state"
    slot = state / "slots" / "a"
    slot.mkdir(parents=True)
    data = bundle.read_bytes()
    for f in ix.files:
        (slot / f.path).write_bytes(data[f.data_offset:f.data_offset + f.size])
    outside = tmp_path / "outside"
    (state / "slots").rename(outside)  # the same files, now outside state_dir
    (state / "slots").symlink_to(outside)  # (swapped after the bases were measured)
    base = Base("active", _delta.plain_sizes(outside / "a"), ix)
    _, _, _, stats = _assemble(tmp_path, ix, tf, _Fake(data), [(base, slot)])
    assert stats.held_bytes == 0  # nothing read through the link


def test_a_hint_write_cut_by_power_loss_is_ignored_then_pruned(tmp_path: Path, release) -> None:  # type: ignore[no-untyped-def]
    _, ix, _ = release
    fp = _delta.index_fingerprint(ix)
    d = tmp_path / "chunks"
    d.mkdir()
    blob = ix.to_bytes()
    (d / f".{fp}.json.k3j2.tmp").write_bytes(blob[:len(blob) // 2])  # write_atomic's temp
    (d / f"{fp}.json").write_bytes(blob[:len(blob) // 2])  # (a filesystem without rename order)
    assert read_hint(tmp_path, fp) is None  # cut: not believed
    write_hint(tmp_path, ix, [])
    assert os.listdir(d) == [f"{fp}.json"] and read_hint(tmp_path, fp) == ix
