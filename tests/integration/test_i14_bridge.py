"""Issue 14, must-show 7 (first two bullets): one device cannot take the bridge down.

Real mosquitto with the generated broker config (ACL, passwords), the bridge as its own
process (``modelward serve-mqtt``), and ``dev-2`` attacking with only its own credentials
on its own request topic while ``dev-1`` (swtpm, provisioned) keeps updating.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from modelward.simulator._flood import Flooder, Prober, vm_hwm
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


def test_i14_flood_keeps_bridge_memory_bounded_and_another_device_fast(
    mqtt_world: MqttWorld,
) -> None:
    """A flood of full-block requests from dev-2: the bridge's peak RSS stays under
    200 MiB and dev-1's block latency (median of many) within 2x its baseline."""
    w = mqtt_world
    assert w.bridge is not None
    size = _flood_file(w, 64 * MIB)
    honest = Prober(w.mqtt_cfg("dev-1"), FLOOD_FILE)
    evil = Flooder(w.mqtt_cfg("dev-2"), FLOOD_FILE, size)
    try:
        # dev-1 asks for a block every ~0.1 s: within its own byte budget (16 MiB/s)
        honest.latencies(5, pause=PAUSE)  # warm up (page cache, TLS, paho)
        base = honest.latencies(30, pause=PAUSE)
        evil.start(rate=2000)  # 2,000 requests for 1 MiB a second: 2 GiB/s asked for
        time.sleep(1.0)  # the flood reaches its steady state
        flooded = honest.latencies(30, pause=PAUSE)
        evil_rx = evil.received_bytes
        time.sleep(0.5)
        assert evil.received_bytes > evil_rx or evil.statuses.get(429, 0) > 0
    finally:
        evil.stop()
        honest.close()
    hwm = vm_hwm(w.bridge.pid)
    b, f = statistics.median(base), statistics.median(flooded)
    print(f"dev-1 block latency: baseline {b * 1e3:.1f} ms, flooded {f * 1e3:.1f} ms "
          f"({f / b:.2f}x); dev-2 sent {evil.sent} requests, got {evil.statuses} "
          f"({evil.received_bytes >> 20} MiB); bridge VmHWM {hwm >> 20} MiB; cores "
          f"{os.cpu_count()}")
    assert w.bridge.poll() is None
    assert evil.sent > 5000  # a flood: ~12,000x amplification per request unprotected
    assert evil.received_bytes > 32 * MIB  # it got served, within its limits
    assert evil.statuses.get(429, 0) > 0  # and refused beyond them
    assert hwm < 200 * MIB
    assert f <= 2 * b, (b, f)


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
