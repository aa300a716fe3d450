"""The audit trail's format and its verification, pure (house style 1: bytes in, a decision
out; the files are ``modelward.trust._audit``'s, the operator's I/O
``modelward.publisher._audit``'s).

An entry is the canonical JSON (sorted keys, no spaces, ASCII) of ``{seq, prev, time,
kind, fields}``, one a line. ``seq`` counts from 1 over the device's whole history;
``prev`` is the hex SHA-256 of the previous entry's canonical bytes, or of the checkpoint
the segment starts from (:data:`GENESIS` for the first segment ever). A checkpoint
``{dropped_count, dropped_head_hash, seq, time, prev_checkpoint}`` stands for every entry
before it: it is signed by the device's TPM identity key over
``SHA-256("modelward audit checkpoint v1\\n" || canonical body)`` (a domain of its own: no
status report or record digest is ever one). The head ``(seq, hash)`` of the log is
signed into every status report (field ``audit``).

Every parser here is bounded before anything is believed: a line is at most
:data:`MAX_LINE_BYTES`, a checkpoint :data:`MAX_CHECKPOINT_BYTES`, a verification at most
:data:`MAX_VERIFY_ENTRIES` entries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from modelward.trust._bounded import loads_bounded
from modelward.trust._plain import Frozen
from modelward.trust.errors import AuditError

if TYPE_CHECKING:  # (the crypto stack only where a signature is checked: not at boot)
    from cryptography.hazmat.primitives.asymmetric import ec

GENESIS = "0" * 64
ALG = "ecdsa-p256-sha256"
MAX_LINE_BYTES = 4096  # one entry, newline excluded
MAX_FIELD_CHARS = 256  # a field's value (model names, versions, reasons) is cut there
MAX_FIELDS = 12  # fields of one entry
MAX_CHECKPOINT_BYTES = 4096
MAX_VERIFY_ENTRIES = 100_000  # entries one verification reads (a segment is ~1000)
MAX_SEQ = 2**53 - 1
_CHECKPOINT_DOMAIN = b"modelward audit checkpoint v1\n"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")

#: what the agent records (issue 18 "Audit trail"), one kind per model event
DOWNLOAD_REFUSED = "download-refused"
HEALTH_CHECK_FAILED = "health-check-failed"
INSTALL = "install"
ACTIVATION = "activation"
FALLBACK = "fallback"
ROLLBACK_REFUSED = "rollback-refused"
NOTHING_TRUSTED = "nothing-trusted"
ROOT_ROTATION = "root-rotation"
#: the provenance policy root pins could not be taken (its fault, not a release's)
POLICY_FETCH_FAILED = "policy-fetch-failed"
KINDS = frozenset({DOWNLOAD_REFUSED, HEALTH_CHECK_FAILED, INSTALL, ACTIVATION, FALLBACK,
                   ROLLBACK_REFUSED, NOTHING_TRUSTED, ROOT_ROTATION, POLICY_FETCH_FAILED})
_ENTRY_KEYS = frozenset({"seq", "prev", "time", "kind", "fields"})
_CHECKPOINT_KEYS = frozenset({"dropped_count", "dropped_head_hash", "seq", "time",
                              "prev_checkpoint"})


def canonical(obj: object) -> bytes:
    """The canonical JSON bytes of ``obj`` (what hashes and signatures cover)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


class Head(Frozen):
    """The newest entry of a log (or the checkpoint when no entry follows it)."""

    __slots__ = ("seq", "hash")
    seq: int
    hash: str

    def __init__(self, seq: int, hash: str) -> None:  # noqa: A002 - the field's name
        self._set(seq, hash)

    def to_json(self) -> dict[str, Any]:
        """The report's ``audit`` field."""
        return {"seq": self.seq, "hash": self.hash}

    @classmethod
    def from_json(cls, doc: object) -> Head:
        """A head from a (schema-checked) report's ``audit`` field.

        Raises:
            AuditError: not ``{seq: int, hash: 64 hex}``.
        """
        if not (isinstance(doc, dict) and set(doc) == {"seq", "hash"}
                and type(doc["seq"]) is int and 0 <= doc["seq"] <= MAX_SEQ
                and isinstance(doc["hash"], str) and _HEX64.fullmatch(doc["hash"])):
            raise AuditError("the signed head is not {seq, hash}", seq=None, line=0,
                             reason="malformed")
        return cls(doc["seq"], doc["hash"])


