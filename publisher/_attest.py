"""The operator's check of a device's attestation answer (``fleet attest``; issue 18,
docs/attestation.md "Measurement").

:func:`verify_answer` believes an answer only when, in this order:

1. it is a well-formed ``modelward-attestation/1`` document for this device;
2. its TPMS_ATTEST is signed by the AK enrolled for the device by credential activation
   (``fleet_dir/devices/<id>.ak.json``): else ``wrong key``;
3. the TPM generated it as an NV certification: else ``not certified register``;
4. its qualifying data is this request's nonce bound to the device id: else ``stale
   nonce``;
5. it certifies modelward's register (its TPM name fixes index, type, clear-on-restart
   and size), all 32 bytes: else ``not certified register``;
6. the event log replays to the certified value: else ``log mismatch``;
7. the last event names a model whose fingerprint a release of the operator's signed
   repository carries: else ``nothing trusted``, ``log overflow`` or ``unknown
   fingerprint``.

What is attested is what the device's agent measured at its last boot-check or
activation, with the TPM's word that nothing was measured after it this boot.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from modelward.publisher.errors import AttestationError
from modelward.trust._bounded import UntrustedJsonError, read_json_file
from modelward.trust._measure import (
    ANSWER_FORMAT,
    MAX_EVENT_BYTES,
    MAX_EVENTS,
    NOTHING_TRUSTED,
    OVERFLOW,
    REGISTER_SIZE,
    attest_qualifier,
    event_json,
    register_name,
    replay,
)
from modelward.trust._tpmimport import import_tpm2_pytss

logger = logging.getLogger(__name__)

NONCE_BYTES = 32
MAX_AK_FILE = 16 * 1024
_MAX_B64 = {"attest": 1024, "signature": 512}


def make_nonce() -> bytes:
    """A fresh nonce for one attestation request."""
    return secrets.token_bytes(NONCE_BYTES)


@dataclass(frozen=True)
class Attested:
    """What one device was attested to run.

    Attributes:
        name, version, channel, withdrawn: the signed release its fingerprint maps to.
        fingerprint, slot: as measured.
        reason: the event that measured it (``boot-check``, ``fallback``, ``activation``).
        since: when (the device's clock, UTC).
        events: events measured this boot.
        claimed: the model name and version the device wrote in the event (may differ
            from the signed release's only if the device lies: the release is believed).
        epoch: the TPM's reset and restart counts (as the AK's certification shows them:
            obfuscated per key, but equal within one boot); :func:`check_history`.
        lines: the events, for :func:`check_history` (not printed).
        audit: the device's audit trail head (``SEQ:HASH``) when that event was
            measured: the TPM vouches for the history up to it (``fleet audit``).
    """

    name: str
    version: str
    channel: str
    withdrawn: bool
    fingerprint: str
    slot: str
    reason: str
    since: str
    events: int
    claimed: str
    epoch: str = ""
    lines: tuple[bytes, ...] = ()
    audit: str | None = None


def _fail(device: str, reason: str, what: str) -> AttestationError:
    return AttestationError(f"{device}: {what}", device=device, reason=reason)


def _b64(doc: dict[str, Any], field: str, device: str) -> bytes:
    value = doc.get(field)
    if not isinstance(value, str) or len(value) > _MAX_B64[field] * 4 // 3 + 4:
        raise _fail(device, "malformed", f"the answer's {field} is missing or too long")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _fail(device, "malformed", f"the answer's {field} is not base64") from e


def _unmarshal(cls: Any, data: bytes, field: str, device: str) -> Any:
    t = import_tpm2_pytss()
    try:
        obj, used = cls.unmarshal(data)
    except (t.TSS2_Exception, TypeError, ValueError, OverflowError) as e:
        raise _fail(device, "malformed", f"the answer's {field} is not a {cls.__name__}") \
            from e
    if used != len(data):
        raise _fail(device, "malformed", f"the answer's {field} has bytes after its "
                    f"{cls.__name__}")
    return obj


def enrolled_ak(ak_path: Path, device: str) -> Any:
    """The AK public key recorded by ``fleet add-device``.

    Raises:
        AttestationError: ``not enrolled`` (no such file, or not one of modelward's).
    """
    t = import_tpm2_pytss()
    try:
        doc = read_json_file(ak_path, MAX_AK_FILE, what="enrolled attestation key")
    except (OSError, UntrustedJsonError) as e:
        raise AttestationError(f"{device}: no attestation key is enrolled ({ak_path}: {e})",
                               device=device, reason="not enrolled",
                               hint="enroll it with `fleet add-device --enrollment`") from e
    if doc is None:
        raise AttestationError(f"{device}: no attestation key is enrolled (no {ak_path})",
                               device=device, reason="not enrolled",
                               hint="enroll it with `fleet add-device --enrollment` (a device "
                               "added with --key has no AK)")
    if not isinstance(doc, dict) or doc.get("device_id") != device \
            or not isinstance(doc.get("ak_public"), str):
        raise _fail(device, "not enrolled", f"{ak_path} is not the AK record of {device}")
    try:
        pub, _ = t.TPM2B_PUBLIC.unmarshal(base64.b64decode(doc["ak_public"], validate=True))
        return serialization.load_pem_public_key(bytes(pub.to_pem()))
    except (t.TSS2_Exception, binascii.Error, TypeError, ValueError) as e:
        raise _fail(device, "not enrolled", f"{ak_path} holds no usable AK: {e}") from e


def verify_answer(doc: object, device: str, ak_path: Path, nonce: bytes,
                  releases: Callable[[str], Any]) -> Attested:
    """The release ``device`` runs, from its answer ``doc`` to the request with ``nonce``.

    Args:
        releases: fingerprint -> the signed release carrying it (None: none does).

    Raises:
        AttestationError: the answer is refused; ``reason`` says why (module docstring).
    """
    t = import_tpm2_pytss()
    ak = enrolled_ak(ak_path, device)
    if not isinstance(doc, dict) or doc.get("format") != ANSWER_FORMAT:
        raise _fail(device, "malformed", f"the answer is not a {ANSWER_FORMAT} document")
    if doc.get("device_id") != device:
        raise _fail(device, "malformed", "the answer names another device")
    events = doc.get("events")
    if not isinstance(events, list) or len(events) > MAX_EVENTS or not all(
            isinstance(e, str) and len(e) <= MAX_EVENT_BYTES and e.isascii() for e in events):
        raise _fail(device, "malformed", f"the answer's events are not a list of at most "
                    f"{MAX_EVENTS} ASCII lines of {MAX_EVENT_BYTES} bytes")
    attest2b = _unmarshal(t.TPM2B_ATTEST, _b64(doc, "attest", device), "attest", device)
    attest_bytes = bytes(attest2b)
    sig = _unmarshal(t.TPMT_SIGNATURE, _b64(doc, "signature", device), "signature", device)
    if sig.sigAlg != t.TPM2_ALG.ECDSA or sig.signature.ecdsa.hash != t.TPM2_ALG.SHA256:
        raise _fail(device, "wrong key", "the signature is not ECDSA-SHA256 (not the AK's)")
    der = encode_dss_signature(int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big"),
                               int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big"))
    try:
        ak.verify(der, attest_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as e:
        raise _fail(device, "wrong key", "the certification is not signed by the "
                    "attestation key enrolled for it (another TPM, or altered)") from e
    info = _unmarshal(t.TPMS_ATTEST, attest_bytes, "attest", device)
    if info.magic != t.TPM2_GENERATED.VALUE or info.type != t.TPM2_ST.ATTEST_NV:
        raise _fail(device, "not certified register", "the signed structure is not a "
                    "TPM-generated NV certification")
    if not hmac.compare_digest(bytes(info.extraData), attest_qualifier(device, nonce)):
        raise _fail(device, "stale nonce", "the certification answers another request "
                    "(an old nonce: a replayed answer)")
    nv = info.attested.nv
    if bytes(nv.indexName) != register_name() or nv.offset != 0 \
            or len(bytes(nv.nvContents)) != REGISTER_SIZE:
        raise _fail(device, "not certified register", "the certification is not of all of "
                    "modelward's measurement register (another NV index, or part of it)")
    lines = [e.encode() for e in events]
    if not hmac.compare_digest(replay(lines), bytes(nv.nvContents)):
        raise _fail(device, "log mismatch", f"the {len(lines)} events do not replay to the "
                    "certified register (edited, reordered, removed or added)")
    parsed = [event_json(line) for line in lines]
    for i, p in enumerate(parsed):
        if p is None or p["seq"] != i:
            raise _fail(device, "malformed", f"event {i} is not a canonical measured event")
    if not parsed:  # (cannot be: the register is written only by an extend)
        raise _fail(device, "log mismatch", "no event replays to a written register")
    last: dict[str, Any] = parsed[-1]  # type: ignore[assignment]
    if last["kind"] == OVERFLOW:
        raise _fail(device, "log overflow", f"more than {MAX_EVENTS} events were measured "
                    "this boot: nothing after them is attested until the device reboots")
    if last["kind"] == NOTHING_TRUSTED or not isinstance(last.get("fingerprint"), str):
        raise _fail(device, "nothing trusted", f"its last boot-check found no trusted model "
                    f"({str(last.get('reason', ''))[:200]})")
    fp = str(last["fingerprint"])
    rel = releases(fp)
    if rel is None:
        raise _fail(device, "unknown fingerprint", f"fingerprint {fp[:16]}… (claimed "
                    f"{str(last.get('model'))[:64]} {str(last.get('version'))[:32]}) is in "
                    "no release the repository signs")
    clock = info.clockInfo
    return Attested(rel.name, rel.version, rel.channel, rel.withdrawn, fp,
                    str(last.get("slot", "?")), str(last["kind"]), str(last.get("time", "")),
                    len(parsed), f"{last.get('model')} {last.get('version')}",
                    f"{int(clock.resetCount)}:{int(clock.restartCount)}", tuple(lines),
                    last.get("audit") if isinstance(last.get("audit"), str) else None)


HISTORY_FORMAT = "modelward-attest-history/1"


def check_history(fleet_dir: Path, device: str, a: Attested) -> None:
    """Refuse an attestation that erased what an earlier one showed in the same boot,
    then remember this one (``fleet_dir/attest/<id>.json``).

    Only a TPM Reset or Restart clears the register, and it changes the TPM's reset or
    restart count. An owner who undefines the register and a root who defines it again
    (same attributes, same TPM name) erase its history without one: within the same
    epoch, the events seen before must still be the first ones.

    Raises:
        AttestationError: ``register reset``.
    """
    from modelward.trust._atomic import write_atomic

    path = fleet_dir / "attest" / f"{device}.json"
    try:
        seen = read_json_file(path, 4096, what="attestation history")
    except (OSError, UntrustedJsonError) as e:  # (a symlink, a FIFO, too big, not JSON)
        seen = e
    if seen is not None and not (isinstance(seen, dict)
                                 and seen.get("format") == HISTORY_FORMAT
                                 and isinstance(seen.get("epoch"), str)
                                 and isinstance(seen.get("events"), int)
                                 and isinstance(seen.get("head"), str)):
        raise AttestationError(f"{device}: the attestation history {path} is damaged, so a "
                               "register reset cannot be ruled out", device=device,
                               reason="history unreadable", hint=f"inspect {path}; remove it "
                               "to start the history again from the next answer")
    if isinstance(seen, dict) and seen["epoch"] == a.epoch:
        n = int(seen["events"])
        if n > len(a.lines) or replay(a.lines[:n]).hex() != seen.get("head"):
            raise _fail(device, "register reset", f"in the same TPM boot ({a.epoch}) the "
                        f"register no longer holds the {n} event(s) attested before: it was "
                        "undefined and defined again (TPM owner access on the device)")
    try:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        write_atomic(path, json.dumps({"format": HISTORY_FORMAT, "epoch": a.epoch,
                                       "events": len(a.lines),
                                       "head": replay(a.lines).hex()}).encode() + b"\n",
                     mode=0o600)
    except OSError as e:  # (the answer verified; only the next check is weaker)
        logger.warning("cannot keep %s's attestation history in %s: %s", device, path, e)
