"""Attacker review of issue 13 "bounded before verified": the broker itself.

A scripted MQTT 5 broker over TLS (the test CA's 127.0.0.1 certificate) accepts the real
``AnnouncementListener`` (the daemon's long-lived connection, Maximum Packet Size 64 KiB),
confirms its subscription, and then sends what only a broker can: SUBACKs for packet ids
the client never used, each with ~64 K failure reason codes. The child process's resident
memory is compared with that of the same connection without the flood.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from modelward.simulator._pki import CertPair
from tests._helpers import mqtt_varint

MIB = 1 << 20
FLOOD = 20


def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + mqtt_varint(len(body)) + body


def _read_packet(conn: ssl.SSLSocket) -> tuple[int, bytes]:
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = conn.recv(n - len(out))
            if not got:
                raise OSError("closed")
            out += got
        return out

    kind = exact(1)[0]
    length, mult = 0, 1
    while True:
        b = exact(1)[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    return kind, exact(length)


class FakeBroker:
    """CONNACK, SUBACK (granted) for the first SUBSCRIBE, then ``flood`` bogus SUBACKs
    (first connection only), then one announcement; then it idles until the client goes."""

    def __init__(self, server: CertPair, flood: int, codes: int) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(server.cert, server.key)
        self._ctx, self.flood, self.codes = ctx, flood, codes
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.stop = threading.Event()
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        # The client may end the connection on a bogus SUBACK and reconnect: the next
        # connection gets its SUBACK and the announcement without a flood.
        flood = self.flood
        while not self.stop.is_set():
            try:
                raw, _ = self._sock.accept()
            except OSError:
                return
            try:
                with self._ctx.wrap_socket(raw, server_side=True) as conn:
                    self._session(conn, flood)
            except (OSError, ssl.SSLError):
                pass
            flood = 0

    def _session(self, conn: ssl.SSLSocket, flood: int) -> None:
        _read_packet(conn)  # CONNECT
        conn.sendall(_packet(0x20, b"\x00\x00\x00"))
        kind, body = _read_packet(conn)
        assert kind >> 4 == 8, kind  # SUBSCRIBE
        conn.sendall(_packet(0x90, body[:2] + b"\x00\x01"))
        junk = b"\x80" * self.codes
        for i in range(flood):
            mid = 1000 + i
            conn.sendall(_packet(0x90, mid.to_bytes(2, "big") + b"\x00" + junk))
        topic = b"modelward/f/announce"
        payload = b'{"timestamp_version": 5}'
        conn.sendall(_packet(0x30, len(topic).to_bytes(2, "big") + topic + b"\x00"
                             + payload))
        conn.settimeout(0.2)
        while not self.stop.is_set():  # until the client goes (or the test ends)
            try:
                if not conn.recv(4096):
                    return
            except TimeoutError:
                continue

    def close(self) -> None:
        self.stop.set()
        self._sock.close()
        self._t.join(5)


_CHILD = """
import re, sys, threading
from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqttconn import AnnouncementListener
port, ca = int(sys.argv[1]), sys.argv[2]
got = threading.Event()
cfg = MqttConfig(host="127.0.0.1", port=port, fleet="f", client_name="dev-1", ca_file=ca,
                 password="x")
listener = AnnouncementListener(cfg, lambda v: got.set())
print("ANNOUNCED", got.wait(60))
import ctypes, gc
gc.collect()
ctypes.CDLL(None).malloc_trim(0)  # what stays is what is still held
status = open('/proc/self/status').read()
print('HWM_KIB', re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))
print('RSS_KIB', re.search(r'VmRSS:\\s+(\\d+) kB', status).group(1))
listener.close()
"""


def _child_rss(port: int, ca: Path) -> tuple[int, int]:
    """(peak RSS, RSS once the announcement arrived) of the listener's process, in KiB."""
    r = subprocess.run([sys.executable, "-c", _CHILD, str(port), str(ca)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert "ANNOUNCED True" in r.stdout, r.stdout + r.stderr
    hwm, rss = re.search(r"HWM_KIB (\d+)", r.stdout), re.search(r"RSS_KIB (\d+)", r.stdout)
    assert hwm and rss, r.stdout + r.stderr
    return int(hwm.group(1)), int(rss.group(1))


@pytest.mark.xdist_group("machine")
def test_a3_bogus_subacks_do_not_grow_the_listener(pki: tuple[CertPair, CertPair]) -> None:
    codes = 64 * 1024 - 16
    quiet = FakeBroker(pki[1], 0, codes)
    try:
        normal, normal_rss = _child_rss(quiet.port, pki[0].cert)
    finally:
        quiet.close()
    loud = FakeBroker(pki[1], FLOOD, codes)
    try:
        peak, rss = _child_rss(loud.port, pki[0].cert)
    finally:
        loud.close()
    print(f"listener: normal peak {normal} KiB / kept {normal_rss} KiB; after {FLOOD} bogus "
          f"SUBACKs peak {peak} KiB / kept {rss} KiB")
    assert peak <= normal + 16 * 1024, (normal, peak)
    assert rss <= normal_rss + 16 * 1024, (normal_rss, rss)
