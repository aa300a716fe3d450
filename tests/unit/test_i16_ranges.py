"""Issue 16, byte ranges: the caller's contract, request batching, and the multipart reader
against a malicious origin (pure functions, fed in every split); the default
``fetch_ranges`` over ``fetch_from``; MQTT ranges through the block pipeline against a
fake bridge that loses, duplicates, reorders and oversizes blocks."""

from __future__ import annotations

import json
import random
import struct
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tuf.api import exceptions as tuf_exc

from modelward.updater._config import MqttConfig
from modelward.updater.transport._fetcher import RangeFetcher
from modelward.updater.transport._mqtt import MqttFetcher, block_header
from modelward.updater.transport._ranges import (
    MAX_BATCH_RANGES,
    MAX_EPILOGUE,
    MAX_HEADER_BYTES,
    MAX_PART_HEADER,
    MAX_PREAMBLE,
    ByteRangesReader,
    Cover,
    RangeAnswerError,
    batch_ranges,
    check_ranges,
    merge_slack,
    parse_boundary,
    parse_content_range,
    range_header,
)

DATA = random.Random(16).randbytes(200_000)
B = b"00000000000000000001"
_CLOSE = b"\r\n--" + B + b"--\r\n"
RANGES = [(10, 100), (500, 1000), (5000, 1), (70_000, 20_000), (199_000, 1000)]


def _want(ranges: Sequence[tuple[int, int]]) -> bytes:
    return b"".join(DATA[o:o + n] for o, n in ranges)


def _part(first: int, last: int, total: int | str = len(DATA), *, data: bytes | None = None,
          headers: bytes = b"Content-Type: application/x-tar\r\n") -> bytes:
    body = DATA[first:last + 1] if data is None else data
    return (b"\r\n--" + B + b"\r\n" + headers +
            f"Content-Range: bytes {first}-{last}/{total}\r\n\r\n".encode() + body)


def _nginx(ranges: Sequence[tuple[int, int]]) -> bytes:
    """A body as nginx writes it."""
    return b"".join(_part(o, o + n - 1) for o, n in ranges) + b"\r\n--" + B + b"--\r\n"


def _read(body: bytes, ranges: Sequence[tuple[int, int]], step: int = 4096,
          boundary: bytes = B) -> tuple[bytes, list[tuple[int, int]]]:
    """Feed ``body`` in ``step``-byte pieces; (the bytes handed on, their (offset, len))."""
    r = ByteRangesReader(boundary, ranges)
    out, spans = bytearray(), []
    for i in range(0, len(body), step):
        for off, piece in r.feed(body[i:i + step]):
            spans.append((off, len(piece)))
            out += piece
    r.finish()
    return bytes(out), spans


def _check_spans(spans: list[tuple[int, int]], ranges: Sequence[tuple[int, int]]) -> None:
    """Pieces cover each range exactly, in order, and nothing else."""
    it = iter(spans)
    for off, n in ranges:
        pos = off
        while pos < off + n:
            p_off, p_len = next(it)
            assert p_off == pos and p_len > 0 and pos + p_len <= off + n
            pos += p_len
    assert next(it, None) is None


# --- the caller's contract and batching --------------------------------------------


@pytest.mark.parametrize("bad", [
    [(10, 5), (0, 5)],  # unsorted
    [(0, 10), (5, 10)],  # overlapping
    [(0, 0)],  # empty
    [(-1, 5)],  # negative
    [(0, 2**63)],  # beyond any file
    [(0, 1.5)],  # not an int
    [(0,)],  # not a pair
])
def test_ranges_that_break_the_contract_are_a_caller_error(bad: Any) -> None:
    with pytest.raises(ValueError):
        check_ranges(bad)


def test_adjacent_ranges_are_allowed() -> None:
    check_ranges([(0, 10), (10, 10)])


