"""Issue 14, must-show 7 (unit side): what one device can make a paho receiver parse, the
bridges' shared-subscription group, retained requests, and the broker's count bounds.

Real-stack counterparts: tests/integration/test_a14_device_props.py (a request / retained
status full of user properties), test_a14_device_bridge.py and test_a14_device_broker.py
(the share group, a retained request, property-only packets for a parked session).
"""

from __future__ import annotations

import contextlib
import struct
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from modelward.publisher._bridge import ANSWER_QOS, Bridge, share_group
from modelward.publisher._broker_config import (
    BROKER_SETTINGS,
    MAX_QUEUED_MESSAGES,
    STATUS_BATCH,
    WINDOW,
    roles,
    write_broker_config,
)
from modelward.publisher.errors import OperatorInputError
from modelward.updater._config import MqttConfig
from modelward.updater.transport import _pahofast
from modelward.updater.transport._pahofast import (
    MAX_PROPERTIES,
    MAX_PROPERTY_BYTES,
    MAX_USER_PROPERTIES,
    PropertiesTooLarge,
    check_properties,
)
from tests._helpers import mqtt_varint

V5 = MQTTProtocolVersion.MQTTv5
TOPIC = b"modelward/f/repo/req/dev-1"


def _publish(props: bytes, qos: int = 1, payload: bytes = b"{}") -> bytes:
    """A PUBLISH after its fixed header, with a raw property block."""
    return (struct.pack("!H", len(TOPIC)) + TOPIC + (b"\x00\x07" if qos else b"")
            + mqtt_varint(len(props)) + props + payload)


def _honest_props() -> bytes:
    """The properties of a format-1 block answer, at their largest, plus what a broker
    adds."""
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    p.CorrelationData = b"c" * 64
    p.ResponseTopic = "modelward/" + "f" * 64 + "/devices/" + "d" * 64 + "/repo/resp"
    p.MessageExpiryInterval = 60
    p.SubscriptionIdentifier = 3
    for k in ("status", "offset", "size"):
        p.UserProperty = (k, "1234567890")
    packed: bytes = p.pack()  # type: ignore[no-untyped-call]
    return packed  # with its length


def _decode(body: bytes) -> Any:
    assert _pahofast.decode_publish is not None
    return _pahofast.decode_publish(0x32, bytearray(body), V5)


def test_what_modelward_sends_is_inside_the_bounds_and_decodes_as_paho() -> None:
    body = struct.pack("!H", len(TOPIC)) + TOPIC + b"\x00\x07" + _honest_props() + b"{}"
    ours = _decode(body)
    assert _pahofast.stock_decode_publish is not None
    stock = _pahofast.stock_decode_publish(0x32, bytearray(body), V5)
    assert str(ours.properties) == str(stock.properties) and ours.payload == b"{}"
    assert ours.properties.CorrelationData == b"c" * 64


@pytest.mark.parametrize(("props", "why"), [
    (b"\x26\x00\x00\x00\x00" * 75_000, "property block of 375000 bytes"),
    (b"\x26\x00\x00\x00\x00" * (MAX_USER_PROPERTIES + 1), "user properties"),
    (b"\x01\x00" * (MAX_PROPERTIES + 1), f"more than {MAX_PROPERTIES} properties"),
    (b"\x09" + struct.pack("!H", MAX_PROPERTY_BYTES - 2) + b"a" * (MAX_PROPERTY_BYTES - 2),
     f"property block of {MAX_PROPERTY_BYTES + 1} bytes"),
    # review finding: A6 00 is a user property to paho (identifiers are variable byte
    # integers); uncounted, ~680 of them fit the byte bound
    (b"\xa6\x00\x00\x00\x00\x00" * 600, "multi-byte encoding"),
])
@pytest.mark.xdist_group("machine")
def test_hostile_property_blocks_are_refused_in_linear_time(props: bytes, why: str) -> None:
    body = _publish(props)
    t = time.perf_counter()
    with pytest.raises(PropertiesTooLarge, match=why):
        _decode(body)
    assert time.perf_counter() - t < 0.05  # stock paho: ~6-18 s for the first one
    with memoryview(body) as view, pytest.raises(PropertiesTooLarge):
        check_properties(view, 2 + len(TOPIC) + 2)


