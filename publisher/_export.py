"""``repo export``: a self-contained repository snapshot on local media (a USB stick, an
SD card) for devices that update without a network (``agent update --once --from DIR``).

What is exported is what ``repo sync`` would put up (:func:`modelward.publisher._sync.
scan_repo`: the set captured from ``timestamp.json`` first, no symlinks, nothing above
what the snapshot names), narrowed to what a device walking TUF's client workflow reads:

- every ``N.root.json`` (1..N: a device anchored on an old root walks the chain);
- ``timestamp.json``, the snapshot it names, and the version of each targets role
  (top-level and delegated) that snapshot names, under the names devices fetch;
- the targets of the chosen models (``--model``, default all): every target at
  ``NAME/<file>`` that TUF's delegation search finds, as a device runs it (the releases
  and their chunk indexes; a role listing a path outside its delegation is ignored, as
  devices ignore it), and every top-level target under ``_modelward/`` (repository-wide
  policy), each under its consistent-snapshot name ``DIR/<sha256>.<file>``.

A target file whose size or sha256 is not the signed one is refused (a damaged
repository: the devices would refuse it too). The newest root's keys must verify the
exported timestamp, snapshot and targets (as ``repo sync`` checks). Files are written by
:class:`modelward.publisher._sync_dest.DirDestination`: each to a temporary name, fsynced
and renamed, never through a symlink; targets and versioned metadata first,
``timestamp.json`` last, then ``modelward-export.json`` (informational: devices never
read it, TUF's metadata is what they trust). A medium that already holds an export of
this repository gets only what changed; one whose timestamp is newer (signed by these
keys) is refused, as ``repo sync`` refuses an older copy over a newer one.

The selection is :func:`select`, pure over the captured bytes; :func:`run` is the I/O.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelward.publisher import _sync
from modelward.publisher._sync import LocalFile, SyncConfig, Upload
from modelward.publisher._sync_dest import DirDestination, destination
from modelward.publisher.errors import SyncDestinationError, SyncSourceError

if TYPE_CHECKING:
    from tuf.api.metadata import TargetFile, Targets

logger = logging.getLogger(__name__)

MANIFEST = "modelward-export.json"
MANIFEST_FORMAT = 1
POLICY_PREFIX = "_modelward/"  # top-level targets every device may read
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Selection:
    """What an export holds.

    Attributes:
        files: the repository files to write (keys as :class:`LocalFile`).
        targets: the TUF target paths exported.
        versions: root, timestamp, snapshot, targets versions; and each delegated role's.
    """

    files: tuple[LocalFile, ...]
    targets: tuple[str, ...]
    versions: dict[str, int]


def check_models(models: Sequence[str]) -> tuple[str, ...]:
    """The ``--model`` names, each a plain name (no ``/``).

    Raises:
        SyncSourceError: a name that cannot be a model's namespace.
    """
    for m in models:
        if not _MODEL.fullmatch(m):
            raise SyncSourceError(f"--model {m[:60]!r}: not a model name",
                                  path=m[:60], hint="letters, digits, '.', '_', '-'")
    return tuple(dict.fromkeys(models))


def select(files: Sequence[LocalFile], models: Sequence[str] | None,
           read: Callable[[LocalFile], bytes]) -> Selection:
    """The files of ``files`` (:func:`_sync.scan_repo`) a device needs for ``models``
    (None: all).

    Raises:
        SyncSourceError: metadata unreadable or missing, a chosen model with no target,
            a target whose file is absent or not the signed bytes.
    """
    from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp
    from tuf.api.serialization import DeserializationError

    by_key = {f.key: f for f in files}
    keep: dict[str, LocalFile] = {}
    versions: dict[str, int] = {}
    roots = [f for f in files if _versioned(f.key, "root")]
    for f in roots:
        keep[f.key] = f
    versions["root"] = max((_version(f.key) for f in roots), default=0)
    where = "metadata/timestamp.json"
    try:
        ts = Metadata[Timestamp].from_bytes(read(by_key[where])).signed
        keep[where] = by_key[where]
        versions["timestamp"] = ts.version
        snap_v = ts.snapshot_meta.version
        where = ("metadata/snapshot.json" if "metadata/snapshot.json" in by_key
                 else f"metadata/{snap_v}.snapshot.json")
        snap = Metadata[Snapshot].from_bytes(read(by_key[where])).signed
        keep[where] = by_key[where]
        versions["snapshot"] = snap.version
        roles: dict[str, Targets] = {}
        for name, meta in sorted(snap.meta.items()):
            role = name.removesuffix(".json")
            where = f"metadata/{meta.version}.{role}.json"
            roles[role] = Metadata[Targets].from_bytes(read(by_key[where])).signed
            keep[where] = by_key[where]
            versions[role] = meta.version
        where = "metadata/snapshot.json"
        chosen: list[str] = []
        for path, target in _device_targets(roles, models):
            chosen.append(path)
            for f in _target_files(by_key, path, target.hashes, target.length):
                keep[f.key] = f
    except KeyError as e:
        raise SyncSourceError(f"{where}: not in the repository (named by the snapshot or "
                              "the timestamp)", path=where,
                              hint="run `repo status`: the repository must verify") from e
    except (DeserializationError, ValueError, TypeError) as e:
        raise SyncSourceError(f"{where}: unreadable metadata ({e})", path=where,
                              hint="run `repo status`: the repository must verify") from e
    for m in models or ():
        if not any(p.startswith(f"{m}/") for p in chosen):
            raise SyncSourceError(f"--model {m}: no target under {m}/ in targets "
                                  f"v{versions.get('targets', 0)} or its delegations",
                                  path=m, hint="`repo status` lists the releases")
    return Selection(tuple(keep.values()), tuple(dict.fromkeys(chosen)), versions)


class _NotListed(Exception):
    """A delegated role the snapshot does not name (a device cannot load it either)."""


def _device_targets(roles: Mapping[str, Targets], models: Sequence[str] | None
                    ) -> list[tuple[str, TargetFile]]:
    """The targets a device takes from ``roles`` for ``models`` (None: every namespace
    listed): the top-level ``_modelward/`` targets, and per model what TUF's delegation
    search finds (:func:`modelward.updater.install._search.find_releases`, the device's
    own). A role listing a path outside its delegation is not where a device looks, so
    its listing is not exported (nor can it fail the export of a model it may not speak
    for)."""
    from modelward.updater.install._search import TOP, find_releases

    top = roles.get(TOP)
    if top is None:
        raise KeyError(TOP)
    out = [(p, t) for p, t in sorted(top.targets.items())
           if p.startswith(POLICY_PREFIX) and _wanted(p, TOP, models)]
    names = dict.fromkeys(models) if models else dict.fromkeys(sorted(
        p.split("/", 1)[0] for role, md in roles.items() for p in md.targets
        if "/" in p and _wanted(p, role, models) and not p.startswith(POLICY_PREFIX)))

    def load(role: str, _delegator: str) -> Targets:
        if role not in roles:
            raise _NotListed(role)
        return roles[role]

    for name in names:
        found, reach = find_releases(name, load, skip=(_NotListed,))
        for role in sorted({r for _, r in reach.failed}):
            logger.warning("%s/: delegated role %s is not in the snapshot: its releases "
                           "are not exported (devices cannot load it either)", name, role)
        if reach.truncated:
            logger.warning("%s/: the delegation search stopped at its bound; the releases "
                           "it did not reach are not exported (nor taken by devices)", name)
        out.extend((f.path, f.target) for f in found)
    return out


def _versioned(key: str, role: str) -> bool:
    m = _sync.VERSIONED.fullmatch(key.removeprefix("metadata/"))
    return key.startswith("metadata/") and m is not None and m.group(2) == role


def _version(key: str) -> int:
    m = _sync.VERSIONED.fullmatch(key.removeprefix("metadata/"))
    assert m is not None
    return int(m.group(1))


def _wanted(path: str, role: str, models: Sequence[str] | None) -> bool:
    if path.startswith(POLICY_PREFIX):
        return role == "targets"  # (only the operator speaks for repository-wide policy)
    return models is None or path.split("/", 1)[0] in models


def _target_files(by_key: dict[str, LocalFile], path: str, hashes: dict[str, str],
                  length: int) -> list[LocalFile]:
    """The consistent-snapshot files of one target (``DIR/<digest>.<file>`` per hash),
    each checked against the signed length and sha256."""
    dirname, sep, base = path.rpartition("/")
    out: list[LocalFile] = []
    for algo, digest in hashes.items():
        key = f"targets/{dirname}{sep}{digest}.{base}"
        f = by_key.get(key)
        if f is None:
            continue
        if f.size != length or (algo == "sha256" and f.sha256 != digest):
            raise SyncSourceError(f"{key}: {f.size} bytes, sha256 {f.sha256[:16]}…; the "
                                  f"signed target {path} is {length} bytes", path=key,
                                  hint="the repository's copy is damaged: publish the "
                                  "release again (devices would refuse this file)")
        out.append(f)
    if not out:
        raise SyncSourceError(f"target {path}: no file targets/{dirname}{sep}<hash>.{base}"
                              " in the repository", path=path,
                              hint="the repository is incomplete: `repo status`")
    return out


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    written: tuple[str, ...]
    unchanged: tuple[str, ...]
    written_bytes: int
    selection: Selection


def plan(repo_dir: Path, to: Path, models: Sequence[str] | None
         ) -> tuple[_sync.SyncPlan, Selection, DirDestination]:
    """The writes of an export of ``repo_dir`` to ``to`` (made if absent; its parent must
    exist), in :func:`_sync.plan_sync`'s order, ``timestamp.json`` last.

    Raises:
        SyncSourceError: as :func:`_sync.scan_repo`, :func:`select`, and when the newest
            root's keys do not verify the exported metadata.
        SyncDestinationError: ``to`` overlaps the repository, is a symlink or not a
            directory; holds other bytes under a versioned name (another repository), or
            a newer timestamp of this one.
    """
    dest = destination(str(to), repo_dir, None, None)
    assert isinstance(dest, DirDestination)
    files = _sync.scan_repo(repo_dir)
    sel = select(files, None if not models else check_models(models), _sync.file_bytes)
    _sync.timestamp_place(list(sel.files), [])  # the newest root verifies what is exported
    remote = dest.existing([f.key for f in sel.files], {f.key: f.size for f in sel.files})
    p = _sync.plan_sync(sel.files, remote, SyncConfig(), compare_cache=False)
    if p.conflicts:
        raise SyncDestinationError(
            f"{to}: {p.conflicts[0]} there holds other bytes than {repo_dir}/"
            f"{p.conflicts[0]}: an export of another repository (nothing written)",
            destination=str(to), key=p.conflicts[0],
            hint="export to an empty directory (or remove the old export first)")
    if any(u.file.key == "metadata/timestamp.json" for u in p.uploads):
        _sync.refuse_rollback(sel.files, dest)
    return p, sel, dest


def manifest(repo_dir: Path, sel: Selection, models: Sequence[str] | None,
             now: datetime) -> bytes:
    """``modelward-export.json``: which repository, versions and targets (for people)."""
    doc: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "repository": repo_dir.resolve().name,  # (the name only: no operator path)
        "exported_at": now.astimezone(UTC).isoformat(timespec="seconds"),
        "models": list(models) if models else None,
        "versions": sel.versions,
        "targets": list(sel.targets),
        "note": "informational: devices verify the TUF metadata, never this file",
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def run(repo_dir: Path, to: Path, models: Sequence[str] | None,
        after_put: Callable[[int, Upload], None] = lambda _i, _u: None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        planned: tuple[_sync.SyncPlan, Selection, DirDestination] | None = None
        ) -> ExportResult:
    """Export (:func:`plan`, or ``planned``: its result), then write
    ``modelward-export.json``.

    Raises:
        As :func:`plan`; SyncSourceError when a file changed into a link meanwhile;
        OSError from the medium (full, read-only): what was written stays, and an
        export run again goes on from there (``timestamp.json`` is written last).
    """
    p, sel, dest = planned or plan(repo_dir, to, models)
    result = _sync.run(p, dest, after_put)
    data = manifest(repo_dir, sel, models, now())
    mf = _sync.captured_file(MANIFEST, data)
    import io

    dest.put(Upload(mf, "", "application/json"), io.BytesIO(data))
    logger.info("exported %s to %s: %d files written, %d unchanged", repo_dir, to,
                len(result.uploaded), len(result.unchanged))
    return ExportResult(result.uploaded, result.unchanged, result.uploaded_bytes, sel)
