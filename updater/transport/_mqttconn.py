"""MQTT connections (paho-mqtt, MQTT 5) and the announcement listener.

Only paho here: the idle daemon imports this without the TUF or TPM stacks.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from modelward.trust._bounded import loads_bounded
from modelward.updater._config import (
    MqttConfig,
    fetch_client_id,
    fetch_username,
    listen_client_id,
)
from modelward.updater.errors import TransportError
from modelward.updater.transport import _pahofast

logger = logging.getLogger(__name__)

_pahofast.install()  # fewer copies per received block (see the module)


RECEIVE_MAXIMUM = 64  # QoS 1 messages the broker may send before their PUBACKs


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtts://host:port`` -> (host, port); TLS only.

    Raises:
        TransportError: not an mqtts:// URL.
    """
    u = urlparse(url)
    if u.scheme != "mqtts" or not u.hostname:
        raise TransportError(f"broker URL {url!r} must look like mqtts://HOST:PORT",
                             hint="modelward only talks to brokers over TLS")
    try:
        port = u.port  # (a ValueError for a port that is no number, or out of range)
    except ValueError as e:
        raise TransportError(f"broker URL {url!r}: the port is not a number from 1 to "
                             "65535", hint="write it as mqtts://HOST:PORT") from e
    if port == 0:
        raise TransportError(f"broker URL {url!r}: port 0", hint="write it as mqtts://HOST:PORT")
    return u.hostname, port or 8883



def guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` for paho's network thread: whatever it raises is logged, never re-raised
    (paho would re-raise it in its loop and the thread would end: no message, no ack and
    no reconnect after that)."""
    def call(*args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - the thread must live on
            logger.error("MQTT callback %s failed: %s: %s",
                         getattr(fn, "__name__", "?"), type(e).__name__, str(e)[:200])
    return call

class MqttConnection:
    """A connected paho client with a clean error story.

    Args:
        cfg: connection settings.
        client_id: MQTT client id (unique per connection).
        subscriptions: topics (re)subscribed on every (re)connect, at ``qos`` (more with
            :meth:`subscribe`, fewer with :meth:`unsubscribe`).
        on_message: called in paho's thread for every message.
        max_packet_size: the Maximum Packet Size sent on CONNECT (default
            ``cfg.packet_limit()``): the broker sends no larger packet, and a larger
            one ends the connection before it is buffered.
        username: the MQTT username (default ``cfg.client_name``; a device's fetcher
            logs in as :func:`~modelward.updater._config.fetch_username`).
        qos: the subscriptions' QoS (1; the bridge reads requests at 0: a burst of QoS 1
            deliveries beyond the broker's in-flight window and ``max_queued_messages``
            is dropped, QoS 0 ones only when this client's socket is backed up).
        publish_filter: called in paho's thread with the topic and retain flag of every
            PUBLISH before it is decoded; False drops it (see
            :attr:`~modelward.updater.transport._pahofast.Client.publish_filter`).
        read_packets: the most packets read per turn of paho's loop (see
            :attr:`~modelward.updater.transport._pahofast.Client.read_packets`).
        qos_of: the QoS of some of ``subscriptions``, if not ``qos`` (the listener reads
            operator requests at 0: a flood of them, beyond the broker's queue for this
            session, is dropped by the broker instead of crowding out announcements, and
            none is kept for a parked session).

    Raises:
        TransportError: TLS, refused credentials, or no CONNACK/SUBACK in time.
    """

    qos: int = 1  # of the subscriptions (see ``qos`` above)

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        subscriptions: list[str],
        on_message: Callable[[mqtt.MQTTMessage], None] | None = None,
        max_packet_size: int | None = None,
        username: str | None = None,
        qos: int = 1,
        publish_filter: Callable[[bytes, bool], bool] | None = None,
        read_packets: int = 1,
        qos_of: dict[str, int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.qos = qos
        self.qos_of = dict(qos_of or {})  # a subscription's own QoS, if not ``qos``
        self.username = username or cfg.client_name
        self.max_packet_size = max_packet_size or cfg.packet_limit()
        self.connected = threading.Event()
        self.lost = threading.Event()
        self._subscribed = threading.Event()
        self._error: str | None = None
        self._acks: dict[int, Any] = {}
        self._subs = list(subscriptions)
        self._sub_acks: dict[int, tuple[threading.Event, list[str]]] = {}
        self._early_acks: dict[int, list[str]] = {}  # SUBACKs of subscribe() before its wait
        self._initial_mid: int | None = None
        self._lock = threading.Lock()
        c = _pahofast.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=cfg.ca_file)
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        c.tls_set_context(ctx)
        c.username_pw_set(self.username, cfg.password)
        c.max_inflight_messages_set(64)
        c.max_incoming_packet = self.max_packet_size
        c.publish_filter = publish_filter
        c.read_packets = read_packets
        # every callback guarded: an exception would end paho's network thread (deaf client)
        c.on_connect = guarded(self._on_connect)
        c.on_disconnect = guarded(self._on_disconnect)
        c.on_subscribe = guarded(self._on_subscribe)
        c.on_publish = guarded(self._on_publish)
        if on_message is not None:
            c.on_message = guarded(lambda _c, _u, msg: on_message(msg))
        self.client = c
        where = f"{cfg.host}:{cfg.port}"
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.MaximumPacketSize = self.max_packet_size
        props.ReceiveMaximum = RECEIVE_MAXIMUM  # unacknowledged QoS 1 messages in flight
        try:
            c.connect(cfg.host, cfg.port, keepalive=cfg.keepalive, properties=props)
        except ssl.SSLError as e:
            raise TransportError(f"TLS with broker {where} failed: {e.reason}",
                                 hint="is the broker's CA the configured ca_file?") from e
        except OSError as e:
            raise TransportError(f"cannot reach broker {where}: {e}") from e
        _no_delay(c)
        c.loop_start()
        if not self.connected.wait(cfg.connect_timeout) or self._error:
            self.close()
            raise TransportError(
                f"broker {where} refused {self.username!r} as {client_id!r}: "
                f"{self._error or 'no answer'}",
                hint="check the username/password or client certificate and the broker ACL",
            )
        if subscriptions and not self._subscribed.wait(cfg.connect_timeout):
            self.close()
            raise TransportError(f"broker {where} did not confirm the subscriptions")

    def subscribe(self, topic: str) -> None:
        """Subscribe to ``topic`` (at ``qos``) until :meth:`unsubscribe`; waits for the
        SUBACK.

        Raises:
            TransportError: not connected, refused, or no SUBACK in time.
        """
        done = threading.Event()
        result: list[str] = []
        with self._lock:
            if topic not in self._subs:
                self._subs.append(topic)
        rc, mid = self.client.subscribe([(topic, self.qos)])  # (not under the lock: paho's own)
        if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            with self._lock:  # the SUBACK may have come already
                early = self._early_acks.pop(mid, None)
                if early is None:
                    self._sub_acks[mid] = (done, result)
            if early is not None:
                result.extend(early)
                done.set()
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            self._forget(topic)
            raise TransportError(f"cannot subscribe to {topic}: {mqtt.error_string(rc)}")
        if not done.wait(self.cfg.connect_timeout):
            self._sub_acks.pop(mid, None)
            self._forget(topic)
            raise TransportError(f"broker did not confirm the subscription to {topic}")
        if result:
            self._forget(topic)
            raise TransportError(f"broker refused the subscription to {topic}: {result[0]}",
                                 hint="check the broker ACL for this user")

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic`` (not waited for: what is still in flight is the
        receiver's to drop). Never raises: a lost connection has no subscriptions."""
        self._forget(topic)
        try:
            self.client.unsubscribe(topic)
        except (OSError, ValueError) as e:  # pragma: no cover - paho reports by rc
            logger.debug("unsubscribe from %s: %s", topic, e)

    def _forget(self, topic: str) -> None:
        with self._lock:
            if topic in self._subs:
                self._subs.remove(topic)

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self._error = str(rc)
            self.connected.set()
            return
        self.lost.clear()
        _no_delay(c)  # a reconnect has a new socket
        with self._lock:
            subs = list(self._subs)
        if subs:
            self._initial_mid = c.subscribe([(t, self.qos_of.get(t, self.qos))
                                             for t in subs])[1]
        self.connected.set()

    def _on_subscribe(self, c: Any, _u: Any, mid: int, rcs: list[Any], _p: Any) -> None:
        # One reason code per topic asked for, and a subscribe asks for a few: the first
        # failures say enough (a hostile broker may send many).
        bad = [str(r) for r in rcs[:_MAX_REASONS] if r.is_failure]
        with self._lock:
            waiter = self._sub_acks.pop(mid, None)
            if waiter is None and mid != self._initial_mid:
                # The SUBACK of a subscribe() that has not registered its wait yet: its
                # packet id is one of the last few paho handed out. Any other id was never
                # used for a subscribe in flight: a broker's invention, ignored.
                if _recent_mid(c, mid):
                    for old in [m for m in self._early_acks if not _recent_mid(c, m)]:
                        del self._early_acks[old]
                    while len(self._early_acks) >= _MAX_EARLY_ACKS:  # the oldest first
                        del self._early_acks[next(iter(self._early_acks))]
                    self._early_acks[mid] = bad
                else:
                    logger.warning("ignoring a SUBACK for packet id %d, which no pending "
                                   "subscription uses", mid)
                return
        if waiter is not None:
            waiter[1].extend(bad)
            waiter[0].set()
            return
        if bad:
            logger.warning("broker refused a subscription: %s", bad)
        self._subscribed.set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self._acks[mid] = rc

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.lost.set()
        if rc.is_failure:
            logger.warning("lost the broker connection: %s", rc)

    def publish(self, topic: str, payload: bytes, props: Properties | None = None,
                retain: bool = False, wait: bool = False) -> None:
        """Publish at QoS 1; with ``wait``, until the broker acknowledged it.

        Raises:
            TransportError: the broker refused it or did not acknowledge in time.
        """
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        if wait:
            try:
                info.wait_for_publish(self.cfg.connect_timeout)
            except (RuntimeError, ValueError) as e:  # paho: not connected, queue full
                raise TransportError(f"cannot publish to {topic}: {e}") from e
            if not info.is_published():
                raise TransportError(f"broker did not acknowledge the publish to {topic}")
            refused = self._acks.pop(info.mid, None)
            if refused is not None:
                raise TransportError(f"broker refused the publish to {topic}: {refused}",
                                     hint="check the broker ACL for this user")
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise TransportError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def device_connection(
    cfg: MqttConfig,
    identity: str,
    subscriptions: list[str],
    on_message: Callable[[mqtt.MQTTMessage], None] | None = None,
    max_packet_size: int | None = None,
    qos_of: dict[str, int] | None = None,
) -> MqttConnection:
    """A connection as one of the device ``cfg.client_name``'s two broker identities:
    ``"listen"`` (reads the announcement, writes the status) or ``"fetch"`` (writes its
    requests, reads its responses), each with the one client id the broker allows it; a
    second connection of the same identity takes the first one's place.

    Raises:
        TransportError: as :class:`MqttConnection`; an unknown ``identity``.
    """
    name = cfg.client_name
    if identity == "listen":
        return MqttConnection(cfg, listen_client_id(name), subscriptions, on_message,
                              max_packet_size, qos_of=qos_of)
    if identity == "fetch":
        return MqttConnection(cfg, fetch_client_id(name), subscriptions, on_message,
                              max_packet_size, username=fetch_username(name))
    raise TransportError(f"no device identity {identity!r} (listen or fetch)")


_MAX_REASONS = 8  # reason codes of one SUBACK looked at
_MAX_EARLY_ACKS = 16  # SUBACKs kept for subscribe() calls about to wait (one per thread)
_RECENT_MIDS = 64  # how far back a packet id may be for an early SUBACK


def _recent_mid(c: Any, mid: int) -> bool:
    """Whether ``mid`` is one of the last :data:`_RECENT_MIDS` packet ids paho generated
    (paho counts them 1..65535, then wraps)."""
    last = getattr(c, "_last_mid", None)
    if not isinstance(last, int):  # paho internals differ: keep the size bound only
        return True
    return 0 <= (last - mid) % 65535 < _RECENT_MIDS


def _no_delay(c: mqtt.Client) -> None:
    """Send small packets at once (TCP_NODELAY), which paho leaves to the system.

    Every block request and every small metadata answer is a request/response; with
    Nagle's algorithm each one waited for the delayed ACK of the one before (40 ms on
    Linux), so a metadata refresh over MQTT took ~90 ms per file. The broker should send
    without delay too (mosquitto: ``set_tcp_nodelay true``).
    """
    sock = c.socket()
    if not isinstance(sock, socket.socket):  # not connected, or a websocket wrapper
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:  # not TCP: nothing to tune
        logger.debug("cannot set TCP_NODELAY: %s", e)


def publish_properties() -> Properties:
    """Empty MQTT 5 PUBLISH properties."""
    return Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


ANNOUNCE_MAX_PACKET = 64 * 1024  # an announcement is a line of JSON (or an operator request)
#: (topic, payload, retained, correlation data) of a PUBLISH on the request topic.
RequestCallback = Callable[[str, bytes, bool, "bytes | None"], None]


class AnnouncementListener:
    """Calls ``on_announce(timestamp_version)`` for every well-formed announcement.

    The announcement is an untrusted hint: it can only make the device refresh
    sooner; TUF decides what, if anything, is new. With ``on_request``, PUBLISHes on
    ``request_topic`` (the operator's requests, read at QoS 0) go to it instead.
    """

    _on_request: RequestCallback | None = None
    _request_topic: str | None = None

    def __init__(self, cfg: MqttConfig, on_announce: Callable[[int], None],
                 on_request: RequestCallback | None = None,
                 request_topic: str | None = None) -> None:
        self._cb = on_announce
        self._on_request = on_request
        self._request_topic = request_topic
        subs = [cfg.topic("announce")]
        if on_request is not None and request_topic:
            subs.append(request_topic)  # (a broker whose ACL predates it refuses: logged)
        self._conn = device_connection(cfg, "listen", subs, self._on_message,
                                       max_packet_size=ANNOUNCE_MAX_PACKET,
                                       qos_of=dict.fromkeys(subs[1:], 0))

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        if self._on_request is not None and msg.topic == self._request_topic:
            props = getattr(msg, "properties", None)  # (the callback checks the bounds)
            corr = getattr(props, "CorrelationData", None) if props is not None else None
            self._on_request(msg.topic, bytes(msg.payload), bool(msg.retain),
                             corr if isinstance(corr, bytes) else None)
            return
        try:
            doc = loads_bounded(msg.payload, max_bytes=ANNOUNCE_MAX_PACKET, max_depth=2,
                                what=f"the announcement on {msg.topic}")
            version = doc["timestamp_version"]
            if not isinstance(version, int) or isinstance(version, bool) or \
                    not 0 < version < 1 << 63:  # (TUF versions a JSON reader keeps exact)
                raise ValueError("timestamp_version")
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring a malformed announcement on %r: %s", msg.topic, e)
            return
        # (debug: the daemon says at info what it does with one, once; a broker that
        # repeats announcements must not fill the journal)
        logger.debug("announcement: timestamp version %d", version,
                     extra={"timestamp_version": version})
        self._cb(version)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish on the listener's connection (the device's status report).

        Raises:
            TransportError: refused or not acknowledged.
        """
        self._conn.publish(topic, payload, retain=retain, wait=True)

    def answer(self, topic: str, payload: bytes, correlation: bytes) -> None:
        """Publish an answer chunk with its request's correlation data (not retained).

        Raises:
            TransportError: refused or not acknowledged.
        """
        props = publish_properties()
        props.CorrelationData = correlation
        self._conn.publish(topic, payload, props=props, wait=True)

    def close(self) -> None:
        """Disconnect."""
        self._conn.close()
