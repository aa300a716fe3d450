"""``agent status`` without the TPM: the record, status and rejections files as they are on
disk, NOT verified (no TPM to check their MACs or the update counter against).

For a person diagnosing a device whose TPM does not answer: what the files say, labelled
unverified everywhere it is shown. Nothing here is believed by the agent, and nothing is
written.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from modelward.agent._config import AgentConfig
from modelward.agent._status import read_status
from modelward.trust._bounded import UnsafeFileError, read_bounded
from modelward.trust._display import ID_ALPHABET, display_width, escape, escape_id
from modelward.trust._record import RECORD_MAX_BYTES, ModelRef, decode_record
from modelward.trust.errors import ModelwardError

UNVERIFIED = ("UNVERIFIED: the TPM is not available, so the trust record and status were "
              "read from disk without checking their MACs; the disk may say anything")
UNVERIFIED_END = "UNVERIFIED: nothing above was checked by the TPM (see the first line)"
IDENT_LIMIT = 80  # characters of a name, version, fingerprint or path shown
TEXT_LIMIT = 240  # characters of a message shown
ROW = 78  # columns of one printed row: a longer value continues on rows of its own
_LABEL = 10  # columns of a row's label ("active    ")
_MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z, the last time datetime can show
_SLACK = 1.0  # seconds: until = at + RELEASE_TTL, computed in floating point
_IDENT = ID_ALPHABET | frozenset("/+:@=,~")


class _NotChecked:
    """Stands in for the TPM when decoding for display only: every MAC "passes" (the
    result is shown as unverified and never used)."""

    def mac(self, digest: bytes) -> bytes:
        raise NotImplementedError("no TPM: nothing is written")

    def mac_ok(self, digest: bytes, mac: bytes) -> bool:
        return True


def _ident(v: object) -> str:
    """A name, version, fingerprint or target path from the disk, for display: every
    character outside ``[A-Za-z0-9._-/+:@=,~]`` escaped (so no space: it cannot hold a
    phrase of words, nor padding to wrap a row), and cut short."""
    s = v if isinstance(v, str) else str(v)
    return _cut("".join(c if c in _IDENT else escape_id(c, None) for c in s), IDENT_LIMIT)


def _text(v: object, limit: int = TEXT_LIMIT) -> str:
    """A message from the disk, for display: escaped by :func:`escape` (controls, bidi,
    line breaks, look-alike spaces), and every space that is leading, trailing or next
    to another escaped too (``\\x20``): no run of spaces pads it to wrap a row, nor
    forges the two-space gap of the ``verified  by the TPM`` line; cut short."""
    s = v if isinstance(v, str) else str(v)
    parts = re.split(r"(^ +| +$| {2,})", s)
    return _cut("".join("\\x20" * len(p) if p and p.strip(" ") == "" else escape(p, None)
                        for p in parts), limit)


_TOKEN = re.compile(r"\\(?:x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)|.", re.DOTALL)


def _tokens(escaped: str) -> Iterator[str]:
    """The printed pieces of escaped text: an escape whole, a character with the
    combining marks on it."""
    out = ""
    for t in _TOKEN.findall(escaped):
        if out and unicodedata.category(t[0]) in ("Mn", "Me"):
            out += t
            continue
        if out:
            yield out
        out = t
    if out:
        yield out


def _cut(escaped: str, limit: int) -> str:
    """Escaped text cut to ``limit`` characters, never inside an escape (``...`` added)."""
    if len(escaped) <= limit:
        return escaped
    out, used = [], 0
    for t in _tokens(escaped):
        if used + len(t) > limit:
            break
        out.append(t)
        used += len(t)
    return "".join(out) + "..."


def _time(v: object) -> str | None:
    """A Unix time from the disk as ISO 8601 UTC, or None when it is not a finite number
    in the range a date can show (checked, never ``fromtimestamp`` of a raw value)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    t = float(v)
    if not (math.isfinite(t) and 0.0 <= t <= _MAX_TIME):
        return None
    try:
        when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=t)
    except (OverflowError, ValueError):
        return None
    return when.isoformat(timespec="seconds")


def _ref(r: ModelRef | None) -> dict[str, str] | None:
    return {"name": _ident(r.name), "version": _ident(r.version),
            "fingerprint": _ident(r.fingerprint)} if r else None


def unverified_status(cfg: AgentConfig, why: str) -> dict[str, Any]:
    """What ``agent status`` shows without the TPM (``verified`` false, ``unverified``
    the reason); ``record_problem`` says why the record could not even be parsed. Every
    value is the disk's, checked by type and range, escaped and cut (names by
    :func:`_ident`, messages by :func:`_text`): ready to print, and the same in
    ``--json``."""
    path = cfg.state_dir / "trust" / "record.json"
    active = previous = None
    problem = None
    try:
        data = read_bounded(path, RECORD_MAX_BYTES, parent_nofollow=True)
        if data is None:
            problem = f"no trust record at {path}"
        else:
            record, _mac = decode_record(data, str(path))
            active, previous = _ref(record.active), _ref(record.previous)
    except UnsafeFileError as e:
        problem = f"{path}: {e.reason}"
    except OSError as e:
        problem = f"cannot read {path}: {e.strerror or e}"
    except ModelwardError as e:  # TrustRecordError: malformed
        problem = str(e)
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        problem = f"trust record {path} is malformed: {type(e).__name__}"
    err = read_status(cfg.state_dir / "status.json").get("last_error")
    return {
        "verified": False,
        "unverified": f"{UNVERIFIED} ({_text(why)})",
        "active": active,
        "previous": previous,
        "record_problem": None if problem is None else _text(problem),
        "last_error": {k: None if err.get(k) is None else _text(err[k])
                       for k in ("type", "message", "at")} if isinstance(err, dict) else None,
        **_rejections(cfg.state_dir),
    }


