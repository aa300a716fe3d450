"""Root's agent commands in the agent user's state are refused; the owner's run (attack 15).

A device whose state and TPM auth directories belong to the agent user (``nobody`` here,
``modelward`` on a real device): ``sudo modelward agent update`` / ``boot-check`` /
``provision`` / ``run`` each stop with one typed line naming the owner and the
``runuser -u OWNER -- ...`` to type instead, before the TPM or the disk is touched: the
record, counter, anchor, ``current``, slots and metadata did not move and no root-owned
file appeared. The owner itself provisions there as before.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from modelward.simulator._demo import write_device_config
from modelward.simulator._swtpm import SwtpmHandle
from modelward.trust._tpmauth import auth_dir_for
from tests.conftest import World, _new_repo

# runs as nobody (setpriv), in /tmp: one worker, alone (scripts/test)
pytestmark = [pytest.mark.xdist_group("machine"),
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                 reason="needs root to chown and setpriv")]


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    for p in [top, *top.rglob("*")]:
        os.lchown(p, uid, gid)


def _not_owned_by(top: Path, uid: int) -> list[str]:
    return [str(p) for p in [top, *top.rglob("*")] if p.lstat().st_uid != uid]


def test_i15_root_commands_refused_in_agent_owned_state(world: World) -> None:
    nobody = pwd.getpwnam("nobody")
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)  # an update as root would install it
    before = world.snapshot()
    state, auth = world.state, auth_dir_for(world.state)
    for d in (state, auth):
        _chown_tree(d, nobody.pw_uid, nobody.pw_gid)
    try:
        conf = str(world.conf_path)
        root_json = str(world.repo_dir / "metadata" / "1.root.json")
        for argv in (["agent", "update"], ["agent", "boot-check"], ["agent", "run"],
                     ["agent", "provision", "--root", root_json]):
            r = world.cli(*argv, "--config", conf)
            assert r.returncode == 1, (argv, r.stdout, r.stderr)
            lines = r.stderr.splitlines()
            assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
            line = lines[0]
            assert f"{state} belongs to nobody (uid {nobody.pw_uid})" in line, line
            assert f"runuser -u nobody -- modelward {' '.join(argv[:2])} ..." in line, line
            assert "nothing was changed" in line, line
        assert _not_owned_by(state, nobody.pw_uid) == []  # nothing of root's was made
        assert _not_owned_by(auth, nobody.pw_uid) == []
    finally:
        for d in (state, auth):
            _chown_tree(d, 0, 0)
    assert world.snapshot() == before


def test_i15_the_owner_provisions_its_state(
    swtpm: SwtpmHandle, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the refusal says to do works: as the owner, provision succeeds and everything
    it made is the owner's (the README's `runuser -u modelward -- ...`)."""
    nobody = pwd.getpwnam("nobody")
    shared = Path(tempfile.mkdtemp(prefix="mw-i15-owner-", dir="/tmp"))  # nobody may enter
    shared.chmod(0o755)
    try:
        _, _, _, _, root = _new_repo(shared, monkeypatch)
        state, auth = shared / "state", shared / "state-tpm"
        for d, mode in ((state, 0o750), (auth, 0o700)):  # as modelward.tmpfiles.conf makes them
            d.mkdir(mode=mode)
            os.chown(d, nobody.pw_uid, nobody.pw_gid)
        conf = write_device_config(shared / "agent.toml", device_id="dev-1", state=state,
                                   tcti=swtpm.tcti, origin_url="https://127.0.0.1:1")
        for p in [shared, *shared.rglob("*")]:  # (readable: the repository, the config)
            if p.is_dir() and p not in (state, auth):
                p.chmod(0o755)
            elif p.is_file():
                p.chmod(0o644)
        r = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                            "--clear-groups", sys.executable, "-I", "-m", "modelward", "agent",
                            "provision", "--config", str(conf), "--root", str(root)],
                           capture_output=True, text=True, timeout=120, check=False, cwd="/")
        assert r.returncode == 0, r.stderr
        assert (auth / "tpm.auth").is_file()
        assert _not_owned_by(state, nobody.pw_uid) == []
        assert _not_owned_by(auth, nobody.pw_uid) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)