def test_batches_keep_order_and_stay_under_nginx_header_limits() -> None:
    rnd = random.Random(1)
    ranges, pos = [], 0
    for _ in range(5000):
        pos += rnd.randint(1, 10**12)
        n = rnd.randint(1, 10**9)
        ranges.append((pos, n))
        pos += n
    batches = batch_ranges(ranges)
    assert [r for b in batches for r in b] == ranges
    for b in batches:
        assert 1 <= len(b) <= MAX_BATCH_RANGES
        assert len(range_header(b)) <= MAX_HEADER_BYTES
    huge = [(2**62 + i * 10, 1) for i in range(200)]  # 19-digit offsets: the byte bound
    for b in batch_ranges(huge):
        assert len("Range: " + range_header(b)) < 4096 < 8192  # nginx: 8 KiB lines


def test_range_header_is_inclusive() -> None:
    assert range_header([(0, 1), (10, 5)]) == "bytes=0-0,10-14"


# --- boundary and Content-Range ----------------------------------------------------


@pytest.mark.parametrize(("ctype", "boundary"), [
    ("multipart/byteranges; boundary=00000000000000000001", B),
    ('Multipart/ByteRanges; charset=x; BOUNDARY="a(b)c=d?"', b"a(b)c=d?"),
])
def test_boundaries(ctype: str, boundary: bytes) -> None:
    assert parse_boundary(ctype) == boundary


@pytest.mark.parametrize("ctype", [
    "application/octet-stream",
    "multipart/mixed; boundary=x",
    "multipart/byteranges",
    "multipart/byteranges; boundary=a; boundary=b",
    "multipart/byteranges; boundary=",
    "multipart/byteranges; boundary=" + "x" * 71,
    "multipart/byteranges; boundary=a\r\nb",
    "multipart/byteranges; boundary=\"a b\"",
    "multipart/byteranges; boundary=" + "x" * 600,
])
def test_bad_boundaries_are_refused(ctype: str) -> None:
    with pytest.raises(RangeAnswerError):
        parse_boundary(ctype)


@pytest.mark.parametrize("value", [
    "bytes 5-4/10", "bytes 0-10/10", "bytes 0-1/", "bytes -1/10", "bytes 0-1", "items 0-1/2",
    "bytes 0x1-2/3", "bytes 1-2/3, bytes 4-5/6", "bytes " + "9" * 20 + "-1/2", "bytes ²-2/3",
])
def test_bad_content_ranges_are_refused(value: str) -> None:
    with pytest.raises(RangeAnswerError):
        parse_content_range(value)


def test_content_range_unit_is_case_insensitive() -> None:
    assert parse_content_range("Bytes 1-2/3").last == 2


def test_content_range_with_unknown_total() -> None:
    cr = parse_content_range(" bytes 0-9/* ")
    assert (cr.first, cr.last, cr.total) == (0, 9, None)


# --- the multipart reader: what nginx sends --------------------------------------


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 1000, 10**6])
def test_nginx_bodies_in_every_split(step: int) -> None:
    got, spans = _read(_nginx(RANGES), RANGES, step)
    assert got == _want(RANGES)
    _check_spans(spans, RANGES)


def test_a_body_without_leading_crlf_and_with_a_preamble() -> None:
    body = _nginx(RANGES)
    assert _read(body[2:], RANGES)[0] == _want(RANGES)
    assert _read(b"preamble text" + body, RANGES)[0] == _want(RANGES)


def test_transport_padding_after_a_boundary_is_allowed() -> None:
    body = _nginx(RANGES[:1]).replace(B + b"\r\nContent-Type", B + b" \t\r\nContent-Type")
    assert _read(body, RANGES[:1])[0] == _want(RANGES[:1])


def test_a_delimiter_inside_a_part_s_data_is_data() -> None:
    """Parts are delimited by their Content-Range's length, never by scanning for the
    boundary: a file that holds the delimiter (an origin that knows the boundary it will
    use) cannot end or start a part."""
    evil = b"\r\n--" + B + b"\r\nContent-Range: bytes 0-9/200000\r\n\r\n" + b"x" * 10
    body = _part(10, 10 + len(evil) - 1, data=evil) + _CLOSE
    got, _ = _read(body, [(10, len(evil))], 5)
    assert got == evil


def test_a_coalesced_part_yields_only_the_requested_bytes() -> None:
    ranges = [(10, 100), (200, 50), (300, 10), (5000, 10)]
    body = _part(10, 309) + _part(5000, 5009) + b"\r\n--" + B + b"--\r\n"
    got, spans = _read(body, ranges, 7)
    assert got == _want(ranges)
    _check_spans(spans, ranges)


