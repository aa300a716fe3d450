"""Attack a19 on issue 17 (a device with its own key), through the real broker and the
real ``fleet exporter`` process: dev-2 publishes, retained and validly signed, a report
whose ``durations.verify_s`` is a 400-digit JSON integer; dev-1's report is honest.

What happened: the exporter's first refresh raises OverflowError out of the report schema
check (``math.isfinite`` on a huge int); ``FleetCollector.refresh`` catches only
ModelwardError and OSError, so ``serve`` returns and the process ends with the CLI's "this
is a bug" line: no /metrics for the whole fleet while that retained report is on the
broker (``fleet status`` fails the same way). The unit test
``tests/unit/test_a19_prom_report_bigint.py`` has the cause.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import requests

from modelward.trust._report import sign_report
from modelward.updater.transport._mqttconn import device_connection
from tests.conftest import FLEET, MqttWorld
from tests.unit.test_report import _SoftKey


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _report(device: str, **extra: object) -> dict[str, object]:
    return {"device_id": device, "fleet": FLEET, "seq": int(time.time()), "poll_interval": 3600,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "state": "idle",
            "active": None, "last_error": None, "counters": {}, **extra}


def test_one_signed_huge_number_does_not_end_the_exporter(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    fleet_dir = w.tmp / "fleet"
    keys = {"dev-1": _SoftKey(), "dev-2": _SoftKey()}
    for d, k in keys.items():
        (w.tmp / f"{d}.pem").write_bytes(k.identity_public_pem())
        assert w.cli("fleet", "add-device", "--fleet-dir", str(fleet_dir), "--device", d,
                     "--key", str(w.tmp / f"{d}.pem")).returncode == 0
    huge = int("9" * 400)
    for d, extra in (("dev-1", {}), ("dev-2", {"durations": {"verify_s": huge}})):
        payload = sign_report(_report(d, **extra), keys[d])
        assert json.loads(payload)["report"]["device_id"] == d
        conn = device_connection(w.mqtt_cfg(d), "listen", [])
        conn.publish(f"modelward/{FLEET}/devices/{d}/status", payload, retain=True, wait=True)
        conn.close()

    port = _free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "modelward", "fleet", "exporter", "--listen",
         f"127.0.0.1:{port}", "--interval", "1", "--fleet-dir", str(fleet_dir),
         "--wait", "1.5", *w.broker_args("modelward-operator")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    text = ""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and exporter.poll() is None:
            try:
                text = requests.get(url, timeout=5).text
            except requests.ConnectionError:
                text = ""
            if "modelward_fleet_refresh_success 1.0" in text:
                break
            time.sleep(0.3)
        alive = exporter.poll() is None
        err = "" if alive else exporter.communicate(timeout=10)[1]
        assert alive, f"exporter ended (exit {exporter.returncode}): {err.strip()}"
        assert "modelward_fleet_believed_devices 1.0" in text  # (dev-1 still counted)
        assert 'modelward_fleet_state_devices{state="REJECTED"} 1.0' in text
    finally:
        if exporter.poll() is None:
            exporter.send_signal(signal.SIGTERM)
            exporter.communicate(timeout=30)
