"""The operator's request channel to one device (attest, audit): topics, bounds, framing.

Pure: bytes in, typed values or :class:`RpcFormatError` out; the device side
(:mod:`modelward.agent._rpc`) and the operator side (:mod:`modelward.publisher._devrpc`)
do the MQTT work. Topics, under ``modelward/<fleet>/``:

* ``devices/<id>/rpc/req`` - the operator writes, only device ``<id>``'s listener reads;
* ``devices/<id>/rpc/resp`` - only device ``<id>``'s listener writes, the operator reads.

The broker ACL (``publisher._broker_config.roles``) is what binds an answer to its
device: the MQTT 5 response-topic property is a hint no ACL checks, so a device answers
on its own response topic whatever a request names, and the operator believes an answer
for ``<id>`` only from ``<id>``'s topic (and then checks its signature).

A request is one line of JSON, at most :data:`MAX_REQUEST` bytes, depth 1:
``{"kind": "attest", "nonce": HEX}`` or ``{"kind": "audit", "nonce": HEX, "offset": N,
"limit": N}``, with MQTT 5 correlation data (1..:data:`MAX_CORRELATION` bytes) that every
answer chunk carries back. An answer is the canonical JSON of the handler's document cut
into chunks of at most :data:`CHUNK_BYTES`; each chunk is ``HEADER\\n PIECE``, the header a
line of JSON ``{"v": 1, "kind", "nonce", "part", "parts"}`` (or ``"error"`` instead of a
document: a short reason, one part).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from modelward.trust._bounded import loads_bounded
from modelward.trust._measure import MAX_NONCE, MIN_NONCE  # (bytes of a nonce)
from modelward.trust.errors import UntrustedRemoteError

KINDS = ("attest", "audit")
SEGMENTS = ("live", "old")  # of the audit trail: the live one, the kept older one
MAX_REQUEST = 1024  # bytes of a request payload (a nonce of 64 bytes is 128 hex digits)
MAX_CORRELATION = 64  # bytes of correlation data (the operator sends 16)
MAX_AUDIT_LIMIT = 256  # entries an audit request may ask for at once
CHUNK_BYTES = 48 * 1024  # document bytes per answer packet (inside a 64 KiB packet)
MAX_PARTS = 32  # chunks of one answer (1.5 MiB): a larger document is refused by both ends
MAX_HEADER = 512  # bytes of a chunk's header line
MAX_ERROR = 200  # characters of an error reason
_HEX = re.compile(r"[0-9a-f]+")


class RpcFormatError(UntrustedRemoteError):
    """A request or answer chunk that is not what this protocol sends.

    Attributes:
        what: which message (e.g. ``"the request on modelward/f1/devices/d/rpc/req"``).
    """

    def __init__(self, message: str, *, what: str) -> None:
        super().__init__(f"{what}: {message}")
        self.what = what


def req_topic(fleet_prefix: str, device: str) -> str:
    """``<prefix>/devices/<device>/rpc/req`` (prefix: ``modelward/<fleet>``)."""
    return f"{fleet_prefix}/devices/{device}/rpc/req"


def resp_topic(fleet_prefix: str, device: str) -> str:
    """``<prefix>/devices/<device>/rpc/resp``."""
    return f"{fleet_prefix}/devices/{device}/rpc/resp"


@dataclass(frozen=True)
class Request:
    """A parsed request: its kind, nonce, and (audit) the entries asked for."""

    kind: str
    nonce: bytes
    offset: int = 0
    limit: int = 0
    segment: str = "live"  # (audit) or "old": the kept older segment

    def to_bytes(self) -> bytes:
        """The request's payload."""
        doc: dict[str, Any] = {"kind": self.kind, "nonce": self.nonce.hex()}
        if self.kind == "audit":
            doc.update(offset=self.offset, limit=self.limit)
            if self.segment != "live":
                doc["segment"] = self.segment
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _count(doc: dict[str, Any], key: str, top: int, what: str) -> int:
    v = doc.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= top:
        raise RpcFormatError(f"{key} must be an integer 0..{top}", what=what)
    return v


def parse_request(payload: bytes, what: str) -> Request:
    """The request in ``payload``.

    Raises:
        RpcFormatError: too large, not JSON of depth 1, an unknown kind or key, a nonce
            that is not lowercase hex of 16..64 bytes, an offset/limit out of range.
    """
    if len(payload) > MAX_REQUEST:
        raise RpcFormatError(f"{len(payload)} bytes, more than {MAX_REQUEST}", what=what)
    try:
        doc = loads_bounded(payload, max_bytes=MAX_REQUEST, max_depth=1, what=what)
    except ValueError as e:  # UntrustedJsonError
        raise RpcFormatError(f"not a request ({e})", what=what) from e
    if not isinstance(doc, dict):
        raise RpcFormatError("not a JSON object", what=what)
    kind = doc.get("kind")
    if kind not in KINDS:
        raise RpcFormatError(f"kind must be one of {', '.join(KINDS)}", what=what)
    allowed = {"kind", "nonce"} | ({"offset", "limit", "segment"} if kind == "audit"
                                   else set())
    extra = sorted(set(doc) - allowed)
    if extra:
        raise RpcFormatError(f"unknown key {extra[0][:40]!r}", what=what)
    nonce = doc.get("nonce")
    if not isinstance(nonce, str) or not _HEX.fullmatch(nonce) or len(nonce) % 2 or \
            not MIN_NONCE <= len(nonce) // 2 <= MAX_NONCE:
        raise RpcFormatError(f"nonce must be {MIN_NONCE}..{MAX_NONCE} bytes of lowercase hex",
                             what=what)
    if kind == "audit":
        segment = doc.get("segment", "live")
        if segment not in SEGMENTS:
            raise RpcFormatError(f"segment must be one of {', '.join(SEGMENTS)}", what=what)
        return Request(kind, bytes.fromhex(nonce), _count(doc, "offset", 1 << 62, what),
                       _count(doc, "limit", MAX_AUDIT_LIMIT, what), segment)
    return Request(kind, bytes.fromhex(nonce))


