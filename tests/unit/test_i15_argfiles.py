"""Argument files (modelward/_inputs.py) opened once, without blocking, and checked by
fstat of the descriptor that is read (fixer of the a15cfg FIFO attack): what a local user
who names a FIFO, a pipe or a device as an argument file tries next."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from modelward._inputs import read_file, readable_file, tls_files
from modelward.trust.errors import OperatorInputError


def _bounded(call: Callable[..., object], *args: object) -> object:
    """``call(*args)`` in a thread: its result or error; fails the test if it hangs."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(call(*args))
        except BaseException as e:  # noqa: BLE001 - returned to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5.0)
    assert not t.is_alive(), "blocked"
    return out[0]


def test_pipe_with_data_is_read() -> None:
    """``--password-file /dev/stdin`` of ``printf pw | ...``: the writer already closed."""
    r, w = os.pipe()
    os.write(w, b"hunter2\n")
    os.close(w)
    try:
        assert read_file("--password-file", Path(f"/proc/self/fd/{r}")) == b"hunter2\n"
    finally:
        os.close(r)


def test_pipe_whose_writer_writes_later_is_waited_for() -> None:
    r, w = os.pipe()

    def late() -> None:
        os.write(w, b"late")
        os.close(w)

    timer = threading.Timer(0.3, late)
    timer.start()
    try:
        got = _bounded(read_file, "--password-file", Path(f"/proc/self/fd/{r}"))
    finally:
        timer.join()
        os.close(r)
    assert got == b"late"


def test_pipe_over_the_limit_refused() -> None:
    r, w = os.pipe()
    os.write(w, b"x" * 100)
    os.close(w)
    try:
        with pytest.raises(OperatorInputError, match="larger than 10 bytes"):
            read_file("--password-file", Path(f"/proc/self/fd/{r}"), 10)
    finally:
        os.close(r)


def test_dev_null_is_empty() -> None:
    assert read_file("--password-file", Path("/dev/null")) == b""


def test_directory_and_missing_refused_naming_the_flag(tmp_path: Path) -> None:
    for p, why in ((tmp_path, "is a directory"), (tmp_path / "nope", "No such file")):
        for f in (read_file, readable_file):
            with pytest.raises(OperatorInputError, match=why) as ei:
                f("--root", p)
            assert "--root" in str(ei.value)


@pytest.mark.parametrize("which", ["ca", "cert", "key"])
def test_tls_files_must_be_regular_even_with_a_writer(tmp_path: Path, which: str) -> None:
    """A FIFO with a writer would be read here and then again (empty, or blocking) by the
    connection: refused as not a regular file, without blocking."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "f.pem").write_text("x")
    wfd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer is there
    try:
        args = {"ca": (fifo, None, None), "cert": (None, fifo, tmp_path / "f.pem"),
                "key": (None, tmp_path / "f.pem", fifo)}[which]
        got = _bounded(tls_files, *args)
    finally:
        os.close(wfd)
    assert isinstance(got, OperatorInputError)
    assert "not a regular file" in str(got)


def test_tls_ca_not_pem_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(OperatorInputError, match="--tls-ca .*ca.pem: not a PEM CA"):
        tls_files(tmp_path / "ca.pem", None, None)


def test_no_descriptor_leaks(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "ca.pem").write_text("x")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        read_file("--root", tmp_path / "f")
        readable_file("--root", tmp_path / "f")
        with pytest.raises(OperatorInputError):
            tls_files(tmp_path / "ca.pem", None, None)
        with pytest.raises(OperatorInputError):
            tls_files(None, tmp_path / "ca.pem", tmp_path / "ca.pem")
    assert len(os.listdir("/proc/self/fd")) == before
