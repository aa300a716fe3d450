"""Fewer copies of each MQTT block inside paho-mqtt 2.x (same results, less CPU).

A model arrives over MQTT in 1 MiB PUBLISH packets, and paho copied each one about seven
times before handing it over: ``decode_publish`` splits the packet with
``struct.unpack("!H{n}s")`` three times and slices it once more, and
``Properties.unpack`` slices the rest of the packet again for every property it reads.
On the benchmark machine those copies were more CPU than decrypting the block. On the
sending side (the bridge), paho sliced the unsent rest of each queued packet on every
socket write.

Here:

- :func:`decode_publish` replaces ``paho.mqtt._packet.decode_publish`` for the whole
  process: it returns the same ``PublishPacket`` (topic and payload as ``bytes``, the
  same properties, the same ``MalformedPacket`` for bad input; a property test checks
  both against each other) but copies the payload once;
- :class:`Client` queues outgoing packets as a ``memoryview``, so a partial write
  slices without copying.

- :func:`check_properties` bounds a PUBLISH's MQTT 5 properties (count and bytes) in one
  linear pass before paho's ``Properties.unpack`` sees them: that copies the rest of the
  block for each property it reads, so one 375 KiB packet of 75,000 empty user properties
  held the receiver's network thread ~6 s (issue 14). :func:`decode_publish` refuses such
  a packet (``PropertiesTooLarge``), and :class:`Client` acknowledges and drops it before
  decoding, so one hostile PUBLISH (a request to the bridge, a retained status for
  ``fleet status``) costs microseconds and leaves the connection up.

Both touch paho internals, hence the pin ``paho-mqtt>=2.0,<3``; :func:`install` leaves
paho as it is when the internals are not the expected ones.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

logger = logging.getLogger(__name__)

# Properties.unpack may read one value past the declared properties length (a string or
# binary value states its own 2-byte length); it is handed that much more, so that it
# sees exactly what it saw in the whole packet.
_PROPERTY_OVERREAD = 4 + 2 + 0xFFFF

# What modelward's PUBLISHes carry: CorrelationData (<= 64 bytes), ResponseTopic (a topic
# of two <= 64-character ids), at most three UserProperty pairs (a format-1 block answer:
# status, offset, size), and what a broker adds (MessageExpiryInterval, a
# SubscriptionIdentifier or two). Far inside these bounds; anything beyond is hostile.
MAX_PROPERTY_BYTES = 4096
MAX_PROPERTIES = 16
MAX_USER_PROPERTIES = 8

# MQTT 5 property identifiers by value type (MQTT 5, 2.2.2.2).
_FIXED = {**dict.fromkeys((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A), 1),
          **dict.fromkeys((0x13, 0x21, 0x22, 0x23), 2),
          **dict.fromkeys((0x02, 0x11, 0x18, 0x27), 4)}
_VARINT = frozenset({0x0B})
_COUNTED = frozenset({0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F})  # one length
_PAIR = 0x26


class PropertiesTooLarge(MalformedPacket):
    """A PUBLISH whose MQTT 5 property block is larger, or has more properties or user
    properties, than :data:`MAX_PROPERTY_BYTES` / :data:`MAX_PROPERTIES` /
    :data:`MAX_USER_PROPERTIES` allow (or is cut short or unknown within them)."""


class _Unparsable(Exception):
    """The property block is malformed: paho's own decoding is left to refuse it."""


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    """A variable byte integer at ``pos``: (value, position after it)."""
    value = 0
    for i in range(4):
        if pos + i >= len(view):
            raise _Unparsable
        b = view[pos + i]
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            return value, pos + i + 1
    raise _Unparsable


