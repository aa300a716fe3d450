"""Issue 16, byte ranges through the real components: nginx (several batches of multi-range
requests; its access log shows only the requested bytes plus framing were sent), a hostile
HTTPS origin on loopback (http.server + ssl: lying parts, endless bodies, mismatched
lengths), and mosquitto + the bridge (offset/length blocks; the bridge serves exactly the
requested bytes)."""

from __future__ import annotations

import http.server
import itertools
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests
from tuf.api import exceptions as tuf_exc

from modelward.simulator._pki import CertPair
from modelward.updater._config import HttpsConfig
from modelward.updater.transport._fetcher import RequestsFetcher
from modelward.updater.transport._mqtt import MqttFetcher
from modelward.updater.transport._ranges import (
    MAX_BATCH_RANGES,
    MAX_PART_HEADER,
    RangeAnswerError,
    range_header,
)
from tests.conftest import MqttWorld, World

DATA = random.Random(1616).randbytes(3 * 1024 * 1024 + 17)


def _scattered(n: int, length: int, seed: int = 1,
               span: int = len(DATA)) -> list[tuple[int, int]]:
    rnd = random.Random(seed)
    offs = sorted(rnd.sample(range(0, span // length - 1), n))
    return [(o * length + rnd.randrange(0, 50), length - 50 - rnd.randrange(0, 50))
            for o in offs]


def _fetch(f: Any, url: str, ranges: Sequence[tuple[int, int]]) -> bytes:
    """Fetch and check the pieces: each range covered exactly, in order, nothing else."""
    out = bytearray()
    it = iter(ranges)
    off, n = next(it)
    pos = off
    for p_off, piece in f.fetch_ranges(url, ranges):
        if pos == off + n:
            off, n = next(it)
            pos = off
        assert p_off == pos and 0 < len(piece) <= off + n - pos, (p_off, len(piece), pos)
        pos += len(piece)
        out += piece
    assert pos == off + n and next(it, None) is None
    return bytes(out)


def _want(ranges: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(DATA[o:o + n] for o, n in ranges)


def _https(url: str, ca: Path, **kw: Any) -> RequestsFetcher:
    return RequestsFetcher(HttpsConfig(metadata_url=url + "/", targets_url=url + "/",
                                       ca_file=str(ca), **kw))


_LOG = re.compile(r'"GET (\S+) HTTP/1\.1" (\d{3}) (\d+) ')


def _access(world: World, path: str, expect: int) -> list[tuple[int, int]]:
    """(status, $body_bytes_sent) of each request for ``path`` in nginx's access log (the
    default "combined" format has $body_bytes_sent), once it has ``expect`` lines (nginx
    logs a request after its last byte is sent: the device may have read it already)."""
    deadline = time.monotonic() + 10
    while True:
        out = []
        for line in (world.tmp / "origin" / "access.log").read_text().splitlines():
            m = _LOG.search(line)
            if m and m[1] == path:
                out.append((int(m[2]), int(m[3])))
        if len(out) >= expect or time.monotonic() > deadline:
            return out
        time.sleep(0.02)


# --- nginx ---------------------------------------------------------------------


def test_nginx_sends_only_the_requested_ranges_in_several_batches(world: World) -> None:
    (world.repo_dir / "targets" / "r.bin").write_bytes(DATA)
    ranges = _scattered(2 * MAX_BATCH_RANGES + 10, 9000)  # 3 batches
    ranges += [(len(DATA) - 100, 60), (len(DATA) - 40, 40)]  # adjacent, to the last byte
    f = _https(world.origin_url, world.ca.cert)
    assert _fetch(f, world.origin_url + "/targets/r.bin", ranges) == _want(ranges)
    payload = sum(n for _, n in ranges)
    assert f.bytes_received == payload
    log = _access(world, "/targets/r.bin", 3)
    assert [s for s, _ in log] == [206, 206, 206]
    sent = sum(b for _, b in log)
    # nginx's framing: ~100 bytes a part (delimiter, Content-Type, Content-Range)
    assert payload < sent <= payload + 128 * len(ranges) + 64 * len(log)
    assert f.range_skipped == sent - payload


def test_nginx_one_range_a_whole_file_and_1000_ranges(world: World) -> None:
    (world.repo_dir / "targets" / "r.bin").write_bytes(DATA)
    f = _https(world.origin_url, world.ca.cert)
    url = world.origin_url + "/targets/r.bin"
    assert _fetch(f, url, [(5, 10)]) == DATA[5:15]  # a plain 206 with Content-Range
    assert _fetch(f, url, [(0, len(DATA))]) == DATA
    many = _scattered(1000, 3000, seed=2)
    assert _fetch(f, url, many) == _want(many)  # a header of 1000 would be nginx's 400
    log = _access(world, "/targets/r.bin", 2 + -(-1000 // MAX_BATCH_RANGES))
    assert log[:2] == [(206, 10), (206, len(DATA))]
    assert len(log) == 2 + -(-1000 // MAX_BATCH_RANGES) and {s for s, _ in log} == {206}
    sent = sum(b for _, b in log[2:])
    assert sent <= sum(n for _, n in many) + 128 * 1000 + 64 * len(log)
    # why batches: nginx answers a Range line over its 8 KiB header buffers with 400
    r = requests.get(url, headers={"Range": range_header(many)}, verify=str(world.ca.cert),
                     timeout=30)
    assert r.status_code == 400


def test_nginx_ranges_past_the_end_are_typed_errors(world: World) -> None:
    (world.repo_dir / "targets" / "r.bin").write_bytes(DATA[:1000])
    f = _https(world.origin_url, world.ca.cert)
    url = world.origin_url + "/targets/r.bin"
    with pytest.raises(tuf_exc.DownloadHTTPError) as ei:  # none satisfiable: 416
        list(f.fetch_ranges(url, [(5000, 10)]))
    assert ei.value.status_code == 416
    with pytest.raises(RangeAnswerError, match="next requested range is 990-1009"):
        list(f.fetch_ranges(url, [(990, 20)]))  # nginx cuts it at the end
    with pytest.raises(RangeAnswerError, match="answers only 1 of the 2"):
        list(f.fetch_ranges(url, [(0, 10), (5000, 10)]))  # nginx skips the second
    with pytest.raises(tuf_exc.DownloadHTTPError) as ei:
        list(f.fetch_ranges(world.origin_url + "/targets/none.bin", [(0, 10)]))
    assert ei.value.status_code == 404


# --- a hostile HTTPS origin ------------------------------------------------------

Answer = Callable[[list[tuple[int, int]]], tuple[int, dict[str, str], Iterator[bytes]]]
BOUNDARY = "b0undary"


def _parse_range(header: str) -> list[tuple[int, int]]:
    out = []
    for spec in header.removeprefix("bytes=").split(","):
        a, b = spec.split("-")
        out.append((int(a), int(b) - int(a) + 1))
    return out


def _part(first: int, last: int, data: bytes | None = None, total: int = len(DATA),
          extra: str = "") -> bytes:
    return (f"\r\n--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\n{extra}"
            f"Content-Range: bytes {first}-{last}/{total}\r\n\r\n").encode() + \
        (DATA[first:last + 1] if data is None else data)


_CLOSE = f"\r\n--{BOUNDARY}--\r\n".encode()
_MP = {"Content-Type": f"multipart/byteranges; boundary={BOUNDARY}"}


def _multipart(body: Callable[[list[tuple[int, int]]], Iterator[bytes]],
               length: bool = True) -> Answer:
    def answer(rs: list[tuple[int, int]]) -> tuple[int, dict[str, str], Iterator[bytes]]:
        if not length:
            return 206, dict(_MP), body(rs)
        data = b"".join(body(rs))
        return 206, {**_MP, "Content-Length": str(len(data))}, iter([data])
    return answer


def _endless(piece: bytes) -> Iterator[bytes]:
    while True:
        yield piece


def _honest(rs: list[tuple[int, int]]) -> Iterator[bytes]:
    for o, n in rs:
        yield _part(o, o + n - 1)
    yield _CLOSE


HOSTILE: dict[str, tuple[Answer, str]] = {
    "an extra part": (_multipart(
        lambda rs: iter([b"".join(_part(o, o + n - 1) for o, n in rs), _part(0, 9), _CLOSE])),
        "beyond the 2 requested"),
    "a part for an unrequested range": (_multipart(
        lambda rs: iter([_part(rs[0][0], rs[0][0] + rs[0][1] - 1), _part(7, 99), _CLOSE])),
        "next requested range"),
    "overlapping parts": (_multipart(
        lambda rs: iter([_part(rs[0][0], rs[0][0] + rs[0][1] - 1),
                         _part(rs[0][0] + 5, rs[1][0] + rs[1][1] - 1), _CLOSE])),
        "next requested range"),
    "parts out of order": (_multipart(
        lambda rs: iter([_part(o, o + n - 1) for o, n in reversed(rs)] + [_CLOSE])),
        "next requested range"),
    "a huge part header": (_multipart(
        lambda rs: iter([f"\r\n--{BOUNDARY}\r\nX: {'h' * 100_000}\r\n\r\n".encode()]),
        length=False),
        f"over {MAX_PART_HEADER} bytes"),
    "an endless part header": (_multipart(
        lambda rs: itertools.chain([f"\r\n--{BOUNDARY}\r\n".encode()], _endless(b"X-A: b\r\n")),
        length=False), f"over {MAX_PART_HEADER} bytes"),
    "an endless multipart body": (_multipart(
        lambda rs: itertools.chain([_part(o, o + n - 1) for o, n in rs],
                                   _endless(_part(rs[-1][0], rs[-1][0]))), length=False),
        "beyond the 2 requested"),
    "an endless epilogue": (_multipart(
        lambda rs: itertools.chain([_part(o, o + n - 1) for o, n in rs], [_CLOSE],
                                   _endless(b"e" * 1000)),
        length=False), "after the close delimiter"),
    "a Content-Length over the bound": (
        lambda rs: (206, {**_MP, "Content-Length": str(10**12)}, iter([b""])),
        "at most"),
    "a Content-Length short of the parts": (
        lambda rs: (206, {**_MP, "Content-Length": "300"},
                    iter([b"".join(_honest(rs))[:300]])), "ended early"),
    "a part longer than its Content-Range": (_multipart(
        lambda rs: iter([_part(rs[0][0], rs[0][0] + rs[0][1] - 1,
                               DATA[rs[0][0]:rs[0][0] + rs[0][1] + 50]), _CLOSE])),
        "longer than its Content-Range"),
    "mismatched totals": (_multipart(
        lambda rs: iter([_part(rs[0][0], rs[0][0] + rs[0][1] - 1),
                         _part(rs[1][0], rs[1][0] + rs[1][1] - 1, total=len(DATA) + 1),
                         _CLOSE])), "size as"),
    "a lying single Content-Range": (
        lambda rs: (206, {"Content-Range": f"bytes {rs[0][0] + 1}-{rs[0][0] + 100}/"
                                           f"{len(DATA)}", "Content-Length": "100"},
                    iter([DATA[:100]])), "next requested range"),
    "a single range for two": (
        lambda rs: (206, {"Content-Range": f"bytes {rs[0][0]}-{rs[0][0] + rs[0][1] - 1}/"
                                           f"{len(DATA)}",
                          "Content-Length": str(rs[0][1])}, iter([DATA[:rs[0][1]]])),
        "answers only 1 of the 2"),
    "a single part whose length lies": (
        lambda rs: (206, {"Content-Range": f"bytes {rs[0][0]}-{rs[1][0] + rs[1][1] - 1}/"
                                           f"{len(DATA)}", "Content-Length": "5"},
                    iter([b"12345"])), "Content-Length of 5"),
    "a 200 with a short body": (
        lambda rs: (200, {"Content-Length": "1000"}, iter([DATA[:1000]])),
        "whole file, of 1000 bytes"),
    "a 200 cut short": (
        lambda rs: (200, {}, iter([DATA[:1000]])), "the body ended at 1000"),
    "a malformed Content-Length": (
        lambda rs: (206, {**_MP, "Content-Length": "-1"}, iter([b""])), "Content-Length"),
    "a gzip body": (
        lambda rs: (206, {**_MP, "Content-Encoding": "gzip", "Content-Length": "10"},
                    iter([b"x" * 10])), "gzip"),
    "a 416": (lambda rs: (416, {"Content-Length": "0"}, iter([])), "416"),
    "a redirect": (lambda rs: (302, {"Location": "https://127.0.0.1:1/", "Content-Length": "0"},
                               iter([])), "302"),
    "a multipart of another type": (
        lambda rs: (206, {"Content-Type": "multipart/mixed; boundary=x",
                          "Content-Length": "0"}, iter([])), "not multipart/byteranges"),
}


class _Origin:
    """A TLS origin on loopback that answers each GET with ``answer``."""

    def __init__(self, tls: CertPair) -> None:
        self.answer: Answer = _multipart(_honest)
        self.sent = 0
        self.requests: list[str] = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                rs = _parse_range(self.headers.get("Range", f"bytes=0-{len(DATA) - 1}"))
                origin.requests.append(self.headers.get("Range", ""))
                status, headers, body = origin.answer(rs)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                try:
                    for piece in body:
                        self.wfile.write(piece)
                        origin.sent += len(piece)
                except OSError:  # the device hung up (an endless body)
                    self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def origin(pki: tuple[CertPair, CertPair]) -> Iterator[_Origin]:
    o = _Origin(pki[1])
    try:
        yield o
    finally:
        o.close()


RANGES = [(1000, 500), (7_000, 9000)]


def test_hostile_origin_honest_answers_are_read(origin: _Origin,
                                                pki: tuple[CertPair, CertPair]) -> None:
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    origin.answer = _multipart(_honest)
    assert _fetch(f, origin.url + "/x", RANGES) == _want(RANGES)
    origin.answer = _multipart(_honest, length=False)  # close-delimited
    assert _fetch(f, origin.url + "/x", RANGES) == _want(RANGES)


def test_a_cdn_that_coalesces_ranges_is_accepted(origin: _Origin,
                                                 pki: tuple[CertPair, CertPair]) -> None:
    ranges = [(1000, 500), (2000, 100), (3000, 10), (70_000, 9000), (90_000, 10)]
    origin.answer = _multipart(lambda rs: iter([_part(1000, 3009), _part(70_000, 90_009),
                                                _CLOSE]))
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    assert _fetch(f, origin.url + "/x", ranges) == _want(ranges)
    assert f.bytes_received == sum(n for _, n in ranges)
    origin.answer = lambda rs: (206, {"Content-Range": f"bytes 1000-3009/{len(DATA)}",
                                      "Content-Length": str(2010)},
                                iter([DATA[1000:3010]]))
    assert _fetch(f, origin.url + "/x", ranges[:3]) == _want(ranges[:3])  # one merged 206


def test_a_200_with_an_endless_body_yields_the_ranges_then_hangs_up(
        origin: _Origin, pki: tuple[CertPair, CertPair]) -> None:
    """The origin ignores Range and streams the file, then junk, forever: the device reads
    up to the last requested byte, and every later batch comes from that one answer."""
    origin.answer = lambda rs: (200, {}, itertools.chain([DATA[:200_000]],
                                                         _endless(b"J" * 65536)))
    origin.requests.clear()
    ranges = [(i * 1000, 10) for i in range(MAX_BATCH_RANGES * 2)]  # two batches
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    assert _fetch(f, origin.url + "/x", ranges) == _want(ranges)
    assert len(origin.requests) == 1
    assert f.range_skipped < ranges[-1][0] + 10


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_origin_gets_a_typed_error(origin: _Origin, case: str,
                                             pki: tuple[CertPair, CertPair]) -> None:
    answer, match = HOSTILE[case]
    origin.answer = answer
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    handed: list[tuple[int, int]] = []
    with pytest.raises(tuf_exc.DownloadError, match=match):
        for off, piece in f.fetch_ranges(origin.url + "/x", RANGES):
            handed.append((off, len(piece)))
            assert bytes(piece) == DATA[off:off + len(piece)]
    for off, n in handed:  # never a byte outside the requested ranges
        assert any(o <= off and off + n <= o + ln for o, ln in RANGES)
    assert f.bytes_received == sum(n for _, n in handed)


# --- MQTT: mosquitto and the bridge ----------------------------------------------


def test_mqtt_ranges_are_served_exactly(mqtt_world: MqttWorld) -> None:
    """Scattered small ranges and one over a block: the bridge serves exactly the bytes
    asked for, and the device's pace keeps it under the bridge's request rate."""
    w = mqtt_world
    (w.repo_dir / "targets" / "r.bin").write_bytes(DATA)
    ranges = _scattered(120, 5000, seed=3, span=len(DATA) - 1_500_000)  # paced: ~3 s
    ranges.append((len(DATA) - 1_500_000, 1_500_000))  # over one block
    f = MqttFetcher(w.mqtt_cfg("dev-1"))
    try:
        assert _fetch(f, "mqtt://repo/targets/r.bin", ranges) == _want(ranges)
        with pytest.raises(tuf_exc.DownloadError, match="ends at"):
            list(f.fetch_ranges("mqtt://repo/targets/r.bin", [(len(DATA) - 5, 10)]))
        with pytest.raises(tuf_exc.DownloadHTTPError):
            list(f.fetch_ranges("mqtt://repo/targets/none.bin", [(0, 10)]))
    finally:
        f.close()
    payload = sum(n for _, n in ranges)
    assert f.bytes_received == payload
    assert f.requested_bytes == payload + 10 + 10
    w.stop_bridge()  # (its log is complete)
    assert w.served_bytes("r.bin") == payload + 5  # the refused range: its 5 bytes
    assert "dropping requests" not in w.bridge_log.read_text()  # under its request rate



def test_an_origin_that_stops_honouring_ranges_mid_fetch(
        origin: _Origin, pki: tuple[CertPair, CertPair]) -> None:
    """A 206 for the first batch, then a 200: the later batches come from that whole
    file, each requested byte once."""
    calls = []

    def answer(rs: list[tuple[int, int]]) -> tuple[int, dict[str, str], Iterator[bytes]]:
        calls.append(rs)
        if len(calls) == 1:
            return _multipart(_honest)(rs)
        return 200, {"Content-Length": str(len(DATA))}, iter([DATA])

    origin.answer = answer
    ranges = [(i * 1000, 10) for i in range(MAX_BATCH_RANGES * 3)]  # three batches
    f = _https(origin.url, pki[0].cert, read_timeout=5)
    assert _fetch(f, origin.url + "/x", ranges) == _want(ranges)
    assert len(calls) == 2 and f.bytes_received == sum(n for _, n in ranges)
