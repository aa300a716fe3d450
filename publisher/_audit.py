"""``fleet audit``: a device's audit log checked against the head it signed (issue 18).

The device's TPM identity key signs the audit head ``{seq, hash}`` into each status
report; ``fleet status`` keeps the newest report it accepted of each device in
``fleet_dir/reports/<id>.json`` (only one with a higher sequence number than any seen
before replaces it, so a replayed older report never moves it back). ``fleet audit``
reads an exported log (a copy of the device's ``state_dir/audit/`` or its ``live.jsonl``
with the ``checkpoint.json``), verifies the checkpoint's signature, the chain and its
sequence, and that the log reaches that signed head with the same hash; the first bad
entry is named (:class:`~modelward.trust.errors.AuditError` ``seq``, ``line``).

The chain logic is pure (``modelward.trust._auditchain.verify_audit``, re-exported here);
this module does the operator's file I/O, all bounded.
"""

from __future__ import annotations

from pathlib import Path

from modelward.publisher._report_schema import ReportSchemaError, check_report
from modelward.publisher.errors import OperatorInputError
from modelward.trust._atomic import write_atomic
from modelward.trust._auditchain import (
    MAX_CHECKPOINT_BYTES,
    MAX_LINE_BYTES,
    MAX_VERIFY_ENTRIES,
    AuditHistory,
    Head,
    split_lines,
    verify_segments,
)
from modelward.trust._auditchain import verify_audit as verify_audit
from modelward.trust._auditview import format_history as format_history
from modelward.trust._auditview import history_json as history_json
from modelward.trust._auditview import history_text as history_text
from modelward.trust._bounded import read_bounded
from modelward.trust._report import MAX_REPORT_BYTES, ReportSignatureError, verify_report
from modelward.trust.errors import AuditError

__all__ = ["AuditError", "AuditHistory", "audit_device", "format_history", "history_json",
           "keep_report", "verify_audit"]

#: an exported segment: the live one is at most 2 x 256 KiB by default; this leaves room
#: for devices configured larger, and bounds what one command reads
MAX_LOG_BYTES = min(MAX_VERIFY_ENTRIES * (MAX_LINE_BYTES + 1), 16 * 1024 * 1024)


def _report_path(fleet_dir: Path, device: str) -> Path:
    return fleet_dir / "reports" / f"{device}.json"


def keep_report(fleet_dir: Path, device: str, payload: bytes) -> None:
    """Keep ``payload`` (a verified report, newer than any seen) as the device's newest."""
    write_atomic(_report_path(fleet_dir, device), payload[:MAX_REPORT_BYTES])


def _read(path: Path, limit: int, what: str) -> bytes:
    try:
        data = read_bounded(path, limit)
    except OSError as e:  # (UnsafeFileError: a symlink, not a file, over the bound)
        raise OperatorInputError(f"cannot read {what} {path}: {e}") from e
    if data is None:
        raise OperatorInputError(f"{what} {path} does not exist")
    return data


def signed_head(fleet_dir: Path, device: str, status: Path | None = None) -> tuple[Head, str]:
    """The audit head of the device's newest accepted report (or of ``status``), verified
    with its enrolled key, and when that report was signed.

    Raises:
        OperatorInputError: the device is not enrolled, or no report is kept.
        AuditError: the report does not verify, or carries no audit head.
    """
    pem = enrolled_pem(fleet_dir, device)
    path = status or _report_path(fleet_dir, device)
    if status is None and not path.exists():
        raise OperatorInputError(f"no signed status report of {device} is kept in {fleet_dir}",
                                 hint="run `fleet status` first (it keeps each device's "
                                 "newest report), or give one with --status")
    payload = _read(path, MAX_REPORT_BYTES, "status report")
    try:
        report = check_report(verify_report(payload, pem, device))
    except (ReportSignatureError, ReportSchemaError) as e:
        raise AuditError(f"the status report {path} cannot vouch for the log: {e}",
                         seq=None, line=0, reason="report") from e
    if "audit" not in report:
        raise AuditError(f"the status report {path} (seq {report.get('seq')}) carries no "
                         "audit head (a device of an older version)", seq=None, line=0,
                         reason="no-head")
    return Head.from_json(report["audit"]), str(report.get("at", ""))


def read_exported(log: Path, checkpoint: Path | None = None
                  ) -> list[tuple[list[bytes], bytes | None, str]]:
    """The segments of an exported log, oldest first, each ``(lines, checkpoint, name)``:
    ``log`` is a copy of the audit directory (``old.jsonl`` with ``old-checkpoint.json``
    if the device kept an older segment, then ``live.jsonl`` with ``checkpoint.json``) or
    one ``live.jsonl`` file (its checkpoint given with ``checkpoint``).

    Raises:
        OperatorInputError: missing, a symlink, or over the bounds.
    """
    if log.is_dir() and not log.is_symlink():
        out: list[tuple[list[bytes], bytes | None, str]] = []
        old = log / "old.jsonl"
        if old.exists() and checkpoint is None:
            old_cp = log / "old-checkpoint.json"
            out.append((split_lines(_read(old, MAX_LOG_BYTES, "audit log")),
                        _read(old_cp, MAX_CHECKPOINT_BYTES, "audit checkpoint")
                        if old_cp.exists() else None, "old.jsonl"))
        live = log / "live.jsonl"
        data = _read(live, MAX_LOG_BYTES, "audit log") if live.exists() else b""
        cp = checkpoint or (log / "checkpoint.json")
        cp_data = _read(cp, MAX_CHECKPOINT_BYTES, "audit checkpoint") if cp.exists() else None
        return [*out, (split_lines(data), cp_data, "")]
    data = _read(log, MAX_LOG_BYTES, "audit log")
    cp_data = _read(checkpoint, MAX_CHECKPOINT_BYTES, "audit checkpoint") if checkpoint else None
    return [(split_lines(data), cp_data, "")]


def parse_head(text: str) -> Head:
    """``--head SEQ:HASH`` (the ``audit`` of a verified ``fleet attest --json`` answer).

    Raises:
        OperatorInputError: not a sequence number and 64 hex digits.
    """
    seq, _, digest = text.partition(":")
    try:
        return Head.from_json({"seq": int(seq) if seq.isascii() and seq.isdigit() else None,
                               "hash": digest})
    except AuditError as e:
        raise OperatorInputError(f"--head {text[:100]!r} is not SEQ:HASH (64 hex digits)",
                                 hint="take it from `fleet attest --json` (release.audit)"
                                 ) from e


def audit_device(fleet_dir: Path, device: str, log: Path, *, checkpoint: Path | None = None,
                 status: Path | None = None, allow_tail: bool = False,
                 head: Head | None = None) -> AuditHistory:
    """``fleet audit --device ID --log FILE``: the verified history.

    Raises:
        OperatorInputError: missing or unreadable inputs.
        AuditError: the log does not verify (the first bad entry named).
    """
    if head is None:
        head, _at = signed_head(fleet_dir, device, status)
    segments = read_exported(log, checkpoint)
    return verify_segments(segments, head, enrolled_pem(fleet_dir, device),
                           allow_tail=allow_tail)


def enrolled_pem(fleet_dir: Path, device: str) -> bytes:
    """The device's enrolled identity key (PEM).

    Raises:
        OperatorInputError: not enrolled, or unreadable.
    """
    return _read(fleet_dir / "devices" / f"{device}.pem", 16 * 1024, "enrolled key")
