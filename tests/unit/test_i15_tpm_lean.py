"""tpm2-pytss imported without its FAPI bindings and with cryptography's serialization
deferred (trust/_tpmimport.py): the package offers every name its ``__init__`` would but
FAPI's, the deferred functions work, and later importers get the real modules."""

from __future__ import annotations

import subprocess
import sys

LEAN = """
import sys, json
from modelward.trust._tpmimport import import_tpm2_pytss
t = import_tpm2_pytss()
for m in ("tpm2_pytss.FAPI", "cryptography.hazmat.primitives.serialization",
          "cryptography.hazmat.primitives.serialization.ssh", "cryptography.x509"):
    assert m not in sys.modules, m
assert sys.modules["tpm2_pytss"] is t and t.ESAPI.__name__ == "ESAPI"
names = sorted(n for n in vars(t) if not n.startswith("__"))
# a function of tpm2_pytss.types that uses serialization: the real module loads, works
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP256R1())
pub = t.TPM2B_PUBLIC.from_pem(key.public_key().public_bytes(
    __import__("cryptography.hazmat.primitives.serialization", fromlist=["x"]).Encoding.PEM,
    __import__("cryptography.hazmat.primitives.serialization", fromlist=["x"]).PublicFormat
    .SubjectPublicKeyInfo))
pem = pub.to_pem()
assert pem.startswith(b"-----BEGIN PUBLIC KEY-----"), pem
from cryptography.hazmat.primitives import serialization
from modelward.trust._tpmimport import _DeferredSerialization
assert not isinstance(serialization, _DeferredSerialization)
assert hasattr(serialization, "load_ssh_public_key")
assert sys.modules["cryptography.hazmat.primitives.serialization"] is serialization
import tpm2_pytss.FAPI  # (a submodule still imports)
print(json.dumps(names))
"""

FULL = """
import json, tpm2_pytss
print(json.dumps(sorted(n for n in vars(tpm2_pytss) if not n.startswith("__"))))
"""

#: What ``tpm2_pytss/__init__.py`` binds from ``.FAPI`` (and the names FAPI.py imports).
FAPI_NAMES = {"FAPI", "FAPIConfig", "FAPI_CONFIG_ENV", "FAPI_CONFIG_PATHS", "FapiInfo",
              "fapi_info", "Any", "Callable", "List", "contextlib", "json", "logger",
              "logging", "tempfile", "_cffi_backend"}


def _names(code: str) -> set[str]:
    import json

    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.splitlines()[-1]))


def test_i15_lean_tpm2_pytss_has_every_name_but_fapis() -> None:
    lean, full = _names(LEAN), _names(FULL)
    assert full - lean <= FAPI_NAMES
    assert {"ESAPI", "TCTI", "TSS2_Exception", "TPM2B_PUBLIC", "TPM2_ALG", "TPMA_NV",
            "ESYS_TR", "lib"} <= lean
    assert lean - full <= {"common_checks"}  # (FAPI's star import rebinds it in full)


def test_i15_serialization_imported_first_is_left_alone() -> None:
    code = ("import sys\nfrom cryptography.hazmat.primitives import serialization as s\n"
            "from modelward.trust._tpmimport import import_tpm2_pytss\nt = import_tpm2_pytss()\n"
            "assert t.types.serialization is s\n"
            "assert sys.modules['cryptography.hazmat.primitives.serialization'] is s\n")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr


BROKEN = """
import sys, json
import modelward.trust._tpmimport as ti
def broken():
    import tpm2_pytss.TCTI  # (half set up, as a tpm2-pytss of another layout would leave it)
    raise AttributeError("module 'tpm2_pytss.TCTI' has no attribute 'PyTCTI'")
ti._import_without_init = broken
t = ti.import_tpm2_pytss()
assert t.ESAPI.__name__ == "ESAPI" and hasattr(t, "FAPI"), vars(t).keys()
import cryptography.hazmat.primitives.serialization as s
assert not isinstance(s, ti._DeferredSerialization) and hasattr(s, "load_ssh_public_key")
print(json.dumps(sorted(n for n in vars(t) if not n.startswith("__"))))
"""


def test_i15_a_lean_import_that_fails_falls_back_to_the_plain_import() -> None:
    """A tpm2-pytss whose layout the lean import does not know (a newer release) must
    still import: the boot check, and with it inference, depends on it."""
    assert _names(BROKEN) == _names(FULL)


#: A private key through ``TPMT_SENSITIVE``: ``to_pem``/``to_der`` use the default format
#: argument of ``_serialize`` (read from the stand-in while the lean import loads ``types``).
SENSITIVE = """
import json, sys
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import serialization as s
t = LOAD
key = ec.derive_private_key(7, ec.SECP256R1())
pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.TraditionalOpenSSL, s.NoEncryption())
sens, pub = t.types.TPMT_SENSITIVE.from_pem(pem), t.types.TPMT_PUBLIC.from_pem(pem)
assert sens.to_pem(pub) == pem
print(json.dumps([sens.to_pem(pub).hex(), sens.to_der(pub).hex(), sens.to_ssh(pub)[:36].hex(),
                  repr(t.types.TPMT_SENSITIVE._serialize.__defaults__)]))
"""


def test_i15_lean_import_gives_the_real_private_format_default() -> None:
    """Imported first (cryptography not yet loaded, as at boot): the same keys and the
    same default (cryptography's own member, not a stand-in's) as the plain import."""
    lean = SENSITIVE.replace("from cryptography.hazmat.primitives.asymmetric import ec\n"
                             "from cryptography.hazmat.primitives import serialization as s\n"
                             "t = LOAD", "from modelward.trust._tpmimport import "
                             "import_tpm2_pytss\nt = import_tpm2_pytss()\n"
                             "from cryptography.hazmat.primitives.asymmetric import ec\n"
                             "from cryptography.hazmat.primitives import serialization as s")
    full = SENSITIVE.replace("t = LOAD", "import tpm2_pytss as t")
    out = []
    for code in (lean, full):
        r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        out.append(r.stdout)
    assert out[0] == out[1]
    assert "PrivateFormat.TraditionalOpenSSL" in out[0]