@pytest.mark.parametrize("props", [
    b"\x7f\x00", b"\x09\x00\x09abc", b"\x26\x00\x01a", b"\x0b\x80\x80\x80\x80\x01",
    b"\x0b\x80\x80", b"\x26\x00\x00\x00\x00" * 5 + b"\x7f" + b"\x26\x00\x00\x00\x00" * 9,
])
@pytest.mark.xdist_group("machine")
def test_a_malformed_block_inside_the_bounds_is_left_to_paho(props: bytes) -> None:
    """paho decides (as it always did) and its walk stays short: the block is small."""
    body = _publish(props)
    with memoryview(body) as view:
        assert check_properties(view, 2 + len(TOPIC) + 2) == 2 + len(TOPIC) + 2 + 1 + len(
            props)
    assert _pahofast.stock_decode_publish is not None
    for fn in (_pahofast.decode_publish, _pahofast.stock_decode_publish):
        t = time.perf_counter()
        with contextlib.suppress(MalformedPacket):
            fn(0x32, bytearray(body), V5)
        assert time.perf_counter() - t < 0.05


def test_the_bounds_themselves_are_accepted() -> None:
    users = b"\x26\x00\x00\x00\x00" * MAX_USER_PROPERTIES
    fixed = (b"\x01\x00" + b"\x02\x00\x00\x00\x3c" + b"\x23\x00\x01" + b"\x08\x00\x01t"
             + b"\x09\x00\x01c" + b"\x03\x00\x01j" + b"\x0b\x01" + b"\x0b\x02")
    assert MAX_PROPERTIES == MAX_USER_PROPERTIES + 8  # the 8 in fixed
    assert _decode(_publish(users + fixed)).payload == b"{}"
    big = b"\x09" + struct.pack("!H", MAX_PROPERTY_BYTES - 3) + b"x" * (MAX_PROPERTY_BYTES - 3)
    assert _decode(_publish(big)).properties.CorrelationData == b"x" * (MAX_PROPERTY_BYTES - 3)


class _Sent:
    def __init__(self) -> None:
        self.pubacks: list[int] = []
        self.messages: list[Any] = []


def _client_receiving(body: bytes, qos: int) -> tuple[_pahofast.Client, _Sent, Any]:
    c = _pahofast.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sent = _Sent()
    c._send_puback = lambda mid: sent.pubacks.append(mid) or mqtt.MQTT_ERR_SUCCESS  # type: ignore[method-assign]
    c.on_message = lambda _c, _u, m: sent.messages.append(m)
    c._in_packet["command"] = 0x30 | (qos << 1)  # type: ignore[attr-defined]
    c._in_packet["packet"] = bytearray(body)  # type: ignore[attr-defined]
    return c, sent, c._handle_publish()


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.xdist_group("machine")
def test_the_client_acknowledges_and_drops_a_heavy_publish_and_stays_connected(
        qos: int) -> None:
    body = _publish(b"\x26\x00\x00\x00\x00" * 75_000, qos=qos)
    t = time.perf_counter()
    _c, sent, rc = _client_receiving(body, qos)
    assert time.perf_counter() - t < 0.05
    assert rc == mqtt.MQTT_ERR_SUCCESS  # not a protocol error: the connection stays
    assert sent.messages == []  # nothing reads it
    assert sent.pubacks == ([7] if qos else [])  # the broker does not send it again


def test_the_client_still_delivers_an_honest_publish() -> None:
    body = struct.pack("!H", len(TOPIC)) + TOPIC + b"\x00\x07" + _honest_props() + b"{}"
    _c, sent, rc = _client_receiving(body, 1)
    assert rc == mqtt.MQTT_ERR_SUCCESS and sent.pubacks == [7]
    assert [m.payload for m in sent.messages] == [b"{}"]


# --- the bridges' shared-subscription group ----------------------------------------


def _cfg(password: str | None = "pw-of-the-bridge",  # noqa: S107 - a test value
         key_file: str | None = None) -> MqttConfig:
    return MqttConfig(host="h", port=1, fleet="f", client_name="modelward-bridge",
                      password=password, key_file=key_file)


def test_the_share_group_is_a_secret_derived_from_the_bridge_credential(
        tmp_path: Path) -> None:
    g = share_group(_cfg())
    assert g == share_group(_cfg())  # every bridge with that credential: one group
    assert g != share_group(_cfg("another password")) and "pw-of" not in g
    assert g.startswith("modelward-bridges-") and len(g) == len("modelward-bridges-") + 32
    key = tmp_path / "bridge.key"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nabc\n")
    assert share_group(_cfg(None, str(key))) not in (g, "modelward-bridges")