def test_a_coalesced_part_beyond_the_slack_is_refused() -> None:
    ranges = [(0, 10), (150_000, 10)]
    assert merge_slack(ranges) < 150_000
    with pytest.raises(RangeAnswerError, match="coalesces"):
        _read(_part(0, 150_009) + b"\r\n--" + B + b"--\r\n", ranges)


# --- the multipart reader: a malicious origin ------------------------------------

HOSTILE: dict[str, tuple[bytes, str]] = {
    "an extra part": (_nginx(RANGES)[:-len(_CLOSE)] + _part(0, 5) + _CLOSE, "beyond"),
    "a part for an unrequested range": (
        _part(10, 109) + _part(300, 399) + _CLOSE, "next requested range"),
    "an overlapping part": (_part(10, 109) + _part(100, 1499) + _CLOSE, "next requested"),
    "a part out of order": (_part(500, 1499) + _part(10, 109) + _CLOSE, "next requested"),
    "a part cut short": (_part(10, 109) + _part(500, 1000) + _CLOSE, "next requested"),
    "a part longer than its Content-Range": (
        _part(10, 109, data=DATA[10:111]) + _CLOSE, "longer than its Content-Range"),
    "a part shorter than its Content-Range": (
        _part(10, 109, data=DATA[10:100]) + _CLOSE, "no delimiter"),
    "a missing part": (_part(10, 109) + _CLOSE, "ended after 1 parts"),
    "a huge part header": (
        b"\r\n--" + B + b"\r\nX: " + b"a" * 5000 + b"\r\n\r\n", "over 1024"),
    "a header line without a colon": (
        _part(10, 109, headers=b"garbage\r\n") + _CLOSE, "malformed part header"),
    "two Content-Range headers": (
        _part(10, 109, headers=b"Content-Range: bytes 10-109/200000\r\n") + _CLOSE,
        "2 Content-Range"),
    "no Content-Range": (b"\r\n--" + B + b"\r\nContent-Type: x\r\n\r\n" + DATA[10:110] +
                         _CLOSE, "0 Content-Range"),
    "a lying total": (_part(10, 109) + _part(500, 1499, 999_999) + _CLOSE, "size as"),
    "an endless preamble": (b"x" * (MAX_PREAMBLE + 200), "no multipart delimiter"),
    "another boundary": (_nginx(RANGES[:1]).replace(B, b"00000000000000000002"),
                         "ended early"),
    "a boundary followed by junk": (
        _nginx(RANGES[:1]).replace(B + b"\r\nContent-Type", B + b"X\r\nContent-Type"),
        "followed by other characters"),
    "an endless epilogue": (_nginx(RANGES[:1]) + b"e" * (MAX_EPILOGUE + 1), "after the close"),
    "no close delimiter": (_nginx(RANGES[:1])[:-len(_CLOSE)], "ended early"),
    "a body cut in a part": (_nginx(RANGES[:1])[:60], "ended early"),
    "an empty body": (b"", "ended early"),
}


ONE_RANGE = {
    'a body cut in a part',
    'a boundary followed by junk',
    'a part longer than its Content-Range',
    'a part shorter than its Content-Range',
    'an empty body',
    'an endless epilogue',
    'another boundary',
    'no close delimiter',
}  # the cases whose body answers RANGES[:1]


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("step", [1, 13, 10**6])
def test_a_malicious_multipart_body_is_a_typed_error(case: str, step: int) -> None:
    body, match = HOSTILE[case]
    ranges = RANGES[:1] if case in ONE_RANGE else RANGES
    r = ByteRangesReader(B, ranges)
    handed: list[tuple[int, int]] = []
    with pytest.raises(RangeAnswerError, match=match):
        for i in range(0, len(body), step):
            for off, piece in r.feed(body[i:i + step]):
                handed.append((off, len(piece)))
        r.finish()
    assert isinstance(RangeAnswerError("x"), tuf_exc.DownloadError)
    for off, n in handed:  # never a byte outside the requested ranges
        assert any(o <= off and off + n <= o + ln for o, ln in ranges), (off, n)


