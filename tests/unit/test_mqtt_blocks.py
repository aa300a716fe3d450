"""Decoding MQTT block responses: format 2 (header in the payload) and format 1 (user
properties) give the same block; anything inconsistent is ignored or is a typed error."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest
from tuf.api import exceptions as tuf_exc

from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqtt import MqttFetcher, block_header

CFG = MqttConfig(host="h", port=1, fleet="f", client_name="d", block_size=64)
SESSION = b"S" * 8


def _accept(payload: bytes, offset: int = 64, props: list[tuple[str, str]] | None = None,
            total: int | None = None) -> tuple[int, bytes, int] | None:
    msg = mqtt.MQTTMessage(topic=b"modelward/f/devices/d/repo/resp")
    msg.payload = payload
    msg.properties = SimpleNamespace(  # type: ignore[assignment]
        CorrelationData=SESSION + struct.pack(">Q", offset), UserProperty=props or [])
    got = MqttFetcher(CFG)._accept(msg, SESSION, "p", {offset: (0.0, 0)}, total)  # noqa: SLF001
    return None if got is None else (got[0], bytes(got[1]), got[2])


def test_both_formats_give_the_same_block() -> None:
    data = bytes(range(64))
    two = _accept(block_header(200, 64, 200) + data)
    one = _accept(data, props=[("status", "200"), ("offset", "64"), ("size", "200")])
    assert two == one == (64, data, 200)


def test_the_last_short_block() -> None:
    assert _accept(block_header(200, 64, 100) + b"x" * 36) == (64, b"x" * 36, 100)


@pytest.mark.parametrize("payload", [
    block_header(200, 0, 200) + bytes(64),  # answers another offset
    block_header(200, 64, 200) + bytes(63),  # a byte short
    block_header(200, 64, 200)[:10],  # a torn header
    b"MWB1" + bytes(60),  # not format 2, and no status property
])
def test_inconsistent_blocks_are_ignored(payload: bytes) -> None:
    assert _accept(payload) is None


def test_status_codes_become_http_errors() -> None:
    with pytest.raises(tuf_exc.DownloadHTTPError) as ei:
        _accept(block_header(404, 64, 0))
    assert ei.value.status_code == 404
    with pytest.raises(tuf_exc.DownloadHTTPError):
        _accept(block_header(416, 64, 10))


def test_a_file_that_changes_size_mid_download_is_an_error() -> None:
    with pytest.raises(tuf_exc.DownloadError, match="size changed"):
        _accept(block_header(200, 64, 300) + bytes(64), total=200)
