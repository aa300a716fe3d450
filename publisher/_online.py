"""The online keys (snapshot, timestamp) in a directory of their own, apart from KEYS.

Production layout (README "Production layout"): the offline machine holds ``KEYS`` (root,
targets, teams) and signs targets; the online host holds only ``ONLINE`` (the snapshot and
timestamp keys, their registry ``ONLINE/signers.json`` and ``ONLINE/root.json``, the root
it trusts) and the served repository. ``repo refresh --online-dir ONLINE`` never opens
``KEYS``: it verifies what the offline side put in ``metadata/`` (the root chain from its
own anchor, then targets and delegated roles by their signatures) and lists only verified
versions in the next snapshot.

``repo init --online-dir ONLINE`` writes ``KEYS/layout.json``: from then on a command run
without the online directory signs targets (and root, teams) and leaves snapshot and
timestamp to the online host.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from modelward.publisher import _rootstage as rootstage
from modelward.publisher._expiry import EXPIRY_FILE, Expiry, save_expiry
from modelward.publisher._keys import ROLES, SignerRegistry, is_inside
from modelward.publisher._online_state import (
    MAX_CANDIDATES,
    STATE_DIR,
    STATE_FILE,
    STATE_ROOT,
    Floor,
    OnlineStateError,
    load_floor,
    load_root,
    meta_of,
    read_or_ignore,
    save,
    verified_served,
)
from modelward.publisher._passphrases import PASSPHRASE_ENV, PassphraseProvider, env_var
from modelward.publisher._served import (
    ServedFileError,
    parse,
    read_file,
    versions,
    walk_roots,
)
from modelward.publisher._tufcheck import check_state
from modelward.publisher.errors import KeyError_, RepositoryStateError
from modelward.trust._atomic import write_atomic

if TYPE_CHECKING:
    from modelward.publisher._repo import Repository

logger = logging.getLogger(__name__)

ONLINE_ROLES = ("snapshot", "timestamp")
OFFLINE_ROLES = tuple(r for r in ROLES if r not in ONLINE_ROLES)
LAYOUT_FILE = "layout.json"  # in KEYS: this repository's online keys live elsewhere
ANCHOR_FILE = "root.json"  # in ONLINE: the root the online host trusts (from `repo init`)
ONLINE_DIR_ENV = "MODELWARD_ONLINE_DIR"
CREDENTIAL = "key-passphrase-{role}"  # systemd credential name (LoadCredential=)

Passphrases = PassphraseProvider  # role -> passphrase of its key file


def env_passphrases(environ: Mapping[str, str],
                    fallback: Passphrases | None = None) -> Passphrases:
    """Per-role passphrases: ``MODELWARD_KEY_PASSPHRASE_<ROLE>``, else the systemd credential
    ``key-passphrase-<role>`` in ``$CREDENTIALS_DIRECTORY``, else ``fallback`` (the generic
    passphrase provider, asked with the role).

    Raises (from the returned callable):
        KeyError_: no passphrase for the role, or an empty one.
    """

    def get(role: str) -> bytes:
        var = env_var(role)  # the same name the offline side's provider reads
        value = environ.get(var)
        where = var
        if value is None and environ.get("CREDENTIALS_DIRECTORY"):
            cred = Path(environ["CREDENTIALS_DIRECTORY"]) / CREDENTIAL.format(role=role)
            try:
                value = cred.read_text().rstrip("\n")
                where = str(cred)
            except FileNotFoundError:
                value = None
            except OSError as e:
                raise KeyError_(f"cannot read the {role} passphrase credential {cred}: {e}",
                                path=str(cred)) from e
        if value is None:
            if fallback is None:
                raise KeyError_(f"no passphrase for the {role} key: set {var}",
                                path=var, hint="or a systemd credential "
                                f"{CREDENTIAL.format(role=role)} (LoadCredential=)")
            logger.warning("no %s: the %s key uses the generic passphrase (%s), which also "
                           "opens the offline keys", var, role, PASSPHRASE_ENV)
            return fallback(role)
        if not value:
            raise KeyError_(f"the {role} passphrase ({where}) is empty", path=where)
        return value.encode()

    return get


def credential_secrets(environ: Mapping[str, str],
                       fallback: Callable[[str], str]) -> Callable[[str], str]:
    """securesystemslib's secret prompts (``"pin"`` of an HSM key) from the systemd
    credential ``hsm-pin`` when there is one (a timer has no terminal), else ``fallback``."""

    def get(what: str) -> str:
        creds = environ.get("CREDENTIALS_DIRECTORY")
        if what == "pin" and creds and (Path(creds) / "hsm-pin").is_file():
            return (Path(creds) / "hsm-pin").read_text().rstrip("\n")
        return fallback(what)

    return get


@dataclass
class OnlineKeys:
    """The online directory: the snapshot and timestamp keys and their registry.

    Args:
        dir: the directory (``ONLINE``).
        passphrases: role -> passphrase of ``encfile:`` keys.
        secrets: securesystemslib's secret prompts (HSM PIN).
        environ: for ``envvar:`` keys.
    """

    dir: Path
    passphrases: Passphrases
    secrets: Callable[[str], str] | None = None
    environ: Mapping[str, str] = field(default_factory=dict)

    def registry(self, role: str) -> SignerRegistry:
        """``ONLINE/signers.json``; a key file opens with its own role's passphrase, asked
        for only when it is opened."""
        del role  # the registry asks the provider with the role of the key it opens
        return SignerRegistry(self.dir, self.passphrases, self.secrets, self.environ)


@dataclass(frozen=True)
class Home:
    """Where a role's keys live: their directory, registry and passphrases (role -> bytes)."""

    dir: Path
    registry: SignerRegistry
    passphrases: Passphrases


