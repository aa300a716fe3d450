"""a10-dynsec, the bound of a connected fetcher that never reads, now that the bridge
answers at QoS 0 (real mosquitto with the generated config + ``modelward serve-mqtt``).

Answering at QoS 0 (``publisher/_bridge.py`` ``ANSWER_QOS``) ends the resend of
``test_a10_dynsec_resend.py``. For a session that stays *connected* and never reads,
mosquitto 2.0.11 holds QoS 0 answers as outgoing packets, bounded only by their count
(``max_queued_messages``), not by ``max_queued_bytes``: with the count at 64 one such
fetcher asking for a window every second for 8 s (within its bridge budget, ~128 MiB
answered) grew mosquitto by 68 MiB (twice), and the count was ``devices + 16`` for a
larger fleet. broker-config now writes a constant 24 (one window and a few:
``MAX_QUEUED_MESSAGES``; ``fleet status`` asks in batches,
``test_a10_dynsec_status_batches.py``): 28 MiB measured, less than the 40 MiB QoS 1 held
(in-flight and queued bytes) and inside the per-device bound of
``test_a14_bridge_sessions.py`` (48 MiB).
"""

from __future__ import annotations

import contextlib
import time

import pytest

from modelward.publisher._broker_config import MAX_PACKET, MAX_QUEUED_MESSAGES
from modelward.simulator._flood import _props, vm_rss
from modelward.updater.transport._mqttconn import device_connection
from tests.conftest import MqttWorld

FLOOD_FILE = "targets/flood.bin"
MIB = 1 << 20
WINDOW = 16
ROUNDS = 8


@pytest.mark.xdist_group("machine")
def test_a10_a_connected_fetcher_that_never_reads_holds_one_devices_worth(
        mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    with open(w.repo_dir / FLOOD_FILE, "wb") as f:
        f.truncate(64 * MIB)
    pid = int((w.broker_work / "mosquitto.pid").read_text().split()[0])
    cfg = w.mqtt_cfg("dev-2")
    resp, req = cfg.topic("devices/dev-2/repo/resp"), cfg.topic("repo/req/dev-2")
    before = vm_rss(pid)
    s = device_connection(cfg, "fetch", [resp])
    peak = 0
    try:
        s.client.loop_stop()  # from here on nothing reads or acknowledges
        n = 0
        for _ in range(ROUNDS):
            for _ in range(WINDOW):
                s.client.publish(req, b'{"path": "%s", "offset": %d, "length": %d, '
                                 b'"format": 2}' % (FLOOD_FILE.encode(), (n % 64) * MIB, MIB),
                                 qos=0, properties=_props(resp))
                s.client.loop_write()
                n += 1
            time.sleep(1.0)
            peak = max(peak, vm_rss(pid) - before)
        time.sleep(1.0)
        peak = max(peak, vm_rss(pid) - before)
    finally:
        with contextlib.suppress(OSError, AttributeError):
            s.client.socket().close()  # type: ignore[union-attr]
    served = w.served_bytes("flood.bin")
    print(f"mosquitto VmRSS grew up to {peak >> 20} MiB for one connected, unread fetcher "
          f"(the bridge sent {served >> 20} MiB)")
    assert served >= 2 * WINDOW * MIB  # the attack ran: the bridge answered windows
    conf = (w.tmp / "broker-config" / "modelward.conf").read_text()
    assert f"max_queued_messages {MAX_QUEUED_MESSAGES}\n" in conf  # the generated config
    # max_queued_messages blocks (24 x ~1 MiB) and some of the broker's own overhead:
    # below the 40 MiB that QoS 1 answers held, and the 48 MiB one device may hold
    bound = MAX_QUEUED_MESSAGES * MAX_PACKET + 8 * MIB
    assert bound < 40 * MIB
    assert peak < bound, (peak >> 20, bound >> 20)
