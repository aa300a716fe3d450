"""The update state machine: refresh → pick → download → extract → verify → health → commit.

Decisions (which target, whether it is newer, which slot) are plain functions;
``update_once`` is the thin I/O around them. The boot path (``boot_check``, ``reconcile``)
lives in ``updater.install._boot``, which imports nothing of the network or TUF.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import logging
import queue
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile

from modelward.trust import _auditchain as _audit
from modelward.trust._fingerprint import FileEntry, directory_entries, slot_fingerprint
from modelward.trust._measure import ACTIVATION as MEASURED_ACTIVATION
from modelward.trust._measure import FALLBACK as MEASURED_FALLBACK
from modelward.trust._measure import NOTHING_TRUSTED as MEASURED_NOTHING
from modelward.trust._measure import measure
from modelward.trust._record import ModelRef, TrustRecord
from modelward.trust._store import TrustStore
from modelward.updater._config import UpdaterConfig
from modelward.updater.bundle._bundle import Manifest, extract_bundle, fsync_tree
from modelward.updater.bundle._semver import SemVer
from modelward.updater.errors import (
    FingerprintMismatchError,
    ModelwardError,
    NothingTrustedError,
    OperatorInputError,
    StagedFilesChangedError,
    StagingError,
    TargetHashError,
)
from modelward.updater.idle import Gate
from modelward.updater.install import _delta
from modelward.updater.install import _events as events
from modelward.updater.install._boot import BootResult as BootResult
from modelward.updater.install._boot import boot_check as boot_check
from modelward.updater.install._boot import reconcile, slot_matches
from modelward.updater.install._decrypt import Unlocker, decrypt_incoming
from modelward.updater.install._heal import trusted_record
from modelward.updater.install._health import (
    PendingCheck,
    health_inputs,
    run_health_check,
    start_check,
)
from modelward.updater.install._journal import Journal
from modelward.updater.install._provenance import check_sealed, load_policy
from modelward.updater.install._rejections import RejectionStore
from modelward.updater.install._sealed import SealedFiles, seal_verified
from modelward.updater.install._slots import SlotStore
from modelward.updater.install._stage import Stage, drop_decrypted
from modelward.updater.install._statedir import check_state_dirs, plain_dir
from modelward.updater.install._tuf import Candidate, TufSession, convert_tuf_error
from modelward.updater.plan import check_metadata_not_rolled_back, should_install
from modelward.updater.transport._fetcher import RangeFetcher, RequestsFetcher
from modelward.updater.transport._local import LOCAL_METADATA_URL, LOCAL_TARGETS_URL, LocalFetcher
from modelward.updater.transport._mqtt import MQTT_METADATA_URL, MQTT_TARGETS_URL, MqttFetcher

logger = logging.getLogger(__name__)

_HEX = re.compile(r"[0-9a-f]{32,128}")
_HASHES = {"sha256", "sha384", "sha512", "sha3_256", "sha3_512", "blake2b"}


#: the longest ``--expired-grace`` a medium may be given
MAX_EXPIRED_GRACE = timedelta(days=365)


@dataclass
class Source:
    """One way to reach the repository: a transport and its base URLs.

    Attributes:
        expired_grace: metadata that expired less than this long ago still verifies
            (None: none, the default). Only :func:`open_local_source` sets it: a device
            without a trustworthy clock updating from a medium; never a network source.
    """

    name: str
    fetcher: RangeFetcher
    metadata_url: str
    targets_url: str
    expired_grace: timedelta | None = None

    def close(self) -> None:
        """Release connections."""
        close = getattr(self.fetcher, "close", None)
        if close is not None:
            close()


def open_source(cfg: UpdaterConfig, name: str) -> Source:
    """Build the fetcher for transport ``name`` (no connection is made yet).

    Raises:
        OperatorInputError: the transport is not configured.
    """
    if name == "https" and cfg.https is not None:
        return Source("https", RequestsFetcher(cfg.https), cfg.https.metadata_url,
                      cfg.https.targets_url)
    if name == "mqtt" and cfg.mqtt is not None:
        return Source("mqtt", MqttFetcher(cfg.mqtt), MQTT_METADATA_URL, MQTT_TARGETS_URL)
    raise OperatorInputError(f"transport {name!r} is not configured")


def open_local_source(root: Path, expired_grace: timedelta | None = None) -> Source:
    """The repository snapshot on a medium at ``root`` (``repo export``): verified
    exactly as over the network; ``expired_grace`` as :attr:`Source.expired_grace`.

    Raises:
        OperatorInputError: ``expired_grace`` is negative or over
            :data:`MAX_EXPIRED_GRACE`.
    """
    if expired_grace is not None and not timedelta(0) <= expired_grace <= MAX_EXPIRED_GRACE:
        raise OperatorInputError(
            f"--expired-grace {expired_grace}: at most {MAX_EXPIRED_GRACE.days} days",
            hint="give a duration such as 30d (or none: expired metadata is refused)")
    return Source("medium", LocalFetcher(root), LOCAL_METADATA_URL, LOCAL_TARGETS_URL,
                  expired_grace or None)


class Outcome(enum.Enum):
    """How an update attempt ended (errors are raised instead)."""

    INSTALLED = "installed"
    UP_TO_DATE = "up-to-date"


@dataclass(frozen=True)
class UpdateResult:
    """Result of :func:`update_once`."""

    outcome: Outcome
    message: str
    active: ModelRef | None
    timestamp_version: int | None = None  # the timestamp this attempt verified




class _Device:
    """Paths of one device's state directory."""

    def __init__(self, state_dir: Path) -> None:
        check_state_dirs(state_dir)  # nothing is read or written through a symlink
        self.metadata = state_dir / "metadata"
        self.staging = state_dir / "staging"
        self.slots = SlotStore(state_dir)


