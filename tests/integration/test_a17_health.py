"""Attack 17 on issue 16's health child started ahead of the seal, through swtpm + nginx +
onnxruntime: the disk plants a fifo or a symlinked stage just before each seal (the
delta's and the whole bundle's after it), and the agent is interrupted in the middle of
the copy. Each time the seal is refused, the child started ahead does not outlive the
attempt, and nothing trusted moves (record, counter, anchor, current, slots; the TUF
metadata between refusals); the signed release installs once the disk stops."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest

from modelward.agent._commands import update as agent_update
from modelward.updater.install import _health
from modelward.updater.install import _install as install_mod
from tests.conftest import World
from tests.unit.test_a17_health import _wait_dead

pytestmark = pytest.mark.xdist_group("machine")


def test_a17_disk_plants_and_an_interrupted_copy_leave_no_child_and_move_nothing(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.publish("1.0.0", seed=1)  # (a fresh device: the whole bundle, no delta fallback)
    incoming = world.state / "staging" / "incoming"
    children: list[int] = []
    real_start = install_mod.start_check

    def start(*a: object, **k: object) -> _health.PendingCheck | None:
        p = real_start(*a, **k)  # type: ignore[arg-type]
        assert p is not None and p._proc is not None  # (the device is idle: started ahead)
        children.append(p._proc.pid)
        return p

    monkeypatch.setattr(install_mod, "start_check", start)
    real_sendfile = os.sendfile
    armed: list[bool] = []

    def sendfile(out: int, src: int, offset: int, count: int) -> int:
        if armed and os.readlink(f"/proc/self/fd/{src}").startswith(str(incoming)):
            raise KeyboardInterrupt  # (the agent's own interruption, mid-copy)
        return real_sendfile(out, src, offset, count)

    monkeypatch.setattr(os, "sendfile", sendfile)

    def fifo() -> None:
        (incoming / "vectors.npz").unlink()
        os.mkfifo(incoming / "vectors.npz")

    def symlinked() -> None:
        elsewhere = world.root / "elsewhere"
        shutil.copytree(incoming, elsewhere)
        shutil.rmtree(incoming)
        incoming.symlink_to(elsewhere)

    planting: list[object] = []
    real_seal = install_mod._seal_on_disk

    def seal(*a: object, **k: object) -> object:
        planting[0]()  # type: ignore[operator]  # (the disk, just before each seal)
        return real_seal(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(install_mod, "_seal_on_disk", seal)
    before = world.snapshot()
    metadata = None
    for plant, raised in ((fifo, Exception), (symlinked, Exception),
                          (lambda: armed.append(True), KeyboardInterrupt)):
        planting[:] = [plant]
        with pytest.raises(raised):
            agent_update(world.cfg)
        armed.clear()
        assert children and _wait_dead(children[-1]), plant
        after = world.snapshot()
        assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
            before.record, before.counter, before.anchor, before.current, before.slots), plant
        assert metadata in (None, after.metadata), plant
        metadata = after.metadata
        assert world.active_version() is None
        if incoming.is_symlink():
            incoming.unlink()
    assert len(children) == 3
    planting[:] = [lambda: None]
    world.update()  # the disk stopped: the signed release installs, not rejected
    assert world.active_version() == "1.0.0"
    assert all(_wait_dead(pid) for pid in children)


def test_a17_the_early_child_is_bounded_by_the_memory_free_when_the_check_runs(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 GiB available when the attempt starts the child ahead, 96 MiB once the copies are
    being made (a large signed bundle, the app growing meanwhile): half of that, 48 MiB, is
    too little for onnxruntime, so the check cannot pass; nothing trusted moves."""
    world.publish("1.0.0", seed=1)
    avail = [2 << 30]
    real_read = _health._read
    monkeypatch.setattr(_health, "_read", lambda p: f"MemAvailable: {avail[0] >> 10} kB\n"
                        if p == "/proc/meminfo" else real_read(p))
    monkeypatch.setattr(_health, "_cgroup_memory", lambda: (None, None))
    started: list[int] = []
    real_start, real_seal = install_mod.start_check, install_mod._seal_on_disk

    def start(*a: object, **k: object) -> _health.PendingCheck | None:
        p = real_start(*a, **k)  # type: ignore[arg-type]
        assert p is not None
        started.append(p.policy.max_memory)
        return p

    def seal(*a: object, **k: object) -> object:
        avail[0] = 96 << 20
        return real_seal(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(install_mod, "start_check", start)
    monkeypatch.setattr(install_mod, "_seal_on_disk", seal)
    before = world.snapshot()
    try:
        with pytest.raises(Exception):  # noqa: B017,PT011 - any refusal, as long as no pass
            world.update()
    finally:
        # (about 1 GiB: half of 2 GiB less the copies it waits for, see PendingCheck)
        assert len(started) == 1 and (1 << 30) - (1 << 20) < started[0] <= 1 << 30
        after = world.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    assert world.active_version() is None


def test_a17_no_early_child_is_kept_while_the_gate_pauses_the_health_check(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app gets busy right after the seal ("verified"): while the gate pauses the health
    check, no sandboxed child of the agent sits in memory; the release installs after."""
    import time

    from modelward.updater.idle import Gate, IdleSignal

    world.publish("1.0.0", seed=1)
    children: list[int] = []
    real_start = install_mod.start_check

    def start(*a: object, **k: object) -> _health.PendingCheck | None:
        p = real_start(*a, **k)  # type: ignore[arg-type]
        if p is not None and p._proc is not None:
            children.append(p._proc.pid)
        return p

    monkeypatch.setattr(install_mod, "start_check", start)

    class AppBusy(IdleSignal):
        at: float | None = None
        held: list[tuple[int, str]] = []  # noqa: RUF012

        def busy(self) -> str | None:
            if self.at is None or time.monotonic() - self.at > 1.5:
                return None
            for pid in children:
                if not _wait_dead(pid, 0):
                    with open(f"/proc/{pid}/status") as f:
                        rss = next((ln.split(None, 1)[1].strip() for ln in f
                                    if ln.startswith("VmRSS")), "?")
                    self.held.append((pid, rss))
            return "the app is serving"

    app = AppBusy()

    def on_step(step: str) -> None:
        if step == "verified":
            app.at = time.monotonic()

    agent_update(world.cfg, Gate([app], poll=0.2), on_step=on_step)
    assert world.active_version() == "1.0.0"
    assert app.held == [], f"held while the app was busy: {app.held[-1:]}"


KILL_AS_NOBODY = ("import os, signal, sys\nos.setgroups([]); os.setresgid(65534, 65534, 65534)\n"
                  "os.setresuid(65534, 65534, 65534)\nos.kill(int(sys.argv[1]), signal.SIGKILL)\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="a root agent's child runs as nobody")
def test_a17_a_nobody_process_killing_the_early_child_does_not_reject_the_release(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the child started ahead waits for go (step "verified"), another process of uid
    65534 SIGKILLs it. That is no verdict on the signed release: it must install, at the
    latest on the next attempt."""
    import subprocess
    import sys

    world.publish("1.0.0", seed=1)
    children: list[int] = []
    real_start = install_mod.start_check

    def start(*a: object, **k: object) -> _health.PendingCheck | None:
        p = real_start(*a, **k)  # type: ignore[arg-type]
        assert p is not None and p._proc is not None
        children.append(p._proc.pid)
        return p

    monkeypatch.setattr(install_mod, "start_check", start)

    def on_step(step: str) -> None:
        if step == "verified" and len(children) == 1:
            subprocess.run([sys.executable, "-I", "-c", KILL_AS_NOBODY, str(children[0])],
                           check=True, timeout=30)

    with contextlib.suppress(Exception):  # (one failed attempt is fine; a rejection is not)
        agent_update(world.cfg, on_step=on_step)
    assert _wait_dead(children[0])
    world.update()
    assert world.active_version() == "1.0.0"