def answer_chunks(req: Request, document: dict[str, Any] | None, error: str | None = None
                  ) -> list[bytes]:
    """The chunk payloads answering ``req`` with ``document`` (or ``error``).

    Raises:
        RpcFormatError: the document needs more than :data:`MAX_PARTS` chunks (the device
            then answers with that error instead).
    """
    head: dict[str, Any] = {"v": 1, "kind": req.kind, "nonce": req.nonce.hex()}
    if document is None:
        reason = (error or "failed")[:MAX_ERROR]
        return [_frame({**head, "error": reason, "part": 0, "parts": 1}, b"")]
    body = json.dumps(document, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()
    parts = max(1, -(-len(body) // CHUNK_BYTES))
    if parts > MAX_PARTS:
        raise RpcFormatError(f"{len(body)} bytes, more than {MAX_PARTS} chunks",
                             what=f"the {req.kind} answer")
    return [_frame({**head, "part": i, "parts": parts},
                   body[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]) for i in range(parts)]


def _frame(head: dict[str, Any], piece: bytes) -> bytes:
    return json.dumps(head, sort_keys=True, separators=(",", ":")).encode() + b"\n" + piece


@dataclass(frozen=True)
class Chunk:
    """One parsed answer chunk."""

    kind: str
    nonce: bytes
    part: int
    parts: int
    piece: bytes
    error: str | None = None


def parse_chunk(payload: bytes, what: str) -> Chunk:
    """One answer chunk.

    Raises:
        RpcFormatError: no header line, a header that is not this protocol's, a piece
            larger than :data:`CHUNK_BYTES`, part numbers out of range.
    """
    head_raw, sep, piece = payload.partition(b"\n")
    if not sep or len(head_raw) > MAX_HEADER:
        raise RpcFormatError("no header line", what=what)
    try:
        head = loads_bounded(head_raw, max_bytes=MAX_HEADER, max_depth=1, what=what)
    except ValueError as e:
        raise RpcFormatError(f"header is not JSON ({e})", what=what) from e
    if not isinstance(head, dict) or head.get("v") != 1 or head.get("kind") not in KINDS:
        raise RpcFormatError("not a version 1 answer of a known kind", what=what)
    nonce, part, parts = head.get("nonce"), head.get("part"), head.get("parts")
    if not isinstance(nonce, str) or not _HEX.fullmatch(nonce) or len(nonce) % 2 or \
            len(nonce) > 2 * MAX_NONCE:
        raise RpcFormatError("nonce is not hex", what=what)
    if not (isinstance(part, int) and isinstance(parts, int)) or isinstance(part, bool) \
            or isinstance(parts, bool) or not 0 <= part < parts <= MAX_PARTS:
        raise RpcFormatError(f"part/parts must be 0 <= part < parts <= {MAX_PARTS}",
                             what=what)
    if len(piece) > CHUNK_BYTES:
        raise RpcFormatError(f"a piece of {len(piece)} bytes, more than {CHUNK_BYTES}",
                             what=what)
    error = head.get("error")
    if error is not None and (not isinstance(error, str) or parts != 1):
        raise RpcFormatError("error must be a string, in a one-part answer", what=what)
    return Chunk(head["kind"], bytes.fromhex(nonce), part, parts, piece,
                 error[:MAX_ERROR] if error is not None else None)


class Assembly:
    """The chunks of one answer, in any order; :meth:`add` returns the document once all
    are there. Duplicates are ignored; a chunk disagreeing on ``parts`` is refused."""

    def __init__(self) -> None:
        self.parts: int | None = None
        self.pieces: dict[int, bytes] = {}

    def add(self, chunk: Chunk, what: str) -> bytes | None:
        """Add ``chunk``; the whole document's bytes when complete, else None.

        Raises:
            RpcFormatError: ``parts`` differs from an earlier chunk's.
        """
        if self.parts is None:
            self.parts = chunk.parts
        elif chunk.parts != self.parts:
            raise RpcFormatError(f"parts {chunk.parts}, an earlier chunk said {self.parts}",
                                 what=what)
        self.pieces.setdefault(chunk.part, chunk.piece)
        if len(self.pieces) < self.parts:
            return None
        return b"".join(self.pieces[i] for i in range(self.parts))