def _check_target(target: TargetFile, max_bytes: int) -> None:
    unknown = set(target.hashes) - _HASHES
    if unknown or not target.hashes:
        raise TargetHashError(
            f"target {target.path}: unsupported hash algorithms {sorted(unknown)}",
            target=target.path,
        )
    # A digest names the stage's files (staging/<sha256>.part): signed is not enough, a
    # delegated key could sign "../../x" (python-tuf does not check that it is hex).
    bad = sorted(alg for alg, d in target.hashes.items() if not _HEX.fullmatch(d))
    if bad:
        raise TargetHashError(
            f"target {target.path}: the {', '.join(bad)} digest is not lowercase hex",
            target=target.path,
        )
    if target.length > max_bytes:
        raise TargetHashError(
            f"target {target.path} is {target.length} bytes, over the device limit {max_bytes}",
            target=target.path,
        )


class _Hasher:
    """The target's TUF hashes, computed in a thread of their own.

    hashlib releases the GIL, so the download loop only receives while this thread
    hashes the bundle and the extraction thread hashes and writes its members: on two
    cores, the receive loop was the bottleneck with the hash in it.
    """

    def __init__(self, algs: Iterable[str]) -> None:
        self._hashers = {alg: hashlib.new(alg) for alg in algs}
        self._q: queue.Queue[bytes | memoryview | None] = queue.Queue(_Pipe.depth)
        self._thread = threading.Thread(target=self._run, name="hash", daemon=True)
        self._thread.start()
        self._digests: dict[str, str] | None = None

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            for h in self._hashers.values():
                h.update(chunk)

    def update(self, chunk: bytes | memoryview) -> None:
        """Hash ``chunk`` (queued; blocks while the hash thread is behind)."""
        self._q.put(chunk)

    def digests(self) -> dict[str, str]:
        """Finish: the hex digest of every bytes given, per algorithm."""
        if self._digests is None:
            self._q.put(None)
            self._thread.join()
            self._digests = {alg: h.hexdigest() for alg, h in self._hashers.items()}
        return self._digests


