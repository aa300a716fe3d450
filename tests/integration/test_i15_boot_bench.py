"""Issue 15 must-show 6: ``benchmarks/boot.py`` runs against swtpm and judges its goals.

Not a timed test (one round, an 8 MiB model, no idle section): only that the command
works and its table judges both goals (met, or missed by how much), never a time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# the boot benchmark: one worker, alone (scripts/test)
pytestmark = pytest.mark.xdist_group("machine")

ROOT = Path(__file__).resolve().parents[2]
_VERDICT = re.compile(r"^<= [^:]+: (met|MISSED by \d+%)$")


def test_boot_benchmark_judges_its_goals(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "benchmarks/boot.py", "--rounds", "1", "--big-mib", "8",
         "--big-rounds", "1", "--idle-seconds", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = [[c.strip() for c in line.strip("|").split(" | ")] for line in r.stdout.splitlines()
             if line.startswith("| ") and not line.startswith(("| figure", "| ---"))]
    rows = {row[0]: row for row in table}
    judged = {k: row[-1] for k, row in rows.items() if row[-1]}
    assert set(judged) == {"boot-check process, 1 KiB model",
                           "boot-check process, 8 MiB model (page cache warm)"}, table
    assert all(_VERDICT.match(v) for v in judged.values()), judged
    assert re.fullmatch(r"\d+\.\d MiB \(8 MiB model\), \d+\.\d MiB \(1 KiB\)",
                        rows["boot-check peak RSS"][1]), rows
    assert "the TPM library alone (`python -c 'import tpm2_pytss'`)" in rows
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("modelward-")]
