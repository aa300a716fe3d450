"""``state_dir/status.json`` read back: bounded, and only the fields of the types the agent
writes (the file carries no MAC, so the disk may have written anything there).

Kept free of the TUF, TPM and crypto stacks: the idle daemon reads it for its STATUS= line.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from trust._bounded import read_json_file

logger = logging.getLogger("modelward.agent")

COUNTERS = ("attempts", "installed", "failures", "fallbacks", "bytes_fetched",
            "signature_failures", "verification_failures")
MAX_STATUS_BYTES = 64 * 1024  # status.json is about 1 kB


def _finite(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) \
        and v >= 0


def _text(v: object) -> bool:
    return v is None or isinstance(v, str)


def _cut(v: str | None) -> str | None:
    return v[:MAX_TEXT] if v is not None else None


MAX_TEXT = 4096  # characters of a message kept (the signed report copies it)


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
    return out


def read_status(path: Path) -> dict[str, Any]:
    """The status document at ``path`` (empty if none or unreadable), schema-checked."""
    try:
        data = read_json_file(path, MAX_STATUS_BYTES, max_depth=4)
    except (OSError, ValueError) as e:  # UnsafeFileError, UntrustedJsonError
        logger.warning("ignoring %s: %s", path, e)
        return {}
    return clean_status(data)
