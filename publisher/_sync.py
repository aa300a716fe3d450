"""``repo sync``: copy the served repository to an S3-compatible bucket or a directory (a
CDN's origin) in the order that keeps every device consistent.

A device refreshes by TUF's client workflow: the root chain, ``timestamp.json``, the
snapshot it names, then the targets metadata and the targets themselves. So the sync puts
up, in this order (:func:`phase`):

1. everything under ``targets/`` (bundles, chunk indexes: hash-prefixed names);
2. delegated ``N.<team>.json``, then ``N.targets.json``, then ``N.snapshot.json``;
3. ``N.root.json``, oldest first (the chain a device walks), and ``timestamp.json`` (after
   an unversioned ``snapshot.json``, if the repository has one) among them where every
   state a device can see on the way verifies (:func:`timestamp_place`): after the roots
   its keys do not sign for, before those they do. A root change re-signs the timestamp
   (and what it names) by the keys of both roots before it writes ``N+1.root.json``; the
   sync keeps that order, so a device sees the old root with a timestamp it verifies, or
   the new one. Otherwise (nothing changes root, a first sync) ``timestamp.json`` is last:
   until it lands devices see the older, complete set.

The set is captured before anything is listed: the names of the roots, then
``timestamp.json`` (and the snapshot it names) read into memory and uploaded from those
bytes, so a ``repo refresh``, ``publish`` or root change running meanwhile cannot make the
sync upload a timestamp that names files it did not upload, or a root written after the
timestamp it uploads. Versioned metadata above what that snapshot names (an orphan of a
refused write, which the repository may still replace) is left out: it would be cached as
immutable. Files are read without following symlinks; a symlink in the repository, or a
name that is not a plain path under the prefix, is refused before anything is uploaded; so
is a timestamp, snapshot or targets metadata the newest root's keys do not verify (a root
change half-written: run the sync again once it completes).

The decisions (order, caching, what is unchanged) are :func:`plan_sync`, pure; the I/O is
:mod:`modelward.publisher._sync_dest`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from modelward.publisher.errors import SyncDestinationError, SyncSourceError

logger = logging.getLogger(__name__)

#: versioned and content-addressed files never change under their name
IMMUTABLE = "public, max-age=31536000, immutable"
#: what tells a device something is new: revalidated on every request
NO_CACHE = "no-cache"
#: anything else unversioned (rare: the repository writes none)
SHORT = "public, max-age=60"

MAX_METADATA_BYTES = 16 << 20  # a timestamp or snapshot read to capture the set
_READ_CHUNK = 1 << 20

VERSIONED = re.compile(r"([1-9][0-9]{0,18})\.([^/]+)\.json")
_HASH_PREFIXED = re.compile(r"[0-9a-f]{64}\.[^/]+")
#: what a key component may hold: printable, no backslash, nothing a URL or CDN rewrites
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f-\x9f\\%?#]")


@dataclass(frozen=True)
class SyncConfig:
    """What ``repo sync`` writes; defaults are the documented caching.

    Attributes:
        immutable_cache: ``Cache-Control`` of versioned and hash-prefixed files.
        timestamp_cache: of ``timestamp.json`` and an unversioned ``snapshot.json``.
        other_cache: of any other unversioned file.
    """

    immutable_cache: str = IMMUTABLE
    timestamp_cache: str = NO_CACHE
    other_cache: str = SHORT


@dataclass(frozen=True)
class LocalFile:
    """One file of the repository as the sync will upload it.

    Attributes:
        key: its path relative to the repository (``metadata/3.targets.json``).
        size: bytes.
        sha256: hex digest of those bytes.
        path: the file, opened again (never through a link) to upload it; None when
            ``data`` holds the bytes captured at the start.
        data: the captured bytes (``timestamp.json``, an unversioned snapshot).
    """

    key: str
    size: int
    sha256: str
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Remote:
    """What the destination holds under a key.

    Attributes:
        size: bytes.
        sha256: the digest recorded with the object (S3 user metadata) or computed (a
            directory); None: unknown (an object uploaded by something else).
        cache_control: its ``Cache-Control`` (None: the destination keeps none).
    """

    size: int
    sha256: str | None
    cache_control: str | None = None


@dataclass(frozen=True)
class Upload:
    """One write of the plan."""

    file: LocalFile
    cache_control: str
    content_type: str


@dataclass(frozen=True)
class SyncPlan:
    """The uploads in their order, and the keys left as they are.

    Attributes:
        conflicts: versioned metadata the destination holds with other bytes (its sha256
            known): another repository synced there, or this one made anew. Such a name
            never changes in one repository; :func:`plan` refuses.
    """

    uploads: tuple[Upload, ...]
    unchanged: tuple[str, ...]
    conflicts: tuple[str, ...] = ()

    @property
    def upload_bytes(self) -> int:
        return sum(u.file.size for u in self.uploads)


class Destination(Protocol):
    """Where ``repo sync`` writes (an S3 prefix, a directory): two operations."""

    stores_cache_control: bool

    def describe(self) -> str:
        """The destination for messages (never with credentials)."""

    def existing(self, keys: Sequence[str],
                 sizes: Mapping[str, int] | None = None) -> Mapping[str, Remote]:
        """What the destination holds of ``keys`` (absent keys are left out); a file whose
        size differs from ``sizes`` need not be read (its sha256 is then "")."""

    def put(self, upload: Upload, body: BinaryIO) -> None:
        """Write one file so that a reader sees the old or the new bytes, never a part."""

    def read(self, key: str, limit: int) -> bytes | None:
        """The bytes under ``key`` (None: absent, or more than ``limit``)."""


def phase(key: str) -> int:
    """The upload rank of ``key`` (module docstring): targets 0, delegated 1, targets
    metadata 2, snapshots 3, other unversioned metadata 4, roots 5, ``snapshot.json`` 6,
    ``timestamp.json`` 7 (the last three interleaved by :func:`_sort_key`)."""
    if key.startswith("targets/"):
        return 0
    name = key.removeprefix("metadata/")
    if name == "timestamp.json":
        return 7
    if name == "snapshot.json":
        return 6
    m = VERSIONED.fullmatch(name)
    if m is None:
        return 4
    return {"targets": 2, "snapshot": 3, "root": 5}.get(m.group(2), 1)


_LAST = 1 << 64  # after every root


def _sort_key(key: str, timestamp_after: int | None) -> tuple[int, int, int, str]:
    """Ranks, then versions (roots: the chain in numeric order); ``snapshot.json`` and
    ``timestamp.json`` right after root ``timestamp_after`` (None: after every root)."""
    p = phase(key)
    if p >= 6:
        return 5, _LAST if timestamp_after is None else timestamp_after, p - 5, key
    m = VERSIONED.fullmatch(key.removeprefix("metadata/"))
    return min(p, 5), int(m.group(1)) if m else 0, 0, key


def cache_control(key: str, config: SyncConfig) -> str:
    """``Cache-Control`` of ``key``: immutable for versioned metadata and hash-prefixed
    targets, no-cache for timestamp and an unversioned snapshot, short otherwise."""
    base = key.rsplit("/", 1)[-1]
    if key.startswith("targets/"):
        return config.immutable_cache if _HASH_PREFIXED.fullmatch(base) else config.other_cache
    if phase(key) >= 6:
        return config.timestamp_cache
    return config.immutable_cache if VERSIONED.fullmatch(base) else config.other_cache


def content_type(key: str) -> str:
    if key.endswith(".json"):
        return "application/json"
    return "application/x-tar" if key.endswith(".tar") else "application/octet-stream"


def plan_sync(files: Sequence[LocalFile], remote: Mapping[str, Remote], config: SyncConfig,
              *, compare_cache: bool, timestamp_after: int | None = None) -> SyncPlan:
    """The uploads in a consistent order (:func:`phase`; ``timestamp.json`` right after
    root version ``timestamp_after``, or after every root when None), skipping what the
    destination already holds with the same size and sha256 (and ``Cache-Control``, where
    ``compare_cache``)."""
    uploads: list[Upload] = []
    unchanged: list[str] = []
    conflicts: list[str] = []
    for f in sorted(files, key=lambda f: _sort_key(f.key, timestamp_after)):
        cc = cache_control(f.key, config)
        have = remote.get(f.key)
        if (have is not None and have.size == f.size and have.sha256 == f.sha256
                and (not compare_cache or have.cache_control == cc)):
            unchanged.append(f.key)
            continue
        if (have is not None and have.sha256 is not None and have.sha256 != f.sha256
                and f.key.startswith("metadata/")
                and VERSIONED.fullmatch(f.key.removeprefix("metadata/"))):
            conflicts.append(f.key)  # (a hash-prefixed target that differs is damaged:
            # replacing it repairs it)
        uploads.append(Upload(f, cc, content_type(f.key)))
    return SyncPlan(tuple(uploads), tuple(unchanged), tuple(conflicts))


# --- the repository side ----------------------------------------------------------


def check_key(key: str, *, where: str) -> str:
    """``key`` if each component is a plain name (not ``.``/``..``, printable, no
    backslash, ``%``, ``?`` or ``#``), valid UTF-8.

    Raises:
        SyncSourceError: naming ``where`` (the file) and the component.
    """
    for part in key.split("/"):
        bad = part in ("", ".", "..") or _BAD_CHARS.search(part) is not None
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:
            bad = True
        if bad:
            raise SyncSourceError(
                f"{where}: the name {part.encode('utf-8', 'backslashreplace').decode()!r} "
                "cannot be an object key (not a plain name)", path=where,
                hint="rename or remove it; the repository tools never write such names")
    return key


def _open_file(path: Path) -> int:
    """A descriptor of the regular file ``path``, never through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        why = "a symlink (not followed)" if os.path.islink(path) else e.strerror or str(e)
        raise SyncSourceError(f"{path}: {why}", path=str(path),
                              hint="the repository directory holds plain files only; "
                              "remove the link") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SyncSourceError(f"{path}: not a regular file", path=str(path),
                              hint="remove it from the repository directory")
    return fd


def _digest(path: Path) -> tuple[int, str]:
    fd = _open_file(path)
    h = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _capture(path: Path) -> bytes:
    fd = _open_file(path)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_METADATA_BYTES + 1)
    if len(data) > MAX_METADATA_BYTES:
        raise SyncSourceError(f"{path}: larger than {MAX_METADATA_BYTES} bytes",
                              path=str(path), hint="is this a repository directory?")
    return data