@pytest.mark.parametrize("group", ["modelward-bridges", "short", "a/b+#-0123456789abcdef"])
def test_a_guessable_or_unsafe_group_is_refused(group: str) -> None:
    with pytest.raises(OperatorInputError, match="group"):
        share_group(_cfg(), group)


def test_no_credential_no_group() -> None:
    with pytest.raises(OperatorInputError, match="--group"):
        share_group(_cfg(None))
    with pytest.raises(OperatorInputError, match="bridge key"):
        share_group(_cfg(None, "/nonexistent/key"))
    assert share_group(_cfg(None), "x" * 20) == "x" * 20


# --- retained requests -----------------------------------------------------------


def _repo(tmp_path: Path) -> Path:
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "1.root.json").write_bytes(b"{}")
    return tmp_path


def test_the_bridge_ignores_a_retained_request(tmp_path: Path) -> None:
    b = Bridge(_repo(tmp_path), _cfg(), connect=False)
    try:
        for retain in (True, False):
            m = mqtt.MQTTMessage(topic=b"modelward/f/repo/req/dev-1")
            m.retain = retain
            m.payload = b'{"path": "metadata/1.root.json", "offset": 0, "length": 2}'
            m.properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            m.properties.CorrelationData = b"c"
            b._on_message(m)
        assert b.stats.requests == 1  # only the live one was parsed
    finally:
        b.close()


# --- broker settings and ACL -----------------------------------------------------


def test_queued_messages_hold_a_window_not_thousands() -> None:
    assert WINDOW < MAX_QUEUED_MESSAGES <= WINDOW + 8  # one window of QoS 0 answers + a few
    assert f"max_queued_messages {MAX_QUEUED_MESSAGES}\n" in BROKER_SETTINGS
    # a batch of fleet status's topics (and its SUBACK, UNSUBACK) fits the count
    assert STATUS_BATCH + 2 <= MAX_QUEUED_MESSAGES


def test_no_qos0_message_is_queued_for_an_offline_session() -> None:
    """The bridge answers at QoS 0 so that a resumed session is re-sent nothing: only
    while mosquitto queues no QoS 0 message for it (a10-dynsec resend)."""
    assert ANSWER_QOS == 0
    assert "queue_qos0_messages false\n" in BROKER_SETTINGS
    assert "queue_qos0_messages true" not in BROKER_SETTINGS


def test_a_device_reads_no_topic_it_writes() -> None:
    for role in roles("f", ["d"])[2:]:  # the device's listener and fetcher roles
        acls = role["acls"]
        assert isinstance(acls, list)
        reads = {a["topic"] for a in acls if a["acltype"] != "publishClientSend"}
        writes = {a["topic"] for a in acls if a["acltype"] == "publishClientSend"}
        assert reads and writes and not reads & writes, role


def test_the_queue_bound_does_not_grow_with_the_fleet(tmp_path: Path) -> None:
    write_broker_config("f", [f"d{i}" for i in range(200)], tmp_path)
    text = (tmp_path / "modelward.conf").read_text()
    assert f"max_queued_messages {MAX_QUEUED_MESSAGES}\n" in text and "4096" not in text
    assert "queue_qos0_messages false\n" in text


def test_a_qos0_answer_counts_until_paho_has_written_it() -> None:
    """At QoS 0 no PUBACK comes: the send queue releases an answer when paho has written
    it to the socket (or dropped it: not connected, connection lost), never before."""
    from modelward.publisher._bridge import _published

    queued = mqtt.MQTTMessageInfo(1)
    queued.rc = mqtt.MQTT_ERR_SUCCESS
    assert not _published(queued)  # still in paho's out queue: counted
    queued._set_as_published()  # what paho does once the packet is written
    assert _published(queued)
    never = mqtt.MQTTMessageInfo(2)
    never.rc = mqtt.MQTT_ERR_NO_CONN  # paho dropped it at once: nothing held
    assert _published(never)
    lost = mqtt.MQTTMessageInfo(3)
    lost.rc = mqtt.MQTT_ERR_CONN_LOST
    lost._set_as_published()
    assert _published(lost)
