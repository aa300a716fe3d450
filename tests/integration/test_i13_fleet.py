"""Issue 13 finding 5 / must-show 8 on real swtpm + mosquitto: fleet state is fresh and
complete. Reports are signed by the device's TPM identity key (``agent.signed_report``),
published with the device's own MQTT credentials, and read by the real ``fleet status``.

Each test also checks that the device's trusted state (record, counter, anchor, ``current``,
slots, TUF metadata) did not move while its fleet state was attacked.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from modelward.agent._commands import enroll, signed_report
from modelward.agent._observe import SEQUENCE_FILE
from modelward.publisher._fleet import add_device
from modelward.updater.transport._mqttconn import device_connection
from tests.conftest import FLEET, MqttWorld

POLL = 3600.0  # mqtt_world's agent poll_interval


def _enrol(w: MqttWorld) -> Path:
    fleet_dir = w.tmp / "fleet"
    device, pem = enroll(w.cfg)
    add_device(fleet_dir, device, pem)
    return fleet_dir


def _publish_as_device(w: MqttWorld, payload: bytes, device: str = "dev-1") -> None:
    """Retained, on the device's status topic, with that device's own credentials."""
    conn = device_connection(w.mqtt_cfg(device), "listen", [])  # the status writer
    try:
        conn.publish(f"modelward/{FLEET}/devices/{device}/status", payload, retain=True,
                     wait=True)
    finally:
        conn.close()


def _status(w: MqttWorld, fleet_dir: Path) -> dict[str, dict[str, Any]]:
    r = w.cli("fleet", "status", "--fleet-dir", str(fleet_dir), "--json", "--wait", "1",
              *w.broker_args("modelward-operator"))
    assert r.returncode == 0, r.stderr
    return {row["device"]: row for row in json.loads(r.stdout)}


def _table(w: MqttWorld, fleet_dir: Path) -> str:
    r = w.cli("fleet", "status", "--fleet-dir", str(fleet_dir), "--wait", "1",
              *w.broker_args("modelward-operator"))
    assert r.returncode == 0, r.stderr
    return r.stdout


def _active(row: dict[str, Any]) -> str | None:
    a = row["report"].get("active")
    return str(a["version"]) if a else None


def test_replayed_old_report_republished_retained_with_the_devices_credentials_is_REPLAYED(
    mqtt_world: MqttWorld,
) -> None:
    w = mqtt_world
    fleet_dir = _enrol(w)
    w.publish("1.0.0", seed=1)
    w.update()
    old = signed_report(w.cfg, "active")
    _publish_as_device(w, old)
    row = _status(w, fleet_dir)["dev-1"]
    assert (row["status"], _active(row)) == ("ok", "1.0.0")

    w.publish("2.0.0", seed=2)
    w.update()
    assert w.active_version() == "2.0.0"
    _publish_as_device(w, signed_report(w.cfg, "active"))
    row = _status(w, fleet_dir)["dev-1"]
    assert (row["status"], _active(row)) == ("ok", "2.0.0")
    assert _status(w, fleet_dir)["dev-1"]["status"] == "ok"  # read again: still the newest

    before = w.snapshot()
    _publish_as_device(w, old)  # the attacker holds dev-1's password, not its TPM key
    row = _status(w, fleet_dir)["dev-1"]
    assert row["verified"] is True  # a genuine signature ...
    assert (row["status"], row["flags"], _active(row)) == ("REPLAYED", ["REPLAYED"], "1.0.0")
    assert "is older than seq" in row["problem"]  # ... but not the current state
    assert "REPLAYED: seq" in _table(w, fleet_dir)
    assert w.snapshot() == before
    assert w.active_version() == "2.0.0"


def test_empty_retained_message_on_a_devices_status_topic_lists_it_MISSING(
    mqtt_world: MqttWorld,
) -> None:
    w = mqtt_world
    fleet_dir = _enrol(w)
    _publish_as_device(w, signed_report(w.cfg, "idle"))
    assert _status(w, fleet_dir)["dev-1"]["status"] == "ok"
    before = w.snapshot()
    _publish_as_device(w, b"")  # clears the retained report on the broker
    rows = _status(w, fleet_dir)
    assert "dev-1" in rows  # the enrolled device does not vanish
    assert rows["dev-1"]["status"] == "MISSING" and rows["dev-1"]["report"] == {}
    assert "was seen before: cleared or lost" in rows["dev-1"]["problem"]
    assert "MISSING" in _table(w, fleet_dir)
    assert w.snapshot() == before


def test_silent_enrolled_device_is_listed_MISSING(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    fleet_dir = _enrol(w)
    add_device(fleet_dir, "dev-2", enroll(w.cfg)[1])  # enrolled, never reports
    _publish_as_device(w, signed_report(w.cfg, "idle"))
    rows = _status(w, fleet_dir)
    assert set(rows) == {"dev-1", "dev-2"}
    assert rows["dev-1"]["status"] == "ok"
    assert (rows["dev-2"]["status"], rows["dev-2"]["problem"]) == ("MISSING",
                                                                     "no status report")


def test_report_older_than_three_poll_intervals_is_STALE(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    fleet_dir = _enrol(w)
    before = w.snapshot()
    # Time is injected into the device's signing clock: a report signed 3 poll intervals
    # + 1 min ago, then one signed 2 intervals ago (the clock only moves forward: a clock
    # stepped back by more than the slack is not a floor the device believes, see
    # trust/_report.py).
    _publish_as_device(w, signed_report(w.cfg, "idle",
                                        clock=lambda: time.time() - 3 * POLL - 60))
    row = _status(w, fleet_dir)["dev-1"]
    assert (row["verified"], row["status"]) == (True, "STALE")
    assert "poll interval 1.0h" in row["problem"]
    _publish_as_device(w, signed_report(w.cfg, "idle", clock=lambda: time.time() - 2 * POLL))
    assert _status(w, fleet_dir)["dev-1"]["status"] == "ok"
    assert w.snapshot() == before


def test_report_signed_for_another_fleet_is_flagged_OTHER_FLEET(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    fleet_dir = _enrol(w)
    before = w.snapshot()
    other = dataclasses.replace(w.cfg, fleet="f0")  # the same device, enrolled elsewhere too
    _publish_as_device(w, signed_report(other, "idle"))
    row = _status(w, fleet_dir)["dev-1"]
    assert (row["verified"], row["status"]) == (True, "OTHER_FLEET")
    assert "fleet 'f0', not 'f1'" in row["problem"]
    _publish_as_device(w, signed_report(w.cfg, "idle"))  # its own fleet's report is fine
    assert _status(w, fleet_dir)["dev-1"]["status"] == "ok"
    assert w.snapshot() == before


def test_attempt_process_persists_a_sequence_that_a_rolled_back_file_cannot_reuse(
    mqtt_world: MqttWorld,
) -> None:
    """The real attempt process (what the daemon publishes) across restarts and a disk
    rollback of the sequence file."""
    w = mqtt_world

    def attempt() -> int:
        r = subprocess.run([sys.executable, "-m", "modelward.agent._child", str(w.conf_path)],
                           capture_output=True, text=True, timeout=120, check=False)
        report = json.loads(r.stdout.splitlines()[-1])["report"]
        assert report["poll_interval"] == POLL and report["fleet"] == FLEET
        seq = int(report["seq"])
        assert int((w.state / SEQUENCE_FILE).read_text()) == seq  # persisted, not only sent
        return seq

    first = attempt()
    saved = (w.state / SEQUENCE_FILE).read_bytes()
    second = attempt()
    assert second > first
    (w.state / SEQUENCE_FILE).write_bytes(saved)  # the disk attacker rolls it back
    assert attempt() > second
