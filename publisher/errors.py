"""Errors of the operator tooling."""

from __future__ import annotations

from modelward.trust.errors import ModelwardError, OperatorInputError, UntrustedRemoteError

__all__ = ["ChallengeError", "EnrollmentError", "KeyError_", "ModelwardError",
           "OperatorInputError", "RepositoryStateError", "UntrustedRemoteError"]


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
