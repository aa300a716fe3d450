"""Attacker review of issue 13: a status report payload (one device's credential, or the
broker, on ``devices/<id>/status``, retained) parsed by the operator's ``fleet status``
before its signature is checked. What works is xfail."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelward.publisher._fleet import _judge_device
from modelward.trust._report import ReportSignatureError, verify_report

NESTED = b"[" * 5000  # within MAX_REPORT_BYTES (64 KiB)


def test_a3_nested_status_report_is_a_rejected_row(tmp_path: Path) -> None:
    with pytest.raises(ReportSignatureError):
        verify_report(NESTED, None, "dev-1")
    row = _judge_device("dev-1", NESTED, False, tmp_path, "f", 0.0, 3600.0)
    assert not row.verified


@pytest.mark.parametrize("payload", [b"{", b"[]", b'{"report": 1, "signature": "x"}',
                                     b"x" * (64 * 1024 + 1), b"NaN"])
def test_a3_malformed_reports_are_signature_errors(payload: bytes) -> None:
    with pytest.raises(ReportSignatureError):
        verify_report(payload, None, "dev-1")
