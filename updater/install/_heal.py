"""Self-healing after the device's disk was rolled back or lost (issue 13, finding 7).

When the trust record cannot be believed (an older copy put back, altered, deleted) or
root.json no longer matches the TPM anchor, the device does what a freshly provisioned
one does, from what only the TPM holds:

1. the root: the sha256 anchored in the TPM names exactly one root.json; if the disk
   lost it, ``N.root.json`` (N = 1, 2, ...) is fetched from the repository through the
   update's own transport, bounded in count and size, and only the bytes with that sha256
   are kept (:func:`recover_root`). TUF then chains from it as always;
2. the TUF metadata cache, ``staging`` and ``current`` of the disk that was not believed
   are removed: ngclient starts from the anchored root alone, and no slot is served;
3. a genesis record (nothing active) is committed with the next TPM counter value, so the
   record that was not believed can never be current again (``TrustStore.heal``).

The attempt then installs the newest release signed for the device, like a first install.
The decisions are in ``trust._record`` (``plan_record``, ``choose_root``); this is the I/O.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
from pathlib import Path

from tuf.api import exceptions as tuf_exc

from modelward.trust._bounded import loads_bounded
from modelward.trust._record import Heal, TrustRecord
from modelward.trust._store import TrustStore
from modelward.trust.errors import RootAnchorError
from modelward.updater.errors import MetadataError, RootRecoveryError, StagingError
from modelward.updater.install._tuf import convert_tuf_error
from modelward.updater.transport._fetcher import RangeFetcher

logger = logging.getLogger(__name__)

MAX_ROOT_VERSIONS = 256  # root files fetched at most, as ngclient's max_root_rotations
ROOT_MAX_BYTES = 512_000  # bytes per root file, as ngclient's root_max_length

_UNTRUSTED = ("metadata", "staging", "current")  # what a heal removes from state_dir


def recover_root(
    fetcher: RangeFetcher,
    metadata_url: str,
    anchor: bytes,
    *,
    max_versions: int = MAX_ROOT_VERSIONS,
    max_bytes: int = ROOT_MAX_BYTES,
) -> bytes:
    """The root.json bytes whose sha256 is ``anchor``, fetched from the repository.

    Versions 1, 2, ... are fetched until one matches, the repository answers 404, or
    ``max_versions`` were tried. The bytes are compared only by hash, never parsed, so
    whatever the origin serves instead is merely not kept.

    Raises:
        RootRecoveryError: no root the repository serves matches the anchor.
        DownloadFailedError: the origin did not deliver.
    """
    base = metadata_url.rstrip("/") + "/"
    tried = 0
    for version in range(1, max_versions + 1):
        url = f"{base}{version}.root.json"
        try:
            data = fetcher.download_bytes(url, max_bytes)
        except tuf_exc.DownloadHTTPError as e:
            if e.status_code == 404:
                break
            raise convert_tuf_error(e, url) from e
        except tuf_exc.DownloadLengthMismatchError:
            tried += 1  # over the bound: not the anchored root, which fits in it
            logger.warning("%s is over %d bytes: not the anchored root", url, max_bytes)
            continue
        except tuf_exc.DownloadError as e:
            raise convert_tuf_error(e, url) from e
        tried += 1
        if hashlib.sha256(data).digest() == anchor:
            logger.warning("recovered the TPM-anchored root from %s", url)
            return data
    raise RootRecoveryError(
        f"none of the {tried} root versions at {base} has the sha256 {anchor.hex()} anchored "
        "in the TPM", tried=tried,
        hint="the device retries at the next update; if the operator re-created the "
        "repository with other root keys, provision the device again with its new root")


def _root_version(root: bytes) -> int:
    try:
        return int(loads_bounded(root, max_bytes=ROOT_MAX_BYTES, what="the anchored root")
                   ["signed"]["version"])
    except (ValueError, KeyError, TypeError) as e:
        raise MetadataError(f"the anchored root is not TUF root metadata: {e}") from e


def _remove(path: Path) -> None:
    """Remove ``path`` without following a symlink at it or below it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # never follows links inside (avoids_symlink_attacks)
        else:
            path.unlink()
    except OSError as e:
        raise StagingError(f"cannot remove {path} while healing: {e}") from e


def trusted_record(
    store: TrustStore, fetcher: RangeFetcher, metadata_url: str, state_dir: Path
) -> tuple[TrustRecord, bytes]:
    """The trust record and anchored root to start an attempt from, healing first if needed.

    With an authentic, current record, only a lost root.json is recovered (the record,
    slots and metadata stay). Otherwise the device heals (module docstring).

    Raises:
        RootRecoveryError: the repository does not serve the anchored root.
        DownloadFailedError: the origin did not deliver it.
        TrustRecordError, StagingError: the state directory cannot be read or written.
        TpmError: the TPM failed.
    """
    plan = store.plan()
    try:
        root = store.anchored_root()
    except RootAnchorError as e:
        logger.warning("%s: fetching the anchored root from the repository", e)
        root = recover_root(fetcher, metadata_url, store.tpm.read_anchor())
        store.restore_root(root)
    if not isinstance(plan, Heal):
        return plan.record, root
    logger.warning("the trust record cannot be believed (%s): healing", plan.reason)
    for name in _UNTRUSTED:
        _remove(state_dir / name)
    return store.heal(plan, _root_version(root)), root
