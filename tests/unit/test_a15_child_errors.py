"""Attacks on the update child's error reporting (agent/_child.py main): issue 15 promises
one escaped line (one JSON record under journald) per error; the child, whose stderr is
the daemon's (the journal), has paths that print raw or crash with a Python traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelward.agent import _child, _commands, _log
from modelward.trust.errors import ModelwardError

EVIL = "x\x1b]0;pwn\x07\n<0>modelward: EMERGENCY forged\u202e"


def _config(tmp_path: Path) -> Path:
    (tmp_path / "st").mkdir()
    conf = tmp_path / "agent.toml"
    conf.write_text(f'device_id = "dev-1"\nfleet = "demo"\nstate_dir = "{tmp_path}/st"\n'
                    'tcti = "swtpm:port=1"\nmodel = "classifier"\ntransport = "mqtt"\n\n'
                    '[mqtt]\nhost = "localhost"\nport = 8883\npassword = "pw-secret-1"\n')
    conf.chmod(0o640)  # an inline password only in a config others cannot read
    return conf


def _child_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, update_exc: BaseException,
                report_exc: BaseException | None) -> int:
    def update(*_a: object, **_k: object) -> None:
        raise update_exc

    def signed_report(*_a: object, **_k: object) -> bytes:
        if report_exc is not None:
            raise report_exc
        return b"{}"

    monkeypatch.setattr(_commands, "update", update)
    monkeypatch.setattr(_commands, "make_gate", lambda *_a, **_k: None)
    monkeypatch.setattr(_commands, "signed_report", signed_report)
    monkeypatch.setenv(_log.LOG_FORMAT_ENV, "json")
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    return _child.main([str(_config(tmp_path))])


def _json_lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines()]


def test_update_error_is_one_json_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = _child_main(tmp_path, monkeypatch, ModelwardError(EVIL), None)
    assert code == 1
    docs = _json_lines(capsys.readouterr().err)
    assert len(docs) == 1 and docs[0]["priority"] == 3


def test_no_status_report_is_a_json_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _child_main(tmp_path, monkeypatch, ModelwardError("update failed"), ModelwardError(EVIL))
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\u202e" not in err
    docs = _json_lines(err)
    assert all(d["priority"] in (3, 4) for d in docs)


def test_other_errors_in_the_child_are_one_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    e = OSError(28, "No space left on device", "/var/lib/modelward/x\n<0>forged")
    code = _child_main(tmp_path, monkeypatch, e, None)  # raises today
    assert code != 0
    docs = _json_lines(capsys.readouterr().err)
    assert docs and docs[0]["priority"] == 3


def test_child_error_is_logged_whatever_the_verbosity(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MODELWARD_VERBOSITY", "-2")
    code = _child_main(tmp_path, monkeypatch, ModelwardError("the origin is unreachable"),
                       None)
    assert code == 1
    docs = _json_lines(capsys.readouterr().err)
    assert any(d["priority"] == 3 for d in docs)


def test_child_survives_a_bad_verbosity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MODELWARD_VERBOSITY", "debug")
    code = _child_main(tmp_path, monkeypatch, ModelwardError("x"), None)
    assert code == 1


def test_daemon_passes_its_verbosity_to_the_child(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelward import cli
    from modelward.agent import _daemon

    seen: dict[str, str] = {}
    monkeypatch.setattr(_daemon, "run_daemon", lambda _cfg, env: seen.update(env))
    monkeypatch.delenv("MODELWARD_VERBOSITY", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert cli.main(["-v", "-v", "agent", "run", "--config", str(_config(tmp_path))]) == 0
    assert int(seen.get("MODELWARD_VERBOSITY", "1")) >= 3
