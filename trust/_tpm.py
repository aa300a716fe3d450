"""TPM access behind a small interface (house style 2).

:class:`TpmInterface` is what the trust store needs; :class:`Tpm` implements it on
tpm2-pytss ESAPI. Transient objects are flushed after every use: a device TPM goes
through the kernel resource manager, but swtpm in tests has none, and leaked
handles fill its three object slots (rc 0x902).
"""

from __future__ import annotations

import abc
import hashlib
import hmac as _hmac
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from trust.errors import (
    TpmError,
    TpmLockoutError,
    TpmNotProvisionedError,
    TpmUnavailableError,
)

SRK_HANDLE = 0x81000001
IDENTITY_HANDLE = 0x81000101
ANCHOR_INDEX = 0x01000100
COUNTER_INDEX = 0x01000110
_MAC_KEY_LABEL = b"modelward state MAC key v1"

_RC_NOT_INITIALIZED = 0x14A
_RC_NV_DEFINED = 0x14C
_RC_LOCKOUT = 0x921
_RC_RETRY = {0x922, 0x908, 0x90A}
_RC_TCTI_IO = 0xA000A

T = TypeVar("T")


@dataclass(frozen=True)
class ProvisionReport:
    """What provisioning created (True) or found in place (False)."""

    srk_created: bool
    identity_created: bool
    anchor_defined: bool
    counter_defined: bool
    identity_public_pem: bytes


