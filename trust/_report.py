"""Signed status reports: what a device says about itself, signed by its TPM identity key.

Wire format (one JSON object): ``{"report": {...}, "alg": "ecdsa-p256-sha256",
"signature": base64(DER)}``; the signature covers a domain-separated SHA-256 of the
canonical JSON of ``report``. Defined once here for both the device and the operator.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from trust._tpm import TpmInterface
from trust.errors import UntrustedRemoteError

ALG = "ecdsa-p256-sha256"
_DOMAIN = b"modelward status report v1\n"
MAX_REPORT_BYTES = 64 * 1024


class ReportSignatureError(UntrustedRemoteError):
    """A status report is malformed, from an unknown device, or its signature is wrong.

    Attributes:
        device: the device id the report claims (or "").
    """

    def __init__(self, message: str, *, device: str = "") -> None:
        super().__init__(message)
        self.device = device


def _digest(report: dict[str, Any]) -> bytes:
    canonical = json.dumps(report, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(_DOMAIN + canonical).digest()


def sign_report(report: dict[str, Any], tpm: TpmInterface) -> bytes:
    """The signed wire form of ``report``."""
    sig = tpm.sign(_digest(report))
    doc = {"report": report, "alg": ALG, "signature": base64.b64encode(sig).decode()}
    return json.dumps(doc, sort_keys=True).encode()


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
        doc = json.loads(data)
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
