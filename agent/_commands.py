"""The device commands: provision, update, status, boot-check."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelward.agent._lock import BOOT_WAIT, device_lock, holder
from modelward.agent._observe import (
    Metrics,
    active_provenance,
    advance_sequence,
    build_report,
    model_info,
    notify_activation,
    read_boot_sample,
    read_boot_seconds,
    rejected_releases,
    write_boot_seconds,
)
from modelward.agent._owner import check_state_owner
from modelward.agent._status import (
    MAX_STATUS_BYTES,
    clean_status,
    read_status,
    sealed_status,
    verified_status,
)
from modelward.trust._atomic import write_atomic
from modelward.trust._auditchain import FALLBACK, NOTHING_TRUSTED
from modelward.trust._bounded import read_json_file
from modelward.trust._measure import BOOT_CHECK as MEASURED_BOOT_CHECK
from modelward.trust._measure import FALLBACK as MEASURED_FALLBACK
from modelward.trust._measure import NOTHING_TRUSTED as MEASURED_NOTHING
from modelward.trust._measure import measure
from modelward.trust._record import ModelRef, TrustRecord
from modelward.trust._store import TrustStore
from modelward.trust._tpm import Tpm, TpmInterface
from modelward.trust.errors import (
    ModelwardError,
    OperatorInputError,
    RootAnchorError,
    TpmUnavailableError,
    TransportError,
    TrustFileUnreadableError,
    TrustRecordError,
)
from modelward.updater.errors import (
    BundleFormatError,
    FingerprintMismatchError,
    HealthCheckError,
    MetadataError,
    NothingTrustedError,
    TargetHashError,
    TrustStateLostError,
)
from modelward.updater.install import _events as events
from modelward.updater.install._boot import BootResult, boot_check
from modelward.updater.install._journal import Journal

if TYPE_CHECKING:  # (imported where used: `agent boot-check` loads neither, issue 15)
    from modelward.agent._config import AgentConfig
    from modelward.agent._config_rules import BootConfig
    from modelward.trust._auditchain import AuditHistory
    from modelward.trust._provision import ProvisionReport
    from modelward.updater.idle import Gate
    from modelward.updater.install._install import UpdateResult

logger = logging.getLogger("modelward.agent")


def _model_extra(ref: ModelRef | None) -> dict[str, str]:
    if ref is None:
        return {}
    return {"model": ref.name, "version": ref.version, "fingerprint": ref.fingerprint}


class StatusFile:
    """``state_dir/status.json``: last result, last error, last activation and counters,
    MACed by the TPM for its update counter (``modelward.agent._status``)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "status.json"

    def read(self, tpm: TpmInterface | None = None) -> dict[str, Any]:
        """The stored status, with only the known fields of the expected types.

        With ``tpm``: only if its MAC verifies for the TPM's update counter now (else empty,
        logged). Without: unauthenticated, for display only (the disk may have written
        anything there).
        """
        if tpm is None:
            return read_status(self.path)
        try:
            raw = read_json_file(self.path, MAX_STATUS_BYTES, max_depth=4)
            doc, why = verified_status(raw, tpm.read_counter(), tpm.mac_ok)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # UnsafeFileError, UntrustedJsonError
            doc, why = {}, str(e)
        if why:
            logger.warning("not believing %s: %s", self.path, why)
        return doc

    def write(self, doc: dict[str, Any], tpm: TpmInterface | None = None) -> None:
        """Replace it atomically (a directory planted there is removed first), MACed when
        ``tpm`` is given (without, no reader that matters believes it).

        Raises:
            StateDirError: a directory there cannot be removed.
        """
        from modelward.updater.install._statedir import clear_for_file

        out = sealed_status(doc, tpm.read_counter(), tpm.mac) if tpm is not None else doc
        clear_for_file(self.path)
        write_atomic(self.path, json.dumps(out, indent=1).encode())

    def record(
        self, *, error: ModelwardError | None, result: str | None, error_type: str = "",
        tpm: TpmInterface | None = None,
    ) -> None:
        """Store the outcome of a command; ``error_type`` names an event that is no exception."""
        doc = self.read(tpm)
        _note(doc, error=error, result=result, error_type=error_type)
        self.write(doc, tpm)


