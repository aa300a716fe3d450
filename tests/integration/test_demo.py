"""The README's demo runs end to end and says what it did (keeps the README true)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_and_every_step_behaves(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "modelward", "sim", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "UNEXPECTED" not in out
    for line in (
        "installed classifier 1.0.0",
        "ok: v1 installed over HTTPS",
        "agent log: announcement of timestamp version 3: refreshing after",
        "ok: v2 installed over MQTT",
        "nothing to do",
        "fell back to classifier 1.0.0",
        "Demo finished: every step behaved as expected.",
        # issue 15: the example inference app switches models, never to the tampered one
        "ok: the app refused the tampered bytes",
        "ok: the app never served the tampered model",
    ):
        assert line in out, line
    served = [ln.split()[3] for ln in out.splitlines() if ln.startswith("  app answered: ")]
    assert served == ["1.0.0", "2.0.0", "2.0.0", "1.0.0", "2.0.0"], out
    assert out.count("ok: the app serves") == 5
    assert not (tmp_path / "demo" / "device" / "app-busy").exists()  # the app was stopped
    # services were stopped by pid
    assert not (tmp_path / "demo" / "origin" / "nginx.pid").exists()
    assert not (tmp_path / "demo" / "device" / "tpm" / "swtpm.pid").exists()
    assert not (tmp_path / "demo" / "broker" / "mosquitto.pid").exists()


def test_cli_help_lists_every_group() -> None:
    r = subprocess.run([sys.executable, "-m", "modelward", "--help"], capture_output=True,
                       text=True, check=True)
    for word in ("repo", "bundle", "publish", "announce", "serve-mqtt", "fleet", "agent", "sim",
                 "Exit codes"):
        assert word in r.stdout
    for argv in (["agent", "update", "--help"], ["sim", "tpm", "start", "--help"],
                 ["bundle", "build", "--help"], ["serve-mqtt", "--help"],
                 ["agent", "run", "--help"], ["fleet", "broker-config", "--help"]):
        assert subprocess.run([sys.executable, "-m", "modelward", *argv], capture_output=True,
                              check=False).returncode == 0