class _Aborted(Exception):
    """The download side gave up: the extraction thread stops."""


class _Pipe:
    """Bundle bytes from the download loop to the extraction thread, bounded.

    The download loop calls :meth:`feed`; ``extract_bundle`` in the other thread reads
    whole chunks, uncopied. Once the reader is done (a bad bundle), :meth:`feed` drops
    data: the download still completes, so that its hash can tell a bad bundle from bytes
    altered on the way.
    """

    depth = 4  # reads of up to 1 MiB: enough to keep both threads busy, and bounded

    def __init__(self) -> None:
        self._q: queue.Queue[bytes | memoryview | None | type[_Aborted]] = queue.Queue(
            self.depth)
        self._buf = memoryview(b"")
        self.failed = threading.Event()  # set by the reader when it stops reading

    def feed(self, chunk: bytes | memoryview | None | type[_Aborted]) -> None:
        """Hand over ``chunk``; blocks while the reader is behind, unless it stopped."""
        while not self.failed.is_set():
            try:
                self._q.put(chunk, timeout=0.1)
                return
            except queue.Full:
                continue

    def close(self, item: None | type[_Aborted] = None) -> None:
        """End of data (``None``) or abort (``_Aborted``)."""
        self.feed(item)

    def read(self, n: int = -1) -> memoryview:
        if not self._buf:
            item = self._q.get()
            if item is None:
                self._q.put(None)  # stay at EOF
                return memoryview(b"")
            if item is _Aborted:
                raise _Aborted
            assert isinstance(item, bytes | memoryview)
            self._buf = memoryview(item)
        n = len(self._buf) if n < 0 else n
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def download_and_extract(
    session: TufSession,
    fetcher: RangeFetcher,
    target: TargetFile,
    staging: Path,
    incoming: Path,
    max_bytes: int,
    *,
    gate: Gate | None = None,
    on_manifest: Callable[[Manifest], object] | None = None,
) -> tuple[Stage, Manifest, list[FileEntry]]:
    """Download a target and extract it into ``incoming`` in one pass, writing it once.

    This thread only receives; a hash thread computes the TUF hashes of the bundle, and an
    extraction thread parses the tar, hashes each member (sha256 and Merkle leaves) and
    writes it into ``incoming``, with the rest of the tar going to the stage's skeleton
    (``updater.install._stage``); hashlib releases the GIL, so the cores work at once. Nothing
    is read back. A download staged
    by an earlier, interrupted attempt continues where it stopped (Range / offset); the
    bytes it already has are rebuilt from the stage and hashed again, not fetched.

    Returns:
        The stage (skeleton and index; the caller forgets it once the files moved on),
        the manifest and the fingerprint entries.

    Raises:
        TargetHashError: the bytes are not the signed target (checked before a bundle
            error is believed: altered bytes are the origin's fault, not the bundle's).
        BundleFormatError: the signed bundle itself is malformed.
        DownloadFailedError: the transfer failed (the stage is kept for a resume).
        StagingError: the stage cannot be written (disk full: the stage is removed).
        StateDirError: ``staging`` is a symlink or not a directory (nothing is touched).
    """
    _check_target(target, max_bytes)
    gate = gate or Gate()
    key = target.hashes.get("sha256") or next(iter(target.hashes.values()))
    stage = Stage(staging, incoming, key)
    plain_dir(staging.parent, staging.name, create=True)
    stage.clear_others()
    offset = stage.resumable(target.length)
    url = session.target_url(target)
    # Room for the rest of the bundle, checked up front: a disk that fills up half-way
    # also hurts the inference app sharing it.
    need = target.length - offset
    free = shutil.disk_usage(staging).free
    if free < need:  # (a partial stage is kept: it resumes once there is room)
        raise StagingError(
            f"not enough space for {target.path}: {free} bytes free in {staging}, "
            f"{need} needed")
    try:
        chunks, start = (fetcher.fetch_from(url, offset) if offset < target.length
                         else (iter(()), offset))
    except (tuf_exc.DownloadError, tuf_exc.RepositoryError) as e:
        raise convert_tuf_error(e, f"download of {url}") from e
    if start != offset:  # the origin ignored Range: start over
        offset = 0
    try:
        writer = stage.writer(offset)
    except OSError as e:
        stage.discard()
        raise _extraction_failed(e, target, incoming) from e
    pipe = _Pipe()
    result: list[tuple[Manifest, list[FileEntry]]] = []
    error: list[BaseException] = []

    def extract() -> None:
        try:
            result.append(extract_bundle(pipe, incoming, target.path, writer=writer,
                                         on_manifest=on_manifest))
        except BaseException as e:  # noqa: BLE001 - handed to the download thread
            error.append(e)
        finally:
            pipe.failed.set()

    hasher = _Hasher(target.hashes)
    received = 0
    worker = threading.Thread(target=extract, name="extract", daemon=True)
    worker.start()
    try:
        for part in stage.prefix(offset):
            gate.checkpoint("verification")
            hasher.update(part)
            pipe.feed(part)
        received = offset
        for chunk in chunks:
            gate.checkpoint("download")
            received += len(chunk)
            if received > target.length:
                raise TargetHashError(
                    f"target {target.path}: origin sent more than the signed "
                    f"{target.length} bytes",
                    target=target.path,
                )
            hasher.update(chunk)
            pipe.feed(chunk)
            if error and isinstance(error[0], OSError):
                break  # the disk refused: no point fetching the rest
    except BaseException as e:
        pipe.close(_Aborted)
        worker.join()
        hasher.digests()
        if isinstance(e, tuf_exc.DownloadError | tuf_exc.RepositoryError):
            raise convert_tuf_error(e, f"download of {url}") from e
        if isinstance(e, OSError):  # rebuilding the prefix failed: start afresh next time
            stage.discard()
            raise StagingError(f"cannot read the staged download of {target.path}: {e}") \
                from e
        if isinstance(e, TargetHashError):
            stage.discard()
        raise
    pipe.close()
    worker.join()
    digests = hasher.digests()
    if error and isinstance(error[0], OSError):
        stage.discard()  # give the space back
        raise _extraction_failed(error[0], target, incoming) from error[0]
    if received != target.length:
        stage.discard()
        raise TargetHashError(
            f"target {target.path}: got {received} bytes, signed length is {target.length}",
            target=target.path,
        )
    for alg, digest in digests.items():
        if digest != target.hashes[alg]:
            stage.discard()
            raise TargetHashError(
                f"target {target.path}: {alg} of the download does not match the signed "
                "target (altered on the origin, in transit or in staging)",
                target=target.path,
            )
    if error:
        stage.discard()  # also gives the space back after a full disk
        failure = error[0]
        if isinstance(failure, OSError):
            raise _extraction_failed(failure, target, incoming) from failure
        raise failure
    stray = stage.drop_strays({e.path for e in result[0][1]})
    if stray:
        logger.warning("removed %d file(s) from %s that %s does not have: %s", len(stray),
                       incoming, target.path, ", ".join(stray[:5]))
    stage.mark_done()
    return stage, *result[0]


