"""Faults (issue #6 must-show 4): each leaves the device serving its last good model with a
clear, typed reason on record, and the device recovers by itself once the fault clears.

Real parts throughout: nginx and mosquitto are stopped and started again on their ports,
swtpm is stopped mid-commit and at boot, the state directory sits on a small tmpfs that
fills up, and libfaketime moves the agent's clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelward.agent._commands import update as agent_update
from modelward.simulator._broker import stop_broker
from modelward.simulator._origin import start_origin, stop_origin
from modelward.simulator._pki import CertPair
from modelward.simulator._swtpm import start_swtpm, stop_swtpm
from modelward.trust.errors import TpmUnavailableError
from modelward.updater.errors import DownloadFailedError, StagingError
from modelward.updater.idle import Gate
from modelward.updater.install._install import Outcome
from modelward.updater.install._stage import Stage
from tests.conftest import DeviceState, MqttWorld, World
from tests.integration._i16_delta import drop_index


def _status(w: World) -> dict[str, object]:
    try:
        doc = json.loads((w.state / "status.json").read_bytes())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _last_error_type(w: World) -> str | None:
    err = _status(w).get("last_error")
    return str(err["type"]) if isinstance(err, dict) else None


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _same_trusted_state(w: World, before: DeviceState) -> None:
    after = w.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)


@contextlib.contextmanager
def _daemon(w: World, poll: float = 2.0) -> Iterator[Path]:
    """``agent run`` in the background with a short poll timer; yields its log file."""
    text = w.conf_path.read_text()
    if "[agent]" in text:
        text = re.sub(r"poll_interval = \S+", f"poll_interval = {poll}", text)
    else:
        text += f"\n[agent]\npoll_interval = {poll}\n"
    w.conf_path.write_text(text)
    log = w.tmp / f"daemon-{time.monotonic_ns()}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "modelward", "-v", "agent", "run",
                                 "--config", str(w.conf_path)], stderr=err,
                                stdout=subprocess.DEVNULL)
    try:
        yield log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _attempts(w: World) -> int:
    counters = _status(w).get("counters")
    return int(counters.get("attempts", 0)) if isinstance(counters, dict) else 0


# --- origin, broker, bridge ------------------------------------------------------------


def test_origin_down_then_back_daemon_recovers_by_itself(
    world: World, pki: tuple[CertPair, CertPair],
) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    before = world.snapshot()
    port = int(world.origin_url.rsplit(":", 1)[1])
    stop_origin(world.tmp / "origin")
    with _daemon(world) as log:
        _wait(lambda: _attempts(world) >= 3, 60, "three failed attempts")
        assert world.active_version() == "1.0.0"
        _same_trusted_state(world, before)
        assert _last_error_type(world) == "DownloadFailedError"
        assert "update failed" in log.read_text() and "cannot reach" in log.read_text()
        start_origin(world.repo_dir, world.tmp / "origin", pki[1], port=port)
        _wait(lambda: world.active_version() == "2.0.0", 60, "v2 after the origin is back")
    assert _status(world)["last_error"] is None


def test_broker_down_then_back_daemon_recovers_by_itself(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    w.publish("1.0.0", seed=1)
    with _daemon(w) as log:
        # the daemon is connected (announcements, status reports) when the broker goes
        _wait(lambda: w.active_version() == "1.0.0" and _attempts(w) >= 2, 60, "v1")
        stop_broker(w.broker_work)
        w.publish("2.0.0", seed=2)
        before = w.snapshot()
        done = _attempts(w)
        _wait(lambda: _attempts(w) >= done + 3, 90, "three failed attempts")
        assert w.active_version() == "1.0.0"
        _same_trusted_state(w, before)
        assert _last_error_type(w) in ("DownloadFailedError", "TransportError",
                                       "BrokerUnavailableError")
        assert "update failed" in log.read_text()
        subprocess.run(["mosquitto", "-c", str(w.broker_work / "mosquitto.conf"), "-d"],
                       check=True)
        _wait(lambda: w.active_version() == "2.0.0", 90, "v2 after the broker is back")


@pytest.mark.xdist_group("machine")
def test_bridge_down_then_back(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    w.conf_path.write_text(w.conf_path.read_text().replace(
        "[mqtt]\n", "[mqtt]\nblock_timeout = 0.5\nmax_retries = 1\n"))
    w.publish("1.0.0", seed=1)
    w.update()
    w.stop_bridge()
    w.publish("2.0.0", seed=2)
    before = w.snapshot()
    started = time.monotonic()
    with pytest.raises(DownloadFailedError, match="no answer"):
        w.update()
    assert time.monotonic() - started < 20
    _same_trusted_state(w, before)
    assert w.active_version() == "1.0.0"
    w.start_bridge()
    assert w.update().outcome is Outcome.INSTALLED
    assert w.active_version() == "2.0.0"


# --- TPM --------------------------------------------------------------------------------


def test_tpm_unavailable_at_boot_waits_and_then_verifies(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    cur = os.readlink(world.state / "current")
    port = world.tpm.port
    stop_swtpm(world.tpm.state)
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelward", "agent", "boot-check", "--config",
         str(world.conf_path), "--tpm-wait", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    assert proc.poll() is None  # still waiting, not serving anything unverified
    start_swtpm(world.tpm.state, port=port)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "TPM unavailable, waiting" in err
    assert "1.0.0 verified" in out
    assert os.readlink(world.state / "current") == cur


def test_tpm_gone_for_good_at_boot_fails_typed_and_touches_nothing(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    stop_swtpm(world.tpm.state)
    r = world.cli("agent", "boot-check", "--config", str(world.conf_path), "--tpm-wait", "2")
    assert r.returncode == 1
    assert "TPM" in r.stderr, r.stderr
    assert _last_error_type(world) == "TpmUnavailableError"
    start_swtpm(world.tpm.state, port=world.tpm.port)
    assert world.snapshot() == before  # `current` still names the last good model
    assert world.cli("agent", "boot-check", "--config", str(world.conf_path)).returncode == 0


def test_tpm_gone_during_commit_then_back(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    before = world.snapshot()

    def pull_the_tpm(step: str) -> None:
        if step == "committing":
            stop_swtpm(world.tpm.state)

    with pytest.raises(TpmUnavailableError):
        agent_update(world.cfg, on_step=pull_the_tpm)
    assert world.active_version() == "1.0.0"
    start_swtpm(world.tpm.state, port=world.tpm.port)
    _same_trusted_state(world, before)
    assert _last_error_type(world) == "TpmUnavailableError"
    assert world.cli("agent", "boot-check", "--config", str(world.conf_path)).returncode == 0
    assert world.active_version() == "1.0.0"
    # the TPM is back: the next attempt installs
    assert world.update().outcome is Outcome.INSTALLED
    assert world.active_version() == "2.0.0"


# --- disk full --------------------------------------------------------------------------


@pytest.fixture
def small_disk(world: World) -> Iterator[Path]:
    """The device's state directory moved onto a 24 MiB tmpfs."""
    mnt = world.tmp / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"cannot mount a tmpfs for the disk-full tests: {r.stderr}"
    try:
        world.publish("1.0.0", seed=1)
        world.update()
        subprocess.run(["cp", "-a", str(world.state), str(mnt / "state")], check=True)
        # the TPM auth value sits beside the state dir (README "TPM") and moves with it
        subprocess.run(["cp", "-a", f"{world.state}-tpm", str(mnt / "state-tpm")], check=True)
        world.conf_path.write_text(world.conf_path.read_text().replace(
            f'state_dir = "{world.state}"', f'state_dir = "{mnt / "state"}"'))
        assert world.state == mnt / "state"
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> Path:
    """Write a filler file so that only ``leave`` bytes stay free."""
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


