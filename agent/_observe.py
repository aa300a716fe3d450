"""What the agent tells the outside: counters, Prometheus metrics, the signed status
report, and the activation notice to the inference application."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelward._plain import Plain
from modelward.agent._status import COUNTERS as COUNTERS
from modelward.agent._status import clean_status
from modelward.trust._atomic import write_atomic
from modelward.trust._record import ModelRef, TrustRecord
from modelward.trust._report_seq import (
    MAX_SEQ,
    ReportSequenceError,
    next_sequence,
    sequence_believable,
)

if TYPE_CHECKING:
    from modelward.agent._config import ActivationConfig

logger = logging.getLogger("modelward.agent")


ACTIVATED_FILE = "activated"
"""``state_dir/activated``: replaced after each switch (the model's name, version and
fingerprint); ``systemd/modelward-activate@.path`` watches it."""


def write_activated(state_dir: Path, ref: ModelRef) -> str | None:
    """Replace :data:`ACTIVATED_FILE`; ``None``, or why it could not be written (never
    raises: the model is installed either way)."""
    doc = {"name": ref.name, "version": ref.version, "fingerprint": ref.fingerprint}
    try:
        write_atomic(state_dir / ACTIVATED_FILE, (json.dumps(doc) + "\n").encode(), mode=0o640)
    except OSError as e:
        return f"{state_dir / ACTIVATED_FILE}: {e}"
    return None


def notify_activation(cfg: ActivationConfig, state_dir: Path, ref: ModelRef) -> dict[str, Any]:
    """Run the configured notices; returns ``{"ok": bool, "detail": str}`` (never raises)."""
    env = dict(os.environ, MODELWARD_MODEL_DIR=str(state_dir / "current"),
               MODELWARD_MODEL=ref.name, MODELWARD_VERSION=ref.version,
               MODELWARD_FINGERPRINT=ref.fingerprint)
    cmds: list[list[str]] = []
    if cfg.command:
        cmds.append(list(cfg.command))
    details = []
    ok = True
    if (problem := write_activated(state_dir, ref)) is not None:
        ok = False
        details.append(f"activated: {problem}")
    if cmds:
        import subprocess  # (here: not on the boot path, issue 15)
    for cmd in cmds:
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True,
                               timeout=cfg.timeout, check=False)
            good = r.returncode == 0
            details.append(f"{cmd[0]}: exit {r.returncode}")
        except (OSError, subprocess.TimeoutExpired) as e:
            good = False
            details.append(f"{cmd[0]}: {type(e).__name__}: {e}")
        ok = ok and good
    result = {"ok": ok, "detail": "; ".join(details) or "nothing configured"}
    log = logger.info if ok else logger.error
    log("activation notice for %s %s: %s", ref.name, ref.version, result["detail"],
        extra={"model": ref.name, "version": ref.version, "fingerprint": ref.fingerprint,
               "activation_ok": ok})
    return result


class Metrics(Plain):
    """Counters and gauges, persisted in status.json so they survive restarts."""

    __slots__ = ("counters", "last_success", "verification_seconds")

    def __init__(self, counters: dict[str, int] | None = None, last_success: float = 0.0,
                 verification_seconds: float = 0.0) -> None:
        self.counters = dict.fromkeys(COUNTERS, 0) if counters is None else counters
        self.last_success = last_success
        self.verification_seconds = verification_seconds

    @classmethod
    def from_status(cls, doc: dict[str, Any]) -> Metrics:
        """Counters stored by an earlier run."""
        m = cls()
        doc = clean_status(doc)  # whatever the caller read: only the types written
        for k, v in doc.get("counters", {}).items():
            m.counters[k] = v
        m.last_success = float(doc.get("last_success", 0.0))
        m.verification_seconds = float(doc.get("verification_seconds", 0.0))
        return m

    def to_status(self) -> dict[str, Any]:
        """What goes into status.json."""
        return {"counters": self.counters, "last_success": self.last_success,
                "verification_seconds": self.verification_seconds}

    def prometheus(self) -> str:
        """Text exposition format."""
        c = self.counters
        rows = [
            ("modelward_update_attempts_total", "counter", "Update attempts.", c["attempts"]),
            ("modelward_updates_installed_total", "counter", "Models installed.",
             c["installed"]),
            ("modelward_update_failures_total", "counter", "Failed update attempts.",
             c["failures"]),
            ("modelward_signature_failures_total", "counter",
             "TUF metadata that failed verification.", c["signature_failures"]),
            ("modelward_verification_failures_total", "counter",
             "Bundles rejected (hash, format, fingerprint, health check).",
             c["verification_failures"]),
            ("modelward_fallbacks_total", "counter", "Boot-time fallbacks to the previous model.",
             c["fallbacks"]),
            ("modelward_bytes_fetched_total", "counter", "Bytes fetched from origin or broker.",
             c["bytes_fetched"]),
            ("modelward_last_success_timestamp_seconds", "gauge",
             "Unix time of the last successful update attempt.", self.last_success),
            ("modelward_verification_seconds", "gauge",
             "Extraction, fingerprint and health check of the last install.",
             self.verification_seconds),
        ]
        out = []
        for name, kind, help_, value in rows:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"

    def write_textfile(self, path: Path) -> bool:
        """Atomically replace the node_exporter textfile; a failure (a read-only or missing
        directory, a full disk) is one warning, never an error: metrics are not part of an
        install. Returns whether it was written."""
        try:
            write_atomic(path, self.prometheus().encode())
        except OSError as e:
            logger.warning("cannot write the metrics textfile %s: %s", path, e,
                           extra={"metrics_textfile": str(path), "problem": str(e)})
            return False
        return True


def _ref(r: ModelRef | None) -> dict[str, str] | None:
    return {"name": r.name, "version": r.version, "fingerprint": r.fingerprint} if r else None


def build_report(device_id: str, fleet: str, record: TrustRecord | None, state: str,
                 status: dict[str, Any], *, seq: int, now: float,
                 poll_interval: float) -> dict[str, Any]:
    """The status report a device publishes (then signs).

    Args:
        seq: its sequence number, already persisted (:func:`advance_sequence`).
        now: when it is signed (seconds since the epoch).
        poll_interval: the device's poll interval in seconds: the operator calls a report
            older than three of them stale.
    """
    return {
        "device_id": device_id,
        "fleet": fleet,
        "seq": seq,
        "poll_interval": poll_interval,
        "active": _ref(record.active) if record else None,
        "previous": _ref(record.previous) if record else None,
        "state": state,
        "last_error": status.get("last_error"),
        "last_activation": status.get("last_activation"),
        "counters": status.get("counters", {}),
        "at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "uptime_s": round(time.monotonic()),
    }


SEQUENCE_FILE = "report-seq"
_SEQ_READ_BYTES = 32  # "9007199254740991\n" and some slack


def read_sequence(path: Path) -> int:
    """The last persisted report sequence number; 0 if absent or not believable.

    Opened without following a link and without blocking (a FIFO planted there must not
    hang the agent); at most a few bytes are read. A lost or garbled file costs nothing:
    :func:`~modelward.trust._report.next_sequence` has the clock as its floor.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    except OSError as e:
        logger.warning("report sequence file %s unreadable, the clock is the floor: %s",
                       path, e)
        return 0
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            logger.warning("report sequence file %s is not a regular file", path)
            return 0
        data = os.read(fd, _SEQ_READ_BYTES + 1)
    except OSError as e:
        logger.warning("report sequence file %s unreadable: %s", path, e)
        return 0
    finally:
        os.close(fd)
    text = data.strip()
    if (len(data) > _SEQ_READ_BYTES or not text.isdigit() or len(text) > 16
            or int(text) > MAX_SEQ):
        logger.warning("report sequence file %s is garbled, the clock is the floor", path)
        return 0
    return int(text)


def advance_sequence(state_dir: Path, now: float) -> int:
    """Take the next report sequence number and persist it before anyone sees it.

    Raises:
        ReportSequenceError: it cannot be persisted (then no report may be sent).
    """
    path = state_dir / SEQUENCE_FILE
    last = read_sequence(path)
    if not sequence_believable(last, now):
        logger.warning("report sequence %d in %s is far ahead of the clock (planted, or the "
                       "clock stepped back): not believed, the clock is the floor", last, path)
    try:
        seq = next_sequence(last, now)
    except ReportSequenceError as e:
        raise ReportSequenceError(f"{e} ({path})", path=str(path)) from e
    try:
        write_atomic(path, f"{seq}\n".encode(), mode=0o600)
    except OSError as e:
        raise ReportSequenceError(f"cannot persist report sequence {seq} in {path}: {e}",
                                  path=str(path)) from e
    return seq
