"""Issue 13 "bounded before verified": what the attacker as origin or broker tries next.

The origin trickles the status line and headers (not only the body), trickles a body
fast enough for ``min_speed`` but forever, answers 404s that must keep the connection
reusable; the broker sends SUBACKs for packet ids never used, and control packets over
the control bound.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from tuf.api import exceptions as tuf_exc

from modelward.simulator._pki import CertPair
from modelward.updater.transport import _pahofast
from modelward.updater.transport._mqttconn import _MAX_EARLY_ACKS, MqttConnection
from tests.unit.test_i13_a3_https import Origin, Script, _fetcher


def _within(seconds: float, fn: Callable[[], object]) -> BaseException | None:
    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            out.append(None)
        except BaseException as e:  # noqa: BLE001 - returned
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"still running after {seconds} s"
    return out[0]


@pytest.mark.xdist_group("machine")
def test_trickled_status_line_and_headers_end_at_header_timeout(
    pki: tuple[CertPair, CertPair], origin: Callable[[Script], Origin],
) -> None:
    def trickle(conn: ssl.SSLSocket, _req: bytes) -> None:
        for b in b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 10000:
            if srv.stop.is_set():
                return
            conn.sendall(bytes([b]))
            time.sleep(0.1)

    srv = origin(trickle)
    f = _fetcher(pki, srv.url, read_timeout=2.0, header_timeout=1.5)
    t0 = time.monotonic()
    err = _within(8, lambda: f.download_bytes(srv.url + "timestamp.json", 1000))
    srv.stop.set()
    assert isinstance(err, tuf_exc.DownloadError), err
    assert time.monotonic() - t0 < 5


def test_trickled_range_body_is_a_slow_retrieval_error(
    pki: tuple[CertPair, CertPair], origin: Callable[[Script], Origin],
) -> None:
    """The bundle path (a resumed Range request) is bounded the same way."""
    def trickle(conn: ssl.SSLSocket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 1048576\r\n\r\n")
        while not srv.stop.is_set():
            conn.sendall(b"x")
            time.sleep(0.2)

    srv = origin(trickle)
    f = _fetcher(pki, srv.url, read_timeout=2.0, min_speed=1024, min_speed_window=1.0)
    chunks, _ = f.fetch_from(srv.url + "t.tar", 4096)
    err = _within(8, lambda: b"".join(chunks))
    srv.stop.set()
    assert isinstance(err, tuf_exc.SlowRetrievalError), err


@pytest.mark.xdist_group("machine")
def test_slow_body_is_handed_on_at_least_every_second(
    pki: tuple[CertPair, CertPair], origin: Callable[[Script], Origin],
) -> None:
    """Chunks come however slow the link (the caller's heartbeat goes on)."""
    def trickle(conn: ssl.SSLSocket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n")
        while not srv.stop.is_set():
            conn.sendall(b"x" * 100)
            time.sleep(0.1)

    srv = origin(trickle)
    f = _fetcher(pki, srv.url, min_speed=0)
    chunks = f.fetch(srv.url + "t.tar")
    stamps = []
    for _ in range(3):
        next(chunks)
        stamps.append(time.monotonic())
    srv.stop.set()
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert max(gaps) < 1.6, gaps


def test_metadata_that_keeps_coming_ends_at_metadata_timeout(
    pki: tuple[CertPair, CertPair], origin: Callable[[Script], Origin],
) -> None:
    """Fast enough for min_speed, but a metadata file may take metadata_timeout in all."""
    def steady(conn: ssl.SSLSocket, _req: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        while not srv.stop.is_set():
            conn.sendall(b"x" * 2000)
            time.sleep(0.1)

    srv = origin(steady)
    f = _fetcher(pki, srv.url, min_speed=1024, min_speed_window=1.0, metadata_timeout=1.5)
    err = _within(8, lambda: f.download_bytes(srv.url + "timestamp.json", 10**8))
    srv.stop.set()
    assert isinstance(err, tuf_exc.SlowRetrievalError), err


def test_small_plain_404_keeps_the_connection_and_big_ones_are_not_read(
    pki: tuple[CertPair, CertPair],
) -> None:
    """A small 404 is drained (one TLS connection for several requests); a 404 of a larger
    or unstated length is closed unread."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki[1].cert, pki[1].key)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    conns: list[int] = []
    answers = [b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found"] * 3 + [
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 100000\r\n\r\n" + b"z" * 100000]

    def serve() -> None:
        while answers:
            try:
                raw, _ = sock.accept()
            except OSError:
                return
            conns.append(1)
            with ctx.wrap_socket(raw, server_side=True) as conn:
                while answers:
                    req = b""
                    while b"\r\n\r\n" not in req:
                        got = conn.recv(4096)
                        if not got:
                            break
                        req += got
                    if not req:
                        break
                    conn.sendall(answers.pop(0))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    url = f"https://127.0.0.1:{port}/"
    f = _fetcher(pki, url)
    for _ in range(4):
        with pytest.raises(tuf_exc.DownloadHTTPError):
            f.download_bytes(url + "2.root.json", 1000)
    t.join(5)
    sock.close()
    assert len(conns) == 1
    assert f.bytes_received == 0


# --- the broker: SUBACKs ---------------------------------------------------------------------


def _conn() -> MqttConnection:
    c = object.__new__(MqttConnection)
    c._lock = threading.Lock()  # noqa: SLF001
    c._sub_acks, c._early_acks, c._initial_mid = {}, {}, 1  # noqa: SLF001
    c._subscribed = threading.Event()  # noqa: SLF001
    return c


def _rc(fail: bool) -> Any:
    return SimpleNamespace(is_failure=fail, __str__=lambda: "x")


def test_subacks_for_packet_ids_never_used_are_not_kept() -> None:
    c = _conn()
    client = SimpleNamespace(_last_mid=5000)
    for mid in range(10, 2000):  # far behind the last packet id paho handed out
        c._on_subscribe(client, None, mid, [_rc(True)] * 1000, None)  # noqa: SLF001
    assert c._early_acks == {}  # noqa: SLF001
    for mid in range(4900, 5001):  # recent ids: the newest few are kept, bounded
        c._on_subscribe(client, None, mid, [_rc(True)] * 1000, None)  # noqa: SLF001
    assert len(c._early_acks) <= _MAX_EARLY_ACKS  # noqa: SLF001
    assert 5000 in c._early_acks  # noqa: SLF001 - the newest: a subscribe about to wait
    assert all(len(v) <= 8 for v in c._early_acks.values())  # noqa: SLF001


def test_subscribe_whose_suback_came_early_still_completes() -> None:
    c = _conn()
    c.cfg = SimpleNamespace(connect_timeout=1.0)  # type: ignore[assignment]
    c._subs = []  # noqa: SLF001

    class Client:
        _last_mid = 41

        def subscribe(self, _topics: Any) -> tuple[int, int]:
            self._last_mid += 1
            c._on_subscribe(self, None, self._last_mid, [_rc(False)], None)  # noqa: SLF001
            return 0, self._last_mid

    c.client = Client()  # type: ignore[assignment]
    c.subscribe("t")  # no TransportError: the early SUBACK was kept for it


@pytest.mark.parametrize(("command", "size", "refused"), [
    (0x90, 1025, True), (0x90, 1000, False), (0x20, 5000, True), (0x30, 5000, False),
])
def test_control_packets_over_the_control_bound_end_the_connection(
    command: int, size: int, refused: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = _pahofast.Client(_pahofast.mqtt.CallbackAPIVersion.VERSION2,
                         protocol=_pahofast.mqtt.MQTTv5)
    c.max_incoming_packet = 64 * 1024
    c._in_packet = {"command": command, "have_remaining": 1,  # noqa: SLF001
                    "remaining_count": [0, 0], "remaining_length": size - 3}
    monkeypatch.setattr(_pahofast.mqtt.Client, "_sock_recv", lambda _s, n: b"")
    if refused:
        with pytest.raises(_pahofast.PacketTooLarge):
            c._sock_recv(10)  # noqa: SLF001
    else:
        assert c._sock_recv(10) == b""  # noqa: SLF001


@pytest.mark.xdist_group("machine")
def test_trickled_tls_handshake_ends_at_header_timeout(
    pki: tuple[CertPair, CertPair], origin: Callable[[Script], Origin],
) -> None:
    """Refused already: a proxy in front of a real TLS origin passes the server's handshake
    bytes on one at a time (each gap under the timeouts); CPython's ssl bounds the whole
    handshake by the socket timeout, so it ends there (a ReadTimeout)."""
    srv = origin(lambda conn, _req: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    stop = threading.Event()

    def pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while not stop.is_set():
                data = src.recv(1 if delay else 65536)
                if not data:
                    return
                dst.sendall(data)
                time.sleep(delay)
        except OSError:
            return

    def proxy() -> None:
        try:
            client, _ = lsock.accept()
        except OSError:
            return
        upstream = socket.create_connection(("127.0.0.1", srv.port))
        threading.Thread(target=pump, args=(client, upstream, 0.0), daemon=True).start()
        pump(upstream, client, 0.05)

    threading.Thread(target=proxy, daemon=True).start()
    url = f"https://127.0.0.1:{port}/"
    f = _fetcher(pki, url, connect_timeout=2.0, read_timeout=2.0, header_timeout=1.5)
    t0 = time.monotonic()
    err = _within(10, lambda: f.download_bytes(url + "timestamp.json", 1000))
    stop.set()
    lsock.close()
    assert isinstance(err, tuf_exc.DownloadError), err
    assert time.monotonic() - t0 < 6


def test_agent_config_sets_the_https_deadlines(tmp_path: Any) -> None:
    from modelward.agent._config import load_config
    from tests.unit.test_config import GOOD

    p = tmp_path / "a.toml"
    p.write_text(GOOD + "header_timeout = 5.0\nmetadata_timeout = 40\n")
    (tmp_path / "ca.pem").write_text("x")  # a ca_file must exist when the config loads
    https = load_config(p).updater.https
    assert https is not None
    assert (https.header_timeout, https.metadata_timeout) == (5.0, 40.0)
