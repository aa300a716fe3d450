"""Attacker a10bridge (session 10): a hostile broker against pahofast's batched TLS reads
(239de72: the rest of a PUBLISH of 64 KiB and more is read, every TLS record already
there, into one 256 KiB buffer kept per client, and paho is handed a view of it).

A scripted MQTT 5 broker over TLS (the test CA's 127.0.0.1 certificate) accepts the real
``MqttConnection`` (``_pahofast.Client``), grants its subscription, and then sends large
QoS 1 PUBLISHes the way a hostile or merely odd broker may: several packets and the start
of the next in one TLS write (data after the packet in the same batch), one packet split
at every byte (a TLS record each), packets larger than the 256 KiB buffer, records cut
across packet boundaries. Every payload the device was handed is kept, uncopied, until
the end: a piece that were a view into the reused buffer would have changed by then.
Last, a PUBLISH that announces more than the Maximum Packet Size ends the connection
before its body is read (no batched read of it).

Resisted: paho appends each view to its own ``bytearray`` packet at once and the
decoder copies the payload out of it, so every piece stays as it was sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import ssl
import threading
import time
from typing import Any

import pytest

from modelward.simulator._pki import CertPair
from modelward.updater._config import MqttConfig
from modelward.updater.transport import _pahofast
from modelward.updater.transport._mqttconn import MqttConnection
from tests.unit.test_i13_a3_broker import _packet, _read_packet

TOPIC = b"modelward/f/devices/dev-1/repo/resp"
LIMIT = 2 << 20  # the device's Maximum Packet Size in this test


def _publish(mid: int, payload: bytes) -> bytes:
    # topic, packet id, no properties, payload (QoS 1)
    return _packet(0x32, len(TOPIC).to_bytes(2, "big") + TOPIC + mid.to_bytes(2, "big")
                   + b"\x00" + payload)


def _payloads() -> list[bytes]:
    rng = random.Random(10)
    sizes = [64 * 1024, 64 * 1024 + 1, 100_000, 256 * 1024 - 10, 256 * 1024,
             256 * 1024 + 1, 300_000, 600_000, (1 << 20) + 22, 70_000]
    return [bytes([i]) * 7 + rng.randbytes(n - 7) for i, n in enumerate(sizes)]


class HostileBroker:
    """CONNACK, SUBACK, then the payloads in awkward writes; then an oversized PUBLISH."""

    def __init__(self, server: CertPair, payloads: list[bytes], oversized: bool) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(server.cert, server.key)
        self._ctx, self.payloads, self.oversized = ctx, payloads, oversized
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.stop = threading.Event()
        self.pubacks: list[int] = []
        self.done = threading.Event()
        self.closed_by_client = threading.Event()
        self.errors: list[BaseException] = []
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    def _serve(self) -> None:
        try:
            raw, _ = self._sock.accept()
            with self._ctx.wrap_socket(raw, server_side=True) as conn:
                self._session(conn)
        except (OSError, ssl.SSLError, AssertionError) as e:
            self.errors.append(e)

    def _session(self, conn: ssl.SSLSocket) -> None:
        _read_packet(conn)  # CONNECT
        conn.sendall(_packet(0x20, b"\x00\x00\x00"))
        kind, body = _read_packet(conn)
        assert kind >> 4 == 8, kind  # SUBSCRIBE
        conn.sendall(_packet(0x90, body[:2] + b"\x00\x01"))
        wire = [_publish(i + 1, p) for i, p in enumerate(self.payloads)]
        rng = random.Random(7)
        # 1: the first three packets and the first 1000 bytes of the fourth in one write
        conn.sendall(wire[0] + wire[1] + wire[2] + wire[3][:1000])
        time.sleep(0.05)
        conn.sendall(wire[3][1000:])
        # 2: packet 4 split at every byte of its first 70 KiB (one TLS record each; the
        # client reads the rest of the PUBLISH at first with to_process >= 64 KiB)
        w = wire[4]
        for i in range(70 * 1024):
            conn.sendall(w[i:i + 1])
        conn.sendall(w[70 * 1024:])
        # 3: the rest in random cuts that straddle packet boundaries, with pauses
        rest = b"".join(wire[5:])
        pos = 0
        while pos < len(rest):
            n = rng.choice((1, 7, 5000, 16384, 16385, 100_000, 300_000))
            conn.sendall(rest[pos:pos + n])
            pos += n
            if rng.random() < 0.2:
                time.sleep(0.01)
        conn.settimeout(0.2)
        deadline = time.monotonic() + 20
        buf = b""
        while len(self.pubacks) < len(self.payloads) and time.monotonic() < deadline:
            try:
                got = conn.recv(4096)
            except TimeoutError:
                continue
            if not got:
                return
            buf += got
            while len(buf) >= 2 and len(buf) >= 2 + buf[1]:
                k, n = buf[0], buf[1]
                if k >> 4 == 4:  # PUBACK
                    self.pubacks.append(int.from_bytes(buf[2:4], "big"))
                buf = buf[2 + n:]
        self.done.set()
        if self.oversized:
            # a PUBLISH that says it is larger than the Maximum Packet Size, followed by
            # 256 KiB of its body already in the socket
            head = bytes([0x32]) + _varint(LIMIT + 1)
            with contextlib.suppress(OSError):
                conn.sendall(head + b"\x00" * (256 * 1024))
        while not self.stop.is_set():
            try:
                if not conn.recv(4096):
                    self.closed_by_client.set()
                    return
            except TimeoutError:
                continue
            except OSError:
                self.closed_by_client.set()
                return

    def close(self) -> None:
        self.stop.set()
        self._sock.close()
        self._t.join(10)


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n % 128, n // 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


@pytest.mark.parametrize("oversized", [False, True])
def test_a10_batched_reads_leave_every_payload_as_sent(
        pki: tuple[CertPair, CertPair], oversized: bool) -> None:
    ca, server = pki
    payloads = _payloads()
    b = HostileBroker(server, payloads, oversized)
    got: list[Any] = []
    cfg = MqttConfig(host="127.0.0.1", port=b.port, fleet="f", client_name="dev-1",
                     ca_file=str(ca.cert), password="x")
    conn = MqttConnection(cfg, "dev-1-fetch", [TOPIC.decode()],
                          lambda m: got.append(m.payload), max_packet_size=LIMIT)
    try:
        assert b.done.wait(30), (len(got), b.errors)
        batch = conn.client._batch  # noqa: SLF001
        assert isinstance(batch, bytearray) and len(batch) == _pahofast.BATCH_BUFFER
        assert sorted(b.pubacks) == list(range(1, len(payloads) + 1))
        # every payload the device was handed, uncopied and kept till now: as sent
        assert [hashlib.sha256(bytes(p)).hexdigest() for p in got] == \
            [hashlib.sha256(p).hexdigest() for p in payloads]
        assert all(not isinstance(p, memoryview) for p in got)
        if oversized:
            assert conn.lost.wait(10)  # the client ends the connection at the header
            assert b.closed_by_client.wait(10)
            assert len(got) == len(payloads)
    finally:
        conn.close()
        b.close()
