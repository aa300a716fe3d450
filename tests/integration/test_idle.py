"""Heavy work waits for idle windows and pauses mid-way (issue #4 must-show 2),
through real nginx and swtpm, with the signals injected."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from modelward.agent._commands import update
from modelward.updater.idle import Gate, IdleSignal
from modelward.updater.install._install import Outcome, _Pipe
from modelward.updater.install._stage import Stage
from tests.conftest import World
from tests.integration._i16_delta import drop_index


def _bundle_gets(w: World) -> list[tuple[int, int]]:
    log = (w.tmp / "origin" / "access.log").read_text()
    return [(int(a), int(b)) for a, b in
            re.findall(r'"GET /targets/\S+\.tar HTTP/1\.1" (\d+) (\d+)', log)]


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.exists() else 0


class _Switch(IdleSignal):
    """Busy while ``on``; optionally switches itself on when ``when()`` first holds."""

    def __init__(self, on: bool = False, when: Callable[[], bool] | None = None) -> None:
        self.on, self.when, self.fired = on, when, False
        self.at: int | None = None

    def busy(self) -> str | None:
        if self.when is not None and not self.fired and self.when():
            self.on = self.fired = True
        return "the application is busy" if self.on else None


def _run(w: World, gate: Gate) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(update(w.cfg, gate)))
    t.start()
    return t, out


def _wait(pred: Callable[[], bool], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_no_heavy_step_starts_while_busy(world: World) -> None:
    world.publish("1.0.0", seed=1)
    sig = _Switch(on=True)
    t, out = _run(world, Gate([sig], poll=0.05))
    time.sleep(2)
    journal = json.loads((world.state / "journal.json").read_bytes())
    assert journal["step"] == "checking"  # metadata refresh is cheap and ran
    assert _bundle_gets(world) == []  # no download started
    assert not (world.state / "staging").exists() or not any((world.state / "staging").iterdir())
    assert world.active_version() is None
    sig.on = False  # the application went quiet
    t.join(60)
    assert out and out[0].outcome is Outcome.INSTALLED  # type: ignore[attr-defined]
    assert world.active_version() == "1.0.0"


def test_busy_mid_download_pauses_within_the_pipe_depth_and_resumes(world: World) -> None:
    pad = world.builds / "pad"
    pad.write_bytes(os.urandom(64 << 20))
    served = world.publish("1.0.0", seed=1, extra=[(pad, "data/pad.bin")])
    # (a release from before chunk indexes: the whole-bundle stage and pipe; the delta's
    # pauses are test_i16_reg_idle)
    drop_index(world.repo, world.repo_dir, "classifier/classifier-1.0.0.tar")
    total = served.stat().st_size
    stage = Stage(world.state / "staging", world.state / "staging" / "incoming",
                  served.name.split(".", 1)[0])
    threshold = 16 << 20
    sig = _Switch(when=lambda: stage.resumable(total) >= threshold)
    gate = Gate([sig], poll=0.05)
    t, out = _run(world, gate)
    _wait(lambda: sig.fired)
    time.sleep(1.0)
    paused_at = stage.resumable(total)
    time.sleep(1.0)
    assert stage.resumable(total) == paused_at  # nothing written while paused
    chunk = world.cfg.updater.https.chunk_size  # type: ignore[union-attr]
    # The gate stops the download loop at once; the extraction thread then writes out what
    # the pipe holds (its depth, plus the chunk in hand on each side).
    assert threshold <= paused_at <= threshold + (_Pipe.depth + 2) * chunk
    sig.on = False
    t.join(120)
    assert out and out[0].outcome is Outcome.INSTALLED  # type: ignore[attr-defined]
    assert _bundle_gets(world) == [(200, total)]  # one download, no restart
    assert gate.pauses == 1


def test_busy_mid_extraction_pauses_and_resumes(world: World) -> None:
    pad = world.builds / "pad"
    pad.write_bytes(os.urandom(64 << 20))
    world.publish("1.0.0", seed=1, extra=[(pad, "data/pad.bin")])
    # (a release from before chunk indexes: the whole-bundle stage and pipe; the delta's
    # pauses are test_i16_reg_idle)
    drop_index(world.repo, world.repo_dir, "classifier/classifier-1.0.0.tar")
    incoming = world.state / "staging" / "incoming"
    sig = _Switch(when=lambda: _dir_bytes(incoming) >= 16 << 20)
    gate = Gate([sig], poll=0.05)
    t, out = _run(world, gate)
    _wait(lambda: sig.fired)
    time.sleep(0.5)
    held = _dir_bytes(incoming)
    time.sleep(1.0)
    assert _dir_bytes(incoming) == held
    assert held < 40 << 20
    sig.on = False
    t.join(120)
    assert out and out[0].outcome is Outcome.INSTALLED  # type: ignore[attr-defined]
    assert len(_bundle_gets(world)) == 1
    assert world.active_version() == "1.0.0"


def test_busy_file_from_config_gates_the_cli(world: World) -> None:
    busy = world.tmp / "app-busy"
    busy.write_text("7\n")
    world.conf_path.write_text(world.conf_path.read_text() +
                               f'\n[idle]\nbusy_file = "{busy}"\npoll = 0.1\n')
    world.publish("1.0.0", seed=1)
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "modelward", "agent", "update", "--config",
                             str(world.conf_path), "--once"], stderr=subprocess.PIPE,
                            text=True)
    time.sleep(3)
    assert proc.poll() is None and _bundle_gets(world) == []
    busy.write_text("0\n")
    assert proc.wait(60) == 0
    assert world.active_version() == "1.0.0"
    assert proc.stderr is not None and "pausing download" in proc.stderr.read()
