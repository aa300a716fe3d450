"""Attack a10boot: a tpm2-pytss whose ``types`` reads ``PrivateFormat`` at import time other
than as a plain method's default (here a module constant, as a refactor upstream might
write it) gets the stand-in's placeholder for good: ``_settle_defaults`` only rewrites
function defaults, and the lean import does not fall back to the plain one. Before this
change the stand-in held cryptography's real enum, so any layout worked (the lean import
is meant to survive a release of another layout: test_i15_tpm_lean.py).

The layout is the installed package copied with that one refactor; the plain import of the
same copy works, the lean one must too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

_USE = """
import sys
sys.path.insert(0, {where!r})
LOAD
assert t.__file__.startswith({where!r}), t.__file__
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import serialization as s
key = ec.derive_private_key(7, ec.SECP256R1())
pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.TraditionalOpenSSL, s.NoEncryption())
sens, pub = t.types.TPMT_SENSITIVE.from_pem(pem), t.types.TPMT_PUBLIC.from_pem(pem)
assert sens.to_pem(pub) == pem
print("same pem")
"""


def _refactored(tmp_path: Path) -> Path:
    import tpm2_pytss

    src = Path(tpm2_pytss.__file__).parent
    dst = tmp_path / "site" / "tpm2_pytss"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    types_py = dst / "types.py"
    text = types_py.read_text()
    imp = "from cryptography.hazmat.primitives import serialization\n"
    default = "format: str = serialization.PrivateFormat.TraditionalOpenSSL,"
    body = "        k = private_to_key(self, public)\n"
    assert text.count(imp) == 1 and text.count(default) == 1 and text.count(body) == 1
    text = text.replace(imp, imp + "_PRIVATE_DEFAULT = serialization.PrivateFormat"
                        ".TraditionalOpenSSL\n")
    text = text.replace(default, "format: str = None,")
    text = text.replace(body, body + "        format = format or _PRIVATE_DEFAULT\n")
    types_py.write_text(text)
    return dst.parent


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)


def test_a10_lean_import_of_another_layout_keeps_private_format_real(tmp_path: Path) -> None:
    where = str(_refactored(tmp_path))
    plain = _run(_USE.format(where=where).replace("LOAD", "import tpm2_pytss as t"))
    assert plain.returncode == 0 and "same pem" in plain.stdout, plain.stderr  # (the layout works)
    lean = _run(_USE.format(where=where).replace(
        "LOAD", "from modelward.trust._tpmimport import import_tpm2_pytss\n"
        "t = import_tpm2_pytss()"))
    assert lean.returncode == 0, lean.stderr
    assert "same pem" in lean.stdout
