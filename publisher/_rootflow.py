"""Root changes by TUF's rules: when a new root may be published, and what it still lacks.

A device holding root N accepts root N+1 only if N+1 carries the threshold of root N's
root keys *and* the threshold of its own root keys (TUF specification 5.3.4, 5.3.5).
:func:`root_gaps` is the one decision every path that writes a root goes through.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError
from securesystemslib.signer import Key
from tuf.api.metadata import Metadata, Root

from modelward.publisher._keys import ENCFILE, ROLES, SignerRegistry, is_inside
from modelward.publisher.errors import RepositoryStateError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SignatureGap:
    """One threshold a new root does not meet yet.

    Attributes:
        which: ``"previous"`` (root N's keys) or ``"own"`` (root N+1's keys).
        version: the root version whose root keys must sign.
        have, need: valid signatures by those keys, and their threshold.
        unsigned: keyids of those keys that have not signed (validly) yet.
    """

    which: str
    version: int
    have: int
    need: int
    unsigned: tuple[str, ...]

    @property
    def missing(self) -> int:
        return self.need - self.have


def valid_root_signers(md: Metadata[Root], by: Root) -> set[str]:
    """Keyids of ``by``'s root role whose signature on ``md`` verifies."""
    out = set()
    for keyid in by.roles[Root.type].keyids:
        sig = md.signatures.get(keyid)
        if sig is None:
            continue
        try:
            by.get_key(keyid).verify_signature(sig, md.signed_bytes)
        except (UnverifiedSignatureError, VerificationError):
            logger.warning("ignoring an invalid root signature by key %s", keyid[:16])
            continue
        out.add(keyid)
    return out


def root_gaps(previous: Root | None, new: Metadata[Root]) -> list[SignatureGap]:
    """What ``new`` still lacks to be accepted by a device trusting ``previous``.

    Args:
        previous: the published root N (None for version 1, which devices are
            provisioned with).
        new: root N+1 with the signatures it has so far.

    Returns:
        The unmet thresholds (empty: publishable).

    Raises:
        RepositoryStateError: ``new`` is not version N+1 (devices walk roots one by one).
    """
    if previous is not None and new.signed.version != previous.version + 1:
        raise RepositoryStateError(
            f"root v{new.signed.version} cannot follow the published root v{previous.version}"
            f": devices accept only v{previous.version + 1}",
            hint="the pending root is stale; delete it from KEYS/pending/ and redo the change")
    gaps = []
    checks = [("own", new.signed)] if previous is None else \
        [("previous", previous), ("own", new.signed)]
    for which, by in checks:
        role = by.roles[Root.type]
        signed = valid_root_signers(new, by)
        if len(signed) < role.threshold:
            gaps.append(SignatureGap(which, by.version, len(signed), role.threshold,
                                     tuple(k for k in role.keyids if k not in signed)))
    return gaps


def describe_gaps(version: int, gaps: list[SignatureGap], uris: Mapping[str, str]) -> str:
    """One line per gap: whose keys, how many more, and which keys (with their URIs)."""
    parts = []
    for g in gaps:
        whose = f"the previous root v{g.version}'s root keys" if g.which == "previous" else \
            f"root v{version}'s own root keys"
        keys = ", ".join(f"{k[:16]} ({uris.get(k, 'no URI registered')})" for k in g.unsigned)
        parts.append(f"{g.missing} more signature(s) by {whose} (threshold {g.need}, "
                     f"have {g.have}; not yet signed by: {keys})")
    return "; ".join(parts)


