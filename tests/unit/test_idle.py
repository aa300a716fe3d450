"""Idle signals and the gate, driven by injected sources (no loaded machine needed)."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from modelward.updater.idle import (
    BusyFileSignal,
    CpuIdleSignal,
    Gate,
    IdleSignal,
    MainsPowerSignal,
    MaintenanceWindowSignal,
    TimeRange,
    UpdateInterrupted,
)


def test_busy_file(tmp_path: Path) -> None:
    f = tmp_path / "busy"
    s = BusyFileSignal(f, max_depth=2)
    assert s.busy() is None  # no file: the app reports nothing
    f.write_text("3\n")
    assert "queue depth 3 > 2" in (s.busy() or "")
    f.write_text("2\n")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 1000))
    assert s.busy() is None
    f.write_text("garbage")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 2000))
    assert "unreadable" in (s.busy() or "")


def test_stale_busy_file_is_ignored(tmp_path: Path) -> None:
    f = tmp_path / "busy"
    f.write_text("9")
    now = [time.time()]
    s = BusyFileSignal(f, stale_after=60, clock=lambda: now[0])
    assert s.busy() is not None
    now[0] += 61  # the app stopped refreshing it: it is gone
    assert s.busy() is None


@pytest.mark.parametrize(
    "window,at,busy",
    [("02:00-05:00", "03:00", False), ("02:00-05:00", "05:00", True),
     ("22:00-04:00", "23:30", False), ("22:00-04:00", "03:59", False),
     ("22:00-04:00", "12:00", True)],
)
def test_maintenance_windows(window: str, at: str, busy: bool) -> None:
    t = datetime.fromisoformat(f"2026-11-25T{at}")
    s = MaintenanceWindowSignal([TimeRange.parse(window)], now=lambda: t)
    assert (s.busy() is not None) is busy


def test_bad_window() -> None:
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        TimeRange.parse("3am")


def _supply(root: Path, name: str, kind: str, online: str | None) -> None:
    d = root / name
    d.mkdir(parents=True)
    (d / "type").write_text(kind + "\n")
    if online is not None:
        (d / "online").write_text(online + "\n")


def test_mains_power(tmp_path: Path) -> None:
    assert MainsPowerSignal(tmp_path / "none").busy() is None  # no supplies: a server
    _supply(tmp_path, "BAT0", "Battery", None)
    _supply(tmp_path, "AC", "Mains", "0")
    assert MainsPowerSignal(tmp_path).busy() == "running on battery"
    (tmp_path / "AC" / "online").write_text("1\n")
    assert MainsPowerSignal(tmp_path).busy() is None


def test_cpu_signal_reports_a_share() -> None:
    clock = [0.0]
    s = CpuIdleSignal(min_idle=1.01, window=1.0, clock=lambda: clock[0])
    assert s.busy() is None  # first sample: no window yet
    time.sleep(0.05)
    clock[0] += 2
    assert "CPU idle" in (s.busy() or "")  # nothing is ever more than 100% idle


class _Flag(IdleSignal):
    def __init__(self) -> None:
        self.on = True

    def busy(self) -> str | None:
        return "test says busy" if self.on else None


def test_gate_waits_then_resumes() -> None:
    flag = _Flag()
    gate = Gate([flag], poll=0.01)
    threading.Timer(0.1, lambda: setattr(flag, "on", False)).start()
    t = time.monotonic()
    gate.checkpoint("download")
    assert time.monotonic() - t >= 0.09
    assert gate.pauses == 1


def test_gate_stop_interrupts_a_pause() -> None:
    stop = threading.Event()
    gate = Gate([_Flag()], poll=0.01, stop=stop)
    threading.Timer(0.05, stop.set).start()
    with pytest.raises(UpdateInterrupted):
        gate.wait_idle("health check")
