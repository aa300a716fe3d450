"""Attack 15 (careless operator): the shipped units, read as systemd reads them.

The boot check is what keeps an unverified model from being served: the inference unit
``Requires=`` and is ordered ``After=`` it (systemd/examples/inference.service.d). systemd
starts a ``Requires=`` dependent when the required unit's job FAILS only if it failed; a
unit whose ``Condition*=`` is false is *skipped*, its job succeeds, and the dependent starts.
modelward-bootcheck.service has ``ConditionPathExists=/etc/modelward/agent.toml``: the
operator who moves the config aside ("to stop the agent for now") or keeps it elsewhere
gets, at the next boot, the inference app serving whatever ``current`` points at, never
verified. The unit's own comment says a Condition must not be used for the TPM; the
config path is the same hole.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
SHIPPED = ("modelward-agent.service", "modelward-bootcheck.service",
           "modelward-activate@.service", "examples/inference.service")


def _unit(name: str) -> configparser.RawConfigParser:
    p = configparser.RawConfigParser(strict=False, interpolation=None)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read(SYSTEMD / name)
    return p


def _conditions(name: str) -> list[str]:
    u = _unit(name)
    return [f"{k}={v}" for k, v in u["Unit"].items() if k.startswith("Condition")]


def test_boot_check_is_never_skipped() -> None:
    assert _conditions("modelward-bootcheck.service") == []


def test_inference_drop_in_requires_and_orders_after_boot_check() -> None:
    u = _unit("examples/inference.service.d/modelward.conf")
    assert "modelward-bootcheck.service" in u["Unit"]["Requires"].split()
    assert "modelward-bootcheck.service" in u["Unit"]["After"].split()


def test_boot_check_asserts_the_tpm_device() -> None:
    """No TPM device: an Assert (the job fails, the inference unit does not start)."""
    u = _unit("modelward-bootcheck.service")
    assert u["Unit"]["AssertPathExists"] == "/dev/tpmrm0"
    assert not any("tpmrm0" in c for c in _conditions("modelward-bootcheck.service"))


def test_tmpfiles_lines_create_plain_private_directories() -> None:
    """Only `d` lines (no L/z/Z/C that follow or re-own paths), agent-owned, not
    world-accessible."""
    lines = [ln.split() for ln in (SYSTEMD / "modelward.tmpfiles.conf").read_text()
             .splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines
    for typ, path, mode, user, group, *_ in lines:
        assert typ == "d", path
        assert int(mode, 8) & 0o007 == 0, path
        assert (user, group) == ("modelward", "modelward"), path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("unit", SHIPPED)
@pytest.mark.xdist_group("machine")
def test_shipped_unit_exposure(unit: str) -> None:
    argv = ["systemd-analyze", "security", "--offline=yes", "--no-pager", Path(unit).name]
    r = subprocess.run(argv,
                       cwd=SYSTEMD / Path(unit).parent, capture_output=True, text=True,
                       timeout=60, check=False)
    score = float(r.stdout.rsplit("Overall exposure level for", 1)[1].split(":")[1].split()[0])
    assert score <= 2.5, r.stdout[-400:]
