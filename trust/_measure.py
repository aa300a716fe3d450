"""The measurement register and its event log (issue 18; docs/attestation.md
"Measurement").

Whenever boot-check accepts a slot (or falls back, or finds nothing trusted) and at every
activation, :func:`measure` appends one event to ``state_dir/measure/events.jsonl`` and
then extends the TPM NV index :data:`REGISTER_INDEX` with the SHA-256 of that line. The
index is of type ``TPM_NT_EXTEND`` with ``TPMA_NV_CLEAR_STCLEAR``: nobody can write it,
only extend it, and only a TPM Reset or Restart (a reboot) clears it. It is not a PCR:
PCRs 0-15 belong to firmware and the OS, and the resettable 16 and 23 can be reset by any
local process.

Replaying the log from 32 zero bytes (``v = SHA-256(v || SHA-256(line))``) gives the
register. :func:`attest_answer` has the attestation key (AK) certify the register
(TPM2_NV_Certify) with the operator's nonce; the operator
(``modelward.publisher._attest.verify_answer``) checks the signature, the nonce, the
replay and the last event's fingerprint against the signed releases.

Order and failure: the line is appended (and fsynced) *before* the extend, so a power
cut leaves at most one line that was never extended; the next :func:`measure` finds the
register equal to the log without its last line and cuts that line. The extend happens
even when the log cannot be written (a planted symlink, a full disk): the register then
no longer matches any log, so the device cannot be attested until it reboots, rather
than be attested with a model it no longer runs. After :data:`MAX_EVENTS` events in one
boot, an ``overflow`` event is the last measured: attestation fails closed until reboot.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelward.trust._subdir import open_at, open_subdir, read_at
from modelward.trust.errors import (
    LocalDeviceError,
    MeasureLogError,
    TpmError,
    TpmNotProvisionedError,
)

if TYPE_CHECKING:
    from modelward.trust._record import ModelRef
    from modelward.trust._tpm import Tpm, TpmInterface

logger = logging.getLogger(__name__)

REGISTER_INDEX = 0x01000131
REGISTER_SIZE = 32  # SHA-256
MEASURE_DIR = "measure"
EVENTS = "events.jsonl"
PREVIOUS = "previous.jsonl"  # the log of the boot before (kept for forensics)
MAX_EVENTS = 1024  # events measured per boot (then `overflow`, and nothing more)
MAX_EVENT_BYTES = 1024
MAX_LOG_BYTES = MAX_EVENTS * (MAX_EVENT_BYTES + 1)
ANSWER_FORMAT = "modelward-attestation/1"
EVENT_VERSION = 1
# Kinds of measured events.
BOOT_CHECK = "boot-check"
FALLBACK = "fallback"
ACTIVATION = "activation"
NOTHING_TRUSTED = "nothing-trusted"
OVERFLOW = "overflow"
KINDS = (BOOT_CHECK, FALLBACK, ACTIVATION, NOTHING_TRUSTED, OVERFLOW)
_FIELD_CHARS = 256  # each string field of an event is cut to this
_RC_NV_UNINITIALIZED = 0x14A
ZERO = bytes(REGISTER_SIZE)
MIN_NONCE, MAX_NONCE = 16, 64  # bytes of an operator's nonce (the request channel's too)


def register_attributes() -> int:
    """The index's attributes: extend type, clear on TPM Restart, written and read only
    with the device's auth value (the owner may read: the value is not secret)."""
    from modelward.trust._tpmimport import import_tpm2_pytss

    t = import_tpm2_pytss()
    n = t.TPMA_NV
    return int(n.AUTHWRITE | n.AUTHREAD | n.OWNERREAD | n.NO_DA | n.CLEAR_STCLEAR
               | (t.TPM2_NT.EXTEND << n.TPM2_NT_SHIFT))


def register_name() -> bytes:
    """The TPM name of the register once written (what TPM2_NV_Certify reports): the
    operator compares it, so a certification of any other index is refused."""
    from modelward.trust._tpmimport import import_tpm2_pytss

    t = import_tpm2_pytss()
    pub = t.TPM2B_NV_PUBLIC(nvPublic=t.TPMS_NV_PUBLIC(
        nvIndex=REGISTER_INDEX, nameAlg=t.TPM2_ALG.SHA256,
        attributes=register_attributes() | int(t.TPMA_NV.WRITTEN), dataSize=REGISTER_SIZE))
    return bytes(pub.get_name())


