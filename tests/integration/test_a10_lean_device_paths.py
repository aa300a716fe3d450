"""Attack a10boot (resisted): the device's own uses of tpm2-pytss's serialization after the
lean import (cryptography not loaded before the TPM, as in a fresh ``python -I -m
modelward`` process): ``agent enroll`` exports the identity key's PEM through swtpm, and it
is the key the TPM holds (the same PEM as the plain import's, read in this process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from modelward.trust._tpm import Tpm
from tests.conftest import World


def test_a10_enroll_pem_in_a_fresh_process_is_the_tpms_key(world: World) -> None:
    code = ("import sys\nfrom modelward.cli import main\n"
            "assert 'cryptography.hazmat.primitives.serialization' not in sys.modules\n"
            "sys.argv = ['modelward', 'agent', 'enroll', '--json', '--config', sys.argv[1]]\n"
            "raise SystemExit(main())\n")
    r = subprocess.run([sys.executable, "-I", "-c", code, str(world.conf_path)],
                       capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "TSS2_LOG": "all+NONE"})
    assert r.returncode == 0, r.stderr
    pem = json.loads(r.stdout)["public_key"].encode()
    assert isinstance(load_pem_public_key(pem), ec.EllipticCurvePublicKey)
    tpm = Tpm(world.tpm.tcti)
    try:
        assert tpm.identity_public_pem() == pem
    finally:
        tpm.close()
