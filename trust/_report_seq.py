"""The signed status report's sequence numbers (design.md "Trust store": each report carries
a monotonic sequence number). Kept apart from the signing code in ``modelward.trust._report``
so the agent's config and status modules load without the crypto stack.
"""

from __future__ import annotations

from modelward.trust.errors import LocalDeviceError

MAX_SEQ = 2**53 - 1  # the largest integer every JSON reader keeps exact


class ReportSequenceError(LocalDeviceError):
    """The device cannot persist the next report sequence number, so it sends no report.

    Attributes:
        path: the sequence file.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


SEQ_SLACK_MS = 10 * 60 * 1000  # how far ahead of the clock a persisted number is believed


def sequence_believable(last: int, now: float) -> bool:
    """Whether a persisted ``last`` could have been issued by this device by ``now``.

    Every number issued is at most the clock then plus the few that fell in the same
    millisecond, so one far above the clock (beyond :data:`SEQ_SLACK_MS`) was planted: a
    disk that writes ``MAX_SEQ`` would silence the device, and one that writes "in 30
    days", then deletes it, would have the operator flag every genuine report
    ``REPLAYED`` for 30 days.
    """
    return last <= int(now * 1000) + SEQ_SLACK_MS


def next_sequence(last: int, now: float) -> int:
    """The sequence number of the next report: above ``last`` and not below the clock.

    A ``last`` that is not :func:`sequence_believable` is ignored: the clock is the floor
    then. (A device whose clock stepped back by more than the slack may reissue numbers;
    the operator sees ``REPLAYED`` then, a false alarm, never a silent acceptance.)

    Args:
        last: the last persisted number (0 if none or unreadable).
        now: wall-clock time, seconds since the epoch.

    Raises:
        ReportSequenceError: the sequence is exhausted (the clock is past :data:`MAX_SEQ`).
    """
    floor = int(now * 1000)
    seq = max(last + 1, floor) if sequence_believable(last, now) else floor
    if seq > MAX_SEQ:
        raise ReportSequenceError(f"report sequence {seq} is exhausted", path="")
    return seq
