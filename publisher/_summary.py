"""What a signer signs: pending metadata compared with what is published, as text lines.

Pure: :func:`summarize` takes two ``Metadata`` objects and returns lines, and
:func:`check_pending` takes the pending file's bytes and the trusted root and decides
whether it may be signed. Every string that came from a team, a device or the pending
file itself (paths, model names, versions, role names) goes through :func:`escape` before
it reaches a terminal.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError
from securesystemslib.signer import Key
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError

from publisher.errors import RepositoryStateError
from trust import _display as display

MAX_PENDING = 64 * 1024 * 1024  # bytes: a pending metadata file (a large targets role)
MAX_SHOWN = 200  # characters of one untrusted string on the terminal

def escape(value: object, limit: int = MAX_SHOWN) -> str:
    """``value`` (JSON of it if it is not a string) as one printable line
    (:func:`trust._display.escape`)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return display.escape(text, limit)


# --- pending file checks -------------------------------------------------------------


class PendingMetadataError(RepositoryStateError):
    """A pending metadata file cannot be signed as it is.

    Attributes:
        path: the pending file.
    """

    def __init__(self, message: str, *, path: Path, hint: str = "") -> None:
        super().__init__(message, hint=hint or f"remove {path} and make the change again "
                         "(nothing was published; the file is left as it is)")
        self.path = path


class PendingChangedError(PendingMetadataError):
    """The pending file was edited after it was signed: signatures on it do not verify.

    Attributes:
        path: the pending file.
        keyids: the keys whose signatures fail (or are unknown).
    """

    def __init__(self, path: Path, role: str, failing: Mapping[str, str]) -> None:
        listed = ", ".join(f"{k[:16]} ({why})" for k, why in sorted(failing.items()))
        super().__init__(
            f"{path} was changed after it was signed: {len(failing)} signature(s) on the "
            f"pending {role} metadata no longer verify over its bytes: {listed}; "
            "refusing to add a signature (nothing published, the file is left as it is)",
            path=path,
            hint=f"find out who edited {path}; then remove it and make the change again")
        self.role, self.keyids = role, sorted(failing)


class PendingReviewError(PendingMetadataError):
    """The pending file changed between the summary the signer saw and the signing."""


@dataclass(frozen=True)
class Pending:
    """A pending file, parsed and checked: what :func:`summarize` shows and what is
    signed are the same bytes (``digest``)."""

    path: Path
    md: Metadata  # type: ignore[type-arg]
    digest: str


def check_pending(path: Path, data: bytes, role: str, trusted_root: Root,
                  published_version: int | None) -> Pending:
    """Decide whether the pending ``data`` (read from ``path``) may get another signature.

    Refused: more than :data:`MAX_PENDING` bytes, not metadata, another role's type, a
    version other than the file name's, not newer than the published one (a root: not
    the next one, the only one TUF clients load next), or any
    signature that does not verify over these bytes with a key of the trusted root (for
    root also of the pending root itself).

    Raises:
        PendingMetadataError: naming the file and the reason.
        PendingChangedError: a signature on it fails: it was edited after signing.
    """
    if not re.fullmatch(rf"[0-9]{{1,12}}\.{role}\.json", path.name):
        # Not a name the repository writes; and the name is printed from here on.
        raise PendingMetadataError(
            f"{escape(str(path.parent))}/{escape(path.name)} is not a pending {role} file "
            f"(VERSION.{role}.json)", path=path,
            hint=f"remove it from {escape(str(path.parent))}")
    if len(data) > MAX_PENDING:
        raise PendingMetadataError(f"{path} is {len(data)} bytes, more than {MAX_PENDING}",
                                   path=path)
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except (DeserializationError, RecursionError, ValueError, TypeError) as e:
        raise PendingMetadataError(f"{path} is not TUF metadata: {escape(str(e))}",
                                   path=path) from e
    if md.signed.type != role:
        raise PendingMetadataError(
            f"{path} holds {escape(md.signed.type)} metadata, not {role}", path=path)
    name_version = path.name.split(".", 1)[0]
    if name_version != str(md.signed.version):
        raise PendingMetadataError(
            f"{path} holds {role} version {md.signed.version}, not the {name_version} its "
            "name says", path=path)
    if published_version is not None and md.signed.version <= published_version:
        raise PendingMetadataError(
            f"{path} is {role} version {md.signed.version}, but version {published_version} "
            "is published already: it is stale (publishing it would replace or roll back "
            "published metadata)", path=path)
    if role == "root" and published_version is not None and \
            md.signed.version != published_version + 1:
        raise PendingMetadataError(
            f"{path} is root version {md.signed.version}, but devices trusting the published "
            f"version {published_version} load only version {published_version + 1} next",
            path=path)
    keys: dict[str, Key] = dict(trusted_root.keys)
    if isinstance(md.signed, Root):
        keys.update(md.signed.keys)
    failing: dict[str, str] = {}
    for keyid, sig in md.signatures.items():
        key = keys.get(keyid)
        if key is None:
            failing[keyid] = "not a key of the trusted or the pending root"
            continue
        try:
            key.verify_signature(sig, md.signed_bytes)
        except (UnverifiedSignatureError, VerificationError):
            failing[keyid] = "does not verify"
    if failing:
        raise PendingChangedError(path, role, failing)
    return Pending(path, md, hashlib.sha256(data).hexdigest())


