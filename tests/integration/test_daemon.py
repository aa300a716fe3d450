"""The daemon on real swtpm + mosquitto + nginx: announcement -> activation, signed status
reports verified by `fleet status`, forgeries flagged (issue #4 must-show 1)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from modelward.simulator._origin import start_origin, stop_origin
from modelward.updater.transport._mqttconn import device_connection
from tests.conftest import FLEET, MqttWorld


def _wait(pred: Callable[[], bool], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def _fleet_status(w: MqttWorld, fleet_dir: Path) -> dict[str, dict[str, object]]:
    r = w.cli("fleet", "status", "--fleet-dir", str(fleet_dir), "--json", "--wait", "1.5",
              *w.broker_args("modelward-operator"))
    assert r.returncode == 0, r.stderr
    return {row["device"]: row for row in json.loads(r.stdout)}


def test_daemon_end_to_end_with_signed_status(mqtt_world: MqttWorld,
                                              pki: tuple[object, object]) -> None:
    w = mqtt_world
    origin = start_origin(w.repo_dir, w.tmp / "origin", pki[1])  # type: ignore[arg-type]
    activations = w.tmp / "activations.log"
    text = w.conf_path.read_text().replace(
        'model = "classifier"',
        'model = "classifier"\ntransport = "https"', 1)
    text += (f'\n[https]\nmetadata_url = "{origin.url}/metadata/"\n'
             f'targets_url = "{origin.url}/targets/"\nca_file = "{w.ca.cert}"\n'
             '\n[activation]\ncommand = ["sh", "-c", '
             f'"echo $MODELWARD_VERSION $MODELWARD_FINGERPRINT >> {activations}"]\n')
    w.conf_path.write_text(text)
    fleet_dir = w.tmp / "fleet"
    try:
        # Enrolment: the device's TPM key goes into the operator's registry.
        en = w.cli("agent", "enroll", "--config", str(w.conf_path), "--json")
        assert en.returncode == 0, en.stderr
        key = w.tmp / "dev-1.pem"
        key.write_text(json.loads(en.stdout)["public_key"])
        assert w.cli("fleet", "add-device", "--fleet-dir", str(fleet_dir), "--device", "dev-1",
                     "--key", str(key)).returncode == 0

        w.publish("1.0.0", seed=1)
        proc = subprocess.Popen([sys.executable, "-m", "modelward", "agent", "run", "--config",
                                 str(w.conf_path)], stderr=open(w.tmp / "d.log", "w"))  # noqa: SIM115
        try:
            _wait(lambda: activations.exists() and "1.0.0" in activations.read_text())
            w.publish("2.0.0", seed=2)
            r = w.cli("announce", "--repo", str(w.repo_dir),
                      *w.broker_args("modelward-operator"))
            assert r.returncode == 0, r.stderr
            _wait(lambda: "2.0.0" in activations.read_text())
            assert w.active_version() == "2.0.0"
            fp = json.loads((w.state / "trust" / "record.json").read_bytes())[
                "record"]["active"]["fingerprint"]
            assert f"2.0.0 {fp}" in activations.read_text()  # the app was told what and which

            def reported_v2() -> bool:
                row = _fleet_status(w, fleet_dir).get("dev-1")
                return bool(row and row["verified"] and
                            row["report"]["active"]["version"] == "2.0.0")  # type: ignore[index]
            _wait(reported_v2, 30)
            row = _fleet_status(w, fleet_dir)["dev-1"]
            rep = row["report"]
            assert rep["state"] == "active"  # type: ignore[index]
            assert rep["previous"]["version"] == "1.0.0"  # type: ignore[index]
            assert rep["counters"]["installed"] == 2  # type: ignore[index]
            assert rep["last_activation"]["ok"] is True  # type: ignore[index]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0

        # dev-2's MQTT password is stolen, but not its TPM key: its forged report is flagged.
        real = ec.generate_private_key(ec.SECP256R1()).public_key()
        (w.tmp / "dev-2.pem").write_bytes(real.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        assert w.cli("fleet", "add-device", "--fleet-dir", str(fleet_dir), "--device", "dev-2",
                     "--key", str(w.tmp / "dev-2.pem")).returncode == 0
        forged = _forged_report("dev-2")
        conn = device_connection(w.mqtt_cfg("dev-2"), "listen", [])
        conn.publish(f"modelward/{FLEET}/devices/dev-2/status", forged, retain=True, wait=True)
        conn.close()
        rows = _fleet_status(w, fleet_dir)
        assert rows["dev-2"]["verified"] is False
        assert "does not verify" in str(rows["dev-2"]["problem"])
        assert rows["dev-1"]["verified"] is True
        table = w.cli("fleet", "status", "--fleet-dir", str(fleet_dir), "--wait", "1.5",
                      *w.broker_args("modelward-operator")).stdout
        assert "REJECTED" in table and "classifier 2.0.0" in table

        metrics = (w.state / "metrics.prom").read_text()
        assert "modelward_updates_installed_total 2" in metrics
        assert "modelward_last_success_timestamp_seconds" in metrics
    finally:
        stop_origin(w.tmp / "origin")


def _forged_report(device: str) -> bytes:
    import base64
    import hashlib

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import utils

    report = {"device_id": device, "active": {"name": "classifier", "version": "9.9.9",
                                              "fingerprint": "0" * 64}, "state": "active"}
    canonical = json.dumps(report, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(b"modelward status report v1\n" + canonical).digest()
    sig = ec.generate_private_key(ec.SECP256R1()).sign(
        digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    return json.dumps({"report": report, "alg": "ecdsa-p256-sha256",
                       "signature": base64.b64encode(sig).decode()}).encode()
