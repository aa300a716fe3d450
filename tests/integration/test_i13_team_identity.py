"""A team key speaks only for its paths, and the operator's decisions win (issue 13,
must-show 1), through swtpm, nginx and the real CLI.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from modelward.simulator._teams import team_sign
from tests._helpers import repo_cli_ok
from tests.conftest import DeviceState, World


def _as(w: World, model: str) -> None:
    w.conf_path.write_text(w.conf_path.read_text().replace(
        'model = "classifier"', f'model = "{model}"'))


def _requested(w: World, since: int) -> list[str]:
    """Base names of the files the origin served after line ``since`` of its log."""
    lines = (w.tmp / "origin" / "access.log").read_text().splitlines()[since:]
    return [line.split('"')[1].split()[1].rsplit("/", 1)[1] for line in lines]


def _log_mark(w: World) -> int:
    return len((w.tmp / "origin" / "access.log").read_text().splitlines())


def _unmoved(w: World, before: DeviceState) -> None:
    """Record, counter, anchor, ``current`` and slots as they were (the TUF metadata
    may move: new roles verified, and TUF persists them)."""
    after = w.snapshot()
    assert after == replace(before, metadata=after.metadata)


def test_team_release_naming_another_model_is_installed_by_no_device(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    repo_cli_ok(world, "repo", "delegate", "vision", "--paths", "detector/*")
    # The team's key signs, under its own detector/ paths, a release whose signed
    # fields name the classifier, newer than anything: a real, installable bundle.
    team_sign(world.repo, "vision", world.bundle("9.0.0", seed=9),
              path="detector/x.tar")
    before, mark = world.snapshot(), _log_mark(world)
    r = world.update()
    assert "nothing to do" in r.message and world.active_version() == "1.0.0"
    _unmoved(world, before)
    # A classifier device's search never reaches the detector team's role.
    assert "vision.json" not in " ".join(_requested(world, mark))

    # A detector device does reach it, and ignores (and logs) the mislabelled release.
    _as(world, "detector")
    with caplog.at_level(logging.WARNING, logger="modelward.updater.install._tuf"):
        r = world.update()
    assert "nothing to do" in r.message and world.active_version() == "1.0.0"
    assert any("detector/x.tar" in m and "name model 'classifier'" in m
               for m in caplog.messages), caplog.messages
    _unmoved(world, before)


def test_team_pin_does_not_override_the_operators_pin(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.publish("2.0.0", seed=2)
    world.update()
    assert world.active_version() == "2.0.0"
    # The operator lets a team publish classifiers too, and pins the fleet to 2.0.0.
    repo_cli_ok(world, "repo", "delegate", "cls-team", "--paths", "classifier/*")
    repo_cli_ok(world, "rollout", "pin", "classifier", "2.0.0")
    world.update()
    before = world.snapshot()
    # The team publishes 0.0.1 pinned (a downgrade) and a pinned re-signing of 2.0.0's
    # neighbour 3.0.0: neither beats the operator's pin.
    team_sign(world.repo, "cls-team", world.bundle("0.0.1", seed=3), pinned=True)
    team_sign(world.repo, "cls-team", world.bundle("3.0.0", seed=4), pinned=True)
    r = world.update()
    assert "nothing to do" in r.message and world.active_version() == "2.0.0"
    _unmoved(world, before)


def test_operator_withdraws_and_halts_a_team_release(world: World) -> None:
    _as(world, "detector")
    repo_cli_ok(world, "repo", "delegate", "vision", "--paths", "detector/*")
    for v, seed in (("1.0.0", 1), ("2.0.0", 2), ("3.0.0", 3)):
        repo_cli_ok(world, "publish", "--role", "vision",
                str(world.bundle(v, seed=seed, name="detector")))
    # 3.0.0 and 2.0.0 turn out bad; the operator acts without the team's key.
    (world.keys / "delegated-vision.pem").rename(world.tmp / "team-holds-its-key.pem")
    out = repo_cli_ok(world, "rollout", "withdraw", "detector", "3.0.0")
    assert "withdrawn" in out
    repo_cli_ok(world, "rollout", "set", "detector", "2.0.0", "--halt")
    world.update()
    assert world.active_version() == "1.0.0"
    before = world.snapshot()
    r = world.update()
    assert "nothing to do" in r.message
    _unmoved(world, before)
    # The team's own edits need its key: a typed error names the role.
    r = world.cli("publish", "--role", "vision", "--repo", str(world.repo_dir), "--keys",
                  str(world.keys), str(world.bundle("4.0.0", seed=5, name="detector")))
    assert r.returncode != 0
    assert "the team holding role 'vision' must do it" in r.stderr, r.stderr
    # Re-publishing the withdrawn version is refused: devices only move forward.
    (world.tmp / "team-holds-its-key.pem").rename(world.keys / "delegated-vision.pem")
    r = world.cli("publish", "--role", "vision", "--repo", str(world.repo_dir), "--keys",
                  str(world.keys), str(world.bundle("3.0.0", seed=6, name="detector")))
    assert r.returncode != 0 and "withdrawn" in r.stderr, r.stderr
