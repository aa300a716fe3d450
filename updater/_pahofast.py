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

Both touch paho internals, hence the pin ``paho-mqtt>=2.0,<3``; :func:`install` leaves
paho as it is when the internals are not the expected ones.
"""

from __future__ import annotations

import logging
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

    def _handle_publish(self) -> Any:
        # modelward subscribes at QoS 1 only, so a QoS 2 PUBLISH breaks the protocol; paho
        # would keep each one in memory until a PUBREL that a hostile broker never sends.
        pkt = getattr(self, "_in_packet", None)
        if isinstance(pkt, dict) and (int(pkt.get("command", 0)) & 0x06) >> 1 == 2:
            logger.warning("the broker sent a QoS 2 message, above every subscription's "
                           "QoS 1: disconnecting")
            return mqtt.MQTT_ERR_PROTOCOL
        return super()._handle_publish()

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
        return super()._sock_recv(bufsize)

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: Any = None) -> Any:
        return super()._packet_queue(command, memoryview(packet), mid, qos,  # type: ignore[arg-type]
                                     info)


def install() -> bool:
    """Use :func:`decode_publish` in paho; True when it is in place."""
    if decode_publish is None or stock_decode_publish is None or getattr(
            _packet, "PublishPacket", None) is None:
        logger.debug("paho internals differ; leaving its PUBLISH decoding as it is")
        return False
    _packet.decode_publish = decode_publish
    return True