class RootNotPublishableError(RepositoryStateError):
    """A new root lacks signatures devices require; it waits in ``KEYS/pending/``.

    Publishing it would strand every device: they reject it and stop updating.

    Attributes:
        role: ``"root"``.
        version: the parked root's version.
        gaps: the unmet thresholds.
        pending: where the root waits.
        have, need: signatures and threshold of the first unmet check.
    """

    def __init__(self, version: int, gaps: list[SignatureGap], uris: Mapping[str, str],
                 pending: Path) -> None:
        first = next((uris[k] for g in gaps for k in g.unsigned if k in uris), "URI")
        super().__init__(
            f"root v{version} is not published: devices would reject it. Missing: "
            f"{describe_gaps(version, gaps, uris)}; it waits in {pending}",
            hint=f"add signatures with `modelward repo sign root --key {first}`; "
                 "until then every key in use stays valid")
        self.role, self.version, self.gaps, self.pending = "root", version, gaps, pending
        self.have, self.need = gaps[0].have, gaps[0].need


class RootExpiredError(RepositoryStateError):
    """A new root that is already expired (it waited too long for signatures): every
    device would reject it, so it is never published.

    Attributes:
        version: the root's version.
        expires: when it expired.
        pending: where it waits (to be deleted and the change made again).
    """

    def __init__(self, version: int, expires: datetime, pending: Path) -> None:
        super().__init__(
            f"root v{version} expired at {expires.isoformat()} while it waited for "
            "signatures: devices would reject it; it is not published",
            hint=f"delete {pending} and make the change again (`repo rotate`, `repo "
                 "add-key`): the new root gets a fresh expiry")
        self.version, self.expires, self.pending = version, expires, pending


def refuse_expired_root(root: Root, now: datetime, pending: Path) -> None:
    """Raises RootExpiredError if ``root`` is expired at ``now``."""
    if root.is_expired(now):
        raise RootExpiredError(root.version, root.expires, pending)


def entries_keyid(entries: Mapping[str, str], uri: str) -> str | None:
    """The keyid registered for ``uri`` (None: not registered)."""
    return next((k for k, u in entries.items() if u == uri), None)


def default_uri(role: str, keys: Mapping[str, Key], entries: Mapping[str, str]) -> str:
    """The URI of the key that signs ``role`` when none is given, chosen by keyid among
    ``keys`` (the keys the root in force lists for the role): the one registered as
    ``encfile:<role>.pem`` if it is among them, else the first registered encrypted file
    among them (a key rotated in, still in ``KEYS/rotating/``), else any registered one.
    ``encfile:<role>.pem`` only when no key of the role is registered at all (a repository
    from before the registry; :meth:`Repository._write` checks that file's keyid)."""
    preferred = f"{ENCFILE}:{role}.pem"
    mine = [entries[k] for k in keys if k in entries]
    if preferred in mine:
        return preferred
    files = sorted(u for u in mine if u.startswith(f"{ENCFILE}:"))
    return (files or sorted(mine) or [preferred])[0]


def signing_uris(role: str, keys: Mapping[str, Key], entries: Mapping[str, str],
                 need: int) -> list[str]:
    """URIs of up to ``need`` keys among ``keys`` (by keyid), the default one first: the
    candidates to sign ``role`` metadata with when no URIs are given."""
    first = default_uri(role, keys, entries)
    rest = sorted(entries[k] for k in keys if k in entries and entries[k] != first)
    return ([first] + rest)[:max(need, 1)]


class UnsafeKeyPathError(RepositoryStateError):
    """A registry entry names a key file outside KEYS (``..``, an absolute path, a
    symbolic link): it is never moved, renamed or deleted.

    Attributes:
        uri: the registry entry.
    """

    def __init__(self, uri: str, why: str) -> None:
        super().__init__(f"the key registry entry {uri!r} {why}; the file is left alone",
                         hint="fix KEYS/signers.json: encfile: URIs name files inside KEYS")
        self.uri = uri


