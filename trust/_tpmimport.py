"""Import tpm2-pytss without paying for what booting never calls.

``import tpm2_pytss`` costs about 95 ms of a process's start, half of it in
``tpm2_pytss.internal.crypto``: that module imports most of ``cryptography`` (x509, key
serialization, KDFs, ciphers) for tpm2-pytss's software-side helpers (names of keys
computed off the TPM, PEM conversion, parameter encryption). ``tpm2_pytss.types`` imports
nine of its functions by name when it loads, and calls them only when asked to do such work.
The boot check never does (it reads two NV indices and asks the TPM for one HMAC), and the
inference service waits for the boot check on every boot (issue 15: ``boot-check`` within
60 ms of ``python3 -c pass``).

So before tpm2-pytss is first imported, :func:`import_tpm2_pytss` puts a stand-in for that
one module in ``sys.modules``: every name imported from it is a forwarder that imports the
real module on its first call and calls through. Behaviour is unchanged (the same functions
run, with the same arguments and errors); only the time the module loads moves. If
tpm2-pytss was imported already, nothing is done.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

_CRYPTO = "tpm2_pytss.internal.crypto"
_lock = threading.Lock()


class _Deferred(types.ModuleType):
    """Stands in for ``tpm2_pytss.internal.crypto`` until one of its functions is called."""

    def __init__(self) -> None:
        super().__init__(_CRYPTO, "(loaded on first use: modelward.trust._tpmimport)")
        self._real: types.ModuleType | None = None

    def _load(self) -> types.ModuleType:
        with _lock:
            if self._real is None:
                if sys.modules.get(_CRYPTO) is self:
                    del sys.modules[_CRYPTO]
                self._real = importlib.import_module(_CRYPTO)
            return self._real

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_real":
            raise AttributeError(name)
        if self._real is not None:
            return getattr(self._real, name)

        def forward(*args: Any, **kwargs: Any) -> Any:
            target: Callable[..., Any] = getattr(self._load(), name)
            return target(*args, **kwargs)

        forward.__name__ = forward.__qualname__ = name
        return forward


def import_tpm2_pytss() -> types.ModuleType:
    """``tpm2_pytss``, imported with its crypto helpers loaded on first use (see module)."""
    if "tpm2_pytss" not in sys.modules and _CRYPTO not in sys.modules:
        sys.modules[_CRYPTO] = _Deferred()
    import tpm2_pytss

    return sys.modules[tpm2_pytss.__name__]