def captured_file(key: str, data: bytes) -> LocalFile:
    return LocalFile(key, len(data), hashlib.sha256(data).hexdigest(), data=data)


def _served_versions(metadata_dir: Path) -> tuple[list[LocalFile], int, dict[str, int]]:
    """timestamp.json (and an unversioned snapshot.json) captured, the snapshot version it
    names and the metadata versions that snapshot names (role -> version)."""
    from tuf.api.metadata import Metadata, Snapshot, Timestamp
    from tuf.api.serialization import DeserializationError

    ts_path = metadata_dir / "timestamp.json"
    ts_bytes = _capture(ts_path)
    try:
        ts = Metadata[Timestamp].from_bytes(ts_bytes).signed
        snap_v = ts.snapshot_meta.version
        unversioned = metadata_dir / "snapshot.json"
        if os.path.lexists(unversioned):
            snap_path, snap_bytes = unversioned, _capture(unversioned)
        else:
            snap_path = metadata_dir / f"{snap_v}.snapshot.json"
            snap_bytes = _capture(snap_path)
        snap = Metadata[Snapshot].from_bytes(snap_bytes).signed
    except (DeserializationError, ValueError, TypeError, KeyError) as e:
        raise SyncSourceError(f"{metadata_dir}: timestamp or snapshot metadata unreadable "
                              f"({e})", path=str(ts_path),
                              hint="run `repo status`: the repository must verify") from e
    captured = [captured_file("metadata/timestamp.json", ts_bytes)]
    if snap_path.name == "snapshot.json":
        captured.append(captured_file("metadata/snapshot.json", snap_bytes))
    names = {n.removesuffix(".json"): m.version for n, m in snap.meta.items()}
    names["snapshot"] = snap_v
    return captured, snap_v, names


