"""Issue 15: ``agent boot-check`` is parsed by a parser of that one command (building
every command's parser imports operator and tester modules); it must parse exactly as
the full parser does."""

from __future__ import annotations

import argparse
import contextlib
import io

import pytest

from modelward.cli import _parser_for, build_parser

BOOT_ARGVS = [
    ["agent", "boot-check", "--config", "/etc/modelward/agent.toml"],
    ["-vv", "agent", "boot-check", "--config", "a.toml", "--tpm-wait", "3"],
    ["agent", "boot-check", "--tpm-wait=0.5", "--config=a.toml"],
    ["--verbose", "agent", "boot-check", "--config", "agent"],
    ["--log-format", "json", "agent", "boot-check", "--config", "a.toml"],
    ["--log-format=human", "--debug", "-v", "agent", "boot-check"],
]


def _parse(p: argparse.ArgumentParser, argv: list[str]) -> tuple[int, str, str, dict[str, object]]:
    out, err = io.StringIO(), io.StringIO()
    code, ns = 0, {}
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ns = vars(p.parse_args(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue(), ns


@pytest.mark.parametrize("argv", BOOT_ARGVS)
def test_boot_check_parses_as_with_the_full_parser(argv: list[str]) -> None:
    """Same namespace (a global option added only to the full parser would differ here)."""
    fast = _parser_for(argv)
    assert len(fast._subparsers._group_actions[0].choices) == 1  # type: ignore[union-attr]  # noqa: SLF001
    assert _parse(fast, argv) == _parse(build_parser(), argv)


@pytest.mark.parametrize("argv", [
    ["agent", "boot-check"],  # (--config: the default path)
    ["agent", "boot-check", "--config", "a", "--tpm-wait", "soon"],
    ["agent", "boot-check", "--tpm-wait", "-1"],
    ["--log-format", "xml", "agent", "boot-check"],
    ["agent", "boot-check", "--config", "a", "--unknown"],
    ["agent", "boot-check", "--help"],
    ["--version", "agent", "boot-check"],
])
def test_boot_check_errors_and_help_are_the_same(argv: list[str]) -> None:
    assert _parse(_parser_for(argv), argv) == _parse(build_parser(), argv)


@pytest.mark.parametrize("argv", [
    ["agent", "status", "--config", "a"],
    ["agent", "--help"],
    ["sim", "attack", "tamper-model", "--dir", "x"],
    ["agent", "update", "--config", "boot-check"],
    ["--log-format", "agent", "boot-check"],  # ("agent" is the format's value)
    [],
])
def test_every_other_command_gets_the_full_parser(argv: list[str]) -> None:
    p = _parser_for(argv)
    assert {"repo", "agent", "sim"} <= set(
        p._subparsers._group_actions[0].choices)  # type: ignore[union-attr]  # noqa: SLF001
