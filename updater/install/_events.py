"""Which model events go to the audit trail, and with which fields (issue 18 "Audit
trail"). One call per event at the place it happens; :func:`record` never raises (a
failing audit append must not stop the model serving or break the journal)."""

from __future__ import annotations

from pathlib import Path

from modelward.trust._audit import append_event
from modelward.trust._auditchain import (
    DOWNLOAD_REFUSED,
    HEALTH_CHECK_FAILED,
    ROLLBACK_REFUSED,
)
from modelward.trust._record import ModelRef
from modelward.trust._tpm import TpmInterface
from modelward.trust.errors import UntrustedRemoteError
from modelward.updater.errors import HealthCheckError, RollbackError, StagedFilesChangedError


def refusal_kind(e: BaseException) -> str | None:
    """The audit kind of a failed attempt (None: not a refusal, e.g. the network)."""
    if isinstance(e, RollbackError):
        return ROLLBACK_REFUSED
    if isinstance(e, HealthCheckError):
        return HEALTH_CHECK_FAILED
    if isinstance(e, UntrustedRemoteError | StagedFilesChangedError):
        return DOWNLOAD_REFUSED
    return None


def ref_fields(ref: ModelRef | None) -> dict[str, str]:
    """A model's audit fields."""
    if ref is None:
        return {}
    return {"model": ref.name, "version": ref.version, "fingerprint": ref.fingerprint,
            "slot": ref.slot}


def reason(e: BaseException) -> str:
    """``Type: message`` (cut in the entry)."""
    return f"{type(e).__name__}: {e}"


def record(state_dir: Path, tpm: TpmInterface | None, kind: str, **fields: object) -> bool:
    """Append one event; the TPM identity key signs a checkpoint if the log rotates."""
    return append_event(state_dir, kind, fields, signer=tpm.sign if tpm is not None else None)
