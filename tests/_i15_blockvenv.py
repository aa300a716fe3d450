"""A throwaway venv on top of the dev venv in which some packages cannot be imported.

``block_venv(dir, blocked)`` makes ``dir/bin/python``: a venv (no pip, ~0.1 s) whose
site-packages holds a ``.pth`` that first installs a meta-path hook refusing ``blocked``
(as if those distributions were not installed: ``ModuleNotFoundError`` with ``name`` set), then
adds the dev venv's site-packages (with its editable modelward). Every child modelward starts
(``sys.executable -I -m ...``: ``-I`` still runs ``site``) has the same hook, also the
sandboxed health check. ``MW_BLOCK`` (comma-separated, not a ``PYTHON*`` variable, so ``-I``
keeps it) replaces the list for one run.

When code of modelward itself (not a third-party library probing an optional dependency,
as securesystemslib does for pkcs11) asks for a blocked module, the hook also leaves a file
``<name>`` in ``MW_BLOCK_MARKERS`` (if set and writable), so a caller that swallows the
``ImportError`` is caught too.
"""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

_HOOK = '''\
import os, sys, site

_BLOCK = tuple(b for b in os.environ.get("MW_BLOCK", {default!r}).split(",") if b)
_ALLOW = frozenset({allow!r})


class _Absent:
    """Refuse the blocked distributions' modules, as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name in _ALLOW or not any(name == b or name.startswith(b + ".") for b in _BLOCK):
            return None
        f = sys._getframe(1)
        while f is not None and f.f_code.co_filename.startswith("<frozen"):
            f = f.f_back
        where = f.f_code.co_filename if f is not None else "?"
        markers = os.environ.get("MW_BLOCK_MARKERS")
        if markers and "/modelward/" in where.replace(os.sep, "/"):
            try:
                with open(os.path.join(markers, name), "a") as out:
                    out.write(where + "\\n")
            except OSError:
                pass  # (the sandboxed health check may not write: its failure shows it)
        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)


sys.meta_path.insert(0, _Absent())
site.addsitedir({dev_site!r})
'''


def block_venv(where: Path, blocked: tuple[str, ...],
               allow: tuple[str, ...] = ()) -> Path:
    """The python of a new venv in ``where`` where ``blocked`` (and their submodules, but
    ``allow``) cannot be imported."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True,
                   timeout=60)
    (dev_site,) = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    (new_site,) = where.glob("lib/python*/site-packages")
    (new_site / "_mw_absent.py").write_text(_HOOK.format(
        default=",".join(blocked), allow=sorted(allow), dev_site=dev_site))
    (new_site / "_mw_absent.pth").write_text("import _mw_absent\n")
    return where / "bin" / "python"
