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

from modelward.agent._status import BUCKETS, HISTOGRAMS, MAX_COUNT, MAX_SUM, clean_status
from modelward.agent._status import COUNTERS as COUNTERS
from modelward.trust._atomic import write_atomic
from modelward.trust._plain import Plain
from modelward.trust._record import ModelRef, TrustRecord
from modelward.trust._report_fields import (
    MAX_DURATION,
    MAX_REASONS,
    MAX_REJECTED,
    MAX_REJECTED_TEXT,
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
    from collections.abc import Iterable, Iterator

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


#: the counters' metric names (``_total`` appended), help texts and status.json keys
_COUNTER_ROWS = (
    ("modelward_update_attempts", "Update attempts.", "attempts"),
    ("modelward_updates_installed", "Models installed.", "installed"),
    ("modelward_update_failures", "Failed update attempts.", "failures"),
    ("modelward_signature_failures", "TUF metadata that failed verification.",
     "signature_failures"),
    ("modelward_verification_failures",
     "Bundles rejected (hash, format, fingerprint, health check).", "verification_failures"),
    ("modelward_fallbacks", "Boot-time fallbacks to the previous model.", "fallbacks"),
    ("modelward_bytes_fetched", "Bytes fetched from origin or broker.", "bytes_fetched"),
)
_HISTOGRAM_HELP = {
    "verification_duration_seconds":
        "Download and verification of each install that passed its health check.",
    "boot_check_duration_seconds": "Each boot-check (TPM wait included).",
}
INFO_LABELS = ("model", "version", "fingerprint", "channel", "slot")
MAX_LABEL = 256  # characters of one label value (a model name or version is far shorter)


def model_info(ref: ModelRef | None, channel: str | None) -> dict[str, str] | None:
    """The ``modelward_model_info`` labels of the active model (None: nothing active)."""
    if ref is None:
        return None
    values = (ref.name, ref.version, ref.fingerprint, channel or "", ref.slot)
    return {k: v[:MAX_LABEL] for k, v in zip(INFO_LABELS, values, strict=True)}


def _go_float(v: float) -> str:
    """A sample value as prometheus_client writes it (utils.floatToGoString)."""
    d = float(v)
    s = repr(d)
    dot = s.find(".")
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics(Plain):
    """Counters, gauges and duration histograms, persisted in status.json so they survive
    restarts."""

    __slots__ = ("counters", "last_success", "verification_seconds", "verify_s",
                 "failure_reasons", "histograms", "boot_check_mark")

    def __init__(self, counters: dict[str, int] | None = None, last_success: float = 0.0,
                 verification_seconds: float = 0.0, verify_s: float | None = None,
                 failure_reasons: dict[str, int] | None = None,
                 histograms: dict[str, dict[str, Any]] | None = None,
                 boot_check_mark: int | None = None) -> None:
        self.counters = dict.fromkeys(COUNTERS, 0) if counters is None else counters
        self.last_success = last_success
        self.verification_seconds = verification_seconds
        #: download and verification of the last install that passed its health check (s)
        self.verify_s = verify_s
        #: failed attempts by the error's type name (at most MAX_REASONS names)
        self.failure_reasons = {} if failure_reasons is None else failure_reasons
        #: per name of HISTOGRAMS: {"counts": per bucket and +Inf, "sum": seconds}
        self.histograms = {} if histograms is None else histograms
        #: the st_mtime_ns of the boot-check time last observed (each boot counts once)
        self.boot_check_mark = boot_check_mark

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
        m.histograms = {k: {"counts": list(h["counts"]), "sum": float(h["sum"])}
                        for k, h in doc.get("histograms", {}).items()}
        m.boot_check_mark = doc.get("boot_check_mark")
        return m

    def note_failure(self, reason: str) -> None:
        """Count one failed attempt under ``reason`` (an error's type name); a name that is
        not an identifier, or a new one once MAX_REASONS are held, counts as ``other``."""
        if not is_reason(reason) or (reason not in self.failure_reasons
                                     and len(self.failure_reasons) >= MAX_REASONS - 1):
            reason = OTHER_REASON
        self.failure_reasons[reason] = min(self.failure_reasons.get(reason, 0) + 1, MAX_SEQ)

    def observe(self, name: str, seconds: float) -> None:
        """Add one duration (s, finite, >= 0; else ignored) to the histogram ``name``."""
        if name not in HISTOGRAMS or not 0 <= seconds < MAX_DURATION:  # (also NaN)
            return
        h = self.histograms.setdefault(name, {"counts": [0] * (len(BUCKETS) + 1), "sum": 0.0})
        i = next((i for i, le in enumerate(BUCKETS) if seconds <= le), len(BUCKETS))
        h["counts"][i] = min(h["counts"][i] + 1, MAX_COUNT)
        h["sum"] = min(h["sum"] + seconds, MAX_SUM)

    def note_boot_check(self, sample: tuple[float, int] | None) -> None:
        """Observe the last boot-check's duration (:func:`read_boot_sample`) once: a sample
        whose file time is the one last observed was counted already."""
        if sample is None or sample[1] == self.boot_check_mark:
            return
        self.observe("boot_check_duration_seconds", sample[0])
        self.boot_check_mark = sample[1]

    def to_status(self) -> dict[str, Any]:
        """What goes into status.json."""
        doc: dict[str, Any] = {"counters": self.counters, "last_success": self.last_success,
                               "verification_seconds": self.verification_seconds,
                               "failure_reasons": self.failure_reasons,
                               "histograms": self.histograms}
        if self.verify_s is not None:
            doc["verify_s"] = self.verify_s
        if self.boot_check_mark is not None:
            doc["boot_check_mark"] = self.boot_check_mark
        return doc

    def _buckets(self, name: str) -> tuple[list[tuple[str, int]], int, float]:
        h = self.histograms.get(name) or {"counts": [0] * (len(BUCKETS) + 1), "sum": 0.0}
        cumulative, out = 0, []
        for le, n in zip((*map(_go_float, BUCKETS), "+Inf"), h["counts"], strict=True):
            cumulative += n
            out.append((le, cumulative))
        return out, cumulative, float(h["sum"])

    def prometheus(self, info: dict[str, str] | None = None) -> str:
        """Text exposition format (0.0.4), by prometheus_client from a registry of its own.

        ``info``: the labels of ``modelward_model_info`` (:func:`model_info`); escaped by
        prometheus_client.
        """
        from prometheus_client import CollectorRegistry, generate_latest  # (~0.1 s: here)
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
            Metric,
        )

        metrics = self

        class _Collector:
            def collect(self) -> Iterator[Metric]:
                for name, help_, key in _COUNTER_ROWS:
                    yield CounterMetricFamily(f"{name}_total", help_,
                                              value=metrics.counters.get(key, 0))
                yield GaugeMetricFamily("modelward_last_success_timestamp_seconds",
                                        "Unix time of the last successful update attempt.",
                                        value=metrics.last_success)
                yield GaugeMetricFamily(
                    "modelward_verification_seconds",
                    "Extraction, fingerprint and health check of the last install.",
                    value=metrics.verification_seconds)
                for h in HISTOGRAMS:
                    buckets, _, total = metrics._buckets(h)
                    yield HistogramMetricFamily(f"modelward_{h}", _HISTOGRAM_HELP[h],
                                                buckets=buckets, sum_value=total)
                if info is not None:
                    yield InfoMetricFamily("modelward_model", "The active model.",
                                           value=info)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector())
        return generate_latest(registry).decode()

    def prometheus_lean(self, info: dict[str, str] | None = None) -> str:
        """The same text as :meth:`prometheus`, without prometheus_client (it imports
        inspect, ast and shutil): for the boot path (issue 15). A test holds the two equal."""
        out: list[str] = []

        def family(name: str, kind: str, help_: str, samples: list[str]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        for name, help_, key in _COUNTER_ROWS:
            family(f"{name}_total", "counter", help_,
                   [f"{name}_total {_go_float(self.counters.get(key, 0))}"])
        family("modelward_last_success_timestamp_seconds", "gauge",
               "Unix time of the last successful update attempt.",
               [f"modelward_last_success_timestamp_seconds {_go_float(self.last_success)}"])
        family("modelward_verification_seconds", "gauge",
               "Extraction, fingerprint and health check of the last install.",
               [f"modelward_verification_seconds {_go_float(self.verification_seconds)}"])
        for h in HISTOGRAMS:
            n = f"modelward_{h}"
            buckets, count, total = self._buckets(h)
            family(n, "histogram", _HISTOGRAM_HELP[h],
                   [f'{n}_bucket{{le="{le}"}} {_go_float(c)}' for le, c in buckets]
                   + [f"{n}_count {_go_float(count)}", f"{n}_sum {_go_float(total)}"])
        if info is not None:
            labels = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(info.items()))
            family("modelward_model_info", "gauge", "The active model.",
                   [f"modelward_model_info{{{labels}}} 1.0"])
        return "\n".join(out) + "\n"

    def write_textfile(self, path: Path, info: dict[str, str] | None = None,
                       lean: bool = False) -> bool:
        """Atomically replace the node_exporter textfile; a failure (a read-only or missing
        directory, a full disk) is one warning, never an error: metrics are not part of an
        install. ``lean``: without prometheus_client (the boot path). Returns whether it
        was written."""
        try:
            text = self.prometheus_lean(info) if lean else self.prometheus(info)
        except ImportError as e:  # (a device installed without [device]: the same text)
            logger.warning("metrics textfile written without prometheus_client: %s", e)
            text = self.prometheus_lean(info)
        try:
            write_atomic(path, text.encode())
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
                 boot_check_s: float | None = None,
                 rejected: list[dict[str, str]] | None = None,
                 audit: dict[str, Any] | None = None,
                 provenance: str | None = None) -> dict[str, Any]:
    """The status report a device publishes (then signs).

    Args:
        seq: its sequence number, already persisted (:func:`advance_sequence`).
        now: when it is signed (seconds since the epoch).
        poll_interval: the device's poll interval in seconds: the operator calls a report
            older than three of them stale.
        model, channel: the model and release channel this device follows (its config).
        boot_check_s: how long the last boot-check took (:func:`read_boot_seconds`).
        rejected: the releases this device refuses now (:func:`rejected_releases`);
            None: the field is left out (an older report).
        audit: the audit log's head ``{seq, hash}`` (``modelward.trust._audit``), so the
            signature binds it; None: left out (the log cannot be read).
        provenance: ``sha256:<hex>`` of the active model's provenance attestation
            (:func:`active_provenance`); None: left out (none, or no model).
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
    if rejected is not None:
        report["rejected"] = rejected[:MAX_REJECTED]
    if audit is not None:
        report["audit"] = audit
    if provenance is not None:
        report["provenance"] = {"digest": provenance}
    return report


def active_provenance(state_dir: Path, record: TrustRecord | None) -> str | None:
    """``sha256:<hex>`` of the provenance attestation the active slot's manifest lists
    (the manifest the slot fingerprint covers, which boot-check verifies), or None: no
    active model, no attestation, or a manifest that cannot be read plainly."""
    from modelward.trust._bounded import read_bounded
    from modelward.trust.errors import ModelwardError
    from modelward.updater.bundle._bundle import MANIFEST, MAX_MANIFEST_BYTES, parse_manifest
    from modelward.updater.install._statedir import plain_dir

    if record is None or record.active is None:
        return None
    try:
        slot = plain_dir(state_dir, f"slots/{record.active.slot}")
        data = read_bounded(slot / MANIFEST, MAX_MANIFEST_BYTES, single_link=True,
                            parent_nofollow=True)
        if data is None:
            return None
        m = parse_manifest(data, str(slot))
    except (OSError, ValueError, ModelwardError) as e:  # (a report goes out regardless)
        logger.warning("status report without the provenance digest: %s", e)
        return None
    sha = next((f.sha256 for f in m.files if f.path == m.provenance_attestation), None)
    return f"sha256:{sha}" if m.provenance_attestation and sha else None


def rejected_releases(entries: Iterable[Any], now: float) -> list[dict[str, str]]:
    """``rejected`` of the report (pure): the releases the remembered rejections
    (``modelward.updater.install._rejections.Rejection``) refuse at ``now``, newest first,
    each once, at most MAX_REJECTED, names and versions cut to MAX_REJECTED_TEXT."""
    out: list[dict[str, str]] = []
    for r in sorted(entries, key=lambda r: -r.at):
        if not (r.refuses_release and r.live(now)):
            continue
        item = {"model": r.model[:MAX_REJECTED_TEXT], "version": r.version[:MAX_REJECTED_TEXT]}
        if item not in out:
            out.append(item)
        if len(out) == MAX_REJECTED:
            break
    return out


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


def read_boot_sample(state_dir: Path) -> tuple[float, int] | None:
    """The last boot-check's duration and its file's st_mtime_ns (each boot-check replaces
    the file: a new time is a new boot), or None if absent or not a plain number of
    seconds in [0, MAX_DURATION) (never follows a link, never blocks, reads a few bytes)."""
    path = state_dir / BOOT_SECONDS_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
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
    return (value, st.st_mtime_ns) if value < MAX_DURATION else None


def read_boot_seconds(state_dir: Path) -> float | None:
    """The last boot-check's duration (:func:`read_boot_sample`), or None."""
    sample = read_boot_sample(state_dir)
    return None if sample is None else sample[0]


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
