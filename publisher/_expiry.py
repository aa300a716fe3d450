"""Metadata lifetimes, how far ahead their expiry is warned about, and where they persist.

Pure parts (durations, the persisted form, which roles are inside their window) are
separate from the one read and one write of ``KEYS/expiry.json``.

Defaults, and why:

* timestamp lives 1 day (TUF's usual figure: it bounds how long an attacker who holds
  back new metadata, a freeze attack, goes unnoticed); the refresh timer re-signs it every
  6 h, so three runs in a row may fail before devices see an expired timestamp;
* its warning window is 6 h, one timer interval: inside it, the next run is the last one
  before devices stop updating;
* snapshot lives 30 days and is re-signed by refresh once inside its 1-day window;
* root and targets live 1 year, are signed offline, and warn 30 days ahead: time to
  gather the offline keys. Delegated team roles follow targets.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

from modelward.publisher.errors import OperatorInputError, RepositoryStateError
from modelward.trust._atomic import write_atomic
from modelward.trust._bounded import loads_bounded

logger = logging.getLogger(__name__)

TOP_ROLES = ("root", "targets", "snapshot", "timestamp")
EXPIRY_FILE = "expiry.json"
MAX_FILE = 4096  # bytes: a handful of integers
REFRESH_INTERVAL = timedelta(hours=6)  # systemd/modelward-repo-refresh.timer

# Bounds of a lifetime. Below: the timestamp needs an hour at least (warned below two
# timer intervals); the snapshot must outlive two refresh intervals (the timer re-signs it)
# and the timestamp pointing at it; root and targets are re-signed only with offline keys
# (refresh never does), so a lifetime of hours stops every device soon after each publish.
# Above these a stolen online key (timestamp, snapshot) or a stale root stays usable for
# too long.
MIN_LIFETIME = timedelta(hours=1)
MIN_ROLE_LIFETIME = {
    "root": timedelta(days=7),
    "targets": timedelta(days=7),
    "snapshot": 2 * REFRESH_INTERVAL,
    "timestamp": MIN_LIFETIME,
}
MAX_LIFETIME = {
    "root": timedelta(days=5 * 366),
    "targets": timedelta(days=5 * 366),
    "snapshot": timedelta(days=366),
    "timestamp": timedelta(days=30),
}

_DURATION = re.compile(r"(?:\d{1,6}[wdhms]){1,5}")
_UNIT = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid after signing, and how long before its
    expiry ``repo status`` and ``repo refresh`` warn (``*_warn``)."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=365)
    snapshot: timedelta = timedelta(days=30)
    timestamp: timedelta = timedelta(days=1)
    root_warn: timedelta = timedelta(days=30)
    targets_warn: timedelta = timedelta(days=30)
    snapshot_warn: timedelta = timedelta(days=1)
    timestamp_warn: timedelta = REFRESH_INTERVAL

    def lifetime(self, role: str) -> timedelta:
        """The lifetime of ``role`` (a delegated role: that of targets)."""
        value: timedelta = getattr(self, role if role in TOP_ROLES else "targets")
        return value

    def window(self, role: str) -> timedelta:
        """How long before expiry ``role`` is warned about (delegated: as targets)."""
        value: timedelta = getattr(self, f"{role if role in TOP_ROLES else 'targets'}_warn")
        return value

    def changed(self, lifetimes: Mapping[str, timedelta] | None = None,
                windows: Mapping[str, timedelta] | None = None) -> Expiry:
        """A copy with some lifetimes and windows changed, checked.

        Raises:
            OperatorInputError: an unknown role, a lifetime out of bounds, or a window
                not shorter than its lifetime.
        """
        kw: dict[str, timedelta] = {}
        for what, values, suffix in (("lifetime", lifetimes, ""), ("window", windows, "_warn")):
            for role, value in (values or {}).items():
                if role not in TOP_ROLES:
                    raise OperatorInputError(
                        f"expiry {what} for {role!r}: not a role; one of {', '.join(TOP_ROLES)}"
                        " (delegated team roles follow targets)")
                kw[role + suffix] = value
        out = replace(self, **kw)
        out.check()
        return out

    def check(self) -> None:
        """Refuse lifetimes out of bounds (:data:`MIN_ROLE_LIFETIME`,
        :data:`MAX_LIFETIME`), a snapshot that expires before the timestamp pointing at it,
        and windows that would always warn.

        Raises:
            OperatorInputError: naming the role and the bound.
        """
        for role in TOP_ROLES:
            life, window = self.lifetime(role), self.window(role)
            low, high = MIN_ROLE_LIFETIME[role], MAX_LIFETIME[role]
            if not low <= life <= high:
                why = {"root": "; only the offline root keys re-sign it",
                       "targets": "; only the offline targets keys re-sign it",
                       "snapshot": f"; the refresh timer re-signs it every "
                                   f"{format_duration(REFRESH_INTERVAL)}"}.get(role, "")
                raise OperatorInputError(
                    f"{role} lifetime {format_duration(life)} is out of bounds: "
                    f"{format_duration(low)} to {format_duration(high)}"
                    + (why if life < low else ""))
            if not timedelta(0) <= window < life:
                raise OperatorInputError(
                    f"{role} warning window {format_duration(window)} must be shorter than "
                    f"its lifetime {format_duration(life)} (else it always warns)")
        if self.snapshot < self.timestamp:
            raise OperatorInputError(
                f"snapshot lifetime {format_duration(self.snapshot)} is shorter than the "
                f"timestamp lifetime {format_duration(self.timestamp)}: a timestamp still "
                "valid would point devices at an expired snapshot")
        if self.timestamp < 2 * REFRESH_INTERVAL:
            logger.warning("timestamp lifetime %s: the refresh timer runs every %s, so one "
                           "failed run lets devices see an expired timestamp",
                           format_duration(self.timestamp), format_duration(REFRESH_INTERVAL))

    def to_json(self) -> bytes:
        """The persisted form: whole seconds per role."""
        doc = {"lifetimes": {r: int(self.lifetime(r).total_seconds()) for r in TOP_ROLES},
               "warn_within": {r: int(self.window(r).total_seconds()) for r in TOP_ROLES}}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Expiry:
        """Parse the persisted form (bounded, strict); roles left out keep the defaults.

        Raises:
            RepositoryStateError: naming ``where`` and what is wrong.
        """
        try:
            doc = loads_bounded(data, max_bytes=MAX_FILE, max_depth=3, what=where)
        except ValueError as e:
            raise RepositoryStateError(f"{where} is not usable: {e}",
                                       hint="fix or remove it, or use `repo set-expiry`") from e
        if not isinstance(doc, dict) or not set(doc) <= {"lifetimes", "warn_within"}:
            raise RepositoryStateError(f"{where}: expected an object with lifetimes and "
                                       "warn_within")
        values: dict[str, dict[str, timedelta]] = {}
        for section in ("lifetimes", "warn_within"):
            part = doc.get(section, {})
            if not isinstance(part, dict):
                raise RepositoryStateError(f"{where}: {section} is not an object")
            values[section] = {}
            for role, seconds in part.items():
                if role not in TOP_ROLES or type(seconds) is not int or \
                        not 0 <= seconds <= 10 * 366 * 86400:
                    raise RepositoryStateError(
                        f"{where}: {section}.{str(role)[:40]!r} = {str(seconds)[:40]!r} is not"
                        " a role's whole number of seconds")
                values[section][role] = timedelta(seconds=seconds)
        try:
            return cls().changed(values["lifetimes"], values["warn_within"])
        except OperatorInputError as e:
            raise RepositoryStateError(f"{where}: {e}") from e


def parse_duration(text: str, what: str) -> timedelta:
    """``30d``, ``6h``, ``1w2d``, ``90m``, ``3600s``.

    Raises:
        OperatorInputError: naming ``what``.
    """
    if len(text) > 40 or not _DURATION.fullmatch(text):
        raise OperatorInputError(f"{what}: {text[:40]!r} is not a duration such as 30d, 6h "
                                 "or 1w2d (units w, d, h, m, s)")
    return timedelta(seconds=sum(int(n) * _UNIT[u]
                                 for n, u in re.findall(r"(\d+)([wdhms])", text)))


def parse_assignments(pairs: Iterable[str], flag: str) -> dict[str, timedelta]:
    """``ROLE=DURATION`` pairs of a command-line flag.

    Raises:
        OperatorInputError: a pair without ``=``, an unknown role, a bad duration.
    """
    out: dict[str, timedelta] = {}
    for pair in pairs:
        role, sep, value = pair.partition("=")
        if not sep:
            raise OperatorInputError(f"{flag} {pair[:60]!r}: expected ROLE=DURATION, e.g. "
                                     "timestamp=1d")
        if role not in TOP_ROLES:
            raise OperatorInputError(f"{flag} {role[:40]!r}: not a role; one of "
                                     f"{', '.join(TOP_ROLES)}")
        out[role] = parse_duration(value, f"{flag} {role}")
    return out


def format_duration(d: timedelta) -> str:
    """Compact and exact: ``30d``, ``6h``, ``1d12h``, ``0s``."""
    left = int(d.total_seconds())
    if left <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, left = divmod(left, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)


def load_expiry(keys: Path) -> Expiry:
    """``KEYS/expiry.json``, or the defaults when there is none.

    Raises:
        RepositoryStateError: the file is unreadable or invalid.
    """
    path = keys / EXPIRY_FILE
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        return Expiry()
    except OSError as e:
        raise RepositoryStateError(f"cannot read {path}: {e}") from e
    return Expiry.from_json(data, str(path))


def load_expiry_to_replace(keys: Path) -> Expiry:
    """What ``repo set-expiry`` starts from: ``KEYS/expiry.json``, or the defaults when
    there is none or it is unusable (logged: the command then overwrites it, which is
    what the hint of a corrupt file tells the operator to do)."""
    try:
        return load_expiry(keys)
    except RepositoryStateError as e:
        logger.warning("%s; replacing it: lifetimes not given now are the defaults", e)
        return Expiry()


def save_expiry(keys: Path, expiry: Expiry) -> Path:
    """Write ``KEYS/expiry.json`` atomically; returns its path."""
    expiry.check()
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = keys / EXPIRY_FILE
    write_atomic(path, expiry.to_json(), mode=0o600)
    return path


@dataclass(frozen=True)
class ExpiryWarning:
    """A role whose metadata expires inside its warning window (or has expired)."""

    role: str
    version: int
    expires: datetime
    left: timedelta
    window: timedelta

    @property
    def expired(self) -> bool:
        return self.left <= timedelta(0)

    def short(self) -> str:
        """For the WARNING column of ``repo status``."""
        if self.expired:
            return "EXPIRED"
        return f"expires in {format_duration(self.left)} (window {format_duration(self.window)})"

    def message(self) -> str:
        """A log line saying what to do."""
        what = {"timestamp": "run `repo refresh` (is its timer running?)",
                "snapshot": "run `repo refresh`",
                "root": "sign a new root version with the root keys (e.g. `repo add-key` or "
                        "`repo rotate`)",
                "targets": "publish, or re-sign with the targets keys"}.get(
                    self.role, f"the team holding role {self.role!r} must re-sign it")
        when = "has EXPIRED: devices refuse it" if self.expired else \
            f"expires in {format_duration(self.left)}, inside its " \
            f"{format_duration(self.window)} warning window"
        return f"{self.role} metadata v{self.version} ({self.expires.isoformat()}) {when}; {what}"


def expiry_warnings(roles: Iterable[tuple[str, int, datetime]], now: datetime,
                    expiry: Expiry) -> list[ExpiryWarning]:
    """The roles, given as (role, version, expires), that expire within their window."""
    out = []
    for role, version, expires in roles:
        left, window = expires - now, expiry.window(role)
        if left <= window:
            out.append(ExpiryWarning(role, version, expires, left, window))
    return out


__all__ = ["EXPIRY_FILE", "Expiry", "ExpiryWarning", "expiry_warnings", "format_duration",
           "load_expiry", "load_expiry_to_replace", "parse_assignments", "parse_duration",
           "save_expiry"]
