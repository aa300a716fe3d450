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

Two more loads are moved the same way (together a third of what the import costs, in
instructions under callgrind: 336 -> 251 M for the process):

- ``tpm2_pytss.types`` imports ``cryptography.hazmat.primitives.serialization`` (with its
  SSH key code) for ``to_pem``/``to_der``/``to_ssh``; while it loads, a stand-in holds the
  two enums it reads when its classes are defined (the real ``PrivateFormat`` and
  ``Encoding``) and forwards every other name to the real module, imported on first use.
  The stand-in is out of ``sys.modules`` once tpm2-pytss is loaded: any later import of
  ``serialization`` gets the real module. (Those enums are cryptography's real ones, which
  loads its Rust bindings: 3 ms of CPU and 6 MiB of peak RSS at boot. A placeholder enum
  resolved later saved that but was removed (attack a10boot): a thread importing
  ``serialization`` while ``types`` loads, or a tpm2-pytss reading the enum other than as
  one method's default, kept the placeholder for good, and ``private_bytes`` failed.)
- The package's ``__init__`` imports the FAPI bindings (``tpm2_pytss.FAPI``: tempfile,
  shutil, json), which modelward never uses; the package is set up from its spec without
  running ``__init__``, and its namespace filled with what ``__init__`` would put there
  but FAPI's names (``tpm2_pytss.FAPI`` itself still imports as a submodule).
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

_CRYPTO = "tpm2_pytss.internal.crypto"
_SERIALIZATION = "cryptography.hazmat.primitives.serialization"
#: What the package's ``__init__`` star-imports, in its order, but ``.FAPI`` (and
#: ``.policy``, which this build of tss2 lacks: it raises NotImplementedError).
_EXPORTS = ("TCTILdr", "TCTI", "types", "constants")
_lock = threading.Lock()
logger = logging.getLogger(__name__)


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


class _DeferredSerialization(types.ModuleType):
    """Stands in for ``cryptography.hazmat.primitives.serialization`` while
    ``tpm2_pytss.types`` loads, and stays its ``serialization`` (see module)."""

    def __init__(self) -> None:
        super().__init__(_SERIALIZATION, "(loaded on first use: modelward.trust._tpmimport)")
        from cryptography.hazmat.primitives import _serialization

        self.PrivateFormat = _serialization.PrivateFormat  # (read by a default argument)
        self.Encoding = _serialization.Encoding

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        with _lock:
            if sys.modules.get(_SERIALIZATION) is self:
                del sys.modules[_SERIALIZATION]
        return getattr(importlib.import_module(_SERIALIZATION), name)


def _public(module: types.ModuleType) -> dict[str, Any]:
    """What ``from module import *`` binds (none of these modules has ``__all__``)."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return {n: getattr(module, n) for n in names}


def _import_without_init() -> types.ModuleType | None:
    """The package set up from its spec, its submodules imported, its namespace as its
    ``__init__`` would make it but FAPI's; None if it cannot be found (then the plain
    import gives the usual error)."""
    import importlib.util

    spec = importlib.util.find_spec("tpm2_pytss")
    if spec is None or spec.submodule_search_locations is None:
        return None
    pkg = importlib.util.module_from_spec(spec)
    stand_in = _DeferredSerialization() if _SERIALIZATION not in sys.modules else None
    sys.modules["tpm2_pytss"] = pkg
    if stand_in is not None:
        sys.modules[_SERIALIZATION] = stand_in
    try:
        import _cffi_backend  # type: ignore[import-untyped]  # noqa: F401 - (as __init__ does)

        # (import statements, not importlib.import_module: -X importtime lists these)
        from tpm2_pytss import TCTI, TCTILdr, constants
        from tpm2_pytss import types as types_
        from tpm2_pytss._libtpm2_pytss import lib
        from tpm2_pytss.ESAPI import ESAPI as esapi
        from tpm2_pytss.TSS2_Exception import TSS2_Exception as exc

        loaded = dict(zip(_EXPORTS, (TCTILdr, TCTI, types_, constants), strict=True))
    except BaseException:
        for name in [n for n in sys.modules if n == "tpm2_pytss" or
                     n.startswith("tpm2_pytss.")]:
            del sys.modules[name]
        raise
    finally:
        if stand_in is not None and sys.modules.get(_SERIALIZATION) is stand_in:
            del sys.modules[_SERIALIZATION]
    space = vars(pkg)
    space.update(lib=lib, ESAPI=esapi)
    for name in _EXPORTS:
        space.update(_public(loaded[name]))
    tcti = loaded["TCTI"]
    space.update(TCTI=tcti.TCTI, PyTCTI=tcti.PyTCTI, PollData=tcti.PollData,
                 TSS2_Exception=exc)
    return pkg


def import_tpm2_pytss() -> types.ModuleType:
    """``tpm2_pytss``, imported with its crypto helpers loaded on first use and without
    its FAPI bindings (see module); as it is if it was imported already."""
    with _lock:
        if "tpm2_pytss" in sys.modules:
            return sys.modules["tpm2_pytss"]
        if _CRYPTO not in sys.modules:
            sys.modules[_CRYPTO] = _Deferred()
    try:
        pkg = _import_without_init()
    except (ImportError, AttributeError, TypeError, ValueError, KeyError) as e:
        # (a tpm2-pytss whose layout differs: the plain import)
        _forget_partial()
        logger.debug("tpm2-pytss's lean import failed (%r): plain import", e)
        pkg = None
    if pkg is not None:
        return pkg
    import tpm2_pytss

    return sys.modules[tpm2_pytss.__name__]


def _forget_partial() -> None:
    """Drop every stand-in and half-set-up module of a lean import that failed, so that
    the plain import starts from nothing."""
    with _lock:
        for name in [n for n in sys.modules if n == "tpm2_pytss" or
                     n.startswith("tpm2_pytss.")]:
            del sys.modules[name]
        if isinstance(sys.modules.get(_SERIALIZATION), _DeferredSerialization):
            del sys.modules[_SERIALIZATION]
