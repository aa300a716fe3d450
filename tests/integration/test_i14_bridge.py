"""Issue 14, must-show 7 (first two bullets): one device cannot take the bridge down.
(The flood, and these attacks again, against the real ``sim fleet up``:
tests/integration/test_i14_sim_fleet.py.)

Real mosquitto with the generated broker config (ACL, passwords), the bridge as its own
process (``modelward serve-mqtt``), and ``dev-2`` attacking with only its own credentials
on its own request topic while ``dev-1`` (swtpm, provisioned) keeps updating.
"""

from __future__ import annotations

import json
import os
import time

from modelward.simulator._flood import Flooder
from modelward.updater._install import Outcome
from tests.conftest import MqttWorld

FLOOD_FILE = "targets/flood.bin"
MIB = 1 << 20
PAUSE = 0.08  # between dev-1's block requests


def _flood_file(w: MqttWorld, size: int) -> int:
    """A large file the bridge serves (sparse: reading it costs no disk)."""
    p = w.repo_dir / FLOOD_FILE
    with open(p, "wb") as f:
        f.truncate(size)
    return size


def test_i14_deep_json_and_out_of_range_offset_leave_the_bridge_serving(
    mqtt_world: MqttWorld,
) -> None:
    w = mqtt_world
    w.publish("1.0.0", seed=1)
    assert w.bridge is not None
    before = w.snapshot()
    evil = Flooder(w.mqtt_cfg("dev-2"), FLOOD_FILE, _flood_file(w, 4 * MIB))
    try:
        for payload in [
            # RecursionError in json.loads (issue 14). 100,000 bytes exceed the Maximum
            # Packet Size the bridge asks for on CONNECT: the broker does not even forward
            # it. 15,000 do reach the bridge and its parser.
            b"[" * 100_000,
            b"[" * 15_000,
            json.dumps({"path": FLOOD_FILE, "offset": 2 ** 64, "length": MIB,
                        "format": 2}).encode(),  # struct.error outside the try (issue 14)
            json.dumps({"path": FLOOD_FILE, "offset": 2 ** 63, "length": MIB}).encode(),
            json.dumps({"path": FLOOD_FILE, "offset": -1, "length": 10 ** 40}).encode(),
            json.dumps({"path": ["x"], "offset": True, "length": 1.5}).encode(),
            b'{"path": "targets/flood.bin\\n2026 INFO forged", "offset": 0, "length": 1}',
        ]:
            evil.send_raw(payload)
        deadline = time.monotonic() + 10
        while evil.received < 6 and time.monotonic() < deadline:  # of 7
            time.sleep(0.05)
        # each refused with a 400 (the forged path: refused, or not found)
        assert evil.statuses in ({400: 6}, {400: 5, 404: 1}), evil.statuses
    finally:
        evil.stop()
    assert w.bridge.poll() is None  # the bridge process lives
    assert w.snapshot() == before  # nothing on the honest device moved
    r = w.update()  # and the bridge still serves another device
    assert r.outcome is Outcome.INSTALLED and w.active_version() == "1.0.0"
    log = w.bridge_log.read_text()
    assert "refusing a request from dev-2" in log and "nested deeper than" in log
    assert "Traceback" not in log and "RecursionError" not in log
    assert "\n2026 INFO forged" not in log  # device bytes are logged as repr() only


def test_i14_honest_device_over_its_byte_budget_backs_off_and_installs(
    mqtt_world: MqttWorld,
) -> None:
    """The refusal a device gets beyond its budget (429) is a pause, not a failure: a real
    update of a 24 MiB bundle through a bridge allowing 8 MiB/s installs."""
    from modelward.publisher._bridge import Bridge
    from modelward.publisher._fairness import BridgeLimits

    w = mqtt_world
    pad = w.builds / "pad"
    pad.write_bytes(os.urandom(24 * MIB))
    w.publish("1.0.0", seed=1, extra=[(pad, "data/pad.bin")])
    w.stop_bridge()
    bridge = Bridge(w.repo_dir, w.mqtt_cfg("modelward-bridge"),
                    limits=BridgeLimits(bytes_per_s=8 * MIB, byte_burst=4 * MIB))
    try:
        r = w.update()
    finally:
        bridge.close()
    assert r.outcome is Outcome.INSTALLED and w.active_version() == "1.0.0"
    assert bridge.stats.refused > 0  # it was refused on the way, and backed off
