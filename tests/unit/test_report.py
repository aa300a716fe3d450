"""Status-report signing and verification with a software stand-in for the TPM key."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from modelward.agent._observe import Metrics
from modelward.trust._report import ReportSignatureError, sign_report, verify_report
from modelward.trust._tpm import TpmInterface


class _SoftKey(TpmInterface):
    """Signs like the TPM identity key; nothing else is needed here."""

    tcti = "soft"

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    def sign(self, digest: bytes) -> bytes:
        return self.key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))

    def identity_public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def provision(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def read_anchor(self) -> bytes:
        raise NotImplementedError

    def write_anchor(self, digest: bytes) -> None:
        raise NotImplementedError

    def read_counter(self) -> int:
        raise NotImplementedError

    def increment_counter(self) -> int:
        raise NotImplementedError

    def mac(self, digest: bytes) -> bytes:
        raise NotImplementedError


def test_round_trip_and_tamper() -> None:
    k = _SoftKey()
    data = sign_report({"device_id": "d1", "state": "active"}, k)
    assert verify_report(data, k.identity_public_pem(), "d1")["state"] == "active"
    doc = json.loads(data)
    doc["report"]["state"] = "idle"
    with pytest.raises(ReportSignatureError, match="does not verify"):
        verify_report(json.dumps(doc).encode(), k.identity_public_pem(), "d1")


def test_report_on_another_devices_topic() -> None:
    k = _SoftKey()
    data = sign_report({"device_id": "d1"}, k)
    with pytest.raises(ReportSignatureError, match="claims device"):
        verify_report(data, k.identity_public_pem(), "d2")


def test_unenrolled_and_malformed() -> None:
    k = _SoftKey()
    with pytest.raises(ReportSignatureError, match="not enrolled"):
        verify_report(sign_report({"device_id": "d1"}, k), None, "d1")
    for junk in (b"", b"{}", b'{"report": 1, "signature": "x"}', b"x" * 70000):
        with pytest.raises(ReportSignatureError):
            verify_report(junk, k.identity_public_pem(), "d1")


def test_prometheus_text() -> None:
    m = Metrics()
    m.counters["installed"] = 3
    text = m.prometheus()
    assert "# TYPE modelward_updates_installed_total counter" in text
    assert "modelward_updates_installed_total 3" in text
    assert Metrics.from_status(m.to_status()).counters["installed"] == 3
