"""Coverage-guided fuzz targets (atheris/libFuzzer), run on demand, not in CI.

    .venv/bin/pip install -e '.[fuzz]'
    .venv/bin/python fuzz/atheris_targets.py TARGET [libFuzzer flags, e.g. -runs=1000000]

TARGET is one of: manifest, tar, mqtt-block, announcement, report, config. Each target
feeds the bytes to one parser of untrusted or operator input; anything other than success
or that parser's own typed error is a crash, and libFuzzer saves the input as
``crash-<sha1>``. The same parsers run under hypothesis in CI (tests/fuzz/).
"""

from __future__ import annotations

import contextlib
import io
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import atheris

with atheris.instrument_imports():
    import paho.mqtt.client as mqtt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from tuf.api import exceptions as tuf_exc

    from agent import load_config
    from agent.errors import ConfigError
    from trust import ReportSignatureError, verify_report
    from updater import MqttConfig, MqttFetcher, extract_bundle, parse_manifest
    from updater._mqttconn import AnnouncementListener
    from updater.errors import BundleFormatError

_KEY = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
_CFG = MqttConfig(host="h", port=1, fleet="f", client_name="d", block_size=64)
_SESSION = b"S" * 8
_DIR = Path(tempfile.mkdtemp(prefix="modelward-fuzz-"))


def manifest(data: bytes) -> None:
    with contextlib.suppress(BundleFormatError):
        parse_manifest(data, "fuzz")


def tar(data: bytes) -> None:
    with contextlib.suppress(BundleFormatError):
        extract_bundle(io.BytesIO(data), None, "fuzz")


def mqtt_block(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    msg = mqtt.MQTTMessage(topic=b"modelward/f/devices/d/repo/resp")
    corr = _SESSION + struct.pack(">Q", fdp.ConsumeIntInRange(0, 256)) if fdp.ConsumeBool() \
        else fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20))
    props = [(fdp.PickValueInList(["status", "offset", "size", "x"]),
              fdp.ConsumeUnicodeNoSurrogates(8)) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    msg.properties = SimpleNamespace(CorrelationData=corr, UserProperty=props)  # type: ignore[assignment]
    total = fdp.ConsumeIntInRange(0, 300) if fdp.ConsumeBool() else None
    msg.payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    pending = dict.fromkeys([0, 64, 128], (0.0, 0))
    try:
        got = MqttFetcher(_CFG)._accept(msg, _SESSION, "p", pending, total)  # noqa: SLF001
    except tuf_exc.DownloadError:
        return
    if got is not None:
        off, block, size = got
        assert off in pending and len(block) <= _CFG.block_size and size >= 0


def announcement(data: bytes) -> None:
    seen: list[int] = []
    listener = object.__new__(AnnouncementListener)
    listener._cb = seen.append  # noqa: SLF001
    msg = mqtt.MQTTMessage(topic=b"modelward/f/announce")
    msg.payload = data
    listener._on_message(msg)  # noqa: SLF001
    assert all(isinstance(v, int) and v >= 1 for v in seen)


def report(data: bytes) -> None:
    try:
        verify_report(data, _KEY, "d")
    except ReportSignatureError:
        return
    raise AssertionError("an unsigned report verified")


def config(data: bytes) -> None:
    path = _DIR / "agent.toml"
    path.write_bytes(data)
    with contextlib.suppress(ConfigError):
        load_config(path)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "manifest": manifest, "tar": tar, "mqtt-block": mqtt_block,
    "announcement": announcement, "report": report, "config": config,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
