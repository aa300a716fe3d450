"""Attack a10boot: ``agent boot-check`` from the entry point ends with ``os._exit`` once its
output is flushed (modelward/cli.py ``_end_process``). A local user runs the real command
(``python -I -m modelward``, against swtpm) with its standard output closed, on a full
device, or into a pipe nobody reads: the exit code must stay truthful (a verified boot is 0,
a fallback that happened is reported as one, never an internal error; output that could
not be written is never a silent 0).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from modelward.agent._observe import BOOT_SECONDS_FILE
from tests.conftest import World


def _run(world: World, redirect: str) -> subprocess.CompletedProcess[str]:
    """boot-check with ``redirect`` applied to its stdout by a shell (``>&-``: closed)."""
    cmd = [sys.executable, "-I", "-m", "modelward", "agent", "boot-check", "--config",
           str(world.conf_path)]
    return subprocess.run(["/bin/sh", "-c", f'exec "$@" {redirect}', "sh", *cmd],
                          capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "TSS2_LOG": "all+NONE"})


def _flip(world: World) -> None:
    path = world.state / "current" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a10_closed_stdout_verified_and_fallback_keep_their_exit(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    world.update()

    r = _run(world, ">&-")
    assert "internal error" not in r.stderr, r.stderr
    assert r.returncode == 0, r.stderr  # verified: as with stdout open (print to None)

    _flip(world)
    r = _run(world, ">&-")
    assert world.active_version() == "1.0.0"  # (the fallback happened)
    assert "internal error" not in r.stderr, r.stderr
    assert r.returncode == 0, r.stderr


def test_a10_unwritable_stdout_is_never_a_silent_success(world: World) -> None:
    """Resisted: the result line cannot be written (/dev/full, a pipe whose reader is
    gone): the flush fails, _end_process returns, and the usual exit reports it non-zero."""
    world.publish("1.0.0", seed=1)
    world.update()
    r = _run(world, ">/dev/full")
    assert r.returncode not in (0, 3), (r.returncode, r.stderr)
    assert "internal error" not in r.stderr, r.stderr

    rfd, wfd = os.pipe()
    os.close(rfd)  # (nobody reads: EPIPE; Python ignores SIGPIPE)
    try:
        r = subprocess.run([sys.executable, "-I", "-m", "modelward", "agent", "boot-check",
                            "--config", str(world.conf_path)], stdout=wfd,
                           stderr=subprocess.PIPE, text=True, timeout=120, check=False,
                           env={**os.environ, "TSS2_LOG": "all+NONE"})
    finally:
        os.close(wfd)
    assert r.returncode not in (0, 3), (r.returncode, r.stderr)
    assert "internal error" not in r.stderr, r.stderr


def test_a10_fallback_under_journal_stream_loses_no_write(world: World) -> None:
    """Resisted: a fallback through the entry point (os._exit, no teardown) with stderr as
    the journal stream ($JOURNAL_STREAM names the pipe: JSON records behind a priority
    prefix) leaves every record whole on stderr, status.json and metrics.prom written with
    the fallback counted, and nothing half-written beside them."""
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    world.update()
    _flip(world)
    before = {p.name for p in world.state.iterdir()}
    trust_before = {p.name for p in (world.state / "trust").iterdir()}
    rfd, wfd = os.pipe()
    st = os.fstat(wfd)
    env = {**os.environ, "TSS2_LOG": "all+NONE", "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    env.pop("MODELWARD_LOG_FORMAT", None)
    with os.fdopen(rfd, "rb") as err:
        p = subprocess.Popen([sys.executable, "-I", "-m", "modelward", "agent", "boot-check",
                              "--config", str(world.conf_path)], stdout=subprocess.PIPE,
                             stderr=wfd, env=env)
        os.close(wfd)
        out = p.stdout.read() if p.stdout else b""
        text = err.read().decode()
        code = p.wait(120)
    assert code == 0, text
    assert b"fell back to classifier 1.0.0" in out
    records = [json.loads(re.sub(r"^<\d>", "", line)) for line in text.splitlines()]
    assert any(r.get("fallback") is True for r in records), records
    assert world.active_version() == "1.0.0"
    status = json.loads((world.state / "status.json").read_bytes())
    assert status["last_error"]["type"] == "ActiveModelAltered"
    prom = (world.cfg.metrics_textfile or world.state / "metrics.prom").read_text()
    assert re.search(r"fallbacks\S* 1(\.0)?$", prom, re.M), prom
    # (issue 17: the boot-check's duration, for the next status report, whole)
    assert {p.name for p in world.state.iterdir()} - before <= {"metrics.prom",
                                                                BOOT_SECONDS_FILE}
    assert float((world.state / BOOT_SECONDS_FILE).read_text()) >= 0
    assert {p.name for p in (world.state / "trust").iterdir()} == trust_before


def test_a10_closed_stdout_nothing_trusted_stays_exit_3(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    _flip(world)
    r = _run(world, ">&-")
    assert "no trusted previous model" in r.stderr, r.stderr
    assert "internal error" not in r.stderr, r.stderr
    assert r.returncode == 3, r.stderr


def test_a10_closed_stderr_or_both_keep_every_exit(world: World) -> None:
    """(fix) With fd 2 closed (or 1 and 2) sys.stderr is None too: main wrote to it before
    the check ran (an AttributeError, exit 1, no fallback). Now a verified boot is 0, a
    fallback happens and is 0, nothing trusted is 3."""
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    world.update()
    for redirect in ("2>&-", ">&- 2>&-"):
        r = _run(world, redirect)
        assert r.returncode == 0, (redirect, r.stdout)
    assert _run(world, "2>&-").stdout == "classifier 2.0.0 verified\n"
    _flip(world)
    r = _run(world, ">&- 2>&-")
    assert r.returncode == 0
    assert world.active_version() == "1.0.0"
    _flip(world)  # (slot a altered too: nothing trusted)
    for redirect in ("2>&-", ">&- 2>&-"):
        r = _run(world, redirect)
        assert r.returncode == 3, (redirect, r.stdout)