#: The status this process wrote last, per state directory (its own attempt's outcome):
#: what the signed report says, since an older MACed copy of status.json from the same
#: counter value could have been put back meanwhile. Absent: this process ran no attempt
#: (then only a verified file counts).
_own_status: dict[Path, dict[str, Any]] = {}


def _note(doc: dict[str, Any], *, error: ModelwardError | None, result: str | None,
          error_type: str = "") -> None:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    if error is not None or error_type:
        doc["last_error"] = {
            "type": error_type or type(error).__name__,
            "message": str(error) if error is not None else result,
            "at": now,
        }
    else:
        doc["last_result"] = {"message": result, "at": now}
        doc["last_error"] = None


def open_store(cfg: AgentConfig | BootConfig) -> TrustStore:
    """The device trust store on its TPM."""
    return TrustStore(cfg.state_dir, Tpm(cfg.tcti))


def provision(cfg: AgentConfig, root: Path, *, keep_identity: bool = False) -> ProvisionReport:
    """``agent provision``: TPM objects and root anchor (idempotent; migrates old devices)."""
    check_state_owner(cfg.state_dir, "agent provision")  # (before the TPM is touched)
    try:
        root_bytes = root.read_bytes()
    except OSError as e:
        raise OperatorInputError(f"cannot read root metadata {root}: {e}") from e
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    with device_lock(cfg.state_dir, "agent provision"):  # refused while another runs
        store = open_store(cfg)
        try:
            report = store.provision(root_bytes, str(root), keep_identity=keep_identity)
        finally:
            store.tpm.close()
    logger.info(
        "provisioned TPM at %s", cfg.tcti,
        extra={"tcti": cfg.tcti, "srk_created": report.srk_created,
               "identity_created": report.identity_created},
    )
    return report


def update(cfg: AgentConfig, gate: Gate | None = None,
           on_step: Callable[[str], None] = lambda s: None, *,
           source_dir: Path | None = None,
           expired_grace: timedelta | None = None) -> UpdateResult:
    """``agent update --once``: one update attempt.

    The outcome, the counters and the activation notice go to status.json and the
    Prometheus textfile. The whole attempt holds the device lock (``agent._lock``).

    ``source_dir`` (``--from DIR``): the repository snapshot on a medium
    (``repo export``) instead of the configured transports, verified the same way; no
    network is used. ``expired_grace`` (``--expired-grace``, only with ``source_dir``):
    metadata expired less than that long ago is accepted.

    Raises:
        DeviceBusyError: another device command is running; nothing was touched.
    """
    check_state_owner(cfg.state_dir, "agent update")
    if expired_grace is not None and source_dir is None:
        raise OperatorInputError("--expired-grace goes with --from DIR (a medium) only",
                                 hint="over the network, expired metadata is always "
                                 "refused")
    with device_lock(cfg.state_dir, "agent update"):
        return _update_locked(cfg, gate, on_step, source_dir, expired_grace)


