"""Outside attack review of issue 13 finding 1 through swtpm, nginx and the real CLI.

``xfail(strict=True)``: the attack WORKS today (the assertions say what should happen).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from modelward.simulator._teams import team_sign
from modelward.updater.errors import MetadataError
from tests._helpers import repo_cli_ok, team_release_installed
from tests.conftest import World


def test_attack_expired_team_role_keeps_the_fleet_on_the_teams_release(world: World) -> None:
    team_release_installed(world)
    # The team's 3.0.0 is bad; before the operator acts, the (compromised) team key
    # publishes its role expired. The operator pins the fleet back to 2.0.0.
    repo = world.repo
    md = repo._role_md("cls-team")  # noqa: SLF001 - attacker tooling
    md.signed.version += 1
    md.signed.expires = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    repo._write_delegated(md, "cls-team", repo.keys / "delegated-cls-team.pem")  # noqa: SLF001
    repo._snapshot_and_timestamp(repo.current()[0].version)  # noqa: SLF001
    repo_cli_ok(world, "rollout", "pin", "classifier", "2.0.0")
    try:
        world.update()
    except MetadataError as e:
        assert "cls-team" in str(e)  # what happens today: the team's role blocks the pin
        raise
    assert world.active_version() == "2.0.0"


def test_attack_operator_halt_of_a_team_pin_ships_it(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.publish("2.0.0", seed=2)
    repo_cli_ok(world, "rollout", "pin", "classifier", "2.0.0")
    repo_cli_ok(world, "repo", "delegate", "cls-team", "--paths", "classifier/*")
    team_sign(world.repo, "cls-team", world.bundle("3.0.0", seed=3), pinned=True)
    world.update()
    assert world.active_version() == "2.0.0"  # the operator's pin wins over the team's
    repo_cli_ok(world, "rollout", "set", "classifier", "3.0.0", "--halt")
    before = world.snapshot()
    r = world.update()
    assert world.active_version() == "2.0.0", r.message
    assert world.snapshot().record == before.record
