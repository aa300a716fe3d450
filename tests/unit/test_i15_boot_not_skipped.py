"""The boot check fails, never skips, when what it needs is missing (attack 15, units).

systemd itself evaluates the shipped unit's Condition/Assert lines (``systemd-analyze
condition``, the manager's own code): with the config missing or empty the result must be
"Asserts failed" (the job fails, the inference unit that Requires= it does not start), never
"Conditions failed" (the unit is skipped, its job succeeds, inference starts unverified).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
CONFIG = "/etc/modelward/agent.toml"
#: The units of the boot path: the check, what runs after it, what it gates or reloads.
BOOT_PATH = ("modelward-bootcheck.service", "modelward-agent.service",
             "modelward-activate@.service", "modelward-activate@.path",
             "examples/inference.service", "examples/inference.service.d/modelward.conf")


def _checks(unit: str) -> list[str]:
    """The unit's ``Condition*=`` and ``Assert*=`` lines, in order."""
    return [ln.strip() for ln in (SYSTEMD / unit).read_text().splitlines()
            if ln.strip().startswith(("Condition", "Assert"))]


@pytest.mark.parametrize("unit", BOOT_PATH)
def test_no_unit_of_the_boot_path_has_a_condition(unit: str) -> None:
    assert [c for c in _checks(unit) if c.startswith("Condition")] == []


def test_boot_check_asserts_its_config() -> None:
    for unit in ("modelward-bootcheck.service", "modelward-agent.service"):
        asserts = [c for c in _checks(unit) if c.startswith("Assert")]
        assert any(c.split("=", 1)[1] == CONFIG for c in asserts), unit


def _evaluate(unit: str, config: Path) -> subprocess.CompletedProcess[str]:
    """systemd's verdict on the unit's checks, with the config at ``config`` and the TPM
    device present (/dev/null stands for /dev/tpmrm0)."""
    checks = [c.replace(CONFIG, str(config)).replace("/dev/tpmrm0", "/dev/null")
              for c in _checks(unit)]
    return subprocess.run(["systemd-analyze", "condition", *checks], capture_output=True,
                          text=True, timeout=30, check=False)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit", ["modelward-bootcheck.service", "modelward-agent.service"])
@pytest.mark.xdist_group("machine")
def test_missing_or_empty_config_fails_the_unit_as_systemd_evaluates_it(
    tmp_path: Path, unit: str,
) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    for config in (tmp_path / "moved-aside.toml", empty):
        r = _evaluate(unit, config)
        assert r.returncode != 0, r.stderr
        assert "Asserts failed." in r.stderr, r.stderr
        assert "Conditions failed." not in r.stderr, r.stderr  # (skipped: inference starts)
    present = tmp_path / "agent.toml"
    present.write_text('device_id = "dev-1"\n')
    r = _evaluate(unit, present)
    assert r.returncode == 0, r.stderr
    assert "Asserts succeeded." in r.stderr, r.stderr
