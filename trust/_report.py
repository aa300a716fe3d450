"""Signed status reports: what a device says about itself, signed by its TPM identity key.

Wire format (one JSON object): ``{"report": {...}, "alg": "ecdsa-p256-sha256",
"signature": base64(DER)}``; the signature covers a domain-separated SHA-256 of the
canonical JSON of ``report``. Defined once here for both the device and the operator.

Freshness (design.md "Threat model": one device's credentials must not replay fleet state
undetected): every report carries ``seq``, a number the device never issues twice, ``at``
(UTC, when it was signed), ``poll_interval`` (seconds; a live device reports at least that
often) and ``fleet``. The device persists each ``seq`` before the report leaves it.
:func:`next_sequence` takes the larger of the persisted number + 1 and the wall clock in
milliseconds, so a disk attacker who rolls the sequence file back (or deletes the state
directory) cannot make the device reissue a number: the clock floor is already past every
number issued before, since reports come far less often than once a millisecond. A
persisted number more than :data:`SEQ_SLACK_MS` ahead of the clock is not believed (the
clock is used, and the agent logs it): the disk could otherwise silence the device or get
its fresh reports flagged as replayed. The TPM
update counter is no floor here: it moves only on installs, and an NV write per report
would wear the TPM (NV_RATE). What is left: an attacker who rolls back both the disk and
the device clock can make it reuse numbers; the operator then sees ``REPLAYED`` (see
``publisher/_fleet.py``), a false alarm, never a silent acceptance.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from modelward.trust._bounded import loads_bounded
from modelward.trust._report_seq import MAX_SEQ as MAX_SEQ
from modelward.trust._report_seq import SEQ_SLACK_MS as SEQ_SLACK_MS
from modelward.trust._report_seq import ReportSequenceError as ReportSequenceError
from modelward.trust._report_seq import next_sequence as next_sequence
from modelward.trust._report_seq import sequence_believable as sequence_believable
from modelward.trust._tpm import TpmInterface
from modelward.trust.errors import UntrustedRemoteError

ALG = "ecdsa-p256-sha256"
_DOMAIN = b"modelward status report v1\n"
MAX_REPORT_BYTES = 64 * 1024
# {"report": {"active": {...}}} nests 3 deep; one more lets a slightly wrong shape reach
# the schema check (publisher/_report_schema.py) and be named there
MAX_REPORT_DEPTH = 4


class ReportSignatureError(UntrustedRemoteError):
    """A status report is malformed, from an unknown device, or its signature is wrong.

    Attributes:
        device: the device id the report claims (or "").
    """

    def __init__(self, message: str, *, device: str = "") -> None:
        super().__init__(message)
        self.device = device




def report_digest(report: dict[str, Any]) -> str:
    """Hex digest of what a report's signature covers (the same report, signed again,
    keeps it; ECDSA signatures differ each time)."""
    return _digest(report).hex()


def _digest(report: dict[str, Any]) -> bytes:
    canonical = json.dumps(report, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(_DOMAIN + canonical).digest()


def sign_report(report: dict[str, Any], tpm: TpmInterface) -> bytes:
    """The signed wire form of ``report``."""
    sig = tpm.sign(_digest(report))
    doc = {"report": report, "alg": ALG, "signature": base64.b64encode(sig).decode()}
    return json.dumps(doc, sort_keys=True).encode()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity would break strict JSON output


def verify_report(data: bytes, public_pem: bytes | None, topic_device: str) -> dict[str, Any]:
    """Check a report against the enrolled key of the device it was published for.

    Args:
        data: the message payload.
        public_pem: the device's enrolled identity key, or None if not enrolled.
        topic_device: the device id from the topic; the report must claim the same.

    Raises:
        ReportSignatureError: malformed, unknown device, or a bad signature.
    """
    if len(data) > MAX_REPORT_BYTES:
        raise ReportSignatureError("report too large", device=topic_device)
    try:
        doc = loads_bounded(data, max_bytes=MAX_REPORT_BYTES, max_depth=MAX_REPORT_DEPTH,
                            what="the report")
        report, sig = doc["report"], base64.b64decode(doc["signature"], validate=True)
        if doc.get("alg") != ALG or not isinstance(report, dict):
            raise ValueError("alg/report")
    except (ValueError, KeyError, TypeError) as e:
        raise ReportSignatureError(f"malformed report: {e}", device=topic_device) from e
    if report.get("device_id") != topic_device:
        raise ReportSignatureError(
            f"report claims device {report.get('device_id')!r} on {topic_device!r}'s topic",
            device=topic_device)
    if public_pem is None:
        raise ReportSignatureError(f"device {topic_device!r} is not enrolled",
                                   device=topic_device)
    key = serialization.load_pem_public_key(public_pem)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ReportSignatureError("enrolled key is not an EC key", device=topic_device)
    try:
        key.verify(sig, _digest(report), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    except InvalidSignature as e:
        raise ReportSignatureError(
            f"signature of {topic_device!r}'s report does not verify with its enrolled key",
            device=topic_device) from e
    return report