def _verify_on_disk(incoming: Path, release: Candidate, when: str) -> None:
    """The slot fingerprint re-derived from the files in ``incoming`` is the signed one.

    The stream's hashes say what was received; this says what is on disk now, just before
    it is used: a file planted or kept from an earlier attempt, changed after it was
    written (or by the health check), a stray file, a link or a hard link all change it
    (``directory_entries`` gives anything but a plain file an entry that never matches).

    Raises:
        StagedFilesChangedError: the files differ from the signed fingerprint.
        StateDirError: ``staging`` or ``incoming`` is not a plain directory.
    """
    plain_dir(incoming.parent.parent, f"{incoming.parent.name}/{incoming.name}")
    fingerprint = slot_fingerprint(directory_entries(incoming))
    if fingerprint != release.fingerprint:
        raise StagedFilesChangedError(
            f"{release.name} {release.version}: the files in {incoming} {when} have "
            f"fingerprint {fingerprint}, not the signed {release.fingerprint} (changed on "
            "disk after they were verified; discarded)",
            path=str(incoming), expected=release.fingerprint, actual=fingerprint,
        )


def _seal_on_disk(incoming: Path, release: Candidate, manifest: Manifest,
                  entries: list[FileEntry], when: str,
                  pending: PendingCheck | None = None) -> SealedFiles:
    """Sealed copies of the health check's inputs from ``incoming``, whose fingerprint
    (those copies' bytes and the other files as read) is the signed one.

    Raises:
        StagedFilesChangedError: the files differ from the signed fingerprint.
        StateDirError: ``staging`` or ``incoming`` is not a plain directory.
        StagingError: no memory for the copies.
    """
    plain_dir(incoming.parent.parent, f"{incoming.parent.name}/{incoming.name}")
    return seal_verified(incoming, health_inputs(manifest.model_path, manifest.vectors,
                                                 *manifest.signed_files),
                         {e.path: e.size for e in entries}, release.fingerprint,
                         f"{release.name} {release.version}", when,
                         None if pending is None else pending.fds)