def test_an_endless_body_stops_being_read_within_bounds() -> None:
    """The reader raises within a bounded number of bytes of an endless stream of
    headers or of parts, whatever its split."""
    r = ByteRangesReader(B, RANGES[:1])
    fed = 0
    with pytest.raises(RangeAnswerError):
        for piece in iter(lambda: b"\r\n--" + B + b"\r\nX-Junk: " + b"j" * 100, None):
            fed += len(piece)
            list(r.feed(piece))
    assert fed <= MAX_PART_HEADER + 200


# --- Cover (200 and single-part answers) -----------------------------------------


def test_cover_of_a_whole_file() -> None:
    c = Cover(RANGES)
    out = bytearray()
    pos = 0
    for i in range(0, c.last_end, 777):
        for _, p in c.pieces(pos, memoryview(DATA[i:i + 777])):
            out += p
        pos += len(DATA[i:i + 777])
    assert bytes(out) == _want(RANGES) and c.done
    assert c.skipped == pos - len(out)


# --- the default fetch_ranges, over fetch_from ----------------------------------


class _Whole(RangeFetcher):
    """Serves DATA in 1000-byte chunks; no Range support of its own."""

    def __init__(self, data: bytes = DATA) -> None:
        self.data = data
        self.read = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        for i in range(0, len(self.data), 1000):
            self.read += len(self.data[i:i + 1000])
            yield self.data[i:i + 1000]


def test_default_fetch_ranges_reads_up_to_the_last_range_only() -> None:
    f = _Whole()
    ranges = [(10, 100), (5000, 10)]
    got = b"".join(bytes(p) for _, p in f.fetch_ranges("x", ranges))
    assert got == _want(ranges)
    assert f.read <= 6000


def test_default_fetch_ranges_on_a_short_file_is_a_typed_error() -> None:
    f = _Whole(DATA[:1000])
    with pytest.raises(RangeAnswerError, match="ended at 1000"):
        list(f.fetch_ranges("x", [(10, 100), (5000, 10)]))


def test_bad_ranges_are_refused_before_anything_is_fetched() -> None:
    f = _Whole()
    with pytest.raises(ValueError):
        f.fetch_ranges("x", [(10, 5), (0, 5)])
    assert f.read == 0
    assert list(f.fetch_ranges("x", [])) == []


# --- MQTT ranges against a fake bridge -----------------------------------------

BS = 4096


class _FakeConn:
    """An MQTT connection whose "bridge" answers each request at once, through
    ``mangle`` (which may drop, repeat, reorder, or change the answers)."""

    def __init__(self, fetcher: MqttFetcher, data: bytes,
                 mangle: Callable[[dict[str, Any], bytes, list[bytes]], list[bytes]]) -> None:
        self.f, self.data, self.mangle = fetcher, data, mangle
        self.lost = threading.Event()
        self.asked: list[tuple[int, int]] = []
        self.held: list[bytes] = []
        self.corr: dict[int, bytes] = {}

    def subscribe(self, topic: str) -> None:
        pass

    def unsubscribe(self, topic: str) -> None:
        pass

    def close(self) -> None:
        pass

    def publish(self, topic: str, body: bytes, props: Any) -> None:
        req = json.loads(body)
        assert req["length"] <= BS
        off, n = req["offset"], req["length"]
        self.asked.append((off, n))
        self.corr[off] = props.CorrelationData
        answer = block_header(200, off, len(self.data)) + self.data[off:off + n]
        for payload in self.mangle(req, props.CorrelationData, [answer]):
            self.deliver(payload, props.CorrelationData)

    def deliver(self, payload: bytes, corr: bytes) -> None:
        msg = mqtt.MQTTMessage(topic=b"modelward/f/devices/d/repo/resp")
        msg.payload = payload
        # (one namespace object, not a class per message: classes pile up in the type
        # machinery and would show as memory growth in the bounded-memory tests)
        msg.properties = types.SimpleNamespace(CorrelationData=corr)  # type: ignore[assignment]
        self.f._inbox.put(msg)  # noqa: SLF001


