"""A static TUF repository: ``REPO/metadata`` and ``REPO/targets``, consistent snapshots.

Only what is served lives under ``REPO``; keys live in a separate directory.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, cast

from securesystemslib.exceptions import UnverifiedSignatureError, VerificationError
from securesystemslib.signer import Key, Signer
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from modelward.publisher import _policy
from modelward.publisher import _rootstage as rootstage
from modelward.publisher._expiry import Expiry as Expiry
from modelward.publisher._expiry import ExpiryWarning, expiry_warnings, load_expiry, save_expiry
from modelward.publisher._history import (
    check_team_signature,
    delegated_meta,
    next_role_version,
)
from modelward.publisher._indexpub import (
    FetchEstimate,
    Resolved,
    VerifiedStream,
    add_index,
    estimates,
    served_dest,
)
from modelward.publisher._keys import (
    ENCFILE,
    ROLES,
    SignerRegistry,
    check_new_passphrase,
    generate_key_at,
    is_inside,
    load_signer,
    load_signer_at,
)
from modelward.publisher._offline_base import (
    current_view,
    next_versions,
    own_targets_md,
    record_head,
    restore_head,
)
from modelward.publisher._online import (
    OnlineKeys,
    after_init,
    key_home,
    mirror_expiry,
    online_elsewhere,
    refuse_rotate,
    verified_delegations,
)
from modelward.publisher._online import refresh as _online_refresh
from modelward.publisher._passphrases import Passphrase, as_provider, check_team_variable
from modelward.publisher._pending_status import Note
from modelward.publisher._pending_status import notes as pending_notes
from modelward.publisher._rootflow import (
    RootNotPublishableError,
    default_uri,
    entries_keyid,
    refuse_expired_root,
    retire_key_files,
    root_gaps,
    signing_uris,
)
from modelward.publisher._served import (
    ServedFileError,
    View,
    read_file,
    record_signed_targets,
    save_anchor,
    save_floors,
    trusted_chain,
    verified_view,
    verify_role,
)
from modelward.publisher._served import load as served_load
from modelward.publisher._summary import (
    Pending,
    PendingReviewError,
    check_pending,
    read_pending,
    summarize,
)
from modelward.publisher._team_expiry import TeamRoleExpiredError, expired_on_the_way
from modelward.publisher._tufcheck import check_root_chain, check_state
from modelward.publisher.errors import KeyError_, RepositoryStateError
from modelward.trust._atomic import copy_atomic, write_atomic
from modelward.trust._fingerprint import slot_fingerprint
from modelward.updater.bundle._bundle import extract_bundle
from modelward.updater.bundle._semver import SemVer
from modelward.updater.install._search import TOP, Found, find_releases, preorder_walk

logger = logging.getLogger(__name__)


class _Counting:
    """Reports bytes read through it."""

    def __init__(self, f: Any, progress: Callable[[int], None]) -> None:
        self._f, self._progress = f, progress

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._f.read(n)
        self._progress(len(data))
        return data


def _valid_signatures(md: Metadata, role: str, root: Root) -> int:  # type: ignore[type-arg]
    """How many of ``role``'s keys signed ``md`` validly."""
    n = 0
    for keyid in root.roles[role].keyids:
        sig = md.signatures.get(keyid)
        if sig is None:
            continue
        try:
            root.get_key(keyid).verify_signature(sig, md.signed_bytes)
        except (UnverifiedSignatureError, VerificationError):
            logger.warning("ignoring an invalid %s signature by key %s", role, keyid[:16])
            continue
        n += 1
    return n


class ThresholdNotMetError(RepositoryStateError):
    """Metadata has fewer signatures than its role's threshold; it waits for more.

    Attributes:
        role, have, need: the role and its signature count and threshold.
        pending: where the metadata waits.
    """

    def __init__(self, role: str, have: int, need: int, pending: Path) -> None:
        super().__init__(
            f"{role} metadata has {have} of the {need} signatures its threshold needs: "
            f"{need - have} missing; it waits in {pending}",
            hint=f"add signatures with `modelward repo sign {role} --key URI`",
        )
        self.role, self.have, self.need, self.pending = role, have, need, pending


class TeamMustActError(RepositoryStateError):
    """A change needs a delegated role's key, and this key directory does not hold it.

    Attributes:
        role: the delegated role whose key must sign.
    """

    def __init__(self, role: str, what: str, key_file: Path) -> None:
        super().__init__(
            f"{what} needs the key of delegated role {role!r}, which is not in {key_file.parent}"
            f": the team holding role {role!r} must do it",
            hint=f"ask the {role!r} team, or act as the operator: `modelward rollout` "
                 "halts, pins or withdraws a team's release from the top-level targets")
        self.role = role


@dataclass(frozen=True)
class RoleStatus:
    """One row of ``repo status``."""

    role: str
    version: int
    expires: datetime
    threshold: int
    signatures: int
    warning: str
    window: timedelta = timedelta(0)  # warned this long before expiry


@dataclass(frozen=True)
class PublishResult:
    """What :func:`publish_bundle` added."""

    target_path: str
    name: str
    version: str
    fingerprint: str
    length: int
    targets_version: int
    timestamp_version: int
    index_path: str | None = None  # its chunk index target (None: published without one)
    estimates: tuple[FetchEstimate, ...] = ()  # what devices on earlier releases fetch


def _fields(t: TargetFile) -> dict[str, Any]:
    f = t.custom.get("modelward") if isinstance(t.custom, dict) else None
    return f if isinstance(f, dict) else {}


def _bp(percent: float) -> int:
    """Percent as integer basis points: TUF's canonical JSON has no floats."""
    return round(percent * 100)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _serializer() -> JSONSerializer:
    return JSONSerializer(compact=False)


