"""Issue 15: a config that catches mistakes. Every variant is checked at load (no TPM, no
network): unknown keys and sections with "did you mean", types (bool is not an int),
bounds, https URLs, files that must exist, and a bounded read of the config itself."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from modelward.agent._config import build_config, check_config, load_config
from modelward.agent._config_schema import (
    DEFAULT_CONFIG,
    MAX_CONFIG_BYTES,
    SCHEMA,
    TOP,
    read_document,
    validate,
)
from modelward.agent.errors import ConfigError
from modelward.trust.errors import OperatorInputError
from tests.unit._configbase import BASE, config_dir

MQTT = """
[mqtt]
host = "broker.example"
port = 8883
ca_file = "ca.pem"
"""


@pytest.fixture
def d(tmp_path: Path) -> Path:
    return config_dir(tmp_path, trust=False)


def _err(d: Path, text: str) -> ConfigError:
    p = d / "agent.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    e = ei.value
    assert isinstance(e, OperatorInputError)  # the CLI prints one line, no traceback
    assert str(p) in str(e) and "\n" not in str(e)
    return e


def _sub(section: str, body: str, text: str = BASE) -> str:
    """``text`` with ``body`` added to ``[section]`` (appended as a new table)."""
    if section == TOP:
        return body + "\n" + text
    if f"[{section}]\n" in text:
        return text.replace(f"[{section}]\n", f"[{section}]\n{body}\n")
    return text + f"\n[{section}]\n{body}\n"


def test_good_config_loads_with_absolute_paths(d: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (d / "agent.toml").write_text(BASE)
    monkeypatch.chdir(d)
    cfg = load_config(Path("agent.toml"))  # relative: resolved against its directory
    assert cfg.state_dir == d / "state"
    assert cfg.updater.https is not None and cfg.updater.https.ca_file == str(d / "ca.pem")


# --- unknown keys and sections ------------------------------------------------------------


@pytest.mark.parametrize("section", [s for s in SCHEMA if s != TOP])
def test_typo_in_a_key_of_every_section_names_it_and_suggests(d: Path, section: str) -> None:
    key = next(iter(SCHEMA[section]))
    typo = key + key[-1]
    e = _err(d, _sub(section, f"{typo} = 1", BASE + MQTT))
    assert f"[{section}] {typo}: unknown key; did you mean {key}?" in str(e)
    assert e.key == f"{section}.{typo}"


def test_typo_in_a_top_level_key(d: Path) -> None:
    e = _err(d, BASE.replace("device_id", "devise_id"))
    assert "devise_id: unknown key; did you mean device_id?" in str(e)


@pytest.mark.parametrize("typo, right", [
    ("helth", "health"), ("htps", "https"), ("mqt", "mqtt"), ("idel", "idle"),
    ("activaton", "activation"), ("metric", "metrics"), ("agnet", "agent"),
])
def test_typo_in_a_section_suggests_the_section(d: Path, typo: str, right: str) -> None:
    e = _err(d, BASE + f"\n[{typo}]\nx = 1\n")
    assert f"[{typo}]: unknown section; did you mean [{right}]?" in str(e)
    assert e.key == typo


def test_unrelated_section_lists_the_known_ones(d: Path) -> None:
    assert "(known: [agent], [https]" in str(_err(d, BASE + "\n[zzzz]\n"))


def test_key_in_the_wrong_section_says_where_it_belongs(d: Path) -> None:
    assert "poll_interval: unknown key; it belongs in [agent]" in str(
        _err(d, "poll_interval = 5\n" + BASE))
    assert "[https] device_id: unknown key; it belongs at the top" in str(
        _err(d, _sub("https", 'device_id = "x"')))


def test_a_section_that_is_no_table_and_a_nested_table(d: Path) -> None:
    assert "[health]: must be a table" in str(_err(d, "health = 5\n" + BASE))
    assert "[https] extra: unknown key" in str(_err(d, BASE + "[https.extra]\na = 1\n"))


def test_a_typo_is_reported_before_the_missing_key_it_was_meant_to_be(d: Path) -> None:
    e = _err(d, BASE.replace("metadata_url", "metadata_ur"))
    assert "unknown key; did you mean metadata_url?" in str(e)


# --- types and bounds ---------------------------------------------------------------------


@pytest.mark.parametrize("section, body, key, words", [
    (TOP, "", "fleet", "must be a string"),  # see text below: fleet = 3
    ("mqtt", 'port = "8883"', "mqtt.port", "must be an integer"),
    ("mqtt", "port = 8883.0", "mqtt.port", "must be an integer"),
    ("mqtt", "port = 0", "mqtt.port", "at least 1"),
    ("mqtt", "port = 70000", "mqtt.port", "at most 65535"),
    ("health", "nice = true", "health.nice", "must be an integer, not bool"),
    ("mqtt", "max_retries = true", "mqtt.max_retries", "not bool"),
    ("mqtt", "max_retries = 0", "mqtt.max_retries", "at least 1"),
    ("agent", "poll_interval = true", "agent.poll_interval", "not bool"),
    ("agent", 'poll_interval = "60"', "agent.poll_interval", "must be a number"),
    ("agent", "poll_interval = 0", "agent.poll_interval", "above 0"),
    ("agent", "poll_interval = -5", "agent.poll_interval", "above 0"),
    ("agent", "poll_interval = nan", "agent.poll_interval", "nan"),
    ("agent", "poll_interval = inf", "agent.poll_interval", "inf"),
    ("agent", "poll_interval = 1e12", "agent.poll_interval", "at most"),
    ("agent", "tpm_wait = -1", "agent.tpm_wait", "at least 0"),
    ("https", "min_speed = 0", "https.min_speed", "at least 1"),
    ("https", "min_speed = 1.5", "https.min_speed", "must be an integer"),
    ("https", "header_timeout = -1", "https.header_timeout", "above 0"),
    ("health", "unsafe_no_sandbox = 1", "health.unsafe_no_sandbox", "true or false"),
    ("health", 'max_memory = "1P"', "health.max_memory", "size"),
    ("health", "max_memory = 1", "health.max_memory", "at least 64M"),
    ("idle", 'require_mains = "no"', "idle.require_mains", "true or false"),
    ("idle", "min_cpu_idle = 1.5", "idle.min_cpu_idle", "at most 1"),
    ("idle", "max_queue_depth = -1", "idle.max_queue_depth", "at least 0"),
    ("idle", 'windows = ["25:00-26:00"]', "idle.windows", "HH:MM-HH:MM"),
    ("idle", 'windows = "02:00-04:00"', "idle.windows", "list of strings"),
    ("activation", 'command = "/bin/reload"', "activation.command", "list of strings"),
    ("activation", 'command = ["/bin/reload", ""]', "activation.command", "non-empty"),
    ("activation", "timeout = 0", "activation.timeout", "above 0"),
    ("metrics", "textfile = 5", "metrics.textfile", "must be a string"),
])
def test_wrong_type_or_out_of_bounds_names_the_key(d: Path, section: str, body: str, key: str,
                                                   words: str) -> None:
    text = BASE.replace('fleet = "f"', "fleet = 3") if not body else \
        _sub(section, body, BASE + MQTT if section == "mqtt" else BASE)
    if section == "mqtt" and body.startswith("port"):
        text = text.replace("port = 8883\n", "", 1)
    e = _err(d, text)
    assert e.key == key, str(e)
    assert words in str(e)


@pytest.mark.parametrize("value", ["de/v", "dev+1", "dev#", "", "dév", "-x", "a" * 129,
                                   "d\u0000"])
def test_device_id_that_would_break_a_topic_is_refused(d: Path, value: str) -> None:
    e = _err(d, BASE.replace('"d"', f'"{value}"' if value != "d\u0000" else '"d\\u0000"', 1))
    assert e.key == "device_id"


def test_transport_enum_suggests_and_must_be_configured(d: Path) -> None:
    e = _err(d, 'transport = "htps"\n' + BASE)
    assert e.key == "transport" and "did you mean https?" in str(e)
    e = _err(d, 'transport = "mqtt"\n' + BASE)
    assert e.key == "transport" and "not configured" in str(e)


def test_missing_required_key_and_no_transport(d: Path) -> None:
    assert _err(d, BASE.replace('model = "m"\n', "")).key == "model"
    assert _err(d, BASE.replace("port", "x") + MQTT.replace("port = 8883\n", "")).key \
        == "mqtt.port"
    assert _err(d, BASE.split("[https]")[0]).key == "https"


# --- URLs and hosts -----------------------------------------------------------------------


@pytest.mark.parametrize("url, words", [
    ("http://o.example/metadata/", "not an https:// URL"),
    ("ftp://o.example/", "not an https:// URL"),
    ("o.example/metadata/", "not an https:// URL"),
    ("https://", "no host"),
    ("https:///metadata/", "no host"),
    ("https://user:pw@o.example/", "credentials"),
    ("https://o.example/m/?x=1", "no query"),
    ("https://o.example/m/#f", "no query"),
    ("https://o.example:99999/", "not a URL"),
    ("HTTPS://o.example/", "not an https"),  # as the fetcher's check: refused at load
])
def test_urls_must_be_https_with_a_host(d: Path, url: str, words: str) -> None:
    e = _err(d, BASE.replace("https://o.example/metadata/", url))
    assert e.key == "https.metadata_url" and words in str(e), str(e)


@pytest.mark.parametrize("host", ["mqtts://broker.example", "broker example", "", "b/x"])
def test_broker_host_is_a_host_not_a_url(d: Path, host: str) -> None:
    e = _err(d, BASE + MQTT.replace('"broker.example"', f'"{host}"'))
    assert e.key == "mqtt.host"


# --- files --------------------------------------------------------------------------------


def test_missing_ca_file_names_key_and_path(d: Path) -> None:
    e = _err(d, BASE.replace('"ca.pem"', '"nope.pem"'))
    assert e.key == "https.ca_file"
    assert f"[https] ca_file: cannot read {d / 'nope.pem'}" in str(e)
    assert "root.json" not in str(e)


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file", "password_file"])
def test_every_mqtt_file_must_exist(d: Path, key: str) -> None:
    (d / "c.pem").write_text("x")
    body = {"cert_file": 'key_file = "c.pem"', "key_file": 'cert_file = "c.pem"'}.get(key, "")
    text = BASE + MQTT.replace('ca_file = "ca.pem"', "") + f'{key} = "gone"\n{body}\n'
    e = _err(d, text)
    assert e.key == f"mqtt.{key}" and str(d / "gone") in str(e)


def test_a_directory_fifo_or_dangling_link_is_no_file_and_never_blocks(d: Path) -> None:
    (d / "dir").mkdir()
    os.mkfifo(d / "fifo")
    (d / "dangling").symlink_to(d / "absent")
    for name, words in (("dir", "not a regular file"), ("fifo", "not a regular file"),
                        ("dangling", "No such file")):
        done: list[ConfigError] = []

        def load(n: str = name, out: list[ConfigError] = done) -> None:
            out.append(_err(d, BASE.replace('"ca.pem"', f'"{n}"')))

        t = threading.Thread(target=load, daemon=True)
        t.start()
        t.join(10)
        assert done, f"load_config blocked on a {name} ca_file"
        assert done[0].key == "https.ca_file" and words in str(done[0])


def test_a_symlink_to_a_file_is_fine(d: Path) -> None:
    (d / "link.pem").symlink_to(d / "ca.pem")  # /etc/ssl/certs is all symlinks
    (d / "agent.toml").write_text(BASE.replace('"ca.pem"', '"link.pem"'))
    load_config(d / "agent.toml")


@pytest.mark.xdist_group("machine")
def test_unreadable_ca_file() -> None:
    """A mode-000 ca_file, loaded by an unprivileged user (root reads anything: as root,
    the check runs in a forked child that drops to nobody)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="i15-unreadable-"))  # not under root's 0700 tmp
    try:
        d.chmod(0o755)
        (d / "ca.pem").write_text("pem")
        (d / "ca.pem").chmod(0)
        (d / "agent.toml").write_text(BASE)
        (d / "agent.toml").chmod(0o644)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(r)
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                try:
                    load_config(d / "agent.toml")
                    msg = "loaded"
                except ConfigError as e:
                    msg = f"{e.key}|{e}"
                os.write(w, msg.encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            got = f.read().decode()
        os.waitpid(pid, 0)
        assert got.startswith("https.ca_file|") and "Permission denied" in got, got
    finally:
        import shutil

        shutil.rmtree(d)


def test_mqtt_password_rules(d: Path) -> None:
    (d / "pw").write_text("s3cret\n")
    os.chmod(d / "pw", 0o600)  # a secret (test_i15_config_places)
    (d / "agent.toml").write_text(BASE + MQTT + 'password_file = "pw"\n')
    mq = load_config(d / "agent.toml").updater.mqtt
    assert mq is not None and mq.password == "s3cret"
    assert _err(d, BASE + MQTT + 'password_file = "pw"\npassword = "x"\n').key \
        == "mqtt.password_file"
    (d / "pw").write_bytes(b"x" * 5000)
    assert "larger than" in str(_err(d, BASE + MQTT + 'password_file = "pw"\n'))
    (d / "pw").write_bytes(b"\xff\xfe")
    assert _err(d, BASE + MQTT + 'password_file = "pw"\n').key == "mqtt.password_file"
    (d / "c.pem").write_text("x")
    assert _err(d, BASE + MQTT + 'cert_file = "c.pem"\n').key == "mqtt.key_file"


# --- the config file itself ---------------------------------------------------------------


def test_config_file_not_utf8_huge_fifo_device_dir_missing(d: Path) -> None:
    p = d / "agent.toml"
    p.write_bytes(BASE.encode() + b'# \xff\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_document(p)
    with p.open("wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)  # sparse: cheap, read at most limit + 1
    with pytest.raises(ConfigError, match="larger than"):
        read_document(p)
    os.mkfifo(d / "fifo")
    for bad in (d / "fifo", Path("/dev/zero"), d, d / "absent"):
        with pytest.raises(ConfigError) as ei:
            read_document(bad)
        assert str(bad) in str(ei.value)


def test_config_behind_a_symlink_resolves_against_the_link_directory(d: Path) -> None:
    (d / "real.toml").write_text(BASE)
    (d / "agent.toml").symlink_to(d / "real.toml")
    assert load_config(d / "agent.toml").state_dir == d / "state"


def test_default_path() -> None:
    assert Path("/etc/modelward/agent.toml") == DEFAULT_CONFIG
    with pytest.raises(ConfigError) as ei:
        load_config()
    assert "/etc/modelward/agent.toml" in str(ei.value)
    if not DEFAULT_CONFIG.exists():  # (the .deb test installs a commented example there)
        assert "--config" in ei.value.hint


# --- one schema ---------------------------------------------------------------------------


def _every_key(d: Path) -> str:
    (d / "pw").write_text("p")
    (d / "c.pem").write_text("c")
    os.chmod(d / "pw", 0o600)  # secrets, and places that do not overlap (_config_places)
    own = {"password_file": '"pw"', "key_file": '"pw"', "busy_file": '"busy"',
           "textfile": '"m.prom"'}
    values = {"int": "1", "number": "1", "bool": "true", "size": '"128M"', "strs": '["a"]',
              "windows": '["01:00-02:00"]', "url": '"https://h/x/"', "file": '"c.pem"',
              "path": '"p"', "enum": '"auto"', "host": '"h"', "name": '"n"', "str": '"s"'}
    out = []
    for section, keys in SCHEMA.items():
        if section != TOP:
            out.append(f"[{section}]")
        for k, spec in keys.items():
            if (section, k) == ("mqtt", "password"):
                continue  # not with password_file
            out.append(f"{k} = {own.get(k, values[spec.kind])}")
    return "\n".join(out) + "\n"


def test_the_loader_reads_exactly_the_schema(d: Path) -> None:
    p = d / "agent.toml"
    p.write_text(_every_key(d))
    r = validate(read_document(p), p)
    build_config(r)  # reads only through r.get: a key outside SCHEMA is a KeyError
    schema = {(s, k) for s, keys in SCHEMA.items() for k in keys}
    assert r.read == schema  # every key of the schema is used, and nothing else


def test_check_config_shows_every_key_and_hides_the_password(d: Path) -> None:
    (d / "agent.toml").write_text(BASE + MQTT + 'password = "hunter2"\n')
    os.chmod(d / "agent.toml", 0o640)  # inline password: not in a world-readable config
    lines = check_config(d / "agent.toml")
    text = "\n".join(lines)
    assert "hunter2" not in text and "password = <set>" in text
    for section, keys in SCHEMA.items():
        if section != TOP:
            assert f"[{section}]" in lines
        for k in keys:
            assert any(ln.startswith((f"{k} = ", f"# {k}: not set")) for ln in lines), k


# --- attacks ------------------------------------------------------------------------------


def test_a_mistyped_password_is_not_quoted_in_the_error(d: Path) -> None:
    e = _err(d, BASE + MQTT + "password = 918273645\n")
    assert e.key == "mqtt.password" and "918273645" not in str(e)
    (d / "pw").write_bytes(b"\xffsecret-bytes")
    os.chmod(d / "pw", 0o600)
    e = _err(d, BASE + MQTT + 'password_file = "pw"\n')
    assert "secret" not in str(e) and "0xff" not in str(e)


def test_unverified_status_escapes_what_the_disk_wrote(d: Path) -> None:
    """A disk attacker plants a record whose model name holds a line break and a terminal
    escape: the unverified status must not print a line of its own ("verified ...")."""
    import json

    from modelward.agent._status_offline import unverified_status

    (d / "agent.toml").write_text(BASE)
    cfg = load_config(d / "agent.toml")
    (cfg.state_dir / "trust").mkdir(parents=True)
    ref = {"name": "m\nverified  by the TPM\x1b[2J", "version": "1", "fingerprint": "f",
           "slot": "a"}
    (cfg.state_dir / "trust" / "record.json").write_text(json.dumps({"record": {
        "counter": 1, "root_version": 1, "targets_version": 1, "active": ref,
        "previous": None}, "mac": "00"}))
    doc = unverified_status(cfg, "test")
    assert doc["verified"] is False and doc["unverified"].startswith("UNVERIFIED")
    name = doc["active"]["name"]
    assert "\n" not in name and "\x1b" not in name and name.startswith("m")


def test_unverified_status_refuses_a_planted_symlink_record(d: Path) -> None:
    from modelward.agent._status_offline import unverified_status

    (d / "agent.toml").write_text(BASE)
    cfg = load_config(d / "agent.toml")
    (cfg.state_dir / "trust").mkdir(parents=True)
    (cfg.state_dir / "trust" / "record.json").symlink_to("/etc/passwd")
    doc = unverified_status(cfg, "test")
    assert doc["active"] is None and "record.json" in doc["record_problem"]


@pytest.mark.parametrize("text", [
    "device_id = 1" + "9" * 5000 + "\n",  # tomllib: ValueError, not TOMLDecodeError
    "a = " + "[" * 100_000 + "]" * 100_000 + "\n",  # RecursionError
    "a = " + "{b = " * 20_000 + "1" + "}" * 20_000 + "\n",
])
def test_toml_that_breaks_the_parser_is_a_config_error(d: Path, text: str) -> None:
    p = d / "agent.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="not a usable TOML file"):
        read_document(p)


def test_a_huge_integer_value_is_refused_briefly(d: Path) -> None:
    e = _err(d, _sub("agent", "poll_interval = 1" + "0" * 300))
    assert e.key == "agent.poll_interval" and len(str(e)) < 400
