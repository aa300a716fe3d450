"""Attacker a16org, a team key holder: a signed chunk index that lies in a way the
bundle-level checks miss (every chunk hashes right on the origin, but the file's signed
data offset is shifted, so the assembled file is not the signed one)."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import replace
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from modelward.updater.bundle._chunkindex import Chunk, ChunkIndex, index_path, parse_index
from modelward.updater.install import _install
from modelward.updater.install._delta import hint_path, index_fingerprint
from tests._stock_tuf import stock_refresh
from tests.conftest import World
from tests.integration._i16_delta import bundle_gets, publish


def _lying(ix: ChunkIndex, bundle: bytes, shift: int = 512) -> ChunkIndex:
    """``ix`` with its last file's data moved ``shift`` bytes on (into the tar's
    end-of-archive blocks), every chunk's sha256 that of the bundle's bytes there."""
    last = ix.files[-1]
    off = last.data_offset + shift
    assert off + last.size <= ix.bundle_length
    chunks, pos = [], off
    for c in last.chunks:
        chunks.append(Chunk(pos, c.length, hashlib.sha256(bundle[pos:pos + c.length]).digest()))
        pos += c.length
    lie = replace(ix, files=(*ix.files[:-1], replace(last, data_offset=off,
                                                     chunks=tuple(chunks))))
    return parse_index(lie.to_bytes(), "lie")  # (a valid index, as the team signs it)


def _sign_index(w: World, bundle_target: str, ix: ChunkIndex) -> None:
    """The team key holder signs ``ix`` as the bundle's chunk index target."""
    data = ix.to_bytes()
    targets, _, _ = w.repo.current()
    ipath = index_path(bundle_target)
    itf = TargetFile(len(data), {"sha256": hashlib.sha256(data).hexdigest()}, ipath)
    itf.unrecognized_fields["custom"] = {"modelward-chunk-index": {"bundle": bundle_target}}
    served = w.repo_dir / "targets" / "classifier" / \
        f"{itf.hashes['sha256']}.{ipath.rpartition('/')[2]}"
    served.write_bytes(data)
    targets.targets[ipath] = itf
    w.repo._commit_targets(targets)  # noqa: SLF001 - the team's own signing step
    stock_refresh(w.repo_dir)


def _install_lying_v2(w: World, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, ChunkIndex,
                                                                            list[str]]:
    publish(w, "1.0.0")
    w.update()
    assert w.active_version() == "1.0.0"
    b2, ix2 = publish(w, "2.0.0", changed_rows=100)
    lie = _lying(ix2, b2.read_bytes())
    assert index_fingerprint(lie) == index_fingerprint(ix2)  # the signed fingerprint holds
    _sign_index(w, "classifier/classifier-2.0.0.tar", lie)
    checked: list[str] = []
    real = _install.run_health_check

    def spy(incoming, *a, **kw):  # type: ignore[no-untyped-def]
        checked.append(hashlib.sha256((incoming / ix2.files[-1].path).read_bytes())
                       .hexdigest())
        return real(incoming, *a, **kw)

    monkeypatch.setattr(_install, "run_health_check", spy)
    w.update()
    return b2, ix2, checked


def test_lying_index_is_caught_before_the_health_check_and_costs_at_most_two_bundles(
        world: World, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "modelward.updater.install._install"):
        b2, ix2, checked = _install_lying_v2(world, monkeypatch)
    assert world.active_version() == "2.0.0"
    assert "the delta's files are not the signed ones" in caplog.text
    assert checked == [ix2.files[-1].sha256]  # the health check only saw the signed file
    gets = bundle_gets(world, "2.0.0")
    assert gets[-1] == (200, b2.stat().st_size, "")  # the whole bundle, once
    assert sum(n for _, n, _ in gets) <= 2 * b2.stat().st_size


