"""The smallest valid agent config of the unit tests, and the directory it needs (one copy
for every test file that loads configs)."""

from __future__ import annotations

import os
from pathlib import Path

BASE = """\
device_id = "d"
fleet = "f"
state_dir = "state"
tcti = "swtpm:port=1"
model = "m"
[https]
metadata_url = "https://o.example/metadata/"
targets_url = "https://o.example/targets/"
ca_file = "ca.pem"
"""


def config_dir(tmp_path: Path, *, trust: bool = True, state_mode: int | None = None) -> Path:
    """``tmp_path`` with the ``ca.pem`` that :data:`BASE` names and, with ``trust``, an
    empty ``state/trust`` (mode ``state_mode`` for ``state`` when given)."""
    (tmp_path / "ca.pem").write_text("pem")
    if trust:
        (tmp_path / "state" / "trust").mkdir(parents=True)
        if state_mode is not None:
            os.chmod(tmp_path / "state", state_mode)
    return tmp_path