def _extraction_failed(e: OSError, target: TargetFile, incoming: Path) -> StagingError:
    if e.errno == errno.ENOSPC:
        return StagingError(f"disk full while downloading and extracting {target.path} into "
                            f"{incoming}; the partial download was removed: {e}")
    return StagingError(f"cannot extract {target.path} into {incoming}: {e}")


def _ref_fields(ref: ModelRef | None) -> dict[str, str]:
    if ref is None:
        return {}
    return {"model": ref.name, "version": ref.version, "fingerprint": ref.fingerprint}


def update_once(
    cfg: UpdaterConfig,
    store: TrustStore,
    source: Source,
    *,
    journal: Journal | None = None,
    gate: Gate | None = None,
    on_step: Callable[[str], None] = lambda step: None,
) -> UpdateResult:
    """One full update attempt; on any error nothing trusted moves.

    Raises:
        UntrustedRemoteError: metadata, bundle, fingerprint or health check rejected.
        TransportError: the origin did not deliver.
        LocalDeviceError: TPM, trust record or disk at fault.
    """
    dev = _Device(cfg.state_dir)
    journal = journal or Journal(cfg.state_dir / "journal.json")
    gate = gate or Gate()
    fields: dict[str, str] = {}

    def step(name: str) -> None:
        journal.enter(name, **fields)
        on_step(name)

    try:
        return _attempt(cfg, store, source, dev, journal, gate, step, fields)
    except ModelwardError as e:
        last = journal.read()
        kind = events.refusal_kind(e)
        if kind is not None:
            events.record(cfg.state_dir, store.tpm, kind,
                          **events.failure_fields(e, fields, cfg.model))
        try:
            journal.enter("failed", model=last.model, version=last.version,
                          fingerprint=last.fingerprint, target=last.target,
                          detail=f"{type(e).__name__}: {e}")
        except OSError as je:  # a full disk must not hide the reason
            logger.error("cannot journal the failure (%s): %s", je, e)
        raise


