"""Process helpers shared by the simulated services: free ports, waiting, pid files."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
from pathlib import Path

_FIRST_PORT = 20000  # (below: well-known and registered services)


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out as a connection's source port."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(count: int = 1) -> int:
    """A loopback port ``p`` such that ``p .. p+count-1`` were all free just now.

    Chosen below the kernel's ephemeral range where there is room: a service restarted on
    its port (swtpm in the fault tests) must not find it taken by some other test's
    connection that the kernel gave it as a source port (seen in CI: "Address already in
    use" for seconds).
    """
    low = _ephemeral_low()
    rng = random.SystemRandom()
    if low > _FIRST_PORT + 1000:
        for _ in range(200):
            base = rng.randrange(_FIRST_PORT, low - count)
            if all(_bindable(p) for p in range(base, base + count)):
                return base
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + count <= 65535 and all(_bindable(p) for p in range(base + 1, base + count)):
            return base
    raise OSError("no free loopback port range found")


def wait_for_port(port: int, timeout: float = 10.0) -> bool:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def read_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process is alive."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def stop_pid(pid_file: Path, timeout: float = 5.0) -> bool:
    """SIGTERM the process in ``pid_file`` (SIGKILL after ``timeout``); True if one ran."""
    pid = read_pid(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _alive(pid):
            break
        time.sleep(0.02)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True