def _update_locked(cfg: AgentConfig, gate: Gate | None, on_step: Callable[[str], None],
                   source_dir: Path | None = None,
                   expired_grace: timedelta | None = None) -> UpdateResult:
    from modelward.updater.install._install import Outcome

    status = StatusFile(cfg.state_dir)
    doc: dict[str, Any] = {}
    metrics = Metrics()
    marks: dict[str, float] = {}

    def step(name: str) -> None:
        marks[name] = time.monotonic()
        logger.debug("step %s", name, extra={"step": name})
        on_step(name)

    fetched: list[int] = []
    store: TrustStore | None = None
    try:
        try:
            store = open_store(cfg)
            doc = status.read(store.tpm)
            metrics = Metrics.from_status(doc)
            metrics.counters["attempts"] += 1
            metrics.note_boot_check(read_boot_sample(cfg.state_dir))
            if source_dir is not None:
                result = _update_from(cfg, store, gate, step, fetched, source_dir,
                                      expired_grace)
            else:
                result = _update_with_fallback(cfg, store, gate, step, fetched)
        except ModelwardError as e:
            if store is None:
                metrics.counters["attempts"] += 1
            # not logged here: the caller that handles it reports it, once (the CLI's
            # error line, the daemon child's "update failed" record)
            metrics.counters["failures"] += 1
            metrics.note_failure(type(e).__name__)
            if isinstance(e, MetadataError):
                metrics.counters["signature_failures"] += 1
            elif isinstance(e, _REJECTED):
                metrics.counters["verification_failures"] += 1
            metrics.counters["bytes_fetched"] += sum(fetched)
            _note(doc, error=e, result=None)
            try:
                _save(cfg, status, doc, metrics, store, _active_or_none(store))
            except OSError as se:  # a full disk must not hide the reason
                logger.error("cannot write status.json: %s", se)
            raise
        metrics.counters["bytes_fetched"] += sum(fetched)
        metrics.last_success = time.time()
        logger.info(result.message, extra={"outcome": result.outcome.value,
                                           **_model_extra(result.active)})
        _note(doc, error=None, result=result.message)
        if result.outcome is Outcome.INSTALLED and result.active is not None:
            metrics.counters["installed"] += 1
            if "staged" in marks and "health-checked" in marks:
                metrics.verification_seconds = round(
                    marks["health-checked"] - marks["staged"], 3)
            if "downloading" in marks and "health-checked" in marks:
                metrics.verify_s = round(marks["health-checked"] - marks["downloading"], 3)
                metrics.observe("verification_duration_seconds", metrics.verify_s)
            doc["last_activation"] = notify_activation(cfg.activation, cfg.state_dir,
                                                       result.active)
        _save(cfg, status, doc, metrics, store, result.active)
        return result
    finally:
        if store is not None:
            store.tpm.close()


_REJECTED = (TargetHashError, BundleFormatError, FingerprintMismatchError, HealthCheckError)


def _active_or_none(store: TrustStore | None) -> ModelRef | None:
    """The trusted record's active model, for the metrics' model_info (None if there is
    none, or the record does not load: the error being reported says why)."""
    if store is None:
        return None
    try:
        return store.load(repair=False).active
    except ModelwardError:
        return None


def _save(cfg: AgentConfig | BootConfig, status: StatusFile, doc: dict[str, Any], metrics: Metrics,
          store: TrustStore | None, active: ModelRef | None = None, lean: bool = False) -> None:
    """Write status.json (MACed if the TPM answers) and the metrics (``active``: the model
    for modelward_model_info; ``lean``: without prometheus_client, the boot path); what was
    written is this process's own status (:data:`_own_status`)."""
    doc.update(metrics.to_status())
    _own_status[cfg.state_dir] = clean_status(doc)
    tpm = store.tpm if store is not None else None
    try:
        status.write(doc, tpm)
    except ModelwardError as e:  # (the TPM stopped answering: no MAC, not believed later)
        if tpm is None:
            raise
        logger.error("cannot MAC status.json, written without: %s", e)
        status.write(doc)
    updater = getattr(cfg, "updater", None)  # (BootConfig has no channel: "")
    metrics.write_textfile(cfg.metrics_textfile or cfg.state_dir / "metrics.prom",
                           model_info(active, getattr(updater, "channel", None)), lean=lean)


def make_gate(cfg: AgentConfig, stop: threading.Event | None = None,
              heartbeat: Callable[[], None] = lambda: None) -> Gate:
    """The idle gate for the configured ``[idle]`` signals."""
    from modelward.updater.idle import (
        BusyFileSignal,
        CpuIdleSignal,
        Gate,
        IdleSignal,
        LoadSignal,
        MainsPowerSignal,
        MaintenanceWindowSignal,
        TimeRange,
    )

    i = cfg.idle
    signals: list[IdleSignal] = []
    if i.busy_file is not None:
        signals.append(BusyFileSignal(i.busy_file, i.max_queue_depth, i.busy_stale_after))
    if i.min_cpu_idle is not None:
        signals.append(CpuIdleSignal(i.min_cpu_idle, i.cpu_window))
    if i.max_load is not None:
        signals.append(LoadSignal(i.max_load))
    if i.require_mains:
        signals.append(MainsPowerSignal())
    if i.windows:
        signals.append(MaintenanceWindowSignal([TimeRange.parse(w) for w in i.windows]))
    return Gate(signals, poll=i.poll, stop=stop, heartbeat=heartbeat)


