"""Errors of the trust store, and the roots every modelward error descends from.

The roots say who is at fault, so that a caller (the CLI, the agent's journal, a
status report) can tell an attack from a broken device from an operator mistake:

* :class:`UntrustedRemoteError` - something that came from the network is wrong;
* :class:`TransportError` - the network did not deliver;
* :class:`LocalDeviceError` - this device's own state or hardware is at fault;
* :class:`OperatorInputError` - the operator gave us something unusable.
"""

from __future__ import annotations


class ModelwardError(Exception):
    """Root of every error modelward raises on purpose.

    Attributes:
        hint: one line telling a person what to do about it, or "".
    """

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint


class UntrustedRemoteError(ModelwardError):
    """Data from the repository, origin or broker failed verification."""


class TransportError(ModelwardError):
    """The origin or broker could not be reached or did not answer in bounds."""


class LocalDeviceError(ModelwardError):
    """The device's own state, disk or TPM is missing, broken or tampered with."""


class OperatorInputError(ModelwardError):
    """A file, key, flag or configuration given by a person is not usable."""


# --- TPM -------------------------------------------------------------------


class TpmError(LocalDeviceError):
    """A TPM command failed.

    Attributes:
        tcti: the TCTI string used to reach the TPM.
        rc: the TSS2 response code, or None.
    """

    def __init__(self, message: str, *, tcti: str, rc: int | None = None, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.tcti = tcti
        self.rc = rc


class TpmUnavailableError(TpmError):
    """The TPM named by the TCTI string cannot be opened or does not answer."""


class TpmNotProvisionedError(TpmError):
    """A trust-store object (NV index, key) is missing: run `modelward agent provision`."""


class TpmLockoutError(TpmError):
    """The TPM is in dictionary-attack lockout (0x921)."""


class TpmAuthError(TpmError):
    """The TPM refused modelward's authorization for one of its objects (0x9a2, 0x98e).

    The object at the handle does not take this device's auth value: someone with owner
    authorization redefined it, or the auth file belongs to another provisioning.
    """


class TpmAuthFileError(LocalDeviceError):
    """The file holding the TPM objects' auth value is missing, unsafe or malformed.

    Attributes:
        path: the auth file at fault.
    """

    def __init__(self, message: str, *, path: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path = path


# --- trust store -------------------------------------------------------------


class TrustRecordError(LocalDeviceError):
    """The on-disk trust record is missing, malformed or its TPM MAC does not verify.

    Attributes:
        path: the record file at fault.
    """

    def __init__(self, message: str, *, path: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path = path


class TrustFileUnreadableError(TrustRecordError):
    """A trust-store file exists but cannot be read (permissions, I/O error, not a file):
    unlike a missing, altered or older record, healing cannot fix it."""


class TrustRecordRollbackError(TrustRecordError):
    """The trust record is authentic but older than the TPM update counter says."""


class RootAnchorError(LocalDeviceError):
    """The trusted root.json on disk does not match the hash anchored in the TPM.

    Attributes:
        path: the root file at fault.
    """

    def __init__(self, message: str, *, path: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path = path


class AuditError(UntrustedRemoteError):
    """An audit log (or its checkpoint or signed head) does not verify.

    Attributes:
        seq: the sequence number the first bad entry has or should have had (None when
            the fault is not one entry's: the checkpoint, the head).
        line: its 1-based line in the segment (0: the checkpoint or the head).
        reason: a short identifier of the fault (``edited``, ``seq-gap``, ``truncated``,
            ``checkpoint-signature``, ``head-mismatch``, ``malformed``, ``too-large``,
            ``unsigned-tail``).
    """

    hint = ("the history from that entry on cannot be believed (edited on the device, or an "
            "incomplete copy); `fleet attest` tells what the device's TPM says it runs")

    def __init__(self, message: str, *, seq: int | None, line: int, reason: str) -> None:
        super().__init__(message)
        self.seq, self.line, self.reason = seq, line, reason


class MeasureLogError(LocalDeviceError):
    """The device cannot read or write its measurement event log (a symlink, a full disk,
    over its bound).

    Attributes:
        path: the file or directory at fault.
    """

    def __init__(self, message: str, *, path: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path = path


class AuditLogError(LocalDeviceError):
    """The device cannot append to or read its own audit log (a symlink, a full disk, a
    damaged tail).

    Attributes:
        path: the file or directory at fault.
    """

    def __init__(self, message: str, *, path: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path = path