def key_home(repo: Repository, role: str) -> Home:
    """The directory and registry holding ``role``'s keys on this machine.

    Raises:
        RepositoryStateError: an online role's keys are in the online directory, which
            this command was not given.
    """
    online = repo.online
    if role in ONLINE_ROLES and online is not None:
        return Home(online.dir, online.registry(role), online.passphrases)
    if role in ONLINE_ROLES and online_elsewhere(repo):
        raise RepositoryStateError(
            f"the {role} key lives in the online directory, not in {repo.keys}",
            hint=f"run this on the online host, or pass --online-dir / {ONLINE_DIR_ENV}")
    return Home(repo.keys, repo.signers, repo._passphrase)


def online_elsewhere(repo: Repository) -> bool:
    """Whether this key directory's snapshot and timestamp keys live in an online directory
    that this command does not have (``KEYS/layout.json`` from ``repo init --online-dir``)."""
    return repo.online is None and (repo.keys / LAYOUT_FILE).is_file()


def check_separate(repo_dir: Path, keys: Path, online: Path) -> None:
    """The three directories must not contain one another.

    Raises:
        RepositoryStateError: naming the overlap.
    """
    for a, an, b, bn in ((online, "online directory", repo_dir, "served repository"),
                         (online, "online directory", keys, "key directory"),
                         (keys, "key directory", online, "online directory"),
                         (repo_dir, "served repository", online, "online directory")):
        if is_inside(a, b):
            raise RepositoryStateError(
                f"{an} {a} is inside the {bn} {b}",
                hint="the online host may see only the online directory: keep it apart "
                     "from KEYS (offline keys) and from REPO (published)")


def after_init(repo: Repository) -> None:
    """``repo init --online-dir``: record the layout in KEYS and the trust anchor in ONLINE."""
    if repo.online is None:
        return
    anchor = (repo.metadata_dir / "1.root.json").read_bytes()
    write_atomic(repo.online.dir / ANCHOR_FILE, anchor, mode=0o600)
    # the refresh's floor: what init signed with the online keys (ONLINE/state)
    served = verified_served(repo.metadata_dir, parse(repo.metadata_dir / "1.root.json",
                                                      anchor).signed)
    assert served is not None  # just signed here
    (repo.online.dir / STATE_DIR).mkdir(mode=0o700, exist_ok=True)
    save(repo.online.dir / STATE_DIR / STATE_FILE, Floor(*served).to_bytes())
    save_expiry(repo.online.dir, repo.expiry)  # the online host's lifetimes and windows
    layout = {"online_roles": list(ONLINE_ROLES),
              "online_dir_at_init": str(repo.online.dir.resolve())}
    write_atomic(repo.keys / LAYOUT_FILE, json.dumps(layout, indent=1).encode(), mode=0o600)