def attest_qualifier(device_id: str, nonce: bytes) -> bytes:
    """TPM2_NV_Certify's qualifying data: the operator's nonce, bound to the device id."""
    return hashlib.sha256(b"modelward attest v1\0" + device_id.encode() + b"\0"
                          + nonce).digest()


def event_line(seq: int, kind: str, ref: ModelRef | None, reason: str, at: float,
               audit: str | None = None) -> bytes:
    """One event as canonical JSON (sorted keys, no spaces, ASCII), without newline;
    ``audit``: the audit trail's head then (``SEQ:HASH``), so the TPM vouches for it."""
    def cut(v: object) -> str:
        return str(v)[:_FIELD_CHARS]

    doc: dict[str, object] = {"v": EVENT_VERSION, "seq": seq, "kind": kind,
                              "reason": cut(reason),
                              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))}
    if ref is not None:
        doc.update(model=cut(ref.name), version=cut(ref.version),
                   fingerprint=cut(ref.fingerprint), slot=cut(ref.slot))
    if audit is not None:
        doc["audit"] = cut(audit)
    line = canonical(doc)
    while len(line) > MAX_EVENT_BYTES and doc["reason"]:  # (escaped non-ASCII grows 6x)
        doc["reason"] = str(doc["reason"])[:len(str(doc["reason"])) // 2]
        line = canonical(doc)
    return line


def audit_head(state_dir: Path) -> str | None:
    """The audit trail's head as ``SEQ:HASH`` (None: unreadable, logged by its writer)."""
    from modelward.trust._audit import AuditLog
    from modelward.trust.errors import AuditLogError

    try:
        h = AuditLog(state_dir).head()
    except (AuditLogError, OSError, ValueError):
        return None
    return f"{h.seq}:{h.hash}"


def canonical(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def replay(lines: Iterable[bytes], start: bytes = ZERO) -> bytes:
    """The register value after extending ``start`` with each line's SHA-256."""
    v = start
    for line in lines:
        v = hashlib.sha256(v + hashlib.sha256(line).digest()).digest()
    return v


def split_log(data: bytes) -> list[bytes]:
    """The complete lines of a log (a torn last line, never extended, is left out).

    Raises:
        ValueError: a line is over :data:`MAX_EVENT_BYTES`.
    """
    lines = data.split(b"\n")
    lines.pop()  # after the last newline: "" or a torn append
    for i, line in enumerate(lines):
        if len(line) > MAX_EVENT_BYTES:
            raise ValueError(f"line {i + 1} is over {MAX_EVENT_BYTES} bytes")
    return lines


class EventLog:
    """``state_dir/measure/``: the current boot's events and the previous boot's."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / MEASURE_DIR
        self.torn = False  # the last read found bytes after the last newline

    def read(self) -> list[bytes]:
        """This boot's complete lines (none when there is no log yet).

        Raises:
            MeasureLogError: a symlink, not a file, over the bound, or a line over its bound.
        """
        try:
            with open_subdir(self.path, False, "measurement log directory",
                             MeasureLogError) as dfd:
                data = read_at(dfd, self.path, EVENTS, MAX_LOG_BYTES + MAX_EVENT_BYTES,
                               MeasureLogError)
        except FileNotFoundError:
            return []
        data = data or b""
        self.torn = bool(data) and not data.endswith(b"\n")
        try:
            return split_log(data)
        except ValueError as e:
            raise MeasureLogError(f"{self.path / EVENTS}: {e}", path=str(self.path / EVENTS)
                                  ) from e

    def new_boot(self) -> None:
        """The register was cleared (a TPM restart): this log becomes the previous one."""
        with open_subdir(self.path, True, "measurement log directory", MeasureLogError) as dfd:
            with contextlib.suppress(FileNotFoundError):
                os.rename(EVENTS, PREVIOUS, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)

    def cut_to(self, count: int, lines: Sequence[bytes]) -> None:
        """Keep the first ``count`` of ``lines`` (a last line never extended is cut)."""
        keep = sum(len(line) + 1 for line in lines[:count])
        with open_subdir(self.path, True, "measurement log directory", MeasureLogError) as dfd:
            fd = open_at(dfd, self.path, EVENTS, os.O_WRONLY, MeasureLogError)
            try:
                os.ftruncate(fd, keep)
                os.fsync(fd)
            finally:
                os.close(fd)

    def append(self, line: bytes) -> None:
        """Append one line and fsync it (before the register is extended)."""
        with open_subdir(self.path, True, "measurement log directory", MeasureLogError) as dfd:
            fd = open_at(dfd, self.path, EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                         MeasureLogError)
            try:
                data = memoryview(line + b"\n")
                while data:  # (a short write on a full disk: the rest, or ENOSPC)
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.fsync(dfd)


# -- the TPM side -------------------------------------------------------------------


def provision_register(tpm: Tpm) -> bool:
    """Define the register unless it is there (checked then); True if defined.

    Raises:
        TpmError: the index exists with other attributes or size (refused, never used).
        TpmAuthError: it does not take this device's auth value.
    """
    return tpm._provision_nv(REGISTER_INDEX, REGISTER_SIZE, counter=False,
                             attrs=register_attributes())


def _read_register(tpm: Tpm) -> bytes | None:
    """The register's value; None when unwritten since the TPM restarted.

    Raises:
        TpmNotProvisionedError: no register (a device provisioned before issue 18).
        TpmError: the TPM failed, or the index is not modelward's register.
    """
    t = tpm._types()
    e = tpm._esys
    if not tpm._exists(REGISTER_INDEX):
        raise TpmNotProvisionedError(
            f"no measurement register at NV index {REGISTER_INDEX:#x}", tcti=tpm.tcti,
            hint="run `modelward agent provision` (it adds the register to an existing "
            "trust store)")
    nv = tpm._obj(REGISTER_INDEX)
    pub, _ = tpm._call(f"read NV index {REGISTER_INDEX:#x} public", lambda: e.nv_read_public(nv))
    attrs = int(pub.nvPublic.attributes)
    if attrs & ~int(t.TPMA_NV.WRITTEN) != register_attributes() \
            or pub.nvPublic.dataSize != REGISTER_SIZE:
        raise TpmError(f"NV index {REGISTER_INDEX:#x} is not modelward's measurement "
                       f"register (attributes {attrs:#x}); refusing to extend it",
                       tcti=tpm.tcti, hint="undefine it and run `agent provision`")
    if not attrs & int(t.TPMA_NV.WRITTEN):
        return None
    data = tpm._call(f"read measurement register {REGISTER_INDEX:#x}",
                     lambda: e.nv_read(nv, REGISTER_SIZE, 0, nv))
    return bytes(data)


def _extend(tpm: Tpm, line: bytes) -> None:
    nv = tpm._obj(REGISTER_INDEX)
    digest = hashlib.sha256(line).digest()
    tpm._call(f"extend measurement register {REGISTER_INDEX:#x}",
              lambda: tpm._esys.nv_extend(nv, digest, nv))


def measure(tpm: TpmInterface, state_dir: Path, kind: str, ref: ModelRef | None,
            reason: str = "", clock: float | None = None) -> bool:
    """Measure one event (log, then register); never raises (logs instead).

    Returns:
        Whether the event was measured and logged.
    """
    from modelward.trust._tpm import Tpm

    if not isinstance(tpm, Tpm):  # (an in-memory TPM of the unit tests: nothing to extend)
        return False
    try:
        return _measure(tpm, EventLog(state_dir), kind, ref, reason,
                        time.time() if clock is None else clock)
    except Exception as e:  # noqa: BLE001 - the boot path: never raises (a raw TSS error too)
        logger.error("measurement of %s not made: %s", kind, e,
                     extra={"measure_kind": kind, "error": type(e).__name__})
        return False


def _measure(tpm: Tpm, log: EventLog, kind: str, ref: ModelRef | None, reason: str,
             at: float) -> bool:
    value = _read_register(tpm)
    lines: list[bytes] = []
    consistent = True  # the log (after recovery) replays to the register
    try:
        if value is None:
            log.new_boot()
        else:
            lines = log.read()
            if log.torn:  # a torn append (power cut mid-write): never extended, cut it
                log.cut_to(len(lines), lines)
            if replay(lines) != value:
                if lines and replay(lines[:-1]) == value:
                    log.cut_to(len(lines) - 1, lines)  # (appended, never extended)
                    lines.pop()
                else:
                    consistent = False
                    logger.error("measurement log does not replay to the register (edited, "
                                 "or lost): extending regardless; attestation fails until "
                                 "reboot")
    except (MeasureLogError, OSError) as e:  # (whatever the disk does, the extend happens)
        consistent = False
        logger.error("measurement log unusable (%s): extending regardless; this device "
                     "cannot be attested until it reboots", e)
    if consistent and len(lines) >= MAX_EVENTS:
        logger.error("measurement log full (%d events this boot): %s not measured; "
                     "attestation fails closed until reboot", len(lines), kind)
        return False
    if len(lines) == MAX_EVENTS - 1:
        kind, ref, reason = OVERFLOW, None, f"more than {MAX_EVENTS} events this boot"
    line = event_line(len(lines), kind, ref, reason, at, audit_head(log.path.parent))
    logged = consistent
    if consistent:
        try:
            log.append(line)
        except (MeasureLogError, OSError) as e:
            logged = False
            logger.error("measurement log not written (%s): extending regardless", e)
    _extend(tpm, line)
    return logged


def attest_answer(tpm: Tpm, state_dir: Path, nonce: bytes, device_id: str) -> dict[str, Any]:
    """The answer to ``fleet attest``: the AK's certification of the register over the
    operator's nonce, and this boot's event log.

    Raises:
        TpmNotProvisionedError: no register or no AK (run `agent provision`).
        LocalDeviceError: nothing measured since the TPM restarted.
        MeasureLogError: the log directory or file is a symlink, or over its bound.
        TpmError: the TPM failed.
    """
    from modelward.trust._ak import AK_HANDLE

    t = tpm._types()
    if _read_register(tpm) is None:
        raise LocalDeviceError("nothing measured since the TPM last restarted",
                               hint="run `modelward agent boot-check` (the service does "
                               "at every start)")
    nv = tpm._obj(REGISTER_INDEX)
    if not tpm._exists(AK_HANDLE):
        raise TpmNotProvisionedError("no attestation key", tcti=tpm.tcti,
                                     hint="run `modelward agent provision`")
    scheme = t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.NULL)
    attest, sig = tpm._call(
        f"certify measurement register {REGISTER_INDEX:#x}",
        lambda: tpm._esys.nv_certify(tpm._obj(AK_HANDLE), nv,
                                     attest_qualifier(device_id, nonce), scheme,
                                     REGISTER_SIZE, 0, auth_handle=nv))
    # (read after the certification: an event measured meanwhile is one line more, left out)
    lines = EventLog(state_dir).read()
    info, _ = t.TPMS_ATTEST.unmarshal(bytes(attest))
    certified = bytes(info.attested.nv.nvContents)
    if replay(lines) != certified and lines and replay(lines[:-1]) == certified:
        lines.pop()  # (an event being measured right now: appended, not yet extended)
    return {"format": ANSWER_FORMAT, "device_id": device_id,
            "register": f"{REGISTER_INDEX:#x}",
            "attest": base64.b64encode(attest.marshal()).decode(),
            "signature": base64.b64encode(sig.marshal()).decode(),
            "events": [line.decode("ascii", "replace") for line in lines]}


def attest_hex(tpm: Tpm, state_dir: Path, nonce_hex: str, device_id: str) -> dict[str, Any]:
    """``agent attest --nonce HEX``: :func:`attest_answer` for a nonce given as hex.

    Raises:
        OperatorInputError: the nonce is not 16..64 bytes of hex.
    """
    from modelward.trust.errors import OperatorInputError

    try:
        nonce = bytes.fromhex(nonce_hex)
    except ValueError as e:
        raise OperatorInputError(f"--nonce {nonce_hex[:80]!r} is not hex") from e
    if not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise OperatorInputError(f"--nonce is {len(nonce)} bytes, not {MIN_NONCE}..{MAX_NONCE}")
    return attest_answer(tpm, state_dir, nonce, device_id)


def event_json(line: bytes) -> dict[str, Any] | None:
    """An event line parsed (None: not a canonical event of this version)."""
    from modelward.trust._bounded import UntrustedJsonError, loads_bounded

    try:
        doc = loads_bounded(line, max_bytes=MAX_EVENT_BYTES, what="a measured event")
    except UntrustedJsonError:
        return None
    if not isinstance(doc, dict) or canonical(doc) != line or doc.get("v") != EVENT_VERSION \
            or doc.get("kind") not in KINDS or not isinstance(doc.get("seq"), int):
        return None
    return doc
