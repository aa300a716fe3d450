"""Issue 13 "bounded before verified": untrusted JSON through the real stack (swtpm, nginx,
mosquitto, the real bridge and CLI). Each attack gets its typed error or is ignored, and
nothing trusted moves. The parser itself: tests/unit/test_i13_bounded_json.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modelward.agent._commands import enroll
from modelward.publisher._fleet import add_device
from modelward.updater.errors import BundleFormatError
from modelward.updater.transport._mqtt import publish_properties
from modelward.updater.transport._mqttconn import device_connection
from tests.conftest import FLEET, DeviceState, MqttWorld, World


def _trusted(s: DeviceState) -> tuple[object, ...]:
    return s.record, s.counter, s.anchor, s.current, s.slots


def test_signed_bundle_with_a_nested_manifest_is_a_bundle_format_error(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compromised pipeline (or one team key) signs a bundle whose manifest nests 5000
    arrays: the device refuses it with BundleFormatError, not a RecursionError."""
    import modelward.publisher._repo as repo_mod
    from modelward.updater.bundle._bundle import extract_bundle
    from tests.unit.test_i13_sandbox_attacks import _nested_manifest_bundle

    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    evil = _nested_manifest_bundle(world.builds)
    good = world.builds / "good.tar"

    def unchecked(f: Any, dest: Any, name: str) -> Any:  # the pipeline skips the check
        with open(good, "rb") as g:
            return extract_bundle(g, dest, name)

    monkeypatch.setattr(repo_mod, "extract_bundle", unchecked)
    world.repo.publish(evil)
    with pytest.raises(BundleFormatError, match="nested deeper"):
        world.update()
    assert _trusted(world.snapshot()) == _trusted(before)
    assert world.active_version() == "1.0.0"


def test_nested_trust_record_on_disk_is_a_typed_boot_check_failure(world: World) -> None:
    """The disk plants a nested record.json: boot-check exits 3 (nothing trusted), with a
    typed error instead of a traceback; the TPM counter and anchor do not move."""
    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    (world.state / "trust" / "record.json").write_bytes(b"[" * 50_000)
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert "Traceback" not in r.stderr and "RecursionError" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 3, r.stderr[-2000:]
    after = world.snapshot()
    assert (after.counter, after.anchor, after.slots) == (
        before.counter, before.anchor, before.slots)


def test_nested_status_report_is_a_rejected_row_in_fleet_status(
        mqtt_world: MqttWorld) -> None:
    """One device's credential retains a nested report: `fleet status` still lists the
    whole fleet, that row unverified (it died with a RecursionError for every device)."""
    w = mqtt_world
    fleet_dir = w.tmp / "fleet"
    device, pem = enroll(w.cfg)
    add_device(fleet_dir, device, pem)
    before = w.snapshot()
    conn = device_connection(w.mqtt_cfg("dev-1"), "listen", [])
    try:
        conn.publish(f"modelward/{FLEET}/devices/dev-1/status", b"[" * 5000, retain=True,
                     wait=True)
    finally:
        conn.close()
    r = w.cli("fleet", "status", "--fleet-dir", str(fleet_dir), "--json", "--wait", "1",
              *w.broker_args("modelward-operator"))
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.returncode == 0, r.stderr[-2000:]
    row = {x["device"]: x for x in json.loads(r.stdout)}["dev-1"]
    assert row["verified"] is False and "nested" in row["problem"], row
    assert w.snapshot() == before


def test_nested_block_request_does_not_deafen_the_bridge(mqtt_world: MqttWorld) -> None:
    """One device's credential sends the bridge a nested request: it is answered 400 and
    the bridge keeps serving (its paho thread died on the RecursionError before)."""
    w = mqtt_world
    w.publish("1.0.0", seed=1)
    before = w.snapshot()
    resp = f"modelward/{FLEET}/devices/dev-1/repo/resp"
    got: list[Any] = []
    conn = device_connection(w.mqtt_cfg("dev-1"), "fetch", [resp],
                          got.append)
    try:
        p = publish_properties()
        p.CorrelationData = b"evil-corr-000000"
        p.ResponseTopic = resp
        conn.publish(f"modelward/{FLEET}/repo/req/dev-1", b'{"path": ' + b"[" * 3000, p,
                     wait=True)
        import time
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        conn.close()
    assert got and dict(got[0].properties.UserProperty).get("status") == "400"
    assert w.bridge is not None and w.bridge.poll() is None
    assert _trusted(w.snapshot()) == _trusted(before)
    r = w.update()  # over the same bridge
    assert r.active is not None and r.active.version == "1.0.0"
    assert "RecursionError" not in Path(w.bridge_log).read_text()
