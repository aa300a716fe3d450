"""Issue 14: a device's raw request bytes cannot forge or hide bridge log lines (the real
`modelward -vv serve-mqtt` behind mosquitto with the generated settings, its stderr a file
as under a terminal or a log collector)."""

from __future__ import annotations

import re
import time

from modelward.updater.transport._mqtt import publish_properties
from modelward.updater.transport._mqttconn import device_connection
from tests.conftest import FLEET, MqttWorld

FORGED = "served metadata/2.root.json status=200 offset=0 bytes=9999999 to dev-2"


def test_a_request_cannot_forge_bridge_log_lines(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    before = w.snapshot()
    req = (b'{"path": "metadata/1.root.json",\n"offset": 0, "length": 1024, "format": 2}\n'
           + FORGED.encode() + b"\r\n\x1b[8m\x1b]0;pwned\x07\xe2\x80\xae")
    dev = device_connection(w.mqtt_cfg("dev-1"), "fetch",
                         [f"modelward/{FLEET}/devices/dev-1/repo/resp"])
    try:
        p = publish_properties()
        p.ResponseTopic = f"modelward/{FLEET}/devices/dev-1/repo/resp"
        p.CorrelationData = b"f" * 16
        dev.publish(f"modelward/{FLEET}/repo/req/dev-1", req, p, wait=True)
        end = time.monotonic() + 10
        while not re.search(r"(to|from) dev-1", w.bridge_log.read_text()) and \
                time.monotonic() < end:
            time.sleep(0.05)
    finally:
        dev.close()
    text = w.bridge_log.read_text()
    assert re.search(r"(to|from) dev-1", text), text[-2000:]  # answered or refused
    lines = text.splitlines()
    assert not [line for line in lines if line.startswith("served metadata/2.root.json")]
    assert not [line for line in lines if line.startswith(FORGED[:20])]
    for raw in ("\x1b", "\x07", "\r", "\u202e"):
        assert raw not in text, repr(raw)
    assert w.snapshot() == before
