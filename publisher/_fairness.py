"""What the bridge decides about a request, apart from MQTT: parsing, limits, fairness.

Pure over the time it is given (``now``), so every decision is unit-tested without a
broker:

* :func:`parse_request` bounds the size before parsing and checks every field's type and
  range (a path, an offset below 2**63, a length of one block at most in format 1 or 2,
  of at most :data:`MAX_SPAN_BLOCKS` blocks in format 3: a span, answered block by block,
  in blocks of at least :data:`MIN_SPAN_BLOCK`).
* :class:`TokenBucket`: ``rate`` tokens a second, at most ``burst`` saved up.
* :class:`Scheduler`: per device a request bucket, a byte bucket and a queue of at most
  ``device_queue`` blocks (a span counts every block it will send; its blocks beyond those
  its bytes need at the bridge's block size cost a request token each:
  :func:`extra_messages`); all queues together
  ask for at most ``queued_bytes``. :meth:`Scheduler.take_part` serves the devices
  round-robin, one block each in turn (a span stays at the front of its device's queue
  until its last block), and a device whose queue was empty first, so a device that floods
  (with many requests or with long spans) waits behind itself, never in front of another
  device.
* :class:`SendQueue`: the answers handed to the MQTT client and not yet done (the bridge:
  written to the socket), bounded
  by count and bytes, and by count per device (its share: the worker serves another
  device meanwhile, and a refusal beyond it is not sent); a done one is
  released at the next send or prune, whoever sends it (a refusal from the network
  thread, a block from the worker).
"""

from __future__ import annotations

import argparse
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from modelward.trust._bounded import loads_bounded

MAX_REQUEST_BYTES = 16 * 1024  # a request is one short line of JSON
MAX_PATH_CHARS = 1024
MAX_OFFSET = (1 << 63) - 1  # what a file offset (off_t) can be
FORMATS = (1, 2, 3)
MAX_SPAN_BLOCKS = 16  # blocks one format 3 request may ask for (its length: this many blocks)
# The smallest block a span is answered in (or the bridge's block, if smaller): a span
# naming a smaller one is answered in blocks of this size (one message for a short span),
# so a message always carries a block's worth of the bytes the device is charged for.
MIN_SPAN_BLOCK = 4096


class BadRequestError(ValueError):
    """A request that is not one block request; the message names the field at fault."""


@dataclass(frozen=True)
class BlockRequest:
    """One validated block request."""

    path: str
    offset: int
    length: int
    format: int
    block: int = 0  # format 3: the size of each block answered (0: not a span)


