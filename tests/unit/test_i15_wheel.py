"""Issue 15, "One import namespace" (must show 1): the built wheel installs ``modelward`` and
nothing else as a top-level name, every module of the five source folders once under
``modelward/<pkg>/``, the files the code opens by path, and the one entry point. And no
module of the tree imports a bare ``agent``/``updater``/``trust``/``publisher``/``simulator``
any more (statements, ``python -c`` code strings, ``-m`` arguments, shell scripts, units).

The wheel is built offline from the worktree (no build isolation: setuptools is in the dev
venv), the way scripts/build-deb and benchmarks/install_size.py build it.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "updater", "trust", "publisher", "simulator")
BARE = frozenset(PACKAGES)
SKIP_DIRS = {".venv", "build", ".git", "__pycache__", ".mypy_cache", ".ruff_cache",
             ".pytest_cache", "demo-run", "fleet-report"}


def build_wheel(out: Path) -> Path:
    """The project's wheel, built offline into ``out`` from a clean copy of the tree (a
    worktree's stale ``build/lib`` would otherwise end up in it: setuptools reuses it)."""
    src = out / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(*SKIP_DIRS,
                                                                              "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = out.glob("modelward-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    with zipfile.ZipFile(build_wheel(tmp_path_factory.mktemp("wheel"))) as z:
        yield z


def _dist_info(z: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in z.namelist() if re.fullmatch(rf"modelward-[^/]+\.dist-info/{name}", n)]
    return z.read(path).decode()


def source_modules() -> set[str]:
    """``modelward/<pkg>/<file>.py`` for every module of the source tree's packages."""
    out = {f"modelward/{p.relative_to(ROOT).as_posix()}"
           for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
           if "__pycache__" not in p.parts}
    return out | {f"modelward/{p.name}" for p in (ROOT / "modelward").glob("*.py")}


def test_top_level_names_are_modelward_alone(wheel: zipfile.ZipFile) -> None:
    tops = {n.split("/")[0] for n in wheel.namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"modelward"}
    assert len(dist_info) == 1 and dist_info.pop().startswith("modelward-")
    assert _dist_info(wheel, "top_level.txt").split() == ["modelward"]


def test_every_module_once_under_modelward_no_links_no_tests(wheel: zipfile.ZipFile) -> None:
    names = [i.filename for i in wheel.infolist() if not i.filename.endswith("/")]
    dupes = [n for n, c in Counter(names).items() if c > 1]
    assert not dupes
    links = [i.filename for i in wheel.infolist() if stat.S_ISLNK(i.external_attr >> 16)]
    assert not links, links
    files = {n for n in names if not n.startswith("modelward-")}
    # exactly the tree's modules: none missing, no stale build/ leftover, no second copy
    # through the modelward/<pkg> symlinks (say modelward/agent/agent/...), nothing else
    assert files == source_modules()
    for n in files:
        parts = n.split("/")
        assert parts.count("modelward") == 1 and not BARE & set(parts[2:-1]), n
        assert not {"tests", "benchmarks", "fuzz", "scripts", "examples"} & set(parts), n


def test_files_opened_by_path_are_shipped(wheel: zipfile.ZipFile) -> None:
    """``Path(__file__).with_name("x")`` / ``Path(__file__).parent / "x"``: x is next to it."""
    names = set(wheel.namelist())
    found = []
    for mod in sorted(source_modules()):
        src = (ROOT / mod.removeprefix("modelward/")).read_text() if mod.count("/") > 1 \
            else (ROOT / mod).read_text()
        for line in src.splitlines():
            if "__file__" not in line:
                continue
            for m in re.finditer(r'with_name\(\s*"([^"]+)"\s*\)|parent\s*/\s*"([^"]+)"', line):
                rel = m.group(1) or m.group(2)
                target = f"{mod.rsplit('/', 1)[0]}/{rel}"
                found.append(target)
                assert target in names, f"{mod} opens {rel} by path; not in the wheel"
    assert "modelward/updater/_sandbox_launch.py" in found  # the launcher runs as a script


def test_entry_point_and_extras(wheel: zipfile.ZipFile) -> None:
    eps = _dist_info(wheel, "entry_points.txt")
    assert re.findall(r"(?m)^(\S+)\s*=\s*(\S+)$", eps) == [("modelward", "modelward.cli:main")]
    meta = _dist_info(wheel, "METADATA")
    extras = set(re.findall(r"(?m)^Provides-Extra: (\S+)$", meta))
    assert {"device", "operator", "sim", "dev"} <= extras
    requires: dict[str, set[str]] = {}
    for line in re.findall(r"(?m)^Requires-Dist: (.+)$", meta):
        m = re.match(r"([A-Za-z0-9_.\-]+)[^;]*(?:;\s*extra\s*==\s*\"([^\"]+)\")?", line)
        assert m
        requires.setdefault(m.group(2) or "", set()).add(m.group(1).lower())
    operator_only = {"onnx", "rich", "python-pkcs11", "pytest", "hypothesis", "mypy", "ruff"}
    # a device pulls the core and [device]: none of the operator's or tester's packages
    assert not (requires[""] | requires["device"]) & operator_only
    assert {"tpm2-pytss", "onnxruntime"} <= requires["device"]
    assert {"onnx", "rich", "python-pkcs11"} <= requires["operator"]


# --- no bare top-level imports left ---------------------------------------------------------

_CODE_IMPORT = re.compile(
    rf"(?m)^\s*(?:from\s+({'|'.join(PACKAGES)})(?:\.|\s+import\b)|import\s+({'|'.join(PACKAGES)})\b)")
_SHELL_M = re.compile(rf"-m\s+({'|'.join(PACKAGES)})(?:\.|\s|$)")


def tree_files(suffixes: tuple[str, ...], scripts: bool = False) -> list[Path]:
    out = []
    for top, dirs, files in os.walk(ROOT):
        here = Path(top)
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")
                   and not (here == ROOT / "modelward" and d in BARE)]
        # (modelward/<pkg> are the symlinks to the same folders)
        for f in files:
            p = here / f
            script = scripts and not p.suffix and "scripts" in p.relative_to(ROOT).parts
            if p.suffix in suffixes or script:
                out.append(p)
    return out


