"""Publishing a release's signed chunk index, and what devices on earlier releases fetch.

``Repository.publish`` verifies a bundle while hashing the very bytes it verifies
(:class:`VerifiedStream`), copies the bundle into the served directory, and then cuts the
*served copy* (:func:`add_index`): the copy must hash to what was verified, so a bundle
changed on the operator's disk between the check and the copy is refused, and every chunk
hash in the index is of verified bytes. The index goes into the same targets version as
the bundle (one signing, one snapshot and timestamp), at ``index_path(bundle)`` with the
custom field ``{"modelward-chunk-index": {"bundle": <bundle path>}}`` and no ``modelward``
field: nothing that lists releases ever takes it for one.

The operator view (:func:`estimates`): for each earlier release of the model, the bytes a
device on it fetches for the new one — the new file data whose chunks the old release
does not hold, plus the index itself. The old release's chunks come from its own index
target (verified against the signed metadata, then against the old bundle's signed length
and hash), or, for a release published before indexes existed, are cut from the old
bundle file in the served directory (at most :data:`MAX_REBUILD_BYTES`; said so).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuf.api.metadata import TargetFile

from modelward.publisher._chunking import build_index
from modelward.publisher._served import ServedFileError, read_file
from modelward.publisher.errors import OperatorInputError, RepositoryStateError
from modelward.trust._atomic import write_atomic
from modelward.trust._display import escape
from modelward.updater.bundle._chunkindex import (
    MAX_INDEX_BYTES,
    ChunkIndex,
    chunk_hashes,
    fetch_bytes,
    index_path,
    is_index_path,
    parse_index,
)
from modelward.updater.bundle._names import check_model_name
from modelward.updater.bundle._provenance import RESERVED_DIR
from modelward.updater.bundle._semver import SemVer
from modelward.updater.bundle._tarstream import check_member_path
from modelward.updater.errors import ChunkIndexError

if TYPE_CHECKING:
    from modelward.publisher._repo import PublishResult
    from modelward.updater.install._search import Found

logger = logging.getLogger(__name__)

#: The custom field of an index target.
INDEX_FIELD = "modelward-chunk-index"
#: An earlier release without an index is cut from its bundle up to this size (bytes);
#: above it the estimate is "full bundle" (cutting reads and hashes the whole file).
MAX_REBUILD_BYTES = 2 << 30
#: Estimates for at most this many earlier releases (the newest): each may read a file.
MAX_ESTIMATES = 10
_HEX64 = re.compile(r"[0-9a-f]{64}")


class VerifiedStream:
    """A ``read`` that hashes (sha256) and counts what the verifier reads through it."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self._sha = hashlib.sha256()
        self.length = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._f.read(n)
        self._sha.update(data)
        self.length += len(data)
        return data

    def finish(self) -> None:
        """Read (and hash) whatever the verifier left after the tar's end."""
        while self.read(1 << 20):
            pass

    def target_file(self, target_path: str) -> TargetFile:
        """The bundle's target: the length and sha256 of exactly the verified bytes."""
        return TargetFile(self.length, {"sha256": self._sha.hexdigest()}, target_path)


@dataclass(frozen=True)
class FetchEstimate:
    """What a device on ``version`` fetches for the new release.

    ``fetch`` is None when not known ("full bundle": then it fetches ``full``).
    """

    version: str
    fetch: int | None  # file-data bytes plus the index
    full: int  # the new bundle's length
    index_length: int
    note: str = ""  # how the old release's chunks were found, or why not
    withdrawn: bool = False

    def to_json(self) -> dict[str, Any]:
        """For ``--json`` output."""
        return {"version": self.version, "fetch_bytes": self.fetch, "full_bytes": self.full,
                "index_bytes": self.index_length, "note": self.note,
                "withdrawn": self.withdrawn}

    def text(self) -> str:
        """One line for the operator (the version is a team's signed string: escaped)."""
        what = f"devices on {escape(self.version, 64)}" + \
            (" (withdrawn)" if self.withdrawn else "")
        if self.fetch is None:
            return f"{what} fetch the full bundle, {human(self.full)} ({escape(self.note)})"
        return (f"{what} fetch {human(self.fetch)} of {human(self.full)} (index "
                f"{human(self.index_length)})" + (f"; {escape(self.note)}" if self.note else ""))


