"""Attack a19 on issue 17 (anyone who can reach the exporter's address): connections that
send nothing, or one byte now and then, against the real ``fleet exporter`` process.

What happened: prometheus_client's server starts a thread per connection with no timeout.
Under systemd's default descriptor limit (1024 soft), about a thousand idle connections
left the exporter accepting nothing, and Prometheus' scrapes failed until it was
restarted. Now idle connections are closed after IDLE_TIMEOUT, at most a bounded number
are held, and a new one evicts the oldest still reading its request.
"""

from __future__ import annotations

import contextlib
import resource
import signal
import socket
import subprocess
import sys
import time

import requests

from modelward.publisher._metrics_http import IDLE_TIMEOUT
from tests.conftest import MqttWorld
from tests.integration.test_a19_prom_report_bigint import _free_port

_SOFT_LIMIT = 128  # (the exporter's descriptor limit here: a small fleet host's, scaled)


def _low_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_SOFT_LIMIT, hard))


def _scrape(url: str, deadline: float) -> str:
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            r = requests.get(url, timeout=3)
            if r.status_code == 200:
                return r.text
        time.sleep(0.2)
    return ""


def test_idle_and_trickling_connections_do_not_stop_the_scrapes(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    port = _free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "modelward", "fleet", "exporter", "--listen",
         f"127.0.0.1:{port}", "--interval", "1", "--fleet-dir", str(w.tmp / "no-fleet"),
         "--wait", "1", *w.broker_args("modelward-operator")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_low_fd_limit)
    url = f"http://127.0.0.1:{port}/metrics"
    held: list[socket.socket] = []
    try:
        assert "modelward_fleet_refresh_success" in _scrape(url, time.monotonic() + 60)
        # Twice the descriptor limit of connections that send nothing, then a few that
        # send a partial request line and trickle one byte at a time.
        for i in range(2 * _SOFT_LIMIT):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 16 == 0:
                s.sendall(b"GET /metr")
            held.append(s)
        started = time.monotonic()
        for _ in range(3):
            for s in held[::16]:
                with contextlib.suppress(OSError):
                    s.sendall(b"i")
            text = _scrape(url, time.monotonic() + 15)
            assert "modelward_fleet_refresh_success" in text, "a scrape failed while held"
        assert exporter.poll() is None
        # What is left open is closed by the exporter, not held for ever.
        time.sleep(max(0.0, started + IDLE_TIMEOUT + 3 - time.monotonic()))
        closed = 0
        for s in held:
            s.settimeout(0.5)
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        assert closed == len(held), f"{len(held) - closed} idle connections still held"
        assert "modelward_fleet_refresh_success" in _scrape(url, time.monotonic() + 10)
    finally:
        for s in held:
            s.close()
        if exporter.poll() is None:
            exporter.send_signal(signal.SIGTERM)
        out, err = exporter.communicate(timeout=30)
    assert exporter.returncode == 0, err


def test_wildcard_listen_warns(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    port = _free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "modelward", "fleet", "exporter", "--listen",
         f"0.0.0.0:{port}", "--fleet-dir", str(w.tmp / "no-fleet"),
         "--wait", "1", *w.broker_args("modelward-operator")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _scrape(f"http://127.0.0.1:{port}/metrics", time.monotonic() + 60)
    finally:
        exporter.send_signal(signal.SIGTERM)
        _, err = exporter.communicate(timeout=30)
    assert "warning: --listen 0.0.0.0:" in err and "no authentication" in err
    r = w.cli("fleet", "exporter", "--listen", "127.0.0.1:\u0669\u0661\u0660\u0660",
              "--fleet-dir", str(w.tmp / "no-fleet"), *w.broker_args("modelward-operator"))
    assert r.returncode != 0 and "is not HOST:PORT" in r.stderr
