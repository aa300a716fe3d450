"""Errors of the simulator."""

from __future__ import annotations

from modelward.trust.errors import LocalDeviceError

__all__ = ["ServiceError"]


class ServiceError(LocalDeviceError):
    """A simulated service (swtpm, nginx) failed to start or stop.

    Attributes:
        service: which one.
        log: path of its log file, or "".
    """

    def __init__(self, message: str, *, service: str, log: str = "", hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.service, self.log = service, log
