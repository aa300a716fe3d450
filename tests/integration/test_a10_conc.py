"""Attacks a10conc (a careless operator, a local user: concurrency). Device commands on one
state directory as real processes against swtpm, nginx and mosquitto: two ``agent update``
at once (same release; another release published between), ``agent status`` /
``agent boot-check`` / ``agent provision`` while an update commits, two MQTT fetchers
sharing the bound client id ``<id>-fetch``.

A command is held at one point of its run by a wrapper around the real CLI (the only
change: after journaling step ``S``, or before the TPM counter's increment, it writes
``<dir>/at-S`` and waits for ``<dir>/go-S``), so the interleaving is the one named, not a
lucky one. The correct behaviour: a second command is refused with one line naming the
running one, or waits for it; either way the device ends on a verified model with one
consistent record, counter, anchor, ``current`` and slots, and no good release is
remembered as refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import MqttWorld, World

# The real CLI, held after journaling the steps named in MODELWARD_A10_HOLD (comma list)
# and, with "increment" ("incremented") among them, right before (after) the TPM update
# counter's increment.
_HOLDER = """
import os, sys, time, runpy
from pathlib import Path
hold = set(filter(None, os.environ.get("MODELWARD_A10_HOLD", "").split(",")))
where = Path(os.environ["MODELWARD_A10_DIR"])
def wait(name):
    if name not in hold:
        return
    (where / f"at-{name}").write_text(str(os.getpid()))
    end = time.monotonic() + 120
    while not (where / f"go-{name}").exists() and time.monotonic() < end:
        time.sleep(0.02)
import modelward.updater.install._journal as j
enter0 = j.Journal.enter
def enter(self, step, **kw):
    enter0(self, step, **kw)
    wait(step)
j.Journal.enter = enter
import modelward.trust._tpm as t
inc0 = t.Tpm.increment_counter
def increment(self):
    wait("increment")
    out = inc0(self)
    wait("incremented")
    return out
t.Tpm.increment_counter = increment
sys.argv = ["modelward", *sys.argv[1:]]
runpy.run_module("modelward", run_name="__main__")
"""

_RUNNING: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    """Every held process this module started is gone at the end of its test."""
    yield
    while _RUNNING:
        p = _RUNNING.pop()
        if p.poll() is None:
            p.kill()
        p.communicate()


class Held:
    """One real ``modelward`` process that stops at the named points."""

    def __init__(self, w: World, tag: str, hold: list[str], *argv: str) -> None:
        self.dir = w.tmp / f"a10-{tag}"
        self.dir.mkdir()
        env = dict(os.environ, MODELWARD_A10_HOLD=",".join(hold),
                   MODELWARD_A10_DIR=str(self.dir))
        self.p = subprocess.Popen([sys.executable, "-c", _HOLDER, *argv], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _RUNNING.append(self.p)

    def reached(self, step: str, timeout: float) -> bool:
        """Whether it stopped at ``step`` within ``timeout`` s (False: exited, or not yet)."""
        end = time.monotonic() + timeout
        while not (self.dir / f"at-{step}").exists():
            if self.p.poll() is not None or time.monotonic() > end:
                return False
            time.sleep(0.02)
        return True

    def at(self, step: str) -> None:
        if not self.reached(step, 120):
            out = self.finish(10) if self.p.poll() is not None else None
            raise AssertionError(f"never reached {step}: {out.stderr[-800:] if out else ''}")

    def go(self, step: str) -> None:
        (self.dir / f"go-{step}").write_text("")

    def finish(self, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        out, err = self.p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(self.p.args, self.p.returncode, out, err)


def _update(w: World, tag: str, hold: list[str]) -> Held:
    return Held(w, tag, hold, "agent", "update", "--config", str(w.conf_path), "--once")


def _journal(w: World) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((w.state / "journal.json").read_bytes())
    return doc


def _consistent(w: World, version: str, counter: int) -> None:
    """The device is on ``version``, verified: the record follows the TPM counter (which
    moved to ``counter``), ``current`` is the record's active slot, no pending record,
    boot-check passes without a fallback, and the journal rests on that install."""
    snap = w.snapshot()
    rec = json.loads(snap.record)["record"]
    assert (rec["counter"], snap.counter) == (counter, counter)
    assert rec["active"] is not None and rec["active"]["version"] == version
    assert snap.current is not None and snap.current.endswith(rec["active"]["slot"])
    assert not (w.state / "trust" / "record.json.next").exists()
    boot = w.cli("agent", "boot-check", "--config", str(w.conf_path))
    assert boot.returncode == 0, boot.stderr
    assert "fell back" not in boot.stderr.lower() and w.active_version() == version
    j = _journal(w)
    assert (j["step"], j.get("version")) == ("active", version), j


def _refused(r: subprocess.CompletedProcess[str]) -> bool:
    """Refused with one line that names the running command."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    return r.returncode != 0 and len(lines) == 1 and "running" in lines[0].lower()


