"""Attack 15 (careless operator): `modelward agent provision` run as root.

README "Debian package" says ``runuser -u modelward -- modelward agent provision``; the
operator who types ``sudo modelward agent provision`` instead gets a state directory and a
TPM auth file owned by root inside the agent's 0750/0700 directories (owned by the agent
user, as tmpfiles.d makes them). The agent (User=modelward) then cannot rewrite its record
or read its TPM auth value (trust/_tpmauth.py refuses a file not its own): every boot check
fails, inference never starts. provision should refuse to run as another user than the
owner of the state directory (or hand what it made to that owner).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from modelward.simulator._demo import write_device_config
from modelward.simulator._swtpm import SwtpmHandle
from tests.conftest import _new_repo

# state owned by nobody: one worker, alone (scripts/test)
pytestmark = [pytest.mark.xdist_group("machine"),
              pytest.mark.skipif(os.geteuid() != 0, reason="provisions as root")]


def test_root_provision_into_agent_owned_state(
    tmp_path: Path, swtpm: SwtpmHandle, monkeypatch: pytest.MonkeyPatch,
) -> None:
    nobody = pwd.getpwnam("nobody")
    _, _, _, _, root = _new_repo(tmp_path, monkeypatch)
    tmp_path.chmod(0o755)
    state, auth = tmp_path / "state", tmp_path / "state-tpm"
    for d, mode in ((state, 0o750), (auth, 0o700)):  # as modelward.tmpfiles.conf makes them
        d.mkdir(mode=mode)
        os.chown(d, nobody.pw_uid, nobody.pw_gid)
    conf = write_device_config(tmp_path / "agent.toml", device_id="dev-1", state=state,
                               tcti=swtpm.tcti, origin_url="https://127.0.0.1:1")
    r = subprocess.run([sys.executable, "-m", "modelward", "agent", "provision", "--config",
                        str(conf), "--root", str(root)], capture_output=True, text=True,
                       timeout=120, check=False)
    made = [p for d in (state, auth) for p in d.rglob("*")]
    if r.returncode == 0:
        wrong = [str(p) for p in made if p.lstat().st_uid != nobody.pw_uid]
        assert not wrong, f"root-owned in the agent's directories: {wrong}"
    else:  # refused: nothing made
        assert not made, made
        assert "modelward" in r.stderr or "owner" in r.stderr, r.stderr
