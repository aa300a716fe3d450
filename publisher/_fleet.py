"""The operator's fleet registry (enrolled identity keys) and the fleet status view."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from publisher._broker_config import check_id
from publisher.errors import OperatorInputError
from trust import ReportSignatureError, verify_report, write_atomic
from updater._mqtt import MqttConfig, MqttConnection


def add_device(fleet_dir: Path, device_id: str, public_pem: bytes) -> Path:
    """Record a device's enrolled TPM identity key (``fleet_dir/devices/<id>.pem``).

    Raises:
        OperatorInputError: bad id, or not a P-256 public key.
    """
    check_id("device id", device_id)
    try:
        key = serialization.load_pem_public_key(public_pem)
    except ValueError as e:
        raise OperatorInputError(f"the key for {device_id} is not a PEM public key") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise OperatorInputError(f"the key for {device_id} is not an ECC P-256 key")
    path = fleet_dir / "devices" / f"{device_id}.pem"
    write_atomic(path, public_pem)
    return path


@dataclass(frozen=True)
class DeviceRow:
    """One line of ``fleet status``."""

    device_id: str
    verified: bool
    problem: str
    report: dict[str, Any]


def collect_status(cfg: MqttConfig, fleet_dir: Path, wait: float = 2.0) -> list[DeviceRow]:
    """Read the retained status reports of the fleet and verify each one.

    Reports that fail verification are returned flagged, never trusted.
    """
    prefix = cfg.topic("devices/")
    got: dict[str, bytes] = {}
    lock = threading.Lock()

    def on_message(msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith(prefix) and msg.topic.endswith("/status"):
            with lock:
                got[msg.topic[len(prefix):-len("/status")]] = bytes(msg.payload)

    conn = MqttConnection(cfg, f"{cfg.client_name}-status-{time.monotonic_ns() % 10**6}",
                          [cfg.topic("devices/+/status")], on_message)
    try:
        time.sleep(wait)
    finally:
        conn.close()
    rows = []
    for device, payload in sorted(got.items()):
        key_path = fleet_dir / "devices" / f"{device}.pem"
        pem = key_path.read_bytes() if key_path.exists() else None
        try:
            report = verify_report(payload, pem, device)
            rows.append(DeviceRow(device, True, "", report))
        except ReportSignatureError as e:
            rows.append(DeviceRow(device, False, str(e), {}))
    return rows


def format_table(rows: list[DeviceRow]) -> str:
    """A plain table for people."""

    def model(m: Any) -> str:
        return f"{m['name']} {m['version']}" if isinstance(m, dict) else "-"

    head = ("DEVICE", "SIGNATURE", "ACTIVE", "PREVIOUS", "STATE", "LAST ERROR", "AT")
    lines = [head]
    for r in rows:
        rep = r.report
        err = rep.get("last_error") or {}
        lines.append((
            r.device_id,
            "ok" if r.verified else f"REJECTED: {r.problem}",
            model(rep.get("active")) if r.verified else "-",
            model(rep.get("previous")) if r.verified else "-",
            str(rep.get("state", "-")) if r.verified else "-",
            str(err.get("type", "-")) if r.verified else "-",
            str(rep.get("at", "-")) if r.verified else "-",
        ))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in lines)
