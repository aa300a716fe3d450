"""The online host's refresh, confined as systemd/modelward-repo-refresh.service says, against
whoever writes the served metadata/ (issue 14, must-show 4): a root that does not chain and
special files stop or are skipped with a typed error, never a hang or a fall-back to an
older root; the device (swtpm, nginx) and its trust do not move; the fix resumes it."""

from __future__ import annotations

import os

import pytest

from modelward.updater.errors import MetadataError
from modelward.updater.install._install import Outcome
from tests.integration.test_i14_online import OnlineWorld
from tests.integration.test_i14_online import online_world as online_world  # noqa: F401


def test_unchained_root_and_fifo_stop_the_unit_with_a_typed_error(
        online_world: OnlineWorld) -> None:
    w = online_world
    w.publish("1.0.0", seed=1)
    assert w.refresh_as_unit().returncode == 0
    assert w.update().outcome is Outcome.INSTALLED
    before = w.snapshot()
    md_dir = w.repo_dir / "metadata"

    # the origin: a FIFO under the next targets name: skipped with a warning, no hang
    os.mkfifo(md_dir / "3.targets.json")
    os.chown(md_dir / "3.targets.json", 64123, 64123)
    r = w.refresh_as_unit()
    assert r.returncode == 0, r.stderr
    assert "3.targets.json is not a regular file" in r.stderr
    assert w.update().outcome is Outcome.UP_TO_DATE
    after = w.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)

    # then a root v2 signed by nobody: a typed error naming it, nothing signed
    before = after
    served = {p.name: p.read_bytes() for p in md_dir.iterdir() if p.is_file()}
    bad = (md_dir / "1.root.json").read_bytes().replace(b'"version": 1', b'"version": 2')
    (md_dir / "2.root.json").write_bytes(bad)
    r = w.refresh_as_unit()
    assert r.returncode != 0
    assert "2.root.json does not chain to root v1" in r.stderr
    assert "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in md_dir.iterdir() if p.is_file()
            and p.name != "2.root.json"} == served  # nothing signed
    with pytest.raises(MetadataError):  # the device refuses the origin's root too
        w.update()
    assert w.snapshot() == before

    (md_dir / "2.root.json").unlink()
    w.publish("1.1.0", seed=2)  # offline: targets v3 replaces the FIFO (the carry)
    r = w.refresh_as_unit()
    assert r.returncode == 0, r.stderr
    assert w.update().outcome is Outcome.INSTALLED
    assert w.active_version() == "1.1.0"
