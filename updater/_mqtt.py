"""MQTT transport (paho-mqtt, MQTT 5): connection settings, the block-fetching
``FetcherInterface`` and the announcement listener.

TUF verifies whatever arrives, so this transport needs no trust of its own; it only
has to be robust: lost, duplicated, reordered, oversized and foreign messages are
dropped or re-requested, memory is bounded by ``window * block_size``, and a lost
connection ends the attempt (what is staged is resumed next time).
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tuf.api import exceptions as tuf_exc

from updater._fetcher import RangeFetcher
from updater.errors import TransportError

logger = logging.getLogger(__name__)

MQTT_METADATA_URL = "mqtt://repo/metadata/"
MQTT_TARGETS_URL = "mqtt://repo/targets/"


@dataclass(frozen=True)
class MqttConfig:
    """How to reach the broker, and the fetcher's bounds.

    Attributes:
        host, port: the broker (TLS).
        fleet: topic prefix ``modelward/<fleet>/``.
        client_name: MQTT username for a device (= device id), or a service user.
        ca_file: CA the broker's certificate must chain to (pinned).
        cert_file, key_file: client certificate, if the broker uses them.
        password: the password, read from a file at the entry point (never logged).
        keepalive: seconds.
        connect_timeout: seconds to wait for CONNACK/SUBACK.
        block_size: bytes asked for per request (1 MiB, the bridge's limit).
        window: requests in flight at once.
        block_timeout: seconds before a block is asked for again.
        max_retries: how often one block is asked for again before giving up.
        queue_limit: incoming messages buffered at most (more are dropped).
    """

    host: str
    port: int
    fleet: str
    client_name: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    password: str | None = None
    keepalive: int = 30
    connect_timeout: float = 10.0
    block_size: int = 1024 * 1024
    window: int = 16
    block_timeout: float = 5.0
    max_retries: int = 4
    queue_limit: int = 256

    def topic(self, suffix: str) -> str:
        """``modelward/<fleet>/<suffix>``."""
        return f"modelward/{self.fleet}/{suffix}"

    def __repr__(self) -> str:  # never print the password
        return f"MqttConfig(host={self.host!r}, port={self.port}, fleet={self.fleet!r}, " \
               f"client_name={self.client_name!r})"


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtts://host:port`` -> (host, port); TLS only.

    Raises:
        TransportError: not an mqtts:// URL.
    """
    u = urlparse(url)
    if u.scheme != "mqtts" or not u.hostname:
        raise TransportError(f"broker URL {url!r} must look like mqtts://HOST:PORT",
                             hint="modelward only talks to brokers over TLS")
    return u.hostname, u.port or 8883


class MqttConnection:
    """A connected paho client with a clean error story.

    Args:
        cfg: connection settings.
        client_id: MQTT client id (unique per connection).
        subscriptions: topics (re)subscribed on every (re)connect, QoS 1.
        on_message: called in paho's thread for every message.

    Raises:
        TransportError: TLS, refused credentials, or no CONNACK/SUBACK in time.
    """

    def __init__(
        self,
        cfg: MqttConfig,
        client_id: str,
        subscriptions: list[str],
        on_message: Callable[[mqtt.MQTTMessage], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.connected = threading.Event()
        self.lost = threading.Event()
        self._subscribed = threading.Event()
        self._error: str | None = None
        self._acks: dict[int, Any] = {}
        self._subs = subscriptions
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=cfg.ca_file)
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        c.tls_set_context(ctx)
        c.username_pw_set(cfg.client_name, cfg.password)
        c.max_inflight_messages_set(64)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        if on_message is not None:
            c.on_message = lambda _c, _u, msg: on_message(msg)
        self.client = c
        where = f"{cfg.host}:{cfg.port}"
        try:
            c.connect(cfg.host, cfg.port, keepalive=cfg.keepalive)
        except ssl.SSLError as e:
            raise TransportError(f"TLS with broker {where} failed: {e.reason}",
                                 hint="is the broker's CA the configured ca_file?") from e
        except OSError as e:
            raise TransportError(f"cannot reach broker {where}: {e}") from e
        c.loop_start()
        if not self.connected.wait(cfg.connect_timeout) or self._error:
            self.close()
            raise TransportError(
                f"broker {where} refused {cfg.client_name!r}: {self._error or 'no answer'}",
                hint="check the username/password or client certificate and the broker ACL",
            )
        if subscriptions and not self._subscribed.wait(cfg.connect_timeout):
            self.close()
            raise TransportError(f"broker {where} did not confirm the subscriptions")

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            self._error = str(rc)
            self.connected.set()
            return
        self.lost.clear()
        if self._subs:
            c.subscribe([(t, 1) for t in self._subs])
        self.connected.set()

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, rcs: list[Any], _p: Any) -> None:
        bad = [str(r) for r in rcs if r.is_failure]
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
            info.wait_for_publish(self.cfg.connect_timeout)
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


def publish_properties() -> Properties:
    """Empty MQTT 5 PUBLISH properties."""
    return Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


def _corr(session: bytes, offset: int) -> bytes:
    return session + struct.pack(">Q", offset)


def _user_props(msg: mqtt.MQTTMessage) -> dict[str, str]:
    props = getattr(msg, "properties", None)
    pairs = getattr(props, "UserProperty", None) or []
    return {str(k): str(v) for k, v in pairs}


class MqttFetcher(RangeFetcher):
    """Fetch repository files over MQTT in blocks: ``modelward/<fleet>/repo/req/<id>``.

    URLs look like ``mqtt://repo/metadata/1.root.json``; the path is what the bridge
    serves from the repository directory.
    """

    def __init__(self, cfg: MqttConfig) -> None:
        self.cfg = cfg
        self._resp_topic = cfg.topic(f"devices/{cfg.client_name}/repo/resp")
        self._req_topic = cfg.topic(f"repo/req/{cfg.client_name}")
        self._inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue(cfg.queue_limit)
        self._conn: MqttConnection | None = None
        self.requested_bytes = 0  # what this fetcher asked for (tests, benchmarks)

    def _deliver(self, msg: mqtt.MQTTMessage) -> None:
        try:
            self._inbox.put_nowait(msg)
        except queue.Full:
            logger.warning("dropping a message on %s: receive queue full", msg.topic)

    def _connection(self) -> MqttConnection:
        if self._conn is None or self._conn.lost.is_set():
            if self._conn is not None:
                self._conn.close()
            self._conn = MqttConnection(
                self.cfg, f"{self.cfg.client_name}-fetch-{secrets.token_hex(4)}",
                [self._resp_topic], self._deliver,
            )
        return self._conn

    def close(self) -> None:
        """Disconnect."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._fetch_from(url, 0)[0]

    def _fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
        u = urlparse(url)
        if u.scheme != "mqtt":
            raise tuf_exc.DownloadError(f"{url} is not an mqtt:// URL")
        try:
            conn = self._connection()
        except TransportError as e:
            raise tuf_exc.DownloadError(str(e)) from e
        return self._blocks(conn, u.path.lstrip("/"), offset), offset

    def _request(self, conn: MqttConnection, session: bytes, path: str, off: int) -> None:
        props = publish_properties()
        props.ResponseTopic = self._resp_topic
        props.CorrelationData = _corr(session, off)
        body = json.dumps({"path": path, "offset": off, "length": self.cfg.block_size})
        self.requested_bytes += self.cfg.block_size
        try:
            conn.publish(self._req_topic, body.encode(), props)
        except TransportError as e:
            raise tuf_exc.DownloadError(f"mqtt {path}: {e}") from e

    def _blocks(self, conn: MqttConnection, path: str, start: int) -> Iterator[bytes]:
        cfg = self.cfg
        session = secrets.token_bytes(8)
        pending: dict[int, tuple[float, int]] = {}  # offset -> (deadline, attempts)
        buffered: dict[int, bytes] = {}
        total: int | None = None
        next_off, deliver = start, start
        while self._inbox.qsize():  # leftovers of an earlier fetch are stale
            self._inbox.get_nowait()

        def ask(off: int, attempts: int) -> None:
            pending[off] = (time.monotonic() + cfg.block_timeout, attempts)
            self._request(conn, session, path, off)

        ask(next_off, 0)
        next_off += cfg.block_size
        while total is None or deliver < total:
            if conn.lost.is_set():
                raise tuf_exc.DownloadError(f"mqtt {path}: broker connection lost at "
                                            f"offset {deliver}")
            if total is not None:
                while next_off < total and len(pending) + len(buffered) < cfg.window:
                    ask(next_off, 0)
                    next_off += cfg.block_size
            now = time.monotonic()
            for off, (deadline, attempts) in list(pending.items()):
                if deadline <= now:
                    if attempts >= cfg.max_retries:
                        raise tuf_exc.DownloadError(
                            f"mqtt {path}: no answer for offset {off} after "
                            f"{attempts + 1} requests")
                    logger.info("re-requesting %s at offset %d", path, off)
                    ask(off, attempts + 1)
            wait = max(0.0, min(d for d, _ in pending.values()) - time.monotonic()) \
                if pending else cfg.block_timeout
            try:
                msg = self._inbox.get(timeout=min(wait, 0.5))
            except queue.Empty:
                continue
            got = self._accept(msg, session, path, pending, total)
            if got is None:
                continue
            off, data, size = got
            if total is None:
                total = size
                if start > total:
                    raise tuf_exc.DownloadError(f"mqtt {path}: resume offset {start} is past "
                                                f"the end ({total} bytes)")
            del pending[off]
            buffered[off] = data
            while deliver in buffered:
                chunk = buffered.pop(deliver)
                if not chunk and deliver < total:
                    raise tuf_exc.DownloadError(f"mqtt {path}: empty block at {deliver}")
                deliver += len(chunk)
                self.bytes_received += len(chunk)
                yield chunk

    def _accept(
        self,
        msg: mqtt.MQTTMessage,
        session: bytes,
        path: str,
        pending: dict[int, tuple[float, int]],
        total: int | None,
    ) -> tuple[int, bytes, int] | None:
        """Validate one response; None (and a log line) for anything to ignore."""
        corr = getattr(getattr(msg, "properties", None), "CorrelationData", None)
        if not isinstance(corr, bytes) or len(corr) != 16 or corr[:8] != session:
            logger.warning("ignoring a message on %s with unknown correlation data", msg.topic)
            return None
        off = struct.unpack(">Q", corr[8:])[0]
        if off not in pending:
            logger.debug("ignoring a duplicate block of %s at %d", path, off)
            return None
        up = _user_props(msg)
        status = up.get("status", "")
        if status == "404":
            raise tuf_exc.DownloadHTTPError(f"mqtt {path}: not found", 404)
        if status != "200":
            if status.isdigit():
                raise tuf_exc.DownloadHTTPError(f"mqtt {path}: status {status}", int(status))
            logger.warning("ignoring a block of %s without a valid status", path)
            return None
        try:
            size = int(up["size"])
            if int(up["offset"]) != off or size < 0:
                raise ValueError("offset/size")
        except (KeyError, ValueError):
            logger.warning("ignoring a malformed block of %s", path)
            return None
        if total is not None and size != total:
            raise tuf_exc.DownloadError(f"mqtt {path}: file size changed during the download")
        expected = max(0, min(self.cfg.block_size, size - off))
        if len(msg.payload) != expected:
            logger.warning("ignoring a block of %s at %d with %d bytes (expected %d)",
                           path, off, len(msg.payload), expected)
            return None
        return off, bytes(msg.payload), size


class AnnouncementListener:
    """Calls ``on_announce(timestamp_version)`` for every well-formed announcement.

    The announcement is an untrusted hint: it can only make the device refresh
    sooner; TUF decides what, if anything, is new.
    """

    def __init__(self, cfg: MqttConfig, on_announce: Callable[[int], None]) -> None:
        self._cb = on_announce
        self._conn = MqttConnection(
            cfg, f"{cfg.client_name}-listen-{secrets.token_hex(4)}", [cfg.topic("announce")],
            self._on_message,
        )

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
            version = doc["timestamp_version"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError("timestamp_version")
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("ignoring a malformed announcement on %s: %s", msg.topic, e)
            return
        logger.info("announcement: timestamp version %d", version,
                    extra={"timestamp_version": version})
        self._cb(version)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish on the listener's connection (the device's status report).

        Raises:
            TransportError: refused or not acknowledged.
        """
        self._conn.publish(topic, payload, retain=retain, wait=True)

    def close(self) -> None:
        """Disconnect."""
        self._conn.close()
