"""Root changes in the two-machine layout: staged by the offline side, published by the
online host together with the snapshot and timestamp that go with them.

A root N+1 that re-keys role metadata (a targets rotation, a threshold change) makes the
published targets, snapshot or timestamp unverifiable the moment devices see it. In the
two-machine layout only the online host signs snapshot and timestamp, so the offline side
cannot publish N+1 and the metadata that goes with it at once. Instead:

1. The offline side (:func:`stage`) keeps root N+1, fully signed (root N's threshold and
   its own), in ``KEYS/staged/`` and copies it to ``metadata/staged/`` (a name no client
   fetches). The re-keyed targets are signed anew by the keys of root N *and* of root N+1
   (:func:`cosign`), so they verify under either; so is every targets it signs until N+1
   is published. Root N stays the root in force on both machines.
2. The online refresh (:func:`staged_root`) takes root N+1 only if it chains from the root
   it trusts (TUF's rules; never a root the offline root keys did not sign) and picks the
   newest targets that verify under both roots. It signs snapshot and timestamp with the
   keys of both roots, checks each step with a stock client (:mod:`._tufcheck`) and writes
   ``N.snapshot.json``, ``timestamp.json`` and only then ``N+1.root.json``. A device
   fetching at any instant sees a consistent set: before the timestamp, the old state
   under root N; after it, targets that verify under root N (a device that walked the
   root chain a moment before) and under root N+1.
3. The offline side's next command (:func:`finish`) sees N+1 in the verified chain: the
   retired keys' files move to ``KEYS/retired/``, the staged copies go, and N+1 becomes its
   anchor. Only then are the retired keys no longer used to sign.

A machine that signs every role (one machine, or KEYS with the online directory) goes
through the same order at once (:func:`_publish_here`): re-keyed targets, snapshot and
timestamp by both roots' keys, each through the gate, then ``N+1.root.json``, then
:func:`finish`. A staged root cannot be taken back (it is signed): a second root change
waits until it is published.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization.json import JSONSerializer

from modelward.publisher._online_state import read_or_ignore
from modelward.publisher._rootflow import retire_key_files, root_gaps, signing_uris
from modelward.publisher._served import (
    ServedFileError,
    parse,
    read_file,
    save_anchor,
    trusted_chain,
)
from modelward.publisher._tufcheck import check_root_chain, check_state
from modelward.publisher.errors import KeyError_, RepositoryStateError
from modelward.trust._atomic import write_atomic

if TYPE_CHECKING:
    from datetime import datetime

    from modelward.publisher._keys import SignerRegistry
    from modelward.publisher._repo import Repository

logger = logging.getLogger(__name__)

STAGE_DIR = "staged"  # KEYS/staged/N.root.json (trusted copy), metadata/staged/ (for the host)


class StagedRootError(RepositoryStateError):
    """A root change is staged for the online host and not yet published: another root
    change now would fork it.

    Attributes:
        version: the staged root's version.
        path: the offline side's copy.
    """

    def __init__(self, version: int, path: Path) -> None:
        super().__init__(
            f"root v{version} is staged ({path}) and waits for the online host's `repo "
            "refresh`, which publishes it with the snapshot and timestamp that go with it",
            hint="run `modelward repo refresh --online-dir ONLINE` on the online host (or "
                 "wait for its timer), then make the next root change; a staged root is "
                 "signed and cannot be taken back")
        self.version, self.path = version, path


def _elsewhere(repo: Repository) -> bool:
    """Whether this machine's online keys live elsewhere (the two-machine offline side)."""
    from modelward.publisher._online import online_elsewhere  # it imports this module

    return online_elsewhere(repo)


def _registry(repo: Repository, role: str) -> SignerRegistry:
    from modelward.publisher._online import key_home  # imports this module

    return key_home(repo, role).registry


def _name(version: int) -> str:
    return f"{version}.root.json"


