"""The lean tpm2-pytss import (``trust/_tpmimport.py``) puts a stand-in for cryptography's
``serialization`` in ``sys.modules`` while ``tpm2_pytss.types`` loads. A hashing thread
(issue 15's early fingerprint ran one; fix 17 removed it, but the fingerprint's own pool
may run beside the import in a caller) running during that window must import nothing of
cryptography (the stand-in is no package, so a submodule import through it would fail),
and once the import is done every later import gets the real module."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tpm2_pytss")

SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    state = Path(sys.argv[1])
    d = state / "slots" / "a"
    d.mkdir(parents=True, mode=0o750)
    os.chmod(state / "slots", 0o750); os.chmod(d, 0o750)
    for name, size in (("manifest.json", 2), ("model.onnx", 9 << 20)):  # (> 2 leaves: a pool)
        (d / name).write_bytes(os.urandom(size)); os.chmod(d / name, 0o640)
    os.symlink("slots/a", state / "current")
    import threading
    from modelward.trust._fingerprint import directory_entries
    directory_entries(state / "slots" / "a")
    assert not [m for m in sys.modules if m.startswith("cryptography")], "hash imports crypto"
    got = []
    early = threading.Thread(target=lambda: got.append(directory_entries(state / "slots" / "a")))
    early.start()  # hashing while the TPM library loads
    from modelward.trust._tpmimport import _SERIALIZATION, import_tpm2_pytss
    t = import_tpm2_pytss()
    early.join()
    assert got and all(e.size >= 0 for e in got[0])
    left = sys.modules.get(_SERIALIZATION)
    assert left is None or type(left).__name__ == "module", left  # (no stand-in left)
    from cryptography.hazmat.primitives.serialization import pkcs12  # a submodule: real pkg
    assert t.ESAPI and t.TPM2B_PUBLIC and pkcs12.load_pkcs12
    print("ok")
""")


def test_a17_early_thread_and_the_lean_import_do_not_meet(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-I", "-c", SCRIPT, str(tmp_path / "state")],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
