"""Health check: onnxruntime in a bounded child process."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from updater._config import HealthConfig
from updater.errors import HealthCheckError


def _limits(cfg: HealthConfig) -> None:  # runs in the child before exec
    os.nice(cfg.nice)
    if cfg.max_memory:
        resource.setrlimit(resource.RLIMIT_AS, (cfg.max_memory, cfg.max_memory))


def run_health_check(
    slot: Path, model: str, version: str, cfg: HealthConfig,
    heartbeat: Callable[[], None] = lambda: None,
) -> str:
    """Check that the model in ``slot`` loads and reproduces its test vectors.

    Args:
        slot: the extracted, fingerprint-checked bundle.
        model, version: for messages.
        cfg: bounds.
        heartbeat: called about once a second while the child runs (watchdog).

    Returns:
        The child's one-line report.

    Raises:
        HealthCheckError: the model failed, the child crashed or ran out of time.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "updater._healthchild", str(slot)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: _limits(cfg),  # noqa: PLW1509 - no threads touch it here
    )
    deadline = time.monotonic() + cfg.timeout
    while True:
        heartbeat()
        try:
            stdout, stderr = proc.communicate(
                timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            break
        except subprocess.TimeoutExpired as e:
            if time.monotonic() < deadline:
                continue
            proc.kill()
            proc.communicate()
            raise HealthCheckError(
                f"health check of {model} {version} took longer than {cfg.timeout:.0f}s",
                model=model,
                version=version,
                detail="timeout",
            ) from e
    try:
        report = json.loads(stdout.decode().strip().splitlines()[-1])
        ok, detail = bool(report["ok"]), str(report["detail"])
    except (ValueError, IndexError, KeyError, TypeError):
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        ok, detail = False, f"health check process exited {proc.returncode}: {tail[0]}"
    if not ok or proc.returncode != 0:
        raise HealthCheckError(
            f"health check of {model} {version} failed: {detail}",
            model=model,
            version=version,
            detail=detail,
        )
    return detail
