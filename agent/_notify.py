"""systemd notification (sd_notify protocol) and the watchdog keep-alive.

The keep-alive thread pings ``WATCHDOG=1`` only while the main loop shows progress
(:meth:`Notifier.beat` from the loop, from every chunk of heavy work and while a child
process runs), so a hung agent stops pinging and systemd restarts it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    """Talks to ``$NOTIFY_SOCKET``; does nothing when not run by systemd.

    Args:
        env: the environment (read at the entry point).
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr = ("\0" + addr[1:]) if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        if self._addr:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        pid = env.get("WATCHDOG_PID")
        self.watchdog = usec / 1e6 if usec > 0 and (not pid or int(pid) == os.getpid()) else 0.0
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """Whether systemd listens."""
        return self._sock is not None

    def send(self, *fields: str) -> None:
        """Send ``KEY=value`` lines in one datagram."""
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._addr)
        except OSError as e:
            logger.debug("sd_notify failed: %s", e)

    def ready(self, status: str) -> None:
        """READY=1 with a status line; starts the watchdog keep-alive."""
        self.send("READY=1", f"STATUS={status}")
        if self.watchdog and self._thread is None:
            self._thread = threading.Thread(target=self._keepalive, name="watchdog",
                                            daemon=True)
            self._thread.start()

    def status(self, text: str) -> None:
        """STATUS= line (``systemctl status`` shows it)."""
        self.send(f"STATUS={text}")

    def beat(self) -> None:
        """The main loop is alive."""
        self._last_beat = time.monotonic()

    def stopping(self) -> None:
        """Ends the keep-alive, then STOPPING=1 (so it is the last word)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.send("STOPPING=1")

    def _keepalive(self) -> None:
        period = self.watchdog / 3
        while not self._stop.wait(period):
            if time.monotonic() - self._last_beat < self.watchdog:
                self.send("WATCHDOG=1")
            else:
                logger.error("main loop made no progress for %.0fs; letting the watchdog fire",
                             time.monotonic() - self._last_beat)
