"""The shape of a verified status report, checked before ``fleet status`` uses any of it.

A valid signature says only that the device's key signed the bytes; one device's
credentials (its TPM key) sign whatever that device wants. So a verified report is still
hostile input: every field must be of the type and size ``modelward.agent._observe.build_report``
writes, strings UTF-8 text (no lone surrogate, which ``json.loads`` accepts as
``"\\ud800"`` and strict readers refuse), numbers finite and within what every JSON
reader keeps exact, and no other field may be present (the report is a closed schema:
ship the operator tool before devices that send a new field). :func:`check_report` is
pure and raises :class:`ReportSchemaError` naming the first field at fault; ``fleet
status`` then shows one ``REJECTED`` row.

Optional fields (``seq``, ``fleet``, ``at``, ``poll_interval``, ...) may be absent: the
freshness judgement flags a report without them. When present they must be well typed.
``model``, ``channel``, ``durations`` and ``failure_reasons`` (issue 17) are optional too,
so a device of an older version is still shown: ``durations`` holds ``verify_s`` and
``boot_check_s`` (null or finite seconds in [0, MAX_DURATION)), ``failure_reasons`` at
most MAX_REASONS identifier names, each an integer count. ``rejected`` (issue 17) is a
list of at most MAX_REJECTED ``{model, version}`` objects of strings, each at most
MAX_REJECTED_TEXT characters: the releases the device refuses now. ``audit`` (issue 18)
is ``{seq, hash}``: the head of the device's audit log (an integer and 64 lowercase hex
digits), bound by the report's signature; ``fleet audit`` checks the log against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from modelward.trust._report import MAX_SEQ
from modelward.trust._report_fields import COUNTERS as _AGENT_COUNTERS
from modelward.trust._report_fields import (
    DURATIONS,
    MAX_DURATION,
    MAX_REASONS,
    MAX_REJECTED,
    MAX_REJECTED_TEXT,
    MAX_TEXT,
    is_reason,
)
from modelward.trust.errors import UntrustedRemoteError

MAX_ID = 64  # device ids and fleet names (modelward.publisher._broker_config.check_id)
MAX_SHORT = 256  # model name, version, fingerprint, state, time stamps
MAX_INT = MAX_SEQ  # counters, uptime: exact in every JSON reader
MAX_POLL = 10**9  # seconds

COUNTERS = frozenset(_AGENT_COUNTERS)
_MODEL_KEYS = frozenset({"name", "version", "fingerprint"})
_ERROR_KEYS = frozenset({"type", "message", "at"})
_ACTIVATION_KEYS = frozenset({"ok", "detail"})


class ReportSchemaError(UntrustedRemoteError):
    """A verified report whose content is not what a modelward device writes.

    Attributes:
        field: the path of the field at fault (``active.name``, ``counters.attempts``).
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"report field {field} {problem}")
        self.field = field


def _type_name(v: object) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _string(field: str, v: object, limit: int, *, nullable: bool = False) -> None:
    if v is None and nullable:
        return
    if not isinstance(v, str):
        raise ReportSchemaError(field, f"is {_type_name(v)}, not a string")
    if len(v) > limit:
        raise ReportSchemaError(field, f"is over {limit} characters")
    try:  # json.loads makes "\\ud800" a lone surrogate: not text, not I-JSON (RFC 7493)
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ReportSchemaError(field, f"has a lone surrogate (U+{ord(v[e.start]):04X} at "
                                f"character {e.start}): not UTF-8 text") from e


def _integer(field: str, v: object, limit: int = MAX_INT) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ReportSchemaError(field, f"is {_type_name(v)}, not an integer")
    if not 0 <= v <= limit:
        raise ReportSchemaError(field, f"is out of range (0 to {limit})")


def _number(field: str, v: object, low: float, high: float) -> None:
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise ReportSchemaError(field, f"is {_type_name(v)}, not a number")
    # (an int is compared exactly: math.isfinite raises OverflowError on a JSON integer
    # of hundreds of digits, a19)
    if not ((isinstance(v, int) or math.isfinite(v)) and low < v < high):
        raise ReportSchemaError(field, f"is out of range ({low:g} to {high:g})")


