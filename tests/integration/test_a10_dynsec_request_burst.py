"""a10-dynsec: a burst of requests reaches the bridge (real mosquitto with the generated
config + an in-process :class:`Bridge`).

With ``max_queued_messages`` a small constant (24; the bridge answers at QoS 0, see
``test_a10_dynsec_stuck_fetcher.py``), mosquitto holds few QoS 1 deliveries for any one
client beyond its in-flight window (64). A fleet asking at once (every device refreshes
on an announcement) is a burst at the bridges' subscription: read at QoS 1, 234-656 of 1,000
requests sent back to back reached a subscriber that read them as fast as they came, the
rest were dropped by the broker, unseen by the bridge (whose own per-device bucket
should decide). The bridge reads requests at QoS 0 (``REQUEST_QOS``): each one reaches
it, counted as answered, refused or dropped by its bucket.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from modelward.publisher._bridge import REQUEST_QOS, Bridge
from modelward.publisher._broker_config import write_broker_config
from modelward.simulator._broker import start_broker, stop_broker
from modelward.simulator._flood import _props
from modelward.simulator._pki import CertPair
from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqttconn import device_connection

FLEET = "burst"
BURST = 1000


def _cfg(port: int, ca: Path, user: str, creds: dict[str, Path]) -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=port, fleet=FLEET, client_name=user,
                      ca_file=str(ca), password=creds[user].read_text().strip())


@pytest.mark.xdist_group("machine")
def test_a10_a_burst_of_requests_reaches_the_bridge(
        tmp_path: Path, pki: tuple[CertPair, CertPair]) -> None:
    assert REQUEST_QOS == 0
    ca, server = pki
    repo = tmp_path / "repo"
    (repo / "metadata").mkdir(parents=True)
    (repo / "metadata" / "timestamp.json").write_bytes(b"{}")
    bc = write_broker_config(FLEET, ["dev-1"], tmp_path / "bc")
    broker = start_broker(tmp_path / "broker", server, ca.cert, bc.conf)
    bridge = None
    try:
        bridge = Bridge(repo, _cfg(broker.port, ca.cert, "modelward-bridge", bc.credentials))
        dev = device_connection(_cfg(broker.port, ca.cert, "dev-1", bc.credentials), "fetch",
                                [f"modelward/{FLEET}/devices/dev-1/repo/resp"])
        try:
            resp = f"modelward/{FLEET}/devices/dev-1/repo/resp"
            for i in range(BURST):  # back to back, as fast as paho writes them
                dev.client.publish(f"modelward/{FLEET}/repo/req/dev-1",
                                   b'{"path": "metadata/timestamp.json", "offset": 0, '
                                   b'"length": %d}' % (1 + i % 2), qos=1,
                                   properties=_props(resp))
            seen = 0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                seen = bridge.stats.requests + bridge.stats.dropped
                if seen >= BURST:
                    break
                time.sleep(0.05)
        finally:
            dev.close()
        print(f"{seen} of {BURST} requests reached the bridge ({bridge.stats.dropped} "
              f"dropped by dev-1's bucket, {bridge.stats.requests} admitted)")
        assert seen == BURST  # none lost at the broker
        assert bridge.stats.dropped > 0  # the bridge's own bound decided (50/s, burst 100)
        assert bridge.healthy() is None
    finally:
        if bridge is not None:
            bridge.close()
        stop_broker(tmp_path / "broker")