def code_strings(tree: ast.Module, shipped: bool) -> set[int]:
    """The string constants that are code run by a child: in shipped code any string but
    docstrings; in tests (whose strings are also fixtures, such as a checker's own examples)
    the one after ``-c`` in an argument list and module-level constants (``_WRAPPER = ...``,
    passed as ``-c`` by name)."""
    docs = {id(n.value) for n in ast.walk(tree)  # docstrings and other bare strings: prose
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    if shipped:
        return {id(n) for n in ast.walk(tree) if isinstance(n, ast.Constant)} - docs
    out = {id(n.value) for n in tree.body if isinstance(n, ast.Assign | ast.AnnAssign)
           and isinstance(n.value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.List | ast.Tuple):
            out |= {id(b) for a, b in zip(n.elts, n.elts[1:], strict=False)
                    if isinstance(a, ast.Constant) and a.value == "-c"}
    return out


def bare_imports(source: str, where: str, shipped: bool = True) -> list[str]:
    """Bare imports in a module: statements, code strings (``python -c``), ``-m X`` args."""
    tree = ast.parse(source, where)
    code = code_strings(tree, shipped)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [f"{where}:{node.lineno}: import {a.name}" for a in node.names
                    if a.name.partition(".")[0] in BARE]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.partition(".")[0] in BARE:
                bad.append(f"{where}:{node.lineno}: from {node.module}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) in code:
            if _CODE_IMPORT.search(node.value) or _SHELL_M.search(node.value):
                bad.append(f"{where}:{node.lineno}: code string {node.value[:60]!r}")
        elif isinstance(node, ast.List | ast.Tuple):
            for a, b in zip(node.elts, node.elts[1:], strict=False):
                if (isinstance(a, ast.Constant) and a.value == "-m" and isinstance(b, ast.Constant)
                        and isinstance(b.value, str) and b.value.partition(".")[0] in BARE):
                    bad.append(f"{where}:{node.lineno}: -m {b.value}")
    return bad


def test_bare_import_detector_finds_each_form() -> None:
    src = ('import agent\nfrom updater._x import y\nimport trust.errors\n'
           'C = "import sys\\nfrom publisher import z"\nA = ["python", "-m", "simulator._demo"]\n'
           'S = "python3 -I -m agent._child cfg"\nfrom modelward.agent import ok\n'
           'T = "the agent imports nothing"\n')
    assert len(bare_imports(src, "x.py")) == 6
    # in a test, a fixture string is not code; a `-c` argument and a module constant are
    test = ('import subprocess\nW = "import agent._x"\n'
            'subprocess.run(["python", "-c", "from trust import y"])\n'
            'open("f.py", "w").write("import updater")\n')
    found = bare_imports(test, "t.py", shipped=False)
    assert len(found) == 2 and "agent._x" in found[0] and "from trust" in found[1], found


def test_no_module_imports_a_bare_top_level_package() -> None:
    bad = []
    for p in tree_files((".py",)):
        if p == Path(__file__).resolve():
            continue  # (the detector's own examples above)
        rel = p.relative_to(ROOT)
        bad += bare_imports(p.read_text(), str(rel), shipped=rel.parts[0] != "tests")
    assert not bad, "\n".join(bad)


def test_no_script_or_unit_runs_a_bare_module() -> None:
    bad = []
    for p in tree_files((".sh", ".service", ".timer", ".path", ".conf", ".toml", ".md"), True):
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if _SHELL_M.search(line) or (p.suffix != ".md" and _CODE_IMPORT.search(line)):
                bad.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def unisolated_children(source: str, where: str) -> list[str]:
    """``[sys.executable, ...]`` argument lists that do not start the child with ``-I``."""
    bad = []
    for node in ast.walk(ast.parse(source, where)):
        if not isinstance(node, ast.List | ast.Tuple) or not node.elts:
            continue
        first = node.elts[0]
        if not (isinstance(first, ast.Attribute) and first.attr == "executable"
                and isinstance(first.value, ast.Name) and first.value.id == "sys"):
            continue
        flags = []
        for e in node.elts[1:]:
            if not (isinstance(e, ast.Constant) and isinstance(e.value, str)
                    and e.value.startswith("-") and e.value != "-m"):
                break
            flags.append(e.value)
        if "-I" not in flags:
            bad.append(f"{where}:{node.lineno}: a Python child without -I")
    return bad


def test_every_python_child_of_the_shipped_code_starts_isolated() -> None:
    """Not only the agent's two children: the simulator's agents, bridges and boot checks
    too (``python -m modelward`` from a directory holding ``modelward/`` ran that)."""
    assert len(unisolated_children(
        "import sys\nA = [sys.executable, '-m', 'x']\nB = [sys.executable, '-I', '-m', 'x']\n"
        "C = (sys.executable, '-S', 'f.py')\n", "x.py")) == 2
    bad = []
    for pkg in (*PACKAGES, "modelward"):
        for p in sorted((ROOT / pkg).glob("*.py")):
            bad += unisolated_children(p.read_text(), f"{pkg}/{p.name}")
    assert not bad, "\n".join(bad)


def test_installed_wheel_holds_modelward_alone_and_its_command_runs(
        wheel: zipfile.ZipFile, tmp_path: Path) -> None:
    """Installed (no dependencies: the namespace is the question) into an empty venv:
    site-packages gains ``modelward`` and its dist-info, nothing else, no symlink; the
    console script and the by-path launcher work from there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=60)
    (site,) = venv.glob("lib/python*/site-packages")
    assert not list(site.iterdir())
    assert wheel.filename is not None
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-deps", "--no-index", wheel.filename],
                   check=True, capture_output=True, timeout=120)
    names = sorted(p.name for p in site.iterdir())
    assert names[0] == "modelward" and len(names) == 2
    assert re.fullmatch(r"modelward-[^/]+\.dist-info", names[1])
    assert not [p for p in (site / "modelward").rglob("*") if p.is_symlink()]
    r = subprocess.run([str(venv / "bin" / "modelward"), "agent", "--help"], cwd="/",
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and "boot-check" in r.stdout, r.stderr
    r = subprocess.run([str(venv / "bin" / "python"), "-I", "-c",
                        "from modelward.updater._sandbox import LAUNCHER; print(LAUNCHER)"],
                       cwd="/", capture_output=True, text=True, timeout=60, check=True)
    launcher = Path(r.stdout.strip())
    assert launcher.is_file() and launcher.is_relative_to(site)