def _mqtt(mangle: Callable[[dict[str, Any], bytes, list[bytes]], list[bytes]],
          ranges: Sequence[tuple[int, int]], data: bytes = DATA,
          **cfg: Any) -> tuple[bytes, list[tuple[int, int]], _FakeConn, MqttFetcher]:
    c = MqttConfig(host="h", port=1, fleet="f", client_name="d", block_size=BS,
                   span_blocks=1, window=4,
                   **cfg)
    f = MqttFetcher(c)
    conn = _FakeConn(f, data, mangle)
    f._conn = conn  # type: ignore[assignment]  # noqa: SLF001
    out, spans = bytearray(), []
    for off, p in f.fetch_ranges("mqtt://repo/targets/x", ranges):
        spans.append((off, len(p)))
        out += p
    return bytes(out), spans, conn, f


MRANGES = [(10, 100), (4000, 10_000), (70_000, 1), (100_000, 3 * BS)]


def test_mqtt_ranges_ask_exactly_the_requested_bytes() -> None:
    got, spans, conn, f = _mqtt(lambda r, c, a: a, MRANGES)
    assert got == _want(MRANGES)
    _check_spans(spans, MRANGES)
    assert sum(n for _, n in conn.asked) == sum(n for _, n in MRANGES) == f.requested_bytes
    assert f.bytes_received == len(got)
    assert all(n <= BS for _, n in conn.asked)


def test_mqtt_ranges_survive_duplicated_and_foreign_blocks() -> None:
    def mangle(req: dict[str, Any], corr: bytes, a: list[bytes]) -> list[bytes]:
        foreign = block_header(200, req["offset"], len(DATA)) + b"F" * req["length"]
        conn.deliver(foreign, b"X" * 8 + corr[8:])  # another session's correlation
        return a + a

    conn: _FakeConn
    c = MqttConfig(host="h", port=1, fleet="f", client_name="d", block_size=BS,
                   span_blocks=1, window=4)
    f = MqttFetcher(c)
    conn = _FakeConn(f, DATA, mangle)
    f._conn = conn  # type: ignore[assignment]  # noqa: SLF001
    got = b"".join(bytes(p) for _, p in f.fetch_ranges("mqtt://repo/targets/x", MRANGES))
    assert got == _want(MRANGES)


def test_mqtt_ranges_survive_reordered_blocks() -> None:
    held: list[tuple[bytes, bytes]] = []

    def mangle(req: dict[str, Any], corr: bytes, a: list[bytes]) -> list[bytes]:
        held.append((a[0], corr))
        if len(held) == 3 or req["offset"] == MRANGES[-1][0] + 2 * BS:
            for payload, co in reversed(held):
                conn.deliver(payload, co)
            held.clear()
        return []

    c = MqttConfig(host="h", port=1, fleet="f", client_name="d", block_size=BS,
                   span_blocks=1, window=3,
                   block_timeout=0.2)
    f = MqttFetcher(c)
    conn = _FakeConn(f, DATA, mangle)
    f._conn = conn  # type: ignore[assignment]  # noqa: SLF001
    got = b"".join(bytes(p) for _, p in f.fetch_ranges("mqtt://repo/targets/x", MRANGES))
    assert got == _want(MRANGES)


def test_mqtt_a_lost_block_is_asked_again() -> None:
    seen: set[int] = set()

    def mangle(req: dict[str, Any], corr: bytes, a: list[bytes]) -> list[bytes]:
        if req["offset"] == 4000 + BS and req["offset"] not in seen:
            seen.add(req["offset"])
            return []
        return a

    got, _, conn, _ = _mqtt(mangle, MRANGES, block_timeout=0.1)
    assert got == _want(MRANGES)
    assert conn.asked.count((4000 + BS, BS)) == 2


def test_mqtt_a_block_longer_than_asked_is_refused_not_cut_into_the_output() -> None:
    def mangle(req: dict[str, Any], corr: bytes, a: list[bytes]) -> list[bytes]:
        return [a[0] + b"EXTRA"]

    with pytest.raises(tuf_exc.DownloadError, match="no answer for offset 10"):
        _mqtt(mangle, MRANGES, block_timeout=0.05, max_retries=1)


def test_mqtt_a_range_past_the_end_of_the_file_is_a_typed_error() -> None:
    with pytest.raises(tuf_exc.DownloadError, match="ends at"):
        _mqtt(lambda r, c, a: a, [(len(DATA) - 10, 100)])


