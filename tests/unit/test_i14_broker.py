"""Issue 14: the byte bounds of the generated broker settings, against what modelward sends."""

from __future__ import annotations

import inspect
from pathlib import Path

from modelward.publisher._bridge import Bridge
from modelward.publisher._broker_config import (
    BLOCK_SIZE,
    BROKER_SETTINGS,
    MAX_INFLIGHT_BYTES,
    MAX_PACKET,
    MAX_QUEUED_BYTES,
    find_dynsec_plugin,
    settings_text,
    write_broker_config,
)
from modelward.trust._report import MAX_REPORT_BYTES
from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqtt import BLOCK_HEADER
from modelward.updater.transport._mqttconn import ANNOUNCE_MAX_PACKET

MQTT_MAX = 268_435_455  # the largest packet MQTT can express


def _settings() -> dict[str, str]:
    out = {}
    for line in BROKER_SETTINGS.splitlines():
        key, _, value = line.partition(" ")
        out[key] = value
    return out


def test_every_byte_bound_is_set() -> None:
    s = _settings()
    assert int(s["max_packet_size"]) == MAX_PACKET
    assert int(s["max_queued_bytes"]) == MAX_QUEUED_BYTES
    assert int(s["max_inflight_bytes"]) == MAX_INFLIGHT_BYTES
    assert s["persistent_client_expiration"][:-1].isdigit()
    assert s["persistent_client_expiration"][-1] in "hdwmy"
    assert 10 <= int(s["max_keepalive"]) <= 65535
    assert s["allow_anonymous"] == "false"
    assert "message_size_limit" not in s  # payload-only; the packet bound covers it


def test_packet_bound_is_just_above_one_block() -> None:
    device = MqttConfig(host="h", port=1, fleet="f", client_name="d")
    # what a device asks for on CONNECT is what the broker accepts from anyone
    assert device.packet_limit() == MAX_PACKET
    # a bridge's largest answer: one block, its header, topic and correlation data
    bridge_block = inspect.signature(Bridge.__init__).parameters["max_block"].default
    assert bridge_block == BLOCK_SIZE == device.block_size
    topic = len("modelward/") + 64 + len("/devices/") + 64 + len("/repo/resp")
    assert BLOCK_SIZE + BLOCK_HEADER.size + topic + 64 + 16 < MAX_PACKET
    # ... and not much more: a device cannot park hundreds of MiB in one message
    assert MAX_PACKET <= BLOCK_SIZE + 64 * 1024 < MQTT_MAX


def test_reports_and_announcements_fit() -> None:
    assert MAX_REPORT_BYTES + 1024 < MAX_PACKET
    assert ANNOUNCE_MAX_PACKET < MAX_PACKET


def test_queues_hold_one_window_of_blocks() -> None:
    device = MqttConfig(host="h", port=1, fleet="f", client_name="d")
    # a device's whole window of answers fits in flight plus queued, so none is dropped
    window = device.window * (BLOCK_SIZE + BLOCK_HEADER.size + 256)
    assert window <= MAX_QUEUED_BYTES
    assert MAX_INFLIGHT_BYTES >= 2 * MAX_PACKET  # pipelined, not stop-and-wait
    # ... and a session that never acknowledges holds little more than that
    assert MAX_QUEUED_BYTES + MAX_INFLIGHT_BYTES <= 24 * 1024 * 1024


def test_written_fragment_carries_the_bounds(tmp_path: Path) -> None:
    write_broker_config("f", ["a"], tmp_path)
    text = (tmp_path / "modelward.conf").read_text()
    assert BROKER_SETTINGS in text
    assert text == settings_text((tmp_path / "dynamic-security.json").resolve(),
                                 find_dynsec_plugin())
