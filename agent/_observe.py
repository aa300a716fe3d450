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

from modelward.agent._status import COUNTERS as COUNTERS
from modelward.agent._status import clean_status
from modelward.trust._atomic import write_atomic
from modelward.trust._plain import Plain
from modelward.trust._record import ModelRef, TrustRecord
from modelward.trust._report_fields import (
    MAX_DURATION,
    MAX_REASONS,
    OTHER_REASON,
    is_reason,
)
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

    __slots__ = ("counters", "last_success", "verification_seconds", "verify_s",
                 "failure_reasons")

    def __init__(self, counters: dict[str, int] | None = None, last_success: float = 0.0,
                 verification_seconds: float = 0.0, verify_s: float | None = None,
                 failure_reasons: dict[str, int] | None = None) -> None:
        self.counters = dict.fromkeys(COUNTERS, 0) if counters is None else counters
        self.last_success = last_success
        self.verification_seconds = verification_seconds
        #: download and verification of the last install that passed its health check (s)
        self.verify_s = verify_s
        #: failed attempts by the error's type name (at most MAX_REASONS names)
        self.failure_reasons = {} if failure_reasons is None else failure_reasons

    @classmethod
    def from_status(cls, doc: dict[str, Any]) -> Metrics:
        """Counters stored by an earlier run."""
        m = cls()
        doc = clean_status(doc)  # whatever the caller read: only the types written
        for k, v in doc.get("counters", {}).items():
            m.counters[k] = v
        m.last_success = float(doc.get("last_success", 0.0))
        m.verification_seconds = float(doc.get("verification_seconds", 0.0))
        if "verify_s" in doc:
            m.verify_s = float(doc["verify_s"])
        m.failure_reasons = dict(doc.get("failure_reasons", {}))
        return m

    def note_failure(self, reason: str) -> None:
        """Count one failed attempt under ``reason`` (an error's type name); a name that is
        not an identifier, or a new one once MAX_REASONS are held, counts as ``other``."""
        if not is_reason(reason) or (reason not in self.failure_reasons
                                     and len(self.failure_reasons) >= MAX_REASONS - 1):
            reason = OTHER_REASON
        self.failure_reasons[reason] = min(self.failure_reasons.get(reason, 0) + 1, MAX_SEQ)

    def to_status(self) -> dict[str, Any]:
        """What goes into status.json."""
        doc: dict[str, Any] = {"counters": self.counters, "last_success": self.last_success,
                               "verification_seconds": self.verification_seconds,
                               "failure_reasons": self.failure_reasons}
        if self.verify_s is not None:
            doc["verify_s"] = self.verify_s
        return doc

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
                 poll_interval: float, model: str | None = None, channel: str | None = None,
                 boot_check_s: float | None = None) -> dict[str, Any]:
    """The status report a device publishes (then signs).

    Args:
        seq: its sequence number, already persisted (:func:`advance_sequence`).
        now: when it is signed (seconds since the epoch).
        poll_interval: the device's poll interval in seconds: the operator calls a report
            older than three of them stale.
        model, channel: the model and release channel this device follows (its config).
        boot_check_s: how long the last boot-check took (:func:`read_boot_seconds`).
    """
    report: dict[str, Any] = {
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
        "failure_reasons": status.get("failure_reasons", {}),
        "durations": {"verify_s": status.get("verify_s"), "boot_check_s": boot_check_s},
        "at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "uptime_s": round(time.monotonic()),
    }
    if model is not None:
        report["model"] = model
    if channel is not None:
        report["channel"] = channel
    return report


BOOT_SECONDS_FILE = "boot-check-seconds"
"""``state_dir/boot-check-seconds``: how long the last boot-check took ("0.123\\n"), for the
next status report. Not MACed (it costs no TPM command at boot): the device's disk can
make this device report any boot time up to MAX_DURATION, which says nothing about any
other device."""
_BOOT_READ_BYTES = 32


def write_boot_seconds(state_dir: Path, seconds: float) -> None:
    """Record the boot-check's duration (atomically; a failure is one warning: it is
    telemetry, never a reason for boot-check to fail)."""
    try:
        # (not durable: two fsyncs would add ~10 ms to every boot; a power loss leaves
        # the old value, or an empty or missing file, which reads as none)
        write_atomic(state_dir / BOOT_SECONDS_FILE, f"{seconds:.3f}\n".encode(), mode=0o640,
                     durable=False)
    except OSError as e:
        logger.warning("cannot record the boot-check time in %s: %s",
                       state_dir / BOOT_SECONDS_FILE, e)


def read_boot_seconds(state_dir: Path) -> float | None:
    """The last boot-check's duration, or None if absent or not a plain number of
    seconds in [0, MAX_DURATION) (never follows a link, never blocks, reads a few bytes)."""
    path = state_dir / BOOT_SECONDS_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, _BOOT_READ_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    text = data.strip()
    if len(data) > _BOOT_READ_BYTES or not text.replace(b".", b"", 1).isdigit():
        return None  # (digits and one dot: no "nan", "inf", "1e9", sign or space)
    value = float(text)
    return value if value < MAX_DURATION else None


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
