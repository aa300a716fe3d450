"""MQTT transport: the block-fetching ``FetcherInterface`` (connections and the
announcement listener are in ``_mqttconn``).

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
import struct
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from tuf.api import exceptions as tuf_exc

from updater._config import MqttConfig
from updater._fetcher import RangeFetcher
from updater._mqttconn import (
    AnnouncementListener,
    MqttConnection,
    parse_broker_url,
    publish_properties,
)
from updater.errors import TransportError

__all__ = [
    "MQTT_METADATA_URL",
    "MQTT_TARGETS_URL",
    "AnnouncementListener",
    "MqttConfig",
    "MqttConnection",
    "MqttFetcher",
    "parse_broker_url",
    "publish_properties",
]

logger = logging.getLogger(__name__)

MQTT_METADATA_URL = "mqtt://repo/metadata/"
MQTT_TARGETS_URL = "mqtt://repo/targets/"


def _corr(session: bytes, offset: int) -> bytes:
    return session + struct.pack(">Q", offset)


# Block responses, format 2 (asked for with ``"format": 2``): the payload starts with
# magic, status, offset and file size, then the bytes. Format 1 carried these three as
# MQTT 5 user properties, whose decoding in paho cost a third as much CPU as decrypting
# the 1 MiB block itself; a bridge that predates format 2 still answers that way, and
# the device reads either (a user property "status" marks format 1).
BLOCK_MAGIC = b"MWB2"
BLOCK_HEADER = struct.Struct(">4sHQQ")


def block_header(status: int, offset: int, size: int) -> bytes:
    """The format 2 header of a block response."""
    return BLOCK_HEADER.pack(BLOCK_MAGIC, status, offset, size)


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
        return (bytes(chunk) for chunk in self._fetch_from(url, 0)[0])  # metadata: small

    def _fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes | memoryview], int]:
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
        body = json.dumps({"path": path, "offset": off, "length": self.cfg.block_size,
                           "format": 2})
        self.requested_bytes += self.cfg.block_size
        try:
            conn.publish(self._req_topic, body.encode(), props)
        except TransportError as e:
            raise tuf_exc.DownloadError(f"mqtt {path}: {e}") from e

    def _blocks(self, conn: MqttConnection, path: str, start: int) -> Iterator[memoryview]:
        cfg = self.cfg
        session = secrets.token_bytes(8)
        pending: dict[int, tuple[float, int]] = {}  # offset -> (deadline, attempts)
        buffered: dict[int, memoryview] = {}
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
    ) -> tuple[int, memoryview, int] | None:
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
        payload = memoryview(msg.payload)
        if "status" in up:  # format 1: a bridge from before format 2
            status = up["status"]
            try:
                size = int(up["size"]) if status == "200" else 0
                if status == "200" and (int(up["offset"]) != off or size < 0):
                    raise ValueError("offset/size")
            except (KeyError, ValueError):
                logger.warning("ignoring a malformed block of %s", path)
                return None
        elif len(payload) >= BLOCK_HEADER.size and payload[:4] == BLOCK_MAGIC:
            _, code, block_off, size = BLOCK_HEADER.unpack(payload[:BLOCK_HEADER.size])
            status = str(code)
            payload = payload[BLOCK_HEADER.size:]
            if status == "200" and block_off != off:
                logger.warning("ignoring a malformed block of %s", path)
                return None
        else:
            logger.warning("ignoring a block of %s without a valid status", path)
            return None
        if status == "404":
            raise tuf_exc.DownloadHTTPError(f"mqtt {path}: not found", 404)
        if status != "200":
            if status.isdigit():
                raise tuf_exc.DownloadHTTPError(f"mqtt {path}: status {status}", int(status))
            logger.warning("ignoring a block of %s without a valid status", path)
            return None
        if total is not None and size != total:
            raise tuf_exc.DownloadError(f"mqtt {path}: file size changed during the download")
        expected = max(0, min(self.cfg.block_size, size - off))
        if len(payload) != expected:
            logger.warning("ignoring a block of %s at %d with %d bytes (expected %d)",
                           path, off, len(payload), expected)
            return None
        return off, payload, size