class _Interrupted(Exception):
    """The test stops an attempt half-way through its download."""


@pytest.mark.parametrize("case", ["fresh", "resumed"])
def test_disk_full_during_download_then_space_is_freed(
    world: World, small_disk: Path, case: str,
) -> None:
    pad = world.builds / "pad.bin"
    pad.write_bytes(os.urandom(6 << 20))
    served = world.publish("2.0.0", seed=2, extra=[(pad, "pad.bin")])
    # (a release from before chunk indexes: the whole-bundle stage; a full disk during a
    # delta is test_a16_disk_kill's)
    drop_index(world.repo, world.repo_dir, "classifier/classifier-2.0.0.tar")
    before = world.snapshot()
    filler: list[Path] = []
    step = "download"
    if case == "resumed":
        # An earlier attempt stopped half-way; the disk fills while the next one rebuilds
        # what was staged ("verification") and before it writes a new byte.
        step = "verification"

        class StopHalfWay(Gate):
            calls = 0

            def checkpoint(self, what: str) -> None:
                self.calls += 1
                if self.calls == 4:  # reads of 64, 128, 256 KiB done
                    raise _Interrupted
                super().checkpoint(what)

        with pytest.raises(_Interrupted):
            agent_update(world.cfg, gate=StopHalfWay())
        stage = Stage(world.state / "staging", world.state / "staging" / "incoming",
                      served.name.split(".", 1)[0])
        assert 0 < stage.resumable(served.stat().st_size) < served.stat().st_size

    class FillUp(Gate):
        """Someone else fills the disk once the download is under way: the gate is asked
        before every chunk."""

        def checkpoint(self, what: str) -> None:
            if what == step and not filler:
                filler.append(_fill(small_disk, 1 << 20))
            super().checkpoint(what)

    with pytest.raises(StagingError, match="disk full while downloading"):
        agent_update(world.cfg, gate=FillUp())
    _same_trusted_state(world, before)
    assert world.active_version() == "1.0.0"
    assert not list((world.state / "staging").iterdir())  # the space was given back
    assert _last_error_type(world) == "StagingError"
    journal = json.loads((world.state / "journal.json").read_bytes())
    assert journal["step"] == "failed" and "disk full" in journal["detail"]
    assert world.cli("agent", "boot-check", "--config", str(world.conf_path)).returncode == 0
    filler[0].unlink()  # the fault clears
    assert world.update().outcome is Outcome.INSTALLED
    assert world.active_version() == "2.0.0"