def _second_refused_or_waiting(second: Held, within: float) -> None:
    """While the first is held, the second is refused in one line, or still waits."""
    try:
        r = second.finish(within)
    except subprocess.TimeoutExpired:
        return  # waits for the first
    assert _refused(r), ("a second update ran beside the first", r.returncode, r.stderr)


def _rejections(w: World) -> list[dict[str, Any]]:
    p = w.state / "rejections.json"
    if not p.exists():
        return []
    out: list[dict[str, Any]] = json.loads(p.read_bytes())["rejections"]
    return out


@pytest.fixture
def on_v1(world: World) -> World:
    """``world`` with 1.0.0 installed and 2.0.0 published."""
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    return world


def test_a10_second_update_while_one_is_mid_install_is_refused_or_waits(on_v1: World) -> None:
    w = on_v1
    counter = w.snapshot().counter
    a = _update(w, "a", ["health-checked"])
    a.at("health-checked")
    b = _update(w, "b", [])
    _second_refused_or_waiting(b, 30)
    a.go("health-checked")
    ra = a.finish()
    assert ra.returncode == 0, ra.stderr
    if b.p.poll() is None or b.p.returncode == 0:  # (it waited: then nothing to do)
        rb = b.finish()
        assert rb.returncode == 0, rb.stderr
    _consistent(w, "2.0.0", counter + 1)


def test_a10_two_updates_committing_at_once_move_the_counter_once(on_v1: World) -> None:
    w = on_v1
    counter = w.snapshot().counter
    a = _update(w, "a", ["increment"])
    a.at("increment")
    b = _update(w, "b", ["increment"])
    b.go("increment")  # (not held there: only stopped if it gets as far as A)
    b_there = b.reached("increment", 30)
    a.go("increment")
    ra = a.finish()
    rb = b.finish()
    assert ra.returncode == 0 or rb.returncode == 0, (ra.stderr, rb.stderr)
    assert not b_there or _refused(rb) or rb.returncode == 0, rb.stderr
    _consistent(w, "2.0.0", counter + 1)


@pytest.mark.parametrize("command", ["status", "boot-check", "provision"])
@pytest.mark.parametrize("hold", ["increment", "incremented"])
def test_a10_status_bootcheck_provision_during_a_commit_leave_it_whole(
        on_v1: World, command: str, hold: str) -> None:
    w = on_v1
    counter = w.snapshot().counter
    a = _update(w, "a", [hold])
    a.at(hold)
    extra = (["--root", str(w.repo_dir / "metadata" / "1.root.json")]
             if command == "provision" else [])
    other = Held(w, command, [], "agent", command, "--config", str(w.conf_path), *extra)
    try:
        r = other.finish(20)
        assert r.returncode == 0 or _refused(r), r.stderr
    except subprocess.TimeoutExpired:
        pass  # (waits for the update)
    a.go(hold)
    ra = a.finish()
    assert ra.returncode == 0, ra.stderr
    if other.p.poll() is None:
        other.finish()
    _consistent(w, "2.0.0", counter + 1)


def test_a10_boot_check_during_commit_does_not_fail_the_update(on_v1: World) -> None:
    w = on_v1
    counter = w.snapshot().counter
    a = _update(w, "a", ["committed"])
    a.at("committed")
    boot = Held(w, "boot", [], "agent", "boot-check", "--config", str(w.conf_path))
    try:
        rb = boot.finish(20)
        assert rb.returncode == 0 or _refused(rb), rb.stderr
    except subprocess.TimeoutExpired:
        pass  # (waits for the update)
    a.go("committed")
    ra = a.finish()
    assert ra.returncode == 0, ra.stderr
    if boot.p.poll() is None:
        boot.finish()
    status = json.loads((w.state / "status.json").read_bytes())
    assert status.get("last_error") is None, status.get("last_error")
    _consistent(w, "2.0.0", counter + 1)


def test_a10_update_of_a_newer_release_does_not_take_over_a_running_ones_stage(
        on_v1: World) -> None:
    w = on_v1
    counter = w.snapshot().counter
    a = _update(w, "a", ["staged"])
    a.at("staged")
    w.publish("3.0.0", seed=3)
    b = _update(w, "b", ["staged"])
    b_there = b.reached("staged", 30)
    a.go("staged")
    ra = a.finish()
    assert ra.returncode == 0, ra.stderr
    assert _rejections(w) == []  # 2.0.0 is good, its delta too
    b.go("staged")
    rb = b.finish()
    assert not b_there or _refused(rb), "a second update staged beside the first"
    assert rb.returncode == 0 or _refused(rb), rb.stderr
    assert _rejections(w) == []
    version = "3.0.0" if rb.returncode == 0 else "2.0.0"  # (it waited, then installed 3)
    _consistent(w, version, counter + (2 if version == "3.0.0" else 1))


