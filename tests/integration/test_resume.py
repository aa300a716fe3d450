"""A partial download in staging is resumed with a Range request, never trusted blindly."""

from __future__ import annotations

import os
import re

import pytest

from modelward.agent._commands import update as agent_update
from modelward.updater.errors import TargetHashError
from modelward.updater.idle import Gate
from modelward.updater.install._stage import Stage
from tests.conftest import World
from tests.integration._i16_delta import drop_index


def _bundle_requests(w: World) -> list[tuple[int, int]]:
    """(status, body bytes) of every GET of a bundle in nginx's access log."""
    log = (w.tmp / "origin" / "access.log").read_text()
    return [(int(m.group(1)), int(m.group(2)))
            for m in re.finditer(r'"GET /targets/\S+\.tar HTTP/1\.1" (\d+) (\d+)', log)]


def _publish_big(w: World) -> tuple[bytes, str]:
    pad = w.builds / "pad"
    pad.write_bytes(os.urandom(8 << 20))
    served = w.publish("1.0.0", seed=1, extra=[(pad, "data/pad.bin")])
    # (a release from before chunk indexes: these tests are about the whole-bundle stage;
    # the delta's own resume is in test_i16_delta_attacks and test_a16_disk_kill)
    drop_index(w.repo, w.repo_dir, "classifier/classifier-1.0.0.tar")
    sha = served.name.split(".", 1)[0]
    return served.read_bytes(), sha


def test_partial_download_resumes_from_staged_offset(world: World) -> None:
    data, sha = _publish_big(world)
    staging = world.state / "staging"
    staging.mkdir(parents=True)
    half = len(data) // 2
    (staging / f"{sha}.part").write_bytes(data[:half])  # an earlier attempt's bytes
    world.update()
    assert world.active_version() == "1.0.0"
    reqs = _bundle_requests(world)
    assert reqs == [(206, len(data) - half)], reqs  # only the missing bytes came again
    assert not list(staging.iterdir())


def test_corrupt_partial_download_is_caught_and_discarded(world: World) -> None:
    data, sha = _publish_big(world)
    staging = world.state / "staging"
    staging.mkdir(parents=True)
    bad = bytearray(data[: len(data) // 2])
    bad[100] ^= 0xFF  # tampered while the device was off
    (staging / f"{sha}.part").write_bytes(bytes(bad))
    with pytest.raises(TargetHashError):
        world.update()
    assert world.active_version() is None
    assert not list(staging.iterdir())  # the poisoned part is gone
    world.update()  # and the next attempt fetches it whole
    assert world.active_version() == "1.0.0"
    assert _bundle_requests(world)[-1] == (200, len(data))


class _Interrupted(Exception):
    """The test breaks an attempt off half-way through its download."""


class _StopAt(Gate):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def checkpoint(self, what: str) -> None:
        self.n -= 1
        if self.n == 0:
            raise _Interrupted
        super().checkpoint(what)


def _interrupted_stage(w: World, data: bytes, sha: str) -> Stage:
    with pytest.raises(_Interrupted):
        agent_update(w.cfg, gate=_StopAt(6))  # reads of 64 KiB, 128 KiB, ... : ~2 MiB in
    stage = Stage(w.state / "staging", w.state / "staging" / "incoming", sha)
    assert 0 < stage.resumable(len(data)) < len(data)
    return stage


def test_interrupted_download_resumes_and_is_written_once(world: World) -> None:
    data, sha = _publish_big(world)
    stage = _interrupted_stage(world, data, sha)
    have = stage.resumable(len(data))
    world.update()
    assert world.active_version() == "1.0.0"
    assert _bundle_requests(world)[-1] == (206, len(data) - have)  # only what was missing
    assert not list(stage.staging.iterdir())
    slot = world.state / "current"
    assert (slot / "data" / "pad.bin").read_bytes() == (world.builds / "pad").read_bytes()


def test_stage_tampered_between_attempts_is_caught_and_discarded(world: World) -> None:
    data, sha = _publish_big(world)
    stage = _interrupted_stage(world, data, sha)
    pad = stage.incoming / "data" / "pad.bin"
    with open(pad, "r+b") as f:  # altered while the device was off
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = world.snapshot()
    with pytest.raises(TargetHashError):
        world.update()
    assert world.snapshot() == before  # record, counter, anchor, current, slots, metadata
    assert world.active_version() is None
    assert not list(stage.staging.iterdir())  # the poisoned stage is gone
    world.update()  # and the next attempt fetches it whole
    assert world.active_version() == "1.0.0"
    assert _bundle_requests(world)[-1] == (200, len(data))
