"""Attack a18 through a real broker and repository: one device, with its own enrolled key
and broker credentials, moves the ``installed`` count of a rollout it is not part of.

The assertions say what should happen (fixed: see the test's docstring).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from modelward.trust._report import sign_report
from modelward.updater.transport._mqttconn import device_connection
from tests._stock_tuf import stock_refresh
from tests.conftest import FLEET, MqttWorld
from tests.integration.test_i17_fleet_summary import _status
from tests.unit.test_report import _SoftKey


def _report(device: str, version: str, channel: str) -> dict[str, Any]:
    return {"device_id": device, "fleet": FLEET, "seq": 7, "poll_interval": 3600,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "state": "idle", "model": "classifier", "channel": channel,
            "active": {"name": "classifier", "version": version, "fingerprint": "x"},
            "last_error": None, "counters": {}, "failure_reasons": {},
            "durations": {"verify_s": 1.0, "boot_check_s": 0.5}}


def test_a_device_on_another_channel_counts_as_installed(mqtt_world: MqttWorld) -> None:
    """Tried: the repository signs classifier 2.0.0 on ``stable`` at 30 %; dev-1 follows
    ``stable`` and runs 1.0.0; dev-2 (its own key and broker credentials) signs and
    publishes a report saying it follows ``beta`` and runs 2.0.0.

    Happened: ``fleet status --summary --json --repo --keys`` says the stable release is
    ``devices 1, eligible 1, installed 1``: dev-2, not eligible (on another channel), is
    counted as an install of the stable rollout.

    Cause: ``summarize`` counts ``installed`` over every believed device whose ``active``
    is the release's name and version, without the channel or rollout-position test that
    ``eligible`` and ``failed`` apply.

    Fixed: ``installed`` is of the eligible devices; dev-2 is counted ``outside`` instead.
    """
    w = mqtt_world
    fleet_dir = w.tmp / "fleet"
    keys = {d: _SoftKey() for d in ("dev-1", "dev-2")}
    for d, k in keys.items():
        pem: Path = w.tmp / f"{d}.pem"
        pem.write_bytes(k.identity_public_pem())
        assert w.cli("fleet", "add-device", "--fleet-dir", str(fleet_dir), "--device", d,
                     "--key", str(pem)).returncode == 0
    w.repo.publish(w.bundle("2.0.0", seed=2), rollout=30.0)
    stock_refresh(w.repo_dir)
    for d, (version, channel) in {"dev-1": ("1.0.0", "stable"),
                                  "dev-2": ("2.0.0", "beta")}.items():
        conn = device_connection(w.mqtt_cfg(d), "listen", [])
        try:
            conn.publish(f"modelward/{FLEET}/devices/{d}/status",
                         sign_report(_report(d, version, channel), keys[d]),
                         retain=True, wait=True)
        finally:
            conn.close()
    s = _status(w, fleet_dir, "--summary", "--json", "--repo", str(w.repo_dir),
                "--keys", str(w.keys))
    assert (s["believed"], s["channels"]) == (2, {"beta": 1, "stable": 1})
    [r] = [r for r in s["rollouts"] if r["channel"] == "stable"]
    assert (r["version"], r["devices"]) == ("2.0.0", 1)  # only dev-1 is on stable
    assert r["installed"] == 0  # dev-1 runs 1.0.0; dev-2 is not on this rollout
    assert (r["eligible"], r["outside"]) == (1, 1)  # dev-2 shown apart, as what it is