def test_a10_two_mqtt_fetchers_on_one_client_id_both_finish(mqtt_world: MqttWorld) -> None:
    """Two updates over MQTT at once would share the one bound client id ``dev-1-fetch``
    and take the session from each other. With the device lock the second never gets as
    far as connecting: it is refused in one line naming the first, the fetch session
    never changes hands, and the first ends within seconds with the device on the
    release, consistent. (It first asserted that B reaches "downloading" too: no second
    update can, by design, so it asserts the refusal instead.)"""
    w = mqtt_world
    w.publish("1.0.0", seed=1)
    w.update()
    big = w.tmp / "big.bin"
    big.write_bytes(os.urandom(8 << 20))  # (a fetch long enough to overlap)
    w.publish("2.0.0", seed=2, extra=[(big, "big.bin")])
    counter = w.snapshot().counter
    log = w.broker_work / "mosquitto.log"
    kicks0 = log.read_text().count("already connected, closing old connection")
    a = _update(w, "a", ["downloading"])
    a.at("downloading")
    b = _update(w, "b", ["downloading"])
    rb = b.finish(60)
    assert not (b.dir / "at-downloading").exists(), "a second update fetched beside the first"
    assert _refused(rb) and rb.returncode == 75, (rb.returncode, rb.stderr)  # EX_TEMPFAIL
    t0 = time.monotonic()
    a.go("downloading")
    ra = a.finish(90)
    assert time.monotonic() - t0 < 90
    assert ra.returncode == 0, ra.stderr
    assert "lost the broker connection" not in ra.stderr, ra.stderr
    assert log.read_text().count("already connected, closing old connection") == kicks0
    assert w.active_version() == "2.0.0"
    _consistent(w, "2.0.0", counter + 1)




def test_a10_daemon_does_not_install_beside_an_update_mid_install(on_v1: World) -> None:
    w = on_v1
    counter = w.snapshot().counter
    a = _update(w, "a", ["health-checked"])
    a.at("health-checked")
    log = w.tmp / "daemon.log"
    with open(log, "w") as err:
        daemon = subprocess.Popen([sys.executable, "-m", "modelward", "agent", "run",
                                   "--config", str(w.conf_path)], stderr=err,
                                  stdout=subprocess.DEVNULL, text=True)
    _RUNNING.append(daemon)
    end = time.monotonic() + 25
    while time.monotonic() < end and w.active_version() == "1.0.0":
        time.sleep(0.2)
    installed_beside = w.active_version() != "1.0.0"
    a.go("health-checked")
    ra = a.finish()
    daemon.terminate()
    daemon.wait(20)
    assert not installed_beside, log.read_text()[-1500:]
    assert ra.returncode == 0, ra.stderr
    _consistent(w, "2.0.0", counter + 1)


def test_a10_two_updates_waiting_for_an_idle_app_do_not_fight_over_the_fetch_id(
        mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    w.publish("1.0.0", seed=1)
    w.update()
    big = w.tmp / "big.bin"
    big.write_bytes(os.urandom(8 << 20))  # (a fetch long enough to overlap)
    w.publish("2.0.0", seed=2, extra=[(big, "big.bin")])
    counter = w.snapshot().counter
    busy = w.tmp / "app-busy"
    busy.write_text("9\n")  # the inference app's queue depth: busy
    w.conf_path.write_text(w.conf_path.read_text() +
                           f'\n[idle]\nbusy_file = "{busy}"\npoll = 0.2\n')
    log = w.broker_work / "mosquitto.log"
    kicks0 = log.read_text().count("already connected, closing old connection")
    a = _update(w, "a", [])
    time.sleep(2)  # (A refreshed its metadata over MQTT and waits for the app, connected)
    b = _update(w, "b", [])
    for _ in range(5):
        time.sleep(2)
        busy.write_text("9\n")  # (still busy: a fresh write)
    kicks = log.read_text().count("already connected, closing old connection") - kicks0
    busy.write_text("0\n")  # idle now
    ra, rb = a.finish(120), b.finish(120)
    assert kicks <= 2, f"the fetch session changed hands {kicks} times in 10 s"
    assert ra.returncode == 0, ra.stderr[-1500:]
    assert rb.returncode == 0 or _refused(rb), rb.stderr[-1500:]
    assert "connection lost" not in ra.stderr + rb.stderr
    _consistent(w, "2.0.0", counter + 1)
