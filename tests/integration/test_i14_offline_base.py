"""Real stack (swtpm device, nginx origin, the confined refresh unit): in the single-machine
layout (KEYS and MODELWARD_ONLINE_DIR on one host) the online host points the snapshot back
at targets from before a withdraw; the operator's next publish builds on its own newest
signed targets (publisher/_offline_base.py), so the withdrawn release never comes back."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, MetaFile, Snapshot, Timestamp
from tuf.api.serialization.json import JSONSerializer

from modelward.publisher._keys import load_signer_at
from modelward.publisher._online import attach
from modelward.publisher._repo import Repository
from modelward.updater.errors import MetadataError
from tests.integration.test_i14_online import OFFLINE, PASS, OnlineWorld
from tests.integration.test_i14_online import online_world as online_world  # noqa: F401


def test_withdrawn_release_stays_withdrawn_after_the_online_host_rolls_the_snapshot_back(
        online_world: OnlineWorld, caplog: pytest.LogCaptureFixture) -> None:
    w = online_world

    def operator() -> Repository:  # the single-machine layout: KEYS and ONLINE here
        return attach(Repository(w.repo_dir, w.keys, OFFLINE), w.online_dir,
                      PASS.__getitem__)

    operator().publish(w.bundle("1.0.0", seed=1))  # targets v2
    w.update()
    assert w.active_version() == "1.0.0"
    operator().publish(w.bundle("1.1.0", seed=2))  # targets v3: a bad build
    operator().withdraw("classifier", "1.1.0")  # targets v4: withdrawn before any device
    w.update()
    assert w.active_version() == "1.0.0"

    # the online host: its snapshot and timestamp name targets v3 again (1.1.0 live)
    md_dir: Path = w.repo_dir / "metadata"
    snap_key = load_signer_at(w.online_dir / "snapshot.pem", PASS["snapshot"], "snapshot")
    ts_key = load_signer_at(w.online_dir / "timestamp.pem", PASS["timestamp"], "timestamp")
    exp = Metadata.from_bytes((md_dir / "3.targets.json").read_bytes()).signed.expires
    for signed, name, key in (
            (Snapshot(version=60, expires=exp, meta={"targets.json": MetaFile(version=3)}),
             "60.snapshot.json", snap_key),
            (Timestamp(version=60, expires=exp, snapshot_meta=MetaFile(version=60)),
             "timestamp.json", ts_key)):
        md = Metadata(signed)
        md.sign(key)
        (md_dir / name).write_bytes(md.to_bytes(JSONSerializer()))
    before = w.snapshot()
    with pytest.raises(MetadataError):  # the device alone is not fooled (a rollback)
        w.update()
    after = w.snapshot()  # the valid timestamp v60 is kept (TUF): nothing else moved
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == \
        (before.record, before.counter, before.anchor, before.current, before.slots)
    assert {k: v for k, v in after.metadata.items() if k != "timestamp.json"} == \
        {k: v for k, v in before.metadata.items() if k != "timestamp.json"}
    assert w.active_version() == "1.0.0"

    # the operator's next, ordinary change: a beta release (stable devices stay put)
    with caplog.at_level(logging.WARNING, "modelward.publisher._offline_base"):
        r = operator().publish(w.bundle("1.2.0", seed=3), channel="beta")
    assert r.targets_version == 5
    assert "60.snapshot.json lists targets v3, older than the v4 this tool signed" in caplog.text
    assert w.refresh_as_unit().returncode == 0
    w.update()
    assert w.active_version() == "1.0.0"  # never the withdrawn 1.1.0
    assert w.snapshot().metadata != before.metadata  # it follows the repaired state
