"""TPM access behind a small interface (house style 2).

The objects take an auth value only the agent user holds (trust/_tpmauth.py, design
and limits in docs/notes.md "TPM authorization").

:class:`TpmInterface` is what the trust store needs; :class:`Tpm` implements it on
tpm2-pytss ESAPI. Transient objects are flushed after every use: a device TPM goes
through the kernel resource manager, but swtpm in tests has none, and leaked
handles fill its three object slots (rc 0x902).
"""

from __future__ import annotations

import abc
import hashlib
import hmac as _hmac
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from modelward.trust._tpmimport import import_tpm2_pytss
from modelward.trust.errors import (
    TpmAuthError,
    TpmError,
    TpmLockoutError,
    TpmNotProvisionedError,
    TpmUnavailableError,
)

logger = logging.getLogger(__name__)

SRK_HANDLE = 0x81000001
# The objects modelward uses, each with the device's auth value (trust/_tpmauth.py).
IDENTITY_HANDLE = 0x81000102
MAC_KEY_HANDLE = 0x81000103
ANCHOR_INDEX = 0x01000101
COUNTER_INDEX = 0x01000111
# The highest top-level targets version ever installed (issue 13 a4): a heal from an older
# copy of the disk must not accept the older, still unexpired metadata an origin replays.
FLOOR_INDEX = 0x01000121
# The open objects of devices provisioned before TPM authorization (issue 13, finding 8):
# read once by `agent provision` to migrate the device, then removed.
LEGACY_IDENTITY_HANDLE = 0x81000101
LEGACY_ANCHOR_INDEX = 0x01000100
LEGACY_COUNTER_INDEX = 0x01000110
LEGACY_MAC_KEY_LABEL = b"modelward state MAC key v1"
# The TPM owner password, for `agent provision` on a TPM whose owner hierarchy has one.
OWNER_AUTH_ENV = "MODELWARD_TPM_OWNER_AUTH"

_RC_NOT_INITIALIZED = 0x14A
_RC_NV_DEFINED = 0x14C
_RC_LOCKOUT = 0x921
_RC_RETRY = {0x922, 0x908, 0x90A}
_RC_TCTI_IO = 0xA000A
_RC_BAD_AUTH = 0x9A2  # wrong authValue on a noDA object
_RC_AUTH_FAIL = 0x98E  # wrong authValue on a DA-protected object (counts toward lockout)

if TYPE_CHECKING:  # (built by provision only: not a class made at every boot, issue 15)
    from modelward.trust._provision import ProvisionReport

T = TypeVar("T")


class LegacyObjects(abc.ABC):
    """The open (no-auth) objects of a device provisioned before TPM authorization."""

    @abc.abstractmethod
    def read_anchor(self) -> bytes | None:
        """The old root anchor, or None if it was never written or is gone."""

    @abc.abstractmethod
    def read_counter(self) -> int:
        """The old update counter."""

    @abc.abstractmethod
    def mac(self, digest: bytes) -> bytes:
        """HMAC under the old label-derived key."""

    def mac_ok(self, digest: bytes, mac: bytes) -> bool:
        """Whether ``mac`` is the old key's MAC of ``digest`` (constant time)."""
        return _hmac.compare_digest(self.mac(digest), mac)