def _update_with_fallback(cfg: AgentConfig, store: TrustStore, gate: Gate | None,
                          on_step: Callable[[str], None], fetched: list[int]) -> UpdateResult:
    from modelward.updater.install._install import open_source, update_once

    order = cfg.updater.transports
    journal = Journal(cfg.state_dir / "journal.json", kill_at=cfg.test_kill_at)
    gate = gate or make_gate(cfg)
    for i, name in enumerate(order):
        source = open_source(cfg.updater, name)
        try:
            return update_once(
                cfg.updater, store, source, journal=journal, gate=gate, on_step=on_step,
            )
        except TransportError as e:
            if i + 1 == len(order):
                raise
            logger.warning("%s transport failed (%s); trying %s", name, e, order[i + 1],
                           extra={"transport": name})
        finally:
            fetched.append(source.fetcher.bytes_received)
            source.close()
    raise AssertionError("no transport configured")  # load_config guarantees one


def _update_from(cfg: AgentConfig, store: TrustStore, gate: Gate | None,
                 on_step: Callable[[str], None], fetched: list[int], source_dir: Path,
                 expired_grace: timedelta | None) -> UpdateResult:
    """One attempt from the repository snapshot at ``source_dir`` (no transport)."""
    from modelward.updater.install._install import open_local_source, update_once

    source = open_local_source(source_dir, expired_grace)
    logger.info("updating from the medium at %s", source_dir,
                extra={"transport": source.name})
    try:
        return update_once(cfg.updater, store, source,
                           journal=Journal(cfg.state_dir / "journal.json",
                                           kill_at=cfg.test_kill_at),
                           gate=gate or make_gate(cfg), on_step=on_step)
    finally:
        fetched.append(source.fetcher.bytes_received)
        source.close()


def status(cfg: AgentConfig, *, use_tpm: bool = True) -> dict[str, Any]:
    """``agent status``: active and previous model (verified), the last error and the
    releases this device rejected (``rejected``; ``rejections_problem`` when that file
    cannot be believed). Without a TPM (none at ``cfg.tcti``, or not ``use_tpm``): the
    files as they are on disk, marked unverified (``agent/_status_offline.py``).

    Read-only, and without the device lock: it works while an update runs, changes no
    file (a pending record is left to the commit it belongs to) and then says so
    (``in_progress``: the running command and its pid, as its lock file says; the key
    is there only while one runs)."""
    doc = _status(cfg, use_tpm=use_tpm)
    running = holder(cfg.state_dir)
    if running is not None:
        doc["in_progress"] = {"command": running.command, "pid": running.pid}
    return doc


def _status(cfg: AgentConfig, *, use_tpm: bool) -> dict[str, Any]:
    from modelward.agent._status_offline import unverified_status

    if not use_tpm:
        return unverified_status(cfg, "--no-tpm")
    try:
        store = open_store(cfg)
    except TpmUnavailableError as e:
        return unverified_status(cfg, str(e))
    try:
        record = store.load(repair=False)
        rejected, problem = _rejections(cfg, store)
        last_error = StatusFile(cfg.state_dir).read(store.tpm).get("last_error")
    finally:
        store.tpm.close()

    def ref(r: ModelRef | None) -> dict[str, str] | None:
        return {"name": r.name, "version": r.version, "fingerprint": r.fingerprint} if r else None

    return {
        "verified": True,
        "active": ref(record.active),
        "previous": ref(record.previous),
        "last_error": last_error,
        "rejected": rejected,
        "rejections_problem": problem,
    }


