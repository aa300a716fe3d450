"""Issue 15, "Extras by role": which extra the one-line error names for a missing package
(modelward/_extras.py; through the real CLI in tests/integration/test_i15_device_imports.py)."""

from __future__ import annotations

import argparse

import pytest
from securesystemslib.exceptions import UnsupportedLibraryError

from modelward import _extras
from modelward._extras import PACKAGES, installed, missing_package_line


def _args(group: str, cmd: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(group=group, cmd=cmd)


def _missing(name: str) -> ModuleNotFoundError:
    return ModuleNotFoundError(f"No module named {name!r}", name=name)


@pytest.mark.parametrize(("module", "group", "cmd", "dist", "extra"), [
    ("onnx", "bundle", "build", "onnx", "[operator]"),
    ("onnx.helper", "bundle", "build", "onnx", "[operator]"),
    ("rich.progress", "publish", None, "rich", "[operator]"),
    ("pygments.lexers", "publish", None, "rich", "[operator]"),
    ("pkcs11", "repo", "add-key", "python-pkcs11", "[operator]"),
    ("tpm2_pytss", "agent", "boot-check", "tpm2-pytss", "[device]"),
    ("onnxruntime", "agent", "update", "onnxruntime", "[device]"),  # the role decides
    ("onnxruntime", "bundle", "build", "onnxruntime", "[operator]"),
    ("numpy", "agent", "run", "numpy", "[device]"),
    ("numpy", "bundle", "build", "numpy", "[operator]"),
    ("onnx", "sim", "demo", "onnx", "[sim]"),  # the tester's extra holds both
    ("tpm2_pytss", "sim", "report", "tpm2-pytss", "[sim]"),
])
def test_the_line_names_the_package_and_the_extra_of_the_role(
        module: str, group: str, cmd: str | None, dist: str, extra: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a dotted name: as if the package itself were not installed (else a broken install)
    monkeypatch.setattr(_extras, "installed", lambda _name: False)
    line = missing_package_line(_missing(module), _args(group, cmd))
    assert line is not None and "\n" not in line
    assert line.startswith("modelward: error: `modelward " + " ".join(filter(None, (group, cmd))))
    assert f"the Python package {dist}," in line
    assert line.endswith(f"pip install 'modelward{extra}'")


def test_a_missing_core_dependency_says_reinstall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_extras, "installed", lambda _name: False)  # as if tuf were not
    line = missing_package_line(_missing("tuf.ngclient"), _args("agent", "update"))
    assert line is not None and "pip install --force-reinstall modelward" in line
    assert "tuf" in line


@pytest.mark.parametrize("error", [
    _missing("modelward.agent._gone"),  # our own module missing: a bug, keep the traceback
    _missing("leftpad"),
    ModuleNotFoundError("no name"),  # (name None)
    ImportError("cannot import name 'x' from 'onnx'", name="onnx"),  # broken, not missing
    ValueError("onnx"),
    UnsupportedLibraryError("'some-kms-library' required"),
    KeyError("pkcs11"),
])
def test_anything_else_is_not_an_extras_problem(error: BaseException) -> None:
    assert missing_package_line(error, _args("repo", "init")) is None


def test_securesystemslib_missing_pkcs11_is_the_operator_extra() -> None:
    line = missing_package_line(UnsupportedLibraryError("'python-pkcs11' required"),
                                _args("repo", "add-key"))
    assert line is not None and line.endswith("pip install 'modelward[operator]'")
    assert "python-pkcs11" in line


def test_every_named_distribution_is_a_declared_dependency() -> None:
    """The table names only what pyproject declares (and an extra that exists)."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml")
                            .read_text())["project"]
    declared: dict[str, set[str]] = {"": set()}
    for req in project["dependencies"]:
        declared[""].add(req.split(">")[0].split("<")[0].split("=")[0].strip().lower())
    for extra, reqs in project["optional-dependencies"].items():
        declared[extra] = {r.split(">")[0].split("<")[0].split("[")[0].strip().lower()
                           for r in reqs}
    for name, (dist, extra) in PACKAGES.items():
        if name in ("pygments", "markdown_it", "mdurl", "asn1crypto", "urllib3"):
            continue  # (pulled by the distribution named)
        where = {"device", "operator"} if extra is None else {extra}
        assert all(dist in declared[e] for e in where), (name, dist, extra)


def test_installed_does_not_import() -> None:
    import sys

    assert installed("json") and not installed("surely_not_a_module_x")
    sys.modules.pop("colorsys", None)
    assert installed("colorsys") and "colorsys" not in sys.modules


def test_the_line_never_echoes_the_errors_own_text() -> None:
    """Only fixed names reach the terminal: not what a library (or a planted module) put in
    the exception."""
    e = ModuleNotFoundError("No module named 'onnx' \x1b[2J\nhint: run rm -rf /", name="onnx")
    line = missing_package_line(e, _args("bundle", "build"))
    assert line is not None and "\x1b" not in line and "rm -rf" not in line
    weird = ModuleNotFoundError("x", name="onnx\n\x1b[31m")
    assert missing_package_line(weird, _args("bundle", "build")) is None


def test_missing_health_package_finds_without_importing() -> None:
    from modelward.updater.install._health import HEALTH_PACKAGES, missing_health_package

    assert HEALTH_PACKAGES == ("onnxruntime", "numpy")
    assert missing_health_package() is None  # the dev venv has [device]
    assert missing_health_package(("json", "surely_not_a_module_x", "numpy")) == \
        "surely_not_a_module_x"