def _attempt(
    cfg: UpdaterConfig,
    store: TrustStore,
    source: Source,
    dev: _Device,
    journal: Journal,
    gate: Gate,
    step: Callable[[str], None],
    fields: dict[str, str],
) -> UpdateResult:
    record, root = trusted_record(store, source.fetcher, source.metadata_url, cfg.state_dir)
    if record.active and dev.slots.current_slot() != record.active.slot:
        record = _reconcile_measured(cfg.state_dir, dev.slots, store, record)
    # (after the roll-forward: what an interrupted attempt decrypted and did not commit)
    if drop_decrypted(dev.staging, dev.slots.incoming):
        logger.warning("removed the decrypted files an interrupted attempt left in %s",
                       dev.slots.incoming)
    step("checking")
    fetcher = source.fetcher
    session = TufSession(
        dev.metadata, source.metadata_url, source.targets_url, fetcher, root, cfg.tuf,
        expired_grace=source.expired_grace,
    )
    session.refresh()
    if session.root_version > record.root_version and store.rotate_root(session.root_bytes):
        # (once: the record names the new root from the next commit on, and until then
        # every attempt finds it anchored already)
        logger.info("root rotated to version %d: re-anchored in the TPM", session.root_version)
        events.record(cfg.state_dir, store.tpm, _audit.ROOT_ROTATION,
                      root_version=str(session.root_version),
                      previous=str(record.root_version))
    check_metadata_not_rolled_back(record, session.targets_version, store.targets_floor())
    # Decided only here, on the refresh and delegation search that verified as a whole
    # in memory (ngclient persisted each role as it verified, as TUF's workflow says).
    rejections = RejectionStore(cfg.state_dir, store.tpm)  # skips releases that failed here
    choice = rejections.choose(session.candidates(cfg.model), cfg.device_id, cfg.channel)
    active = record.active
    newest = choice.release if choice else None
    if not isinstance(newest, Candidate) or not should_install(choice, active):
        what = f"{active.name} {active.version}" if active else "nothing"
        msg = (f"nothing to do: {what} is active and no newer {cfg.model} is published "
               f"for this device on channel {cfg.channel}")
        journal.enter("active" if active else "idle", **_ref_fields(active))
        return UpdateResult(Outcome.UP_TO_DATE, msg, active, session.timestamp_version)
    if choice is not None and choice.pinned and active is not None and \
            newest.version < SemVer.parse(active.version):
        logger.warning("the operator pinned %s %s: moving down from %s", newest.name,
                       newest.version, active.version)

    name, version = newest.name, str(newest.version)
    logger.info(
        "installing %s %s (fingerprint %s)", name, version, newest.fingerprint,
        extra={"model": name, "version": version, "fingerprint": newest.fingerprint},
    )
    fields.update(model=name, version=version, fingerprint=newest.fingerprint,
                  target=newest.target.path)
    policy = load_policy(session)  # (before the download: no policy, no install)
    unlocker = Unlocker(cfg.device_id, store.tpm.shared_x)
    gate.wait_idle("download")
    step("downloading")
    slot = SlotStore.other(active.slot if active else None)
    incoming = dev.slots.incoming
    staged: Stage | None = None
    try:
        _check_target(newest.target, cfg.max_bundle_bytes)  # (before either path uses it)

        def whole() -> tuple[Stage, Manifest, list[FileEntry]]:
            return download_and_extract(session, fetcher, newest.target, dev.staging,
                                        incoming, cfg.max_bundle_bytes, gate=gate,
                                        on_manifest=unlocker.unlock)

        staged, manifest, entries, index, delta = _delta.fetch_release(
            session, fetcher, _delta.Release(newest.target, name, version,
                                             newest.fingerprint, newest.role),
            cfg.state_dir, dev.staging, incoming, _delta.slot_bases(cfg.state_dir,
                                                                    dev.slots.root, [
                (label, ref.slot, ref.fingerprint)
                for label, ref in (("active", active), ("previous", record.previous))
                if ref is not None]),
            gate, whole, memory=rejections, unlock=unlocker.unlock)
        _decrypt_staged(cfg.state_dir, incoming, manifest, unlocker, staged)
        if delta:
            fields["detail"] = delta
        step("staged")
        fields.pop("detail", None)
        if (manifest.name, manifest.version) != (name, version):
            raise FingerprintMismatchError(
                f"bundle says {manifest.name} {manifest.version}, its signed target says "
                f"{name} {version}",
                model=name, version=version, expected=newest.fingerprint, actual="",
            )
        fingerprint = slot_fingerprint(entries)
        if fingerprint != newest.fingerprint:
            raise FingerprintMismatchError(
                f"{name} {version}: extracted fingerprint {fingerprint} differs from the "
                f"signed {newest.fingerprint}",
                model=name, version=version, expected=newest.fingerprint, actual=fingerprint,
            )
        # The health check's inputs, copied once from the files on disk into sealed
        # memory and fingerprinted from those copies: the child loads exactly the bytes
        # verified here (a disk that rewrites the stage afterwards changes nothing it sees).
        # Its sandboxed child starts first (when the device is idle) and imports
        # onnxruntime while they are copied; it reads nothing before they are sealed.
        pending = None if gate.reasons() else start_check(
            incoming, cfg.health, health_inputs(manifest.model_path, manifest.vectors,
                                                *manifest.signed_files))
        try:
            sealed = _seal_on_disk(incoming, newest, manifest, entries,
                                   "before its health check", pending)
        except BaseException as e:
            if pending is not None:  # (its copies are not the ones to check)
                pending.close()
                pending = None
            if not delta or not isinstance(e, StagedFilesChangedError):
                raise
            # (assembled from chunks that matched their signed hashes, yet not the signed
            # files: an index that lies, or a disk that changed them; the whole bundle once)
            logger.warning("%s %s: the delta's files are not the signed ones (%s): whole "
                           "bundle", name, version, e)
            staged.discard()
            # (not the slot's hint, and not tried again for this release; `staged` is
            # None meanwhile: a broken-off whole download stays for its resume)
            staged, index = None, None
            rejections.note_delta_refused(newest.target, name, version, str(e))
            staged, manifest, entries = whole()
            _decrypt_staged(cfg.state_dir, incoming, manifest, unlocker, staged)
            sealed = _seal_on_disk(incoming, newest, manifest, entries,
                                   "before its health check")
        if pending is not None and gate.reasons():  # (busy now: no child waits it out)
            pending.close()
            pending = None
        with sealed:
            try:
                if policy is not None:  # the training side's signature, on the sealed bytes
                    check_sealed(policy, manifest, sealed)
                step("verified")
                if pending is None:  # (else the gate said idle just now, after the seal)
                    gate.wait_idle("health check")
                detail = run_health_check(incoming, name, version, cfg.health,
                                          gate.heartbeat, sealed=sealed, pending=pending)
            finally:
                if pending is not None:  # (not handed over: killed, its copies closed)
                    pending.close()
        logger.info(
            "health check of %s %s passed: %s", name, version, detail,
            extra={"model": name, "version": version, "fingerprint": fingerprint},
        )
        step("health-checked")
    except BaseException as e:
        # (a failure of the sealed, verified bytes is the release's own: see REJECTING)
        rejections.note_failure(newest.target, name, version, e)  # if the release failed
        if staged is not None:  # verified, then refused (or interrupted): start afresh
            staged.discard()
        # else download_and_extract kept a partial download for a resume, or removed it
        raise
    # Commit before moving the files into the slot: until the TPM counter moves, the
    # inactive slot still holds what the record calls `previous`; after it moves, a
    # crash leaves `staging/incoming` matching the record's active fingerprint, and boot_check
    # completes the move (roll forward).
    try:
        # (first: a fifo planted meanwhile would block fsync_tree's open, not this check)
        _verify_on_disk(incoming, newest, "before its commit")
        fsync_tree(incoming)  # durable before the record names it
    except BaseException:
        assert staged is not None
        staged.discard()
        raise
    step("committing")
    # Before the commit (at most one NV write, only when the version rises): a crash in
    # between leaves a floor of metadata that verified, never one below an install.
    store.raise_targets_floor(session.targets_version)
    new_ref = ModelRef(name, version, fingerprint, slot)
    store.commit(
        record.successor(
            root_version=session.root_version,
            targets_version=session.targets_version,
            active=new_ref,
            previous=active,
        )
    )
    step("committed")
    events.record(cfg.state_dir, store.tpm, _audit.INSTALL, **events.ref_fields(new_ref),
                  previous=active.version if active else "", target=newest.target.path)
    dev.slots.install_incoming(slot)
    assert staged is not None
    _check_moved(cfg.state_dir, dev.slots, store, new_ref, staged)  # (changed since then)
    dev.slots.activate(slot)
    events.record(cfg.state_dir, store.tpm, _audit.ACTIVATION, **events.ref_fields(new_ref),
                  reason="installed")
    measure(store.tpm, cfg.state_dir, MEASURED_ACTIVATION, new_ref, "installed")
    staged.forget()
    step("active")
    if index is not None:  # where the next delta finds this slot's chunks (a hint only)
        _delta.write_hint(cfg.state_dir, index, [active.fingerprint] if active else [])
    return UpdateResult(Outcome.INSTALLED, f"installed {name} {version} into slot {slot}", new_ref,
                        session.timestamp_version)


