"""Issue 17: the fleet view's new report fields arrive signed from a real agent (swtpm,
nginx, mosquitto: the daemon publishes its own report), and ``fleet status --summary
--repo`` counts them next to a device that lies with its own key and one that never
reported."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelward.agent._observe import BOOT_SECONDS_FILE
from modelward.publisher._fleet_summary import MAX_ATTEMPTS_PER_DEVICE
from modelward.simulator._origin import start_origin, stop_origin
from modelward.trust._report import MAX_SEQ, sign_report
from modelward.updater.rollout import rollout_bucket
from modelward.updater.transport._mqttconn import device_connection
from tests._stock_tuf import stock_refresh
from tests.conftest import FLEET, MqttWorld
from tests.unit.test_report import _SoftKey


def _wait(pred: Callable[[], bool], timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.2)


def _status(w: MqttWorld, fleet_dir: Path, *extra: str) -> Any:
    r = w.cli("fleet", "status", "--fleet-dir", str(fleet_dir), "--wait", "1.5", *extra,
              *w.broker_args("modelward-operator"))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout) if "--json" in extra else r.stdout


def _daemon(w: MqttWorld, log: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "modelward", "agent", "run", "--config",
                             str(w.conf_path)], stderr=open(w.tmp / log, "w"))  # noqa: SIM115


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_new_fields_arrive_signed_and_the_summary_counts_them(
        mqtt_world: MqttWorld, pki: tuple[object, object]) -> None:
    w = mqtt_world
    origin = start_origin(w.repo_dir, w.tmp / "origin", pki[1])  # type: ignore[arg-type]
    w.conf_path.write_text(w.conf_path.read_text().replace(
        'model = "classifier"', 'model = "classifier"\ntransport = "https"', 1)
        + f'\n[https]\nmetadata_url = "{origin.url}/metadata/"\n'
        f'targets_url = "{origin.url}/targets/"\nca_file = "{w.ca.cert}"\n')
    fleet_dir = w.tmp / "fleet"
    try:
        en = w.cli("agent", "enroll", "--config", str(w.conf_path), "--json")
        assert en.returncode == 0, en.stderr
        (w.tmp / "dev-1.pem").write_text(json.loads(en.stdout)["public_key"])
        liar = _SoftKey()  # dev-2 signs whatever it wants with its own (enrolled) key
        (w.tmp / "dev-2.pem").write_bytes(liar.identity_public_pem())
        (w.tmp / "dev-3.pem").write_bytes(_SoftKey().identity_public_pem())  # silent
        for d in ("dev-1", "dev-2", "dev-3"):
            assert w.cli("fleet", "add-device", "--fleet-dir", str(fleet_dir), "--device", d,
                         "--key", str(w.tmp / f"{d}.pem")).returncode == 0

        w.publish("1.0.0", seed=1)
        proc = _daemon(w, "d1.log")
        try:
            _wait(lambda: w.active_version() == "1.0.0")
        finally:
            _stop(proc)
        boot = w.cli("agent", "boot-check", "--config", str(w.conf_path))
        assert boot.returncode == 0, boot.stderr
        boot_s = float((w.state / BOOT_SECONDS_FILE).read_text())
        # a 30 % rollout of 2.0.0 that dev-1 and dev-2 are inside of (positions by id)
        assert rollout_bucket("dev-1", "classifier", "2.0.0") < 30.0
        assert rollout_bucket("dev-2", "classifier", "2.0.0") < 30.0
        w.repo.publish(w.bundle("2.0.0", seed=2), rollout=30.0)
        stock_refresh(w.repo_dir)
        proc = _daemon(w, "d2.log")
        try:
            def reported_v2() -> bool:
                rows = {r["device"]: r for r in _status(w, fleet_dir, "--json")}
                rep = rows["dev-1"]["report"]
                return bool(rows["dev-1"]["verified"] and rep
                            and (rep.get("active") or {}).get("version") == "2.0.0")
            _wait(reported_v2)
        finally:
            _stop(proc)

        # dev-2's lie: its own row only (fell back, huge counters, the slowest time allowed)
        lie = {"device_id": "dev-2", "fleet": FLEET, "seq": 7, "poll_interval": 3600,
               "at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
               "state": "idle", "model": "classifier", "channel": "stable",
               "active": {"name": "classifier", "version": "1.0.0", "fingerprint": "x"},
               "last_error": {"type": "ActiveModelAltered", "message": "\x1b[2J", "at": "x"},
               "counters": {"fallbacks": MAX_SEQ, "failures": MAX_SEQ},
               "failure_reasons": {"FetchError": MAX_SEQ},
               "durations": {"verify_s": 999_999.0, "boot_check_s": None}}
        conn = device_connection(w.mqtt_cfg("dev-2"), "listen", [])
        conn.publish(f"modelward/{FLEET}/devices/dev-2/status", sign_report(lie, liar),
                     retain=True, wait=True)
        conn.close()

        rows = {r["device"]: r for r in _status(w, fleet_dir, "--json")}
        rep = rows["dev-1"]["report"]
        assert rows["dev-1"]["verified"] and rows["dev-1"]["state"] == "ok"
        assert (rep["model"], rep["channel"]) == ("classifier", "stable")
        verify_s = rep["durations"]["verify_s"]
        assert math.isfinite(verify_s) and 0 < verify_s < 120
        assert rep["durations"]["boot_check_s"] == boot_s
        assert rep["failure_reasons"] == {}
        assert (rows["dev-2"]["state"], rows["dev-3"]["state"]) == ("fell back", "MISSING")

        s = _status(w, fleet_dir, "--summary", "--json", "--repo", str(w.repo_dir),
                    "--keys", str(w.keys))
        assert (s["devices"], s["believed"]) == (3, 2)
        assert {k: v for k, v in s["states"].items() if v} == \
            {"ok": 1, "fell back": 1, "MISSING": 1}
        assert s["versions"] == [{"model": "classifier", "version": "1.0.0", "devices": 1},
                                 {"model": "classifier", "version": "2.0.0", "devices": 1}]
        assert s["channels"] == {"stable": 2}
        assert s["rollouts"] == [{"model": "classifier", "version": "2.0.0",
                                  "channel": "stable", "percent": 30.0, "halted": False,
                                  "devices": 2, "eligible": 2, "installed": 1,
                                  "failed": 0, "outside": 0}]
        assert s["fallback"] == {"fell_back": 1, "ever": 1, "of": 2, "rate": 0.5}
        # (the liar's 2^53-1 is one device's share: MAX_ATTEMPTS_PER_DEVICE)
        assert s["failure_reasons"] == {
            "FetchError": {"devices": 1, "attempts": MAX_ATTEMPTS_PER_DEVICE}}
        assert s["durations"]["verify_s"] == {"p50": verify_s, "p95": 999_999.0,
                                              "samples": 2}
        assert s["durations"]["boot_check_s"] == {"p50": boot_s, "p95": boot_s,
                                                  "samples": 1}
        text = _status(w, fleet_dir, "--summary", "--repo", str(w.repo_dir),
                       "--keys", str(w.keys))
        assert '"classifier" "2.0.0" on "stable" at 30%: 2 / 1 / 0 of 2' in text
        assert "fallback rate: 50.0%" in text and "\x1b" not in text
    finally:
        stop_origin(w.tmp / "origin")