# --- the summary -------------------------------------------------------------------


def _when(d: datetime) -> str:
    return d.isoformat()


def _key(keyid: str, key: Key | None) -> str:
    kind = f" {escape(key.keytype)}/{escape(key.scheme)}" if key is not None else ""
    return f"{escape(keyid[:16])}{kind}"


def _root_lines(old: Root | None, new: Root) -> list[str]:
    lines: list[str] = []
    old_roles = old.roles if old is not None else {}
    for name in sorted(set(old_roles) | set(new.roles)):
        was, now = old_roles.get(name), new.roles.get(name)
        if now is None:
            lines.append(f"  - role {escape(name)} removed")
            continue
        if was is None:
            lines.append(f"  + role {escape(name)}: threshold {now.threshold} of "
                         f"{len(now.keyids)} keys")
        elif was.threshold != now.threshold:
            lines.append(f"  ~ {escape(name)} threshold {was.threshold} -> {now.threshold} "
                         f"(of {len(now.keyids)} keys)")
        before = set(was.keyids) if was is not None else set()
        for keyid in sorted(set(now.keyids) - before):
            lines.append(f"  + {escape(name)} key {_key(keyid, new.keys.get(keyid))}")
        for keyid in sorted(before - set(now.keyids)):
            lines.append(f"  - {escape(name)} key "
                         f"{_key(keyid, old.keys.get(keyid) if old else None)}")
    if old is not None and old.consistent_snapshot != new.consistent_snapshot:
        lines.append(f"  ~ consistent_snapshot {old.consistent_snapshot} -> "
                     f"{new.consistent_snapshot}")
    return lines


def _fields(t: TargetFile) -> dict[str, Any]:
    f = t.custom.get("modelward") if isinstance(t.custom, dict) else None
    return f if isinstance(f, dict) else {}


def _rollout(f: Mapping[str, Any]) -> str:
    r = f.get("rollout")
    if not isinstance(r, dict):
        return escape(r) if r is not None else "100%"
    bp = r.get("basis_points")
    share = f"{bp / 100:g}%" if type(bp) is int else escape(bp)
    return share + (", HALTED" if r.get("halted") is True else "")


def _describe(path: str, t: TargetFile) -> str:
    f = _fields(t)
    flags = [w.upper() for w in ("pinned", "withdrawn") if f.get(w) is True]
    sha = t.hashes.get("sha256", "") if isinstance(t.hashes, dict) else ""
    return (f"{escape(path)}: model {escape(f.get('name', '?'))} version "
            f"{escape(f.get('version', '?'))} fingerprint {escape(f.get('fingerprint', '?'))}"
            f" channel {escape(f.get('channel', 'stable'))} rollout {_rollout(f)}"
            + (f" {' '.join(flags)}" if flags else "")
            + f"; {t.length} bytes sha256 {escape(sha[:16])}")


def _target_changes(path: str, was: TargetFile, now: TargetFile) -> list[str]:
    a, b = _fields(was), _fields(now)
    out = []
    for field in ("name", "version", "fingerprint", "channel"):
        if a.get(field) != b.get(field):
            out.append(f"{field} {escape(a.get(field, '-'))} -> {escape(b.get(field, '-'))}")
    if _rollout(a) != _rollout(b):
        out.append(f"rollout {_rollout(a)} -> {_rollout(b)}")
    for flag in ("pinned", "withdrawn"):
        if (a.get(flag) is True) != (b.get(flag) is True):
            out.append(("now " if b.get(flag) is True else "no longer ") + flag.upper())
    other = {k for k in set(a) | set(b)
             if k not in ("name", "version", "fingerprint", "channel", "rollout", "pinned",
                          "withdrawn") and a.get(k) != b.get(k)}
    for k in sorted(other, key=str):
        out.append(f"{escape(k)} {escape(a.get(k, '-'))} -> {escape(b.get(k, '-'))}")
    if was.length != now.length or was.hashes != now.hashes:
        out.append(f"BYTES CHANGED: {was.length} -> {now.length} bytes, sha256 "
                   f"{escape(str(was.hashes.get('sha256', ''))[:16])} -> "
                   f"{escape(str(now.hashes.get('sha256', ''))[:16])}")
    if was.unrecognized_fields.keys() - {"custom"} != now.unrecognized_fields.keys() - {"custom"}:
        out.append("other fields changed")
    return [f"  ~ {escape(path)}: {c}" for c in out] if out else []


