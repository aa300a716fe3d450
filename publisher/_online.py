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
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securesystemslib.signer import Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from publisher._expiry import EXPIRY_FILE, Expiry, save_expiry
from publisher._keys import ROLES, SignerRegistry, is_inside
from publisher._served import ServedFileError, load, read_file, root_chain, trusted_chain
from publisher.errors import KeyError_, RepositoryStateError
from trust import write_atomic

if TYPE_CHECKING:
    from publisher._repo import Repository

logger = logging.getLogger(__name__)

ONLINE_ROLES = ("snapshot", "timestamp")
OFFLINE_ROLES = tuple(r for r in ROLES if r not in ONLINE_ROLES)
LAYOUT_FILE = "layout.json"  # in KEYS: this repository's online keys live elsewhere
ANCHOR_FILE = "root.json"  # in ONLINE: the root the online host trusts (from `repo init`)
PASSPHRASE_ENV = "MODELWARD_KEY_PASSPHRASE"  # noqa: S105 - a variable name
ONLINE_DIR_ENV = "MODELWARD_ONLINE_DIR"
CREDENTIAL = "key-passphrase-{role}"  # systemd credential name (LoadCredential=)

Passphrases = Callable[[str], bytes]
"""role -> passphrase of its key file (the i14 per-role providers plug in here)."""


def env_passphrases(environ: Mapping[str, str],
                    fallback: Passphrases | None = None) -> Passphrases:
    """Per-role passphrases: ``MODELWARD_KEY_PASSPHRASE_<ROLE>``, else the systemd credential
    ``key-passphrase-<role>`` in ``$CREDENTIALS_DIRECTORY``, else ``fallback`` (the generic
    passphrase provider, asked with the role).

    Raises (from the returned callable):
        KeyError_: no passphrase for the role, or an empty one.
    """

    def get(role: str) -> bytes:
        var = f"{PASSPHRASE_ENV}_{role.upper().replace('-', '_')}"
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


def _read(path: Path) -> Metadata[Any] | None:
    """A metadata file of the served directory (no symlink, bounded: publisher._served), or
    None when it is absent or unusable (logged)."""
    try:
        return load(path) if read_file(path) is not None else None
    except ServedFileError as e:
        logger.warning("ignoring %s", e)
        return None


def _versions(metadata_dir: Path, role: str) -> list[int]:
    return sorted((int(m.group(1)) for p in metadata_dir.glob(f"*.{role}.json")
                   if (m := re.fullmatch(rf"(\d+)\.{re.escape(role)}\.json", p.name))),
                  reverse=True)


def trusted_root(online_dir: Path, metadata_dir: Path) -> Root:
    """The newest root reached from ``ONLINE/root.json`` by TUF's rules (each N+1 signed by
    the threshold of N and of itself); a root on disk that does not chain is ignored.

    Raises:
        RepositoryStateError: the anchor is missing or unusable.
    """
    anchor = online_dir / ANCHOR_FILE
    md = _read(anchor)
    if md is None or not isinstance(md.signed, Root):
        raise RepositoryStateError(
            f"{anchor} is missing or not root metadata: the online host trusts no root",
            hint="copy the root from `repo init --online-dir` (ONLINE/root.json)")
    root: Root = root_chain(md, metadata_dir, strict=False)[-1].signed
    return root


def verified_versions(metadata_dir: Path, root: Root, targets_floor: int,
                      log: Callable[..., None] = logger.warning
                      ) -> tuple[dict[str, int], Targets | None]:
    """The newest targets (at least ``targets_floor``) signed by root's targets threshold,
    and the newest version of every role it delegates to (transitively) that verifies
    through its delegator (``log``: where files that do not verify are reported).

    Returns:
        ({"targets": v, role: v, ...}, the verified targets or None).
    """
    out: dict[str, int] = {}
    top: Targets | None = None
    for v in _versions(metadata_dir, "targets"):
        if v < targets_floor:
            break
        md = _read(metadata_dir / f"{v}.targets.json")
        try:
            if md is None or not isinstance(md.signed, Targets) or md.signed.version != v:
                raise ValueError("not targets metadata of that version")
            root.verify_delegate("targets", md.signed_bytes, md.signatures)
        except (UnsignedMetadataError, ValueError) as e:
            log("ignoring %s.targets.json: not signed by the targets keys of "
                           "root v%d: %s", v, root.version, e)
            continue
        out["targets"], top = v, md.signed
        break
    if top is None:
        return out, None
    out.update(verified_delegations(metadata_dir, top, log)[0])
    return out, top


def verified_delegations(metadata_dir: Path, top: Targets,
                         log: Callable[..., None] = logger.warning
                         ) -> tuple[dict[str, int], dict[str, Metadata[Targets]]]:
    """The newest version of every role the verified ``top`` delegates to (transitively,
    by name: a succinct hash-bin delegation is not followed) that verifies through its
    delegator; files that do not verify are reported to ``log`` and never listed.

    Returns:
        ({role: version}, {role: its verified metadata}).
    """
    out: dict[str, int] = {}
    mds: dict[str, Metadata[Targets]] = {}
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
            for v in _versions(metadata_dir, name):
                md = _read(metadata_dir / f"{v}.{name}.json")
                try:
                    if md is None or not isinstance(md.signed, Targets) or \
                            md.signed.version != v:
                        raise ValueError("not targets metadata of that version")
                    parent.verify_delegate(name, md.signed_bytes, md.signatures)
                except (UnsignedMetadataError, ValueError) as e:
                    log("ignoring %s.%s.json: not signed by the keys its "
                        "delegator gives role %r: %s", v, name, name, e)
                    continue
                out[name], mds[name] = v, md
                queue.append(md.signed)
                break
    return out, mds


