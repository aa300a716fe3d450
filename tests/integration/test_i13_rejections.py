"""Issue 13 must-show 12 on real swtpm, mosquitto, the bridge and the real daemon: a
release that failed its health check is not downloaded again across announcements and a
broker restart; a new signed release is installed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from modelward.simulator._broker import stop_broker
from modelward.simulator._proc import wait_for_port
from modelward.updater.transport._mqttconn import MqttConnection
from tests._helpers import state_attempts, state_status
from tests.conftest import FLEET, DeviceState, MqttWorld


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def _status(w: MqttWorld) -> dict[str, Any]:
    return state_status(w.state)


def _attempts(w: MqttWorld) -> int:
    return state_attempts(w.state)


def _announce(w: MqttWorld, version: int) -> None:
    """An announcement as any identity allowed to announce (or the broker) can send it."""
    conn = MqttConnection(w.mqtt_cfg("modelward-operator"), f"ann-{version}", [])
    try:
        conn.publish(f"modelward/{FLEET}/announce",
                     json.dumps({"timestamp_version": version}).encode(), retain=True,
                     wait=True)
    finally:
        conn.close()


def _trusted(s: DeviceState) -> tuple[object, ...]:
    return (s.record, s.counter, s.anchor, s.current, s.slots, s.metadata)


def _restart_broker(w: MqttWorld) -> None:
    stop_broker(w.broker_work)
    subprocess.run(["mosquitto", "-c", str(w.broker_work / "mosquitto.conf"), "-d"],
                   check=True)
    assert wait_for_port(w.broker_port)


def test_health_rejected_release_not_downloaded_again_across_announcements_and_restart(
    mqtt_world: MqttWorld,
) -> None:
    w = mqtt_world
    w.publish("1.0.0", seed=1)
    w.update()
    bad = w.publish("2.0.0", seed=2, vectors_seed=3)  # signed, but fails its test vectors
    size = bad.stat().st_size
    start = w.snapshot()
    log = w.tmp / "daemon.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelward", "-v", "agent", "run", "--config", str(w.conf_path)],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"), text=True,  # noqa: SIM115
    )
    try:
        _wait(lambda: (_status(w).get("last_error") or {}).get("type") == "HealthCheckError",
              60, "the health check to fail")
        assert w.active_version() == "1.0.0"
        once = w.served_bytes(bad.name)  # downloaded once (its changed chunks: a delta)
        assert 0 < once <= size
        before = w.snapshot()  # the failed attempt moved nothing but TUF metadata
        assert _trusted(before)[:5] == _trusted(start)[:5]
        done = _attempts(w)

        # Five announcements (new versions each: they all wake the daemon), then a broker
        # restart: the daemon's listener reconnects, and the retained announcement it gets
        # again wakes nothing (it already answered it); a new one after it does.
        for i in range(5):
            _announce(w, 1000 + i)
            _wait(lambda i=i: _attempts(w) > done + i, 60, f"refresh {i + 1}")  # type: ignore[misc]
        _restart_broker(w)
        _announce(w, 2000)  # retained: delivered once the listener is back
        _wait(lambda: _attempts(w) > done + 5, 60, "a refresh after the restart")
        assert _status(w).get("last_error") is None  # the refreshes found nothing to do
        assert w.served_bytes(bad.name) == once  # never downloaded again
        assert _trusted(w.snapshot()) == _trusted(before)  # nothing trusted moved
        assert w.active_version() == "1.0.0"
        st = w.cli("agent", "status", "--config", str(w.conf_path), "--json")
        assert st.returncode == 0, st.stderr
        doc = json.loads(st.stdout)
        assert [(r["model"], r["version"], r["reason"]) for r in doc["rejected"]] == [
            ("classifier", "2.0.0", "HealthCheckError")]
        assert doc["rejected"][0]["target"].endswith("classifier-2.0.0.tar")
        text = w.cli("agent", "status", "--config", str(w.conf_path)).stdout
        assert "rejected  classifier 2.0.0" in text and "HealthCheckError" in text
        assert "not trying classifier 2.0.0 again" in log.read_text()

        # A new signed release is installed at once on its announcement.
        w.publish("3.0.0", seed=4)
        r = w.cli("announce", "--repo", str(w.repo_dir), *w.broker_args("modelward-operator"))
        assert r.returncode == 0, r.stderr
        _wait(lambda: w.active_version() == "3.0.0", 60, "the new release")
        assert w.served_bytes(bad.name) == once
        doc = json.loads(w.cli("agent", "status", "--config", str(w.conf_path),
                               "--json").stdout)
        assert doc["rejected"][0]["version"] == "2.0.0"  # still signed, still rejected
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_deleted_rejections_file_costs_one_retry_and_planted_one_is_ignored(
    mqtt_world: MqttWorld,
) -> None:
    """The disk attacker: deleting the file gives one more download, no more; a planted
    file (no TPM MAC) does not hold back a good release."""
    from modelward.agent._commands import update
    from modelward.updater.errors import HealthCheckError

    w = mqtt_world
    w.publish("1.0.0", seed=1)
    w.update()
    bad = w.publish("2.0.0", seed=2, vectors_seed=3)
    size = bad.stat().st_size
    with pytest.raises(HealthCheckError):
        update(w.cfg)
    update(w.cfg)  # nothing to do: rejected
    once = w.served_bytes(bad.name)  # (its changed chunks: a delta from 1.0.0)
    assert 0 < once <= size
    (w.state / "rejections.json").unlink()
    before = w.snapshot()
    with pytest.raises(HealthCheckError):
        update(w.cfg)
    update(w.cfg)
    assert w.served_bytes(bad.name) == 2 * once  # one retry, then held again
    after = w.snapshot()
    assert (after.record, after.counter, after.current, after.slots) == (
        before.record, before.counter, before.current, before.slots)

    # Planting: a well-formed file naming the good release, MACed with a guessed key.
    good = w.publish("3.0.0", seed=4)
    doc = json.loads((w.state / "rejections.json").read_bytes())
    entry = dict(doc["rejections"][0])
    newest = max((w.repo_dir / "metadata").glob("*.targets.json"),
                 key=lambda p: int(p.name.split(".")[0]))
    tuf = json.loads(newest.read_bytes())
    path = next(p for p in tuf["signed"]["targets"] if p.endswith("classifier-3.0.0.tar"))
    entry.update(path=path, hashes=tuf["signed"]["targets"][path]["hashes"], version="3.0.0")
    doc["rejections"] = [entry]
    doc["mac"] = "00" * 32
    Path(w.state / "rejections.json").write_text(json.dumps(doc))
    update(w.cfg)
    assert w.active_version() == "3.0.0"
    assert 0 < w.served_bytes(good.name) <= good.stat().st_size


def test_announcement_flood_does_not_cut_the_backoff_after_a_transport_failure(
    mqtt_world: MqttWorld,
) -> None:
    """The bridge is down (a transport error: no rejection); a broker floods announcements
    of new versions: the daemon keeps its backoff (5 s, then 10 s) instead of retrying
    every 2 s, and installs once the bridge is back."""
    w = mqtt_world
    w.conf_path.write_text(w.conf_path.read_text().replace(
        "[mqtt]\n", "[mqtt]\nblock_timeout = 0.5\nmax_retries = 1\n"))
    w.publish("1.0.0", seed=1)
    w.update()
    w.publish("2.0.0", seed=2)
    w.stop_bridge()
    before = w.snapshot()
    log = w.tmp / "daemon.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelward", "-v", "agent", "run", "--config", str(w.conf_path)],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"), text=True,  # noqa: SIM115
    )
    try:
        _wait(lambda: (_status(w).get("last_error") or {}).get("type") == "DownloadFailedError",
              60, "the first failed attempt")
        first = _attempts(w)
        end = time.monotonic() + 10
        v = 5000
        while time.monotonic() < end:  # 10 s of announcements, 5 a second
            _announce(w, v)
            v += 1
            time.sleep(0.2)
        # Only the retry at the end of the 5 s backoff ran (every 2 s would be 4 or more).
        assert _attempts(w) - first <= 2, _attempts(w) - first
        assert not (w.state / "rejections.json").exists()  # a transport error rejects nothing
        after = w.snapshot()
        assert (after.record, after.counter, after.current, after.slots) == (
            before.record, before.counter, before.current, before.slots)
        w.start_bridge()
        _wait(lambda: w.active_version() == "2.0.0", 60, "v2 once the bridge is back")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
