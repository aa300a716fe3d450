"""Attacker a10bootcfg (session 10): a careless operator's MQTT password that begins with
``~``. The '~' rule of paths (agent/_config_schema.py:451) runs for every string key that
is not a name, enum, host or URL, secrets included: ``[mqtt] password = "~..."`` is
refused as if it were a path, and the error line, printed by ``agent boot-check`` (to the
journal at every boot) and by ``agent check-config``, quotes the password in clear."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.unit._configbase import BASE, config_dir

SECRET = "~Sup3r-s3cret-pw"


def test_a10_password_starting_with_tilde_is_a_password(tmp_path: Path) -> None:
    d = config_dir(tmp_path)
    p = d / "agent.toml"
    p.write_text(BASE + f'[mqtt]\nhost = "broker"\nport = 8883\npassword = "{SECRET}"\n')
    os.chmod(p, 0o600)
    exe = Path(sys.executable).with_name("modelward")
    outs = []
    for cmd in (["agent", "boot-check", "--tpm-wait", "0"], ["agent", "check-config"]):
        r = subprocess.run([str(exe), *cmd, "--config", str(p)], capture_output=True,
                           text=True, timeout=60, cwd=d)
        outs.append(r)
        assert SECRET.lstrip("~") not in r.stdout + r.stderr, f"{cmd}: secret printed"
    check = outs[1]
    assert check.returncode == 0, check.stderr
    assert "password = <set>" in check.stdout