def _object(field: str, v: object, allowed: frozenset[str], *,
            required: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ReportSchemaError(field, f"is {_type_name(v)}, not an object")
    extra = sorted(k for k in v if k not in allowed)
    if extra:
        raise ReportSchemaError(f"{field}.{extra[0][:40]}", "is not a known field")
    missing = sorted(required - v.keys())
    if missing:
        raise ReportSchemaError(f"{field}.{missing[0]}", "is missing")
    return v


def _model(field: str, v: object) -> None:
    if v is None:
        return
    m = _object(field, v, _MODEL_KEYS, required=_MODEL_KEYS)
    for k in sorted(_MODEL_KEYS):
        _string(f"{field}.{k}", m[k], MAX_SHORT)


def _last_error(v: object) -> None:
    if v is None:
        return
    e = _object("last_error", v, _ERROR_KEYS, required=frozenset({"type"}))
    _string("last_error.type", e["type"], MAX_SHORT)
    _string("last_error.message", e.get("message"), MAX_TEXT, nullable=True)
    _string("last_error.at", e.get("at"), MAX_SHORT, nullable=True)


def _last_activation(v: object) -> None:
    if v is None:
        return
    a = _object("last_activation", v, _ACTIVATION_KEYS, required=_ACTIVATION_KEYS)
    if not isinstance(a["ok"], bool):
        raise ReportSchemaError("last_activation.ok", f"is {_type_name(a['ok'])}, "
                                "not a boolean")
    _string("last_activation.detail", a["detail"], MAX_TEXT)


def _counters(v: object) -> None:
    c = _object("counters", v, COUNTERS)
    for k in sorted(c):
        _integer(f"counters.{k}", c[k])


def _durations(v: object) -> None:
    d = _object("durations", v, frozenset(DURATIONS))
    for k in sorted(d):
        x = d[k]
        if x is None:
            continue
        if not isinstance(x, int | float) or isinstance(x, bool):
            raise ReportSchemaError(f"durations.{k}", f"is {_type_name(x)}, not a number")
        if not ((isinstance(x, int) or math.isfinite(x)) and 0 <= x < MAX_DURATION):
            raise ReportSchemaError(f"durations.{k}", f"is out of range (0 to {MAX_DURATION})")


def _failure_reasons(v: object) -> None:
    if not isinstance(v, dict):
        raise ReportSchemaError("failure_reasons", f"is {_type_name(v)}, not an object")
    if len(v) > MAX_REASONS:
        raise ReportSchemaError("failure_reasons", f"has over {MAX_REASONS} reasons")
    for k in sorted(v):
        if not is_reason(k):  # (named only by position: the name itself is the attack)
            raise ReportSchemaError("failure_reasons", "has a reason that is not an "
                                    "identifier (letters, digits, _; at most 64)")
        _integer(f"failure_reasons.{k}", v[k])


_REJECTED_KEYS = frozenset({"model", "version"})


def _rejected(v: object) -> None:
    if not isinstance(v, list):
        raise ReportSchemaError("rejected", f"is {_type_name(v)}, not a list")
    if len(v) > MAX_REJECTED:
        raise ReportSchemaError("rejected", f"has over {MAX_REJECTED} releases")
    for i, item in enumerate(v):
        r = _object(f"rejected[{i}]", item, _REJECTED_KEYS, required=_REJECTED_KEYS)
        for k in sorted(_REJECTED_KEYS):
            _string(f"rejected[{i}].{k}", r[k], MAX_REJECTED_TEXT)


_AUDIT_KEYS = frozenset({"seq", "hash"})


def _audit(v: object) -> None:
    a = _object("audit", v, _AUDIT_KEYS, required=_AUDIT_KEYS)
    _integer("audit.seq", a["seq"])
    h = a["hash"]
    if not (isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h)):
        raise ReportSchemaError("audit.hash", "is not 64 lowercase hex digits")


def _provenance(v: object) -> None:
    p = _object("provenance", v, frozenset({"digest"}), required=frozenset({"digest"}))
    d = p["digest"]
    if not (isinstance(d, str) and len(d) == 71 and d.startswith("sha256:")
            and all(c in "0123456789abcdef" for c in d[7:])):
        raise ReportSchemaError("provenance.digest", "is not sha256: and 64 lowercase hex "
                                "digits")


_FIELDS: dict[str, Callable[[object], None]] = {
    "device_id": lambda v: _string("device_id", v, MAX_ID),
    "fleet": lambda v: _string("fleet", v, MAX_ID),
    "seq": lambda v: _integer("seq", v),
    "poll_interval": lambda v: _number("poll_interval", v, 0, MAX_POLL),
    "active": lambda v: _model("active", v),
    "previous": lambda v: _model("previous", v),
    "state": lambda v: _string("state", v, MAX_SHORT),
    "last_error": _last_error,
    "last_activation": _last_activation,
    "counters": _counters,
    "at": lambda v: _string("at", v, MAX_SHORT),
    "uptime_s": lambda v: _integer("uptime_s", v),
    "model": lambda v: _string("model", v, MAX_SHORT),
    "channel": lambda v: _string("channel", v, MAX_SHORT),
    "durations": _durations,
    "failure_reasons": _failure_reasons,
    "rejected": _rejected,
    "audit": _audit,
    "provenance": _provenance,
}
FIELDS = frozenset(_FIELDS)


def check_report(report: object) -> dict[str, Any]:
    """``report`` itself when it has the shape a modelward device writes (pure).

    Raises:
        ReportSchemaError: a field of the wrong type, too long, a number that is not
            finite or out of range, a field that is not known, or a required one missing.
    """
    r = _object("report", report, FIELDS, required=frozenset({"device_id"}))
    for k in sorted(r):
        _FIELDS[k](r[k])
    return r
