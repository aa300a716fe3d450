"""The operator end of the request channel to devices: ``fleet attest`` and ``fleet
audit`` (protocol: :mod:`modelward.updater.transport._rpc`).

:class:`RpcClient` sends one request per device, each with a fresh nonce and its own
correlation data, at most :data:`WINDOW` outstanding at once (the broker holds a bounded
queue per client), and hands back each device's answer as it completes. An answer is
believed to come from device ``<id>`` only because it arrives on ``<id>``'s response
topic (the ACL lets no other identity write there), and only if its correlation data and
nonce are those of ``<id>``'s outstanding request: anything else is stale (an answer to
an earlier run, a replay, another operator's), ignored and counted.

What an answer *says* is checked by the verifier of its kind (:data:`VERIFIERS`):
``attest`` is ``modelward.publisher._attest.verify_answer`` (signature by the enrolled
AK, nonce, event-log replay, fingerprint -> signed release); ``audit`` is
``modelward.publisher._audit.verify_audit``.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from modelward.publisher._attest import Attested, check_history
from modelward.publisher._broker_config import check_id
from modelward.trust._audit import MAX_CHUNK_BYTES
from modelward.trust._bounded import loads_bounded
from modelward.trust.errors import ModelwardError, UntrustedRemoteError
from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqttconn import MqttConnection, publish_properties
from modelward.updater.transport._rpc import (
    CHUNK_BYTES,
    MAX_AUDIT_LIMIT,
    MAX_PARTS,
    Assembly,
    Request,
    RpcFormatError,
    parse_chunk,
    req_topic,
    resp_topic,
)

logger = logging.getLogger(__name__)

WINDOW = 16  # requests outstanding at once (answers queued for the operator: 24 at most)
NONCE_BYTES = 32
MAX_AUDIT_CHUNKS = 64  # audit requests per device (64 x 256 entries)
AUDIT_PACE = 0.3  # seconds between two audit requests (the device admits 4/s, burst 4)
FLOOD_SLACK = 8  # messages a device may send beyond MAX_PARTS per request (stale answers)


@dataclass
class Answer:
    """One device's answer (or its absence).

    Attributes:
        device: the device id.
        request: what was asked.
        document: the answer's JSON document (None: none, or an error).
        error: the device's error reason, ``"no answer"``, or a format error.
        latency_s: seconds from sending the request to the complete answer.
    """

    device: str
    request: Request
    document: dict[str, Any] | None = None
    error: str | None = None
    latency_s: float | None = None


@dataclass
class _Pending:
    device: str
    request: Request
    sent: float
    assembly: Assembly = field(default_factory=Assembly)


class RpcClient:
    """The operator's connection for requests to devices.

    Args:
        cfg: the broker settings (the operator's identity).
        clock: monotonic seconds.

    Raises:
        TransportError: as :class:`~modelward.updater.transport._mqttconn.MqttConnection`.
    """

    def __init__(self, cfg: MqttConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.prefix = cfg.topic("").rstrip("/")
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[bytes, _Pending] = {}
        self._done: queue.Queue[Answer] = queue.Queue()
        self.stale = 0  # answers for no outstanding request (correlation, nonce, device)
        self.malformed = 0
        # Each device's response topic is subscribed only while it has a request out, and
        # each may send at most MAX_PARTS packets a request (+ slack): the broker queues a
        # bounded number of messages for this client, so one device flooding its own topic
        # would make it drop the others' answers. A device over its allowance is cut off
        # (unsubscribed, its request failed as "flooding"), and the requests that went
        # unanswered meanwhile are asked once more.
        self._subscribed: set[str] = set()
        self._received: dict[str, int] = {}  # messages on a device's topic
        self._allowed: dict[str, int] = {}  # MAX_PARTS per request sent (+ slack)
        self.flooding: set[str] = set()
        self._cut: set[str] = set()
        self._conn = MqttConnection(
            cfg, f"{cfg.client_name}-rpc-{secrets.token_hex(4)}", [], self._on_message)

    def _device_of(self, topic: str) -> str | None:
        head, tail = f"{self.prefix}/devices/", "/rpc/resp"
        if topic.startswith(head) and topic.endswith(tail):
            d = topic[len(head):-len(tail)]
            return d if d and "/" not in d else None
        return None

    def _on_message(self, msg: mqtt.MQTTMessage) -> None:  # paho's thread
        device = self._device_of(msg.topic)
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        what = f"an answer on {msg.topic[:200]!r}"
        if device is not None:
            with self._lock:
                self._received[device] = n = self._received.get(device, 0) + 1
                if n > self._allowed.get(device, 0) and device not in self.flooding:
                    self.flooding.add(device)  # (cut off by ask(), in its own thread)
                if device in self.flooding:
                    return
        if device is None or not isinstance(corr, bytes) or msg.retain:
            self.stale += 1
            return
        try:
            chunk = parse_chunk(bytes(msg.payload), what)
        except RpcFormatError as e:
            self.malformed += 1
            logger.debug("%s", e)
            return
        with self._lock:
            p = self._pending.get(corr)
            if p is None or p.device != device or chunk.nonce != p.request.nonce or \
                    chunk.kind != p.request.kind:
                self.stale += 1
                return
            if chunk.error is not None:
                del self._pending[corr]
                self._done.put(Answer(device, p.request, error=f"device: {chunk.error}",
                                      latency_s=self._clock() - p.sent))
                return
            try:
                body = p.assembly.add(chunk, what)
            except RpcFormatError as e:
                del self._pending[corr]
                self._done.put(Answer(device, p.request, error=str(e)))
                return
            if body is None:
                return
            del self._pending[corr]
        latency = self._clock() - p.sent
        try:
            doc = loads_bounded(body, max_bytes=MAX_PARTS * CHUNK_BYTES, max_depth=16,
                                what=what)
            if not isinstance(doc, dict):
                raise RpcFormatError("not a JSON object", what=what)
        except ValueError as e:  # UntrustedJsonError, RpcFormatError
            self._done.put(Answer(device, p.request, error=str(e)[:300], latency_s=latency))
            return
        self._done.put(Answer(device, p.request, document=doc, latency_s=latency))

    def _send(self, device: str, req: Request) -> None:
        corr = secrets.token_bytes(16)
        props = publish_properties()
        props.ResponseTopic = resp_topic(self.prefix, device)
        props.CorrelationData = corr
        with self._lock:
            self._allowed[device] = self._allowed.get(device, FLOOD_SLACK) + MAX_PARTS
        if device not in self._subscribed:
            self._conn.subscribe(resp_topic(self.prefix, device))
            self._subscribed.add(device)
        with self._lock:
            self._pending[corr] = _Pending(device, req, self._clock())
        self._conn.publish(req_topic(self.prefix, device), req.to_bytes(), props=props)

    def _release(self, device: str) -> None:
        """Unsubscribe ``device``'s topic once nothing is asked of it (main thread)."""
        with self._lock:
            busy = any(p.device == device for p in self._pending.values())
        if not busy and device in self._subscribed:
            self._subscribed.discard(device)
            self._conn.unsubscribe(resp_topic(self.prefix, device))

    def _cut_flooders(self) -> list[Answer]:
        """Cut off the devices over their allowance: their requests fail as "flooding"."""
        with self._lock:
            new = self.flooding - self._cut
            gone = [(c, p) for c, p in self._pending.items() if p.device in new]
            for c, _ in gone:
                del self._pending[c]
        for d in sorted(new):
            self._cut.add(d)
            logger.warning("%s sent more than %d messages on its response topic: cut off "
                           "(its answers are not read; ask it again later)", d,
                           self._allowed.get(d, 0))
            self._release(d)
        return [Answer(p.device, p.request, error="flooding: more messages than its "
                       "answers can have") for _, p in gone]

    def ask(self, requests: Iterable[tuple[str, Request]], timeout: float,
            window: int = WINDOW) -> Iterable[Answer]:
        """Send ``requests`` (at most ``window`` outstanding) and yield each answer as it
        completes; a request unanswered ``timeout`` seconds after it was sent yields an
        answer with ``error="no answer"``.

        Raises:
            TransportError: a request cannot be published.
        """
        todo = list(requests)
        for device, _ in todo:
            check_id("device id", device)
        left = len(todo)
        retried: set[str] = set()
        while left:
            with self._lock:
                room = window - len(self._pending)
            while todo and room > 0:
                self._send(*todo.pop(0))
                room -= 1
            for a in self._cut_flooders():
                left -= 1
                yield a
            with self._lock:
                oldest = min((p.sent for p in self._pending.values()), default=None)
            wait = 0.05 if oldest is None else max(0.0, oldest + timeout - self._clock())
            try:
                a = self._done.get(timeout=min(wait, 0.5) if wait > 0 else 0.001)
            except queue.Empty:
                pass
            else:
                self._release(a.device)
                left -= 1
                yield a
                continue
            now = self._clock()
            with self._lock:
                late = [c for c, p in self._pending.items() if now - p.sent >= timeout]
                gone = [self._pending.pop(c) for c in late]
            for p in gone:
                self._release(p.device)
                if self._cut and p.device not in retried and p.device not in self._cut:
                    retried.add(p.device)  # (its answer may have been dropped for a flood)
                    todo.append((p.device, p.request))
                    continue
                left -= 1
                yield Answer(p.device, p.request, error="no answer")

    def close(self) -> None:
        """Disconnect."""
        self._conn.close()


# -- verification -----------------------------------------------------------------

#: Tests may put another callable here for a kind (``attest``: ``verify_answer``'s
#: arguments; ``audit``: :func:`verify_fetched_audit`'s).
VERIFIERS: dict[str, Callable[..., Any]] = {}


def verifier(kind: str) -> Callable[..., Any]:
    """The verifier of ``kind`` (``attest``, ``audit``)."""
    fn = VERIFIERS.get(kind)
    if fn is not None:
        return fn
    if kind == "attest":
        from modelward.publisher._attest import verify_answer

        return verify_answer
    return verify_fetched_audit


@dataclass
class AttestRow:
    """One device's ``fleet attest`` result.

    Attributes:
        device: the device id.
        attested: the verifier's result (None: failed).
        reason: why it failed (``"wrong key"``, ``"stale nonce"``, ``"no answer"``...).
        detail: the failure's message.
        latency_s: request sent -> answer verified.
        verify_s: the verification alone.
    """

    device: str
    attested: Any = None
    reason: str | None = None
    detail: str | None = None
    latency_s: float | None = None
    verify_s: float | None = None


def make_nonce() -> bytes:
    """A fresh nonce (:func:`modelward.publisher._attest.make_nonce`)."""
    from modelward.publisher._attest import make_nonce as fresh

    return fresh()


def attest_devices(client: RpcClient, fleet_dir: Path, devices: list[str], timeout: float,
                   releases: Callable[[str], Any]) -> list[AttestRow]:
    """Attest ``devices`` concurrently: one fresh nonce each, every answer verified as it
    arrives against ``fleet_dir/devices/<id>.ak.json``; rows in ``devices`` order."""
    verify = verifier("attest")
    reqs = [(d, Request("attest", make_nonce())) for d in devices]
    rows: dict[str, AttestRow] = {}
    for a in client.ask(reqs, timeout):
        row = AttestRow(a.device)
        rows[a.device] = row
        if a.document is None:
            row.reason = "no answer" if a.error == "no answer" else "device error"
            row.detail = a.error
            row.latency_s = a.latency_s  # (the device's error answer came this fast)
            continue
        t0 = time.perf_counter()
        try:
            row.attested = verify(a.document, a.device,
                                  fleet_dir / "devices" / f"{a.device}.ak.json",
                                  a.request.nonce, releases)
            if isinstance(row.attested, Attested):
                check_history(fleet_dir, a.device, row.attested)
        except ModelwardError as e:
            row.attested = None
            row.reason = str(getattr(e, "reason", None) or type(e).__name__)
            row.detail = str(e)
        row.verify_s = time.perf_counter() - t0
        row.latency_s = (a.latency_s or 0.0) + row.verify_s
    return [rows[d] for d in devices]


def fetch_audit(client: RpcClient, device: str, timeout: float,
                max_chunks: int = MAX_AUDIT_CHUNKS, pace: float = AUDIT_PACE,
                sleep: Callable[[float], None] = time.sleep,
                segment: str = "live") -> list[dict[str, Any]]:
    """Every audit chunk of ``device``, asked for in turn (``offset``, ``limit`` of
    :data:`~modelward.updater.transport._rpc.MAX_AUDIT_LIMIT` entries) until a chunk
    names no ``next`` offset beyond its own, at most ``max_chunks``; a request at most
    every ``pace`` seconds (the device drops requests beyond 4 a second).

    Raises:
        UntrustedRemoteError: no answer, an error answer, a ``next`` that does not move
            forward, or more than ``max_chunks`` chunks.
    """
    chunks: list[dict[str, Any]] = []
    offset = 0
    last: float | None = None
    while True:
        if last is not None:
            sleep(max(0.0, last + pace - time.monotonic()))
        last = time.monotonic()
        if len(chunks) >= max_chunks:
            raise UntrustedRemoteError(f"{device}'s audit log needs more than {max_chunks} "
                                       "chunks: refused (bounded total)")
        req = Request("audit", make_nonce(), offset, MAX_AUDIT_LIMIT, segment)
        (a,) = list(client.ask([(device, req)], timeout, window=1))
        if a.document is None:
            raise UntrustedRemoteError(f"{device} sent no audit chunk at offset {offset}: "
                                       f"{a.error}")
        doc = a.document
        entries = doc.get("entries")
        if doc.get("offset") != offset or not isinstance(entries, list) \
                or len(entries) > MAX_AUDIT_LIMIT or sum(
                    len(e) + 1 if isinstance(e, str) else MAX_CHUNK_BYTES for e in entries
                ) > MAX_CHUNK_BYTES:
            raise UntrustedRemoteError(
                f"{device}'s audit chunk at offset {offset} is not the one asked for (its "
                f"offset, or more than {MAX_AUDIT_LIMIT} entries or {MAX_CHUNK_BYTES} bytes)")
        chunks.append(doc)
        nxt = doc.get("next")
        if nxt is None:
            return chunks
        if not isinstance(nxt, int) or isinstance(nxt, bool) or nxt != offset + len(entries) \
                or not entries:
            raise UntrustedRemoteError(f"{device}'s audit chunk at offset {offset} names "
                                       f"next offset {str(nxt)[:40]!r}, not the entry after "
                                       "its last")
        offset = nxt


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, -(-int(q * 100) * len(s) // 100) - 1))]


@dataclass(frozen=True)
class SignedRelease:
    """A release the operator's repository signs, found by its model fingerprint."""

    name: str
    version: str
    channel: str
    withdrawn: bool


def model_names_of(targets: Any) -> set[str]:
    """The model names a targets role reaches: its own paths' first components, and its
    delegations' path patterns up to their first wildcard (``classifier/*``)."""
    names = {p.split("/", 1)[0] for p in targets.targets}
    roles = targets.delegations.roles if targets.delegations is not None and \
        targets.delegations.roles is not None else {}
    for role in roles.values():
        for pattern in role.paths or []:
            head = pattern.split("/", 1)[0]
            if head and not any(c in head for c in "*?["):
                names.add(head)
    return names


def release_index(repo_dir: Path, keys: Path) -> Callable[[str], SignedRelease | None]:
    """fingerprint -> the signed release of every model in the repository at
    ``repo_dir``, verified from the root anchored in ``keys`` (read-only, as
    ``fleet status --summary``); the operator's own entry for a version wins over a
    team's.

    Raises:
        MissingAnchorError: ``keys`` holds no trusted root.
        RepositoryStateError: the repository does not verify (naming the file).
    """
    from modelward.publisher._repo import Repository
    from modelward.updater.bundle._fields import modelward_field, read_fields
    from modelward.updater.install._search import TOP

    repo = Repository(repo_dir, keys, b"unused: attestation reads public metadata only")
    repo.adopt_anchor = False
    targets = repo.current()[0]
    index: dict[str, tuple[bool, SignedRelease]] = {}
    for name in sorted(model_names_of(targets)):
        for f in repo.releases(name, targets):
            try:
                fl = read_fields(modelward_field(f.target.custom) or {})
            except (KeyError, ValueError, TypeError, AttributeError):
                continue
            if fl.name != name or not isinstance(fl.fingerprint, str):
                continue
            top = f.role == TOP
            rel = SignedRelease(name, str(fl.version), fl.channel, fl.withdrawn)
            if fl.fingerprint not in index or (top and not index[fl.fingerprint][0]):
                index[fl.fingerprint] = (top, rel)
    return lambda fp: index[fp][1] if fp in index else None


def verify_fetched_audit(chunks: list[dict[str, Any]], fleet_dir: Path, device: str, *,
                         status: Path | None = None, allow_tail: bool = False,
                         head: Any = None, old: list[dict[str, Any]] | None = None) -> Any:
    """The history in the audit chunks fetched from ``device``, its chain and checkpoint
    verified with the enrolled identity key, and its end with the head of the newest
    signed status report kept (or ``status``).

    Raises:
        AuditError: the chunks do not join up (``malformed``), or the log does not verify
            (the first bad entry named).
        OperatorInputError: the device is not enrolled, or no report is kept.
    """
    from modelward.publisher._audit import enrolled_pem, signed_head
    from modelward.trust._auditchain import (
        MAX_CHECKPOINT_BYTES,
        MAX_LINE_BYTES,
        verify_segments,
    )
    from modelward.trust.errors import AuditError

    def bad(what: str) -> AuditError:
        return AuditError(f"{device}'s audit chunks: {what}", seq=None, line=0,
                          reason="malformed")

    def joined(chunks: list[dict[str, Any]]) -> tuple[list[bytes], bytes | None]:
        lines: list[bytes] = []
        checkpoint: bytes | None = None
        for k, c in enumerate(chunks):
            entries = c.get("entries")
            if c.get("offset") != len(lines) or not isinstance(entries, list):
                raise bad(f"chunk {k} does not start where the one before it ended")
            for e in entries:
                if not isinstance(e, str) or len(e) > MAX_LINE_BYTES or not e.isascii():
                    raise bad(f"chunk {k} holds an entry that is not a line of at most "
                              f"{MAX_LINE_BYTES} ASCII characters")
                lines.append(e.encode())
            if k == 0:
                cp = c.get("checkpoint")
                if cp is not None and (not isinstance(cp, str)
                                       or len(cp) > MAX_CHECKPOINT_BYTES):
                    raise bad("the checkpoint is not a string within its bound")
                checkpoint = cp.encode() if cp is not None else None
        return lines, checkpoint

    segments: list[tuple[list[bytes], bytes | None, str]] = []
    if old:
        old_lines, old_cp = joined(old)
        if old_lines:  # (none kept: the live segment's checkpoint stands alone)
            segments.append((old_lines, old_cp, "old.jsonl"))
    segments.append((*joined(chunks), ""))
    if head is None:
        head, _at = signed_head(fleet_dir, device, status)
    return verify_segments(segments, head, enrolled_pem(fleet_dir, device),
                           allow_tail=allow_tail)
