"""Attack (helper a15cfg), the real CLI in a subprocess: a disk attacker who writes the
state directory plants a rejections.json and a record.json; `agent status` on a device
whose TPM does not answer (a dead TCTI) or with --no-tpm must still print its one
UNVERIFIED report, and nothing that reads as the VERIFIED line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CONFIG = """\
device_id = "d"
fleet = "f"
state_dir = "state"
tcti = "swtpm:host=127.0.0.1,port=1"
model = "m"
[https]
metadata_url = "https://o.example/metadata/"
targets_url = "https://o.example/targets/"
"""


def _plant(d: Path, until: float, name: str = "m") -> Path:
    (d / "state" / "trust").mkdir(parents=True)
    rec = {"record": {"counter": 1, "root_version": 1, "targets_version": 1,
                      "active": {"name": name, "version": "1.0", "fingerprint": "fp",
                                 "slot": "a"}, "previous": None}, "mac": "00"}
    (d / "state" / "trust" / "record.json").write_text(json.dumps(rec))
    e = {"path": "t.onnx", "hashes": {"sha256": "00"}, "reason": "r", "detail": "d",
         "model": "m", "version": "1", "at": 1.0, "until": until}
    (d / "state" / "rejections.json").write_text(
        json.dumps({"version": 1, "rejections": [e], "mac": "00"}))
    (d / "agent.toml").write_text(CONFIG)
    return d / "agent.toml"


def _status(cfg: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelward", "agent", "status", "--config",
                           str(cfg), *flags], capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize("flags", [("--no-tpm",), ()])
def test_status_without_tpm_survives_planted_rejections(tmp_path: Path,
                                                        flags: tuple[str, ...]) -> None:
    r = _status(_plant(tmp_path, 1e300), *flags)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("UNVERIFIED")
    assert "internal error" not in r.stderr


def test_status_without_tpm_has_no_verified_text(tmp_path: Path) -> None:
    forged = "m" + " " * 69 + "verified  by the TPM (trust record MAC and update counter)"
    cfg = _plant(tmp_path, 2.0, name=forged)  # (an expired rejection: not shown)
    r = _status(cfg, "--no-tpm")
    assert r.returncode == 0, r.stderr
    assert "verified  by the TPM" not in r.stdout
