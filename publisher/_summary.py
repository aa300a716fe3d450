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

from securesystemslib.exceptions import FormatError, UnverifiedSignatureError, VerificationError
from securesystemslib.signer import Key
from securesystemslib.signer._utils import compute_default_keyid
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError, SerializationError

from modelward.publisher._indexpub import indexed_bundle
from modelward.publisher.errors import RepositoryStateError
from modelward.trust import _display as display
from modelward.trust._bounded import UnsafeFileError, read_bounded
from modelward.updater.bundle._fields import KNOWN, modelward_field, noncanonical, read_fields

MAX_PENDING = 64 * 1024 * 1024  # bytes: a pending metadata file (a large targets role)
MAX_SHOWN = 200  # characters of one untrusted string on the terminal

def escape(value: object, limit: int = MAX_SHOWN) -> str:
    """``value`` (JSON of it if it is not a string) as one printable line
    (:func:`modelward.trust._display.escape`)."""
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


def read_pending(path: Path) -> bytes:
    """The bytes of a pending file, read safely: ``KEYS/pending`` may hold what someone
    planted there. A symlink is not followed, a FIFO or device does not block and is
    refused (only a regular file is read), and at most :data:`MAX_PENDING` + 1 bytes are
    read before :func:`check_pending` refuses the size.

    Raises:
        PendingMetadataError: naming the file and what it is.
    """
    shown = escape(str(path))
    try:
        data = read_bounded(path, MAX_PENDING + 1, cut=True)
    except UnsafeFileError as e:
        raise PendingMetadataError(f"cannot read pending file {shown}: it {e.reason}",
                                   path=path) from e
    except OSError as e:
        raise PendingMetadataError(f"cannot read pending file {shown}: "
                                   f"{escape(e.strerror or str(e))}", path=path) from e
    if data is None:
        raise PendingMetadataError(f"cannot read pending file {shown}: it does not exist",
                                   path=path)
    return data


@dataclass(frozen=True)
class Pending:
    """A pending file, parsed and checked: what :func:`summarize` shows and what is
    signed are the same bytes (``digest``)."""

    path: Path
    md: Metadata  # type: ignore[type-arg]
    digest: str


def _check_keys(path: Path, new: Any, trusted_root: Root, published: Any) -> None:
    """A key table in pending metadata (a root's, a targets' delegations) may not put
    another key behind a keyid devices already trust, and a keyid it adds must be the hash
    of its key: else a summary by keyid, and every later signature count, would be about
    a key other than the one devices verify with.

    Raises:
        PendingMetadataError: naming the keyid.
    """
    if isinstance(new, Root):
        table, trusted, what = new.keys, trusted_root.keys, "root"
    elif isinstance(new, Targets):
        table = new.delegations.keys if new.delegations is not None else {}
        old = published.delegations if isinstance(published, Targets) else None
        trusted, what = (old.keys if old is not None else {}), "delegations"
    else:
        return
    for keyid, key in table.items():
        known = trusted.get(keyid)
        if known is not None and _content(known) == _content(key):
            continue
        if known is not None:
            raise PendingMetadataError(
                f"{path}: its {what} key table puts another key behind keyid "
                f"{escape(keyid[:16])}, which devices trust as a different key: refusing "
                "to sign (nothing published, the file is left as it is)", path=path)
        if not keyid_matches(keyid, key):
            raise PendingMetadataError(
                f"{path}: its {what} key table lists keyid {escape(keyid[:16])} for a key "
                "whose hash is another keyid: refusing to sign (nothing published, the "
                "file is left as it is)", path=path)


