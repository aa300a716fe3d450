"""Attacker review of issue 13 "bounded before verified": the HTTPS origin / network.

A scripted TLS origin (the test CA's 127.0.0.1 certificate) answers the real
``RequestsFetcher`` with bytes of the attacker's choosing: a body trickled one byte at
a time (faster than ``read_timeout``, far slower than ``min_speed``), a gzip bomb as the
body of an error answer, a 206 for another range, a redirect. What works is marked xfail.
"""

from __future__ import annotations

import gzip
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc

from modelward.simulator._pki import CertPair
from modelward.updater._config import HttpsConfig
from modelward.updater.transport._fetcher import RequestsFetcher

MIB = 1 << 20

Script = Callable[[ssl.SSLSocket, bytes], None]


class Origin:
    """A one-connection-at-a-time TLS server that runs ``script(conn, request)``."""

    def __init__(self, server: CertPair, script: Script) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(server.cert, server.key)
        self._ctx, self._script = ctx, script
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.stop = threading.Event()
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                raw, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                with self._ctx.wrap_socket(raw, server_side=True) as conn:
                    req = b""
                    while b"\r\n\r\n" not in req:
                        got = conn.recv(4096)
                        if not got:
                            break
                        req += got
                    self._script(conn, req)
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.stop.set()
        self._sock.close()
        self._t.join(5)



def _fetcher(pki: tuple[CertPair, CertPair], url: str, **kw: float) -> RequestsFetcher:
    return RequestsFetcher(HttpsConfig(url, url, ca_file=str(pki[0].cert), **kw))  # type: ignore[arg-type]


# --- slowloris: one byte now and then ------------------------------------------------------


