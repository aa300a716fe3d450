"""Who may run the agent's state-writing commands where (agent/_owner.py), as a pure rule
and on real directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelward.agent import _owner
from modelward.agent._owner import DirOwner, check_state_owner, refusal, refusal_error
from modelward.agent.errors import StateOwnerError

STATE, AUTH = Path("/var/lib/modelward"), Path("/var/lib/modelward-tpm")
AGENT = 48123  # (no such user on the test machine)


def _here(path: Path, uid: int) -> DirOwner:
    return DirOwner(path, path, uid)


def _missing(path: Path, uid: int) -> DirOwner:
    return DirOwner(path, path.parent, uid)


@pytest.mark.parametrize(("euid", "dirs", "refused"), [
    (0, [_here(STATE, 0), _here(AUTH, 0)], None),                  # a root-run device
    (AGENT, [_here(STATE, AGENT), _here(AUTH, AGENT)], None),      # the packaged device
    (0, [_here(STATE, AGENT), _here(AUTH, AGENT)], STATE),         # sudo ... provision
    (0, [_here(STATE, 0), _here(AUTH, AGENT)], AUTH),              # only the TPM dir theirs
    (AGENT, [_here(STATE, 0), _here(AUTH, AGENT)], STATE),         # left by a root run
    (AGENT, [_here(STATE, 1000), _here(AUTH, AGENT)], STATE),      # another user's
    (0, [_missing(STATE, AGENT), _missing(AUTH, AGENT)], STATE),   # root creating in theirs
    (0, [_missing(STATE, 0), _missing(AUTH, 0)], None),            # root creating in /var/lib
    (AGENT, [_missing(STATE, 0), _missing(AUTH, 0)], None),        # the kernel decides
])
def test_refusal_rule(euid: int, dirs: list[DirOwner], refused: Path | None) -> None:
    got = refusal(euid, dirs)
    assert (got.wanted if got else None) == refused


def test_error_is_one_line_naming_owner_and_the_command_to_run() -> None:
    e = refusal_error(_here(STATE, 0), AGENT, "agent update")
    assert isinstance(e, StateOwnerError) and e.path == str(STATE) and e.uid == 0
    assert e.owner == "root"
    assert "\n" not in str(e) + e.hint
    assert "runuser -u root -- modelward agent update ..." in e.hint
    assert f"chown -R {AGENT}: {STATE}" in e.hint  # (no such user here: the uid)


def test_root_told_to_run_as_the_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_owner, "_user", lambda uid: {0: "root", AGENT: "modelward"}[uid])
    e = refusal_error(_here(STATE, AGENT), 0, "agent provision")
    assert e.hint == ("run it as the owner: `runuser -u modelward -- modelward agent "
                      "provision ...` (the same arguments)")
    assert f"{STATE} belongs to modelward (uid {AGENT})" in str(e)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_on_real_directories(tmp_path: Path) -> None:
    state = tmp_path / "var" / "state"
    check_state_owner(state, "agent provision")  # missing, below root's: fine
    (tmp_path / "var").mkdir()
    os.chown(tmp_path / "var", 65534, 65534)
    with pytest.raises(StateOwnerError, match="would be created in"):
        check_state_owner(state, "agent provision")
    state.mkdir()  # root's own, but its TPM auth directory would be made in nobody's
    with pytest.raises(StateOwnerError, match="state-tpm would be created in"):
        check_state_owner(state, "agent provision")
    (tmp_path / "var" / "state-tpm").mkdir()
    check_state_owner(state, "agent provision")
    os.chown(tmp_path / "var" / "state-tpm", 65534, 65534)
    with pytest.raises(StateOwnerError, match="state-tpm belongs to"):
        check_state_owner(state, "agent update")
    link = tmp_path / "configured"
    link.symlink_to(state)  # the operator's path may be a link: its target's owner counts
    os.chown(state, 65534, 65534)
    with pytest.raises(StateOwnerError, match="configured belongs to"):
        check_state_owner(link, "agent boot-check")
