"""Which extra a missing third-party package comes with: one line instead of a traceback.

modelward installs by role (pyproject's extras): ``[device]`` on a device, ``[operator]`` on
an operator's machine (repository, bundle building, HSM, progress bars), ``[sim]`` for a
tester. A command that needs a package its machine's extra did not pull ends with one line
naming the package and what to install (:func:`missing_package_line`, used by
``modelward.cli.main``). Standard library only: this runs when an import just failed.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (not imported: a boot check's error path parses no arguments)
    import argparse

# import name -> (distribution, its extra); extra None: the command's role decides (both the
# device and the operator extra pull it), "": a core dependency of every install
PACKAGES: dict[str, tuple[str, str | None]] = {
    "onnx": ("onnx", "operator"),
    "rich": ("rich", "operator"),
    "pygments": ("rich", "operator"),
    "markdown_it": ("rich", "operator"),
    "mdurl": ("rich", "operator"),
    "pkcs11": ("python-pkcs11", "operator"),
    "asn1crypto": ("python-pkcs11", "operator"),
    "tpm2_pytss": ("tpm2-pytss", "device"),
    "onnxruntime": ("onnxruntime", None),
    "numpy": ("numpy", None),
    "prometheus_client": ("prometheus_client", None),
    "tuf": ("tuf", ""),
    "securesystemslib": ("securesystemslib", ""),
    "cryptography": ("cryptography", ""),
    "requests": ("requests", ""),
    "urllib3": ("requests", ""),
    "paho": ("paho-mqtt", ""),
}
# the CLI's command groups by role; every other group is an operator's
ROLE_OF_GROUP = {"agent": "device", "sim": "sim"}


def installed(name: str) -> bool:
    """Whether the top-level module ``name`` can be imported here (not importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def install_hint(distribution: str, extra: str | None, group: str | None) -> str:
    """``pip install 'modelward[ROLE]'`` for a package of ``extra`` needed by ``group``."""
    role = ROLE_OF_GROUP.get(group or "", "operator")
    if role == "sim":  # the tester's extra holds both the device's and the operator's
        extra = "sim"
    elif extra is None:
        extra = role
    if extra == "":
        return f"pip install --force-reinstall modelward (its {distribution} is missing)"
    return f"pip install 'modelward[{extra}]'"


def _missing_name(error: BaseException) -> str | None:
    """The import name of the missing package ``error`` reports, or None."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        top, dot, _sub = error.name.partition(".")
        # a missing submodule of a package that is installed: a broken install or a bug
        # (its traceback matters), not a package to install
        return None if dot and installed(top) else top
    # securesystemslib turns a missing optional library into its own error (HSMSigner:
    # "'python-pkcs11' required"); looked up, not imported: it is loaded if it raised this
    exceptions = sys.modules.get("securesystemslib.exceptions")
    unsupported = getattr(exceptions, "UnsupportedLibraryError", None)
    if isinstance(unsupported, type) and isinstance(error, unsupported):
        text = str(error)
        for name, (dist, _extra) in PACKAGES.items():
            if f"'{dist}'" in text or f"'{name}'" in text:
                return name
    return None


def missing_package(error: BaseException, args: argparse.Namespace) -> tuple[str, str] | None:
    """The message and the hint for ``error`` if it means a third-party package of
    modelward's extras is not installed (``args``: the parsed command line, for the
    command's name and role); None for anything else, which the caller re-raises."""
    name = _missing_name(error)
    if name is None or name not in PACKAGES:
        return None
    dist, extra = PACKAGES[name]
    group = getattr(args, "group", None)
    command = " ".join(str(w) for w in (group, getattr(args, "cmd", None)) if w)
    return (f"`modelward {command}` needs the Python package {dist}, which is not "
            "installed here", install_hint(dist, extra, group))


def missing_package_line(error: BaseException, args: argparse.Namespace) -> str | None:
    """:func:`missing_package` as one line, ``modelward: error: MESSAGE: HINT``."""
    found = missing_package(error, args)
    return None if found is None else f"modelward: error: {found[0]}: {found[1]}"
