"""A targets-key rotation in the two-machine layout, through the real stack (issue 14,
must-show 1 in the production layout): the offline machine runs `repo rotate targets`, the
online host's refresh runs confined as systemd/modelward-repo-refresh.service says, a real
device (swtpm, nginx) and a stock python-tuf client follow. Before, during (after the
offline step, before the refresh) and after it, the device keeps its model and takes the
next release as soon as it is signed with the new key only."""

from __future__ import annotations

import json

from tuf.api.metadata import Metadata, Root

from modelward.updater.install._install import Outcome
from tests._stock_tuf import stock_refresh
from tests.integration.test_i14_online import OFFLINE, OnlineWorld
from tests.integration.test_i14_online import online_world as online_world  # noqa: F401
from tests.integration.test_i14_online import pytestmark as _online_mark

pytestmark = _online_mark


def _root(w: OnlineWorld, v: int) -> Root:
    r: Root = Metadata[Root].from_bytes(
        (w.repo_dir / "metadata" / f"{v}.root.json").read_bytes()).signed
    return r


def _device_root(w: OnlineWorld) -> int:
    doc = json.loads((w.state / "trust" / "root.json").read_bytes())
    return int(doc["signed"]["version"])


def _refresh(w: OnlineWorld) -> str:
    r = w.refresh_as_unit()
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


def test_targets_rotation_in_the_two_machine_layout_strands_no_device(
        online_world: OnlineWorld) -> None:
    w = online_world
    w.publish("1.0.0", seed=1)
    _refresh(w)
    assert w.update().outcome is Outcome.INSTALLED
    assert w.active_version() == "1.0.0"
    assert stock_refresh(w.repo_dir) == 1
    before = w.snapshot()

    # during: root v2 staged offline, the online host has not refreshed yet
    r = w.cli("repo", "rotate", "targets", "--repo", str(w.repo_dir), "--keys", str(w.keys),
              env={"MODELWARD_KEY_PASSPHRASE": OFFLINE.decode()})  # the offline machine
    assert r.returncode == 0, r.stderr
    assert "root v2 is staged: the online host's next `repo refresh` publishes it" in r.stdout
    assert not (w.repo_dir / "metadata" / "2.root.json").exists()
    assert stock_refresh(w.repo_dir) == 1
    assert w.update().outcome is Outcome.UP_TO_DATE
    assert w.snapshot() == before  # model, record, counter, anchor, current: unmoved

    # the online host's refresh publishes snapshot, timestamp, then root v2
    out = _refresh(w)
    assert "published the staged root v2" in out
    assert stock_refresh(w.repo_dir) == 2
    assert w.update().outcome is Outcome.UP_TO_DATE
    assert w.active_version() == "1.0.0"
    assert w.snapshot().current == before.current

    # after: the next release, signed by the new targets key only, installs at once
    w.publish("1.1.0", seed=2)
    v = w.repo.current()[0].version
    signed = Metadata.from_bytes((w.repo_dir / "metadata" / f"{v}.targets.json").read_bytes())
    assert set(signed.signatures) == set(_root(w, 2).roles["targets"].keyids)
    assert not set(signed.signatures) & set(_root(w, 1).roles["targets"].keyids)
    _refresh(w)
    assert stock_refresh(w.repo_dir) == 2
    assert w.update().outcome is Outcome.INSTALLED
    assert w.active_version() == "1.1.0"


def test_second_refresh_and_release_during_the_window_on_the_device(
        online_world: OnlineWorld) -> None:
    """The careless operator: a release added before the refresh (signed by both keys),
    the staged root not carried at first, then the refresh run twice. The device installs
    the release under root v1, keeps it across root v2 (its cached targets verify under
    both), and stock python-tuf agrees at each step."""
    w = online_world
    w.update()
    w.repo.rotate("targets")
    w.publish("1.0.0", seed=1)
    assert w.update().outcome is Outcome.UP_TO_DATE  # not in a snapshot yet
    staged, held = w.repo_dir / "metadata" / "staged", w.tmp / "staged-not-carried"
    staged.rename(held)
    _refresh(w)
    assert stock_refresh(w.repo_dir) == 1
    assert w.update().outcome is Outcome.INSTALLED
    assert w.active_version() == "1.0.0" and _device_root(w) == 1
    before = w.snapshot()
    held.rename(staged)
    _refresh(w)
    _refresh(w)
    assert stock_refresh(w.repo_dir) == 2
    assert w.update().outcome is Outcome.UP_TO_DATE
    assert w.active_version() == "1.0.0" and _device_root(w) == 2
    assert w.snapshot().current == before.current