def publish_lines(r: PublishResult) -> list[str]:
    """What ``modelward publish`` prints. The name, version and paths come from the
    bundle (a team's, maybe): escaped, like every line the operator view prints."""
    lines = [f"published {escape(r.name, 128)} {escape(r.version, 64)} as "
             f"{escape(r.target_path)} ({r.length} bytes)",
             f"fingerprint {escape(r.fingerprint, 64)}; targets v{r.targets_version}, "
             f"timestamp v{r.timestamp_version}",
             f"chunk index {escape(r.index_path)}" if r.index_path else
             "no chunk index (devices fetch the whole bundle; see the warning above)"]
    return lines + [e.text() for e in r.estimates]


def human(n: int) -> str:
    """Bytes as the operator reads them: ``41 KiB``, ``2.6 MiB``."""
    if n < 1024:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / 1024:.0f} KiB"
    if n < 1 << 30:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / (1 << 30):.1f} GiB"


def served_name(targets_dir: Path, tf: TargetFile) -> Path:
    """Where the served directory holds a target (consistent snapshots: hash-prefixed).

    Only a path ``<model>/<file>`` (a model name as :func:`check_model_name` accepts it,
    or ``_modelward``, which no model name can be; one safe component) with a hex sha256
    has a place there: whatever else a signed target names (a team's metadata, a
    manifest's name) never leads out of ``targets_dir``.

    Raises:
        RepositoryStateError: the target has no such place (names it, escaped).
    """
    d, _, base = tf.path.partition("/")
    sha = tf.hashes.get("sha256", "")
    try:
        if d != RESERVED_DIR:  # (modelward's own targets: the provenance policy)
            check_model_name(d)
        check_member_path(base)
        if "/" in base or not _HEX64.fullmatch(sha):
            raise ValueError("not <model>/<file> with a sha256")
    except ValueError as e:
        raise RepositoryStateError(
            f"target {escape(tf.path, 120)} has no place in the served directory: {e}",
            hint="a target is <model>/<file>, the model a name `bundle build` accepts") from e
    return targets_dir / d / f"{sha}.{base}"


def served_dest(targets_dir: Path, tf: TargetFile) -> Path:
    """:func:`served_name`, its directory made: where a target is written.

    Raises:
        RepositoryStateError: as served_name, or the model's directory leads out of the
            served directory (a link planted there): nothing is written.
    """
    dest = served_name(targets_dir, tf)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.parent.resolve().is_relative_to(targets_dir.resolve()):
        raise RepositoryStateError(
            f"{escape(str(dest.parent), 200)} leads out of the served directory "
            f"{escape(str(targets_dir), 200)} (a link?): nothing written there",
            hint="each model's directory under REPO/targets must be a plain directory")
    return dest


def index_target(index_bytes: bytes, bundle_path: str) -> TargetFile:
    """The index's TUF target: its length and sha256, and the field naming its bundle."""
    tf = TargetFile.from_data(index_path(bundle_path), index_bytes, ["sha256"])
    tf.unrecognized_fields["custom"] = {INDEX_FIELD: {"bundle": bundle_path}}
    return tf


def indexed_bundle(tf: TargetFile) -> str | None:
    """The bundle path an index target names (None: not an index target)."""
    custom = tf.unrecognized_fields.get("custom")
    field = custom.get(INDEX_FIELD) if isinstance(custom, dict) else None
    bundle = field.get("bundle") if isinstance(field, dict) else None
    return bundle if isinstance(bundle, str) and is_index_path(tf.path) else None


@dataclass(frozen=True)
class NewIndex:
    """The index written for a new release (``target`` None: published without one)."""

    target: TargetFile | None
    index: ChunkIndex | None


