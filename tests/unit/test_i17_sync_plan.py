"""Issue 17: ``repo sync``'s decisions, pure (publisher/_sync.py): the upload order, the
caching, and what is left unchanged."""

from __future__ import annotations

import random

from modelward.publisher._sync import (
    IMMUTABLE,
    NO_CACHE,
    LocalFile,
    Remote,
    SyncConfig,
    plan_sync,
)

H = "ab" * 32
KEYS = ["metadata/timestamp.json", "metadata/10.root.json", "metadata/2.root.json",
        "metadata/3.snapshot.json", "metadata/3.targets.json", "metadata/4.team-a.json",
        f"targets/classifier/{H}.classifier-2.0.0.tar",
        f"targets/classifier/{H}.classifier-2.0.0.tar.chunks.json"]


def _f(key: str, sha: str = "0" * 64) -> LocalFile:
    return LocalFile(key, 10, sha, data=b"x" * 10)


def test_order_targets_then_versioned_then_timestamp_last() -> None:
    files = [_f(k) for k in KEYS]
    random.Random(7).shuffle(files)
    keys = [u.file.key for u in plan_sync(files, {}, SyncConfig(), compare_cache=True).uploads]
    assert keys == [f"targets/classifier/{H}.classifier-2.0.0.tar",
                    f"targets/classifier/{H}.classifier-2.0.0.tar.chunks.json",
                    "metadata/4.team-a.json", "metadata/3.targets.json",
                    "metadata/3.snapshot.json", "metadata/2.root.json",
                    "metadata/10.root.json",  # the chain in numeric order, not 10 < 2
                    "metadata/timestamp.json"]


def test_caching_and_unchanged() -> None:
    files = [_f(k) for k in KEYS]
    same = {f.key: Remote(f.size, f.sha256, IMMUTABLE) for f in files}
    same["metadata/timestamp.json"] = Remote(10, "0" * 64, NO_CACHE)
    p = plan_sync(files, same, SyncConfig(), compare_cache=True)
    assert p.uploads == () and len(p.unchanged) == len(KEYS)
    cc = {u.file.key: u.cache_control for u in
          plan_sync(files, {}, SyncConfig(), compare_cache=True).uploads}
    assert cc.pop("metadata/timestamp.json") == "no-cache"
    assert set(cc.values()) == {"public, max-age=31536000, immutable"}
    # a changed digest, size or Cache-Control is uploaded again; a directory keeps none
    changed = dict(same)
    changed["metadata/3.targets.json"] = Remote(10, "1" * 64, IMMUTABLE)
    changed["metadata/2.root.json"] = Remote(11, "0" * 64, IMMUTABLE)
    changed["metadata/timestamp.json"] = Remote(10, "0" * 64, "max-age=86400")
    up = [u.file.key for u in plan_sync(files, changed, SyncConfig(),
                                        compare_cache=True).uploads]
    assert up == ["metadata/3.targets.json", "metadata/2.root.json", "metadata/timestamp.json"]
    up = [u.file.key for u in plan_sync(files, changed, SyncConfig(),
                                        compare_cache=False).uploads]
    assert up == ["metadata/3.targets.json", "metadata/2.root.json"]
    # an object without the recorded digest (uploaded by something else) is replaced
    unknown = {k: Remote(10, None, IMMUTABLE) for k in KEYS}
    assert len(plan_sync(files, unknown, SyncConfig(), compare_cache=True).uploads) == 8
