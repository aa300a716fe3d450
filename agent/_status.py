"""``state_dir/status.json`` read back: bounded, and only the fields of the types the agent
writes.

The file carries ``auth``: the TPM's MAC (the trust record's key, through
``TpmInterface.mac``, over a digest with its own domain) of its cleaned fields together with
the TPM update counter at the time it was written. :func:`verified_status` believes it only
when that MAC verifies for the counter the TPM holds now: an edited or planted file, and a
copy put back from before the last install (or fallback), say nothing. What the MAC cannot
tell (no NV write per attempt, which would wear the TPM): an older copy from the same
counter value. So the signed status report takes the outcome of the attempt it reports on
from the memory of the process that made it (``modelward.agent._commands``), never from the disk.

Kept free of the TUF, TPM and crypto stacks (the TPM comes in as two callables): the idle
daemon reads the file, unauthenticated, for its STATUS= line only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelward.trust._bounded import read_json_file
from modelward.trust._report_fields import COUNTERS as COUNTERS
from modelward.trust._report_fields import DURATION_BUCKETS, MAX_DURATION, MAX_REASONS, is_reason
from modelward.trust._report_fields import MAX_TEXT as MAX_TEXT

logger = logging.getLogger("modelward.agent")

MAX_STATUS_BYTES = 64 * 1024  # status.json is about 1 kB

#: the duration histograms' upper bounds (s): ``trust._report_fields.DURATION_BUCKETS``
BUCKETS = DURATION_BUCKETS
#: the histograms status.json keeps (``histograms``: per name ``{"counts": [one count per
#: bucket and one for +Inf, not cumulative], "sum": seconds}``), so they span process runs
HISTOGRAMS = ("verification_duration_seconds", "boot_check_duration_seconds")
MAX_COUNT = 2**53 - 1  # (trust._report_seq.MAX_SEQ: exact in every JSON reader)
MAX_SUM = float(MAX_DURATION) * MAX_COUNT
MAX_MARK = 2**63 - 1  # boot_check_mark: the st_mtime_ns of the boot-check time observed


MAX_NUMBER = 1e300  # any stored seconds or sum: a float holds it (a19: a 400-digit JSON
# integer made math.isfinite, and a later float(), raise OverflowError on every update)


def _finite(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and \
        (isinstance(v, int) or math.isfinite(v)) and 0 <= v < MAX_NUMBER


def _text(v: object) -> bool:
    return v is None or isinstance(v, str)


def _cut(v: str | None) -> str | None:
    return v[:MAX_TEXT] if v is not None else None


def _histogram(v: object) -> dict[str, Any] | None:
    if not isinstance(v, dict):
        return None
    counts, total = v.get("counts"), v.get("sum")
    if not (isinstance(counts, list) and len(counts) == len(BUCKETS) + 1
            and all(type(c) is int and 0 <= c <= MAX_COUNT for c in counts)
            and _finite(total) and total <= MAX_SUM):  # type: ignore[operator]
        return None
    return {"counts": list(counts), "sum": total}


def clean_status(doc: object) -> dict[str, Any]:
    """The fields of a status.json document that have the types the agent writes; the
    rest is dropped (schema check of an unauthenticated file)."""
    if not isinstance(doc, dict):
        return {}
    out: dict[str, Any] = {}
    err = doc.get("last_error")
    if err is None and "last_error" in doc:
        out["last_error"] = None
    elif isinstance(err, dict) and isinstance(err.get("type"), str) and \
            _text(err.get("message")) and _text(err.get("at")):
        out["last_error"] = {k: _cut(err.get(k)) for k in ("type", "message", "at")}
    res = doc.get("last_result")
    if isinstance(res, dict) and _text(res.get("message")) and _text(res.get("at")):
        out["last_result"] = {"message": _cut(res.get("message")), "at": _cut(res.get("at"))}
    act = doc.get("last_activation")
    if isinstance(act, dict) and isinstance(act.get("ok"), bool) and \
            isinstance(act.get("detail"), str):
        out["last_activation"] = {"ok": act["ok"], "detail": _cut(act["detail"])}
    counters = doc.get("counters")
    if isinstance(counters, dict):
        out["counters"] = {k: v for k, v in counters.items() if k in COUNTERS
                           and isinstance(v, int) and not isinstance(v, bool) and v >= 0}
    for k in ("last_success", "verification_seconds"):
        if _finite(doc.get(k)):
            out[k] = doc[k]
    if _finite(doc.get("verify_s")) and doc["verify_s"] < MAX_DURATION:
        out["verify_s"] = doc["verify_s"]
    reasons = doc.get("failure_reasons")
    if isinstance(reasons, dict):  # (bounded: at most MAX_REASONS names, in name order)
        out["failure_reasons"] = dict(sorted(
            (k, v) for k, v in reasons.items() if is_reason(k)
            and isinstance(v, int) and not isinstance(v, bool) and v >= 0)[:MAX_REASONS])
    hists = doc.get("histograms")
    if isinstance(hists, dict):  # (only the names of HISTOGRAMS, each of the right shape)
        kept = {k: h for k in HISTOGRAMS if (h := _histogram(hists.get(k))) is not None}
        if kept:
            out["histograms"] = kept
    mark = doc.get("boot_check_mark")
    if type(mark) is int and 0 <= mark <= MAX_MARK:
        out["boot_check_mark"] = mark
    return out


def read_status(path: Path) -> dict[str, Any]:
    """The status document at ``path`` (empty if none or unreadable), schema-checked."""
    try:
        data = read_json_file(path, MAX_STATUS_BYTES, max_depth=4)
    except (OSError, ValueError) as e:  # UnsafeFileError, UntrustedJsonError
        logger.warning("ignoring %s: %s", path, e)
        return {}
    return clean_status(data)


AUTH = "auth"  # {"counter": int, "mac": hex}
_DOMAIN = b"modelward status v1\n"


def status_digest(doc: object, counter: int) -> bytes:
    """What the MAC of a status document covers: its cleaned fields and ``counter``."""
    canonical = json.dumps({"counter": counter, "status": clean_status(doc)}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(_DOMAIN + canonical.encode()).digest()


def sealed_status(doc: object, counter: int, mac: Callable[[bytes], bytes]) -> dict[str, Any]:
    """``doc`` cleaned, with its ``auth`` for the TPM update counter ``counter``."""
    out = clean_status(doc)
    out[AUTH] = {"counter": counter, "mac": mac(status_digest(out, counter)).hex()}
    return out


def verified_status(doc: object, counter: int,
                    mac_ok: Callable[[bytes, bytes], bool]) -> tuple[dict[str, Any], str]:
    """``(fields, "")`` when ``doc``'s ``auth`` verifies for the TPM's ``counter`` now, else
    ``({}, why)``: nothing of it is believed."""
    auth = doc.get(AUTH) if isinstance(doc, dict) else None
    if not isinstance(auth, dict) or type(auth.get("counter")) is not int or \
            not isinstance(auth.get("mac"), str):
        return {}, "it carries no MAC"
    try:
        tag = bytes.fromhex(auth["mac"])
    except ValueError:
        return {}, "its MAC is not hex"
    if auth["counter"] != counter:
        return {}, (f"it was written at update counter {auth['counter']}, the TPM is at "
                    f"{counter} (a copy from before the last install or fallback)")
    if len(tag) != 32 or not mac_ok(status_digest(doc, counter), tag):
        return {}, "its MAC does not verify (altered or not written by this device)"
    return clean_status(doc), ""
