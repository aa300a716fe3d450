"""SIGKILL at every journaled step, then restart: a trusted ``current`` and a consistent
journal every time (issue #4 must-show 3). The steps come from the journal itself."""

from __future__ import annotations

import json
import signal

import pytest

from modelward.updater.install._journal import STEPS
from tests.conftest import World


def _journal(w: World) -> dict[str, str]:
    doc: dict[str, str] = json.loads((w.state / "journal.json").read_bytes())
    return doc


def _record_active(w: World) -> str:
    rec = json.loads((w.state / "trust" / "record.json").read_bytes())["record"]
    return str(rec["active"]["version"])


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_each_step_then_restart(world: World, step: str) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    killed = world.cli("agent", "update", "--config", str(world.conf_path), "--once",
                       env={"MODELWARD_TEST_KILL_AT": step})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _journal(world)["step"] == step  # the step was journaled before the kill

    # Power comes back: the boot check runs first and must find a trusted model.
    boot = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert boot.returncode == 0, boot.stderr
    committed = STEPS.index(step) >= STEPS.index("committed")
    assert world.active_version() == ("2.0.0" if committed else "1.0.0")
    assert _record_active(world) == world.active_version()
    j = _journal(world)
    assert (j["step"], j["version"]) == ("active", world.active_version())

    # The agent restarts and finishes (or finds nothing left to do).
    again = world.cli("agent", "update", "--config", str(world.conf_path), "--once")
    assert again.returncode == 0, again.stderr
    assert world.active_version() == "2.0.0"
    j = _journal(world)
    assert j["step"] == "active" and j["version"] == "2.0.0"
    assert _record_active(world) == "2.0.0"
    assert not (world.state / "staging" / "incoming").exists()
    assert world.cli("agent", "boot-check", "--config", str(world.conf_path)).returncode == 0


def test_staged_bundle_is_reused_not_downloaded_again(world: World) -> None:
    import re

    world.publish("1.0.0", seed=1)
    killed = world.cli("agent", "update", "--config", str(world.conf_path), "--once",
                       env={"MODELWARD_TEST_KILL_AT": "staged"})
    assert killed.returncode == -signal.SIGKILL
    log = world.tmp / "origin" / "access.log"
    gets = lambda: len(re.findall(r"GET /targets/\S+\.tar HTTP", log.read_text()))  # noqa: E731
    before = gets()
    assert world.cli("agent", "update", "--config", str(world.conf_path),
                     "--once").returncode == 0
    assert gets() == before  # re-verified from staging, not fetched again
    assert world.active_version() == "1.0.0"


def test_daemon_survives_its_attempt_being_killed_and_converges(world: World) -> None:
    import subprocess
    import sys
    import time

    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    env = {"MODELWARD_TEST_KILL_AT": "committed"}
    import os

    proc = subprocess.Popen([sys.executable, "-m", "modelward", "agent", "run", "--config",
                             str(world.conf_path)], env=dict(os.environ, **env),
                            stderr=open(world.tmp / "d.log", "w"))  # noqa: SIM115
    try:
        end = time.monotonic() + 60
        while not (world.active_version() == "2.0.0" and
                   _journal(world).get("step") == "active"):
            assert time.monotonic() < end, (world.tmp / "d.log").read_text()[-3000:]
            assert proc.poll() is None  # the daemon itself never died
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    log = (world.tmp / "d.log").read_text()
    assert "completing the interrupted install" in log  # rolled forward, not re-downloaded
    assert world.cli("agent", "boot-check", "--config", str(world.conf_path)).returncode == 0
