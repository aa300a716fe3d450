"""Review r11 of issue 16 (dwall, 7b36c6d): ``agent update`` from the entry point ends with
``os._exit`` (``cli._end_process``) after a successful update. Attacked as power loss and
a careless change: at the moment the process ends, what would the interpreter's teardown
still have done (atexit callbacks, ``weakref.finalize`` with atexit, threads), and is what
the update wrote all there (status.json, metrics.prom, journal, record), with no temp file
or staging left and the device lock free for the next command?

Real stack: nginx origin, swtpm, the real ``python -m modelward`` entry point in a child,
wrapped only to observe (``_end_process`` is spied on, then called as it is).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import MqttWorld, World

_WRAPPER = r"""
import atexit, json, sys, threading, weakref
out = sys.argv.pop(1)
_registered = []
_register = atexit.register
def _record(func, *a, **k):
    _registered.append(getattr(func, "__module__", "?") + "."
                       + getattr(func, "__qualname__", repr(func)))
    return _register(func, *a, **k)
atexit.register = _record
import modelward.cli as cli
real = cli._end_process
def spy(code):
    live = [i for f, i in list(weakref.finalize._registry.items()) if i.atexit]
    doc = {"code": code, "atexit": atexit._ncallbacks(), "registered": _registered,
           "finalizers_atexit": [repr(i.func) for i in live],
           "threads": [t.name for t in threading.enumerate()],
           "threading_atexits": [repr(f) for f in threading._threading_atexits]}
    with open(out + ".spy", "w") as f:
        json.dump(doc, f)
    real(code)
cli._end_process = spy
atexit.register(lambda: open(out + ".teardown", "w").close())
sys.argv = ["modelward", *sys.argv[1:]]
sys.exit(cli.main())
"""


def _run(w: World, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _WRAPPER, str(out), "agent", "update",
                           "--once", "--config", str(w.conf_path), *extra],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_size for p in sorted(root.rglob("*"))}


def test_update_fast_exit_leaves_nothing_pending(world: World, tmp_path: Path) -> None:
    world.publish("1.0.0", seed=1)
    out = tmp_path / "probe"
    r = _run(world, out)
    assert r.returncode == 0, r.stderr
    spy = json.loads(Path(str(out) + ".spy").read_text())
    # the fast path was taken: the interpreter's teardown (our atexit marker) never ran
    assert not Path(str(out) + ".teardown").exists()
    assert spy["threads"] == ["MainThread"]
    # what os._exit skips: logging's shutdown (which _end_process ran first), ours, certifi's
    # (it deletes a CA file extracted from a zip: none here, the bundle is a plain file) and
    # weakref.finalize's (no finalizer with atexit is alive)
    assert spy["atexit"] == len(spy["registered"]), spy
    assert set(spy["registered"]) <= {"__main__.<lambda>", "logging.shutdown",
                                      "certifi.core.exit_cacert_ctx",
                                      "weakref.finalize._exitfunc"}, spy
    # (concurrent.futures' join of its workers: none alive, the thread list is the main one)
    assert spy["finalizers_atexit"] == [] and len(spy["threading_atexits"]) <= 1, spy
    tree = _tree(world.state)
    assert not [p for p in tree if p.endswith((".tmp", ".part")) or "/tmp" in p or
                p.startswith("staging/")], tree  # (the staging directory stays, empty)
    assert json.loads((world.state / "journal.json").read_bytes())["step"] == "active"
    status = json.loads((world.state / "status.json").read_bytes())
    assert status.get("last_result"), status
    assert (world.state / "metrics.prom").read_text().count("installed") >= 1
    assert world.active_version() == "1.0.0"
    # the lock is free: the next command runs (not EXIT_BUSY) and also ends fast
    again = _run(world, tmp_path / "again")
    assert again.returncode == 0, again.stderr
    assert not Path(str(tmp_path / "again") + ".teardown").exists()
    assert _tree(world.state).keys() == tree.keys()



_OLD_EXIT = "import sys, modelward.cli as c; c._end_process = lambda code: None; " \
    "sys.argv[0] = 'modelward'; sys.exit(c.main())"


def _closed_stdout_update(w: World, *, fast: bool, unbuffered: bool
                          ) -> subprocess.CompletedProcess[str]:
    rd, wr = os.pipe()
    os.close(rd)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    head = ["-m", "modelward"] if fast else ["-c", _OLD_EXIT]
    try:
        return subprocess.run([sys.executable, *head, "agent", "update", "--once",
                               "--config", str(w.conf_path)], stdout=wr,
                              stderr=subprocess.PIPE, text=True, timeout=300, check=False,
                              env={**env, "PYTHONPATH": os.pathsep.join(sys.path)})
    finally:
        os.close(wr)


def test_update_with_stdout_a_closed_pipe_ends_as_without_the_fast_exit(
        world: World) -> None:
    """stdout a pipe whose reader is gone (EPIPE when the message is flushed): the
    install is complete, and the command says so: exit 0 and one warning naming stdout,
    with ``_end_process`` and without it (it was exit 120 and Python's "Exception ignored"
    line before ``cli._print_done``)."""
    world.publish("1.0.0", seed=1)
    fast = _closed_stdout_update(world, fast=True, unbuffered=False)
    assert world.active_version() == "1.0.0"
    world.publish("2.0.0", seed=2)
    old = _closed_stdout_update(world, fast=False, unbuffered=False)
    assert world.active_version() == "2.0.0"
    assert fast.returncode == old.returncode == 0, (fast.stderr, old.stderr)
    for r in (fast, old):
        assert "cannot write to stdout" in r.stderr and "Exception ignored" not in r.stderr
        assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert json.loads((world.state / "journal.json").read_bytes())["step"] == "active"


def test_update_with_unbuffered_stdout_a_closed_pipe_names_stdout(world: World) -> None:
    """Tried: ``agent update`` with ``PYTHONUNBUFFERED=1`` (set in this environment, and
    common in services) and stdout a pipe whose reader is gone. Happened: the install is
    complete and committed, yet the command exits 1 with ``modelward: error: [Errno 32]
    Broken pipe; hint: check that path and its permissions``: no path is at fault, stdout
    is, and a script reads exit 1 as a failed install. Cause: ``_agent_update``'s
    ``print(result.message)`` raises when unbuffered, before ``_end_process``; main's
    ``except Exception`` takes it as a file error. Not caused by the fast exit (the same
    with ``_end_process`` disabled)."""
    world.publish("1.0.0", seed=1)
    r = _closed_stdout_update(world, fast=True, unbuffered=True)
    assert world.active_version() == "1.0.0"  # (installed: this holds today)
    assert r.returncode != 1 and "stdout" in r.stderr, r.stderr


def test_update_over_mqtt_fast_exit_leaves_no_thread(mqtt_world: MqttWorld,
                                                     tmp_path: Path) -> None:
    """The same over MQTT (mosquitto and the bridge): paho's network thread is stopped
    before the end, so the fast exit is taken with nothing pending, and the install and
    its files are all there."""
    w = mqtt_world
    w.publish("1.0.0", seed=1)
    out = tmp_path / "probe"
    r = _run(w, out)
    assert r.returncode == 0, r.stderr
    spy = json.loads(Path(str(out) + ".spy").read_text())
    assert spy["threads"] == ["MainThread"], spy
    assert not Path(str(out) + ".teardown").exists()
    assert spy["finalizers_atexit"] == [], spy
    assert w.active_version() == "1.0.0"
    assert json.loads((w.state / "journal.json").read_bytes())["step"] == "active"
