"""Fix of attack 17 on the health child started ahead (updater/install/_health.PendingCheck):
the next moves against it. A process that can signal the waiting child (root, or the
agent's own uid) stops or kills it before go: no verdict, a fresh child checks the release.
The limit the child runs under is the one of go time, hard as well as soft (it cannot raise
it back), and a root agent's child runs under a uid of its own, not nobody's."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from modelward.updater._config import HealthConfig
from modelward.updater.install import _health
from modelward.updater.install._sandbox import TASK_UID
from modelward.updater.install._sealed import seal_verified
from tests.unit.test_a17_health import _dead, _pending, _wait_dead
from tests.unit.test_i16_fixedcost import NAMES, _real_slot, _signed

pytestmark = pytest.mark.xdist_group("machine")

CFG = HealthConfig(timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL])
def test_f17_a_child_stopped_or_killed_before_go_is_no_verdict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals) -> None:
    """Someone who may signal it stops or kills the child while it waits for go: it is
    not handed the check (a stop would time it out, a kill read as a crash); a fresh child
    checks the sealed bytes and passes, the early one is reaped."""
    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    fresh: list[int] = []
    real_run = _health.run
    monkeypatch.setattr(_health, "run", lambda *a, **k: fresh.append(1) or real_run(*a, **k))
    pending, pid = _pending(slot, CFG)
    try:
        os.kill(pid, sig)
        # (before go: wait until the signal took effect, stopped or dead; a kill still
        # pending when go is sent is a child killed during its check, another case)
        done = ("T",) if sig == signal.SIGSTOP else ("Z", "X", "")
        end = time.monotonic() + 10
        while _health._state(pid) not in done and time.monotonic() < end:
            time.sleep(0.01)
        assert _health._state(pid) in done
        with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds) as sealed:
            assert "match" in _health.run_health_check(slot, "m", "1.0.0", CFG,
                                                       sealed=sealed, pending=pending)
    finally:
        pending.close()
    assert fresh == [1] and _wait_dead(pid)


def _limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        line = next(ln for ln in f if ln.startswith("Max address space"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_f17_the_limit_lowered_at_go_is_hard_and_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 GiB free at the start, 700 MiB at go: the early child runs the check under 350 MiB
    soft AND hard (its own setrlimit cannot raise it back), and that is the limit named."""
    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    avail = [1 << 30]
    real_read = _health._read
    monkeypatch.setattr(_health, "_read", lambda p: f"MemAvailable: {avail[0] >> 10} kB\n"
                        if p == "/proc/meminfo" else real_read(p))
    monkeypatch.setattr(_health, "_cgroup_memory", lambda: (None, None))
    seen: set[tuple[int, int]] = set()
    real_supervise = _health.supervise

    def supervise(proc: object, **k: object) -> object:
        pid = proc.pid  # type: ignore[attr-defined]

        def watch() -> None:  # (the child sets it on go, before it reads anything)
            with contextlib.suppress(OSError, StopIteration, ValueError):
                while not _dead(pid):
                    seen.add(_limits(pid))
                    time.sleep(0.002)

        t = threading.Thread(target=watch)
        t.start()
        try:
            return real_supervise(proc, **k)  # type: ignore[arg-type]
        finally:
            t.join()

    monkeypatch.setattr(_health, "supervise", supervise)
    pending, pid = _pending(slot, CFG)
    assert _limits(pid)[0] > 350 << 20
    avail[0] = 700 << 20
    try:
        with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds) as sealed:
            assert "match" in _health.run_health_check(slot, "m", "1.0.0", CFG,
                                                       sealed=sealed, pending=pending)
    finally:
        pending.close()
    assert (350 << 20, 350 << 20) in seen, seen
    assert _wait_dead(pid)


def test_f17_much_more_free_at_go_starts_a_fresh_child(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A child started short of memory is not kept when much more is free at go: the
    check runs in a fresh child under the limit of now."""
    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    avail = [600 << 20]
    real_read = _health._read
    monkeypatch.setattr(_health, "_read", lambda p: f"MemAvailable: {avail[0] >> 10} kB\n"
                        if p == "/proc/meminfo" else real_read(p))
    monkeypatch.setattr(_health, "_cgroup_memory", lambda: (None, None))
    limits: list[int] = []
    real_run = _health.run
    monkeypatch.setattr(_health, "run", lambda argv, policy, **k: limits.append(
        policy.max_memory) or real_run(argv, policy, **k))
    pending, pid = _pending(slot, CFG)
    avail[0] = 900 << 20
    try:
        with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds) as sealed:
            _health.run_health_check(slot, "m", "1.0.0", CFG, sealed=sealed, pending=pending)
    finally:
        pending.close()
    assert limits == [450 << 20] and _wait_dead(pid)


HEALTH_CHILD = "modelward.updater.install._healthchild"


def _uid(pid: str) -> int | None:
    with contextlib.suppress(OSError):
        return os.stat(f"/proc/{pid}").st_uid
    return None


def _cmdline(pid: str) -> str | None:
    """The command line of ``pid``; None when it is gone (or a zombie: it runs nothing)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace") or None
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="a root agent's child moves to TASK_UID")
def test_f17_a_root_agents_child_runs_under_a_uid_of_its_own(tmp_path: Path) -> None:
    """Not nobody (65534), shared with other daemons: a reserved uid nothing else runs as."""
    assert TASK_UID != 65534
    slot = _real_slot(tmp_path)
    pending, pid = _pending(slot, CFG)
    try:
        with open(f"/proc/{pid}/status") as f:
            uids = next(ln for ln in f if ln.startswith("Uid:")).split()[1:]
        assert uids == [str(TASK_UID)] * 4
        # nothing but health children (of other agents or test runs on this machine:
        # the uid is ours alone, not shared with any other daemon) runs under it
        others = [_cmdline(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != pid
                  and _uid(p) == TASK_UID]
        assert [c for c in others if c is not None and HEALTH_CHILD not in c] == []
    finally:
        pending.close()
    assert _wait_dead(pid)


def test_f17_a_go_without_its_limit_is_no_go() -> None:
    """``1`` and end of file (an old agent, a cut pipe): no limit came, so nothing is read;
    a whole go sets the limit, soft and hard, before the seals are even looked at."""
    import resource
    import subprocess
    import sys

    from modelward.updater.install._health import go_message
    from modelward.updater.install._healthchild import wait_for_go

    r, w = os.pipe()
    os.write(w, b"1")
    os.close(w)
    assert wait_for_go(r, {}) is False
    code = ("import os, resource, sys\nfrom modelward.updater.install._healthchild import "
            "wait_for_go\nr, w = os.pipe()\nos.write(w, bytes.fromhex(sys.argv[1]))\n"
            "print(wait_for_go(r, {}), resource.getrlimit(resource.RLIMIT_AS))\n")
    got = subprocess.run([sys.executable, "-c", code, go_message(300 << 20).hex()],
                         capture_output=True, text=True, timeout=30, check=True)
    assert got.stdout.split(None, 1) == ["True", f"({300 << 20}, {300 << 20})\n"], got
    assert resource.getrlimit(resource.RLIMIT_AS) != (300 << 20, 300 << 20)
