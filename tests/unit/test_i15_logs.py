"""Issue 15, "Logs for people and for journald": human lines on a terminal (the agent
too), JSON lines with a syslog ``priority`` under journald (``$JOURNAL_STREAM`` naming
stderr) or with ``--log-format json``; one line per error; a bug is one line (its
traceback only with ``--debug`` or in the journal's record); no secret in any of it."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelward import cli
from modelward.agent._log import (
    HumanFormatter,
    JsonFormatter,
    error_line,
    resolve_format,
    setup_logging,
    syslog_priority,
)
from tests.unit._logcapture import journal_stderr, root_logging_kept

HUMAN = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")
PASSPHRASE = "correct horse battery staple 42"


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("MODELWARD_LOG_FORMAT", raising=False)
    with root_logging_kept():
        yield


def _journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """stderr is a file that $JOURNAL_STREAM names by device and inode, as systemd does."""
    return journal_stderr(tmp_path / "journal", monkeypatch)


def _stderr(monkeypatch: pytest.MonkeyPatch) -> io.StringIO:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    return err


def test_priorities_are_syslog_levels() -> None:
    assert [syslog_priority(n) for n in (50, 40, 30, 20, 10, 5)] == [2, 3, 4, 6, 7, 7]


def test_human_line_has_time_level_and_short_logger_name() -> None:
    r = logging.LogRecord("modelward.agent", logging.WARNING, __file__, 1, "update: %s",
                          ("no network",), None)
    line = HumanFormatter().format(r)
    assert HUMAN.match(line) and line.endswith(" WARNING agent: update: no network"), line
    assert "{" not in line


def test_json_line_carries_priority() -> None:
    r = logging.LogRecord("modelward.agent", logging.ERROR, __file__, 1, "x", (), None)
    doc = json.loads(JsonFormatter().format(r))
    assert doc["priority"] == 3 and doc["level"] == "error"


def test_auto_is_json_only_when_stderr_is_the_journal(tmp_path: Path) -> None:
    with (tmp_path / "a").open("w") as f:
        st = os.fstat(f.fileno())
        assert resolve_format("auto", f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}) == "json"
        # set, but for another stream (a child whose stderr was redirected): human
        assert resolve_format("auto", f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}) \
            == "human"
        assert resolve_format("auto", f, {}) == "human"
        assert resolve_format("json", f, {}) == "json"
        assert resolve_format("human", f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}) \
            == "human"


def _agent_status_missing(tmp_path: Path, *pre: str) -> int:
    return cli.main([*pre, "agent", "status", "--config", str(tmp_path / "nope.toml")])


def test_the_agent_logs_for_people_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    err = _stderr(monkeypatch)
    assert setup_logging(1) == "human"  # what `agent ...` gets without a journal
    logging.getLogger("modelward.agent").info("agent started for %s", "dev-1")
    assert HUMAN.match(err.getvalue()), err.getvalue()
    err.truncate(0)
    err.seek(0)
    assert _agent_status_missing(tmp_path) == 1
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelward: error: cannot read config")
    assert "; hint: " in lines[0]


def test_under_journald_every_line_is_json_with_its_priority_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _journal(tmp_path, monkeypatch)

    def fake(args: Any) -> int:
        logging.getLogger("modelward.agent").warning("cannot listen for announcements yet")
        raise cli_errors().OperatorInputError("--key /x: no such file", hint="check it")

    monkeypatch.setattr(cli, "_fleet_add_device", fake)
    assert cli.main(["fleet", "add-device", "--fleet-dir", str(tmp_path), "--device", "d",
                     "--key", "/x"]) == 1
    sys.stderr.flush()
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<4>", "<3>"], lines  # journald's PRIORITY=
    docs = [json.loads(line[3:]) for line in lines]
    assert [d["priority"] for d in docs] == [4, 3]
    err = docs[1]
    assert err["error"] == "OperatorInputError" and err["hint"] == "check it"
    assert "--key /x: no such file" in err["msg"] and "exc" not in err


def cli_errors() -> Any:
    import modelward.trust.errors as errors

    return errors


def test_log_format_json_without_journal_has_no_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    err = _stderr(monkeypatch)
    assert _agent_status_missing(tmp_path, "--log-format", "json") == 1
    (line,) = err.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["priority"] == 3 and doc["error"] == "ConfigError" and "nope.toml" in doc["msg"]


def test_log_format_from_the_environment_and_a_bad_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    err = _stderr(monkeypatch)
    monkeypatch.setenv("MODELWARD_LOG_FORMAT", "json")
    assert _agent_status_missing(tmp_path) == 1
    json.loads(err.getvalue())
    err.truncate(0)
    err.seek(0)
    monkeypatch.setenv("MODELWARD_LOG_FORMAT", "xml\n")
    assert _agent_status_missing(tmp_path) == 2
    (line,) = err.getvalue().splitlines()
    assert "MODELWARD_LOG_FORMAT" in line and "'xml\\n'" in line and "; hint: " in line


def _bug(args: Any) -> int:
    raise TypeError(f"unsupported operand near {PASSPHRASE[:0]}the code")


def test_a_bug_is_one_line_exit_70_and_its_traceback_only_with_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "_fleet_add_device", _bug)
    argv = ["fleet", "add-device", "--fleet-dir", str(tmp_path), "--device", "d", "--key", "k"]
    assert cli.main(argv) == cli.EXIT_BUG
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert line.startswith("modelward: internal error: TypeError: unsupported operand")
    assert "this is a bug" in line and "--debug" in line and "Traceback" not in out + err
    assert cli.main(["--debug", *argv]) == cli.EXIT_BUG
    err = capsys.readouterr().err
    assert err.splitlines()[0] == line and "Traceback (most recent call last)" in err
    assert "in _bug" in err


def test_a_bug_under_journald_is_one_record_with_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _journal(tmp_path, monkeypatch)
    monkeypatch.setattr(cli, "_fleet_add_device", _bug)
    assert cli.main(["fleet", "add-device", "--fleet-dir", str(tmp_path), "--device", "d",
                     "--key", "k"]) == cli.EXIT_BUG
    sys.stderr.flush()
    (line,) = path.read_text().splitlines()
    doc = json.loads(line[3:])
    assert doc["error"] == "TypeError" and "this is a bug" in doc["hint"]
    assert "Traceback" in doc["exc"] and "in _bug" in doc["exc"]


@pytest.mark.parametrize("exc", [FileNotFoundError(2, "No such file or directory", "/etc/x.pem"),
                                 IsADirectoryError(21, "Is a directory", "/etc/x.pem")])
def test_an_os_error_no_check_caught_names_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    exc: OSError,
) -> None:
    def fake(args: Any) -> int:
        raise exc

    monkeypatch.setattr(cli, "_fleet_add_device", fake)
    assert cli.main(["fleet", "add-device", "--fleet-dir", str(tmp_path), "--device", "d",
                     "--key", "k"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"modelward: error: /etc/x.pem: {exc.strerror}; hint: ")


def test_a_value_error_no_check_caught_is_one_line_that_says_it_may_be_a_bug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    def fake(args: Any) -> int:
        b"\xff".decode()
        return 0

    monkeypatch.setattr(cli, "_fleet_add_device", fake)
    assert cli.main(["fleet", "add-device", "--fleet-dir", str(tmp_path), "--device", "d",
                     "--key", "k"]) == 1
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert "can't decode byte 0xff" in line and "this is a bug" in line
    assert "Traceback" not in out + err


def test_an_error_line_is_one_line_with_its_hint_and_escaped() -> None:
    line = error_line("modelward: error", "bad \x1b[2J name", "fix\nit")
    assert line == "modelward: error: bad \\x1b[2J name; hint: fix\\nit"
    two = error_line("modelward: error", "first\nsecond", "")
    assert two == "modelward: error: first\n  second"  # a continuation, never a new record


# -- secrets -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_no_passphrase_or_password_in_any_log_or_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    fmt: str,
) -> None:
    from modelward.publisher._keyfile import ScryptParams

    monkeypatch.setattr("modelward.publisher._keyfile.DEFAULT_SCRYPT", ScryptParams(2**10, 8, 1))
    monkeypatch.setenv("MODELWARD_KEY_PASSPHRASE", PASSPHRASE)
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    top = ["-vv", "--debug", "--log-format", fmt]
    assert cli.main([*top, "repo", "init", "--repo", str(repo), "--keys", str(keys)]) == 0
    # a wrong passphrase: the error, at debug level with its traceback, does not echo it
    monkeypatch.setenv("MODELWARD_KEY_PASSPHRASE", PASSPHRASE[::-1])
    assert cli.main([*top, "repo", "rotate", "timestamp", "--repo", str(repo),
                     "--keys", str(keys)]) == 1
    # an MQTT password: the broker does not answer, the error does not show it
    pw = tmp_path / "pw"
    pw.write_text("mqtt-password-never-shown\n")
    assert cli.main([*top, "announce", "--repo", str(repo), "--broker", "mqtts://127.0.0.1:1",
                     "--fleet", "f", "--password-file", str(pw)]) == 1
    out, err = capsys.readouterr()
    assert "passphrase" in err.lower() or "decrypt" in err.lower()  # the error was shown
    for secret in (PASSPHRASE, PASSPHRASE[::-1], "mqtt-password-never-shown"):
        assert secret not in out and secret not in err
    assert (keys / "timestamp.pem").read_bytes().decode(errors="replace") not in err


@pytest.mark.parametrize(("argv", "fmt"), [([], "auto"), (["--log-format", "json"], "json"),
                                           (["--log-format", "human"], "human")])
def test_the_daemon_passes_its_log_format_to_its_attempt_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], fmt: str
) -> None:
    import modelward.agent._daemon as daemon
    from modelward.simulator._demo import write_device_config

    conf = write_device_config(tmp_path / "a.toml", device_id="d", state=tmp_path / "s",
                               tcti="swtpm:host=127.0.0.1,port=9",
                               origin_url="https://127.0.0.1:9")
    seen: dict[str, str] = {}
    monkeypatch.setattr(daemon, "run_daemon", lambda cfg, env: seen.update(env))
    assert cli.main([*argv, "agent", "run", "--config", str(conf)]) == 0
    assert seen["MODELWARD_LOG_FORMAT"] == fmt


# -- attacks: what a device, the origin or a team key chose reaches our lines -------------

FORGED = ("dev-9\n2026-12-01 18:00:00 INFO agent: installed classifier 9.9.9"
          "\x1b[2J\x1b]0;pwned\x07\r\u202e\u2028")


def test_a_human_log_line_cannot_be_forged_or_carry_controls() -> None:
    r = logging.LogRecord("modelward.publisher._bridge", logging.WARNING, __file__, 1,
                          "refusing a request from %s", (FORGED,), None)
    line = HumanFormatter().format(r)
    assert "\n" not in line and HUMAN.match(line)
    for raw in ("\x1b", "\x07", "\r", "\u202e", "\u2028"):
        assert raw not in line


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_an_error_quoting_the_origin_is_one_record_that_forges_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], fmt: str,
    tmp_path: Path,
) -> None:
    from modelward.updater.errors import MetadataError

    def fake(args: Any) -> int:
        raise MetadataError(f"timestamp from the origin: {FORGED}")

    monkeypatch.setattr(cli, "_fleet_add_device", fake)
    assert cli.main(["--log-format", fmt, "fleet", "add-device", "--fleet-dir", str(tmp_path),
                     "--device", "d", "--key", "k"]) == 1
    err = capsys.readouterr().err
    for raw in ("\x1b", "\x07", "\r", "\u202e", "\u2028"):
        assert raw not in err
    lines = err.splitlines()
    if fmt == "json":
        (line,) = lines
        assert FORGED in json.loads(line)["msg"]  # kept exactly, escaped on the wire
    else:  # the quoted line break only starts an indented continuation
        assert lines[0].startswith("modelward: error: ")
        assert all(line.startswith("  ") for line in lines[1:]) and len(lines) == 2
