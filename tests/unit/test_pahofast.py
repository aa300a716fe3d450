"""The copy-saving PUBLISH decoder and send queue (``updater.transport._pahofast``) behave
exactly as paho's own: same packets, same errors, the same bytes on the wire."""

from __future__ import annotations

import os
import struct
import tracemalloc
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from modelward.updater.transport import _pahofast

EXAMPLES = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "10000")) // 10,
                    deadline=None, suppress_health_check=[HealthCheck.too_slow])
V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311


@st.composite
def publish_packets(draw: Any) -> tuple[int, bytes, MQTTProtocolVersion]:
    """A PUBLISH as paho receives it: the first header byte and the rest after the
    remaining length."""
    protocol = draw(st.sampled_from([V5, V311]))
    qos = draw(st.integers(0, 2))
    header = 0x30 | (qos << 1) | draw(st.integers(0, 1)) | (draw(st.integers(0, 1)) << 3)
    topic = draw(st.text(max_size=40)).encode()
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", draw(st.integers(1, 0xFFFF)))
    if protocol == V5:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if draw(st.booleans()):
            props.CorrelationData = draw(st.binary(max_size=64))
        if draw(st.booleans()):
            props.ResponseTopic = draw(st.text(min_size=1, max_size=30))
        for k, v in draw(st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)),
                                  max_size=3)):
            props.UserProperty = (k, v)
        body += props.pack()  # type: ignore[no-untyped-call]
    body += draw(st.binary(max_size=3000))
    return header, body, protocol


def _decoded(fn: Any, header: int, body: bytes, protocol: MQTTProtocolVersion) -> object:
    """What a decoder makes of a packet, comparable with ``==`` (or the error type)."""
    try:
        p = fn(header, bytearray(body), protocol)
    except MalformedPacket:
        return MalformedPacket
    props = None if p.properties is None else str(p.properties)
    assert type(p.topic) is bytes and type(p.payload) is bytes
    return p.dup, p.qos, p.retain, p.topic, p.mid, props, p.payload


@EXAMPLES
@given(publish_packets(), st.data())
def test_same_result_as_paho_for_good_torn_and_altered_packets(
        pkt: tuple[int, bytes, MQTTProtocolVersion], data: st.DataObject) -> None:
    header, body, protocol = pkt
    variants = [body, body[:data.draw(st.integers(0, len(body)))]]
    if body:
        i = data.draw(st.integers(0, len(body) - 1))
        variants.append(body[:i] + bytes([data.draw(st.integers(0, 255))]) + body[i + 1:])
    for b in variants:
        assert _decoded(_pahofast.decode_publish, header, b, protocol) == \
            _decoded(_pahofast.stock_decode_publish, header, b, protocol)


@EXAMPLES
@given(st.binary(max_size=300), st.sampled_from([V5, V311]), st.integers(0x30, 0x3F))
def test_same_result_as_paho_for_random_bytes(body: bytes, protocol: MQTTProtocolVersion,
                                              header: int) -> None:
    assert _decoded(_pahofast.decode_publish, header, body, protocol) == \
        _decoded(_pahofast.stock_decode_publish, header, body, protocol)


def _peak_alloc(fn: Any, body: bytearray) -> int:
    tracemalloc.start()
    try:
        fn(0x32, body, V5)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_block_is_copied_once() -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.CorrelationData = b"c" * 16
    topic = b"modelward/f/devices/d/repo/resp"
    body = bytearray(struct.pack("!H", len(topic)) + topic + b"\x00\x01"
                     + props.pack() + os.urandom(1 << 20))  # type: ignore[no-untyped-call]
    ours = _peak_alloc(_pahofast.decode_publish, body)
    assert ours < 1.2 * (1 << 20)  # the payload, once
    assert _peak_alloc(_pahofast.stock_decode_publish, body) > 2 * (1 << 20)  # what it saves


def test_installed_for_the_process() -> None:
    from paho.mqtt import _packet

    import modelward.updater.transport._mqttconn  # noqa: F401 - installs on import

    assert _packet.decode_publish is _pahofast.decode_publish
    assert _pahofast.install()


class _TrickleSocket:
    """Takes at most ``step`` bytes per send, like a full socket buffer."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = step, bytearray()

    def send(self, buf: Any) -> int:
        n = min(self.step, len(buf))
        self.sent += bytes(buf[:n])
        return n

    def close(self) -> None:
        pass


@pytest.mark.parametrize("step", [1, 1000, 1 << 20])
def test_queued_packets_reach_the_socket_whole_through_partial_writes(step: int) -> None:
    c = _pahofast.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sock = _TrickleSocket(step)
    c._sock = sock  # type: ignore[assignment]  # noqa: SLF001
    packets = [bytearray(os.urandom(n)) for n in (3, 5000, 70000)]
    for p in packets:
        c._packet_queue(0x40, p, 0, 0)  # noqa: SLF001
    while c._out_packet:  # noqa: SLF001
        c._packet_write()  # noqa: SLF001
    assert sock.sent == b"".join(packets)


class _Records:
    """A non-blocking TLS socket's reads: each item a record's bytes, or an exception
    (SSLWantReadError: nothing more there yet), or b"" (the end of the stream)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.calls = 0

    def recv_into(self, view: memoryview, n: int) -> int:
        self.calls += 1
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        k = min(n, len(item))
        view[:k] = item[:k]
        if k < len(item):
            self.items.insert(0, item[k:])
        return k


def test_a_large_read_takes_every_record_there_in_one_call() -> None:
    """The rest of a block's PUBLISH: the records already there come in one call (paho
    looped once per 16 KiB record), no more than asked for; then what paho expects of a
    read: BlockingIOError when nothing is there, b"" at the end of the stream (after the
    bytes before it)."""
    import ssl

    want_write: list[int] = []
    recs = [b"a" * 16384, b"b" * 16384, b"c" * 100, ssl.SSLWantReadError()]
    sock = _Records(list(recs))
    got = _pahofast._read_available(sock, bytearray(1 << 20), 1 << 20, lambda: want_write.append(1))  # type: ignore[arg-type]
    assert got == b"a" * 16384 + b"b" * 16384 + b"c" * 100 and sock.calls == 4
    sock = _Records([b"x" * 70000, b"y" * 10])  # no more than asked for: the rest waits
    assert _pahofast._read_available(sock, bytearray(1 << 20), 65536, lambda: None) == b"x" * 65536  # type: ignore[arg-type]
    assert sock.items == [b"x" * (70000 - 65536), b"y" * 10]
    sock = _Records([b"w" * 300])  # no more than the buffer holds
    assert _pahofast._read_available(sock, bytearray(256), 1 << 20, lambda: None) == b"w" * 256  # type: ignore[arg-type]
    with pytest.raises(BlockingIOError):
        _pahofast._read_available(_Records([ssl.SSLWantReadError()]), bytearray(99), 1 << 20,  # type: ignore[arg-type]
                                  lambda: None)
    with pytest.raises(BlockingIOError):
        _pahofast._read_available(_Records([ssl.SSLWantWriteError()]), bytearray(99), 1 << 20,  # type: ignore[arg-type]
                                  lambda: want_write.append(1))
    assert want_write == [1]
    sock = _Records([b"z" * 5, b"", b""])  # closed: its last bytes, then b""
    assert _pahofast._read_available(sock, bytearray(99), 1 << 20, lambda: None) == b"z" * 5  # type: ignore[arg-type]
    assert _pahofast._read_available(sock, bytearray(99), 1 << 20, lambda: None) == b""  # type: ignore[arg-type]