def mirror_expiry(repo: Repository, expiry: Expiry) -> None:
    """``repo set-expiry``: the online host signs snapshot and timestamp with the lifetimes
    in ``ONLINE/expiry.json``."""
    if repo.online is not None:
        save_expiry(repo.online.dir, expiry)
    elif online_elsewhere(repo):
        logger.warning("copy %s to the online directory: its refresh signs snapshot and "
                       "timestamp with the lifetimes found there", repo.keys / EXPIRY_FILE)


def refuse_rotate(repo: Repository, role: str) -> None:
    """``repo rotate`` makes key files in KEYS: not for the online keys of this layout.

    Raises:
        RepositoryStateError: an online role in the two-directory layout.
    """
    if role in ONLINE_ROLES and (repo.online is not None or online_elsewhere(repo)):
        raise RepositoryStateError(
            f"`repo rotate {role}` does not rotate keys of the online directory",
            hint=f"add the new {role} key with `repo add-key {role} … --threshold` and "
                 "register it in the online directory (MODELWARD_ONLINE_DIR)")


# --- refresh: pure decisions over verified files ------------------------------------


def next_snapshot_meta(previous: Mapping[str, int], verified: Mapping[str, int]
                       ) -> dict[str, int] | None:
    """The snapshot's role versions after a refresh, or None when nothing moved.

    Every role the previous snapshot lists stays (TUF clients reject a snapshot that
    drops or lowers one); a verified newer version replaces it.
    """
    out = dict(previous)
    for name, v in verified.items():
        if v > out.get(name, 0):
            out[name] = v
    return out if out != dict(previous) else None


def _read(path: Path, log: Callable[..., None] = logger.warning) -> Metadata[Any] | None:
    """A served metadata file, bounded and not through a symlink (None: absent or unusable,
    ``log``-ged)."""
    got = read_or_ignore(path, log)
    return None if got is None else got[0]


def online_anchor(online_dir: Path) -> Metadata[Root]:
    """The root the online host trusts: its state (the highest it verified) or, before the
    first refresh, ``ONLINE/root.json`` from ``repo init``.

    Raises:
        RepositoryStateError: neither is usable root metadata.
    """
    anchor = online_dir / ANCHOR_FILE
    state = online_dir / STATE_DIR / STATE_ROOT
    try:
        first, kept = load_root(anchor), load_root(state)
    except ServedFileError as e:
        raise RepositoryStateError(f"{e}: the online host trusts no root",
                                   hint="copy the root from `repo init --online-dir` "
                                        "(ONLINE/root.json)") from e
    if kept is not None and (first is None or kept.signed.version >= first.signed.version):
        return kept
    if first is None:
        raise RepositoryStateError(
            f"{anchor} is missing or not root metadata: the online host trusts no root",
            hint="copy the root from `repo init --online-dir` (ONLINE/root.json)")
    return first


def trusted_root(online_dir: Path, metadata_dir: Path) -> Root:
    """The newest root reached from the online host's anchor by TUF's rules (each N+1
    signed by the threshold of N and of itself), at most ``MAX_ROOTS_PER_RUN`` further per
    run; kept as the next anchor in ``ONLINE/state/root.json`` (atomically).

    Raises:
        RepositoryStateError: the anchor is missing or unusable.
        ServedFileError: a newer root file does not chain (named; never a fall-back to
            the older root).
        OnlineStateError: the state cannot be written.
    """
    root: Root = online_anchor(online_dir).signed
    chain = walk_roots(root, metadata_dir)
    if chain:
        md, data = chain[-1]
        root = md.signed
        save(online_dir / STATE_DIR / STATE_ROOT, data)
        logger.info("refresh: trusts root v%d", root.version)
    return root


def _newest(metadata_dir: Path, name: str, floor: int, delegator: Root | Targets,
            log: Callable[..., None], also: tuple[Root, ...] = ()
            ) -> tuple[Metadata[Targets], bytes] | None:
    """The newest ``N.<name>.json`` (N >= ``floor``) that ``delegator`` (and each root of
    ``also``: a staged root) accepts for role ``name``, with the bytes verified; at most
    ``MAX_CANDIDATES`` files tried, newest first (files that do not verify: ``log``-ged)."""
    for tried, v in enumerate(versions(metadata_dir, name)):
        if v < floor:
            break
        if tried >= MAX_CANDIDATES:
            log("ignoring %s.json files below v%d: %d newer ones do not verify", name,
                v, MAX_CANDIDATES)
            break
        got = read_or_ignore(metadata_dir / f"{v}.{name}.json", log)
        try:
            if got is None or not isinstance(got[0].signed, Targets) or \
                    got[0].signed.version != v:
                raise ValueError("not targets metadata of that version")
            for checker in (delegator, *also):
                checker.verify_delegate(name, got[0].signed_bytes, got[0].signatures)
        except (UnsignedMetadataError, ValueError) as e:
            by = f"of root v{delegator.version}" if name == "targets" else \
                f"its delegator gives role {name!r}"
            by += "".join(f" and of the staged root v{r.version}" for r in also)
            log("ignoring %s.%s.json: not signed by the keys %s: %s", v, name, by, e)
            continue
        return got
    return None