def _rejections(state_dir: Path) -> dict[str, Any]:
    from modelward.updater.install._rejections import RELEASE_TTL, RejectionStore

    now = time.time()
    try:
        entries = RejectionStore(state_dir, _NotChecked()).load()
    except ModelwardError as e:
        return {"rejected": [], "rejections_problem": _text(e)}
    shown: list[dict[str, Any]] = []
    odd = 0
    for r in entries:
        at, until = _time(r.at), _time(r.until)
        if at is None or until is None or not r.at < r.until <= r.at + RELEASE_TTL + _SLACK:
            odd += 1  # not what the agent writes (until = at + RELEASE_TTL)
        elif r.live(now):
            shown.append({"model": _ident(r.model), "version": _ident(r.version),
                          "target": _ident(r.path), "reason": _ident(r.reason),
                          "detail": _text(r.detail), "at": at, "retry_after": until})
    problem = None if not odd else (
        f"{odd} entr{'y' if odd == 1 else 'ies'} of {state_dir / 'rejections.json'} with "
        "times the agent never writes (out of range, or kept longer than "
        f"{RELEASE_TTL:.0f} s): not shown")
    return {"rejected": shown, "rejections_problem": None if problem is None else _text(problem)}


def _rows(label: str, text: str, width: int = ROW) -> list[str]:
    """``label`` and escaped ``text`` as rows of at most ``width`` columns: a long value
    goes on under the label, each row starting with ``|``, so no row of the terminal
    starts with what the disk wrote (it never wraps on its own)."""
    rows: list[list[str]] = [[]]
    used = 0
    room = width - max(_LABEL, len(label) + 1)
    for t in _tokens(text):
        row = rows[-1]
        if used + display_width(t) > room and row:
            # break after the row's last space if there is one in its second half
            cut = next((i + 1 for i in range(len(row) - 1, len(row) // 2, -1)
                        if row[i] == " "), len(row))
            rows[-1], rest = row[:cut], row[cut:]
            rows.append(rest)
            used = sum(display_width(x) for x in rest)
            room = width - _LABEL - 2
        rows[-1].append(t)
        used += display_width(t)
    lines = ["".join(r) for r in rows]
    return [f"{label:9} {lines[0]}", *(f"{'':9} | {r}" for r in lines[1:])]


def status_lines(doc: dict[str, Any], width: int = ROW) -> list[str]:
    """The text of ``agent status`` for ``doc`` (from ``agent._commands.status``), in
    rows of at most ``width`` columns (:data:`ROW` at most, 40 at least: a terminal's
    width less one, so that no row wraps on it).

    Unverified (no TPM): the notice first and last, every value on a labelled row, as
    :func:`unverified_status` escaped it. Verified: the same rows, escaped here (the
    names come from signed metadata, which one team key controls), and the line that
    says the TPM verified them, printed for ``verified`` true only."""
    verified = doc["verified"] is True
    width = min(max(width, 40), ROW)

    def rows(label: str, text: str) -> list[str]:
        return _rows(label, text, width)

    def ident(v: object) -> str:
        return _ident(v) if verified else str(v)

    def text(v: object) -> str:
        return _text(v) if verified else str(v)

    out: list[str] = []
    if not verified:
        out.append(str(doc.get("unverified", UNVERIFIED)))
        if doc.get("record_problem"):
            out += rows("record", str(doc["record_problem"]))
    running = doc.get("in_progress")
    if running:  # (the holder's own words from its lock file: escaped, bounded)
        what = "an update" if running.get("command") == "agent update" else \
            f"`{_text(running.get('command') or 'a device command')}`"
        pid = running.get("pid")
        out += rows("running", f"{what} is in progress" +
                    (f" (pid {pid})" if isinstance(pid, int) else ""))
    for key in ("active", "previous"):
        m = doc[key]
        out += rows(key, f"{ident(m['name'])} {ident(m['version'])}  "
                          f"{ident(m['fingerprint'])}" if m else "none")
    err = doc["last_error"]
    out += rows("last error", f"{text(err['type'])}: {text(err['message'])} "
                               f"({text(err['at'])})" if err else "none")
    for r in doc["rejected"]:  # releases not tried again until new signed metadata
        out += rows("rejected", f"{ident(r['model'])} {ident(r['version'])}  "
                                 f"{ident(r['target'])}  {ident(r['reason'])} "
                                 f"({text(r['at'])}; retried after {text(r['retry_after'])} "
                                 "unless re-signed)")
    if doc["rejections_problem"]:
        out += rows("rejected", f"unknown: {text(doc['rejections_problem'])}")
    if verified:
        out.append("verified  by the TPM (trust record MAC and update counter)")
    else:
        out.append(UNVERIFIED_END)
    return out
