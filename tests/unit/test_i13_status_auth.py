"""Issue 13 (a4): status.json is believed only with the TPM's MAC for the update counter
the TPM holds now (agent/_status.py); the signed report never carries what the disk put
back. Pure functions with a stand-in MAC key; the real TPM in
tests/integration/test_i13_status_auth.py."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest

from modelward.agent._status import AUTH, sealed_status, status_digest, verified_status

KEY = b"k" * 32


def _mac(digest: bytes) -> bytes:
    return hmac.new(KEY, digest, hashlib.sha256).digest()


def _ok(digest: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(_mac(digest), tag)


DOC: dict[str, Any] = {
    "last_error": {"type": "HealthCheckError", "message": "bad", "at": "2026-01-01T00:00:00"},
    "counters": {"attempts": 3, "failures": 1},
    "last_success": 5.0,
}


def test_a_sealed_status_verifies_for_its_counter() -> None:
    doc = sealed_status(DOC, 7, _mac)
    got, why = verified_status(doc, 7, _ok)
    assert why == "" and got == {k: DOC[k] for k in DOC}
    assert AUTH not in got


@pytest.mark.parametrize("edit", [
    lambda d: d.update(last_error=None),                     # the failure hidden
    lambda d: d["counters"].update(failures=0),             # counters rolled back
    lambda d: d.update(last_activation={"ok": True, "detail": "x"}),  # a field added
    lambda d: d.pop("last_error"),                           # a field removed
    lambda d: d[AUTH].update(mac="00" * 32),                 # another MAC
    lambda d: d[AUTH].update(mac="zz"),                      # not hex
    lambda d: d[AUTH].update(counter=8),                     # re-labelled for the counter
    lambda d: d.pop(AUTH),                                   # none at all
    lambda d: d.update({AUTH: "x"}),                         # not an object
])
def test_any_edit_is_not_believed(edit: Any) -> None:
    doc = sealed_status(DOC, 7, _mac)
    doc["counters"] = dict(doc["counters"])
    edit(doc)
    assert verified_status(doc, 7, _ok)[0] == {}


def test_a_copy_from_before_the_last_install_is_not_believed() -> None:
    old = sealed_status(DOC, 6, _mac)  # genuine, but the counter moved since
    got, why = verified_status(old, 7, _ok)
    assert got == {} and "counter 6" in why and "at 7" in why


def test_unknown_fields_are_not_covered_and_dropped() -> None:
    doc = sealed_status({**DOC, "junk": "x" * 100}, 7, _mac)
    assert "junk" not in doc
    doc["junk"] = 1  # (extra fields added later are dropped by the schema, not MACed)
    assert verified_status(doc, 7, _ok)[0] == {k: DOC[k] for k in DOC}


def test_the_digest_has_its_own_domain_and_covers_the_counter() -> None:
    assert status_digest(DOC, 1) != status_digest(DOC, 2)
    assert status_digest(DOC, 1) != hashlib.sha256(b"").digest()


@pytest.mark.parametrize("doc", [None, [], "x", 1, {AUTH: {"counter": True, "mac": ""}},
                                 {AUTH: {"counter": 7, "mac": "00"}}])
def test_garbage_is_not_believed(doc: object) -> None:
    assert verified_status(doc, 7, _ok)[0] == {}
