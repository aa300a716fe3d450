"""``modelward serve-mqtt``: answers block requests from the static repository.

Stateless: any number of bridges share one subscription (``$share/<group>/...``, the
group a secret: :func:`share_group`), and
each request is answered from the files as they are. It serves only regular files under
``metadata/`` and ``targets/`` of the repository, reached without following a symlink
(the publisher writes none; see :meth:`Bridge._open`), at most ``max_block`` bytes a
request, and answers only on the requesting device's own response topic.

One device cannot take it down (issue 14). paho's network thread only admits: it checks
the topic and correlation data, takes a token from the device's request bucket (none
left: dropped unanswered), parses the bounded request (:func:`parse_request`: every
field's type and range) and queues it for that device, within the device's byte bucket
and queue and the bridge's bounds (else a small 429/503 answer, after which the device
backs off and asks again). One worker thread serves the queues round-robin and reads the
next block only while the send queue (bytes handed to paho, not yet written to the
socket: answers go out at QoS 0, see :data:`ANSWER_QOS`) has room, so memory stays
bounded and a flooding device waits behind itself. Whatever a
handler raises is logged as one line and answered 500; :meth:`Bridge.healthy` is False
once the network thread or the worker has ended, and ``serve-mqtt`` then exits non-zero
so that systemd restarts it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from modelward.publisher._broker_config import check_id
from modelward.publisher._fairness import (
    MAX_REQUEST_BYTES,
    BadRequestError,
    BlockRequest,
    BridgeLimits,
    Scheduler,
    SendQueue,
    TokenBucket,
    extra_messages,
    parse_request,
)
from modelward.publisher.errors import OperatorInputError
from modelward.trust import _display as display
from modelward.trust._bounded import loads_bounded, read_bounded
from modelward.updater.bundle._tarstream import check_member_path
from modelward.updater.transport._mqtt import (
    BLOCK_HEADER,
    BLOCK_MAGIC,
    MqttConfig,
    MqttConnection,
    publish_properties,
)

__all__ = ["MAX_REQUEST_BYTES", "Bridge", "BridgeLimits", "BridgeStats", "announce",
           "share_group"]

logger = logging.getLogger(__name__)

SERVED_DIRS = ("metadata", "targets")
REQUEST_PACKET_LIMIT = MAX_REQUEST_BYTES + 4096  # a request, its topic and properties
# Answers go out at QoS 0 (a10-dynsec, docs/brokers.md "Resumed sessions"). At QoS 1
# mosquitto queued them for a parked persistent session of the device's fetcher and sent
# the whole unacknowledged window again on every CONNECT that resumed it (~16-20 MiB per
# 200-byte CONNECT, none of it charged to the device here). mosquitto queues no QoS 0
# message for an offline session (``queue_qos0_messages false``, which broker-config
# writes) and so re-sends none; the delivered QoS is min(publish, subscription), so a
# device subscribed at QoS 1 gets QoS 0 too, and asks again for a block lost on the way
# (``block_timeout``). For a connected client that never reads, mosquitto holds QoS 0
# packets up to ``max_queued_messages`` (a count), which broker-config keeps small
# (``MAX_QUEUED_MESSAGES``, 24: ~24 MiB of blocks).
ANSWER_QOS = 0
# An answer counts against the send queue until paho has written it to the socket (QoS 0:
# its on_publish, ``is_published``) or the connection it was queued on is lost: that is
# all it holds here (at QoS 1 it was until the broker's PUBACK). No time-out then: a
# packet paho still holds is memory, however long ago it was handed over.
SEND_TIMEOUT = 30.0 if ANSWER_QOS else float("inf")
# Requests are read at QoS 0 (delivered at min(0, the device's QoS 1)): mosquitto drops a
# QoS 1 delivery beyond a client's in-flight window (64) and ``max_queued_messages`` (24),
# and a fleet asking at once after an announcement is such a burst (1,000 requests from
# one connection: 234-656 reached a reading subscriber at QoS 1, all at QoS 0, which
# mosquitto writes out as the socket takes them, bounded by the count only while this
# bridge does not read).
REQUEST_QOS = 0
# Packets read per turn of paho's loop while more are there (paho: one): a flood of
# requests from one device is read and dropped as fast as it comes (:meth:`_within_rate`),
# so that the other devices' requests behind it in the socket are not kept waiting.
READ_PACKETS = 256
SENT_ENTRIES = 1024  # answers not yet written out (beyond: refusals are not sent)
DEVICE_SENT_ENTRIES = SENT_ENTRIES // 8  # of them one device's (a window of 16 and more)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass
class BridgeStats:
    """Counters (read by tests and benchmarks)."""

    requests: int = 0
    served_bytes: int = 0
    refused: int = 0  # answered 4xx/5xx
    dropped: int = 0  # over a device's request rate: not answered
    errors: int = 0  # a handler raised (answered 500)


@dataclass(frozen=True)
class _Job:
    device: str
    resp_topic: str
    corr: bytes
    req: BlockRequest


class Bridge:
    """Serve ``repo`` over MQTT for ``cfg.fleet``.

    Blocks are answered in format 2 (a binary header in the payload) to devices that ask
    for it, in format 1 (MQTT user properties) to the others. A format 3 request (a span:
    up to ``MAX_SPAN_BLOCKS`` blocks from one offset, one request instead of one a block)
    is answered block by block in format 2, on the request's correlation data, each block
    with its own offset in the header; its blocks count one by one against the device's
    queue and take their turns with the other devices' blocks.

    Args:
        repo: the repository directory (as served over HTTPS).
        cfg: broker connection (username is a bridge identity).
        group: shared-subscription group, a secret (see :func:`share_group`); None: the
            one derived from the bridge's own credential.
        max_block: largest block answered (1 MiB).
        limits: per-device and global bounds (see :class:`BridgeLimits`).
        connect: connect to the broker (False: tests drive :meth:`_on_message`).
    """

    formats: tuple[int, ...] = (1, 2, 3)

    def __init__(self, repo: Path, cfg: MqttConfig, group: str | None = None,
                 max_block: int = 1 << 20, limits: BridgeLimits | None = None,
                 connect: bool = True) -> None:
        if not (repo / "metadata").is_dir():
            raise OperatorInputError(f"{repo} is not a repository (no metadata/)")
        for d in SERVED_DIRS:  # followed by nothing below (see _open): say so at once
            if (repo / d).is_symlink():
                raise OperatorInputError(
                    f"{repo / d} is a symlink; the bridge follows no symlink below the "
                    "repository: give --repo the directory that holds the real metadata/ "
                    "and targets/")
        self.repo = repo.resolve()
        self.cfg = cfg
        self.max_block = max_block
        self.limits = limits or BridgeLimits()
        self.stats = BridgeStats()
        self._prefix = cfg.topic("repo/req/")
        self._prefix_bytes = self._prefix.encode()
        self._token_for: str | None = None  # see _within_rate
        self._sched: Scheduler[_Job] = Scheduler(self.limits)
        self._sent: SendQueue[Any] = SendQueue(SENT_ENTRIES, self.limits.send_bytes,
                                               SEND_TIMEOUT, _published,  # paho's infos
                                               DEVICE_SENT_ENTRIES)
        self._resp_prefix, self._resp_suffix = cfg.topic("devices/"), "/repo/resp"
        self._sent_lock = threading.Lock()
        self._errors_log = TokenBucket(1.0, 5, time.monotonic())  # admission failures
        self._stop = threading.Event()
        self._conn: MqttConnection | None = None
        self._worker = threading.Thread(target=self._work, name="bridge-worker", daemon=True)
        self._worker.start()
        if connect:
            try:
                self._conn = MqttConnection(
                    cfg, f"{cfg.client_name}-{os.getpid()}-{threading.get_ident() % 10000}",
                    [f"$share/{share_group(cfg, group)}/{cfg.topic('repo/req/+')}"],
                    self._on_admitted,
                    max_packet_size=REQUEST_PACKET_LIMIT,
                    qos=REQUEST_QOS,
                    publish_filter=self._within_rate,
                    read_packets=READ_PACKETS,
                )
            except BaseException:
                self._stop.set()
                raise

    def close(self) -> None:
        """Stop the worker and disconnect."""
        self._stop.set()
        self._worker.join(5)
        if self._conn is not None:
            self._conn.close()

    def healthy(self) -> str | None:
        """None while the worker and paho's network thread run, else what has ended."""
        if not self._worker.is_alive():
            return "the bridge worker thread has ended"
        if self._conn is not None:
            t = getattr(self._conn.client, "_thread", None)
            if not isinstance(t, threading.Thread) or not t.is_alive():
                return "paho's network thread has ended"
        return None

    # --- the network thread: admission only ---------------------------------------

    def _within_rate(self, topic: bytes, retain: bool) -> bool:
        """Whether a request on ``topic`` is within its device's request rate (a token
        taken), before paho decodes it: one over the rate is dropped here, unanswered,
        for the price of a dictionary lookup (a flooding device's requests must cost the
        network thread less than they cost the device to send: while that thread falls
        behind, every device's requests wait in the one socket behind the flood). Any
        other message (retained, or on a topic that names no device) is passed on to
        :meth:`_admit`, which ignores it and says so (or, if its decoded topic names a
        device after all, takes that device's token there: only the token taken here for
        the very device is not taken again)."""
        self._token_for = None
        if retain or not topic.startswith(self._prefix_bytes):
            return True
        try:
            device = topic[len(self._prefix_bytes):].decode()
            check_id("device id", device)
        except (UnicodeDecodeError, OperatorInputError):
            return True
        now = time.monotonic()
        if self._sched.allow(device, now):
            self._token_for = device  # (paho's thread: the message comes next, or none)
            return True
        self._over_rate(device, now)
        return False

    def _over_rate(self, device: str, now: float) -> None:
        self.stats.dropped += 1
        if self._sched.may_log(device, now):
            logger.warning("dropping requests from %s: over %g requests/s", device,
                           self.limits.requests_per_s,
                           extra={"device": device, "dropped": self.stats.dropped})

    def _on_admitted(self, msg: mqtt.MQTTMessage) -> None:
        """A message from the connection, after :meth:`_within_rate` saw its topic."""
        token_for, self._token_for = self._token_for, None
        self._on_message(msg, token_for)

    def _on_message(self, msg: mqtt.MQTTMessage, token_for: str | None = None) -> None:
        try:
            self._admit(msg, token_for)
        except Exception as e:  # noqa: BLE001 - one request must not end the thread
            self.stats.errors += 1
            with self._sent_lock:
                if not self._errors_log.take(1, time.monotonic()):
                    return
            # the raw topic bytes (msg.topic decodes them, and may raise again here)
            raw = getattr(msg, "_topic", None)
            logger.error("bridge: admitting a request on %r failed: %s: %r",
                         raw[:200] if isinstance(raw, bytes) else "?", type(e).__name__,
                         _cut(e))

    def _admit(self, msg: mqtt.MQTTMessage, token_for: str | None = None) -> None:
        """Admit ``msg``; ``token_for``: the device whose token :meth:`_within_rate` took
        for it (not taken again for that device)."""
        topic = msg.topic
        if msg.retain:
            # A request a device retained on its own topic would be handed to every bridge
            # that (re)subscribes, long after the device asked (or lost its credentials):
            # no device retains a request, so none is answered or parsed.
            logger.debug("ignoring a retained message on %r", topic[:200])
            return
        device = topic[len(self._prefix):] if topic.startswith(self._prefix) else ""
        try:
            check_id("device id", device)
        except OperatorInputError:
            logger.warning("ignoring a request on %r", topic[:200])
            return
        now = time.monotonic()
        if token_for != device and not self._sched.allow(device, now):
            self._over_rate(device, now)
            return
        resp_topic = self.cfg.topic(f"devices/{device}/repo/resp")
        props: Any = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None)
        asked_topic = getattr(props, "ResponseTopic", resp_topic)
        if not isinstance(corr, bytes) or len(corr) > 64 or asked_topic != resp_topic:
            self.stats.refused += 1
            if self._sched.may_log(device, now):
                logger.warning("refusing a request from %s: missing correlation data or a "
                               "response topic other than its own", device)
            return
        self.stats.requests += 1
        try:
            req = parse_request(msg.payload, self.max_block, f"the request on {topic}")
        except BadRequestError as e:  # answered in format 1, which every device reads
            self._refuse(device, resp_topic, corr, 1, 400, str(e), now)
            return
        if req.format == 3 and 3 not in self.formats:  # (as a bridge from before spans)
            self._refuse(device, resp_topic, corr, 1, 400, "format must be one of "
                         f"{self.formats}", now)
            return
        job = _Job(device, resp_topic, corr, req)
        parts = -(-req.length // req.block) if req.format == 3 else 1
        refusal = self._sched.offer(device, job, req.length, now, parts,
                                    extra_messages(req.length, parts, self.max_block))
        if refusal is None:
            logger.debug("queued path=%r offset=%d length=%d format=%d for %s", req.path,
                         req.offset, req.length, req.format, device)
        else:
            self._refuse(device, resp_topic, corr, req.format, refusal[0], refusal[1], now,
                         offset=req.offset)

    def _refuse(self, device: str, resp_topic: str, corr: bytes, fmt: int, status: int,
                why: str, now: float, offset: int = 0) -> None:
        self.stats.refused += 1
        if self._sched.may_log(device, now):
            logger.warning("refusing a request from %s: %d %r", device, status, why[:200],
                           extra={"device": device, "status": status})
        with self._sent_lock:
            room = self._sent.room_for_refusal(now, device)
        if not room:  # as many answers as SENT_ENTRIES (or as the device's share of
            # them) are not written out yet: the device
            self.stats.dropped += 1  # re-asks after its timeout
            return
        self._answer(resp_topic, corr, 2 if fmt in (2, 3) and 2 in self.formats else 1,
                     status, offset, 0, b"")

    # --- the worker: round-robin service ----------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            if self._conn is not None and self._conn.lost.is_set():
                # The devices' fetches over the lost connection have ended (or re-ask
                # after their timeout): what they queued is answered to nobody.
                dropped = self._sched.clear()
                if dropped:
                    logger.info("connection lost: dropped %d queued requests", dropped)
                self._stop.wait(0.1)
                continue
            with self._sent_lock:
                self._sent.prune(time.monotonic())  # what paho wrote out meanwhile
                full = self._sent.full_owners()
            # A device at its share of the send queue waits (its turn kept) while the
            # others are served: its many small or unacknowledged answers are not what
            # another device's next block waits behind.
            got = self._sched.take_part(0.02 if full else 0.5, full)
            if got is None:  # idle, or only devices at their share: wait a little
                continue
            job, part = got
            self._wait_for_room()
            try:
                self._serve(job, part)
            except Exception as e:  # noqa: BLE001 - one request must not end the worker
                self.stats.errors += 1
                self._sched.drop_rest(job.device, job)  # (a span: not its other blocks)
                if self._sched.may_log(job.device, time.monotonic()):  # counted in stats
                    logger.error("bridge: serving %r to %s failed: %s: %r",
                                 job.req.path[:200], job.device, type(e).__name__,
                                 str(e)[:200], extra={"device": job.device, "status": 500})
                try:
                    self._answer(job.resp_topic, job.corr, 1, 500, 0, 0, b"")
                except Exception as e2:  # noqa: BLE001 - nothing more to do for it
                    if self._sched.may_log(job.device, time.monotonic()):
                        logger.error("bridge: cannot answer %s: %s", job.device,
                                     type(e2).__name__)

    def _wait_for_room(self) -> None:
        """Until the send queue has room for a block (or the bridge stops)."""
        while not self._stop.is_set():
            with self._sent_lock:
                room = self._sent.room(self.max_block, time.monotonic())
                oldest = self._sent.oldest()
            if room or oldest is None:
                return
            try:
                oldest.wait_for_publish(0.05)
            except (RuntimeError, ValueError):  # published while not connected, or lost
                self._stop.wait(0.01)  # with the connection (see _published)

    def _serve(self, job: _Job, part: int = 0) -> None:
        """Answer block ``part`` of ``job`` (a span's parts in turn; else part 0 only)."""
        req = job.req
        status, size = 400, 0
        data: bytes | memoryview = b""
        fmt = 2 if req.format in (2, 3) and 2 in self.formats else 1
        offset = req.offset + part * req.block
        length = min(req.length - part * req.block, req.block) \
            if req.format == 3 else req.length
        try:
            size, data = self._read(req.path, offset, length)
            status = 200 if offset <= size else 416
            if req.format == 3 and (status != 200 or offset + length >= size):
                # past the end of the file (or at it): no more parts, whatever was asked
                self._sched.drop_rest(job.device, job)
            if status == 416 and part:
                return  # (the span's first part said so, or the file shrank: nothing more)
        except FileNotFoundError:
            status = 404
            if req.format == 3:
                self._sched.drop_rest(job.device, job)
        except (ValueError, OSError) as e:
            if req.format == 3:
                self._sched.drop_rest(job.device, job)
            self.stats.refused += 1
            if self._sched.may_log(job.device, time.monotonic()):
                logger.warning("refusing a request from %s: %r", job.device, str(e)[:200])
        self._answer(job.resp_topic, job.corr, fmt, status, offset, size, data)
        self.stats.served_bytes += len(data)
        logger.debug("served path=%r status=%d offset=%d bytes=%d to %s", req.path, status,
                     offset, len(data), job.device,
                     extra={"device": job.device, "status": status, "bytes": len(data)})

    def _answer(self, topic: str, corr: bytes, fmt: int, status: int, offset: int,
                size: int, data: bytes | memoryview) -> None:
        out = publish_properties()
        out.CorrelationData = corr
        payload: bytes | bytearray
        if fmt == 2:  # the block's header in the payload (see modelward.updater.transport._mqtt)
            framed = _framed(data)
            if framed is not None:  # read behind room for its header: no copy
                BLOCK_HEADER.pack_into(framed, 0, BLOCK_MAGIC, status, offset, size)
                payload = framed
            else:  # (a block from elsewhere, or none: a refusal)
                payload = _Framed(BLOCK_HEADER.size + len(data))
                BLOCK_HEADER.pack_into(payload, 0, BLOCK_MAGIC, status, offset, size)
                payload[BLOCK_HEADER.size:] = data
        else:
            payload = bytes(data)
            out.UserProperty = [("status", str(status)), ("offset", str(offset)),
                                ("size", str(size))]
        self._send(topic, payload, out)

    # --- I/O -----------------------------------------------------------------------

    def _open(self, path: str) -> int:
        """A descriptor of the regular file ``path`` under metadata/ or targets/.

        Opened one component at a time from the repository's directory, none of them
        followed if it is a symlink (``O_NOFOLLOW``): the publisher writes no symlinks
        there, so one is refused wherever it points (a loop, another file of the
        repository, outside it), and so are a FIFO, device or directory (``O_NONBLOCK``,
        then ``fstat``). Nothing but these two typed refusals leaves here.

        Raises:
            ValueError: an unsafe path, or one outside metadata/ and targets/ (400).
            FileNotFoundError: no such regular file, reached without a symlink (404).
        """
        check_member_path(path)
        parts = path.split("/")
        if parts[0] not in SERVED_DIRS or len(parts) < 2:
            raise ValueError(f"{path!r} is outside metadata/ and targets/")
        fd = -1
        try:
            d = os.open(self.repo, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for name in parts[:-1]:
                    sub = os.open(name, _DIR_FLAGS, dir_fd=d)
                    os.close(d)
                    d = sub
                fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=d)
            finally:
                os.close(d)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            return fd
        except (OSError, ValueError) as e:  # ELOOP, ENOTDIR, ENOENT, a surrogate, ...
            if fd >= 0:
                os.close(fd)
            raise FileNotFoundError(errno.ENOENT, "no such regular file", path) from e

    def _read(self, path: str, offset: int, length: int) -> tuple[int, bytes | memoryview]:
        """Size of the file and up to ``length`` bytes from ``offset``: a view of a buffer
        with room for the block's format 2 header in front (:func:`_framed`), so that the
        answer is the buffer itself, not the header and the block copied together.

        The buffer is sized for what the read can return, not for ``length``: paho keeps
        it until it is written to the socket and the send queue counts only the bytes read, so a
        file's last block holds no more than it counts. That is ``length``, or, nearer the
        end, what ``fstat`` leaves from ``offset`` plus one byte: a file grown since then
        reads as more than the size the answer gives, an answer the device ignores (and
        asks again). A read shorter than that (the file shrank meanwhile) is copied into
        a buffer of its size."""
        fd = self._open(path)
        try:
            size = os.fstat(fd).st_size
            if offset > size:
                return size, b""
            want = min(length, size - offset + 1)
            buf = _Framed(BLOCK_HEADER.size + want)
            with memoryview(buf) as whole, whole[BLOCK_HEADER.size:] as tail:
                n = os.preadv(fd, [tail], offset)
                if n + 1 < want:  # (shrunk since fstat: no buffer kept mostly unused)
                    buf = _Framed(whole[:BLOCK_HEADER.size + n])
            if n + 1 == want:  # (the end of the file, where fstat said: one byte kept)
                del buf[BLOCK_HEADER.size + n:]
            return size, memoryview(buf)[BLOCK_HEADER.size:]
        finally:
            os.close(fd)

    def _send(self, topic: str, data: bytes | bytearray, props: Any) -> None:
        if self._conn is None:
            return
        info = self._conn.client.publish(topic, data, qos=ANSWER_QOS, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            logger.warning("publishing to %s: %s (dropped: the device asks again)", topic,
                           mqtt.error_string(info.rc))
        with self._sent_lock:
            now = time.monotonic()
            self._sent.prune(now)  # whoever sends releases what was written out
            self._sent.add(info, _block_bytes(data), now, self._owner(topic))

    def _owner(self, topic: str) -> str | None:
        """The device whose response topic ``topic`` is (its share of the send queue)."""
        if topic.startswith(self._resp_prefix) and topic.endswith(self._resp_suffix):
            return topic[len(self._resp_prefix):-len(self._resp_suffix)]
        return None


class _Framed(bytearray):
    """A format 2 answer: :data:`BLOCK_HEADER`'s room, then the block. :meth:`Bridge._read`
    reads a block into one (handing on the view after the room), :meth:`Bridge._answer`
    packs the header into it (or builds one for a block from elsewhere) and sends it;
    nothing else is one, so the send queue knows a payload's header by its type
    (:func:`_block_bytes`), not by what its bytes look like."""


def _framed(data: bytes | memoryview) -> _Framed | None:
    """The buffer ``data`` was read into behind room for its header, if it was."""
    if isinstance(data, memoryview) and isinstance(data.obj, _Framed) and \
            len(data.obj) == BLOCK_HEADER.size + data.nbytes:
        return data.obj
    return None


def _block_bytes(payload: bytes | bytearray) -> int:
    """The bytes of a block an answer carries, which the send queue counts: its format 2
    header left out (22 bytes, bounded by the count of answers), so that
    ``send_bytes`` of 4 MiB holds 4 blocks of 1 MiB, not 3 (with 3, the worker waited
    for room before each block: 10-15 % of a 256 MiB transfer, measured at QoS 1).

    The header is known from what :meth:`Bridge._answer` built (a :class:`_Framed` in
    format 2), never guessed from the payload's bytes: a format 1 answer is the file's
    bytes, whatever they are, and counts in full (as does anything else sent)."""
    if isinstance(payload, _Framed):
        return len(payload) - BLOCK_HEADER.size
    return len(payload)


def _cut(e: BaseException) -> str:
    """The start of ``e``'s message, whatever its ``__str__`` does."""
    try:
        return str(e)[:200]
    except Exception:  # noqa: BLE001 - a log line must not raise
        return "?"


MIN_GROUP_CHARS = 20


def share_group(cfg: MqttConfig, group: str | None = None) -> str:
    """The bridges' shared-subscription group name.

    mosquitto (2.0: ``acl_file`` checks no SUBSCRIBE) grants a device
    ``$share/<group>/<fleet>/repo/req/+`` and then drops, on its read ACL, the share of
    every other device's requests it hands that device: a device that knows the group
    silently eats part of the fleet's requests. So the name is a secret: by default
    derived from the bridge's own credential (the password ``fleet broker-config``
    generates into ``credentials/modelward-bridge``, else its client key), so that
    every bridge with that credential joins one group and no device can name it.

    Raises:
        OperatorInputError: an explicit ``group`` shorter than :data:`MIN_GROUP_CHARS`
            or not an MQTT-safe name, or no credential to derive one from.
    """
    if group is not None:
        check_id("shared-subscription group", group)
        if len(group) < MIN_GROUP_CHARS:
            raise OperatorInputError(
                f"shared-subscription group {group!r} is guessable: a device that names it "
                f"takes a share of every device's requests; use at least {MIN_GROUP_CHARS} "
                "random characters, or leave it out (derived from the bridge password)")
        return group
    secret: bytes | None = cfg.password.encode() if cfg.password else None
    if secret is None and cfg.key_file:
        try:
            secret = Path(cfg.key_file).read_bytes()
        except OSError as e:
            raise OperatorInputError(f"cannot read the bridge key {cfg.key_file}: {e}") from e
    if not secret:
        raise OperatorInputError("the bridge has no password or client key to derive its "
                                 "shared-subscription group from: pass --group SECRET")
    digest = hashlib.sha256(b"modelward bridge share group\0" + secret).hexdigest()
    return f"modelward-bridges-{digest[:32]}"


def _published(info: Any) -> bool:
    """Whether paho holds the message of ``info`` no more: at QoS 0, written to the socket
    (paho sets it published then), dropped with a lost connection (rc CONN_LOST, set
    published too), or never queued (rc NO_CONN: paho drops a QoS 0 publish made while
    disconnected); at QoS 1, acknowledged by the broker (a message published while the
    connection was down keeps ``rc`` NO_CONN, on which ``is_published`` raises even after
    paho re-sent it on the reconnect and the broker acknowledged it)."""
    if ANSWER_QOS == 0 and getattr(info, "rc", mqtt.MQTT_ERR_SUCCESS) not in (
            mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
        return True
    try:
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        return bool(getattr(info, "_published", False))


def announce(repo: Path, cfg: MqttConfig) -> int:
    """Publish the retained hint ``{timestamp_version, published_at}``; returns the version.

    Raises:
        OperatorInputError: no timestamp metadata in ``repo``.
        TransportError: the broker refused or did not acknowledge.
    """
    path = repo / "metadata" / "timestamp.json"
    try:
        data = read_bounded(path, 1 << 20)  # no symlink followed, no FIFO waited on
        if data is None:
            raise FileNotFoundError(f"{path} does not exist")
        version = loads_bounded(data, max_bytes=1 << 20, what="timestamp.json")[
            "signed"]["version"]
        if type(version) is not int or version < 1:
            raise ValueError(f"its version is {version!r}, not a positive integer")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OperatorInputError(f"{display.escape(str(path))} is unreadable: "
                                 f"{display.escape(str(e))}",
                                 hint="publish a release first (`modelward publish`)") from e
    from datetime import UTC, datetime

    body = json.dumps({"timestamp_version": version,
                       "published_at": datetime.now(UTC).isoformat(timespec="seconds")})
    conn = MqttConnection(cfg, f"{cfg.client_name}-announce-{os.getpid()}", [])
    try:
        conn.publish(cfg.topic("announce"), body.encode(), retain=True, wait=True)
    finally:
        conn.close()
    return version