def _delegated(metadata_dir: Path, top: Targets, log: Callable[..., None]
               ) -> dict[str, tuple[Metadata[Targets], bytes]]:
    """Every role the verified ``top`` delegates to (transitively, by name: a succinct
    hash-bin delegation is not followed), with its newest file that verifies through its
    delegator (:func:`_newest`)."""
    out: dict[str, tuple[Metadata[Targets], bytes]] = {}
    queue: list[Targets] = [top]
    while queue:
        parent = queue.pop(0)
        if parent.delegations is None:
            continue
        if parent.delegations.succinct_roles is not None:
            log("ignoring a succinct (hash-bin) delegation: modelward lists only roles "
                "delegated by name")
        for name in parent.delegations.roles or {}:
            if name in out or name in ROLES:
                continue
            found = _newest(metadata_dir, name, 1, parent, log)
            if found is not None:
                out[name] = found
                queue.append(found[0].signed)
    return out


def verified_meta(metadata_dir: Path, root: Root, targets_floor: int,
                  log: Callable[..., None] = logger.warning, also: tuple[Root, ...] = ()
                  ) -> tuple[dict[str, MetaFile], Targets | None]:
    """The newest targets (at least ``targets_floor``) signed by root's targets threshold,
    and the newest version of every role it delegates to (transitively) that verifies
    through its delegator (``log``: where files that do not verify are reported); each
    with the length and hash of the bytes verified. At most ``MAX_CANDIDATES`` files are
    tried per role, newest first.

    Returns:
        ({"targets": MetaFile, role: MetaFile, ...}, the verified targets or None).
    """
    got = _newest(metadata_dir, "targets", targets_floor, root, log, also)
    if got is None:
        return {}, None
    top: Targets = got[0].signed
    out = {"targets": meta_of(top.version, got[1])}
    for name, (md, data) in _delegated(metadata_dir, top, log).items():
        out[name] = meta_of(md.signed.version, data)
    return out, top


def verified_delegations(metadata_dir: Path, top: Targets,
                         log: Callable[..., None] = logger.warning
                         ) -> tuple[dict[str, int], dict[str, Metadata[Targets]]]:
    """The newest version of every role the verified ``top`` delegates to that verifies
    through its delegator (:func:`_delegated`); files that do not verify are reported to
    ``log`` and never listed.

    Returns:
        ({role: version}, {role: its verified metadata}).
    """
    tree = _delegated(metadata_dir, top, log)
    return ({n: md.signed.version for n, (md, _) in tree.items()},
            {n: md for n, (md, _) in tree.items()})


def _signers(repo: Repository, role: str, roots: list[Root]) -> list[Signer]:
    """Every key of ``role`` in the verified ``roots`` (the root in force, and a staged
    one) that the online directory registers, loaded (passphrase, PIN) before anything
    is written.

    Raises:
        KeyError_: none of a root's keys registered, or one cannot be loaded.
    """
    home = key_home(repo, role)
    entries = home.registry.entries()
    out: dict[str, Signer] = {}
    for root in roots:
        keyids = [k for k in root.roles[role].keyids if k in entries]
        if not keyids:
            raise KeyError_(
                f"{home.registry.path} holds none of the {role} keys root v{root.version} "
                "lists", path=str(home.registry.path),
                hint=f"register the new {role} key there (`repo add-key` with "
                     f"{ONLINE_DIR_ENV})")
        for keyid in keyids:
            if keyid not in out:
                out[keyid] = home.registry.signer(entries[keyid], root.get_key(keyid), role)
    return list(out.values())


