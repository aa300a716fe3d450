"""Issue 13 (a4), real swtpm + nginx: the snapshot pins each delegated (team) role by
length and SHA-256, as it pins the top-level targets; a team role the origin swaps for
junk is refused after at most its signed length, before it is parsed."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.conftest import World
from trust.errors import ModelwardError


def _team_file(world: World) -> tuple[str, int]:
    snap = json.loads((world.repo_dir / "metadata" / "timestamp.json").read_bytes())
    v = snap["signed"]["meta"]["snapshot.json"]["version"]
    meta = json.loads((world.repo_dir / "metadata" / f"{v}.snapshot.json").read_bytes())
    name = f"{meta['signed']['meta']['team.json']['version']}.team.json"
    return name, len((world.repo_dir / "metadata" / name).read_bytes())


def test_the_snapshot_pins_a_team_role_by_length_and_hash(world: World) -> None:
    world.repo.delegate("team", ["classifier/*"])
    world.repo.publish(world.bundle("1.0.0", seed=1), role="team")
    snap = json.loads((world.repo_dir / "metadata" / "timestamp.json").read_bytes())
    v = snap["signed"]["meta"]["snapshot.json"]["version"]
    meta = json.loads((world.repo_dir / "metadata" / f"{v}.snapshot.json").read_bytes())
    team = meta["signed"]["meta"]["team.json"]
    data = (world.repo_dir / "metadata" / f"{team['version']}.team.json").read_bytes()
    assert team["length"] == len(data)
    assert team["hashes"] == {"sha256": hashlib.sha256(data).hexdigest()}


def test_a_junk_team_role_from_the_origin_is_refused_within_its_signed_length(
        world: World) -> None:
    world.repo.delegate("team", ["classifier/*"])
    world.repo.publish(world.bundle("1.0.0", seed=1), role="team")
    world.update()
    world.repo.publish(world.bundle("2.0.0", seed=2), role="team")
    name, length = _team_file(world)
    log = world.tmp / "origin" / "access.log"
    (world.repo_dir / "metadata" / name).write_bytes(b"{" * (2 << 20))  # 2 MiB of junk
    before = world.snapshot()
    mark = len(log.read_text().splitlines())
    with pytest.raises(ModelwardError) as e:
        world.update()
    # (python-tuf stops at the first chunk past the signed length: nothing is parsed)
    assert "delegated role team" in str(e.value), e.value
    assert f"maximum allowed length of {length}" in str(e.value), e.value
    after = world.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    assert world.active_version() == "1.0.0"
    assert not (world.state / "metadata" / "team.json").read_bytes().startswith(b"{{")
    assert any(name in line for line in log.read_text().splitlines()[mark:])
    assert length < 64 * 1024