def add_index(targets_dir: Path, served_bundle: Path, bundle_tf: TargetFile,
              check_path: Callable[[str], None] = lambda _p: None) -> NewIndex:
    """Cut the served copy of a verified bundle and serve its index (not yet signed).

    Args:
        targets_dir: the served targets directory.
        served_bundle: the copy just written there.
        bundle_tf: the bundle's target, made from the verified bytes.
        check_path: raises RepositoryStateError when the publishing role may not list
            the index's path (a team whose delegation does not reach it).

    Raises:
        OperatorInputError: the served copy is not the verified bytes (the bundle changed
            after it was verified); the copy is removed.
    """
    path = index_path(bundle_tf.path)
    try:
        check_path(path)
    except RepositoryStateError as e:
        logger.warning("%s: published without a chunk index (devices fetch the whole "
                       "bundle): %s", bundle_tf.path, e)
        return NewIndex(None, None)
    try:
        ix = build_index(served_bundle, bundle_tf.hashes["sha256"])
    except OperatorInputError as e:
        if _holds(served_bundle, bundle_tf):  # a valid layout the index cannot describe
            logger.warning("%s: published without a chunk index (devices fetch the whole "
                           "bundle): the index cannot describe its layout: %s",
                           bundle_tf.path, e)
            return NewIndex(None, None)
        served_bundle.unlink(missing_ok=True)  # (the name: a link is removed, not followed)
        raise OperatorInputError(
            f"{bundle_tf.path}: the bundle copied into the served directory is not the one "
            f"verified ({e}); nothing published",
            hint="do not change a bundle while it is being published; publish again") from e
    except ChunkIndexError as e:  # (e.g. more chunks than a device accepts)
        logger.warning("%s: published without a chunk index (devices fetch the whole "
                       "bundle): %s", bundle_tf.path, e)
        return NewIndex(None, None)
    data = ix.to_bytes()
    tf = index_target(data, bundle_tf.path)
    dest = served_dest(targets_dir, tf)
    write_atomic(dest, data)  # (a fresh temporary name: a link planted there is not followed)
    logger.info("%s: chunk index %s, %d chunks, %d bytes", bundle_tf.path, tf.path,
                ix.chunk_count, len(data))
    return NewIndex(tf, ix)


def _holds(path: Path, tf: TargetFile) -> bool:
    """Whether the file at ``path`` is exactly the bytes of ``tf`` (length, sha256)."""
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != tf.length:
                return False
            while block := f.read(1 << 20):
                sha.update(block)
    except OSError:
        return False
    return sha.hexdigest() == tf.hashes["sha256"]


# -- the operator view ------------------------------------------------------------


def estimate(version: str, new: ChunkIndex | None, index_length: int, full: int,
             old: ChunkIndex | None, note: str = "", *, withdrawn: bool = False
             ) -> FetchEstimate:
    """What a device holding ``old``'s chunks fetches for ``new`` (pure)."""
    if new is None or old is None:
        return FetchEstimate(version, None, full, index_length,
                             note or "the new release has no index", withdrawn)
    return FetchEstimate(version, fetch_bytes(new, chunk_hashes(old)) + index_length, full,
                         index_length, note, withdrawn)


@dataclass(frozen=True)
class Resolved:
    """The targets under a model's name as devices find them, and who signed what.

    Attributes:
        found: path -> the target TUF's delegation search returns for it (the role it
            ends at).
        listings: role -> the targets its verified metadata lists (the roles the search
            loaded).
    """

    found: Mapping[str, Found]
    listings: Mapping[str, Mapping[str, TargetFile]]

    def signed(self, role: str, bundle: Found) -> bool:
        """Whether ``role`` signed exactly ``bundle``'s bytes: it is the role devices take
        the release from, or it lists the same path with the same length and hashes (a
        team's release under an operator's tombstone or pin)."""
        if role == bundle.role:
            return True
        t = self.listings.get(role, {}).get(bundle.path)
        return t is not None and t.length == bundle.target.length and \
            t.hashes == bundle.target.hashes