class TpmInterface(abc.ABC):
    """The TPM operations the trust store uses."""

    tcti: str

    @abc.abstractmethod
    def provision(self) -> ProvisionReport:
        """Create or reuse SRK, identity key, root-anchor and counter NV indices."""

    @abc.abstractmethod
    def read_anchor(self) -> bytes:
        """The 32-byte root anchor."""

    @abc.abstractmethod
    def write_anchor(self, digest: bytes) -> None:
        """Rewrite the root anchor (provisioning and root rotation only)."""

    @abc.abstractmethod
    def read_counter(self) -> int:
        """The update counter."""

    @abc.abstractmethod
    def increment_counter(self) -> int:
        """Increment the update counter and return the new value."""

    @abc.abstractmethod
    def mac(self, digest: bytes) -> bytes:
        """HMAC-SHA256 of ``digest`` under the TPM-derived state MAC key."""

    @abc.abstractmethod
    def sign(self, digest: bytes) -> bytes:
        """DER ECDSA-P256 signature of a SHA-256 ``digest`` by the device identity key."""

    @abc.abstractmethod
    def identity_public_pem(self) -> bytes:
        """PEM of the device identity key (for enrolment)."""

    def mac_ok(self, digest: bytes, mac: bytes) -> bool:
        """Whether ``mac`` is this TPM's MAC of ``digest`` (constant time)."""
        return _hmac.compare_digest(self.mac(digest), mac)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection."""


def _diagnose_unavailable(tcti: str) -> tuple[str, str]:
    """Likely cause and hint for a TPM that cannot be opened."""
    swtpm_hint = (
        "for a software TPM: `modelward sim tpm start --state DIR` and set "
        "tcti = \"swtpm:host=127.0.0.1,port=N\" in the config"
    )
    kind, _, conf = tcti.partition(":")
    if kind == "device":
        dev = conf or "/dev/tpmrm0"
        if not Path(dev).exists():
            return f"device {dev} does not exist (no TPM, or the kernel driver is not loaded)", (
                swtpm_hint
            )
        if not os.access(dev, os.R_OK | os.W_OK):
            return (
                f"no read/write permission on {dev}",
                "run as a member of group `tss` (SupplementaryGroups=tss under systemd); "
                + swtpm_hint,
            )
        return f"device {dev} did not answer", swtpm_hint
    if kind == "swtpm":
        return f"swtpm at {conf or 'the default port'} is not running or not reachable", (
            swtpm_hint
        )
    return f"TCTI {kind!r} is not available on this system", swtpm_hint


class Tpm(TpmInterface):
    """The trust-store TPM through tpm2-pytss ESAPI.

    Args:
        tcti: e.g. ``device:/dev/tpmrm0`` or ``swtpm:host=127.0.0.1,port=2321``.
        retries: how often a command answered with a retry code (0x922, 0x908,
            0x90a) is sent again.

    Raises:
        TpmUnavailableError: the TPM cannot be opened.
    """

    def __init__(self, tcti: str, retries: int = 5) -> None:
        from tpm2_pytss import ESAPI, TSS2_Exception

        self.tcti = tcti
        self._retries = retries
        self._exc = TSS2_Exception
        try:
            self._esys: Any = ESAPI(tcti)
        except TSS2_Exception as e:
            cause, hint = _diagnose_unavailable(tcti)
            raise TpmUnavailableError(
                f"cannot open the TPM at {tcti!r}: {cause} ({e})", tcti=tcti, rc=e.rc, hint=hint
            ) from e

    # -- plumbing ---------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(self._retries + 1):
            try:
                return fn()
            except self._exc as e:
                rc = int(e.rc) & 0xFFFFFFFF
                base = rc & 0xFFF
                if base in _RC_RETRY and attempt < self._retries:
                    time.sleep(0.05 * (attempt + 1))
                    continue
                raise self._convert(what, e, rc) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _convert(self, what: str, e: Exception, rc: int) -> TpmError:
        base = rc & 0xFFF
        if rc & 0xFFFF0000 == 0xA0000 or rc == _RC_TCTI_IO:
            cause, hint = _diagnose_unavailable(self.tcti)
            return TpmUnavailableError(
                f"TPM at {self.tcti!r} stopped answering during {what}: {cause}",
                tcti=self.tcti,
                rc=rc,
                hint=hint,
            )
        if base == _RC_NOT_INITIALIZED or (rc & 0x80) and (rc & 0x3F) == 0x0B:
            return TpmNotProvisionedError(
                f"TPM at {self.tcti!r} is not provisioned for modelward ({what}: {e})",
                tcti=self.tcti,
                rc=rc,
                hint="run `modelward agent provision --config CONF --root ROOT_JSON`",
            )
        if base == _RC_LOCKOUT:
            return TpmLockoutError(
                f"TPM at {self.tcti!r} is in dictionary-attack lockout ({what})",
                tcti=self.tcti,
                rc=rc,
                hint="wait for the lockout to expire or clear it with the lockout authorization",
            )
        return TpmError(f"TPM command {what} failed at {self.tcti!r}: {e}", tcti=self.tcti, rc=rc)

    @contextmanager
    def _transient(self, handle: Any) -> Iterator[Any]:
        try:
            yield handle
        finally:
            self._esys.flush_context(handle)

    def _types(self) -> Any:
        import tpm2_pytss as t

        return t

    def _nv(self, index: int) -> Any:
        return self._call(f"open NV index {index:#x}", lambda: self._esys.tr_from_tpmpublic(index))

    def _persistent_exists(self, handle: int) -> Any | None:
        t = self._types()
        _, data = self._call(
            "list persistent handles",
            lambda: self._esys.get_capability(t.TPM2_CAP.HANDLES, handle, 1),
        )
        handles = list(data.data.handles)
        if handles and handles[0] == handle:
            return self._call(
                f"open {handle:#x}", lambda: self._esys.tr_from_tpmpublic(handle)
            )
        return None

    def _srk_template(self) -> Any:
        t = self._types()
        # TCG EK/SRK-style storage key: restricted decrypt, ECC P-256, AES-128-CFB.
        return t.TPM2B_PUBLIC.parse(
            "ecc256:aes128cfb",
            objectAttributes=t.TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS,
        )

    def _mac_key_template(self) -> Any:
        t = self._types()
        A = t.TPMA_OBJECT
        tmpl = t.TPM2B_PUBLIC.parse(
            "hmac:sha256",
            objectAttributes=A.SIGN_ENCRYPT
            | A.FIXEDTPM
            | A.FIXEDPARENT
            | A.SENSITIVEDATAORIGIN
            | A.USERWITHAUTH,
        )
        # The unique field makes the primary deterministic for this label: the same
        # key is re-derived from the owner seed every time, so it needs no slot.
        tmpl.publicArea.unique.keyedHash = hashlib.sha256(_MAC_KEY_LABEL).digest()
        return tmpl

    # -- provisioning -----------------------------------------------------

    def provision(self) -> ProvisionReport:
        t = self._types()
        e = self._esys
        srk = self._persistent_exists(SRK_HANDLE)
        srk_created = srk is None
        if srk is None:
            h, *_ = self._call(
                "create SRK",
                lambda: e.create_primary(None, self._srk_template(), t.ESYS_TR.OWNER),
            )
            with self._transient(h):
                srk = self._call(
                    "persist SRK", lambda: e.evict_control(t.ESYS_TR.OWNER, h, SRK_HANDLE)
                )
        else:
            pub, _, _ = self._call("read SRK", lambda: e.read_public(srk))
            want = self._srk_template().publicArea
            have = pub.publicArea
            if (
                have.type != want.type
                or have.parameters.eccDetail.curveID != want.parameters.eccDetail.curveID
                or int(have.objectAttributes) != int(want.objectAttributes)
            ):
                raise TpmError(
                    f"persistent handle {SRK_HANDLE:#x} holds a key that is not the "
                    "TCG ECC P-256 storage key modelward expects",
                    tcti=self.tcti,
                    hint="free the handle (tpm2_evictcontrol) or provision another TPM",
                )

        ident = self._persistent_exists(IDENTITY_HANDLE)
        identity_created = ident is None
        if ident is None:
            A = t.TPMA_OBJECT
            tmpl = t.TPM2B_PUBLIC.parse(
                "ecc256:ecdsa-sha256",
                objectAttributes=A.SIGN_ENCRYPT
                | A.FIXEDTPM
                | A.FIXEDPARENT
                | A.SENSITIVEDATAORIGIN
                | A.USERWITHAUTH,
            )
            priv, pub, *_ = self._call("create identity key", lambda: e.create(srk, None, tmpl))
            h = self._call("load identity key", lambda: e.load(srk, priv, pub))
            with self._transient(h):
                ident = self._call(
                    "persist identity key",
                    lambda: e.evict_control(t.ESYS_TR.OWNER, h, IDENTITY_HANDLE),
                )
        ipub, _, _ = self._call("read identity key", lambda: e.read_public(ident))

        anchor_defined = self._define_nv(ANCHOR_INDEX, 32, counter=False)
        counter_defined = self._define_nv(COUNTER_INDEX, 8, counter=True)
        if counter_defined:
            # A fresh NT_COUNTER is unreadable until its first increment.
            self.increment_counter()
        return ProvisionReport(
            srk_created, identity_created, anchor_defined, counter_defined, ipub.to_pem()
        )

    def _define_nv(self, index: int, size: int, *, counter: bool) -> bool:
        t = self._types()
        N = t.TPMA_NV
        attrs = N.OWNERWRITE | N.OWNERREAD | N.AUTHREAD | N.AUTHWRITE
        if counter:
            # Non-ORDERLY: every increment reaches NV, so power loss cannot roll it back.
            attrs |= t.TPM2_NT.COUNTER << N.TPM2_NT_SHIFT
        pub = t.TPM2B_NV_PUBLIC(
            nvPublic=t.TPMS_NV_PUBLIC(
                nvIndex=index, nameAlg=t.TPM2_ALG.SHA256, attributes=attrs, dataSize=size
            )
        )
        try:
            h = self._esys.nv_define_space(None, pub, t.ESYS_TR.OWNER)
        except self._exc as ex:
            if int(ex.rc) & 0xFFF == _RC_NV_DEFINED:
                return False  # idempotent provisioning: already there
            raise self._convert(f"define NV index {index:#x}", ex, int(ex.rc)) from ex
        self._esys.tr_close(h)
        return True

    # -- trust-store operations ---------------------------------------------

    def read_anchor(self) -> bytes:
        t = self._types()
        nv = self._nv(ANCHOR_INDEX)
        data = self._call(
            "read root anchor", lambda: self._esys.nv_read(nv, 32, 0, t.ESYS_TR.OWNER)
        )
        return bytes(data)

    def write_anchor(self, digest: bytes) -> None:
        t = self._types()
        nv = self._nv(ANCHOR_INDEX)
        self._call(
            "write root anchor", lambda: self._esys.nv_write(nv, digest, 0, t.ESYS_TR.OWNER)
        )

    def read_counter(self) -> int:
        t = self._types()
        nv = self._nv(COUNTER_INDEX)
        data = self._call(
            "read update counter", lambda: self._esys.nv_read(nv, 8, 0, t.ESYS_TR.OWNER)
        )
        return int.from_bytes(bytes(data), "big")

    def increment_counter(self) -> int:
        t = self._types()
        nv = self._nv(COUNTER_INDEX)
        self._call(
            "increment update counter", lambda: self._esys.nv_increment(nv, t.ESYS_TR.OWNER)
        )
        return self.read_counter()

    def mac(self, digest: bytes) -> bytes:
        t = self._types()
        e = self._esys
        h, *_ = self._call(
            "derive state MAC key",
            lambda: e.create_primary(None, self._mac_key_template(), t.ESYS_TR.OWNER),
        )
        with self._transient(h):
            out = self._call("HMAC", lambda: e.hmac(h, digest, t.TPM2_ALG.SHA256))
        return bytes(out)

    def sign(self, digest: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        t = self._types()
        ident = self._nv(IDENTITY_HANDLE)
        scheme = t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = t.TPM2_ALG.SHA256
        # The identity key is unrestricted, so a NULL hash-check ticket is accepted.
        ticket = t.TPMT_TK_HASHCHECK(tag=t.TPM2_ST.HASHCHECK, hierarchy=t.TPM2_RH.NULL)
        sig = self._call("sign with identity key",
                         lambda: self._esys.sign(ident, digest, scheme, ticket))
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s_ = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        return bytes(encode_dss_signature(r, s_))

    def identity_public_pem(self) -> bytes:
        """PEM of the device identity key (for enrolment)."""
        ident = self._nv(IDENTITY_HANDLE)
        pub, _, _ = self._call("read identity key", lambda: self._esys.read_public(ident))
        return bytes(pub.to_pem())

    def close(self) -> None:
        self._esys.close()
