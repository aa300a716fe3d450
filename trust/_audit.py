"""The device's audit trail on disk: an append-only, hash-chained log of model events in
``state_dir/audit/`` (format and verification: ``modelward.trust._auditchain``).

Files, all opened relative to the directory's descriptor with ``O_NOFOLLOW`` (a symlinked
``audit/`` or file in it is refused with :class:`AuditLogError`, never followed):

* ``live.jsonl`` - the live segment, one canonical entry a line, appended with
  ``O_APPEND`` and fsynced;
* ``checkpoint.json`` - the signed checkpoint the live segment chains from (absent until
  the first rotation);
* ``old.jsonl``, ``old-checkpoint.json`` - the one older segment kept, and its checkpoint.

Rotation (bound on disk): before an append that would take the live segment over
``max_entries`` entries or ``max_bytes`` bytes, the agent signs a checkpoint of the live
segment's head with the TPM identity key, writes it as ``checkpoint.next``, then renames
live -> old, checkpoint -> old-checkpoint, next -> checkpoint. A crash in between is
finished on the next open (:meth:`AuditLog._recover`). Without a signer (no TPM at hand)
the segment may grow to twice its bound, then appends are refused.

On disk at most: 2 x ``max_bytes`` (+ one line) + three checkpoints of 4 KiB.
The agent calls :func:`append_event`, which never raises: a failing audit append must not
stop the model serving or break the journal; it is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelward.trust._auditchain import (
    GENESIS,
    MAX_CHECKPOINT_BYTES,
    MAX_LINE_BYTES,
    Head,
    chain,
    checkpoint_body,
    checkpoint_digest,
    checkpoint_hash,
    make_entry,
    parse_checkpoint,
    parse_entry,
    sha256_hex,
    signed_checkpoint,
    split_lines,
)
from modelward.trust._plain import Frozen
from modelward.trust._subdir import open_at, open_subdir, read_at
from modelward.trust.errors import AuditError, AuditLogError, ModelwardError

logger = logging.getLogger(__name__)

AUDIT_DIR = "audit"
LIVE = "live.jsonl"
CHECKPOINT = "checkpoint.json"
NEXT = "checkpoint.next"
OLD = "old.jsonl"
OLD_CHECKPOINT = "old-checkpoint.json"
MAX_CHUNK_ENTRIES = 256  # entries of one audit_chunk answer
MAX_CHUNK_BYTES = 64 * 1024  # bytes of entries in one answer (the checkpoint comes extra)

Signer = Callable[[bytes], bytes]


class AuditConfig(Frozen):
    """Bounds of the audit log.

    Attributes:
        max_entries: entries in the live segment before it rotates.
        max_bytes: bytes of the live segment before it rotates (256 KiB).
        durable: fsync every append (off only for tests that append thousands).
    """

    __slots__ = ("max_entries", "max_bytes", "durable")
    max_entries: int
    max_bytes: int  # bytes
    durable: bool

    def __init__(self, max_entries: int = 1000, max_bytes: int = 256 * 1024,
                 durable: bool = True) -> None:
        self._set(max(1, max_entries), max(MAX_LINE_BYTES + 1, max_bytes), durable)


def _iso(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")


class AuditLog:
    """The audit log of one state directory.

    Args:
        state_dir: the agent's state directory.
        config: its bounds.
        signer: signs a checkpoint digest (``TpmInterface.sign``); None: no rotation.
        clock: seconds since the epoch.
    """

    def __init__(self, state_dir: Path, config: AuditConfig | None = None, *,
                 signer: Signer | None = None, clock: Callable[[], float] = time.time) -> None:
        self.path = state_dir / AUDIT_DIR
        self.config = config or AuditConfig()
        self._signer = signer
        self._clock = clock

    # --- the directory and its files, never through a symlink ---------------------------

    @contextlib.contextmanager
    def _dir(self, create: bool) -> Iterator[int]:
        with open_subdir(self.path, create, "audit directory", AuditLogError) as fd:
            yield fd

    def _open(self, dfd: int, name: str, flags: int) -> int:
        return open_at(dfd, self.path, name, flags, AuditLogError)

    def _read_small(self, dfd: int, name: str, limit: int) -> bytes | None:
        return read_at(dfd, self.path, name, limit, AuditLogError)

    def _write_small(self, dfd: int, name: str, data: bytes) -> None:
        tmp = f".{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        fd = self._open(dfd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)

    def _tail(self, dfd: int) -> tuple[Head | None, int]:
        """The live segment's last entry as a head (None: empty or missing) and its size.
        A torn last line (a crash mid-append: no newline) is cut off."""
        try:
            fd = self._open(dfd, LIVE, os.O_RDWR)
        except FileNotFoundError:
            return None, 0
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return None, 0
            n = min(size, MAX_LINE_BYTES + 2)
            data = os.pread(fd, n, size - n)
            if not data.endswith(b"\n"):
                cut = data.rfind(b"\n")
                if cut < 0 and n < size:
                    raise AuditLogError(f"{self.path / LIVE} ends in a line over "
                                        f"{MAX_LINE_BYTES} bytes", path=str(self.path / LIVE))
                keep = size - n + cut + 1
                logger.warning("audit log %s: cutting a torn last line (%d bytes)",
                               self.path / LIVE, size - keep)
                os.ftruncate(fd, keep)
                os.fsync(fd)
                if keep == 0:
                    return None, 0
                size = keep
                n = min(size, MAX_LINE_BYTES + 2)
                data = os.pread(fd, n, size - n)
            body = data[:-1]
            i = body.rfind(b"\n")
            if i < 0 and n < size:
                raise AuditLogError(f"{self.path / LIVE} ends in a line over "
                                    f"{MAX_LINE_BYTES} bytes", path=str(self.path / LIVE))
            last = body[i + 1:]
            try:
                e = parse_entry(last, 0, 0)
            except AuditError as err:
                raise AuditLogError(f"{self.path / LIVE}: its last entry is damaged ({err}); "
                                    "new events cannot chain from it",
                                    path=str(self.path / LIVE)) from err
            return Head(e.seq, sha256_hex(last)), size
        finally:
            os.close(fd)

    def _checkpoint(self, dfd: int) -> dict[str, Any] | None:
        data = self._read_small(dfd, CHECKPOINT, MAX_CHECKPOINT_BYTES)
        if data is None:
            return None
        try:
            return parse_checkpoint(data)[0]
        except AuditError as e:
            raise AuditLogError(f"{self.path / CHECKPOINT}: {e}",
                                path=str(self.path / CHECKPOINT)) from e

    def _recover(self, dfd: int) -> None:
        """Finish a rotation a crash interrupted (``checkpoint.next`` is there)."""
        data = self._read_small(dfd, NEXT, MAX_CHECKPOINT_BYTES)
        if data is None:
            return
        try:
            nxt = parse_checkpoint(data)[0]
        except AuditError:
            nxt = None
        head, _ = self._tail(dfd)
        cur = self._checkpoint(dfd)
        cur_hash = checkpoint_hash(cur) if cur is not None else GENESIS
        if nxt is not None and head == Head(nxt["seq"], nxt["dropped_head_hash"]) and \
                nxt["prev_checkpoint"] == cur_hash:
            logger.warning("audit log %s: finishing an interrupted rotation", self.path)
            self._swap(dfd)
        elif nxt is not None and head is None and nxt["prev_checkpoint"] == cur_hash:
            self._swap(dfd, live_moved=True)
        else:
            logger.warning("audit log %s: removing a checkpoint.next that does not follow "
                           "the log", self.path)
            os.unlink(NEXT, dir_fd=dfd)

    def _swap(self, dfd: int, live_moved: bool = False) -> None:
        if not live_moved:
            os.replace(LIVE, OLD, src_dir_fd=dfd, dst_dir_fd=dfd)
        with contextlib.suppress(FileNotFoundError):
            os.replace(CHECKPOINT, OLD_CHECKPOINT, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.replace(NEXT, CHECKPOINT, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)

    def _base(self, dfd: int) -> tuple[Head, dict[str, Any] | None]:
        cp = self._checkpoint(dfd)
        return (Head(cp["seq"], checkpoint_hash(cp)) if cp else Head(0, GENESIS)), cp

    # --- public -------------------------------------------------------------------------

    def head(self) -> Head:
        """The newest entry (or the checkpoint, or seq 0 and :data:`GENESIS`).

        Raises:
            AuditLogError: the directory or a file in it is a symlink, or damaged.
        """
        try:
            with self._dir(create=False) as dfd:
                tail, _ = self._tail(dfd)
                return tail or self._base(dfd)[0]
        except FileNotFoundError:
            return Head(0, GENESIS)

    def append(self, kind: str, fields: Mapping[str, object]) -> Head:
        """Append one event (rotating first if the live segment is full).

        Raises:
            AuditLogError: a symlink, a damaged tail, a full disk, or the segment is at
                twice its bound and no signer can make a checkpoint.
        """
        with self._dir(create=True) as dfd:
            try:
                self._recover(dfd)
                base, _ = self._base(dfd)
                tail, size = self._tail(dfd)
                head = tail or base
                count = head.seq - base.seq
                line = make_entry(head.seq + 1, head.hash, _iso(self._clock()), kind, fields)
                c = self.config
                if count >= c.max_entries or size + len(line) + 1 > c.max_bytes:
                    rotated = False
                    if self._signer is not None:
                        try:
                            self._rotate(dfd, base, head)
                            rotated = True
                        except ModelwardError as e:  # (the TPM did not sign: grow for now)
                            logger.warning("audit log %s not rotated: %s", self.path, e)
                    if rotated:
                        head, size = Head(head.seq, self._base(dfd)[0].hash), 0
                        line = make_entry(head.seq + 1, head.hash, _iso(self._clock()),
                                          kind, fields)
                    elif count >= 2 * c.max_entries or size + len(line) + 1 > 2 * c.max_bytes:
                        raise AuditLogError(
                            f"audit log {self.path} is full and no TPM signed a checkpoint; "
                            "event not recorded", path=str(self.path))
                fd = self._open(dfd, LIVE, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                try:
                    data = line + b"\n"
                    if os.write(fd, data) != len(data):
                        raise AuditLogError(f"short write to {self.path / LIVE}",
                                            path=str(self.path / LIVE))
                    if c.durable:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                raise AuditLogError(f"cannot append to the audit log {self.path}: {e}",
                                    path=str(self.path)) from e
        return Head(head.seq + 1, sha256_hex(line))

    def _rotate(self, dfd: int, base: Head, head: Head) -> None:
        """Sign a checkpoint over the live segment and start a new one, only if the
        segment chains from its checkpoint to ``head``: a checkpoint must never vouch for
        entries edited on disk (they stay in the live segment, as evidence, and the
        segment grows to twice its bound, then appends are refused)."""
        assert self._signer is not None
        data = self._read_small(dfd, LIVE, 2 * self.config.max_bytes + MAX_LINE_BYTES + 1)
        try:
            entries = chain(split_lines(data or b""), base)
        except AuditError as e:
            raise AuditLogError(f"the live segment {self.path / LIVE} does not verify, so no "
                                f"checkpoint is signed over it: {e}",
                                path=str(self.path / LIVE)) from e
        last = Head(entries[-1].seq, entries[-1].hash) if entries else base
        if last != head:
            raise AuditLogError(f"the live segment {self.path / LIVE} changed while it was "
                                "rotated", path=str(self.path / LIVE))
        body = checkpoint_body(head.seq, head.hash, head.seq, _iso(self._clock()), base.hash)
        sig = self._signer(checkpoint_digest(body))
        self._write_small(dfd, NEXT, signed_checkpoint(body, sig))
        self._swap(dfd)
        logger.info("audit log %s rotated at seq %d (signed checkpoint)", self.path, head.seq)

    def chunk(self, offset: int, limit: int = MAX_CHUNK_ENTRIES, *,
              old: bool = False) -> dict[str, Any]:
        """Entries ``offset`` .. of the live segment (``old``: the kept older one), bounded
        (see :func:`audit_chunk`).

        Raises:
            AuditLogError: a symlink, or a damaged or oversized segment.
        """
        limit = max(0, min(limit, MAX_CHUNK_ENTRIES))
        offset = max(0, offset)
        out: dict[str, Any] = {"offset": offset, "entries": [], "next": None}
        log, checkpoint = (OLD, OLD_CHECKPOINT) if old else (LIVE, CHECKPOINT)
        try:
            with self._dir(create=False) as dfd:
                if offset == 0:
                    cp = self._read_small(dfd, checkpoint, MAX_CHECKPOINT_BYTES)
                    out["checkpoint"] = cp.decode("ascii", "replace") if cp else None
                try:
                    fd = self._open(dfd, log, os.O_RDONLY)
                except FileNotFoundError:
                    return out
                with os.fdopen(fd, "rb") as f:
                    budget = 2 * self.config.max_bytes + MAX_LINE_BYTES  # bytes scanned
                    index, used = 0, 0
                    while True:
                        raw = f.readline(MAX_LINE_BYTES + 2)
                        budget -= len(raw)
                        if not raw or budget < 0:
                            break
                        if not raw.endswith(b"\n") and len(raw) <= MAX_LINE_BYTES:
                            break  # (an append in progress, or a torn line the next cuts)
                        if not raw.endswith(b"\n"):
                            raise AuditLogError(f"{self.path / log} line {index + 1} is over "
                                                f"{MAX_LINE_BYTES} bytes",
                                                path=str(self.path / log))
                        if index >= offset:
                            if len(out["entries"]) >= limit or \
                                    used + len(raw) > MAX_CHUNK_BYTES:
                                out["next"] = index
                                break
                            out["entries"].append(raw[:-1].decode("ascii", "replace"))
                            used += len(raw)
                        index += 1
        except FileNotFoundError:  # (no audit directory yet: nothing recorded)
            if offset == 0:
                out["checkpoint"] = None
        return out

    def segment(self) -> tuple[list[bytes], bytes | None]:
        """The live segment's lines and its checkpoint (bounded as :meth:`chunk`).

        Raises:
            AuditLogError: a symlink, or a damaged or oversized segment.
        """
        lines: list[bytes] = []
        offset: int | None = 0
        checkpoint: bytes | None = None
        while offset is not None:
            c = self.chunk(offset)
            if offset == 0 and c.get("checkpoint"):
                checkpoint = str(c["checkpoint"]).encode()
            lines += [e.encode() for e in c["entries"]]
            offset = c["next"]
        return lines, checkpoint

    def segments(self) -> list[tuple[list[bytes], bytes | None, str]]:
        """The kept older segment (if any) and the live one, oldest first, as
        :func:`~modelward.trust._auditchain.verify_segments` takes them.

        Raises:
            AuditLogError: a symlink, or a damaged or oversized segment.
        """
        out: list[tuple[list[bytes], bytes | None, str]] = []
        try:
            with self._dir(create=False) as dfd:
                old = self._read_small(dfd, OLD, 2 * self.config.max_bytes + MAX_LINE_BYTES)
                if old is not None:
                    out.append((split_lines(old), self._read_small(
                        dfd, OLD_CHECKPOINT, MAX_CHECKPOINT_BYTES), OLD))
        except FileNotFoundError:
            pass
        lines, checkpoint = self.segment()
        return [*out, (lines, checkpoint, "")]


def audit_chunk(state_dir: Path, offset: int, limit: int = MAX_CHUNK_ENTRIES, *,
                old: bool = False) -> dict[str, Any]:
    """One bounded piece of the live segment (``old``: the kept older one, ``old.jsonl``
    with ``old-checkpoint.json``), for the operator's ``fleet audit``.

    At most :data:`MAX_CHUNK_ENTRIES` entries and :data:`MAX_CHUNK_BYTES` bytes of them;
    the first chunk (``offset`` 0) also carries the signed checkpoint (or None).

    Returns:
        ``{"offset", "entries": [line, ...], "next": offset of the next chunk or None,
        "checkpoint"?: str | None}``.

    Raises:
        AuditLogError: the audit directory or a file in it is a symlink, or damaged.
    """
    return AuditLog(state_dir).chunk(offset, limit, old=old)


def append_event(state_dir: Path, kind: str, fields: Mapping[str, object] | None = None, *,
                 signer: Signer | None = None, config: AuditConfig | None = None) -> bool:
    """Record one model event; never raises (logs instead).

    Returns:
        Whether it was recorded.
    """
    try:
        head = AuditLog(state_dir, config, signer=signer).append(kind, fields or {})
    except (ModelwardError, OSError, ValueError) as e:  # (TpmError, AuditLogError; an
        # unknown kind is a bug, but it must not stop the model serving either)
        logger.error("audit event %s not recorded: %s", kind, e,
                     extra={"audit_kind": kind, **{k: str(v) for k, v in (fields or {}).items()
                                                  if k in ("model", "version", "fingerprint")}})
        return False
    logger.debug("audit event %s recorded at seq %d", kind, head.seq)
    return True
