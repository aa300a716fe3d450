"""Attack 15, real users: the agent user's directory, a root writer, a victim file.

A process of another user (``nobody``, standing for the agent user ``modelward``) that owns
the directory swaps root's ``.*.tmp`` file for a symlink to a root-owned 0600 file while
root runs ``write_atomic`` there (what `sudo modelward agent ...` did in /var/lib/modelward):
a chmod by name would make the victim 0644.

The interleaving is fixed, not raced: root's write stops right after its temporary file is
written and fsynced (the point where the old code chmod-ed it by name), the other user
swaps it through the kernel's own permission checks (it may rename root's file because
it owns the directory), and says what it swapped. A run in which nothing was swapped
fails instead of passing vacuously.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from modelward.trust import _atomic
from modelward.trust._atomic import write_atomic

# runs as nobody, in /tmp: one worker, alone (scripts/test)
pytestmark = [pytest.mark.xdist_group("machine"),
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                 reason="needs root and setpriv")]

# One swap per line read: rename each root-owned temporary file away, put a link to the
# victim in its place, answer how many it swapped.
SWAPPER = """
import os, sys
d, victim = sys.argv[1], sys.argv[2]
for _ in sys.stdin:
    n = 0
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if name.endswith(".tmp") and not os.path.islink(p):
            os.rename(p, p + ".x")
            os.symlink(victim, p)
            n += 1
    print(n, flush=True)
"""


def test_root_write_atomic_in_agent_owned_dir_keeps_victim_private(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nobody = pwd.getpwnam("nobody")
    tmp_path = Path(tempfile.mkdtemp(prefix="a15race-", dir="/tmp"))  # reachable by nobody
    tmp_path.chmod(0o755)
    try:
        _swap_during_write(tmp_path, nobody, monkeypatch)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _swap_during_write(tmp_path: Path, nobody: pwd.struct_passwd,
                       monkeypatch: pytest.MonkeyPatch) -> None:
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
                                f"--regid={nobody.pw_gid}", "--clear-groups", py, "-I",
                                str(script), str(state), str(victim)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    swapped: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the file's fsync: where the old code chmod-ed by name
        real_fsync(fd)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            assert swapper.stdin is not None and swapper.stdout is not None
            swapper.stdin.write("swap\n")
            swapper.stdin.flush()
            swapped.append(int(swapper.stdout.readline()))

    monkeypatch.setattr(_atomic.os, "fsync", fsync)
    try:
        write_atomic(state / "status.json", b"{}\n", mode=0o644)
    finally:
        monkeypatch.undo()
        swapper.communicate(timeout=10)
    assert swapped == [1], f"the other user swapped nothing: {swapped} (vacuous run)"
    assert [p.name for p in state.glob("*.x")], "root's temporary file was not moved away"
    assert victim.stat().st_mode & 0o777 == 0o600
    assert victim.read_text() == "root:$6$secret:::\n"
    # what root renamed into place is the link itself (the directory's owner could have
    # put it there anyway), never a write through it
    assert (state / "status.json").is_symlink()
