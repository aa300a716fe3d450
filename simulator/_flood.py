"""One compromised device against the bridge (issue 14, must-show 7).

:class:`Flooder` is a device that uses only its own credentials and its own request
topic: it sends block requests as fast as paho takes them (QoS 0, the cheapest for it),
each asking for a full block of a large file, and reads whatever comes back. It can also
send single hostile requests (deep JSON, an out-of-range offset).

:class:`Prober` is an honest device measuring its block latency: one request for one
block, the time until the block is there, again and again (:meth:`Prober.latencies`).

:func:`vm_hwm` reads a process's peak RSS. Used by ``benchmarks/bridge_flood.py`` and
``tests/integration/test_i14_bridge.py``.
"""

from __future__ import annotations

import json
import re
import secrets
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqtt import BLOCK_HEADER
from modelward.updater.transport._mqttconn import device_connection, publish_properties


def vm_hwm(pid: int) -> int:
    """Peak resident memory of ``pid`` in bytes (``VmHWM`` of /proc/<pid>/status)."""
    m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    if m is None:
        raise RuntimeError(f"no VmHWM for pid {pid}")
    return int(m.group(1)) * 1024


def vm_rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes now."""
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    if m is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return int(m.group(1)) * 1024


def _props(resp_topic: str) -> Any:
    p = publish_properties()
    p.ResponseTopic = resp_topic
    p.CorrelationData = secrets.token_bytes(16)
    return p


def _status(msg: mqtt.MQTTMessage) -> int:
    """The status of a block answer in either format (0: none)."""
    pairs = getattr(getattr(msg, "properties", None), "UserProperty", None) or []
    for k, v in pairs:
        if k == "status" and v.isdecimal() and len(v) <= 3:
            return int(v)
    if len(msg.payload) >= BLOCK_HEADER.size:
        return int(BLOCK_HEADER.unpack(bytes(msg.payload[:BLOCK_HEADER.size]))[1])
    return 0


class Flooder:
    """A device flooding the bridge from its own credentials (see the module).

    Args:
        cfg: the device's own broker settings (``client_name`` is its id).
        path: the file whose blocks it asks for (under ``targets/``).
        size: the file's size (offsets are spread over it).
        block: bytes asked for per request.
    """

    def __init__(self, cfg: MqttConfig, path: str, size: int, block: int = 1 << 20) -> None:
        self.cfg, self.path, self.size, self.block = cfg, path, size, block
        self.req_topic = cfg.topic(f"repo/req/{cfg.client_name}")
        self.resp_topic = cfg.topic(f"devices/{cfg.client_name}/repo/resp")
        self.sent = self.received = self.received_bytes = 0
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # its fetcher identity: the only one that may ask (one session, its bound client id)
        self.conn = device_connection(cfg, "fetch", [self.resp_topic], self._on_message)

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        payload = msg.payload
        with self._lock:
            self.received += 1
            self.received_bytes += len(payload)
            code = _status(msg)
            self.statuses[code] = self.statuses.get(code, 0) + 1

    def send_raw(self, payload: bytes) -> None:
        """One request with ``payload`` as it is (QoS 1, waited for)."""
        self.conn.publish(self.req_topic, payload, _props(self.resp_topic), wait=True)

    def _run(self, rate: float) -> None:
        blocks = max(1, self.size // self.block)
        bodies = [json.dumps({"path": self.path, "offset": b * self.block,
                              "length": self.block, "format": 2}).encode()
                  for b in range(blocks)]
        props = _props(self.resp_topic)  # the same for all: the attacker's CPU is not ours
        i = 0
        start = time.monotonic()
        while not self._stop.is_set():
            self.conn.client.publish(self.req_topic, bodies[i % blocks], qos=0,
                                     properties=props)
            i += 1
            self.sent = i
            ahead = i / rate - (time.monotonic() - start)
            if ahead > 0:
                self._stop.wait(ahead)

    def start(self, rate: float = 3000.0) -> None:
        """Flood at about ``rate`` requests a second until :meth:`stop`."""
        self._thread = threading.Thread(target=self._run, args=(rate,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop flooding (and disconnect)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.conn.close()


class Prober:
    """An honest device timing one block at a time from its own topics.

    Raises:
        TransportError: the broker refused the connection.
    """

    def __init__(self, cfg: MqttConfig, path: str, block: int = 1 << 20) -> None:
        self.cfg, self.path, self.block = cfg, path, block
        self.req_topic = cfg.topic(f"repo/req/{cfg.client_name}")
        self.resp_topic = cfg.topic(f"devices/{cfg.client_name}/repo/resp")
        self._got = threading.Event()
        self._want: bytes = b""
        self._status = 0
        self.conn = device_connection(cfg, "fetch", [self.resp_topic], self._on_message)

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(getattr(msg, "properties", None), "CorrelationData", None)
        if corr == self._want:
            self._status = _status(msg)
            self._got.set()

    def once(self, offset: int = 0, timeout: float = 10.0) -> tuple[int, float]:
        """(status, seconds) of one block request; status 0 after ``timeout``."""
        props = _props(self.resp_topic)
        self._want, self._status = props.CorrelationData, 0
        self._got.clear()
        body = json.dumps({"path": self.path, "offset": offset, "length": self.block,
                           "format": 2}).encode()
        t = time.perf_counter()
        self.conn.client.publish(self.req_topic, body, qos=1, properties=props)
        if not self._got.wait(timeout):
            return 0, timeout
        return self._status, time.perf_counter() - t

    def latencies(self, n: int, pause: float = 0.01) -> list[float]:
        """``n`` block latencies (seconds) of answered 200s; a pause between requests."""
        out: list[float] = []
        for i in range(n):
            status, dt = self.once(offset=(i % 4) * self.block)
            if status != 200:
                raise RuntimeError(f"the honest device's block got status {status}")
            out.append(dt)
            time.sleep(pause)
        return out

    def close(self) -> None:
        """Disconnect."""
        self.conn.close()


def median(xs: list[float]) -> float:
    """The median (for reports)."""
    return statistics.median(xs)