class Repository:
    """A modelward TUF repository on disk.

    Args:
        repo: directory that is served (``metadata/`` and ``targets/``).
        keys: directory holding the encrypted role keys (never under ``repo``).
        passphrase: passphrases of the key files: a provider (role or team name -> bytes,
            e.g. ``EnvPassphrases``), or one value for every role.
        expiry: metadata lifetimes.

    ``online`` (set by :func:`publisher._online.attach`): the directory of the snapshot and
    timestamp keys, apart from ``keys`` (README "Production layout").

    ``adopt_anchor``: a repository made before ``KEYS/trusted-root.json`` existed has its
    served ``1.root.json`` adopted as the anchor once (with a warning); a reader that
    must write nothing and trust only an anchor it holds (the fleet view) sets it False,
    and a missing anchor is then a :class:`~modelward.publisher._served.MissingAnchorError`.
    """

    online: OnlineKeys | None = None
    adopt_anchor = True
    signed_now = 0  # the targets version this command wrote (its snapshot is to follow)

    def __init__(
        self, repo: Path, keys: Path, passphrase: Passphrase, expiry: Expiry | None = None,
        clock: Callable[[], datetime] = _now, secrets: Callable[[str], str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if is_inside(keys, repo):
            raise RepositoryStateError(
                f"key directory {keys} is inside the served repository {repo}",
                hint="keep keys outside REPO: everything under it is published",
            )
        self.repo, self.keys = repo, keys
        self._passphrase = as_provider(passphrase)
        self.metadata_dir = repo / "metadata"
        self.targets_dir = repo / "targets"
        self.expiry = expiry or load_expiry(keys)  # KEYS/expiry.json: `repo set-expiry`
        self._clock = clock
        self.signers = SignerRegistry(keys, self._passphrase, secrets, environ)
        self.pending_dir = keys / "pending"
        self._sign_with: list[str] | None = None  # explicit signer URIs for the next write

    # -- init -------------------------------------------------------------------

    def init(self, thresholds: dict[str, int] | None = None,
             key_counts: dict[str, int] | None = None) -> Path:
        """Create keys and version 1 of all top-level metadata.

        Args:
            thresholds: signatures each role needs (default 1).
            key_counts: encrypted-file keys made per role (default 1; more keys, e.g. in
                an HSM, can be added with :meth:`add_key`).

        Returns:
            Path of ``1.root.json`` (what devices are provisioned with).

        Raises:
            RepositoryStateError: the repository exists, or a threshold is impossible.
        """
        if (self.metadata_dir / "timestamp.json").exists():
            raise RepositoryStateError(f"{self.repo} already holds a TUF repository")
        thresholds, key_counts = thresholds or {}, key_counts or {}
        for role in set(thresholds) | set(key_counts):
            if role not in ROLES:
                raise RepositoryStateError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        for role in ROLES:  # every passphrase before the first key file is written
            check_new_passphrase(self._passphrase(role), role)
        now = self._clock()
        root = Root(expires=now + self.expiry.root, consistent_snapshot=True)
        uris: list[str] = []
        for role in ROLES:
            count = key_counts.get(role, 1)
            if not 1 <= thresholds.get(role, 1) <= count:
                raise RepositoryStateError(
                    f"{role}: threshold {thresholds.get(role, 1)} needs at least that many "
                    f"keys (--keys-per-role {role}=N); got {count}")
            home = key_home(self, role)  # snapshot, timestamp: maybe the online directory
            for i in range(count):
                name = f"{role}.pem" if i == 0 else f"{role}-{i + 1}.pem"
                key = generate_key_at(home.dir / name, home.passphrases, role)
                root.add_key(key, role)
                home.registry.add(key.keyid, f"{ENCFILE}:{name}")
                uris.append(f"{ENCFILE}:{name}")
            root.roles[role].threshold = thresholds.get(role, 1)
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        self._sign_with = uris  # version 1 is signed by every key made here
        try:
            self._write(Metadata(root), "root", 1)
            targets = Targets(version=1, expires=now + self.expiry.targets)
            self._write(Metadata(targets), "targets", 1)
            self._snapshot_and_timestamp(targets_version=1)
        finally:
            self._sign_with = None
        after_init(self)
        return self.metadata_dir / "1.root.json"

    # -- reading -------------------------------------------------------------

    def _view(self, *, strict: bool = True) -> View:
        """The published state, verified from the trust anchor (modelward.publisher._served)."""
        return verified_view(self, strict=strict)

    def _load(self, filename: str) -> Metadata:  # type: ignore[type-arg]
        """A published file, verified: ``N.root.json`` of the verified root chain, or the
        ``timestamp.json`` / snapshot / targets of the verified published state.

        Raises:
            RepositoryStateError: it is not part of the verified published state (a
                ServedFileError names a file that does not verify).
        """
        m = re.fullmatch(r"([0-9]{1,16})\.root\.json", filename)
        if m:
            for root_md in trusted_chain(self):
                if root_md.signed.version == int(m.group(1)):
                    return root_md
            raise RepositoryStateError(f"{filename} is not in the verified root chain")
        view = self._view()
        for md in (view.timestamp, view.snapshot, view.targets):
            name = "timestamp.json" if md.signed.type == "timestamp" else \
                f"{md.signed.version}.{md.signed.type}.json"
            if name == filename:
                return md
        m = re.fullmatch(r"([0-9]{1,16})\.targets\.json", filename)
        if m and online_elsewhere(self) and int(m.group(1)) > view.targets.signed.version:
            # signed here, not yet in the online host's snapshot: verified by its keys
            return verify_role(self.metadata_dir / filename, "targets", view.roots)
        own = own_targets_md(self, filename)  # what the offline side builds on
        if own is not None:
            return own
        raise RepositoryStateError(f"{self.metadata_dir / filename} is not part of the "
                                   "verified published state")

    def latest_root_version(self) -> int:
        """The newest root of the verified chain (from the trust anchor outside REPO)."""
        return int(trusted_chain(self)[-1].signed.version)

    def current(self) -> tuple[Targets, Snapshot, Timestamp]:
        """The published top-level targets, snapshot and timestamp, verified.

        Raises:
            ServedFileError: naming a published file that does not verify.
        """
        # the targets: on the offline side its own newest signed ones (_offline_base)
        view, targets = current_view(self)
        ts: Timestamp = view.timestamp.signed
        snap: Snapshot = view.snapshot.signed
        return targets, snap, ts

    # -- writing -------------------------------------------------------------

    def _signer(self, role: str) -> Signer:
        home = key_home(self, role)
        return load_signer(home.dir, role, home.passphrases(role))

    def _trusted_root(self) -> Root:
        """The newest root of the verified chain (a fresh copy: callers edit it)."""
        root: Root = trusted_chain(self)[-1].signed
        return root

    def _write(self, md: Metadata, role: str, version: int | None) -> None:  # type: ignore[type-arg]
        """Sign ``md`` for ``role`` and publish it, or park it until the threshold is met.

        For root, the previous root's root keys may sign too (TUF needs both thresholds).

        Raises:
            ThresholdNotMetError: fewer signatures than the role's threshold; the metadata
                waits in ``KEYS/pending/`` for `repo sign`.
            RootNotPublishableError: a root short of either threshold (parked likewise).
        """
        root = md.signed if role == "root" else self._trusted_root()
        registry = key_home(self, role).registry
        keys = self._role_keys(role, root)
        entries = registry.entries()
        by_uri = {u: k for k, u in entries.items()}
        # Explicit URIs count for the role they belong to. Otherwise keys chosen by keyid
        # among those the root lists (never a file name for a key it no longer lists): the
        # role's default key; for the online roles (signed from a timer, nobody to add a
        # second signature) as many registered keys as the threshold needs.
        mine = [u for u in (self._sign_with or []) if by_uri.get(u) in keys]
        explicit = bool(mine)  # each given key must sign
        need = len(mine) or (root.roles[role].threshold if role in ("snapshot", "timestamp")
                             else 1)
        if not mine:  # candidates in order; the unusable ones are skipped below
            mine = signing_uris(role, keys, entries, len(keys))
        signed = 0
        for uri in mine:
            if signed >= need:
                break
            signed += 1
            keyid = by_uri.get(uri)
            if keyid is None:  # a repository from before the registry: <role>.pem
                signer = self._signer(role)
                if signer.public_key.keyid in keys:
                    md.sign(signer, append=True)
                continue
            try:
                md.sign(registry.signer(uri, keys[keyid], role), append=True)
            except KeyError_:
                if explicit or uri == mine[0]:
                    raise
                signed -= 1
                logger.warning("%s key %s cannot sign here; trying the next", role, uri)
        rootstage.cosign(self, md, role)  # a staged root's keys too (two-machine layout)
        self._publish_or_park(md, role, version, root)

    def _role_keys(self, role: str, root: Root) -> dict[str, Key]:
        """keyid -> key of the keys that may sign ``role`` metadata under ``root``; for a
        new root also the published root's root keys."""
        keys = {k: root.get_key(k) for k in root.roles[role].keyids}
        if role == "root" and root.version > 1:
            previous = self._trusted_root()
            keys.update({k: previous.get_key(k) for k in previous.roles[role].keyids
                         if k not in keys})
        return keys

    def _reader(self, name: str, data: bytes) -> Callable[[str], bytes | None]:
        """metadata/ as it would be with ``data`` written as ``name``."""
        def read(n: str) -> bytes | None:
            if n == name:
                return data
            return read_file(self.metadata_dir / n)
        return read

    def _park(self, md: Metadata, name: str) -> Path:  # type: ignore[type-arg]
        self.pending_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.pending_dir / name
        write_atomic(path, md.to_bytes(_serializer()))
        return path

    def _publish_or_park(self, md: Metadata, role: str, version: int | None,  # type: ignore[type-arg]
                         root: Root) -> None:
        """Publish ``md`` if devices would accept it; park it if it lacks signatures.

        Root N+1 needs root N's threshold and its own (:func:`root_gaps`); every write
        clients fetch (a root, ``timestamp.json``) first passes the stock-client gate
        (:mod:`modelward.publisher._tufcheck`).
        """
        name = f"{role}.json" if version is None else f"{version}.{role}.json"
        if version is not None and self._is_published(role, version):
            raise RepositoryStateError(
                f"{name} is published already: a published version is never rewritten "
                "(devices may hold it)",
                hint=f"the pending {role} metadata is stale; delete it from "
                     f"{self.pending_dir} and redo the change")
        if role == "root":
            self._publish_root(md, name)
            return
        have = _valid_signatures(md, role, root)
        need = root.roles[role].threshold
        if have < need:  # parked as VERSION.<role>.json (timestamp too), as `repo sign` finds it
            raise ThresholdNotMetError(role, have, need, self._park(
                md, f"{md.signed.version}.{role}.json"))
        data = md.to_bytes(_serializer())
        if name == "timestamp.json":
            check_state(self._reader(name, data), self._clock(), self._reader("", b""))
        if role == "targets":  # KEYS first: a crash before the served copy leaves the head
            # ahead (restore_head puts it back), never a served targets the head lacks
            record_signed_targets(self.keys, md.signed.version, data)
            record_head(self.keys, md.signed.version, data)  # what the next change builds on
            self.signed_now = md.signed.version
        write_atomic(self.metadata_dir / name, data)
        (self.pending_dir / f"{md.signed.version}.{role}.json").unlink(missing_ok=True)
        if name == "timestamp.json":  # what devices may hold now: never served lower
            snap_v = md.signed.snapshot_meta.version
            snap_md = served_load(self.metadata_dir / f"{snap_v}.snapshot.json")  # the gate
            targets = snap_md.signed.meta.get("targets.json")  # passed it just now
            save_floors(self, {"timestamp": md.signed.version, "snapshot": snap_v,
                               "targets": targets.version if targets else 0})

    def _is_published(self, role: str, version: int) -> bool:
        """Whether clients may hold ``<version>.<role>.json``: a root on disk (clients probe
        for the next one), a snapshot or targets version up to the one referenced now (a
        higher one on disk is an orphan of a refused write, which may be replaced)."""
        if role == "root":
            return (self.metadata_dir / f"{version}.root.json").exists()
        if role not in ("snapshot", "targets"):
            return False
        try:
            targets, snap, ts = self.current()
        except RepositoryStateError:
            return False
        # targets: up to the version the next change builds on (its own signed history on
        # the offline side; a snapshot naming a higher, forged one does not block it)
        return version <= (ts.snapshot_meta.version if role == "snapshot" else
                           targets.version)

    def _publish_root(self, md: Metadata[Root], name: str) -> None:
        new = md.signed
        previous = self._trusted_root() if new.version > 1 else None
        refuse_expired_root(new, self._clock(), self.pending_dir / name)
        gaps = root_gaps(previous, md)
        if gaps:
            raise RootNotPublishableError(new.version, gaps, self.signers.entries(),
                                          self._park(md, name))
        data = md.to_bytes(_serializer())
        check_root_chain(self._reader(name, data), self._clock())
        plan = {} if previous is None else self._resign_plan(new)
        if plan and online_elsewhere(self):  # the online host publishes it, with its files
            rootstage.stage(self, md, data, plan)
            return
        if any(len(uris) < new.roles[r].threshold for r, uris in plan.items()):
            path = self._park(md, name)
            short = "; ".join(f"{r} needs {new.roles[r].threshold} of its new keys, "
                              f"{len(u)} can sign here" for r, u in plan.items()
                              if len(u) < new.roles[r].threshold)
            raise RepositoryStateError(
                f"root v{new.version} is signed, but the metadata it re-keys cannot be "
                f"re-signed here: {short}; the root waits in {path}",
                hint="make those keys usable (passphrase, HSM PIN, envvar), then "
                     "`modelward repo sign root --key URI` publishes it")
        if plan:  # re-keyed metadata signed by both roots' keys first, the root last
            rootstage.stage(self, md, data, plan)
            return
        write_atomic(self.metadata_dir / name, data)
        (self.pending_dir / name).unlink(missing_ok=True)
        if previous is not None:
            self._finish_root_change(previous, new, plan)
        save_anchor(self, data)  # the change is complete: trusted from now on

    def _resign_plan(self, new: Root) -> dict[str, list[str]]:
        """Roles whose published metadata root ``new`` no longer accepts, each with the
        URIs of its new keys that can sign here (only as many as its threshold).

        Targets count as accepted only when both the targets the next change builds on
        (on the offline side its own head, ``KEYS/targets-head.json``) and the targets the
        served snapshot names (what devices hold) verify under ``new``: after a crash
        between a re-keyed targets and the snapshot that lists it, the head is co-signed
        but devices still see the old one."""
        view, targets = current_view(self)
        snap = view.snapshot.signed
        published = {"targets": f"{targets.version}.targets.json",
                     "snapshot": f"{snap.version}.snapshot.json", "timestamp": "timestamp.json"}
        plan: dict[str, list[str]] = {}
        for role, filename in published.items():
            mds = [self._load(filename)] + ([view.targets] if role == "targets" else [])
            if all(_valid_signatures(md, role, new) >= new.roles[role].threshold
                   for md in mds):
                continue
            try:  # the keys of the role's home (the online directory for online roles)
                registry = key_home(self, role).registry
            except RepositoryStateError:
                plan[role] = []  # not here: the root cannot be completed on this machine
                continue
            entries = registry.entries()
            keys = {k: new.get_key(k) for k in new.roles[role].keyids}
            first = default_uri(role, keys, entries)
            uris = [first] + sorted(entries[k] for k in keys
                                    if k in entries and entries[k] != first)
            usable: list[str] = []
            for uri in uris:
                if len(usable) >= new.roles[role].threshold:
                    break
                keyid = entries_keyid(entries, uri)
                if keyid is None or keyid not in keys:
                    continue
                try:
                    registry.signer(uri, keys[keyid], role)
                except KeyError_ as e:
                    logger.warning("%s key %s cannot sign here: %s", role, uri, e)
                    continue
                usable.append(uri)
            plan[role] = usable
        return plan

    def _finish_root_change(self, previous: Root, new: Root,
                            plan: dict[str, list[str]]) -> None:
        """After root ``new`` is published: file the keys it retired, then re-sign what it
        re-keyed (targets: a new version; snapshot and timestamp follow)."""
        retire_key_files(self.keys, self.signers, previous, new)
        saved = self._sign_with
        try:
            # Every re-keyed role signs with the plan's keys (each write takes the URIs of
            # its own role's keys); a role outside the plan with its default keys.
            self._sign_with = [u for uris in plan.values() for u in uris]
            if "targets" in plan:
                targets, _, _ = self.current()
                self._commit_targets(targets)
            elif plan:
                targets, _, _ = self.current()
                self._snapshot_and_timestamp(targets.version)
        finally:
            self._sign_with = saved
        logger.info("root v%d published%s", new.version,
                    f"; re-signed {', '.join(plan)}" if plan else "")

    def complete_root_change(self) -> bool:
        """Finish a root change that was published but not completed (a crash between
        writing ``N.root.json`` and re-signing what it re-keys); returns whether there
        was one. Run before every root change; idempotent.
        """
        rootstage.finish(self)  # published by the online host: retire, re-anchor
        if rootstage.resume(self):  # staged, not yet published
            return False
        version = self.latest_root_version()
        if version < 2:
            return False
        new = self._trusted_root()
        plan = self._resign_plan(new)
        if not plan:
            return False
        previous: Root = self._load(f"{version - 1}.root.json").signed
        logger.warning("root v%d was published but %s not re-signed: completing it", version,
                       ", ".join(plan))
        self._finish_root_change(previous, new, plan)
        data = read_file(self.metadata_dir / f"{version}.root.json")
        assert data is not None  # verified just now, in the chain
        save_anchor(self, data)
        return True

    def _refuse_if_root_pending(self, version: int) -> None:
        rootstage.refuse_if_staged(self, version)
        path = self.pending_dir / f"{version}.root.json"
        if path.exists():
            raise RepositoryStateError(
                f"root v{version} is already waiting for signatures in {path}",
                hint="sign it (`modelward repo sign root --key URI`), or delete that file "
                     "to abandon it (the keys in use stay valid)")

    def sign_pending(self, role: str, uri: str, reviewed: str | None = None) -> tuple[int, int]:
        """Add the signature of the key at ``uri`` to the pending ``role`` metadata.

        When that meets the threshold, the metadata is published (for targets, with a
        new snapshot and timestamp; for root, once it meets the previous root's threshold
        and its own, the change completes: re-keyed roles are re-signed). ``reviewed``: the
        digest of the pending file the signer saw (:meth:`review_pending`); another file is
        refused.

        Returns:
            (signatures now, threshold).

        Raises:
            RepositoryStateError: nothing pending for the role.
            KeyError_: the key is not registered or cannot be used.
            ThresholdNotMetError: still short (after adding this signature).
            PendingMetadataError: the pending file is not signable as it is (edited after
                it was signed, stale, not the reviewed bytes).
            RootNotPublishableError: a root still short of either threshold.
        """
        path = self._pending_path(role)
        md = self._check_pending(role, path, read_pending(path), reviewed).md
        root = md.signed if role == "root" else self._trusted_root()
        registry = key_home(self, role).registry
        keyid = registry.keyid_for(uri)
        keys = self._role_keys(role, root)
        if keyid not in keys:
            raise RepositoryStateError(f"{uri} is not a {role} key")
        md.sign(registry.signer(uri, keys[keyid], role), append=True)
        version = int(path.name.split(".", 1)[0])
        self._publish_or_park(md, role, None if role == "timestamp" else version, root)
        path.unlink(missing_ok=True)
        if role == "targets":
            self._snapshot_and_timestamp(version)
        if role == "snapshot":  # devices reach a snapshot only through the timestamp
            self._timestamp_for(version)
        return _valid_signatures(md, role, root), root.roles[role].threshold

    def _timestamp_for(self, snapshot_version: int) -> None:
        """Sign and publish the next timestamp, pointing at ``snapshot_version``."""
        ts = self.current()[2]
        ts.version += 1
        ts.expires = self._clock() + self.expiry.timestamp
        ts.snapshot_meta = self._signed_meta("snapshot", snapshot_version)
        self._write(Metadata(ts), "timestamp", None)

    def add_key(self, role: str, uri: str, public_key: Key,
                threshold: int | None = None) -> int:
        """Add a key (e.g. in an HSM) to ``role``, optionally with a new threshold.

        Root N+1 goes through the pending flow: it is published only with the threshold
        of root N's keys and its own (else RootNotPublishableError; `repo sign root`).

        Returns:
            The new root version.

        Raises:
            RepositoryStateError: unknown role or impossible threshold.
            RootNotPublishableError: root N+1 waits for more root signatures.
        """
        if role not in ROLES:
            raise RepositoryStateError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        self.complete_root_change()
        version = self.latest_root_version()
        self._refuse_if_root_pending(version + 1)
        root = self._trusted_root()
        root.add_key(public_key, role)
        if threshold is not None:
            if not 1 <= threshold <= len(root.roles[role].keyids):
                raise RepositoryStateError(f"{role}: threshold {threshold} with "
                                           f"{len(root.roles[role].keyids)} keys")
            root.roles[role].threshold = threshold
        root.version = version + 1
        root.expires = self._clock() + self.expiry.root
        key_home(self, role).registry.add(public_key.keyid, uri)
        self._write(Metadata(root), "root", root.version)
        return int(root.version)

    def _signed_meta(self, role: str, version: int) -> MetaFile:
        """The MetaFile for the published ``<version>.<role>.json``, with its length and
        SHA-256: a device then downloads no more than that length and checks the hash
        before it parses the file (without them it takes up to its configured maximum of
        whatever the origin sends, and parses it before any signature check)."""
        data = read_file(self.metadata_dir / f"{version}.{role}.json")
        if data is None:  # not published here (parked for signatures): by version
            return MetaFile(version=version)
        return MetaFile(version=version, length=len(data),
                        hashes={"sha256": hashlib.sha256(data).hexdigest()})

    def _snapshot_and_timestamp(self, targets_version: int) -> int:
        if online_elsewhere(self):
            logger.warning("targets v%d signed; the online host's `repo refresh` lists it in "
                           "the next snapshot and timestamp", targets_version)
            return int(self.current()[2].version)
        now = self._clock()
        listed: dict[str, MetaFile] = {}
        served = self.metadata_dir / "timestamp.json"  # (the snapshot listing ``listed``)
        if read_file(self.metadata_dir / "timestamp.json") is None:  # `repo init`
            snap_version, ts_version = 1, 1
        else:  # a published state that does not verify is an error, never a fresh start
            _, old_snap, old_ts = self.current()
            # above the served versions and this side's records: never one devices hold
            snap_version, ts_version = next_versions(self, old_snap.version, old_ts.version)
            listed = {k: m for k, m in old_snap.meta.items() if k != "targets.json"}
            served = self.metadata_dir / f"{old_snap.version}.snapshot.json"
        restore_head(self, targets_version)  # the served copy, as this tool signed it
        meta = {"targets.json": self._signed_meta("targets", targets_version)}
        # Every delegated role too, with its length and hash: a device downloads at most
        # that many bytes of a team's role and checks them before it parses anything.
        # Only versions that verify through the delegation tree of these targets; a role
        # listed before stays listed (clients refuse a snapshot that drops or lowers one).
        meta.update(delegated_meta(  # each from its verified file; the served: floors only
            listed, self._delegated_versions(self._written_targets(targets_version)),
            self._signed_meta, served))
        snap = Snapshot(version=snap_version, expires=now + self.expiry.snapshot, meta=meta)
        self._write(Metadata(snap), "snapshot", snap_version)
        ts = Timestamp(
            version=ts_version,
            expires=now + self.expiry.timestamp,
            snapshot_meta=self._signed_meta("snapshot", snap_version),
        )
        self._write(Metadata(ts), "timestamp", None)
        return ts_version

    # -- publish -------------------------------------------------------------

    def publish(self, bundle: Path, *, channel: str = "stable", rollout: float = 100.0,
                sign_with: list[str] | None = None, role: str | None = None,
                progress: Callable[[int], None] = lambda _n: None,
                unsafe_plaintext: bool = False) -> PublishResult:
        """Verify a bundle, add it as a signed target and publish new metadata.

        Args:
            bundle: the bundle file.
            channel: release channel devices follow (``channel`` in their config).
            rollout: share of the channel's devices (0-100) eligible at first.
            sign_with: URIs of the targets keys to sign with (default: the role's first
                key). Short of the threshold, the metadata waits for `repo sign`.
            role: a delegated role (a team) to publish as, with its own key.
            progress: called with byte counts (verifying, hashing, copying: 3x the size).
            unsafe_plaintext: publish a bundle that is not encrypted although the model's
                newest release is (its weights reach the origin in the clear; warned).

        Raises:
            ThresholdNotMetError: the targets threshold is not met yet.
            BundleFormatError: the bundle is malformed.
            RepositoryStateError: this model version is published already, or the bundle
                is not encrypted and the model's newest release is (without
                ``unsafe_plaintext``).
        """
        with open(bundle, "rb") as f:  # (hashing the bytes verified: the index is cut from them)
            verified = VerifiedStream(_Counting(f, progress))
            manifest, entries = extract_bundle(cast(IO[bytes], verified), None, str(bundle))
            verified.finish()
        SemVer.parse(manifest.version)
        _policy.check_bundle(self, bundle, manifest)  # (the training side signed it)
        if not 0.0 <= rollout <= 100.0:
            raise RepositoryStateError(f"rollout {rollout} is not a percentage (0-100)")
        fingerprint = slot_fingerprint(entries)
        targets, _, _ = self.current()
        for found in self.releases(manifest.name, targets):
            field = _fields(found.target)
            if field.get("version") == manifest.version:
                raise RepositoryStateError(
                    f"{manifest.name} {manifest.version} is published already ({found.path}, "
                    f"role {found.role!r}{', withdrawn' if field.get('withdrawn') else ''})",
                    hint="publish a new version: devices only move forward",
                )
        if manifest.encryption is None:
            self._check_not_decrypted(manifest.name, targets, unsafe_plaintext)
        target_path = f"{manifest.name}/{manifest.name}-{manifest.version}.tar"
        if role is not None:  # refuse before anything reaches the served directory
            self._check_delegation(targets, role, target_path)
            self._check_not_expired_on_the_way(targets, role, target_path)
            key_file = self.keys / f"delegated-{role}.pem"
            if not key_file.exists():
                raise TeamMustActError(role, f"publishing {target_path}", key_file)
        tf = verified.target_file(target_path)
        progress(tf.length)
        tf.unrecognized_fields["custom"] = {
            "modelward": {
                "name": manifest.name,
                "version": manifest.version,
                "fingerprint": fingerprint,
                "channel": channel,
                "rollout": {"basis_points": _bp(rollout), "halted": False},
                "pinned": False,
            }
        }
        dest = served_dest(self.targets_dir, tf)  # (never out of the served targets)
        copy_atomic(bundle, dest)  # (a fresh temporary name: a link planted there is not followed)
        progress(tf.length)
        index = add_index(self.targets_dir, dest, tf, (lambda p: None) if role is None else
                          lambda p: self._check_delegation(targets, role, p))
        resolved = self._resolved(manifest.name, targets)  # (indexes too, as devices find them)
        views = estimates(self.targets_dir, [f for f in resolved.found.values() if
                                             _fields(f.target).get("name") == manifest.name],
                          resolved, index, tf.length, _fields)
        ipath = index.target.path if index.target is not None else None
        if role is not None:
            ts_version = self._publish_delegated(role, target_path, tf, index.target)
            return PublishResult(target_path, manifest.name, manifest.version, fingerprint,
                                 tf.length, targets.version, ts_version, ipath, views)
        targets.targets[target_path] = tf
        if index.target is not None:  # (same targets version: one signing)
            targets.targets[index.target.path] = index.target
        self._sign_with = sign_with
        try:
            ts_version = self._commit_targets(targets)
        finally:
            self._sign_with = None
        logger.info(
            "published %s %s (fingerprint %s) as targets v%d",
            manifest.name, manifest.version, fingerprint, targets.version,
        )
        return PublishResult(
            target_path, manifest.name, manifest.version, fingerprint, tf.length,
            targets.version, ts_version, ipath, views,
        )

    def _check_not_decrypted(self, name: str, targets: Targets, unsafe: bool) -> None:
        """A plaintext bundle of ``name`` is refused when the model's newest release is
        encrypted: a build that forgot ``--encrypt-for`` would hand the next model to the
        origin, the CDN and the broker in the clear.

        Raises:
            RepositoryStateError: refused (``unsafe`` False).
        """
        newest: tuple[SemVer, Found] | None = None
        for found in self.releases(name, targets):
            try:
                v = SemVer.parse(str(_fields(found.target).get("version")))
            except ValueError:
                continue
            if newest is None or v > newest[0]:
                newest = (v, found)
        if newest is None:
            return
        from modelward.publisher._encrypt import served_encryption
        from modelward.publisher._indexpub import served_name

        if not served_encryption(served_name(self.targets_dir, newest[1].target)):
            return
        what = f"{name} {newest[0]} ({newest[1].path}) is encrypted; this bundle is not"
        if not unsafe:
            raise RepositoryStateError(
                f"{what}: its weights would reach the origin in the clear",
                hint="build it with `bundle build --encrypt-for ... --fleet-dir ...`, or "
                "publish with --unsafe-plaintext if the model is to be public from now on")
        logger.warning("%s: publishing it in the clear (--unsafe-plaintext)", what,
                       extra={"model": name})

    def _commit_targets(self, targets: Targets) -> int:
        """Sign the next targets version, then snapshot and timestamp; returns timestamp v."""
        targets.version += 1
        targets.expires = self._clock() + self.expiry.targets
        self._write(Metadata(targets), "targets", targets.version)
        return self._snapshot_and_timestamp(targets.version)

    # -- delegations ------------------------------------------------------------

    def _written_targets(self, version: int) -> Targets:
        """``<version>.targets.json`` as written, verified by the trusted root's targets keys.

        Raises:
            ServedFileError: it does not verify.
        """
        path = self.metadata_dir / f"{version}.targets.json"
        md = verify_role(path, "targets", trusted_chain(self))
        targets: Targets = md.signed
        return targets

    def _delegations(self, targets: Targets | None = None
                     ) -> tuple[dict[str, int], dict[str, Metadata[Targets]]]:
        """Each role in the delegation tree of the verified ``targets`` (default: the
        published ones) with its newest version that verifies through its delegator; a
        file merely present in metadata/ is never listed."""
        top = targets if targets is not None else self.current()[0]
        return verified_delegations(self.metadata_dir, top, log=logger.debug)

    def _delegated_versions(self, targets: Targets | None = None) -> dict[str, int]:
        """Latest verified version of each delegated targets role (see _delegations)."""
        return self._delegations(targets)[0]

    def _role_md(self, role: str) -> Metadata[Targets]:
        """The newest verified version of a delegated role's metadata.

        Raises:
            RepositoryStateError: the role is not delegated, or no file of it verifies.
        """
        md = self._delegations()[1].get(role)
        if md is None:
            raise RepositoryStateError(
                f"no delegated role {role!r} with metadata signed by the keys its delegator "
                "gives it (see `repo delegate`)")
        return md

    def _loader(self, targets: Targets,
                extra: tuple[str, str] | None = None) -> Callable[[str, str], Targets]:
        """Roles as devices load them, from this repository's own files (``targets``
        standing for the top-level role; ``extra`` = (role, path) pretends the role lists
        the path).

        Each delegated role's newest file is verified against the keys and threshold its
        delegator (loaded and verified before it) gives it, as a device would: a file in
        the served directory that the team's key did not sign is never used (and never
        copied into the operator-signed top-level targets).

        The loader raises RepositoryStateError for a role that is missing or does not
        verify.
        """
        verified: dict[str, Targets] = {TOP: targets}

        def load(role: str, delegator: str) -> Targets:
            t = verified.get(role)
            if t is None:
                parent = verified.get(delegator)
                if parent is None:
                    raise RepositoryStateError(
                        f"delegated role {role!r}: its delegator {delegator!r} is not loaded")
                md = self._role_md(role)
                if not isinstance(md.signed, Targets):
                    raise RepositoryStateError(f"delegated role {role!r}: its metadata is "
                                               f"{md.signed.type}, not targets")
                try:
                    parent.verify_delegate(role, md.signed_bytes, md.signatures)
                except (UnsignedMetadataError, ValueError) as e:
                    raise RepositoryStateError(
                        f"delegated role {role!r} (version {md.signed.version}) is not signed "
                        f"by the keys {delegator!r} delegates it to: {e}",
                        hint=f"the {role!r} team must re-sign its metadata") from e
                t = verified[role] = md.signed
            if extra is not None and extra[0] == role:
                t = copy.copy(t)
                t.targets = {**t.targets, extra[1]: TargetFile(1, {"sha256": "00"}, extra[1])}
            return t

        return load

    def releases(self, name: str, targets: Targets | None = None) -> list[Found]:
        """The targets under ``name/`` as devices find them: TUF's delegation search, each
        path taken from the role that search ends at (operator tombstones included)."""
        return self._releases(name, targets)[0]

    def _resolved(self, name: str, targets: Targets) -> Resolved:
        """Every target under ``name/`` (chunk indexes too), each from the role TUF's
        delegation search ends at (see :meth:`_releases` for what is left out), and what
        each role the search loaded lists."""
        found, reach = find_releases(name, self._loader(targets),
                                     skip=(RepositoryStateError,))
        return Resolved({f.path: f for f in found},
                        {role: t.targets for (_, role), t in reach.loaded.items()})

    def _releases(self, name: str, targets: Targets | None = None
                  ) -> tuple[list[Found], list[Exception]]:
        """:meth:`releases`, and why some paths were left out: a delegated role that is
        missing or does not verify removes only the paths its search speaks for (the
        operator's top-level releases never depend on a team's role)."""
        targets = targets if targets is not None else self.current()[0]
        found, reach = find_releases(name, self._loader(targets),
                                     skip=(RepositoryStateError,))
        for e in reach.errors:
            logger.warning("releases of %s: some left out: %s", name, e)
        return [f for f in found if _fields(f.target).get("name") == name], reach.errors

    def _release(self, targets: Targets, name: str, version: str) -> list[Found]:
        """The entries in force for ``name`` ``version``, as devices see them: only the
        operator's when the top-level targets list that version (tombstones included)."""
        found, errors = self._releases(name, targets)
        mine = [f for f in found if _fields(f.target).get("version") == version]
        if any(f.role == TOP for f in mine):
            mine = [f for f in mine if f.role == TOP]
        out = [f for f in mine if not _fields(f.target).get("withdrawn")]
        if not out:
            why = " (withdrawn: an operator tombstone)" if mine else ""
            left = "; ".join(str(e) for e in errors)
            raise RepositoryStateError(f"{name} {version} is not published{why}"
                                       + (f" (left out: {left})" if left else ""))
        return out

    @staticmethod
    def _unambiguous(found: list[Found], name: str, version: str, what: str) -> None:
        paths = sorted({f.path for f in found})
        if len(paths) > 1:
            raise RepositoryStateError(
                f"{what} {name} {version}: that version is listed at {len(paths)} paths "
                f"({', '.join(paths)}), with different bytes; refusing to choose",
                hint="withdraw the version (every path), and publish a new one once")

    def delegate(self, name: str, paths: list[str] | None = None, *, parent: str = TOP,
                 terminating: bool = True, hash_prefixes: list[str] | None = None) -> Path:
        """Delegate target paths (e.g. ``detector/*``) or hash prefixes to a team role.

        ``parent`` is the delegating role (the top-level targets, or a delegated role
        whose key is in KEYS). A role delegated by a second parent keeps its key.

        Returns:
            The team's key file (an ``encfile:`` key under KEYS).

        Raises:
            RepositoryStateError: the name is taken or not usable, or no paths.
            TeamMustActError: the parent's key is not here.
        """
        if name in ROLES or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):
            raise RepositoryStateError(f"{name!r} cannot be a delegated role name")
        check_team_variable(name, [*self._delegated_versions(), *(
            p.name[len("delegated-"):-len(".pem")] for p in self.keys.glob("delegated-*.pem"))])
        if not paths and not hash_prefixes:
            raise RepositoryStateError("a delegation needs at least one path pattern")
        for pattern in paths or []:
            if set(pattern.split("/", 1)[0]) & set("*?["):
                logger.warning("delegation %s -> %s: pattern %r is not limited to one model's "
                               "namespace (MODEL/...): the role may ship any model it matches",
                               parent, name, pattern)
        targets, _, _ = self.current()
        parent_md: Metadata[Targets] = Metadata(targets) if parent == TOP else \
            self._role_md(parent)
        delegating = parent_md.signed
        if delegating.delegations and delegating.delegations.roles and \
                name in delegating.delegations.roles:
            raise RepositoryStateError(f"role {name!r} is delegated already by {parent!r}")
        key_file = self.keys / f"delegated-{name}.pem"
        exists = name in self._delegated_versions()
        if exists:
            if not key_file.exists():
                raise TeamMustActError(name, f"delegating to role {name!r} again", key_file)
            key = load_signer_at(key_file, self._passphrase, name).public_key
        else:
            key = generate_key_at(key_file, self._passphrase, name)
            self.signers.add(key.keyid, f"{ENCFILE}:{key_file.name}")
        if delegating.delegations is None:
            delegating.delegations = Delegations(keys={}, roles={})
        assert delegating.delegations.roles is not None
        delegating.delegations.roles[name] = DelegatedRole(
            name=name, keyids=[], threshold=1, terminating=terminating,
            paths=None if hash_prefixes else paths, path_hash_prefixes=hash_prefixes or None)
        delegating.add_key(key, name)
        if not exists:
            team = Targets(version=next_role_version(0, self.current()[1].meta.get(
                f"{name}.json")), expires=self._clock() + self.expiry.targets)
            self._write_delegated(Metadata(team), name, key_file)
        if parent == TOP:
            self._commit_targets(targets)
        else:
            delegating.version = next_role_version(
                delegating.version, self.current()[1].meta.get(f"{parent}.json"))
            delegating.expires = self._clock() + self.expiry.targets
            self._write_delegated(parent_md, parent, self.keys / f"delegated-{parent}.pem")
            self._list_with(targets)
        return key_file

    def _write_delegated(self, md: Metadata, name: str, key_file: Path,  # type: ignore[type-arg]
                         check: Callable[[Metadata[Any]], None] = lambda _md: None) -> None:
        if not key_file.exists():
            raise TeamMustActError(name, f"signing {name} metadata", key_file)
        md.signatures.clear()
        md.sign(load_signer_at(key_file, self._passphrase, name))
        check(md)  # (before anything is written)
        write_atomic(self.metadata_dir / f"{md.signed.version}.{name}.json",
                     md.to_bytes(_serializer()))

    def _check_delegation(self, targets: Targets, role: str, target_path: str) -> None:
        """Devices must find ``target_path`` in ``role``: TUF's search for it ends there."""
        self._role_md(role)
        trail: list[str] = []
        hit = preorder_walk(target_path, self._loader(targets, (role, target_path)),
                            trail=trail)
        if hit is None or hit[0] != role:
            where = f"from role {hit[0]!r}" if hit else "in none of the roles it reaches"
            raise RepositoryStateError(
                f"{target_path} is outside the paths delegated to {role!r}: devices "
                f"searching for it (through {', '.join(trail)}) would take it {where}",
                hint="a team key may publish only its own models")

    def _check_not_expired_on_the_way(self, targets: Targets, role: str,
                                      target_path: str) -> None:
        """No delegated role devices visit on the way to ``target_path`` has expired.

        Raises:
            TeamRoleExpiredError: one has (names it and when).
        """
        trail: list[str] = []
        preorder_walk(target_path, self._loader(targets, (role, target_path)), trail=trail)
        hit = expired_on_the_way(trail, role, lambda r: self._role_md(r).signed.expires,
                                 self._clock())
        if hit is not None:
            raise TeamRoleExpiredError(hit[0], hit[1], role, target_path)

    def _publish_delegated(self, role: str, target_path: str, tf: TargetFile,
                           index: TargetFile | None = None) -> int:
        """Add ``tf`` (and its chunk ``index``) to the delegated ``role``; returns the new
        timestamp version."""
        targets, _, _ = self.current()
        self._check_delegation(targets, role, target_path)
        md = self._role_md(role)
        team = md.signed
        team.targets[target_path] = tf
        if index is not None:
            team.targets[index.path] = index
        team.version = next_role_version(team.version,
                                         self.current()[1].meta.get(f"{role}.json"))
        team.expires = self._clock() + self.expiry.targets
        key_file = self.keys / f"delegated-{role}.pem"
        self._write_delegated(md, role, key_file, check=lambda signed: check_team_signature(
            signed, role, key_file, {TOP: targets, **{n: m.signed for n, m in
                                                      self._delegations(targets)[1].items()}}))
        return self._list_with(targets)

    def _list_with(self, targets: Targets) -> int:
        """Snapshot and timestamp for a team's change, listing ``targets`` (the top-level
        ones built on). When no file of that version verifies with that content (numbered
        above a version the served snapshot names, after a jump: devices that took it
        refuse a lower one), the operator's targets are signed anew first (the targets
        key is needed, as for any top-level change); returns the timestamp version."""
        try:  # this tool's head (its served copy is put back first), or the served file
            own = own_targets_md(self, f"{targets.version}.targets.json")
            if own is not None and own.signed.to_dict() == targets.to_dict() or \
                    self._written_targets(targets.version).to_dict() == targets.to_dict():
                return self._snapshot_and_timestamp(targets.version)
        except ServedFileError as e:
            logger.debug("targets v%d not as built on: %s", targets.version, e)
        logger.warning("the top-level targets v%d are signed anew, as v%d, for the team's "
                       "change (the served snapshot names a version no signed file of this "
                       "tool has)", targets.version, targets.version + 1)
        return self._commit_targets(targets)

    # -- rollouts ---------------------------------------------------------------
    #
    # The operator decides in the top-level targets, which TUF's search consults before
    # any delegated role: a team's release is halted, re-phased, pinned or withdrawn by an
    # entry for its path there (same length and hashes, the operator's modelward fields),
    # which shadows the team's own entry on every device; no team key is needed.

    def _operator_entry(self, targets: Targets, found: Found) -> dict[str, Any]:
        """The top-level entry for a release (copied from its team's role if needed);
        returns its modelward fields, to edit in place."""
        if found.role != TOP:
            tf = TargetFile.from_dict(copy.deepcopy(found.target.to_dict()), found.path)
            field = tf.custom.get("modelward") if isinstance(tf.custom, dict) else None
            if isinstance(field, dict):
                field["pinned"] = False  # only the operator's own `pin` pins
            targets.targets[found.path] = tf
            logger.info("%s: the operator's decision goes into the top-level targets, over "
                        "role %s", found.path, found.role)
        f = targets.targets[found.path].custom.get("modelward")
        assert isinstance(f, dict)
        return f

    def set_rollout(self, name: str, version: str, *, percent: float | None = None,
                    halted: bool | None = None) -> int:
        """Change a release's rollout percentage or halt/resume it; returns targets version.

        Works on a team's release too (see above).

        Raises:
            RepositoryStateError: no such release, or not a percentage.
        """
        targets, _, _ = self.current()
        if percent is not None and not 0.0 <= percent <= 100.0:
            raise RepositoryStateError(f"rollout {percent} is not a percentage (0-100)")
        releases = self._release(targets, name, version)
        if percent is not None or halted is False:  # halting every entry is always safe
            self._unambiguous(releases, name, version, "rollout set")
        for found in releases:
            f = self._operator_entry(targets, found)
            rollout = dict(f.get("rollout") or {"basis_points": 10000, "halted": False})
            if percent is not None:
                rollout["basis_points"] = _bp(percent)
            if halted is not None:
                rollout["halted"] = halted
            f["rollout"] = rollout
        self._commit_targets(targets)
        return int(targets.version)

    def withdraw(self, name: str, version: str) -> int:
        """Take a release out of the signed targets (a bad build that got signed); returns
        the targets version. Devices that installed it keep it until a newer or pinned
        release reaches them; no device installs it any more.

        Every entry of that version (the operator's own and a team's, at any path) gets
        an operator tombstone (``withdrawn``) in the top-level targets, which stays: the
        version can never be published again, by the operator or by a team.

        Raises:
            RepositoryStateError: no such release.
        """
        targets, _, _ = self.current()
        self._release(targets, name, version)
        for found in [f for f in self.releases(name, targets)
                      if _fields(f.target).get("version") == version]:
            f = self._operator_entry(targets, found)
            f["withdrawn"] = True
            f["pinned"] = False
        self._commit_targets(targets)
        logger.info("withdrew %s %s as targets v%d", name, version, targets.version)
        return int(targets.version)

    def pin(self, name: str, version: str | None) -> int:
        """Pin ``name`` on its channel to ``version`` (None: unpin); returns targets version.

        A pin is the operator's signed decision that devices run that version, even if
        it is older than what they have; it beats any pin of a delegated role.
        """
        targets, _, _ = self.current()
        channel = None
        if version is not None:
            releases = self._release(targets, name, version)
            self._unambiguous(releases, name, version, "pin")
            channel = _fields(releases[0].target).get("channel", "stable")
            for found in releases:
                self._operator_entry(targets, found)
        for path, t in targets.targets.items():
            f = t.custom.get("modelward") if isinstance(t.custom, dict) else None
            if not isinstance(f, dict) or f.get("name") != name or \
                    not path.startswith(f"{name}/"):
                continue
            if channel is None or f.get("channel", "stable") == channel:
                f["pinned"] = version is not None and f.get("version") == version
        self._commit_targets(targets)
        return int(targets.version)

    # -- rotation -------------------------------------------------------------

    def rotate(self, role: str) -> int:
        """Replace ``role``'s key with a new one; returns the new root version.

        Root N+1 lists the new key and goes through the pending flow: it is published
        only once it carries root N's threshold and its own (for root itself, the new
        key signs too). Until then the old key stays the one in use and the new key
        waits, registered, in ``KEYS/rotating/``: an abandoned or crashed rotation
        changes nothing devices see. Once root N+1 is published the role's metadata is
        re-signed with the new key (targets: a new version, snapshot, timestamp) and the
        old key file moves to ``KEYS/retired/``.

        Raises:
            RepositoryStateError: unknown role, several keys, or a root change pending.
            RootNotPublishableError: root N+1 waits for more root signatures.
        """
        if role not in ROLES:
            raise RepositoryStateError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        refuse_rotate(self, role)
        now = self._clock()
        self.complete_root_change()
        version = self.latest_root_version()
        root = self._trusted_root()
        if len(root.roles[role].keyids) != 1:
            raise RepositoryStateError(
                f"{role} has {len(root.roles[role].keyids)} keys; `repo rotate` replaces a "
                "single key (use `repo add-key` and a threshold change for key sets)")
        self._refuse_if_root_pending(version + 1)
        rotating = self.keys / "rotating"
        tmp = rotating / f"{role}-new.pem"
        tmp.unlink(missing_ok=True)  # a rotation that crashed before it was registered
        new_key = generate_key_at(tmp, self._passphrase, role)
        final = rotating / f"{role}-{new_key.keyid[:16]}.pem"
        tmp.replace(final)
        new_uri = f"{ENCFILE}:rotating/{final.name}"
        self.signers.add(new_key.keyid, new_uri)
        entries = self.signers.entries()
        old_root_uri = default_uri("root", {k: root.get_key(k) for k in
                                            root.roles["root"].keyids}, entries)
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(new_key, role)
        root.version = version + 1
        root.expires = now + self.expiry.root
        saved = self._sign_with
        self._sign_with = [old_root_uri] + ([new_uri] if role == "root" else [])
        try:
            self._write(Metadata(root), "root", root.version)
        finally:
            self._sign_with = saved
        logger.info("rotated the %s key: root v%d", role, root.version)
        return int(root.version)

    # -- expiry ---------------------------------------------------------------

    def set_expiry(self, lifetimes: Mapping[str, timedelta] | None = None,
                   windows: Mapping[str, timedelta] | None = None) -> Path:
        """Change and persist (``KEYS/expiry.json``) lifetimes and warning windows; they
        apply to metadata signed from now on (``repo refresh``, publish, rotate, ...).

        Returns:
            The file written.

        Raises:
            OperatorInputError: an unknown role or a duration out of bounds.
        """
        expiry = self.expiry.changed(lifetimes, windows)
        path = save_expiry(self.keys, expiry)
        mirror_expiry(self, expiry)
        self.expiry = expiry
        return path

    def refresh(self, margin: timedelta | None = None) -> list[str]:
        """Re-sign what expires soon: timestamp always, snapshot within ``margin`` (by
        default its warning window, at least half the timestamp's lifetime).

        Safe to run from a timer: it needs only the online keys (timestamp, snapshot).
        Every role still inside its warning window afterwards (root, targets, delegated
        roles: they need offline or team keys) is logged as a WARNING.

        Returns:
            The roles re-signed.
        """
        if margin is None:
            margin = max(self.expiry.timestamp / 2, self.expiry.window("snapshot"))
        now = self._clock()
        if self.online is not None or online_elsewhere(self):
            key_home(self, "timestamp")  # refused here without the online directory
            return _online_refresh(self, margin, now)
        _, snap, ts = self.current()
        published, done = snap.version, []
        waiting = self._waiting_snapshot(published)
        if waiting is None and snap.expires - now < margin:
            snap.version += 1
            snap.expires = now + self.expiry.snapshot
            try:
                self._write(Metadata(snap), "snapshot", snap.version)
                published = snap.version
                done.append("snapshot")
            except ThresholdNotMetError as e:  # it waits; the timestamp is still renewed
                waiting = e
        ts.version += 1
        ts.expires = now + self.expiry.timestamp
        ts.snapshot_meta = self._signed_meta("snapshot", published)
        self._write(Metadata(ts), "timestamp", None)
        done.append("timestamp")
        self.expiry_warnings()
        if waiting is not None:
            raise waiting
        return done

    def _waiting_snapshot(self, published: int) -> ThresholdNotMetError | None:
        """A newer snapshot parked for signatures (refresh parks no second one), as the
        error that says what it waits for."""
        path = self.pending_dir / f"{published + 1}.snapshot.json"
        data = read_file(path)
        if data is None:
            return None
        root = self._trusted_root()
        try:
            have = _valid_signatures(Metadata.from_bytes(data), "snapshot", root)
        except (DeserializationError, ValueError):
            have = 0
        return ThresholdNotMetError("snapshot", have, root.roles["snapshot"].threshold, path)

    def expiry_warnings(self) -> list[ExpiryWarning]:
        """Every role (delegated ones too) whose published metadata expires within its
        window; each is logged as a WARNING."""
        rows = self.status()
        found = expiry_warnings(((r.role, r.version, r.expires) for r in rows), self._clock(),
                                self.expiry)
        for w in found:
            logger.warning("%s", w.message())
        return found

    def waiting(self) -> list[Note]:
        """Changes waiting (pending, staged), each saying whether it still follows what is
        published, and the offline side's own targets against the served ones."""
        return pending_notes(self, self._view(strict=False))

    def status(self) -> list[RoleStatus]:
        """Version, expiry, threshold and signatures of each top-level and delegated role
        (as the published snapshot lists them), with its expiry warning."""
        now = self._clock()
        view = self._view(strict=False)  # a signature that fails is a row that says so
        root_md = view.roots[-1]
        root: Root = root_md.signed
        snap_md, tg_md = view.snapshot, view.targets
        found: list[tuple[str, Metadata[Any], int, list[str], int]] = [
            (name, md, root.roles[name].threshold, root.roles[name].keyids,
             _valid_signatures(md, name, root) if name not in view.invalid else 0)
            for name, md in (("root", root_md), ("targets", tg_md), ("snapshot", snap_md),
                             ("timestamp", view.timestamp))]
        invalid = dict(view.invalid)
        # Delegated roles of the verified tree, at the version the snapshot lists, each
        # verified with the keys its delegator gives it.
        queue: list[Targets] = [tg_md.signed]
        seen: set[str] = set()
        while queue:
            t = queue.pop(0)
            for r in (t.delegations.roles or {}).values() if t.delegations else ():
                meta = snap_md.signed.meta.get(f"{r.name}.json")
                if meta is None or r.name in seen or r.name in ROLES:
                    continue
                seen.add(r.name)
                path = self.metadata_dir / f"{meta.version}.{r.name}.json"
                try:
                    md = served_load(path)
                    if not isinstance(md.signed, Targets) or md.signed.version != meta.version:
                        raise ServedFileError(path, f"is not {r.name} v{meta.version}")
                except RepositoryStateError as e:
                    logger.warning("delegated role %r: %s", r.name, e)
                    continue
                have = sum(1 for k in r.keyids if k in md.signatures)
                try:
                    t.verify_delegate(r.name, md.signed_bytes, md.signatures)
                    queue.append(md.signed)
                except (UnsignedMetadataError, ValueError) as e:
                    invalid[r.name] = f"{path}: not signed by the keys its delegator gives it"
                    logger.warning("delegated role %r: %s", r.name, e)
                    have = 0
                found.append((r.name, md, r.threshold, r.keyids, have))
        rows = []
        for name, md, threshold, _keyids, signatures in found:
            expires = md.signed.expires
            warn = expiry_warnings([(name, md.signed.version, expires)], now, self.expiry)
            text = warn[0].short() if warn else ""
            if name in invalid:
                logger.warning("%s", invalid[name])
                text = "SIGNATURE DOES NOT VERIFY" + (f"; {text}" if text else "")
            rows.append(RoleStatus(
                name, md.signed.version, expires, threshold, signatures, text,
                self.expiry.window(name)))
        return rows

    # -- review before signing ----------------------------------------------------

    def _pending_path(self, role: str) -> Path:
        """The pending ``role`` file `repo sign` shows and signs: the highest version.

        Raises:
            RepositoryStateError: nothing pending for the role.
            PendingMetadataError: a file for the role not named ``N.<role>.json`` (planted:
                it is named, escaped, and nothing is signed until it is removed).
        """
        found = sorted(self.pending_dir.glob(f"*.{role}.json")) if \
            self.pending_dir.is_dir() else []
        if not found:
            raise RepositoryStateError(f"no {role} metadata is waiting for signatures")
        for p in found:
            if not re.fullmatch(rf"[1-9][0-9]{{0,15}}\.{role}\.json", p.name):
                check_pending(p, b"", role, self._trusted_root(), None)  # raises, naming it
        return max(found, key=lambda p: int(p.name.split(".", 1)[0]))

    def _check_pending(self, role: str, path: Path, data: bytes,
                       reviewed: str | None = None) -> Pending:
        """The pending file checked against the published metadata (see check_pending),
        and, when given, against the digest of the bytes the signer reviewed."""
        if role == "root":
            published: int | None = self.latest_root_version()
        else:
            targets, snap, ts = self.current()
            published = {"targets": targets, "snapshot": snap, "timestamp": ts}[role].version
        pending = check_pending(path, data, role, self._trusted_root(), published,
                                self._published_md(role))
        if reviewed is not None and pending.digest != reviewed:
            raise PendingReviewError(
                f"{path} changed after its summary was shown: refusing to sign what was not "
                "reviewed (nothing published, the file is left as it is)", path=path,
                hint="run `repo sign` again and read the new summary")
        return pending

    def review_pending(self, role: str) -> tuple[Pending, list[str]]:
        """The pending ``role`` metadata, checked, and what it changes compared with what
        is published (lines for the signer; untrusted strings escaped).

        Raises:
            RepositoryStateError: nothing pending for the role.
            PendingMetadataError: the pending file may not be signed (see check_pending).
        """
        path = self._pending_path(role)
        checked = self._check_pending(role, path, read_pending(path))
        return checked, summarize(role, self._published_md(role), checked.md, self._clock())

    def _published_md(self, role: str) -> Metadata:  # type: ignore[type-arg]
        """The published ``role`` metadata a pending one replaces (root: the newest)."""
        if role == "root":
            return self._load(f"{self.latest_root_version()}.root.json")
        ts_md = self._load("timestamp.json")
        if role == "timestamp":
            return ts_md
        snap_md = self._load(f"{ts_md.signed.snapshot_meta.version}.snapshot.json")
        if role == "snapshot":
            return snap_md
        meta = snap_md.signed.meta.get("targets.json")
        if meta is None:
            raise RepositoryStateError(f"the published snapshot v{snap_md.signed.version} "
                                       "lists no targets.json")
        return self._load(f"{meta.version}.targets.json")
