"""One input through one parser of untrusted or operator input; shared by the hypothesis
tests (CI) and the atheris targets (fuzz/atheris_targets.py, on demand). Each returns on
success or on that parser's own typed error; anything else escapes and is a finding."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tuf.api import exceptions as tuf_exc

from modelward.agent._config import load_config
from modelward.agent.errors import ConfigError
from modelward.trust._report import ReportSignatureError, verify_report
from modelward.updater._config import MqttConfig
from modelward.updater.bundle._bundle import extract_bundle, parse_manifest
from modelward.updater.errors import BundleFormatError
from modelward.updater.transport._mqtt import MqttFetcher
from modelward.updater.transport._mqttconn import AnnouncementListener

MQTT_CFG = MqttConfig(host="h", port=1, fleet="f", client_name="d", block_size=64)
SESSION = b"S" * 8
REPORT_KEY = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def manifest(data: bytes) -> None:
    with contextlib.suppress(BundleFormatError):
        parse_manifest(data, "fuzz")


def tar(data: bytes) -> None:
    with contextlib.suppress(BundleFormatError):
        extract_bundle(io.BytesIO(data), None, "fuzz")


def mqtt_block(corr: bytes | None, props: list[tuple[str, str]], payload: bytes,
               pending: set[int], total: int | None) -> None:
    msg = mqtt.MQTTMessage(topic=b"modelward/f/devices/d/repo/resp")
    msg.payload = payload
    msg.properties = SimpleNamespace(CorrelationData=corr, UserProperty=props)  # type: ignore[assignment]
    fetcher = MqttFetcher(MQTT_CFG)
    try:
        got = fetcher._accept(msg, SESSION, "p", dict.fromkeys(pending, (0.0, 0)),  # noqa: SLF001
                              total)
    except tuf_exc.DownloadError:
        return
    if got is not None:
        off, data, size = got
        assert off in pending and len(data) <= MQTT_CFG.block_size and size >= 0


def announcement(payload: bytes) -> None:
    seen: list[int] = []
    listener = object.__new__(AnnouncementListener)
    listener._cb = seen.append  # noqa: SLF001
    msg = mqtt.MQTTMessage(topic=b"modelward/f/announce")
    msg.payload = payload
    listener._on_message(msg)  # noqa: SLF001 - never raises; a valid version or nothing
    assert all(isinstance(v, int) and v >= 1 for v in seen)


def report(data: bytes) -> None:
    try:
        verify_report(data, REPORT_KEY, "d")
    except ReportSignatureError:
        return
    raise AssertionError("an unsigned report verified")


def config(path: Path, data: bytes | str) -> None:
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    with contextlib.suppress(ConfigError):
        load_config(path)