def _rejections(cfg: AgentConfig, store: TrustStore) -> tuple[list[dict[str, Any]], str | None]:
    """The rejections in force (MAC-verified), or why the file cannot be believed."""
    from modelward.updater.install._rejections import RejectionStore

    now = time.time()
    try:
        entries = RejectionStore(cfg.state_dir, store.tpm).load()
    except ModelwardError as e:
        return [], str(e)
    return [{"model": r.model, "version": r.version, "target": r.path,
             "reason": r.reason, "detail": r.detail,
             "at": datetime.fromtimestamp(r.at, UTC).isoformat(timespec="seconds"),
             "retry_after": datetime.fromtimestamp(r.until, UTC).isoformat(timespec="seconds")}
            for r in entries if r.live(now)], None


def enroll(cfg: AgentConfig) -> tuple[str, bytes]:
    """``agent enroll``: the device id and its TPM identity public key (PEM)."""
    tpm = Tpm(cfg.tcti)
    try:
        return cfg.device_id, tpm.identity_public_pem()
    finally:
        tpm.close()


def enrollment(cfg: AgentConfig) -> dict[str, Any]:
    """``agent enroll --json``: the device id, identity key, AK, EK (and certificate) and
    the AK's certification of the identity key (docs/attestation.md "Enrollment").

    Raises:
        TpmNotProvisionedError: no attestation key yet (run `agent provision`).
        TpmError: the TPM failed or an object is not modelward's.
    """
    from modelward.trust import _ak
    from modelward.trust._tpmauth import auth_dir_for

    tpm = Tpm(cfg.tcti)
    tpm.use_auth_dir(auth_dir_for(cfg.state_dir))
    try:
        return _ak.enrollment(tpm, cfg.device_id)
    finally:
        tpm.close()


def attest(cfg: AgentConfig, nonce_hex: str) -> dict[str, Any]:
    """``agent attest --nonce HEX``: the answer ``fleet attest`` gets over MQTT (the AK's
    certification of the measurement register over the nonce, and this boot's events).

    Raises:
        OperatorInputError: the nonce is not 16..64 bytes of hex.
        TpmNotProvisionedError: no register or AK (run `agent provision`).
        LocalDeviceError: nothing measured since the TPM restarted.
    """
    from modelward.trust._measure import attest_hex
    from modelward.trust._tpmauth import auth_dir_for

    tpm = Tpm(cfg.tcti)
    tpm.use_auth_dir(auth_dir_for(cfg.state_dir))
    try:
        return attest_hex(tpm, cfg.state_dir, nonce_hex, cfg.device_id)
    finally:
        tpm.close()


