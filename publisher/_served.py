"""The served ``metadata/`` directory, read as a device would: verified, never trusted.

Whoever writes the served tree (the origin, a CDN sync, anyone with write access) can put
any file there. The operator's tools sign onwards from what they read, so every read of
published metadata goes through :func:`verified_view`:

- the root chain, verified from a trust anchor kept OUTSIDE the served directory
  (``KEYS/trusted-root.json``: the latest root whose change this tool completed; on the
  online host ``ONLINE/root.json``); a repository made before the anchor existed is
  bootstrapped once from ``1.root.json``, with a warning;
- then ``timestamp.json`` -> snapshot -> targets, each by its role's signatures in the
  newest root (or, while a root change is being completed, the root before it, which
  must be in the verified chain), with the lengths and hashes the referencing file gives;
- versions never lower than what this tool last published (``KEYS/published.json``);
- files opened without following symlinks, regular files only, bounded in size and
  nesting before they are parsed.

A file that fails is a :class:`ServedFileError` naming it; nothing is signed from it.
Delegated roles come only from the delegation tree of verified targets
(:func:`publisher._online.verified_delegations`), never from files merely present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from publisher._tufcheck import StockClientWouldRejectError
from publisher.errors import RepositoryStateError
from trust import write_atomic
from trust._bounded import loads_bounded

if TYPE_CHECKING:
    from publisher._repo import Repository

logger = logging.getLogger(__name__)

MAX_METADATA = 16 << 20  # bytes: the largest metadata file the operator's tools read
MAX_DEPTH = 64
TRUSTED_ROOT_FILE = "trusted-root.json"  # in KEYS: the root this tool trusts
STATE_FILE = "published.json"  # in KEYS: the versions this tool last published
MAX_STATE = 4096
FLOOR_ROLES = ("timestamp", "snapshot", "targets")


class ServedFileError(StockClientWouldRejectError):
    """A file in the served directory (or the trust anchor) does not verify: a client would
    reject it, and the operator's tools sign nothing from it.

    Attributes:
        path: the file at fault (``filename``: its name).
    """

    def __init__(self, path: Path, why: str) -> None:
        RepositoryStateError.__init__(
            self, f"{path} {why}; refusing to sign anything from it",
            hint="the served directory was changed by someone other than this tool (or a "
                 "copy went wrong): restore it from the operator's last published state")
        self.path, self.filename = path, path.name


def read_file(path: Path, limit: int = MAX_METADATA) -> bytes | None:
    """The bytes of a regular file, opened without following a symlink, at most ``limit``.

    Returns:
        None when the file does not exist.

    Raises:
        ServedFileError: a symlink, not a regular file, too big or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: a symlink
        raise ServedFileError(path, f"cannot be opened as a plain file ({e.strerror})") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ServedFileError(path, "is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ServedFileError(path, f"is larger than {limit} bytes")
    return data


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


def _next_root(root: Root, path: Path) -> Metadata[Root] | None:
    """``path`` (root v+1) if it chains from ``root`` by TUF's rules, None if absent.

    Raises:
        ServedFileError: present but does not chain.
    """
    md = load(path) if read_file(path) is not None else None
    if md is None:
        return None
    try:
        if not isinstance(md.signed, Root) or md.signed.version != root.version + 1:
            raise ValueError(f"not root metadata of version {root.version + 1}")
        root.verify_delegate("root", md.signed_bytes, md.signatures)
        md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
    except (UnsignedMetadataError, ValueError) as e:
        raise ServedFileError(path, f"does not chain to root v{root.version}: {e}") from e
    return md


def root_chain(anchor: Metadata[Root], metadata_dir: Path, *, strict: bool = True
               ) -> list[Metadata[Root]]:
    """The anchor, then each ``N.root.json`` after it that chains (previous root's threshold
    and its own). ``strict``: a root on disk that does not chain is an error (else it is
    logged and the chain ends before it).

    Raises:
        ServedFileError: (strict) a root that does not chain.
    """
    chain = [anchor]
    while True:
        path = metadata_dir / f"{chain[-1].signed.version + 1}.root.json"
        try:
            nxt = _next_root(chain[-1].signed, path)
        except ServedFileError as e:
            if strict:
                raise
            logger.warning("ignoring %s", e)
            return chain
        if nxt is None:
            return chain
        chain.append(nxt)


def anchor_path(repo: Repository) -> Path:
    """Where the root this machine trusts is kept (never under the served directory)."""
    from publisher._online import ANCHOR_FILE

    return repo.online.dir / ANCHOR_FILE if repo.online is not None else \
        repo.keys / TRUSTED_ROOT_FILE


def _anchor(repo: Repository) -> Metadata[Root]:
    path = anchor_path(repo)
    data = read_file(path)
    if data is None:
        if repo.online is not None:
            raise ServedFileError(path, "is missing: the online host trusts no root (copy "
                                        "the root from `repo init --online-dir`)")
        first = repo.metadata_dir / "1.root.json"
        logger.warning("%s is missing (a repository made before it existed): trusting %s "
                       "once, as found in the served directory, and keeping it as the "
                       "anchor", path, first)
        md = load(first)
        try:
            if not isinstance(md.signed, Root) or md.signed.version != 1:
                raise ValueError("not root metadata of version 1")
            md.signed.verify_delegate("root", md.signed_bytes, md.signatures)
        except (UnsignedMetadataError, ValueError) as e:
            raise ServedFileError(first, f"is not a self-signed root v1: {e}") from e
        data = read_file(first)
        assert data is not None
        write_atomic(path, data, mode=0o600)
    md = parse(path, data)
    if not isinstance(md.signed, Root):
        raise ServedFileError(path, "is not root metadata")
    return md


def save_anchor(repo: Repository, root_bytes: bytes) -> None:
    """Keep ``root_bytes`` (a root whose change this tool just completed) as the trust
    anchor of the key directory (and, at ``repo init --online-dir``, of the online one)."""
    from publisher._online import ANCHOR_FILE

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
    strict = repo.online is None  # the online host only ignores a root that does not chain
    if strict:
        served = repo.metadata_dir / f"{anchor.signed.version}.root.json"
        md = load(served)
        if md.signed.to_dict() != anchor.signed.to_dict():
            raise ServedFileError(served, f"differs from the trusted root in "
                                          f"{anchor_path(repo)}")
    return root_chain(anchor, repo.metadata_dir, strict=strict)


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


def _verify(md: Metadata[Any], role: str, roots: list[Metadata[Root]], path: Path) -> None:
    """``md`` meets ``role``'s threshold in the newest root or, while a root change is
    being completed (re-keyed metadata not re-signed yet), in the root before it.

    Raises:
        ServedFileError: it does not.
    """
    try:
        roots[-1].signed.verify_delegate(role, md.signed_bytes, md.signatures)
        return
    except UnsignedMetadataError as e:
        if len(roots) < 2:
            raise ServedFileError(path, f"is not signed by the {role} keys of root "
                                        f"v{roots[-1].signed.version}: {e}") from e
        why = str(e)
    try:
        roots[-2].signed.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as e:
        raise ServedFileError(path, f"is not signed by the {role} keys of root "
                                    f"v{roots[-1].signed.version}: {why}") from e
    logger.info("%s is signed under root v%d (root v%d's change is not completed)", path,
                roots[-2].signed.version, roots[-1].signed.version)


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
    """Record what this tool just published (only where this machine keeps state)."""
    if repo.online is not None:
        return  # the online directory is read-only to the refresh unit
    old = load_floors(repo.keys)
    new = {r: max(old.get(r, 0), floors.get(r, 0)) for r in FLOOR_ROLES}
    write_atomic(repo.keys / STATE_FILE, json.dumps(new).encode(), mode=0o600)


def verified_view(repo: Repository, *, strict: bool = True) -> View:
    """The published state, verified from the trust anchor (module docstring).

    ``strict=False`` (``repo status``): a signature that does not verify is recorded in
    :attr:`View.invalid` instead of raised; anything else still raises.

    Raises:
        ServedFileError: naming the file that does not verify.
        RepositoryStateError: the state file is corrupt, or a version is lower than this
            tool published.
    """
    roots = trusted_chain(repo)
    invalid: dict[str, str] = {}
    mdir = repo.metadata_dir

    def verify(md: Metadata[Any], role: str, path: Path) -> None:
        try:
            _verify(md, role, roots, path)
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
        verify(md, role, path)
        return md

    ts = fetch("timestamp.json", "timestamp", None)
    snap_meta = ts.signed.snapshot_meta
    snap = fetch(f"{snap_meta.version}.snapshot.json", "snapshot", snap_meta)
    tmeta = snap.signed.meta.get("targets.json")
    if tmeta is None:
        raise ServedFileError(mdir / f"{snap_meta.version}.snapshot.json",
                              "lists no targets.json")
    targets = fetch(f"{tmeta.version}.targets.json", "targets", tmeta)
    if repo.online is None:
        floors = load_floors(repo.keys)
        have = {"timestamp": ts.signed.version, "snapshot": snap.signed.version,
                "targets": targets.signed.version}
        for role, v in have.items():
            if v < floors.get(role, 0):
                raise RepositoryStateError(
                    f"the served {role} is v{v}, older than the v{floors[role]} this tool "
                    f"published ({repo.keys / STATE_FILE}): a rollback of {mdir}",
                    hint="restore the served directory from the operator's last state")
    return View(roots, ts, snap, targets, invalid)
