"""Attacks on the issue-15 strict config, ``agent check-config`` and ``agent status
--no-tpm`` (helper a15cfg): a disk attacker who writes the state directory, a careless
operator, a local user controlling a CLI call's environment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from modelward.agent._config import check_config, load_config
from modelward.agent._status_offline import unverified_status
from modelward.agent.errors import ConfigError
from modelward.cli import main
from tests.unit._configbase import BASE, config_dir

VERIFIED_LINE = "verified  by the TPM"


@pytest.fixture
def d(tmp_path: Path) -> Path:
    return config_dir(tmp_path)


def _cfg(d: Path, text: str = BASE) -> Path:
    p = d / "agent.toml"
    p.write_text(text)
    return p


def _load_err(d: Path, text: str) -> ConfigError:
    p = _cfg(d, text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    return ei.value


def _record(d: Path, name: str = "m", fingerprint: str = "fp") -> None:
    rec = {"record": {"counter": 1, "root_version": 1, "targets_version": 1,
                      "active": {"name": name, "version": "1.0", "fingerprint": fingerprint,
                                 "slot": "a"}, "previous": None}, "mac": "00"}
    (d / "state" / "trust" / "record.json").write_text(json.dumps(rec))


def _rejections(d: Path, at: float, until: float) -> None:
    e = {"path": "t.onnx", "hashes": {"sha256": "00"}, "reason": "r", "detail": "d",
         "model": "m", "version": "1", "at": at, "until": until}
    (d / "state" / "rejections.json").write_text(
        json.dumps({"version": 1, "rejections": [e], "mac": "00"}))


def _status_out(d: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["agent", "status", "--no-tpm", "--config", str(_cfg(d))])
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- disk attacker: agent status --no-tpm ----------------------------------------------


@pytest.mark.parametrize(("at", "until"), [(1.0, 1e300), (-1e300, 1e300), (1.0, 1e12)])
def test_offline_status_survives_out_of_range_rejection_times(
        d: Path, at: float, until: float) -> None:
    _record(d)
    _rejections(d, at, until)
    doc = unverified_status(load_config(_cfg(d)), "--no-tpm")
    assert doc["verified"] is False
    assert doc["rejected"] == [] or doc["rejections_problem"]


def test_offline_status_cli_exit_ok_with_out_of_range_rejection(
        d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record(d)
    _rejections(d, 1.0, 1e300)
    rc, out, err = _status_out(d, capsys)
    assert rc == 0, err
    assert out.startswith("UNVERIFIED")


@pytest.mark.parametrize("where", ["name", "fingerprint"])
def test_offline_status_never_prints_the_verified_phrase(
        d: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    forged = "m" + " " * 69 + VERIFIED_LINE + " (trust record MAC and update counter)"
    _record(d, **{where: forged})
    rc, out, _ = _status_out(d, capsys)
    assert rc == 0
    assert out.startswith("UNVERIFIED")
    assert VERIFIED_LINE not in out


def test_offline_status_last_error_cannot_carry_verified_phrase(
        d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _record(d)
    msg = " " * 69 + VERIFIED_LINE + " (trust record MAC and update counter)"
    (d / "state" / "status.json").write_text(json.dumps(
        {"last_error": {"type": "X", "message": msg, "at": "now"}}))
    rc, out, _ = _status_out(d, capsys)
    assert rc == 0
    assert VERIFIED_LINE not in out


@pytest.mark.parametrize("plant", ["fifo_record", "fifo_status", "fifo_rejections",
                                   "symlink_record", "symlink_trust", "sparse_status",
                                   "dir_record"])
def test_offline_status_resists_planted_files(
        d: Path, capsys: pytest.CaptureFixture[str], plant: str) -> None:
    """Resisted: FIFOs (no hang), symlinks (not followed), a 100 GB sparse file (bounded),
    a directory: one UNVERIFIED report, exit 0."""
    st = d / "state"
    if plant == "fifo_record":
        os.mkfifo(st / "trust" / "record.json")
    elif plant == "fifo_status":
        _record(d)
        os.mkfifo(st / "status.json")
    elif plant == "fifo_rejections":
        _record(d)
        os.mkfifo(st / "rejections.json")
    elif plant == "symlink_record":
        (d / "real.json").write_text("{}")
        (st / "trust" / "record.json").symlink_to(d / "real.json")
    elif plant == "symlink_trust":
        (st / "trust").rmdir()
        (d / "elsewhere").mkdir()
        (st / "trust").symlink_to(d / "elsewhere")
    elif plant == "sparse_status":
        _record(d)
        with open(st / "status.json", "wb") as f:
            f.truncate(100 << 30)
    elif plant == "dir_record":
        (st / "trust" / "record.json").mkdir()
    rc, out, _ = _status_out(d, capsys)
    assert rc == 0
    assert out.startswith("UNVERIFIED")
    assert VERIFIED_LINE not in out


# --- careless operator: configs that load but should not --------------------------------


@pytest.mark.parametrize("url", ["https://admin:hunter2@o.example/metadata/",
                                 "https://admin:hunter2@o.example:99999/metadata/"])
def test_url_credentials_not_in_error(d: Path, url: str) -> None:
    e = _load_err(d, BASE.replace("https://o.example/metadata/", url))
    assert e.key == "https.metadata_url"
    assert "hunter2" not in str(e)


def test_unknown_key_with_newline_is_one_line(d: Path) -> None:
    e = _load_err(d, BASE + '"x\\nmodelward: ok" = 1\n')
    assert "\n" not in str(e)


def test_mqtt_host_with_port_refused(d: Path) -> None:
    e = _load_err(d, BASE + '[mqtt]\nhost = "broker.example:8883"\nport = 8883\n')
    assert e.key == "mqtt.host"


def test_tilde_state_dir_not_taken_literally(d: Path) -> None:
    p = _cfg(d, BASE.replace('"state"', '"~/mw"'))
    try:
        cfg = load_config(p)
    except ConfigError as e:
        assert e.key == "state_dir"
    else:
        assert "~" not in cfg.state_dir.parts


def test_metrics_textfile_over_trust_record_refused(d: Path) -> None:
    e = _load_err(d, BASE + '[metrics]\ntextfile = "state/trust/record.json"\n')
    assert e.key == "metrics.textfile"


def test_busy_file_in_state_dir_refused(d: Path) -> None:
    e = _load_err(d, BASE + '[idle]\nbusy_file = "state/busy"\n')
    assert e.key == "idle.busy_file"


@pytest.mark.parametrize(("text", "key"), [
    (BASE.replace("https://o.example/metadata/", "HTTPS://o.example/metadata/"),
     "https.metadata_url"),
    (BASE.replace('"https://o.example/metadata/"', '" https://o.example/metadata/"'),
     "https.metadata_url"),
    (BASE.replace('"https://o.example/metadata/"', '"http://o.example/metadata/"'),
     "https.metadata_url"),
    (BASE + "[mqtt]\nhost = \"b\"\nport = 0\n", "mqtt.port"),
    (BASE + "[mqtt]\nhost = \"b\"\nport = 65536\n", "mqtt.port"),
    (BASE + "[mqtt]\nhost = \"b\"\nport = \"8883\"\n", "mqtt.port"),
    (BASE + "[agent]\npoll_interval = \"60\"\n", "agent.poll_interval"),
    (BASE + "[agent]\npoll_interval = 1979-05-27T07:32:00Z\n", "agent.poll_interval"),
    (BASE.replace('"swtpm:port=1"', "1979-05-27"), "tcti"),
    (BASE.replace('ca_file = "ca.pem"', 'ca_file = "."'), "https.ca_file"),
    (BASE.replace('device_id = "d"', '"dev\u0456ce_id" = "d"'), "dev\u0456ce_id"),
    (BASE + "[mqtt]\nhost = \"b\"\nport = 1\npassword = 5\n", "mqtt.password"),
])
def test_careless_values_refused_with_key(d: Path, text: str, key: str) -> None:
    """Resisted: each names the key and the file."""
    e = _load_err(d, text)
    assert e.key == key
    assert str(d / "agent.toml") in str(e)


def test_repeated_key_refused(d: Path) -> None:
    e = _load_err(d, BASE + 'model = "n"\n')
    assert str(d / "agent.toml") in str(e)


def test_inline_mqtt_password_not_shown(d: Path) -> None:
    """Resisted: check-config prints <set>; a bad value of it is not quoted."""
    p = _cfg(d, BASE + '[mqtt]\nhost = "b"\nport = 1\npassword = "hunter2"\n')
    os.chmod(p, 0o640)  # an inline password in a world-readable config is refused
    lines = check_config(p)
    assert "password = <set>" in lines and not any("hunter2" in x for x in lines)
    e = _load_err(d, BASE + '[mqtt]\nhost = "b"\nport = 1\npassword = "hunter2\\u0007"\n')
    assert "hunter2" not in str(e)


def test_failed_load_changes_nothing(d: Path) -> None:
    """Resisted: a refused config writes nothing (no state dir, no file)."""
    before = sorted(str(x) for x in d.rglob("*"))
    _load_err(d, BASE.replace('"state"', '"newstate"') + "[helth]\n")
    assert sorted(str(x) for x in d.rglob("*")) == sorted([*before, str(d / "agent.toml")])


# --- local user: the environment of a CLI call ----------------------------------------


@pytest.mark.parametrize(("var", "value"), [
    ("JOURNAL_STREAM", "a:b"), ("JOURNAL_STREAM", "1:" + "9" * 40), ("JOURNAL_STREAM", ":"),
    ("MODELWARD_LOG_FORMAT", "\x1b[2J"), ("TERM", "\x1b]0;x\x07"),
])
def test_env_of_cli_call_one_line(d: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    """Resisted: a missing config is one escaped line whatever the environment says."""
    monkeypatch.setenv(var, value)
    rc = main(["agent", "check-config", "--config", str(d / "missing.toml")])
    err = capsys.readouterr().err
    assert rc in (1, 2)
    assert err.count("\n") == 1 and "\x1b" not in err


# --- careless operator, round 2: keys that point into each other's places -------------


@pytest.mark.parametrize("window", ["00:00+01:00-02:00", "00:00-01:00-02:00",
                                    "00:00Z-23:00"])
def test_window_with_utc_offset_refused_or_harmless(d: Path, window: str) -> None:
    from datetime import datetime

    from modelward.updater.idle import MaintenanceWindowSignal, TimeRange

    p = _cfg(d, BASE + f'[idle]\nwindows = ["{window}"]\n')
    try:
        cfg = load_config(p)
    except ConfigError as e:
        assert e.key == "idle.windows"
        return
    sig = MaintenanceWindowSignal([TimeRange.parse(w) for w in cfg.idle.windows],
                                  now=lambda: datetime(2026, 1, 1, 0, 30))
    sig.busy()  # must not raise


def test_empty_window_refused(d: Path) -> None:
    e = _load_err(d, BASE + '[idle]\nwindows = ["00:00-00:00"]\n')
    assert e.key == "idle.windows"


def test_config_file_inside_state_dir_refused(d: Path) -> None:
    e = _load_err(d, BASE.replace('"state"', '"."'))
    assert e.key == "state_dir"


def test_ca_file_inside_state_dir_refused(d: Path) -> None:
    (d / "state" / "ca.pem").write_text("pem")
    e = _load_err(d, BASE.replace('ca_file = "ca.pem"', 'ca_file = "state/ca.pem"'))
    assert e.key == "https.ca_file"


def test_metrics_textfile_over_config_refused(d: Path) -> None:
    e = _load_err(d, BASE + '[metrics]\ntextfile = "agent.toml"\n')
    assert e.key == "metrics.textfile"


def test_world_writable_state_dir_refused(d: Path) -> None:
    os.chmod(d / "state", 0o777)  # noqa: S103 - the careless operator's mode
    e = _load_err(d, BASE)
    assert e.key == "state_dir"


# --- argument files (modelward/_inputs.py) ---------------------------------------------


@pytest.mark.parametrize("which", ["read_file", "tls_ca"])
def test_argument_fifo_without_writer_does_not_hang(tmp_path: Path, which: str) -> None:
    import threading

    from modelward._inputs import read_file, tls_files
    from modelward.trust.errors import OperatorInputError

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            if which == "read_file":
                read_file("--root", fifo)
            else:
                tls_files(fifo, None, None)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome.append(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(2.0)
    if t.is_alive():  # unblock the reader, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5.0)
        pytest.fail("blocked on a FIFO without a writer")
    assert outcome and isinstance(outcome[0], OperatorInputError)


# --- careless operator, round 3: secrets other users can read, a state_dir that is a file --

MQTT_TLS = BASE + '[mqtt]\nhost = "b"\nport = 8883\n'


def test_world_readable_password_file_refused(d: Path) -> None:
    (d / "pw").write_text("hunter2\n")
    os.chmod(d / "pw", 0o644)
    e = _load_err(d, MQTT_TLS + 'password_file = "pw"\n')
    assert e.key == "mqtt.password_file"
    assert "hunter2" not in str(e)


def test_world_readable_client_key_refused(d: Path) -> None:
    (d / "c.pem").write_text("cert")
    (d / "k.pem").write_text("key")
    os.chmod(d / "k.pem", 0o644)
    e = _load_err(d, MQTT_TLS + 'cert_file = "c.pem"\nkey_file = "k.pem"\n')
    assert e.key == "mqtt.key_file"


def test_state_dir_that_is_a_file_refused(d: Path) -> None:
    (d / "statefile").write_text("")
    e = _load_err(d, BASE.replace('"state"', '"statefile"'))
    assert e.key == "state_dir"


def test_password_file_content_never_shown(d: Path) -> None:
    """Resisted: a password file that is not UTF-8 or too big is refused without its bytes;
    both password and password_file is refused; check-config says <set>."""
    (d / "pw").write_bytes(b"hunter2\xff")
    os.chmod(d / "pw", 0o600)
    e = _load_err(d, MQTT_TLS + 'password_file = "pw"\n')
    assert e.key == "mqtt.password_file" and "hunter2" not in str(e)
    (d / "pw").write_bytes(b"hunter2" * 1000)
    e = _load_err(d, MQTT_TLS + 'password_file = "pw"\n')
    assert "hunter2" not in str(e)
    (d / "pw").write_text("hunter2")
    e = _load_err(d, MQTT_TLS + 'password_file = "pw"\npassword = "hunter3"\n')
    assert "hunter" not in str(e)
    lines = check_config(_cfg(d, MQTT_TLS + 'password_file = "pw"\n'))
    assert not any("hunter2" in x for x in lines)


@pytest.mark.parametrize("url", ["https://o.example /metadata/",
                                 "https://o.example:0/metadata/",
                                 "https://o.example/metadata/ "])
def test_url_with_bad_host_port_or_whitespace_refused(d: Path, url: str) -> None:
    e = _load_err(d, BASE.replace("https://o.example/metadata/", url))
    assert e.key == "https.metadata_url"
