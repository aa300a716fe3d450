"""A small asyncio MQTT 5 client with hand-written packets, for load generation.

Only what a block fetcher and a trivial block responder need: CONNECT (username,
password, clean start, Maximum Packet Size and Receive Maximum), SUBSCRIBE, PUBLISH at
QoS 0 or 1 with Response Topic and Correlation Data, PUBACK of a QoS 1 delivery,
PINGREQ and DISCONNECT (MQTT 5.0, OASIS standard, sections 3.1-3.14). One connection is a
coroutine-friendly object, not a thread: a thousand of them share one event loop, which
paho's thread per client cannot (``benchmarks/bridge_load.py``).

Not a device transport: it trusts the broker to send well-formed packets within the
size it asked for (anything else ends the connection with :class:`RawMqttError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Publish", "RawMqttError", "RawClient", "encode_publish"]

# Packet types (MQTT 5.0 section 2.1.2).
CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

# Property identifiers (section 2.2.2.2) by the shape of their value.
_PROP_BYTE = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_PROP_U16 = {0x13, 0x21, 0x22, 0x23}
_PROP_U32 = {0x02, 0x11, 0x18, 0x27}
_PROP_VARINT = {0x0B}
_PROP_STR = {0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F}
_PROP_BIN = {0x09, 0x16}
_PROP_PAIR = {0x26}
RESPONSE_TOPIC, CORRELATION_DATA = 0x08, 0x09
MAXIMUM_PACKET_SIZE, RECEIVE_MAXIMUM = 0x27, 0x21
STREAM_LIMIT = 4 << 20  # the reader's buffer before it pauses the socket (bytes)


class RawMqttError(Exception):
    """The broker refused, closed or sent what this client does not take.

    Attributes:
        reason: a short machine-readable cause ("refused", "closed", "malformed", ...).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def varint(n: int) -> bytes:
    """MQTT's Variable Byte Integer (section 1.5.5)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + varint(len(body)) + body


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    n = mult = 0
    for i in range(4):
        if pos + i >= len(buf):
            raise RawMqttError("truncated variable byte integer", "malformed")
        b = buf[pos + i]
        n += (b & 0x7F) << mult
        if not b & 0x80:
            return n, pos + i + 1
        mult += 7
    raise RawMqttError("variable byte integer longer than 4 bytes", "malformed")


def parse_properties(buf: memoryview, pos: int) -> tuple[dict[int, object], int]:
    """The properties at ``pos`` (strings and binary data as bytes, user properties
    dropped) and the position after them."""
    length, pos = _read_varint(buf, pos)
    end = pos + length
    if end > len(buf):
        raise RawMqttError("properties run past the packet", "malformed")
    props: dict[int, object] = {}
    while pos < end:
        ident = buf[pos]
        pos += 1
        if ident in _PROP_BYTE:
            props[ident] = buf[pos]
            pos += 1
        elif ident in _PROP_U16:
            props[ident] = int.from_bytes(buf[pos:pos + 2], "big")
            pos += 2
        elif ident in _PROP_U32:
            props[ident] = int.from_bytes(buf[pos:pos + 4], "big")
            pos += 4
        elif ident in _PROP_VARINT:
            props[ident], pos = _read_varint(buf, pos)
        elif ident in _PROP_STR or ident in _PROP_BIN:
            n = int.from_bytes(buf[pos:pos + 2], "big")
            props[ident] = bytes(buf[pos + 2:pos + 2 + n])
            pos += 2 + n
        elif ident in _PROP_PAIR:
            for _ in range(2):
                pos += 2 + int.from_bytes(buf[pos:pos + 2], "big")
        else:
            raise RawMqttError(f"unknown property 0x{ident:02x}", "malformed")
    if pos != end:
        raise RawMqttError("a property runs past the properties", "malformed")
    return props, end


def encode_publish(topic: str, qos: int = 0, packet_id: int = 0,
                   response_topic: str | None = None, correlation: bytes | None = None,
                   payload_len: int = 0) -> bytes:
    """A PUBLISH packet up to its payload (which the caller writes right after it, so
    that a large payload is not copied into the packet): ``payload_len`` bytes follow."""
    props = b""
    if response_topic is not None:
        props += bytes([RESPONSE_TOPIC]) + _str(response_topic)
    if correlation is not None:
        props += bytes([CORRELATION_DATA]) + _str(correlation)
    head = _str(topic) + (struct.pack(">H", packet_id) if qos else b"") + \
        varint(len(props)) + props
    return bytes([PUBLISH << 4 | qos << 1]) + varint(len(head) + payload_len) + head


@dataclass(frozen=True)
class Publish:
    """A PUBLISH received: its topic, correlation data, response topic and payload."""

    topic: str
    correlation: bytes | None
    response_topic: str | None
    payload: memoryview
    retain: bool


class RawClient:
    """One MQTT 5 connection over an asyncio stream.

    ``on_publish`` is called in the event loop for every PUBLISH received (QoS 1 ones are
    acknowledged first). Use :meth:`open`, then :meth:`subscribe`, :meth:`publish`, and
    :meth:`close`; :attr:`closed` is set once the connection has ended, with the cause in
    :attr:`error`.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_publish: Callable[[Publish], None], max_packet: int) -> None:
        self._reader, self._writer = reader, writer
        self.on_publish = on_publish
        self.max_packet = max_packet
        self.closed = asyncio.Event()
        self.error: RawMqttError | None = None
        self._next_id = 0
        self._subacks: dict[int, asyncio.Future[bytes]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ping: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, host: str, port: int, tls: ssl.SSLContext | None, client_id: str,
                   username: str, password: str, on_publish: Callable[[Publish], None],
                   keepalive: int = 60, max_packet: int = (1 << 20) + 4096,
                   receive_maximum: int = 64, timeout: float = 10.0) -> RawClient:
        """Connect, send CONNECT (clean start) and wait for a successful CONNACK.

        Raises:
            RawMqttError: no connection, refused, or no CONNACK within ``timeout``.
        """
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                host, port, ssl=tls, limit=STREAM_LIMIT), timeout)
        except (OSError, ssl.SSLError, TimeoutError) as e:
            raise RawMqttError(f"cannot connect to {host}:{port}: {e!r}", "connect") from e
        self = cls(reader, writer, on_publish, max_packet)
        props = bytes([MAXIMUM_PACKET_SIZE]) + struct.pack(">I", max_packet) + \
            bytes([RECEIVE_MAXIMUM]) + struct.pack(">H", receive_maximum)
        body = _str("MQTT") + bytes([5, 0xC2]) + struct.pack(">H", keepalive) + \
            varint(len(props)) + props + _str(client_id) + _str(username) + _str(password)
        writer.write(_packet(CONNECT, 0, body))
        try:
            kind, _flags, pkt = await asyncio.wait_for(self._read_packet(), timeout)
        except TimeoutError as e:
            self._abort()
            raise RawMqttError(f"no CONNACK for {client_id} in {timeout} s", "connack") from e
        except (RawMqttError, OSError, ssl.SSLError) as e:
            self._abort()
            raise RawMqttError(f"no CONNACK for {client_id}: {e!r}", "connack") from e
        if kind != CONNACK or len(pkt) < 2 or pkt[1] != 0:
            self._abort()
            code = pkt[1] if kind == CONNACK and len(pkt) > 1 else None
            raise RawMqttError(f"broker refused {username!r} as {client_id!r} "
                               f"(reason {code})", "refused")
        self._task = asyncio.create_task(self._read_loop())
        self._ping = asyncio.create_task(self._pinger(keepalive))
        return self

    def _abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.transport.abort()

    async def _read_packet(self) -> tuple[int, int, memoryview]:
        first = await self._reader.readexactly(1)
        n = mult = 0
        for _ in range(4):
            b = (await self._reader.readexactly(1))[0]
            n += (b & 0x7F) << mult
            if not b & 0x80:
                break
            mult += 7
        else:
            raise RawMqttError("remaining length longer than 4 bytes", "malformed")
        if n + 5 > self.max_packet:
            raise RawMqttError(f"a packet of {n} bytes (asked for at most "
                               f"{self.max_packet})", "oversized")
        body = await self._reader.readexactly(n) if n else b""
        return first[0] >> 4, first[0] & 0x0F, memoryview(body)

    async def _read_loop(self) -> None:
        try:
            while True:
                kind, flags, pkt = await self._read_packet()
                if kind == PUBLISH:
                    self._on_publish(flags, pkt)
                elif kind == SUBACK:
                    pid = int.from_bytes(pkt[:2], "big")
                    fut = self._subacks.pop(pid, None)
                    if fut is not None and not fut.done():
                        _props, pos = parse_properties(pkt, 2)
                        fut.set_result(bytes(pkt[pos:]))
                elif kind == DISCONNECT:
                    code = pkt[0] if len(pkt) else 0
                    raise RawMqttError(f"the broker disconnected us (reason {code})",
                                       "disconnected")
                # PUBACK, PINGRESP: nothing to do
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError) as e:
            self.error = RawMqttError(f"connection lost: {e!r}", "closed")
        except RawMqttError as e:
            self.error = e
        except asyncio.CancelledError:
            pass
        finally:
            for fut in self._subacks.values():
                if not fut.done():
                    fut.set_exception(self.error or RawMqttError("closed", "closed"))
            self.closed.set()
            self._abort()

    def _on_publish(self, flags: int, pkt: memoryview) -> None:
        qos = (flags >> 1) & 3
        n = int.from_bytes(pkt[:2], "big")
        topic = bytes(pkt[2:2 + n]).decode()
        pos = 2 + n
        if qos:
            pid = pkt[pos:pos + 2]
            pos += 2
            self._writer.write(_packet(PUBACK, 0, bytes(pid)))
        props, pos = parse_properties(pkt, pos)
        corr, resp = props.get(CORRELATION_DATA), props.get(RESPONSE_TOPIC)
        self.on_publish(Publish(topic, corr if isinstance(corr, bytes) else None,
                                resp.decode() if isinstance(resp, bytes) else None,
                                pkt[pos:], bool(flags & 1)))

    async def _pinger(self, keepalive: int) -> None:
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
            while True:
                await asyncio.sleep(keepalive / 2)
                self._writer.write(_packet(PINGREQ, 0, b""))

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    async def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe to ``topic`` and wait for its SUBACK.

        Raises:
            RawMqttError: refused (a reason code of 0x80 or more), lost, or no SUBACK.
        """
        pid = self._packet_id()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._subacks[pid] = fut
        self._writer.write(_packet(SUBSCRIBE, 2, struct.pack(">H", pid) + b"\x00" +
                                   _str(topic) + bytes([qos])))
        try:
            codes = await asyncio.wait_for(fut, timeout)
        except TimeoutError as e:
            raise RawMqttError(f"no SUBACK for {topic}", "suback") from e
        if not codes or codes[0] >= 0x80:
            raise RawMqttError(f"broker refused the subscription to {topic}: {codes!r}",
                               "refused")

    def publish(self, topic: str, payload: bytes | memoryview, qos: int = 0,
                response_topic: str | None = None, correlation: bytes | None = None,
                header: bytes = b"") -> None:
        """Queue a PUBLISH of ``header + payload`` (written without joining them); its
        PUBACK (QoS 1) is not waited for."""
        pid = self._packet_id() if qos else 0
        self._writer.writelines([
            encode_publish(topic, qos, pid, response_topic, correlation,
                           len(header) + len(payload)), header, payload])

    async def drain(self) -> None:
        """Wait until the write buffer is below its high-water mark."""
        await self._writer.drain()

    async def close(self) -> None:
        """Send DISCONNECT and close."""
        if self._ping is not None:
            self._ping.cancel()
        if not self.closed.is_set():
            with contextlib.suppress(Exception):
                self._writer.write(_packet(DISCONNECT, 0, b""))
                await asyncio.wait_for(self._writer.drain(), 2)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 2)