def test_bundle_that_cannot_fit_is_refused_before_downloading(
    world: World, small_disk: Path,
) -> None:
    pad = world.builds / "pad.bin"
    pad.write_bytes(os.urandom(6 << 20))
    world.publish("2.0.0", seed=2, extra=[(pad, "pad.bin")])
    filler = _fill(small_disk, 4 << 20)  # less room than the bundle needs
    before = world.snapshot()
    fetched = int(_status(world)["counters"]["bytes_fetched"])  # type: ignore[index]
    with pytest.raises(StagingError, match="not enough space"):
        world.update()
    _same_trusted_state(world, before)
    assert int(_status(world)["counters"]["bytes_fetched"]) - fetched < 1 << 20  # type: ignore[index]
    filler.unlink()
    assert world.update().outcome is Outcome.INSTALLED


# --- clock ------------------------------------------------------------------------------


def _update_at(w: World, offset: str) -> subprocess.CompletedProcess[str]:
    """``agent update --once`` under libfaketime with the clock moved by ``offset``."""
    return subprocess.run(
        ["faketime", "-f", offset, sys.executable, "-m", "modelward", "agent", "update",
         "--config", str(w.conf_path), "--once"],
        capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("offset,error", [
    ("+10d", "ExpiredMetadataError"),  # past the timestamp's 7 days
    ("-3d", "TLS verification"),       # before the origin certificate's validity
])
def test_clock_jump_refuses_typed_and_recovers_when_the_clock_is_right(
    world: World, offset: str, error: str,
) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    before = world.snapshot()
    r = _update_at(world, offset)
    assert r.returncode == 1, r.stderr
    assert error in r.stderr
    _same_trusted_state(world, before)
    assert world.active_version() == "1.0.0"
    assert _last_error_type(world) in ("MetadataError", "DownloadFailedError")
    assert world.cli("agent", "boot-check", "--config", str(world.conf_path)).returncode == 0
    r = world.cli("agent", "update", "--config", str(world.conf_path), "--once")
    assert r.returncode == 0, r.stderr
    assert world.active_version() == "2.0.0"
