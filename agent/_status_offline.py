"""``agent status`` without the TPM: the record, status and rejections files as they are on
disk, NOT verified (no TPM to check their MACs or the update counter against).

For a person diagnosing a device whose TPM does not answer: what the files say, labelled
unverified everywhere it is shown. Nothing here is believed by the agent, and nothing is
written.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelward.agent._config import AgentConfig
from modelward.agent._status import read_status
from modelward.trust._bounded import UnsafeFileError, read_bounded
from modelward.trust._display import escape
from modelward.trust._record import RECORD_MAX_BYTES, ModelRef, decode_record
from modelward.trust.errors import ModelwardError

UNVERIFIED = ("UNVERIFIED: the TPM is not available, so the trust record and status were "
              "read from disk without checking their MACs; the disk may say anything")


class _NotChecked:
    """Stands in for the TPM when decoding for display only: every MAC "passes" (the
    result is shown as unverified and never used)."""

    def mac(self, digest: bytes) -> bytes:
        raise NotImplementedError("no TPM: nothing is written")

    def mac_ok(self, digest: bytes, mac: bytes) -> bool:
        return True


def _ref(r: ModelRef | None) -> dict[str, str] | None:
    return {"name": r.name, "version": r.version, "fingerprint": r.fingerprint} if r else None


def unverified_status(cfg: AgentConfig, why: str) -> dict[str, Any]:
    """What ``agent status`` shows without the TPM (``verified`` false, ``unverified``
    the reason); ``record_problem`` says why the record could not even be parsed."""
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
    doc: dict[str, Any] = _escaped({
        "verified": False,
        "unverified": f"{UNVERIFIED} ({why})",
        "active": active,
        "previous": previous,
        "record_problem": problem,
        "last_error": read_status(cfg.state_dir / "status.json").get("last_error"),
        **_rejections(cfg.state_dir),
    })
    return doc


def _escaped(v: Any) -> Any:
    """Every string with control and format characters escaped: the disk wrote them, and
    a line break or a terminal escape must not print a line of its own (``verified ...``)."""
    if isinstance(v, str):
        return escape(v, 512)
    if isinstance(v, dict):
        return {k: _escaped(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_escaped(x) for x in v]
    return v


def _rejections(state_dir: Path) -> dict[str, Any]:
    from modelward.updater._rejections import RejectionStore

    now = time.time()
    try:
        entries = RejectionStore(state_dir, _NotChecked()).load()
    except ModelwardError as e:
        return {"rejected": [], "rejections_problem": str(e)}
    return {"rejected": [
        {"model": r.model, "version": r.version, "target": r.path, "reason": r.reason,
         "detail": r.detail,
         "at": datetime.fromtimestamp(r.at, UTC).isoformat(timespec="seconds"),
         "retry_after": datetime.fromtimestamp(r.until, UTC).isoformat(timespec="seconds")}
        for r in entries if r.live(now)], "rejections_problem": None}
