"""Errors of the agent."""

from __future__ import annotations

from modelward.trust.errors import ModelwardError, OperatorInputError

__all__ = ["ConfigError", "DeviceBusyError", "ModelwardError", "StateOwnerError"]


class ConfigError(OperatorInputError):
    """The agent configuration file is missing or invalid.

    Attributes:
        path: the config file.
        key: the setting at fault, or "".
    """

    def __init__(self, message: str, *, path: str, key: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path, self.key = path, key


class StateOwnerError(OperatorInputError):
    """An agent command that writes the device's state runs as another user than the one
    who owns it (``sudo modelward agent provision``): refused before anything is written.

    Attributes:
        path: the directory at fault (the state or TPM auth directory, or the one it
            would be created in).
        owner: the user who owns it ("" if it could not be inspected).
        uid: its uid (-1 if it could not be inspected).
    """

    def __init__(self, message: str, *, path: str, owner: str, uid: int,
                 hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path, self.owner, self.uid = path, owner, uid


class DeviceBusyError(ModelwardError):
    """Another state-changing device command holds the device lock
    (``modelward.agent._lock``): this one was refused before it touched anything
    (exit 75, ``EX_TEMPFAIL``: run it again later).

    Attributes:
        path: the lock file.
        holder: what its holder wrote (escaped, bounded, not verified).
        pid: the holder's pid as written there, or None.
    """

    def __init__(self, message: str, *, path: str, holder: str, pid: int | None,
                 hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path, self.holder, self.pid = path, holder, pid
