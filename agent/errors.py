"""Errors of the agent."""

from __future__ import annotations

from modelward.trust.errors import ModelwardError, OperatorInputError

__all__ = ["ConfigError", "ModelwardError"]


class ConfigError(OperatorInputError):
    """The agent configuration file is missing or invalid.

    Attributes:
        path: the config file.
        key: the setting at fault, or "".
    """

    def __init__(self, message: str, *, path: str, key: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path, self.key = path, key
