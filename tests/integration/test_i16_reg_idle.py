"""Issue 16: a busy application pauses a delta at its gate checkpoints (real nginx, swtpm)
within bounded memory, as the whole-bundle path does in test_idle (its 40 MiB bound)."""

from __future__ import annotations

import os
import time
import tracemalloc
from pathlib import Path

from modelward.updater.idle import Gate
from modelward.updater.install._install import Outcome
from tests.conftest import World
from tests.integration._i16_delta import bundle_gets
from tests.integration.test_idle import _run, _Switch, _wait


def _written(d: Path) -> int:
    """Bytes allocated under ``d`` (the delta's files are sparse until chunks land)."""
    return sum(p.stat().st_blocks * 512 for p in d.rglob("*") if p.is_file()) \
        if d.exists() else 0


def test_busy_mid_delta_download_pauses_in_bounded_memory_and_resumes(world: World) -> None:
    pad = world.builds / "pad"
    pad.write_bytes(os.urandom(32 << 20))
    world.publish("1.0.0", seed=1, extra=[(pad, "data/pad.bin")])
    world.update()
    pad.write_bytes(os.urandom(32 << 20))  # (every chunk of the pad is new)
    world.publish("2.0.0", seed=1, extra=[(pad, "data/pad.bin")])
    staging = world.state / "staging"
    sig = _Switch(when=lambda: _written(staging) >= 12 << 20)
    gate = Gate([sig], poll=0.05)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        t, out = _run(world, gate)
        _wait(lambda: sig.fired, 60)
        time.sleep(1.0)
        paused_at = _written(staging)
        held = tracemalloc.get_traced_memory()[0] - base
        time.sleep(1.0)
        assert _written(staging) == paused_at  # nothing written while paused
        assert paused_at < 30 << 20  # (paused mid-download, not at the end)
        assert held < 40 << 20, held  # the whole-bundle path's bound (test_idle)
        sig.on = False
        t.join(120)
    finally:
        tracemalloc.stop()
    assert out and out[0].outcome is Outcome.INSTALLED  # type: ignore[attr-defined]
    assert world.active_version() == "2.0.0"
    gets = bundle_gets(world, "2.0.0")
    assert gets and all(s == 206 for s, _, _ in gets), gets  # the delta, not the fallback
    assert gate.pauses == 1