def _int_field(req: dict[str, Any], name: str, low: int, high: int) -> int:
    v = req.get(name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise BadRequestError(f"{name} must be an integer, not {type(v).__name__}")
    if not low <= v <= high:
        raise BadRequestError(f"{name} {v if abs(v) < 1 << 70 else '(huge)'} is outside "
                              f"{low}..{high}")
    return v


def parse_request(payload: bytes | bytearray, max_block: int, what: str) -> BlockRequest:
    """The request in ``payload``: ``{"path", "offset", "length"[, "format"][, "block"]}``;
    ``length`` at most ``max_block``, or in format 3 (a span, answered in blocks of
    ``block`` bytes, at most and by default ``max_block``, at least
    ``min(MIN_SPAN_BLOCK, max_block)``: a smaller one is raised to it)
    ``MAX_SPAN_BLOCKS * block``.

    Raises:
        BadRequestError: too large (checked before parsing), too deep, not JSON, not an
            object, or a field of the wrong type or out of range.
    """
    if len(payload) > MAX_REQUEST_BYTES:
        raise BadRequestError(f"{what} has {len(payload)} bytes (at most "
                              f"{MAX_REQUEST_BYTES})")
    try:
        req = loads_bounded(payload, max_bytes=MAX_REQUEST_BYTES, max_depth=2, what=what)
    except ValueError as e:  # UntrustedJsonError
        raise BadRequestError(str(e)) from e
    if not isinstance(req, dict):
        raise BadRequestError(f"{what} is a JSON {type(req).__name__}, not an object")
    path = req.get("path")
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_CHARS:
        raise BadRequestError(f"path must be a string of 1-{MAX_PATH_CHARS} characters")
    fmt = req.get("format", 1)
    if fmt not in FORMATS or isinstance(fmt, bool) or not isinstance(fmt, int):
        raise BadRequestError(f"format must be one of {FORMATS}")
    if fmt != 3:
        return BlockRequest(path, _int_field(req, "offset", 0, MAX_OFFSET),
                            _int_field(req, "length", 1, max_block), fmt)
    block = _int_field(req, "block", 1, max_block) if "block" in req else max_block
    block = max(block, min(MIN_SPAN_BLOCK, max_block))  # (one-byte blocks: see above)
    return BlockRequest(path, _int_field(req, "offset", 0, MAX_OFFSET),
                        _int_field(req, "length", 1, MAX_SPAN_BLOCKS * block), fmt, block)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; starts full."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, now

    def take(self, n: float, now: float) -> bool:
        """Take ``n`` tokens if there are; whether it did. A rate of 0 is no limit."""
        if self.rate <= 0:
            return True
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if n > self.tokens:
            return False
        self.tokens -= n
        return True

    def give(self, n: float) -> None:
        """Give back ``n`` tokens taken (a request refused after they were)."""
        self.tokens = min(self.burst, self.tokens + n)


def extra_messages(length: int, parts: int, max_block: int) -> int:
    """The messages a request of ``length`` bytes sent as ``parts`` blocks makes beyond
    those its bytes need in the bridge's blocks of ``max_block``: each costs the device
    one more request token, so that a device's messages a second stay within its
    requests a second plus its bytes a second over ``max_block``, as before spans (one
    message a request), whatever block size its spans name."""
    return max(0, parts - -(-length // max_block))


@dataclass(frozen=True)
class BridgeLimits:
    """What one device may ask of the bridge, and what all of them may together.

    Args:
        requests_per_s, request_burst: requests a device may send (beyond: dropped
            unanswered; a device that sends more is not following the protocol). The
            blocks of a span beyond those its bytes need at the bridge's block size
            count as requests too (beyond: 429), so the messages a device makes the
            bridge send stay bounded whatever block size it names.
        bytes_per_s, byte_burst: bytes a device may ask for (beyond: refused with 429,
            and the device backs off). 0: no byte limit.
        device_queue: blocks queued for one device at once, a span counting each block it
            will send (beyond: 429). The device keeps ``MqttConfig.window`` (16) blocks in
            flight; a few more are its re-requests.
        queued_bytes: bytes all queued requests ask for together (beyond: 503).
        send_bytes: bytes of blocks handed to paho and not yet written to the broker
            (the send queue: the bridge answers at QoS 0; it reads the next block only
            when there is room; each answer's 22-byte header is not counted, the
            number of answers bounds those).
        devices: devices whose buckets are remembered (the least recently seen idle one
            is forgotten first).
    """

    requests_per_s: float = 50.0  # a fetch asks for ~16 a second, a refresh for a few
    request_burst: int = 100
    bytes_per_s: float = 16 << 20
    byte_burst: int = 16 << 20
    device_queue: int = 32
    queued_bytes: int = 256 << 20
    send_bytes: int = 4 << 20
    devices: int = 10_000


J = TypeVar("J")


@dataclass
class _Device(Generic[J]):
    requests: TokenBucket
    bytes: TokenBucket
    logs: TokenBucket  # refusal log lines: one a second, a few saved
    queue: deque[list[Any]] = field(default_factory=deque)  # [job, cost, parts, next part]
    parts: int = 0  # blocks queued (what ``device_queue`` bounds)


class Scheduler(Generic[J]):
    """Per-device admission and round-robin service (thread-safe).

    :meth:`allow` and :meth:`offer` run in the network thread and never block;
    :meth:`take` runs in the worker.
    """

    def __init__(self, limits: BridgeLimits) -> None:
        self.limits = limits
        self._devices: OrderedDict[str, _Device[J]] = OrderedDict()
        self._ready: OrderedDict[str, None] = OrderedDict()  # devices with queued jobs
        self._queued_bytes = 0
        self._cv = threading.Condition()

    @property
    def queued_bytes(self) -> int:
        """Bytes asked for by all queued requests."""
        return self._queued_bytes

    def queued(self, device: str) -> int:
        """Blocks queued for ``device`` (a request of one block, or a span's remaining)."""
        with self._cv:
            d = self._devices.get(device)
            return d.parts if d is not None else 0

    def _device(self, device: str, now: float) -> _Device[J] | None:
        d = self._devices.get(device)
        if d is not None:
            self._devices.move_to_end(device)
            return d
        if len(self._devices) >= self.limits.devices:
            idle = next((k for k, v in self._devices.items() if not v.queue), None)
            if idle is None:
                return None
            del self._devices[idle]
        lim = self.limits
        d = _Device(TokenBucket(lim.requests_per_s, lim.request_burst, now),
                    TokenBucket(lim.bytes_per_s, lim.byte_burst, now),
                    TokenBucket(1.0, 5, now))
        self._devices[device] = d
        return d

    def allow(self, device: str, now: float) -> bool:
        """Whether ``device`` may send another request now (its request bucket)."""
        with self._cv:
            d = self._device(device, now)
            return d is not None and d.requests.take(1, now)

    def may_log(self, device: str, now: float) -> bool:
        """Whether a refusal of ``device`` may be logged now (one a second, 5 saved)."""
        with self._cv:
            d = self._device(device, now)
            return d is not None and d.logs.take(1, now)

    def offer(self, device: str, job: J, cost: int, now: float,
              parts: int = 1, extra: int = 0) -> tuple[int, str] | None:
        """Queue ``job`` (asking for ``cost`` bytes, sent as ``parts`` blocks) for
        ``device``, taking ``extra`` more tokens from its request bucket (the request's
        own was taken by :meth:`allow`; see :func:`extra_messages`); None when queued, else
        the refusal (429 for this device's limits, 503 for the bridge's)."""
        lim = self.limits
        if parts < 1 or parts > cost:
            raise ValueError(f"a job of {cost} bytes in {parts} parts")
        with self._cv:
            d = self._device(device, now)
            if d is None:
                return 503, f"more than {lim.devices} devices have requests queued"
            if d.parts + parts > lim.device_queue:
                return 429, (f"{len(d.queue)} requests queued already" if parts == 1 else
                             f"{d.parts} blocks queued already, {parts} more asked")
            if self._queued_bytes + cost > lim.queued_bytes:
                return 503, f"the bridge has {self._queued_bytes} bytes queued"
            if extra and not d.requests.take(extra, now):
                return 429, (f"over {lim.requests_per_s:g} requests/s ({parts} blocks "
                             f"count as {extra + 1} requests)")
            if not d.bytes.take(cost, now):
                if extra:
                    d.requests.give(extra)
                return 429, f"over {lim.bytes_per_s:.0f} bytes/s"
            d.queue.append([job, cost, parts, 0])
            d.parts += parts
            self._queued_bytes += cost
            if device not in self._ready:
                # A device with nothing queued goes first (a sparse flow: one metadata
                # file, the first block of a fetch), ahead of the backlogged ones.
                self._ready[device] = None
                self._ready.move_to_end(device, last=False)
            self._cv.notify()
            return None

    def clear(self) -> int:
        """Drop every queued job; how many there were."""
        with self._cv:
            n = 0
            for d in self._devices.values():
                n += len(d.queue)
                d.queue.clear()
                d.parts = 0
            self._ready.clear()
            self._queued_bytes = 0
            return n

    def take(self, timeout: float) -> J | None:
        """The next job's next part (see :meth:`take_part`), without its index."""
        got = self.take_part(timeout)
        return None if got is None else got[0]

    def take_part(self, timeout: float,
                  skip: frozenset[str] | set[str] = frozenset()) -> tuple[J, int] | None:
        """The next part to serve, one device after another: (job, index of the part);
        None after ``timeout`` with none. A job of several parts stays at the front of its
        device's queue until its last part is taken, the device going to the back of the
        round after each part. The devices in ``skip`` (at their share of the send queue)
        keep their turn for later."""
        def first() -> str | None:
            return next((k for k in self._ready if k not in skip), None)

        with self._cv:
            device = first()
            if device is None and not self._cv.wait_for(lambda: first() is not None,
                                                         timeout):
                return None
            device = first()
            if device is None:
                return None
            del self._ready[device]
            d = self._devices[device]
            entry = d.queue[0]
            job, cost, parts, k = entry
            share = cost // (parts - k)  # (of what is left: the last part takes the rest)
            entry[1] -= share
            entry[3] = k + 1
            if k + 1 == parts:
                d.queue.popleft()
            d.parts -= 1
            self._queued_bytes -= share
            if d.queue:
                self._ready[device] = None  # to the back of the round
            return job, k

    def drop_rest(self, device: str, job: J) -> int:
        """Drop the parts of ``job`` not yet taken (it is at the front of ``device``'s
        queue while it has some: a span that reaches past the end of its file); how many."""
        with self._cv:
            d = self._devices.get(device)
            if d is None or not d.queue or d.queue[0][0] is not job:
                return 0
            _, cost, parts, k = d.queue.popleft()
            d.parts -= parts - k
            self._queued_bytes -= cost
            if not d.queue:
                self._ready.pop(device, None)
            return int(parts - k)


T = TypeVar("T")


class SendQueue(Generic[T]):
    """Answers handed to the broker, until acknowledged (``done``) or ``timeout`` old.

    Bounded: at most ``max_entries`` answers and ``max_bytes`` bytes (one block more
    when it is empty, so that a block larger than the bound still goes out), and at most
    ``max_per_owner`` answers of one device (its share: a device whose answers are many
    and small, or not acknowledged, cannot hold the whole count that every other device's
    next answer waits on; an answer added without an owner counts in no share). A refusal
    that finds no room is not sent (:meth:`room_for_refusal`); the device re-asks after
    its timeout.
    Not thread-safe: the bridge holds its lock around every call.
    """

    def __init__(self, max_entries: int, max_bytes: int, timeout: float,
                 done: Callable[[T], bool], max_per_owner: int | None = None) -> None:
        self.max_entries, self.max_bytes, self.timeout = max_entries, max_bytes, timeout
        self.max_per_owner = max_entries if max_per_owner is None else max_per_owner
        self._done = done
        self._q: deque[tuple[T, int, float, str | None]] = deque()
        self._owned: dict[str, int] = {}  # owner -> answers counted
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[tuple[T, int, float]]:
        """(answer, bytes, sent at) of those still counted."""
        return iter([e[:3] for e in self._q])

    def _release(self, e: tuple[T, int, float, str | None]) -> None:
        self.bytes -= e[1]
        if e[3] is not None:
            n = self._owned[e[3]] - 1
            if n:
                self._owned[e[3]] = n
            else:
                del self._owned[e[3]]

    def prune(self, now: float) -> None:
        """Release the acknowledged and the timed-out answers at the front; when the
        queue is still full (or a device at its share), every acknowledged one (an
        unacknowledged block in front must not keep the acknowledged refusals behind it)."""
        q = self._q
        while q and (now - q[0][2] > self.timeout or self._done(q[0][0])):
            self._release(q.popleft())
        if len(q) >= self.max_entries or any(
                n >= self.max_per_owner for n in self._owned.values()):
            keep: deque[tuple[T, int, float, str | None]] = deque()
            for e in q:
                if self._done(e[0]):
                    self._release(e)
                else:
                    keep.append(e)
            self._q = keep

    def full_owners(self) -> set[str]:
        """The devices at their share (nothing more of theirs may be sent now)."""
        return {o for o, n in self._owned.items() if n >= self.max_per_owner}

    def _share(self, owner: str | None) -> bool:
        return owner is None or self._owned.get(owner, 0) < self.max_per_owner

    def room(self, n: int, now: float, owner: str | None = None) -> bool:
        """Whether an answer of ``n`` bytes (to ``owner``) may be sent now (prunes first)."""
        self.prune(now)
        return self._share(owner) and (not self._q or (
            len(self._q) < self.max_entries and self.bytes + n <= self.max_bytes))

    def room_for_refusal(self, now: float, owner: str | None = None) -> bool:
        """Whether a refusal (a few dozen bytes) to ``owner`` may be sent now: bounded by
        count only (the queue's and the device's share), so that blocks filling the bytes
        do not silence the refusals (prunes first)."""
        self.prune(now)
        return len(self._q) < self.max_entries and self._share(owner)

    def add(self, item: T, n: int, now: float, owner: str | None = None) -> None:
        """Count ``item`` (``n`` bytes, to ``owner``), sent at ``now``, until it is
        acknowledged."""
        self._q.append((item, n, now, owner))
        self.bytes += n
        if owner is not None:
            self._owned[owner] = self._owned.get(owner, 0) + 1

    def oldest(self) -> T | None:
        """The answer sent first of those still counted."""
        return self._q[0][0] if self._q else None


def add_limit_options(p: argparse.ArgumentParser) -> None:
    """``serve-mqtt``'s options for :class:`BridgeLimits`."""
    d = BridgeLimits()
    g = p.add_argument_group("limits per device (one device cannot take the bridge down)")
    g.add_argument("--device-requests-per-s", type=float, default=d.requests_per_s,
                   metavar="N", help="requests a second per device; more are dropped "
                   f"(default {d.requests_per_s:g})")
    g.add_argument("--device-mib-per-s", type=float, default=d.bytes_per_s / (1 << 20),
                   metavar="MIB", help="MiB a second a device may ask for, 0 for no limit; "
                   f"more are refused with 429 (default {d.bytes_per_s / (1 << 20):g})")
    g.add_argument("--device-queue", type=int, default=d.device_queue, metavar="N",
                   help=f"requests queued per device (default {d.device_queue})")
    g.add_argument("--send-queue-mib", type=float, default=d.send_bytes / (1 << 20),
                   metavar="MIB", help="MiB of blocks handed to the MQTT client and "
                   f"not yet written out (default {d.send_bytes / (1 << 20):g}: as many "
                   "1 MiB blocks)")


def limits_from_args(args: argparse.Namespace) -> BridgeLimits:
    """The :class:`BridgeLimits` of ``serve-mqtt``'s options.

    Raises:
        OperatorInputError: a negative or zero bound.
    """
    from modelward.trust.errors import OperatorInputError

    rps, mib = args.device_requests_per_s, args.device_mib_per_s
    queue, send = args.device_queue, args.send_queue_mib
    if not (0 < rps < 1e9 and 0 <= mib < 1e9 and queue > 0 and 0 < send < 1e9):  # NaN, inf
        raise OperatorInputError("--device-requests-per-s, --device-queue and "
                                 "--send-queue-mib must be positive, --device-mib-per-s "
                                 "positive or 0 (and below 1e9)")
    d = BridgeLimits()
    burst = max(1, int(rps))
    return BridgeLimits(requests_per_s=rps, request_burst=burst,
                        bytes_per_s=mib * (1 << 20),
                        byte_burst=max(int(mib * (1 << 20)), 2 << 20) if mib else 0,
                        device_queue=queue, queued_bytes=d.queued_bytes,
                        send_bytes=max(int(send * (1 << 20)), 1), devices=d.devices)