def _delegation_lines(old: Delegations | None, new: Delegations | None) -> list[str]:
    def roles(d: Delegations | None) -> dict[str, DelegatedRole]:
        return dict(d.roles) if d is not None and d.roles else {}

    def keys(d: Delegations | None) -> dict[str, Key]:
        return dict(d.keys) if d is not None else {}

    def scope(r: DelegatedRole) -> str:
        what = f"paths {escape(r.paths)}" if r.paths is not None else \
            f"hash prefixes {escape(r.path_hash_prefixes)}"
        return f"{what}, threshold {r.threshold}" + ("" if r.terminating else
                                                     ", non-terminating")

    lines = []
    a, b = roles(old), roles(new)
    for name in sorted(set(a) | set(b)):
        was, now = a.get(name), b.get(name)
        if now is None:
            lines.append(f"  - delegation to {escape(name)} removed")
            continue
        if was is None:
            lines.append(f"  + delegation to {escape(name)}: {scope(now)}, keys "
                         + ", ".join(_key(k, keys(new).get(k)) for k in now.keyids))
            continue
        if scope(was) != scope(now):
            lines.append(f"  ~ delegation to {escape(name)}: {scope(was)} -> {scope(now)}")
        for k in sorted(set(now.keyids) - set(was.keyids)):
            lines.append(f"  + delegation to {escape(name)}: key {_key(k, keys(new).get(k))}")
        for k in sorted(set(was.keyids) - set(now.keyids)):
            lines.append(f"  - delegation to {escape(name)}: key {_key(k, keys(old).get(k))}")
    return lines


def _targets_lines(old: Targets | None, new: Targets) -> list[str]:
    before = old.targets if old is not None else {}
    lines = [f"  + {_describe(p, new.targets[p])}" for p in sorted(set(new.targets) - set(before))]
    lines += [f"  - {_describe(p, before[p])}" for p in sorted(set(before) - set(new.targets))]
    for p in sorted(set(before) & set(new.targets)):
        lines += _target_changes(p, before[p], new.targets[p])
    return lines + _delegation_lines(old.delegations if old else None, new.delegations)


def _snapshot_lines(old: Snapshot | None, new: Snapshot) -> list[str]:
    before = old.meta if old is not None else {}
    lines = []
    for name in sorted(set(before) | set(new.meta)):
        was, now = before.get(name), new.meta.get(name)
        if now is None:
            lines.append(f"  - {escape(name)} (was v{was.version if was else '?'})")
        elif was is None:
            lines.append(f"  + {escape(name)} v{now.version}")
        elif was.version != now.version:
            lines.append(f"  ~ {escape(name)} v{was.version} -> v{now.version}")
    return lines


def summarize(role: str, old: Metadata | None, new: Metadata,  # type: ignore[type-arg]
              now: datetime | None = None) -> list[str]:
    """What signing ``new`` changes compared with the published ``old`` (None: nothing
    published), as lines for a terminal: a header with the role, versions and expiry,
    then one line per change (``+`` added, ``-`` removed, ``~`` changed)."""
    o, n = (old.signed if old is not None else None), new.signed
    head = f"{escape(role)}: version {o.version if o is not None else '(none)'} -> " \
           f"{n.version}"
    if o is not None and n.version != o.version + 1:
        head += f" (NOT the next version: {o.version + 1} expected)"
    lines = [head]
    expires = f"  expires {_when(n.expires)}"
    if o is not None:
        expires += f" (published: {_when(o.expires)})"
    if now is not None and n.expires <= now:
        expires += " ALREADY EXPIRED"
    lines.append(expires)
    body: list[str]
    if isinstance(n, Root):
        body = _root_lines(o if isinstance(o, Root) else None, n)
    elif isinstance(n, Targets):
        body = _targets_lines(o if isinstance(o, Targets) else None, n)
    elif isinstance(n, Snapshot):
        body = _snapshot_lines(o if isinstance(o, Snapshot) else None, n)
    elif isinstance(n, Timestamp):
        was = o.snapshot_meta.version if isinstance(o, Timestamp) else None
        body = [] if was == n.snapshot_meta.version else \
            [f"  ~ snapshot v{was if was is not None else '(none)'} -> "
             f"v{n.snapshot_meta.version}"]
    else:  # pragma: no cover - Metadata parses only the four types
        body = [f"  {escape(n.type)} metadata"]
    lines += body or ["  no other change (re-signed with a new version and expiry)"]
    sigs = sorted(new.signatures)
    lines.append(f"  already signed by {len(sigs)} key(s)"
                 + (": " + ", ".join(escape(k[:16]) for k in sigs) if sigs else ""))
    return lines


__all__ = ["Pending", "PendingChangedError", "PendingMetadataError", "PendingReviewError",
           "check_pending", "escape", "summarize"]
