"""MQTT transport: the block-fetching ``FetcherInterface`` (connections and the
announcement listener are in ``_mqttconn``).

TUF verifies whatever arrives, so this transport needs no trust of its own; it only
has to be robust: lost, duplicated, reordered, oversized and foreign messages are
dropped or re-requested, and a lost connection ends the attempt (what is staged is
resumed next time).

Memory is bounded before anything is verified, whoever else may publish on the
device's response topic (the bridge's identity, the broker itself): the broker is asked
on CONNECT for packets of at most one block (``MqttConfig.packet_limit``) and a larger one
ends the connection; the receive queue holds at most ``MqttConfig.queue_byte_limit``
bytes, junk beyond it is dropped, counted and logged, and the blocks the fetch holds
back (out of order, or handed on while its consumer pauses) count against the same
budget; control packets (SUBACK...) over 1 KiB end the connection (``_pahofast``); and the
response topic is subscribed only while a fetch runs, so nothing is received between
fetches.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from tuf.api import exceptions as tuf_exc

from modelward.updater._config import MqttConfig
from modelward.updater.errors import TransportError
from modelward.updater.transport._fetcher import RangeFetcher
from modelward.updater.transport._mqttconn import (
    AnnouncementListener,
    MqttConnection,
    device_connection,
    parse_broker_url,
    publish_properties,
)
from modelward.updater.transport._ranges import Piece, Range

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


BUSY_STATUSES = ("429", "503")  # the bridge is over a limit: ask again after a pause
MAX_BUSY = 40  # "busy" answers for one block before the fetch gives up (~30 s of pauses)


class _Busy(Exception):  # noqa: N818 - internal signal, never leaves this module
    """The bridge answered a block with 429/503."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


def busy_pause(refusals: int) -> float:
    """Seconds to wait before asking again after the ``refusals``-th busy answer for a
    block: 50 ms doubling to 1 s, with jitter so devices do not ask in step."""
    base: float = min(1.0, 0.05 * 2 ** min(refusals - 1, 5))
    return base * (0.5 + secrets.randbelow(1000) / 1000)


def _is_status(text: str) -> bool:
    """An HTTP-like status: 1 to 3 ASCII digits (``str.isdigit`` alone also takes "\u00b2"
    and 5000 digits, on which ``int`` raises)."""
    return 0 < len(text) <= 3 and text.isascii() and text.isdecimal()


def _user_props(msg: mqtt.MQTTMessage) -> dict[str, str]:
    props = getattr(msg, "properties", None)
    pairs = getattr(props, "UserProperty", None) or []
    return {str(k): str(v) for k, v in pairs}


class Pace:
    """A token bucket: at most ``rate`` events a second, in bursts of half a second's
    worth (``rate`` 0: unlimited). Time is passed in.

    ``serve-mqtt`` allows ``--device-requests-per-s`` (50) in bursts of as many: 40 a
    second in bursts of 20 stays under it over every interval, with room for a refresh."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate / 2)
        self.tokens, self.last = self.burst, now

    def take(self, now: float) -> bool:
        """Spend a token if one is there."""
        if self.rate <= 0:
            return True
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next token (after a refused :meth:`take`)."""
        return 0.0 if self.rate <= 0 else max(0.001, (1 - self.tokens) / self.rate)