def test_a3_trickled_body_is_a_slow_retrieval_error_within_the_window(
    pki: tuple[CertPair, CertPair], origin: Callable[[Script], Origin],
) -> None:
    def trickle(conn: ssl.SSLSocket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n")
        o = srv
        while not o.stop.is_set():
            conn.sendall(b"x")
            time.sleep(0.2)

    srv = origin(trickle)
    f = _fetcher(pki, srv.url, read_timeout=2.0, min_speed=1024, min_speed_window=1.0)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            f.download_bytes(srv.url + "timestamp.json", 2 * MIB)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - inspected below
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(8)  # min_speed_window 1 s: a few seconds at most
    srv.stop.set()  # (lets a stuck read end with the connection)
    assert outcome, "the fetch still hangs after 8 s"
    assert isinstance(outcome[0], tuf_exc.SlowRetrievalError | tuf_exc.DownloadError)


@pytest.mark.xdist_group("machine")
def test_a3_silent_origin_hits_read_timeout(
    pki: tuple[CertPair, CertPair], origin: Callable[[Script], Origin],
) -> None:
    """Refused: headers then silence ends at read_timeout with a DownloadError."""
    def silent(conn: ssl.SSLSocket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        srv.stop.wait(10)

    srv = origin(silent)
    f = _fetcher(pki, srv.url, read_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(tuf_exc.DownloadError):
        f.download_bytes(srv.url + "timestamp.json", 1000)
    assert time.monotonic() - t0 < 5


# --- a gzip bomb as the body of an error answer --------------------------------------------

_CHILD = """
import re, sys
from tuf.api import exceptions as tuf_exc
from modelward.updater._config import HttpsConfig
from modelward.updater.transport._fetcher import RequestsFetcher
url, ca = sys.argv[1], sys.argv[2]
f = RequestsFetcher(HttpsConfig(url, url, ca_file=ca))
try:
    f.download_bytes(url + "2.root.json", 512 * 1024)
    print("NO ERROR")
except tuf_exc.DownloadHTTPError as e:
    print("HTTP", e.status_code)
hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)
print('MAXRSS_KIB', hwm)
"""


def _child_rss(url: str, ca: Path) -> tuple[str, int]:
    r = subprocess.run([sys.executable, "-c", _CHILD, url, str(ca)], capture_output=True,
                       text=True, timeout=120, check=False)
    m = re.search(r"MAXRSS_KIB (\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    return r.stdout.splitlines()[0], int(m.group(1))


def _not_found(body: bytes, encoding: str | None) -> Script:
    head = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n" % len(body)
    if encoding:
        head += f"Content-Encoding: {encoding}\r\n".encode()

    def script(conn: ssl.SSLSocket, _req: bytes) -> None:
        conn.sendall(head + b"\r\n" + body)

    return script


@pytest.mark.xdist_group("machine")
def test_a3_gzip_bomb_in_a_404_body_keeps_rss_bounded(
    pki: tuple[CertPair, CertPair], origin: Callable[[Script], Origin],
) -> None:
    bomb = gzip.compress(b"\0" * (64 * MIB), 9)
    assert len(bomb) <= 65536
    plain = origin(_not_found(b"not found", None))
    status, normal = _child_rss(plain.url, pki[0].cert)
    assert status == "HTTP 404"
    bad = origin(_not_found(bomb, "gzip"))
    status, rss = _child_rss(bad.url, pki[0].cert)
    assert status == "HTTP 404"
    print(f"peak RSS: plain 404 {normal} KiB, gzip-bomb 404 {rss} KiB")
    assert rss <= normal + 16 * 1024, (normal, rss)


def test_a3_gzip_encoded_200_body_is_not_decoded(
    pki: tuple[CertPair, CertPair], origin: Callable[[Script], Origin],
) -> None:
    """Refused: a 200 body is read raw (decode_content=False) and bounded by max_length."""
    bomb = gzip.compress(b"\0" * (8 * MIB), 9)

    def script(conn: ssl.SSLSocket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
                     % len(bomb) + bomb)

    srv = origin(script)
    data = _fetcher(pki, srv.url).download_bytes(srv.url + "timestamp.json", 1 * MIB)
    assert data == bomb  # raw bytes: TUF rejects them, nothing was inflated


# --- Range and redirects -------------------------------------------------------------------


def test_a3_redirect_to_another_host_is_not_followed(
    pki: tuple[CertPair, CertPair], origin: Callable[[Script], Origin],
) -> None:
    """Refused: a 302 is an HTTP error, never followed."""
    def script(conn: ssl.SSLSocket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: https://203.0.113.1/x\r\n"
                     b"Content-Length: 0\r\n\r\n")

    srv = origin(script)
    with pytest.raises(tuf_exc.DownloadHTTPError) as e:
        _fetcher(pki, srv.url).download_bytes(srv.url + "timestamp.json", 1000)
    assert e.value.status_code == 302


def test_a3_lying_206_is_taken_at_the_asked_offset(
    pki: tuple[CertPair, CertPair], origin: Callable[[Script], Origin],
) -> None:
    """A 206 for another range (Content-Range: bytes 0-...) is taken as starting at the
    asked offset: Content-Range is not checked. Not exploitable (the whole-bundle TUF hash
    fails and the stage is discarded), but it costs a full re-download: noted, not xfail."""
    body = b"A" * 1000

    def script(conn: ssl.SSLSocket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-999/5000\r\n"
                     b"Content-Length: 1000\r\n\r\n" + body)

    srv = origin(script)
    chunks, start = _fetcher(pki, srv.url).fetch_from(srv.url + "t.tar", 4000)
    assert start == 4000
    assert b"".join(chunks) == body


@pytest.mark.xdist_group("machine")
def test_a3_chunked_404_with_a_small_content_length_keeps_rss_bounded(
    pki: tuple[CertPair, CertPair], origin: Callable[[Script], Origin],
) -> None:
    def script(conn: ssl.SSLSocket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % MIB + b"\0" * MIB + b"\r\n"
        for _ in range(64):
            conn.sendall(chunk)
        conn.sendall(b"0\r\n\r\n")

    plain = origin(_not_found(b"not found", None))
    _, normal = _child_rss(plain.url, pki[0].cert)
    bad = origin(script)
    status, rss = _child_rss(bad.url, pki[0].cert)
    assert status == "HTTP 404"
    print(f"peak RSS: plain 404 {normal} KiB, chunked 404 {rss} KiB")
    assert rss <= normal + 16 * 1024, (normal, rss)
