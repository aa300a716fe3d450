"""tpm2-pytss imported with its software crypto helpers deferred (trust/_tpmimport.py): the
helpers still work, and load only when one is called."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
from modelward.trust._tpmimport import import_tpm2_pytss
t = import_tpm2_pytss()
assert "cryptography.x509" not in sys.modules, "crypto helpers loaded at import"
from tpm2_pytss.internal.crypto import _get_digest_size
# a helper tpm2_pytss.types imported by name, called: the real one runs
pub = t.TPM2B_PUBLIC.parse("hmac:sha256", objectAttributes=t.TPMA_OBJECT.SIGN_ENCRYPT)
assert t.types._get_digest_size(t.TPM2_ALG.SHA256) == 32
assert _get_digest_size(t.TPM2_ALG.SHA384) == 48
assert "cryptography.x509" in sys.modules
assert sys.modules["tpm2_pytss.internal.crypto"].__file__.endswith("crypto.py")
try:
    t.types._get_digest_size(12345)
except Exception as e:  # the real function's own error comes through unchanged
    print(type(e).__name__)
print("ok", pub.publicArea.type)
"""


def test_crypto_helpers_load_on_first_call_and_behave_as_the_library() -> None:
    r = subprocess.run([sys.executable, "-I", "-c", CODE], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("ok")


def test_an_earlier_plain_import_is_left_alone() -> None:
    code = ("import tpm2_pytss, sys\nfrom modelward.trust._tpmimport import import_tpm2_pytss\n"
            "assert import_tpm2_pytss() is tpm2_pytss\n"
            "assert type(sys.modules['tpm2_pytss.internal.crypto']).__name__ == 'module'\n")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
