"""Errors of the operator tooling."""

from __future__ import annotations

from modelward.trust.errors import ModelwardError, OperatorInputError

__all__ = ["KeyError_", "ModelwardError", "OperatorInputError", "RepositoryStateError"]


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
