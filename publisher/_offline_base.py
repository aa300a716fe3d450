"""What the offline side builds its next targets on: its own signed history, never the
online host's word.

The offline side (the command that holds ``KEYS`` and signs targets: the single-machine
layout with ``MODELWARD_ONLINE_DIR``, the offline machine of the two-machine layout, or a
repository without an online directory) keeps the bytes of the newest top-level targets it
signed in ``KEYS/targets-head.json``. Its next targets are built on the newest of:

- that head (its own bytes; a root change may be pending, so any root of the verified chain
  may have signed it);
- the targets the served snapshot names, only when they are those very bytes or are signed
  by the targets keys of the newest root of the chain from ``KEYS/trusted-root.json`` (the
  operator's key: e.g. ``KEYS`` was restored from an older backup);
- a newer ``N.targets.json`` in ``metadata/`` those keys signed
  (the rules of :func:`modelward.publisher._online._head`).

Whatever the online host (snapshot and timestamp keys, write access to ``metadata/``) does,
its snapshot can only make the offline side warn: a snapshot naming targets older than the
head (a withdraw hidden), targets that do not verify, a targets file removed or swapped. The
next targets version is one above the head, the warning names the online host's file, and
the next snapshot (the single-machine publish itself, or the online host's next
``repo refresh``) lists the offline side's targets again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets

from modelward.publisher._history import lost_targets, named_targets
from modelward.publisher._online import _head, online_elsewhere
from modelward.publisher._online_state import (
    MAX_CANDIDATES,
    STATE_DIR,
    STATE_FILE,
    load_floor,
    read_or_ignore,
)
from modelward.publisher._served import (
    STATE_FILE as FLOORS_FILE,
)
from modelward.publisher._served import (
    ServedFileError,
    load_floors,
    parse,
    read_file,
    signed_targets,
    trusted_chain,
    verified_view,
    versions,
)
from modelward.publisher.errors import RepositoryStateError
from modelward.trust._atomic import write_atomic

if TYPE_CHECKING:
    from modelward.publisher._repo import Repository
    from modelward.publisher._served import View

logger = logging.getLogger(__name__)

HEAD_FILE = "targets-head.json"  # in KEYS: the newest top-level targets this tool signed
MAX_TARGETS_VERSION = 2**53 - 1  # the largest integer every JSON reader keeps exact


class OwnTargetsError(RepositoryStateError):
    """``KEYS/targets-head.json`` is not targets metadata the verified roots signed.

    Attributes:
        path: the file at fault.
    """

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path} {why}",
                         hint="restore KEYS from a backup, or remove the file to build on "
                              "the published targets the targets keys signed")
        self.path = path


class OnlineHostFaultError(RepositoryStateError):
    """The snapshot the online keys signed names a targets version so high that no targets
    above it can be published: devices that took it refuse every lower version.

    Attributes:
        path: the snapshot at fault.
    """

    def __init__(self, path: Path, version: int, what: str = "targets") -> None:
        super().__init__(
            f"{path} (written by the online host) names {what} v{version}: no version "
            f"above it can be published (at most v{MAX_TARGETS_VERSION})",
            hint="the online host is compromised: rotate the snapshot and timestamp keys "
                 "(`repo add-key`, then remove the old ones; devices then drop what those "
                 "keys signed) and remove that snapshot and timestamp.json")
        self.path = path


def offline_side(repo: Repository) -> bool:
    """Whether this command holds the offline key directory (it signs targets): not the
    online host, whose key directory is its online directory."""
    online = repo.online
    return online is None or os.path.realpath(online.dir) != os.path.realpath(repo.keys)


def record_head(keys: Path, version: int, data: bytes) -> None:
    """Keep ``data`` (``<version>.targets.json`` this tool just wrote) as the head, unless
    the head is newer already."""
    path = keys / HEAD_FILE
    try:
        old = read_file(path)
        if old is not None and parse(path, old).signed.version > version:
            return
    except ServedFileError as e:
        logger.warning("replacing %s: %s", path, e)
    write_atomic(path, data, mode=0o600)


def offline_roots(repo: Repository) -> list[Metadata[Root]]:
    """The verified root chain from the offline side's own anchor (``KEYS/trusted-root.json``,
    also in the single-machine layout, never the online host's ``ONLINE/state/root.json``,
    which the refresh unit may write: :func:`modelward.publisher._served.trusted_chain`).

    Raises:
        ServedFileError: the anchor is unusable, or a newer root does not chain.
    """
    return trusted_chain(repo)


def _signed_by(md: Metadata[Any], roots: list[Root]) -> bool:
    for root in roots:
        try:
            root.verify_delegate("targets", md.signed_bytes, md.signatures)
        except UnsignedMetadataError:
            continue
        return True
    return False


def own_head(repo: Repository, roots: list[Root]) -> tuple[Metadata[Targets], bytes] | None:
    """The newest targets this tool signed: ``KEYS/targets-head.json``, else (a key directory
    from before it) the newest ``N.targets.json`` in ``metadata/`` whose bytes
    ``KEYS/signed-targets.json`` records; None when neither.

    Raises:
        OwnTargetsError: the head is not targets metadata any root of ``roots`` signed.
    """
    path = repo.keys / HEAD_FILE
    try:
        data = read_file(path)
        md = parse(path, data) if data is not None else None
    except ServedFileError as e:
        raise OwnTargetsError(path, f"is unusable: {e}") from e
    if data is not None and md is not None:
        if not isinstance(md.signed, Targets):
            raise OwnTargetsError(path, "is not targets metadata")
        if not _signed_by(md, roots):
            raise OwnTargetsError(path, "is not signed by the targets keys of any root of "
                                        f"the verified chain (v{roots[0].version}.."
                                        f"v{roots[-1].version})")
        return md, data
    for v, sha in sorted(signed_targets(repo.keys).items(), reverse=True):
        p = repo.metadata_dir / f"{v}.targets.json"
        try:
            got = read_file(p)
            if got is None or hashlib.sha256(got).hexdigest() != sha:
                continue
            old = parse(p, got)
        except ServedFileError:
            continue
        if isinstance(old.signed, Targets) and old.signed.version == v:
            return old, got
    return None


def base_targets(repo: Repository, view: View, own: tuple[Metadata[Targets], bytes] | None,
                 fault: RepositoryStateError | None, roots: list[Root]) -> Targets:
    """The targets the next change builds on (module docstring), and the warnings that say
    why it is not the served one. ``view.targets`` is the served targets (or, after
    ``fault``, the head already)."""
    head = own[0] if own is not None else None
    snap_name = f"{view.snapshot.signed.version}.snapshot.json"
    snap_path = repo.metadata_dir / snap_name
    served: Metadata[Targets] | None = None if fault is not None else view.targets
    if served is not None and head is not None and \
            served.signed.version >= head.signed.version and \
            served.signed.to_dict() != head.signed.to_dict():
        try:  # not this tool's bytes: only the operator's current targets keys count
            roots[-1].verify_delegate("targets", served.signed_bytes, served.signatures)
        except UnsignedMetadataError as e:
            fault = ServedFileError(
                repo.metadata_dir / f"{served.signed.version}.targets.json",
                f"(named by {snap_name}) is not the targets this tool signed, nor signed by "
                f"the targets keys of root v{roots[-1].version}: {e}")
            served = None
    lagging = online_elsewhere(repo)
    if fault is not None:
        assert head is not None  # else the fault was raised
        logger.warning("the served snapshot %s is not what this tool signed: %s; building "
                       "on this tool's own targets v%d (%s); %s", snap_path, fault,
                       head.signed.version, repo.keys / HEAD_FILE,
                       "the online host's next `repo refresh` lists them" if lagging else
                       "the next snapshot, signed now, lists them")
    base = head
    if served is not None and (base is None or served.signed.version > base.signed.version
                               or served.signed.to_dict() != base.signed.to_dict()
                               and served.signed.version == base.signed.version):
        if head is not None:  # signed by the targets keys (checked above): what devices hold
            logger.warning("%s holds targets v%d, %s the published v%d the targets keys "
                           "signed (KEYS restored from an older backup, or signed "
                           "elsewhere?): building on the published v%d",
                           repo.keys / HEAD_FILE, head.signed.version,
                           "other than" if served.signed.version == head.signed.version
                           else "older than", served.signed.version, served.signed.version)
        base = served
    elif served is not None and head is not None and \
            served.signed.version < head.signed.version:
        just_signed = head.signed.version == repo.signed_now  # its snapshot is to follow
        (logger.debug if just_signed else logger.info if lagging else logger.warning)(
            "the served snapshot %s lists targets v%d, older than the v%d this tool signed "
            "(%s)%s; building on v%d", snap_path, served.signed.version, head.signed.version,
            repo.keys / HEAD_FILE, " (the online host has not refreshed since)" if lagging
            else ": the snapshot is not what this tool signed (a publish that did not "
                 "finish, or the online host rolled it back), the next snapshot, signed now, "
                 "lists it again", head.signed.version)
    assert base is not None
    if head is None:  # a key directory from before the head: the earlier rules
        return _head(repo.metadata_dir, roots, base.signed)
    found = newer_targets(repo.metadata_dir, roots[-1], base.signed.version)
    if found is not None:
        logger.warning("%s holds targets v%d; building on v%d, which the targets keys of "
                       "root v%d signed (KEYS restored from an older backup, or signed "
                       "elsewhere?)", repo.keys / HEAD_FILE, head.signed.version,
                       found.version, roots[-1].version)
    out = found or base.signed
    named = view.snapshot.signed.meta["targets.json"].version
    if named > MAX_TARGETS_VERSION:
        raise OnlineHostFaultError(snap_path, named)
    # a newer version devices may hold, gone without a trace: never built over
    lost_targets(repo.metadata_dir, out.version, named_targets(
        repo.metadata_dir, roots, (named, snap_path),
        (load_floors(repo.keys).get("targets", 0), repo.keys / FLOORS_FILE)))
    if named > out.version + 1:  # numbered up to it: devices that took that snapshot follow
        logger.warning("numbering the next targets v%d, as %s names (devices that took that "
                       "snapshot refuse any lower version)", named, snap_path)
        out.version = named - 1
    return out


def newer_targets(metadata_dir: Path, root: Root, above: int) -> Targets | None:
    """The newest ``N.targets.json`` (N > ``above``) the targets keys of ``root`` signed (never
    an older root's: a retired key); at most ``MAX_CANDIDATES`` files tried, newest first,
    each bounded and not through a symlink."""
    for tried, v in enumerate(versions(metadata_dir, "targets")):
        if v <= above or tried >= MAX_CANDIDATES:
            break
        got = read_or_ignore(metadata_dir / f"{v}.targets.json", logger.debug)
        if got is None or not isinstance(got[0].signed, Targets) or got[0].signed.version != v:
            continue
        try:
            root.verify_delegate("targets", got[0].signed_bytes, got[0].signatures)
        except UnsignedMetadataError:
            continue
        found: Targets = got[0].signed
        return found
    return None


def current_view(repo: Repository) -> tuple[View, Targets]:
    """The verified published state and the targets the next change builds on: on the
    offline side :func:`base_targets`, on the online host the served targets.

    Raises:
        ServedFileError: a published file that does not verify (the targets only when this
            tool has no signed targets of its own to build on).
        OwnTargetsError: ``KEYS/targets-head.json`` is unusable.
    """
    if not offline_side(repo):
        view = verified_view(repo)
        return view, view.targets.signed
    chain = offline_roots(repo)
    roots = [md.signed for md in chain]
    own = own_head(repo, roots)
    faults: list[RepositoryStateError] = []

    def fallback(e: RepositoryStateError) -> Metadata[Targets]:
        if own is None:
            raise e
        faults.append(e)
        return own[0]

    view = verified_view(repo, targets_fault=fallback)
    return view, base_targets(repo, view, own, faults[0] if faults else None, roots)


def own_targets_md(repo: Repository, filename: str) -> Metadata[Targets] | None:
    """``filename`` as this tool signed it, when it names the head in KEYS (the offline side
    builds on it even when the served snapshot names another, or the served copy was
    swapped); else None.

    Raises:
        OwnTargetsError: the head is unusable.
        ServedFileError: the offline root chain does not verify.
    """
    m = re.fullmatch(r"([0-9]{1,16})\.targets\.json", filename)
    if m is None or not offline_side(repo):
        return None
    own = own_head(repo, [md.signed for md in offline_roots(repo)])
    if own is None or own[0].signed.version != int(m.group(1)):
        return None
    return own[0]


def next_versions(repo: Repository, snapshot: int, timestamp: int) -> tuple[int, int]:
    """The snapshot and timestamp versions the offline side signs next (the single-machine
    layout and a repository without an online directory): above the served ones
    (``snapshot``, ``timestamp``), above what this tool published (``KEYS/published.json``)
    and, with an online directory, above what its refresh signed (``ONLINE/state``): a
    replayed older ``timestamp.json`` never makes it rewrite a version devices may hold.

    Raises:
        OnlineHostFaultError: a version beyond what can be published.
    """
    floors = load_floors(repo.keys)
    snap_v, ts_v = max(snapshot, floors.get("snapshot", 0)), \
        max(timestamp, floors.get("timestamp", 0))
    if repo.online is not None:
        path = repo.online.dir / STATE_DIR / STATE_FILE
        try:
            got = load_floor(path)
        except RepositoryStateError as e:
            logger.warning("ignoring the online host's record: %s", e)
            got = None
        if got is not None:
            if max(got.snapshot, got.timestamp) > MAX_TARGETS_VERSION:
                raise OnlineHostFaultError(path, max(got.snapshot, got.timestamp), "versions")
            if got.snapshot > snap_v or got.timestamp > ts_v:
                logger.warning("the served timestamp.json is older than the online host "
                               "signed (%s: timestamp v%d, snapshot v%d): a replay; signing "
                               "above them", path, got.timestamp, got.snapshot)
            snap_v, ts_v = max(snap_v, got.snapshot), max(ts_v, got.timestamp)
    if max(snap_v, ts_v) >= MAX_TARGETS_VERSION:  # never a floor that reads back corrupt
        raise OnlineHostFaultError(repo.metadata_dir / "timestamp.json", max(snap_v, ts_v),
                                   "snapshot or timestamp")
    return snap_v + 1, ts_v + 1


def restore_head(repo: Repository, version: int) -> None:
    """Before a snapshot names ``<version>.targets.json``: when that is the head in KEYS and
    the served copy is not its bytes (removed, swapped, a symlink), put the head back (this
    tool's own signed bytes; a device can hold no other file of that version, as no other
    verifies), with a warning naming the file."""
    path = repo.metadata_dir / f"{version}.targets.json"
    try:
        data = read_file(repo.keys / HEAD_FILE)
        if data is None or parse(repo.keys / HEAD_FILE, data).signed.version != version:
            return
    except ServedFileError:
        return  # the head itself is unusable: own_head reports it
    try:
        served = read_file(path)
    except ServedFileError:
        served = None  # a symlink, a FIFO, too big: replaced
    if served == data:
        return
    logger.warning("%s is not the targets v%d this tool signed (%s): putting the signed "
                   "bytes back", path, version, repo.keys / HEAD_FILE)
    if path.is_symlink():
        path.unlink()
    write_atomic(path, data)
