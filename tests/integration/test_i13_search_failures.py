"""A broken team role never blocks the operator (issue 13 review findings 2, 7, 8, 10).

Through swtpm, nginx and the real CLI: one delegated team key makes its role delegate to
a role no snapshot lists and to a role whose name no file may have. The operator's
`rollout pin` still works on the repository, and devices still apply it.
"""

from __future__ import annotations

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import DelegatedRole, Delegations

from modelward.simulator._teams import team_sign
from tests._helpers import repo_cli_ok, team_release_installed
from tests.conftest import World


def test_team_ghost_and_overlong_subroles_do_not_block_the_operators_pin(
    world: World
) -> None:
    team_release_installed(world)
    # The (compromised) team key: sub-roles that cannot be loaded, listed before 3.0.0's
    # own entry would matter, for every classifier path.
    repo = world.repo
    md = repo._role_md("cls-team")  # noqa: SLF001 - attacker tooling
    k = CryptoSigner.generate_ed25519().public_key
    md.signed.delegations = Delegations(keys={k.keyid: k}, roles={
        name: DelegatedRole(name, [k.keyid], 1, False, paths=["classifier/*"])
        for name in ("ghost", "x" * 251)})
    md.signed.version += 1
    repo._write_delegated(md, "cls-team", repo.keys / "delegated-cls-team.pem")  # noqa: SLF001
    repo._snapshot_and_timestamp(repo.current()[0].version)  # noqa: SLF001
    before = world.snapshot()
    repo_cli_ok(world, "rollout", "pin", "classifier", "2.0.0")  # the publisher is not blocked
    r = world.update()
    assert world.active_version() == "2.0.0", r.message
    after = world.snapshot()
    assert after.record != before.record and after.current != before.current


def test_team_cannot_republish_an_operator_withdrawn_version(world: World) -> None:
    """The operator withdraws its own 2.0.0; the team key lists 2.0.0 again (bypassing
    the publisher): the device does not install it, and nothing trusted moves."""
    world.publish("1.0.0", seed=1)
    world.update()
    bad = world.bundle("2.0.0", seed=2)
    world.repo.publish(bad)
    repo_cli_ok(world, "rollout", "withdraw", "classifier", "2.0.0")
    repo_cli_ok(world, "repo", "delegate", "cls-team", "--paths", "classifier/*")
    r = world.cli("publish", str(bad), "--role", "cls-team", "--repo",
                  str(world.repo_dir), "--keys", str(world.keys))
    assert r.returncode != 0 and "withdrawn" in r.stderr, r.stderr
    team_sign(world.repo, "cls-team", bad)
    team_sign(world.repo, "cls-team", bad, path="classifier/again-2.0.0.tar")
    before = world.snapshot()
    world.update()
    assert world.active_version() == "1.0.0"
    after = world.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == \
        (before.record, before.counter, before.anchor, before.current, before.slots)
