"""Installed size by role (issue 15, "Extras by role"): ``modelward[device]`` against
everything (``[dev]``: device, operator, simulator and test tools).

Offline: the project's wheel is built from a clean copy of the tree, and each role is
installed into a fresh venv from ``.venv/wheelhouse`` (``scripts/setup`` fills it) with
``pip install --no-index --find-links``. The size is what the install put in the venv's
site-packages (bytes of every file, ``.pyc`` included, as ``du --apparent-size -sb``);
the venv's own Python is a symlink and not counted.

    .venv/bin/python benchmarks/install_size.py [--extras device,operator,dev] [--keep DIR]

About 1.5 minutes on the project machine (mostly pip copying onnxruntime and numpy 3 times).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / ".venv" / "wheelhouse"
SKIP = (".venv", ".git", "build", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache",
        ".pytest_cache", "demo-run", "fleet-report")
ABSENT_ON_DEVICE = ("onnx", "rich", "pygments", "pkcs11", "pytest", "mypy", "hypothesis")


def build_wheel(work: Path) -> Path:
    src = work / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(*SKIP))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(work), str(src)],
                   check=True)
    (wheel,) = work.glob("modelward-*.whl")
    return wheel


def tree_bytes(root: Path) -> int:
    total = 0
    for top, _dirs, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(top, f))
            total += st.st_size
    return total


def install(venv: Path, wheel: Path, extra: str) -> Path:
    """A fresh venv holding ``modelward[extra]``; returns its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-index", "--find-links", str(WHEELHOUSE),
                    "--find-links", str(wheel.parent), f"{wheel}[{extra}]"], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    return site


def top_dirs(site: Path, n: int) -> list[tuple[str, int]]:
    sizes = [(p.name, tree_bytes(p) if p.is_dir() else p.stat().st_size)
             for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth"))]
    return sorted(sizes, key=lambda t: -t[1])[:n]


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extras", default="device,operator,dev",
                    help="comma-separated (default: %(default)s)")
    ap.add_argument("--keep", type=Path, help="build the venvs here and keep them")
    args = ap.parse_args()
    if not WHEELHOUSE.is_dir():
        print(f"no wheelhouse at {WHEELHOUSE}: run scripts/setup", file=sys.stderr)
        return 1
    work = args.keep or Path(tempfile.mkdtemp(prefix="modelward-size-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        wheel = build_wheel(work)
        sizes: dict[str, int] = {}
        for extra in args.extras.split(","):
            site = install(work / f"venv-{extra}", wheel, extra)
            sizes[extra] = tree_bytes(site)
            names = {p.name for p in site.iterdir()}
            present = [m for m in ABSENT_ON_DEVICE if m in names]
            largest = ", ".join(f"{name} {mib(b)}" for name, b in top_dirs(site, 5))
            venv_total = tree_bytes(work / f"venv-{extra}")
            print(f"modelward[{extra}]: {mib(sizes[extra])} in site-packages "
                  f"({mib(venv_total)} the whole venv, scripts included; largest: {largest})")
            if extra == "device":
                print(f"  operator/tester packages present: {', '.join(present) or 'none'}")
        if "device" in sizes and "dev" in sizes:
            print(f"device / everything: {sizes['device'] / sizes['dev']:.2f} "
                  f"({mib(sizes['device'])} of {mib(sizes['dev'])}; "
                  f"{mib(sizes['dev'] - sizes['device'])} a device does not install)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
