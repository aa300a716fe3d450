"""Issue 15, "One import namespace" (must show 1): a module planted in the working directory,
or in a ``PYTHONPATH`` the agent was started with, is never imported by the agent, its
update child or the sandboxed health check (real swtpm, nginx, onnxruntime).

The working directory holds ``agent/_child.py`` (what ``python -m agent._child`` used to
run), a whole fake ``modelward`` package, the old bare package names, the libraries the
agent imports (``tuf``, ``requests``, ``onnxruntime``, ...), stdlib names it imports late
(``json``, ``tarfile``, ...) and ``sitecustomize``. Each leaves a marker file when imported
(where it may write) and raises, so even a sandboxed process that cannot write fails visibly:
the health check fails and the release is not installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import World

PLANTED = ("modelward/__init__.py", "modelward/cli.py", "modelward/agent/__init__.py",
           "modelward/agent/_child.py", "agent/__init__.py", "agent/_child.py",
           "updater/__init__.py", "trust/__init__.py", "publisher/__init__.py",
           "simulator/__init__.py", "tuf/__init__.py", "securesystemslib/__init__.py",
           "requests/__init__.py", "paho/__init__.py", "tpm2_pytss/__init__.py",
           "cryptography/__init__.py", "onnxruntime.py", "numpy.py", "json.py", "tarfile.py",
           "hashlib.py", "zipfile.py", "sitecustomize.py", "usercustomize.py")
_BODY = '''\
import os as _os
try:
    with open(_os.path.join({markers!r}, {name!r}), "a") as _f:
        _f.write(str(_os.getpid()) + "\\n")
except OSError:
    pass
raise ImportError("planted module {name} was imported")
'''


def plant(where: Path, markers: Path) -> None:
    markers.mkdir()
    for rel in PLANTED:
        p = where / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(_BODY.format(markers=str(markers), name=rel.replace("/", ".")))


def test_planted_modules_in_cwd_and_pythonpath_never_run(world: World) -> None:
    w = world
    planted, markers = w.tmp / "planted", w.tmp / "markers"
    plant(planted, markers)
    conf = str(w.conf_path)
    # the plant is live against a Python that does not isolate (`python -m modelward`, as
    # the simulator started agents before): the marker is real
    probe = subprocess.run([sys.executable, "-m", "modelward", "--help"], cwd=planted,
                           capture_output=True, text=True, check=False)
    assert "planted module modelward.__init__.py" in probe.stderr
    for m in markers.iterdir():
        m.unlink()

    # the console script, run from the planted directory: update (health check), boot check
    script = Path(sys.executable).with_name("modelward")
    w.publish("1.0.0", seed=1)
    for argv in (("agent", "update", "--once"), ("agent", "boot-check")):
        r = subprocess.run([str(script), *argv, "--config", conf], cwd=planted,
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, (argv, r.stderr)
        assert "planted module" not in r.stderr
    assert w.active_version() == "1.0.0"
    assert sorted(p.name for p in markers.iterdir()) == []

    # the daemon, from there and with PYTHONPATH at the plant: its update child and the
    # health check (whose sandbox keeps PYTHONPATH) both start -I; 2.0.0 installs cleanly
    env = {**os.environ, "PYTHONPATH": str(planted)}
    w.publish("2.0.0", seed=2)
    log = w.tmp / "daemon.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-I", "-m", "modelward", "agent", "run",
                                 "--config", conf], cwd=planted, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            end = time.monotonic() + 60
            while w.active_version() != "2.0.0":
                assert time.monotonic() < end, log.read_text()
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0, log.read_text()
    assert "planted module" not in log.read_text()
    # the update child on its own, as the daemon starts it (nothing new: exit 0)
    r = subprocess.run([sys.executable, "-I", "-m", "modelward.agent._child", conf],
                       cwd=planted, env=env, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0 and "planted module" not in r.stderr, r.stderr
    assert sorted(p.name for p in markers.iterdir()) == []
    assert w.active_version() == "2.0.0"