class TpmInterface(abc.ABC):
    """The TPM operations the trust store uses."""

    tcti: str

    @abc.abstractmethod
    def provision(self, *, keep_identity: bool = False) -> ProvisionReport:
        """Create or reuse SRK, identity key, MAC key, root-anchor and counter NV indices.

        ``keep_identity``: when migrating, keep the old identity key pair (its enrolment)
        instead of creating a new key (docs/notes.md "TPM authorization").
        """

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
        """HMAC-SHA256 of ``digest`` under the TPM-kept state MAC key."""

    @abc.abstractmethod
    def sign(self, digest: bytes) -> bytes:
        """DER ECDSA-P256 signature of a SHA-256 ``digest`` by the device identity key."""

    @abc.abstractmethod
    def identity_public_pem(self) -> bytes:
        """PEM of the device identity key (for enrolment)."""

    def mac_ok(self, digest: bytes, mac: bytes) -> bool:
        """Whether ``mac`` is this TPM's MAC of ``digest`` (constant time)."""
        return _hmac.compare_digest(self.mac(digest), mac)

    def shared_x(self, point: bytes) -> bytes:
        """The x coordinate of the device decryption key's ECDH with ``point`` (an
        uncompressed P-256 point), computed in the TPM (issue 19, encrypted bundles)."""
        raise TpmError("this TPM has no decryption key", tcti=self.tcti,
                       hint="run `agent provision` (it adds the key), then enroll again")

    def read_targets_floor(self) -> int:
        """The highest targets version installed, kept in the TPM (0: none or no index).

        This default is for TPMs that keep no floor (test doubles); :class:`Tpm` keeps it
        in NV index :data:`FLOOR_INDEX`.
        """
        return 0

    def write_targets_floor(self, version: int) -> None:  # noqa: B027 - optional hook
        """Raise the floor to ``version`` (callers only ever raise it)."""

    def use_auth_dir(self, directory: Path) -> None:  # noqa: B027 - optional hook
        """Take the objects' auth value from ``directory`` (read on first use)."""

    def set_auth(self, secret: bytes) -> None:  # noqa: B027 - optional hook
        """Use ``secret`` as the objects' auth value."""

    def legacy(self) -> LegacyObjects | None:
        """The open objects of an older provisioning, if this TPM still has them."""
        return None

    def retire_legacy(self) -> None:  # noqa: B027 - optional hook
        """Remove the open objects of an older provisioning (after migration)."""

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

    Every modelward object takes the device's auth value (trust/_tpmauth.py): NV indexes
    are AUTHREAD|AUTHWRITE (plus OWNERREAD, so reading stays possible for diagnosis) and
    noDA; the MAC and identity keys are TPM-generated children of the SRK with that
    authValue. Commands use password sessions: no extra TPM command per operation.

    Args:
        tcti: e.g. ``device:/dev/tpmrm0`` or ``swtpm:host=127.0.0.1,port=2321``.
        retries: how often a command answered with a retry code (0x922, 0x908,
            0x90a) is sent again.
        auth: the objects' auth value; else it is read from :meth:`use_auth_dir`.

    Raises:
        TpmUnavailableError: the TPM cannot be opened.
    """

    def __init__(self, tcti: str, retries: int = 5, auth: bytes | None = None) -> None:
        t = import_tpm2_pytss()
        ESAPI, TSS2_Exception = t.ESAPI, t.TSS2_Exception  # noqa: N806 - the library's names

        self.tcti = tcti
        self._retries = retries
        self._exc = TSS2_Exception
        self._auth = auth
        self._auth_dir: Path | None = None
        self._handles: dict[int, Any] = {}
        try:
            self._esys: Any = ESAPI(tcti)
        except TSS2_Exception as e:
            cause, hint = _diagnose_unavailable(tcti)
            raise TpmUnavailableError(
                f"cannot open the TPM at {tcti!r}: {cause} ({e})", tcti=tcti, rc=e.rc, hint=hint
            ) from e

    # -- auth ---------------------------------------------------------------

    def use_auth_dir(self, directory: Path) -> None:
        self._auth_dir = directory

    def set_auth(self, secret: bytes) -> None:
        self._auth = secret
        self._handles.clear()

    def _secret(self) -> bytes:
        if self._auth is None:
            if self._auth_dir is None:
                raise TpmNotProvisionedError(
                    f"no auth value for modelward's objects on the TPM at {self.tcti!r}",
                    tcti=self.tcti,
                    hint="open the TPM through the trust store (TrustStore) so the auth "
                    "file is used",
                )
            from modelward.trust._tpmauth import read_auth

            self._auth = read_auth(self._auth_dir)
        return self._auth

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
            if self._legacy_present():
                return TpmNotProvisionedError(
                    f"TPM at {self.tcti!r} was provisioned by an older modelward, whose "
                    f"objects anyone may use; it must be migrated ({what}: {e})",
                    tcti=self.tcti,
                    rc=rc,
                    hint="run `modelward agent provision --config CONF --root ROOT_JSON` "
                    "once: it migrates the device and keeps its model and identity key",
                )
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
        if base in (_RC_BAD_AUTH, _RC_AUTH_FAIL) or (rc & 0x80 and (rc & 0x3F) in (0x0E, 0x22)):
            return TpmAuthError(
                f"TPM at {self.tcti!r} refused modelward's authorization ({what}): the "
                "object does not take this device's auth value",
                tcti=self.tcti,
                rc=rc,
                hint="someone with TPM owner authorization redefined it, or the auth file "
                "is from another provisioning; set a TPM owner password and re-provision "
                f"(provisioning on a TPM with an owner password: set {OWNER_AUTH_ENV})",
            )
        return TpmError(f"TPM command {what} failed at {self.tcti!r}: {e}", tcti=self.tcti, rc=rc)

    def _legacy_present(self) -> bool:
        """Whether the old open objects are there (on an error path: never raises)."""
        try:
            return self._exists(LEGACY_COUNTER_INDEX) and not self._exists(COUNTER_INDEX)
        except TpmError:
            return False

    @contextmanager
    def _transient(self, handle: Any) -> Iterator[Any]:
        try:
            yield handle
        finally:
            self._esys.flush_context(handle)

    def _types(self) -> Any:
        return import_tpm2_pytss()

    def _obj(self, handle: int, *, authorized: bool = True) -> Any:
        """ESYS handle of a persistent object or NV index, with the auth value set."""
        tr = self._handles.get(handle)
        if tr is None:
            tr = self._call(f"open {handle:#x}", lambda: self._esys.tr_from_tpmpublic(handle))
            if authorized:
                self._esys.tr_set_auth(tr, self._secret())
            self._handles[handle] = tr
        return tr

    def _exists(self, handle: int) -> bool:
        t = self._types()
        _, data = self._call(
            "list handles",
            lambda: self._esys.get_capability(t.TPM2_CAP.HANDLES, handle, 1),
        )
        handles = list(data.data.handles)
        return bool(handles) and handles[0] == handle

    def _persistent_exists(self, handle: int) -> Any | None:
        if not self._exists(handle):
            return None
        return self._call(f"open {handle:#x}", lambda: self._esys.tr_from_tpmpublic(handle))

    def _srk_template(self) -> Any:
        t = self._types()
        # TCG EK/SRK-style storage key: restricted decrypt, ECC P-256, AES-128-CFB.
        return t.TPM2B_PUBLIC.parse(
            "ecc256:aes128cfb",
            objectAttributes=t.TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS,
        )

    def _key_attrs(self) -> int:
        A = self._types().TPMA_OBJECT
        # NODA: the 256-bit auth value cannot be guessed, so dictionary-attack counting
        # protects nothing and would only let a local process lock the agent out.
        return int(A.SIGN_ENCRYPT | A.FIXEDTPM | A.FIXEDPARENT | A.SENSITIVEDATAORIGIN
                   | A.USERWITHAUTH | A.NODA)

    def _nv_attrs(self, *, counter: bool) -> int:
        t = self._types()
        N = t.TPMA_NV
        # AUTHWRITE only: the owner hierarchy cannot write or increment. OWNERREAD keeps
        # reading open (the values are not secret). NO_DA as for the keys.
        attrs = N.AUTHWRITE | N.AUTHREAD | N.OWNERREAD | N.NO_DA
        if counter:
            # Non-ORDERLY: every increment reaches NV, so power loss cannot roll it back.
            attrs |= t.TPM2_NT.COUNTER << N.TPM2_NT_SHIFT
        return int(attrs)

    def _sensitive(self) -> Any:
        t = self._types()
        return t.TPM2B_SENSITIVE_CREATE(
            sensitive=t.TPMS_SENSITIVE_CREATE(userAuth=t.TPM2B_AUTH(self._secret()))
        )

    def shared_x(self, point: bytes) -> bytes:
        from modelward.trust._deckey import DECRYPT_HANDLE, shared_x

        if not self._exists(DECRYPT_HANDLE):
            return super().shared_x(point)
        return shared_x(self, point)

    # -- provisioning -----------------------------------------------------

    def provision(self, *, keep_identity: bool = False) -> ProvisionReport:
        """Create or check every object; needs the auth value (:meth:`set_auth`).

        Objects already in place are checked, not rewritten: their attributes must be
        the ones modelward defines and they must take this device's auth value, so an
        object planted at one of the handles by another TPM client is refused.

        Raises:
            TpmAuthError: an object at modelward's handle does not take the auth value.
            TpmError: a handle holds something else, or the TPM failed.
        """
        self._secret()
        self._use_owner_auth()
        self._handles.clear()
        migrated = self._exists(LEGACY_ANCHOR_INDEX) or self._exists(LEGACY_COUNTER_INDEX) \
            or self._exists(LEGACY_IDENTITY_HANDLE)
        srk, srk_created = self._provision_srk()
        had_legacy_identity = self._exists(LEGACY_IDENTITY_HANDLE)
        identity_created = self._provision_identity(srk, keep_identity=keep_identity)
        mac_key_created = self._provision_mac_key(srk)
        anchor_defined = self._provision_nv(ANCHOR_INDEX, 32, counter=False)
        counter_defined = self._provision_nv(COUNTER_INDEX, 8, counter=True)
        self._provision_nv(FLOOR_INDEX, 8, counter=False)  # (devices from before: added)
        from modelward.trust._ak import provision_ak

        ak_created = provision_ak(self, srk)  # (devices from before issue 18: added)
        from modelward.trust._deckey import provision_decrypt_key

        decrypt_created = provision_decrypt_key(self, srk)  # (issue 19: added likewise)
        from modelward.trust._measure import provision_register

        register_defined = provision_register(self)  # (issue 18: added likewise)
        owner_auth_set = self._owner_auth_set()
        ipub, _, _ = self._call("read identity key",
                                lambda: self._esys.read_public(self._obj(IDENTITY_HANDLE)))
        from modelward.trust._provision import ProvisionReport

        return ProvisionReport(srk_created, identity_created, anchor_defined, counter_defined,
                               ipub.to_pem(), mac_key_created, migrated,
                               identity_created and had_legacy_identity and not keep_identity,
                               ak_created=ak_created, register_defined=register_defined,
                               owner_auth_set=owner_auth_set,
                               decrypt_created=decrypt_created)

    def _owner_auth_set(self) -> bool | None:
        """Whether the TPM's owner hierarchy has a password (None: cannot tell). Without
        one, any local process can undefine modelward's NV indexes (docs/attestation.md)."""
        t = self._types()
        try:
            _, data = self._esys.get_capability(t.TPM2_CAP.TPM_PROPERTIES,
                                                t.TPM2_PT.PERMANENT, 1)
            prop = data.data.tpmProperties[0]
        except (self._exc, IndexError):
            return None
        if prop.property != t.TPM2_PT.PERMANENT:
            return None
        return bool(int(prop.value) & int(t.TPMA_PERMANENT.OWNERAUTHSET))

    def _provision_srk(self) -> tuple[Any, bool]:
        t = self._types()
        e = self._esys
        srk = self._persistent_exists(SRK_HANDLE)
        if srk is None:
            h, *_ = self._call(
                "create SRK",
                lambda: e.create_primary(None, self._srk_template(), t.ESYS_TR.OWNER),
            )
            with self._transient(h):
                srk = self._call(
                    "persist SRK", lambda: e.evict_control(t.ESYS_TR.OWNER, h, SRK_HANDLE)
                )
            return srk, True
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
        return srk, False

    def _persist(self, srk: Any, priv: Any, pub: Any, handle: int, what: str) -> None:
        t = self._types()
        e = self._esys
        h = self._call(f"load {what}", lambda: e.load(srk, priv, pub))
        with self._transient(h):
            self._call(f"persist {what}", lambda: e.evict_control(t.ESYS_TR.OWNER, h, handle))

    def _check_key(self, handle: int, what: str, alg: int, *, allow_da: bool) -> None:
        """The key at ``handle`` is modelward's: its template and our auth value."""
        t = self._types()
        pub, _, _ = self._call(f"read {what}", lambda: self._esys.read_public(self._obj(handle)))
        attrs = int(pub.publicArea.objectAttributes)
        want = self._key_attrs()
        ok = attrs in ((want, want & ~int(t.TPMA_OBJECT.NODA)) if allow_da else (want,))
        if pub.publicArea.type != alg or not ok:
            raise TpmError(
                f"persistent handle {handle:#x} holds a key that is not modelward's {what} "
                f"(type {int(pub.publicArea.type):#x}, attributes {attrs:#x})",
                tcti=self.tcti,
                hint="free the handle (tpm2_evictcontrol) and run `agent provision` again",
            )

    def _provision_identity(self, srk: Any, *, keep_identity: bool) -> bool:
        t = self._types()
        e = self._esys
        if self._exists(IDENTITY_HANDLE):
            self._check_key(IDENTITY_HANDLE, "identity key", t.TPM2_ALG.ECC, allow_da=True)
            self.sign(b"\0" * 32)  # takes our auth value
            return False
        if keep_identity and self._exists(LEGACY_IDENTITY_HANDLE):
            # Keep the enrolled key pair: give it the auth value (TPM2_ObjectChangeAuth
            # with its empty admin auth) and persist the result at the new handle. Its
            # attributes cannot change, so it stays DA-protected. Not the default: any
            # TPM client could have made its own copy of the old key (docs/notes.md).
            old = self._call("open old identity key",
                             lambda: e.tr_from_tpmpublic(LEGACY_IDENTITY_HANDLE))
            pub, _, _ = self._call("read old identity key", lambda: e.read_public(old))
            priv = self._call(
                "give the identity key an auth value",
                lambda: e.object_change_auth(old, srk, t.TPM2B_AUTH(self._secret())),
            )
            self._persist(srk, priv, pub, IDENTITY_HANDLE, "identity key")
            return True
        tmpl = t.TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256", objectAttributes=self._key_attrs())
        priv, pub, *_ = self._call("create identity key",
                                   lambda: e.create(srk, self._sensitive(), tmpl))
        self._persist(srk, priv, pub, IDENTITY_HANDLE, "identity key")
        return True

    def _provision_mac_key(self, srk: Any) -> bool:
        t = self._types()
        if self._exists(MAC_KEY_HANDLE):
            self._check_key(MAC_KEY_HANDLE, "record-MAC key", t.TPM2_ALG.KEYEDHASH,
                            allow_da=False)
            self.mac(b"\0" * 32)  # takes our auth value
            return False
        # TPM2_Create under the SRK: the TPM draws the key (sensitiveDataOrigin) and it
        # never leaves the TPM unwrapped; nothing about it is public.
        tmpl = t.TPM2B_PUBLIC.parse("hmac:sha256", objectAttributes=self._key_attrs())
        priv, pub, *_ = self._call("create record-MAC key",
                                   lambda: self._esys.create(srk, self._sensitive(), tmpl))
        self._persist(srk, priv, pub, MAC_KEY_HANDLE, "record-MAC key")
        return True

    def _provision_nv(self, index: int, size: int, *, counter: bool,
                      attrs: int | None = None) -> bool:
        t = self._types()
        e = self._esys
        attrs = self._nv_attrs(counter=counter) if attrs is None else attrs
        defined = False
        if not self._exists(index):
            pub = t.TPM2B_NV_PUBLIC(
                nvPublic=t.TPMS_NV_PUBLIC(
                    nvIndex=index, nameAlg=t.TPM2_ALG.SHA256, attributes=attrs, dataSize=size
                )
            )
            try:
                h = self._call(f"define NV index {index:#x}",
                               lambda: e.nv_define_space(t.TPM2B_AUTH(self._secret()), pub,
                                                         t.ESYS_TR.OWNER))
            except TpmError as ex:
                if ex.rc is None or ex.rc & 0xFFF != _RC_NV_DEFINED:
                    raise
                # 0x14c: defined meanwhile by someone else; checked below like any other
            else:
                e.tr_close(h)
                defined = True
        nv = self._obj(index)
        have, _ = self._call(f"read NV index {index:#x} public", lambda: e.nv_read_public(nv))
        have_attrs = int(have.nvPublic.attributes) & ~int(t.TPMA_NV.WRITTEN)
        if have_attrs != attrs or have.nvPublic.dataSize != size:
            raise TpmError(
                f"NV index {index:#x} exists with attributes {have_attrs:#x} and size "
                f"{have.nvPublic.dataSize}, not the ones modelward defines ({attrs:#x}, {size})",
                tcti=self.tcti,
                hint=f"undefine it (tpm2_nvundefine -C o {index:#x}) and run `agent provision`",
            )
        written = bool(int(have.nvPublic.attributes) & int(t.TPMA_NV.WRITTEN))
        if written:
            self._call(f"read NV index {index:#x}", lambda: e.nv_read(nv, size, 0, nv))
        elif counter:
            # A fresh NT_COUNTER is unreadable until its first increment (which also
            # proves our auth value is the index's).
            self.increment_counter()
        else:
            # Unwritten: prove the auth value with a read; 0x14a means the auth passed.
            try:
                e.nv_read(nv, size, 0, nv)
            except self._exc as ex:
                if int(ex.rc) & 0xFFF != _RC_NOT_INITIALIZED:
                    raise self._convert(f"read NV index {index:#x}", ex, int(ex.rc)) from ex
        return defined

    # -- migration from the open objects --------------------------------------

    def _use_owner_auth(self) -> None:
        """Owner authorization for provisioning, if the TPM owner has a password.

        Only provisioning and migration use the owner hierarchy; the agent's everyday
        commands take the objects' own auth value, so the owner password need not be on
        the device after provisioning (README "TPM").
        """
        owner = os.environ.get(OWNER_AUTH_ENV)
        if owner:
            self._esys.tr_set_auth(self._types().ESYS_TR.OWNER, owner.encode())

    def legacy(self) -> LegacyObjects | None:
        self._use_owner_auth()
        if not (self._exists(LEGACY_ANCHOR_INDEX) or self._exists(LEGACY_COUNTER_INDEX)):
            return None
        return _TpmLegacy(self)

    def retire_legacy(self) -> None:
        t = self._types()
        e = self._esys
        for index in (LEGACY_ANCHOR_INDEX, LEGACY_COUNTER_INDEX):
            if self._exists(index):
                self._undefine(index)
        if self._exists(LEGACY_IDENTITY_HANDLE) and self._exists(IDENTITY_HANDLE):
            old = self._call("open old identity key",
                             lambda: e.tr_from_tpmpublic(LEGACY_IDENTITY_HANDLE))
            self._call("evict old identity key",
                       lambda: e.evict_control(t.ESYS_TR.OWNER, old, LEGACY_IDENTITY_HANDLE))
        self._handles.clear()

    def _undefine(self, index: int) -> None:
        t = self._types()
        e = self._esys
        nv = self._call(f"open {index:#x}", lambda: e.tr_from_tpmpublic(index))
        self._call(f"undefine old NV index {index:#x}",
                   lambda: e.nv_undefine_space(nv, t.ESYS_TR.OWNER))

    # -- trust-store operations ---------------------------------------------

    def read_anchor(self) -> bytes:
        nv = self._obj(ANCHOR_INDEX)
        data = self._call(f"read root anchor {ANCHOR_INDEX:#x}",
                          lambda: self._esys.nv_read(nv, 32, 0, nv))
        return bytes(data)

    def write_anchor(self, digest: bytes) -> None:
        nv = self._obj(ANCHOR_INDEX)
        self._call(f"write root anchor {ANCHOR_INDEX:#x}",
                   lambda: self._esys.nv_write(nv, digest, 0, nv))

    def read_counter(self) -> int:
        nv = self._obj(COUNTER_INDEX)
        data = self._call(f"read update counter {COUNTER_INDEX:#x}",
                          lambda: self._esys.nv_read(nv, 8, 0, nv))
        return int.from_bytes(bytes(data), "big")

    def increment_counter(self) -> int:
        nv = self._obj(COUNTER_INDEX)
        self._call(f"increment update counter {COUNTER_INDEX:#x}",
                   lambda: self._esys.nv_increment(nv, nv))
        return self.read_counter()

    def read_targets_floor(self) -> int:
        """The floor in :data:`FLOOR_INDEX`; 0 when never written, or when the index is
        not defined yet (a device provisioned before it: `agent provision` adds it)."""
        if not self._exists(FLOOR_INDEX):
            logger.warning("TPM NV index %#x (targets floor) is not defined: run `agent "
                           "provision` once to add it", FLOOR_INDEX)
            return 0
        nv = self._obj(FLOOR_INDEX)
        try:
            data = self._call(f"read targets floor {FLOOR_INDEX:#x}",
                              lambda: self._esys.nv_read(nv, 8, 0, nv))
        except TpmNotProvisionedError:
            return 0  # defined, never written
        return int.from_bytes(bytes(data), "big")

    def write_targets_floor(self, version: int) -> None:
        if not self._exists(FLOOR_INDEX):  # (warned by read_targets_floor)
            return
        nv = self._obj(FLOOR_INDEX)
        self._call(f"write targets floor {FLOOR_INDEX:#x}",
                   lambda: self._esys.nv_write(nv, version.to_bytes(8, "big"), 0, nv))

    def mac(self, digest: bytes) -> bytes:
        t = self._types()
        key = self._obj(MAC_KEY_HANDLE)
        out = self._call(f"HMAC with record-MAC key {MAC_KEY_HANDLE:#x}",
                         lambda: self._esys.hmac(key, digest, t.TPM2_ALG.SHA256))
        return bytes(out)

    def sign(self, digest: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        t = self._types()
        ident = self._obj(IDENTITY_HANDLE)
        scheme = t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = t.TPM2_ALG.SHA256
        # The identity key is unrestricted, so a NULL hash-check ticket is accepted.
        ticket = t.TPMT_TK_HASHCHECK(tag=t.TPM2_ST.HASHCHECK, hierarchy=t.TPM2_RH.NULL)
        sig = self._call(f"sign with identity key {IDENTITY_HANDLE:#x}",
                         lambda: self._esys.sign(ident, digest, scheme, ticket))
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s_ = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        return bytes(encode_dss_signature(r, s_))

    def identity_public_pem(self) -> bytes:
        """PEM of the device identity key (for enrolment); needs no auth value."""
        handle = IDENTITY_HANDLE if self._exists(IDENTITY_HANDLE) else LEGACY_IDENTITY_HANDLE
        ident = self._obj(handle, authorized=False)
        pub, _, _ = self._call("read identity key", lambda: self._esys.read_public(ident))
        return bytes(pub.to_pem())

    def close(self) -> None:
        self._esys.close()


class _TpmLegacy(LegacyObjects):
    """The open objects an older modelward defined, read through the owner hierarchy."""

    def __init__(self, tpm: Tpm) -> None:
        self._tpm = tpm

    def read_anchor(self) -> bytes | None:
        tpm = self._tpm
        if not tpm._exists(LEGACY_ANCHOR_INDEX):
            return None
        t = tpm._types()
        nv = tpm._obj(LEGACY_ANCHOR_INDEX, authorized=False)
        try:
            data = tpm._call("read old root anchor",
                             lambda: tpm._esys.nv_read(nv, 32, 0, t.ESYS_TR.OWNER))
        except TpmNotProvisionedError:
            return None
        return bytes(data)

    def read_counter(self) -> int:
        tpm = self._tpm
        t = tpm._types()
        nv = tpm._obj(LEGACY_COUNTER_INDEX, authorized=False)
        data = tpm._call("read old update counter",
                         lambda: tpm._esys.nv_read(nv, 8, 0, t.ESYS_TR.OWNER))
        return int.from_bytes(bytes(data), "big")

    def mac(self, digest: bytes) -> bytes:
        tpm = self._tpm
        t = tpm._types()
        e = tpm._esys
        h, *_ = tpm._call(
            "derive old state MAC key",
            lambda: e.create_primary(None, legacy_mac_key_template(), t.ESYS_TR.OWNER),
        )
        with tpm._transient(h):
            out = tpm._call("old HMAC", lambda: e.hmac(h, digest, t.TPM2_ALG.SHA256))
        return bytes(out)


def legacy_mac_key_template() -> Any:
    """The public template the old MAC key was derived from (public: anyone can)."""
    t = import_tpm2_pytss()

    A = t.TPMA_OBJECT
    tmpl = t.TPM2B_PUBLIC.parse(
        "hmac:sha256",
        objectAttributes=A.SIGN_ENCRYPT | A.FIXEDTPM | A.FIXEDPARENT | A.SENSITIVEDATAORIGIN
        | A.USERWITHAUTH,
    )
    tmpl.publicArea.unique.keyedHash = hashlib.sha256(LEGACY_MAC_KEY_LABEL).digest()
    return tmpl
