"""Errors of the operator tooling."""

from __future__ import annotations

from modelward.trust.errors import (
    ModelwardError,
    OperatorInputError,
    TransportError,
    UntrustedRemoteError,
)

__all__ = ["ATTEST_REASONS", "AttestationError", "ChallengeError", "EnrollmentError",
           "KeyError_", "ModelwardError",
           "OperatorInputError", "RepositoryStateError", "SyncDestinationError",
           "SyncSourceError", "SyncTransportError", "UntrustedRemoteError"]


class KeyError_(OperatorInputError):  # noqa: N801 - not the builtin KeyError
    """A signing key file is missing, unreadable, or its passphrase is wrong.

    Attributes:
        path: the key file at fault.
    """

    def __init__(self, message: str, *, path: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path = path


class RepositoryStateError(OperatorInputError):
    """The repository directory is missing, incomplete, or refuses the requested change."""


class SyncSourceError(RepositoryStateError):
    """``repo sync`` refuses a file of the repository directory (a symlink, a name that
    would not stay under the destination's prefix, unreadable or malformed metadata).

    Attributes:
        path: the file at fault.
    """

    def __init__(self, message: str, *, path: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path = path


class SyncDestinationError(OperatorInputError):
    """``repo sync --to`` names an unusable destination (a URL of another scheme, a prefix
    with ``..``, credentials in a URL), or the destination holds a symlink or a non-file
    where a file goes: nothing is written through it.

    Attributes:
        destination: the destination as given (credentials never included).
        key: the key or relative path at fault, or "".
    """

    def __init__(self, message: str, *, destination: str, key: str = "",
                 hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.destination = destination
        self.key = key


class SyncTransportError(TransportError):
    """The S3-compatible endpoint could not be reached or refused a request.

    Attributes:
        destination: the ``s3://bucket/prefix`` being synced.
        key: the object key of the failed request, or "" (a listing).
        code: the service's error code (``NoSuchBucket``, ``AccessDenied``), or "".
    """

    def __init__(self, message: str, *, destination: str, key: str = "", code: str = "",
                 hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.destination = destination
        self.key = key
        self.code = code


class EnrollmentError(UntrustedRemoteError):
    """A device's enrollment file (``agent enroll --json``) is malformed or does not verify.

    Attributes:
        device: the device id it was given for.
        field: the enrollment field at fault (``ak_public``, ``ek_certificate`` ...).
    """

    def __init__(self, message: str, *, device: str, field: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.device = device
        self.field = field


class ChallengeError(UntrustedRemoteError):
    """A credential-activation response is refused: no pending challenge, expired, for
    another device or AK, or a wrong secret.

    Attributes:
        device: the device id given with ``--device``.
        reason: one of ``no-challenge``, ``expired``, ``other-device``, ``other-ak``,
            ``wrong-secret``, ``malformed``.
    """

    def __init__(self, message: str, *, device: str, reason: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.device = device
        self.reason = reason


class AttestationError(UntrustedRemoteError):
    """A device's attestation answer is refused.

    Attributes:
        device: the device whose answer it is.
        reason: why, one of :data:`ATTEST_REASONS`.
    """

    def __init__(self, message: str, *, device: str, reason: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.device = device
        self.reason = reason


#: The reasons of :class:`AttestationError` (``fleet attest`` prints them per device).
ATTEST_REASONS = ("malformed", "not enrolled", "wrong key", "stale nonce",
                  "not certified register", "log mismatch", "log overflow",
                  "nothing trusted", "unknown fingerprint", "register reset",
                  "history unreadable")
