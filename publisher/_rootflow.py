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
from pathlib import Path

from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError
from securesystemslib.signer import Key
from tuf.api.metadata import Metadata, Root

from publisher._keys import ENCFILE, ROLES, SignerRegistry
from publisher.errors import RepositoryStateError

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


def entries_keyid(entries: Mapping[str, str], uri: str) -> str | None:
    """The keyid registered for ``uri`` (None: not registered)."""
    return next((k for k, u in entries.items() if u == uri), None)


def default_uri(role: str, keys: Mapping[str, Key], entries: Mapping[str, str]) -> str:
    """The key that signs ``role`` when no URI is given: ``encfile:<role>.pem`` while the
    root in force lists it (or no registry knows it: a repository from before), else the
    first registered encrypted file among ``keys`` (a key rotated in, still in
    ``KEYS/rotating/``)."""
    preferred = f"{ENCFILE}:{role}.pem"
    keyid = entries_keyid(entries, preferred)
    if keyid is None or keyid in keys:
        return preferred
    files = sorted(entries[k] for k in keys if k in entries and
                   entries[k].startswith(f"{ENCFILE}:"))
    return files[0] if files else preferred


def _move(registry: SignerRegistry, keyid: str, src: Path, dst: Path) -> None:
    """Move a key file and its registry entry; a crash at any step leaves the file under
    the name the registry gives (a hard link first, the old name dropped last)."""
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not dst.exists():
        os.link(src, dst)
    registry.add(keyid, f"{ENCFILE}:{dst.relative_to(registry.keys_dir).as_posix()}")
    src.unlink()


def retire_key_files(keys_dir: Path, registry: SignerRegistry, previous: Root,
                     new: Root) -> None:
    """After ``new`` is published: key files of keys it no longer lists move to
    ``KEYS/retired/``; keys it brought in from ``KEYS/rotating/`` take the role's
    default name (``<role>.pem``) once that is free."""
    in_use = {k for r in ROLES for k in new.roles[r].keyids}
    for role in ROLES:
        entries = registry.entries()
        for keyid in previous.roles[role].keyids:
            uri = entries.get(keyid, "")
            scheme, _, rest = uri.partition(":")
            if keyid in in_use or scheme != ENCFILE or rest.startswith("retired/"):
                continue
            src = keys_dir / rest
            if src.exists():
                _move(registry, keyid, src, keys_dir / "retired" / f"{role}-{keyid[:16]}.pem")
        entries = registry.entries()
        for keyid in new.roles[role].keyids:
            scheme, _, rest = entries.get(keyid, "").partition(":")
            dst = keys_dir / f"{role}.pem"
            if scheme == ENCFILE and rest.startswith("rotating/") and not dst.exists() \
                    and (keys_dir / rest).exists():
                _move(registry, keyid, keys_dir / rest, dst)
