"""TPM response codes map to typed errors naming the handle (no TPM needed)."""

from __future__ import annotations

import pytest

from modelward.trust._tpm import Tpm
from modelward.trust.errors import (
    TpmAuthError,
    TpmError,
    TpmLockoutError,
    TpmNotProvisionedError,
    TpmUnavailableError,
)


def _tpm(legacy: bool = False) -> Tpm:
    t = object.__new__(Tpm)
    t.tcti = "swtpm:host=127.0.0.1,port=1"
    t._legacy_present = lambda: legacy  # type: ignore[method-assign]
    return t


@pytest.mark.parametrize(("rc", "kind"), [
    (0x9A2, TpmAuthError),       # wrong auth value, noDA object
    (0x98E, TpmAuthError),       # wrong auth value, DA-protected object
    (0x921, TpmLockoutError),
    (0x14A, TpmNotProvisionedError),
    (0x18B, TpmNotProvisionedError),  # no object at the handle
    (0xA000A, TpmUnavailableError),
    (0x149, TpmError),           # NV_AUTHORIZATION: owner may not write an AUTHWRITE index
])
def test_response_codes(rc: int, kind: type[TpmError]) -> None:
    e = _tpm()._convert("increment update counter 0x1000111", Exception("x"), rc)
    assert type(e) is kind
    assert e.rc == rc
    if kind is not TpmUnavailableError:
        assert "0x1000111" in str(e)


def test_auth_error_hint_names_owner_password_and_env() -> None:
    e = _tpm()._convert("HMAC", Exception("x"), 0x9A2)
    assert "owner password" in e.hint and "MODELWARD_TPM_OWNER_AUTH" in e.hint


def test_old_device_is_told_to_migrate() -> None:
    e = _tpm(legacy=True)._convert("open 0x1000111", Exception("x"), 0x18B)
    assert isinstance(e, TpmNotProvisionedError)
    assert "older modelward" in str(e) and "migrates" in e.hint
