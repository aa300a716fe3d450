"""Run ``examples/inference_app.py`` against a device's state dir, for the demo and the tests."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelward.simulator.errors import ServiceError

APP = Path(__file__).resolve().parents[1] / "examples" / "inference_app.py"
SERVED = ("model", "version", "sha256")


@dataclass
class AppHandle:
    """A running example app."""

    proc: subprocess.Popen[str]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        """The app's process id."""
        return self.proc.pid

    def info(self) -> dict[str, Any]:
        """What the app says it serves (GET), or ``{"error": ...}`` when it serves nothing."""
        return _http(self.url, None)

    def infer(self, x: list[list[float]]) -> dict[str, Any]:
        """POST ``x``: the output and the model it came from."""
        return _http(self.url, json.dumps({"input": x}).encode())

    def reload(self) -> None:
        """SIGHUP: what ``ExecReload`` sends."""
        self.proc.send_signal(signal.SIGHUP)

    def wait_for(self, version: str, timeout: float = 5.0) -> dict[str, Any]:
        """Poll until the app serves ``version``; the last answer (maybe another version)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.info()
            if got.get("version") == version or time.monotonic() > deadline:
                return got
            time.sleep(0.1)


def _http(url: str, body: bytes | None) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as r:  # noqa: S310 - our loopback URL
            doc = json.loads(r.read())
    except urllib.error.HTTPError as e:
        doc = json.loads(e.read())
        doc["status"] = e.code
    return doc if isinstance(doc, dict) else {"error": f"not an object: {doc!r}"}


def start_app(model_dir: Path, busy_file: Path, log: Path, timeout: float = 20.0) -> AppHandle:
    """Start the example app on a free loopback port, serving ``model_dir``.

    Raises:
        ServiceError: the example is not in this checkout, or it did not start.
    """
    if not APP.is_file():
        raise ServiceError(f"example app {APP} is not here (not a source checkout)",
                           service="inference app")
    env = dict(os.environ, MODEL_DIR=str(model_dir), BUSY_FILE=str(busy_file), PORT="0")
    proc = subprocess.Popen([sys.executable, "-I", str(APP)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=open(log, "w"))  # noqa: SIM115
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("serving on "):
        stop_app(proc.pid, proc)
        raise ServiceError(f"example app did not start: {line!r}; see {log}",
                           service="inference app", log=str(log))
    return AppHandle(proc, line.split()[-1], log)


def stop_app(pid: int, proc: subprocess.Popen[str] | None = None) -> None:
    """Stop the app by pid (SIGTERM, then SIGKILL after 10 s)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if proc is not None:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