def _walk_targets(repo_dir: Path, targets_dir: Path) -> list[LocalFile]:
    out: list[LocalFile] = []
    if not os.path.lexists(targets_dir):
        return out
    if os.path.islink(targets_dir) or not targets_dir.is_dir():
        raise SyncSourceError(f"{targets_dir}: not a plain directory (a symlink?)",
                              path=str(targets_dir), hint="REPO/targets must be a directory")
    for top, dirs, names in os.walk(targets_dir, followlinks=False):
        for d in sorted(dirs):
            p = Path(top) / d
            if os.path.islink(p):
                raise SyncSourceError(f"{p}: a symlink (not followed)", path=str(p),
                                      hint="the repository directory holds plain files "
                                      "only; remove the link")
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            p = Path(top) / n
            if n.startswith("."):  # a temporary file being written (trust/_atomic.py)
                logger.debug("skipped %s (a temporary name)", p)
                continue
            key = check_key(p.relative_to(repo_dir).as_posix(), where=str(p))
            size, sha = _digest(p)
            out.append(LocalFile(key, size, sha, path=p))
    return out


def scan_repo(repo_dir: Path) -> list[LocalFile]:
    """The files of ``repo_dir`` devices may fetch, the timestamp captured first.

    Raises:
        SyncSourceError: no or unreadable timestamp/snapshot metadata, a symlink or a
            non-file in ``metadata/`` or ``targets/``, a name that cannot be a key.
    """
    metadata_dir = repo_dir / "metadata"
    if os.path.islink(metadata_dir) or not metadata_dir.is_dir():
        raise SyncSourceError(f"{metadata_dir}: not a directory (a symlink?)",
                              path=str(metadata_dir),
                              hint="give the repository of `repo init` as --repo")
    # the roots first: one written after the timestamp read below (a root change running
    # meanwhile) may re-key it; it waits for the next sync
    roots = {e.name for e in os.scandir(metadata_dir)
             if (m := VERSIONED.fullmatch(e.name)) is not None and m.group(2) == "root"}
    files, _snap_v, named = _served_versions(metadata_dir)  # before the rest is listed
    for entry in sorted(os.scandir(metadata_dir), key=lambda e: e.name):
        p = Path(entry.path)
        m = VERSIONED.fullmatch(entry.name)
        if entry.name in ("timestamp.json", "snapshot.json") or entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):  # staged/: a name no client fetches
            logger.debug("skipped %s/ (devices fetch none of it)", p)
            continue
        if m is None:
            logger.warning("skipped %s: not TUF metadata devices fetch", p)
            continue
        version, role = int(m.group(1)), m.group(2)
        if role == "root" and entry.name not in roots:
            logger.info("skipped %s: written after timestamp.json was read", p)
            continue
        if role != "root" and version > named.get(role, 0):
            logger.info("skipped %s: the snapshot names %s", p,
                        f"version {named[role]}" if role in named else "no such role")
            continue
        key = check_key(f"metadata/{entry.name}", where=str(p))
        size, sha = _digest(p)
        files.append(LocalFile(key, size, sha, path=p))
    files += _walk_targets(repo_dir, repo_dir / "targets")
    return files


