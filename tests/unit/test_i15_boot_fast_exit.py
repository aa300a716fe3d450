"""Issue 15: ``agent boot-check`` run from the entry point ends without the interpreter's
teardown (``modelward.cli._end_process``), and loses nothing the caller reads: every byte
written to stdout, every log record, the exit code.

The real command's outputs and exit codes (verified 0, fell back 0, nothing trusted 3, TPM
down 1) are asserted through swtpm by tests/integration/test_i15_boot_imports.py, which runs
it the same way (``python -I -m modelward``, ``argv`` None).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modelward import cli

_PRELUDE = """
import atexit, logging, sys
from modelward.cli import _end_process
atexit.register(lambda: open(sys.argv[1], "w").write("teardown ran"))
h = logging.StreamHandler(sys.stderr)
logging.getLogger("t").addHandler(h)
logging.getLogger("t").warning("the log record")
sys.stdout.write("x" * 200_000)  # (buffered: more than one pipe's worth)
"""


def _run(tmp_path: Path, body: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    marker = tmp_path / "marker"
    r = subprocess.run([sys.executable, "-I", "-c", _PRELUDE + textwrap.dedent(body),
                        str(marker)], capture_output=True, text=True, timeout=60,
                       check=False, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return r, marker


def test_ends_now_with_everything_written(tmp_path: Path) -> None:
    r, marker = _run(tmp_path, "_end_process(3)\nprint('not reached')\n")
    assert r.returncode == 3, r.stderr
    assert r.stdout == "x" * 200_000
    assert r.stderr == "the log record\n"
    assert not marker.exists()  # (no teardown: the point)


def test_returns_while_another_thread_runs(tmp_path: Path) -> None:
    r, marker = _run(tmp_path, """
        import threading
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        _end_process(3)
        print("returned")
        stop.set()
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "x" * 200_000 + "returned\n"
    assert marker.read_text() == "teardown ran"  # (the usual exit: threads joined)


def test_returns_when_stdout_cannot_be_flushed(tmp_path: Path) -> None:
    r, marker = _run(tmp_path, """
        sys.stdout.close()
        _end_process(3)
        sys.stderr.write("returned")
    """)
    assert r.returncode == 0
    assert r.stderr.endswith("returned")
    assert marker.read_text() == "teardown ran"


def test_a_stream_that_is_none_has_nothing_to_lose(tmp_path: Path) -> None:
    """fd 1 or 2 closed when Python started: that stream is None (print writes nothing);
    the process still ends now, with the command's code (a10boot)."""
    for which in ("stdout", "stderr"):
        r, marker = _run(tmp_path, f"""
            sys.stdout.flush()
            sys.{which} = None
            _end_process(3)
            sys.__stderr__.write("not reached")
        """)
        assert r.returncode == 3, (which, r.stderr)
        assert "not reached" not in r.stderr and "Error" not in r.stderr, r.stderr
        assert not marker.exists()


def test_returns_when_a_stream_is_broken_in_any_way(tmp_path: Path) -> None:
    """A stream replaced by one whose flush fails with something other than OSError or
    ValueError: _end_process returns (no exception of its own), the usual exit follows."""
    for error in ("AttributeError('flush')", "RuntimeError('reentrant')"):
        r, marker = _run(tmp_path, f"""
            sys.stdout.flush()
            class Broken:
                def write(self, text):
                    return len(text)
                def flush(self):
                    raise {error}
            sys.stdout = Broken()
            _end_process(3)
            sys.stderr.write("returned")
        """)
        assert "the log record\nreturned" in r.stderr, (error, r.stderr)
        assert marker.read_text() == "teardown ran"
        # (the usual exit could not flush stdout either: it says so, exit 120)
        assert error.split("(")[0] in r.stderr.split("returned", 1)[1], r.stderr
        assert r.returncode == 120, r.stderr


def test_only_the_entry_points_boot_check_ends_the_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Called with arguments (tests, embedders), main returns boot-check's code; from the
    entry point (``argv`` None) it ends the process with it."""
    ended: list[int] = []
    monkeypatch.setattr(cli, "_end_process", ended.append)
    monkeypatch.setattr(cli, "_agent_boot_check", lambda _args: 3)
    argv = ["agent", "boot-check", "--config", "/nonexistent"]
    assert cli.main(argv) == 3
    assert ended == []
    monkeypatch.setattr(sys, "argv", ["modelward", *argv])
    assert cli.main() == 3  # (_end_process stubbed: it returned)
    assert ended == [3]
    monkeypatch.setattr(sys, "argv", ["modelward", "--version"])
    with pytest.raises(SystemExit):
        raise SystemExit(cli.main())
    assert ended == [3]  # (any other command: the usual exit)


def test_boot_check_runs_without_cycle_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    """No cyclic collection while boot-check runs, and it is back on after (also after an
    error); other commands run with it as it was."""
    import gc

    seen: list[bool] = []

    def boot(_args: object) -> int:
        seen.append(gc.isenabled())
        if len(seen) == 2:
            raise OSError("the disk")
        return 0

    monkeypatch.setattr(cli, "_agent_boot_check", boot)
    assert gc.isenabled()
    argv = ["agent", "boot-check", "--config", "/nonexistent"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == cli.EXIT_ERROR
    assert seen == [False, False] and gc.isenabled()
    monkeypatch.setattr(cli, "_agent_check_config", lambda _args: seen.append(gc.isenabled()) or 0)
    cli.main(["agent", "check-config", "--config", "/nonexistent"])
    assert seen == [False, False, True] and gc.isenabled()


def test_the_entry_points_agent_update_ends_the_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: ``agent update`` from the entry point ends the same way once it returned
    (40-80 ms of teardown per install); called with arguments, main returns its code; an
    update that failed takes the usual exit (its error line is written by main)."""
    ended: list[int] = []
    monkeypatch.setattr(cli, "_end_process", ended.append)
    monkeypatch.setattr(cli, "_agent_update", lambda _args: 0)
    argv = ["agent", "update", "--once", "--config", "/nonexistent"]
    assert cli.main(argv) == 0
    assert ended == []
    monkeypatch.setattr(sys, "argv", ["modelward", *argv])
    assert cli.main() == 0
    assert ended == [0]

    def fails(_args: object) -> int:
        raise OSError("the disk")

    monkeypatch.setattr(cli, "_agent_update", fails)
    assert cli.main() == cli.EXIT_ERROR
    assert ended == [0]  # (not ended early: main reported the error and returned)


def test_imports_are_made_without_cycle_collection_and_frozen() -> None:
    """Issue 16: what a command imports inside ``_no_cycle_collection(freeze=True)`` is
    made with the collector off and is frozen after (never walked again); the collector
    is on again after, also after an error, and one that was off stays off."""
    import gc

    seen: list[bool] = []
    before = gc.get_freeze_count()
    try:
        with cli._no_cycle_collection(freeze=True):
            seen.append(gc.isenabled())
            kept = [[i] for i in range(1000)]  # (objects the collector tracks)
        assert seen == [False] and gc.isenabled()
        assert gc.get_freeze_count() >= before + len(kept)
        with pytest.raises(OSError), cli._no_cycle_collection(freeze=True):
            raise OSError("an import failed")
        assert gc.isenabled()
        gc.disable()
        try:
            with cli._no_cycle_collection(freeze=True):
                seen.append(gc.isenabled())
            assert not gc.isenabled()
        finally:
            gc.enable()
        assert seen == [False, False]
    finally:
        gc.unfreeze()