class Inbox:
    """The receive queue between paho's thread and the fetch, bounded in messages and bytes.

    :meth:`put` never blocks the network thread: what does not fit is dropped and
    counted (the first drop of a fetch is logged at once, the count when it ends).
    """

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._q: deque[mqtt.MQTTMessage] = deque()
        self._bytes = 0
        self._cv = threading.Condition()
        self.dropped = self.dropped_bytes = 0
        self.open = False  # only a running fetch receives
        self._held = 0  # bytes the fetch holds already (blocks waiting for their turn)

    @property
    def bytes(self) -> int:
        """Payload bytes queued now."""
        return self._bytes

    def put(self, msg: mqtt.MQTTMessage) -> bool:
        """Queue ``msg``; False (dropped, counted) when closed or full."""
        size = len(msg.payload)
        with self._cv:
            if not self.open or len(self._q) >= self.max_messages or \
                    self._bytes + self._held + size > self.max_bytes:
                self.dropped += 1
                self.dropped_bytes += size
                first = self.dropped == 1 and self.open
            else:
                self._q.append(msg)
                self._bytes += size
                self._cv.notify()
                return True
        if first:
            logger.warning("dropping messages on %s: receive queue full (%d bytes, at most "
                           "%d)", msg.topic, self._bytes, self.max_bytes)
        return False

    def get(self, timeout: float) -> mqtt.MQTTMessage:
        """The oldest message.

        Raises:
            queue.Empty: none within ``timeout`` seconds.
        """
        with self._cv:
            if not self._q and not self._cv.wait_for(lambda: bool(self._q), timeout):
                raise queue.Empty
            msg = self._q.popleft()
            self._bytes -= len(msg.payload)
            return msg

    def hold(self, size: int) -> None:
        """The fetch now holds ``size`` bytes taken from the queue (out-of-order blocks):
        they count against the same ``max_bytes``, so queue and fetch together stay
        within one bound, however long the fetch's consumer pauses."""
        with self._cv:
            self._held = size

    def start(self) -> None:
        """A fetch begins: empty the queue and the counts, and accept messages."""
        with self._cv:
            self._q.clear()
            self._bytes = self._held = 0
            self.dropped = self.dropped_bytes = 0
            self.open = True

    def stop(self) -> tuple[int, int]:
        """The fetch ended: drop what is queued, accept nothing; (dropped, bytes) during it."""
        with self._cv:
            self.open = False
            self._q.clear()
            self._bytes = self._held = 0
            return self.dropped, self.dropped_bytes


