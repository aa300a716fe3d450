"""The online host's own state, and the bounded, verified reads its refresh makes.

``ONLINE/state/`` (writable by the refresh unit, the rest of ``ONLINE`` is read-only):

- ``root.json``: the highest root the host verified along the chain from ``ONLINE/root.json``
  (each root N+1 by root N's threshold and its own); the next run starts there, so a root
  file corrupted or removed later in the served directory never takes it back.
- ``refresh.json``: the snapshot and timestamp versions it last signed and the snapshot's
  role list (versions, lengths, hashes): the floor of the next refresh. A ``timestamp.json``
  or snapshot copied back, or planted, cannot lower it or put a role in.

Every file is read through :func:`modelward.publisher._served.read_file` (no symlink followed, never
blocking, regular files only, bounded before anything is parsed); the root chain is
:func:`modelward.publisher._served.walk_roots`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api.exceptions import LengthOrHashMismatchError, UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Timestamp

from modelward.publisher._served import ServedFileError, parse, read_file
from modelward.publisher.errors import RepositoryStateError
from modelward.trust._atomic import write_atomic
from modelward.trust._bounded import loads_bounded

logger = logging.getLogger(__name__)

MAX_CANDIDATES = 256  # N.<role>.json files tried, newest first, for one role
STATE_DIR = "state"
STATE_ROOT = "root.json"
STATE_FILE = "refresh.json"


class OnlineStateError(RepositoryStateError):
    """A file the online host's refresh relies on does not verify, or its own state is
    unusable: nothing is signed.

    Attributes:
        path: the file at fault.
    """

    def __init__(self, path: Path, why: str, hint: str = "") -> None:
        super().__init__(f"{path} {why}", hint=hint)
        self.path = path


# --- reads of the served directory (modelward.publisher._served: bounded, no symlink) -------------


def read_or_ignore(path: Path, log: Callable[..., None] = logger.warning
                   ) -> tuple[Metadata[Any], bytes] | None:
    """``path`` parsed with its bytes, or None (absent, or unusable: ``log``-ged)."""
    try:
        data = read_file(path)
        return None if data is None else (parse(path, data), data)
    except ServedFileError as e:
        log("ignoring %s", e)
        return None


def meta_of(version: int, data: bytes) -> MetaFile:
    """The snapshot/timestamp entry for verified bytes: version, length, sha256."""
    return MetaFile(version=version, length=len(data),
                    hashes={"sha256": hashlib.sha256(data).hexdigest()})


# --- the host's root ---------------------------------------------------------------------


def load_root(path: Path) -> Metadata[Root] | None:
    """A root file of the host's own (anchor or state), or None when absent.

    Raises:
        ServedFileError: present but unusable.
    """
    data = read_file(path)
    if data is None:
        return None
    md = parse(path, data)
    if not isinstance(md.signed, Root):
        raise ServedFileError(path, "is not root metadata")
    return md


# --- the refresh floor -----------------------------------------------------------------


@dataclass(frozen=True)
class Floor:
    """What the online host signed last: nothing it signs next is lower or equal."""

    timestamp: int
    snapshot: int
    meta: dict[str, MetaFile]

    def to_bytes(self) -> bytes:
        return json.dumps({"timestamp": self.timestamp, "snapshot": self.snapshot,
                           "meta": {k: m.to_dict() for k, m in self.meta.items()}},
                          indent=1, sort_keys=True).encode()


def load_floor(path: Path) -> Floor | None:
    """``ONLINE/state/refresh.json``, or None when absent.

    Raises:
        OnlineStateError: present but unusable (never silently ignored: it is the floor).
    """
    data = read_file(path, 1 << 20)
    if data is None:
        return None
    try:
        doc = loads_bounded(data, max_bytes=1 << 20, max_depth=8, what=str(path))
        ts, snap, meta = doc["timestamp"], doc["snapshot"], doc["meta"]
        if not (isinstance(ts, int) and isinstance(snap, int) and isinstance(meta, dict)):
            raise TypeError("timestamp, snapshot: integers; meta: an object")
        return Floor(ts, snap, {str(k): MetaFile.from_dict(dict(m)) for k, m in meta.items()})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise OnlineStateError(path, f"is not the online host's refresh state: {e}",
                               "restore it from a backup of the online directory") from e


def save(path: Path, data: bytes) -> None:
    """Replace a state file atomically.

    Raises:
        OnlineStateError: the state directory is not writable.
    """
    try:
        write_atomic(path, data, mode=0o600)
    except OSError as e:
        raise OnlineStateError(path, f"cannot be written: {e.strerror}",
                               "the refresh keeps its state in ONLINE/state (writable by "
                               "the unit: BindPaths=, tmpfiles)") from e


def verified_served(metadata_dir: Path, root: Root) -> tuple[int, int, dict[str, MetaFile]] | None:
    """The served timestamp and the snapshot it names, if both verify under ``root`` (the
    snapshot also by the length and hash the timestamp gives): (ts v, snapshot v, its meta).
    None when they do not (logged)."""
    got = read_or_ignore(metadata_dir / "timestamp.json")
    if got is None:
        return None
    ts_md, _ = got
    try:
        if not isinstance(ts_md.signed, Timestamp):
            raise ValueError("timestamp.json is not timestamp metadata")
        root.verify_delegate("timestamp", ts_md.signed_bytes, ts_md.signatures)
        sm: MetaFile = ts_md.signed.snapshot_meta
        name = f"{sm.version}.snapshot.json"
        got = read_or_ignore(metadata_dir / name)
        if got is None:
            raise ValueError(f"{name} is missing or unusable")
        snap_md, data = got
        sm.verify_length_and_hashes(data)
        if not isinstance(snap_md.signed, Snapshot) or snap_md.signed.version != sm.version:
            raise ValueError(f"{name} is not snapshot metadata of that version")
        root.verify_delegate("snapshot", snap_md.signed_bytes, snap_md.signatures)
    except (UnsignedMetadataError, LengthOrHashMismatchError, ValueError) as e:
        logger.warning("the served timestamp/snapshot do not verify under root v%d (%s): "
                       "not built on", root.version, e)
        return None
    meta: Mapping[str, MetaFile] = snap_md.signed.meta
    return int(ts_md.signed.version), int(sm.version), dict(meta)
