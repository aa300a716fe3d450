"""The pure trust-record rules: every crash window of a commit, tampering, rollback."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from modelward.trust._record import ModelRef, Resolution, TrustRecord, choose_record, encode_record
from modelward.trust.errors import TrustRecordError, TrustRecordRollbackError

KEY = b"k" * 32


def mac(d: bytes) -> bytes:
    return hmac.new(KEY, d, hashlib.sha256).digest()


def ok(d: bytes, m: bytes) -> bool:
    return hmac.compare_digest(mac(d), m)


def enc(r: TrustRecord) -> bytes:
    return encode_record(r, mac(r.digest()))


R1 = TrustRecord(5, 1, 3, ModelRef("m", "1.0.0", "f1" * 32, "a"), None)
R2 = R1.successor(active=ModelRef("m", "2.0.0", "f2" * 32, "b"), previous=R1.active)


def choose(cur: bytes | None, pend: bytes | None, nv: int) -> tuple[TrustRecord, Resolution]:
    return choose_record(cur, pend, nv, ok, current_path="r", pending_path="r.next")


def test_steady_state() -> None:
    assert choose(enc(R1), None, 5) == (R1, Resolution.USE)


def test_crash_after_pending_write_before_increment_keeps_old() -> None:
    assert choose(enc(R1), enc(R2), 5) == (R1, Resolution.USE)


def test_crash_after_increment_before_rename_promotes_pending() -> None:
    assert choose(enc(R1), enc(R2), 6) == (R2, Resolution.PROMOTE_PENDING)


def test_torn_pending_write_is_ignored() -> None:
    assert choose(enc(R1), enc(R2)[:20], 5) == (R1, Resolution.USE)


def test_after_rename() -> None:
    assert choose(enc(R2), None, 6) == (R2, Resolution.USE)


def test_forged_pending_is_not_promoted() -> None:
    forged = encode_record(R2, b"\0" * 32)
    with pytest.raises(TrustRecordRollbackError):
        choose(enc(R1), forged, 6)


def test_edited_record_fails_mac() -> None:
    edited = enc(R1).replace(b"1.0.0", b"9.0.0")
    with pytest.raises(TrustRecordError, match="MAC"):
        choose(edited, None, 5)


def test_old_record_is_rollback() -> None:
    with pytest.raises(TrustRecordRollbackError):
        choose(enc(R1), None, 6)


def test_missing_record() -> None:
    with pytest.raises(TrustRecordError, match="missing"):
        choose(None, None, 5)


@pytest.mark.parametrize("junk", [b"", b"{", b"[]", b'{"record": {}, "mac": "00"}'])
def test_malformed_record(junk: bytes) -> None:
    with pytest.raises(TrustRecordError, match="malformed"):
        choose(junk, None, 5)


def test_digest_covers_every_field() -> None:
    base = R2.digest()
    for change in (
        {"counter": 7}, {"root_version": 2}, {"targets_version": 4}, {"previous": None},
        {"active": ModelRef("m", "2.0.0", "f2" * 32, "a")},
    ):
        assert R2.replace(**change).digest() != base