def check_properties(view: memoryview, pos: int) -> int:
    """Check the property block of a PUBLISH that starts at ``pos`` of ``view`` (the
    packet after its fixed header): its size and, walking it once, the number of
    properties and user properties. Returns the position after the block.

    A block that is cut short, runs a value past its end or has an unknown identifier is
    left to paho (the walk stops there): paho decides what it makes of it, as it always
    did, and the size bound keeps its walk short.

    Raises:
        PropertiesTooLarge: over a bound.
    """
    try:
        length, start = _varint(view, pos)
    except _Unparsable:
        return pos
    if length > MAX_PROPERTY_BYTES:
        raise PropertiesTooLarge(f"PUBLISH property block of {length} bytes, more than "
                                 f"the {MAX_PROPERTY_BYTES} accepted")
    end = start + length
    p, count, users = start, 0, 0
    try:
        while p < min(end, len(view)):
            ident = view[p]
            p += 1
            count += 1
            if ident & 0x80:  # paho reads identifiers as variable byte integers: a
                # non-minimal one (A6 00 is a user property) would pass this walk uncounted
                raise PropertiesTooLarge("PUBLISH property identifier in a multi-byte "
                                         "encoding (every MQTT 5 identifier fits one byte)")
            if count > MAX_PROPERTIES:
                raise PropertiesTooLarge(f"PUBLISH with more than {MAX_PROPERTIES} properties")
            if ident in _FIXED:
                p += _FIXED[ident]
            elif ident in _VARINT:
                _, p = _varint(view, p)
            elif ident in _COUNTED or ident == _PAIR:
                for _ in range(2 if ident == _PAIR else 1):
                    if p + 2 > len(view):
                        raise _Unparsable
                    p += 2 + ((view[p] << 8) | view[p + 1])
                if ident == _PAIR:
                    users += 1
                    if users > MAX_USER_PROPERTIES:
                        raise PropertiesTooLarge(
                            f"PUBLISH with more than {MAX_USER_PROPERTIES} user properties")
            else:
                raise _Unparsable
    except _Unparsable:
        pass
    return end


def _properties_start(view: memoryview, header: int) -> int:
    """Where a PUBLISH's property block starts (after topic and packet id)."""
    if len(view) < 2:
        raise MalformedPacket("PUBLISH shorter than its topic length")
    pos = 2 + ((view[0] << 8) | view[1])
    if (header & 0x06) >> 1 > 0:
        pos += 2
    if pos > len(view):
        raise MalformedPacket("PUBLISH shorter than its topic and packet id")
    return pos


def _decode_publish(header: int, packet: bytes | bytearray,
                    protocol: MQTTProtocolVersion) -> _packet.PublishPacket:
    dup = ((header & 0x08) >> 3) != 0
    qos = (header & 0x06) >> 1
    retain = (header & 0x01) != 0
    with memoryview(packet) as view:
        if len(view) < 2:
            raise MalformedPacket("PUBLISH shorter than its topic length")
        pos = 2 + ((view[0] << 8) | view[1])
        if pos > len(view):
            raise MalformedPacket("PUBLISH shorter than its topic")
        topic = bytes(view[2:pos])
        if protocol != MQTTProtocolVersion.MQTTv5 and len(topic) == 0:
            raise MalformedPacket("topic can't be empty in MQTTv3")
        mid = 0
        if qos > 0:
            if pos + 2 > len(view):
                raise MalformedPacket("PUBLISH shorter than its packet id")
            mid = (view[pos] << 8) | view[pos + 1]
            pos += 2
        properties = None
        if protocol == MQTTProtocolVersion.MQTTv5:
            check_properties(view, pos)  # linear, before paho's quadratic walk
            length, width = VariableByteIntegers.decode(  # type: ignore[no-untyped-call]
                bytes(view[pos:pos + 4]))
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            _, used = properties.unpack(  # type: ignore[no-untyped-call]
                bytes(view[pos:pos + width + length + _PROPERTY_OVERREAD]))
            pos += used
        payload = bytes(view[pos:])
    return _packet.PublishPacket(dup=dup, qos=qos, retain=retain, topic=topic, mid=mid,
                                 properties=properties, payload=payload)


# paho's own decoder, and ours wrapped in paho's error conversion (struct, index and
# value errors become MalformedPacket); None where paho's internals are not the expected.
stock_decode_publish = getattr(_packet, "decode_publish", None)
_convert = getattr(_packet, "convert_exception", None)
decode_publish = _convert(_decode_publish) if _convert is not None else None


class PacketTooLarge(OSError):
    """The broker sent a packet larger than the Maximum Packet Size asked for on CONNECT,
    or a control packet (anything but PUBLISH) larger than :data:`MAX_CONTROL_PACKET`."""


