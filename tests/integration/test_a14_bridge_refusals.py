"""a14-bridge: refusals pile up in the bridge while nobody is served (real mosquitto,
the bridge in-process so that its send queue can be looked at).

Every refusal (400, 429, 503) is published from the network thread and appended to
``Bridge._sent``; only the worker's ``_wait_for_room`` removes acknowledged entries, and
it runs only before serving a job. dev-2 sending nothing but malformed requests, within
its 50 requests/s, grows the bridge by ~1.5 KiB a request for as long as no device
fetches (a quiet fleet: ~270 MB an hour, past the unit's MemoryHigh in ~45 minutes).
"""

from __future__ import annotations

import secrets
import time

from modelward.updater.transport._mqttconn import (
    device_connection,
    publish_properties,
)
from tests.conftest import MqttWorld


def test_a14_acknowledged_refusals_do_not_accumulate(mqtt_world: MqttWorld) -> None:
    from modelward.publisher._bridge import Bridge

    w = mqtt_world
    w.stop_bridge()
    bridge = Bridge(w.repo_dir, w.mqtt_cfg("modelward-bridge"))
    cfg = w.mqtt_cfg("dev-2")
    evil = device_connection(cfg, "fetch", [])
    req = cfg.topic("repo/req/dev-2")
    try:
        t = time.monotonic()
        for i in range(120):  # 40 a second, under the 50/s a device may send
            p = publish_properties()
            p.ResponseTopic = cfg.topic("devices/dev-2/repo/resp")
            p.CorrelationData = secrets.token_bytes(16)
            evil.client.publish(req, b"not json", qos=1, properties=p)
            time.sleep(max(0.0, t + (i + 1) / 40 - time.monotonic()))
        time.sleep(1.0)  # every answer acknowledged by the broker long since
        refused, kept = bridge.stats.refused, len(bridge._sent)
        acked = sum(1 for info, _, _ in list(bridge._sent) if info.is_published())
    finally:
        evil.close()
        bridge.close()
    print(f"{refused} refused; {kept} entries kept in the send queue, {acked} acknowledged")
    assert refused >= 100
    assert kept <= 16, (kept, acked)
