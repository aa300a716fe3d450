"""Which model events go to the audit trail, and with which fields (issue 18 "Audit
trail"). One call per event at the place it happens; :func:`record` never raises (a
failing audit append must not stop the model serving or break the journal)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from modelward.trust._audit import append_event
from modelward.trust._auditchain import (
    DOWNLOAD_REFUSED,
    HEALTH_CHECK_FAILED,
    POLICY_FETCH_FAILED,
    ROLLBACK_REFUSED,
)
from modelward.trust._record import ModelRef
from modelward.trust._tpm import TpmInterface
from modelward.trust.errors import UntrustedRemoteError
from modelward.updater.errors import (
    HealthCheckError,
    PolicyUnavailableError,
    RollbackError,
    StagedFilesChangedError,
)


def refusal_kind(e: BaseException) -> str | None:
    """The audit kind of a failed attempt (None: not a refusal, e.g. the network)."""
    if isinstance(e, RollbackError):
        return ROLLBACK_REFUSED
    if isinstance(e, HealthCheckError):
        return HEALTH_CHECK_FAILED
    if isinstance(e, PolicyUnavailableError):  # (before the release's own refusals)
        return POLICY_FETCH_FAILED
    if isinstance(e, UntrustedRemoteError | StagedFilesChangedError):
        return DOWNLOAD_REFUSED
    return None


def failure_fields(e: BaseException, attempt: Mapping[str, str],
                   model: str) -> dict[str, str | None]:
    """The audit fields of a failed attempt of the device's ``model``: the release it
    chose (``attempt``, if it got that far), or, when the provenance policy could not be
    taken, the policy's target (the release is not at fault and is not named)."""
    if isinstance(e, PolicyUnavailableError):
        return {"model": model, "target": e.path or None, "reason": reason(e)}
    return {"model": attempt.get("model", model), "version": attempt.get("version"),
            "fingerprint": attempt.get("fingerprint"), "target": attempt.get("target"),
            "reason": reason(e)}


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
