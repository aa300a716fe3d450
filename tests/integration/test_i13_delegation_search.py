"""TUF's delegation search on a real device (issue 13, must-show 2): swtpm, nginx, and a
delegation tree built with the publisher.

One tree holds every case; each case lists, besides a legitimate release, a newer one
that only a wrong search would find (a real, installable bundle), so the version the
device installs shows the search's answer, and nginx's access log which roles it fetched.

    targets ─┬─ chain1  classifier/*                       (3-level chain)
             │    └─ chain2  classifier/classifier-1*
             │         └─ chain3  classifier/*  lists 1.0.0, and 9.1.0 (chain2 does not
             │                                   delegate that path)
             ├─ term    classifier/classifier-2*  terminating, lists 2.0.0
             ├─ hidden  classifier/classifier-2*  lists 9.2.0 (hidden by `term`)
             ├─ left    classifier/classifier-3*  ─┐
             ├─ right   classifier/classifier-4*  ─┴─ shared  lists 3.0.0, 4.0.0 and
             │                                        9.3.0 (delegated by neither)
             └─ vision  detector/*                (another model's team)
"""

from __future__ import annotations

from modelward.simulator._teams import team_sign
from modelward.updater.install._install import Outcome
from tests.conftest import World


def _requested(w: World, since: int) -> list[str]:
    lines = (w.tmp / "origin" / "access.log").read_text().splitlines()[since:]
    return [line.split('"')[1].split()[1].rsplit("/", 1)[1] for line in lines]


def _role(name: str) -> str:
    """``7.chain1.json`` -> ``chain1``; a bundle's chunk index (issue 16, a target file
    ``<hash>.<bundle>.chunks.json``) -> ``<index>``; another target file -> ``<target>``."""
    if name.endswith(".chunks.json"):
        return "<index>"
    parts = name.split(".")
    return parts[1] if name.endswith(".json") and parts[0].isdigit() else (
        name.removesuffix(".json") if name.endswith(".json") else "<target>")


def test_delegation_search_as_tuf_specifies(world: World) -> None:
    repo = world.repo
    repo.delegate("chain1", ["classifier/*"], terminating=False)
    repo.delegate("chain2", ["classifier/classifier-1*"], parent="chain1", terminating=False)
    repo.delegate("chain3", ["classifier/*"], parent="chain2", terminating=False)
    repo.delegate("term", ["classifier/classifier-2*"], terminating=True)
    repo.delegate("hidden", ["classifier/classifier-2*"], terminating=False)
    repo.delegate("left", ["classifier/classifier-3*"], terminating=False)
    repo.delegate("right", ["classifier/classifier-4*"], terminating=False)
    repo.delegate("shared", ["classifier/classifier-3*"], parent="left", terminating=False)
    repo.delegate("shared", ["classifier/classifier-4*"], parent="right", terminating=False)
    repo.delegate("vision", ["detector/*"])

    repo.publish(world.bundle("1.0.0", seed=1), role="chain3")
    repo.publish(world.bundle("2.0.0", seed=2), role="term")
    repo.publish(world.bundle("3.0.0", seed=3), role="shared")  # through left
    repo.publish(world.bundle("4.0.0", seed=4), role="shared")  # through right
    # What the search must not return (signed with each team's key, bypassing the
    # publisher, which refuses all three):
    team_sign(repo, "chain3", world.bundle("9.1.0", seed=5))
    team_sign(repo, "hidden", world.bundle("9.2.0", seed=6),
              path="classifier/classifier-2-hidden.tar")
    team_sign(repo, "shared", world.bundle("9.3.0", seed=7))
    team_sign(repo, "vision", world.bundle("9.4.0", seed=8), path="detector/x.tar")

    before = world.snapshot()
    mark = len((world.tmp / "origin" / "access.log").read_text().splitlines())
    r = world.update()
    assert r.outcome is Outcome.INSTALLED and world.active_version() == "4.0.0", r.message
    fetched = [_role(n) for n in _requested(world, mark)]
    # Pre-order, in delegation order; `shared` once though two roles delegate to it;
    # `hidden` (behind a terminating sibling) and `vision` (other paths) never. The bundle's
    # chunk index (issue 16) is looked up by the same search: its path
    # `classifier/classifier-4.0.0.tar.chunks.json` reaches `shared` through `right`, both
    # already loaded, so it loads no role; only the index target itself is fetched.
    assert fetched == ["root", "timestamp", "snapshot", "targets", "chain1", "chain2",
                       "chain3", "term", "left", "shared", "right", "<index>",
                       "<target>"], fetched
    md = world.state / "metadata"
    assert sorted(p.name for p in md.glob("*.json")) == sorted(
        f"{n}.json" for n in ("root", "timestamp", "snapshot", "targets", "chain1", "chain2",
                              "chain3", "term", "left", "shared", "right"))

    # A second refresh with nothing new reads every role from disk: no role is fetched.
    after = world.snapshot()
    mark = len((world.tmp / "origin" / "access.log").read_text().splitlines())
    r = world.update()
    assert r.outcome is Outcome.UP_TO_DATE
    assert [_role(n) for n in _requested(world, mark)] == ["root", "timestamp"]
    assert world.snapshot() == after
    assert after.counter == before.counter + 1 and after.anchor == before.anchor
