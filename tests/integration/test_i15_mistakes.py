"""Issue 15, must-show 5 (mistakes) through the real command: a handful of operator
mistakes as a child process (unreadable files as an unprivileged user, since tests run
as root), and "one line per error" of a failing ``agent update --once`` against the
world's origin (nginx, swtpm), for people and under journald, with nothing trusted moved.

The many variants, one per subcommand, are in tests/unit/test_i15_mistakes.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import World

# runs as another uid (setpriv): one worker, alone (scripts/test)
pytestmark = pytest.mark.xdist_group("machine")

NOBODY = 65534


def _run(*argv: str, env: dict[str, str] | None = None, user: int | None = None,
         stderr: int | object = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-I", "-m", "modelward", *argv]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    e = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM",
                                                         "MODELWARD_LOG_FORMAT")}
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,  # type: ignore[call-overload]
                          env={**e, **(env or {})}, timeout=60, check=False, cwd="/")


def _one_line(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode != 0, r
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, lines
    for n in needles:
        assert n in lines[0], lines[0]
    assert "; hint: " in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged user can enter (pytest's tmp_path is root's, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="mw-i15-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_i15_unreadable_files_as_an_unprivileged_user(shared_dir: Path) -> None:
    locked = shared_dir / "locked"
    locked.write_text('device_id = "d"\n')
    locked.chmod(0o000)
    _one_line(_run("agent", "status", "--config", str(locked), user=NOBODY),
              str(locked), "Permission denied")
    _one_line(_run("bundle", "build", str(locked), "--name", "m", "--version", "1.0.0",
                   "-o", str(shared_dir / "o.tar"), user=NOBODY),
              f"MODEL {locked}", "Permission denied")
    _one_line(_run("fleet", "add-device", "--fleet-dir", str(shared_dir / "fd"), "--device",
                   "d", "--key", str(locked), user=NOBODY), f"--key {locked}",
              "Permission denied")


def test_i15_missing_files_and_bad_urls_as_a_process(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    _one_line(_run("announce", "--repo", str(tmp_path), "--broker", "mqtts://127.0.0.1:1",
                   "--fleet", "f", "--tls-ca", str(missing)), f"--tls-ca {missing}")
    _one_line(_run("announce", "--repo", str(tmp_path), "--broker", "http://127.0.0.1:1",
                   "--fleet", "f"), "'http://127.0.0.1:1'", "TLS")
    _one_line(_run("bundle", "build", str(missing), "--name", "m", "--version", "1.0.0",
                   "--vectors", str(missing), "-o", str(tmp_path / "o.tar")), str(missing))
    r = _run("publish", "--repo", str(tmp_path), "--keys", str(tmp_path), str(missing),
             "--rollout", "nan")
    assert r.returncode == 2
    _one_line(r, "argument --rollout", "'nan'")


# -- one line per error: a failing update ------------------------------------------


def _break_origin(w: World) -> None:
    """The origin serves a timestamp that is no TUF metadata."""
    for p in (w.repo_dir / "metadata").glob("timestamp.json"):
        p.write_bytes(b'{"signed": "not metadata"}')


def test_i15_a_failed_update_is_one_line_and_moves_nothing(world: World) -> None:
    w = world
    w.publish("1.0.0", seed=1)
    assert w.update().outcome.value == "installed"
    before = w.snapshot()
    _break_origin(w)
    r = _run("agent", "update", "--once", "--config", str(w.conf_path))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1, lines  # not logged and printed: reported once
    assert lines[0].startswith("modelward: error: ") and "timestamp" in lines[0]
    assert "; hint: " in lines[0] and "Traceback" not in r.stderr
    assert w.snapshot() == before

    # under journald: the same error is one JSON record with its priority, nothing more
    log = w.tmp / "journal"
    with log.open("w") as f:
        st = os.fstat(f.fileno())
        r = _run("agent", "update", "--once", "--config", str(w.conf_path), stderr=f,
                 env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert r.returncode == 1
    lines = log.read_text().splitlines()
    errors = [line for line in lines if line.startswith("<3>")]
    assert len(errors) == 1, lines
    doc = json.loads(errors[0][3:])
    assert doc["priority"] == 3 and doc["level"] == "error" and "timestamp" in doc["msg"]
    assert all(line.startswith("<") and json.loads(line[3:]) for line in lines)
    assert w.snapshot() == before

    # the daemon's attempt process reports it once too ("update failed"), for people and
    # in the format the daemon passes it (--log-format json)
    for fmt in ("auto", "json"):
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        r2 = subprocess.run([sys.executable, "-I", "-m", "modelward.agent._child",
                             str(w.conf_path)], capture_output=True, text=True, timeout=60,
                            check=False, env={**env, "MODELWARD_LOG_FORMAT": fmt})
        assert r2.returncode == 1
        failed = [line for line in r2.stderr.splitlines() if "timestamp" in line]
        assert len(failed) == 1, r2.stderr
        if fmt == "json":
            doc = json.loads(failed[0])
            assert doc["msg"].startswith("update failed: ") and doc["priority"] == 3
            assert doc["error"] == "MetadataError" and doc["logger"] == "modelward.agent"
        else:
            assert " ERROR agent: update failed: " in failed[0]
        assert "Traceback" not in r2.stderr
    assert w.snapshot() == before
