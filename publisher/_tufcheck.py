"""The pre-publish gate: would a stock python-tuf client accept the repository?

Before the repository writes a file clients fetch (a new ``N.root.json``, or
``timestamp.json``, which makes new snapshot, targets and delegated roles reachable), the
would-be published state is verified with python-tuf's own ``TrustedMetadataSet``, as a
fresh device provisioned with ``1.root.json`` would: the root chain (each step meeting the
previous and its own threshold), then timestamp, snapshot (length, hashes), targets
(length, hashes), all signatures, versions and expiry (at the repository's clock).
Versions are also compared with what is published now, as a device that already holds it
would. Delegated roles a client would reject are logged (a client loads one only when its
search reaches it; a broken team role costs only its own paths).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from tuf.api import exceptions
from tuf.api.metadata import Metadata, Snapshot, Targets
from tuf.api.serialization import DeserializationError
from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet
from tuf.ngclient.config import EnvelopeType

from modelward.publisher.errors import RepositoryStateError

logger = logging.getLogger(__name__)

Reader = Callable[[str], bytes | None]  # file name in metadata/ -> bytes (None: absent)


class StockClientWouldRejectError(RepositoryStateError):
    """The change would leave metadata a stock TUF client rejects; nothing was written.

    Attributes:
        filename: the metadata file at fault.
    """

    def __init__(self, filename: str, why: str) -> None:
        super().__init__(
            f"refusing to publish: a stock TUF client would reject {filename}: {why}",
            hint="nothing was written to metadata/; `modelward repo status` shows the roles")
        self.filename = filename


def _need(read: Reader, name: str) -> bytes:
    data = read(name)
    if data is None:
        raise StockClientWouldRejectError(name, "the file is missing")
    return data


def _root_chain(read: Reader, now: datetime) -> TrustedMetadataSet:
    try:
        tms = TrustedMetadataSet(_need(read, "1.root.json"), EnvelopeType.METADATA)
    except (exceptions.RepositoryError, DeserializationError) as e:
        raise StockClientWouldRejectError("1.root.json", f"{type(e).__name__}: {e}") from e
    tms.reference_time = now
    version = 2
    while (data := read(f"{version}.root.json")) is not None:
        try:
            tms.update_root(data)
        except (exceptions.RepositoryError, DeserializationError) as e:
            raise StockClientWouldRejectError(f"{version}.root.json",
                                              f"{type(e).__name__}: {e}") from e
        version += 1
    return tms


def check_root_chain(read: Reader, now: datetime) -> None:
    """Every ``N.root.json`` chains from ``1.root.json`` by TUF's rules.

    The newest root must not be expired at ``now`` either: a client that reaches it
    refuses to go on (a root parked until after its expiry).

    Raises:
        StockClientWouldRejectError: naming the first root that does not, or the newest
            root when it is expired.
    """
    tms = _root_chain(read, now)
    if tms.root.is_expired(now):
        raise StockClientWouldRejectError(
            f"{tms.root.version}.root.json",
            f"it expired at {tms.root.expires.isoformat()}")


def check_state(read: Reader, now: datetime, published: Reader | None = None) -> None:
    """The whole state ``read`` sees verifies as a fresh stock client would verify it,
    and moves no version back from ``published`` (what devices may hold already).

    Raises:
        StockClientWouldRejectError: naming the file a client would reject, and why.
    """
    tms = _root_chain(read, now)
    name = "timestamp.json"
    try:
        ts = tms.update_timestamp(_need(read, name))
        name = f"{ts.snapshot_meta.version}.snapshot.json"
        snap = tms.update_snapshot(_need(read, name))
        name = f"{snap.meta['targets.json'].version}.targets.json"
        tms.update_targets(_need(read, name))
    except (exceptions.RepositoryError, DeserializationError, KeyError) as e:
        raise StockClientWouldRejectError(name, f"{type(e).__name__}: {e}") from e
    _warn_delegated(read, tms, snap)
    if published is not None:
        _no_rollback(published, ts.version, ts.snapshot_meta.version,
                     {k: m.version for k, m in snap.meta.items()})


def _warn_delegated(read: Reader, tms: TrustedMetadataSet, snap: Snapshot) -> None:
    """Delegated roles a client would reject, logged: a client loads one only when its
    search reaches it, and a broken team role costs only the paths it speaks for (an
    operator re-keying a team leaves the team's file unusable until the team re-signs)."""
    queue: list[tuple[str, Targets]] = [("targets", tms.targets)]
    seen = {"targets"}
    while queue:
        parent, t = queue.pop(0)
        if t.delegations is None or t.delegations.roles is None:
            continue
        for role in t.delegations.roles:
            meta = snap.meta.get(f"{role}.json")
            if role in seen or meta is None:
                continue
            seen.add(role)
            name = f"{meta.version}.{role}.json"
            try:
                queue.append((role, tms.update_delegated_targets(_need(read, name), role,
                                                                 parent)))
            except (exceptions.RepositoryError, DeserializationError,
                    StockClientWouldRejectError) as e:
                logger.warning("delegated role %s (%s): clients will not use it: %s", role,
                               name, e)


def _no_rollback(published: Reader, ts_version: int, snap_version: int,
                 meta: dict[str, int]) -> None:
    data = published("timestamp.json")
    if data is None:
        return
    try:
        old_ts = Metadata.from_bytes(data).signed
        old_v = old_ts.snapshot_meta.version  # type: ignore[attr-defined]
        snap = published(f"{old_v}.snapshot.json")
        old_meta = {} if snap is None else {
            k: m.version for k, m in Metadata.from_bytes(snap).signed.meta.items()}  # type: ignore[attr-defined]
    except (DeserializationError, AttributeError):
        return  # the published state is unreadable: nothing a device could hold from it
    if ts_version < old_ts.version or snap_version < old_v:
        raise StockClientWouldRejectError(
            "timestamp.json", f"timestamp v{ts_version} / snapshot v{snap_version} is older "
            f"than the published v{old_ts.version} / v{old_v}")
    for k, v in old_meta.items():
        if meta.get(k, 0) < v:
            raise StockClientWouldRejectError(
                f"{snap_version}.snapshot.json",
                f"it lists {k} v{meta.get(k)}, older than the published v{v}")