def test_mqtt_a_block_for_another_offset_is_ignored() -> None:
    def mangle(req: dict[str, Any], corr: bytes, a: list[bytes]) -> list[bytes]:
        other = block_header(200, req["offset"] + 1, len(DATA)) + b"x" * req["length"]
        return [other, a[0]]

    got, _, _, _ = _mqtt(mangle, MRANGES)
    assert got == _want(MRANGES)


def test_mqtt_offsets_are_unique_per_request() -> None:
    """Each block of a plan has its own offset (the correlation data)."""
    _, _, conn, _ = _mqtt(lambda r, c, a: a, MRANGES)
    offs = [o for o, _ in conn.asked]
    assert len(set(offs)) == len(offs)
    assert all(len(c) == 16 and struct.unpack(">Q", c[8:])[0] == o
               for o, c in conn.corr.items())


def test_mqtt_random_ranges_match() -> None:
    rnd = random.Random(5)
    ranges, pos = [], 0
    while True:
        pos += rnd.randint(0, 9000)
        n = rnd.randint(1, 3 * BS)
        if pos + n > len(DATA):
            break
        ranges.append((pos, n))
        pos += n
    got, spans, conn, _ = _mqtt(lambda r, c, a: a, ranges)
    assert got == _want(ranges)
    _check_spans(spans, ranges)
    assert sum(n for _, n in conn.asked) == sum(n for _, n in ranges)


def test_pace_stays_under_the_bridge_rate_over_every_interval() -> None:
    """40/s in bursts of 20 never exceeds serve-mqtt's 50/s in bursts of 50 (its
    TokenBucket, the same arithmetic), whatever the device's timing."""
    from modelward.publisher._fairness import TokenBucket
    from modelward.updater.transport._mqtt import Pace

    rnd = random.Random(3)
    for _ in range(20):
        now = 100.0
        pace, bridge = Pace(40.0, now), TokenBucket(50.0, 50, now)
        for _ in range(2000):
            now += rnd.choice([0.0, 0.0, 0.001, 0.01, 0.02, 0.3])
            if pace.take(now):
                assert bridge.take(1, now)
            else:
                assert pace.wait() > 0
    assert Pace(0, 0.0).take(0.0) and Pace(0, 0.0).wait() == 0.0


# --- property: any mangling of an honest body -------------------------------------

_HONEST = _nginx(RANGES[:3])


@settings(max_examples=400, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(_HONEST)), st.integers(0, 2),
                                st.binary(min_size=0, max_size=8)), max_size=4),
       cut=st.integers(0, len(_HONEST)), step=st.integers(1, 5000))
def test_any_mangled_body_gives_requested_bytes_or_a_typed_error(
        edits: list[tuple[int, int, bytes]], cut: int, step: int) -> None:
    """Flipped, inserted, deleted bytes and truncation: the reader hands on only bytes
    inside the requested ranges, each at most once and in order, buffers at most a part
    header, and fails with RangeAnswerError and nothing else."""
    body = bytearray(_HONEST)
    for at, kind, data in edits:
        if kind == 0:
            body[at:at] = data
        elif kind == 1:
            del body[at:at + len(data) + 1]
        else:
            body[at:at + len(data)] = data
    body = body[:max(cut, len(body) // 2)]
    r = ByteRangesReader(B, RANGES[:3])
    last_end = -1
    try:
        for i in range(0, len(body), step):
            for off, piece in r.feed(bytes(body[i:i + step])):
                assert any(o <= off and off + len(piece) <= o + n for o, n in RANGES[:3])
                assert off >= last_end  # in order, never twice
                last_end = off + len(piece)
            assert len(r._buf) <= MAX_PART_HEADER + 4 + MAX_PREAMBLE  # noqa: SLF001
        r.finish()
    except RangeAnswerError:
        pass


def test_a_part_after_the_last_range_is_refused_before_its_header_is_read() -> None:
    body = _nginx(RANGES[:1])[:-len(_CLOSE)] + b"\r\n--" + B + b"\r\nX: " + b"x" * 5000
    with pytest.raises(RangeAnswerError, match="beyond the 1 requested"):
        _read(body, RANGES[:1], 64)
