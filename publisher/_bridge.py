"""``modelward serve-mqtt``: answers block requests from the static repository.

Stateless: any number of bridges share one subscription (``$share/<group>/...``), and
each request is answered from the files as they are. It serves only regular files under
``metadata/`` and ``targets/`` of the repository, at most ``max_block`` bytes a request,
and answers only on the requesting device's own response topic.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from publisher._broker_config import check_id
from publisher.errors import OperatorInputError
from trust._bounded import loads_bounded
from updater import check_member_path
from updater._mqtt import (
    MqttConfig,
    MqttConnection,
    block_header,
    publish_properties,
)

logger = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 16 * 1024  # a request is one short line of JSON

SERVED_DIRS = ("metadata", "targets")


@dataclass
class BridgeStats:
    """Counters (read by tests and benchmarks)."""

    requests: int = 0
    served_bytes: int = 0
    refused: int = 0


class Bridge:
    """Serve ``repo`` over MQTT for ``cfg.fleet``.

    Blocks are answered in format 2 (a binary header in the payload) to devices that ask
    for it, in format 1 (MQTT user properties) to the others.

    Args:
        repo: the repository directory (as served over HTTPS).
        cfg: broker connection (username is a bridge identity).
        group: shared-subscription group.
        max_block: largest block answered (1 MiB).
    """

    formats: tuple[int, ...] = (1, 2)

    def __init__(self, repo: Path, cfg: MqttConfig, group: str = "modelward-bridges",
                 max_block: int = 1 << 20) -> None:
        if not (repo / "metadata").is_dir():
            raise OperatorInputError(f"{repo} is not a repository (no metadata/)")
        self.repo = repo.resolve()
        self.cfg = cfg
        self.max_block = max_block
        self.stats = BridgeStats()
        self._prefix = cfg.topic("repo/req/")
        self._conn = MqttConnection(
            cfg, f"{cfg.client_name}-{os.getpid()}-{threading.get_ident() % 10000}",
            [f"$share/{group}/{cfg.topic('repo/req/+')}"], self._on_message,
        )

    def close(self) -> None:
        """Disconnect."""
        self._conn.close()

    def _resolve(self, path: str) -> Path:
        check_member_path(path)
        if path.split("/", 1)[0] not in SERVED_DIRS:
            raise ValueError(f"{path!r} is outside metadata/ and targets/")
        real = (self.repo / path).resolve()
        if not str(real).startswith(str(self.repo) + "/") or not real.is_file():
            raise FileNotFoundError(path)
        return real

    def _read(self, path: str, offset: int, length: int) -> tuple[int, bytes]:
        """Size of the file and up to ``length`` bytes from ``offset``."""
        with open(self._resolve(path), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return size, os.pread(f.fileno(), length, offset) if offset <= size else b""

    def _send(self, topic: str, data: bytes, props: Any) -> None:
        self._conn.publish(topic, data, props)

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:
        device = msg.topic[len(self._prefix):] if msg.topic.startswith(self._prefix) else ""
        try:
            check_id("device id", device)
        except OperatorInputError:
            logger.warning("ignoring a request on %s", msg.topic)
            return
        resp_topic = self.cfg.topic(f"devices/{device}/repo/resp")
        props: Any = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None)
        asked_topic = getattr(props, "ResponseTopic", resp_topic)
        if not isinstance(corr, bytes) or len(corr) > 64 or asked_topic != resp_topic:
            self.stats.refused += 1
            logger.warning("refusing a request from %s: missing correlation data or a "
                           "response topic other than its own", device)
            return
        self.stats.requests += 1
        status, data, size, offset, fmt = "400", b"", 0, 0, 1
        try:
            req = loads_bounded(msg.payload, max_bytes=MAX_REQUEST_BYTES, max_depth=2,
                                what=f"the request on {msg.topic}")
            asked = req.get("format", 1) if isinstance(req, dict) else 1
            fmt = 2 if asked == 2 and 2 in self.formats else 1
            path, offset, length = req["path"], req["offset"], req["length"]
            if not (isinstance(path, str) and isinstance(offset, int)
                    and isinstance(length, int)) or offset < 0 or not 0 < length <= self.max_block:
                raise ValueError("path/offset/length")
            size, data = self._read(path, offset, length)
            status = "200" if offset <= size else "416"
        except FileNotFoundError:
            status = "404"
        except (ValueError, KeyError, TypeError) as e:
            self.stats.refused += 1
            logger.warning("refusing a request from %s: %s", device, e)
        out = publish_properties()
        out.CorrelationData = corr
        payload = data
        if fmt == 2:  # the block's header in the payload (see updater._mqtt)
            payload = block_header(int(status), offset, size) + data
        else:
            out.UserProperty = [("status", status), ("offset", str(offset)),
                                ("size", str(size))]
        self._send(resp_topic, payload, out)
        self.stats.served_bytes += len(data)
        logger.debug("served %s status=%s offset=%d bytes=%d to %s",
                     msg.payload[:200].decode(errors="replace"), status, offset, len(data),
                     device, extra={"device": device, "status": status, "bytes": len(data)})


def announce(repo: Path, cfg: MqttConfig) -> int:
    """Publish the retained hint ``{timestamp_version, published_at}``; returns the version.

    Raises:
        OperatorInputError: no timestamp metadata in ``repo``.
        TransportError: the broker refused or did not acknowledge.
    """
    try:
        doc = loads_bounded((repo / "metadata" / "timestamp.json").read_bytes(),
                            max_bytes=1 << 20, what="timestamp.json")
        version = int(doc["signed"]["version"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OperatorInputError(f"{repo}/metadata/timestamp.json is unreadable: {e}") from e
    from datetime import UTC, datetime

    body = json.dumps({"timestamp_version": version,
                       "published_at": datetime.now(UTC).isoformat(timespec="seconds")})
    conn = MqttConnection(cfg, f"{cfg.client_name}-announce-{os.getpid()}", [])
    try:
        conn.publish(cfg.topic("announce"), body.encode(), retain=True, wait=True)
    finally:
        conn.close()
    return version