# --- the run ----------------------------------------------------------------------


@dataclass(frozen=True)
class SyncResult:
    """What a sync did."""

    uploaded: tuple[str, ...]
    unchanged: tuple[str, ...]
    uploaded_bytes: int


def _body(f: LocalFile) -> BinaryIO:
    import io

    if f.data is not None:
        return io.BytesIO(f.data)
    assert f.path is not None
    return os.fdopen(_open_file(f.path), "rb")


def file_bytes(f: LocalFile) -> bytes:
    if f.data is not None:
        return f.data
    assert f.path is not None
    return _capture(f.path)


def timestamp_place(files: Sequence[LocalFile], served: Sequence[str]) -> int | None:
    """The root version after which ``timestamp.json`` goes up: the lowest, from the newest
    root the destination already serves (its chain from ``1.root.json`` among ``served``,
    the keys unchanged there), such that the keys of it and of every newer root verify the
    captured timestamp, the snapshot it names and that snapshot's targets; None when no
    root goes up, or the destination serves none of them (timestamp after every root).

    Raises:
        SyncSourceError: the newest root's keys do not verify them (a root change
            half-written, or metadata unreadable).
    """
    from tuf.api.exceptions import UnsignedMetadataError
    from tuf.api.metadata import Metadata, Root, Snapshot, Timestamp
    from tuf.api.serialization import DeserializationError

    by_key = {f.key: f for f in files}
    roots = sorted(int(m.group(1)) for f in files
                   if (m := VERSIONED.fullmatch(f.key.removeprefix("metadata/")))
                   and m.group(2) == "root")
    ts_file = by_key.get("metadata/timestamp.json")
    have = set(served)
    if ts_file is None or all(f"metadata/{v}.root.json" in have for v in roots):
        return None  # no root goes up: the order among them does not matter (nothing read)
    where = "metadata/timestamp.json"
    try:
        ts = Metadata[Timestamp].from_bytes(file_bytes(ts_file))
        snap_key = ("metadata/snapshot.json" if "metadata/snapshot.json" in by_key
                    else f"metadata/{ts.signed.snapshot_meta.version}.snapshot.json")
        where = snap_key
        snap = Metadata[Snapshot].from_bytes(file_bytes(by_key[snap_key]))
        where = f"metadata/{snap.signed.meta['targets.json'].version}.targets.json"
        targets = Metadata.from_bytes(file_bytes(by_key[where]))
        signed: dict[str, Metadata[Any]] = {"timestamp": ts, "snapshot": snap,
                                            "targets": targets}

        def verifies(version: int) -> bool:
            root = Metadata[Root].from_bytes(file_bytes(by_key[f"metadata/{version}.root.json"]))
            try:
                for role, md in signed.items():
                    root.verify_delegate(role, md)
            except UnsignedMetadataError:
                return False
            return True

        where = f"metadata/{roots[-1]}.root.json"
        if not verifies(roots[-1]):
            raise SyncSourceError(
                f"{where}: its keys do not verify the timestamp, snapshot and targets "
                "metadata being synced (a root change half-written?); nothing uploaded",
                path=where, hint="run the sync again once the root change completes; "
                "`repo status` shows the roles")
        newest = 0
        while f"metadata/{newest + 1}.root.json" in have and newest + 1 in roots:
            newest += 1
        if newest == 0:
            return None
        place = roots[-1]
        for v in reversed([v for v in roots if v >= newest]):
            where = f"metadata/{v}.root.json"
            if not verifies(v):
                break
            place = v
        return place
    except (DeserializationError, ValueError, TypeError, KeyError) as e:
        raise SyncSourceError(f"{where}: unreadable or missing ({e})", path=where,
                              hint="run `repo status`: the repository must verify") from e


def plan(repo_dir: Path, dest: Destination, config: SyncConfig) -> SyncPlan:
    """:func:`plan_sync` of ``repo_dir`` against what ``dest`` holds now, the timestamp
    placed among the roots by :func:`timestamp_place`.

    Raises:
        SyncSourceError: as :func:`scan_repo` and :func:`timestamp_place`.
        SyncDestinationError, SyncTransportError: from ``dest``.
    """
    files = scan_repo(repo_dir)
    remote = dest.existing([f.key for f in files], {f.key: f.size for f in files})
    first = plan_sync(files, remote, config, compare_cache=dest.stores_cache_control)
    if first.conflicts:
        key = first.conflicts[0]
        raise SyncDestinationError(
            f"{dest.describe()}: {key} there holds other bytes than {repo_dir}/{key}"
            f"{f' (and {len(first.conflicts) - 1} more)' if len(first.conflicts) > 1 else ''}"
            ": another repository was synced there, or this one was made anew; versioned "
            "metadata never changes, and devices trust what is there (nothing uploaded)",
            destination=dest.describe(), key=key,
            hint="check --repo and --to; a new repository goes to a new prefix or directory")
    if any(u.file.key == "metadata/timestamp.json" for u in first.uploads):
        refuse_rollback(files, dest)
    return plan_sync(files, remote, config, compare_cache=dest.stores_cache_control,
                     timestamp_after=timestamp_place(files, first.unchanged))