def _signers(repo: Repository, role: str, root: Root) -> list[Signer]:
    """Every key of ``role`` in the verified ``root`` that the online directory registers,
    loaded (passphrase, PIN) before anything is written.

    Raises:
        KeyError_: none registered, or one cannot be loaded.
    """
    home = key_home(repo, role)
    entries = home.registry.entries()
    keyids = [k for k in root.roles[role].keyids if k in entries]
    if not keyids:
        raise KeyError_(
            f"{home.registry.path} holds none of the {role} keys root v{root.version} lists",
            path=str(home.registry.path),
            hint=f"register the new {role} key there (`repo add-key` with "
                 f"{ONLINE_DIR_ENV})")
    return [home.registry.signer(entries[keyid], root.get_key(keyid), role)
            for keyid in keyids]


def _publish(repo: Repository, md: Metadata[Any], role: str, root: Root,
             signers: list[Signer], name: str) -> None:
    """Sign and write ``metadata/name``; short of the threshold nothing is written (the
    online directory is read-only to the refresh unit: nothing can wait there).

    Raises:
        RepositoryStateError: the registered keys do not meet the role's threshold.
    """
    for signer in signers:
        md.sign(signer, append=True)
    try:
        root.verify_delegate(role, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as e:
        raise RepositoryStateError(
            f"{role}: the keys in the online directory do not meet its threshold in root "
            f"v{root.version}: {e}", hint=f"register more {role} keys there") from e
    write_atomic(repo.metadata_dir / name, md.to_bytes(JSONSerializer(compact=False)))


def refuse_offline_keys(online_dir: Path, root: Root) -> None:
    """The online directory must hold no offline key: a careless copy of KEYS would hand
    root and targets to the exposed host.

    Raises:
        RepositoryStateError: naming the offline key found.
    """
    offline = {k: r for r in OFFLINE_ROLES for k in root.roles[r].keyids}
    entries = SignerRegistry(online_dir, b"").entries()
    for keyid, uri in entries.items():
        if keyid in offline:
            raise RepositoryStateError(
                f"{online_dir} registers a {offline[keyid]} key ({uri}): the online "
                "directory must hold only the snapshot and timestamp keys",
                hint="move it back to the offline key directory")
    for p in sorted(online_dir.glob("*.pem")):
        if p.stem.split("-")[0] in OFFLINE_ROLES or p.name.startswith("delegated-"):
            raise RepositoryStateError(
                f"{p} looks like an offline key: the online directory must hold only the "
                "snapshot and timestamp keys", hint="move it to the offline key directory")


def refresh(repo: Repository, margin: timedelta, now: datetime) -> list[str]:
    """``repo refresh`` with the online directory: snapshot the newest verified targets and
    delegated roles (or re-sign the snapshot when due), then the timestamp.

    Returns:
        The roles re-signed.

    Raises:
        RepositoryStateError: no trusted root, or the online directory holds offline keys.
        KeyError_: an online key cannot be loaded.
    """
    online = repo.online
    assert online is not None
    root = trusted_root(online.dir, repo.metadata_dir)
    refuse_offline_keys(online.dir, root)
    _, snap, ts = repo.current()
    previous = {name.removesuffix(".json"): m.version for name, m in snap.meta.items()}
    verified, _ = verified_versions(repo.metadata_dir, root, previous.get("targets", 1))
    new_meta = next_snapshot_meta(previous, verified)
    keys = {role: _signers(repo, role, root) for role in ONLINE_ROLES}
    done = []
    if new_meta is not None or snap.expires - now < margin:
        meta = new_meta or previous
        for name, v in meta.items():
            if v != previous.get(name):
                logger.info("refresh: snapshot lists %s v%d (was %s)", name, v,
                            previous.get(name))
        # never over an existing N.snapshot.json (a stale timestamp.json copied back)
        version = max([snap.version, *_versions(repo.metadata_dir, "snapshot")]) + 1
        snap = Snapshot(version=version, expires=now + repo.expiry.snapshot,
                        meta={f"{name}.json": repo._signed_meta(name, v)  # length, sha256
                              for name, v in meta.items()})
        _publish(repo, Metadata(snap), "snapshot", root, keys["snapshot"],
                 f"{snap.version}.snapshot.json")
        done.append("snapshot")
    ts = Timestamp(version=ts.version + 1, expires=now + repo.expiry.timestamp,
                   snapshot_meta=repo._signed_meta("snapshot", snap.version))
    _publish(repo, Metadata(ts), "timestamp", root, keys["timestamp"], "timestamp.json")
    done.append("timestamp")
    repo.expiry_warnings()  # root, targets, teams: for the offline machine to act on
    return done


def newest_signed_targets(repo: Repository, published: Targets) -> Targets:
    """On the offline side of the two-machine layout: the newest targets this machine signed,
    which the online host may not have put in a snapshot yet (so the next change builds on
    it, never on an older version)."""
    newest = published
    for md in reversed(trusted_chain(repo)):  # the verified roots, from the anchor in KEYS
        _, top = verified_versions(repo.metadata_dir, md.signed, newest.version + 1,
                                   log=logger.debug)
        if top is not None and top.version > newest.version:
            newest = top
    return newest


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