def _sign(md: Metadata[Any], role: str, roots: list[Root], signers: list[Signer]) -> bytes:
    """Sign ``md``; its bytes once it meets ``role``'s threshold in each of ``roots``
    (nothing is written here: the online directory is read-only to the refresh unit,
    nothing can wait there).

    Raises:
        RepositoryStateError: the registered keys do not meet the role's threshold.
    """
    for signer in signers:
        md.sign(signer, append=True)
    for root in roots:
        try:
            root.verify_delegate(role, md.signed_bytes, md.signatures)
        except UnsignedMetadataError as e:
            raise RepositoryStateError(
                f"{role}: the keys in the online directory do not meet its threshold in "
                f"root v{root.version}: {e}", hint=f"register more {role} keys there") from e
    return md.to_bytes(JSONSerializer(compact=False))


MAX_ONLINE_ENTRIES = 4096  # files and directories refuse_offline_keys looks at
_KEYS_MARKERS = ("signers.json", LAYOUT_FILE)


def refuse_offline_keys(online_dir: Path, root: Root) -> None:
    """The online directory must hold no offline key, at any depth: a careless copy of KEYS
    (or of a backup of it) would hand root and targets to the exposed host. Only the
    top level may hold key files and a registry; a deeper key file, registry or KEYS
    marker (``layout.json``) is refused, and so is a directory of more than
    ``MAX_ONLINE_ENTRIES`` entries (not walked further).

    Raises:
        RepositoryStateError: naming the offline key (or the copy of KEYS) found.
    """
    offline = {k: r for r in OFFLINE_ROLES for k in root.roles[r].keyids}
    entries = SignerRegistry(online_dir, b"").entries()
    for keyid, uri in entries.items():
        if keyid in offline:
            raise RepositoryStateError(
                f"{online_dir} registers a {offline[keyid]} key ({uri}): the online "
                "directory must hold only the snapshot and timestamp keys",
                hint="move it back to the offline key directory")
    hint = "move it to the offline key directory"
    if (online_dir / LAYOUT_FILE).exists():
        raise RepositoryStateError(
            f"{online_dir / LAYOUT_FILE} marks a key directory (KEYS): the online "
            "directory must hold only the snapshot and timestamp keys", hint=hint)
    seen = 0
    for top, dirs, files in os.walk(online_dir, onerror=None, followlinks=False):
        here = Path(top)
        seen += len(dirs) + len(files)
        if seen > MAX_ONLINE_ENTRIES:
            raise RepositoryStateError(
                f"{online_dir} holds more than {MAX_ONLINE_ENTRIES} entries: the online "
                "directory must hold only the snapshot and timestamp keys",
                hint="remove what is not the online keys, signers.json, root.json, "
                     "expiry.json and state/")
        dirs.sort()
        for name in sorted(files):
            p = here / name
            nested = here != online_dir
            if name.endswith(".pem") and (nested or name.split("-")[0].removesuffix(
                    ".pem") in OFFLINE_ROLES or name.startswith("delegated-")):
                raise RepositoryStateError(
                    f"{p} looks like an offline key: the online directory must hold only "
                    "the snapshot and timestamp keys", hint=hint)
            if nested and name in _KEYS_MARKERS:
                raise RepositoryStateError(
                    f"{p} looks like a copy of a key directory: the online directory "
                    "must hold only the snapshot and timestamp keys", hint=hint)


def _previous(repo: Repository, online_dir: Path, root: Root) -> Floor:
    """What the next snapshot and timestamp build on: the online host's own record of what
    it last signed, or the served timestamp and snapshot when they verify under ``root``
    and are newer (the single-machine layout's operator commands sign them too); never an
    unverified file.

    Raises:
        OnlineStateError: neither exists (an online directory from before the state, and
            a served timestamp that does not verify), or the record is unusable.
    """
    path = online_dir / STATE_DIR / STATE_FILE
    floor = load_floor(path)
    served = verified_served(repo.metadata_dir, root)
    if served is not None and (floor is None or served[1] > floor.snapshot):
        ts_v, snap_v, meta = served
        return Floor(max(ts_v, floor.timestamp if floor else 0), snap_v, meta)
    if floor is None:
        raise OnlineStateError(
            path, "is missing and the served timestamp.json does not verify: the online "
                  "host does not know what it signed before",
            hint="restore ONLINE/state from a backup, or the served timestamp.json and "
                 "snapshot the online keys signed")
    if served is not None and served[0] > floor.timestamp:
        return Floor(served[0], floor.snapshot, floor.meta)
    return floor


