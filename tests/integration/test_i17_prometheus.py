"""Issue 17 must-show 3: the metrics a real agent writes (swtpm, nginx, mosquitto) and the
ones the real ``fleet exporter`` process serves on a free loopback port (scraped with
requests) parse with prometheus_client's parser (and ``promtool check metrics`` where
installed); a device's hostile channel stays escaped and bounded."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import requests

from modelward.agent._observe import BOOT_SECONDS_FILE
from modelward.publisher._fleet_exporter import MAX_LABEL_CHARS
from modelward.simulator._origin import start_origin, stop_origin
from modelward.trust._report import sign_report
from modelward.updater.transport._mqttconn import device_connection
from tests.conftest import FLEET, MqttWorld
from tests.integration.test_i17_fleet_summary import _daemon, _stop, _wait
from tests.unit.test_i17_prometheus import HOSTILE, families, promtool_ok
from tests.unit.test_report import _SoftKey


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families(text).values() for s in f.samples}


def test_agent_textfile_and_fleet_exporter(mqtt_world: MqttWorld,
                                           pki: tuple[object, object]) -> None:
    w = mqtt_world
    origin = start_origin(w.repo_dir, w.tmp / "origin", pki[1])  # type: ignore[arg-type]
    w.conf_path.write_text(w.conf_path.read_text().replace(
        'model = "classifier"', 'model = "classifier"\ntransport = "https"', 1)
        + f'\n[https]\nmetadata_url = "{origin.url}/metadata/"\n'
        f'targets_url = "{origin.url}/targets/"\nca_file = "{w.ca.cert}"\n')
    fleet_dir = w.tmp / "fleet"
    exporter: subprocess.Popen[str] | None = None
    try:
        en = w.cli("agent", "enroll", "--config", str(w.conf_path), "--json")
        assert en.returncode == 0, en.stderr
        (w.tmp / "dev-1.pem").write_text(json.loads(en.stdout)["public_key"])
        liar = _SoftKey()
        (w.tmp / "dev-2.pem").write_bytes(liar.identity_public_pem())
        for d in ("dev-1", "dev-2"):
            assert w.cli("fleet", "add-device", "--fleet-dir", str(fleet_dir), "--device", d,
                         "--key", str(w.tmp / f"{d}.pem")).returncode == 0

        # the device: an install (daemon), a boot-check, one more attempt (which observes
        # that boot-check's time, once)
        w.publish("1.0.0", seed=1)
        proc = _daemon(w, "d1.log")
        try:
            _wait(lambda: w.active_version() == "1.0.0")
        finally:
            _stop(proc)
        boot = w.cli("agent", "boot-check", "--config", str(w.conf_path))
        assert boot.returncode == 0, boot.stderr
        boot_s = float((w.state / BOOT_SECONDS_FILE).read_text())
        for _ in range(2):  # (the second attempt sees the same boot: not counted again)
            up = w.cli("agent", "update", "--once", "--config", str(w.conf_path))
            assert up.returncode == 0, up.stderr
        text = (w.state / "metrics.prom").read_text()
        promtool_ok(text, w.tmp)
        v = _values(text)
        assert v[("modelward_update_attempts_total", ())] >= 3
        assert v[("modelward_updates_installed_total", ())] == 1
        assert v[("modelward_verification_duration_seconds_count", ())] == 1
        assert v[("modelward_boot_check_duration_seconds_count", ())] == 1
        assert v[("modelward_boot_check_duration_seconds_sum", ())] == boot_s
        (info,) = [k for k in v if k[0] == "modelward_model_info"]
        labels = dict(info[1])
        assert (labels["model"], labels["version"], labels["channel"]) == \
            ("classifier", "1.0.0", "stable")
        assert labels["slot"] in ("a", "b") and len(labels["fingerprint"]) == 64

        # dev-2 says (signed with its own key) it follows a hostile channel
        lie = {"device_id": "dev-2", "fleet": FLEET, "seq": 7, "poll_interval": 3600,
               "at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
               "state": "idle", "model": "classifier", "channel": HOSTILE + "x" * 200,
               "active": {"name": "classifier", "version": HOSTILE, "fingerprint": "x"},
               "last_error": None, "counters": {}, "failure_reasons": {},
               "durations": {"verify_s": 2.0, "boot_check_s": None}}
        conn = device_connection(w.mqtt_cfg("dev-2"), "listen", [])
        conn.publish(f"modelward/{FLEET}/devices/dev-2/status", sign_report(lie, liar),
                     retain=True, wait=True)
        conn.close()

        port = _free_port()
        exporter = subprocess.Popen(
            [sys.executable, "-m", "modelward", "fleet", "exporter", "--listen",
             f"127.0.0.1:{port}", "--interval", "1", "--fleet-dir", str(fleet_dir),
             "--wait", "1.5", *w.broker_args("modelward-operator")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}/metrics"
        scraped: dict[str, Any] = {}

        def counted() -> bool:
            try:
                r = requests.get(url, timeout=5)
            except requests.ConnectionError:
                return False
            scraped["text"] = r.text
            return "modelward_fleet_believed_devices 2.0" in r.text
        _wait(counted, timeout=60)
        text = scraped["text"]
        promtool_ok(text, w.tmp)
        v = _values(text)
        assert v[("modelward_fleet_devices", ())] == 2
        assert v[("modelward_fleet_state_devices", (("state", "ok"),))] == 2
        assert v[("modelward_fleet_version_devices",
                  (("model", "classifier"), ("version", "1.0.0")))] == 1
        assert v[("modelward_fleet_version_devices",
                  (("model", "classifier"), ("version", HOSTILE)))] == 1
        assert v[("modelward_fleet_channel_devices", (("channel", "stable"),))] == 1
        cut = (HOSTILE + "x" * 200)[:MAX_LABEL_CHARS]
        assert v[("modelward_fleet_channel_devices", (("channel", cut),))] == 1
        assert v[("modelward_fleet_refresh_success", ())] == 1
        # nearest rank over dev-1's own time and dev-2's 2.0 s: the larger of the two
        assert v[("modelward_fleet_verification_duration_p95_seconds", ())] >= 2.0
        # bound to the address given only: another loopback address is refused
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex(("127.0.0.2", port)) != 0
        exporter.send_signal(signal.SIGTERM)
        out, err = exporter.communicate(timeout=30)
        assert exporter.returncode == 0, err
        assert "Traceback" not in err and f"127.0.0.1:{port}/metrics" in out
        exporter = None

        # a bad address: one typed line, exit non-zero, nothing served
        r = w.cli("fleet", "exporter", "--listen", "nowhere", "--fleet-dir", str(fleet_dir),
                  *w.broker_args("modelward-operator"))
        assert r.returncode != 0 and "--listen 'nowhere' is not HOST:PORT" in r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    finally:
        if exporter is not None:
            exporter.kill()
            exporter.wait(10)
        stop_origin(w.tmp / "origin")
