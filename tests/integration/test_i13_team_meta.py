"""Issue 13 (a4), real swtpm + nginx: the snapshot pins each delegated (team) role by
length and SHA-256, as it pins the top-level targets; a team role the origin swaps for
junk is refused after at most its signed length, before it is parsed."""

from __future__ import annotations

import hashlib
import json

import pytest

from modelward.trust.errors import ModelwardError
from tests.conftest import World


def _assert_pinned(world: World, name: str) -> None:
    snap = json.loads((world.repo_dir / "metadata" / "timestamp.json").read_bytes())
    v = snap["signed"]["meta"]["snapshot.json"]["version"]
    meta = json.loads((world.repo_dir / "metadata" / f"{v}.snapshot.json").read_bytes())
    team = meta["signed"]["meta"]["team.json"]
    data = (world.repo_dir / "metadata" / name).read_bytes()
    assert team["length"] == len(data)
    assert team["hashes"] == {"sha256": hashlib.sha256(data).hexdigest()}


def _team_file(world: World) -> tuple[str, int]:
    snap = json.loads((world.repo_dir / "metadata" / "timestamp.json").read_bytes())
    v = snap["signed"]["meta"]["snapshot.json"]["version"]
    meta = json.loads((world.repo_dir / "metadata" / f"{v}.snapshot.json").read_bytes())
    name = f"{meta['signed']['meta']['team.json']['version']}.team.json"
    return name, len((world.repo_dir / "metadata" / name).read_bytes())


def test_a_junk_team_role_from_the_origin_is_refused_within_its_signed_length(
        world: World) -> None:
    world.repo.delegate("team", ["classifier/*"])
    world.repo.publish(world.bundle("1.0.0", seed=1), role="team")
    world.update()
    world.repo.publish(world.bundle("2.0.0", seed=2), role="team")
    name, length = _team_file(world)
    _assert_pinned(world, name)
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


def test_a_team_release_behind_an_expired_role_is_not_published(world: World) -> None:
    """`publish --role chain2` while chain1 (which delegates to chain2) has expired: refused,
    naming chain1 and its expiry, before anything is served; devices (which refuse the
    expired chain1, and so could never install it) see nothing new."""
    from datetime import UTC, datetime

    repo = world.repo
    repo.delegate("chain1", ["classifier/*"], terminating=False)
    repo.delegate("chain2", ["classifier/*"], parent="chain1", terminating=False)
    repo.publish(world.bundle("1.0.0", seed=1), role="chain2")
    world.update()
    md = repo._role_md("chain1")  # noqa: SLF001 - the chain1 team's last version lapses
    md.signed.expires = datetime(2020, 1, 1, tzinfo=UTC)
    md.signed.version += 1
    repo._write_delegated(md, "chain1", repo.keys / "delegated-chain1.pem")  # noqa: SLF001
    repo._snapshot_and_timestamp(repo.current()[0].version)  # noqa: SLF001
    served = sorted(p.name for p in (world.repo_dir / "targets").rglob("*"))
    meta = sorted(p.name for p in (world.repo_dir / "metadata").iterdir())
    r = world.cli("publish", str(world.bundle("2.0.0", seed=2)), "--role", "chain2",
                  "--repo", str(world.repo_dir), "--keys", str(world.keys))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "'chain1' expired at 2020-01-01T00:00:00+00:00" in r.stderr, r.stderr
    assert sorted(p.name for p in (world.repo_dir / "targets").rglob("*")) == served
    assert sorted(p.name for p in (world.repo_dir / "metadata").iterdir()) == meta
    before = world.snapshot()
    with pytest.raises(ModelwardError, match="chain1"):
        world.update()  # (why: the device refuses the expired role)
    after = world.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    assert world.active_version() == "1.0.0"
