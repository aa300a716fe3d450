"""The operator's top-level decisions win over a delegated role's (issue 13, pure part)."""

from __future__ import annotations

from modelward.updater.rollout import choose_release, operator_first
from tests._helpers import R, v


def test_top_level_pin_beats_a_team_pin_either_way() -> None:
    op = R("m", v("2.0.0"), pinned=True)
    for team in (R("m", v("0.0.1"), pinned=True, role="team"),
                 R("m", v("9.0.0"), pinned=True, role="team")):
        c = choose_release([op, team, R("m", v("3.0.0"))], "d", "stable")
        assert c is not None and c.release is op and c.pinned


def test_team_pin_holds_for_its_model_when_the_operator_has_none() -> None:
    team = R("m", v("1.0.0"), pinned=True, role="team")
    c = choose_release([team, R("m", v("3.0.0"))], "d", "stable")
    assert c is not None and c.release is team


def test_operator_entry_shadows_the_teams_for_the_same_version() -> None:
    team = R("m", v("2.0.0"), role="team")
    halted = R("m", v("2.0.0"), halted=True)
    assert choose_release([team, halted, R("m", v("1.0.0"))], "d", "stable").release.version \
        == v("1.0.0")  # type: ignore[union-attr]
    # the operator's entry is on another channel: it still decides for that version
    beta = R("m", v("2.0.0"), channel="beta")
    assert choose_release([team, beta], "d", "stable") is None


def test_withdrawn_tombstone_hides_the_release_at_every_path() -> None:
    tomb = R("m", v("2.0.0"), withdrawn=True)
    again = R("m", v("2.0.0"), role="team")  # the team re-signs it elsewhere
    assert operator_first([tomb, again]) == []
    assert choose_release([tomb, again, R("m", v("1.0.0"), role="team")], "d",
                          "stable").release.version == v("1.0.0")  # type: ignore[union-attr]
