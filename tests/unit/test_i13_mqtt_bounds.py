"""Issue 13, finding 4 (MQTT part), in memory: the receive queue is bounded in bytes and
messages, nothing is queued outside a fetch, and a packet larger than the Maximum Packet
Size asked for on CONNECT ends the connection before its body is buffered."""

from __future__ import annotations

import logging
import queue
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from modelward.updater._config import PACKET_OVERHEAD, MqttConfig
from modelward.updater.transport._mqtt import Inbox, MqttFetcher
from modelward.updater.transport._pahofast import Client, PacketTooLarge


def _msg(size: int, topic: bytes = b"modelward/f/devices/d/repo/resp") -> mqtt.MQTTMessage:
    m = mqtt.MQTTMessage(topic=topic)
    m.payload = b"j" * size
    return m


def test_defaults_bound_a_packet_to_one_block_and_the_queue_to_a_window() -> None:
    cfg = MqttConfig(host="h", port=1, fleet="f", client_name="d")
    assert cfg.packet_limit() == cfg.block_size + PACKET_OVERHEAD
    assert cfg.queue_byte_limit() == cfg.window * cfg.packet_limit()
    cfg = MqttConfig(host="h", port=1, fleet="f", client_name="d", max_packet_size=5000,
                     queue_bytes=7000)
    assert (cfg.packet_limit(), cfg.queue_byte_limit()) == (5000, 7000)


def test_nothing_is_queued_outside_a_fetch() -> None:
    box = Inbox(10, 10_000)
    assert box.put(_msg(10)) is False
    box.start()
    assert box.put(_msg(10)) is True
    assert box.stop() == (0, 0)
    assert box.bytes == 0
    assert box.put(_msg(10)) is False
    with pytest.raises(queue.Empty):
        box.get(0.01)


def test_the_queue_is_bounded_in_bytes_and_drops_are_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    box = Inbox(1000, 3 << 20)
    box.start()
    with caplog.at_level(logging.WARNING, "modelward.updater.transport._mqtt"):
        kept = [box.put(_msg(1 << 20)) for _ in range(150)]
    assert kept.count(True) == 3 and box.bytes == 3 << 20
    assert box.dropped == 147 and box.dropped_bytes == 147 << 20
    assert len([r for r in caplog.records if "receive queue full" in r.getMessage()]) == 1
    assert box.get(0.01).payload == b"j" * (1 << 20)
    assert box.put(_msg(1 << 20)) is True  # room again once the fetch took one
    assert box.stop() == (147, 147 << 20)


def test_the_queue_is_bounded_in_messages() -> None:
    box = Inbox(2, 1 << 30)
    box.start()
    assert [box.put(_msg(0)) for _ in range(4)] == [True, True, False, False]


def test_the_fetcher_queue_uses_the_configured_bounds() -> None:
    cfg = MqttConfig(host="h", port=1, fleet="f", client_name="d", queue_limit=7,
                     queue_bytes=1234)
    box = MqttFetcher(cfg)._inbox  # noqa: SLF001
    assert (box.max_messages, box.max_bytes) == (7, 1234)


class _Sock:
    def __init__(self) -> None:
        self.asked: list[int] = []

    def recv(self, n: int) -> bytes:
        self.asked.append(n)
        return b"x" * min(n, 16)

    def close(self) -> None:
        pass


def _client(limit: int, remaining: int) -> tuple[Client, _Sock]:
    c = Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5)
    c.max_incoming_packet = limit
    sock = _Sock()
    c._sock = sock  # type: ignore[assignment]  # noqa: SLF001
    pkt: dict[str, Any] = c._in_packet  # noqa: SLF001
    pkt.update(command=0x30, have_remaining=1, remaining_length=remaining,
               remaining_count=[0x80, 0x80, 0x01], to_process=remaining)
    return c, sock


def test_a_packet_over_the_maximum_is_refused_before_its_body_is_read() -> None:
    c, sock = _client(limit=64 * 1024, remaining=4 << 20)
    with pytest.raises(PacketTooLarge):
        c._sock_recv(4 << 20)  # noqa: SLF001
    assert sock.asked == []
    c._in_packet["to_process"] = 4 << 20  # noqa: SLF001
    assert c._packet_read() == mqtt.MQTT_ERR_CONN_LOST  # noqa: SLF001  # paho drops the link


def test_a_packet_within_the_maximum_is_read() -> None:
    c, sock = _client(limit=64 * 1024, remaining=64 * 1024 - 4)
    assert c._sock_recv(100) == b"x" * 16  # noqa: SLF001
    assert sock.asked == [100]


def test_a_qos2_publish_ends_the_connection_instead_of_being_held() -> None:
    c, _ = _client(limit=0, remaining=0)
    c._in_packet.update(command=0x34, packet=b"\x00\x01t\x00\x07\x00payload")  # noqa: SLF001
    assert c._handle_publish() == mqtt.MQTT_ERR_PROTOCOL  # noqa: SLF001
    assert not c._in_messages  # noqa: SLF001
