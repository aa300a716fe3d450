"""Errors of the updater. Roots are re-exported from :mod:`modelward.trust.errors`."""

from __future__ import annotations

from modelward.trust.errors import (
    LocalDeviceError,
    ModelwardError,
    OperatorInputError,
    TransportError,
    UntrustedRemoteError,
)

__all__ = [
    "BundleFormatError",
    "DownloadFailedError",
    "EncryptionRefusedError",
    "FingerprintMismatchError",
    "HealthCheckError",
    "LocalDeviceError",
    "MetadataError",
    "ModelwardError",
    "NotARecipientError",
    "NothingTrustedError",
    "OperatorInputError",
    "PolicyFormatError",
    "PolicyUnavailableError",
    "ProvenanceRefusedError",
    "RollbackError",
    "SandboxError",
    "RootRecoveryError",
    "StagedFilesChangedError",
    "StagingError",
    "StateDirError",
    "TargetHashError",
    "TransportError",
    "TrustStateLostError",
    "UntrustedRemoteError",
]


class MetadataError(UntrustedRemoteError):
    """TUF metadata from the repository failed verification (signature, expiry, version)."""


class RollbackError(UntrustedRemoteError):
    """Metadata or a model older than what the trust record holds was offered.

    Attributes:
        what: ``targets`` metadata or the model name.
        trusted: the version the device trusts.
        offered: the older version it was offered.
    """

    def __init__(self, message: str, *, what: str, trusted: str, offered: str) -> None:
        super().__init__(message)
        self.what, self.trusted, self.offered = what, trusted, offered


class TargetHashError(UntrustedRemoteError):
    """A downloaded bundle's length or hash differs from its signed TUF target entry.

    Attributes:
        target: the TUF target path.
    """

    def __init__(self, message: str, *, target: str) -> None:
        super().__init__(message)
        self.target = target


class BundleFormatError(UntrustedRemoteError):
    """A bundle is not a well-formed v1 bundle, or a member is unsafe or lies.

    Attributes:
        bundle: the bundle (target path or file).
        member: the tar member at fault, or "".
    """

    def __init__(self, message: str, *, bundle: str, member: str = "") -> None:
        super().__init__(message)
        self.bundle, self.member = bundle, member


class ChunkIndexError(UntrustedRemoteError):
    """A release's chunk index is malformed, or not the index of its bundle.

    Attributes:
        index: the index (target path or file).
    """

    def __init__(self, message: str, *, index: str) -> None:
        super().__init__(message)
        self.index = index


class FingerprintMismatchError(UntrustedRemoteError):
    """An extracted slot's fingerprint differs from the signed ``modelward`` field."""

    def __init__(self, message: str, *, model: str, version: str, expected: str, actual: str):
        super().__init__(message)
        self.model, self.version, self.expected, self.actual = model, version, expected, actual


class HealthCheckError(UntrustedRemoteError):
    """The model did not load or did not reproduce its test vectors in onnxruntime.

    Attributes:
        model, version: the model at fault.
        detail: what the child process reported.
    """

    def __init__(self, message: str, *, model: str, version: str, detail: str) -> None:
        super().__init__(message)
        self.model, self.version, self.detail = model, version, detail


class SandboxError(LocalDeviceError):
    """The health check's sandbox could not be set up on this device; nothing was run.

    Attributes:
        missing: the isolation that is missing (``landlock``, ``seccomp``,
            ``RLIMIT_AS``, ``no_new_privs``, ``policy``, ...), or the package the check
            needs that is not installed (``onnxruntime``, ``numpy``: ``modelward[device]``).
    """

    def __init__(self, message: str, *, missing: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.missing = missing


class DownloadFailedError(TransportError):
    """The origin or broker did not deliver a file.

    Attributes:
        url: what was asked for.
        status: the HTTP status, or None.
    """

    def __init__(self, message: str, *, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url, self.status = url, status


class StagingError(LocalDeviceError):
    """The staging area or a slot could not be written (disk full, permissions)."""


class NothingTrustedError(LocalDeviceError):
    """Neither slot holds a model that matches the trust record."""


class StateDirError(StagingError):
    """A directory under the state directory is a symlink or not a directory.

    Nothing is read, written or deleted through it: the agent works only inside its own
    state directory.

    Attributes:
        path: the entry at fault.
    """

    def __init__(self, message: str, *, path: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path = path


class StagedFilesChangedError(StagingError):
    """The files in ``staging/incoming`` no longer have the fingerprint the verified stream
    gave them (changed, added or linked on disk after they were written). A fault of
    this device's disk, not of the release: it is not remembered as a rejection.

    Attributes:
        path: the directory checked.
        expected: the signed fingerprint.
        actual: what the files have now.
    """

    def __init__(self, message: str, *, path: str, expected: str, actual: str) -> None:
        super().__init__(message)
        self.path, self.expected, self.actual = path, expected, actual


class RootRecoveryError(MetadataError):
    """No root metadata the repository serves has the sha256 anchored in the TPM.

    Attributes:
        tried: how many root versions (1.root.json, 2.root.json, ...) were fetched.
    """

    def __init__(self, message: str, *, tried: int, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.tried = tried


class TrustStateLostError(NothingTrustedError):
    """The trust record or root.json on disk cannot be believed (older copy, altered,
    deleted): nothing is served until the next update heals the device from its TPM
    anchor."""


class PolicyFormatError(UntrustedRemoteError):
    """A provenance policy document is malformed (names the field at fault)."""


class PolicyUnavailableError(UntrustedRemoteError):
    """The device cannot take the provenance policy its trusted root pins (root's pin is
    malformed, the top-level targets do not list the pinned policy, the origin serves
    other bytes for it, or they do not parse). Nothing is installed, and no release is
    refused for it: the fault is the policy's (the audit trail records
    ``policy-fetch-failed``, not a refusal of the release). The origin not delivering it
    at all is a :class:`DownloadFailedError`, as for any download.

    Attributes:
        path: the pinned policy's target path ("" if the pin itself is malformed).
        cause: the class name of the error underneath (e.g. ``MetadataError``).
    """

    def __init__(self, message: str, *, path: str, cause: str) -> None:
        super().__init__(message)
        self.path, self.cause = path, cause


class ProvenanceRefusedError(UntrustedRemoteError):
    """The provenance policy refuses a model.

    Attributes:
        model: the model name.
        version: the version the bundle claims ("" where none is known).
        rule: the policy rule that refused it ("" if no rule covers the model).
        reason: what the rule wanted and did not get.
    """

    def __init__(self, message: str, *, model: str, rule: str, reason: str,
                 version: str = "") -> None:
        super().__init__(message)
        self.model, self.version, self.rule, self.reason = model, version, rule, reason


class EncryptionRefusedError(UntrustedRemoteError):
    """An encrypted bundle that this device cannot or must not decrypt: its content key is
    not wrapped for this device's TPM key, does not open with it, or a chunk does not
    decrypt to what was sealed.

    Attributes:
        model: the model name.
        version: the release.
    """

    def __init__(self, message: str, *, model: str, version: str) -> None:
        super().__init__(message)
        self.model, self.version = model, version


class NotARecipientError(EncryptionRefusedError):
    """The bundle is encrypted for other devices, not this one."""
