"""What the served history says was published, as floors only: never content to adopt.

Two rules for the next change the repository signs:

- **Lost targets** (:func:`lost_targets`): a snapshot the snapshot keys signed (the served
  one, or an older ``N.snapshot.json`` still in ``metadata/``), or ``KEYS/published.json``,
  names a top-level targets version above the one the next change builds on, and no file
  of that version is left at all. Devices may hold it (a withdraw, a halt): building on an
  older version would undo it under the targets key. The change is refused, naming the
  missing file and who names it (``KEYS`` restored from an older backup and the newer
  targets removed from ``metadata/``; or an online host naming a version it never had). A
  file that is present but does not verify is the online host's forgery, not lost history:
  :mod:`modelward.publisher._offline_base` builds on, with a warning.
- **Delegated roles** (:func:`delegated_meta`): the next snapshot's entry for each team
  role is computed from the role's newest file that verifies through the delegation tree
  (length and sha256 of those bytes); the served snapshot contributes only a version floor
  (devices that took it refuse a lower one), never a length, a hash or a version it
  merely claims when a verified file of that version exists. A team role's next version
  is above both (:func:`next_role_version`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot

from modelward.publisher._online_state import read_or_ignore
from modelward.publisher._served import versions
from modelward.publisher.errors import RepositoryStateError

logger = logging.getLogger(__name__)

HISTORY_SNAPSHOTS = 32  # newest N.snapshot.json files read for lost history, each bounded
MAX_VERSION = 2**53 - 1  # the largest integer every JSON reader keeps exact


class LostTargetsError(RepositoryStateError):
    """A targets version devices may hold is gone: the next change would undo it.

    Attributes:
        path: the missing ``N.targets.json``.
        named_by: the file that names that version.
    """

    def __init__(self, path: Path, named_by: Path, base: int) -> None:
        super().__init__(
            f"{named_by} names targets v{path.name.split('.', 1)[0]}, but {path} is missing "
            f"and this tool holds only v{base} (KEYS restored from an older backup?): "
            f"building on v{base} would undo what the newer targets changed (a withdraw, a "
            "halt) on every device; nothing was written",
            hint=f"put {path.name} back into {path.parent} (a backup of the served "
                 "directory, the CDN's copy, or a device's trusted targets.json); if this "
                 "tool never signed that version, the online host is compromised: rotate "
                 "the snapshot and timestamp keys and remove the snapshots naming it")
        self.path = path
        self.named_by = named_by


def _signed_snapshot(md: Metadata[Any], root: Root) -> bool:
    try:
        root.verify_delegate("snapshot", md.signed_bytes, md.signatures)
    except UnsignedMetadataError:
        return False
    return True


def named_targets(metadata_dir: Path, roots: list[Root], served: tuple[int, Path],
                  floor: tuple[int, Path]) -> tuple[int, Path]:
    """The highest top-level targets version named as published, and by which file: the
    served snapshot, ``floor`` (``KEYS/published.json``), or any of the newest
    ``HISTORY_SNAPSHOTS`` ``N.snapshot.json`` the snapshot keys of the newest root of
    ``roots`` signed (each bounded, never through a symlink; signatures checked only for a
    higher claim). Only the newest root's keys: once a compromised online host's keys are
    rotated out, the snapshots it signed no longer count."""
    best = max(served, floor, key=lambda x: x[0])
    for tried, v in enumerate(versions(metadata_dir, "snapshot")):
        if tried >= HISTORY_SNAPSHOTS:
            break
        path = metadata_dir / f"{v}.snapshot.json"
        got = read_or_ignore(path, logger.debug)
        if got is None or not isinstance(got[0].signed, Snapshot):
            continue
        meta = got[0].signed.meta.get("targets.json")
        if meta is None or meta.version <= best[0]:
            continue
        if _signed_snapshot(got[0], roots[-1]):
            best = (meta.version, path)
    return best


def lost_targets(metadata_dir: Path, base: int, named: tuple[int, Path]) -> None:
    """Refuse to build on targets ``base`` when ``named`` (version, file naming it) is
    above it and no ``N.targets.json`` of that version is present at all.

    Raises:
        LostTargetsError: naming the missing file and the file naming it.
    """
    version, by = named
    if version <= base:
        return
    path = metadata_dir / f"{version}.targets.json"
    if path.is_symlink() or path.exists():
        return  # present but not signed by the targets keys: a forgery (warned elsewhere)
    raise LostTargetsError(path, by, base)


def next_role_version(verified: int, listed: MetaFile | None) -> int:
    """A team role's next version: above its newest verified file and above the version
    the served snapshot lists (devices that took that snapshot refuse a lower one).

    Raises:
        RepositoryStateError: that is beyond what can be published (a snapshot naming a
            version no JSON reader keeps exact).
    """
    out = max(verified, listed.version if listed is not None else 0) + 1
    if out > MAX_VERSION:
        raise RepositoryStateError(
            f"the served snapshot lists a team role at v{out - 1}: no version above it can "
            f"be published (at most v{MAX_VERSION})",
            hint="the online host is compromised: rotate the snapshot and timestamp keys")
    return out


def delegated_meta(listed: Mapping[str, MetaFile], verified: Mapping[str, int],
                   signed_meta: Callable[[str, int], MetaFile],
                   snapshot: Path) -> dict[str, MetaFile]:
    """The next snapshot's entries for the delegated roles (module docstring).

    ``listed``: the served snapshot's entries (``<role>.json``, top-level targets left
    out); ``verified``: each role of the delegation tree -> its newest verified version;
    ``signed_meta(role, version)``: the entry computed from that file.
    """
    out: dict[str, MetaFile] = {}
    for name in sorted({*listed, *(f"{r}.json" for r in verified)}):
        role = name[:-len(".json")]
        have = verified.get(role)
        old = listed.get(name)
        if have is not None and (old is None or have >= old.version):
            meta = signed_meta(role, have)
            if old is not None and old.version == have and \
                    (old.length, old.hashes) != (meta.length, meta.hashes):
                logger.warning("%s lists %s v%d with a length or hash other than the "
                               "verified %d.%s: listing the verified file's", snapshot,
                               name, have, have, name)
            out[name] = meta
            continue
        assert old is not None
        if have is not None:
            logger.warning("%s lists %s v%d, but the newest %s file that verifies is v%d "
                           "(removed, or never signed): kept as a floor (devices that took "
                           "that snapshot refuse a lower version); the team's next publish "
                           "is numbered above it", snapshot, name, old.version, role, have)
        else:
            logger.debug("%s lists %s v%d, not in the delegation tree: kept (devices "
                         "refuse a snapshot that drops a role)", snapshot, name, old.version)
        out[name] = old
    return out


class TeamKeyNotTrustedError(RepositoryStateError):
    """The key in ``KEYS/delegated-<role>.pem`` signs metadata the role's delegator does
    not accept (another team's key, an old one put back): devices would never see it.

    Attributes:
        role: the delegated role.
        key_file: the key file at fault.
    """

    def __init__(self, role: str, key_file: Path, delegator: str, why: str) -> None:
        super().__init__(
            f"{key_file} signs {role!r} metadata that {delegator!r} does not accept ({why}): "
            "devices would never see the change; nothing was written",
            hint=f"put {role!r}'s own key back in {key_file}, or have {delegator!r} "
                 f"delegate to this key (`repo delegate`)")
        self.role = role
        self.key_file = key_file


def check_team_signature(md: Metadata[Any], role: str, key_file: Path,
                         delegators: Mapping[str, Any]) -> None:
    """``md`` (signed for ``role``) meets the threshold of a role in ``delegators`` (role
    name -> verified Targets) that delegates ``role``.

    Raises:
        TeamKeyNotTrustedError: no delegator of ``role`` accepts it.
    """
    for name, t in delegators.items():
        if t.delegations is None or not t.delegations.roles or role not in t.delegations.roles:
            continue
        try:
            t.verify_delegate(role, md.signed_bytes, md.signatures)
            return
        except (UnsignedMetadataError, ValueError) as e:
            raise TeamKeyNotTrustedError(role, key_file, name, str(e)) from e
    raise TeamKeyNotTrustedError(role, key_file, "targets", f"no role delegates {role!r}")
