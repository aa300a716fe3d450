"""Review r11 of issue 16 (dwall, 7b36c6d), the health child's ``end``: a signed model
whose check passed must not turn into an exit 0 without its whole verdict, and an exit 0
must not come from a verdict the agent could read only in part.

Tried: the verdict is written, then the flush fails (stdout a pipe whose reader is gone,
as when the agent stopped reading at its bound); the verdict line is longer than a pipe
holds with the reader slow; the process is ``os._exit``ed with threads still running
(onnxruntime's pool). Each child is the real interpreter running the real ``end``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

_PRELUDE = ("import json, sys, threading, time\n"
            "from modelward.updater.install._healthchild import end\n")


def _child(code: str, stdout: int, stderr: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-I", "-c", _PRELUDE + code], stdout=stdout,
                            stderr=stderr, env={**os.environ, "PYTHONUNBUFFERED": "",
                                                "PYTHONPATH": os.pathsep.join(sys.path)})


def test_a_verdict_that_cannot_be_flushed_is_no_exit_0() -> None:
    rd, wr = os.pipe()
    os.close(rd)
    try:
        p = _child("print(json.dumps({'ok': True, 'detail': 'x'}))\nend(0)\n",
                   stdout=wr, stderr=subprocess.PIPE)
    finally:
        os.close(wr)
    _, err = p.communicate(timeout=60)
    assert p.returncode not in (0, None), err
    assert b"BrokenPipeError" in err


def test_a_slow_reader_gets_the_whole_verdict_before_the_exit() -> None:
    verdict = '{"ok": true, "detail": "' + "d" * 300_000 + '"}\n'
    p = _child("sys.stdout.write('{\"ok\": true, \"detail\": \"' + 'd' * 300_000 + '\"}\\n')\n"
               "end(0)\n", stdout=subprocess.PIPE,
               stderr=subprocess.PIPE)
    assert p.stdout is not None
    time.sleep(0.5)  # (the child is blocked in the flush: the pipe holds 64 KiB)
    assert p.poll() is None
    got = p.stdout.read()
    p.wait(timeout=60)
    assert p.returncode == 0 and got.decode() == verdict


def test_threads_still_running_write_nothing_after_the_verdict() -> None:
    code = ("def noisy():\n"
            "    time.sleep(0.2)\n"
            "    sys.stdout.write('late\\n'); sys.stdout.flush()\n"
            "threading.Thread(target=noisy).start()\n"
            "print(json.dumps({'ok': True, 'detail': 'x'}))\n"
            "end(0)\n")
    p = _child(code, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out == b'{"ok": true, "detail": "x"}\n'
