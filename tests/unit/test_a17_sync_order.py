"""Attack on ``repo sync``'s order (issue 17): a root change re-signs the timestamp by
both roots' keys before it writes ``N+1.root.json``; the sync must keep that order, or a
sync that dies between the two leaves devices on the new root with a timestamp it does
not verify (publisher/_sync.py, ``plan_sync(timestamp_after=...)``)."""

from __future__ import annotations

from modelward.publisher._sync import LocalFile, SyncConfig, plan_sync

KEYS = ["metadata/2.root.json", "metadata/3.root.json", "metadata/timestamp.json",
        "metadata/snapshot.json", "metadata/4.snapshot.json", "metadata/4.targets.json"]


def _order(timestamp_after: int | None) -> list[str]:
    files = [LocalFile(k, 1, "0" * 64, data=b"x") for k in KEYS]
    return [u.file.key for u in plan_sync(files, {}, SyncConfig(), compare_cache=True,
                                          timestamp_after=timestamp_after).uploads]


def test_the_timestamp_goes_between_the_roots_its_keys_sign_for_and_the_rest() -> None:
    head = ["metadata/4.targets.json", "metadata/4.snapshot.json"]
    assert _order(None) == head + ["metadata/2.root.json", "metadata/3.root.json",
                                   "metadata/snapshot.json", "metadata/timestamp.json"]
    assert _order(2) == head + ["metadata/2.root.json", "metadata/snapshot.json",
                                "metadata/timestamp.json", "metadata/3.root.json"]
    assert _order(1) == head + ["metadata/snapshot.json", "metadata/timestamp.json",
                                "metadata/2.root.json", "metadata/3.root.json"]
