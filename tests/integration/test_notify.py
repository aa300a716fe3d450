"""READY, STATUS, watchdog keep-alives and STOPPING reach a socket standing in for
systemd's NOTIFY_SOCKET (issue #4 must-show 4)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from modelward.agent._notify import Notifier
from tests.conftest import World


def _listen(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(0.2)
    return s


def _drain(s: socket.socket, seconds: float) -> list[str]:
    out: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            out.extend(s.recv(4096).decode().splitlines())
        except TimeoutError:
            continue
    return out


def test_daemon_sends_ready_status_watchdog_and_stopping(world: World) -> None:
    world.publish("1.0.0", seed=1)
    sock_path = world.tmp / "notify.sock"
    s = _listen(sock_path)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="600000")
    proc = subprocess.Popen([sys.executable, "-m", "modelward", "agent", "run", "--config",
                             str(world.conf_path)], env=env, stderr=subprocess.DEVNULL)
    try:
        msgs = _drain(s, 6)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
    msgs += _drain(s, 0.5)
    s.close()
    assert code == 0
    assert msgs[0] == "READY=1"
    from modelward.updater.install._journal import STEPS

    progress = [m for m in msgs if m.startswith("STATUS=update: ")]
    assert progress, msgs  # relayed from the attempt's journal while it runs
    assert all(m.split()[1] in STEPS for m in progress), progress
    assert "STATUS=installed classifier 1.0.0 into slot a" in msgs
    assert msgs.count("WATCHDOG=1") >= 6  # every 0.2 s for 6 s, minus start-up
    assert msgs[-1] == "STOPPING=1"


def test_watchdog_stops_when_the_main_loop_stalls(tmp_path: Path) -> None:
    sock_path = tmp_path / "n.sock"
    s = _listen(sock_path)
    n = Notifier({"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "300000"})
    n.ready("test")
    n.beat()
    alive = _drain(s, 0.25)
    stalled = _drain(s, 1.0)  # no beats: the keep-alive must fall silent
    n.stopping()
    s.close()
    assert "WATCHDOG=1" in alive
    assert stalled.count("WATCHDOG=1") <= 1


def test_watchdog_for_another_pid_is_ignored() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000",
                  "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog == 0.0


def test_abstract_socket_address() -> None:
    n = Notifier({"NOTIFY_SOCKET": "@modelward-test"})
    assert n.enabled
    n.send("READY=1")  # nobody listens: no exception