def key_file_inside(keys_dir: Path, rest: str) -> Path:
    """The file an ``encfile:`` URI names, checked to lie inside ``keys_dir``.

    Raises:
        UnsafeKeyPathError: absolute, with a ``..`` part, a symbolic link, or resolving
            outside ``keys_dir``.
    """
    parts = Path(rest).parts
    uri = f"{ENCFILE}:{rest}"
    if not rest or Path(rest).is_absolute() or ".." in parts or "\\" in rest:
        raise UnsafeKeyPathError(uri, "is not a plain path inside KEYS")
    path = keys_dir / rest
    here = keys_dir
    for part in parts:
        here = here / part
        if here.is_symlink():
            raise UnsafeKeyPathError(uri, f"goes through the symbolic link {here}")
    if not is_inside(path, keys_dir):
        raise UnsafeKeyPathError(uri, f"resolves outside {keys_dir}")
    return path


def _move(registry: SignerRegistry, keyid: str, src: Path, dst: Path) -> None:
    """Move a key file and its registry entry. Idempotent, and a crash at any step leaves
    every registered name pointing at its key: a hard link first, then the registry,
    the old name dropped last; run again, it finishes a move it finds half done.

    Raises:
        UnsafeKeyPathError: ``dst`` exists and is another file (never overwritten).
    """
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not dst.exists():
        os.link(src, dst, follow_symlinks=False)  # (the key file's name, never a link's target)
    elif not os.path.samefile(src, dst):
        raise UnsafeKeyPathError(f"{ENCFILE}:{dst.relative_to(registry.keys_dir)}",
                                 f"is taken by another file than {src}")
    registry.add(keyid, f"{ENCFILE}:{dst.relative_to(registry.keys_dir).as_posix()}")
    src.unlink()


def _unregistered(keys_dir: Path, path: Path, entries: Mapping[str, str]) -> bool:
    return f"{ENCFILE}:{path.relative_to(keys_dir).as_posix()}" not in entries.values()


def retire_key_files(keys_dir: Path, registry: SignerRegistry, previous: Root,
                     new: Root) -> None:
    """After ``new`` is published: key files of keys it no longer lists move to
    ``KEYS/retired/``; keys it brought in from ``KEYS/rotating/`` take the role's
    default name (``<role>.pem``) once that is free.

    Idempotent and crash-safe: run again (``complete_root_change``), it finishes what a
    crash left half done; a ``<role>.pem`` that no registry entry names and that is the
    same file as a retired key (left by a crash) is dropped. Files outside KEYS are never
    touched (:func:`key_file_inside`). Signing never depends on these names: keys are
    chosen by keyid through the registry.
    """
    in_use = {k for r in ROLES for k in new.roles[r].keyids}
    for role in ROLES:
        dst = keys_dir / f"{role}.pem"
        entries = registry.entries()
        for keyid in previous.roles[role].keyids:
            uri = entries.get(keyid, "")
            scheme, _, rest = uri.partition(":")
            if keyid in in_use or scheme != ENCFILE:
                continue
            try:
                src = key_file_inside(keys_dir, rest)
            except UnsafeKeyPathError as e:
                logger.warning("%s", e)
                continue
            if not rest.startswith("retired/") and src.exists():
                _move(registry, keyid, src, keys_dir / "retired" / f"{role}-{keyid[:16]}.pem")
                src = keys_dir / "retired" / f"{role}-{keyid[:16]}.pem"
            entries = registry.entries()
            if dst.is_file() and not dst.is_symlink() and src.exists() and \
                    os.path.samefile(dst, src) and _unregistered(keys_dir, dst, entries):
                dst.unlink()  # a stale <role>.pem: the retired key under the default name
        entries = registry.entries()
        for keyid in new.roles[role].keyids:
            scheme, _, rest = entries.get(keyid, "").partition(":")
            if scheme != ENCFILE or not rest.startswith("rotating/"):
                continue
            try:
                src = key_file_inside(keys_dir, rest)
            except UnsafeKeyPathError as e:
                logger.warning("%s", e)
                continue
            if src.exists() and (not dst.exists() or (
                    not dst.is_symlink() and os.path.samefile(src, dst))):
                _move(registry, keyid, src, dst)