def old_index(targets_dir: Path, bundle: Found, resolved: Resolved
              ) -> tuple[ChunkIndex | None, str]:
    """The chunks of an earlier release: from its signed index, else cut from its bundle.

    The release's index is the target at ``index_path(bundle)`` as devices find it
    (``resolved``: TUF's delegation search, each path from the role the search ends at),
    from a role that signed the release's very bytes (:meth:`Resolved.signed`): a
    listing the search does not end at (a team outside its delegation), or an index by
    a role that never signed the release (another team's "index" of the operator's
    release), is not the release's index.

    Nothing read from the served directory is believed before it matches the signed
    metadata: the index file its target's length and sha256, the index the old bundle's
    signed length and sha256; the bundle file its signed sha256 (as it is cut).

    Returns:
        The index (None: unknown) and how it was found, or why not.
    """
    why = "it has no chunk index"
    tf = bundle.target
    ifound = resolved.found.get(index_path(bundle.path))
    if ifound is not None and indexed_bundle(ifound.target) == bundle.path:
        if not resolved.signed(ifound.role, bundle):
            why = (f"its chunk index is signed by role {escape(ifound.role, 64)}, which did "
                   f"not sign the release (role {escape(bundle.role, 64)})")
        else:
            try:
                ix = _read_index(served_name(targets_dir, ifound.target), ifound.target)
                ix.check_bundle(tf.length, dict(tf.hashes), ifound.path)
                return ix, ""
            except (ChunkIndexError, ServedFileError, RepositoryStateError) as e:
                why = f"its chunk index is not usable: {e}"
    try:
        src = served_name(targets_dir, tf)
    except RepositoryStateError as e:
        return None, f"{why}, and its bundle has no place in the served directory ({e})"
    try:
        st = os.lstat(src)
    except OSError as e:
        return None, f"{why}, and its bundle is not in the served directory ({e.strerror})"
    if not stat.S_ISREG(st.st_mode) or st.st_size != tf.length:
        return None, f"{why}, and {src.name} is not its signed bundle"
    if tf.length > MAX_REBUILD_BYTES:
        return None, f"{why}, and its bundle is over {human(MAX_REBUILD_BYTES)}"
    try:
        return build_index(src, tf.hashes["sha256"]), f"{why}: cut from its bundle"
    except (OperatorInputError, ChunkIndexError, OSError) as e:
        return None, f"{why}, and its bundle could not be cut: {e}"


def _read_index(path: Path, tf: TargetFile) -> ChunkIndex:
    data = read_file(path, min(tf.length, MAX_INDEX_BYTES))
    if data is None:
        raise ChunkIndexError(f"{path.name} is not in the served directory", index=tf.path)
    if len(data) != tf.length or hashlib.sha256(data).hexdigest() != tf.hashes.get("sha256"):
        raise ChunkIndexError(f"{path.name} is not the signed index", index=tf.path)
    return parse_index(data, tf.path)


def _newest(found: Sequence[Found], fields: Callable[[TargetFile], dict[str, Any]]
            ) -> list[Found]:
    def key(f: Found) -> tuple[int, SemVer]:
        try:
            return 1, SemVer.parse(str(fields(f.target).get("version")))
        except ValueError:
            return 0, SemVer(0, 0, 0)  # (not a version devices would install: last)

    return sorted(found, key=key, reverse=True)


def estimates(targets_dir: Path, earlier: Sequence[Found], resolved: Resolved,
              new: NewIndex, full: int, fields: Callable[[TargetFile], dict[str, Any]]
              ) -> tuple[FetchEstimate, ...]:
    """One :class:`FetchEstimate` per earlier release (``earlier``: as devices find them;
    ``resolved``: every target under the model's name, likewise; see :func:`old_index`)."""
    length = new.target.length if new.target is not None else 0
    out = []
    for found in _newest(earlier, fields)[:MAX_ESTIMATES]:
        f = fields(found.target)
        version = str(f.get("version", "?"))
        if new.index is None:
            out.append(estimate(version, None, 0, full, None,
                                withdrawn=bool(f.get("withdrawn"))))
            continue
        old, note = old_index(targets_dir, found, resolved)
        out.append(estimate(version, new.index, length, full, old, note,
                            withdrawn=bool(f.get("withdrawn"))))
    return tuple(out)


def index_of_bytes(bundle: bytes) -> ChunkIndex:
    """The chunk index of a bundle held in memory (test harnesses), verified first.

    Raises:
        BundleFormatError: it is not a valid bundle.
    """
    import io
    import tempfile

    from modelward.updater.bundle._bundle import extract_bundle

    extract_bundle(io.BytesIO(bundle), None, "bundle")
    with tempfile.NamedTemporaryFile(prefix="modelward-index-") as f:
        f.write(bundle)
        f.flush()
        return build_index(Path(f.name), hashlib.sha256(bundle).hexdigest())
