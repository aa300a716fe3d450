"""Attack 15, real race: the agent user's directory, a root writer, a victim file.

A process of another user (``nobody``, standing for the agent user ``modelward``) that owns
the directory swaps each ``.*.tmp`` file for a symlink to a root-owned 0600 file while root
runs ``write_atomic`` there (what `sudo modelward agent ...` does in /var/lib/modelward):
``trust/_atomic.py:write_atomic`` chmods by name, and the victim becomes 0644.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from modelward.trust._atomic import write_atomic

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv")

SWAPPER = """
import os, sys, time
d, victim = sys.argv[1], sys.argv[2]
end = time.time() + 8
while time.time() < end:
    for n in os.listdir(d):
        p = os.path.join(d, n)
        if n.endswith(".tmp") and not os.path.islink(p):
            try:
                os.rename(p, p + ".x")
                os.symlink(victim, p)
            except OSError:
                pass
"""


@pytest.mark.xfail(strict=True, reason="root's write_atomic in a directory another user "
                   "owns: that user swaps the temp file for a link and root chmods its target")
def test_root_write_atomic_in_agent_owned_dir_keeps_victim_private() -> None:
    nobody = pwd.getpwnam("nobody")
    tmp_path = Path(tempfile.mkdtemp(prefix="a15race-", dir="/tmp"))  # reachable by nobody
    tmp_path.chmod(0o755)
    try:
        _race(tmp_path, nobody)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _race(tmp_path: Path, nobody: pwd.struct_passwd) -> None:
    state, etc = tmp_path / "state", tmp_path / "etc"
    state.mkdir()
    etc.mkdir()
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    victim = etc / "shadow"
    victim.write_text("root:$6$secret:::\n")
    victim.chmod(0o600)
    script = tmp_path / "swap.py"
    script.write_text(SWAPPER)
    script.chmod(0o644)
    py = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    swapper = subprocess.Popen(["setpriv", f"--reuid={nobody.pw_uid}",
                                f"--regid={nobody.pw_gid}", "--clear-groups", py, str(script),
                                str(state), str(victim)])
    try:
        time.sleep(0.3)
        end = time.monotonic() + 5
        while time.monotonic() < end and victim.stat().st_mode & 0o777 == 0o600:
            with contextlib.suppress(OSError):
                write_atomic(state / "status.json", b"{}\n", mode=0o644)
    finally:
        swapper.kill()
        swapper.wait(5)
    assert victim.stat().st_mode & 0o777 == 0o600
