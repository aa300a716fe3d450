"""TUF session: python-tuf ngclient bootstrapped from the TPM-anchored root.

All use of ngclient internals lives here (pinned: tuf < 8): the verified bytes of
each new root (to rewrite the TPM anchor) and the trusted top-level targets.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile, Timestamp
from tuf.ngclient import Updater

from updater._fetcher import RangeFetcher
from updater._semver import SemVer
from updater.errors import DownloadFailedError, MetadataError, StagingError

logger = logging.getLogger(__name__)


class _AnchoredUpdater(Updater):
    """ngclient Updater that remembers the verified bytes of the newest trusted root and
    persists the other metadata as one set.

    ngclient writes each role as soon as it verifies, so a refresh that fails half-way
    (say, a mix-and-match targets file) leaves a newer timestamp and snapshot on disk.
    Here they wait in memory until :meth:`commit_metadata`, called once the whole refresh
    (and the delegated roles) verified: the device's metadata moves as a whole or not at
    all. New roots are still written at once; they only move through the TPM anchor.
    """

    latest_root: bytes = b""
    latest_root_version: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pending: dict[str, bytes] = {}
        super().__init__(*args, **kwargs)

    def _persist_metadata(self, rolename: str, data: bytes) -> None:
        self._pending[rolename] = data

    def _load_local_metadata(self, rolename: str) -> bytes:
        if rolename in self._pending:
            return self._pending[rolename]
        data: bytes = super()._load_local_metadata(rolename)
        return data

    def commit_metadata(self) -> None:
        """Write the metadata verified by this refresh (timestamp first)."""
        for rolename, data in self._pending.items():
            super()._persist_metadata(rolename, data)
        self._pending.clear()

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
    """

    def __init__(
        self,
        metadata_dir: Path,
        metadata_url: str,
        targets_url: str,
        fetcher: RangeFetcher,
        anchored_root: bytes,
    ) -> None:
        metadata_dir.mkdir(parents=True, exist_ok=True)
        self._fetcher = fetcher
        self.targets_url = targets_url.rstrip("/") + "/"
        try:
            self._updater = _AnchoredUpdater(
                str(metadata_dir),
                metadata_url,
                target_base_url=self.targets_url,
                fetcher=fetcher,
                bootstrap=anchored_root,
            )
        except (tuf_exc.RepositoryError, ValueError) as e:
            raise MetadataError(f"anchored root cannot be loaded: {e}") from e

    def refresh(self) -> None:
        """Refresh top-level metadata (root chain, timestamp, snapshot, targets).

        Raises:
            MetadataError: the repository's metadata failed verification.
            DownloadFailedError: the origin did not deliver.
        """
        try:
            self._updater.refresh()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            last = getattr(self._fetcher, "last_url", "")
            raise convert_tuf_error(e, f"metadata refresh (at {last})" if last
                                    else "metadata refresh") from e

    def commit(self) -> None:
        """Persist the metadata of this refresh; call once everything in it verified.

        Raises:
            StagingError: the metadata directory cannot be written.
        """
        try:
            self._updater.commit_metadata()
        except OSError as e:
            raise StagingError(f"cannot write TUF metadata: {e}") from e

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
    def targets_version(self) -> int:
        """Version of the trusted top-level targets metadata."""
        return int(self._trusted().targets.version)

    def target_url(self, target: TargetFile) -> str:
        """Download URL of a target, hash-prefixed under consistent snapshots."""
        path = target.path
        if self._trusted().root.consistent_snapshot:
            digest = next(iter(target.hashes.values()))
            dirname, sep, base = path.rpartition("/")
            path = f"{dirname}{sep}{digest}.{base}"
        return self.targets_url + path

    def _all_targets(self) -> list[tuple[str, TargetFile]]:
        """Top-level targets, then those of each delegated role (one level).

        ngclient verifies a delegated role's metadata against the keys and threshold its
        delegation names; a target it lists outside its delegated paths is ignored, as
        TUF's path rules require (a team key cannot publish another team's model).
        """
        top = self._trusted().targets
        out = list(top.targets.items())
        roles = top.delegations.roles if top.delegations and top.delegations.roles else {}
        for name, role in roles.items():
            try:
                delegated = self._updater._load_targets(name, "targets")  # noqa: SLF001
            except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
                raise convert_tuf_error(e, f"delegated role {name}") from e
            for path, t in delegated.targets.items():
                if role.is_delegated_path(path):
                    out.append((path, t))
                else:
                    logger.warning("ignoring %s: role %s may not list paths outside %s",
                                   path, name, role.paths)
        return out

    def candidates(self, model: str) -> list[Candidate]:
        """Signed targets that carry a well-formed ``modelward`` field for ``model``."""
        found = []
        for path, t in self._all_targets():
            field = t.custom.get("modelward") if isinstance(t.custom, dict) else None
            if not isinstance(field, dict) or field.get("name") != model:
                continue
            try:
                version = SemVer.parse(str(field["version"]))
                fingerprint = str(field["fingerprint"])
                rollout = field.get("rollout") or {}
                bp = rollout.get("basis_points", 10000)
                if not isinstance(bp, int) or isinstance(bp, bool):
                    raise ValueError(f"rollout basis_points {bp!r}")
                percent = bp / 100
                if not 0.0 <= percent <= 100.0:
                    raise ValueError(f"rollout percent {percent}")
                cand = Candidate(t, model, version, fingerprint,
                                 channel=str(field.get("channel", "stable")), percent=percent,
                                 halted=bool(rollout.get("halted", False)),
                                 pinned=bool(field.get("pinned", False)))
            except (KeyError, ValueError, TypeError, AttributeError) as e:
                logger.warning("ignoring target %s: malformed modelward field: %s", path, e)
                continue
            found.append(cand)
        return found
