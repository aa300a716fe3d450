"""A lock-free read of the trust store (``agent status``) beside a commit: never a false
rollback alarm, nothing renamed or deleted (review of session 10)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path

import pytest

from modelward.trust import _store
from modelward.trust._record import UseRecord, encode_record, genesis
from modelward.trust._store import TrustStore


class StubTpm:
    def __init__(self) -> None:
        self.counter = 5
        self.key = b"k" * 32

    def use_auth_dir(self, _d: Path) -> None:
        pass

    def read_counter(self) -> int:
        return self.counter

    def increment_counter(self) -> None:
        self.counter += 1

    def mac(self, digest: bytes) -> bytes:
        return hmac.new(self.key, digest, "sha256").digest()

    def mac_ok(self, digest: bytes, mac: bytes) -> bool:
        return hmac.compare_digest(self.mac(digest), mac)


@pytest.mark.parametrize("after_reads", [1, 2])
def test_status_read_beside_a_commit_sees_one_moment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after_reads: int) -> None:
    """The whole commit (pending file, NV increment, rename) lands after the lock-free
    read's first or second file read: the plan is the new record, not a rollback."""
    tpm = StubTpm()
    (tmp_path / "trust").mkdir()
    store = TrustStore(tmp_path, tpm)  # type: ignore[arg-type]
    old = genesis(tpm.counter - 1, 1, 0)  # (the record in force: counter 5)
    store.record_path.write_bytes(encode_record(old, tpm.mac(old.digest())))
    real: Callable[[Path, str, int], tuple[bytes | None, str]] = _store._read_file
    reads = [0]

    def read_file(directory: Path, name: str, limit: int) -> tuple[bytes | None, str]:
        got = real(directory, name, limit)
        reads[0] += 1
        if reads[0] == after_reads:
            store.commit(old.successor())  # (another process's commit, at this moment)
        return got

    monkeypatch.setattr(_store, "_read_file", read_file)
    plan = store.plan(repair=False)
    assert isinstance(plan, UseRecord), plan
    assert plan.record.counter == 6 == tpm.counter
    assert not store.pending_path.exists()