def _real_dir(path: Path, mode: int = 0o700) -> Path:
    """``path`` as a directory of its own (made if absent), never through a symlink.

    Raises:
        RepositoryStateError: it is a symbolic link or not a directory.
    """
    try:
        path.mkdir(mode=mode, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise RepositoryStateError(f"cannot make {path}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise RepositoryStateError(f"{path} is not a directory (a symbolic link?): the "
                                   "staged root is not written through it",
                                   hint=f"remove {path}")
    return path


def _verify_next(md: Metadata[Any], trusted: Root, now: datetime) -> str | None:
    """Why ``md`` is not root ``trusted.version + 1`` signed by TUF's rules (None: it is)."""
    if not isinstance(md.signed, Root):
        return "is not root metadata"
    if md.signed.version != trusted.version + 1:
        return f"is root v{md.signed.version}, not v{trusted.version + 1}"
    try:
        gaps = root_gaps(trusted, md)
    except RepositoryStateError as e:
        return str(e)
    if gaps:
        return f"lacks root signatures ({gaps[0].have} of {gaps[0].need} by root " \
               f"v{gaps[0].version}'s keys)"
    if md.signed.is_expired(now):
        return f"expired at {md.signed.expires.isoformat()}"
    return None


# --- the offline side ----------------------------------------------------------------


def active(repo: Repository) -> tuple[Metadata[Root], bytes] | None:
    """The offline side's staged root N+1 (N: the newest root of its verified chain), read
    from its own copy in ``KEYS/staged/`` and verified; None when there is none.

    Raises:
        RepositoryStateError: the copy is there but does not verify (named).
    """
    version = repo.latest_root_version() + 1
    path = repo.keys / STAGE_DIR / _name(version)
    data = read_file(path)
    if data is None:
        return None
    md = parse(path, data)
    why = _verify_next(md, repo._trusted_root(), repo._clock())  # noqa: SLF001
    if why is not None:
        raise RepositoryStateError(f"the staged root {path} {why}",
                                   hint=f"delete {path} and make the root change again")
    return md, data


def refuse_if_staged(repo: Repository, version: int) -> None:
    """Raises StagedRootError if root ``version`` is staged (a second root change)."""
    path = repo.keys / STAGE_DIR / _name(version)
    if path.exists():
        raise StagedRootError(version, path)


def stage(repo: Repository, md: Metadata[Root], data: bytes, plan: dict[str, list[str]]
          ) -> None:
    """Stage root N+1 (fully signed), whose keys no longer accept the published ``plan``
    roles: the trusted copy in KEYS first, then (:func:`resume`) the re-keyed metadata
    signed by both roots' keys, then the root is published (single machine) or copied
    for the online host. Idempotent: :func:`resume` redoes what a crash left.

    Raises:
        RepositoryStateError: the re-keyed targets cannot be signed here by the new keys.
    """
    new = md.signed
    if "targets" in plan and len(plan["targets"]) < new.roles["targets"].threshold:
        raise RepositoryStateError(
            f"root v{new.version} is signed, but the targets it re-keys cannot be signed "
            f"here: {new.roles['targets'].threshold} of its new keys are needed, "
            f"{len(plan['targets'])} can sign; nothing was staged",
            hint="make those keys usable (passphrase, HSM PIN, envvar), then "
                 "`modelward repo sign root --key URI`")
    write_atomic(_real_dir(repo.keys / STAGE_DIR) / _name(new.version), data, mode=0o600)
    (repo.pending_dir / _name(new.version)).unlink(missing_ok=True)
    resume(repo)


def _accepts(root: Root, role: str, path: Path) -> bool:
    data = read_file(path)
    if data is None:
        return False
    md = parse(path, data)
    try:
        root.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError:
        return False
    return True


def resume(repo: Repository) -> bool:
    """Carry a staged root on: the re-keyed metadata signed anew by both roots' keys
    (:func:`cosign`), then, on the machine that signs snapshot and timestamp, the root
    published after them (:func:`_publish_here`); in the two-machine layout's offline side,
    the copy in ``metadata/staged/`` for the online host. Returns whether a root is still
    staged (waiting for the online host)."""
    got = active(repo)
    if got is None:
        return False
    md, data = got
    new = md.signed
    if _elsewhere(repo):
        targets, _, _ = repo.current()
        if not _accepts(new, "targets", repo.metadata_dir / f"{targets.version}.targets.json"):
            repo._commit_targets(targets)  # noqa: SLF001 - by both roots' keys (cosign)
        _copy_for_the_host(repo, new.version, data)
        logger.warning("root v%d is staged: the online host's next `repo refresh` publishes "
                       "it with the snapshot and timestamp; until then root v%d stays in "
                       "force", new.version, new.version - 1)
        return True
    _publish_here(repo, md, data)
    return False


def _copy_for_the_host(repo: Repository, version: int, data: bytes) -> None:
    """``metadata/staged/N.root.json``, written unless it holds ``data`` already.

    Raises:
        RepositoryStateError: ``metadata/staged`` is not a directory of its own.
    """
    path = _real_dir(repo.metadata_dir / STAGE_DIR, 0o755) / _name(version)
    if read_file(path) != data:
        write_atomic(path, data)


def _publish_here(repo: Repository, md: Metadata[Root], data: bytes) -> None:
    """This machine signs every role: targets, snapshot, timestamp anew (by both roots'
    keys) where root N+1 does not accept the published ones, each step through the
    stock-client gate; N+1.root.json last, then :func:`finish`."""
    new = md.signed
    plan = repo._resign_plan(new)  # noqa: SLF001
    saved = repo._sign_with  # noqa: SLF001
    try:
        repo._sign_with = [u for uris in plan.values() for u in uris]  # noqa: SLF001
        targets, _, _ = repo.current()
        if "targets" in plan:
            repo._commit_targets(targets)  # noqa: SLF001
        elif plan:
            repo._snapshot_and_timestamp(targets.version)  # noqa: SLF001
    except KeyError_ as e:  # a key of root N cannot sign any more (its file is gone)
        logger.warning("root v%d's keys cannot co-sign here (%s): root v%d is published "
                       "first, then the metadata it re-keys", new.version - 1, e,
                       new.version)
        repo._sign_with = saved  # noqa: SLF001
        _publish_root_first(repo, md, data, plan)
        return
    finally:
        repo._sign_with = saved  # noqa: SLF001
    left = repo._resign_plan(new)  # noqa: SLF001
    if left:
        raise RepositoryStateError(
            f"root v{new.version} is staged, but {', '.join(left)} could not be signed here "
            "by its keys; it is not published",
            hint="make those keys usable (passphrase, HSM PIN), then run the change again")
    name = _name(new.version)

    def read(n: str) -> bytes | None:
        return data if n == name else read_file(repo.metadata_dir / n)

    check_state(read, repo._clock(), lambda n: read_file(repo.metadata_dir / n))  # noqa: SLF001
    write_atomic(repo.metadata_dir / name, data)
    finish(repo)


def _publish_root_first(repo: Repository, md: Metadata[Root], data: bytes,
                        plan: dict[str, list[str]]) -> None:
    """The order of old, when root N's keys cannot sign: N+1.root.json, then the re-keyed
    metadata by N+1's keys (a device fetching in between retries on its next check)."""
    name = _name(md.signed.version)

    def read(n: str) -> bytes | None:
        return data if n == name else read_file(repo.metadata_dir / n)

    check_root_chain(read, repo._clock())  # noqa: SLF001
    previous = repo._trusted_root()  # noqa: SLF001
    write_atomic(repo.metadata_dir / name, data)
    repo._finish_root_change(previous, md.signed, plan)  # noqa: SLF001
    finish(repo)


def cosign(repo: Repository, md: Metadata[Any], role: str) -> None:
    """While a root N+1 is staged, targets (and, where this machine signs them, snapshot
    and timestamp) are signed by its keys as well, up to its threshold, so they verify
    under root N and under N+1."""
    if role not in ("targets", "snapshot", "timestamp"):
        return
    elsewhere = _elsewhere(repo)
    if role != "targets" and elsewhere:
        return
    if elsewhere:
        finish(repo)  # a staged root the online host published since: its keys only now
    got = active(repo)
    if got is None:
        return
    staged = got[0].signed
    if elsewhere:  # the copy removed from the served side (the origin): put back
        try:
            _copy_for_the_host(repo, staged.version, got[1])
        except (RepositoryStateError, ServedFileError, OSError) as e:
            logger.warning("the staged root v%d could not be copied for the online host: "
                           "%s", staged.version, e)
    registry = _registry(repo, role)
    keys = {k: staged.get_key(k) for k in staged.roles[role].keyids}

    def valid() -> set[str]:
        out = set()
        for k, key in keys.items():
            sig = md.signatures.get(k)
            if sig is None:
                continue
            try:
                key.verify_signature(sig, md.signed_bytes)
                out.add(k)
            except (UnverifiedSignatureError, VerificationError):
                continue
        return out

    need = staged.roles[role].threshold
    entries = registry.entries()
    for uri in signing_uris(role, keys, entries, len(keys)):
        have = valid()
        if len(have) >= need:
            break
        keyid = next((k for k, u in entries.items() if u == uri), None)
        if keyid is None or keyid not in keys or keyid in have:
            continue
        try:
            md.sign(registry.signer(uri, keys[keyid], role), append=True)
        except KeyError_ as e:
            logger.warning("%s key %s cannot sign here: %s", role, uri, e)
    if len(valid()) < need:
        raise RepositoryStateError(
            f"{role} v{md.signed.version} would not verify under the staged root "
            f"v{staged.version} ({len(valid())} of its {need} {role} keys can sign here)",
            hint=f"make the new {role} keys usable (passphrase, HSM PIN), then retry")


def finish(repo: Repository) -> bool:
    """After the online host published a staged root: file the keys it retired, drop the
    staged copies, keep it as the anchor. Returns whether a staged root was finished."""
    base = repo.keys / STAGE_DIR
    if not base.is_dir() or base.is_symlink():
        return False
    chain = None
    done = False
    for path in sorted(base.glob("*.root.json")):
        try:
            version = int(path.name.split(".", 1)[0])
        except ValueError:
            continue
        if chain is None:
            chain = {md.signed.version: md for md in trusted_chain(repo)}
        if version not in chain:
            continue
        data = read_file(path)
        published = chain[version]
        if data is None or parse(path, data).signed.to_dict() != published.signed.to_dict():
            logger.warning("root v%d was published but is not the root staged here (%s)",
                           version, path)
        else:
            retire_key_files(repo.keys, repo.signers, chain[version - 1].signed,
                             published.signed)
            save_anchor(repo, published.to_bytes(JSONSerializer(compact=False)))
            logger.info("root v%d, staged here, is published: retired keys filed", version)
        path.unlink(missing_ok=True)
        (repo.metadata_dir / STAGE_DIR / path.name).unlink(missing_ok=True)
        done = True
    return done


# --- the online host -------------------------------------------------------------------


def staged_root(metadata_dir: Path, trusted: Root, now: datetime
                ) -> tuple[Metadata[Root], bytes] | None:
    """Root ``trusted.version + 1`` staged in ``metadata/staged/``, if it chains from
    ``trusted`` by TUF's rules and is not expired; None otherwise (logged)."""
    base = metadata_dir / STAGE_DIR
    path = base / _name(trusted.version + 1)
    if not base.is_dir() or base.is_symlink():
        return None
    got = read_or_ignore(path)
    if got is None:
        return None
    md, data = got
    why = _verify_next(md, trusted, now)
    if why is not None:
        logger.warning("ignoring the staged root %s: it %s", path, why)
        return None
    root_md: Metadata[Root] = md
    return root_md, data



def outcome(repo: Repository, version: int) -> str:
    """What became of root ``version`` after a root change, for the operator."""
    if (repo.keys / STAGE_DIR / _name(version)).exists():
        return (f"root v{version} is staged: the online host's next `repo refresh` "
                "publishes it with the snapshot and timestamp; until then the keys in use "
                "stay valid")
    return f"root is now version {version} (devices follow it on their next refresh)"
