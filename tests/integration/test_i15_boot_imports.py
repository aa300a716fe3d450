"""Issue 15, "a lean boot path": ``modelward agent boot-check`` loads only what booting needs.

Each test runs the real command (``python -I -X importtime -m modelward agent boot-check``,
as the boot unit does, against swtpm) and reads from ``-X importtime`` every module the
process imported at any moment, so a module imported and dropped again still counts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from modelward.simulator._swtpm import stop_swtpm
from tests.conftest import World

#: What booting never needs: the network, TUF and its signers (with pkcs11), MQTT, the
#: health check's runtime, the operator's and tester's code, and the update pipeline.
FORBIDDEN = (
    "requests", "urllib3", "tuf", "securesystemslib", "pkcs11", "paho", "onnxruntime",
    "onnx", "numpy", "rich", "modelward.publisher", "modelward.simulator",
    "modelward.updater.install._install", "modelward.updater.install._tuf",
    "modelward.updater.transport._fetcher", "modelward.updater.transport._mqtt",
    "modelward.updater.install._health", "modelward.updater.bundle._bundle",
    # tpm2-pytss's software crypto helpers (trust/_tpmimport.py defers them: never called)
    "tpm2_pytss.internal.crypto", "cryptography.x509",
    # ... its FAPI bindings and cryptography's key serialization (deferred the same way)
    "tpm2_pytss.FAPI", "cryptography.hazmat.primitives.serialization",
    "subprocess",  # (the activation command's: run by updates, never at boot)
    # the full config loader and the transports' dataclasses (agent/_config_rules.py
    # validates the whole file and builds only booting's part)
    "modelward.agent._config", "modelward.updater._config",
    # the argument parser (cli._boot_unit_args reads the boot unit's command line; argparse
    # formatting imports shutil, with bz2 and lzma, and gettext, with locale) and shutil
    # otherwise (trust/_atomic.py, trust/_store.py import it where they copy or remove)
    "argparse", "gettext", "shutil", "modelward._inputs",
    # dataclasses (it imports inspect, with ast and dis; every @dataclass exec()s its
    # methods): the boot path's records are modelward.trust._plain classes. (tokenize stays:
    # logging imports it, through traceback and linecache.)
    "dataclasses", "inspect", "ast", "dis",
)
#: ... and what it does need (so an empty list of imports cannot pass).
NEEDED = ("tpm2_pytss.ESAPI", "hashlib", "modelward.trust._plain", "modelward.trust._fingerprint",
          "modelward.trust._record", "modelward.trust._store", "modelward.updater.install._slots",
          "modelward.updater.install._boot")

_IMPORT = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| *(\S+)$", re.M)


def imported_by(argv: list[str]) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``modelward *argv`` isolated (-I) with -X importtime: (result, modules)."""
    r = subprocess.run([sys.executable, "-I", "-X", "importtime", "-m", "modelward", *argv],
                       capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "TSS2_LOG": "all+NONE"})
    return r, set(_IMPORT.findall(r.stderr))


def forbidden_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules
                  if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def _boot_check(world: World, *extra: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    r, mods = imported_by(["agent", "boot-check", "--config", str(world.conf_path), *extra])
    assert "Traceback" not in r.stderr, r.stderr
    assert set(NEEDED) <= mods, sorted(set(NEEDED) - mods)
    return r, mods


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_boot_check_imports_nothing_but_booting(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    world.update()
    assert world.active_version() == "2.0.0"

    # The active model matches: verified, nothing moved, nothing heavy loaded.
    before = world.snapshot()
    r, mods = _boot_check(world)
    assert r.returncode == 0, r.stderr
    assert "2.0.0 verified" in r.stdout
    assert forbidden_in(mods) == []
    assert world.snapshot() == before

    # Run as the boot unit runs it (the installed entry point, not -I) from a directory
    # holding planted modules of the names it imports: none of them is executed.
    planted = world.tmp / "planted"
    (planted / "modelward").mkdir(parents=True)
    marker = world.tmp / "planted-ran"
    for name in ("tpm2_pytss.py", "hashlib.py", "logging.py", "modelward/__init__.py"):
        (planted / name).write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    script = Path(sys.executable).parent / "modelward"
    r = subprocess.run([str(script), "agent", "boot-check", "--config", str(world.conf_path)],
                       cwd=planted, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "2.0.0 verified" in r.stdout
    assert not marker.exists(), marker.read_text()

    # The active model was altered: the fallback (a record commit, a status write with
    # its metrics) stays as lean.
    _flip(world.state / "current" / "model.onnx")
    r, mods = _boot_check(world)
    assert r.returncode == 0, r.stderr
    assert "fell back to classifier 1.0.0" in r.stdout
    assert forbidden_in(mods) == []
    after = world.snapshot()
    assert world.active_version() == "1.0.0"
    assert after.counter == before.counter + 1
    assert after.metadata == before.metadata  # TUF metadata untouched
    status = json.loads((world.state / "status.json").read_bytes())
    assert status["last_error"]["type"] == "ActiveModelAltered"

    # Nothing trusted left (exit 3): the same.
    _flip(world.state / "current" / "model.onnx")
    r, mods = _boot_check(world)
    assert r.returncode == 3, r.stderr
    assert "no trusted previous model" in r.stderr
    assert forbidden_in(mods) == []
    assert world.snapshot().current is None

    # The TPM does not answer (the error path, a status written without a MAC): the same.
    stop_swtpm(world.tpm.state)
    r, mods = _boot_check(world, "--tpm-wait", "0")
    assert r.returncode == 1, r.stderr
    assert "not running or not reachable" in r.stderr
    assert forbidden_in(mods) == []


def test_importtime_parse_sees_a_forbidden_import() -> None:
    """The check itself: an import of requests is seen (also inside a function)."""
    r = subprocess.run([sys.executable, "-I", "-X", "importtime", "-c",
                        "def f():\n import requests\nf()"],
                       capture_output=True, text=True, check=True)
    assert forbidden_in(set(_IMPORT.findall(r.stderr)))[:1] == ["requests"]
