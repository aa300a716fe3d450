"""A simulated fleet of 10 devices through the real CLI (issue #6 must-show 2): an attack
leaves all 10 on their last good model, and a good update afterwards reaches all 10."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelward.simulator._fleet import Fleet, pids_alive
from modelward.simulator._scenarios import wait_all_on


def _sim(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelward", "sim", *argv],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "fleet"
    r = _sim("fleet", "up", "--devices", "10", "--dir", str(d), "--poll", "10")
    assert r.returncode == 0, r.stderr
    try:
        yield d
    finally:
        down = _sim("fleet", "down", "--dir", str(d))
        assert down.returncode == 0, down.stderr
        assert pids_alive(d) == []  # everything stopped by pid


def test_fleet_of_10_keeps_its_model_under_attack_then_takes_a_good_update(
    fleet_dir: Path,
) -> None:
    fleet = Fleet.load(fleet_dir)
    assert len(fleet.devices) == 10
    assert {d.transport for d in fleet.devices} == {"https", "mqtt"}
    r = _sim("fleet", "publish", "--dir", str(fleet_dir))
    assert r.returncode == 0, r.stderr
    assert wait_all_on(fleet, "1.0.0"), [(d.id, d.active(), d.last_error())
                                        for d in fleet.devices]

    r = _sim("attack", "tampered-bundle", "--dir", str(fleet_dir), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)  # progress goes to stderr with --json
    assert out["affected"] == out["aimed"] == 10
    assert out["data_lost"] == 0
    assert all(d["during"] == "1.0.0" and d["error"] == "TargetHashError"
               for d in out["devices"]), out["devices"]

    status = json.loads(_sim("fleet", "status", "--dir", str(fleet_dir), "--json").stdout)
    assert len(status) == 10
    r = _sim("fleet", "publish", "--dir", str(fleet_dir))
    assert r.returncode == 0, r.stderr
    newest = Fleet.load(fleet_dir).published[-1]
    assert wait_all_on(fleet, newest), [(d.id, d.active(), d.last_error())
                                        for d in fleet.devices]
    assert all(d.last_error() is None for d in fleet.devices)