def test_an_index_that_failed_the_seal_is_not_kept_as_the_slots_hint(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    b2, ix2, _ = _install_lying_v2(world, monkeypatch)
    assert world.active_version() == "2.0.0"
    hint = hint_path(world.state, index_fingerprint(ix2))
    if hint.exists():  # a hint kept must locate the slot's real chunks
        stored = parse_index(hint.read_bytes(), "hint")
        slot = world.state / "current"
        for f in stored.files:
            data = (slot / f.path).read_bytes()
            for c in f.chunks:
                at = f.file_offset(c)
                assert hashlib.sha256(data[at:at + c.length]).digest() == c.sha256, f.path


def test_a_lying_index_and_a_bad_whole_bundle_cost_the_delta_once(world: World) -> None:
    from modelward.updater.errors import TargetHashError

    publish(world, "1.0.0")
    world.update()
    b2, ix2 = publish(world, "2.0.0", changed_rows=100)
    data = bytearray(b2.read_bytes())
    lie = _lying(ix2, bytes(data))
    last = lie.files[-1]
    assert last.data_offset + last.size < len(data) - 1
    data[-1] ^= 1  # no chunk covers it: the chunks still match, the bundle's hash does not
    b2.write_bytes(bytes(data))
    _sign_index(world, "classifier/classifier-2.0.0.tar", lie)
    before = world.snapshot()
    log = world.tmp / "origin" / "access.log"
    polls = []
    for _ in range(2):
        start = len(log.read_text())
        with pytest.raises(TargetHashError):
            world.update()
        polls.append(re.findall(r'"GET /targets/classifier/\w+\.classifier-2\.0\.0\.tar '
                                r'HTTP/1\.1" (\d+) (\d+)', log.read_text()[start:]))
    s = world.snapshot()
    assert (s.record, s.counter, s.anchor, s.current, s.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    assert world.active_version() == "1.0.0"
    assert any(st == "206" for st, _ in polls[0])  # the first poll tried the delta
    assert not any(st == "206" for st, _ in polls[1]), polls  # the second: not again


def test_a_broken_off_whole_bundle_after_a_refused_delta_resumes(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuf.api import exceptions as tuf_exc

    from modelward.updater.errors import ModelwardError
    from modelward.updater.transport._fetcher import RangeFetcher

    publish(world, "1.0.0")
    world.update()
    b2, ix2 = publish(world, "2.0.0", changed_rows=100)
    _sign_index(world, "classifier/classifier-2.0.0.tar", _lying(ix2, b2.read_bytes()))
    size = b2.stat().st_size
    real = RangeFetcher.fetch_from

    def dropping(self, url, offset):  # type: ignore[no-untyped-def]
        chunks, start = real(self, url, offset)
        if not url.endswith("classifier-2.0.0.tar"):
            return chunks, start

        def cut():  # type: ignore[no-untyped-def]
            got = start
            for c in chunks:
                yield c
                got += len(c)
                if got >= size // 2:
                    raise tuf_exc.DownloadError("connection reset (the link dropped)")
        return cut(), start

    monkeypatch.setattr(RangeFetcher, "fetch_from", dropping)
    with pytest.raises(ModelwardError):
        world.update()
    monkeypatch.setattr(RangeFetcher, "fetch_from", real)
    log = world.tmp / "origin" / "access.log"
    start = len(log.read_text())
    world.update()
    assert world.active_version() == "2.0.0"
    gets = re.findall(r'"GET /targets/classifier/\w+\.classifier-2\.0\.0\.tar HTTP/1\.1" '
                      r'(\d+) (\d+)', log.read_text()[start:])
    # (fixorg: every GET of this poll is counted, delta or whole: the refused delta is
    # remembered, so the poll asks for the rest of the whole bundle only, one Range; the
    # attacker's filter `n > size // 3` dropped a resume whose rest is small)
    assert gets and all(st == "206" for st, _ in gets), gets
    assert sum(int(n) for _, n in gets) <= size - size // 2 + (256 << 10), gets
