"""What a CONNECT costs mosquitto with dynamic security, by PBKDF2 iteration count.

    .venv/bin/python benchmarks/broker_connect.py [--connects 200]

mosquitto hashes the password (PBKDF2-HMAC-SHA512) on every CONNECT, so the iteration
count of `fleet broker-config` is paid each time any device (re)connects. For each count
this starts mosquitto with the generated settings on loopback and times, one after
another, TLS handshake + CONNECT + CONNACK as a device; the reference, in the same run, is
the TLS handshake alone (what no broker setting can avoid). Printed: ms per connect and the
ratio to the reference, and the broker's CPU seconds per connect.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelward.publisher._broker_config import write_broker_config  # noqa: E402
from modelward.simulator._broker import start_broker, stop_broker  # noqa: E402
from modelward.simulator._pki import issue_cert, make_ca  # noqa: E402
from modelward.updater._config import listen_client_id  # noqa: E402


def _s(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _connects(port: int, ca: Path, n: int, password: bytes | None) -> float:
    """Median seconds of ``n`` TLS handshakes, each followed by a CONNECT (unless
    ``password`` is None) and its CONNACK."""
    ctx = ssl.create_default_context(cafile=str(ca))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 10),
                               server_hostname="127.0.0.1")
        if password is not None:
            body = (_s(b"MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 60)
                    + _s(listen_client_id("bench-dev").encode()) + _s(b"bench-dev")
                    + _s(password))
            sock.sendall(b"\x10" + bytes([len(body)]) + body)
            ack = sock.recv(4)
            assert ack == b"\x20\x02\x00\x00", ack
        times.append(time.perf_counter() - t)
        sock.close()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connects", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelward-connect-") as tmp:
        work = Path(tmp)
        ca = make_ca(work)
        server = issue_cert(ca, work, "broker")
        print(f"{'iterations':>10} {'ms/connect':>10} {'x TLS only':>10} {'broker CPU ms':>13}")
        for iterations in (1, 101, 1000, 10000, 100000):
            d = work / f"it{iterations}"
            bc = write_broker_config("bench", ["bench-dev"], d / "bc", iterations=iterations)
            h = start_broker(d / "broker", server, ca.cert, bc.conf)
            try:
                pw = bc.credentials["bench-dev"].read_text().strip().encode()
                _connects(h.port, ca.cert, 10, pw)  # warm up
                tls = _connects(h.port, ca.cert, args.connects, None)
                cpu0 = _cpu(h.pid)
                full = _connects(h.port, ca.cert, args.connects, pw)
                cpu = (_cpu(h.pid) - cpu0) / args.connects
            finally:
                stop_broker(d / "broker")
            print(f"{iterations:>10} {full * 1e3:>10.2f} {full / tls:>10.2f} {cpu * 1e3:>13.2f}")


if __name__ == "__main__":
    main()
