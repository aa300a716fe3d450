"""Issue 17 must-show 1, through the real ``modelward sim fleet`` (10 agents, each with its
own swtpm; mosquitto, the bridge, nginx): one device silenced (``STALE``), one fallen back
(a byte of its model flipped, then its boot-check), one failing its health check (a signed
release on its channel whose test vectors are another model's), and a rollout at 30 %.
``fleet status --summary --json`` and ``fleet report``'s HTML page show exactly those
counts, and the refused release stays ``failed`` after the device's next attempt, which
skips it and reports ``ok`` on its old model (the gap this issue's first try left)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelward.simulator._fleet import MODEL, Device, Fleet, pids_alive, wait_for
from modelward.simulator._scenarios import _fingerprint, wait_all_on
from modelward.updater.rollout import rollout_bucket
from tests.unit.test_i17_fleet_report import _parse

DEVICES = 10
FAST_POLL = 4  # s: the silenced device's report is STALE 3 of them after it stopped


def _modelward(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-m", "modelward", *argv],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    d = tmp_path / "fleet"
    r = _modelward("sim", "fleet", "up", "--devices", str(DEVICES), "--dir", str(d),
                   "--poll", "600")
    try:
        assert r.returncode == 0, r.stderr
        yield Fleet.load(d)
    finally:
        down = _modelward("sim", "fleet", "down", "--dir", str(d))
        assert down.returncode == 0, down.stderr
        assert pids_alive(d) == []


def _reconfigure(f: Fleet, d: Device, *, channel: str | None = None,
                 poll: float | None = None) -> None:
    f.stop_agent(d)
    text = d.conf.read_text()
    if channel is not None:
        text = text.replace(f'model = "{MODEL}"', f'model = "{MODEL}"\nchannel = "{channel}"', 1)
    if poll is not None:
        text = re.sub(r"(?m)^poll_interval = .*$", f"poll_interval = {poll}", text)
    d.conf.write_text(text)
    f.start_agent(d)


def _operator(f: Fleet, *argv: str, repo: bool = True) -> subprocess.CompletedProcess[str]:
    releases = ("--repo", str(f.repo), "--keys", str(f.keys)) if repo else ()
    r = _modelward("fleet", *argv, "--fleet-dir", str(f.dir / "registry"), "--wait", "2",
                   *releases, "--broker", f"mqtts://127.0.0.1:{f.broker_port}", "--fleet", "sim",
                   "--tls-ca", str(f.ca()), "--username", "modelward-operator",
                   "--password-file", str(f.creds / "modelward-operator"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return r


def _publish_own_report(d: Device) -> None:
    """What the daemon publishes after an attempt: the device's report, signed by its TPM."""
    from modelward.agent._commands import signed_report
    from modelward.agent._config import load_config
    from modelward.updater.transport._mqttconn import device_connection

    cfg = load_config(d.conf)
    assert cfg.updater.mqtt is not None
    conn = device_connection(cfg.updater.mqtt, "listen", [])
    try:
        conn.publish(cfg.updater.mqtt.topic(f"devices/{d.id}/status"),
                     signed_report(cfg, "active"), retain=True, wait=True)
    finally:
        conn.close()


