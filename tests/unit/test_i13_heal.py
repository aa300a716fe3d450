"""Healing after a disk rollback or loss (issue 13, finding 7), without a TPM or network.

The pure plans (``plan_record``, ``choose_root``, ``genesis``), root recovery by anchored
sha256 over a fake fetcher, and the heal's I/O with a software TPM: every crash window.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc

from modelward.trust._record import (
    Heal,
    ModelRef,
    RootResolution,
    TrustRecord,
    UseRecord,
    choose_root,
    encode_record,
    genesis,
    plan_record,
)
from modelward.trust._store import TrustStore
from modelward.trust._tpm import TpmInterface
from modelward.trust.errors import RootAnchorError, TrustRecordError, TrustRecordRollbackError
from modelward.updater.errors import DownloadFailedError, RootRecoveryError
from modelward.updater.install._heal import recover_root, trusted_record
from modelward.updater.transport._fetcher import RangeFetcher
from tests.unit.test_record import enc, mac, ok

R1 = TrustRecord(5, 1, 3, ModelRef("m", "1.0.0", "f1" * 32, "a"), None)
R2 = R1.successor(targets_version=4, active=ModelRef("m", "2.0.0", "f2" * 32, "b"),
                  previous=R1.active)


def plan(cur: bytes | None, pend: bytes | None, nv: int) -> UseRecord | Heal:
    return plan_record(cur, pend, nv, ok, current_path="r", pending_path="r.next")


# --- the pure plans -------------------------------------------------------------


def test_current_record_is_used() -> None:
    p = plan(enc(R2), None, 6)
    assert isinstance(p, UseRecord) and p.record == R2


@pytest.mark.parametrize(("cur", "pend", "cause", "floor"), [
    (None, None, TrustRecordError, 0),  # deleted
    (b"{not json", None, TrustRecordError, 0),  # malformed
    (encode_record(R2, b"\0" * 32), None, TrustRecordError, 0),  # edited: MAC fails
    (enc(R1), None, TrustRecordRollbackError, 3),  # older authentic copy put back
    (None, enc(R1), TrustRecordError, 3),  # only an old pending file left
    (enc(R1), enc(R2), TrustRecordRollbackError, 4),  # both authentic, both old
    (enc(R1), encode_record(R2.successor(targets_version=99), b"\0" * 32),
     TrustRecordRollbackError, 3),  # a forged pending file does not raise the floor
])
def test_unbelievable_record_plans_a_heal(cur: bytes | None, pend: bytes | None,
                                          cause: type[Exception], floor: int) -> None:
    p = plan(cur, pend, 9)
    assert isinstance(p, Heal)
    assert isinstance(p.reason, cause)
    assert p.targets_floor == floor


def test_genesis_follows_the_counter_and_trusts_nothing() -> None:
    g = genesis(9, 2, 4)
    assert (g.counter, g.root_version, g.targets_version, g.active, g.previous) == (
        10, 2, 4, None, None)


ROOT1, ROOT2 = b'{"signed": {"version": 1}}', b'{"signed": {"version": 2}}'
A2 = hashlib.sha256(ROOT2).digest()


def test_choose_root() -> None:
    assert choose_root(ROOT2, None, A2, root_path="r") == (ROOT2, RootResolution.USE)
    assert choose_root(ROOT1, ROOT2, A2, root_path="r") == (
        ROOT2, RootResolution.PROMOTE_PENDING)
    with pytest.raises(RootAnchorError, match="is missing"):
        choose_root(None, None, A2, root_path="r")
    with pytest.raises(RootAnchorError, match="does not match"):
        choose_root(ROOT1, ROOT1, A2, root_path="r")


# --- root recovery over a fake fetcher ---------------------------------------------


class _Fetcher(RangeFetcher):
    """Serves ``files`` (name -> bytes, or an int HTTP status); counts requests."""

    def __init__(self, files: dict[str, bytes | int], default: bytes | int = 404) -> None:
        self.files, self.default = files, default
        self.urls: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.urls.append(url)
        body = self.files.get(url.rsplit("/", 1)[1], self.default)
        if isinstance(body, int):
            raise tuf_exc.DownloadHTTPError(f"status {body}", body)
        return iter([body])


def test_root_is_recovered_by_anchored_hash_only() -> None:
    f = _Fetcher({"1.root.json": ROOT1, "2.root.json": b"attacker's", "3.root.json": ROOT2})
    assert recover_root(f, "https://o/metadata/", A2) == ROOT2
    assert f.urls == [f"https://o/metadata/{n}.root.json" for n in (1, 2, 3)]


def test_root_recovery_stops_at_404() -> None:
    f = _Fetcher({"1.root.json": ROOT1})
    with pytest.raises(RootRecoveryError) as ei:
        recover_root(f, "https://o/metadata", A2)
    assert ei.value.tried == 1 and len(f.urls) == 2


def test_root_recovery_is_bounded_in_count_and_size() -> None:
    endless = _Fetcher({}, default=b"x" * 100)  # an origin that answers every version
    with pytest.raises(RootRecoveryError) as ei:
        recover_root(endless, "https://o/m", A2, max_versions=20, max_bytes=50)
    assert ei.value.tried == 20 and len(endless.urls) == 20


def test_root_recovery_transport_error_is_typed() -> None:
    with pytest.raises(DownloadFailedError):
        recover_root(_Fetcher({}, default=503), "https://o/m", A2)


# --- the heal's I/O with a software TPM ---------------------------------------------


class _Crash(BaseException):
    """Power loss."""


class _SoftTpm(TpmInterface):
    """Anchor, counter and MAC key in memory; ``crash_on_increment`` simulates power loss
    before (``"before"``) or after (``"after"``) the NV increment."""

    tcti = "soft"

    def __init__(self, anchor: bytes, counter: int) -> None:
        self.anchor, self.counter = anchor, counter
        self.crash_on_increment = ""

    def provision(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def read_anchor(self) -> bytes:
        return self.anchor

    def write_anchor(self, digest: bytes) -> None:
        self.anchor = digest

    def read_counter(self) -> int:
        return self.counter

    def increment_counter(self) -> int:
        when, self.crash_on_increment = self.crash_on_increment, ""
        if when == "before":
            raise _Crash
        self.counter += 1
        if when == "after":
            raise _Crash
        return self.counter

    def mac(self, digest: bytes) -> bytes:
        return mac(digest)

    def sign(self, digest: bytes) -> bytes:
        raise NotImplementedError

    def identity_public_pem(self) -> bytes:
        raise NotImplementedError


REPO = _Fetcher({"1.root.json": ROOT1, "2.root.json": ROOT2})


def _device(tmp_path: Path, *, record: TrustRecord | None, root: bytes | None,
            counter: int = 6) -> tuple[Path, TrustStore, _SoftTpm]:
    state = tmp_path / "state"
    for d in ("trust", "metadata", "staging/incoming", "slots/a"):
        (state / d).mkdir(parents=True)
    if record is not None:
        (state / "trust" / "record.json").write_bytes(enc(record))
    if root is not None:
        (state / "trust" / "root.json").write_bytes(root)
    (state / "metadata" / "timestamp.json").write_text("{}")
    os.symlink("slots/a", state / "current")
    tpm = _SoftTpm(A2, counter)
    return state, TrustStore(state, tpm), tpm


def _heal(state: Path, store: TrustStore) -> TrustRecord:
    record, root = trusted_record(store, REPO, "https://o/metadata/", state)
    assert root == ROOT2
    return record


def test_believed_record_with_lost_root_keeps_everything_else(tmp_path: Path) -> None:
    state, store, tpm = _device(tmp_path, record=R2, root=None)
    assert _heal(state, store) == R2
    assert (state / "trust" / "root.json").read_bytes() == ROOT2
    assert tpm.counter == 6 and (state / "current").is_symlink()
    assert (state / "metadata" / "timestamp.json").exists()


def test_older_record_heals_to_genesis(tmp_path: Path) -> None:
    state, store, tpm = _device(tmp_path, record=R1, root=ROOT1)  # rolled back, root too
    rec = _heal(state, store)
    assert rec == genesis(6, 2, R1.targets_version)
    assert tpm.counter == 7
    assert (state / "trust" / "root.json").read_bytes() == ROOT2
    for gone in ("metadata", "staging", "current"):
        assert not os.path.lexists(state / gone)
    assert (state / "slots" / "a").is_dir()  # not trusted (nothing active), not deleted
    assert store.load() == rec  # and it is the record now


def test_deleted_state_dir_heals(tmp_path: Path) -> None:
    state = tmp_path / "gone"
    tpm = _SoftTpm(A2, 6)
    rec, _ = trusted_record(TrustStore(state, tpm), REPO, "https://o/metadata", state)
    assert rec == genesis(6, 2, 0) and tpm.counter == 7


def test_unrecoverable_root_changes_nothing(tmp_path: Path) -> None:
    state, store, tpm = _device(tmp_path, record=R1, root=None)
    before = sorted(p.name for p in (state / "trust").iterdir())
    with pytest.raises(RootRecoveryError):
        trusted_record(store, _Fetcher({"1.root.json": ROOT1}), "https://o/m", state)
    assert tpm.counter == 6 and (state / "current").is_symlink()
    assert sorted(p.name for p in (state / "trust").iterdir()) == before
    assert (state / "trust" / "record.json").read_bytes() == enc(R1)


@pytest.mark.parametrize("when", ["before", "after"])
def test_power_loss_during_the_heal_commit(tmp_path: Path, when: str) -> None:
    state, store, tpm = _device(tmp_path, record=R1, root=ROOT2)
    tpm.crash_on_increment = when
    with pytest.raises(_Crash):
        _heal(state, store)
    rec = _heal(state, store)  # the next attempt: heals again, or finds the genesis
    assert rec == genesis(6, 2, 3)
    assert tpm.counter == 7
    assert store.load() == rec


def test_heal_does_not_follow_symlinks_out_of_state_dir(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    state, store, _ = _device(tmp_path, record=None, root=ROOT2)
    for name in ("metadata", "staging"):
        (state / name / "timestamp.json").unlink(missing_ok=True)
        os.rename(state / name, tmp_path / f"was-{name}")
        os.symlink(outside, state / name)
    _heal(state, store)
    assert (outside / "keep").read_text() == "precious"
    assert not os.path.lexists(state / "metadata")


def test_heal_never_remacs_the_old_record(tmp_path: Path) -> None:
    state, store, _ = _device(tmp_path, record=R2, root=ROOT2, counter=9)
    _heal(state, store)
    doc = json.loads((state / "trust" / "record.json").read_bytes())
    assert doc["record"]["active"] is None and doc["record"]["counter"] == 10


@pytest.mark.parametrize("plant", ["symlink", "directory", "fifo", "huge"])
@pytest.mark.xdist_group("machine")
def test_planted_record_entry_is_not_followed_and_heals(tmp_path: Path, plant: str) -> None:
    """A symlink (even to the authentic current record), a directory, a FIFO or a huge
    file at record.json: never followed, never read whole, never blocking; it heals."""
    state, store, tpm = _device(tmp_path, record=None, root=ROOT2)
    rec_path = state / "trust" / "record.json"
    real = tmp_path / "outside-record.json"
    real.write_bytes(enc(R2.successor()))  # authentic and current (counter 6 + 1 - 1)
    tpm.counter = R2.counter + 1
    if plant == "symlink":
        os.symlink(real, rec_path)
    elif plant == "directory":
        rec_path.mkdir()
        (rec_path / "x").write_text("x")
    elif plant == "fifo":
        os.mkfifo(rec_path)
    else:
        with open(rec_path, "wb") as f:
            f.truncate(1 << 30)  # sparse: a read of it all would take 1 GiB
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    p = store.plan()
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grew < 64 * 1024, f"reading the record took {grew} KiB"
    assert isinstance(p, Heal)
    assert str(rec_path) in str(p.reason)
    rec = _heal(state, store)
    assert rec.active is None and rec.counter == tpm.counter
    assert real.read_bytes() == enc(R2.successor())  # the link's target is untouched
    assert rec_path.is_file() and not rec_path.is_symlink()


def test_symlinked_trust_dir_and_root_are_not_followed(tmp_path: Path) -> None:
    state, store, tpm = _device(tmp_path, record=None, root=None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "root.json").write_bytes(ROOT2)  # the anchored bytes, but not in state_dir
    (elsewhere / "record.json").write_bytes(enc(R2))
    (state / "trust").rmdir()
    os.symlink(elsewhere, state / "trust")
    with pytest.raises(RootAnchorError, match="not a directory"):
        store.anchored_root()
    fetcher = _Fetcher({"1.root.json": ROOT1, "2.root.json": ROOT2})
    rec, _ = trusted_record(store, fetcher, "https://o/m", state)
    assert rec.active is None and len(fetcher.urls) == 2  # recovered over the network
    assert (state / "trust").is_dir() and not (state / "trust").is_symlink()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["record.json", "root.json"]
    assert (elsewhere / "record.json").read_bytes() == enc(R2)


def test_planted_pending_directory_is_cleared_for_the_next_commit(tmp_path: Path) -> None:
    state, store, tpm = _device(tmp_path, record=R2, root=ROOT2)
    (state / "trust" / "record.json.next").mkdir()
    (state / "trust" / "root.json.next").mkdir()
    assert _heal(state, store) == R2  # believed; the planted entries are removed
    store.commit(R2.successor(active=None, previous=None))
    store.rotate_root(ROOT1)
    assert tpm.counter == 7 and store.load().active is None
    assert (state / "trust" / "root.json").read_bytes() == ROOT1
