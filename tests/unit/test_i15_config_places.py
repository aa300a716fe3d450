"""What the attacker of the a15 config attacks tries next against the fixes: URLs whose
credentials are spelled to dodge the redaction, keys and host values with look-alikes,
windows in other spellings, keys pointing into each other's places through symlinks,
hard links, '..' and the TPM auth directory, state directories under a replaceable parent,
and secret files exposed by owner, group or a symlink (``agent/_config_places.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelward.agent._config import load_config
from modelward.agent.errors import ConfigError
from modelward.updater.idle import TimeRange
from tests.unit._configbase import BASE, config_dir

MQTT = BASE + '[mqtt]\nhost = "b"\nport = 8883\n'


@pytest.fixture
def d(tmp_path: Path) -> Path:
    return config_dir(tmp_path, state_mode=0o750)  # (as the package makes it)


def _load(d: Path, text: str, name: str = "agent.toml") -> object:
    p = d / name
    p.write_text(text)
    return load_config(p)


def _err(d: Path, text: str, name: str = "agent.toml") -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        _load(d, text, name)
    assert "\n" not in str(ei.value) and "\x1b" not in str(ei.value)
    return ei.value


# --- URLs: the credentials never reach the message, however they are spelled ----------


@pytest.mark.parametrize("url", [
    "https://admin:hun/ter2@o.example/metadata/",  # a '/' ends the authority early
    "https://admin:hunter2@@o.example/metadata/",
    "https://admin:p@ss@hunter2.x@o.example/metadata/",
    "http://admin:hunter2@o.example/metadata/",  # refused for http too: still redacted
    "https://admin:hunter2@o.example /metadata/",
    "https://admin:hunter2@o.example:0/metadata/",
    "admin:hunter2@o.example/metadata/",
])
def test_url_credentials_redacted_in_every_refusal(d: Path, url: str) -> None:
    e = _err(d, BASE.replace("https://o.example/metadata/", url))
    assert e.key == "https.metadata_url"
    for part in ("hunter2", "hun", "ter2", "p@ss", "admin"):
        assert part not in str(e)
    assert str(d / "agent.toml") in str(e)


@pytest.mark.parametrize("url", ["https://o.exa\tmple/metadata/", "https://o.example\u00a0/m/",
                                 "https://o.example/meta data/", "https://o.example:00/m/",
                                 "https://o.example/m/?", "https://o.example/m/#"])
def test_url_whitespace_port_zero_empty_query_refused(d: Path, url: str) -> None:
    assert _err(d, BASE.replace("https://o.example/metadata/", url)).key == "https.metadata_url"


def test_good_urls_still_load(d: Path) -> None:
    _load(d, BASE.replace("https://o.example/metadata/", "https://o.example:8443/m/%20x/"))


# --- keys and values in messages: one printable line ------------------------------------


@pytest.mark.parametrize("doc", ['"x\\u2028modelward: ok" = 1\n', '"\\u001b[2Jx" = 1\n',
                                 '["h\\nx"]\na = 1\n', '[mqtt]\n"p\\rort" = 1\n',
                                 '[idle]\nwindows = ["01:00-02:00\\u2028ok"]\n'])
def test_keys_and_values_escaped_in_messages(d: Path, doc: str) -> None:
    e = _err(d, BASE + doc)
    assert "\u2028" not in str(e) and "\r" not in str(e)


# --- [mqtt] host -------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["broker.example:8883", "1.2.3.4:1883", "[::1]", "[::1]:8883",
                                  "broker.example:", "::1:8883x"])
def test_mqtt_host_with_port_or_brackets_refused(d: Path, host: str) -> None:
    e = _err(d, BASE + f'[mqtt]\nhost = "{host}"\nport = 8883\n')
    assert e.key == "mqtt.host" and "port" in str(e)


@pytest.mark.parametrize("host", ["::1", "fe80::1", "broker.example", "10.0.0.1"])
def test_mqtt_host_names_and_addresses_load(d: Path, host: str) -> None:
    _load(d, BASE + f'[mqtt]\nhost = "{host}"\nport = 8883\n')


# --- '~' ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "key"), [
    ('"state"', '"~root/mw"', "state_dir"), ('"state"', '"~"', "state_dir"),
    ('ca_file = "ca.pem"', 'ca_file = "~/ca.pem"', "https.ca_file"),
])
def test_tilde_refused_with_the_reason(d: Path, old: str, new: str, key: str) -> None:
    e = _err(d, BASE.replace(old, new))
    assert e.key == key and "'~' is not expanded" in str(e)


# --- maintenance windows -------------------------------------------------------------------


@pytest.mark.parametrize("w", ["00:00+01:00-02:00", "00:00Z-01:00", "00:00:30-01:00",
                               "00:00-24:00", "\u0660\u0661:00-02:00", "01:00-01:00",
                               "1:00-01:00", "01:00", "01:00-02:00-03:00", "01.00-02.00"])
def test_windows_only_hh_mm_local_and_not_empty(d: Path, w: str) -> None:
    assert _err(d, BASE + f'[idle]\nwindows = ["{w}"]\n').key == "idle.windows"
    with pytest.raises(ValueError):
        TimeRange.parse(w)  # the gate's own parser (agent/_commands.py) refuses it too


@pytest.mark.parametrize("w", ["01:00-02:00", "1:00-2:00", " 22:00 - 06:00 ", "00:00-23:59"])
def test_windows_that_load(d: Path, w: str) -> None:
    _load(d, BASE + f'[idle]\nwindows = ["{w}"]\n')
    r = TimeRange.parse(w)
    assert r.start.tzinfo is None and r.end.tzinfo is None


# --- keys pointing into each other's places ----------------------------------------------


def test_metrics_textfile_places(d: Path) -> None:
    _load(d, BASE + '[metrics]\ntextfile = "state/metrics.prom"\n')  # the default's place
    _load(d, BASE + '[metrics]\ntextfile = "node/modelward.prom"\n')
    for target in ("state/status.json", "state/current", "state/x/m.prom",
                   "state/../state/trust/m.prom", "state-tpm/m.prom", "ca.pem"):
        e = _err(d, BASE + f'[metrics]\ntextfile = "{target}"\n')
        assert e.key == "metrics.textfile", target


def test_metrics_textfile_through_a_symlink_or_hard_link(d: Path) -> None:
    (d / "link").symlink_to(d / "state" / "trust")
    e = _err(d, BASE + '[metrics]\ntextfile = "link/record.json"\n')
    assert e.key == "metrics.textfile" and "trust" in str(e)
    os.link(d / "ca.pem", d / "ca2.pem")
    e = _err(d, BASE + '[metrics]\ntextfile = "ca2.pem"\n')
    assert e.key == "metrics.textfile" and "[https] ca_file" in str(e)


def test_metrics_textfile_over_busy_file_or_password_file(d: Path) -> None:
    (d / "pw").write_text("p")
    os.chmod(d / "pw", 0o600)
    e = _err(d, BASE + '[idle]\nbusy_file = "b"\n[metrics]\ntextfile = "b"\n')
    assert e.key == "metrics.textfile" and "[idle] busy_file" in str(e)
    e = _err(d, MQTT + 'password_file = "pw"\n[metrics]\ntextfile = "pw"\n')
    assert e.key == "metrics.textfile" and "[mqtt] password_file" in str(e)
    e = _err(d, BASE + '[idle]\nbusy_file = "agent.toml"\n')
    assert e.key == "idle.busy_file" and "config file" in str(e)


@pytest.mark.parametrize(("body", "key"), [
    ('[idle]\nbusy_file = "state-tpm/busy"\n', "idle.busy_file"),
    ('[idle]\nbusy_file = "state"\n', "idle.busy_file"),
    ('[mqtt]\nhost = "b"\nport = 1\nca_file = "state/ca.pem"\n', "mqtt.ca_file"),
    ('[mqtt]\nhost = "b"\nport = 1\ncert_file = "state/ca.pem"\nkey_file = "k"\n',
     "mqtt.cert_file"),
    ('[mqtt]\nhost = "b"\nport = 1\npassword_file = "state-tpm/ca.pem"\n', "mqtt.password_file"),
])
def test_trusted_files_not_in_the_state_or_tpm_auth_dir(d: Path, body: str, key: str) -> None:
    (d / "state-tpm").mkdir(mode=0o700)
    for f in (d / "state" / "ca.pem", d / "state-tpm" / "ca.pem", d / "k"):
        f.write_text("x")
        os.chmod(f, 0o600)
    e = _err(d, BASE + body)
    assert e.key == key and "state_dir" in str(e)


def test_config_inside_the_state_or_tpm_auth_dir(d: Path) -> None:
    assert _err(d, BASE.replace('"state"', '".."')).key == "state_dir"
    (d / "x-tpm").mkdir(mode=0o700)
    (d / "x-tpm" / "ca.pem").write_text("pem")
    e = _err(d, BASE.replace('"state"', '"../x"'), name="x-tpm/agent.toml")
    assert e.key == "state_dir" and "config file" in str(e)


# --- the state directory and the directories above it -----------------------------------


@pytest.mark.parametrize("mode", [0o770, 0o1777, 0o757, 0o720])
def test_state_dir_writable_by_others_refused(d: Path, mode: int) -> None:
    os.chmod(d / "state", mode)
    e = _err(d, BASE)
    assert e.key == "state_dir" and f"{mode & 0o7777:o}" in str(e)


def test_state_dir_under_a_replaceable_parent(d: Path) -> None:
    (d / "pub").mkdir()
    os.chmod(d / "pub", 0o777)  # noqa: S103 - the careless operator's mode
    assert _err(d, BASE.replace('"state"', '"pub/state"')).key == "state_dir"  # not there yet
    (d / "tmp").mkdir()
    os.chmod(d / "tmp", 0o1777)  # noqa: S103 - sticky, like /tmp: others cannot rename it
    (d / "tmp" / "state").mkdir(mode=0o700)
    _load(d, BASE.replace('"state"', '"tmp/state"'))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_state_dir_or_parent_owned_by_another_user(d: Path) -> None:
    os.chown(d / "state", 65534, -1)
    if os.geteuid() == 0:  # root may read it (check-config, status); writing is refused,
        # naming the owner and the runuser to type (agent/_owner.py)
        from modelward.agent._config import load_config
        from modelward.agent._owner import check_state_owner
        from modelward.agent.errors import StateOwnerError

        (d / "agent.toml").write_text(BASE)
        cfg = load_config(d / "agent.toml")
        with pytest.raises(StateOwnerError, match="belongs to nobody") as e:
            check_state_owner(cfg.state_dir, "agent update")
        assert "runuser -u nobody" in e.value.hint
    else:
        assert "uid 65534" in str(_err(d, BASE))
    os.chown(d / "state", 0, -1)
    (d / "home").mkdir(mode=0o755)
    (d / "home" / "state").mkdir(mode=0o700)
    os.chown(d / "home", 65534, -1)
    e = _err(d, BASE.replace('"state"', '"home/state"'))
    assert e.key == "state_dir" and "uid 65534" in str(e)


# --- secret files ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o610, 0o644])
@pytest.mark.parametrize("key", ["password_file", "key_file"])
def test_secret_file_modes(d: Path, key: str, mode: int) -> None:
    (d / "c.pem").write_text("c")
    (d / "s").write_text("hunter2")
    os.chmod(d / "s", mode)
    extra = 'cert_file = "c.pem"\n' if key == "key_file" else ""
    e = _err(d, MQTT + extra + f'{key} = "s"\n')
    assert e.key == f"mqtt.{key}" and str(d / "s") in str(e) and "hunter2" not in str(e)
    os.chmod(d / "s", 0o400)
    _load(d, MQTT + extra + f'{key} = "s"\n')


def test_secret_file_through_a_symlink_is_judged_by_its_target(d: Path) -> None:
    (d / "real").write_text("hunter2")
    os.chmod(d / "real", 0o644)
    (d / "pw").symlink_to(d / "real")  # a symlink's own mode is 777: the target counts
    assert _err(d, MQTT + 'password_file = "pw"\n').key == "mqtt.password_file"
    os.chmod(d / "real", 0o600)
    _load(d, MQTT + 'password_file = "pw"\n')


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_secret_file_of_another_user_refused(d: Path) -> None:
    (d / "pw").write_text("hunter2")
    os.chmod(d / "pw", 0o600)
    os.chown(d / "pw", 65534, -1)
    e = _err(d, MQTT + 'password_file = "pw"\n')
    assert e.key == "mqtt.password_file" and "uid 65534" in str(e)


@pytest.mark.parametrize(("mode", "ok"), [(0o644, False), (0o604, False), (0o640, True),
                                          (0o600, True)])
def test_inline_password_and_the_config_mode(d: Path, mode: int, ok: bool) -> None:
    p = d / "agent.toml"
    p.write_text(MQTT + 'password = "hunter2"\n')
    os.chmod(p, mode)
    if ok:
        load_config(p)
        return
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.key == "mqtt.password" and str(p) in str(ei.value)
    assert "hunter2" not in str(ei.value)


def test_the_packaged_example_loads_under_these_rules(tmp_path: Path) -> None:
    """systemd/agent.example.toml uncommented, its absolute paths moved under tmp_path and
    created as the package and its comments say (state 750, secrets 600): it loads."""
    import re

    text = (Path(__file__).parents[2] / "systemd" / "agent.example.toml").read_text()
    settings = "\n".join(ln[2:].split("  #")[0] for ln in text.splitlines()
                         if re.match(r"# (\[[a-z]+\]|[a-z_]+ = )", ln))
    root = tmp_path / "root"
    settings = re.sub(r'"/(etc|var|run)/', lambda m: f'"{root}/{m.group(1)}/', settings)
    (root / "var/lib/modelward").mkdir(parents=True, mode=0o750)
    (root / "etc/modelward").mkdir(parents=True, mode=0o755)
    for name in ("origin-ca.pem", "broker-ca.pem"):
        (root / "etc/modelward" / name).write_text("pem")
    (root / "etc/modelward/mqtt-password").write_text("p")
    os.chmod(root / "etc/modelward/mqtt-password", 0o600)
    conf = root / "etc/modelward/agent.toml"
    conf.write_text(settings)
    os.chmod(conf, 0o644)  # as the deb installs it (no inline password)
    cfg = load_config(conf)
    assert cfg.state_dir == root / "var/lib/modelward"


# --- the config file itself and the directories above trusted files -------------------


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_config_writable_by_others_refused(d: Path, mode: int) -> None:
    p = d / "agent.toml"
    p.write_text(BASE)
    os.chmod(p, mode)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(p) in str(ei.value) and f"{mode:o}" in str(ei.value)


def test_config_or_trusted_file_in_a_replaceable_directory_refused(d: Path) -> None:
    (d / "pub").mkdir()
    os.chmod(d / "pub", 0o777)  # noqa: S103 - the careless operator's mode
    (d / "pub" / "ca.pem").write_text("pem")
    e = _err(d, BASE.replace('ca_file = "ca.pem"', 'ca_file = "pub/ca.pem"'))
    assert e.key == "https.ca_file" and str(d / "pub") in str(e)
    with pytest.raises(ConfigError, match="pub"):
        _load(d, BASE.replace('"state"', '"../state"').replace('"ca.pem"', '"../ca.pem"'),
              name="pub/agent.toml")