def _check_fields(path: Path, new: Targets, published: Targets | None) -> None:
    """A new or changed target's modelward fields must mean what they say: devices would
    read a ``"pinned": 1`` as a pin (:func:`modelward.updater.bundle._fields.noncanonical`).

    Raises:
        PendingMetadataError: naming the target and the field.
    """
    before = published.targets if published is not None else {}
    for p, t in new.targets.items():
        was = before.get(p)
        if was is not None and was.to_dict() == t.to_dict():
            continue  # published as it is: devices act on it already
        field = modelward_field(t.custom)
        bad = noncanonical(field) if field is not None else []
        if bad:
            raise PendingMetadataError(
                f"{path}: target {escape(p)} has modelward fields devices would read "
                f"otherwise than written: {escape('; '.join(bad))}; refusing to sign "
                "(nothing published, the file is left as it is)", path=path)


def check_pending(path: Path, data: bytes, role: str, trusted_root: Root,
                  published_version: int | None,
                  published: Metadata | None = None) -> Pending:  # type: ignore[type-arg]
    """Decide whether the pending ``data`` (read from ``path``) may get another signature.

    Refused: more than :data:`MAX_PENDING` bytes, not metadata, another role's type, a
    version other than the file name's, not newer than the published one (a root: not
    the next one, the only one TUF clients load next), a signed part without a canonical
    form (a float), a key table that redefines a trusted keyid or lists a keyid that is
    not its key's hash (:func:`_check_keys`), new or changed targets whose modelward
    fields devices would read otherwise (:func:`_check_fields`, against ``published``,
    the published metadata of the role), or any signature that does not verify over
    these bytes with a key of the trusted root (for root, a keyid the trusted root does
    not know: of the pending root itself).

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
        raise PendingMetadataError(f"{path} is more than {MAX_PENDING} bytes", path=path)
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
    try:
        signed_bytes = md.signed_bytes  # what a signature covers: canonical JSON
    except SerializationError as e:
        raise PendingMetadataError(
            f"{path} cannot be signed: its signed part is not canonical JSON (floats, NaN "
            f"and the like have no canonical form): {escape(str(e.__cause__ or e))}",
            path=path) from e
    pub = published.signed if published is not None else None
    _check_keys(path, md.signed, trusted_root, pub)
    if isinstance(md.signed, Targets):
        _check_fields(path, md.signed, pub if isinstance(pub, Targets) else None)
    # A signature counts with the key the trusted root lists for its keyid; only keyids
    # the trusted root does not know are looked up in a pending root (whose table
    # _check_keys has tied to the keys' hashes).
    keys: dict[str, Key] = dict(md.signed.keys) if isinstance(md.signed, Root) else {}
    keys.update(trusted_root.keys)
    failing: dict[str, str] = {}
    for keyid, sig in md.signatures.items():
        key = keys.get(keyid)
        if key is None:
            failing[keyid] = "not a key of the trusted or the pending root"
            continue
        try:
            key.verify_signature(sig, signed_bytes)
        except (UnverifiedSignatureError, VerificationError):
            failing[keyid] = "does not verify"
    if failing:
        raise PendingChangedError(path, role, failing)
    return Pending(path, md, hashlib.sha256(data).hexdigest())


# --- the summary -------------------------------------------------------------------
#
# Every comparison is over full values (keys by their content, paths and lists whole, in
# order where order matters to TUF); only the printing cuts. A value the summary has no
# words for (``unrecognized_fields`` anywhere) is shown as a change, never dropped.


def _when(d: datetime) -> str:
    return d.isoformat()


def _canon(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _change(label: str, was: object, now: object) -> str:
    """``label A -> B``, saying so when the shown (cut) forms look the same."""
    a, b = escape(was), escape(now)
    return f"{label} {a} -> {b}" + (" (they differ past the part shown)" if a == b else "")


def _content(key: Key) -> tuple[str, str, str, str]:
    """What a key verifies with: its keyid is only a name for this."""
    return (key.keytype, key.scheme, _canon(key.keyval), _canon(key.unrecognized_fields))


def keyid_matches(keyid: str, key: Key) -> bool:
    """Whether ``keyid`` is the hash of ``key`` (securesystemslib's default keyid)."""
    try:
        return keyid == compute_default_keyid(key.keytype, key.scheme, key.keyval)
    except (FormatError, TypeError, ValueError):
        return False


def _key(keyid: str, key: Key | None) -> str:
    if key is None:
        return f"{escape(keyid[:16])} (NOT IN THE KEY TABLE)"
    mismatch = "" if keyid_matches(keyid, key) else " (KEYID IS NOT THE HASH OF THIS KEY)"
    return f"{escape(keyid[:16])} {escape(key.keytype)}/{escape(key.scheme)}{mismatch}"


def _unrecognized(where: str, was: Mapping[str, Any], now: Mapping[str, Any],
                  skip: tuple[str, ...] = ()) -> list[str]:
    """Fields no summary line describes: any difference is a change."""
    out = []
    for k in sorted((set(was) | set(now)) - set(skip), key=str):
        if k not in now:
            out.append(f"  - {where}field {escape(k)} removed (was {escape(was[k])})")
        elif k not in was:
            out.append(f"  + {where}field {escape(k)}: {escape(now[k])} (not understood "
                       "by this summary)")
        elif _canon(was[k]) != _canon(now[k]):
            out.append(f"  ~ {where}" + _change(f"field {escape(k)}", was[k], now[k]))
    return out


def _key_table_lines(where: str, was: Mapping[str, Key], now: Mapping[str, Key],
                     users: Mapping[str, list[str]]) -> list[str]:
    """Keys whose content changed behind the same keyid (and table entries no role uses)."""
    out = []
    for k in sorted(set(was) | set(now)):
        a, b = was.get(k), now.get(k)
        used = ", ".join(escape(u) for u in users.get(k, [])) or "no role"
        if a is not None and b is not None and _content(a) != _content(b):
            out.append(f"  ~ {where}key {escape(k[:16])} (used by {used}) REPLACED behind the "
                       "same keyid: " + _change("", f"{a.keytype}/{a.scheme} "
                                                f"{_canon(a.keyval)}",
                                                f"{b.keytype}/{b.scheme} {_canon(b.keyval)}"))
        elif a is None and b is not None and k not in users:
            out.append(f"  + {where}key table: {_key(k, b)} (used by no role)")
        elif b is None and a is not None and k not in users:
            out.append(f"  - {where}key table: {_key(k, a)}")
    return out


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
        lines += _unrecognized(f"{escape(name)} role ",
                               was.unrecognized_fields if was is not None else {},
                               now.unrecognized_fields)
    users: dict[str, list[str]] = {}
    for name, role in new.roles.items():
        for k in role.keyids:
            users.setdefault(k, []).append(name)
    if old is not None:
        lines += _key_table_lines("", old.keys, new.keys, users)
    if old is not None and old.consistent_snapshot != new.consistent_snapshot:
        lines.append(f"  ~ consistent_snapshot {old.consistent_snapshot} -> "
                     f"{new.consistent_snapshot}")
    return lines


def _facets(path: str, t: TargetFile) -> dict[str, Any]:
    """A target as a device acts on it (:func:`updater.bundle._fields.read_fields`, the reading
    the device uses), plus everything else it carries, each as a comparable value."""
    out: dict[str, Any] = {"bytes": t.length, "hashes": dict(t.hashes)}
    field = modelward_field(t.custom)
    parts = path.split("/")
    model = parts[0] if len(parts) == 2 and parts[1] else None
    if field is None and (bundle := indexed_bundle(t)) is not None:
        out["devices"] = f"chunk index of {bundle} (not a release)"
    elif field is None:
        out["devices"] = "IGNORED by devices: no modelward field"
    else:
        try:
            r = read_fields(field)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            out["devices"] = f"IGNORED by devices: malformed modelward field: {e}"
            out.update({"model": field.get("name", "?"), "version": field.get("version", "?"),
                        "fingerprint": field.get("fingerprint", "?"),
                        "channel": field.get("channel", "stable"),
                        "rollout": "(unreadable)", "PINNED": False, "WITHDRAWN": False})
        else:
            out.update({"model": r.name, "version": str(r.version),
                        "fingerprint": r.fingerprint, "channel": r.channel,
                        "rollout": f"{r.percent:g}%" + (", HALTED" if r.halted else ""),
                        "PINNED": r.pinned, "WITHDRAWN": r.withdrawn})
            if model is None or r.name != model:
                out["devices"] = ("IGNORED by devices: not a release path (MODEL/FILE)"
                                  if model is None else
                                  f"IGNORED by devices: its fields name model {r.name!r}, "
                                  f"its path is under {model}/")
        bad = noncanonical(field)
        if bad:
            out["NON-CANONICAL"] = "; ".join(bad)
        rollout = field.get("rollout")
        out.update({k: v for k, v in field.items() if k not in KNOWN})
        if isinstance(rollout, dict):
            out.update({f"rollout.{k}": v for k, v in rollout.items()
                        if k not in ("basis_points", "halted")})
    custom = t.unrecognized_fields.get("custom")
    if isinstance(custom, dict):
        out.update({f"custom.{k}": v for k, v in custom.items() if k != "modelward"})
    elif custom is not None:
        out["custom"] = custom
    out.update({f"target field {k}": v for k, v in t.unrecognized_fields.items()
                if k != "custom"})
    return out


_FLAGS = ("PINNED", "WITHDRAWN")
_SHOWN = ("bytes", "hashes", "devices", "model", "version", "fingerprint", "channel",
          "rollout", *_FLAGS)


def _describe(path: str, t: TargetFile) -> str:
    f = _facets(path, t)
    sha = str(f["hashes"].get("sha256", ""))
    text = escape(path) + ": "
    if "model" in f:
        text += (f"model {escape(f['model'])} version {escape(f['version'])} fingerprint "
                 f"{escape(f['fingerprint'])} channel {escape(f['channel'])} rollout "
                 f"{f['rollout']}" + "".join(f", {w}" for w in _FLAGS if f[w]))
    if "devices" in f:
        text += f" {escape(f['devices'])}"
    for k in sorted(f, key=str):
        if k not in _SHOWN:
            text += f"; {escape(k)}: {escape(f[k])}"
    others = {a: h for a, h in f["hashes"].items() if a != "sha256"}
    return text + f"; {f['bytes']} bytes sha256 {escape(sha[:16])}" + \
        (f" {escape(others)}" if others else "")


def _target_changes(path: str, was: TargetFile, now: TargetFile) -> list[str]:
    a, b = _facets(path, was), _facets(path, now)
    out = []
    for k in ("devices", "model", "version", "fingerprint", "channel", "rollout", *_FLAGS):
        if _canon(a.get(k)) == _canon(b.get(k)):
            continue
        if k in _FLAGS:
            out.append(("now " if b.get(k) else "no longer ") + k)
        else:
            out.append(_change(k, a.get(k, "-"), b.get(k, "-")))
    if a["bytes"] != b["bytes"] or a["hashes"] != b["hashes"]:
        sa, sb = (str(x["hashes"].get("sha256", ""))[:16] for x in (a, b))
        line = f"BYTES CHANGED: {a['bytes']} -> {b['bytes']} bytes, sha256 {escape(sa)} -> " \
               f"{escape(sb)}"
        if {k: v for k, v in a["hashes"].items() if k != "sha256"} != \
                {k: v for k, v in b["hashes"].items() if k != "sha256"} or \
                (a["bytes"] == b["bytes"] and sa == sb):
            line += "; " + _change("hashes", a["hashes"], b["hashes"])
        out.append(line)
    for k in sorted((set(a) | set(b)) - set(_SHOWN), key=str):
        if _canon(a.get(k)) != _canon(b.get(k)):
            out.append(_change(escape(k), a.get(k, "-"), b.get(k, "-")))
    return [f"  ~ {escape(path)}: {c}" for c in out]


def _scope(r: DelegatedRole) -> dict[str, Any]:
    return {"paths": r.paths, "path_hash_prefixes": r.path_hash_prefixes,
            "threshold": r.threshold, "terminating": r.terminating}


def _scope_text(r: DelegatedRole) -> str:
    what = f"paths {escape(r.paths)}" if r.paths is not None else \
        f"hash prefixes {escape(r.path_hash_prefixes)}"
    return f"{what}, threshold {r.threshold}" + ("" if r.terminating else ", non-terminating")


def _list_changes(label: str, was: list[str] | None, now: list[str] | None) -> list[str]:
    """Entries added to / removed from a list (each on its own line, cut only there)."""
    a, b = list(was or []), list(now or [])
    return [f"+ {label} {escape(x)}" for x in b if x not in a] + \
        [f"- {label} {escape(x)}" for x in a if x not in b]


def _delegation_lines(old: Delegations | None, new: Delegations | None) -> list[str]:
    def roles(d: Delegations | None) -> dict[str, DelegatedRole]:
        return dict(d.roles) if d is not None and d.roles else {}

    def keys(d: Delegations | None) -> dict[str, Key]:
        return dict(d.keys) if d is not None else {}

    lines = []
    a, b = roles(old), roles(new)
    for name in list(b) + [n for n in a if n not in b]:
        was, now = a.get(name), b.get(name)
        if now is None:
            lines.append(f"  - delegation to {escape(name)} removed")
            continue
        if was is None:
            lines.append(f"  + delegation to {escape(name)}: {_scope_text(now)}, keys "
                         + ", ".join(_key(k, keys(new).get(k)) for k in now.keyids))
            continue
        who = f"delegation to {escape(name)}:"
        if _scope(was) != _scope(now):
            ta, tb = _scope_text(was), _scope_text(now)
            lines.append(f"  ~ {who} {ta} -> {tb}")
            if ta == tb:  # the difference is past the cut: each path in full
                for lst in ("paths", "path_hash_prefixes"):
                    lines += [f"  {c[0]} {who} {c[2:]}" for c in _list_changes(
                        {"paths": "path"}.get(lst, "hash prefix"),
                        getattr(was, lst), getattr(now, lst))]
        for k in sorted(set(now.keyids) - set(was.keyids)):
            lines.append(f"  + {who} key {_key(k, keys(new).get(k))}")
        for k in sorted(set(was.keyids) - set(now.keyids)):
            lines.append(f"  - {who} key {_key(k, keys(old).get(k))}")
        lines += _unrecognized(f"delegation to {escape(name)}: ", was.unrecognized_fields,
                               now.unrecognized_fields)
    kept_old = [n for n in a if n in b]
    kept_new = [n for n in b if n in a]
    last_kept = max((i for i, n in enumerate(b) if n in a), default=-1)
    added_first = any(n not in a for n in list(b)[:last_kept])  # searched before a kept one
    if kept_old != kept_new or added_first:
        lines.append("  ~ " + _change("delegation search order (TUF asks the first role "
                                      "that matches a path):", list(a), list(b)))
    sa = old.succinct_roles if old is not None else None
    sb = new.succinct_roles if new is not None else None
    lines += _succinct_lines(sa, sb, keys(old), keys(new))
    users: dict[str, list[str]] = {}
    for name, role in b.items():
        for k in role.keyids:
            users.setdefault(k, []).append(f"delegation to {name}")
    for k in (sb.keyids if sb is not None else []):
        users.setdefault(k, []).append("hash-bin delegation")
    lines += _key_table_lines("delegation ", keys(old), keys(new), users)
    lines += _unrecognized("delegations ",
                           old.unrecognized_fields if old is not None else {},
                           new.unrecognized_fields if new is not None else {})
    return lines


def _succinct_text(s: SuccinctRoles, keys: Mapping[str, Key]) -> str:
    return (f"{2 ** s.bit_length} hash bins {escape(s.name_prefix)}-*, threshold "
            f"{s.threshold}, keys " + ", ".join(_key(k, keys.get(k)) for k in s.keyids))


def _succinct_lines(was: SuccinctRoles | None, now: SuccinctRoles | None,
                    old_keys: Mapping[str, Key], new_keys: Mapping[str, Key]) -> list[str]:
    """Succinct hash-bin delegations (TAP 15): every path the earlier roles do not take
    goes to one of the bins, so they are shown like any other delegation."""
    if was is None and now is None:
        return []
    if now is None:
        assert was is not None
        return [f"  - hash-bin delegation removed: {_succinct_text(was, old_keys)}"]
    if was is None:
        return [f"  + hash-bin delegation (every path goes to one of the bins): "
                f"{_succinct_text(now, new_keys)}"]
    out = []
    if (was.bit_length, was.name_prefix, was.threshold, sorted(was.keyids)) != \
            (now.bit_length, now.name_prefix, now.threshold, sorted(now.keyids)):
        out.append("  ~ hash-bin delegation: " + _change(
            "", _succinct_text(was, old_keys), _succinct_text(now, new_keys)))
    return out + _unrecognized("hash-bin delegation ", was.unrecognized_fields,
                               now.unrecognized_fields)


def _targets_lines(old: Targets | None, new: Targets) -> list[str]:
    before = old.targets if old is not None else {}
    lines = [f"  + {_describe(p, new.targets[p])}" for p in sorted(set(new.targets) - set(before))]
    lines += [f"  - {_describe(p, before[p])}" for p in sorted(set(before) - set(new.targets))]
    for p in sorted(set(before) & set(new.targets)):
        lines += _target_changes(p, before[p], new.targets[p])
    return lines + _delegation_lines(old.delegations if old else None, new.delegations)


def _meta_lines(name: str, was: MetaFile | None, now: MetaFile | None) -> list[str]:
    """One snapshot or timestamp meta entry: version, and the length and hashes devices
    check the file against (a wrong one stops every device at that file)."""
    if now is None:
        return [f"  - {escape(name)} (was v{was.version if was else '?'})"]

    def text(m: MetaFile) -> str:
        return f"v{m.version}" + (f", {m.length} bytes" if m.length is not None else "") \
            + (f", hashes {_canon(m.hashes)}" if m.hashes else "")

    if was is None:
        return [f"  + {escape(name)} {escape(text(now))}"]
    out = []
    if was.version != now.version:
        out.append(f"  ~ {escape(name)} v{was.version} -> v{now.version}")
    if (was.length, was.hashes) != (now.length, now.hashes):
        out.append(f"  ~ {escape(name)} " + _change("length/hashes", text(was), text(now)))
    return out + _unrecognized(f"{escape(name)} ", was.unrecognized_fields,
                               now.unrecognized_fields)


def _snapshot_lines(old: Snapshot | None, new: Snapshot) -> list[str]:
    before = old.meta if old is not None else {}
    lines = []
    for name in sorted(set(before) | set(new.meta)):
        lines += _meta_lines(name, before.get(name), new.meta.get(name))
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
        body = _meta_lines("snapshot",
                           o.snapshot_meta if isinstance(o, Timestamp) else None,
                           n.snapshot_meta)
    else:  # pragma: no cover - Metadata parses only the four types
        body = [f"  {escape(n.type)} metadata"]
    if o is not None and o.spec_version != n.spec_version:
        body.append(f"  ~ spec_version {escape(o.spec_version)} -> {escape(n.spec_version)}")
    body += _unrecognized("", o.unrecognized_fields if o is not None else {},
                          n.unrecognized_fields)
    body += _unrecognized("(unsigned) ", old.unrecognized_fields if old is not None else {},
                          new.unrecognized_fields)
    lines += body or ["  no other change (re-signed with a new version and expiry)"]
    sigs = sorted(new.signatures)
    lines.append(f"  already signed by {len(sigs)} key(s)"
                 + (": " + ", ".join(escape(k[:16]) for k in sigs) if sigs else ""))
    return lines


__all__ = ["Pending", "PendingChangedError", "PendingMetadataError", "PendingReviewError",
           "check_pending", "escape", "keyid_matches", "read_pending", "summarize"]