def activate_credential(cfg: AgentConfig, challenge: bytes,
                        source: str = "--challenge") -> bytes:
    """``agent activate-credential``: the response to the operator's challenge.

    Raises:
        OperatorInputError: the challenge is malformed or for another device.
        TpmError: the TPM cannot recover the secret (the challenge was not made for this
            TPM's EK and AK, or was altered).
    """
    import base64
    import binascii

    from modelward.trust import _ak
    from modelward.trust._bounded import UntrustedJsonError, loads_bounded
    from modelward.trust._tpmauth import auth_dir_for

    try:
        doc = loads_bounded(challenge, max_bytes=8192, what="the challenge", max_depth=2)
    except UntrustedJsonError as e:
        raise OperatorInputError(f"{source}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != _ak.CHALLENGE_FORMAT:
        raise OperatorInputError(f"{source} is not a {_ak.CHALLENGE_FORMAT!r} document",
                                 hint="give the file `fleet add-device --challenge` wrote")
    if doc.get("device_id") != cfg.device_id:
        raise OperatorInputError(
            f"{source} is for device {str(doc.get('device_id'))[:64]!r}, not this one "
            f"({cfg.device_id})", hint="answer it on the device it was made for")
    try:
        blob = base64.b64decode(str(doc.get("credential_blob")), validate=True)
        secret = base64.b64decode(str(doc.get("encrypted_secret")), validate=True)
        ak_name = bytes.fromhex(str(doc.get("ak_name")))
    except (binascii.Error, ValueError) as e:
        raise OperatorInputError(f"{source}: a field is not base64/hex: {e}") from e
    tpm = Tpm(cfg.tcti)
    tpm.use_auth_dir(auth_dir_for(cfg.state_dir))
    try:
        out = _ak.activate_credential(tpm, blob, secret, ak_name)
    finally:
        tpm.close()
    logger.info("answered the enrollment challenge for AK %s", ak_name.hex()[:16])
    return json.dumps({"format": _ak.RESPONSE_FORMAT, "device_id": cfg.device_id,
                       "ak_name": ak_name.hex(),
                       "secret": base64.b64encode(out).decode()}).encode() + b"\n"


def signed_report(cfg: AgentConfig, state: str,
                  clock: Callable[[], float] = time.time) -> bytes:
    """This device's status report, signed by its TPM identity key.

    Its sequence number is persisted before it is signed, so no number is ever sent twice
    (trust/_report.py "Freshness").

    Raises:
        ReportSequenceError: the sequence number cannot be persisted.
    """
    tpm = Tpm(cfg.tcti)
    try:
        store = TrustStore(cfg.state_dir, tpm)
        try:
            record: TrustRecord | None = store.load()
        except ModelwardError as e:
            logger.error("status report without a trusted record: %s", e)
            record = None
        now = clock()
        # This process's own attempt, else only a file the TPM's MAC vouches for (never an
        # unauthenticated status.json, nor one from before the last install).
        own = _own_status.get(cfg.state_dir)
        if own is None:
            own = StatusFile(cfg.state_dir).read(tpm)
        from modelward.updater.install._rejections import RejectionStore

        # (MAC-verified by the TPM; a file that cannot be believed counts as empty)
        rejected = rejected_releases(RejectionStore(cfg.state_dir, tpm).entries(), now)
        report = build_report(cfg.device_id, cfg.fleet, record, state, own,
                              seq=advance_sequence(cfg.state_dir, now), now=now,
                              poll_interval=cfg.poll_interval, model=cfg.updater.model,
                              channel=cfg.updater.channel,
                              boot_check_s=read_boot_seconds(cfg.state_dir),
                              rejected=rejected, audit=_audit_head(cfg.state_dir),
                              provenance=active_provenance(cfg.state_dir, record))
        from modelward.trust._report import sign_report  # (the crypto stack: not at boot)

        return sign_report(report, tpm)
    finally:
        tpm.close()


def _audit_head(state_dir: Path) -> dict[str, Any] | None:
    """The audit log's head for the signed report (None, logged, if it cannot be read)."""
    from modelward.trust._audit import AuditLog

    try:
        return AuditLog(state_dir).head().to_json()
    except ModelwardError as e:
        logger.error("status report without the audit head: %s", e)
        return None


def _boot_check_waiting_for_tpm(cfg: AgentConfig | BootConfig,
                                sleep: Callable[[float], None] = time.sleep) -> BootResult:
    """Boot-check, retried while the TPM does not answer, for up to ``cfg.tpm_wait`` s.

    At boot the TPM may come up late (a driver, a resource manager, a swtpm); without it
    nothing can be verified, so the model is not served until it answers.
    """
    deadline = time.monotonic() + cfg.tpm_wait
    told = 0.0
    while True:
        try:
            store = open_store(cfg)
            try:
                result = boot_check(cfg.state_dir, store)
                # (the TPM's word of what this boot verified: `fleet attest`)
                measure(store.tpm, cfg.state_dir, MEASURED_FALLBACK if result.fell_back
                        else MEASURED_BOOT_CHECK, result.active, result.message)
                return result
            finally:
                store.tpm.close()
        except TpmUnavailableError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            if time.monotonic() - told >= 10.0:
                told = time.monotonic()
                logger.warning("TPM unavailable, waiting up to %.0fs more: %s", left, e,
                               extra={"error": type(e).__name__})
            sleep(min(1.0, left))


@contextlib.contextmanager
def _store_or_none(cfg: AgentConfig | BootConfig,
                   skip: bool = False) -> Iterator[TrustStore | None]:
    """The trust store for a status write after boot-check, or None if the TPM does not
    answer (or ``skip``: it just did not); the status is then written without a MAC, and
    not believed later."""
    if skip:  # the TPM just failed: the error that ends the command says so, once
        yield None
        return
    try:
        store = open_store(cfg)
    except ModelwardError as e:
        logger.warning("status.json written without a MAC: %s", e)
        yield None
        return
    try:
        yield store
    finally:
        store.tpm.close()


def run_boot_check(cfg: AgentConfig | BootConfig, wait: float = BOOT_WAIT) -> BootResult:
    """``agent boot-check``: verify ``current`` or fall back (design.md "Boot").

    It waits up to ``wait`` s for a device command that is running (an update mid-commit
    finishes first; then its result is what is checked).

    Raises:
        DeviceBusyError: that command still runs after ``wait`` s; nothing was touched.
    """
    check_state_owner(cfg.state_dir, "agent boot-check")  # (nothing written: not recorded)
    with device_lock(cfg.state_dir, "agent boot-check", wait=wait):
        return _boot_check_locked(cfg)


def _boot_check_locked(cfg: AgentConfig | BootConfig) -> BootResult:
    status = StatusFile(cfg.state_dir)
    started = time.monotonic()
    try:
        try:
            result = _boot_check_waiting_for_tpm(cfg)
            # (the boot latency it added, TPM wait included; telemetry for the next report)
            write_boot_seconds(cfg.state_dir, time.monotonic() - started)
        except (TrustRecordError, RootAnchorError) as e:
            if isinstance(e, TrustFileUnreadableError):
                raise
            # Not believed (older copy, altered, deleted): exit 3 like nothing trusted, so
            # inference does not start; the next update heals from the TPM anchor.
            raise TrustStateLostError(
                f"{e}; nothing is trusted until the next `modelward agent update` heals the "
                "device from its TPM-anchored root (no operator step needed)") from e
    except ModelwardError as e:
        # reported once, by the caller (the CLI's error line or record)
        try:
            with _store_or_none(cfg, skip=isinstance(e, TpmUnavailableError)) as store:
                status.record(error=e, result=None, tpm=store.tpm if store else None)
                if isinstance(e, NothingTrustedError):
                    events.record(cfg.state_dir, store.tpm if store else None,
                                  NOTHING_TRUSTED, reason=events.reason(e))
                    if store is not None:
                        measure(store.tpm, cfg.state_dir, MEASURED_NOTHING, None,
                                events.reason(e))
        except (OSError, ModelwardError) as se:  # the reason must not be hidden
            logger.error("cannot write status.json: %s", se)
        raise
    if result.fell_back:
        logger.warning(result.message, extra={"fallback": True, **_model_extra(result.active)})
        with _store_or_none(cfg) as store:
            doc = status.read(store.tpm if store else None)
            metrics = Metrics.from_status(doc)
            metrics.counters["fallbacks"] += 1
            _note(doc, error=None, result=result.message, error_type="ActiveModelAltered")
            _save(cfg, status, doc, metrics, store, result.active, lean=True)
            events.record(cfg.state_dir, store.tpm if store else None, FALLBACK,
                          **events.ref_fields(result.active), reason=result.message)
    else:
        logger.info(result.message, extra=_model_extra(result.active))
    return result


def audit_history(cfg: AgentConfig) -> AuditHistory:
    """``agent audit``: this device's audit log, its chain and checkpoint verified with the
    TPM identity key (nothing signed vouches for its end here: that is ``fleet audit``).

    Raises:
        AuditLogError: the audit directory or a file in it is a symlink, or damaged.
        AuditError: the log on disk does not verify (the first bad entry named).
    """
    from modelward.trust._audit import AuditLog
    from modelward.trust._auditchain import verify_segments

    segments = AuditLog(cfg.state_dir).segments()
    tpm = Tpm(cfg.tcti)
    try:
        TrustStore(cfg.state_dir, tpm)  # (the objects' auth value, as every command)
        pem = tpm.identity_public_pem()
    finally:
        tpm.close()
    return verify_segments(segments, None, pem, allow_tail=True)