class MqttFetcher(RangeFetcher):
    """Fetch repository files over MQTT in blocks: ``modelward/<fleet>/repo/req/<id>``.

    URLs look like ``mqtt://repo/metadata/1.root.json``; the path is what the bridge
    serves from the repository directory.

    Attributes:
        stable_pieces: the pieces :meth:`fetch_ranges` yields are views of each message's
            payload, an immutable ``bytes`` the decoder made for it alone (never written
            again: the delta path hashes and writes chunks from them, uncopied).
    """

    stable_pieces: bool = True

    def __init__(self, cfg: MqttConfig) -> None:
        self.cfg = cfg
        self._resp_topic = cfg.topic(f"devices/{cfg.client_name}/repo/resp")
        self._req_topic = cfg.topic(f"repo/req/{cfg.client_name}")
        self._inbox = Inbox(cfg.queue_limit, cfg.queue_byte_limit())
        self._conn: MqttConnection | None = None
        self.requested_bytes = 0  # what this fetcher asked for (tests, benchmarks)
        self._spans = True  # False once the bridge refused a span (from before spans)

    def _deliver(self, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put(msg)

    def _connection(self) -> MqttConnection:
        if self._conn is None or self._conn.lost.is_set():
            if self._conn is not None:
                self._conn.close()
            # the device's fetcher identity, bound to one client id by the broker
            self._conn = device_connection(self.cfg, "fetch", [], self._deliver)
        return self._conn

    def close(self) -> None:
        """Disconnect."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _fetch(self, url: str) -> Iterator[bytes]:
        return (bytes(chunk) for chunk in self._fetch_from(url, 0)[0])  # metadata: small

    def fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes | memoryview], int]:
        """Fetch ``url`` from byte ``offset`` (0 too): the blocks as views of each
        message's payload, uncopied (:meth:`fetch` copies each into ``bytes``, as TUF's
        metadata path wants; a whole bundle went through that copy too).

        Raises:
            tuf.api.exceptions.DownloadError: the transfer failed.
        """
        self.last_url = url
        return self._fetch_from(url, offset)

    def _fetch_from(self, url: str, offset: int) -> tuple[Iterator[bytes | memoryview], int]:
        u = urlparse(url)
        if u.scheme != "mqtt":
            raise tuf_exc.DownloadError(f"{url} is not an mqtt:// URL")
        try:
            conn = self._connection()
        except TransportError as e:
            raise tuf_exc.DownloadError(str(e)) from e
        return self._subscribed(conn, u.path.lstrip("/"), offset), offset

    def _subscribed(self, conn: MqttConnection, path: str, start: int) -> Iterator[memoryview]:
        """:meth:`_blocks` with the response topic subscribed only while it runs."""
        self._inbox.start()
        try:
            try:
                conn.subscribe(self._resp_topic)
            except TransportError as e:
                raise tuf_exc.DownloadError(f"mqtt {path}: {e}") from e
            yield from self._blocks(conn, path, start)
        finally:
            conn.unsubscribe(self._resp_topic)
            dropped, size = self._inbox.stop()
            if dropped:
                logger.warning("dropped %d messages (%d bytes) on %s while fetching %s: "
                               "receive queue full", dropped, size, self._resp_topic, path,
                               extra={"dropped": dropped, "dropped_bytes": size})

    def _request(self, conn: MqttConnection, session: bytes, path: str, off: int,
                 length: int | None = None, fmt: int = 2) -> None:
        props = publish_properties()
        props.ResponseTopic = self._resp_topic
        props.CorrelationData = _corr(session, off)
        length = self.cfg.block_size if length is None else length
        req = {"path": path, "offset": off, "length": length, "format": fmt}
        if fmt == 3:
            req["block"] = self.cfg.block_size
        body = json.dumps(req)
        self.requested_bytes += length
        try:
            conn.publish(self._req_topic, body.encode(), props)
        except TransportError as e:
            raise tuf_exc.DownloadError(f"mqtt {path}: {e}") from e

    def _blocks(self, conn: MqttConnection, path: str, start: int) -> Iterator[memoryview]:
        cfg = self.cfg
        session = secrets.token_bytes(8)
        pending: dict[int, tuple[float, int]] = {}  # offset -> (deadline, attempts)
        busy: dict[int, int] = {}  # offset -> busy answers (a pause, not a lost answer)
        paused: set[int] = set()  # offsets waiting out a busy answer
        buffered: dict[int, memoryview] = {}
        held = 0  # bytes in buffered
        total: int | None = None
        next_off, deliver = start, start

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
                if deadline <= now and off in paused:
                    paused.discard(off)
                    ask(off, attempts)  # the pause is over: not a retry
                elif deadline <= now:
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
            try:
                got = self._accept(msg, session, path, pending, total)
            except _Busy as b:
                n = busy[b.offset] = busy.get(b.offset, 0) + 1
                if n > MAX_BUSY:
                    raise tuf_exc.DownloadError(
                        f"mqtt {path}: the bridge stayed busy for offset {b.offset} "
                        f"({n} refusals)") from None
                pending[b.offset] = (time.monotonic() + busy_pause(n), pending[b.offset][1])
                paused.add(b.offset)
                continue
            if got is None:
                continue
            off, data, size = got
            if total is None:
                total = size
                if start > total:
                    raise tuf_exc.DownloadError(f"mqtt {path}: resume offset {start} is past "
                                                f"the end ({total} bytes)")
            del pending[off]
            paused.discard(off)
            buffered[off] = data
            held += len(data)
            while deliver in buffered:
                chunk = buffered.pop(deliver)
                held -= len(chunk)
                if not chunk and deliver < total:
                    raise tuf_exc.DownloadError(f"mqtt {path}: empty block at {deliver}")
                deliver += len(chunk)
                self.bytes_received += len(chunk)
                # While the consumer holds this chunk (and may pause: the idle gate, a slow
                # extraction), the queue may take only what the budget leaves.
                self._inbox.hold(held + len(chunk))
                yield chunk
            self._inbox.hold(held)

    def _accept(
        self,
        msg: mqtt.MQTTMessage,
        session: bytes,
        path: str,
        pending: dict[int, tuple[float, int]],
        total: int | None,
        asked: dict[int, int] | None = None,
    ) -> tuple[int, memoryview, int] | None:
        """Validate one response; None (and a log line) for anything to ignore.

        ``asked``: offset -> the length asked for (a range fetch); None: a block each.
        """
        corr = getattr(getattr(msg, "properties", None), "CorrelationData", None)
        if not isinstance(corr, bytes) or len(corr) != 16 or corr[:8] != session:
            logger.warning("ignoring a message on %r with unknown correlation data", msg.topic)
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
        if status in BUSY_STATUSES:
            raise _Busy(off)
        if status != "200":
            if _is_status(status):
                raise tuf_exc.DownloadHTTPError(f"mqtt {path}: status {status}", int(status))
            logger.warning("ignoring a block of %s without a valid status", path)
            return None
        if asked is None:
            return _sized(path, off, payload, size, total,
                          max(0, min(self.cfg.block_size, size - off)), ranged=False)
        return _sized(path, off, payload, size, total, asked[off], ranged=True)

    # --- ranges -----------------------------------------------------------------------

    def _fetch_ranges(self, url: str, ranges: list[Range]) -> Iterator[Piece]:
        """Each range in blocks of at most ``block_size`` (offset and length), asked for a
        span of up to ``span_blocks`` blocks a request, through the same window of blocks
        as a whole file."""
        u = urlparse(url)
        if u.scheme != "mqtt":
            raise tuf_exc.DownloadError(f"{url} is not an mqtt:// URL")
        try:
            conn = self._connection()
        except TransportError as e:
            raise tuf_exc.DownloadError(str(e)) from e
        path = u.path.lstrip("/")
        self._inbox.start()
        try:
            try:
                conn.subscribe(self._resp_topic)
            except TransportError as e:
                raise tuf_exc.DownloadError(f"mqtt {path}: {e}") from e
            yield from self._range_blocks(conn, path, iter(ranges))
        finally:
            conn.unsubscribe(self._resp_topic)
            dropped, size = self._inbox.stop()
            if dropped:
                logger.warning("dropped %d messages (%d bytes) on %s while fetching ranges "
                               "of %s: receive queue full", dropped, size, self._resp_topic,
                               path, extra={"dropped": dropped, "dropped_bytes": size})

    def _span_limit(self) -> int:
        if not self._spans:
            return 1
        return max(1, min(self.cfg.span_blocks, self.cfg.window, SPAN_BLOCKS))

    def _range_blocks(self, conn: MqttConnection, path: str,
                      ranges: Iterator[Range]) -> Iterator[Piece]:
        """The blocks of ``ranges`` (in order), at most ``window`` blocks in flight or held.

        Requests: a span of consecutive blocks of one range (format 3), or one block
        (format 2: a span of one, a block asked again, or a bridge from before spans).
        A block is accepted only on the correlation data of a request in flight that
        asked for it, at a block offset it asked for, with exactly the length asked, once:
        a byte not asked for is never handed on. Only the blocks asked for and not yet
        handed on are held (``order``, ``asked``, ``waiting``): memory follows the window,
        not the bytes asked.
        """
        cfg, bs = self.cfg, self.cfg.block_size
        session = secrets.token_bytes(8)
        asked: dict[int, int] = {}  # block offset -> length, of the blocks in ``order``
        order: deque[int] = deque()  # block offsets asked for, not yet handed on, in order
        waiting: dict[int, _Ask] = {}  # block offset -> the request it is awaited from
        # block offset -> busy answers for it so far, across its requests (a span, its
        # singles after a pause or a time-out): bounded per block, as in _blocks
        refused: dict[int, int] = {}
        reqs: dict[int, _Ask] = {}  # request offset (its correlation) -> request in flight
        buffered: dict[int, memoryview] = {}
        held = 0
        total: int | None = None
        upcoming: Range | None = next(ranges, None)  # (what is left of the current range)
        # Requests are paced under the bridge's rate, over which it drops them unanswered
        # (each then waits out block_timeout); a span asks for many blocks in one.
        pace = Pace(cfg.range_requests_per_s, time.monotonic())
        # Blocks a span asks for now: halved on each busy answer to a span (the bridge's
        # byte budget for this device may be smaller than a span), one more for each span
        # answered in full.
        span = top = self._span_limit()

        def send(r: _Ask) -> None:
            r.deadline = time.monotonic() + cfg.block_timeout
            reqs[r.off] = r
            self._request(conn, session, path, r.off, r.length, 3 if r.span else 2)

        def singles(r: _Ask, attempts: int) -> None:
            """Ask again for each block of ``r`` still awaited, one request each."""
            if reqs.get(r.off) is r:
                del reqs[r.off]
            for b in [b for b, w in waiting.items() if w is r]:
                one = _Ask(b, asked[b], [b], attempts)
                waiting[b] = one
                send(one)

        while order or upcoming is not None:
            if conn.lost.is_set():
                at = order[0] if order or upcoming is None else upcoming[0]
                raise tuf_exc.DownloadError(f"mqtt {path}: broker connection lost at "
                                            f"offset {at}")
            paced = 0.0
            while upcoming is not None:
                room = cfg.window - len(waiting) - len(buffered)
                o, ln = upcoming
                want = min(span, -(-ln // bs))
                if room < want or room <= 0:
                    break  # (a span waits for its room: a block at a time would spend
                    # the request rate on single blocks)
                if not pace.take(time.monotonic()):
                    paced = pace.wait()
                    break
                n = min(want * bs, ln)
                blocks = list(range(o, o + n, bs))
                r = _Ask(o, n, blocks, 0)
                for b in blocks:
                    asked[b] = min(bs, o + n - b)
                    order.append(b)
                    waiting[b] = r
                send(r)
                upcoming = (o + n, ln - n) if ln > n else next(ranges, None)
            now = time.monotonic()
            for r in list(reqs.values()):
                if r.deadline > now or reqs.get(r.off) is not r:
                    continue
                if r.paused:  # the pause is over: not a retry
                    r.paused = False
                    if r.span:  # (a span may be over the device's byte budget for good)
                        singles(r, r.attempts)
                    else:
                        send(r)
                elif r.attempts >= cfg.max_retries:
                    raise tuf_exc.DownloadError(
                        f"mqtt {path}: no answer for offset "
                        f"{min(b for b, w in waiting.items() if w is r)} after "
                        f"{r.attempts + 1} requests")
                else:
                    logger.info("re-requesting %s at offset %d", path, r.off)
                    singles(r, r.attempts + 1)
            wait = max(0.0, min(r.deadline for r in reqs.values()) - time.monotonic()) \
                if reqs else cfg.block_timeout
            try:
                msg = self._inbox.get(timeout=min(wait, 0.5, paced or 0.5))
            except queue.Empty:
                continue
            got = self._accept_block(msg, session, path, reqs, waiting, asked, total)
            if got is None:
                continue
            if isinstance(got, _Ask):  # busy, or a bridge that does not know spans
                r = got
                if r.busy < 0:
                    r.busy = 0
                    self._spans = False
                    span = top = 1
                    logger.warning("the bridge refused a span of %s: asking one block a "
                                   "request", path)
                    singles(r, r.attempts)
                    continue
                n = 0
                for b in r.blocks:
                    if waiting.get(b) is r:
                        refused[b] = refused.get(b, 0) + 1
                        n = max(n, refused[b])
                if n > MAX_BUSY:
                    raise tuf_exc.DownloadError(
                        f"mqtt {path}: the bridge stayed busy for offset {r.off} "
                        f"({n} refusals)")
                r.deadline = time.monotonic() + busy_pause(n)
                r.paused = True
                if r.span:
                    span = max(1, span // 2)
                continue
            off, data, total = got
            r = waiting.pop(off)
            refused.pop(off, None)
            r.left -= 1
            r.deadline = time.monotonic() + cfg.block_timeout  # (progress)
            if not r.left and reqs.get(r.off) is r:
                del reqs[r.off]
                if r.span:
                    span = min(top, span + 1)
            buffered[off] = data
            held += len(data)
            while order and order[0] in buffered:
                start = order.popleft()
                del asked[start]
                chunk = buffered.pop(start)
                held -= len(chunk)
                self.bytes_received += len(chunk)
                self._inbox.hold(held + len(chunk))  # (as in _blocks)
                yield start, chunk
            self._inbox.hold(held)

    def _accept_block(
        self,
        msg: mqtt.MQTTMessage,
        session: bytes,
        path: str,
        reqs: dict[int, _Ask],
        waiting: dict[int, _Ask],
        asked: dict[int, int],
        total: int | None,
    ) -> tuple[int, memoryview, int] | _Ask | None:
        """One answer to a range request: (block offset, bytes, file size); the request,
        its ``busy`` counted, for a busy answer (``busy`` -1: a span refused with 400, by a
        bridge from before spans); None (and a log line) for anything to ignore.

        Accepted only for a request in flight (its correlation data), at a block offset
        that request asked for and still awaits, with exactly the length asked.
        """
        corr = getattr(getattr(msg, "properties", None), "CorrelationData", None)
        if not isinstance(corr, bytes) or len(corr) != 16 or corr[:8] != session:
            logger.warning("ignoring a message on %r with unknown correlation data", msg.topic)
            return None
        r = reqs.get(struct.unpack(">Q", corr[8:])[0])
        if r is None:
            logger.debug("ignoring an answer of %s to no request in flight", path)
            return None
        payload = memoryview(msg.payload)
        off = r.off
        up = _user_props(msg) if len(payload) < BLOCK_HEADER.size or \
            payload[:4] != BLOCK_MAGIC else {}
        if "status" in up:  # format 1: a refusal, or a bridge from before format 2
            status = up["status"]
            try:
                size = int(up["size"]) if status == "200" else 0
                if status == "200" and (int(up["offset"]) != off or size < 0 or r.span):
                    raise ValueError("offset/size")
            except (KeyError, ValueError):
                logger.warning("ignoring a malformed block of %s", path)
                return None
        elif up == {} and len(payload) >= BLOCK_HEADER.size:
            _, code, off, size = BLOCK_HEADER.unpack(payload[:BLOCK_HEADER.size])
            status = str(code)
            payload = payload[BLOCK_HEADER.size:]
            if status != "200" and off != r.off:
                logger.warning("ignoring a malformed refusal of %s", path)
                return None
        else:
            logger.warning("ignoring a block of %s without a valid status", path)
            return None
        if status == "404":
            raise tuf_exc.DownloadHTTPError(f"mqtt {path}: not found", 404)
        if status in BUSY_STATUSES:
            r.busy += 1
            return r
        if status == "400" and r.span:
            r.busy = -1
            return r
        if status != "200":
            if _is_status(status):
                raise tuf_exc.DownloadHTTPError(f"mqtt {path}: status {status}", int(status))
            logger.warning("ignoring a block of %s without a valid status", path)
            return None
        if waiting.get(off) is not r:
            logger.debug("ignoring a block of %s at %d: not awaited from this request",
                         path, off)
            return None
        return _sized(path, off, payload, size, total, asked[off], ranged=True)


def _sized(path: str, off: int, payload: memoryview, size: int, total: int | None,
           expected: int, *, ranged: bool) -> tuple[int, memoryview, int] | None:
    """An answered block at ``off`` of a file of ``size`` bytes, if it has the ``expected``
    length (else None: logged, ignored); ``ranged``: ``expected`` is what was asked.

    Raises:
        DownloadError: the file's size changed meanwhile, or a range asked ends past it.
    """
    if total is not None and size != total:
        raise tuf_exc.DownloadError(f"mqtt {path}: file size changed during the download")
    if ranged and off + expected > size:
        raise tuf_exc.DownloadError(f"mqtt {path}: the file has {size} bytes, the range "
                                    f"asked at {off} ends at {off + expected}")
    if len(payload) != expected:
        logger.warning("ignoring a block of %s at %d with %d bytes (expected %d)",
                       path, off, len(payload), expected)
        return None
    return off, payload, size


SPAN_BLOCKS = 16  # the most a bridge answers for one span (publisher._fairness)


class _Ask:
    """A range request in flight: from ``off``, ``length`` bytes, in ``blocks``."""

    __slots__ = ("attempts", "blocks", "busy", "deadline", "left", "length", "off",
                 "paused", "span")

    def __init__(self, off: int, length: int, blocks: list[int], attempts: int) -> None:
        self.off, self.length, self.blocks, self.attempts = off, length, blocks, attempts
        self.left = len(blocks)
        self.span = len(blocks) > 1
        self.deadline = 0.0
        self.busy = 0
        self.paused = False