def test_the_summary_and_the_page_show_exactly_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    from modelward.agent._commands import enroll
    from modelward.agent._config import load_config
    from modelward.publisher._fleet import add_device

    started = time.monotonic()
    for d in fleet.devices:
        add_device(fleet.dir / "registry", *enroll(load_config(d.conf)))
    by_id = {d.id: d for d in fleet.devices}
    inside = [i for i in sorted(by_id) if rollout_bucket(i, MODEL, "2.0.0") < 30.0]
    outside = [i for i in sorted(by_id) if i not in inside]
    assert len(inside) >= 2 and len(outside) >= 3, inside  # (positions from the ids)
    fallen, silenced, failing = by_id[inside[0]], by_id[outside[0]], by_id[outside[1]]
    _reconfigure(fleet, silenced, poll=FAST_POLL)
    _reconfigure(fleet, failing, poll=FAST_POLL)

    fleet.publish("1.0.0", seed=1)
    assert wait_all_on(fleet, "1.0.0", 120), [(d.id, d.active(), d.last_error())
                                              for d in fleet.devices]
    fleet.stop_agent(silenced)
    silenced_at = time.monotonic()

    # a 30 % rollout on stable; on beta, a release whose test vectors are another model's
    fleet.repository().publish(fleet.build("2.0.0", seed=2), rollout=30.0)
    bad = fleet.build("3.0.0", seed=3, vectors_from=4)
    fleet.attacker().sign_raw(bad.read_bytes(), MODEL, "3.0.0", _fingerprint(bad),
                              channel="beta")
    _reconfigure(fleet, failing, channel="beta")
    assert fleet.announce()
    assert wait_for(lambda: all(by_id[i].active() == "2.0.0" for i in inside), 120)

    # the fallen device: a byte of its model flipped, then a reboot's boot-check
    fleet.stop_agent(fallen)
    model = fallen.state / "current" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    boot = _modelward("agent", "boot-check", "--config", str(fallen.conf), timeout=120)
    assert boot.returncode == 0, boot.stderr
    assert fallen.active() == "1.0.0" and fallen.last_error() == "ActiveModelAltered"
    _publish_own_report(fallen)  # (its agent stays stopped: its reinstall has not run yet)

    # the failing device refused 3.0.0, then its next attempt skipped it: "ok" on 1.0.0
    def refused_then_ok() -> bool:
        s = failing.status()
        return ((s.get("counters") or {}).get("verification_failures", 0) >= 1
                and s.get("last_error") is None and failing.attempts() >= 3)
    assert wait_for(refused_then_ok, 90), failing.status()
    assert failing.active() == "1.0.0"
    time.sleep(max(0.0, silenced_at + 3 * FAST_POLL + 2 - time.monotonic()))

    status = _operator(fleet, "status", "--json", repo=False)
    rows = {r["device"]: r for r in json.loads(status.stdout)}
    assert rows[failing.id]["report"]["last_error"] is None  # the device itself says ok
    assert rows[failing.id]["report"]["rejected"] == [{"model": MODEL, "version": "3.0.0"}]
    s = json.loads(_operator(fleet, "status", "--summary", "--json").stdout)
    assert (s["devices"], s["believed"]) == (DEVICES, DEVICES)
    assert {k: v for k, v in s["states"].items() if v} == {
        "ok": DEVICES - 3, "fell back": 1, "failed": 1, "STALE": 1}
    n = len(inside)
    assert s["rollouts"] == [
        {"model": MODEL, "version": "3.0.0", "channel": "beta", "percent": 100.0,
         "halted": False, "devices": 1, "eligible": 1, "installed": 0, "failed": 1,
         "outside": 0},
        {"model": MODEL, "version": "2.0.0", "channel": "stable", "percent": 30.0,
         "halted": False, "devices": DEVICES - 1, "eligible": n, "installed": n - 1,
         "failed": 0, "outside": 0}]
    assert s["fallback"] == {"fell_back": 1, "ever": 1, "of": DEVICES, "rate": 0.1}
    assert [e["device"] for e in s["silent"]] == [silenced.id]
    assert s["channel_versions"] == [
        {"channel": "beta", "model": MODEL, "version": "1.0.0", "devices": 1},
        {"channel": "stable", "model": MODEL, "version": "1.0.0", "devices": DEVICES - n},
        {"channel": "stable", "model": MODEL, "version": "2.0.0", "devices": n - 1}]
    assert s["histograms"]["verify_s"]["counts"] and sum(
        s["histograms"]["verify_s"]["counts"]) == s["durations"]["verify_s"]["samples"] > 0

    out = tmp_path / "fleet.html"
    _operator(fleet, "report", "-o", str(out))
    page = out.read_text()
    _page_shows(page, n, silenced.id)
    print(f"must-show 1 took {time.monotonic() - started:.0f}s after fleet up")


def _page_shows(page: str, n: int, silenced: str) -> None:
    text = "".join(_parse(page).text)
    states = re.search(r"<table><tr>(.*?)</tr><tr>(.*?)</tr></table>", page)
    assert states is not None
    heads = re.findall(r"<th>([^<]*)</th>", states.group(1))
    cells = re.findall(r"<td>([^<]*)</td>", states.group(2))
    assert dict(zip(heads, map(int, cells), strict=True)) == {
        "ok": DEVICES - 3, "fell back": 1, "failed": 1, "STALE": 1}
    assert (f"<tr><td>{MODEL}</td><td>2.0.0</td><td>stable</td><td>30%</td><td>{n}</td>"
            f"<td>{n - 1}</td><td>0</td><td>{DEVICES - 1}</td><td>0</td></tr>") in page
    assert (f"<tr><td>{MODEL}</td><td>3.0.0</td><td>beta</td><td>100%</td><td>1</td>"
            "<td>0</td><td>1</td><td>1</td><td>0</td></tr>") in page
    assert "classifier 3.0.0 on beta at 100%: 1 failed" in text
    assert f"classifier 2.0.0 on stable at 30%: {n - 1} installed" in text
    assert "fallback rate 10.0%" in text and "1 of 10 believed devices" in text
    silent = page[page.index('data-list="silent"'):]
    assert re.findall(r"<tr><td>([^<]*)</td><td>STALE</td>", silent) == [silenced]
    assert "MISSING" not in silent
    assert "beta: classifier 1.0.0: 1 devices" in text
    assert f"stable: classifier 2.0.0: {n - 1} devices" in text
