"""Issue 17 must-show 4, through the real ``modelward sim fleet`` (10 agents, each with its
own swtpm, mosquitto with the generated config, the bridge, nginx): an announcement to the
fleet with ``announce_spread`` S starts the devices' refreshes spread over the window, not
within one second; after the broker restarts and the devices reconnect, the same
announcement again (as a persistent broker re-delivers the retained one) starts no attempt
anywhere. What stays unchanged: every device's active model and its attempts counter."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from modelward.simulator._fleet import Device, Fleet, pids_alive, wait_for
from modelward.simulator._scenarios import wait_all_on

DEVICES = 10
SPREAD = 12.0
_DRAW = re.compile(r"announcement of timestamp version (\d+): refreshing after ([0-9.]+)s")
_START = re.compile(r"^(\S+ \S+) \S+ .*update attempt for announced timestamp version (\d+)",
                    re.M)


def _sim(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-m", "modelward", "sim", *argv],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    d = tmp_path / "fleet"
    r = _sim("fleet", "up", "--devices", str(DEVICES), "--dir", str(d), "--poll", "600",
             "--announce-spread", str(SPREAD))
    assert r.returncode == 0, r.stderr
    try:
        yield Fleet.load(d)
    finally:
        down = _sim("fleet", "down", "--dir", str(d))
        assert down.returncode == 0, down.stderr
        assert pids_alive(d) == []


def _log(d: Device) -> str:
    return (d.dir / "agent.log").read_text(errors="replace")


def _starts(d: Device, version: int) -> list[float]:
    return [datetime.strptime(when, "%Y-%m-%d %H:%M:%S").timestamp()
            for when, v in _START.findall(_log(d)) if int(v) == version]


def _timestamp_version(f: Fleet) -> int:
    import json

    return int(json.loads((f.repo / "metadata" / "timestamp.json").read_bytes())[
        "signed"]["version"])


def test_an_announcement_is_answered_over_the_spread_and_a_reconnect_retriggers_nothing(
        fleet: Fleet) -> None:
    # every agent has made its first (timer) attempt: the next timer one is 10 min away
    assert wait_for(lambda: all(d.attempts() >= 1 for d in fleet.devices), 120)
    t0 = time.time()
    r = _sim("fleet", "publish", "--dir", str(fleet.dir), "--version", "1.0.0")
    assert r.returncode == 0, r.stderr
    v = _timestamp_version(fleet)
    assert wait_all_on(fleet, "1.0.0", SPREAD + 120), [(d.id, d.active(), d.last_error())
                                                       for d in fleet.devices]
    draws = [float(s) for d in fleet.devices for ver, s in _DRAW.findall(_log(d))
             if int(ver) == v]
    starts = [t for d in fleet.devices for t in _starts(d, v)]
    assert len(draws) == len(starts) == DEVICES, (draws, starts)
    assert all(0 <= s <= SPREAD for s in draws)
    assert max(draws) - min(draws) >= 3.0, draws  # (10 draws within 3 of 12 s: p < 1e-5)
    assert max(starts) - min(starts) >= 2.0, starts  # not all within 1 s
    assert min(starts) >= int(t0)
    # the agent switches ``current`` before it writes the finished attempt to status.json:
    # the snapshot waits for every device's announced attempt (its second) to be counted
    assert wait_for(lambda: all(d.attempts() >= 2 for d in fleet.devices), 30), [
        (d.id, d.attempts()) for d in fleet.devices]
    attempts = {d.id: d.attempts() for d in fleet.devices}

    # the broker restarts (no persistence here: its retained announcement is gone), the
    # agents reconnect, and the same announcement comes again
    fleet.stop_broker()
    fleet.start_broker()
    assert wait_for(fleet.announce, 30)

    def all_ignored() -> bool:
        return all(f"announcement of timestamp version {v} ignored: already trusted"
                   in _log(d) for d in fleet.devices)
    # (paho's reconnect backoff doubles up to 120 s while the broker is away: under load
    # a device can wait that long before it is back; 90 s was seen too short in CI)
    assert wait_for(all_ignored, 200), [d.id for d in fleet.devices
                                       if "ignored: already trusted" not in _log(d)]
    time.sleep(2.0)
    assert all(len(_starts(d, v)) == 1 for d in fleet.devices)
    assert {d.id: d.attempts() for d in fleet.devices} == attempts
    assert all(d.active() == "1.0.0" for d in fleet.devices)
