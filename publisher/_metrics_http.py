"""The HTTP server of ``fleet exporter``: prometheus_client's handler, in a server that
bounds what idle or slow clients can hold.

prometheus_client's own ``start_http_server`` starts a thread per connection with no
timeout: a client that opens connections and sends nothing holds a thread and a file
descriptor each, for ever. Once the process runs out of descriptors (``ulimit -n``, 1024
by default) it accepts nothing more, and Prometheus' scrapes fail until the exporter is
restarted. Here:

* a connection that has not sent its whole request within :data:`IDLE_TIMEOUT` seconds,
  or stalls that long while its response is written, is closed;
* at most :func:`max_connections` connections are served at once; one more evicts the
  oldest connection still reading its request (a scraper sends its request at once, a
  client holding connections open does not), or, when every held connection is busy
  writing a response, is closed at once.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import logging
import resource
import socket
import socketserver
import threading
from collections import OrderedDict
from typing import Any

from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import Collector

logger = logging.getLogger("modelward.fleet-exporter")

IDLE_TIMEOUT = 10.0
"""Seconds a connection may take to send its request, or stall while it is answered."""

MAX_CONNECTIONS = 32
"""Connections served at once, at most (fewer if the descriptor limit is low)."""


def max_connections() -> int:
    """:data:`MAX_CONNECTIONS`, or a quarter of the soft descriptor limit if lower."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft // 4))


def is_wildcard(host: str) -> bool:
    """Whether ``host`` is the any-address (``0.0.0.0``, ``::``, or empty)."""
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


class _Handler(MetricsHandler):
    timeout = IDLE_TIMEOUT  # (StreamRequestHandler.setup: the socket's timeout)
    server: MetricsServer

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.request_read(self.request)
        return ok


class MetricsServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """Serves ``registry`` at any path (as prometheus_client does); see the module."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, registry: Collector,
                 limit: int | None = None) -> None:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        self.address_family = info[0][0]
        self.limit = max_connections() if limit is None else limit
        self._lock = threading.Lock()
        #: connection -> True while it is still reading its request (oldest first)
        self._held: OrderedDict[socket.socket, bool] = OrderedDict()
        handler: Any = type("Handler", (_Handler,), {"registry": registry})
        address: tuple[str, int] = (str(info[0][4][0]), int(info[0][4][1]))
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._lock:
            if len(self._held) >= self.limit:
                oldest = next((c for c, reading in self._held.items() if reading), None)
                if oldest is None:
                    return False  # (every held one is being answered: this one waits no turn)
                del self._held[oldest]
                with contextlib.suppress(OSError):
                    oldest.shutdown(socket.SHUT_RDWR)  # (its thread sees EOF and ends)
            self._held[request] = True
        return True

    def request_read(self, request: socket.socket) -> None:
        """The handler parsed ``request``'s request line and headers."""
        with self._lock:
            if request in self._held:
                self._held[request] = False

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._held.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("metrics request from %s failed", client_address, exc_info=True)


def start(host: str, port: int, registry: Collector,
          limit: int | None = None) -> tuple[MetricsServer, threading.Thread]:
    """Serve ``registry`` on ``host:port`` in a daemon thread.

    Raises:
        OSError: the address cannot be resolved or bound.
    """
    try:
        server = MetricsServer(host, port, registry, limit)
    except socket.gaierror as e:
        raise OSError(e.errno, e.strerror) from e
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread
