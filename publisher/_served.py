"""The served ``metadata/`` directory, read as a device would: verified, never trusted.

Whoever writes the served tree (the origin, a CDN sync, anyone with write access) can put
any file there. The operator's tools sign onwards from what they read, so every read of
published metadata goes through :func:`verified_view`:

- the root chain, verified from a trust anchor kept OUTSIDE the served directory
  (``KEYS/trusted-root.json``: the latest root whose change this tool completed; on the
  online host the highest root it verified, ``ONLINE/state/root.json``, else
  ``ONLINE/root.json``); a repository made before the anchor existed is
  bootstrapped once from ``1.root.json``, with a warning;
- then ``timestamp.json`` -> snapshot -> targets, each by its role's signatures in the
  newest root (or, while a root change is being completed, the root before it, which
  must be in the verified chain), with the lengths and hashes the referencing file gives;
- versions never lower than what this tool last published (``KEYS/published.json``);
- files opened without following symlinks, regular files only, bounded in size and
  nesting before they are parsed.

A file that fails is a :class:`ServedFileError` naming it; nothing is signed from it.
Delegated roles come only from the delegation tree of verified targets
(:func:`modelward.publisher._online.verified_delegations`), never from files merely present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from modelward.publisher._tufcheck import StockClientWouldRejectError
from modelward.publisher.errors import RepositoryStateError
from modelward.trust._atomic import write_atomic
from modelward.trust._bounded import UnsafeFileError, loads_bounded, read_bounded

if TYPE_CHECKING:
    from modelward.publisher._repo import Repository

logger = logging.getLogger(__name__)

MAX_METADATA = 16 << 20  # bytes: the largest metadata file the operator's tools read
MAX_DEPTH = 64
MAX_ROOTS_PER_RUN = 64  # root versions the online refresh verifies in one run
MAX_OFFLINE_ROOTS = 1024  # the offline side keeps no partial walk: a larger bound
TRUSTED_ROOT_FILE = "trusted-root.json"  # in KEYS: the root this tool trusts
STATE_FILE = "published.json"  # in KEYS: the versions this tool last published
MAX_STATE = 4096
FLOOR_ROLES = ("timestamp", "snapshot", "targets")
SIGNED_FILE = "signed-targets.json"  # in KEYS: version -> sha256 of targets this tool wrote
KEEP_SIGNED = 16


class ServedFileError(StockClientWouldRejectError):
    """A file in the served directory (or the trust anchor) does not verify: a client would
    reject it, and the operator's tools sign nothing from it.

    Attributes:
        path: the file at fault (``filename``: its name).
    """

    def __init__(self, path: Path, why: str, hint: str = "") -> None:
        RepositoryStateError.__init__(
            self, f"{path} {why}; refusing to sign anything from it",
            hint=hint or "the served directory was changed by someone other than this tool "
                         "(or a copy went wrong): restore it from the operator's last "
                         "published state")
        self.path, self.filename = path, path.name


class MissingAnchorError(RepositoryStateError):
    """The key directory holds no trust anchor and the command may not adopt the served
    root (:attr:`modelward.publisher._repo.Repository.adopt_anchor`).

    Attributes:
        path: the anchor that is missing.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} is missing: no trusted root to verify the repository from",
                         hint="give the key directory of `repo init` (it holds "
                              "trusted-root.json)")
        self.path = path


def read_file(path: Path, limit: int = MAX_METADATA) -> bytes | None:
    """The bytes of a regular file, at most ``limit`` (:func:`trust._bounded.read_bounded`:
    no symlink followed, a FIFO does not block, at most ``limit + 1`` bytes read).

    Returns:
        None when the file does not exist.

    Raises:
        ServedFileError: a symlink, FIFO, device or directory; too big; unreadable.
    """
    try:
        return read_bounded(path, limit)
    except UnsafeFileError as e:
        why = e.reason
        raise ServedFileError(path, f"is larger than {limit} bytes" if why.startswith("is over")
                              else f"cannot be opened as a plain file ({why})"
                              if "symlink" in why else why) from e
    except OSError as e:  # ENXIO, EACCES, ENOTDIR, EIO, ...
        raise ServedFileError(path, f"cannot be opened as a plain file ({e.strerror})") from e


def parse(path: Path, data: bytes) -> Metadata[Any]:
    """TUF metadata from unverified bytes, nesting bounded before the parse.

    Raises:
        ServedFileError: not JSON within bounds, or not TUF metadata.
    """
    try:
        loads_bounded(data, max_bytes=MAX_METADATA, max_depth=MAX_DEPTH, what=str(path))
        md: Metadata[Any] = Metadata.from_bytes(data)
    except (ValueError, DeserializationError) as e:
        raise ServedFileError(path, f"is not TUF metadata: {e}") from e
    return md


def load(path: Path) -> Metadata[Any]:
    """:func:`read_file` then :func:`parse`.

    Raises:
        ServedFileError: missing, or as those.
    """
    data = read_file(path)
    if data is None:
        raise ServedFileError(path, "is missing")
    return parse(path, data)


# --- the root chain ----------------------------------------------------------------


def versions(metadata_dir: Path, role: str) -> list[int]:
    """The versions of the ``N.<role>.json`` files present, newest first (names only)."""
    pat = re.compile(rf"([1-9]\d{{0,30}})\.{re.escape(role)}\.json")
    return sorted((int(m.group(1)) for p in metadata_dir.glob(f"*.{role}.json")
                   if (m := pat.fullmatch(p.name))), reverse=True)


def walk_roots(anchor: Root, metadata_dir: Path, *, strict: bool = True,
               max_steps: int | None = None) -> list[tuple[Metadata[Root], bytes]]:
    """The roots after ``anchor`` that chain from it by TUF's rules (root N+1 signed by
    the threshold of root N and of its own), in order, with the bytes verified; at most
    ``max_steps`` (default ``MAX_ROOTS_PER_RUN``; the rest: logged, for the next run).
    Only files present are visited.

    ``strict``: a root file newer than the newest verified one that does not chain (a gap
    before it, unreadable, not root N+1, short of a threshold) is an error, never a silent
    fall-back to the older root; else it is logged and the chain ends before it.

    Raises:
        ServedFileError: (strict) naming the root that does not chain.
    """
    limit = MAX_ROOTS_PER_RUN if max_steps is None else max_steps
    out: list[tuple[Metadata[Root], bytes]] = []
    root = anchor
    hint = ("remove it, or replace it with the root the offline machine signed; nothing "
            "is signed until the root chain verifies")
    for v in sorted(v for v in versions(metadata_dir, "root") if v > anchor.version):
        if len(out) >= limit:
            logger.warning("verified %d root versions in this run (up to v%d); the next run "
                           "goes on from there", limit, root.version)
            break
        path = metadata_dir / f"{v}.root.json"
        try:
            if v != root.version + 1:
                raise ServedFileError(path, f"does not chain to root v{root.version}: "
                                            f"{root.version + 1}.root.json is missing", hint)
            data = read_file(path)
            if data is None:  # removed since the listing
                break
            md = parse(path, data)
            try:
                if not isinstance(md.signed, Root) or md.signed.version != v:
                    raise ValueError(f"not root metadata of version {v}")
                root.verify_delegate("root", md.signed_bytes, md.signatures)
                md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
            except (UnsignedMetadataError, ValueError) as e:
                raise ServedFileError(path, f"does not chain to root v{root.version}: {e}",
                                      hint) from e
        except ServedFileError as e:
            if strict:
                raise
            logger.warning("ignoring %s", e)
            break
        root = md.signed
        out.append((md, data))
    return out


def root_chain(anchor: Metadata[Root], metadata_dir: Path, *, strict: bool = True,
               max_steps: int | None = None) -> list[Metadata[Root]]:
    """The anchor, then the roots :func:`walk_roots` verifies after it.

    Raises:
        ServedFileError: (strict) a root that does not chain.
    """
    walked = walk_roots(anchor.signed, metadata_dir, strict=strict, max_steps=max_steps)
    return [anchor, *(md for md, _ in walked)]


def _online_anchor(repo: Repository) -> bool:
    """Whether this command trusts the online host's anchor: on the online host, never on
    the offline side of the single-machine layout (KEYS and MODELWARD_ONLINE_DIR), which
    has its own ``KEYS/trusted-root.json`` (the refresh unit may write ``ONLINE/state``)."""
    online = repo.online
    if online is None:
        return False
    return os.path.realpath(online.dir) == os.path.realpath(repo.keys) or \
        not (repo.keys / TRUSTED_ROOT_FILE).is_file()


def anchor_path(repo: Repository) -> Path:
    """Where the root this machine trusts is kept (never under the served directory)."""
    from modelward.publisher._online import ANCHOR_FILE

    return repo.online.dir / ANCHOR_FILE if repo.online is not None and \
        _online_anchor(repo) else repo.keys / TRUSTED_ROOT_FILE


def _anchor(repo: Repository) -> Metadata[Root]:
    if repo.online is not None and _online_anchor(repo):  # the highest it verified (state)
        from modelward.publisher._online import online_anchor

        return online_anchor(repo.online.dir)
    path = anchor_path(repo)
    data = read_file(path)
    if data is None and not repo.adopt_anchor:
        raise MissingAnchorError(path)
    if data is None:
        first = repo.metadata_dir / "1.root.json"
        logger.warning("%s is missing (a repository made before it existed): trusting %s "
                       "once, as found in the served directory, and keeping it as the "
                       "anchor", path, first)
        data = read_file(first)  # read once: the bytes checked are the bytes kept
        if data is None:
            raise ServedFileError(first, "is missing")
        md = parse(first, data)
        try:
            if not isinstance(md.signed, Root) or md.signed.version != 1:
                raise ValueError("not root metadata of version 1")
            md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
        except (UnsignedMetadataError, ValueError) as e:
            raise ServedFileError(first, f"is not a self-signed root v1: {e}") from e
        write_atomic(path, data, mode=0o600)
    md = parse(path, data)
    if not isinstance(md.signed, Root):
        raise ServedFileError(path, "is not root metadata")
    return md


def save_anchor(repo: Repository, root_bytes: bytes) -> None:
    """Keep ``root_bytes`` (a root whose change this tool just completed) as the trust
    anchor of the key directory (and, at ``repo init --online-dir``, of the online one)."""
    from modelward.publisher._online import ANCHOR_FILE

    online = repo.online
    if online is None or os.path.realpath(online.dir) != os.path.realpath(repo.keys):
        write_atomic(repo.keys / TRUSTED_ROOT_FILE, root_bytes, mode=0o600)
    if online is not None and not (online.dir / ANCHOR_FILE).exists():
        write_atomic(online.dir / ANCHOR_FILE, root_bytes, mode=0o600)


def trusted_chain(repo: Repository) -> list[Metadata[Root]]:
    """The verified root chain from this machine's anchor; the served copy of the anchor's
    version must say the same.

    Raises:
        ServedFileError: naming the root at fault.
    """
    anchor = _anchor(repo)
    if _online_anchor(repo):  # its state may be ahead of a served root removed later
        return root_chain(anchor, repo.metadata_dir)
    served = repo.metadata_dir / f"{anchor.signed.version}.root.json"
    md = load(served)
    if md.signed.to_dict() != anchor.signed.to_dict():
        raise ServedFileError(served, f"differs from the trusted root in "
                                      f"{anchor_path(repo)}")
    return root_chain(anchor, repo.metadata_dir, max_steps=MAX_OFFLINE_ROOTS)


# --- timestamp -> snapshot -> targets ---------------------------------------------------


def _check_meta(path: Path, data: bytes, meta: MetaFile) -> None:
    if meta.length is not None and len(data) != meta.length:
        raise ServedFileError(path, f"is {len(data)} bytes, not the {meta.length} its "
                                    "referencing metadata gives")
    want = (meta.hashes or {}).get("sha256")
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise ServedFileError(path, "does not have the sha256 its referencing metadata gives")


@dataclass
class View:
    """The published state, verified (see the module docstring).

    ``invalid``: role -> why its signatures do not verify (only in a lenient view, for
    ``repo status``; a strict view raises instead).
    """

    roots: list[Metadata[Root]]
    timestamp: Metadata[Timestamp]
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]
    invalid: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Root:
        root: Root = self.roots[-1].signed
        return root

    def root_md(self, version: int) -> Metadata[Root]:
        """Root ``version`` of the verified chain.

        Raises:
            RepositoryStateError: not in the chain.
        """
        for md in self.roots:
            if md.signed.version == version:
                return md
        raise RepositoryStateError(f"root v{version} is not in the verified root chain "
                                   f"(v{self.roots[0].signed.version}..v{self.root.version})")


def _verify(md: Metadata[Any], role: str, roots: list[Metadata[Root]], path: Path,
            *, any_root: bool = False) -> None:
    """``md`` meets ``role``'s threshold in the newest root or, while a root change is
    being completed (re-keyed metadata not re-signed yet), in the root before it;
    ``any_root``: in any root of ``roots`` (the offline side of the two-machine layout,
    whose online host may not have re-signed since several root changes).

    Raises:
        ServedFileError: it does not.
    """
    try:
        roots[-1].signed.verify_delegate(role, md.signed_bytes, md.signatures)
        return
    except UnsignedMetadataError as e:
        why = str(e)
    for older in reversed(roots[:-1] if any_root else roots[-2:-1]):
        try:
            older.signed.verify_delegate(role, md.signed_bytes, md.signatures)
        except UnsignedMetadataError:
            continue
        logger.info("%s is signed under root v%d (root v%d's change is not completed)",
                    path, older.signed.version, roots[-1].signed.version)
        return
    raise ServedFileError(path, f"is not signed by the {role} keys of root "
                                f"v{roots[-1].signed.version}: {why}")


def _older_roots(anchor: Metadata[Root], metadata_dir: Path) -> list[Metadata[Root]]:
    """The roots before ``anchor``, oldest first, as far back as each root N verifies
    (self-signed, and its threshold signed root N+1); at most ``MAX_OFFLINE_ROOTS``."""
    out: list[Metadata[Root]] = []
    nxt = anchor
    for _ in range(MAX_OFFLINE_ROOTS):
        v = nxt.signed.version - 1
        path = metadata_dir / f"{v}.root.json"
        try:
            md = load(path) if v >= 1 else None
            if md is None or not isinstance(md.signed, Root) or md.signed.version != v:
                break
            md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
            md.signed.verify_delegate("root", nxt.signed_bytes, nxt.signatures)
        except (ServedFileError, UnsignedMetadataError) as e:
            logger.debug("root chain before v%d ends: %s", nxt.signed.version, e)
            break
        out.insert(0, md)
        nxt = md
    return out


def verify_role(path: Path, role: str, roots: list[Metadata[Root]]) -> Metadata[Any]:
    """``path``, loaded (bounded) and verified as ``role`` metadata (see _verify).

    Raises:
        ServedFileError: missing, not ``role`` metadata, or not signed by its keys.
    """
    md = load(path)
    if md.signed.type != role:
        raise ServedFileError(path, f"is {md.signed.type} metadata, not {role}")
    _verify(md, role, roots, path)
    return md


def load_floors(keys: Path) -> dict[str, int]:
    """``KEYS/published.json``: role -> the version this tool last published.

    Raises:
        RepositoryStateError: the file is corrupt.
    """
    path = keys / STATE_FILE
    data = read_file(path, MAX_STATE)
    if data is None:
        return {}
    try:
        doc = loads_bounded(data, max_bytes=MAX_STATE, max_depth=4, what=str(path))
    except ValueError as e:
        raise RepositoryStateError(f"{path} is corrupt: {e}",
                                   hint="restore it, or delete it to trust the served "
                                        "versions once") from e
    if not isinstance(doc, dict):
        raise RepositoryStateError(f"{path} is corrupt: not an object")
    out: dict[str, int] = {}
    for role in FLOOR_ROLES:
        v = doc.get(role, 0)
        if type(v) is not int or not 0 <= v < 1 << 53:
            raise RepositoryStateError(f"{path} is corrupt: {role} is {v!r}")
        out[role] = v
    return out


def save_floors(repo: Repository, floors: Mapping[str, int]) -> None:
    """Record what this tool just published (only where this machine keeps state: never
    on the online host, whose key directory is its online directory, read-only to the
    refresh unit; the single-machine layout's KEYS does)."""
    online = repo.online
    if online is not None and os.path.realpath(online.dir) == os.path.realpath(repo.keys):
        return
    old = load_floors(repo.keys)
    new = {r: max(old.get(r, 0), floors.get(r, 0)) for r in FLOOR_ROLES}
    write_atomic(repo.keys / STATE_FILE, json.dumps(new).encode(), mode=0o600)


def signed_targets(keys: Path) -> dict[int, str]:
    """``KEYS/signed-targets.json``: the last targets files this tool wrote, version ->
    sha256 (an unreadable or odd file counts as empty: it only ever widens trust in bytes
    this tool wrote itself)."""
    path = keys / SIGNED_FILE
    try:
        data = read_file(path, MAX_STATE)
        doc = loads_bounded(data, max_bytes=MAX_STATE, max_depth=2, what=str(path)) \
            if data is not None else {}
    except (ValueError, ServedFileError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {int(k): v for k, v in doc.items()
            if isinstance(k, str) and k.isascii() and k.isdigit() and isinstance(v, str)}


def record_signed_targets(keys: Path, version: int, data: bytes) -> None:
    """Remember that this tool wrote ``<version>.targets.json`` with these bytes."""
    known = signed_targets(keys)
    known[version] = hashlib.sha256(data).hexdigest()
    keep = dict(sorted(known.items())[-KEEP_SIGNED:])
    write_atomic(keys / SIGNED_FILE, json.dumps({str(k): v for k, v in keep.items()}).encode(),
                 mode=0o600)


def verified_view(repo: Repository, *, strict: bool = True,
                  targets_fault: Callable[[RepositoryStateError], Metadata[Targets]]
                  | None = None) -> View:
    """The published state, verified from the trust anchor (module docstring).

    ``strict=False`` (``repo status``): a signature that does not verify is recorded in
    :attr:`View.invalid` instead of raised; anything else still raises.

    ``targets_fault`` (the offline side, which builds on its own signed targets,
    :mod:`modelward.publisher._offline_base`): when the targets the snapshot names do not
    verify or are older than this tool published, it is called with that error and gives
    the targets of the view instead (or raises).

    Raises:
        ServedFileError: naming the file that does not verify.
        RepositoryStateError: the state file is corrupt, or a version is lower than this
            tool published.
    """
    from modelward.publisher._online import online_elsewhere

    roots = trusted_chain(repo)
    invalid: dict[str, str] = {}
    mdir = repo.metadata_dir
    lagging = online_elsewhere(repo)  # the online host may not have refreshed since
    signers = [*_older_roots(roots[0], mdir), *roots] if lagging else roots

    def verify(md: Metadata[Any], role: str, path: Path, data: bytes) -> None:
        try:
            if lagging and role == "targets":
                # Targets the offline side builds on: its own bytes, or signed under the
                # newest root (never a retired targets key of an older root).
                if signed_targets(repo.keys).get(md.signed.version) != \
                        hashlib.sha256(data).hexdigest():
                    _verify(md, role, roots, path)
                return
            _verify(md, role, signers, path, any_root=lagging)
        except ServedFileError as e:
            if strict:
                raise
            invalid[role] = str(e)

    def fetch(name: str, role: str, meta: MetaFile | None) -> Metadata[Any]:
        path = mdir / name
        data = read_file(path)
        if data is None:
            raise ServedFileError(path, "is missing")
        if meta is not None:
            try:
                _check_meta(path, data, meta)
            except ServedFileError as e:
                if strict:
                    raise
                invalid[role] = str(e)
        md = parse(path, data)
        if md.signed.type != role:
            raise ServedFileError(path, f"is {md.signed.type} metadata, not {role}")
        if meta is not None and md.signed.version != meta.version:
            raise ServedFileError(path, f"says version {md.signed.version}, not "
                                        f"{meta.version}")
        verify(md, role, path, data)
        return md

    ts = fetch("timestamp.json", "timestamp", None)
    snap_meta = ts.signed.snapshot_meta
    snap = fetch(f"{snap_meta.version}.snapshot.json", "snapshot", snap_meta)
    tmeta = snap.signed.meta.get("targets.json")
    if tmeta is None:
        raise ServedFileError(mdir / f"{snap_meta.version}.snapshot.json",
                              "lists no targets.json")
    floors = load_floors(repo.keys) if repo.online is None else {}

    def check_floor(role: str, v: int) -> None:
        if v < floors.get(role, 0):
            raise RepositoryStateError(
                f"the served {role} is v{v}, older than the v{floors[role]} this tool "
                f"published ({repo.keys / STATE_FILE}): a rollback of {mdir}",
                hint="restore the served directory from the operator's last state")

    if not lagging:  # the offline machine of the two-machine layout signs neither
        check_floor("timestamp", ts.signed.version)
        check_floor("snapshot", snap.signed.version)
    try:
        targets = fetch(f"{tmeta.version}.targets.json", "targets", tmeta)
        check_floor("targets", targets.signed.version)
    except RepositoryStateError as e:
        if targets_fault is None:
            raise
        targets = targets_fault(e)
    return View(roots, ts, snap, targets, invalid)