def refresh(repo: Repository, margin: timedelta, now: datetime) -> list[str]:
    """``repo refresh`` with the online directory: snapshot the newest verified targets and
    delegated roles (or re-sign the snapshot when due), then the timestamp; record what it
    signed in ``ONLINE/state`` before writing it (the floor of the next run).

    A root the offline side staged (:mod:`modelward.publisher._rootstage`) that chains
    from the trusted root is published with them, last, once the whole set verifies for a
    stock client before and after it; if it cannot be yet (no targets verify under both
    roots, its online keys are not registered here), the refresh goes on under the root
    in force and says why.

    Returns:
        The roles re-signed (``root`` too when a staged root was published).

    Raises:
        RepositoryStateError: no trusted root, a root that does not chain, the online
            directory holds offline keys, or its state is unusable.
        KeyError_: an online key cannot be loaded.
    """
    online = repo.online
    assert online is not None
    root = trusted_root(online.dir, repo.metadata_dir)
    refuse_offline_keys(online.dir, root)
    staged = rootstage.staged_root(repo.metadata_dir, root, now)
    if staged is not None:
        try:
            refuse_offline_keys(online.dir, staged[0].signed)
            return _refresh(repo, margin, now, root, staged)
        except (RepositoryStateError, KeyError_) as e:
            if isinstance(e, OnlineStateError):
                raise
            logger.error("root v%d is staged but not published by this refresh: %s",
                         staged[0].signed.version, e)
    return _refresh(repo, margin, now, root, None)


def _overlay(metadata_dir: Path, files: list[tuple[str, bytes]]
             ) -> Callable[[str], bytes | None]:
    """metadata/ as a client would see it with ``files`` written."""
    new = dict(files)

    def read(name: str) -> bytes | None:
        return new[name] if name in new else read_file(metadata_dir / name)

    return read


def _refresh(repo: Repository, margin: timedelta, now: datetime, root: Root,
             staged: tuple[Metadata[Root], bytes] | None) -> list[str]:
    online = repo.online
    assert online is not None
    also = () if staged is None else (staged[0].signed,)
    roots = [root, *also]
    prev = _previous(repo, online.dir, root)
    previous = {name.removesuffix(".json"): m.version for name, m in prev.meta.items()}
    verified, _ = verified_meta(repo.metadata_dir, root, previous.get("targets", 1),
                                also=also)
    if staged is not None and "targets" not in verified:
        raise RepositoryStateError(
            f"no targets at or above v{previous.get('targets', 1)} verify under root "
            f"v{root.version} and the staged root v{staged[0].signed.version}",
            hint="the offline side signs them (`repo rotate`, `repo publish` there)")
    new_meta = next_snapshot_meta(previous, {k: m.version for k, m in verified.items()})
    keys = {role: _signers(repo, role, roots) for role in ONLINE_ROLES}
    done = []
    snap_version, snap_entry, meta = prev.snapshot, None, prev.meta
    out: list[tuple[str, bytes]] = []
    reusable = None if staged is not None else _reusable_snapshot(repo, prev, root)
    if new_meta is not None or reusable is None or reusable[0] - now < margin:
        meta = dict(prev.meta)
        for name, v in (new_meta or previous).items():
            if v != previous.get(name):
                logger.info("refresh: snapshot lists %s v%d (was %s)", name, v,
                            previous.get(name))
                meta[f"{name}.json"] = verified[name]
        # Right above the floor: a file already there under that name was never named by
        # a timestamp this host signed (the floor is saved before each write), so it is
        # replaced; a planted N.snapshot.json never raises the version devices follow.
        snap_version = prev.snapshot + 1
        snap = Snapshot(version=snap_version, expires=now + repo.expiry.snapshot, meta=meta)
        data = _sign(Metadata(snap), "snapshot", roots, keys["snapshot"])
        out.append((f"{snap_version}.snapshot.json", data))
        snap_entry = meta_of(snap_version, data)
        done.append("snapshot")
    if snap_entry is None:
        assert reusable is not None  # else the snapshot was re-signed above
        snap_entry = reusable[1]
    ts = Timestamp(version=prev.timestamp + 1, expires=now + repo.expiry.timestamp,
                   snapshot_meta=snap_entry)
    out.append(("timestamp.json", _sign(Metadata(ts), "timestamp", roots, keys["timestamp"])))
    done.append("timestamp")
    if staged is not None:  # what a client sees after the timestamp, and after the root
        published = _overlay(repo.metadata_dir, [])
        check_state(_overlay(repo.metadata_dir, out), now, published)
        out.append((f"{staged[0].signed.version}.root.json", staged[1]))
        check_state(_overlay(repo.metadata_dir, out), now, published)
        done.insert(0, "root")
    save(online.dir / STATE_DIR / STATE_FILE,
         Floor(ts.version, snap_version, dict(meta)).to_bytes())
    for name, data in out:  # snapshot, timestamp, then the staged root
        write_atomic(repo.metadata_dir / name, data)
    if staged is not None:
        save(online.dir / STATE_DIR / STATE_ROOT, staged[1])
        logger.warning("refresh: published the staged root v%d", staged[0].signed.version)
    repo.expiry_warnings()  # root, targets, teams: for the offline machine to act on
    return done