def _decrypt_staged(state_dir: Path, incoming: Path, manifest: Manifest,
                    unlocker: Unlocker, staged: Stage) -> None:
    """Decrypt an encrypted release's verified ciphertext in ``incoming`` (in place).

    The stage's resume data goes first: a whole download interrupted from here on is
    never rebuilt from files that are (partly) plaintext now, which would hash as an
    altered bundle (the next attempt finds the ciphertext chunks again by the index, or
    downloads anew)."""
    key = unlocker.unlock(manifest)
    if key is not None:
        staged.forget()
        staged.mark_decrypted()  # (what an interruption leaves is plaintext: dropped)
        decrypt_incoming(state_dir, incoming, manifest, key)


def _reconcile_measured(state_dir: Path, slots: SlotStore, store: TrustStore,
                        record: TrustRecord) -> TrustRecord:
    """:func:`reconcile`, and what it then serves measured (``fleet attest``): an
    interrupted update rolled forward or back activates a slot outside boot-check.

    Raises:
        NothingTrustedError: as ``reconcile`` (measured as nothing trusted).
    """
    try:
        after = reconcile(slots, store, record)
    except NothingTrustedError as e:
        measure(store.tpm, state_dir, MEASURED_NOTHING, None, str(e))
        raise
    kind = MEASURED_ACTIVATION if after.active == record.active else MEASURED_FALLBACK
    measure(store.tpm, state_dir, kind, after.active, "reconciled (an interrupted update, "
            "or files changed)")
    return after


def _check_moved(state_dir: Path, slots: SlotStore, store: TrustStore, ref: ModelRef,
                 staged: Stage) -> None:
    """The committed slot, re-derived from its files after the move, before ``current``
    names it: bytes changed after the pre-commit check are never served. If they did
    change, the record names a slot that does not match, so it is reconciled as at boot
    (falls back to the previous model, or to none) and the stage is discarded.

    Raises:
        StagedFilesChangedError: the slot's files differ from the committed fingerprint.
    """
    ok, fp = slot_matches(slots, ref)
    if ok:
        return
    with contextlib.suppress(NothingTrustedError):  # (then no model is served: recorded)
        _reconcile_measured(state_dir, slots, store, store.load())
    staged.discard()
    raise StagedFilesChangedError(
        f"{ref.name} {ref.version}: slot {ref.slot} has fingerprint {fp} after the move, "
        f"not the committed {ref.fingerprint} (changed on disk after the commit check; "
        "not activated, fell back)",
        path=str(slots.path(ref.slot)), expected=ref.fingerprint, actual=fp,
    )
