"""systemd units: they verify, and their exposure stays low (issue #4 must-show 5)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze missing (scripts/setup installs it)")


def _installed_copy(tmp_path: Path, name: str) -> Path:
    """The unit with ExecStart pointing at this checkout's modelward (verify checks it)."""
    exe = Path(sys.executable).parent / "modelward"
    text = (UNITS / name).read_text().replace("/usr/bin/modelward", str(exe))
    out = tmp_path / name
    out.write_text(text)
    return out


@pytest.mark.parametrize("unit", ["modelward-agent.service", "modelward-bootcheck.service"])
def test_unit_verifies(tmp_path: Path, unit: str) -> None:
    r = subprocess.run(["systemd-analyze", "verify", str(_installed_copy(tmp_path, unit))],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


@pytest.mark.parametrize("unit", ["modelward-agent.service", "modelward-bootcheck.service"])
def test_exposure_is_at_most_2_5(unit: str) -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNITS / unit)],
                       capture_output=True, text=True, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.5, r.stdout


def test_agent_unit_runs_unprivileged_with_tpm_and_watchdog() -> None:
    text = (UNITS / "modelward-agent.service").read_text()
    for line in ("Type=notify", "User=modelward", "SupplementaryGroups=tss",
                 "DeviceAllow=/dev/tpmrm0 rw", "StateDirectory=modelward", "NoNewPrivileges=yes"):
        assert line in text
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    sysusers = (UNITS / "modelward.sysusers.conf").read_text()
    assert "u modelward" in sysusers and "m modelward tss" in sysusers