def _reusable_snapshot(repo: Repository, prev: Floor, root: Root
                       ) -> tuple[datetime, MetaFile] | None:
    """The snapshot ``prev`` names, when it may be reused: its expiry and the entry (length,
    hash) of the very bytes checked. None (re-sign it): its file is gone or unusable, not
    the one the online host signed (versions differ), or not signed by root's snapshot
    keys (planted with a far expiry, it would otherwise never be re-signed and the
    timestamps would pin it)."""
    got = read_or_ignore(repo.metadata_dir / f"{prev.snapshot}.snapshot.json")
    if got is None:
        return None
    md, data = got
    if not isinstance(md.signed, Snapshot) or md.signed.version != prev.snapshot or \
            {k: m.version for k, m in md.signed.meta.items()} != \
            {k: m.version for k, m in prev.meta.items()}:
        return None
    try:
        root.verify_delegate("snapshot", md.signed_bytes, md.signatures)
    except UnsignedMetadataError:
        logger.warning("re-signing the snapshot: %s.snapshot.json is not signed by the "
                       "snapshot keys", prev.snapshot)
        return None
    expires: datetime = md.signed.expires
    return expires, meta_of(prev.snapshot, data)


def _head(metadata_dir: Path, roots: list[Root], published: Targets) -> Targets:
    """The newest targets above ``published`` that the newest root of ``roots`` whose
    targets keys signed anything newer accepts. A root's keys are retired once the root
    after it has signed the published targets: from the newest root back, a root whose
    keys signed ``published`` ends the search (a key dropped by a rotation cannot sign a
    newer head); one that did not (a rotation not yet followed by new targets) hands on to
    the root before it.
    """
    candidates: list[Metadata[Any]] = []
    for v in versions(metadata_dir, "targets"):
        if v <= published.version or len(candidates) >= MAX_CANDIDATES:
            break
        md = _read(metadata_dir / f"{v}.targets.json", logger.debug)
        if md is not None and isinstance(md.signed, Targets) and md.signed.version == v:
            candidates.append(md)
    pub = _read(metadata_dir / f"{published.version}.targets.json", logger.debug)
    if pub is not None and pub.signed.to_dict() != published.to_dict():
        pub = None
    for root in reversed(roots):
        for md in candidates:
            try:
                root.verify_delegate("targets", md.signed_bytes, md.signatures)
            except UnsignedMetadataError:
                continue
            found: Targets = md.signed
            return found
        if pub is not None:
            try:
                root.verify_delegate("targets", pub.signed_bytes, pub.signatures)
            except UnsignedMetadataError:
                continue
            return published
    return published


def attach(repo: Repository, online_dir: Path | None, passphrases: Passphrases,
           secrets: Callable[[str], str] | None = None,
           environ: Mapping[str, str] | None = None) -> Repository:
    """Give ``repo`` its online directory (None: leave it without one).

    Raises:
        RepositoryStateError: the online directory overlaps KEYS or REPO.
    """
    if online_dir is None:
        return repo
    if os.path.realpath(online_dir) != os.path.realpath(repo.keys):
        check_separate(repo.repo, repo.keys, online_dir)
    repo.online = OnlineKeys(online_dir, passphrases, secrets, dict(environ or {}))
    return repo
