"""Issue 15: ``agent boot-check`` is parsed by a parser of that one command (building
every command's parser imports operator and tester modules); it must parse exactly as
the full parser does."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modelward._inputs import mark_commands
from modelward.cli import _boot_unit_args, _parser_for, build_parser

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


# --- the boot unit's command line, read without a parser (cli._boot_unit_args) ---------

PLAIN_ARGVS = [
    ["agent", "boot-check"],
    ["agent", "boot-check", "--config", "/etc/modelward/agent.toml"],
    ["agent", "boot-check", "--config", "a.toml", "--tpm-wait", "3"],
    ["agent", "boot-check", "--tpm-wait", "0", "--config", "a.toml"],
    ["agent", "boot-check", "--tpm-wait", "86400", "--tpm-wait", "0.25"],  # (the last counts)
    ["agent", "boot-check", "--config", "a", "--config", "b b"],
    ["agent", "boot-check", "--tpm-wait", " 1e2 ", "--config", "agent"],
]


@pytest.mark.parametrize("argv", PLAIN_ARGVS)
def test_plain_boot_command_line_reads_as_the_full_parser(argv: list[str]) -> None:
    """What the boot unit runs is read without argparse, to the namespace the full parser
    (with each command's ``command_prog``) gives."""
    plain = _boot_unit_args(argv)
    assert plain is not None
    code, out, err, full = _parse(mark_commands(build_parser()), argv)
    assert (code, out, err) == (0, "", "")
    assert vars(plain) == full


@pytest.mark.parametrize("argv", [
    ["agent", "boot-check", "--help"],
    ["agent", "boot-check", "-h"],
    ["agent", "boot-check", "--config"],  # (a value missing)
    ["agent", "boot-check", "--config", "-x"],  # (argparse: an option, not a value)
    ["agent", "boot-check", "--config", ""],
    ["agent", "boot-check", "--config", "https://a/agent.toml"],  # (a URL: refused there)
    ["agent", "boot-check", "--config=a.toml"],
    ["agent", "boot-check", "--conf", "a.toml"],  # (an abbreviation: the parser's business)
    ["agent", "boot-check", "--tpm-wait", "-1"],
    ["agent", "boot-check", "--tpm-wait", "nan"],
    ["agent", "boot-check", "--tpm-wait", "inf"],
    ["agent", "boot-check", "--tpm-wait", "86400.5"],
    ["agent", "boot-check", "--tpm-wait", "soon"],
    ["agent", "boot-check", "--", "x"],
    ["agent", "boot-check", "extra", "words"],
    ["-v", "agent", "boot-check"],
    ["--log-format", "json", "agent", "boot-check"],
    ["agent", "boot-check", "--config", "a", "--debug", "x"],
    ["agent", "status", "--config", "a"],
    ["agent"],
    [],
])
def test_anything_else_goes_to_the_parser(argv: list[str]) -> None:
    assert _boot_unit_args(argv) is None


ENTRY_ARGVS = [
    ["agent", "boot-check", "--help"],
    ["agent", "boot-check", "-h"],
    ["agent", "boot-check", "--bogus"],
    ["agent", "boot-check", "--tpm-wait", "x"],
    ["agent", "boot-check", "--tpm-wait", "-1"],
    ["agent", "boot-check", "--config"],
    ["agent", "boot-check", "extra"],
    ["agent", "boot-check", "--config", "/nonexistent/agent.toml"],
    ["agent", "boot-check", "--config", "/nonexistent/agent.toml", "--tpm-wait", "5"],
    ["agent", "boot-check", "--config=/nonexistent/agent.toml"],
    ["agent", "boot-check", "--config", "s3://bucket/agent.toml"],
    ["--log-format", "json", "agent", "boot-check", "--bogus"],
]
#: ``modelward ARGV`` through the full CLI: every command's parser, no plain reading.
_FULL = ("import sys, modelward.cli as c; c._boot_unit_args = lambda argv: None; "
         "c._parser_for = lambda argv: c.build_parser(); sys.exit(c.main(sys.argv[1:]))")


@pytest.mark.parametrize("argv", ENTRY_ARGVS)
def test_entry_point_prints_what_the_full_cli_prints(argv: list[str], tmp_path: Path) -> None:
    """``modelward agent boot-check`` help, usage errors and a config error: the same
    output and exit code from the installed entry point (the plain reading, the one-command
    parser) as from the full CLI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELWARD_")}

    def run(cmd: list[str]) -> tuple[int, str, str]:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                           env=env, check=False)
        return r.returncode, r.stdout, _TS.sub("TS", r.stderr)

    script = Path(sys.executable).parent / "modelward"
    lean, full = run([str(script), *argv]), run([sys.executable, "-I", "-c", _FULL, *argv])
    assert lean == full
    assert lean[0] in (0, 1, 2)
    assert "Traceback" not in lean[2]


_TS = re.compile(r"\d{4}-\d\d-\d\dT?[ ]?\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?")
