"""Attack a10boot: trust/_tpmimport.py puts a stand-in for cryptography's ``serialization``
in ``sys.modules`` while ``tpm2_pytss.types`` loads, whose ``PrivateFormat`` is now a
placeholder enum (its members are pending names, not cryptography's). A thread that imports
``serialization`` in that window (the import system hands out whatever ``sys.modules``
holds: the stand-in has no spec to wait on) binds the placeholder for good: its first
``private_bytes(..., PrivateFormat.PKCS8, ...)`` fails. Before this change the stand-in
held the real enum, so such a thread got a working one.

The window is held open deterministically by a loader that pauses the first thread before
``tpm2_pytss.types`` runs (the stand-in is in place then), while a second thread imports as
the publisher's key code does (publisher/_keyfile.py: ``serialization.PrivateFormat.PKCS8``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import sys, threading
    from modelward.trust._tpmimport import import_tpm2_pytss

    in_window, done = threading.Event(), threading.Event()

    class Paused:  # (the real loader; its module runs once the other thread has imported)
        def __init__(self, real):
            self.real = real

        def create_module(self, spec):
            return self.real.create_module(spec)

        def exec_module(self, module):
            in_window.set()
            done.wait(30)
            self.real.exec_module(module)

    class Pause:  # (outside the global import lock: in the module's own execution)
        def find_spec(self, name, path=None, target=None):
            if name != "tpm2_pytss.types" or in_window.is_set():
                return None
            import importlib.machinery
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            spec.loader = Paused(spec.loader)
            return spec

    sys.meta_path.insert(0, Pause())
    seen = {}

    def other():
        in_window.wait(30)
        from cryptography.hazmat.primitives.serialization import (
            Encoding, NoEncryption, PrivateFormat)
        seen.update(PrivateFormat=PrivateFormat, Encoding=Encoding, No=NoEncryption)
        done.set()

    t = threading.Thread(target=other)
    t.start()
    import_tpm2_pytss()
    t.join()
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives import serialization
    key = ec.generate_private_key(ec.SECP256R1())
    print("real enum:", seen["PrivateFormat"] is serialization.PrivateFormat)
    pem = key.private_bytes(seen["Encoding"].PEM, seen["PrivateFormat"].PKCS8, seen["No"]())
    print("pkcs8:", pem.splitlines()[0].decode())
""")


def test_a10_concurrent_serialization_import_gets_the_real_private_format() -> None:
    r = subprocess.run([sys.executable, "-I", "-c", _SCRIPT], capture_output=True, text=True,
                       timeout=120, check=False,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr
    assert "real enum: True" in r.stdout, r.stdout
    assert "pkcs8: -----BEGIN PRIVATE KEY-----" in r.stdout, r.stdout