class Entry(Frozen):
    """One verified entry: its fields, its hash and its 1-based line in the segment."""

    __slots__ = ("seq", "prev", "time", "kind", "fields", "hash", "line")
    seq: int
    prev: str
    time: str
    kind: str
    fields: dict[str, str]
    hash: str
    line: int

    def __init__(self, seq: int, prev: str, time: str, kind: str, fields: dict[str, str],
                 hash: str, line: int) -> None:  # noqa: A002
        self._set(seq, prev, time, kind, fields, hash, line)

    def __hash__(self) -> int:  # (fields is a dict)
        return hash((self.seq, self.hash, self.line))


def clean_fields(fields: Mapping[str, object]) -> dict[str, str]:
    """``fields`` as an entry holds them: at most :data:`MAX_FIELDS` names of lowercase
    identifiers, each value a string cut to :data:`MAX_FIELD_CHARS`."""
    out: dict[str, str] = {}
    for k in sorted(fields):
        v = fields[k]
        if v is None or not _FIELD_NAME.fullmatch(k) or len(out) == MAX_FIELDS:
            continue
        out[k] = str(v)[:MAX_FIELD_CHARS]
    return out


def make_entry(seq: int, prev: str, time: str, kind: str,
               fields: Mapping[str, object]) -> bytes:
    """The canonical line (no newline) of a new entry.

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS` (a programming error).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown audit kind {kind!r}")
    return canonical({"seq": seq, "prev": prev, "time": time[:64], "kind": kind,
                      "fields": clean_fields(fields)})


def _bad(line: int, seq: int | None, reason: str, message: str, name: str = "") -> AuditError:
    at = f"{name} line {line}" if name else f"line {line}"
    where = f"entry seq {seq} ({at})" if seq is not None else at
    return AuditError(f"audit log: {where}: {message}", seq=seq, line=line, reason=reason)


def parse_entry(raw: bytes, line: int, expected_seq: int, name: str = "") -> Entry:
    """One line of a segment (file ``name``, for the messages), checked for shape and
    canonical form (not yet the chain).

    Raises:
        AuditError: too long, not JSON, not the entry shape, or not canonical (edited).
    """
    if len(raw) > MAX_LINE_BYTES:
        raise _bad(line, expected_seq, "too-large", f"over {MAX_LINE_BYTES} bytes", name)
    try:
        doc = loads_bounded(raw, max_bytes=MAX_LINE_BYTES, max_depth=2, what="an audit entry")
    except ValueError as e:
        raise _bad(line, expected_seq, "malformed", f"not an entry ({e})", name) from e
    if not (isinstance(doc, dict) and set(doc) == _ENTRY_KEYS
            and type(doc["seq"]) is int and 1 <= doc["seq"] <= MAX_SEQ
            and isinstance(doc["prev"], str) and _HEX64.fullmatch(doc["prev"])
            and isinstance(doc["time"], str) and doc["kind"] in KINDS
            and isinstance(doc["fields"], dict)
            and all(isinstance(v, str) for v in doc["fields"].values())):
        raise _bad(line, expected_seq, "malformed", "not the shape of an audit entry", name)
    if canonical(doc) != raw:
        raise _bad(line, doc["seq"], "edited", "not in canonical form (altered)", name)
    return Entry(doc["seq"], doc["prev"], doc["time"], doc["kind"], dict(doc["fields"]),
                 sha256_hex(raw), line)


# --- checkpoints ------------------------------------------------------------------------

def checkpoint_body(dropped_count: int, dropped_head_hash: str, seq: int, time: str,
                    prev_checkpoint: str) -> dict[str, Any]:
    """The body of a checkpoint (what its signature covers)."""
    return {"dropped_count": dropped_count, "dropped_head_hash": dropped_head_hash,
            "seq": seq, "time": time[:64], "prev_checkpoint": prev_checkpoint}


def checkpoint_digest(body: Mapping[str, Any]) -> bytes:
    """The domain-separated digest the TPM identity key signs."""
    return hashlib.sha256(_CHECKPOINT_DOMAIN + canonical(dict(body))).digest()


def checkpoint_hash(body: Mapping[str, Any]) -> str:
    """What the first entry after a checkpoint chains from."""
    return sha256_hex(canonical(dict(body)))


def signed_checkpoint(body: Mapping[str, Any], signature: bytes) -> bytes:
    """The stored form of a signed checkpoint."""
    return canonical({"checkpoint": dict(body), "alg": ALG,
                      "signature": base64.b64encode(signature).decode()})


def parse_checkpoint(data: bytes) -> tuple[dict[str, Any], bytes]:
    """``(body, signature)`` of a stored checkpoint (signature not yet checked).

    Raises:
        AuditError: too large, not JSON, or not the checkpoint shape.
    """
    def bad(why: str) -> AuditError:
        return AuditError(f"audit checkpoint: {why}", seq=None, line=0, reason="malformed")

    if len(data) > MAX_CHECKPOINT_BYTES:
        raise bad(f"over {MAX_CHECKPOINT_BYTES} bytes")
    try:
        doc = loads_bounded(data, max_bytes=MAX_CHECKPOINT_BYTES, max_depth=2,
                            what="an audit checkpoint")
        body, sig = doc["checkpoint"], base64.b64decode(doc["signature"], validate=True)
        if set(doc) != {"checkpoint", "alg", "signature"} or doc["alg"] != ALG:
            raise ValueError("alg")
    except (ValueError, KeyError, TypeError) as e:
        raise bad(f"not a signed checkpoint ({e})") from e
    if not (isinstance(body, dict) and set(body) == _CHECKPOINT_KEYS
            and all(type(body[k]) is int and 0 <= body[k] <= MAX_SEQ
                    for k in ("dropped_count", "seq"))
            and all(isinstance(body[k], str) and _HEX64.fullmatch(body[k])
                    for k in ("dropped_head_hash", "prev_checkpoint"))
            and isinstance(body["time"], str)):
        raise bad("not the shape of a checkpoint")
    if body["dropped_count"] != body["seq"]:
        raise bad(f"says {body['dropped_count']} entries were dropped up to seq "
                  f"{body['seq']}")
    return body, sig


def _verifier(identity_pem: bytes) -> ec.EllipticCurvePublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_public_key(identity_pem)
    except ValueError as e:
        raise AuditError("the device's identity key is not a PEM public key", seq=None,
                         line=0, reason="key") from e
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AuditError("the device's identity key is not an EC key", seq=None, line=0,
                         reason="key")
    return key


def check_checkpoint(data: bytes, identity_pem: bytes) -> dict[str, Any]:
    """The body of ``data`` when its signature verifies with the device's identity key.

    Raises:
        AuditError: malformed, or not signed by this device's TPM identity key.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    body, sig = parse_checkpoint(data)
    try:
        _verifier(identity_pem).verify(sig, checkpoint_digest(body),
                                       ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    except InvalidSignature as e:
        raise AuditError("audit checkpoint: its signature does not verify with the "
                         "device's identity key (forged or another device's)", seq=None,
                         line=0, reason="checkpoint-signature") from e
    return body


# --- verification -------------------------------------------------------------------------

class AuditHistory(Frozen):
    """A verified audit history.

    Attributes:
        dropped_count: entries before the checkpoint (0 without one): verifiable only as
            this count and :attr:`dropped_head_hash`.
        dropped_head_hash: hash of the last dropped entry (:data:`GENESIS` if none).
        checkpoint_time: when the checkpoint was made ("" without one).
        entries: the entries after it, in order.
        head: the newest entry (or the checkpoint).
        signed: the seq up to which a signed head vouches for the log (None: no head).
        unsigned: entries after the signed head (only when they were allowed).
    """

    __slots__ = ("dropped_count", "dropped_head_hash", "checkpoint_time", "entries", "head",
                 "signed", "unsigned")
    dropped_count: int
    dropped_head_hash: str
    checkpoint_time: str
    entries: tuple[Entry, ...]
    head: Head
    signed: int | None
    unsigned: int

    def __init__(self, dropped_count: int, dropped_head_hash: str, checkpoint_time: str,
                 entries: tuple[Entry, ...], head: Head, signed: int | None,
                 unsigned: int) -> None:
        self._set(dropped_count, dropped_head_hash, checkpoint_time, entries, head, signed,
                  unsigned)


def split_lines(data: bytes) -> list[bytes]:
    """The lines of an exported segment (the last may lack its newline)."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def chain(lines: Iterable[bytes], base: Head, name: str = "") -> list[Entry]:
    """The entries of ``lines`` when each one is well formed and chains from the one
    before it (the first from ``base``: the segment's checkpoint, or seq 0 and
    :data:`GENESIS`). The device checks this before it signs a checkpoint over a segment;
    the operator before it compares the head.

    Args:
        name: the segment's file name, for the messages ("" for the live segment).

    Raises:
        AuditError: the first bad entry (size, shape, canonical form, ``seq`` not
            continuing by one, ``prev`` not the previous entry's hash).
    """
    entries: list[Entry] = []
    prev = base
    for i, raw in enumerate(lines, start=1):
        if i > MAX_VERIFY_ENTRIES:
            raise _bad(i, prev.seq + 1, "too-large", f"over {MAX_VERIFY_ENTRIES} entries",
                       name)
        e = parse_entry(raw, i, prev.seq + 1, name)
        if e.seq != prev.seq + 1:
            what = ("deleted: seq " + (f"{prev.seq + 1}" if e.seq == prev.seq + 2 else
                                       f"{prev.seq + 1} to {e.seq - 1}") + " missing"
                    if e.seq > prev.seq + 1 else
                    f"reordered or duplicated: seq {e.seq} after seq {prev.seq}")
            raise _bad(i, prev.seq + 1, "deleted" if e.seq > prev.seq else "reordered",
                       f"expected seq {prev.seq + 1}, found {e.seq} ({what})", name)
        if e.prev != prev.hash:
            if entries:  # (the previous entry's bytes, or this one's prev, were altered)
                raise _bad(i - 1, prev.seq, "edited",
                           f"its hash is not what seq {e.seq} chains from (edited)", name)
            raise _bad(i, e.seq, "edited",
                       "does not chain from the checkpoint (edited, or from another log)",
                       name)
        entries.append(e)
        prev = Head(e.seq, e.hash)
    return entries


def verify_audit(lines: Iterable[bytes], checkpoint: bytes | None, signed_head: Head | None,
                 identity_pem: bytes, *, allow_tail: bool = False) -> AuditHistory:
    """Verify a segment against its checkpoint and the head the device signed.

    Checks, in order, and names the first bad entry: the checkpoint's signature (by the
    device's TPM identity key); each line's size, shape and canonical form; ``seq``
    continuing by one (a gap: entries deleted; a step back: reordered or duplicated);
    ``prev`` equal to the previous entry's hash (or the checkpoint's); then the signed
    head: its entry must be there (else the log was truncated) with that hash (else it
    was edited or rewritten), and, unless ``allow_tail``, be the last.

    Args:
        lines: the segment's lines, oldest first, without newlines.
        checkpoint: the stored signed checkpoint, or None for a log that never rotated.
        signed_head: the ``audit`` head of the device's newest signed status report,
            already verified with its key; None: nothing vouches for the end.
        identity_pem: the device's enrolled identity key.
        allow_tail: accept entries after the signed head (appended since that report).

    Raises:
        AuditError: the first fault, with its ``seq``, ``line`` and ``reason``.
    """
    return verify_segments([(lines, checkpoint, "")], signed_head, identity_pem,
                           allow_tail=allow_tail)


def verify_segments(segments: Sequence[tuple[Iterable[bytes], bytes | None, str]],
                    signed_head: Head | None, identity_pem: bytes, *,
                    allow_tail: bool = False) -> AuditHistory:
    """:func:`verify_audit` over consecutive segments, oldest first (the kept
    ``old.jsonl`` with ``old-checkpoint.json``, then the live one with its checkpoint).

    Each later segment's checkpoint must be signed and stand for exactly the segment
    before it: its ``seq`` and ``dropped_head_hash`` that segment's last entry, its
    ``prev_checkpoint`` that segment's checkpoint. So a head the device signed before its
    last rotation is checked in the older segment, where it lies.

    Args:
        segments: ``(lines, checkpoint, name)`` each; ``name`` labels the messages.

    Raises:
        AuditError: the first fault (a checkpoint that does not follow the segment before
            it: ``checkpoint-mismatch``).
    """
    entries: list[Entry] = []
    first: Head | None = None
    dropped, dropped_hash, cp_time = 0, GENESIS, ""
    prev_base, prev_head = Head(0, GENESIS), Head(0, GENESIS)
    names: list[str] = []  # each entry's segment, for the messages
    last_name, last_len = "", 0
    for k, (lines, checkpoint, name) in enumerate(segments):
        if checkpoint is not None:
            body = check_checkpoint(checkpoint, identity_pem)
            base = Head(body["seq"], checkpoint_hash(body))
            if k and (body["seq"] != prev_head.seq
                      or body["dropped_head_hash"] != prev_head.hash
                      or body["prev_checkpoint"] != prev_base.hash):
                raise AuditError(
                    f"audit log: the checkpoint of {name or 'the live segment'} (seq "
                    f"{body['seq']}) does not stand for the segment before it (which ends "
                    f"at seq {prev_head.seq}): a segment replaced or rewritten",
                    seq=prev_head.seq, line=0, reason="checkpoint-mismatch")
        elif k:
            raise AuditError(f"audit log: {name or 'the live segment'} has no checkpoint "
                             "but follows an older segment", seq=None, line=0,
                             reason="checkpoint-mismatch")
        else:
            base, body = Head(0, GENESIS), None
        if first is None:
            first = base
            if body is not None:
                dropped, dropped_hash, cp_time = (body["seq"], body["dropped_head_hash"],
                                                  body["time"])
        seg = chain(lines, base, name)
        entries += seg
        names += [name] * len(seg)
        last_name, last_len = name, len(seg)
        prev_base, prev_head = base, (Head(seg[-1].seq, seg[-1].hash) if seg else base)
    base = first or Head(0, GENESIS)
    head, n = prev_head, len(entries)
    if signed_head is None:
        return AuditHistory(dropped, dropped_hash, cp_time, tuple(entries), head, None, n)
    if signed_head.seq < base.seq or (signed_head.seq == base.seq
                                      and signed_head.hash != base.hash):
        raise AuditError(
            f"audit log: the signed head (seq {signed_head.seq}) is at or before the "
            f"checkpoint (seq {base.seq}) and is not it: an older status report, or a "
            "rewritten history", seq=signed_head.seq, line=0, reason="head-mismatch")
    if signed_head.seq > head.seq:
        raise _bad(last_len + 1, head.seq + 1, "truncated",
                   f"missing: the log ends at seq {head.seq}, the device signed seq "
                   f"{signed_head.seq} as its head (truncated)", last_name)
    at = signed_head.seq - base.seq  # entries up to the signed head
    # (a checkpoint between segments is not an entry: the signed head names an entry, or
    # the first segment's checkpoint)
    signed_hash = entries[at - 1].hash if at else base.hash
    if signed_hash != signed_head.hash:
        line = entries[at - 1].line if at else 0
        raise _bad(line, signed_head.seq, "head-mismatch",
                   "differs from the head the device signed (edited, or the log was "
                   "rewritten before it)", names[at - 1] if at else "")
    if at < n and not allow_tail:
        raise _bad(entries[at].line, entries[at].seq, "unsigned-tail",
                   f"comes after the signed head (seq {signed_head.seq}): no signed report "
                   "vouches for it", names[at])
    return AuditHistory(dropped, dropped_hash, cp_time, tuple(entries), head,
                        signed_head.seq, n - at)