def refuse_rollback(files: Sequence[LocalFile], dest: Destination) -> None:
    """Refuse a timestamp older than the one at the destination, when the repository's
    own roots verify that one (a backup restored, an old copy): every device holding the
    newer one would refuse the origin. A timestamp there that they do not verify
    (damaged, planted) is replaced.

    Raises:
        SyncDestinationError: naming both versions.
    """
    from tuf.api.exceptions import UnsignedMetadataError
    from tuf.api.metadata import Metadata, Root, Timestamp
    from tuf.api.serialization import DeserializationError

    by_key = {f.key: f for f in files}
    data = dest.read("metadata/timestamp.json", MAX_METADATA_BYTES)
    if data is None:
        return
    try:
        there = Metadata[Timestamp].from_bytes(data)
        here = Metadata[Timestamp].from_bytes(file_bytes(by_key["metadata/timestamp.json"]))
    except (DeserializationError, ValueError, TypeError) as e:
        logger.info("the destination's timestamp.json is unreadable (%s): replaced", e)
        return
    if there.signed.version <= here.signed.version:
        return
    for f in files:
        m = VERSIONED.fullmatch(f.key.removeprefix("metadata/"))
        if m is None or m.group(2) != "root":
            continue
        try:
            Metadata[Root].from_bytes(file_bytes(f)).verify_delegate("timestamp", there)
        except (UnsignedMetadataError, DeserializationError, ValueError, TypeError):
            continue
        raise SyncDestinationError(
            f"{dest.describe()}: metadata/timestamp.json there is v{there.signed.version}, "
            f"signed by this repository's keys; the repository's is v{here.signed.version}, "
            "older: devices holding the newer one would refuse the origin (nothing uploaded)",
            destination=dest.describe(), key="metadata/timestamp.json",
            hint="is --repo an old copy or a restored backup? sync the current repository; "
            "a restored one needs `repo refresh` until its timestamp passes "
            f"v{there.signed.version}")
    logger.warning("the destination's timestamp.json v%d is not signed by this repository's "
                   "keys: replaced", there.signed.version)


def run(sync_plan: SyncPlan, dest: Destination,
        after_put: Callable[[int, Upload], None] = lambda _i, _u: None) -> SyncResult:
    """Carry out ``sync_plan`` in its order; ``after_put(n, upload)`` after the n-th write
    (progress, and the CLI's fault hook).

    Raises:
        SyncSourceError: a file changed into a link or vanished since the plan.
        SyncDestinationError, SyncTransportError: from ``dest``; what was written stays,
            and the next sync goes on from there (timestamp.json is never written early).
    """
    done: list[str] = []
    for n, up in enumerate(sync_plan.uploads, 1):
        with _body(up.file) as body:
            dest.put(up, body)
        logger.info("put %s (%d bytes, Cache-Control: %s)", up.file.key, up.file.size,
                    up.cache_control)
        done.append(up.file.key)
        after_put(n, up)
    return SyncResult(tuple(done), sync_plan.unchanged, sync_plan.upload_bytes)
