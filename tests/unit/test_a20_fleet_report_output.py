"""Attack on ``fleet report -o`` (issue 17), the careless operator: ``-o /dev/stdout`` to
pipe the page on, ``-o /dev/null`` to keep only the summary line, ``-o`` a named pipe a
viewer reads. The page is written by renaming a new file over ``-o`` (atomic), so each
of these was *replaced* by a regular file: run as root, ``/dev/null`` or ``/dev/stdout``
became a file of HTML for every program on the host, and the pipe's reader never got a
byte. An ``-o`` that exists and is not a regular file is now refused before the broker is
asked, and left as it was; a symlink to a file is replaced (never followed), as before."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from modelward import cli

ARGS = ["fleet", "report", "--fleet-dir", "FLEET", "--broker", "mqtts://127.0.0.1:1",
        "--fleet", "f"]


def _run(tmp_path: Path, output: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    asked: list[Any] = []
    monkeypatch.setattr(cli, "_fleet_rows", lambda args, summary: asked.append(1) or [])
    code = cli.main([*ARGS[:2], "-o", str(output),
                     *[str(tmp_path / "fleet") if a == "FLEET" else a for a in ARGS[2:]]])
    assert not asked or code == 0
    return code


def _nodes(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "stdout"  # (as /dev/stdout: a link to what is not a file)
    link.symlink_to(fifo)
    nodes = {"fifo": fifo, "link to a fifo": link}
    if os.geteuid() == 0:  # (root only: a character device, as /dev/null)
        null = tmp_path / "null"
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        nodes["character device"] = null
    return nodes


def test_an_output_that_is_not_a_file_is_refused_and_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for kind, node in _nodes(tmp_path).items():
        before = os.lstat(node)
        code = _run(tmp_path, node, monkeypatch)
        after = os.lstat(node)  # (was: a regular file of HTML in its place)
        assert (stat.S_IFMT(after.st_mode), after.st_ino) == (
            stat.S_IFMT(before.st_mode), before.st_ino), kind
        assert code == 1, kind
        err = capsys.readouterr().err
        assert "-o" in err and "not a regular file" in err, (kind, err)


def test_a_file_or_a_link_to_one_is_still_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = tmp_path / "fleet.html"
    page.write_text("old")
    assert _run(tmp_path, page, monkeypatch) == 0
    assert page.read_text().startswith("<!DOCTYPE html>")
    target = tmp_path / "target.html"
    target.write_text("old")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    assert _run(tmp_path, link, monkeypatch) == 0
    assert not link.is_symlink() and target.read_text() == "old"  # (never followed)
    assert _run(tmp_path, tmp_path / "new" / "fleet.html", monkeypatch) == 0
