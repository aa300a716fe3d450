"""Helpers shared by several test files (not fixtures: those live in conftest.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelward.updater.bundle._semver import SemVer

if TYPE_CHECKING:
    from tests.conftest import World

# VmHWM, not ru_maxrss: ru_maxrss survives execve, so a child forked from a large
# pytest process would report the parent's peak instead of its own.
_RSS_WRAPPER = (
    "import re, sys\n"
    "from modelward.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
    "print('MAXRSS_KIB', hwm, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def update_peak_rss(conf_path: Path, timeout: float = 300) -> tuple[int, int, str]:
    """``modelward agent update --once`` in a child: (exit code, its peak RSS in KiB,
    stderr). Raises ``subprocess.TimeoutExpired`` when it hangs."""
    r = subprocess.run(
        [sys.executable, "-c", _RSS_WRAPPER, "agent", "update", "--config", str(conf_path),
         "--once"], capture_output=True, text=True, check=False, timeout=timeout)
    m = re.search(r"MAXRSS_KIB (\d+)", r.stderr)
    assert m, r.stderr
    return r.returncode, int(m.group(1)), r.stderr


@dataclass(frozen=True)
class R:
    """A release as the rollout rules see it (modelward.updater.rollout.Release)."""

    name: str
    version: SemVer
    channel: str = "stable"
    percent: float = 100.0
    halted: bool = False
    pinned: bool = False
    withdrawn: bool = False
    role: str = "targets"


def v(s: str) -> SemVer:
    return SemVer.parse(s)


def publish_root_v2(repo_dir: Path, keys: Path, passphrase: bytes) -> None:
    """Write ``2.root.json``: version 1's root, re-signed by the root key (a rotation that
    changes no key, behind the repository tools' back)."""
    from tuf.api.metadata import Metadata, Root

    from modelward.publisher._keys import load_signer

    md = repo_dir / "metadata"
    root_md = Metadata[Root].from_bytes((md / "1.root.json").read_bytes())
    root_md.signed.version = 2
    root_md.signatures.clear()
    root_md.sign(load_signer(keys, "root", passphrase))
    (md / "2.root.json").write_bytes(root_md.to_bytes())


def repo_cli_ok(w: World, *argv: str) -> str:
    """Run ``modelward <argv> --repo R --keys K`` for the world's repository; its stdout."""
    r = w.cli(*argv, "--repo", str(w.repo_dir), "--keys", str(w.keys))
    assert r.returncode == 0, r.stderr
    return r.stdout


def team_release_installed(w: World) -> None:
    """Operator releases 1.0.0 and 2.0.0, then team ``cls-team`` (``classifier/*``)
    publishes 3.0.0 and the device installs it."""
    from modelward.simulator._teams import team_sign

    w.publish("1.0.0", seed=1)
    w.publish("2.0.0", seed=2)
    repo_cli_ok(w, "repo", "delegate", "cls-team", "--paths", "classifier/*")
    team_sign(w.repo, "cls-team", w.bundle("3.0.0", seed=3))
    w.update()
    assert w.active_version() == "3.0.0"


class Clock:
    """A settable clock for a Repository (``clock=``); starts at ``now``."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def mqtt_varint(n: int) -> bytes:
    """MQTT's variable byte integer (remaining length, property lengths)."""
    out = bytearray()
    while True:
        n, b = divmod(n, 128)
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(b: bytes) -> bytes:
    """An MQTT UTF-8 string or binary data field: two-byte length, then the bytes."""
    return len(b).to_bytes(2, "big") + b


def state_status(state: Path) -> dict[str, Any]:
    """A device's ``status.json`` as it is on disk ({} when unreadable): for tests that
    watch a daemon's attempts without the TPM."""
    import json

    try:
        doc = json.loads((state / "status.json").read_bytes())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def state_attempts(state: Path) -> int:
    """The attempts counter of a device's ``status.json`` (0 when there is none)."""
    c = state_status(state).get("counters")
    return int(c.get("attempts", 0)) if isinstance(c, dict) else 0