# The largest packet other than a PUBLISH this client accepts (fixed header included).
# modelward subscribes to one or two topics at a time, so a SUBACK carries a reason code or
# two; CONNACK, PUBACK and DISCONNECT carry a reason string at most. paho builds one heavy
# object per SUBACK reason-code byte (~2.4 KiB each: a 64 KiB SUBACK cost 150 MiB), so a
# larger control packet ends the connection before its body is read.
MAX_CONTROL_PACKET = 1024


class Client(mqtt.Client):
    """paho's client, with outgoing packets queued as memoryviews (no copy per write), and
    incoming packets bounded.

    Attributes:
        max_incoming_packet: the largest packet (fixed header included) this client
            accepts, 0 for no bound; set it to the Maximum Packet Size sent on CONNECT.
            A broker must not send more (MQTT 5, 3.1.2.11.4; mosquitto drops such a
            message for this client); a packet that says it is larger ends the
            connection once its length is read, before a byte of its body is buffered
            (paho itself would collect any length up to 256 MiB). Any other packet is
            bounded by :data:`MAX_CONTROL_PACKET` as well.

    A QoS 2 PUBLISH ends the connection too: nothing here subscribes above QoS 1, and paho
    would hold every one until its PUBREL.
    """

    max_incoming_packet: int = 0
    _batch: bytearray | None = None  # what large reads are read into (_read_available)
    # Called with the topic and retain flag of every PUBLISH before it is decoded; False
    # drops it there (acknowledged at QoS 1), so that a message its receiver would drop
    # anyway (the bridge: a device over its request rate) costs no properties, message
    # object or callback. An exception it raises keeps the message (and is logged).
    publish_filter: Callable[[bytes, bool], bool] | None = None
    # The most packets one turn of the network loop reads while more are there (paho
    # reads one a turn unless QoS 1 messages are in flight: a select() and a write pass
    # per packet, too slow for a subscriber of many small messages, the bridge's requests).
    read_packets: int = 1

    def _handle_publish(self) -> Any:
        # modelward subscribes at QoS 1 only, so a QoS 2 PUBLISH breaks the protocol; paho
        # would keep each one in memory until a PUBREL that a hostile broker never sends.
        pkt = getattr(self, "_in_packet", None)
        if isinstance(pkt, dict) and (int(pkt.get("command", 0)) & 0x06) >> 1 == 2:
            logger.warning("the broker sent a QoS 2 message, above every subscription's "
                           "QoS 1: disconnecting")
            return mqtt.MQTT_ERR_PROTOCOL
        if not isinstance(pkt, dict):
            return super()._handle_publish()
        header = int(pkt.get("command", 0))
        with memoryview(pkt.get("packet", b"")) as view:
            # the filter first (a topic is read in the same bounds paho reads it in): a
            # message dropped costs no walk of its properties either
            end = 2 + ((view[0] << 8) | view[1]) if len(view) >= 2 else 0
            if self.publish_filter is not None and 2 <= end <= len(view) and \
                    not self._keep(bytes(view[2:end]), bool(header & 0x01)):
                return self._ack_dropped(header, view)
            if self._protocol == mqtt.MQTTv5:
                try:
                    start = _properties_start(view, header)
                except MalformedPacket:  # paho's own decoding refuses it as it would
                    start = -1
                if start >= 0:
                    try:
                        check_properties(view, start)
                    except PropertiesTooLarge as e:
                        return self._drop_publish(header, view, e)
        return super()._handle_publish()

    def _keep(self, topic: bytes, retain: bool) -> bool:
        """:attr:`publish_filter`'s verdict; True when it raised."""
        assert self.publish_filter is not None
        try:
            return bool(self.publish_filter(topic, retain))
        except Exception as e:  # noqa: BLE001 - the network thread must live on
            logger.error("the PUBLISH filter failed: %s: %s", type(e).__name__, str(e)[:200])
            return True

    def loop_read(self, max_packets: int = 1) -> Any:
        """paho's ``loop_read``, reading up to :attr:`read_packets` packets while there
        are more (paho's own reads one, or as many as QoS 1 messages are in flight)."""
        if self.read_packets <= 1:
            return super().loop_read(max_packets)
        if self._sock is None:
            return mqtt.MQTT_ERR_NO_CONN
        for _ in range(max(self.read_packets, len(self._out_messages) + len(
                self._in_messages))):
            if self._sock is None:
                return mqtt.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == mqtt.MQTT_ERR_AGAIN:
                break
        return mqtt.MQTT_ERR_SUCCESS

    _last_drop_log = 0.0

    def _drop_publish(self, header: int, view: memoryview, why: MalformedPacket) -> Any:
        """Acknowledge (QoS 1) and drop a PUBLISH refused before decoding: the broker
        does not send it again, nothing reads it, and the connection stays up (a retained
        one would otherwise end every new connection's first subscription)."""
        now = time.monotonic()
        if now - self._last_drop_log > 10.0:  # a flood of them: one line per 10 s
            self._last_drop_log = now
            logger.warning("dropping a PUBLISH from the broker: %s", why)
        return self._ack_dropped(header, view)

    def _ack_dropped(self, header: int, view: memoryview) -> Any:
        """Acknowledge a dropped PUBLISH at QoS 1 (nothing to do at QoS 0)."""
        if (header & 0x06) >> 1 == 1 and len(view) >= 2:
            pos = 2 + ((view[0] << 8) | view[1])
            if pos + 2 <= len(view):
                return self._send_puback((view[pos] << 8) | view[pos + 1])
        return mqtt.MQTT_ERR_SUCCESS

    def _sock_recv(self, bufsize: int) -> bytes:
        limit = self.max_incoming_packet
        pkt = getattr(self, "_in_packet", None)
        if limit and isinstance(pkt, dict) and pkt.get("have_remaining"):
            size = 1 + len(pkt.get("remaining_count", ())) + int(pkt.get("remaining_length", 0))
            if (int(pkt.get("command", 0)) & 0xF0) != PacketTypes.PUBLISH << 4:
                limit = min(limit, MAX_CONTROL_PACKET)
            if size > limit:
                logger.warning("the broker sent a packet of %d bytes, more than the %d this "
                               "client accepts: disconnecting", size, limit)
                raise PacketTooLarge(f"packet of {size} bytes > maximum {limit}")
        sock = getattr(self, "_sock", None)
        if bufsize < BATCH_READ or not isinstance(sock, ssl.SSLSocket) or \
                sock.gettimeout() != 0.0:
            return super()._sock_recv(bufsize)
        if self._batch is None:
            self._batch = bytearray(BATCH_BUFFER)
        # (a view: paho only measures it and appends it to the packet)
        return _read_available(  # type: ignore[return-value]
            sock, self._batch, bufsize, self._call_socket_register_write)

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: Any = None) -> Any:
        return super()._packet_queue(command, memoryview(packet), mid, qos,  # type: ignore[arg-type]
                                     info)


