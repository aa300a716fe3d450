"""Real stack (nginx + swtpm + the agent's update): the delta's writer fails with ENOSPC in
the middle of the fetch. Trusted state does not move, no pipeline thread is left running,
incoming holds only verified chunks, and the next poll installs the release fetching
exactly the chunks still missing."""

from __future__ import annotations

import errno
import hashlib
import itertools
import logging
import threading

import pytest

from modelward.updater.install import _delta
from tests.conftest import World
from tests.integration.test_i16_delta_attacks import (  # noqa: F401 - fixture
    _fetched,
    _new_chunks,
    _trusted,
    _v1_then_v2,
    delta_log,
)


def test_a17_enospc_mid_fetch_moves_nothing_and_the_resume_fetches_only_the_rest(
        world: World, delta_log: logging.Handler,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, ix1, b2, ix2 = _v1_then_v2(world, rows=500)
    new = _new_chunks(ix1, ix2)
    assert len(new) >= 6
    path, off, n, _ = new[len(new) // 2]
    f = next(x for x in ix2.files if x.path == path)
    at = off - f.data_offset
    real = _delta._Files.write_run
    failed = []

    def write_run(self: _delta._Files, p: _delta.Place,
                  parts: list[bytes | bytearray | memoryview]) -> None:
        # (the chunks of a run before the one at ``at`` are written, then the disk is full)
        ends = list(itertools.accumulate((len(d) for d in parts), initial=p.offset))
        if p.root == "incoming" and p.path == path and at in ends[:-1] and not failed:
            failed.append(1)
            if ends.index(at):
                real(self, p, parts[:ends.index(at)])
            raise OSError(errno.ENOSPC, "No space left on device (test)")
        real(self, p, parts)

    before = _trusted(world)
    monkeypatch.setattr(_delta._Files, "write_run", write_run)
    with pytest.raises(Exception) as ei:  # noqa: PT011 - the installer's own type
        world.update()
    assert failed, ei.value
    assert _trusted(world) == before and world.active_version() == "1.0.0"
    assert not [t.name for t in threading.enumerate() if t.name.startswith("delta")]
    incoming = world.state / "staging" / "incoming"
    have = 0
    for p, o, ln, sha in new:
        fx = next(x for x in ix2.files if x.path == p)
        if (incoming / p).exists():
            with open(incoming / p, "rb") as fh:
                fh.seek(o - fx.data_offset)
                have += ln if hashlib.sha256(fh.read(ln)).digest() == sha else 0
    assert 0 < have < sum(ln for _, _, ln, _ in new)
    monkeypatch.setattr(_delta._Files, "write_run", real)
    world.update()
    assert world.active_version() == "2.0.0"
    _, fetched = _fetched(world)
    assert fetched == sum(ln for _, _, ln, _ in new) - have  # only what was missing
