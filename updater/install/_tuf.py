"""TUF session: python-tuf ngclient bootstrapped from the TPM-anchored root.

All use of ngclient internals lives here (pinned: tuf < 8): the verified bytes of
each new root (to rewrite the TPM anchor), the trusted top-level targets, and
``_load_targets`` for the delegated roles the search in :mod:`updater.install._search` reaches
(the public ``get_targetinfo`` needs the exact target path, which a device looking for
the releases of its model does not know).
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile, Targets, Timestamp
from tuf.ngclient import Updater
from tuf.ngclient import UpdaterConfig as NgConfig

from modelward.trust._atomic import write_atomic
from modelward.updater._config import TufConfig
from modelward.updater.bundle._chunkindex import is_index_path
from modelward.updater.bundle._fields import modelward_field, read_fields
from modelward.updater.bundle._semver import SemVer
from modelward.updater.errors import (
    DownloadFailedError,
    MetadataError,
    StagingError,
    TargetHashError,
)
from modelward.updater.install._search import TOP, Found, Reach, SearchBudgetError, find_releases
from modelward.updater.transport._fetcher import RangeFetcher

logger = logging.getLogger(__name__)

MAX_ROLE_NAME = 128  # characters of a delegated role name the device accepts
_NAME_MAX = 255  # bytes of a file name (ngclient stores a role as quote(name).json)
MAX_DELEGATED_BYTES = 16 * 2**20  # delegated metadata one search may hold in memory


class _AnchoredUpdater(Updater):
    """ngclient Updater that remembers the verified bytes of the newest trusted root.

    Everything else is ngclient's client workflow as the TUF specification has it: each
    role is persisted as soon as it verifies (a refresh that fails at snapshot keeps the
    new timestamp), delegated roles under their URL-quoted names. The device's install
    decision does not depend on what is on disk: it is taken only after the whole
    refresh and the delegation search verified in memory, and the TPM-bound trust record
    keeps a floor for the targets version that older files on disk cannot lower.
    """

    latest_root: bytes = b""
    latest_root_version: int = 0

    def _persist_root(self, version: int, data: bytes) -> None:
        # Called by ngclient only after the root verified (bootstrap or chained rotation),
        # on every start too: a root already on disk with these bytes is not written again
        # (each no-update refresh rewrote it, a needless flash write).
        path = Path(self._dir, "root_history", f"{version}.root.json")
        try:
            same = path.read_bytes() == data
        except OSError:
            same = False
        if not same:
            super()._persist_root(version, data)
        if version >= self.latest_root_version:
            self.latest_root, self.latest_root_version = data, version

    def _persist_file(self, filename: str, data: bytes) -> None:
        # ngclient's is atomic but not durable (no fsync of the file or the directory): a
        # power cut after a refresh could leave an empty or an older timestamp/snapshot
        # and so lower the floor TUF's rollback checks compare with (r11). Ours fsyncs
        # both; 0600 as ngclient's temporary file made it.
        write_atomic(Path(filename), data, mode=0o600)

    def _update_root_symlink(self) -> None:
        link = Path(self._dir, "root.json")
        want = str(Path("root_history", f"{self._trusted_set.root.version}.root.json"))
        try:
            if os.readlink(link) == want:
                return
        except OSError:
            pass
        super()._update_root_symlink()

    def _load_timestamp(self) -> None:
        # ngclient's step, except that a remote timestamp with the very bytes of the
        # local one that just verified is not parsed and verified again: under the same
        # root it can only verify the same way and then be discarded as the same version,
        # which is what happens here at once (most refreshes find nothing new).
        local: bytes | None = None
        try:
            data = self._load_local_metadata(Timestamp.type)
            self._trusted_set.update_timestamp(data)
            local = data
        except (OSError, tuf_exc.RepositoryError) as e:
            logger.debug("Local timestamp not valid as final: %s", e)
        data = self._download_metadata(Timestamp.type, self.config.timestamp_max_length)
        if data == local:
            return
        try:
            self._trusted_set.update_timestamp(data)
        except tuf_exc.EqualVersionNumberError:
            return
        self._persist_metadata(Timestamp.type, data)


@dataclass(frozen=True)
class Candidate:
    """A published model for this device: the TUF target and its signed modelward fields."""

    target: TargetFile
    name: str
    version: SemVer
    fingerprint: str
    channel: str = "stable"
    percent: float = 100.0
    halted: bool = False
    pinned: bool = False
    withdrawn: bool = False
    role: str = TOP  # the role that speaks for the target path ("targets": the operator)


def convert_tuf_error(e: Exception, what: str) -> Exception:
    """Map python-tuf errors onto ours: transport vs untrusted remote."""
    if isinstance(e, tuf_exc.DownloadHTTPError):
        return DownloadFailedError(f"{what}: {e}", url=what, status=e.status_code)
    if isinstance(e, tuf_exc.DownloadError):
        return DownloadFailedError(f"{what}: {e}", url=what)
    if isinstance(e, tuf_exc.RepositoryError):
        return MetadataError(f"{what}: TUF metadata rejected: {type(e).__name__}: {e}")
    return e


class TufSession:
    """One refresh of the device's TUF metadata.

    Args:
        metadata_dir: the device's TUF metadata cache.
        metadata_url: base URL of the repository's metadata.
        targets_url: base URL of its targets.
        fetcher: the transport.
        anchored_root: root.json bytes that the TPM anchors.
        limits: bounds of the metadata downloads (what has no signed length).
        expired_grace: metadata that expired less than this long ago is accepted (None:
            none). TUF's expiry checks (spec 5.3.10, 5.4.4, 5.5.6, 5.6.7) compare with
            ngclient's reference time, taken once for the whole refresh; with a grace it
            is moved back by that much. Nothing else changes: signatures, thresholds,
            versions (rollback) and hashes are checked as ever.
    """

    def __init__(
        self,
        metadata_dir: Path,
        metadata_url: str,
        targets_url: str,
        fetcher: RangeFetcher,
        anchored_root: bytes,
        limits: TufConfig | None = None,
        *,
        expired_grace: timedelta | None = None,
    ) -> None:
        metadata_dir.mkdir(parents=True, exist_ok=True)
        lim = limits or TufConfig()
        self._fetcher = fetcher
        self._searching, self._search_bytes = "", 0  # the search under way, bytes loaded
        self._found: dict[str, list[Found]] = {}  # the last search of each model
        self.targets_url = targets_url.rstrip("/") + "/"
        try:
            self._updater = _AnchoredUpdater(
                str(metadata_dir),
                metadata_url,
                target_base_url=self.targets_url,
                fetcher=fetcher,
                bootstrap=anchored_root,
                config=NgConfig(root_max_length=lim.root_max_length,
                                timestamp_max_length=lim.timestamp_max_length,
                                snapshot_max_length=lim.snapshot_max_length,
                                targets_max_length=lim.targets_max_length,
                                max_delegations=lim.max_delegations),
            )
        except (tuf_exc.RepositoryError, ValueError) as e:
            raise MetadataError(f"anchored root cannot be loaded: {e}") from e
        except OSError as e:
            raise _unwritable(metadata_dir, e) from e
        if expired_grace:
            # (TrustedMetadataSet.reference_time is the instant every is_expired() of the
            # set compares with; ngclient sets it to now once, in the constructor)
            self._trusted().reference_time = datetime.now(UTC) - expired_grace
            logger.warning("accepting metadata expired less than %s ago (--expired-grace: "
                           "a device without a trustworthy clock)", expired_grace)

    def refresh(self) -> None:
        """Refresh top-level metadata (root chain, timestamp, snapshot, targets).

        Raises:
            MetadataError: the repository's metadata failed verification.
            DownloadFailedError: the origin did not deliver.
            StagingError: verified metadata cannot be written to the metadata directory.
        """
        try:
            self._updater.refresh()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            last = getattr(self._fetcher, "last_url", "")
            raise convert_tuf_error(e, f"metadata refresh (at {last})" if last
                                    else "metadata refresh") from e
        except OSError as e:  # ngclient persists each role as it verifies
            raise _unwritable(Path(self._updater._dir), e) from e  # noqa: SLF001

    @property
    def root_bytes(self) -> bytes:
        """Verified bytes of the newest trusted root."""
        return self._updater.latest_root

    @property
    def root_version(self) -> int:
        """Version of the newest trusted root."""
        return self._updater.latest_root_version

    def _trusted(self) -> Any:
        return self._updater._trusted_set  # noqa: SLF001 - see module docstring

    @property
    def root_fields(self) -> dict[str, Any]:
        """The newest trusted root's fields TUF does not define (e.g. the policy pin)."""
        return dict(self._trusted().root.unrecognized_fields)

    def top_level_target(self, path: str) -> TargetFile | None:
        """The target at ``path`` in the trusted top-level targets only (never a delegated
        role's), or None."""
        target: TargetFile | None = self._trusted().targets.targets.get(path)
        return target

    @property
    def targets_version(self) -> int:
        """Version of the trusted top-level targets metadata."""
        return int(self._trusted().targets.version)

    @property
    def timestamp_version(self) -> int:
        """Version of the trusted timestamp metadata (verified by this refresh)."""
        return int(self._trusted().timestamp.version)

    def target_url(self, target: TargetFile) -> str:
        """Download URL of a target, hash-prefixed under consistent snapshots."""
        path = target.path
        if self._trusted().root.consistent_snapshot:
            digest = next(iter(target.hashes.values()))
            dirname, sep, base = path.rpartition("/")
            path = f"{dirname}{sep}{digest}.{base}"
        return self.targets_url + path

    def _load_role(self, role: str, delegator: str) -> Targets:
        """A delegated role's metadata, verified against ``delegator``'s delegation (ngclient
        loads the local copy, else fetches the version the snapshot names).

        Raises:
            MetadataError: the role failed verification, or its name is longer than
                :data:`MAX_ROLE_NAME` or than a file name may be (a repository's fault,
                not the device's disk).
        """
        what = f"delegated role {role[:64]}{'...' if len(role) > 64 else ''} " \
            f"(delegated by {delegator[:64]})"
        if self._search_bytes > MAX_DELEGATED_BYTES:
            raise SearchBudgetError(self._searching, f"{what} not loaded: the roles loaded "
                                    f"already hold {self._search_bytes} bytes, over the "
                                    f"{MAX_DELEGATED_BYTES} one search may hold")
        if len(role) > MAX_ROLE_NAME or \
                len(urllib.parse.quote(role, "").encode()) + len(".json") > _NAME_MAX:
            raise MetadataError(f"{what}: a role name of {len(role)} characters is longer "
                                f"than the {MAX_ROLE_NAME} a device accepts")
        try:
            targets: Targets = self._updater._load_targets(role, delegator)  # noqa: SLF001
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            raise convert_tuf_error(e, what) from e
        except OSError as e:
            raise _unwritable(Path(self._updater._dir), e) from e  # noqa: SLF001
        try:  # ngclient persisted what it verified: its size is what the role holds
            self._search_bytes += os.stat(Path(self._updater._dir,  # noqa: SLF001
                                               f"{urllib.parse.quote(role, '')}.json")).st_size
        except OSError:
            self._search_bytes += self._updater.config.targets_max_length
        return targets

    def _find(self, model: str) -> tuple[list[Found], Reach]:
        self._searching, self._search_bytes = model, 0
        found, reach = find_releases(model, self._load_role,
                                     self._updater.config.max_delegations,
                                     skip=(MetadataError, DownloadFailedError))
        self._found[model] = found
        logger.debug("releases of %s: %d found in roles %s", model, len(found), reach.roles())
        return found, reach

    def search(self, model: str) -> list[Found]:
        """Targets at ``model/<file>`` as TUF's delegation search finds them (strict).

        Loads (and persists) only the delegated roles the search reaches for such paths.

        Raises:
            MetadataError: a role the search reaches failed verification, or the search
                hit its work bound (:class:`modelward.updater.install._search.SearchBudgetError`).
            DownloadFailedError: the origin did not deliver one.
            StagingError: a verified role cannot be written to the metadata directory.
        """
        found, reach = self._find(model)
        if reach.errors:
            raise reach.errors[0]
        return found

    def candidates(self, model: str) -> list[Candidate]:
        """Releases of ``model``: targets under ``model/`` whose signed ``modelward``
        field is well-formed and names ``model`` (any other name is ignored and logged:
        a role's authority is over paths, so the path decides which model it is).

        A delegated role that cannot be used (expired, bad signature, not delivered, too
        much work) leaves out only the paths its search speaks for; the top-level targets
        (the operator's pins, halts and tombstones) always apply. Only when nothing at
        all is found is the first such error raised.

        Raises:
            MetadataError, DownloadFailedError: no release found, and a role failed.
            StagingError: as :meth:`search`.
        """
        found, reach = self._find(model)
        if reach.errors and not found:
            raise reach.errors[0]
        for e in reach.errors:
            logger.warning("releases of %s: some left out: %s", model, e)
        out = []
        for f in found:
            cand = _candidate(f, model)
            if cand is not None:
                out.append(cand)
        return out


    def find_target(self, model: str, path: str) -> tuple[TargetFile, str] | None:
        """The target at ``path`` (in ``model``'s namespace) and the role that speaks for it,
        as the same delegation search that found the releases found it; None if absent.

        Raises:
            As :meth:`search`, when no search of ``model`` ran in this session yet.
        """
        found = self._found.get(model)
        if found is None:
            found = self.search(model)
        for f in found:
            if f.path == path:
                return f.target, f.role
        return None

    def fetch_target_bytes(self, target: TargetFile, max_bytes: int) -> bytes:
        """A small target's bytes, downloaded within its signed length (refused over
        ``max_bytes``) and checked against its signed length and hashes.

        Raises:
            TargetHashError: it is over ``max_bytes``, or its digests are not hex.
            MetadataError: the bytes are not the signed target (forged or altered).
            DownloadFailedError: the origin did not deliver.
        """
        if target.length > max_bytes:
            raise TargetHashError(f"target {target.path} is {target.length} bytes, over "
                                  f"the {max_bytes} the device reads", target=target.path)
        if not target.hashes or any(len(d) < 32 or d.strip("0123456789abcdef")
                                    for d in target.hashes.values()):
            raise TargetHashError(f"target {target.path}: a digest is not lowercase hex",
                                  target=target.path)
        url = self.target_url(target)
        try:
            data = self._fetcher.download_bytes(url, target.length)
            target.verify_length_and_hashes(data)
        except (tuf_exc.DownloadError, tuf_exc.RepositoryError) as e:
            raise convert_tuf_error(e, f"download of {url}") from e
        return data


def _unwritable(metadata_dir: Path, e: OSError) -> StagingError:
    return StagingError(f"cannot write TUF metadata in {metadata_dir}: {e}")


def _candidate(f: Found, model: str) -> Candidate | None:
    t = f.target
    if is_index_path(f.path):  # a release's chunk index: no release itself
        return None
    field = modelward_field(t.custom)
    if field is None:
        logger.warning("ignoring target %r (role %r): no modelward field", f.path, f.role)
        return None
    if field.get("name") != model:
        logger.warning("ignoring target %r (role %r): its signed fields name model %r, "
                       "its path is in the namespace of %r", f.path, f.role,
                       field.get("name"), model)
        return None
    try:
        r = read_fields(field)  # the same reading the signer's summary shows
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        logger.warning("ignoring target %r (role %r): malformed modelward field: %s",
                       f.path, f.role, e)
        return None
    return Candidate(t, model, r.version, r.fingerprint, channel=r.channel,
                     percent=r.percent, halted=r.halted, pinned=r.pinned,
                     withdrawn=r.withdrawn, role=f.role)