# A read of at least this much (the rest of a block's PUBLISH) takes every TLS record
# already there in one call (:func:`_read_available`): paho's loop around each 16 KiB
# record (two Python calls, a lock, a clock read, a bytearray append) ran 64 times a block.
BATCH_READ = 64 * 1024
BATCH_BUFFER = 256 * 1024  # the most one such call reads (a buffer kept per client)


def _read_available(sock: ssl.SSLSocket, buf: bytearray, bufsize: int,
                    want_write: Callable[[], object]) -> bytes | memoryview:
    """Up to ``bufsize`` bytes (and ``len(buf)``) of what the non-blocking ``sock`` has
    now, record after record, read into ``buf``: a view of them, valid until the next
    call (paho appends it to its packet at once). As paho's ``_sock_recv``: ``b""`` at the
    end of the stream, ``BlockingIOError`` when nothing is there yet."""
    size = min(bufsize, len(buf))
    got = 0
    view = memoryview(buf)
    while got < size:
        try:
            n = sock.recv_into(view[got:size], size - got)
        except ssl.SSLWantReadError as e:
            if got:
                break
            raise BlockingIOError from e
        except ssl.SSLWantWriteError as e:  # (a renegotiation): as paho does
            if got:
                break
            want_write()
            raise BlockingIOError from e
        if n == 0:  # the end of the stream: what came before it, then b"" next time
            break
        got += n
    return view[:got] if got else b""


def install() -> bool:
    """Use :func:`decode_publish` in paho; True when it is in place."""
    if decode_publish is None or stock_decode_publish is None or getattr(
            _packet, "PublishPacket", None) is None:
        logger.debug("paho internals differ; leaving its PUBLISH decoding as it is")
        return False
    _packet.decode_publish = decode_publish
    return True
