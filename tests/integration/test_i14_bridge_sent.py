"""Issue 14, must-show 7: what one device's refused requests leave in the bridge.

Real mosquitto with the generated broker config; the bridge in-process (so that its send
queue and its allocations can be looked at); ``dev-2`` with only its own credentials,
``dev-1`` (swtpm, provisioned) updating through the same bridge afterwards.
"""

from __future__ import annotations

import gc
import json
import time
import tracemalloc

import paho.mqtt.client as mqtt
import pytest

from modelward.simulator._flood import Flooder
from modelward.updater.install._install import Outcome
from tests.conftest import MqttWorld

RATE = 40.0  # requests a second, under the 50 a device may send


def test_i14_acknowledged_refusals_and_symlink_requests_leave_nothing_held(
    mqtt_world: MqttWorld, caplog: pytest.LogCaptureFixture,
) -> None:
    """120 answers the broker acknowledged (100 refusals sent from paho's thread, 20 quiet
    404s for symlinks the worker would not follow) are all released with nobody else
    served; the bridge's traced memory does not grow with them; dev-1 then updates."""
    from modelward.publisher._bridge import Bridge

    w = mqtt_world
    w.publish("1.0.0", seed=1)
    before = w.snapshot()
    (w.repo_dir / "private").mkdir()
    (w.repo_dir / "private" / "k").write_bytes(b"K" * 64)
    (w.repo_dir / "targets" / "up").symlink_to("../private/k")  # inside the repository
    (w.repo_dir / "targets" / "loop").symlink_to("loop")
    w.stop_bridge()
    bridge = Bridge(w.repo_dir, w.mqtt_cfg("modelward-bridge"))
    evil = Flooder(w.mqtt_cfg("dev-2"), "targets/up", 64)
    bodies = [b"not json"] * 100 + [
        json.dumps({"path": p, "offset": 0, "length": 4096, "format": 2}).encode()
        for p in ("targets/up", "targets/loop") * 10]
    try:
        tracemalloc.start()
        t = time.monotonic()
        for i, body in enumerate(bodies):
            evil.send_raw(body)
            if i == 19:  # after a warm-up: paho's and logging's first allocations
                time.sleep(0.3)
                gc.collect()
                base = tracemalloc.get_traced_memory()[0]
            time.sleep(max(0.0, t + (i + 1) / RATE - time.monotonic()))
        deadline = time.monotonic() + 5
        while (evil.received < len(bodies) or len(bridge._sent)) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
        infos = sum(isinstance(o, mqtt.MQTTMessageInfo) for o in gc.get_objects())
        tracemalloc.stop()
        held = len(bridge._sent)
        assert bridge.healthy() is None
        after = w.snapshot()
        r = w.update()  # the bridge still serves another device
    finally:
        evil.stop()
        bridge.close()
    print(f"{evil.statuses}; {held} answers held, {infos} MQTTMessageInfo alive; traced "
          f"memory grew {grown} bytes over 100 answers")
    assert evil.statuses == {400: 100, 404: 20}, evil.statuses
    assert held == 0 and infos <= 8, (held, infos)
    assert grown < 64 * 1024, grown  # before the fix: ~1.5 KiB per answer held
    assert bridge.stats.errors == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert r.outcome is Outcome.INSTALLED and w.active_version() == "1.0.0"
    assert after == before  # nothing on the honest device moved during the attack
